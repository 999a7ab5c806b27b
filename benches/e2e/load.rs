//! The load generator: pre-built OTLP/gRPC request bodies sent raw.
//!
//! Bodies are encoded before the timed run ([`Bodies::build`]) so encoding is
//! not what is measured; each call sends a `Bytes` through a pass-through
//! codec (`support::client::RawCodec`), so a call costs the generator little
//! more than HTTP/2 framing. Request `j` holds the ids
//! `first_id + j*items .. first_id + (j+1)*items`, so an acknowledged set is
//! a set of request indices.
//!
//! Every run is bounded by a request count and a duration; an optional rate
//! cap spaces the starts of requests evenly over all workers.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request};

use crate::realistic;
use crate::support::client::RawCodec;
use crate::support::{ExportRequest, ItemSpec, Signal};

/// Per-call deadline.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Extra time allowed after the duration cap for calls in flight.
const DRAIN_DEADLINE: Duration = Duration::from_secs(15);

/// The shape of the load.
#[derive(Clone, Debug)]
pub struct LoadSpec {
    pub signal: Signal,
    /// Concurrent clients, each with its own connection.
    pub concurrency: usize,
    /// Items per request.
    pub items: usize,
    /// Bytes of the extra string attribute on every item (0: none).
    pub payload: usize,
    /// Items built by [`crate::realistic`] instead (`payload` then unused).
    pub realistic: bool,
    /// Request count cap (also how many bodies are pre-built).
    pub requests: usize,
    /// Duration cap: no request starts after this.
    pub duration: Duration,
    /// Requests per second over all clients; `None`: as fast as answered.
    pub rate: Option<f64>,
    /// OTLP/gRPC, or OTLP/HTTP with protobuf bodies.
    pub http: bool,
    /// gRPC over something other than plain TCP to the address (a Unix
    /// socket, TLS); `None`: plain TCP.
    pub channel: Option<ChannelMaker>,
}

/// Makes one load client's gRPC channel to the agent at an address.
#[derive(Clone)]
pub struct ChannelMaker(pub Arc<dyn Fn(SocketAddr) -> Channel + Send + Sync>);

impl std::fmt::Debug for ChannelMaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChannelMaker")
    }
}

/// One client connection: gRPC over a tonic channel, or HTTP/1.1 keep-alive.
enum Client {
    Grpc(tonic::client::Grpc<Channel>, PathAndQuery),
    Http {
        addr: SocketAddr,
        path: &'static str,
        conn: Option<hyper::client::conn::http1::SendRequest<http_body_util::Full<Bytes>>>,
    },
}

impl Client {
    fn new(addr: SocketAddr, signal: Signal, http: bool, maker: Option<&ChannelMaker>) -> Client {
        match http {
            false => Client::Grpc(
                tonic::client::Grpc::new(maker.map_or_else(|| channel(addr), |m| (m.0)(addr))),
                PathAndQuery::from_static(signal.grpc_path()),
            ),
            true => Client::Http {
                addr,
                path: signal.http_path(),
                conn: None,
            },
        }
    }

    /// One export; `Err` carries the gRPC code (HTTP statuses mapped to one).
    async fn export(&mut self, body: Bytes) -> Result<(), Code> {
        match self {
            Client::Grpc(grpc, path) => {
                grpc.ready().await.map_err(|_| Code::Unavailable)?;
                grpc.unary(Request::new(body), path.clone(), RawCodec)
                    .await
                    .map(|_: tonic::Response<Bytes>| ())
                    .map_err(|s| s.code())
            }
            Client::Http { addr, path, conn } => {
                if conn.as_ref().is_none_or(|c| c.is_closed()) {
                    let stream = tokio::net::TcpStream::connect(*addr)
                        .await
                        .map_err(|_| Code::Unavailable)?;
                    let _ = stream.set_nodelay(true);
                    let (send, connection) =
                        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                            .await
                            .map_err(|_| Code::Unavailable)?;
                    tokio::spawn(connection);
                    *conn = Some(send);
                }
                let Some(send) = conn.as_mut() else {
                    return Err(Code::Unavailable);
                };
                send.ready().await.map_err(|_| Code::Unavailable)?;
                let request = hyper::Request::post(*path)
                    .header("host", addr.to_string())
                    .header("content-type", "application/x-protobuf")
                    .body(http_body_util::Full::new(body))
                    .map_err(|_| Code::Internal)?;
                let response = tokio::time::timeout(CALL_TIMEOUT, send.send_request(request))
                    .await
                    .map_err(|_| Code::DeadlineExceeded)?
                    .map_err(|_| Code::Unavailable)?;
                let status = response.status().as_u16();
                // Read the (tiny) body so the connection can be reused.
                let _ = http_body_util::BodyExt::collect(response.into_body()).await;
                match status {
                    200 => Ok(()),
                    429 | 502 | 503 | 504 => Err(Code::Unavailable),
                    413 => Err(Code::ResourceExhausted),
                    _ => Err(Code::InvalidArgument),
                }
            }
        }
    }
}

/// Pre-encoded request bodies.
pub struct Bodies {
    pub signal: Signal,
    pub items: usize,
    pub first_id: u64,
    pub bodies: Vec<Bytes>,
    /// Items carry [`realistic::mix`] of their counting id.
    pub realistic: bool,
}

impl Bodies {
    /// Encodes `spec.requests` requests with ids starting at `first_id`.
    pub fn build(spec: &LoadSpec, first_id: u64) -> Bodies {
        let item_spec = ItemSpec::with_payload(spec.payload);
        let bodies = (0..spec.requests)
            .map(|j| {
                let start = first_id + (j * spec.items) as u64;
                let ids: Vec<u64> = (start..start + spec.items as u64).collect();
                match spec.realistic {
                    true => realistic::build(spec.signal, j, &ids),
                    false => ExportRequest::build_with(spec.signal, &ids, &item_spec),
                }
                .encode_to_bytes()
            })
            .collect();
        Bodies {
            signal: spec.signal,
            items: spec.items,
            first_id,
            bodies,
            realistic: spec.realistic,
        }
    }

    /// The index (counting id - `first_id`) of an id a sink received, if it
    /// is one of these bodies' ids.
    pub fn index_of(&self, received: u64) -> Option<usize> {
        let id = match self.realistic {
            true => realistic::unmix(received),
            false => received,
        };
        let total = (self.bodies.len() * self.items) as u64;
        id.checked_sub(self.first_id)
            .filter(|&i| i < total)
            .map(|i| i as usize)
    }

    /// Compression ratios (uncompressed / compressed) of the first bodies,
    /// each compressed on its own as an exporter would: gzip levels 1 and 6,
    /// zstd levels 1 and 3; and the mean bytes per item.
    pub fn compression_text(&self) -> String {
        use std::io::Write as _;
        let sample = &self.bodies[..self.bodies.len().min(50)];
        let raw: usize = sample.iter().map(Bytes::len).sum();
        let gzip = |level| {
            sample
                .iter()
                .map(|b| {
                    let mut e =
                        flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(level));
                    let _ = e.write_all(b);
                    e.finish().map_or(0, |v| v.len())
                })
                .sum::<usize>()
        };
        let zstd = |level| {
            sample
                .iter()
                .map(|b| zstd::bulk::compress(b, level).map_or(0, |v| v.len()))
                .sum::<usize>()
        };
        let r = |c: usize| raw as f64 / c.max(1) as f64;
        format!(
            "{} B/item; compression ratio gzip-1 {:.2}, gzip-6 {:.2}, zstd-1 {:.2}, zstd-3 {:.2} (first {} requests)",
            raw / (sample.len() * self.items).max(1),
            r(gzip(1)),
            r(gzip(6)),
            r(zstd(1)),
            r(zstd(3)),
            sample.len()
        )
    }

    pub fn mean_len(&self) -> usize {
        self.bodies.iter().map(Bytes::len).sum::<usize>() / self.bodies.len().max(1)
    }

    /// The ids of request `j`.
    pub fn ids_of(&self, j: usize) -> std::ops::Range<u64> {
        let start = self.first_id + (j * self.items) as u64;
        start..start + self.items as u64
    }
}

/// What one run did.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// Indices of the requests answered OK.
    pub acked: Vec<usize>,
    pub acked_items: u64,
    pub acked_bytes: u64,
    /// Calls made (each request at most once: no retries).
    pub calls: usize,
    /// Error answers by code.
    pub errors: Vec<(Code, usize)>,
    /// Latency of the OK calls, sorted, in microseconds.
    pub latencies_us: Vec<u32>,
    /// The OK calls as (start, in ms from the run's start; latency in
    /// microseconds), unsorted: for latency over a window of the run.
    pub timeline: Vec<(u32, u32)>,
    /// From the first call's start to the last call's end.
    pub elapsed: Duration,
}

impl LoadReport {
    /// The `q` quantile (0..=1) of the OK latencies.
    pub fn latency(&self, q: f64) -> Duration {
        if self.latencies_us.is_empty() {
            return Duration::ZERO;
        }
        let i = ((self.latencies_us.len() - 1) as f64 * q).round() as usize;
        Duration::from_micros(self.latencies_us[i] as u64)
    }

    pub fn errors_text(&self) -> String {
        if self.errors.is_empty() {
            return "none".into();
        }
        self.errors
            .iter()
            .map(|(c, n)| format!("{c:?}×{n}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

fn channel(addr: SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("valid endpoint")
        .connect_timeout(Duration::from_secs(5))
        .timeout(CALL_TIMEOUT)
        .tcp_nodelay(true)
        .connect_lazy()
}

#[derive(Default)]
struct WorkerReport {
    acked: Vec<usize>,
    calls: usize,
    errors: Vec<(Code, usize)>,
    latencies_us: Vec<u32>,
    timeline: Vec<(u32, u32)>,
}

/// Sends `bodies` to `addr` with `spec.concurrency` clients until the
/// bodies, the duration cap or `stop` end it; waits (bounded) for the calls in
/// flight.
pub async fn run(addr: SocketAddr, spec: &LoadSpec, bodies: Arc<Bodies>) -> LoadReport {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let limit = spec.requests.min(bodies.bodies.len());
    let (signal, http) = (bodies.signal, spec.http);
    let maker = spec.channel.clone();
    let tasks: Vec<_> = (0..spec.concurrency.max(1))
        .map(|_| {
            let next = next.clone();
            let bodies = bodies.clone();
            let duration = spec.duration;
            let rate = spec.rate;
            let maker = maker.clone();
            tokio::spawn(async move {
                let mut client = Client::new(addr, signal, http, maker.as_ref());
                let mut w = WorkerReport::default();
                loop {
                    if started.elapsed() >= duration {
                        break;
                    }
                    let j = next.fetch_add(1, Ordering::Relaxed);
                    if j >= limit {
                        break;
                    }
                    if let Some(rate) = rate {
                        let due = started + Duration::from_secs_f64(j as f64 / rate);
                        tokio::time::sleep_until(due.into()).await;
                        if started.elapsed() >= duration {
                            break;
                        }
                    }
                    let t0 = Instant::now();
                    w.calls += 1;
                    let result = client.export(bodies.bodies[j].clone()).await;
                    match result {
                        Ok(()) => {
                            let us = t0.elapsed().as_micros().min(u32::MAX as u128) as u32;
                            w.latencies_us.push(us);
                            let at = t0.duration_since(started).as_millis() as u32;
                            w.timeline.push((at, us));
                            w.acked.push(j);
                        }
                        Err(code) => match w.errors.iter_mut().find(|(c, _)| *c == code) {
                            Some((_, n)) => *n += 1,
                            None => w.errors.push((code, 1)),
                        },
                    }
                }
                w
            })
        })
        .collect();

    let until = tokio::time::Instant::from_std(started + spec.duration + DRAIN_DEADLINE);
    let mut report = LoadReport::default();
    for mut task in tasks {
        match tokio::time::timeout_at(until, &mut task).await {
            Ok(Ok(w)) => {
                report.acked.extend(w.acked);
                report.calls += w.calls;
                report.latencies_us.extend(w.latencies_us);
                report.timeline.extend(w.timeline);
                for (code, n) in w.errors {
                    match report.errors.iter_mut().find(|(c, _)| *c == code) {
                        Some((_, m)) => *m += n,
                        None => report.errors.push((code, n)),
                    }
                }
            }
            Ok(Err(e)) => panic!("load worker panicked: {e}"),
            Err(_) => {
                task.abort();
                eprintln!("[load] a worker did not end within the drain deadline; aborted");
            }
        }
    }
    report.elapsed = started.elapsed();
    report.acked.sort_unstable();
    report.latencies_us.sort_unstable();
    report.acked_items = (report.acked.len() * bodies.items) as u64;
    report.acked_bytes = report
        .acked
        .iter()
        .map(|&j| bodies.bodies[j].len() as u64)
        .sum();
    report
}
