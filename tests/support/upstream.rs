//! An in-process OTLP/gRPC upstream that records every id it accepts.
//!
//! `Upstream::start()` serves the three OTLP services on `127.0.0.1:0`. What it
//! answers is controlled while it runs with [`Upstream::set_mode`] and
//! [`Upstream::poison`]; [`Upstream::stop`] closes the port and cuts every open
//! connection (in-flight calls fail at the client), [`Upstream::restart`]
//! serves again on the same address. [`Upstream::start_tls`] serves over TLS
//! (and mutual TLS when the config names a client CA).
//!
//! Recording: `requests(signal)` counts every export call that reached a
//! handler (answered OK or not); `received_ids(signal)` holds the ids of the
//! requests answered OK (including partial success), duplicates kept, in
//! arrival order. A request that is refused, stalled then cut, or poisoned
//! contributes no ids. `received_entries(signal)` holds the resource entries
//! of the same requests (attributes and ids), to check what the agent stamped.

use std::collections::{BTreeSet, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::StreamExt;
use opentelemetry_proto::tonic::collector::logs::v1::logs_service_server::{
    LogsService, LogsServiceServer,
};
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsPartialSuccess, ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsPartialSuccess, ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::codec::CompressionEncoding;
use tonic::metadata::MetadataMap;
use tonic::transport::server::{Connected, TcpConnectInfo, TcpIncoming};
use tonic::transport::{Server, ServerTlsConfig};
use tonic::{Code, Request, Response, Status};
use tonic_types::{ErrorDetails, StatusExt};

use super::resources::{ids_of, HasEntries, SeenEntry};
use super::Signal;

/// Largest request the upstream decodes.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
/// How long `restart` keeps retrying to bind the old address.
const REBIND_DEADLINE: Duration = Duration::from_secs(5);
/// How long `stop` waits for the server task after cutting connections.
const STOP_DEADLINE: Duration = Duration::from_secs(5);

/// How the upstream answers export calls. Changeable while running.
#[derive(Clone, Debug, PartialEq)]
pub enum Mode {
    /// Accept everything (OK, no partial success).
    Healthy,
    /// Refuse every request with this code.
    Fail(Code),
    /// Refuse every request with this code and a `google.rpc.RetryInfo`
    /// detail carrying this delay (what a throttling gateway sends).
    FailWithRetryInfo(Code, Duration),
    /// Refuse about `fraction` (0.0..=1.0) of requests with `code`, chosen by
    /// a deterministic generator seeded with `seed`; accept the rest.
    FailFraction {
        code: Code,
        fraction: f64,
        seed: u64,
    },
    /// Hold every request unanswered until the mode changes (then answer
    /// according to the new mode) or the upstream is stopped (then the call
    /// is cut).
    Stall,
    /// Accept every request, answering only after this delay (a slow upstream).
    Delay(Duration),
    /// Accept, and answer with a partial success naming `rejected` items.
    /// The ids still count as received.
    PartialSuccess { rejected: i64, message: String },
}

#[derive(Default)]
struct PerSignal {
    received: Vec<u64>,
    /// Items per request answered OK, in order.
    accepted_sizes: Vec<usize>,
    /// Resource entries of the requests answered OK, in order.
    entries: Vec<SeenEntry>,
    requests: usize,
    refused: usize,
}

struct State {
    mode: Mode,
    rng: u64,
    poisoned: HashSet<u64>,
    signals: [PerSignal; 3],
    last_metadata: Option<MetadataMap>,
}

struct Shared {
    state: Mutex<State>,
    /// Bumped on every mode change; stalled handlers wait on it.
    mode_changed: watch::Sender<u64>,
    stalled: AtomicUsize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Outcome of one export call, before it is turned into a signal's response.
type Answer = Result<Option<(i64, String)>, Status>;

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The service of one server generation (between start/restart and stop).
#[derive(Clone)]
struct Service {
    shared: Arc<Shared>,
    generation: CancellationToken,
}

impl Service {
    async fn handle(
        &self,
        signal: Signal,
        metadata: MetadataMap,
        mut entries: Vec<SeenEntry>,
    ) -> Answer {
        let ids = ids_of(&entries);
        {
            let mut st = self.shared.lock();
            st.signals[signal.index()].requests += 1;
            st.last_metadata = Some(metadata);
            if let Some(bad) = ids.iter().find(|id| st.poisoned.contains(id)) {
                st.signals[signal.index()].refused += 1;
                return Err(Status::invalid_argument(format!(
                    "test upstream: request contains poisoned id {bad}"
                )));
            }
        }
        let delay = match self.shared.lock().mode {
            Mode::Delay(d) => Some(d),
            _ => None,
        };
        if let Some(d) = delay {
            tokio::select! {
                _ = tokio::time::sleep(d) => {}
                _ = self.generation.cancelled() => {
                    return Err(Status::unavailable("test upstream: stopped"));
                }
            }
        }
        loop {
            // Subscribe before reading the mode so a change in between is seen.
            let mut changed = self.shared.mode_changed.subscribe();
            let answer = {
                let mut st = self.shared.lock();
                let answer = match st.mode.clone() {
                    Mode::Stall => None,
                    Mode::Healthy | Mode::Delay(_) => Some(Ok(None)),
                    Mode::PartialSuccess { rejected, message } => {
                        Some(Ok(Some((rejected, message))))
                    }
                    Mode::Fail(code) => Some(Err(Status::new(code, "test upstream: failing"))),
                    Mode::FailWithRetryInfo(code, delay) => Some(Err(Status::with_error_details(
                        code,
                        "test upstream: failing, retry later",
                        ErrorDetails::with_retry_info(Some(delay)),
                    ))),
                    Mode::FailFraction { code, fraction, .. } => {
                        let draw = splitmix64(&mut st.rng) as f64 / u64::MAX as f64;
                        if draw < fraction {
                            Some(Err(Status::new(code, "test upstream: random failure")))
                        } else {
                            Some(Ok(None))
                        }
                    }
                };
                if let Some(answer) = &answer {
                    // A call cut by `stop` must not be recorded as received.
                    if self.generation.is_cancelled() {
                        return Err(Status::unavailable("test upstream: stopped"));
                    }
                    let per = &mut st.signals[signal.index()];
                    match answer {
                        Ok(_) => {
                            per.accepted_sizes.push(ids.len());
                            per.received.extend_from_slice(&ids);
                            per.entries.append(&mut entries);
                        }
                        Err(_) => per.refused += 1,
                    }
                }
                answer
            };
            if let Some(answer) = answer {
                return answer;
            }
            self.shared.stalled.fetch_add(1, Ordering::SeqCst);
            let cut = tokio::select! {
                _ = changed.changed() => false,
                _ = self.generation.cancelled() => true,
            };
            self.shared.stalled.fetch_sub(1, Ordering::SeqCst);
            if cut {
                return Err(Status::unavailable("test upstream: stopped"));
            }
        }
    }
}

#[tonic::async_trait]
impl TraceService for Service {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let (metadata, _, message) = request.into_parts();
        let partial = self
            .handle(Signal::Traces, metadata, message.into_entries())
            .await?;
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success: partial.map(|(rejected_spans, error_message)| {
                ExportTracePartialSuccess {
                    rejected_spans,
                    error_message,
                }
            }),
        }))
    }
}

#[tonic::async_trait]
impl MetricsService for Service {
    async fn export(
        &self,
        request: Request<ExportMetricsServiceRequest>,
    ) -> Result<Response<ExportMetricsServiceResponse>, Status> {
        let (metadata, _, message) = request.into_parts();
        let partial = self
            .handle(Signal::Metrics, metadata, message.into_entries())
            .await?;
        Ok(Response::new(ExportMetricsServiceResponse {
            partial_success: partial.map(|(rejected_data_points, error_message)| {
                ExportMetricsPartialSuccess {
                    rejected_data_points,
                    error_message,
                }
            }),
        }))
    }
}

#[tonic::async_trait]
impl LogsService for Service {
    async fn export(
        &self,
        request: Request<ExportLogsServiceRequest>,
    ) -> Result<Response<ExportLogsServiceResponse>, Status> {
        let (metadata, _, message) = request.into_parts();
        let partial = self
            .handle(Signal::Logs, metadata, message.into_entries())
            .await?;
        Ok(Response::new(ExportLogsServiceResponse {
            partial_success: partial.map(|(rejected_log_records, error_message)| {
                ExportLogsPartialSuccess {
                    rejected_log_records,
                    error_message,
                }
            }),
        }))
    }
}

/// A TCP stream that fails every read and write once its server generation
/// is stopped, so `stop` really cuts open HTTP/2 connections (tonic's own
/// shutdown would wait for in-flight calls, and dropping the accept loop
/// leaves accepted connections serving).
struct CutIo {
    inner: TcpStream,
    cut: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl CutIo {
    fn check(&mut self, cx: &mut Context<'_>) -> std::io::Result<()> {
        match self.cut.as_mut().poll(cx) {
            Poll::Ready(()) => Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "test upstream stopped",
            )),
            Poll::Pending => Ok(()),
        }
    }
}

impl AsyncRead for CutIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for CutIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl Connected for CutIo {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

struct Running {
    generation: CancellationToken,
    task: JoinHandle<()>,
}

fn serve(
    shared: Arc<Shared>,
    listener: TcpListener,
    tls: Option<ServerTlsConfig>,
    max_message: usize,
) -> Running {
    let generation = CancellationToken::new();
    let service = Service {
        shared,
        generation: generation.clone(),
    };
    let conn_token = generation.clone();
    let incoming = TcpIncoming::from(listener).map(move |accepted| {
        accepted.map(|stream| {
            let _ = stream.set_nodelay(true);
            CutIo {
                inner: stream,
                cut: Box::pin(conn_token.clone().cancelled_owned()),
            }
        })
    });
    let mut server = Server::builder();
    if let Some(tls) = tls {
        server = server.tls_config(tls).expect("test upstream TLS config");
    }
    let router = server
        .add_service(
            TraceServiceServer::new(service.clone())
                .accept_compressed(CompressionEncoding::Gzip)
                .accept_compressed(CompressionEncoding::Zstd)
                .send_compressed(CompressionEncoding::Gzip)
                .max_decoding_message_size(max_message),
        )
        .add_service(
            MetricsServiceServer::new(service.clone())
                .accept_compressed(CompressionEncoding::Gzip)
                .accept_compressed(CompressionEncoding::Zstd)
                .send_compressed(CompressionEncoding::Gzip)
                .max_decoding_message_size(max_message),
        )
        .add_service(
            LogsServiceServer::new(service)
                .accept_compressed(CompressionEncoding::Gzip)
                .accept_compressed(CompressionEncoding::Zstd)
                .send_compressed(CompressionEncoding::Gzip)
                .max_decoding_message_size(max_message),
        );
    let shutdown = generation.clone().cancelled_owned();
    let task = tokio::spawn(async move {
        if let Err(e) = router
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await
        {
            eprintln!("[upstream] server ended with error: {e}");
        }
    });
    Running { generation, task }
}

/// The in-process OTLP/gRPC upstream. Dropping it stops the server.
pub struct Upstream {
    shared: Arc<Shared>,
    addr: SocketAddr,
    running: Mutex<Option<Running>>,
    /// Served over TLS with this config (kept for `restart`).
    tls: Option<ServerTlsConfig>,
    /// tonic's `max_decoding_message_size`: larger requests are refused.
    max_message: usize,
}

impl Upstream {
    /// Serves on a fresh `127.0.0.1` port, healthy.
    pub async fn start() -> Upstream {
        Upstream::serve_on_fresh_port(None).await
    }

    /// Like [`start`](Self::start), over TLS; `endpoint()` is `https://`.
    pub async fn start_tls(tls: ServerTlsConfig) -> Upstream {
        Upstream::serve_on_fresh_port(Some(tls)).await
    }

    /// Like [`start`](Self::start), refusing requests larger than
    /// `max_message` bytes as tonic does (OUT_OF_RANGE "decoded message
    /// length too large"), as a gateway with a smaller limit would.
    pub async fn start_with_limit(max_message: usize) -> Upstream {
        Upstream::serve_on_fresh_port_limited(None, max_message).await
    }

    async fn serve_on_fresh_port(tls: Option<ServerTlsConfig>) -> Upstream {
        Upstream::serve_on_fresh_port_limited(tls, MAX_MESSAGE_BYTES).await
    }

    async fn serve_on_fresh_port_limited(
        tls: Option<ServerTlsConfig>,
        max_message: usize,
    ) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind test upstream on 127.0.0.1:0");
        let addr = listener.local_addr().expect("test upstream local_addr");
        let (mode_changed, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                mode: Mode::Healthy,
                rng: 0,
                poisoned: HashSet::new(),
                signals: Default::default(),
                last_metadata: None,
            }),
            mode_changed,
            stalled: AtomicUsize::new(0),
        });
        let running = serve(shared.clone(), listener, tls.clone(), max_message);
        Upstream {
            shared,
            addr,
            running: Mutex::new(Some(running)),
            tls,
            max_message,
        }
    }

    /// Starts in `mode`.
    pub async fn start_with(mode: Mode) -> Upstream {
        let upstream = Upstream::start().await;
        upstream.set_mode(mode);
        upstream
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT` (`https://` over TLS), for `--upstream` and
    /// SDK exporters.
    pub fn endpoint(&self) -> String {
        match self.tls {
            Some(_) => format!("https://{}", self.addr),
            None => format!("http://{}", self.addr),
        }
    }

    pub fn set_mode(&self, mode: Mode) {
        {
            let mut st = self.shared.lock();
            if let Mode::FailFraction { seed, .. } = &mode {
                st.rng = *seed;
            }
            st.mode = mode;
        }
        self.shared.mode_changed.send_modify(|g| *g += 1);
    }

    pub fn mode(&self) -> Mode {
        self.shared.lock().mode.clone()
    }

    /// Any later request containing `id` is answered INVALID_ARGUMENT (and
    /// none of its ids are recorded), whatever the mode.
    pub fn poison(&self, id: u64) {
        self.shared.lock().poisoned.insert(id);
    }

    /// Stops serving: the port is closed, open connections are cut and stalled
    /// calls fail at the client. Idempotent.
    pub async fn stop(&self) {
        let running = self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let Some(Running {
            generation,
            mut task,
        }) = running
        else {
            return;
        };
        generation.cancel();
        if tokio::time::timeout(STOP_DEADLINE, &mut task)
            .await
            .is_err()
        {
            eprintln!("[upstream] server task did not end in {STOP_DEADLINE:?}; aborting it");
            task.abort();
            let _ = task.await;
        }
    }

    /// Serves again on the same address (stopping first if running). Retries
    /// the bind for a bounded time; panics if the port stays taken.
    pub async fn restart(&self) {
        self.stop().await;
        let started = Instant::now();
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(listener) => break listener,
                Err(e) if started.elapsed() < REBIND_DEADLINE => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!(
                    "test upstream could not rebind {} within {REBIND_DEADLINE:?}: {e}",
                    self.addr
                ),
            }
        };
        let running = serve(
            self.shared.clone(),
            listener,
            self.tls.clone(),
            self.max_message,
        );
        *self.running.lock().unwrap_or_else(|e| e.into_inner()) = Some(running);
    }

    pub fn is_running(&self) -> bool {
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Ids of every item of every request answered OK, duplicates kept.
    pub fn received_ids(&self, signal: Signal) -> Vec<u64> {
        self.shared.lock().signals[signal.index()].received.clone()
    }

    pub fn unique_ids(&self, signal: Signal) -> BTreeSet<u64> {
        self.shared.lock().signals[signal.index()]
            .received
            .iter()
            .copied()
            .collect()
    }

    /// How many received items repeat an id already received.
    pub fn duplicates(&self, signal: Signal) -> usize {
        let st = self.shared.lock();
        let received = &st.signals[signal.index()].received;
        let unique: HashSet<u64> = received.iter().copied().collect();
        received.len() - unique.len()
    }

    /// Export calls that reached the handler, whatever the answer.
    /// Resource entries of the requests answered OK, in arrival order.
    pub fn received_entries(&self, signal: Signal) -> Vec<SeenEntry> {
        self.shared.lock().signals[signal.index()].entries.clone()
    }

    pub fn requests(&self, signal: Signal) -> usize {
        self.shared.lock().signals[signal.index()].requests
    }

    /// Export calls answered with an error (poison, Fail modes).
    pub fn refused(&self, signal: Signal) -> usize {
        self.shared.lock().signals[signal.index()].refused
    }

    /// Items per accepted request, in arrival order (batch sizes).
    pub fn accepted_sizes(&self, signal: Signal) -> Vec<usize> {
        self.shared.lock().signals[signal.index()]
            .accepted_sizes
            .clone()
    }

    /// Calls currently held by `Mode::Stall`.
    pub fn stalled(&self) -> usize {
        self.shared.stalled.load(Ordering::SeqCst)
    }

    /// Metadata (headers) of the last export call of any signal.
    pub fn last_metadata(&self) -> Option<MetadataMap> {
        self.shared.lock().last_metadata.clone()
    }

    /// One header of the last export call, if present and ASCII.
    pub fn last_header(&self, key: &str) -> Option<String> {
        let st = self.shared.lock();
        let value = st.last_metadata.as_ref()?.get(key)?;
        value.to_str().ok().map(str::to_owned)
    }

    /// Forgets everything recorded (ids, counts, metadata); keeps mode and poison.
    pub fn clear(&self) {
        let mut st = self.shared.lock();
        st.signals = Default::default();
        st.last_metadata = None;
    }

    /// Polls until every id of `expected` has been received (duplicates
    /// allowed), or `deadline` passes.
    pub async fn wait_for_ids(
        &self,
        signal: Signal,
        expected: &BTreeSet<u64>,
        deadline: Duration,
    ) -> Result<(), String> {
        let started = Instant::now();
        loop {
            let missing: Vec<u64> = {
                let unique = self.unique_ids(signal);
                expected.difference(&unique).copied().collect()
            };
            if missing.is_empty() {
                return Ok(());
            }
            if started.elapsed() >= deadline {
                return Err(format!(
                    "upstream is missing {} of {} {signal} ids after {deadline:?}, e.g. {:?}; \
                     it received {} ids ({} duplicates) in {} requests ({} refused)",
                    missing.len(),
                    expected.len(),
                    &missing[..missing.len().min(8)],
                    self.received_ids(signal).len(),
                    self.duplicates(signal),
                    self.requests(signal),
                    self.refused(signal),
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Polls until `predicate(self)` holds or `deadline` passes.
    pub async fn wait_until(
        &self,
        what: &str,
        deadline: Duration,
        mut predicate: impl FnMut(&Upstream) -> bool,
    ) -> Result<(), String> {
        let started = Instant::now();
        loop {
            if predicate(self) {
                return Ok(());
            }
            if started.elapsed() >= deadline {
                return Err(format!(
                    "upstream: {what} did not happen within {deadline:?}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Asserts that exactly `expected` was received: nothing missing, nothing
    /// extra, no duplicates.
    #[track_caller]
    pub fn assert_received_exactly(&self, signal: Signal, expected: &BTreeSet<u64>) {
        super::assert_ids_eq(
            &format!("upstream {signal}"),
            &self.unique_ids(signal),
            expected,
        );
        let duplicates = self.duplicates(signal);
        assert_eq!(
            duplicates, 0,
            "upstream received {duplicates} duplicate {signal} ids"
        );
    }

    /// Asserts that everything in `expected` was received (extras and
    /// duplicates allowed: at-least-once).
    #[track_caller]
    pub fn assert_received_all(&self, signal: Signal, expected: &BTreeSet<u64>) {
        let unique = self.unique_ids(signal);
        let missing: Vec<u64> = expected.difference(&unique).copied().collect();
        assert!(
            missing.is_empty(),
            "upstream is missing {} of {} {signal} ids, e.g. {:?}",
            missing.len(),
            expected.len(),
            &missing[..missing.len().min(8)]
        );
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if let Some(running) = self
            .running
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            running.generation.cancel();
            // The task ends on its own once connections are cut.
            drop(running.task);
        }
    }
}
