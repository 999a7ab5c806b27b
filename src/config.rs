//! Configuration: TOML file, environment and flags, checked before anything is bound.
//!
//! Every option has a built-in default, so `telespool` runs with no file at all.
//! Unknown keys and bad values are errors that name the key and the line
//! (`toml`'s span-carrying errors do the line/column part). Durations are strings
//! such as `"200ms"` or `"10s"`; sizes are strings such as `"64MiB"` or plain
//! integers (bytes). Precedence: flag, environment, file, default; the
//! environment layer (every key as `TELESPOOL_<TABLE>_<KEY>`) is `config/env.rs`,
//! the flags are in `cli.rs`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub mod env;
mod receiver;
mod resource;
mod spool;
mod units;
mod unix_socket;
mod upstream;

pub use receiver::{
    AuthConfig, CorsConfig, HttpListenerConfig, ListenerConfig, ReceiverConfig, ReceiverTlsConfig,
};
pub use resource::{Detector, OnConflict, ResourceConfig};
pub use spool::{Durability, ShutdownConfig, SpoolConfig, SyncMode, WhenFull};
use units::duration;
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
    /// `[resource]`: attributes stamped on every resource. None: no stamping.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource: Option<ResourceConfig>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BufferConfig {
    /// Memory bound for all buffered request bytes, every signal together.
    pub max_bytes: ByteSize,
    /// How long a request may wait for room before it is refused as retryable.
    #[serde(with = "duration")]
    pub max_wait: Duration,
}

impl Default for BufferConfig {
    fn default() -> Self {
        BufferConfig {
            max_bytes: ByteSize(64 << 20),
            max_wait: Duration::from_millis(500),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BatchConfig {
    /// A batch is sealed when it holds this many items...
    pub max_items: u64,
    /// ...or this many bytes...
    pub max_bytes: ByteSize,
    /// ...or has been open this long.
    #[serde(with = "duration")]
    pub timeout: Duration,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_items: 8192,
            max_bytes: ByteSize(4 << 20),
            timeout: Duration::from_millis(200),
        }
    }
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
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |msg: String| Err(ConfigError::Invalid(msg));
        if self.batch.max_items == 0 {
            return bad("batch.max_items must be at least 1".into());
        }
        if self.batch.max_bytes.0 == 0 {
            return bad("batch.max_bytes must be at least 1 byte".into());
        }
        if self.buffer.max_bytes.0 < self.receiver.max_request_bytes.0 {
            return bad(format!(
                "buffer.max_bytes ({}) must be at least receiver.max_request_bytes ({}), \
                 or a largest request could never be accepted",
                self.buffer.max_bytes, self.receiver.max_request_bytes
            ));
        }
        if self.buffer.max_bytes.0 > u32::MAX as u64 {
            return bad(format!(
                "buffer.max_bytes ({}) must be below 4GiB",
                self.buffer.max_bytes
            ));
        }
        self.upstream.validate()?;
        self.shutdown.validate()?;
        self.receiver.validate()?;
        self.spool.validate()?;
        if let Some(resource) = &self.resource {
            resource.validate()?;
        }
        Ok(())
    }

    /// The effective configuration as TOML, for `check-config`.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}
