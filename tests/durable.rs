//! Durable acknowledgements: with `durability = "spool"` an OK means the data
//! is committed to the spool, so a SIGKILL loses nothing acknowledged.
// Tests and benches drive real processes and sockets: wall-clock time,
// not tokio's (clippy.toml keeps std's Instant out of the agent's code).
#![allow(clippy::disallowed_types)]

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use support::client::{retry_delay, Client};
use support::*;
use tonic::Code;

const DEADLINE: Duration = Duration::from_secs(30);

const DURABLE: &str = "durability = \"spool\"\n[upstream.retry]\ninitial_backoff = \"20ms\"\nmax_backoff = \"100ms\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_at_random_points_under_load_loses_nothing_acknowledged_in_durable_mode() {
    let upstream = Upstream::start().await;
    let mut agent = ok(AgentProcess::builder()
        .upstream(&upstream.endpoint())
        .config_toml(DURABLE)
        .start()
        .await);
    let sender = Sender::builder(agent.grpc_addr(), Signal::Traces)
        .batch(10)
        .workers(6)
        .max_attempts(1)
        .max_duration(Duration::from_secs(25))
        .start();
    // Kill points spread over the run, differing per round.
    for (round, pause_ms) in [170u64, 420, 90, 300].into_iter().enumerate() {
        let before = sender.acknowledged_count();
        ok(sender.wait_acknowledged(before + 50, DEADLINE).await);
        tokio::time::sleep(Duration::from_millis(pause_ms)).await;
        agent.kill();
        eprintln!(
            "round {round}: SIGKILL after {} acknowledged",
            sender.acknowledged_count()
        );
        ok(agent.restart_same_addrs().await);
    }
    let report = sender.stop().await;
    assert!(report.acknowledged.len() > 200);
    // Nothing half-written after four kills: SQLite's own check passes.
    let db = ok(rusqlite::Connection::open_with_flags(
        agent.spool_path(),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    ));
    let check: String = ok(db.query_row("PRAGMA integrity_check", [], |r| r.get(0)));
    assert_eq!(check, "ok");
    ok(upstream
        .wait_for_ids(Signal::Traces, &report.acknowledged, DEADLINE)
        .await);
    upstream.assert_received_all(Signal::Traces, &report.acknowledged);
    // At-least-once: a row whose upstream acknowledgement was in flight at the
    // kill (sent, or acknowledged but its delete not yet committed) is sent
    // again after restart. A row is claimed by one of the
    // `upstream.concurrency` (default 4) workers from before it is sent until
    // its delete commits, so each kill can repeat at most that many calls.
    let kills = 4;
    let largest_call = upstream
        .accepted_sizes(Signal::Traces)
        .into_iter()
        .max()
        .unwrap_or(0);
    let duplicates = upstream.duplicates(Signal::Traces);
    eprintln!(
        "acknowledged {}, duplicates upstream {duplicates} (bound {} = {kills} kills x 4 calls x {largest_call} ids)",
        report.acknowledged.len(),
        kills * 4 * largest_call,
    );
    assert!(
        duplicates <= kills * 4 * largest_call,
        "{duplicates} duplicates: more than the calls in flight at {kills} kills can explain"
    );
}

/// What durable mode is for: the same stalled-upstream kill in each mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sigkill_loses_what_memory_mode_buffered_and_nothing_in_durable_mode() {
    for (mode, config) in [("memory", ""), ("spool", DURABLE)] {
        let upstream = Upstream::start_with(Mode::Stall).await;
        let mut agent = ok(AgentProcess::builder()
            .upstream(&upstream.endpoint())
            .config_toml(config)
            .start()
            .await);
        let client = Client::new(agent.grpc_addr());
        let mut acknowledged = BTreeSet::new();
        for _ in 0..30 {
            let ids = fresh_ids(10);
            ok(client.export(Signal::Logs, &ids).await);
            acknowledged.extend(ids);
        }
        agent.kill();
        upstream.set_mode(Mode::Healthy);
        ok(agent.restart().await);
        let lost = match mode {
            "spool" => {
                ok(upstream
                    .wait_for_ids(Signal::Logs, &acknowledged, DEADLINE)
                    .await);
                0
            }
            _ => {
                // Give replay a real chance to find anything, then count.
                let ids = fresh_ids(1);
                ok(send(agent.grpc_addr(), Signal::Logs, &ids).await);
                ok(upstream
                    .wait_for_ids(Signal::Logs, &id_set(&ids), DEADLINE)
                    .await);
                acknowledged.len()
                    - upstream
                        .unique_ids(Signal::Logs)
                        .intersection(&acknowledged)
                        .count()
            }
        };
        eprintln!(
            "{mode} mode: acknowledged {}, lost to SIGKILL {lost}",
            acknowledged.len()
        );
        match mode {
            "spool" => assert_eq!(lost, 0),
            // Upstream held everything and nothing had reason to spill: all of
            // it was in memory only.
            _ => assert_eq!(lost, acknowledged.len()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn durable_mode_refuses_retryably_when_the_spool_is_full() {
    let upstream = Upstream::start_with(Mode::Stall).await;
    let agent = ok(AgentProcess::builder()
        .upstream(&upstream.endpoint())
        .config_toml(&format!("{DURABLE}[spool]\nmax_bytes = \"64KiB\"\n"))
        .start()
        .await);
    let client = Client::new(agent.grpc_addr());
    let spec = ItemSpec {
        payload_bytes: 400,
        ..ItemSpec::default()
    };
    let mut acknowledged = BTreeSet::new();
    let mut refusal = None;
    for _ in 0..500 {
        let ids = fresh_ids(10);
        match client.export_with(Signal::Metrics, &ids, &spec).await {
            Ok(_) => acknowledged.extend(ids),
            Err(status) => {
                refusal = Some(status);
                break;
            }
        }
    }
    let refusal = refusal.expect("a 64KiB spool fills");
    assert_eq!(refusal.code(), Code::Unavailable, "{refusal:?}");
    assert!(refusal.message().contains("spool is full"), "{refusal:?}");
    assert!(retry_delay(&refusal).is_some());
    upstream.set_mode(Mode::Healthy);
    ok(upstream
        .wait_for_ids(Signal::Metrics, &acknowledged, DEADLINE)
        .await);
    upstream.assert_received_all(Signal::Metrics, &acknowledged);
}

/// Durable mode's exporters never wait on a spool commit: with every spool
/// write blocked (another process holds SQLite's exclusive lock, so a new
/// request's commit stalls in the spool thread), rows already committed and
/// handed off from memory are all delivered, and the deletes of acknowledged
/// rows are left to the spool thread. Before claims moved into the spool
/// thread, an exporter waited for its delete (and its claim release for the
/// writer's commit), so delivery stopped at one row per exporter until the
/// 5 s busy timeout ran out.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exporters_deliver_handed_off_rows_while_a_durable_commit_is_stalled() {
    let upstream = Upstream::start().await;
    let mut agent = ok(AgentProcess::builder()
        .upstream(&upstream.endpoint())
        .config_toml(&format!("{DURABLE}[upstream]\nconcurrency = 2\n"))
        .start()
        .await);
    let client = Client::new(agent.grpc_addr());
    // Both exporters hold a row upstream does not answer yet; the other rows
    // wait in the hand-off queue.
    upstream.set_mode(Mode::Stall);
    let mut committed = BTreeSet::new();
    for _ in 0..10 {
        let ids = fresh_ids(10);
        ok(client.export(Signal::Traces, &ids).await);
        committed.extend(ids);
    }
    ok(upstream
        .wait_until("both exporters hold a call", DEADLINE, |u| u.stalled() == 2)
        .await);

    let lock = ok(rusqlite::Connection::open(agent.spool_path()));
    ok(lock.execute_batch("BEGIN EXCLUSIVE"));
    let stalled_ids = fresh_ids(10);
    let stalled = tokio::spawn({
        let client = client.clone();
        let ids = stalled_ids.clone();
        async move { client.export(Signal::Traces, &ids).await }
    });
    upstream.set_mode(Mode::Healthy);
    // Well inside the agent's 5 s busy timeout: the stalled commit is still
    // waiting for the lock when every handed-off row has been delivered.
    let delivered = upstream
        .wait_for_ids(Signal::Traces, &committed, Duration::from_secs(4))
        .await;
    let commit_still_stalled = !stalled.is_finished();
    ok(lock.execute_batch("COMMIT"));
    drop(lock);
    ok(delivered);
    assert!(
        commit_still_stalled,
        "the request sent after the lock was answered before the lock was released"
    );

    // The stalled request is committed once the lock is gone, then delivered;
    // every delete lands, so the spool ends empty.
    let answer = stalled.await.expect("request task");
    assert!(answer.is_ok(), "stalled commit: {answer:?}");
    committed.extend(stalled_ids);
    ok(upstream
        .wait_for_ids(Signal::Traces, &committed, DEADLINE)
        .await);
    agent.signal(nix::sys::signal::Signal::SIGTERM);
    let status = agent.wait_exit(DEADLINE).await.expect("agent exits");
    assert!(status.success(), "{}", agent.stderr());
    upstream.assert_received_exactly(Signal::Traces, &committed);
    assert_eq!(
        agent.summary_field("received"),
        Some(committed.len() as u64)
    );
    let db = ok(rusqlite::Connection::open(agent.spool_path()));
    let rows: i64 = ok(db.query_row("SELECT count(*) FROM batches", [], |r| r.get(0)));
    assert_eq!(rows, 0, "{}", agent.stderr());
}
