//! Upstream TCP with `TCP_CORK` over each poll of the HTTP/2 connection.
//!
//! h2 writes one DATA frame per `writev` (the frame header, then at most
//! the peer's `SETTINGS_MAX_FRAME_SIZE` of payload: 16 KiB for the
//! Collector, grpc-go and hyper servers, which all keep the default), and
//! flushes after each one (a queued DATA frame leaves its encoder without
//! room, so the next frame waits for a flush). With `TCP_NODELAY` each of
//! those writes is its own TCP segment, and on loopback the sender also runs
//! the receiver's side of every segment in its softirq: a 4 MiB batch costs
//! some 260 segments of kernel work.
//!
//! [`CorkedTcp`] sets `TCP_CORK` before the first write of at least
//! [`CORK_FROM`] bytes. A flush outside a connection task's poll clears it
//! at once; inside one (the connection tasks run under [`UncorkAfterPoll`],
//! the channel's executor) the flush only notes the socket, and the cork is
//! cleared when that poll returns. So what the connection writes in one poll
//! goes out in segments of up to the path MSS (64 KiB on loopback; 1448 B on
//! most networks, where corking changes little), and the rest is pushed when
//! the task yields. The bytes are not copied again.
//!
//! Invariants: a corked socket is uncorked before the poll that corked it
//! returns (or at its next flush outside a task's poll, or when the stream
//! shuts down); nothing waits on the cork across a task's idle time, and the
//! kernel's own 200 ms ceiling bounds even a lost uncork. Small writes
//! (HEADERS, SETTINGS, PING, WINDOW_UPDATE) never cork and cost no extra
//! syscall. Failing to set the option only loses the optimisation, so its
//! errors are ignored.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A write at least this large corks the socket (until the connection
/// task's poll ends): one full default-size HTTP/2 DATA frame.
pub(crate) const CORK_FROM: usize = 16 * 1024;

thread_local! {
    /// A connection task's poll is running on this thread.
    static IN_POLL: Cell<bool> = const { Cell::new(false) };
    /// Sockets flushed while corked during that poll.
    static DEFERRED: RefCell<Vec<Arc<Cork>>> = const { RefCell::new(Vec::new()) };
}

/// The cork of one socket, shared with the deferred list: a second handle
/// on the socket (`dup`), so uncorking never touches a closed descriptor.
#[derive(Debug)]
struct Cork {
    socket: socket2::Socket,
    corked: AtomicBool,
    deferred: AtomicBool,
}

impl Cork {
    fn set(&self, on: bool) -> bool {
        self.socket.set_tcp_cork(on).is_ok()
    }

    fn uncork(&self) {
        self.deferred.store(false, Ordering::Relaxed);
        if self.corked.swap(false, Ordering::Relaxed) {
            // On failure the kernel still sends within 200 ms.
            self.set(false);
        }
    }
}

/// A TCP stream that corks itself for bursts of large writes.
#[derive(Debug)]
pub struct CorkedTcp {
    inner: TcpStream,
    cork: Option<Arc<Cork>>,
}

impl CorkedTcp {
    pub fn new(inner: TcpStream) -> CorkedTcp {
        // Without a second handle the stream simply never corks.
        let cork = socket2::SockRef::from(&inner)
            .try_clone()
            .ok()
            .map(|socket| {
                Arc::new(Cork {
                    socket,
                    corked: AtomicBool::new(false),
                    deferred: AtomicBool::new(false),
                })
            });
        CorkedTcp { inner, cork }
    }

    /// The TCP stream underneath.
    #[cfg(test)]
    pub(super) fn tcp(&self) -> &TcpStream {
        &self.inner
    }

    fn cork_for(&mut self, len: usize) {
        if let Some(cork) = &self.cork {
            if len >= CORK_FROM && !cork.corked.load(Ordering::Relaxed) && cork.set(true) {
                cork.corked.store(true, Ordering::Relaxed);
            }
        }
    }

    /// At a flush: uncork now, or when the running connection poll ends.
    fn flushed(&mut self) {
        let Some(cork) = &self.cork else { return };
        if !cork.corked.load(Ordering::Relaxed) {
            return;
        }
        if IN_POLL.with(Cell::get) {
            if !cork.deferred.swap(true, Ordering::Relaxed) {
                DEFERRED.with(|d| d.borrow_mut().push(cork.clone()));
            }
        } else {
            cork.uncork();
        }
    }
}

impl AsyncRead for CorkedTcp {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for CorkedTcp {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.cork_for(buf.len());
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.cork_for(bufs.iter().map(|b| b.len()).sum());
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.flushed();
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(cork) = &this.cork {
            cork.uncork();
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

/// The gRPC channel's executor: `tokio::spawn`, each task polled inside a
/// scope that uncorks, when the poll returns, the sockets it flushed.
#[derive(Clone, Copy, Debug, Default)]
pub struct UncorkAfterPoll;

type BoxTask = Pin<Box<dyn Future<Output = ()> + Send>>;

impl hyper::rt::Executor<BoxTask> for UncorkAfterPoll {
    fn execute(&self, task: BoxTask) {
        tokio::spawn(Scoped(task));
    }
}

struct Scoped(BoxTask);

impl Future for Scoped {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let _scope = PollScope::enter();
        self.0.as_mut().poll(cx)
    }
}

/// Marks a connection poll on this thread; on drop (also on unwind) ends
/// it and uncorks what it deferred.
struct PollScope {
    outer: bool,
}

impl PollScope {
    fn enter() -> PollScope {
        PollScope {
            outer: IN_POLL.with(|p| p.replace(true)),
        }
    }
}

impl Drop for PollScope {
    fn drop(&mut self) {
        IN_POLL.with(|p| p.set(self.outer));
        if !self.outer {
            DEFERRED.with(|d| d.borrow_mut().drain(..).for_each(|cork| cork.uncork()));
        }
    }
}

/// The gRPC channel's connector: hyper-util's TCP connector (no Nagle, the
/// connect timeout; a loopback upstream leaves BBR, `loopback.rs`), each
/// connection wrapped in [`CorkedTcp`]. tonic adds
/// TLS on top for `https://` endpoints.
#[derive(Clone, Debug)]
pub(crate) struct CorkedConnector {
    tcp: HttpConnector,
}

impl CorkedConnector {
    pub(crate) fn new(connect_timeout: Duration) -> CorkedConnector {
        let mut tcp = HttpConnector::new();
        tcp.enforce_http(false);
        tcp.set_nodelay(true);
        tcp.set_connect_timeout(Some(connect_timeout));
        CorkedConnector { tcp }
    }
}

type Connecting = Pin<Box<dyn Future<Output = io::Result<TokioIo<CorkedTcp>>> + Send>>;

impl tower_service::Service<Uri> for CorkedConnector {
    type Response = TokioIo<CorkedTcp>;
    type Error = io::Error;
    type Future = Connecting;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        tower_service::Service::<Uri>::poll_ready(&mut self.tcp, cx).map_err(io::Error::other)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = tower_service::Service::<Uri>::call(&mut self.tcp, uri);
        Box::pin(async move {
            let tcp = connecting.await.map_err(io::Error::other)?.into_inner();
            super::loopback::unpace_loopback(&tcp);
            Ok(TokioIo::new(CorkedTcp::new(tcp)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn pair() -> (CorkedTcp, TcpStream) {
        let (client, accepted) = super::super::loopback::loopback_pair().await;
        client.set_nodelay(true).expect("nodelay");
        (CorkedTcp::new(client), accepted)
    }

    fn corked(stream: &CorkedTcp) -> bool {
        socket2::SockRef::from(&stream.inner)
            .tcp_cork()
            .expect("getsockopt")
    }

    #[tokio::test]
    async fn a_large_write_corks_the_socket_until_the_flush_and_every_byte_arrives() {
        let (mut client, mut server) = pair().await;
        let frames: Vec<Vec<u8>> = (0..8u8).map(|i| vec![i; CORK_FROM + 9]).collect();
        let sent: Vec<u8> = frames.concat();
        let reader = tokio::spawn(async move {
            let mut got = vec![0u8; sent.len()];
            server.read_exact(&mut got).await.expect("read");
            (got, sent)
        });
        for frame in &frames {
            let slices = [IoSlice::new(&frame[..9]), IoSlice::new(&frame[9..])];
            let mut written = 0;
            while written < frame.len() {
                // write_vectored may write part of a frame; the rest follows.
                let n = if written == 0 {
                    client.write_vectored(&slices).await.expect("write")
                } else {
                    client.write(&frame[written..]).await.expect("write")
                };
                written += n;
            }
            assert!(corked(&client), "a DATA-frame-sized write corks");
        }
        client.flush().await.expect("flush");
        assert!(!corked(&client), "the flush uncorks");
        let (got, sent) = reader.await.expect("reader");
        assert_eq!(got, sent);
    }

    #[tokio::test]
    async fn inside_a_connection_poll_the_flush_leaves_the_cork_until_the_poll_returns() {
        use hyper::rt::Executor;
        let (client, mut server) = pair().await;
        let frames: Vec<u8> = (0..6u8).flat_map(|i| vec![i; CORK_FROM]).collect();
        let sent = frames.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        // current_thread runtime: the test resumes only after the task's
        // poll (and so its scope) has ended.
        UncorkAfterPoll.execute(Box::pin(async move {
            let mut client = client;
            for frame in frames.chunks(CORK_FROM) {
                client.write_all(frame).await.expect("write");
                client.flush().await.expect("flush");
                assert!(corked(&client), "flushes inside the poll keep the cork");
            }
            let _ = tx.send(client);
        }));
        let client = rx.await.expect("task ran");
        assert!(!corked(&client), "the end of the poll uncorks");
        let mut got = vec![0u8; sent.len()];
        server.read_exact(&mut got).await.expect("read");
        assert_eq!(got, sent);
    }

    #[tokio::test]
    async fn small_writes_never_cork_the_socket() {
        let (mut client, mut server) = pair().await;
        client.write_all(b"PING").await.expect("write");
        assert!(!corked(&client));
        client.flush().await.expect("flush");
        let mut got = [0u8; 4];
        server.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"PING");
    }

    #[tokio::test]
    async fn shutdown_uncorks_and_the_peer_reads_everything_then_eof() {
        let (mut client, mut server) = pair().await;
        let big = vec![7u8; 3 * CORK_FROM + 100];
        client.write_all(&big).await.expect("write");
        client.shutdown().await.expect("shutdown");
        assert!(!corked(&client));
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.expect("read");
        assert_eq!(got, big);
    }
}
