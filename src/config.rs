//! Configuration: TOML file, environment and flags, checked before anything is bound.
//!
//! Every option has a built-in default, so `telespool` runs with no file at all.
//! Unknown keys and bad values are errors that name the key and the line
//! (`toml`'s span-carrying errors do the line/column part). Durations are strings
//! such as `"200ms"` or `"10s"`; sizes are strings such as `"64MiB"` or plain
//! integers (bytes). Precedence: flag, environment, file, default; the
//! environment layer (every key as `TELESPOOL_<TABLE>_<KEY>`) is `config/env.rs`,
//! the flags are in `cli.rs`.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub mod env;
mod resource;
mod spool;
mod units;
mod upstream;

pub use resource::{Detector, OnConflict, ResourceConfig};
pub use spool::{Durability, ShutdownConfig, SpoolConfig, SyncMode, WhenFull};
use units::duration;
pub use units::{parse_duration, ByteSize};
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
pub struct ReceiverConfig {
    pub grpc: ListenerConfig,
    pub http: HttpListenerConfig,
    /// Largest accepted request body, after decompression.
    pub max_request_bytes: ByteSize,
    /// Open connections per listener; further clients wait in the kernel's
    /// accept queue until one closes.
    pub max_connections: usize,
    /// HTTP/2 streams (requests) in flight on one connection.
    pub max_concurrent_streams: u32,
    /// Largest request header block: the HTTP/2 header list, the HTTP/1 read
    /// buffer (at least 8KiB there).
    pub max_header_bytes: ByteSize,
    /// Deadline for receiving a whole request body once its headers arrived;
    /// a client that trickles bytes gets DEADLINE_EXCEEDED / 408.
    #[serde(with = "duration")]
    pub body_timeout: Duration,
    /// HTTP/1 deadline for a request's headers (slow-header clients).
    #[serde(with = "duration")]
    pub header_timeout: Duration,
    /// A connection with no request in flight for this long is closed
    /// (gracefully); clients reconnect when they next send.
    #[serde(with = "duration")]
    pub idle_timeout: Duration,
    /// HTTP/2 keepalive: PING a connection this often to find dead peers;
    /// "0s" turns pings off.
    #[serde(with = "duration")]
    pub keepalive_interval: Duration,
    /// HTTP/2 keepalive: close the connection if a PING is not answered in time.
    #[serde(with = "duration")]
    pub keepalive_timeout: Duration,
    pub auth: AuthConfig,
    /// TLS on both OTLP listeners; None: plaintext.
    pub tls: Option<ReceiverTlsConfig>,
}

/// TLS for the OTLP listeners (`[receiver.tls]`), gRPC and HTTP alike. The
/// files are read at start and again on SIGHUP.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ReceiverTlsConfig {
    /// PEM certificate chain the listeners present, leaf first.
    pub cert_file: PathBuf,
    /// PEM private key of the leaf certificate (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// PEM CA certificates; when set, every client must present a
    /// certificate issued by one of them (mutual TLS).
    pub client_ca_file: Option<PathBuf>,
}

/// Bearer-token authentication of clients (`[receiver.auth]`).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// File of accepted tokens, one per line, read at start. None: no auth.
    pub token_file: Option<PathBuf>,
}

impl Default for ReceiverConfig {
    fn default() -> Self {
        ReceiverConfig {
            grpc: ListenerConfig::on("127.0.0.1:4317"),
            http: HttpListenerConfig::default(),
            max_request_bytes: ByteSize(4 << 20),
            max_connections: 1024,
            max_concurrent_streams: 100,
            max_header_bytes: ByteSize(32 << 10),
            body_timeout: Duration::from_secs(30),
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            keepalive_interval: Duration::from_secs(60),
            keepalive_timeout: Duration::from_secs(20),
            auth: AuthConfig::default(),
            tls: None,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Address to bind; `enabled = false` turns the listener off (TCP and
    /// Unix socket).
    #[serde(default = "grpc_listen")]
    pub listen: SocketAddr,
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Also serve on this Unix domain socket (absolute path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unix_socket: Option<PathBuf>,
    /// File mode of the socket: who may connect.
    #[serde(default)]
    pub unix_socket_mode: SocketMode,
    /// Group of the socket (name or numeric gid); None: the agent's group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unix_socket_group: Option<Group>,
    /// Serve the Unix socket only: bind no TCP address.
    #[serde(default)]
    pub unix_socket_only: bool,
}

fn grpc_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 4317))
}

impl ListenerConfig {
    fn on(addr: &str) -> Self {
        ListenerConfig {
            listen: addr.parse().expect("built-in address is valid"),
            enabled: true,
            unix_socket: None,
            unix_socket_mode: SocketMode::default(),
            unix_socket_group: None,
            unix_socket_only: false,
        }
    }

    /// Whether the TCP address is served.
    pub fn serves_tcp(&self) -> bool {
        self.enabled && !self.unix_socket_only
    }

    /// The Unix socket to serve, if any.
    pub fn unix_socket(&self) -> Option<UnixSocketConfig> {
        UnixSocketConfig::of(
            "receiver.grpc",
            self.enabled,
            &self.unix_socket,
            self.unix_socket_mode,
            &self.unix_socket_group,
        )
    }
}

impl Default for ListenerConfig {
    fn default() -> Self {
        ListenerConfig::on("127.0.0.1:0")
    }
}

impl ReceiverConfig {
    fn validate_limits(&self) -> Result<(), ConfigError> {
        let bad = |msg: &str| Err(ConfigError::Invalid(msg.to_owned()));
        if self.max_connections == 0 {
            return bad("receiver.max_connections must be at least 1");
        }
        if self.max_concurrent_streams == 0 {
            return bad("receiver.max_concurrent_streams must be at least 1");
        }
        if !(1024..=(16 << 20)).contains(&self.max_header_bytes.0) {
            return bad("receiver.max_header_bytes must be between 1KiB and 16MiB");
        }
        for (key, value) in [
            ("receiver.body_timeout", self.body_timeout),
            ("receiver.header_timeout", self.header_timeout),
            ("receiver.idle_timeout", self.idle_timeout),
            ("receiver.keepalive_timeout", self.keepalive_timeout),
        ] {
            if value.is_zero() {
                return Err(ConfigError::Invalid(format!("{key} must be above 0s")));
            }
        }
        Ok(())
    }
}

/// The OTLP/HTTP listener: a [`ListenerConfig`] plus browser access. Every
/// key has a default, so `[receiver.http.cors]` alone is a complete config.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HttpListenerConfig {
    /// Address to bind; `enabled = false` turns the listener off (TCP and
    /// Unix socket).
    pub listen: SocketAddr,
    pub enabled: bool,
    /// As in [`ListenerConfig`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unix_socket: Option<PathBuf>,
    pub unix_socket_mode: SocketMode,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unix_socket_group: Option<Group>,
    pub unix_socket_only: bool,
    /// Cross-origin access for browser SDKs; off unless origins are listed.
    pub cors: CorsConfig,
}

impl Default for HttpListenerConfig {
    fn default() -> Self {
        HttpListenerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 4318)),
            enabled: true,
            unix_socket: None,
            unix_socket_mode: SocketMode::default(),
            unix_socket_group: None,
            unix_socket_only: false,
            cors: CorsConfig::default(),
        }
    }
}

impl HttpListenerConfig {
    /// Whether the TCP address is served.
    pub fn serves_tcp(&self) -> bool {
        self.enabled && !self.unix_socket_only
    }

    /// The Unix socket to serve, if any.
    pub fn unix_socket(&self) -> Option<UnixSocketConfig> {
        UnixSocketConfig::of(
            "receiver.http",
            self.enabled,
            &self.unix_socket,
            self.unix_socket_mode,
            &self.unix_socket_group,
        )
    }
}

/// One receiver's Unix domain socket, from its `unix_socket*` keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnixSocketConfig {
    /// `receiver.grpc` or `receiver.http`: errors name `<section>.unix_socket`.
    pub section: &'static str,
    pub path: PathBuf,
    pub mode: SocketMode,
    pub group: Option<Group>,
}

impl UnixSocketConfig {
    fn of(
        section: &'static str,
        enabled: bool,
        path: &Option<PathBuf>,
        mode: SocketMode,
        group: &Option<Group>,
    ) -> Option<UnixSocketConfig> {
        let path = path.as_ref().filter(|_| enabled)?;
        Some(UnixSocketConfig {
            section,
            path: path.clone(),
            mode,
            group: group.clone(),
        })
    }
}

/// Longest Unix socket path: `sun_path` is 108 bytes on Linux, with a NUL at the end.
pub const MAX_UNIX_SOCKET_PATH: usize = 107;

/// Checks one receiver's `unix_socket*` keys.
fn validate_unix_socket(
    section: &str,
    path: Option<&Path>,
    group: Option<&Group>,
    only: bool,
) -> Result<(), ConfigError> {
    let bad = |msg: String| Err(ConfigError::Invalid(msg));
    let Some(path) = path else {
        if only {
            return bad(format!(
                "{section}.unix_socket_only = true needs {section}.unix_socket; \
                 to turn the receiver off set {section}.enabled = false"
            ));
        }
        if group.is_some() {
            return bad(format!(
                "{section}.unix_socket_group is set but {section}.unix_socket is not"
            ));
        }
        return Ok(());
    };
    if !path.is_absolute() {
        return bad(format!(
            "{section}.unix_socket {path:?} must be an absolute path (such as \
             \"/run/telespool/otlp.sock\")"
        ));
    }
    if path.file_name().is_none() || path.as_os_str().as_encoded_bytes().ends_with(b"/") {
        return bad(format!(
            "{section}.unix_socket {path:?} names a directory; give the socket's file path"
        ));
    }
    let len = path.as_os_str().len();
    if len > MAX_UNIX_SOCKET_PATH {
        return bad(format!(
            "{section}.unix_socket {path:?} is {len} bytes long; a Unix socket path can \
             have at most {MAX_UNIX_SOCKET_PATH} (the kernel's sun_path), so pick a shorter one"
        ));
    }
    Ok(())
}

/// File mode of a Unix socket; in TOML an octal string such as `"0660"`.
///
/// Connecting needs write permission on the socket file, so the mode decides
/// who may send: `"0660"` (the default) the agent's user and the socket's
/// group, `"0666"` every local user (like a loopback TCP port).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketMode(pub u32);

impl Default for SocketMode {
    fn default() -> Self {
        SocketMode(0o660)
    }
}

impl fmt::Display for SocketMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04o}", self.0)
    }
}

impl std::str::FromStr for SocketMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let digits = s.trim();
        let digits = digits.strip_prefix("0o").unwrap_or(digits);
        let octal =
            (3..=4).contains(&digits.len()) && digits.bytes().all(|b| (b'0'..=b'7').contains(&b));
        let mode = match octal {
            true => u32::from_str_radix(digits, 8).ok(),
            false => None,
        };
        match mode {
            Some(mode) if mode <= 0o777 => Ok(SocketMode(mode)),
            Some(_) => Err(format!(
                "{s:?}: a socket's mode has permission bits only (at most \"0777\")"
            )),
            None => Err(format!(
                "{s:?} is not a file mode: expected octal digits such as \"0660\""
            )),
        }
    }
}

impl<'de> Deserialize<'de> for SocketMode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d).map_err(|_| {
            serde::de::Error::custom(
                "expected the mode as a string such as \"0660\" (a bare 660 would be read as decimal)",
            )
        })?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for SocketMode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

/// A group, by name or numeric gid; in TOML a string (`"otel"`, `"1001"`) or
/// an integer (`1001`). A string of digits is a gid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Group {
    Name(String),
    Id(u32),
}

impl fmt::Display for Group {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Group::Name(name) => f.write_str(name),
            Group::Id(gid) => write!(f, "{gid}"),
        }
    }
}

impl<'de> Deserialize<'de> for Group {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u32),
            Str(String),
        }
        let raw = Raw::deserialize(d)
            .map_err(|_| serde::de::Error::custom("expected a group name or a numeric gid"))?;
        match raw {
            Raw::Int(gid) => Ok(Group::Id(gid)),
            Raw::Str(s) if s.is_empty() => Err(serde::de::Error::custom(
                "the group name is empty; give a group name or a numeric gid",
            )),
            Raw::Str(s) => Ok(match s.parse::<u32>() {
                Ok(gid) if s.bytes().all(|b| b.is_ascii_digit()) => Group::Id(gid),
                _ => Group::Name(s),
            }),
        }
    }
}

impl Serialize for Group {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Group::Name(name) => s.serialize_str(name),
            Group::Id(gid) => s.serialize_u32(*gid),
        }
    }
}

/// CORS for the OTLP/HTTP listener (`[receiver.http.cors]`).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CorsConfig {
    /// Origins (`https://app.example.com`) allowed to send telemetry from a
    /// browser; `"*"` allows any. Empty: no CORS headers, preflights refused.
    pub allowed_origins: Vec<String>,
}

impl CorsConfig {
    pub fn enabled(&self) -> bool {
        !self.allowed_origins.is_empty()
    }
}

fn yes() -> bool {
    true
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
        for origin in &self.receiver.http.cors.allowed_origins {
            let rest = origin
                .strip_prefix("https://")
                .or_else(|| origin.strip_prefix("http://"));
            let ok = origin == "*" || rest.is_some_and(|r| !r.is_empty() && !r.contains('/'));
            if !ok {
                return bad(format!(
                    "receiver.http.cors.allowed_origins: {origin:?} is not an origin; \
                     write \"*\" or scheme://host[:port] with no path or trailing slash, \
                     as browsers send it (\"https://app.example.com\")"
                ));
            }
        }
        self.receiver.validate_limits()?;
        let (grpc, http) = (&self.receiver.grpc, &self.receiver.http);
        validate_unix_socket(
            "receiver.grpc",
            grpc.unix_socket.as_deref(),
            grpc.unix_socket_group.as_ref(),
            grpc.unix_socket_only,
        )?;
        validate_unix_socket(
            "receiver.http",
            http.unix_socket.as_deref(),
            http.unix_socket_group.as_ref(),
            http.unix_socket_only,
        )?;
        if let (Some(a), Some(b)) = (&grpc.unix_socket, &http.unix_socket) {
            if a == b {
                return bad(format!(
                    "receiver.grpc.unix_socket and receiver.http.unix_socket are both {a:?}; \
                     each receiver needs its own socket"
                ));
            }
        }
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

#[cfg(test)]
mod cors_tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        let config = Config::from_toml(text, Path::new("test.toml"))?;
        config.validate()?;
        Ok(config)
    }

    #[test]
    fn packaged_config_parses_and_leaves_cors_off() {
        let config = parse(include_str!("../packaging/telespool.toml")).expect("valid");
        assert!(!config.receiver.http.cors.enabled());
        assert_eq!(config.receiver.http, ReceiverConfig::default().http);
        assert_eq!(
            config.receiver,
            ReceiverConfig::default(),
            "packaging/telespool.toml shows the built-in receiver defaults"
        );
    }

    #[test]
    fn receiver_limits_are_checked() {
        for (text, key) in [
            ("max_connections = 0", "receiver.max_connections"),
            (
                "max_concurrent_streams = 0",
                "receiver.max_concurrent_streams",
            ),
            ("max_header_bytes = 100", "receiver.max_header_bytes"),
            ("body_timeout = \"0s\"", "receiver.body_timeout"),
            ("idle_timeout = \"0s\"", "receiver.idle_timeout"),
        ] {
            let e = parse(&format!("[receiver]\n{text}\n"))
                .expect_err(text)
                .to_string();
            assert!(e.contains(key), "{e}");
        }
        let e = parse("[receiver]\nbody_timeout = 5\n").expect_err("not a duration");
        assert!(e.to_string().contains("body_timeout"), "{e}");
    }

    #[test]
    fn cors_origins_are_read_and_checked() {
        let config =
            parse("[receiver.http.cors]\nallowed_origins = [\"https://app.example.com\", \"*\"]\n")
                .expect("valid");
        assert!(config.receiver.http.cors.enabled());
        assert_eq!(
            config.receiver.http.listen,
            HttpListenerConfig::default().listen
        );
        for bad in ["https://app.example.com/", "app.example.com", "https://"] {
            let text = format!("[receiver.http.cors]\nallowed_origins = [{bad:?}]\n");
            let e = parse(&text).expect_err(bad).to_string();
            assert!(e.contains("allowed_origins") && e.contains(bad), "{e}");
        }
        let e = parse("[receiver.http.cors]\norigins = []\n")
            .expect_err("unknown key")
            .to_string();
        assert!(e.contains("unknown field `origins`"), "{e}");
        let e = parse("[receiver.grpc.cors]\nallowed_origins = []\n")
            .expect_err("no cors on grpc")
            .to_string();
        assert!(e.contains("unknown field `cors`"), "{e}");
    }
}

#[cfg(test)]
mod unix_socket_tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        let config = Config::from_toml(text, Path::new("test.toml"))?;
        config.validate()?;
        Ok(config)
    }

    #[track_caller]
    fn refused(text: &str, needles: &[&str]) {
        let e = parse(text).expect_err(text).to_string();
        for needle in needles {
            assert!(e.contains(needle), "{needle:?} not in: {e}");
        }
    }

    #[test]
    fn socket_keys_are_read_with_a_0660_default_mode_next_to_the_tcp_address() {
        let config = parse(
            "[receiver.grpc]\nunix_socket = \"/run/telespool/grpc.sock\"\n\
             unix_socket_group = \"otel\"\n\
             [receiver.http]\nunix_socket = \"/run/telespool/http.sock\"\n\
             unix_socket_mode = \"0600\"\nunix_socket_group = 1001\nunix_socket_only = true\n",
        )
        .expect("valid");
        let (grpc, http) = (&config.receiver.grpc, &config.receiver.http);
        assert_eq!(
            grpc.listen,
            ReceiverConfig::default().grpc.listen,
            "listen keeps its default"
        );
        assert!(grpc.serves_tcp());
        let socket = grpc.unix_socket().expect("grpc socket");
        assert_eq!(socket.path, Path::new("/run/telespool/grpc.sock"));
        assert_eq!(socket.mode, SocketMode(0o660));
        assert_eq!(socket.group, Some(Group::Name("otel".into())));
        assert!(!http.serves_tcp(), "unix_socket_only");
        let socket = http.unix_socket().expect("http socket");
        assert_eq!(
            (socket.mode, socket.group),
            (SocketMode(0o600), Some(Group::Id(1001)))
        );

        let off = parse("[receiver.grpc]\nenabled = false\nunix_socket = \"/run/x.sock\"\n")
            .expect("valid");
        assert!(
            off.receiver.grpc.unix_socket().is_none(),
            "enabled = false turns both off"
        );
        assert!(!off.receiver.grpc.serves_tcp());

        let shown = config.to_toml();
        assert!(shown.contains("unix_socket_mode = \"0600\""), "{shown}");
        assert_eq!(parse(&shown).expect("round trip"), config);
    }

    #[test]
    fn socket_paths_must_be_absolute_short_and_distinct() {
        refused(
            "[receiver.grpc]\nunix_socket = \"otlp.sock\"\n",
            &["receiver.grpc.unix_socket", "absolute path"],
        );
        refused(
            "[receiver.http]\nunix_socket = \"/run/telespool/\"\n",
            &["receiver.http.unix_socket", "directory"],
        );
        let long = format!("/run/{}.sock", "x".repeat(100));
        refused(
            &format!("[receiver.http]\nunix_socket = {long:?}\n"),
            &["receiver.http.unix_socket", "110 bytes", "at most 107"],
        );
        let longest = format!("/run/{}.sock", "x".repeat(97));
        assert_eq!(longest.len(), MAX_UNIX_SOCKET_PATH);
        parse(&format!("[receiver.http]\nunix_socket = {longest:?}\n")).expect("107 bytes fit");
        refused(
            "[receiver.grpc]\nunix_socket = \"/run/a.sock\"\n[receiver.http]\nunix_socket = \"/run/a.sock\"\n",
            &["receiver.grpc.unix_socket and receiver.http.unix_socket", "own socket"],
        );
    }

    #[test]
    fn socket_mode_group_and_only_switch_are_checked() {
        for (mode, needle) in [
            ("660", "decimal"),
            ("\"rw-rw----\"", "not a file mode"),
            ("\"0668\"", "not a file mode"),
            ("\"04660\"", "not a file mode"),
            ("\"1777\"", "permission bits only"),
        ] {
            refused(
                &format!(
                    "[receiver.grpc]\nunix_socket = \"/run/a.sock\"\nunix_socket_mode = {mode}\n"
                ),
                &["unix_socket_mode", needle],
            );
        }
        for (text, mode) in [("\"640\"", 0o640), ("\"0o666\"", 0o666), ("\"0000\"", 0)] {
            let config = parse(&format!(
                "[receiver.grpc]\nunix_socket = \"/run/a.sock\"\nunix_socket_mode = {text}\n"
            ))
            .expect(text);
            assert_eq!(config.receiver.grpc.unix_socket_mode, SocketMode(mode));
        }
        refused(
            "[receiver.grpc]\nunix_socket_only = true\n",
            &[
                "receiver.grpc.unix_socket_only",
                "needs receiver.grpc.unix_socket",
            ],
        );
        refused(
            "[receiver.http]\nunix_socket_group = \"otel\"\n",
            &["receiver.http.unix_socket_group is set"],
        );
        refused(
            "[receiver.grpc]\nunix_socket = \"/run/a.sock\"\nunix_socket_group = \"\"\n",
            &["unix_socket_group", "empty"],
        );
        refused(
            "[receiver.grpc]\nunix_sock = \"/run/a.sock\"\n",
            &["unknown field `unix_sock`"],
        );
    }
}
