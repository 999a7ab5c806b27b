//! A lean counting OTLP/gRPC sink for the throughput scenarios.
//!
//! The harness [`Upstream`](crate::support::Upstream) decodes every request
//! into the full OTLP message types (every span name, attribute and payload
//! string allocated) before it records the ids. That costs more CPU than the
//! forwarding it is meant to measure, and on a small machine the sink shares
//! the cores with telespool, so a slow sink flatters telespool's ratio to the
//! baseline. This sink decodes only the path to each item's id (prost skips
//! every other field without allocating) and appends the ids to a vector.
//! The `sink` scenario measures both sinks with the same load.
//!
//! It speaks OTLP/gRPC (identity, gzip, zstd) on [`LeanSink::addr`] and
//! OTLP/HTTP protobuf (`POST /v1/traces|metrics|logs`, `Content-Encoding`
//! none, gzip or zstd) on [`LeanSink::http_addr`], and counts the bytes that
//! arrived on the wire next to the decompressed bytes, so a scenario can
//! print the compression ratio upstream saw.
//!
//! Where the id is: spans, `span_id` (big-endian); metric data points and log
//! records, the one int-valued attribute (`test.id`; the payload attribute is
//! a string). See `tests/support/ids.rs`.

use std::convert::Infallible;
use std::future::{ready, Ready};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use std::io::Read;

use bytes::{Buf, Bytes};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prost::Message;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::body::Body;
use tonic::codec::{Codec, CompressionEncoding, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::{BoxFuture, Service};
use tonic::server::{Grpc, NamedService, UnaryService};
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;
use tonic::{Request, Response, Status};

use crate::support::Signal;

const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

// Just enough of the OTLP messages to reach the ids; prost skips the rest.
#[derive(Clone, PartialEq, Message)]
struct TracesReq {
    #[prost(message, repeated, tag = "1")]
    resource_spans: Vec<ResourceSpans>,
}
#[derive(Clone, PartialEq, Message)]
struct ResourceSpans {
    #[prost(message, repeated, tag = "2")]
    scope_spans: Vec<ScopeSpans>,
}
#[derive(Clone, PartialEq, Message)]
struct ScopeSpans {
    #[prost(message, repeated, tag = "2")]
    spans: Vec<Span>,
}
#[derive(Clone, PartialEq, Message)]
struct Span {
    #[prost(bytes = "vec", tag = "2")]
    span_id: Vec<u8>,
}

#[derive(Clone, PartialEq, Message)]
struct LogsReq {
    #[prost(message, repeated, tag = "1")]
    resource_logs: Vec<ResourceLogs>,
}
#[derive(Clone, PartialEq, Message)]
struct ResourceLogs {
    #[prost(message, repeated, tag = "2")]
    scope_logs: Vec<ScopeLogs>,
}
#[derive(Clone, PartialEq, Message)]
struct ScopeLogs {
    #[prost(message, repeated, tag = "2")]
    log_records: Vec<WithAttributes6>,
}
/// A LogRecord: attributes are field 6.
#[derive(Clone, PartialEq, Message)]
struct WithAttributes6 {
    #[prost(message, repeated, tag = "6")]
    attributes: Vec<KeyValue>,
}

#[derive(Clone, PartialEq, Message)]
struct MetricsReq {
    #[prost(message, repeated, tag = "1")]
    resource_metrics: Vec<ResourceMetrics>,
}
#[derive(Clone, PartialEq, Message)]
struct ResourceMetrics {
    #[prost(message, repeated, tag = "2")]
    scope_metrics: Vec<ScopeMetrics>,
}
#[derive(Clone, PartialEq, Message)]
struct ScopeMetrics {
    #[prost(message, repeated, tag = "2")]
    metrics: Vec<Metric>,
}
#[derive(Clone, PartialEq, Message)]
struct Metric {
    #[prost(message, optional, tag = "5")]
    gauge: Option<Points>,
    #[prost(message, optional, tag = "7")]
    sum: Option<Points>,
}
/// Gauge and Sum: data points are field 1.
#[derive(Clone, PartialEq, Message)]
struct Points {
    #[prost(message, repeated, tag = "1")]
    data_points: Vec<WithAttributes7>,
}
/// A NumberDataPoint: attributes are field 7.
#[derive(Clone, PartialEq, Message)]
struct WithAttributes7 {
    #[prost(message, repeated, tag = "7")]
    attributes: Vec<KeyValue>,
}
#[derive(Clone, PartialEq, Message)]
struct KeyValue {
    #[prost(message, optional, tag = "2")]
    value: Option<AnyValue>,
}
#[derive(Clone, PartialEq, Message)]
struct AnyValue {
    #[prost(int64, optional, tag = "3")]
    int_value: Option<i64>,
}

fn int_attribute(attributes: &[KeyValue]) -> Option<u64> {
    attributes
        .iter()
        .find_map(|kv| kv.value.as_ref()?.int_value.map(|v| v as u64))
}

/// The ids of a `signal` export request (ids of items without one skipped).
fn decode_ids(signal: Signal, buf: &mut impl Buf) -> Result<Vec<u64>, prost::DecodeError> {
    let mut out = Vec::new();
    match signal {
        Signal::Traces => {
            let req = TracesReq::decode(buf)?;
            for span in req
                .resource_spans
                .iter()
                .flat_map(|r| &r.scope_spans)
                .flat_map(|s| &s.spans)
            {
                if let Ok(id) = <[u8; 8]>::try_from(span.span_id.as_slice()) {
                    out.push(u64::from_be_bytes(id));
                }
            }
        }
        Signal::Logs => {
            let req = LogsReq::decode(buf)?;
            out.extend(
                req.resource_logs
                    .iter()
                    .flat_map(|r| &r.scope_logs)
                    .flat_map(|s| &s.log_records)
                    .filter_map(|r| int_attribute(&r.attributes)),
            );
        }
        Signal::Metrics => {
            let req = MetricsReq::decode(buf)?;
            out.extend(
                req.resource_metrics
                    .iter()
                    .flat_map(|r| &r.scope_metrics)
                    .flat_map(|s| &s.metrics)
                    .flat_map(|m| m.gauge.iter().chain(m.sum.iter()))
                    .flat_map(|p| &p.data_points)
                    .filter_map(|p| int_attribute(&p.attributes)),
            );
        }
    }
    Ok(out)
}

/// Decodes requests to their ids; encodes the empty response (zero bytes
/// is the empty Export*ServiceResponse of every signal).
#[derive(Clone, Copy)]
struct IdCodec(Signal);
struct IdDecoder(Signal);
struct EmptyEncoder;

impl Codec for IdCodec {
    type Encode = ();
    type Decode = (Vec<u64>, usize);
    type Encoder = EmptyEncoder;
    type Decoder = IdDecoder;
    fn encoder(&mut self) -> EmptyEncoder {
        EmptyEncoder
    }
    fn decoder(&mut self) -> IdDecoder {
        IdDecoder(self.0)
    }
}

impl Encoder for EmptyEncoder {
    type Item = ();
    type Error = Status;
    fn encode(&mut self, _: (), _: &mut EncodeBuf<'_>) -> Result<(), Status> {
        Ok(())
    }
}

impl Decoder for IdDecoder {
    type Item = (Vec<u64>, usize);
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Status> {
        let len = src.remaining();
        let ids = decode_ids(self.0, src)
            .map_err(|e| Status::invalid_argument(format!("lean sink: bad request: {e}")))?;
        Ok(Some((ids, len)))
    }
}

/// What the sink has recorded.
#[derive(Default)]
pub struct Recorded {
    /// Ids of every accepted request, duplicates kept, per signal.
    ids: Mutex<[Vec<u64>; 3]>,
    /// Items accepted (all signals), readable without the lock.
    items: AtomicU64,
    /// Message bytes accepted (after decompression).
    bytes: AtomicU64,
    /// Request body bytes as they arrived (compressed, gRPC framing included).
    wire_bytes: AtomicU64,
    requests: AtomicU64,
}

impl Recorded {
    fn record(&self, signal: Signal, ids: &[u64], len: usize) {
        self.items.fetch_add(ids.len() as u64, Ordering::Relaxed);
        self.bytes.fetch_add(len as u64, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.ids.lock().unwrap_or_else(|e| e.into_inner())[signal.index()].extend_from_slice(ids);
    }
}

#[derive(Clone)]
struct Handler {
    signal: Signal,
    recorded: Arc<Recorded>,
}

impl UnaryService<(Vec<u64>, usize)> for Handler {
    type Response = ();
    type Future = Ready<Result<Response<()>, Status>>;
    fn call(&mut self, request: Request<(Vec<u64>, usize)>) -> Self::Future {
        let (ids, len) = request.into_inner();
        self.recorded.record(self.signal, &ids, len);
        ready(Ok(Response::new(())))
    }
}

/// One OTLP service (by signal index: 0 traces, 1 metrics, 2 logs).
#[derive(Clone)]
struct Svc<const S: usize>(Arc<Recorded>);

impl NamedService for Svc<0> {
    const NAME: &'static str = "opentelemetry.proto.collector.trace.v1.TraceService";
}
impl NamedService for Svc<1> {
    const NAME: &'static str = "opentelemetry.proto.collector.metrics.v1.MetricsService";
}
impl NamedService for Svc<2> {
    const NAME: &'static str = "opentelemetry.proto.collector.logs.v1.LogsService";
}

impl<const S: usize> Service<http::Request<Body>> for Svc<S> {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let signal = Signal::ALL[S];
        let handler = Handler {
            signal,
            recorded: self.0.clone(),
        };
        let recorded = self.0.clone();
        // Count the body's bytes as they arrive, before tonic decompresses them.
        let req = req.map(|body| {
            Body::new(body.map_frame(move |frame| {
                if let Some(data) = frame.data_ref() {
                    recorded
                        .wire_bytes
                        .fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                frame
            }))
        });
        Box::pin(async move {
            let mut grpc = Grpc::new(IdCodec(signal))
                .accept_compressed(CompressionEncoding::Gzip)
                .accept_compressed(CompressionEncoding::Zstd)
                .max_decoding_message_size(MAX_MESSAGE_BYTES);
            let response = grpc.unary(handler, req).await;
            if let Some(delay) = answer_delay() {
                tokio::time::sleep(delay).await;
            }
            Ok(response)
        })
    }
}

/// `E2E_SINK_DELAY_MS`: the lean sink holds each gRPC answer this long, as
/// an upstream that far away would (unset: answers at once). For replay
/// against a distant upstream: `E2E_SINK_DELAY_MS=20 ... --scenario
/// replay-live`.
fn answer_delay() -> Option<Duration> {
    static DELAY: std::sync::OnceLock<Option<Duration>> = std::sync::OnceLock::new();
    *DELAY.get_or_init(|| {
        std::env::var("E2E_SINK_DELAY_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&ms| ms > 0)
            .map(Duration::from_millis)
    })
}

type HttpResponse = http::Response<Full<Bytes>>;

fn http_answer(status: u16, text: &str) -> HttpResponse {
    let mut response = http::Response::new(Full::new(Bytes::from(text.to_owned())));
    *response.status_mut() = http::StatusCode::from_u16(status).unwrap_or_default();
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/x-protobuf"),
    );
    response
}

/// Reads at most `MAX_MESSAGE_BYTES` of a decoder's output.
fn read_bounded(reader: impl Read) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    reader
        .take(MAX_MESSAGE_BYTES as u64 + 1)
        .read_to_end(&mut out)?;
    match out.len() > MAX_MESSAGE_BYTES {
        true => Err(std::io::Error::other("decompressed body above 64 MiB")),
        false => Ok(out),
    }
}

/// One OTLP/HTTP protobuf export: 200 with an empty response, or an error
/// status with a text body.
async fn http_export(
    recorded: Arc<Recorded>,
    request: http::Request<hyper::body::Incoming>,
) -> Result<HttpResponse, Infallible> {
    let signal = match request.uri().path() {
        "/v1/traces" => Signal::Traces,
        "/v1/metrics" => Signal::Metrics,
        "/v1/logs" => Signal::Logs,
        other => return Ok(http_answer(404, &format!("lean sink: no path {other}"))),
    };
    let encoding = request
        .headers()
        .get(http::header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("identity")
        .to_ascii_lowercase();
    let limited = http_body_util::Limited::new(request.into_body(), MAX_MESSAGE_BYTES);
    let body = match limited.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => return Ok(http_answer(413, &format!("lean sink: body: {e}"))),
    };
    recorded
        .wire_bytes
        .fetch_add(body.len() as u64, Ordering::Relaxed);
    let plain = match encoding.as_str() {
        "identity" | "" => Ok(body.to_vec()),
        "gzip" => read_bounded(flate2::read::MultiGzDecoder::new(&body[..])),
        "zstd" => zstd::stream::read::Decoder::with_buffer(&body[..]).and_then(read_bounded),
        other => return Ok(http_answer(415, &format!("lean sink: encoding {other}"))),
    };
    let plain = match plain {
        Ok(plain) => plain,
        Err(e) => return Ok(http_answer(400, &format!("lean sink: {encoding}: {e}"))),
    };
    match decode_ids(signal, &mut &plain[..]) {
        Ok(ids) => {
            recorded.record(signal, &ids, plain.len());
            Ok(http_answer(200, ""))
        }
        Err(e) => Ok(http_answer(400, &format!("lean sink: bad request: {e}"))),
    }
}

/// The gRPC server's HTTP/2 receive windows: hyper's defaults (1 MiB per
/// stream and per connection) unless `E2E_SINK_H2_WINDOW` asks for
/// `adaptive` (BDP-estimated windows, as grpc-go and so the Collector do)
/// or a fixed size in bytes for both.
fn h2_flow_control(builder: Server) -> Server {
    match std::env::var("E2E_SINK_H2_WINDOW").ok().as_deref() {
        None | Some("") => builder,
        Some("adaptive") => {
            eprintln!("[e2e] lean sink: adaptive HTTP/2 windows");
            builder.http2_adaptive_window(Some(true))
        }
        Some(size) => match size.parse::<u32>() {
            Ok(size) => {
                eprintln!("[e2e] lean sink: HTTP/2 windows of {size} bytes");
                builder
                    .initial_stream_window_size(size)
                    .initial_connection_window_size(size)
            }
            Err(_) => {
                eprintln!("[e2e] E2E_SINK_H2_WINDOW={size:?} is not `adaptive` or a size in bytes; hyper's defaults kept");
                builder
            }
        },
    }
}

/// Accepts OTLP/HTTP connections (HTTP/1.1 and h2c) until `stop`.
async fn serve_http(listener: TcpListener, recorded: Arc<Recorded>, stop: CancellationToken) {
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    eprintln!("[lean sink] HTTP accept: {e}");
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let (recorded, stop) = (recorded.clone(), stop.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| http_export(recorded.clone(), req));
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = connection => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}

/// The running lean sink. Dropping it stops the server.
pub struct LeanSink {
    addr: SocketAddr,
    http_addr: SocketAddr,
    recorded: Arc<Recorded>,
    stop: CancellationToken,
    /// The server task; it ends once `stop` is cancelled (on drop).
    _task: JoinHandle<()>,
    /// The runtime of [`LeanSink::start_apart`], if any: dropped last, after
    /// `stop` is cancelled.
    _runtime: Option<SinkRuntime>,
}

/// The sink's own runtime, shut down (without blocking) when dropped.
struct SinkRuntime(Option<tokio::runtime::Runtime>);

impl Drop for SinkRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

impl LeanSink {
    /// The sink on a runtime of its own (two worker threads).
    ///
    /// A deployment's upstream is another process, on another host, whose
    /// work the OS schedules apart from the clients'. In this process the
    /// sink would share the load generator's tokio workers: every client's
    /// answer would wait behind the sink walking a 4 MiB request from the
    /// agent in the same worker (all eight clients stalled ~3 ms about once
    /// per batch), a delay no deployment has and the direct baseline, whose
    /// requests are 51 KB, does not see. `E2E_SINK_RUNTIME=shared` (or, as
    /// before, `E2E_REPLAY_SINK=shared`) keeps the old arrangement, for
    /// comparison with earlier figures.
    pub async fn start_apart() -> Result<LeanSink, String> {
        let shared = |var| std::env::var(var).as_deref() == Ok("shared");
        if shared("E2E_SINK_RUNTIME") || shared("E2E_REPLAY_SINK") {
            eprintln!("[e2e] sink on the load generator's runtime (E2E_SINK_RUNTIME=shared)");
            return Ok(LeanSink::start().await);
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("e2e-sink")
            .enable_all()
            .build()
            .map_err(|e| format!("sink runtime: {e}"))?;
        // The sink's tasks are spawned on the runtime it starts in.
        let mut sink = runtime
            .spawn(LeanSink::start())
            .await
            .map_err(|e| format!("the sink's start failed: {e}"))?;
        sink._runtime = Some(SinkRuntime(Some(runtime)));
        Ok(sink)
    }

    /// Serves the three OTLP services on a fresh `127.0.0.1` port.
    pub async fn start() -> LeanSink {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind lean sink on 127.0.0.1:0");
        let addr = listener.local_addr().expect("lean sink local_addr");
        let recorded = Arc::new(Recorded::default());
        let stop = CancellationToken::new();
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        let router = h2_flow_control(Server::builder())
            .add_service(Svc::<0>(recorded.clone()))
            .add_service(Svc::<1>(recorded.clone()))
            .add_service(Svc::<2>(recorded.clone()));
        let http_listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind lean HTTP sink on 127.0.0.1:0");
        let http_addr = http_listener.local_addr().expect("lean sink local_addr");
        tokio::spawn(serve_http(http_listener, recorded.clone(), stop.clone()));
        let shutdown = stop.clone().cancelled_owned();
        let task = tokio::spawn(async move {
            if let Err(e) = router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
            {
                eprintln!("[lean sink] server ended with error: {e}");
            }
        });
        LeanSink {
            addr,
            http_addr,
            recorded,
            stop,
            _task: task,
            _runtime: None,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The OTLP/HTTP address (base URL `http://` + this).
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Decompressed bytes over wire bytes received so far (1.0: none).
    pub fn compression_ratio(&self) -> f64 {
        let wire = self.recorded.wire_bytes.load(Ordering::Relaxed);
        self.recorded.bytes.load(Ordering::Relaxed) as f64 / wire.max(1) as f64
    }

    /// Items accepted so far (all signals).
    pub fn items(&self) -> u64 {
        self.recorded.items.load(Ordering::Relaxed)
    }

    /// Ids of `signal` received so far, duplicates kept.
    pub fn ids(&self, signal: Signal) -> Vec<u64> {
        self.recorded.ids.lock().unwrap_or_else(|e| e.into_inner())[signal.index()].clone()
    }

    /// Forgets everything recorded.
    pub fn clear(&self) {
        *self.recorded.ids.lock().unwrap_or_else(|e| e.into_inner()) = Default::default();
        self.recorded.items.store(0, Ordering::Relaxed);
        self.recorded.bytes.store(0, Ordering::Relaxed);
        self.recorded.wire_bytes.store(0, Ordering::Relaxed);
        self.recorded.requests.store(0, Ordering::Relaxed);
    }
}

impl Drop for LeanSink {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
