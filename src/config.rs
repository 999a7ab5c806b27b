//! Configuration: TOML file, environment and flags, checked before anything is bound.
//!
//! Every option has a built-in default, so `telespool` runs with no file at all.
//! Unknown keys and bad values are errors that name the key and the line
//! (`toml`'s span-carrying errors do the line/column part). Durations are strings
//! such as `"200ms"` or `"10s"`; sizes are strings such as `"64MiB"` or plain
//! integers (bytes). Precedence: flag, environment, file, default; the
//! environment layer (every key as `TELESPOOL_<TABLE>_<KEY>`) is `config/env.rs`,
//! the flags are in `cli.rs`.
//!
//! Each table lives in its own file under `config/` with its defaults and its
//! `validate` (`receiver`, `unix_socket`, `buffer` for `[buffer]` and `[batch]`,
//! `upstream`, `spool` for `[spool]`, `[shutdown]` and `durability`,
//! `resource`), sizes and durations in `units`; [`Config::validate`] calls the
//! tables' checks in a fixed order. The small `[admin]`, `[log]` and
//! `[runtime]`, which have little to check, stay here. Every type is re-exported from here.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

mod buffer;
pub mod env;
mod receiver;
mod resource;
mod spool;
mod units;
mod unix_socket;
mod upstream;

pub use buffer::{BatchConfig, BufferConfig};
pub use receiver::{
    AuthConfig, CorsConfig, HttpListenerConfig, ListenerConfig, ReceiverConfig, ReceiverTlsConfig,
};
pub use resource::{Detector, OnConflict, ResourceConfig};
pub use spool::{Durability, ReplayPacing, ShutdownConfig, SpoolConfig, SyncMode, WhenFull};
pub use units::{parse_duration, ByteSize};
pub use unix_socket::{Group, SocketMode, UnixSocketConfig};
pub use upstream::{Compression, RetryConfig, UpstreamConfig, UpstreamProtocol, UpstreamTlsConfig};

/// The whole agent configuration, as read from `telespool.toml`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub receiver: ReceiverConfig,
    pub buffer: BufferConfig,
    pub batch: BatchConfig,
    pub upstream: UpstreamConfig,
    pub spool: SpoolConfig,
    pub shutdown: ShutdownConfig,
    pub durability: Durability,
    pub admin: AdminConfig,
    pub log: LogConfig,
    pub runtime: RuntimeConfig,
    /// `[resource]`: attributes stamped on every resource. None: no stamping.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource: Option<ResourceConfig>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    pub enabled: bool,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 13133)),
            enabled: true,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A tracing filter directive such as `info` or `telespool=debug`; `RUST_LOG` wins.
    pub level: String,
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".to_owned(),
            format: LogFormat::Text,
        }
    }
}

/// `[runtime]`: the threads that run the receivers, the batching and the
/// exporters (the spool has threads of its own).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Async worker threads; 0: tokio's default, one per CPU the process may
    /// use (an affinity mask or a cgroup CPU quota counts;
    /// `TOKIO_WORKER_THREADS` overrides it).
    pub worker_threads: usize,
}

impl RuntimeConfig {
    /// More workers than this is a typo, not a machine.
    const MAX_WORKER_THREADS: usize = 1024;

    fn validate(&self) -> Result<(), ConfigError> {
        if self.worker_threads > Self::MAX_WORKER_THREADS {
            return Err(ConfigError::Invalid(format!(
                "runtime.worker_threads = {} is more than {}; 0 means one per CPU",
                self.worker_threads,
                Self::MAX_WORKER_THREADS
            )));
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file named by `--config` could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not valid TOML, has an unknown key or a bad value; the message
    /// from `toml` names the key, line and column.
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// A flag or environment variable has a bad value.
    #[error("invalid value for {key}: {message}")]
    Override { key: String, message: String },
    /// A `TELESPOOL_*` environment variable names no config key.
    #[error("unknown environment variable {var}: it names no config key; did you mean {closest_var} ({closest_key})?")]
    UnknownEnv {
        var: String,
        closest_var: String,
        closest_key: String,
    },
    /// Values that are each valid but do not fit together.
    #[error("invalid config: {0}")]
    Invalid(String),
}

impl Config {
    /// Parse TOML text; `origin` names the file in errors.
    pub fn from_toml(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        Ok(config)
    }

    /// Read and parse a TOML file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::from_toml(&text, path)
    }

    /// Check values that are individually well-formed but unusable together.
    /// Each table checks its own keys, in this order; the first problem found
    /// is the one reported.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.batch.validate()?;
        self.buffer.validate(self.receiver.max_request_bytes)?;
        self.upstream.validate()?;
        self.shutdown.validate()?;
        self.receiver.validate()?;
        self.spool.validate()?;
        if let Some(resource) = &self.resource {
            resource.validate()?;
        }
        self.runtime.validate()?;
        Ok(())
    }

    /// The effective configuration as TOML, for `check-config`.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}
