//! `shutdown.timeout` is a hard deadline: a spool that cannot be written
//! (another process holds SQLite's exclusive lock, so every write blocks) must
//! not hold the agent past it. The real binary, real signals, a real lock.
// Tests and benches drive real processes and sockets: wall-clock time,
// not tokio's (clippy.toml keeps std's Instant out of the agent's code).
#![allow(clippy::disallowed_types)]

mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal::SIGTERM;
use support::agent::log_field;
use support::client::Client;
use support::*;

const TIMEOUT: Duration = Duration::from_secs(3);
/// Slack over `shutdown.timeout` for process exit on a loaded machine.
const MARGIN: Duration = Duration::from_millis(2500);

/// A connection in this (another) process holding SQLite's exclusive lock on
/// the spool: the agent's writes wait for it (its busy timeout is 5 s, longer
/// than the shutdown deadline).
fn lock_spool(path: &Path) -> rusqlite::Connection {
    let db = ok(rusqlite::Connection::open(path));
    ok(db.execute_batch("BEGIN EXCLUSIVE"));
    db
}

/// (rows, items) in the spool, read after the lock is released.
fn spool_contents(path: &Path) -> (u64, u64) {
    let db = ok(rusqlite::Connection::open(path));
    ok(db.query_row(
        "SELECT count(*), coalesce(sum(items), 0) FROM batches",
        [],
        |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
    ))
}

fn config(durability: &str) -> String {
    format!(
        "durability = \"{durability}\"\n\
         [shutdown]\nflush_budget = \"1s\"\ntimeout = \"{}s\"\n",
        TIMEOUT.as_secs()
    )
}

/// An agent in `durability` mode whose upstream is down (its port closed).
async fn agent_with_upstream_down(durability: &str) -> AgentProcess {
    let upstream = Upstream::start().await;
    let endpoint = upstream.endpoint();
    upstream.stop().await;
    ok(AgentProcess::builder()
        .upstream(&endpoint)
        .config_toml(&config(durability))
        .start()
        .await)
}

/// SIGTERM, then the exit status (None: still running after a long wait)
/// and how long the exit took.
async fn sigterm_and_wait(agent: &mut AgentProcess) -> (Option<ExitStatus>, Duration) {
    let signalled = Instant::now();
    agent.signal(SIGTERM);
    let status = agent.wait_exit(TIMEOUT + Duration::from_secs(20)).await;
    (status, signalled.elapsed())
}

/// Exit status 1, within `shutdown.timeout` plus the margin.
#[track_caller]
fn assert_cut_exit(agent: &AgentProcess, status: Option<ExitStatus>, took: Duration) {
    let status = status.expect("agent exits");
    assert_eq!(status.code(), Some(1), "{}", agent.stderr());
    assert!(
        took < TIMEOUT + MARGIN,
        "exit within shutdown.timeout ({TIMEOUT:?}) plus {MARGIN:?}, took {took:?}\n{}",
        agent.stderr()
    );
}

#[track_caller]
fn assert_cut(agent: &AgentProcess, step: &str) {
    let line = agent.summary_line().unwrap_or_default();
    assert_eq!(
        log_field(&line, "cut_by_deadline"),
        Some(step),
        "summary should name the cut step: {line}\n{}",
        agent.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_with_upstream_down_and_the_spool_locked_exits_within_the_timeout_counting_what_was_not_spooled(
) {
    let mut agent = agent_with_upstream_down("memory").await;
    let client = Client::new(agent.grpc_addr());
    let mut sent = BTreeSet::new();
    for _ in 0..20 {
        let ids = fresh_ids(50);
        ok(client.export(Signal::Traces, &ids).await);
        sent.extend(ids);
    }
    let lock = lock_spool(agent.spool_path());

    let (status, took) = sigterm_and_wait(&mut agent).await;
    drop(lock);

    assert_cut_exit(&agent, status, took);
    assert_cut(&agent, "spool");
    // Nothing reached the spool, and everything acknowledged is counted.
    let (_, spooled_items) = spool_contents(agent.spool_path());
    let dropped = agent.summary_field("dropped_at_shutdown").unwrap_or(0);
    assert_eq!(
        spooled_items + dropped,
        sent.len() as u64,
        "{}",
        agent.stderr()
    );
    assert_eq!(agent.summary_field("received"), Some(sent.len() as u64));
    assert_eq!(agent.summary_field("dropped"), Some(dropped));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn durable_sigterm_with_the_spool_locked_refuses_the_uncommitted_request_and_exits_within_the_timeout(
) {
    let mut agent = agent_with_upstream_down("spool").await;
    let client = Client::new(agent.grpc_addr());
    let mut committed = BTreeSet::new();
    for _ in 0..5 {
        let ids = fresh_ids(20);
        ok(client.export(Signal::Logs, &ids).await);
        committed.extend(ids);
    }
    let lock = lock_spool(agent.spool_path());
    // One request that cannot be committed while the lock is held.
    let waiting = {
        let client = Client::new(agent.grpc_addr());
        tokio::spawn(async move { client.export(Signal::Logs, &fresh_ids(20)).await })
    };
    // It is waiting for its commit once its bytes are held in memory.
    let polled = Instant::now();
    loop {
        let held = agent.metric("telespool_buffered_bytes").await;
        if matches!(held, Ok(Some(b)) if b > 0.0) {
            break;
        }
        assert!(
            polled.elapsed() < Duration::from_secs(20),
            "request never waited for a commit: {held:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let (status, took) = sigterm_and_wait(&mut agent).await;
    let answer = ok(tokio::time::timeout(Duration::from_secs(10), waiting).await);
    drop(lock);

    assert_cut_exit(&agent, status, took);
    let refused = ok(answer).expect_err("the uncommitted request must not be acknowledged");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(agent
        .summary_line()
        .is_some_and(|l| l.contains("cut_by_deadline=")));
    // Every acknowledged request is a committed row.
    let (_, spooled_items) = spool_contents(agent.spool_path());
    assert_eq!(spooled_items, committed.len() as u64, "{}", agent.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_while_the_spiller_fills_a_nearly_full_spool_accounts_for_every_acknowledged_id() {
    let upstream = Upstream::start().await;
    upstream.stop().await;
    let mut agent = ok(AgentProcess::builder()
        .upstream(&upstream.endpoint())
        .config_toml(
            "[receiver]\nmax_request_bytes = \"1MiB\"\n[buffer]\nmax_bytes = \"2MiB\"\nmax_wait = \"20ms\"\n\
             [batch]\nmax_bytes = \"128KiB\"\ntimeout = \"20ms\"\n\
             [spool]\nmax_bytes = \"3MiB\"\n\
             [shutdown]\nflush_budget = \"500ms\"\ntimeout = \"10s\"\n",
        )
        .start()
        .await);
    let sender = Sender::builder(agent.grpc_addr(), Signal::Traces)
        .batch(50)
        .workers(4)
        .max_duration(Duration::from_secs(60))
        .max_attempts(1)
        .start();
    // The spiller is moving batches and the spool is more than half full.
    ok(
        eventually("spool half full", Duration::from_secs(60), || async {
            let bytes = agent.metric("telespool_spool_bytes").await.ok().flatten();
            bytes.filter(|b| *b > 1.5 * 1024.0 * 1024.0).map(|_| ())
        })
        .await,
    );
    agent.signal(SIGTERM);
    let status = agent.wait_exit(Duration::from_secs(30)).await;
    let report = sender.stop().await;
    let status = status.expect("agent exits");

    // The summary's accounting: everything accepted is spooled or dropped
    // (upstream was down throughout), and the file holds what was spooled.
    let received = agent.summary_field("received").expect("summary");
    let spooled = agent.summary_field("spooled").expect("summary");
    let dropped = agent.summary_field("dropped").expect("summary");
    assert_eq!(agent.summary_field("forwarded"), Some(0));
    assert_eq!(received, spooled + dropped, "{}", agent.stderr());
    let (_, in_file) = spool_contents(agent.spool_path());
    assert_eq!(in_file, spooled, "{}", agent.stderr());
    assert_eq!(status.success(), dropped == 0, "exit status {status:?}");
    let acknowledged = &report.acknowledged;
    assert!(acknowledged.len() as u64 <= received);

    // Replayed after a restart: every acknowledged id arrives but at most
    // the dropped (counted) ones.
    upstream.restart().await;
    ok(agent.restart().await);
    ok(
        eventually("spool drained", Duration::from_secs(60), || async {
            let rows = agent.metric("telespool_spool_rows").await.ok().flatten();
            (rows == Some(0.0)).then_some(())
        })
        .await,
    );
    let delivered = upstream.unique_ids(Signal::Traces);
    let missing = acknowledged.difference(&delivered).count() as u64;
    assert!(
        missing <= dropped,
        "{missing} acknowledged ids neither delivered nor counted (dropped {dropped})"
    );
    assert_eq!(delivered.len() as u64, in_file);
}
