//! Upstream protocols and compression through the real binary: OTLP/HTTP
//! (`upstream.protocol = "http/protobuf"`) with every signal and compression,
//! the answers the OTLP/HTTP specification defines (503 + Retry-After, 400 +
//! Status), per-signal URLs, TLS with HTTP/2, SIGHUP header reloads; gRPC
//! with zstd; and the config errors of a bad upstream.
// Tests and benches drive real processes and sockets: wall-clock time,
// not tokio's (clippy.toml keeps std's Instant out of the agent's code).
#![allow(clippy::disallowed_types)]

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use nix::sys::signal::Signal::SIGTERM;

use support::http_upstream::{Answer, HttpUpstream};
use support::*;

const DEADLINE: Duration = Duration::from_secs(30);

async fn agent_for(upstream: &HttpUpstream, extra: &str) -> AgentProcess {
    ok(AgentProcess::builder()
        .upstream(&upstream.endpoint())
        .config_toml(&format!(
            "[batch]\ntimeout = \"50ms\"\n[upstream]\nprotocol = \"http/protobuf\"\n{extra}"
        ))
        .start()
        .await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sdk_traces_metrics_and_logs_reach_an_http_upstream_exactly_once_with_each_compression() {
    for (compression, encoding) in [
        ("none", None),
        ("gzip", Some("gzip")),
        ("zstd", Some("zstd")),
    ] {
        let upstream = HttpUpstream::start().await;
        let agent = agent_for(&upstream, &format!("compression = \"{compression}\"\n")).await;
        for signal in Signal::ALL {
            let ids = ok(support::sdk::emit(signal, &agent.grpc_endpoint(), 300).await);
            let acknowledged = id_set(&ids);
            ok(upstream.wait_for_ids(signal, &acknowledged, DEADLINE).await);
            upstream.assert_received_exactly(signal, &acknowledged);
        }
        for seen in upstream.seen() {
            assert_eq!(seen.content_encoding.as_deref(), encoding, "{compression}");
            assert_eq!(seen.content_type.as_deref(), Some("application/x-protobuf"));
            assert_eq!(
                seen.path,
                seen.signal.http_path(),
                "base URL + /v1/<signal>"
            );
            assert_eq!(seen.status, 200);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_503_with_retry_after_2_then_200_loses_nothing_and_the_wait_is_honoured() {
    let upstream = HttpUpstream::start().await;
    upstream.script([Answer::unavailable_retry_after(2)]);
    // A short backoff, so only Retry-After can explain a 2 s wait.
    let agent = agent_for(
        &upstream,
        "[upstream.retry]\ninitial_backoff = \"100ms\"\nmax_backoff = \"10s\"\n",
    )
    .await;
    let ids = fresh_ids(200);
    ok(send(agent.grpc_addr(), Signal::Logs, &ids).await);
    ok(upstream
        .wait_for_ids(Signal::Logs, &id_set(&ids), DEADLINE)
        .await);
    upstream.assert_received_exactly(Signal::Logs, &id_set(&ids));
    let seen = upstream.seen();
    assert_eq!(
        seen.iter().map(|s| s.status).collect::<Vec<_>>(),
        vec![503, 200],
        "one refusal, then the retry"
    );
    let waited = seen[1].at - seen[0].at;
    assert!(
        waited >= Duration::from_millis(1900),
        "the retry came {waited:?} after a Retry-After of 2 s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_400_with_a_status_drops_that_batch_counts_it_logs_its_message_and_delivers_the_next() {
    let upstream = HttpUpstream::start().await;
    upstream.script([Answer::status_body(400, "span 17 is malformed")]);
    let agent = agent_for(&upstream, "").await;
    let first = fresh_ids(40);
    ok(send(agent.grpc_addr(), Signal::Traces, &first).await);
    ok(upstream
        .wait_until("the first batch is answered", DEADLINE, |u| {
            u.requests(Signal::Traces) >= 1
        })
        .await);
    let next: BTreeSet<u64> = id_set(&fresh_ids(60));
    for chunk in next.iter().copied().collect::<Vec<_>>().chunks(20) {
        ok(send(agent.grpc_addr(), Signal::Traces, chunk).await);
    }
    ok(upstream.wait_for_ids(Signal::Traces, &next, DEADLINE).await);
    upstream.assert_received_exactly(Signal::Traces, &next);
    let dropped = ok(agent
        .metric(r#"telespool_dropped_items_total{signal="traces",reason="upstream_rejected"}"#)
        .await);
    assert_eq!(dropped, Some(first.len() as f64));
    let line = ok(agent
        .wait_for_log("span 17 is malformed", Duration::from_secs(5))
        .await);
    assert!(
        line.contains("400"),
        "the log line names the status: {line}"
    );
}

/// The OTLP/HTTP side of the refused-request cut: upstream answers 400 to
/// any request holding one client's bad request; the others get through.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_400_for_one_clients_request_drops_only_that_request_from_the_batch() {
    let upstream = HttpUpstream::start().await;
    // One batch: the requests all arrive within the batch timeout.
    let agent = ok(AgentProcess::builder()
        .upstream(&upstream.endpoint())
        .config_toml("[batch]\ntimeout = \"2s\"\n[upstream]\nprotocol = \"http/protobuf\"\n")
        .start()
        .await);
    let good: Vec<Vec<u64>> = (0..12).map(|_| fresh_ids(4)).collect();
    let bad = fresh_ids(4);
    upstream.poison(bad[0]);
    let mut requests = good.clone();
    requests.insert(3, bad.clone());
    ok(send_concurrently(agent.grpc_addr(), Signal::Traces, &requests).await);
    let expected = id_set(good.iter().flatten());
    ok(upstream
        .wait_for_ids(Signal::Traces, &expected, DEADLINE)
        .await);
    upstream.assert_received_exactly(Signal::Traces, &expected);
    let dropped = ok(agent
        .metric(r#"telespool_dropped_items_total{signal="traces",reason="upstream_rejected"}"#)
        .await);
    assert_eq!(dropped, Some(bad.len() as f64), "only the refused request");
    let refusals = upstream.seen().iter().filter(|s| s.status == 400).count();
    assert!(
        (2..=6).contains(&refusals),
        "{refusals} answers of 400: the batch was cut, and only around the bad request"
    );
}

/// A spooled batch sent in parts that stops midway (here: shutdown while
/// the second part is refused with 503) stays whole in the spool, so the
/// part upstream took is sent again when it is replayed. The summary counts
/// those items as duplicates risked, and they are exactly the duplicates
/// upstream sees.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_spooled_batch_stopped_midway_through_its_parts_counts_the_parts_sent_again() {
    let upstream = HttpUpstream::start().await;
    let unavailable = || (0..10_000).map(|_| Answer::status_body(503, "not now"));
    upstream.script(unavailable());
    let mut agent = ok(AgentProcess::builder()
        .upstream(&upstream.endpoint())
        .config_toml(
            "[batch]\ntimeout = \"2s\"\n[upstream]\nprotocol = \"http/protobuf\"\n\
             [upstream.retry]\ninitial_backoff = \"2s\"\nmax_backoff = \"2s\"\n\
             [shutdown]\nflush_budget = \"100ms\"\n",
        )
        .start()
        .await);
    // One batch of ten requests, refused: shutdown spools it as one row.
    let requests: Vec<Vec<u64>> = (0..10).map(|_| fresh_ids(10)).collect();
    ok(send_concurrently(agent.grpc_addr(), Signal::Traces, &requests).await);
    ok(upstream
        .wait_until("the batch is refused", DEADLINE, |u| {
            u.requests(Signal::Traces) >= 1
        })
        .await);
    agent.signal(SIGTERM);
    assert!(agent.wait_exit(DEADLINE).await.expect("exits").success());
    assert_eq!(agent.summary_field("spooled"), Some(100));

    // Replayed: too large whole, so sent in parts; upstream takes the first
    // and refuses the rest until shutdown cuts the delivery off.
    let row_bytes = upstream.seen()[0].bytes;
    let refusals = |u: &HttpUpstream| u.seen().iter().filter(|s| s.status == 503).count();
    let refused_before = refusals(&upstream);
    upstream.clear_script();
    upstream.limit(row_bytes - 1);
    upstream.script(std::iter::once(Answer::status_body(200, "")).chain(unavailable()));
    ok(agent.restart().await);
    ok(upstream
        .wait_until(
            "the first part is taken and the next refused",
            DEADLINE,
            |u| refusals(u) > refused_before && !u.unique_ids(Signal::Traces).is_empty(),
        )
        .await);
    let taken = upstream.unique_ids(Signal::Traces).len() as u64;
    assert!(
        taken > 0 && taken < 100,
        "{taken} of 100 taken in the first part"
    );
    agent.signal(SIGTERM);
    assert!(agent.wait_exit(DEADLINE).await.expect("exits").success());
    let risked = agent.summary_field("duplicates_risked").expect("summary");
    assert!(
        risked >= taken,
        "the {taken} items taken will be sent again: {risked} duplicates risked counted"
    );

    // Replayed whole: the part taken before arrives a second time.
    upstream.clear_script();
    upstream.limit(usize::MAX);
    ok(agent.restart().await);
    let all = id_set(requests.iter().flatten());
    ok(upstream.wait_for_ids(Signal::Traces, &all, DEADLINE).await);
    assert_eq!(upstream.duplicates(Signal::Traces) as u64, taken);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn per_signal_urls_are_used_as_given_and_headers_are_sent() {
    let upstream = HttpUpstream::start().await;
    let base = upstream.endpoint();
    let agent = agent_for(
        &upstream,
        &format!(
            "traces_endpoint = \"{base}/intake/traces\"\n\
             logs_endpoint = \"{base}/custom/v1/logs\"\n\
             [upstream.headers]\nx-api-key = \"secret-1\"\n"
        ),
    )
    .await;
    for signal in Signal::ALL {
        let ids = fresh_ids(10);
        ok(send(agent.grpc_addr(), signal, &ids).await);
        ok(upstream.wait_for_ids(signal, &id_set(&ids), DEADLINE).await);
    }
    let path_of = |signal: Signal| {
        upstream
            .seen()
            .into_iter()
            .find(|s| s.signal == signal)
            .map(|s| s.path)
    };
    assert_eq!(path_of(Signal::Traces).as_deref(), Some("/intake/traces"));
    assert_eq!(path_of(Signal::Logs).as_deref(), Some("/custom/v1/logs"));
    assert_eq!(path_of(Signal::Metrics).as_deref(), Some("/v1/metrics"));
    for seen in upstream.seen() {
        assert_eq!(
            seen.headers.get("x-api-key").and_then(|v| v.to_str().ok()),
            Some("secret-1")
        );
    }
}

/// `telespool check-config` with `config` as the file: exit code and stderr.
fn check_config(config: &str) -> (Option<i32>, String) {
    let dir = ok(tempfile::tempdir());
    let path = dir.path().join("telespool.toml");
    ok(std::fs::write(&path, config));
    let out = ok(std::process::Command::new(env!("CARGO_BIN_EXE_telespool"))
        .arg("check-config")
        .arg("--config")
        .arg(&path)
        .env_remove("RUST_LOG")
        .output());
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_config_names_the_key_of_each_bad_upstream_setting() {
    let (code, stderr) = check_config(
        "[upstream]\nendpoint = \"http://gw:4318\"\nprotocol = \"http/protobuf\"\ncompression = \"zstd\"\n\
         traces_endpoint = \"https://gw:4318/v1/traces\"\nmax_request_bytes = \"1MiB\"\n",
    );
    assert_eq!(
        code,
        Some(0),
        "a good HTTP upstream config passes: {stderr}"
    );
    for (upstream, key) in [
        (
            "endpoint = \"grpc://gw:4317\"\nprotocol = \"http/protobuf\"",
            "upstream.endpoint",
        ),
        (
            "endpoint = \"http://gw:4318\"\nprotocol = \"http/protobuf\"\nlogs_endpoint = \"gw:4318/v1/logs\"",
            "upstream.logs_endpoint \"gw:4318/v1/logs\" has no scheme",
        ),
        ("endpoint = \"http://gw:4318\"\nprotocol = \"http/json\"", "protocol"),
        ("endpoint = \"http://gw:4318\"\ncompression = \"brotli\"", "compression"),
        (
            "endpoint = \"http://gw:4317\"\nmetrics_endpoint = \"http://gw:4318/v1/metrics\"",
            "upstream.metrics_endpoint",
        ),
        ("endpoint = \"http://gw:4317\"\nmax_request_bytes = 10", "upstream.max_request_bytes"),
    ] {
        let (code, stderr) = check_config(&format!("[upstream]\n{upstream}\n"));
        assert_eq!(code, Some(2), "{upstream}: {stderr}");
        assert!(stderr.contains(key), "{upstream}: the error names {key}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_https_upstream_with_a_custom_ca_gets_every_id_over_http2() {
    use support::tls::{toml_path, TestCa};
    let dir = ok(tempfile::tempdir());
    let ca = TestCa::new("HTTP upstream CA");
    let upstream = HttpUpstream::start_tls(&ca.server_cert()).await;
    let ca_file = dir.path().join("upstream-ca.pem");
    ok(std::fs::write(&ca_file, &ca.pem));
    let agent = agent_for(
        &upstream,
        &format!("[upstream.tls]\nca_file = {}\n", toml_path(&ca_file)),
    )
    .await;
    for signal in Signal::ALL {
        let ids = fresh_ids(50);
        ok(send(agent.grpc_addr(), signal, &ids).await);
        ok(upstream.wait_for_ids(signal, &id_set(&ids), DEADLINE).await);
        upstream.assert_received_exactly(signal, &id_set(&ids));
    }
    for seen in upstream.seen() {
        assert_eq!(seen.version, axum::http::Version::HTTP_2, "ALPN picked h2");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sighup_rereads_the_headers_file_of_an_http_upstream() {
    use support::tls::{toml_path, write_atomically};
    let dir = ok(tempfile::tempdir());
    let headers = dir.path().join("upstream-headers");
    write_atomically(&headers, "authorization: Bearer first-secret\n");
    let upstream = HttpUpstream::start().await;
    let agent = agent_for(
        &upstream,
        &format!("headers_file = {}\n", toml_path(&headers)),
    )
    .await;
    let last_auth = |u: &HttpUpstream| {
        u.seen().last().and_then(|s| {
            s.headers
                .get("authorization")?
                .to_str()
                .ok()
                .map(str::to_owned)
        })
    };
    let first = fresh_ids(5);
    ok(send(agent.grpc_addr(), Signal::Traces, &first).await);
    ok(upstream
        .wait_for_ids(Signal::Traces, &id_set(&first), DEADLINE)
        .await);
    assert_eq!(last_auth(&upstream).as_deref(), Some("Bearer first-secret"));

    write_atomically(&headers, "authorization: Bearer second-secret\n");
    agent.signal(nix::sys::signal::Signal::SIGHUP);
    ok(agent.wait_for_log("reloaded files", DEADLINE).await);
    let second = fresh_ids(5);
    ok(send(agent.grpc_addr(), Signal::Traces, &second).await);
    ok(upstream
        .wait_for_ids(Signal::Traces, &id_set(&second), DEADLINE)
        .await);
    assert_eq!(
        last_auth(&upstream).as_deref(),
        Some("Bearer second-secret")
    );
    assert!(
        !agent.stderr().contains("second-secret"),
        "an upstream secret appeared in the log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sdk_signals_reach_a_grpc_upstream_zstd_compressed() {
    let upstream = Upstream::start().await;
    let agent = start_agent(&upstream, "[upstream]\ncompression = \"zstd\"\n").await;
    for signal in Signal::ALL {
        let ids = ok(support::sdk::emit(signal, &agent.grpc_endpoint(), 300).await);
        ok(upstream.wait_for_ids(signal, &id_set(&ids), DEADLINE).await);
        upstream.assert_received_exactly(signal, &id_set(&ids));
        assert_eq!(
            upstream.last_header("grpc-encoding").as_deref(),
            Some("zstd")
        );
    }
}
