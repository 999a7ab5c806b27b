//! Connection handling for the OTLP listeners: the accept loop and the limits
//! that protect the agent from clients that hold resources.
//!
//! `axum::serve` has no knobs for these, so the loop is written here over
//! hyper-util's auto (HTTP/1 + HTTP/2) connection builder:
//!
//! - **Connections per listener** (`receiver.max_connections`): a semaphore
//!   permit is taken *before* `accept` and moved into the connection task, as in
//!   mini-redis. At the limit the loop stops accepting; further clients wait in
//!   the kernel's accept queue until a connection closes (no one is refused).
//! - **HTTP/2** (`max_concurrent_streams`, `max_header_bytes` as the header list
//!   size, keepalive PINGs with a timeout) and **HTTP/1** (`header_timeout`,
//!   `max_header_bytes` as the read buffer that must hold the headers) are
//!   hyper settings.
//! - **Idle connections** (`idle_timeout`): a connection with no request in
//!   flight for that long is shut down gracefully. This also closes a
//!   connection that never sends a byte, so silent clients cannot pin permits.
//!   One that has gone away and is still idle an `idle_timeout` later is
//!   dropped: an HTTP/2 client that never acknowledges the GOAWAY's PING
//!   cannot keep it either, keepalive PINGs or not.
//! - The **body deadline** is the handlers' (they know the protocol's status
//!   code); see `receiver.body_timeout` and [`super::IngestError::BodyTimeout`].
//! - **TLS** (`[receiver.tls]`): the handshake runs in the connection's task,
//!   after the permit is taken and never in the loop, bounded by
//!   `header_timeout` ([`crate::tls::ServerTls::accept`]).
//!
//! Shutdown: when `stop` fires the loop drops the listener and every connection
//! is shut down gracefully (HTTP/2 GOAWAY, HTTP/1 close after the current
//! response): requests in flight complete. [`serve`] returns once every
//! connection has ended; the caller bounds that wait.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::serve::Listener;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::ReceiverConfig;
use crate::task::PanicFlag;
use crate::tls::ServerTls;

/// The connection-level limits of one listener (from `[receiver]`).
#[derive(Clone, Debug)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub max_concurrent_streams: u32,
    pub max_header_bytes: u32,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    /// Zero: no keepalive PINGs.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
}

impl From<&ReceiverConfig> for ConnectionLimits {
    fn from(r: &ReceiverConfig) -> Self {
        ConnectionLimits {
            max_connections: r.max_connections.max(1),
            max_concurrent_streams: r.max_concurrent_streams.max(1),
            max_header_bytes: u32::try_from(r.max_header_bytes.0).unwrap_or(u32::MAX),
            header_timeout: r.header_timeout,
            idle_timeout: r.idle_timeout,
            keepalive_interval: r.keepalive_interval,
            keepalive_timeout: r.keepalive_timeout,
        }
    }
}

/// The largest HTTP/2 DATA frame clients may send (SETTINGS_MAX_FRAME_SIZE).
///
/// At the protocol's default of 16 KiB a 50 KB export arrives in four frames:
/// four wake-ups of the request's task, and a copy to join them into one
/// buffer. Clients that follow the setting (tonic, netty) send a request of
/// up to 1 MiB as one frame, which becomes the request body without a copy.
/// It costs no memory bound: hyper's receive windows (1 MiB per stream and per
/// connection) already let a client have that much in flight.
const H2_MAX_FRAME_SIZE: u32 = 1 << 20;

impl ConnectionLimits {
    fn builder(&self) -> Builder<TokioExecutor> {
        let mut builder = Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.header_timeout)
            // hyper's minimum read buffer is 8KiB (it panics below that).
            .max_buf_size((self.max_header_bytes as usize).max(8192));
        let mut h2 = builder.http2();
        h2.timer(TokioTimer::new())
            .max_frame_size(H2_MAX_FRAME_SIZE)
            .max_concurrent_streams(self.max_concurrent_streams)
            .max_header_list_size(self.max_header_bytes);
        if !self.keepalive_interval.is_zero() {
            h2.keep_alive_interval(self.keepalive_interval)
                .keep_alive_timeout(self.keepalive_timeout);
        }
        builder
    }
}

/// Serve `router` on `listener` until `stop` fires and every connection ended.
pub async fn serve<L: Listener>(
    mut listener: L,
    router: Router,
    limits: ConnectionLimits,
    tls: Option<ServerTls>,
    stop: CancellationToken,
    panics: PanicFlag,
) {
    let builder = Arc::new(limits.builder());
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let connections = TaskTracker::new();
    loop {
        let permit = tokio::select! {
            _ = stop.cancelled() => break,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break, // closed: never happens, the semaphore is ours
            },
        };
        let io = tokio::select! {
            _ = stop.cancelled() => break,
            (io, _addr) = listener.accept() => io,
        };
        let (builder, router, stop, tls) =
            (builder.clone(), router.clone(), stop.clone(), tls.clone());
        let idle_timeout = limits.idle_timeout;
        panics.spawn(&connections, "connection", async move {
            match tls {
                None => connection(io, builder, router, idle_timeout, stop).await,
                Some(tls) => {
                    if let Some(io) = tls.accept(io, &stop).await {
                        connection(io, builder, router, idle_timeout, stop).await;
                    }
                }
            }
            drop(permit);
        });
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

/// Serve one connection until it ends; graceful shutdown on `stop` or when idle.
async fn connection<I>(
    io: I,
    builder: Arc<Builder<TokioExecutor>>,
    router: Router,
    idle_timeout: Duration,
    stop: CancellationToken,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity::new());
    let service = {
        let activity = activity.clone();
        let inner = TowerToHyperService::new(router);
        hyper::service::service_fn(move |request: http::Request<Incoming>| {
            let in_flight = activity.begin();
            let response = hyper::service::Service::call(&inner, request);
            async move {
                let response = response.await;
                drop(in_flight);
                response
            }
        })
    };
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let mut closing = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            _ = stop.cancelled(), if !closing => {
                conn.as_mut().graceful_shutdown();
                activity.restart_idle();
                closing = true;
            }
            _ = activity.idle_for(idle_timeout), if !closing => {
                tracing::debug!(?idle_timeout, "closing idle connection");
                conn.as_mut().graceful_shutdown();
                activity.restart_idle();
                closing = true;
            }
            // HTTP/2 ends a graceful shutdown only when the client answers
            // the GOAWAY's PING. A client that never does (stopped, wedged)
            // would keep the connection and its permit for good when
            // keepalive PINGs are off: once it has gone away, a connection
            // with nothing in flight for another idle timeout is dropped.
            _ = activity.idle_for(idle_timeout), if closing => {
                tracing::debug!(?idle_timeout, "dropping a connection that went away but was not closed by the client");
                return;
            }
        }
    }
}

/// A TCP listener whose connections run with `TCP_NODELAY` until `stop`.
///
/// Without it a response written in two parts waits for the client's delayed
/// ACK (up to 40 ms) whenever the handler answered later than the request
/// arrived: durable mode's p99 was 45 ms. At shutdown Nagle is switched back
/// on, which batches the GOAWAY with the connection's last answers: with
/// `TCP_NODELAY` kept, tonic clients that keep sending on a connection while it
/// goes away saw some calls fail with INTERNAL (not retryable) during
/// socket-activated restarts (`tests/socket_activation.rs`).
pub struct NoDelayListener {
    inner: tokio::net::TcpListener,
    stop: CancellationToken,
}

impl NoDelayListener {
    pub fn new(inner: tokio::net::TcpListener, stop: CancellationToken) -> NoDelayListener {
        NoDelayListener { inner, stop }
    }
}

impl Listener for NoDelayListener {
    type Io = NoDelayStream;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (io, addr) = Listener::accept(&mut self.inner).await;
        if let Err(e) = io.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let stream = NoDelayStream {
            io,
            stop: self.stop.clone(),
            nagle: false,
        };
        (stream, addr)
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// A connection of [`NoDelayListener`].
pub struct NoDelayStream {
    io: tokio::net::TcpStream,
    stop: CancellationToken,
    /// Nagle is back on (shutdown began).
    nagle: bool,
}

impl NoDelayStream {
    fn before_write(&mut self) {
        if !self.nagle && self.stop.is_cancelled() {
            self.nagle = true;
            let _ = self.io.set_nodelay(false);
        }
    }
}

impl tokio::io::AsyncRead for NoDelayStream {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for NoDelayStream {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.before_write();
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.before_write();
        std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Requests in flight on one connection and when the last one ended.
struct Activity {
    started: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds after `started` when the connection last became idle.
    idle_since_ms: AtomicU64,
}

/// Marks one request in flight until dropped.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.0;
        a.idle_since_ms.store(a.elapsed_ms(), Ordering::Release);
        a.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Activity {
    fn new() -> Activity {
        Activity {
            started: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
        }
    }

    fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    /// Count idleness from now: a connection that has just gone away gets a
    /// whole idle timeout to close on its own.
    fn restart_idle(&self) {
        self.idle_since_ms
            .store(self.elapsed_ms(), Ordering::Release);
    }

    /// Resolves once no request has been in flight for `timeout`.
    async fn idle_for(&self, timeout: Duration) {
        loop {
            let wait = match self.in_flight.load(Ordering::Acquire) {
                0 => {
                    let since = self.idle_since_ms.load(Ordering::Acquire);
                    let idle = Duration::from_millis(self.elapsed_ms().saturating_sub(since));
                    match timeout.checked_sub(idle) {
                        Some(left) if !left.is_zero() => left,
                        _ => return,
                    }
                }
                _ => timeout,
            };
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_connection_is_idle_only_after_its_last_request_ended_for_the_timeout() {
        let activity = Arc::new(Activity::new());
        let timeout = Duration::from_secs(10);
        let request = activity.begin();
        let idle = tokio::time::timeout(Duration::from_secs(60), activity.idle_for(timeout));
        assert!(idle.await.is_err(), "busy for a minute: not idle");
        drop(request);
        let started = Instant::now();
        activity.idle_for(timeout).await;
        assert_eq!(started.elapsed(), timeout);
    }
}
