//! OTLP/gRPC export of raw batch bytes.
//!
//! A batch goes out as one gRPC message (no protobuf encoding) in a unary
//! call over a tonic `Channel`, which keeps connection management, TLS and
//! reconnects. Uncompressed, the message is the 5-byte header followed by the
//! batch's chunks as they are ([`ChunkBody`]: no copy); compressed, it is one
//! buffer made in one compression pass. The frame is built here rather than by a tonic codec so the
//! compression level can be chosen: tonic's fixed gzip level 6 cost most of
//! the agent's CPU. The reply is small and is decoded with the OTLP types only
//! to read a partial-success report. The channel's TCP connections are
//! corked while its connection task writes (`super::cork`), so a batch's
//! 16 KiB DATA frames leave in full-size segments.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use tonic_types::StatusExt;

use super::body::ChunkBody;
use super::compress::{compress, decompress_reply, encoding_name};
use super::cork::{CorkedConnector, UncorkAfterPoll};
use super::{partial_success, Accepted, Cause, ExportFailure, MAX_REPLY_BYTES};
use crate::config::Compression;
use crate::signal::Signal;

/// The channel's endpoint as configured, for building channels.
#[derive(Clone, Debug)]
pub(super) struct GrpcSetup {
    pub(super) endpoint: Endpoint,
    /// An `https://` endpoint: a reload builds a new channel with the
    /// re-read TLS files.
    pub(super) https: bool,
    connect_timeout: Duration,
}

impl GrpcSetup {
    pub(super) fn load(
        cfg: &crate::config::UpstreamConfig,
        endpoint: &str,
    ) -> Result<GrpcSetup, super::ExporterError> {
        let ep_err = |source| super::ExporterError::Endpoint {
            endpoint: endpoint.to_owned(),
            source,
        };
        let connect_timeout = cfg.timeout.min(Duration::from_secs(5));
        let mut ep = Endpoint::from_shared(endpoint.to_owned())
            .map_err(ep_err)?
            .timeout(cfg.timeout)
            .connect_timeout(connect_timeout)
            .tcp_nodelay(true)
            .executor(UncorkAfterPoll)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(false);
        let https = endpoint.starts_with("https://");
        if https {
            let tls = crate::tls::client_config(cfg.tls.as_ref())?;
            ep = ep.tls_config(tls).map_err(ep_err)?;
        }
        Ok(GrpcSetup {
            endpoint: ep,
            https,
            connect_timeout,
        })
    }

    /// A channel that connects on first use, over [`CorkedConnector`]
    /// (tonic adds TLS for `https://`).
    fn channel(&self) -> Channel {
        self.endpoint
            .connect_with_connector_lazy(CorkedConnector::new(self.connect_timeout))
    }
}

/// What a reload can replace: the channel (TLS) and the metadata. An export
/// takes clones of both when it starts, so a batch in flight finishes on the
/// channel it began on.
#[derive(Debug)]
struct Live {
    channel: Channel,
    headers: HeaderMap,
}

/// The gRPC side of an [`super::Upstream`].
#[derive(Clone, Debug)]
pub(super) struct GrpcUpstream {
    live: Arc<RwLock<Live>>,
    endpoint: String,
    timeout: Duration,
    compression: Compression,
}

impl GrpcUpstream {
    pub(super) fn new(
        setup: GrpcSetup,
        headers: HeaderMap,
        endpoint: &str,
        timeout: Duration,
        compression: Compression,
    ) -> GrpcUpstream {
        GrpcUpstream {
            live: Arc::new(RwLock::new(Live {
                channel: setup.channel(),
                headers,
            })),
            endpoint: endpoint.to_owned(),
            timeout,
            compression,
        }
    }

    pub(super) fn reload(&self, setup: GrpcSetup, headers: HeaderMap) {
        let channel = setup.https.then(|| setup.channel());
        let mut live = self.live.write().unwrap_or_else(|e| e.into_inner());
        if let Some(channel) = channel {
            live.channel = channel;
        }
        live.headers = headers;
    }

    pub(super) async fn call(
        &self,
        signal: Signal,
        chunks: &[Bytes],
    ) -> Result<Accepted, ExportFailure> {
        let transport = |what: &str, e: &dyn std::fmt::Display| ExportFailure {
            cause: Cause::NoAnswer,
            message: format!("upstream {} {what}: {e}", self.endpoint),
            retry_after: None,
        };
        let frame = encode_frame(chunks, self.compression)
            .map_err(|e| transport("compression failed", &e))?;
        let mut request = http::Request::new(tonic::body::Body::new(frame));
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = http::Uri::from_static(signal.grpc_path());
        let (mut channel, metadata) = {
            let live = self.live.read().unwrap_or_else(|e| e.into_inner());
            (live.channel.clone(), live.headers.clone())
        };
        let headers = request.headers_mut();
        headers.extend(metadata);
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert(http::header::TE, HeaderValue::from_static("trailers"));
        headers.insert(
            "grpc-accept-encoding",
            HeaderValue::from_static("gzip,zstd,identity"),
        );
        if let Some(name) = encoding_name(self.compression) {
            headers.insert("grpc-encoding", HeaderValue::from_static(name));
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
                cause: Cause::Timeout,
                message: format!("no answer from upstream within {:?}", self.timeout),
                retry_after: None,
            })?
    }
}

/// The gRPC message of one export: flag, length, then the batch's chunks
/// (their concatenation is the request) as they are, or compressed at a fast
/// level into one buffer when compression is on.
fn encode_frame(chunks: &[Bytes], compression: Compression) -> std::io::Result<ChunkBody> {
    let too_large = || std::io::Error::other("batch larger than 4 GiB");
    if compression == Compression::None {
        let total: usize = chunks.iter().map(Bytes::len).sum();
        let len = u32::try_from(total).map_err(|_| too_large())?;
        let head = message_header(false, len);
        return Ok(ChunkBody::new(Some(Bytes::copy_from_slice(&head)), chunks));
    }
    let mut frame = compress(chunks, compression, 5)?;
    let len = u32::try_from(frame.len() - 5).map_err(|_| too_large())?;
    frame[..5].copy_from_slice(&message_header(true, len));
    Ok(ChunkBody::one(Bytes::from(frame)))
}

/// The 5-byte gRPC message prefix: compressed flag, big-endian length.
fn message_header(compressed: bool, len: u32) -> [u8; 5] {
    let mut head = [0; 5];
    head[0] = u8::from(compressed);
    head[1..].copy_from_slice(&len.to_be_bytes());
    head
}

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
        let cause = match parts.status.as_u16() {
            429 | 502 | 503 | 504 => Cause::Grpc(Code::Unavailable),
            413 => Cause::Grpc(Code::ResourceExhausted),
            404 | 405 | 415 => Cause::Grpc(Code::Unimplemented),
            401 => Cause::Grpc(Code::Unauthenticated),
            403 => Cause::Grpc(Code::PermissionDenied),
            _ => Cause::Grpc(Code::Unknown),
        };
        return Err(ExportFailure {
            cause,
            message: format!("upstream answered HTTP {} instead of gRPC", parts.status),
            retry_after: None,
        });
    }
    let encoding = parts
        .headers
        .get("grpc-encoding")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let collected = http_body_util::Limited::new(body, MAX_REPLY_BYTES)
        .collect()
        .await
        .map_err(|e| ExportFailure {
            cause: Cause::NoAnswer,
            message: format!("reply from upstream cut off: {e}"),
            retry_after: None,
        })?;
    let status = collected
        .trailers()
        .and_then(Status::from_header_map)
        .ok_or_else(|| ExportFailure {
            cause: Cause::NoAnswer,
            message: "upstream's reply ended without a grpc-status".into(),
            retry_after: None,
        })?;
    if status.code() != Code::Ok {
        return Err(failure_from_status(status));
    }
    let body = collected.to_bytes();
    let message = match body.get(..5) {
        Some(prefix) if prefix[0] == 1 => {
            decompress_reply(encoding.as_deref(), &body[5..], MAX_REPLY_BYTES as u64)
                .unwrap_or_default()
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
    let cause = match std::error::Error::source(&status) {
        Some(_) => Cause::NoAnswer,
        None => Cause::Grpc(status.code()),
    };
    let message = match std::error::Error::source(&status) {
        Some(cause) => format!("{} ({cause})", status.message()),
        None => status.message().to_owned(),
    };
    ExportFailure {
        cause,
        message,
        retry_after,
    }
}
