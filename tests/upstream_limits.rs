//! No data lost to an upstream's size limit: a gRPC upstream (tonic,
//! `max_decoding_message_size` 1 MiB) and an OTLP/HTTP upstream answering 413
//! above 1 MiB, fed 160 KB requests and 3 MiB requests of several resource
//! entries, receive every id; only a resource entry larger than the limit on
//! its own is dropped, and counted. Spooled rows replay through the same path.
// Tests and benches drive real processes and sockets: wall-clock time,
// not tokio's (clippy.toml keeps std's Instant out of the agent's code).
#![allow(clippy::disallowed_types)]

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use nix::sys::signal::Signal::SIGTERM;
use support::http_upstream::{Answer, HttpUpstream};
use support::ids::ItemSpec;
use support::*;

const DEADLINE: Duration = Duration::from_secs(60);
const LIMIT: usize = 1 << 20;

/// The upstream under test, either protocol.
enum Limited {
    Grpc(Upstream),
    Http(HttpUpstream),
}

impl Limited {
    async fn grpc() -> Limited {
        Limited::Grpc(Upstream::start_with_limit(LIMIT).await)
    }

    async fn http() -> Limited {
        let upstream = HttpUpstream::start().await;
        upstream.limit(LIMIT);
        Limited::Http(upstream)
    }

    async fn agent(&self) -> AgentProcess {
        self.agent_with("").await
    }

    /// `upstream`: more lines of the `[upstream]` table.
    async fn agent_with(&self, upstream: &str) -> AgentProcess {
        let (endpoint, protocol) = match self {
            Limited::Grpc(u) => (u.endpoint(), "grpc"),
            Limited::Http(u) => (u.endpoint(), "http/protobuf"),
        };
        ok(AgentProcess::builder()
            .upstream(&endpoint)
            .config_toml(&format!(
                "[batch]\ntimeout = \"100ms\"\n[upstream]\nprotocol = \"{protocol}\"\n{upstream}"
            ))
            .start()
            .await)
    }

    async fn wait_for_ids(&self, signal: Signal, ids: &BTreeSet<u64>) -> Result<(), String> {
        match self {
            Limited::Grpc(u) => u.wait_for_ids(signal, ids, DEADLINE).await,
            Limited::Http(u) => u.wait_for_ids(signal, ids, DEADLINE).await,
        }
    }

    #[track_caller]
    fn assert_received_exactly(&self, signal: Signal, ids: &BTreeSet<u64>) {
        match self {
            Limited::Grpc(u) => u.assert_received_exactly(signal, ids),
            Limited::Http(u) => u.assert_received_exactly(signal, ids),
        }
    }
}

/// One request of `entries` resource entries, each holding `per_entry` fresh
/// ids with `payload` bytes of padding per item (concatenated requests).
fn request(signal: Signal, entries: usize, per_entry: usize, payload: usize) -> (Bytes, Vec<u64>) {
    let mut body = BytesMut::new();
    let mut ids = Vec::new();
    for _ in 0..entries {
        let chunk = fresh_ids(per_entry);
        let encoded = ExportRequest::build_with(signal, &chunk, &ItemSpec::with_payload(payload))
            .encode_to_bytes();
        body.extend_from_slice(&encoded);
        ids.extend(chunk);
    }
    (body.freeze(), ids)
}

/// 24 requests of about 160 KB and two of about 3 MiB in six resource entries.
async fn send_mixed(agent: &AgentProcess, signal: Signal) -> BTreeSet<u64> {
    let mut sent = BTreeSet::new();
    for i in 0..26 {
        let (body, ids) = match i {
            7 | 19 => request(signal, 6, 100, 5_400),
            _ => request(signal, 1, 40, 4_000),
        };
        if i == 7 {
            assert!(body.len() > 3 * LIMIT, "{} bytes", body.len());
        }
        ok(send_raw(agent.grpc_addr(), signal.grpc_path(), body).await);
        sent.extend(ids);
    }
    sent
}

async fn every_id_arrives(upstream: Limited) {
    every_id_arrives_with(upstream, "").await
}

async fn every_id_arrives_with(upstream: Limited, upstream_config: &str) {
    let agent = upstream.agent_with(upstream_config).await;
    for signal in [Signal::Traces, Signal::Logs] {
        let sent = send_mixed(&agent, signal).await;
        ok(upstream.wait_for_ids(signal, &sent).await);
        upstream.assert_received_exactly(signal, &sent);
    }
    let dropped = ok(agent
        .metric(r#"telespool_dropped_items_total{signal="traces",reason="upstream_too_large"}"#)
        .await);
    assert_eq!(dropped.unwrap_or(0.0), 0.0, "nothing is dropped");
    let limit = ok(agent.metric("telespool_upstream_max_request_bytes").await);
    assert!(
        limit.is_some_and(|l| l <= LIMIT as f64),
        "the working limit went down to upstream's: {limit:?}"
    );
    let line = ok(agent
        .wait_for_log(
            "sending it smaller requests from now on",
            Duration::from_secs(5),
        )
        .await);
    assert!(line.contains("limit="), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_grpc_upstream_with_a_1_mib_limit_receives_every_id_of_small_and_3_mib_requests() {
    every_id_arrives(Limited::grpc().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_http_upstream_answering_413_above_1_mib_receives_every_id_of_small_and_3_mib_requests()
{
    every_id_arrives(Limited::http().await).await;
}

// Uncompressed, a batch (or a part of one) goes out as its list of chunks,
// not one copied buffer: the split parts must still be exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn uncompressed_batches_sent_as_chunk_lists_are_split_for_a_grpc_upstream_without_losing_an_id(
) {
    every_id_arrives_with(Limited::grpc().await, "compression = \"none\"\n").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn uncompressed_batches_sent_as_chunk_lists_are_split_for_an_http_upstream_without_losing_an_id(
) {
    every_id_arrives_with(Limited::http().await, "compression = \"none\"\n").await;
}

async fn only_the_oversized_entry_is_dropped(upstream: Limited) {
    let agent = upstream.agent().await;
    let signal = Signal::Logs;
    let mut sent = BTreeSet::new();
    let (small, ids) = request(signal, 1, 40, 4_000);
    ok(send_raw(agent.grpc_addr(), signal.grpc_path(), small).await);
    sent.extend(ids);
    // Two entries: a normal one, and one of 1.5 MiB on its own.
    let (normal, normal_ids) = request(signal, 1, 40, 4_000);
    let (huge, huge_ids) = request(signal, 1, 330, 5_000);
    assert!(huge.len() > LIMIT + LIMIT / 2);
    ok(send_raw(
        agent.grpc_addr(),
        signal.grpc_path(),
        [normal, huge].concat().into(),
    )
    .await);
    sent.extend(normal_ids);
    let (after, ids) = request(signal, 1, 40, 4_000);
    ok(send_raw(agent.grpc_addr(), signal.grpc_path(), after).await);
    sent.extend(ids);

    ok(upstream.wait_for_ids(signal, &sent).await);
    let dropped =
        ok(
            eventually("the oversized entry is counted", DEADLINE, || async {
                agent
            .metric(r#"telespool_dropped_items_total{signal="logs",reason="upstream_too_large"}"#)
            .await
            .ok()
            .flatten()
            // The counter is exported at 0 before the drop is counted.
            .filter(|&n| n > 0.0)
            })
            .await,
        );
    assert_eq!(dropped, huge_ids.len() as f64);
    upstream.assert_received_exactly(signal, &sent);
    let line = ok(agent
        .wait_for_log("too large even on its own", Duration::from_secs(5))
        .await);
    assert!(
        line.contains("bytes="),
        "the log line gives its size: {line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_grpc_upstream_drops_and_counts_only_a_resource_entry_larger_than_its_limit() {
    only_the_oversized_entry_is_dropped(Limited::grpc().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_http_upstream_drops_and_counts_only_a_resource_entry_larger_than_its_limit() {
    only_the_oversized_entry_is_dropped(Limited::http().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn spooled_batches_above_the_limit_are_split_when_replayed() {
    let upstream = HttpUpstream::start().await;
    // Down while the agent runs: everything is spooled at SIGTERM.
    upstream.script((0..10_000).map(|_| Answer::unavailable_retry_after(30)));
    let mut agent = ok(AgentProcess::builder()
        .upstream(&upstream.endpoint())
        .config_toml(
            "[upstream]\nprotocol = \"http/protobuf\"\n\
             [shutdown]\nflush_budget = \"1s\"\ntimeout = \"5s\"\n",
        )
        .start()
        .await);
    let sent = send_mixed(&agent, Signal::Traces).await;
    agent.signal(SIGTERM);
    let status = agent.wait_exit(Duration::from_secs(15)).await;
    assert!(status.is_some_and(|s| s.success()), "{}", agent.stderr());
    assert_eq!(agent.summary_field("spooled"), Some(sent.len() as u64));

    upstream.clear_script();
    upstream.limit(LIMIT);
    ok(agent.restart().await);
    ok(upstream.wait_for_ids(Signal::Traces, &sent, DEADLINE).await);
    upstream.assert_received_exactly(Signal::Traces, &sent);
    ok(eventually("the spool is empty", DEADLINE, || async {
        let rows = agent.metric("telespool_spool_rows").await.ok().flatten()?;
        (rows == 0.0).then_some(())
    })
    .await);
    ok(agent
        .wait_for_log(
            "sending it smaller requests from now on",
            Duration::from_secs(5),
        )
        .await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_max_request_bytes_at_upstreams_limit_batches_are_sealed_below_it_and_never_refused() {
    let upstream = HttpUpstream::start().await;
    upstream.limit(LIMIT);
    let agent = ok(AgentProcess::builder()
        .upstream(&upstream.endpoint())
        .config_toml(
            "[batch]\ntimeout = \"200ms\"\n\
             [upstream]\nprotocol = \"http/protobuf\"\nmax_request_bytes = \"1MiB\"\n",
        )
        .start()
        .await);
    let sent = send_mixed(&agent, Signal::Metrics).await;
    ok(upstream
        .wait_for_ids(Signal::Metrics, &sent, DEADLINE)
        .await);
    upstream.assert_received_exactly(Signal::Metrics, &sent);
    let seen = upstream.seen();
    assert!(seen.iter().all(|s| s.status == 200 && s.bytes <= LIMIT));
    assert!(
        seen.len() >= 8,
        "about 11 MB in requests of at most 1 MiB: {}",
        seen.len()
    );
}
