//! Request compression on both receivers, through the real binary.
//!
//! - zstd from real clients: a tonic client with `send_compressed(Zstd)`, the
//!   OpenTelemetry SDK's gRPC and HTTP exporters with `Compression::Zstd`, and
//!   a hand-made `Content-Encoding: zstd` request; every id is counted at the
//!   in-process upstream.
//! - Decompression bombs, zstd (2 GiB of zeros) and gzip (512 MiB of zeros),
//!   each at least 500× `receiver.max_request_bytes` (1 MiB here) yet under
//!   it on the wire, refused on both receivers (gRPC `RESOURCE_EXHAUSTED`, HTTP
//!   413) while the agent keeps serving, and the agent's peak RSS (VmHWM)
//!   grows by no more than a few times the limit: the bombs are never
//!   expanded in memory.
// Tests and benches drive real processes and sockets: wall-clock time,
// not tokio's (clippy.toml keeps std's Instant out of the agent's code).
#![allow(clippy::disallowed_types)]

mod support;

use std::io::Read as _;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_otlp::{
    Compression, Protocol, WithExportConfig, WithHttpConfig, WithTonicConfig,
};
use opentelemetry_sdk::metrics::Temporality;
use support::client::Client;
use support::http::post;
use support::*;

const DEADLINE: Duration = Duration::from_secs(30);
const PROTOBUF: &str = "application/x-protobuf";
const LIMIT: u64 = 1 << 20;
const CONFIG: &str = "[receiver]\nmax_request_bytes = \"1MiB\"\n";
const RESOURCE_EXHAUSTED: &str = "8";

fn zstd(data: &[u8]) -> Vec<u8> {
    zstd::encode_all(data, 3).expect("zstd into memory")
}

/// `chunk` zeros compressed as a stream (no content size in the header, so
/// only a bounded decoder stops it), without holding the zeros in memory.
fn compressed_zeros(coding: &str, chunk: u64) -> Vec<u8> {
    let mut zeros = std::io::repeat(0).take(chunk);
    match coding {
        "zstd" => {
            let mut e = zstd::stream::write::Encoder::new(Vec::new(), 1).expect("zstd encoder");
            std::io::copy(&mut zeros, &mut e).expect("zstd into memory");
            e.finish().expect("zstd into memory")
        }
        _ => {
            // Level 9: deflate's best ratio on zeros is about 1000:1.
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
            std::io::copy(&mut zeros, &mut e).expect("gzip into memory");
            e.finish().expect("gzip into memory")
        }
    }
}

/// A body that expands to `len` zeros: frames (zstd) or members (gzip) of
/// `chunk` zeros each, concatenated, which is one valid body in either
/// format. Each chunk is far above the limit, so the decoder is stopped
/// inside the first one; repeating it keeps the test from spending minutes
/// compressing gigabytes.
fn bomb(coding: &str, len: u64, chunk: u64) -> Vec<u8> {
    compressed_zeros(coding, chunk).repeat((len / chunk) as usize)
}

/// The bombs, built once per test binary on a blocking thread.
async fn bombs() -> &'static [(&'static str, u64, Vec<u8>)] {
    static BOMBS: OnceLock<Vec<(&'static str, u64, Vec<u8>)>> = OnceLock::new();
    if let Some(b) = BOMBS.get() {
        return b;
    }
    let built = ok(tokio::task::spawn_blocking(|| {
        [
            ("zstd", 2u64 << 30, 64u64 << 20),
            ("gzip", 512 << 20, 16 << 20),
        ]
        .into_iter()
        .map(|(coding, len, chunk)| (coding, len, bomb(coding, len, chunk)))
        .collect::<Vec<_>>()
    })
    .await);
    BOMBS.get_or_init(|| built)
}

/// A `kB` field of /proc/<pid>/status, in bytes.
fn proc_status_bytes(pid: u32, key: &str) -> u64 {
    let status = ok(std::fs::read_to_string(format!("/proc/{pid}/status")));
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or_else(|| panic!("/proc/{pid}/status has no {key} line"))
}

/// One raw gRPC unary call whose message is `message` as given (flagged
/// compressed with `grpc-encoding: coding`); returns the `grpc-status` and
/// the `grpc-accept-encoding` of the answer.
async fn grpc_raw(
    addr: SocketAddr,
    path: &str,
    coding: &str,
    message: &[u8],
) -> (String, Option<String>) {
    let stream = ok(tokio::net::TcpStream::connect(addr).await);
    let (mut sender, connection) =
        ok(hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await);
    tokio::spawn(connection);
    let mut frame = Vec::with_capacity(message.len() + 5);
    frame.push(1);
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(message);
    let request = ok(::http::Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-encoding", coding)
        .body(Full::new(Bytes::from(frame))));
    let response = ok(ok(tokio::time::timeout(
        DEADLINE,
        sender.send_request(request),
    )
    .await));
    let header =
        |h: &::http::HeaderMap, k: &str| h.get(k).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let accept = header(response.headers(), "grpc-accept-encoding");
    if let Some(status) = header(response.headers(), "grpc-status") {
        return (status, accept);
    }
    let body = ok(ok(tokio::time::timeout(
        DEADLINE,
        response.into_body().collect(),
    )
    .await));
    let status = body
        .trailers()
        .and_then(|t| header(t, "grpc-status"))
        .unwrap_or_else(|| "none".into());
    (status, accept)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn zstd_requests_from_a_tonic_client_reach_upstream_with_every_id() {
    let upstream = Upstream::start().await;
    let agent = start_agent(&upstream, CONFIG).await;
    let client = Client::new(agent.grpc_addr()).zstd(true);
    for signal in Signal::ALL {
        let ids = fresh_ids(200);
        ok(client.export(signal, &ids).await);
        ok(upstream.wait_for_ids(signal, &id_set(&ids), DEADLINE).await);
        upstream.assert_received_exactly(signal, &id_set(&ids));
    }
    let (status, accept) = grpc_raw(agent.grpc_addr(), Signal::Logs.grpc_path(), "br", b"x").await;
    assert_eq!(status, "12", "an unknown grpc-encoding is UNIMPLEMENTED");
    assert_eq!(
        accept.as_deref(),
        Some("gzip,zstd"),
        "the answer advertises the encodings the receiver takes"
    );
}

/// Exports `ids` of `signal` through the SDK with zstd: over gRPC to
/// `grpc`, or over OTLP/HTTP protobuf to `http`.
async fn sdk_zstd(signal: Signal, ids: &[u64], grpc: SocketAddr, http: Option<SocketAddr>) {
    let timeout = Duration::from_secs(5);
    let result = match http {
        None => {
            let endpoint = format!("http://{grpc}");
            match signal {
                Signal::Traces => {
                    let e = opentelemetry_otlp::SpanExporter::builder()
                        .with_tonic()
                        .with_endpoint(endpoint)
                        .with_timeout(timeout)
                        .with_compression(Compression::Zstd)
                        .build();
                    sdk::export_spans(ok(e), ids).await
                }
                Signal::Metrics => {
                    let e = opentelemetry_otlp::MetricExporter::builder()
                        .with_tonic()
                        .with_endpoint(endpoint)
                        .with_timeout(timeout)
                        .with_temporality(Temporality::Delta)
                        .with_compression(Compression::Zstd)
                        .build();
                    sdk::export_metrics(ok(e), ids).await
                }
                Signal::Logs => {
                    let e = opentelemetry_otlp::LogExporter::builder()
                        .with_tonic()
                        .with_endpoint(endpoint)
                        .with_timeout(timeout)
                        .with_compression(Compression::Zstd)
                        .build();
                    sdk::export_logs(ok(e), ids).await
                }
            }
        }
        Some(addr) => {
            let url = format!("http://{addr}{}", signal.http_path());
            match signal {
                Signal::Traces => {
                    let e = opentelemetry_otlp::SpanExporter::builder()
                        .with_http()
                        .with_protocol(Protocol::HttpBinary)
                        .with_endpoint(url)
                        .with_timeout(timeout)
                        .with_compression(Compression::Zstd)
                        .build();
                    sdk::export_spans(ok(e), ids).await
                }
                Signal::Metrics => {
                    let e = opentelemetry_otlp::MetricExporter::builder()
                        .with_http()
                        .with_protocol(Protocol::HttpBinary)
                        .with_endpoint(url)
                        .with_timeout(timeout)
                        .with_temporality(Temporality::Delta)
                        .with_compression(Compression::Zstd)
                        .build();
                    sdk::export_metrics(ok(e), ids).await
                }
                Signal::Logs => {
                    let e = opentelemetry_otlp::LogExporter::builder()
                        .with_http()
                        .with_protocol(Protocol::HttpBinary)
                        .with_endpoint(url)
                        .with_timeout(timeout)
                        .with_compression(Compression::Zstd)
                        .build();
                    sdk::export_logs(ok(e), ids).await
                }
            }
        }
    };
    ok(result);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_sdk_exporting_zstd_over_grpc_and_http_delivers_every_id_of_every_signal() {
    let upstream = Upstream::start().await;
    let agent = start_agent(&upstream, CONFIG).await;
    for signal in Signal::ALL {
        let mut sent = Vec::new();
        for http in [None, Some(agent.http_addr())] {
            let ids = fresh_ids(100);
            sdk_zstd(signal, &ids, agent.grpc_addr(), http).await;
            sent.extend(ids);
        }
        ok(upstream
            .wait_for_ids(signal, &id_set(&sent), DEADLINE)
            .await);
        upstream.assert_received_exactly(signal, &id_set(&sent));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_zstd_http_body_is_accepted_and_a_corrupt_one_is_refused_with_400_naming_zstd() {
    let upstream = Upstream::start().await;
    let agent = start_agent(&upstream, CONFIG).await;
    let addr = agent.http_addr();
    for signal in Signal::ALL {
        let ids = fresh_ids(300);
        let body = zstd(&ExportRequest::build(signal, &ids).encode_to_bytes());
        let reply = ok(post(addr, signal.http_path(), PROTOBUF, Some("zstd"), &body).await);
        assert_eq!(reply.status, 200, "{}", reply.text());
        ok(upstream.wait_for_ids(signal, &id_set(&ids), DEADLINE).await);
    }
    let reply = ok(post(addr, "/v1/logs", PROTOBUF, Some("ZSTD"), b"not zstd at all").await);
    assert_eq!(reply.status, 400, "{}", reply.text());
    assert!(
        reply.text().contains("zstd body cannot be decompressed"),
        "{}",
        reply.text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bombs_are_refused_on_both_receivers_while_the_agent_keeps_serving_in_bounded_memory() {
    let upstream = Upstream::start().await;
    let agent = start_agent(&upstream, CONFIG).await;
    let bombs = bombs().await;
    // Warm up both receivers so the baseline includes their buffers.
    for signal in Signal::ALL {
        ok(send(agent.grpc_addr(), signal, &fresh_ids(10)).await);
        let body = ExportRequest::build(signal, &fresh_ids(10)).encode_to_bytes();
        let reply = ok(post(agent.http_addr(), signal.http_path(), PROTOBUF, None, &body).await);
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    let baseline = proc_status_bytes(agent.pid(), "VmHWM");

    let mut refused = 0;
    for (coding, expanded, bomb) in bombs {
        assert!(
            *expanded >= 100 * LIMIT && (bomb.len() as u64) < LIMIT,
            "{coding} bomb: {} bytes expanding to {expanded}",
            bomb.len()
        );
        for signal in Signal::ALL {
            let reply = ok(post(
                agent.http_addr(),
                signal.http_path(),
                PROTOBUF,
                Some(coding),
                bomb,
            )
            .await);
            assert_eq!(
                reply.status,
                413,
                "{coding} bomb over HTTP: {}",
                reply.text()
            );
            assert!(
                reply.text().contains("receiver.max_request_bytes"),
                "the answer names the limit: {}",
                reply.text()
            );
            let (status, _) = grpc_raw(agent.grpc_addr(), signal.grpc_path(), coding, bomb).await;
            assert_eq!(status, RESOURCE_EXHAUSTED, "{coding} bomb over gRPC");
            refused += 2;

            // The agent keeps serving: a normal request on each receiver right after.
            let ids = fresh_ids(50);
            ok(send(agent.grpc_addr(), signal, &ids).await);
            let more = fresh_ids(50);
            let body = ExportRequest::build(signal, &more).encode_to_bytes();
            let reply =
                ok(post(agent.http_addr(), signal.http_path(), PROTOBUF, None, &body).await);
            assert_eq!(reply.status, 200, "{}", reply.text());
            let expected = id_set(ids.iter().chain(&more));
            ok(upstream.wait_for_ids(signal, &expected, DEADLINE).await);
        }
    }

    let peak = proc_status_bytes(agent.pid(), "VmHWM");
    let bound = baseline + 8 * LIMIT + (16 << 20);
    assert!(
        peak <= bound,
        "peak RSS grew from {} KiB to {} KiB, above the bound of {} KiB \
         (baseline + 8 × receiver.max_request_bytes + 16 MiB)",
        baseline >> 10,
        peak >> 10,
        bound >> 10
    );
    eprintln!(
        "peak RSS {} KiB before the bombs, {} KiB after ({} bombs refused)",
        baseline >> 10,
        peak >> 10,
        refused
    );
    let mut counted = 0.0;
    for signal in Signal::ALL {
        let sample = format!(
            "telespool_received_requests_total{{signal=\"{signal}\",outcome=\"too_large\"}}"
        );
        counted += ok(agent.metric(&sample).await).unwrap_or(0.0);
    }
    assert_eq!(
        counted, refused as f64,
        "every bomb is counted as too large"
    );
}
