//! Command line: subcommands, and the flag/environment overlay on the config file.
//!
//! Precedence: flag, then `TELESPOOL_*` environment variable, then the file,
//! then the built-in default. Every config key has its variable
//! (`config/env.rs`); only `TELESPOOL_CONFIG` is read by clap, as the
//! `--config` flag's.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::env::{self, Layered, Origin};
use crate::config::{Config, ConfigError, LogFormat};

#[derive(Debug, Parser)]
#[command(
    name = "telespool",
    version,
    about = "Node-local OpenTelemetry agent: OTLP in, batched OTLP/gRPC or OTLP/HTTP out, nothing acknowledged lost"
)]
pub struct Cli {
    #[command(flatten)]
    pub overrides: Overrides,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent (the default).
    Run,
    /// Check the configuration and print the effective config, or the error.
    CheckConfig {
        /// Print each key's effective value with where it came from:
        /// default, file:PATH:LINE, env:VARIABLE or flag:--FLAG.
        #[arg(long)]
        show_origin: bool,
    },
    /// Ask a running agent (its admin API on admin.listen) for a summary;
    /// exit 2 when no agent answers.
    Status {
        /// Print the snapshot as JSON (the admin API's field names), for scripts.
        #[arg(long)]
        json: bool,
    },
    /// A live full-screen view of a running agent: rates, refusals, drops,
    /// buffer and spool fill, upstream. `q` quits.
    Top {
        /// Print one frame as plain text and exit (for scripts and tests).
        #[arg(long)]
        once: bool,
        /// Time between refreshes, e.g. "1s" (at least 250ms).
        #[arg(long, default_value = "1s", value_parser = crate::config::parse_duration)]
        interval: std::time::Duration,
    },
    /// Offline spool tools (refused while an agent holds the spool).
    Spool {
        #[command(subcommand)]
        command: SpoolCommand,
    },
    /// Forward everything in the spool upstream, then exit: 0 when the spool is
    /// empty, 3 with what is left when --timeout runs out. For decommissioning a
    /// node (run it after stopping the service).
    Drain {
        /// How long to keep trying, e.g. "5m".
        #[arg(long, default_value = "5m", value_parser = crate::config::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Write the manual pages or the shell completions into DIR (packaging).
    #[command(hide = true)]
    Generate {
        #[arg(value_enum)]
        what: Generated,
        /// Directory to write into (created if missing).
        dir: PathBuf,
    },
}

/// What `telespool generate` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Generated {
    /// telespool.1 and telespool.toml.5.
    Man,
    /// telespool.bash, _telespool (zsh) and telespool.fish.
    Completions,
}

#[derive(Debug, Subcommand)]
pub enum SpoolCommand {
    /// Rows, bytes and items per signal, and the oldest row's age.
    Stats,
    /// SQLite integrity check plus schema and row checks; exit 1 on problems.
    Verify,
    /// Print spooled batches as OTLP/JSON, one export request per line.
    Export {
        /// Only this signal: traces, metrics or logs.
        #[arg(long)]
        signal: Option<crate::signal::Signal>,
    },
    /// Delete every spooled batch (the data is lost). Requires --yes.
    Purge {
        /// Confirm that every spooled batch is to be deleted.
        #[arg(long)]
        yes: bool,
    },
}

/// Options that override the config file and the environment.
#[derive(Debug, Args, Default)]
pub struct Overrides {
    /// TOML config file (all keys optional; built-in defaults otherwise).
    #[arg(long, global = true, env = "TELESPOOL_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// OTLP/gRPC listen address (receiver.grpc.listen).
    #[arg(long, global = true, value_name = "ADDR")]
    pub grpc_listen: Option<SocketAddr>,
    /// OTLP/HTTP listen address (receiver.http.listen).
    #[arg(long, global = true, value_name = "ADDR")]
    pub http_listen: Option<SocketAddr>,
    /// Upstream OTLP endpoint, http:// or https:// (upstream.endpoint; see upstream.protocol).
    #[arg(long, global = true, value_name = "URL")]
    pub upstream: Option<String>,
    /// Spool file (spool.path).
    #[arg(long, global = true, value_name = "PATH")]
    pub spool: Option<PathBuf>,
    /// Admin listen address for /healthz, /readyz, /metrics (admin.listen).
    #[arg(long, global = true, value_name = "ADDR")]
    pub admin_listen: Option<SocketAddr>,
    /// Log filter such as info or telespool=debug (log.level).
    #[arg(long, global = true, value_name = "LEVEL")]
    pub log_level: Option<String>,
    /// Log format, text or json (log.format).
    #[arg(long, global = true, value_name = "FORMAT")]
    pub log_format: Option<String>,
}

impl Overrides {
    /// Load the file (if any), apply the process environment and the flags,
    /// validate.
    pub fn load(&self) -> Result<Config, ConfigError> {
        Ok(self.load_layered(std::env::vars_os())?.config)
    }

    /// As [`Overrides::load`], with `vars` as the environment, keeping where
    /// each value came from.
    pub fn load_layered(
        &self,
        vars: impl IntoIterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
    ) -> Result<Layered, ConfigError> {
        let layered = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                // The file alone first: its errors name the line.
                Config::from_toml(&text, path)?;
                env::layer(Some((path, &text)), vars)?
            }
            None => env::layer(None, vars)?,
        };
        let Layered {
            mut config,
            mut origins,
        } = layered;
        let mut flag = |key: &str, name: &'static str| origins.set(key, Origin::Flag(name));
        if let Some(addr) = self.grpc_listen {
            config.receiver.grpc.listen = addr;
            flag("receiver.grpc.listen", "--grpc-listen");
        }
        if let Some(addr) = self.http_listen {
            config.receiver.http.listen = addr;
            flag("receiver.http.listen", "--http-listen");
        }
        if let Some(url) = &self.upstream {
            config.upstream.endpoint = Some(url.clone()).filter(|u| !u.is_empty());
            flag("upstream.endpoint", "--upstream");
        }
        if let Some(path) = &self.spool {
            config.spool.path = Some(path.clone());
            flag("spool.path", "--spool");
        }
        if let Some(addr) = self.admin_listen {
            config.admin.listen = addr;
            flag("admin.listen", "--admin-listen");
        }
        if let Some(level) = &self.log_level {
            config.log.level = level.clone();
            flag("log.level", "--log-level");
        }
        if let Some(format) = &self.log_format {
            flag("log.format", "--log-format");
            config.log.format = match format.as_str() {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                other => {
                    return Err(ConfigError::Override {
                        key: "log.format (--log-format)".into(),
                        message: format!("{other:?} is not a log format: use text or json"),
                    })
                }
            };
        }
        config.validate()?;
        Ok(Layered { config, origins })
    }
}
