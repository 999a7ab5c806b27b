//! Replay builds upstream requests from several spool rows, so a durable
//! backlog drains to a distant (slow) upstream as fast as memory mode's.
// Tests and benches drive real processes and sockets: wall-clock time,
// not tokio's (clippy.toml keeps std's Instant out of the agent's code).
#![allow(clippy::disallowed_types)]

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use support::*;
use tonic::Code;

const DEADLINE: Duration = Duration::from_secs(180);
const SPANS: usize = 200_000;
/// Spans per client request.
const PER_REQUEST: usize = 500;
/// How long the upstream takes to answer each export (a cross-region gateway).
const LATENCY: Duration = Duration::from_millis(400);

/// Builds a backlog of `SPANS` spans while upstream is failing, then lets
/// upstream answer (after `LATENCY` each) and returns how long the backlog
/// took to arrive, and how many export requests carried it.
async fn drain_time(top: &str) -> (Duration, usize) {
    let upstream = Upstream::start_with(Mode::Fail(Code::Unavailable)).await;
    let agent = start_agent(
        &upstream,
        &format!(
            "{top}[upstream.retry]\ninitial_backoff = \"1s\"\nmax_backoff = \"30s\"\n\
             [shutdown]\nflush_budget = \"1s\"\n"
        ),
    )
    .await;
    let sender = Sender::builder(agent.grpc_addr(), Signal::Traces)
        .batch(PER_REQUEST)
        .workers(4)
        .max_batches(SPANS / PER_REQUEST)
        .max_attempts(100)
        .max_duration(DEADLINE)
        .start();
    let report = sender.finish().await;
    assert_eq!(
        report.acknowledged.len(),
        SPANS,
        "every request acknowledged"
    );
    upstream.set_mode(Mode::Delay(LATENCY));
    let back = Instant::now();
    ok(upstream
        .wait_for_ids(Signal::Traces, &report.acknowledged, DEADLINE)
        .await);
    let took = back.elapsed();
    let delivered: BTreeSet<u64> = upstream.unique_ids(Signal::Traces);
    assert_ids_eq("delivered", &delivered, &report.acknowledged);
    let requests = upstream.accepted_sizes(Signal::Traces).len();
    (took, requests)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_durable_backlog_drains_to_a_slow_upstream_as_fast_as_memory_mode() {
    let (memory, memory_requests) = drain_time("").await;
    let (durable, durable_requests) = drain_time("durability = \"spool\"\n").await;
    eprintln!(
        "{SPANS} spans at {LATENCY:?} per export: memory mode {memory:?} in {memory_requests} requests, \
         durable mode {durable:?} in {durable_requests} requests ({:.2}x)",
        durable.as_secs_f64() / memory.as_secs_f64()
    );
    // Both modes batch up to batch.max_items (8192) per request, so both need
    // about SPANS / 8192 requests over upstream.concurrency (4) connections.
    // One row per request (the old replay) would need SPANS / PER_REQUEST =
    // 400 requests, 40 s at 4 x 400 ms. The bound is generous for a loaded
    // machine: 1.5x memory mode's time, plus two probe intervals of slack.
    assert!(
        durable <= memory.mul_f64(1.5) + Duration::from_secs(2),
        "durable {durable:?} vs memory {memory:?}"
    );
    assert!(
        durable_requests * 4 <= SPANS / PER_REQUEST,
        "replay put several rows in each request: {durable_requests} requests"
    );
}
