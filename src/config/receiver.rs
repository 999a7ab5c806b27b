//! `[receiver]`: the OTLP listeners (gRPC and HTTP), their limits and
//! timeouts, client authentication, TLS and browser access (CORS). Their
//! Unix sockets are in `unix_socket.rs`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::units::{duration, ByteSize};
use super::unix_socket::{validate_unix_socket, Group, SocketMode, UnixSocketConfig};
use super::ConfigError;

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
    /// a client that trickles bytes gets DEADLINE_EXCEEDED / 503 (retryable).
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
    /// Checks `[receiver]` and its sub-tables; called by
    /// [`Config::validate`](super::Config::validate).
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let bad = |msg: String| Err(ConfigError::Invalid(msg));
        self.http.cors.validate()?;
        self.validate_limits()?;
        let (grpc, http) = (&self.grpc, &self.http);
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
        Ok(())
    }

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

    /// Each origin as browsers send it: `"*"` or `scheme://host[:port]`.
    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |msg: String| Err(ConfigError::Invalid(msg));
        for origin in &self.allowed_origins {
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
        Ok(())
    }
}

fn yes() -> bool {
    true
}

#[cfg(test)]
mod cors_tests {
    use std::path::Path;

    use super::*;
    use crate::config::Config;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        let config = Config::from_toml(text, Path::new("test.toml"))?;
        config.validate()?;
        Ok(config)
    }

    #[test]
    fn packaged_config_parses_and_leaves_cors_off() {
        let config = parse(include_str!("../../packaging/telespool.toml")).expect("valid");
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
