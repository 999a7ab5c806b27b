//! Command line: subcommands, and the flag/environment overlay on the config file.
//!
//! Precedence: flag, then `TELESPOOL_*` environment variable (clap reads both),
//! then the file, then the built-in default.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::{Config, ConfigError, LogFormat};

#[derive(Debug, Parser)]
#[command(
    name = "telespool",
    version,
    about = "Node-local OpenTelemetry agent: OTLP in, batched OTLP/gRPC out, nothing acknowledged lost"
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
    CheckConfig,
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
        #[arg(long)]
        yes: bool,
    },
}

/// Options that override the config file; each also as an environment variable.
#[derive(Debug, Args, Default)]
pub struct Overrides {
    /// TOML config file (all keys optional; built-in defaults otherwise).
    #[arg(long, global = true, env = "TELESPOOL_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// OTLP/gRPC listen address (receiver.grpc.listen).
    #[arg(
        long,
        global = true,
        env = "TELESPOOL_RECEIVER_GRPC_LISTEN",
        value_name = "ADDR"
    )]
    pub grpc_listen: Option<SocketAddr>,
    /// OTLP/HTTP listen address (receiver.http.listen).
    #[arg(
        long,
        global = true,
        env = "TELESPOOL_RECEIVER_HTTP_LISTEN",
        value_name = "ADDR"
    )]
    pub http_listen: Option<SocketAddr>,
    /// Upstream OTLP/gRPC endpoint, http:// or https:// (upstream.endpoint).
    #[arg(
        long,
        global = true,
        env = "TELESPOOL_UPSTREAM_ENDPOINT",
        value_name = "URL"
    )]
    pub upstream: Option<String>,
    /// Spool file (spool.path).
    #[arg(long, global = true, env = "TELESPOOL_SPOOL_PATH", value_name = "PATH")]
    pub spool: Option<PathBuf>,
    /// Admin listen address for /healthz, /readyz, /metrics (admin.listen).
    #[arg(
        long,
        global = true,
        env = "TELESPOOL_ADMIN_LISTEN",
        value_name = "ADDR"
    )]
    pub admin_listen: Option<SocketAddr>,
    /// Log filter such as info or telespool=debug (log.level).
    #[arg(long, global = true, env = "TELESPOOL_LOG_LEVEL", value_name = "LEVEL")]
    pub log_level: Option<String>,
    /// Log format, text or json (log.format).
    #[arg(
        long,
        global = true,
        env = "TELESPOOL_LOG_FORMAT",
        value_name = "FORMAT"
    )]
    pub log_format: Option<String>,
}

impl Overrides {
    /// Load the file (if any), apply overrides, validate.
    pub fn load(&self) -> Result<Config, ConfigError> {
        let mut config = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        if let Some(addr) = self.grpc_listen {
            config.receiver.grpc.listen = addr;
        }
        if let Some(addr) = self.http_listen {
            config.receiver.http.listen = addr;
        }
        if let Some(url) = &self.upstream {
            config.upstream.endpoint = Some(url.clone()).filter(|u| !u.is_empty());
        }
        if let Some(path) = &self.spool {
            config.spool.path = Some(path.clone());
        }
        if let Some(addr) = self.admin_listen {
            config.admin.listen = addr;
        }
        if let Some(level) = &self.log_level {
            config.log.level = level.clone();
        }
        if let Some(format) = &self.log_format {
            config.log.format = match format.as_str() {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                other => {
                    return Err(ConfigError::Override {
                        key: "log.format (--log-format / TELESPOOL_LOG_FORMAT)".into(),
                        message: format!("{other:?} is not a log format: use text or json"),
                    })
                }
            };
        }
        config.validate()?;
        Ok(config)
    }
}
