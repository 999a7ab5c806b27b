//! `[upstream]`: where the exporter sends (gRPC or HTTP), how it retries,
//! and TLS towards upstream.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::units::{duration, ByteSize};
use super::ConfigError;

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConfig {
    /// `http://host:port` or `https://host:port`. None: no export. For
    /// `http/protobuf` a base URL: `/v1/<signal>` is appended.
    pub endpoint: Option<String>,
    /// OTLP over gRPC (default) or over HTTP with protobuf bodies.
    pub protocol: UpstreamProtocol,
    /// `http/protobuf` only: full URLs for one signal, used as given
    /// instead of `endpoint` + `/v1/<signal>`.
    pub traces_endpoint: Option<String>,
    pub metrics_endpoint: Option<String>,
    pub logs_endpoint: Option<String>,
    /// Largest upstream request, uncompressed: batches are sealed below it,
    /// and the exporter lowers its working limit if upstream refuses less.
    pub max_request_bytes: ByteSize,
    /// Exports in flight at once (live data; replay has its own small share).
    pub concurrency: usize,
    /// Deadline of one export call.
    #[serde(with = "duration")]
    pub timeout: Duration,
    pub compression: Compression,
    /// Extra gRPC metadata sent with every export (for example an auth token).
    pub headers: BTreeMap<String, String>,
    /// File of more metadata, `key: value` per line, read at start (keeps
    /// secrets out of the config file); its entries win over `headers`.
    pub headers_file: Option<PathBuf>,
    pub retry: RetryConfig,
    /// Custom CA, client certificate and server name for an `https://` endpoint.
    pub tls: Option<UpstreamTlsConfig>,
}

impl UpstreamConfig {
    /// Whether the exporter reads files a reload should re-read: the
    /// headers file, or TLS files (or the system roots) for `https://`.
    pub fn reads_files(&self) -> bool {
        self.headers_file.is_some()
            || [
                &self.endpoint,
                &self.traces_endpoint,
                &self.metrics_endpoint,
                &self.logs_endpoint,
            ]
            .iter()
            .any(|e| e.as_deref().is_some_and(|e| e.starts_with("https://")))
    }

    /// The per-signal URL keys and their values, for checks and the exporter.
    pub fn signal_endpoints(&self) -> [(&'static str, Option<&str>); 3] {
        [
            ("upstream.traces_endpoint", self.traces_endpoint.as_deref()),
            (
                "upstream.metrics_endpoint",
                self.metrics_endpoint.as_deref(),
            ),
            ("upstream.logs_endpoint", self.logs_endpoint.as_deref()),
        ]
    }

    /// Checks `[upstream]` and its sub-tables; called by
    /// [`Config::validate`](super::Config::validate).
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let bad = |msg: String| Err(ConfigError::Invalid(msg));
        if self.concurrency == 0 {
            return bad("upstream.concurrency must be at least 1".into());
        }
        if self.timeout.is_zero() {
            return bad("upstream.timeout must be above 0s".into());
        }
        if self.retry.initial_backoff > self.retry.max_backoff {
            return bad(
                "upstream.retry.initial_backoff must not exceed upstream.retry.max_backoff".into(),
            );
        }
        self.validate_endpoints()?;
        if self.retry.probe_interval.is_zero() {
            return bad("upstream.retry.probe_interval must be above 0s".into());
        }
        self.validate_tls()
    }

    /// Endpoint URLs: http:// or https:// with a host; per-signal URLs only
    /// with `http/protobuf` and a base `endpoint`.
    fn validate_endpoints(&self) -> Result<(), ConfigError> {
        let bad = |msg: String| Err(ConfigError::Invalid(msg));
        if let Some(endpoint) = &self.endpoint {
            check_url("upstream.endpoint", endpoint, self.protocol)?;
        }
        for (key, url) in self.signal_endpoints() {
            let Some(url) = url else { continue };
            if self.protocol != UpstreamProtocol::HttpProtobuf {
                return bad(format!(
                    "{key} is only used with upstream.protocol = \"http/protobuf\"; \
                     set the protocol or remove {key}"
                ));
            }
            if self.endpoint.is_none() {
                return bad(format!(
                    "{key} is set but upstream.endpoint is not; set upstream.endpoint \
                     (the base URL of the other signals)"
                ));
            }
            check_url(key, url, self.protocol)?;
        }
        if self.max_request_bytes.0 < 1024 {
            return bad(format!(
                "upstream.max_request_bytes ({}) must be at least 1KiB",
                self.max_request_bytes
            ));
        }
        Ok(())
    }

    /// `[upstream.tls]` needs an `https://` endpoint, and a client
    /// certificate needs its key (and the other way round).
    fn validate_tls(&self) -> Result<(), ConfigError> {
        let bad = |msg: String| Err(ConfigError::Invalid(msg));
        let Some(tls) = &self.tls else {
            return Ok(());
        };
        match self.endpoint.as_deref() {
            Some(endpoint) if endpoint.starts_with("https://") => {}
            Some(endpoint) => {
                return bad(format!(
                    "[upstream.tls] is set but upstream.endpoint {endpoint:?} is not https://; \
                     use an https:// endpoint or remove [upstream.tls]"
                ))
            }
            None => {
                return bad("[upstream.tls] is set but there is no upstream.endpoint; \
                     set an https:// endpoint or remove [upstream.tls]"
                    .into())
            }
        }
        match (&tls.cert_file, &tls.key_file) {
            (Some(_), None) => {
                return bad("upstream.tls.cert_file is set without upstream.tls.key_file".into())
            }
            (None, Some(_)) => {
                return bad("upstream.tls.key_file is set without upstream.tls.cert_file".into())
            }
            _ => {}
        }
        if let Some(name) = &tls.server_name {
            if rustls::pki_types::ServerName::try_from(name.as_str()).is_err() {
                return bad(format!(
                    "upstream.tls.server_name {name:?} is not a DNS name or IP address"
                ));
            }
        }
        Ok(())
    }
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            endpoint: None,
            protocol: UpstreamProtocol::Grpc,
            traces_endpoint: None,
            metrics_endpoint: None,
            logs_endpoint: None,
            max_request_bytes: ByteSize(4 << 20),
            concurrency: 4,
            timeout: Duration::from_secs(10),
            compression: Compression::Gzip,
            headers: BTreeMap::new(),
            headers_file: None,
            retry: RetryConfig::default(),
            tls: None,
        }
    }
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    Gzip,
    Zstd,
    None,
}

/// How the exporter speaks OTLP to upstream (`upstream.protocol`).
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub enum UpstreamProtocol {
    #[default]
    #[serde(rename = "grpc")]
    Grpc,
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    #[serde(with = "duration")]
    pub initial_backoff: Duration,
    #[serde(with = "duration")]
    pub max_backoff: Duration,
    /// A batch retrying longer than this goes to the spool.
    #[serde(with = "duration")]
    pub max_elapsed: Duration,
    /// While upstream is failing, one probe export every this often
    /// (`src/probe.rs`); recovery is noticed within about this interval.
    #[serde(with = "duration")]
    pub probe_interval: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
            max_elapsed: Duration::from_secs(300),
            probe_interval: Duration::from_secs(1),
        }
    }
}

/// TLS settings for an `https://` upstream (`[upstream.tls]`).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamTlsConfig {
    /// PEM CA certificates that verify upstream's certificate, instead of
    /// the system's roots. None: the system's roots.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain presented to upstream (with `key_file`).
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    pub key_file: Option<PathBuf>,
    /// Name checked against upstream's certificate instead of the
    /// endpoint's host (for an endpoint given by IP address, say).
    pub server_name: Option<String>,
}

/// An upstream URL under `key`: http:// or https:// with a host.
fn check_url(key: &str, url: &str, protocol: UpstreamProtocol) -> Result<(), ConfigError> {
    let bad = |msg: String| Err(ConfigError::Invalid(msg));
    if !url.contains("://") {
        return bad(format!(
            "{key} {url:?} has no scheme: write a full URL starting with http:// or https://"
        ));
    }
    let uri: http::Uri = url
        .parse()
        .map_err(|e| ConfigError::Invalid(format!("{key} {url:?} is not a URL: {e}")))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        None => {
            return bad(format!(
                "{key} {url:?} has no scheme: write a full URL starting with http:// or https://"
            ))
        }
        Some(other) => {
            let hint = match protocol {
                UpstreamProtocol::HttpProtobuf => " (upstream.protocol is \"http/protobuf\")",
                UpstreamProtocol::Grpc => " (gRPC over TLS is https://)",
            };
            return bad(format!(
                "{key} {url:?} must start with http:// or https://, not {other}://{hint}"
            ));
        }
    }
    if uri.host().is_none() {
        return bad(format!("{key} {url:?} has no host"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::Config;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        let config = Config::from_toml(text, Path::new("test.toml"))?;
        config.validate()?;
        Ok(config)
    }

    #[test]
    fn the_probe_interval_defaults_to_one_second_and_must_be_above_zero() {
        let config = parse("").expect("defaults");
        assert_eq!(config.upstream.retry.probe_interval, Duration::from_secs(1));
        let e = parse("[upstream.retry]\nprobe_interval = \"0s\"\n")
            .expect_err("zero")
            .to_string();
        assert!(e.contains("upstream.retry.probe_interval"), "{e}");
        let packaged = parse(include_str!("../../packaging/telespool.toml")).expect("valid");
        assert_eq!(packaged.upstream.retry, RetryConfig::default());
    }

    #[test]
    fn tls_sections_are_checked() {
        let e = parse("[receiver.tls]\ncert_file = \"/c.pem\"\n")
            .expect_err("no key_file")
            .to_string();
        assert!(e.contains("key_file"), "{e}");
        let https = "[upstream]\nendpoint = \"https://gw.example:4317\"\n";
        for (tls, complaint) in [
            ("", ""),
            ("ca_file = \"/ca.pem\"\nserver_name = \"gw.example\"\n", ""),
            ("cert_file = \"/c.pem\"\n", "without upstream.tls.key_file"),
            ("key_file = \"/k.pem\"\n", "without upstream.tls.cert_file"),
            (
                "server_name = \"not a name!\"\n",
                "upstream.tls.server_name",
            ),
        ] {
            let result = parse(&format!("{https}[upstream.tls]\n{tls}"));
            match complaint {
                "" => assert!(result.is_ok(), "{tls}: {:?}", result.err()),
                _ => {
                    let e = result.expect_err(tls).to_string();
                    assert!(e.contains(complaint), "{e}");
                }
            }
        }
        for endpoint in ["", "[upstream]\nendpoint = \"http://gw.example:4317\"\n"] {
            let e = parse(&format!("{endpoint}[upstream.tls]\n"))
                .expect_err("TLS without https")
                .to_string();
            assert!(e.contains("[upstream.tls] is set but"), "{e}");
        }
    }
}
