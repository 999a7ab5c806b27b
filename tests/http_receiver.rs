//! OTLP/HTTP receiver, end to end through the real binary: SDK exporters in
//! protobuf and JSON mode, hand-written OTLP/JSON documents, every error
//! status with a body naming the problem, CORS, backpressure and shutdown.
// Tests and benches drive real processes and sockets: wall-clock time,
// not tokio's (clippy.toml keeps std's Instant out of the agent's code).
#![allow(clippy::disallowed_types)]

mod support;

use std::collections::BTreeSet;
use std::io::Write as _;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal as UnixSignal;
use prost::Message as _;

use support::http::{emit_http, post, request, HeldRequest, HttpReply, HttpSdkOptions};
use support::{fresh_ids, id_set, AgentProcess, ExportRequest, ItemSpec, Signal, Upstream};

const PROTOBUF: &str = "application/x-protobuf";
const JSON: &str = "application/json";
const DEADLINE: Duration = Duration::from_secs(30);

async fn agent(upstream: Option<&Upstream>, config: &str) -> AgentProcess {
    let mut builder = AgentProcess::builder().config_toml(config);
    if let Some(upstream) = upstream {
        builder = builder.upstream(&upstream.endpoint());
    }
    builder.start().await.expect("agent starts")
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).expect("gzip into memory");
    encoder.finish().expect("gzip into memory")
}

fn ok<T>(result: Result<T, String>) -> T {
    result.unwrap_or_else(|e| panic!("{e}"))
}

/// The `google.rpc.Status` in an error answer: (code, message), decoded as
/// the answer's content type says.
#[track_caller]
fn rpc_status(reply: &HttpReply) -> (i32, String) {
    match reply.header("content-type") {
        Some(PROTOBUF) => {
            let status = tonic_types::Status::decode(reply.body.as_slice())
                .unwrap_or_else(|e| panic!("answer is not a protobuf google.rpc.Status: {e}"));
            (status.code, status.message)
        }
        Some(JSON) => {
            let value: serde_json::Value = serde_json::from_slice(&reply.body)
                .unwrap_or_else(|e| panic!("answer is not JSON: {e}: {}", reply.text()));
            let code = value["code"].as_i64().unwrap_or(-1) as i32;
            let message = value["message"].as_str().unwrap_or_default().to_owned();
            (code, message)
        }
        other => panic!("error answer with content type {other:?}: {}", reply.text()),
    }
}

/// Asserts the status, the body's encoding and that its message names the problem.
#[track_caller]
fn assert_refused(
    reply: &HttpReply,
    status: u16,
    content_type: &str,
    grpc_code: i32,
    needle: &str,
) {
    assert_eq!(reply.status, status, "answer: {reply:?} {}", reply.text());
    assert_eq!(
        reply.header("content-type"),
        Some(content_type),
        "{reply:?}"
    );
    let (code, message) = rpc_status(reply);
    assert_eq!(
        code, grpc_code,
        "google.rpc.Status code; message {message:?}"
    );
    assert!(
        message.contains(needle),
        "message {message:?} should contain {needle:?}"
    );
}

#[track_caller]
fn assert_ok(reply: &HttpReply, content_type: &str) {
    assert_eq!(reply.status, 200, "answer: {reply:?} {}", reply.text());
    assert_eq!(reply.header("content-type"), Some(content_type));
    let expected: &[u8] = if content_type == JSON { b"{}" } else { b"" };
    assert_eq!(reply.body, expected, "empty Export*ServiceResponse");
}

async fn wait_exactly(upstream: &Upstream, signal: Signal, expected: &BTreeSet<u64>) {
    ok(upstream.wait_for_ids(signal, expected, DEADLINE).await);
    upstream.assert_received_exactly(signal, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_http_exporters_in_protobuf_and_json_mode_deliver_every_id_exactly_once() {
    let upstream = Upstream::start().await;
    let agent = agent(Some(&upstream), "").await;
    let mut expected: [BTreeSet<u64>; 3] = Default::default();
    for json in [false, true] {
        for gzip in [false, true] {
            for signal in Signal::ALL {
                let ids = fresh_ids(150);
                let options = HttpSdkOptions { json, gzip };
                emit_http(signal, agent.http_addr(), &ids, options)
                    .await
                    .unwrap_or_else(|e| panic!("{signal} {options:?}: {e}"));
                expected[signal.index()].extend(ids);
            }
        }
    }
    for signal in Signal::ALL {
        wait_exactly(&upstream, signal, &expected[signal.index()]).await;
    }
}

#[tokio::test]
async fn hand_written_otlp_json_documents_deliver_every_item() {
    // The same documents the converter's unit tests compare, message for
    // message, with their protobuf twins; every item carries a test.id.
    let documents = [
        (
            Signal::Traces,
            include_str!("data/otlp_json/traces.json"),
            vec![7_000_000_001, 7_000_000_002],
        ),
        (
            Signal::Metrics,
            include_str!("data/otlp_json/metrics.json"),
            (7_100_000_001..=7_100_000_006).collect(),
        ),
        (
            Signal::Logs,
            include_str!("data/otlp_json/logs.json"),
            vec![7_200_000_001, 7_200_000_002],
        ),
    ];
    let upstream = Upstream::start().await;
    let agent = agent(Some(&upstream), "").await;
    for (signal, document, _) in &documents {
        // Traces gzip-compressed and with a charset parameter; the others plain.
        let reply = match signal {
            Signal::Traces => ok(post(
                agent.http_addr(),
                signal.http_path(),
                "application/json; charset=utf-8",
                Some("gzip"),
                &gzip(document.as_bytes()),
            )
            .await),
            _ => ok(post(
                agent.http_addr(),
                signal.http_path(),
                JSON,
                None,
                document.as_bytes(),
            )
            .await),
        };
        assert_ok(&reply, JSON);
    }
    for (signal, _, ids) in &documents {
        wait_exactly(&upstream, *signal, &id_set(ids)).await;
    }
}

#[tokio::test]
async fn protobuf_requests_pass_through_and_get_an_empty_protobuf_answer() {
    let upstream = Upstream::start().await;
    let agent = agent(Some(&upstream), "").await;
    for signal in Signal::ALL {
        let plain = fresh_ids(20);
        let body = ExportRequest::build(signal, &plain).encode_to_bytes();
        let reply = ok(post(agent.http_addr(), signal.http_path(), PROTOBUF, None, &body).await);
        assert_ok(&reply, PROTOBUF);

        let zipped = fresh_ids(20);
        let body = gzip(&ExportRequest::build(signal, &zipped).encode_to_bytes());
        let reply = ok(post(
            agent.http_addr(),
            signal.http_path(),
            PROTOBUF,
            Some("gzip"),
            &body,
        )
        .await);
        assert_ok(&reply, PROTOBUF);

        // An empty export request is valid and answered OK.
        let reply = ok(post(agent.http_addr(), signal.http_path(), PROTOBUF, None, b"").await);
        assert_ok(&reply, PROTOBUF);

        wait_exactly(&upstream, signal, &id_set(plain.iter().chain(&zipped))).await;
    }
}

#[tokio::test]
async fn each_error_status_has_a_body_naming_the_problem_and_is_counted() {
    let agent = agent(None, "[receiver]\nmax_request_bytes = \"64KiB\"\n").await;
    let addr = agent.http_addr();
    const INVALID_ARGUMENT: i32 = 3;
    const NOT_FOUND: i32 = 5;
    const RESOURCE_EXHAUSTED: i32 = 8;
    const UNIMPLEMENTED: i32 = 12;

    // 400, in the request's encoding: traces.
    let reply = ok(post(addr, "/v1/traces", PROTOBUF, None, &[0x0a, 0xff]).await);
    assert_refused(
        &reply,
        400,
        PROTOBUF,
        INVALID_ARGUMENT,
        "malformed traces request at byte 1",
    );
    let bad_id = br#"{"resourceSpans":[{"scopeSpans":[{"spans":[{"traceId":"xyz"}]}]}]}"#;
    let reply = ok(post(addr, "/v1/traces", JSON, None, bad_id).await);
    assert_refused(
        &reply,
        400,
        JSON,
        INVALID_ARGUMENT,
        "resourceSpans[0].scopeSpans[0].spans[0].traceId: 'x' is not a hex digit",
    );
    let reply = ok(post(
        addr,
        "/v1/traces",
        PROTOBUF,
        Some("gzip"),
        b"not gzip at all",
    )
    .await);
    assert_refused(
        &reply,
        400,
        PROTOBUF,
        INVALID_ARGUMENT,
        "gzip body cannot be decompressed",
    );

    // 400 for a JSON syntax error: logs.
    let reply = ok(post(addr, "/v1/logs", JSON, None, b"{\"resourceLogs\": [\n  {]").await);
    assert_refused(
        &reply,
        400,
        JSON,
        INVALID_ARGUMENT,
        "invalid JSON at line 2 column 4",
    );

    // 413: logs, over the limit on the wire and after decompression.
    let big = ExportRequest::build_with(
        Signal::Logs,
        &fresh_ids(1),
        &ItemSpec::with_payload(100_000),
    );
    let reply = ok(post(addr, "/v1/logs", PROTOBUF, None, &big.encode_to_bytes()).await);
    assert_refused(
        &reply,
        413,
        PROTOBUF,
        RESOURCE_EXHAUSTED,
        "limit of 65536 bytes",
    );
    let bomb = gzip(&vec![b' '; 1 << 20]);
    let reply = ok(post(addr, "/v1/logs", JSON, Some("gzip"), &bomb).await);
    assert_refused(
        &reply,
        413,
        JSON,
        RESOURCE_EXHAUSTED,
        "receiver.max_request_bytes",
    );

    // 415: metrics, unknown or missing content type (answered in JSON), unknown encoding.
    let reply = ok(post(addr, "/v1/metrics", "text/plain", None, b"hello").await);
    assert_refused(
        &reply,
        415,
        JSON,
        UNIMPLEMENTED,
        "unsupported content type \"text/plain\"",
    );
    let reply = ok(request(addr, "POST", "/v1/metrics", &[], b"").await);
    assert_refused(
        &reply,
        415,
        JSON,
        UNIMPLEMENTED,
        "application/x-protobuf or application/json",
    );
    let reply = ok(post(addr, "/v1/metrics", PROTOBUF, Some("br"), b"").await);
    assert_refused(
        &reply,
        415,
        PROTOBUF,
        UNIMPLEMENTED,
        "unsupported compression \"br\"",
    );

    // 405 with Allow, also for OPTIONS when CORS is off; 404 elsewhere.
    for method in ["GET", "PUT", "OPTIONS"] {
        let reply = ok(request(addr, method, "/v1/metrics", &[], b"").await);
        assert_refused(
            &reply,
            405,
            JSON,
            UNIMPLEMENTED,
            &format!("method {method} is not allowed"),
        );
        assert_eq!(reply.header("allow"), Some("POST"));
    }
    let reply = ok(post(addr, "/v1/profiles", PROTOBUF, None, b"").await);
    assert_refused(&reply, 404, JSON, NOT_FOUND, "no such path /v1/profiles");

    // Every refusal is in the metrics, including those before the ingest path.
    let expected = [
        ("traces", "invalid", 3.0),
        ("logs", "invalid", 1.0),
        ("logs", "too_large", 2.0),
        ("metrics", "invalid", 3.0),
    ];
    for (signal, outcome, count) in expected {
        let sample = format!(
            "telespool_received_requests_total{{signal=\"{signal}\",outcome=\"{outcome}\"}}"
        );
        let value = ok(agent.metric(&sample).await);
        assert_eq!(value, Some(count), "{sample}");
    }
}

#[tokio::test]
async fn cors_answers_preflights_and_marks_answers_for_allowed_origins() {
    let upstream = Upstream::start().await;
    let config = "[receiver.http.cors]\nallowed_origins = [\"https://app.example.com\"]\n";
    let agent = agent(Some(&upstream), config).await;
    let addr = agent.http_addr();
    let allowed = "https://app.example.com";

    let preflight = |origin: &'static str| async move {
        let headers = [
            ("Origin", origin),
            ("Access-Control-Request-Method", "POST"),
            ("Access-Control-Request-Headers", "content-type, x-tenant"),
        ];
        request(addr, "OPTIONS", "/v1/traces", &headers, b"").await
    };
    let reply = ok(preflight(allowed).await);
    assert_eq!(reply.status, 204, "{reply:?}");
    assert_eq!(reply.header("access-control-allow-origin"), Some(allowed));
    assert_eq!(reply.header("access-control-allow-methods"), Some("POST"));
    let headers = reply
        .header("access-control-allow-headers")
        .unwrap_or_default();
    for h in ["content-type", "content-encoding", "x-tenant"] {
        assert!(headers.contains(h), "allow-headers {headers:?} lacks {h}");
    }
    let reply = ok(preflight("https://evil.example.com").await);
    assert_refused(
        &reply,
        403,
        JSON,
        7,
        "https://evil.example.com is not in receiver.http.cors.allowed_origins",
    );
    assert_eq!(reply.header("access-control-allow-origin"), None);

    let ids = fresh_ids(5);
    let body = ExportRequest::build(Signal::Traces, &ids).encode_to_bytes();
    let headers = [("Content-Type", PROTOBUF), ("Origin", allowed)];
    let reply = ok(request(addr, "POST", "/v1/traces", &headers, &body).await);
    assert_ok(&reply, PROTOBUF);
    assert_eq!(reply.header("access-control-allow-origin"), Some(allowed));
    assert_eq!(
        reply.header("access-control-expose-headers"),
        Some("Retry-After")
    );
    // Another origin's request is still served (CORS only tells the browser
    // whether the page may read the answer), without the header.
    let more = fresh_ids(5);
    let body = ExportRequest::build(Signal::Traces, &more).encode_to_bytes();
    let headers = [
        ("Content-Type", PROTOBUF),
        ("Origin", "https://other.example.com"),
    ];
    let reply = ok(request(addr, "POST", "/v1/traces", &headers, &body).await);
    assert_ok(&reply, PROTOBUF);
    assert_eq!(reply.header("access-control-allow-origin"), None);

    wait_exactly(&upstream, Signal::Traces, &id_set(ids.iter().chain(&more))).await;
}

#[track_caller]
fn retry_after(reply: &HttpReply) -> u64 {
    let value = reply
        .header("retry-after")
        .unwrap_or_else(|| panic!("{} answer without Retry-After: {reply:?}", reply.status));
    let secs: u64 = value
        .parse()
        .unwrap_or_else(|e| panic!("Retry-After {value:?} is not whole seconds: {e}"));
    assert!(secs >= 1, "Retry-After {secs} would retry at once");
    secs
}

#[tokio::test]
async fn a_full_buffer_answers_429_with_retry_after() {
    // No upstream: nothing leaves the buffer, so it fills.
    let config = "[receiver]\nmax_request_bytes = \"16KiB\"\n\
                  [buffer]\nmax_bytes = \"64KiB\"\nmax_wait = \"10ms\"\n";
    let agent = agent(None, config).await;
    let addr = agent.http_addr();
    let mut accepted = 0;
    let mut refused = None;
    for _ in 0..100 {
        let body =
            ExportRequest::build_with(Signal::Logs, &fresh_ids(1), &ItemSpec::with_payload(8_000))
                .encode_to_bytes();
        let reply = ok(post(addr, "/v1/logs", PROTOBUF, None, &body).await);
        match reply.status {
            200 => accepted += 1,
            _ => {
                refused = Some(reply);
                break;
            }
        }
    }
    let reply = refused.unwrap_or_else(|| panic!("no refusal after {accepted} accepted requests"));
    assert!(
        accepted >= 4,
        "only {accepted} requests fit in a 64KiB buffer"
    );
    assert_refused(&reply, 429, PROTOBUF, 14, "buffer is full");
    retry_after(&reply);

    // A JSON request is refused the same way, its answer in JSON.
    let body =
        ExportRequest::build_with(Signal::Logs, &fresh_ids(1), &ItemSpec::with_payload(8_000))
            .to_json();
    let reply = ok(post(addr, "/v1/logs", JSON, None, body.as_bytes()).await);
    assert_refused(&reply, 429, JSON, 14, "buffer is full");
    retry_after(&reply);

    let sample =
        "telespool_received_requests_total{signal=\"logs\",outcome=\"refused_buffer_full\"}";
    assert_eq!(ok(agent.metric(sample).await), Some(2.0), "{sample}");
}

#[tokio::test]
async fn a_request_in_flight_when_shutdown_begins_gets_503_with_retry_after() {
    let upstream = Upstream::start().await;
    let mut agent = agent(
        Some(&upstream),
        "[shutdown]\nflush_budget = \"5s\"\ntimeout = \"10s\"\n",
    )
    .await;
    let addr = agent.http_addr();
    let body = ExportRequest::build(Signal::Traces, &fresh_ids(3)).encode_to_bytes();
    let headers = [("Content-Type", PROTOBUF), ("Expect", "100-continue")];
    let mut held = ok(HeldRequest::start(addr, "/v1/traces", &headers, &body, 4).await);
    // The request is in flight (not merely sent) when the signal arrives.
    ok(held.wait_continue().await);

    agent.signal(UnixSignal::SIGTERM);
    // The listener closes right after the receiver stops accepting: once a new
    // connection is refused, the held request can only be refused too.
    let started = Instant::now();
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        assert!(
            started.elapsed() < DEADLINE,
            "the OTLP/HTTP listener never closed after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let reply = ok(held.finish().await);
    assert_refused(&reply, 503, PROTOBUF, 14, "shutting down");
    assert_eq!(retry_after(&reply), 1);

    let status = agent
        .wait_exit(DEADLINE)
        .await
        .expect("agent exits after SIGTERM");
    assert!(status.success(), "agent exit status {status:?}");
    assert_eq!(
        upstream.unique_ids(Signal::Traces).len(),
        0,
        "the refused request was not forwarded"
    );
}
