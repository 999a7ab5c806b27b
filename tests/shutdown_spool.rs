//! Shutdown, spool and replay through the real binary and real signals.
// Tests and benches drive real processes and sockets: wall-clock time,
// not tokio's (clippy.toml keeps std's Instant out of the agent's code).
#![allow(clippy::disallowed_types)]

mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal::SIGTERM;
use support::client::Client;
use support::*;
use tonic::Code;

const DEADLINE: Duration = Duration::from_secs(20);

/// (rows, items) in a spool file, read with SQLite directly.
fn spool_contents(path: &Path) -> (u64, u64) {
    let db = ok(rusqlite::Connection::open(path));
    ok(db.query_row(
        "SELECT count(*), coalesce(sum(items), 0) FROM batches",
        [],
        |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
    ))
}

fn integrity(path: &Path) -> String {
    let db = ok(rusqlite::Connection::open(path));
    ok(db.query_row("PRAGMA integrity_check", [], |r| r.get::<_, String>(0)))
}

async fn send_all(
    addr: std::net::SocketAddr,
    signal: Signal,
    n: usize,
    per_request: usize,
) -> BTreeSet<u64> {
    let client = Client::new(addr);
    let mut sent = BTreeSet::new();
    for _ in 0..n {
        let ids = fresh_ids(per_request);
        ok(client.export(signal, &ids).await);
        sent.extend(ids);
    }
    sent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_under_steady_load_delivers_every_acknowledged_id_exactly_once_and_exits_zero() {
    let upstream = Upstream::start().await;
    let mut agent = ok(AgentProcess::builder()
        .upstream(&upstream.endpoint())
        .config_toml("[shutdown]\nflush_budget = \"5s\"\ntimeout = \"10s\"\n")
        .start()
        .await);
    let sender = Sender::builder(agent.grpc_addr(), Signal::Traces)
        .batch(10)
        .workers(4)
        .max_duration(Duration::from_secs(10))
        .max_attempts(1)
        .start();
    ok(sender.wait_acknowledged(2000, DEADLINE).await);
    let signalled = Instant::now();
    agent.signal(SIGTERM);
    let status = agent
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("agent exits");
    let took = signalled.elapsed();
    let report = sender.stop().await;
    assert!(
        status.success(),
        "exit status {status:?}\n{}",
        agent.stderr()
    );
    assert!(
        took < Duration::from_secs(5),
        "exit within the flush budget, took {took:?}"
    );
    upstream.assert_received_exactly(Signal::Traces, &report.acknowledged);
    assert_eq!(agent.summary_field("spooled"), Some(0));
    assert_eq!(agent.summary_field("spool_rows_left"), Some(0));
    assert_eq!(spool_contents(agent.spool_path()), (0, 0));
    assert_eq!(
        agent.summary_field("received"),
        Some(report.acknowledged.len() as u64),
        "the agent counted exactly what it acknowledged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_with_upstream_down_spools_exactly_the_acknowledged_items_and_replays_them_on_restart(
) {
    let upstream = Upstream::start().await;
    upstream.stop().await;
    let mut agent = ok(AgentProcess::builder()
        .upstream(&upstream.endpoint())
        .config_toml(
            "[shutdown]\nflush_budget = \"1s\"\ntimeout = \"5s\"\n\
             [upstream.retry]\ninitial_backoff = \"50ms\"\nmax_backoff = \"200ms\"\n",
        )
        .start()
        .await);
    let mut sent = BTreeSet::new();
    for signal in Signal::ALL {
        sent.extend(send_all(agent.grpc_addr(), signal, 50, 7).await);
    }
    let signalled = Instant::now();
    agent.signal(SIGTERM);
    let status = agent
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("agent exits");
    let took = signalled.elapsed();
    assert!(status.success(), "{status:?}\n{}", agent.stderr());
    assert!(
        took < Duration::from_secs(3),
        "exit within flush_budget plus a margin, took {took:?}"
    );
    let (rows, items) = spool_contents(agent.spool_path());
    assert_eq!(
        items,
        sent.len() as u64,
        "the spool holds exactly the acknowledged items"
    );
    assert!(rows > 0);
    assert_eq!(agent.summary_field("spooled"), Some(sent.len() as u64));
    let risked = agent.summary_field("duplicates_risked").unwrap_or(0);

    upstream.restart().await;
    ok(agent.restart().await);
    let all_received = || {
        Signal::ALL
            .iter()
            .flat_map(|s| upstream.unique_ids(*s))
            .collect::<BTreeSet<u64>>()
    };
    ok(
        eventually("every acknowledged id replayed", DEADLINE, || async {
            (all_received() == sent).then_some(())
        })
        .await,
    );
    let duplicates: usize = Signal::ALL.iter().map(|s| upstream.duplicates(*s)).sum();
    assert!(
        duplicates as u64 <= risked,
        "duplicates ({duplicates}) only for exports in flight at the deadline ({risked})"
    );
    ok(eventually("spool emptied", DEADLINE, || async {
        (spool_contents(agent.spool_path()) == (0, 0)).then_some(())
    })
    .await);
    agent.signal(SIGTERM);
    let status = agent
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("exits");
    assert!(status.success(), "{}", agent.stderr());
    assert_eq!(agent.summary_field("spool_rows_left"), Some(0));
    assert_eq!(agent.summary_field("replayed"), Some(sent.len() as u64));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn second_sigterm_skips_the_flush_and_still_spools_everything() {
    let upstream = Upstream::start_with(Mode::Stall).await;
    let mut agent = ok(AgentProcess::builder()
        .upstream(&upstream.endpoint())
        .config_toml(
            "[shutdown]\nflush_budget = \"60s\"\ntimeout = \"90s\"\n[batch]\ntimeout = \"10ms\"\n",
        )
        .start()
        .await);
    let sent = send_all(agent.grpc_addr(), Signal::Logs, 40, 5).await;
    ok(upstream
        .wait_until("an export is stalled upstream", DEADLINE, |u| {
            u.stalled() >= 1
        })
        .await);
    let signalled = Instant::now();
    agent.signal(SIGTERM);
    ok(agent
        .wait_for_log("shutdown phase done phase=\"drain_requests\"", DEADLINE)
        .await);
    agent.signal(SIGTERM);
    let status = agent
        .wait_exit(Duration::from_secs(20))
        .await
        .expect("exits");
    let took = signalled.elapsed();
    assert!(status.success(), "{status:?}\n{}", agent.stderr());
    assert!(
        took < Duration::from_secs(10),
        "the second signal skipped the 60s flush; took {took:?}"
    );
    assert_eq!(spool_contents(agent.spool_path()).1, sent.len() as u64);
    let risked = agent.summary_field("duplicates_risked").unwrap_or(0);
    assert!(risked > 0, "the stalled export was in flight when cut");

    // The stalled call was cut: upstream recorded nothing. Everything replays.
    upstream.set_mode(Mode::Healthy);
    ok(agent.restart().await);
    ok(upstream.wait_for_ids(Signal::Logs, &sent, DEADLINE).await);
    upstream.assert_received_all(Signal::Logs, &sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_after_the_signal_are_refused_and_the_sdk_retry_delivers_them_to_the_restarted_agent(
) {
    let upstream = Upstream::start_with(Mode::Stall).await;
    let mut agent = ok(AgentProcess::builder()
        .upstream(&upstream.endpoint())
        .config_toml(
            "[shutdown]\nflush_budget = \"300ms\"\ntimeout = \"5s\"\n[batch]\ntimeout = \"10ms\"\n",
        )
        .start()
        .await);
    let before = send_all(agent.grpc_addr(), Signal::Traces, 5, 4).await;
    ok(upstream
        .wait_until("an export is stalled upstream", DEADLINE, |u| {
            u.stalled() >= 1
        })
        .await);
    agent.signal(SIGTERM);
    ok(agent.wait_for_log("shutdown started", DEADLINE).await);
    // A plain client during shutdown: refused with UNAVAILABLE (retryable).
    let refused = Client::new(agent.grpc_addr())
        .export(Signal::Traces, &fresh_ids(3))
        .await
        .expect_err("new requests are refused after the signal");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");

    // The SDK exports during shutdown; its own retries reach the new agent.
    let endpoint = agent.grpc_endpoint();
    let sdk = tokio::spawn(async move { support::sdk::emit(Signal::Traces, &endpoint, 200).await });
    let status = agent
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("exits");
    assert!(status.success(), "{}", agent.stderr());
    upstream.set_mode(Mode::Healthy);
    ok(agent.restart_same_addrs().await);
    let sdk_ids = ok(ok(sdk.await));
    let mut want = id_set(&sdk_ids);
    want.extend(before);
    ok(upstream.wait_for_ids(Signal::Traces, &want, DEADLINE).await);
    upstream.assert_received_all(Signal::Traces, &want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn corrupt_spool_file_is_quarantined_and_the_agent_starts() {
    let dir = ok(tempfile::tempdir());
    let path = dir.path().join("spool.db");
    std::fs::write(
        &path,
        b"this is not an SQLite database, it is a text file\n".repeat(100),
    )
    .unwrap();
    let upstream = Upstream::start().await;
    let mut agent = ok(AgentProcess::builder()
        .upstream(&upstream.endpoint())
        .spool(&path)
        .start()
        .await);
    let quarantined: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("spool.db.corrupt-"))
        .collect();
    assert_eq!(quarantined.len(), 1, "moved aside: {quarantined:?}");
    assert!(
        agent.stderr().contains("moved it aside"),
        "{}",
        agent.stderr()
    );
    let ids = fresh_ids(10);
    ok(send(agent.grpc_addr(), Signal::Logs, &ids).await);
    ok(upstream
        .wait_for_ids(Signal::Logs, &id_set(&ids), DEADLINE)
        .await);
    agent.signal(SIGTERM);
    assert!(agent.wait_exit(DEADLINE).await.expect("exits").success());
    assert_eq!(integrity(&path), "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unwritable_spool_location_is_a_clear_error_naming_the_path() {
    let dir = ok(tempfile::tempdir());
    // A regular file where a directory is needed: fails even for root.
    let blocker = dir.path().join("not-a-dir");
    std::fs::write(&blocker, b"x").unwrap();
    let path = blocker.join("spool.db");
    let result = AgentProcess::builder().spool(&path).start().await;
    let err = result.err().expect("the agent must refuse to start");
    assert!(
        err.contains(&blocker.display().to_string()),
        "names the path: {err}"
    );
    assert!(err.contains("cannot open the spool"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_spool_at_shutdown_drops_the_rest_counts_it_and_exits_non_zero_with_a_valid_file() {
    let upstream = Upstream::start().await;
    upstream.stop().await;
    let mut agent = ok(AgentProcess::builder()
        .upstream(&upstream.endpoint())
        .config_toml(
            "[spool]\nmax_bytes = \"64KiB\"\n[shutdown]\nflush_budget = \"200ms\"\ntimeout = \"5s\"\n[batch]\nmax_items = 20\n",
        )
        .start()
        .await);
    let client = Client::new(agent.grpc_addr());
    let spec = ItemSpec {
        payload_bytes: 500,
        ..ItemSpec::default()
    };
    let mut sent = 0u64;
    for _ in 0..40 {
        let ids = fresh_ids(20);
        ok(client.export_with(Signal::Traces, &ids, &spec).await);
        sent += ids.len() as u64;
    }
    agent.signal(SIGTERM);
    let status = agent.wait_exit(DEADLINE).await.expect("exits");
    assert_eq!(
        status.code(),
        Some(1),
        "dropping at shutdown is a failure\n{}",
        agent.stderr()
    );
    let spooled = agent.summary_field("spooled").expect("summary");
    let dropped = agent.summary_field("dropped_at_shutdown").expect("summary");
    assert!(
        dropped > 0 && spooled > 0,
        "spooled {spooled}, dropped {dropped}"
    );
    assert_eq!(
        spooled + dropped,
        sent,
        "every acknowledged item is spooled or counted as dropped"
    );
    assert_eq!(spool_contents(agent.spool_path()).1, spooled);
    assert_eq!(integrity(agent.spool_path()), "ok");
    assert!(
        agent.stderr().contains("spool is full"),
        "{}",
        agent.stderr()
    );
}

/// `spool.when_full = "drop_oldest"`: the shutdown write makes room by
/// evicting older rows. That drops acknowledged data at shutdown, so it is
/// counted in `dropped_at_shutdown` and the exit status is 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn evicting_older_rows_to_spool_at_shutdown_counts_as_dropped_and_exits_non_zero() {
    let upstream = Upstream::start().await;
    upstream.stop().await;
    let mut agent = ok(AgentProcess::builder()
        .upstream(&upstream.endpoint())
        .config_toml(
            "[spool]\nmax_bytes = \"256KiB\"\nwhen_full = \"drop_oldest\"\n[shutdown]\nflush_budget = \"200ms\"\ntimeout = \"5s\"\n[batch]\nmax_items = 20\n",
        )
        .start()
        .await);
    let spec = ItemSpec {
        payload_bytes: 500,
        ..ItemSpec::default()
    };
    let send = |addr, requests: usize| {
        let spec = spec.clone();
        async move {
            let client = Client::new(addr);
            for _ in 0..requests {
                ok(client
                    .export_with(Signal::Traces, &fresh_ids(20), &spec)
                    .await);
            }
            requests as u64 * 20
        }
    };
    // A first run leaves older rows in the spool.
    let first = send(agent.grpc_addr(), 8).await;
    agent.signal(SIGTERM);
    let status = agent.wait_exit(DEADLINE).await.expect("exits");
    assert!(status.success(), "the first run fits: {}", agent.stderr());
    assert_eq!(spool_contents(agent.spool_path()).1, first);

    // The second run holds more than the room left: its shutdown evicts.
    ok(agent.restart().await);
    let second = send(agent.grpc_addr(), 20).await;
    agent.signal(SIGTERM);
    let status = agent.wait_exit(DEADLINE).await.expect("exits");
    assert_eq!(
        status.code(),
        Some(1),
        "evicting at shutdown drops acknowledged data\n{}",
        agent.stderr()
    );
    assert!(
        agent
            .stderr()
            .contains("dropped the oldest spooled batches"),
        "{}",
        agent.stderr()
    );
    let dropped_at_shutdown = agent.summary_field("dropped_at_shutdown").expect("summary");
    let dropped = agent.summary_field("dropped").expect("summary");
    assert!(dropped_at_shutdown > 0);
    assert_eq!(
        dropped_at_shutdown, dropped,
        "every drop of this run was at shutdown"
    );
    let (_, items) = spool_contents(agent.spool_path());
    assert_eq!(
        items + dropped,
        first + second,
        "every acknowledged item of both runs is spooled or counted as dropped"
    );
    assert_eq!(integrity(agent.spool_path()), "ok");
}

/// A stopped agent whose spool holds `rows` rows of 10 metric points each,
/// sent while its upstream (returned stopped) was down; and their ids.
async fn spooled_backlog(rows: usize) -> (Upstream, AgentProcess, BTreeSet<u64>) {
    let upstream = Upstream::start().await;
    upstream.stop().await;
    let mut agent = ok(AgentProcess::builder()
        .upstream(&upstream.endpoint())
        .config_toml(
            "[batch]\nmax_items = 10\ntimeout = \"5ms\"\n[shutdown]\nflush_budget = \"0s\"\ntimeout = \"10s\"\n",
        )
        .start()
        .await);
    let backlog = send_all(agent.grpc_addr(), Signal::Metrics, rows, 10).await;
    agent.signal(SIGTERM);
    assert!(
        agent.wait_exit(DEADLINE).await.expect("exits").success(),
        "{}",
        agent.stderr()
    );
    let rows = rows as u64;
    assert_eq!(spool_contents(agent.spool_path()), (rows, rows * 10));
    (upstream, agent, backlog)
}

/// A row whose columns no longer agree (its byte count changed on disk, in
/// a file that still passes SQLite's checks) is skipped by replay and
/// logged with its id; the rows behind it are delivered, and it stays in the
/// file for `spool verify`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unreadable_spool_row_is_skipped_and_the_rows_behind_it_are_replayed() {
    let (upstream, mut agent, backlog) = spooled_backlog(20).await;

    let db = ok(rusqlite::Connection::open(agent.spool_path()));
    let (bad_row, payload): (i64, Vec<u8>) = ok(db.query_row(
        "SELECT id, payload FROM batches ORDER BY id LIMIT 1",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    ));
    ok(db.execute(
        "UPDATE batches SET bytes = bytes + 1 WHERE id = ?1",
        [bad_row],
    ));
    drop(db);
    assert_eq!(integrity(agent.spool_path()), "ok");
    let lost = id_set(&ok(support::ids::ids_in_bytes(Signal::Metrics, &payload)));
    assert_eq!(lost.len(), 10);

    upstream.restart().await;
    ok(agent.restart().await);
    let expected: BTreeSet<u64> = backlog.difference(&lost).copied().collect();
    ok(upstream
        .wait_for_ids(Signal::Metrics, &expected, DEADLINE)
        .await);
    let line = ok(agent
        .wait_for_log("cannot be read; replay skips it", Duration::from_secs(10))
        .await);
    assert!(line.contains(&format!("row={bad_row}")), "{line}");
    agent.signal(SIGTERM);
    assert!(
        agent.wait_exit(DEADLINE).await.expect("exits").success(),
        "{}",
        agent.stderr()
    );
    upstream.assert_received_exactly(Signal::Metrics, &expected);
    assert_eq!(
        spool_contents(agent.spool_path()),
        (1, 10),
        "only the unreadable row is left"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replay_runs_alongside_live_traffic() {
    let (upstream, mut agent, backlog) = spooled_backlog(400).await;

    // A slow upstream: the backlog of 400 rows takes seconds to drain.
    upstream.set_mode(Mode::Delay(Duration::from_millis(10)));
    upstream.restart().await;
    ok(agent.restart().await);
    let fresh = send_all(agent.grpc_addr(), Signal::Metrics, 5, 10).await;
    ok(upstream
        .wait_for_ids(Signal::Metrics, &fresh, DEADLINE)
        .await);
    let (rows_left, _) = spool_contents(agent.spool_path());
    assert!(
        rows_left > 0,
        "fresh data arrived while the backlog was still draining"
    );
    let mut all = backlog.clone();
    all.extend(&fresh);
    ok(upstream
        .wait_for_ids(Signal::Metrics, &all, Duration::from_secs(60))
        .await);
    upstream.assert_received_exactly(Signal::Metrics, &all);
}
