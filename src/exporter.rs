//! The upstream client: OTLP/gRPC export of raw batch bytes.
//!
//! A batch's chunks are written straight into tonic's encode buffer (one copy,
//! no protobuf encoding) by [`RawCodec`]. The response is small and is decoded
//! with the OTLP types only to read a partial-success report. Upstream health
//! (up, failing since, last error) is tracked here and logged on each change.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::{Buf, BufMut, Bytes};
use prost::Message;
use tonic::codec::{Codec, CompressionEncoding, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
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

/// Client for one upstream endpoint, cheap to clone.
#[derive(Clone, Debug)]
pub struct Upstream {
    channel: Channel,
    endpoint: String,
    timeout: Duration,
    compression: Compression,
    headers: MetadataMap,
    health: Arc<Health>,
}

impl Upstream {
    /// Build the client; connects lazily, so an unreachable upstream is not an error here.
    pub fn new(cfg: &UpstreamConfig, endpoint: &str) -> Result<Upstream, ExporterError> {
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
        if endpoint.starts_with("https://") {
            ep = ep
                .tls_config(ClientTlsConfig::new().with_native_roots())
                .map_err(ep_err)?;
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
        Ok(Upstream {
            channel: ep.connect_lazy(),
            endpoint: endpoint.to_owned(),
            timeout: cfg.timeout,
            compression: cfg.compression,
            headers,
            health: Arc::new(Health::new(endpoint)),
        })
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
        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        if self.compression == Compression::Gzip {
            grpc = grpc.send_compressed(CompressionEncoding::Gzip);
        }
        grpc = grpc.accept_compressed(CompressionEncoding::Gzip);
        grpc.ready().await.map_err(|e| ExportFailure {
            code: Code::Unavailable,
            message: format!("upstream {} not reachable: {e}", self.endpoint),
            retry_after: None,
        })?;
        let mut request = tonic::Request::new(chunks.to_vec());
        *request.metadata_mut() = self.headers.clone();
        request.set_timeout(self.timeout);
        let path = http::uri::PathAndQuery::from_static(signal.grpc_path());
        let reply = tokio::time::timeout(self.timeout, grpc.unary(request, path, RawCodec))
            .await
            .map_err(|_| ExportFailure {
                code: Code::DeadlineExceeded,
                message: format!("no answer from upstream within {:?}", self.timeout),
                retry_after: None,
            })?
            .map_err(failure_from_status)?;
        Ok(partial_success(signal, reply.get_ref()))
    }
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

/// tonic codec that sends pre-serialized chunks and returns the raw reply.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<Bytes>;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<Bytes>;
    type Error = Status;

    fn encode(&mut self, chunks: Vec<Bytes>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        let total: usize = chunks.iter().map(Bytes::len).sum();
        dst.reserve(total);
        for chunk in &chunks {
            dst.put_slice(chunk);
        }
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        let n = src.remaining();
        Ok(Some(src.copy_to_bytes(n)))
    }
}
