//! Receiver limits through the real binary: the body deadline cuts off clients
//! that trickle bytes (HTTP 503 with Retry-After, gRPC DEADLINE_EXCEEDED) while others are
//! served, and the per-listener connection limit holds under a burst.
// Tests and benches drive real processes and sockets: wall-clock time,
// not tokio's (clippy.toml keeps std's Instant out of the agent's code).
#![allow(clippy::disallowed_types)]

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::client::Client;
use support::held::{served, Held};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const DEADLINE: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_http_body_is_cut_off_with_a_retryable_503_at_the_deadline_while_another_client_is_served(
) {
    let upstream = Upstream::start().await;
    let agent = start_agent(&upstream, "[receiver]\nbody_timeout = \"1s\"\n").await;
    let addr = agent.http_addr();

    let stream = ok(TcpStream::connect(addr).await);
    let (mut reader, mut writer) = stream.into_split();
    let head = format!(
        "POST /v1/traces HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/x-protobuf\r\nContent-Length: 1000\r\n\r\n"
    );
    let started = Instant::now();
    ok(writer.write_all(head.as_bytes()).await);
    let trickle = tokio::spawn(async move {
        // One byte every 100 ms: 1000 bytes would take 100 s. Bounded: 100 rounds.
        for _ in 0..100 {
            if writer.write_all(&[0x0a]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });

    // Another client is served meanwhile.
    let ids = fresh_ids(20);
    ok(Client::new(agent.grpc_addr())
        .export(Signal::Traces, &ids)
        .await);
    ok(upstream
        .wait_for_ids(Signal::Traces, &id_set(&ids), DEADLINE)
        .await);

    let mut answer = Vec::new();
    let read = tokio::time::timeout(DEADLINE, reader.read_to_end(&mut answer)).await;
    let elapsed = started.elapsed();
    trickle.abort();
    assert!(
        read.is_ok(),
        "the slow client was not cut off within {DEADLINE:?}"
    );
    let text = String::from_utf8_lossy(&answer);
    // 503 + Retry-After: OTLP/HTTP clients retry it (408 they would drop).
    assert!(text.starts_with("HTTP/1.1 503"), "answer: {text:?}");
    assert!(
        text.to_ascii_lowercase().contains("retry-after: 1\r\n"),
        "answer: {text:?}"
    );
    assert!(
        text.contains("body_timeout"),
        "answer names the key: {text:?}"
    );
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(10),
        "cut off after {elapsed:?}, expected about 1s"
    );
    let refused = ok(agent
        .metric("telespool_received_requests_total{signal=\"traces\",outcome=\"timeout\"}")
        .await);
    assert_eq!(refused, Some(1.0), "the timeout is counted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_grpc_body_is_cut_off_with_deadline_exceeded() {
    let upstream = Upstream::start().await;
    let agent = start_agent(&upstream, "[receiver]\nbody_timeout = \"1s\"\n").await;

    let stream = ok(TcpStream::connect(agent.grpc_addr()).await);
    let (mut sender, connection) =
        ok(hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await);
    tokio::spawn(connection);
    let (body_tx, body_rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
    let body = StreamBody::new(Box::pin(tokio_stream_from(body_rx)));
    let request = ok(::http::Request::post(format!(
        "http://{}{}",
        agent.grpc_addr(),
        Signal::Traces.grpc_path()
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .body(body));
    // A prefix announcing 100 bytes, then only 10 of them; the rest never comes.
    ok(body_tx
        .send(Ok(Frame::data(Bytes::from_static(&[0, 0, 0, 0, 100]))))
        .await);
    ok(body_tx
        .send(Ok(Frame::data(Bytes::from(vec![0u8; 10]))))
        .await);
    let started = Instant::now();
    let response = ok(tokio::time::timeout(DEADLINE, sender.send_request(request)).await);
    let response = ok(response);
    let elapsed = started.elapsed();
    let status = response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let status = match status {
        Some(status) => status,
        None => {
            let trailers = ok(tokio::time::timeout(DEADLINE, response.into_body().collect()).await);
            ok(trailers)
                .trailers()
                .and_then(|t| t.get("grpc-status"))
                .and_then(|v| v.to_str().ok())
                .unwrap_or("none")
                .to_owned()
        }
    };
    assert_eq!(status, "4", "DEADLINE_EXCEEDED");
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(10),
        "cut off after {elapsed:?}, expected about 1s"
    );
    drop(body_tx);
}

/// A `Stream` over an mpsc receiver (no tokio-stream dependency).
fn tokio_stream_from<T>(rx: tokio::sync::mpsc::Receiver<T>) -> impl futures::Stream<Item = T> {
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|v| (v, rx)) })
}

/// One client connection that sends its headers with `Expect: 100-continue`
/// and withholds the body: it is "served" once the agent asks for the body.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connection_limit_holds_under_a_burst_and_waiting_clients_are_served_when_one_closes() {
    let upstream = Upstream::start().await;
    let agent = start_agent(
        &upstream,
        "[receiver]\nmax_connections = 3\nbody_timeout = \"30s\"\n",
    )
    .await;
    let addr = agent.http_addr();
    let mut held = Vec::new();
    for _ in 0..10 {
        held.push(Held::open(ok(TcpStream::connect(addr).await), &addr.to_string()).await);
    }
    ok(eventually("3 connections served", DEADLINE, || async {
        (served(&held) >= 3).then_some(())
    })
    .await);
    // Give the agent every chance to serve more than its limit.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        served(&held),
        3,
        "at most max_connections are served at once"
    );

    // Closing the served connections lets the waiting ones in, 3 at a time.
    let (first, mut waiting): (Vec<Held>, Vec<Held>) = held.into_iter().partition(Held::served);
    for h in first {
        h.task.abort();
    }
    ok(eventually("3 more connections served", DEADLINE, || async {
        (served(&waiting) >= 3).then_some(())
    })
    .await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(served(&waiting), 3, "still at most max_connections");
    for h in waiting.drain(..) {
        h.task.abort();
    }
    // The gRPC listener has its own limit and serves meanwhile.
    let ids = fresh_ids(5);
    ok(Client::new(agent.grpc_addr())
        .export(Signal::Logs, &ids)
        .await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_connection_that_sends_nothing_is_closed_after_the_idle_timeout() {
    let upstream = Upstream::start().await;
    let agent = start_agent(&upstream, "[receiver]\nidle_timeout = \"500ms\"\n").await;
    for addr in [agent.grpc_addr(), agent.http_addr()] {
        let mut stream = ok(TcpStream::connect(addr).await);
        let started = Instant::now();
        let mut buf = Vec::new();
        let read = tokio::time::timeout(DEADLINE, stream.read_to_end(&mut buf)).await;
        assert!(read.is_ok(), "idle connection to {addr} not closed");
        assert!(
            started.elapsed() >= Duration::from_millis(400),
            "closed after {:?}, before the idle timeout",
            started.elapsed()
        );
    }
}

/// An HTTP/2 client that opens the connection and then never answers a
/// frame (a stopped process: its kernel still ACKs at the TCP level), with
/// keepalive PINGs off: the GOAWAY's PING is never acknowledged, yet the
/// connection is closed, so it cannot hold a connection permit for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_http2_client_that_never_answers_the_goaway_ping_is_still_disconnected() {
    let upstream = Upstream::start().await;
    let agent = start_agent(
        &upstream,
        "[receiver]\nidle_timeout = \"300ms\"\nkeepalive_interval = \"0s\"\n",
    )
    .await;
    let mut stream = ok(TcpStream::connect(agent.grpc_addr()).await);
    // The client preface, an empty SETTINGS frame and the acknowledgement of
    // the server's SETTINGS (written ahead: the agent sends its own at once);
    // nothing after.
    ok(stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await);
    ok(stream.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await);
    ok(stream.write_all(&[0, 0, 0, 4, 1, 0, 0, 0, 0]).await);
    let mut buf = Vec::new();
    let read = tokio::time::timeout(DEADLINE, stream.read_to_end(&mut buf)).await;
    assert!(
        read.is_ok(),
        "a client that never acknowledges the GOAWAY's PING kept its connection"
    );
    // The agent did go through the graceful steps: GOAWAY (type 7) and PING (6).
    let frame_types: Vec<u8> = frames(&buf).map(|(kind, _)| kind).collect();
    assert!(
        frame_types.contains(&7) && frame_types.contains(&6),
        "frames received: {frame_types:?}"
    );
}

/// (type, payload) of each whole HTTP/2 frame in `bytes`.
fn frames(mut bytes: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    std::iter::from_fn(move || {
        let len = u32::from_be_bytes([0, *bytes.first()?, *bytes.get(1)?, *bytes.get(2)?]) as usize;
        let kind = *bytes.get(3)?;
        let payload = bytes.get(9..9 + len)?;
        bytes = &bytes[9 + len..];
        Some((kind, payload))
    })
}
