//! The upstream client: OTLP/gRPC export of raw batch bytes.
//!
//! A batch's chunks are written straight into one gRPC message frame (one
//! copy, or one gzip pass; no protobuf encoding) and sent as a unary call over
//! a tonic `Channel`, which keeps connection management, TLS and reconnects.
//! The frame is built here rather than by a tonic codec so the gzip level can
//! be chosen: tonic's fixed level 6 cost most of the agent's CPU. The reply is
//! small and is decoded with the OTLP types only to read a partial-success
//! report. Upstream health
//! (up, failing since, last error) is tracked here and logged on each change.
//!
//! The endpoint, its TLS files and `upstream.headers_file` are read into an
//! [`UpstreamSetup`] before the listeners are bound; SIGHUP builds a new one
//! and [`Upstream::reload`] swaps it in without touching exports in flight.

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use bytes::{BufMut, Bytes, BytesMut};
use http::HeaderValue;
use prost::Message;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use tonic_types::StatusExt;

use crate::config::{Compression, UpstreamConfig};
use crate::signal::Signal;

/// Why the exporter could not be built from the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ExporterError {
    /// `upstream.endpoint` is not a usable URL.
    #[error("upstream.endpoint {endpoint:?} is invalid: {source}")]
    Endpoint {
        endpoint: String,
        source: tonic::transport::Error,
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

/// A failed export, with what the retry policy needs to know.
#[derive(Debug, Clone)]
pub struct ExportFailure {
    pub code: Code,
    pub message: String,
    /// The server's `RetryInfo` delay, if it sent one.
    pub retry_after: Option<Duration>,
}

/// A successful export; `rejected` items were refused by upstream in a
/// partial-success reply and are not retried.
#[derive(Debug, Clone, Default)]
pub struct Accepted {
    pub rejected: u64,
    pub message: String,
}

/// The upstream's endpoint (with TLS) and metadata as the config and its
/// files describe them. Built before anything is bound, and again on SIGHUP
/// ([`Upstream::reload`]).
#[derive(Clone, Debug)]
pub struct UpstreamSetup {
    endpoint: Endpoint,
    headers: MetadataMap,
    /// An `https://` endpoint: a reload builds a new channel with the
    /// re-read TLS files.
    https: bool,
}

impl UpstreamSetup {
    /// Read `upstream.headers_file` and the `[upstream.tls]` files and
    /// configure the endpoint. Needs no runtime.
    pub fn load(cfg: &UpstreamConfig, endpoint: &str) -> Result<UpstreamSetup, ExporterError> {
        let ep_err = |source| ExporterError::Endpoint {
            endpoint: endpoint.to_owned(),
            source,
        };
        let mut ep = Endpoint::from_shared(endpoint.to_owned())
            .map_err(ep_err)?
            .timeout(cfg.timeout)
            .connect_timeout(cfg.timeout.min(Duration::from_secs(5)))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(false);
        let https = endpoint.starts_with("https://");
        if https {
            let tls = crate::tls::client_config(cfg.tls.as_ref())?;
            ep = ep.tls_config(tls).map_err(ep_err)?;
        }
        let mut all = cfg.headers.clone();
        if let Some(path) = &cfg.headers_file {
            all.extend(read_headers_file(path)?);
        }
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
            endpoint: ep,
            headers,
            https,
        })
    }
}

/// What a reload can replace: the channel (TLS) and the metadata. An export
/// takes clones of both when it starts, so a batch in flight finishes on the
/// channel it began on.
#[derive(Debug)]
struct Live {
    channel: Channel,
    headers: MetadataMap,
}

/// Client for one upstream endpoint, cheap to clone.
#[derive(Clone, Debug)]
pub struct Upstream {
    live: Arc<RwLock<Live>>,
    endpoint: String,
    timeout: Duration,
    compression: Compression,
    health: Arc<Health>,
}

impl Upstream {
    /// Build the client; connects lazily, so an unreachable upstream is not
    /// an error here. Must be called inside a tokio runtime.
    pub fn new(cfg: &UpstreamConfig, endpoint: &str, setup: UpstreamSetup) -> Upstream {
        Upstream {
            live: Arc::new(RwLock::new(Live {
                channel: setup.endpoint.connect_lazy(),
                headers: setup.headers,
            })),
            endpoint: endpoint.to_owned(),
            timeout: cfg.timeout,
            compression: cfg.compression,
            health: Arc::new(Health::new(endpoint)),
        }
    }

    /// Use re-read files from now on: new metadata, and for an `https://`
    /// endpoint a new channel (new TLS files; it connects on first use).
    /// Exports in flight finish on the old channel, which closes once the
    /// last of them has ended. Must be called inside a tokio runtime.
    pub fn reload(&self, setup: UpstreamSetup) {
        let channel = setup.https.then(|| setup.endpoint.connect_lazy());
        let mut live = self.live.write().unwrap_or_else(|e| e.into_inner());
        if let Some(channel) = channel {
            live.channel = channel;
        }
        live.headers = setup.headers;
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub fn health(&self) -> &Arc<Health> {
        &self.health
    }

    /// Send one batch (its chunks concatenated) and wait for upstream's answer.
    pub async fn export(
        &self,
        signal: Signal,
        chunks: &[Bytes],
    ) -> Result<Accepted, ExportFailure> {
        let result = self.call(signal, chunks).await;
        match &result {
            Ok(_) => self.health.record_ok(),
            Err(f) => self.health.record_failure(f),
        }
        result
    }

    async fn call(&self, signal: Signal, chunks: &[Bytes]) -> Result<Accepted, ExportFailure> {
        let transport = |what: &str, e: &dyn std::fmt::Display| ExportFailure {
            code: Code::Unavailable,
            message: format!("upstream {} {what}: {e}", self.endpoint),
            retry_after: None,
        };
        let frame = encode_frame(chunks, self.compression)
            .map_err(|e| transport("compression failed", &e))?;
        let mut request =
            http::Request::new(tonic::body::Body::new(http_body_util::Full::new(frame)));
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = http::Uri::from_static(signal.grpc_path());
        let (mut channel, metadata) = {
            let live = self.live.read().unwrap_or_else(|e| e.into_inner());
            (live.channel.clone(), live.headers.clone())
        };
        let headers = request.headers_mut();
        headers.extend(metadata.into_headers());
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert(http::header::TE, HeaderValue::from_static("trailers"));
        headers.insert(
            "grpc-accept-encoding",
            HeaderValue::from_static("gzip,identity"),
        );
        if self.compression == Compression::Gzip {
            headers.insert("grpc-encoding", HeaderValue::from_static("gzip"));
        }
        if let Ok(v) =
            HeaderValue::from_str(&format!("{}m", self.timeout.as_millis().min(99_999_999)))
        {
            headers.insert("grpc-timeout", v);
        }
        let exchange = async {
            std::future::poll_fn(|cx| tower_service::Service::poll_ready(&mut channel, cx))
                .await
                .map_err(|e| transport("not reachable", &e))?;
            let response = tower_service::Service::call(&mut channel, request)
                .await
                .map_err(|e| transport("connection failed", &e))?;
            read_reply(signal, response).await
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| ExportFailure {
                code: Code::DeadlineExceeded,
                message: format!("no answer from upstream within {:?}", self.timeout),
                retry_after: None,
            })?
    }
}

/// The gRPC message frame of one export: flag, length, then the batch's chunks
/// (their concatenation is the request), gzip-compressed at the fastest level
/// when compression is on. Level 1 keeps most of the size win on telemetry at
/// a fraction of the CPU of the default level 6.
fn encode_frame(chunks: &[Bytes], compression: Compression) -> std::io::Result<Bytes> {
    use std::io::Write;
    let total: usize = chunks.iter().map(Bytes::len).sum();
    let mut frame = BytesMut::with_capacity(5 + total);
    frame.put_bytes(0, 5);
    let flag = match compression {
        Compression::None => {
            for chunk in chunks {
                frame.put_slice(chunk);
            }
            0
        }
        Compression::Gzip => {
            let mut gz = flate2::write::GzEncoder::new(frame.writer(), flate2::Compression::fast());
            for chunk in chunks {
                gz.write_all(chunk)?;
            }
            frame = gz.finish()?.into_inner();
            1
        }
    };
    let len = u32::try_from(frame.len() - 5)
        .map_err(|_| std::io::Error::other("batch larger than 4 GiB"))?;
    frame[0] = flag;
    frame[1..5].copy_from_slice(&len.to_be_bytes());
    Ok(frame.freeze())
}

/// Largest reply body read from upstream (replies are tiny: a partial-success report).
const MAX_REPLY_BYTES: usize = 4 << 20;

/// Turn upstream's HTTP/2 answer into the export outcome: grpc-status from the
/// headers (trailers-only) or the trailers; the reply message for partial success.
async fn read_reply(
    signal: Signal,
    response: http::Response<tonic::body::Body>,
) -> Result<Accepted, ExportFailure> {
    use http_body_util::BodyExt;
    let (parts, body) = response.into_parts();
    if let Some(status) = Status::from_header_map(&parts.headers) {
        return match status.code() {
            Code::Ok => Ok(Accepted::default()),
            _ => Err(failure_from_status(status)),
        };
    }
    if parts.status != http::StatusCode::OK {
        // Not a gRPC answer (a proxy, or a server that is not OTLP/gRPC).
        let code = match parts.status.as_u16() {
            429 | 502 | 503 | 504 => Code::Unavailable,
            404 | 405 | 415 => Code::Unimplemented,
            401 => Code::Unauthenticated,
            403 => Code::PermissionDenied,
            _ => Code::Unknown,
        };
        return Err(ExportFailure {
            code,
            message: format!("upstream answered HTTP {} instead of gRPC", parts.status),
            retry_after: None,
        });
    }
    let collected = http_body_util::Limited::new(body, MAX_REPLY_BYTES)
        .collect()
        .await
        .map_err(|e| ExportFailure {
            code: Code::Unavailable,
            message: format!("reply from upstream cut off: {e}"),
            retry_after: None,
        })?;
    let status = collected
        .trailers()
        .and_then(Status::from_header_map)
        .ok_or_else(|| ExportFailure {
            code: Code::Unavailable,
            message: "upstream's reply ended without a grpc-status".into(),
            retry_after: None,
        })?;
    if status.code() != Code::Ok {
        return Err(failure_from_status(status));
    }
    let body = collected.to_bytes();
    let message = match body.get(..5) {
        Some(prefix) if prefix[0] == 1 => {
            let mut out = Vec::new();
            let read = std::io::Read::read_to_end(
                &mut std::io::Read::take(
                    flate2::read::GzDecoder::new(&body[5..]),
                    MAX_REPLY_BYTES as u64,
                ),
                &mut out,
            );
            match read {
                Ok(_) => Bytes::from(out),
                Err(_) => Bytes::new(),
            }
        }
        Some(_) => body.slice(5..),
        None => Bytes::new(),
    };
    Ok(partial_success(signal, &message))
}

fn failure_from_status(status: Status) -> ExportFailure {
    let retry_after = status.get_details_retry_info().and_then(|r| r.retry_delay);
    // A status with a source error was made up by the client from a transport
    // failure (connection reset, stream cut, GOAWAY): upstream never answered,
    // so whatever code tonic picked (often UNKNOWN or INTERNAL) the batch was
    // not refused by upstream and must be retried, not dropped.
    let code = match std::error::Error::source(&status) {
        Some(_) => Code::Unavailable,
        None => status.code(),
    };
    let message = match std::error::Error::source(&status) {
        Some(cause) => format!("{} ({cause})", status.message()),
        None => status.message().to_owned(),
    };
    ExportFailure {
        code,
        message,
        retry_after,
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

/// Upstream reachability as the rest of the agent sees it.
#[derive(Debug)]
pub struct Health {
    endpoint: String,
    state: Mutex<HealthState>,
}

/// A snapshot of upstream health.
#[derive(Debug, Clone, Default)]
pub struct HealthState {
    /// True until an export fails, and again after one succeeds.
    pub up: bool,
    /// Wall-clock time of the first failure in the current failing stretch.
    pub failing_since: Option<SystemTime>,
    failing_since_mono: Option<Instant>,
    pub last_error: Option<String>,
    pub consecutive_failures: u64,
}

impl Health {
    fn new(endpoint: &str) -> Health {
        Health {
            endpoint: endpoint.to_owned(),
            state: Mutex::new(HealthState {
                up: true,
                ..HealthState::default()
            }),
        }
    }

    pub fn snapshot(&self) -> HealthState {
        self.state.lock().map(|s| s.clone()).unwrap_or_default()
    }

    pub fn is_up(&self) -> bool {
        self.state.lock().map(|s| s.up).unwrap_or(false)
    }

    /// How long upstream has been failing, if it is.
    pub fn failing_for(&self) -> Option<Duration> {
        self.state
            .lock()
            .ok()
            .and_then(|s| s.failing_since_mono.map(|t| t.elapsed()))
    }

    fn record_ok(&self) {
        let Ok(mut s) = self.state.lock() else { return };
        if !s.up {
            let down_for = s
                .failing_since_mono
                .map(|t| t.elapsed())
                .unwrap_or_default();
            tracing::info!(
                upstream = %self.endpoint,
                down_for = ?down_for,
                failures = s.consecutive_failures,
                "upstream is up again"
            );
        }
        s.up = true;
        s.failing_since = None;
        s.failing_since_mono = None;
        s.consecutive_failures = 0;
    }

    fn record_failure(&self, f: &ExportFailure) {
        let Ok(mut s) = self.state.lock() else { return };
        let error = format!("{:?}: {}", f.code, f.message);
        if s.up {
            tracing::warn!(upstream = %self.endpoint, code = ?f.code, error = %f.message, "upstream is failing");
            s.failing_since = Some(SystemTime::now());
            s.failing_since_mono = Some(Instant::now());
        }
        s.up = false;
        s.consecutive_failures += 1;
        s.last_error = Some(error);
    }
}
