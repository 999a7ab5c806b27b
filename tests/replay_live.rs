//! Replay under live load (issue 17, item 5): replay gives way to live
//! requests (`src/pipeline/pace.rs`), yet a spool backlog still replays
//! completely while live load continues, and shutdown still stops it at once.
// Tests and benches drive real processes and sockets: wall-clock time,
// not tokio's (clippy.toml keeps std's Instant out of the agent's code).
#![allow(clippy::disallowed_types)]

mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal as UnixSignal;
use support::*;
use tonic::Code;

const DEADLINE: Duration = Duration::from_secs(120);
/// Backlog: this many requests of `PER_REQUEST` spans.
const BACKLOG_REQUESTS: usize = 200;
const PER_REQUEST: usize = 500;

/// Writes a backlog of `BACKLOG_REQUESTS` requests into the spool at `spool`:
/// a durable-mode agent whose upstream fails acknowledges each request once
/// it is a spool row, then stops (SIGTERM). Returns the acknowledged ids.
async fn write_backlog(spool: &Path) -> BTreeSet<u64> {
    let down = Upstream::start_with(Mode::Fail(Code::Unavailable)).await;
    let mut writer = ok(AgentProcess::builder()
        .upstream(&down.endpoint())
        .spool(spool)
        .config_toml("durability = \"spool\"\n[shutdown]\nflush_budget = \"1s\"\n")
        .start()
        .await);
    let report = Sender::builder(writer.grpc_addr(), Signal::Traces)
        .batch(PER_REQUEST)
        .workers(4)
        .max_batches(BACKLOG_REQUESTS)
        .max_attempts(100)
        .max_duration(DEADLINE)
        .start()
        .finish()
        .await;
    assert_eq!(
        report.acknowledged.len(),
        BACKLOG_REQUESTS * PER_REQUEST,
        "every backlog request acknowledged"
    );
    writer.signal(UnixSignal::SIGTERM);
    let status = writer.wait_exit(DEADLINE).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "backlog writer exited cleanly: {status:?}\n{}",
        writer.stderr()
    );
    assert!(
        down.unique_ids(Signal::Traces).is_empty(),
        "nothing reached the failing upstream"
    );
    report.acknowledged
}

/// A memory-mode agent on `spool` with a healthy `upstream`.
async fn start_on(spool: &Path, upstream: &Upstream) -> AgentProcess {
    ok(AgentProcess::builder()
        .upstream(&upstream.endpoint())
        .spool(spool)
        .start()
        .await)
}

/// Live load: small requests from a few clients, as applications send them.
fn live_load(agent: &AgentProcess) -> Sender {
    Sender::builder(agent.grpc_addr(), Signal::Traces)
        .batch(50)
        .workers(4)
        .pause(Duration::from_millis(2))
        .max_attempts(100)
        .max_duration(DEADLINE)
        .start()
}

async fn spool_rows(agent: &AgentProcess) -> Option<f64> {
    agent.metric("telespool_spool_rows").await.ok().flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_spool_backlog_replays_completely_while_live_load_continues() {
    let dir = ok(tempfile::TempDir::new());
    let spool = dir.path().join("spool.db");
    let backlog = write_backlog(&spool).await;

    let upstream = Upstream::start().await;
    let mut agent = start_on(&spool, &upstream).await;
    let live = live_load(&agent);
    // The spool empties while the live load goes on: replay gives way to
    // live requests, it is not starved by them.
    let started = Instant::now();
    ok(eventually("the spool is empty", DEADLINE, || async {
        (spool_rows(&agent).await == Some(0.0)).then_some(())
    })
    .await);
    let live_during = live.acknowledged_count();
    eprintln!(
        "backlog of {} spans replayed in {:?} under live load ({live_during} live spans acknowledged meanwhile)",
        backlog.len(),
        started.elapsed()
    );
    assert!(
        live_during > 0,
        "live requests were acknowledged while replaying"
    );
    ok(live.wait_acknowledged(live_during + 500, DEADLINE).await);
    let live = live.stop().await;

    // Nothing lost: upstream holds exactly the backlog plus every
    // acknowledged live span.
    let expected: BTreeSet<u64> = backlog.union(&live.acknowledged).copied().collect();
    ok(upstream
        .wait_for_ids(Signal::Traces, &expected, DEADLINE)
        .await);
    assert_ids_eq("delivered", &upstream.unique_ids(Signal::Traces), &expected);

    agent.signal(UnixSignal::SIGTERM);
    let status = agent.wait_exit(DEADLINE).await;
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    assert_eq!(agent.summary_field("spool_rows_left"), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_during_replay_under_live_load_stops_at_once_and_keeps_the_rest_spooled() {
    let dir = ok(tempfile::TempDir::new());
    let spool = dir.path().join("spool.db");
    let backlog = write_backlog(&spool).await;

    // Upstream answers slowly, so replay is still under way at the signal.
    let upstream = Upstream::start_with(Mode::Delay(Duration::from_millis(300))).await;
    let mut agent = start_on(&spool, &upstream).await;
    let live = live_load(&agent);
    ok(live.wait_acknowledged(20, DEADLINE).await);
    ok(eventually("replay has begun", DEADLINE, || async {
        (!upstream.unique_ids(Signal::Traces).is_empty()).then_some(())
    })
    .await);
    agent.signal(UnixSignal::SIGTERM);
    let signalled = Instant::now();
    let status = agent.wait_exit(DEADLINE).await;
    let took = signalled.elapsed();
    let live = live.stop().await;
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}\n{}",
        agent.stderr()
    );
    // The default flush budget is 10 s: a paced replay worker must not hold
    // the sequence up beyond it (it stops taking rows at once).
    assert!(took < Duration::from_secs(15), "shutdown took {took:?}");
    let left = agent.summary_field("spool_rows_left").unwrap_or(0);
    assert!(left > 0, "replay was cut short: rows stay spooled");

    // What did not reach upstream is still in the spool: a second start on
    // it, with upstream fast again, delivers the rest.
    upstream.set_mode(Mode::Healthy);
    let mut again = start_on(&spool, &upstream).await;
    let expected: BTreeSet<u64> = backlog.union(&live.acknowledged).copied().collect();
    ok(upstream
        .wait_for_ids(Signal::Traces, &expected, DEADLINE)
        .await);
    assert_ids_eq("delivered", &upstream.unique_ids(Signal::Traces), &expected);
    again.signal(UnixSignal::SIGTERM);
    assert!(again.wait_exit(DEADLINE).await.is_some_and(|s| s.success()));
}
