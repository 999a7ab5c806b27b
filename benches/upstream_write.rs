//! Cost of writing one 4 MiB batch to upstream the way h2 does: 16 KiB DATA
//! frames (9-byte header + payload, one `writev` each), a flush after each,
//! over loopback TCP with `TCP_NODELAY`, to a task that reads it all.
//!
//! - `plain`: a `tokio::net::TcpStream` (before `src/exporter/cork.rs`);
//! - `corked`: [`telespool::exporter::CorkedTcp`] written from a task run by
//!   [`telespool::exporter::UncorkAfterPoll`], as the gRPC channel's
//!   connection task is: the socket stays corked until the task's poll
//!   returns, so the kernel sends 64 KiB segments instead of 16 KiB ones.
//!
//! - `corked_bbr`, `corked_cubic`: `corked` with the writer's congestion
//!   control set to BBR and to CUBIC (`src/exporter/loopback.rs`: the agent
//!   switches a loopback upstream connection from BBR to CUBIC). Skipped
//!   where the kernel refuses the name.
//!
//! Throughput is in payload bytes; the time includes the receiver's side of
//! each segment, which on loopback runs in the sender's softirq anyway.
#![allow(clippy::disallowed_types)]

use std::io::IoSlice;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use hyper::rt::Executor;
use telespool::exporter::{CorkedTcp, UncorkAfterPoll};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

const FRAME: usize = 16 * 1024;
const BATCH: usize = 4 << 20;

/// Write one batch as h2 would: a header and a payload per `writev`, then a
/// flush, frame after frame; the task yields only when the socket is full.
async fn write_batch<W: AsyncWrite + Unpin>(w: &mut W, payload: &[u8]) {
    let header = [0u8; 9];
    for frame in payload.chunks(FRAME) {
        let mut sent = 0;
        let total = header.len() + frame.len();
        while sent < total {
            let n = if sent < header.len() {
                let bufs = [IoSlice::new(&header[sent..]), IoSlice::new(frame)];
                w.write_vectored(&bufs).await.expect("write")
            } else {
                w.write(&frame[sent - header.len()..]).await.expect("write")
            };
            sent += n;
        }
        w.flush().await.expect("flush");
    }
}

/// A connected pair: (writer side, reader side).
async fn pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (w, r) = tokio::join!(TcpStream::connect(addr), listener.accept());
    let w = w.expect("connect");
    w.set_nodelay(true).expect("nodelay");
    (w, r.expect("accept").0)
}

/// Long-lived reader: reports each full batch read.
fn spawn_reader<R: AsyncRead + Unpin + Send + 'static>(mut r: R, done: mpsc::Sender<()>) {
    tokio::spawn(async move {
        let mut buf = vec![0u8; 256 << 10];
        let per_batch = BATCH + BATCH.div_ceil(FRAME) * 9;
        let mut got = 0;
        while let Ok(n) = r.read(&mut buf).await {
            if n == 0 {
                return;
            }
            got += n;
            while got >= per_batch {
                got -= per_batch;
                let _ = done.send(()).await;
            }
        }
    });
}

fn upstream_write(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let payload: &'static [u8] = Vec::leak((0..BATCH).map(|i| (i % 251) as u8).collect());
    let mut group = c.benchmark_group("upstream_write_4MiB_16KiB_frames");
    group.throughput(Throughput::Bytes(BATCH as u64));
    group.sample_size(30);
    for (name, corked, congestion) in [
        ("plain", false, None),
        ("corked", true, None),
        ("corked_bbr", true, Some("bbr")),
        ("corked_cubic", true, Some("cubic")),
    ] {
        let (go_tx, mut go_rx) = mpsc::channel::<()>(1);
        let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
        let ready = rt.block_on(async {
            let (w, r) = pair().await;
            if let Some(cc) = congestion {
                if let Err(e) = socket2::SockRef::from(&w).set_tcp_congestion(cc.as_bytes()) {
                    eprintln!("{name}: skipped, congestion control {cc:?}: {e}");
                    return false;
                }
            }
            spawn_reader(r, done_tx);
            if corked {
                let mut w = CorkedTcp::new(w);
                UncorkAfterPoll.execute(Box::pin(async move {
                    while go_rx.recv().await.is_some() {
                        write_batch(&mut w, payload).await;
                    }
                }));
            } else {
                let mut w = w;
                tokio::spawn(async move {
                    while go_rx.recv().await.is_some() {
                        write_batch(&mut w, payload).await;
                    }
                });
            }
            true
        });
        if !ready {
            continue;
        }
        group.bench_function(name, |b| {
            b.iter(|| {
                rt.block_on(async {
                    go_tx.send(()).await.expect("writer");
                    done_rx.recv().await.expect("reader");
                })
            })
        });
    }
    group.finish();
}

criterion_group!(benches, upstream_write);
criterion_main!(benches);
