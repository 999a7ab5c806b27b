//! The admin API (`telespool.admin.v1.Admin`) of the real binary, read with
//! the tonic client generated from `proto/`: its totals against what the test
//! sent, what upstream received and what `/metrics` says; `Watch` under load
//! and across a SIGTERM; the bound on watchers.
// Tests and benches drive real processes and sockets: wall-clock time,
// not tokio's (clippy.toml keeps std's Instant out of the agent's code).
#![allow(clippy::disallowed_types)]

mod support;

use std::time::Duration;

use nix::sys::signal::Signal::SIGTERM;
use support::admin::{by_reason, get_status, totals, watch};
use support::*;
use telespool::admin::proto::{Phase, Status};
use telespool::metrics::{DropReason, Refusal};

const DEADLINE: Duration = Duration::from_secs(30);

/// A `/metrics` sample, 0 when the series does not exist yet.
async fn metric(agent: &AgentProcess, sample: &str) -> u64 {
    ok(agent.metric(sample).await).unwrap_or(0.0) as u64
}

/// Every counter of a snapshot, flattened, for "only grows" comparisons.
fn counters(s: &Status) -> Vec<(String, u64)> {
    let mut all = vec![("uptime_ms".to_owned(), s.uptime_ms)];
    if let Some(l) = &s.export_latency {
        all.push(("export_latency.count".into(), l.count));
    }
    for t in &s.signals {
        let n = &t.signal;
        all.push((format!("{n}.accepted"), t.accepted_items_total));
        all.push((format!("{n}.forwarded"), t.forwarded_items_total));
        all.push((format!("{n}.spooled"), t.spooled_items_total));
        all.push((format!("{n}.replayed"), t.replayed_items_total));
        for c in t
            .refused_requests_total
            .iter()
            .chain(&t.dropped_items_total)
        {
            all.push((format!("{n}.{}", c.reason), c.value));
        }
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn get_status_totals_under_load_equal_what_was_sent_and_what_metrics_says() {
    let upstream = Upstream::start().await;
    let agent = ok(AgentProcess::builder()
        .upstream(&upstream.endpoint())
        .config_toml("[batch]\ntimeout = \"10ms\"\n")
        .start()
        .await);
    let senders: Vec<Sender> = Signal::ALL
        .iter()
        .map(|s| {
            Sender::builder(agent.grpc_addr(), *s)
                .workers(2)
                .batch(50)
                .max_batches(60)
                .start()
        })
        .collect();
    // Read while the load runs: answers come, and accepted never goes down.
    let mut last = 0;
    for _ in 0..5 {
        let s = ok(get_status(&agent).await);
        let accepted: u64 = s.signals.iter().map(|t| t.accepted_items_total).sum();
        assert!(accepted >= last, "accepted went down: {last} -> {accepted}");
        last = accepted;
    }
    // An unmodified application's exporter too.
    let spans = ok(sdk::emit_spans(&agent.grpc_endpoint(), 120).await);
    let mut sent = [0u64; 3];
    for (signal, sender) in Signal::ALL.iter().zip(senders) {
        let report = sender.finish().await;
        assert!(report.given_up.is_empty(), "{signal}: {report:?}");
        sent[signal.index()] += report.acknowledged.len() as u64;
    }
    sent[Signal::Traces.index()] += spans.len() as u64;
    for signal in Signal::ALL {
        ok(upstream
            .wait_until("everything arrived", DEADLINE, |u| {
                u.unique_ids(signal).len() as u64 == sent[signal.index()]
            })
            .await);
    }
    let s = ok(eventually("nothing buffered", DEADLINE, || async {
        let s = ok(get_status(&agent).await);
        (s.buffer.as_ref().is_some_and(|b| b.items == 0)).then_some(s)
    })
    .await);

    assert!(s.ready);
    assert_eq!(s.phase, Phase::Serving as i32);
    assert_eq!(s.version, env!("CARGO_PKG_VERSION"));
    let up = s.upstream.as_ref().expect("upstream is configured");
    assert_eq!(up.endpoint, upstream.endpoint());
    assert!(up.up, "{up:?}");
    assert!(s.export_latency.as_ref().is_some_and(|l| l.count > 0));
    for signal in Signal::ALL {
        let t = totals(&s, signal);
        let label = format!("signal=\"{}\"", signal.as_str());
        assert_eq!(
            t.accepted_items_total,
            sent[signal.index()],
            "{signal} accepted = sent"
        );
        assert_eq!(
            t.forwarded_items_total,
            upstream.unique_ids(signal).len() as u64,
            "{signal} forwarded = what upstream received"
        );
        let pairs = [
            (
                t.accepted_items_total,
                format!("telespool_received_items_total{{{label},outcome=\"accepted\"}}"),
            ),
            (
                t.forwarded_items_total,
                format!("telespool_forwarded_items_total{{{label}}}"),
            ),
            (
                t.spooled_items_total,
                format!("telespool_spooled_items_total{{{label}}}"),
            ),
            (
                t.replayed_items_total,
                format!("telespool_replayed_items_total{{{label}}}"),
            ),
        ];
        for (api, sample) in pairs {
            assert_eq!(api, metric(&agent, &sample).await, "{sample}");
        }
        for r in Refusal::ALL {
            let sample = format!(
                "telespool_received_requests_total{{{label},outcome=\"{}\"}}",
                r.as_str()
            );
            let api = by_reason(&t.refused_requests_total, r.as_str());
            assert_eq!(api, metric(&agent, &sample).await, "{sample}");
        }
        for r in DropReason::ALL {
            let sample = format!(
                "telespool_dropped_items_total{{{label},reason=\"{}\"}}",
                r.as_str()
            );
            let api = by_reason(&t.dropped_items_total, r.as_str());
            assert_eq!(api, metric(&agent, &sample).await, "{sample}");
            assert_eq!(api, 0, "nothing dropped: {sample}");
        }
        assert_eq!(t.refused_requests_total.len(), Refusal::ALL.len());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watch_snapshots_only_grow_and_the_stream_ends_cleanly_at_sigterm() {
    let upstream = Upstream::start().await;
    let mut agent = ok(AgentProcess::builder()
        .upstream(&upstream.endpoint())
        .config_toml("[batch]\ntimeout = \"10ms\"\n")
        .start()
        .await);
    let sender = Sender::builder(agent.grpc_addr(), Signal::Logs)
        .batch(20)
        .pause(Duration::from_millis(20))
        .max_duration(Duration::from_secs(60))
        .start();
    // An interval below the cap is raised to 250 ms.
    let mut stream = ok(watch(&agent, Duration::from_millis(1)).await);
    let started = std::time::Instant::now();
    let mut seen: Vec<Status> = Vec::new();
    while seen.len() < 8 {
        let next = tokio::time::timeout(DEADLINE, stream.message()).await;
        let snapshot = ok(ok(next)).expect("the stream stays open while the agent runs");
        seen.push(snapshot);
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(7 * 250 - 50),
        "8 snapshots in {elapsed:?}: faster than one per 250 ms"
    );
    for pair in seen.windows(2) {
        for ((name, before), (_, after)) in counters(&pair[0]).iter().zip(counters(&pair[1])) {
            assert!(after >= *before, "{name} went down: {before} -> {after}");
        }
    }
    let logs = |s: &Status| totals(s, Signal::Logs).accepted_items_total;
    assert!(
        logs(&seen[7]) > logs(&seen[0]),
        "the load shows: {} -> {}",
        logs(&seen[0]),
        logs(&seen[7])
    );
    let report = sender.stop().await;

    agent.signal(SIGTERM);
    let mut last = None;
    let end = loop {
        match tokio::time::timeout(DEADLINE, stream.message()).await {
            Ok(Ok(Some(snapshot))) => last = Some(snapshot),
            Ok(Ok(None)) => break Ok(()),
            Ok(Err(status)) => break Err(status),
            Err(_) => panic!("the Watch stream did not end within {DEADLINE:?} of SIGTERM"),
        }
    };
    assert!(end.is_ok(), "the stream ends with OK, not {end:?}");
    let exit = agent.wait_exit(DEADLINE).await.expect("agent exits");
    assert!(exit.success(), "{exit}: {}", agent.stderr());
    if let Some(last) = last {
        // Snapshots still queued in the stream are never ahead of the end.
        assert!(logs(&last) <= report.acknowledged.len() as u64);
    }
    assert_eq!(
        agent.summary_field("received"),
        Some(report.acknowledged.len() as u64),
        "{}",
        agent.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watcher_beyond_the_limit_is_refused_naming_it_and_one_that_left_frees_its_place() {
    let agent = ok(AgentProcess::builder().start().await);
    let limit = telespool::admin::grpc::MAX_WATCHERS;
    let mut streams = Vec::new();
    for _ in 0..limit {
        streams.push(ok(watch(&agent, Duration::from_secs(1)).await));
    }
    let refused = watch(&agent, Duration::from_secs(1))
        .await
        .expect_err("one watcher too many");
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    assert!(
        refused
            .message()
            .contains(&format!("{limit} Watch streams")),
        "{}",
        refused.message()
    );
    // GetStatus still answers.
    ok(get_status(&agent).await);
    drop(streams.pop());
    ok(eventually("a freed watcher place", DEADLINE, || async {
        watch(&agent, Duration::from_secs(1)).await.ok()
    })
    .await);
}
