//! Sending OTLP/gRPC like an application would: typed requests carrying test
//! ids, arbitrary bytes for malformed-payload tests, and a background
//! [`Sender`] that records exactly which ids were acknowledged.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes};
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::logs::v1::logs_service_client::LogsServiceClient;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use tokio::net::UnixStream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::codec::{Codec, CompressionEncoding, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};
use tonic_types::StatusExt;

use super::ids::{fresh_ids, ExportRequest, ItemSpec};
use super::Signal;

/// Per-call deadline of harness clients.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// A partial-success answer (`rejected` items and message); zero and empty
/// when the server accepted everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Accepted {
    pub rejected: i64,
    pub message: String,
}

/// A lazily connecting OTLP/gRPC client for all three signals.
#[derive(Clone)]
pub struct Client {
    channel: Channel,
    /// How requests are compressed (`None`: not at all).
    compression: Option<CompressionEncoding>,
}

/// Dials the Unix socket at its path whatever the URI says, for
/// [`Client::unix`] (tonic's connector is a `tower_service::Service<Uri>`).
#[derive(Clone)]
struct UnixConnector(Arc<PathBuf>);

impl tower_service::Service<tonic::codegen::http::Uri> for UnixConnector {
    type Response = TokioIo<UnixStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: tonic::codegen::http::Uri) -> Self::Future {
        let path = self.0.clone();
        Box::pin(async move { Ok(TokioIo::new(UnixStream::connect(&*path).await?)) })
    }
}

/// A lazily connecting gRPC channel over the Unix socket at `path`.
pub fn unix_channel(path: &Path) -> Channel {
    Endpoint::from_static("http://localhost")
        .connect_timeout(Duration::from_secs(5))
        .timeout(CALL_TIMEOUT)
        .connect_with_connector_lazy(UnixConnector(Arc::new(path.to_owned())))
}

fn channel(addr: SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("valid endpoint")
        .connect_timeout(Duration::from_secs(5))
        .timeout(CALL_TIMEOUT)
        .connect_lazy()
}

impl Client {
    /// Must be called inside a tokio runtime. Never fails: connection errors
    /// show up as UNAVAILABLE on the first call.
    pub fn new(addr: SocketAddr) -> Client {
        Client {
            channel: channel(addr),
            compression: None,
        }
    }

    /// Over the Unix socket at `path` instead of TCP; lazily connecting too.
    pub fn unix(path: &Path) -> Client {
        Client {
            channel: unix_channel(path),
            compression: None,
        }
    }

    /// A client over `channel` (for example a TLS one from [`super::tls`]).
    pub fn with_channel(channel: Channel) -> Client {
        Client {
            channel,
            compression: None,
        }
    }

    /// Compress requests with gzip.
    pub fn gzip(mut self, on: bool) -> Client {
        self.compression = on.then_some(CompressionEncoding::Gzip);
        self
    }

    /// Compress requests with zstd.
    pub fn zstd(mut self, on: bool) -> Client {
        self.compression = on.then_some(CompressionEncoding::Zstd);
        self
    }

    /// Exports one request holding `ids`.
    pub async fn export(&self, signal: Signal, ids: &[u64]) -> Result<Accepted, Status> {
        self.export_request(ExportRequest::build(signal, ids)).await
    }

    pub async fn export_with(
        &self,
        signal: Signal,
        ids: &[u64],
        spec: &ItemSpec,
    ) -> Result<Accepted, Status> {
        self.export_request(ExportRequest::build_with(signal, ids, spec))
            .await
    }

    pub async fn export_request(&self, request: ExportRequest) -> Result<Accepted, Status> {
        let compression = self.compression;
        macro_rules! call {
            ($client:ident, $msg:expr, $rejected:ident) => {{
                let mut client = $client::new(self.channel.clone())
                    .accept_compressed(CompressionEncoding::Gzip)
                    .max_decoding_message_size(MAX_MESSAGE_BYTES);
                if let Some(encoding) = compression {
                    client = client.send_compressed(encoding);
                }
                let response = client.export(Request::new($msg)).await?.into_inner();
                Ok(response
                    .partial_success
                    .map(|p| Accepted {
                        rejected: p.$rejected,
                        message: p.error_message,
                    })
                    .unwrap_or_default())
            }};
        }
        match request {
            ExportRequest::Traces(msg) => call!(TraceServiceClient, msg, rejected_spans),
            ExportRequest::Metrics(msg) => call!(MetricsServiceClient, msg, rejected_data_points),
            ExportRequest::Logs(msg) => call!(LogsServiceClient, msg, rejected_log_records),
        }
    }
}

/// Sends one request of `signal` holding `ids` to `addr`; OK or the status.
pub async fn send(addr: SocketAddr, signal: Signal, ids: &[u64]) -> Result<(), Status> {
    Client::new(addr).export(signal, ids).await.map(|_| ())
}

/// One request per id list, all in flight at once (so they land in one
/// batch); Ok once every one is acknowledged.
pub async fn send_concurrently(
    addr: SocketAddr,
    signal: Signal,
    requests: &[Vec<u64>],
) -> Result<(), Status> {
    let calls: Vec<_> = requests
        .iter()
        .cloned()
        .map(|ids| tokio::spawn(async move { send(addr, signal, &ids).await }))
        .collect();
    for call in calls {
        call.await
            .map_err(|e| Status::internal(format!("send task: {e}")))??;
    }
    Ok(())
}

/// Like [`send`], gzip-compressed.
pub async fn send_gzip(addr: SocketAddr, signal: Signal, ids: &[u64]) -> Result<(), Status> {
    Client::new(addr)
        .gzip(true)
        .export(signal, ids)
        .await
        .map(|_| ())
}

/// Codec that passes `Bytes` through unchanged in both directions.
#[derive(Clone, Copy, Debug, Default)]
pub struct RawCodec;

pub struct RawEncoder;
pub struct RawDecoder;

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

/// Sends `body` as the message of a unary gRPC call to `path` (for example
/// `Signal::Traces.grpc_path()`), returning the raw response message.
/// For malformed-payload tests: the bytes are framed but not checked.
pub async fn send_raw(addr: SocketAddr, path: &str, body: Bytes) -> Result<Bytes, Status> {
    let path = PathAndQuery::try_from(path.to_owned())
        .map_err(|e| Status::invalid_argument(format!("bad path {path:?}: {e}")))?;
    let mut grpc = tonic::client::Grpc::new(channel(addr));
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(format!("channel not ready: {e}")))?;
    Ok(grpc
        .unary(Request::new(body), path, RawCodec)
        .await?
        .into_inner())
}

/// Statuses a well-behaved OTLP client retries (OTLP spec, "Failures"):
/// RESOURCE_EXHAUSTED only when the server sent RetryInfo.
pub fn is_retryable(status: &Status) -> bool {
    match status.code() {
        Code::Cancelled
        | Code::DeadlineExceeded
        | Code::Aborted
        | Code::OutOfRange
        | Code::Unavailable
        | Code::DataLoss => true,
        Code::ResourceExhausted => status.get_details_retry_info().is_some(),
        _ => false,
    }
}

/// RetryInfo delay of a status, if it carries one.
pub fn retry_delay(status: &Status) -> Option<Duration> {
    status.get_details_retry_info()?.retry_delay
}

/// What a [`Sender`] did.
#[derive(Clone, Debug, Default)]
pub struct SendReport {
    /// Ids whose request was answered OK.
    pub acknowledged: BTreeSet<u64>,
    /// Every id put in a request at least once.
    pub attempted: BTreeSet<u64>,
    /// Ids abandoned: non-retryable answer, retries exhausted, or stopped
    /// while retrying. Disjoint from `acknowledged`.
    pub given_up: BTreeSet<u64>,
    /// Error answers by code (each attempt counts).
    pub refused: HashMap<Code, usize>,
    /// Export calls made, retries included.
    pub calls: usize,
    /// Calls answered OK.
    pub ok_calls: usize,
    /// Sum of partial-success `rejected` counts.
    pub partially_rejected: i64,
    pub elapsed: Duration,
}

impl SendReport {
    pub fn refused_with(&self, code: Code) -> usize {
        self.refused.get(&code).copied().unwrap_or(0)
    }
}

/// Settings of a [`Sender`]; build with [`Sender::builder`].
#[derive(Clone, Debug)]
pub struct SenderBuilder {
    addr: SocketAddr,
    signal: Signal,
    batch: usize,
    workers: usize,
    max_batches: usize,
    max_duration: Duration,
    pause: Duration,
    gzip: bool,
    spec: ItemSpec,
    max_attempts: usize,
    initial_backoff: Duration,
    max_backoff: Duration,
    /// Send over this channel instead of plaintext to `addr`.
    channel: Option<Channel>,
}

impl SenderBuilder {
    /// Send over `channel` (for example TLS) instead of plaintext to the address.
    pub fn channel(mut self, channel: Channel) -> Self {
        self.channel = Some(channel);
        self
    }

    /// Ids per request (K). Default 100.
    pub fn batch(mut self, k: usize) -> Self {
        self.batch = k.max(1);
        self
    }
    /// Concurrent sending tasks, each with its own requests. Default 1.
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = n.max(1);
        self
    }
    /// Stop after this many distinct requests (batches of new ids) in total.
    /// Default 10 000.
    pub fn max_batches(mut self, n: usize) -> Self {
        self.max_batches = n;
        self
    }
    /// Stop starting new requests after this long. Default 30 s.
    pub fn max_duration(mut self, d: Duration) -> Self {
        self.max_duration = d;
        self
    }
    /// Sleep between requests of one worker. Default 0.
    pub fn pause(mut self, d: Duration) -> Self {
        self.pause = d;
        self
    }
    pub fn gzip(mut self, on: bool) -> Self {
        self.gzip = on;
        self
    }
    pub fn spec(mut self, spec: ItemSpec) -> Self {
        self.spec = spec;
        self
    }
    /// Attempts per request, first one included. Default 20.
    pub fn max_attempts(mut self, n: usize) -> Self {
        self.max_attempts = n.max(1);
        self
    }
    /// Backoff between attempts: starts at `initial`, doubles, capped at
    /// `max` (a RetryInfo delay is honoured up to `max`). Default 10 ms / 200 ms.
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.initial_backoff = initial;
        self.max_backoff = max;
        self
    }

    /// Starts sending in the background (inside a tokio runtime).
    pub fn start(self) -> Sender {
        let stop = CancellationToken::new();
        let shared = Arc::new(SenderShared {
            report: Mutex::new(SendReport::default()),
            acknowledged: AtomicUsize::new(0),
            batches: AtomicU64::new(0),
        });
        let started = Instant::now();
        let client = match &self.channel {
            Some(channel) => Client::with_channel(channel.clone()),
            None => Client::new(self.addr),
        }
        .gzip(self.gzip);
        let tasks = (0..self.workers)
            .map(|_| {
                tokio::spawn(worker(
                    self.clone(),
                    client.clone(),
                    shared.clone(),
                    stop.clone(),
                    started,
                ))
            })
            .collect();
        Sender {
            stop,
            shared,
            tasks,
            started,
            max_duration: self.max_duration,
        }
    }
}

struct SenderShared {
    report: Mutex<SendReport>,
    acknowledged: AtomicUsize,
    batches: AtomicU64,
}

impl SenderShared {
    fn update(&self, f: impl FnOnce(&mut SendReport)) {
        f(&mut self.report.lock().unwrap_or_else(|e| e.into_inner()));
    }
}

async fn worker(
    cfg: SenderBuilder,
    client: Client,
    shared: Arc<SenderShared>,
    stop: CancellationToken,
    started: Instant,
) {
    let deadline = started + cfg.max_duration;
    loop {
        if stop.is_cancelled() || Instant::now() >= deadline {
            return;
        }
        if shared.batches.fetch_add(1, Ordering::SeqCst) >= cfg.max_batches as u64 {
            return;
        }
        let ids = fresh_ids(cfg.batch);
        shared.update(|r| r.attempted.extend(&ids));
        let request = ExportRequest::build_with(cfg.signal, &ids, &cfg.spec);
        let mut backoff = cfg.initial_backoff;
        for attempt in 1..=cfg.max_attempts {
            let result = client.export_request(request.clone()).await;
            match result {
                Ok(accepted) => {
                    shared.acknowledged.fetch_add(ids.len(), Ordering::SeqCst);
                    shared.update(|r| {
                        r.calls += 1;
                        r.ok_calls += 1;
                        r.partially_rejected += accepted.rejected;
                        r.acknowledged.extend(&ids);
                    });
                    break;
                }
                Err(status) => {
                    shared.update(|r| {
                        r.calls += 1;
                        *r.refused.entry(status.code()).or_default() += 1;
                    });
                    let retry = is_retryable(&status)
                        && attempt < cfg.max_attempts
                        && !stop.is_cancelled()
                        && Instant::now() < deadline;
                    if !retry {
                        shared.update(|r| r.given_up.extend(&ids));
                        break;
                    }
                    let wait = retry_delay(&status).unwrap_or(backoff).min(cfg.max_backoff);
                    backoff = (backoff * 2).min(cfg.max_backoff);
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = stop.cancelled() => {
                            shared.update(|r| r.given_up.extend(&ids));
                            return;
                        }
                    }
                }
            }
        }
        if !cfg.pause.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(cfg.pause) => {}
                _ = stop.cancelled() => return,
            }
        }
    }
}

/// Sends requests of K fresh ids in the background until stopped or a
/// limit is reached, retrying retryable answers with a short bounded backoff.
pub struct Sender {
    stop: CancellationToken,
    shared: Arc<SenderShared>,
    tasks: Vec<JoinHandle<()>>,
    started: Instant,
    max_duration: Duration,
}

/// Upper bound on how long `stop`/`finish` wait for workers: one call
/// deadline plus slack.
const WORKER_END_DEADLINE: Duration = Duration::from_secs(15);

impl Sender {
    pub fn builder(addr: SocketAddr, signal: Signal) -> SenderBuilder {
        SenderBuilder {
            addr,
            signal,
            batch: 100,
            workers: 1,
            max_batches: 10_000,
            max_duration: Duration::from_secs(30),
            pause: Duration::ZERO,
            gzip: false,
            spec: ItemSpec::default(),
            max_attempts: 20,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(200),
            channel: None,
        }
    }

    /// Ids acknowledged so far.
    pub fn acknowledged_count(&self) -> usize {
        self.shared.acknowledged.load(Ordering::SeqCst)
    }

    /// A snapshot of the report so far.
    pub fn report(&self) -> SendReport {
        let mut r = self
            .shared
            .report
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        r.elapsed = self.started.elapsed();
        r
    }

    /// Polls until at least `n` ids are acknowledged.
    pub async fn wait_acknowledged(&self, n: usize, deadline: Duration) -> Result<(), String> {
        let started = Instant::now();
        loop {
            let acked = self.acknowledged_count();
            if acked >= n {
                return Ok(());
            }
            if started.elapsed() >= deadline || self.tasks.iter().all(|t| t.is_finished()) {
                let r = self.report();
                return Err(format!(
                    "sender: only {acked} of {n} ids acknowledged after {:?} \
                     ({} calls, refused {:?})",
                    started.elapsed(),
                    r.calls,
                    r.refused
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops starting requests, lets the calls in flight finish (their
    /// answers are recorded), and returns the report.
    pub async fn stop(self) -> SendReport {
        self.stop.cancel();
        self.join().await
    }

    /// Waits until the limits (batches, duration) end the sending, then
    /// returns the report.
    pub async fn finish(self) -> SendReport {
        self.join().await
    }

    async fn join(mut self) -> SendReport {
        // Workers stop starting calls at `max_duration`; the last call ends
        // within its deadline.
        let until =
            tokio::time::Instant::from_std(self.started + self.max_duration + WORKER_END_DEADLINE);
        for mut task in std::mem::take(&mut self.tasks) {
            match tokio::time::timeout_at(until, &mut task).await {
                Ok(joined) => joined.expect("sender worker panicked"),
                Err(_) => {
                    task.abort();
                    eprintln!("[sender] worker did not end in time; aborted");
                }
            }
        }
        self.report()
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
