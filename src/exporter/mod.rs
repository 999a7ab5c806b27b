//! The upstream client: OTLP export of raw batch bytes, over gRPC
//! ([`grpc`]) or HTTP/protobuf ([`http`]), compressed with gzip, zstd or not
//! at all ([`compress`]).
//!
//! Both protocols report one outcome: [`Accepted`] (with a partial-success
//! count) or an [`ExportFailure`] whose [`Cause`] the retry policy
//! (`retry::classify`) turns into retry, split or drop. Upstream health (up,
//! failing since, last error) is tracked in [`Health`] and logged on each
//! change.
//!
//! **Size limits.** Batches are sealed below `upstream.max_request_bytes`.
//! An upstream that still answers "too large" makes the pipeline split the
//! batch ([`split`]) and lower this upstream's working limit
//! ([`Upstream::lower_limit`]); later batches are cut to the working limit
//! before their first attempt. The limit only goes down while the agent runs.
//!
//! The endpoint, its TLS files and `upstream.headers_file` are read into an
//! [`UpstreamSetup`] before the listeners are bound; SIGHUP builds a new one
//! and [`Upstream::reload`] swaps it in without touching exports in flight.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use ::http::HeaderMap;
use bytes::Bytes;
use prost::Message;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};

use crate::config::{UpstreamConfig, UpstreamProtocol};
use crate::signal::Signal;

mod body;
mod compress;
mod connect;
mod cork;
mod grpc;
mod health;
mod http;
mod loopback;
pub(crate) mod split;

pub use compress::{compress, compress_with, Deflate, GZIP};
// Public for `benches/upstream_write.rs`.
pub use cork::{CorkedTcp, UncorkAfterPoll};
pub use health::{Health, HealthState};

/// Largest reply body read from upstream (replies are tiny: a partial-success report).
const MAX_REPLY_BYTES: usize = 4 << 20;

/// Why the exporter could not be built from the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ExporterError {
    /// `upstream.endpoint` is not a usable URL.
    #[error("upstream.endpoint {endpoint:?} is invalid: {source}")]
    Endpoint {
        endpoint: String,
        source: tonic::transport::Error,
    },
    /// An OTLP/HTTP URL (base + path, or a per-signal one) does not parse.
    #[error("{key} {url:?} is not a usable URL: {message}")]
    Url {
        key: &'static str,
        url: String,
        message: String,
    },
    /// A key or value in `upstream.headers` is not valid gRPC metadata.
    #[error("upstream.headers: {key:?} is not a valid gRPC metadata {what} (use lower-case ASCII keys and printable ASCII values)")]
    Header { key: String, what: &'static str },
    /// A file of `[upstream.tls]` cannot be used.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// `upstream.headers_file` cannot be read or has a line that is not `key: value`.
    #[error("upstream.headers_file {path}: {message}")]
    HeadersFile {
        path: std::path::PathBuf,
        message: String,
    },
}

/// Read `key: value` lines (blank lines and `#` comments skipped). Error
/// messages name the line number, never its contents (they may be secrets).
pub fn read_headers_file(
    path: &std::path::Path,
) -> Result<std::collections::BTreeMap<String, String>, ExporterError> {
    let err = |message: String| ExporterError::HeadersFile {
        path: path.to_owned(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read: {e}")))?;
    let mut headers = std::collections::BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match line.split_once(':') {
            Some((key, value)) if !key.trim().is_empty() => {
                headers.insert(key.trim().to_ascii_lowercase(), value.trim().to_owned());
            }
            _ => return Err(err(format!("line {} is not `key: value`", n + 1))),
        }
    }
    Ok(headers)
}

pub use crate::retry::{Cause, ExportFailure};

/// A successful export; `rejected` items were refused by upstream in a
/// partial-success reply and are not retried.
#[derive(Debug, Clone, Default)]
pub struct Accepted {
    pub rejected: u64,
    pub message: String,
}

/// The protocol-specific part of a setup.
#[derive(Clone, Debug)]
// Built once at start and once per reload: the size difference costs nothing.
#[allow(clippy::large_enum_variant)]
enum Transport {
    Grpc(grpc::GrpcSetup),
    Http(http::HttpSetup),
}

/// The upstream's endpoint (with TLS) and headers as the config and its
/// files describe them. Built before anything is bound, and again on SIGHUP
/// ([`Upstream::reload`]).
#[derive(Clone, Debug)]
pub struct UpstreamSetup {
    transport: Transport,
    headers: HeaderMap,
}

impl UpstreamSetup {
    /// Read `upstream.headers_file` and the `[upstream.tls]` files and
    /// configure the endpoint. Needs no runtime.
    pub fn load(cfg: &UpstreamConfig, endpoint: &str) -> Result<UpstreamSetup, ExporterError> {
        let transport = match cfg.protocol {
            UpstreamProtocol::Grpc => Transport::Grpc(grpc::GrpcSetup::load(cfg, endpoint)?),
            UpstreamProtocol::HttpProtobuf => {
                Transport::Http(http::HttpSetup::load(cfg, endpoint)?)
            }
        };
        let mut all = cfg.headers.clone();
        if let Some(path) = &cfg.headers_file {
            all.extend(read_headers_file(path)?);
        }
        // gRPC metadata rules for both protocols: lower-case ASCII keys,
        // printable ASCII values (HTTP header names are case-insensitive).
        let mut headers = MetadataMap::new();
        for (k, v) in &all {
            let key = MetadataKey::from_bytes(k.as_bytes()).map_err(|_| ExporterError::Header {
                key: k.clone(),
                what: "key",
            })?;
            let mut value: MetadataValue<_> = v.parse().map_err(|_| ExporterError::Header {
                key: k.clone(),
                what: "value",
            })?;
            // Debug output of the map shows "Sensitive", not the secret.
            value.set_sensitive(true);
            headers.insert(key, value);
        }
        Ok(UpstreamSetup {
            transport,
            headers: headers.into_headers(),
        })
    }
}

#[derive(Clone, Debug)]
enum Client {
    Grpc(grpc::GrpcUpstream),
    Http(Box<http::HttpUpstream>),
}

/// Client for one upstream, cheap to clone.
#[derive(Clone, Debug)]
pub struct Upstream {
    client: Client,
    endpoint: String,
    health: Arc<Health>,
    /// The largest request (uncompressed bytes) this upstream is sent: starts
    /// at `upstream.max_request_bytes`, lowered when upstream says "too large".
    limit: Arc<AtomicU64>,
}

impl Upstream {
    /// Build the client; connects lazily, so an unreachable upstream is not
    /// an error here. Must be called inside a tokio runtime.
    pub fn new(cfg: &UpstreamConfig, endpoint: &str, setup: UpstreamSetup) -> Upstream {
        let client = match setup.transport {
            Transport::Grpc(g) => Client::Grpc(grpc::GrpcUpstream::new(
                g,
                setup.headers,
                endpoint,
                cfg.timeout,
                cfg.compression,
            )),
            Transport::Http(h) => Client::Http(Box::new(http::HttpUpstream::new(
                h,
                setup.headers,
                cfg.timeout,
                cfg.compression,
            ))),
        };
        Upstream {
            client,
            endpoint: endpoint.to_owned(),
            health: Arc::new(Health::new(endpoint)),
            limit: Arc::new(AtomicU64::new(cfg.max_request_bytes.0)),
        }
    }

    /// Use re-read files from now on: new headers, and for TLS a new
    /// channel or client (new files; it connects on first use). Exports in
    /// flight finish on the old one, which closes once the last of them has
    /// ended. Must be called inside a tokio runtime.
    pub fn reload(&self, setup: UpstreamSetup) {
        match (&self.client, setup.transport) {
            (Client::Grpc(c), Transport::Grpc(s)) => c.reload(s, setup.headers),
            (Client::Http(c), Transport::Http(s)) => c.reload(s, setup.headers),
            // The protocol is not reloadable: the config is read once.
            _ => tracing::warn!("reload: upstream.protocol cannot change without a restart"),
        }
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub fn health(&self) -> &Arc<Health> {
        &self.health
    }

    /// The largest request this upstream is sent now, uncompressed.
    pub fn working_limit(&self) -> u64 {
        self.limit.load(Ordering::Relaxed)
    }

    /// Upstream refused a request of `refused` bytes as too large: the
    /// working limit becomes half of it (never raised). Returns the new
    /// limit when it went down; logged then, so once per halving.
    pub fn lower_limit(&self, refused: u64) -> Option<u64> {
        let wanted = (refused / 2).max(1);
        let previous = self.limit.fetch_min(wanted, Ordering::Relaxed);
        if wanted >= previous {
            return None;
        }
        tracing::warn!(
            upstream = %self.endpoint,
            refused_bytes = refused,
            previous_limit = previous,
            limit = wanted,
            "upstream refused a request as too large; sending it smaller requests from now on \
             (lower upstream.max_request_bytes to start there)"
        );
        Some(wanted)
    }

    /// Send one batch (its chunks concatenated) and wait for upstream's answer.
    pub async fn export(
        &self,
        signal: Signal,
        chunks: &[Bytes],
    ) -> Result<Accepted, ExportFailure> {
        let result = match &self.client {
            Client::Grpc(c) => c.call(signal, chunks).await,
            Client::Http(c) => c.call(signal, chunks).await,
        };
        match &result {
            Ok(_) => self.health.record_ok(),
            // "Too large" is an answer about the request, not an outage:
            // upstream is up and the parts will be sent at once.
            Err(f) if crate::retry::verdict(f) == crate::retry::Verdict::TooLarge => {
                self.health.record_ok()
            }
            Err(f) => self.health.record_failure(f),
        }
        result
    }
}

/// Read the partial-success part of an Export*ServiceResponse (field 1 in all
/// three; its field 1 is the rejected count, field 2 the message).
fn partial_success(signal: Signal, body: &Bytes) -> Accepted {
    use opentelemetry_proto::tonic::collector as c;
    let decoded = match signal {
        Signal::Traces => c::trace::v1::ExportTraceServiceResponse::decode(body.clone())
            .ok()
            .and_then(|r| r.partial_success)
            .map(|p| (p.rejected_spans, p.error_message)),
        Signal::Metrics => c::metrics::v1::ExportMetricsServiceResponse::decode(body.clone())
            .ok()
            .and_then(|r| r.partial_success)
            .map(|p| (p.rejected_data_points, p.error_message)),
        Signal::Logs => c::logs::v1::ExportLogsServiceResponse::decode(body.clone())
            .ok()
            .and_then(|r| r.partial_success)
            .map(|p| (p.rejected_log_records, p.error_message)),
    };
    match decoded {
        Some((rejected, message)) => Accepted {
            rejected: u64::try_from(rejected).unwrap_or(0),
            message,
        },
        None => Accepted::default(),
    }
}
