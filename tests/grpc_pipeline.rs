//! The core pipeline through the real binary: OTLP/gRPC in, batched OTLP/gRPC
//! out, backpressure, bad input, upstream failure classification.
// Tests and benches drive real processes and sockets: wall-clock time,
// not tokio's (clippy.toml keeps std's Instant out of the agent's code).
#![allow(clippy::disallowed_types)]

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use bytes::Bytes;
use support::client::{is_retryable, retry_delay, Client};
use support::*;
use tonic::Code;

const DEADLINE: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_item_sent_over_grpc_arrives_upstream_exactly_once_in_far_fewer_batches() {
    let upstream = Upstream::start().await;
    let agent = start_agent(&upstream, "[batch]\ntimeout = \"100ms\"\n").await;
    let client = Client::new(agent.grpc_addr());
    for signal in Signal::ALL {
        let mut sent = BTreeSet::new();
        for _ in 0..1000 {
            let ids = fresh_ids(3);
            ok(client.export(signal, &ids).await);
            sent.extend(ids);
        }
        ok(upstream.wait_for_ids(signal, &sent, DEADLINE).await);
        upstream.assert_received_exactly(signal, &sent);
        assert_eq!(
            upstream.last_header("grpc-encoding").as_deref(),
            Some("gzip"),
            "batches go upstream gzip-compressed by default"
        );
        let batches = upstream.requests(signal);
        assert!(
            batches <= 100,
            "1000 requests of {signal} should reach upstream in far fewer batches, got {batches}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gzip_and_empty_requests_are_accepted_and_upstream_compression_can_be_off() {
    let upstream = Upstream::start().await;
    let agent = start_agent(&upstream, "[upstream]\ncompression = \"none\"\n").await;
    let ids = fresh_ids(50);
    ok(support::client::send_gzip(agent.grpc_addr(), Signal::Logs, &ids).await);
    let empty = ok(send_raw(agent.grpc_addr(), Signal::Traces.grpc_path(), Bytes::new()).await);
    assert!(
        empty.is_empty(),
        "the empty ExportTraceServiceResponse encodes to no bytes"
    );
    ok(upstream
        .wait_for_ids(Signal::Logs, &id_set(&ids), DEADLINE)
        .await);
    upstream.assert_received_exactly(Signal::Logs, &id_set(&ids));
    assert_eq!(upstream.unique_ids(Signal::Traces).len(), 0);
    assert_eq!(
        upstream.last_header("grpc-encoding"),
        None,
        "compression = none"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sdk_traces_metrics_and_logs_arrive_exactly_once() {
    let upstream = Upstream::start().await;
    let agent = start_agent(&upstream, "").await;
    for signal in Signal::ALL {
        let ids = ok(support::sdk::emit(signal, &agent.grpc_endpoint(), 500).await);
        ok(upstream.wait_for_ids(signal, &id_set(&ids), DEADLINE).await);
        upstream.assert_received_exactly(signal, &id_set(&ids));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_buffer_refuses_with_retry_info_stays_bounded_and_loses_nothing() {
    let upstream = Upstream::start_with(Mode::Stall).await;
    let limit = 256 * 1024;
    let agent = start_agent(
        &upstream,
        &format!(
            "[receiver]\nmax_request_bytes = \"32KiB\"\n[buffer]\nmax_bytes = {limit}\nmax_wait = \"20ms\"\n\
             [batch]\nmax_bytes = \"32KiB\"\ntimeout = \"10ms\"\n[upstream.retry]\ninitial_backoff = \"50ms\"\nmax_backoff = \"200ms\"\n"
        ),
    )
    .await;
    let client = Client::new(agent.grpc_addr());
    let spec = ItemSpec {
        payload_bytes: 200,
        ..ItemSpec::default()
    };
    let mut acknowledged = BTreeSet::new();
    let mut refusal = None;
    for _ in 0..400 {
        let ids = fresh_ids(20);
        match client.export_with(Signal::Traces, &ids, &spec).await {
            Ok(_) => acknowledged.extend(ids),
            Err(status) => {
                refusal = Some(status);
                break;
            }
        }
        let buffered = ok(agent.metric("telespool_buffered_bytes").await).unwrap_or(0.0);
        assert!(
            buffered <= limit as f64,
            "buffered {buffered} bytes, above the {limit} limit"
        );
    }
    let refusal =
        refusal.expect("a stalled upstream and a 256KiB buffer must lead to backpressure");
    assert_eq!(refusal.code(), Code::Unavailable, "{refusal:?}");
    assert!(is_retryable(&refusal));
    let delay = retry_delay(&refusal).expect("the refusal carries RetryInfo");
    assert!(
        delay >= Duration::from_millis(250) && delay <= Duration::from_secs(30),
        "{delay:?}"
    );
    let buffered = ok(agent.metric("telespool_buffered_bytes").await).unwrap_or(0.0);
    assert!(buffered <= limit as f64);

    upstream.set_mode(Mode::Healthy);
    ok(upstream
        .wait_for_ids(Signal::Traces, &acknowledged, DEADLINE)
        .await);
    assert_ids_subset(
        "acknowledged ids upstream",
        &acknowledged,
        &upstream.unique_ids(Signal::Traces),
    );
    let refused = ok(agent
        .metric(
            "telespool_received_requests_total{signal=\"traces\",outcome=\"refused_buffer_full\"}",
        )
        .await);
    assert!(refused.unwrap_or(0.0) >= 1.0, "the refusal is counted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_and_oversized_requests_get_clear_statuses_and_do_not_disturb_other_data() {
    let upstream = Upstream::start().await;
    let agent = start_agent(&upstream, "[receiver]\nmax_request_bytes = \"64KiB\"\n").await;
    let addr = agent.grpc_addr();
    let good_before = fresh_ids(10);
    ok(send(addr, Signal::Metrics, &good_before).await);

    // Field 1 of ExportMetricsServiceRequest says 100 bytes follow; 2 do.
    let truncated = Bytes::from_static(&[0x0a, 100, 1, 2]);
    let status = send_raw(addr, Signal::Metrics.grpc_path(), truncated)
        .await
        .expect_err("a truncated message must be refused");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("byte"),
        "names the offset: {}",
        status.message()
    );
    assert!(!is_retryable(&status));

    let garbage = Bytes::from(vec![0xff; 64]);
    let status = send_raw(addr, Signal::Logs.grpc_path(), garbage)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    let big = ExportRequest::build_with(
        Signal::Traces,
        &fresh_ids(200),
        &ItemSpec {
            payload_bytes: 1024,
            ..ItemSpec::default()
        },
    )
    .encode_to_bytes();
    assert!(big.len() > 64 * 1024);
    let status = send_raw(addr, Signal::Traces.grpc_path(), big)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("65536"),
        "gives the limit: {}",
        status.message()
    );
    assert!(
        retry_delay(&status).is_none(),
        "too large is not retryable: no RetryInfo"
    );
    assert!(!is_retryable(&status));

    let good_after = fresh_ids(10);
    ok(send(addr, Signal::Metrics, &good_after).await);
    let all: BTreeSet<u64> = good_before.iter().chain(&good_after).copied().collect();
    ok(upstream.wait_for_ids(Signal::Metrics, &all, DEADLINE).await);
    upstream.assert_received_exactly(Signal::Metrics, &all);
    assert!(upstream.unique_ids(Signal::Traces).is_empty());
    assert!(upstream.unique_ids(Signal::Logs).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn non_retryable_upstream_reply_drops_only_that_batch() {
    let upstream = Upstream::start().await;
    let agent = start_agent(&upstream, "[batch]\ntimeout = \"10ms\"\n").await;
    let addr = agent.grpc_addr();
    let poison = fresh_ids(5);
    upstream.poison(poison[0]);
    ok(send(addr, Signal::Logs, &poison).await);
    ok(upstream
        .wait_until("the poison batch is refused", DEADLINE, |u| {
            u.refused(Signal::Logs) >= 1
        })
        .await);
    let rest = fresh_ids(200);
    for chunk in rest.chunks(20) {
        ok(send(addr, Signal::Logs, chunk).await);
    }
    ok(upstream
        .wait_for_ids(Signal::Logs, &id_set(&rest), DEADLINE)
        .await);
    upstream.assert_received_exactly(Signal::Logs, &id_set(&rest));
    assert_eq!(
        upstream.refused(Signal::Logs),
        1,
        "the rejected batch is not retried"
    );
    let dropped = ok(agent
        .metric("telespool_dropped_items_total{signal=\"logs\",reason=\"upstream_rejected\"}")
        .await);
    assert_eq!(dropped, Some(5.0));
}

/// One client's request that upstream cannot take (here a poisoned id; at
/// the Collector, say, a trace id of the wrong length, which the agent's
/// one-level walk does not check) shares its batch with other clients'
/// requests. The batch is cut in halves until only that request is refused:
/// every other id arrives, and only its items are dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_upstream_refuses_is_cut_out_of_its_batch_and_the_rest_is_delivered() {
    let upstream = Upstream::start().await;
    let agent = start_agent(&upstream, "[batch]\ntimeout = \"2s\"\n").await;
    let good: Vec<Vec<u64>> = (0..12).map(|_| fresh_ids(5)).collect();
    let bad = fresh_ids(5);
    upstream.poison(bad[2]);
    let mut requests = good.clone();
    requests.insert(7, bad.clone());
    ok(send_concurrently(agent.grpc_addr(), Signal::Logs, &requests).await);
    let expected = id_set(good.iter().flatten());
    ok(upstream
        .wait_for_ids(Signal::Logs, &expected, DEADLINE)
        .await);
    upstream.assert_received_exactly(Signal::Logs, &expected);
    let dropped = ok(agent
        .metric("telespool_dropped_items_total{signal=\"logs\",reason=\"upstream_rejected\"}")
        .await);
    assert_eq!(dropped, Some(bad.len() as f64), "only the refused request");
    // The whole batch, then the half holding the bad request at each level
    // (13 requests: four levels at most): a handful of refusals, not 13.
    let refused = upstream.refused(Signal::Logs);
    assert!(
        (2..=6).contains(&refused),
        "{refused} refused attempts: the batch was cut, and only around the bad request"
    );
}

/// An upstream that refuses every request with INVALID_ARGUMENT (say, one
/// that cannot read any of them): the cutting stops after its budget, so a
/// batch costs a bounded number of attempts, and every item is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upstream_refusing_everything_costs_a_bounded_number_of_attempts_per_batch() {
    let upstream = Upstream::start_with(Mode::Fail(Code::InvalidArgument)).await;
    let agent = start_agent(&upstream, "[batch]\ntimeout = \"2s\"\n").await;
    let requests: Vec<Vec<u64>> = (0..40).map(|_| fresh_ids(3)).collect();
    ok(send_concurrently(agent.grpc_addr(), Signal::Traces, &requests).await);
    let metric = "telespool_dropped_items_total{signal=\"traces\",reason=\"upstream_rejected\"}";
    let all = 40.0 * 3.0;
    let deadline = std::time::Instant::now() + DEADLINE;
    while ok(agent.metric(metric).await) != Some(all) {
        assert!(
            std::time::Instant::now() < deadline,
            "every item counted as dropped: {:?} of {all}",
            ok(agent.metric(metric).await)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let batches = ok(agent
        .metric("telespool_exported_batches_total{signal=\"traces\",result=\"rejected\"}")
        .await);
    let refused = upstream.refused(Signal::Traces);
    assert_eq!(batches, Some(refused as f64), "every attempt was refused");
    // One attempt, then at most 16 cuts of up to three parts each.
    assert!(
        (17..=49).contains(&refused),
        "{refused} attempts: cut up to the budget, then dropped whole"
    );
    assert!(upstream.unique_ids(Signal::Traces).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retryable_upstream_reply_is_retried_until_upstream_accepts() {
    let upstream = Upstream::start_with(Mode::Fail(Code::Unavailable)).await;
    let agent = start_agent(
        &upstream,
        "[batch]\ntimeout = \"10ms\"\n[upstream.retry]\ninitial_backoff = \"20ms\"\nmax_backoff = \"100ms\"\n",
    )
    .await;
    let ids = fresh_ids(100);
    ok(send(agent.grpc_addr(), Signal::Traces, &ids).await);
    ok(upstream
        .wait_until("a few refused attempts", DEADLINE, |u| {
            u.refused(Signal::Traces) >= 3
        })
        .await);
    upstream.set_mode(Mode::Healthy);
    ok(upstream
        .wait_for_ids(Signal::Traces, &id_set(&ids), DEADLINE)
        .await);
    upstream.assert_received_exactly(Signal::Traces, &id_set(&ids));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_an_upstream_the_agent_buffers_then_refuses_then_spools_everything_at_shutdown() {
    let mut agent = ok(AgentProcess::builder()
        .config_toml(
            "[receiver]\nmax_request_bytes = \"16KiB\"\n[buffer]\nmax_bytes = \"64KiB\"\nmax_wait = \"10ms\"\n\
             [shutdown]\nflush_budget = \"0s\"\ntimeout = \"5s\"\n",
        )
        .start()
        .await);
    assert!(
        agent.stderr().contains("no upstream.endpoint configured"),
        "warns"
    );
    let client = Client::new(agent.grpc_addr());
    let mut acknowledged = 0u64;
    let mut refusal = None;
    for _ in 0..500 {
        let ids = fresh_ids(20);
        match client.export(Signal::Traces, &ids).await {
            Ok(_) => acknowledged += ids.len() as u64,
            Err(status) => {
                refusal = Some(status);
                break;
            }
        }
    }
    let refusal = refusal.expect("a full buffer with nowhere to go refuses");
    assert_eq!(refusal.code(), Code::Unavailable);
    assert!(retry_delay(&refusal).is_some());
    agent.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(
        agent.wait_exit(DEADLINE).await.expect("exits").success(),
        "{}",
        agent.stderr()
    );
    assert_eq!(agent.summary_field("spooled"), Some(acknowledged));
}
