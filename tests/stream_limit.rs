//! The HTTP/2 stream limit (`receiver.max_concurrent_streams`) under a burst,
//! through the real binary. The agent advertises the limit in its SETTINGS;
//! a client that respects it (hyper) queues the streams over the limit and
//! every request completes once the bodies in the agent finish; a client that
//! ignores it gets RST_STREAM(REFUSED_STREAM) for each stream over the limit,
//! which is safe to retry because the agent never saw the request.
// Tests and benches drive real processes and sockets: wall-clock time,
// not tokio's (clippy.toml keeps std's Instant out of the agent's code).
#![allow(clippy::disallowed_types)]

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

const DEADLINE: Duration = Duration::from_secs(20);
/// `receiver.max_concurrent_streams` in these tests.
const LIMIT: usize = 2;
/// Requests started at once on the one connection.
const BURST: usize = 6;

fn config() -> String {
    format!("[receiver]\nmax_concurrent_streams = {LIMIT}\nbody_timeout = \"30s\"\n")
}

/// One gRPC message frame (uncompressed) holding a traces request with `ids`.
fn grpc_frame(ids: &[u64]) -> Bytes {
    let message = ExportRequest::build(Signal::Traces, ids).encode_to_bytes();
    let mut frame = BytesMut::with_capacity(5 + message.len());
    frame.put_u8(0);
    frame.put_u32(message.len() as u32);
    frame.put_slice(&message);
    frame.freeze()
}

/// `grpc-status` from the headers (trailers-only answer) or the trailers.
async fn grpc_status(response: ::http::Response<hyper::body::Incoming>) -> Result<String, String> {
    if let Some(status) = response.headers().get("grpc-status") {
        return Ok(status.to_str().unwrap_or("?").to_owned());
    }
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    Ok(body
        .trailers()
        .and_then(|t| t.get("grpc-status"))
        .and_then(|v| v.to_str().ok())
        .unwrap_or("none")
        .to_owned())
}

/// Feeds a held request's body.
type BodyTx = mpsc::Sender<Result<Frame<Bytes>, std::io::Error>>;

/// A request whose body is the first half of its frame until `release`.
struct Held {
    ids: Vec<u64>,
    rest: Option<(BodyTx, Bytes)>,
    answer: tokio::task::JoinHandle<Result<String, String>>,
}

impl Held {
    /// Sends the rest of the body and ends it.
    async fn release(&mut self) {
        let (tx, rest) = self.rest.take().expect("released once");
        ok(tx.send(Ok(Frame::data(rest))).await);
    }

    fn answered(&self) -> bool {
        self.answer.is_finished()
    }
}

fn answered(held: &[Held]) -> Vec<usize> {
    (0..held.len()).filter(|&i| held[i].answered()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_over_the_stream_limit_wait_for_a_free_stream_and_all_complete() {
    let upstream = Upstream::start().await;
    let agent = start_agent(&upstream, &config()).await;
    let accepted = || async {
        let sample = "telespool_received_requests_total{signal=\"traces\",outcome=\"accepted\"}";
        ok(agent.metric(sample).await).unwrap_or(0.0) as usize
    };
    let uri = format!("http://{}{}", agent.grpc_addr(), Signal::Traces.grpc_path());
    let request = |body| {
        ok(::http::Request::post(&uri)
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(body))
    };

    let stream = ok(TcpStream::connect(agent.grpc_addr()).await);
    let (mut sender, connection) =
        ok(hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await);
    tokio::spawn(connection);
    // A first, complete request: once its answer is in, so is the agent's
    // SETTINGS frame (sent before any answer), with the stream limit.
    let warm_up = fresh_ids(10);
    let body = http_body_util::Either::Left(Full::new(grpc_frame(&warm_up)));
    let answer = ok(tokio::time::timeout(DEADLINE, sender.send_request(request(body))).await);
    assert_eq!(ok(grpc_status(ok(answer)).await), "0");

    // The burst: BURST requests on the one connection, in order, each body
    // held at half its frame. hyper opens LIMIT streams and queues the rest.
    let mut held = Vec::new();
    for _ in 0..BURST {
        let ids = fresh_ids(20);
        let mut frame = grpc_frame(&ids);
        let rest = frame.split_off(frame.len() / 2);
        let (tx, rx) = mpsc::channel(2);
        ok(tx.send(Ok(Frame::data(frame))).await);
        let body = StreamBody::new(Box::pin(futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|frame| (frame, rx))
        })));
        let response = sender.send_request(request(http_body_util::Either::Right(body)));
        let answer = tokio::spawn(async move {
            let response = tokio::time::timeout(DEADLINE, response)
                .await
                .map_err(|_| "no answer in time".to_owned())?
                .map_err(|e| e.to_string())?;
            grpc_status(response).await
        });
        held.push(Held {
            ids,
            rest: Some((tx, rest)),
            answer,
        });
    }

    // Finish the bodies of the queued requests first. Were they in the agent,
    // they would now complete; with LIMIT streams held by unfinished bodies
    // they cannot even start.
    for h in &mut held[LIMIT..] {
        h.release().await;
    }
    // Give the agent every chance to serve more than its limit.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(answered(&held), Vec::<usize>::new(), "nothing answered yet");
    assert_eq!(
        accepted().await,
        1,
        "only the warm-up request reached the agent"
    );

    // Finishing the first body frees one stream: the queued requests go
    // through it one after another, while the second still holds its own.
    held[0].release().await;
    let all_but_second: Vec<usize> = (0..BURST).filter(|&i| i != 1).collect();
    ok(eventually(
        "every request but the second answered",
        DEADLINE,
        || async { (answered(&held) == all_but_second).then_some(()) },
    )
    .await);
    assert!(
        !held[1].answered(),
        "the second request still holds its stream"
    );

    held[1].release().await;
    let mut sent = warm_up.clone();
    for h in held {
        let status = ok(ok(h.answer.await));
        assert_eq!(status, "0", "every request is accepted");
        sent.extend(h.ids);
    }
    let sent = id_set(&sent);
    assert_eq!(sent.len(), 10 + BURST * 20);
    ok(upstream.wait_for_ids(Signal::Traces, &sent, DEADLINE).await);
    upstream.assert_received_exactly(Signal::Traces, &sent);
    assert_eq!(accepted().await, 1 + BURST);
}

// ---- a client that ignores the limit: raw HTTP/2 frames ---------------------

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;
const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
const REFUSED_STREAM: u32 = 0x7;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// HPACK integer with an `n`-bit prefix (RFC 7541 §5.1).
fn hpack_int(out: &mut Vec<u8>, n: u32, flags: u8, value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(flags | value as u8);
        return;
    }
    out.push(flags | max as u8);
    let mut rest = value - max;
    while rest >= 128 {
        out.push((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    out.push(rest as u8);
}

/// HPACK string literal, no Huffman coding.
fn hpack_str(out: &mut Vec<u8>, s: &str) {
    hpack_int(out, 7, 0, s.len());
    out.extend_from_slice(s.as_bytes());
}

/// Request headers of a gRPC export call; static-table names, literal values
/// without indexing, so every block stands alone.
fn request_headers(authority: &str, path: &str) -> Vec<u8> {
    let mut out = vec![0x83, 0x86]; // :method POST, :scheme http
    for (index, value) in [(4, path), (1, authority), (31, "application/grpc")] {
        hpack_int(&mut out, 4, 0x00, index); // :path, :authority, content-type
        hpack_str(&mut out, value);
    }
    out.push(0x00);
    hpack_str(&mut out, "te");
    hpack_str(&mut out, "trailers");
    out
}

struct RawFrame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

async fn read_frame(stream: &mut TcpStream) -> Result<RawFrame, String> {
    let read = async {
        let mut head = [0u8; 9];
        stream.read_exact(&mut head).await?;
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0u8; len];
        stream.read_exact(&mut payload).await?;
        let id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        Ok::<_, std::io::Error>(RawFrame {
            kind: head[3],
            flags: head[4],
            stream: id,
            payload,
        })
    };
    tokio::time::timeout(DEADLINE, read)
        .await
        .map_err(|_| format!("no HTTP/2 frame from the agent within {DEADLINE:?}"))?
        .map_err(|e| format!("reading an HTTP/2 frame: {e}"))
}

/// What the agent sent on a raw connection, as far as these tests care.
#[derive(Default)]
struct Seen {
    max_concurrent_streams: Option<u32>,
    /// RST_STREAM error code per stream.
    resets: BTreeMap<u32, u32>,
    /// Streams the agent ended (END_STREAM on HEADERS or DATA).
    ended: Vec<u32>,
}

impl Seen {
    /// Reads frames until `done`; acknowledges the agent's SETTINGS.
    async fn until(
        &mut self,
        stream: &mut TcpStream,
        done: impl Fn(&Seen) -> bool,
    ) -> Result<(), String> {
        // Bounded: each read has a deadline, and a burst is a few dozen frames.
        for _ in 0..1000 {
            if done(self) {
                return Ok(());
            }
            let f = read_frame(stream).await?;
            match f.kind {
                SETTINGS if f.flags & ACK == 0 => {
                    for entry in f.payload.chunks_exact(6) {
                        let id = u16::from_be_bytes([entry[0], entry[1]]);
                        let value = u32::from_be_bytes([entry[2], entry[3], entry[4], entry[5]]);
                        if id == SETTINGS_MAX_CONCURRENT_STREAMS {
                            self.max_concurrent_streams = Some(value);
                        }
                    }
                    let ack = frame(SETTINGS, ACK, 0, &[]);
                    stream.write_all(&ack).await.map_err(|e| e.to_string())?;
                }
                RST_STREAM if f.payload.len() == 4 => {
                    let code = u32::from_be_bytes([
                        f.payload[0],
                        f.payload[1],
                        f.payload[2],
                        f.payload[3],
                    ]);
                    self.resets.insert(f.stream, code);
                }
                HEADERS | DATA if f.flags & END_STREAM != 0 => self.ended.push(f.stream),
                _ => {}
            }
        }
        Err("the agent kept sending frames".to_owned())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_ignores_the_stream_limit_gets_refused_stream_for_the_excess() {
    let upstream = Upstream::start().await;
    let agent = start_agent(&upstream, &config()).await;
    let authority = agent.grpc_addr().to_string();
    let headers = request_headers(&authority, Signal::Traces.grpc_path());
    let mut stream = ok(TcpStream::connect(agent.grpc_addr()).await);

    // Preface, empty SETTINGS, then BURST requests' headers at once, without
    // waiting for the agent's SETTINGS: streams 1, 3, 5, …
    let ids_of: Vec<u32> = (0..BURST as u32).map(|i| 2 * i + 1).collect();
    let mut burst = PREFACE.to_vec();
    burst.extend(frame(SETTINGS, 0, 0, &[]));
    for &id in &ids_of {
        burst.extend(frame(HEADERS, END_HEADERS, id, &headers));
    }
    ok(stream.write_all(&burst).await);

    let (open, over) = ids_of.split_at(LIMIT);
    let mut seen = Seen::default();
    ok(seen
        .until(&mut stream, |s| {
            s.max_concurrent_streams.is_some() && over.iter().all(|id| s.resets.contains_key(id))
        })
        .await);
    assert_eq!(
        seen.max_concurrent_streams,
        Some(LIMIT as u32),
        "advertised limit"
    );
    let refused: BTreeMap<u32, u32> = over.iter().map(|&id| (id, REFUSED_STREAM)).collect();
    assert_eq!(
        seen.resets, refused,
        "exactly the streams over the limit are refused"
    );

    // The streams within the limit are served once their bodies arrive.
    let mut sent = Vec::new();
    for &id in open {
        let ids = fresh_ids(15);
        ok(stream
            .write_all(&frame(DATA, END_STREAM, id, &grpc_frame(&ids)))
            .await);
        sent.extend(ids);
    }
    ok(seen
        .until(&mut stream, |s| open.iter().all(|id| s.ended.contains(id)))
        .await);
    // A refused stream is safe to retry: the agent never saw it. Retried one
    // at a time on new streams, each is served.
    let mut next_id = ids_of.last().copied().unwrap_or(1) + 2;
    for _ in over {
        let ids = fresh_ids(15);
        let mut retry = frame(HEADERS, END_HEADERS, next_id, &headers);
        retry.extend(frame(DATA, END_STREAM, next_id, &grpc_frame(&ids)));
        ok(stream.write_all(&retry).await);
        ok(seen
            .until(&mut stream, |s| s.ended.contains(&next_id))
            .await);
        sent.extend(ids);
        next_id += 2;
    }
    assert_eq!(seen.resets, refused, "no retry was refused");
    let sent = id_set(&sent);
    assert_eq!(sent.len(), BURST * 15);
    ok(upstream.wait_for_ids(Signal::Traces, &sent, DEADLINE).await);
    upstream.assert_received_exactly(Signal::Traces, &sent);
}
