//! The spool on a small real filesystem that fills up (a tmpfs the test
//! mounts; skipped with a message where mounting is not allowed).
// Tests and benches drive real processes and sockets: wall-clock time,
// not tokio's (clippy.toml keeps std's Instant out of the agent's code).
#![allow(clippy::disallowed_types)]

mod support;

use std::collections::BTreeSet;
use std::fs::OpenOptions;
use std::io::Write;
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use nix::sys::signal::Signal::SIGTERM;
use support::scrape::{assert_accounting, scrape, value};
use support::tmpfs::Tmpfs;
use support::*;
use telespool::spool::{FullReason, NewBatch, Spool, SpoolOptions, Synchronous};

const DEADLINE: Duration = Duration::from_secs(30);
/// The filesystem under the spool.
const DISK: u64 = 24 << 20;

/// The agent with its spool on `disk`: a small memory budget so the spool
/// takes the overflow, quick retries and probes. `top` goes before the
/// tables, `spool` into `[spool]`.
async fn start_on(disk: &Tmpfs, upstream: &Upstream, top: &str, spool: &str) -> AgentProcess {
    let config = format!(
        "{top}[buffer]\nmax_bytes = \"4MiB\"\nmax_wait = \"50ms\"\n\
         [receiver]\nmax_request_bytes = \"256KiB\"\n\
         [batch]\nmax_bytes = \"256KiB\"\ntimeout = \"10ms\"\n\
         [upstream.retry]\ninitial_backoff = \"50ms\"\nmax_backoff = \"200ms\"\nprobe_interval = \"200ms\"\n\
         [spool]\n{spool}"
    );
    ok(AgentProcess::builder()
        .upstream(&upstream.endpoint())
        .spool(disk.join("spool.db"))
        .config_toml(&config)
        .start()
        .await)
}

async fn gauge(agent: &AgentProcess, sample: &str) -> f64 {
    ok(agent.metric(sample).await).unwrap_or(0.0)
}

/// Upstream down, load until the disk is full (and a little longer): the
/// spool reports a full disk, not `spool.max_bytes`, on `/metrics` and in
/// `telespool status`. Returns what the clients had acknowledged.
async fn fill_the_disk(agent: &AgentProcess, until_evicted: bool) -> BTreeSet<u64> {
    let sender = Sender::builder(agent.grpc_addr(), Signal::Traces)
        .batch(50)
        .workers(4)
        .spec(ItemSpec::with_payload(400))
        .max_attempts(3)
        .max_duration(DEADLINE)
        .start();
    let started = Instant::now();
    loop {
        let full = gauge(agent, "telespool_spool_disk_full").await == 1.0;
        let evicted = gauge(
            agent,
            "telespool_dropped_items_total{signal=\"traces\",reason=\"spool_evicted\"}",
        )
        .await
            > 0.0;
        if full && (evicted || !until_evicted) {
            break;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "the disk never filled: {}",
            agent.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Keep pushing against the full disk for a while.
    let more = sender.acknowledged_count() + 2000;
    let _ = sender.wait_acknowledged(more, Duration::from_secs(3)).await;
    let report = sender.stop().await;
    assert_eq!(
        gauge(agent, "telespool_spool_max_bytes_reached").await,
        0.0,
        "a full disk is not spool.max_bytes"
    );
    let status = Command::new(env!("CARGO_BIN_EXE_telespool"))
        .args(["status", "--admin-listen", &agent.admin_addr().to_string()])
        .output()
        .expect("telespool status");
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(status.contains("DISK FULL"), "status says so: {status}");
    report.acknowledged
}

/// Upstream back: every acknowledged id arrives exactly once (a row whose
/// delete was pending is never sent again by the same process), the spool
/// empties and gives its space back, the accounting holds, exit is clean.
async fn recover(
    mut agent: AgentProcess,
    upstream: &Upstream,
    acknowledged: &BTreeSet<u64>,
    disk: &Tmpfs,
) {
    upstream.restart().await;
    let dropped_sample =
        "telespool_dropped_items_total{signal=\"traces\",reason=\"spool_evicted\"}";
    ok(eventually(
        "quiet: nothing buffered, spooled or pending",
        DEADLINE,
        || async {
            let s = scrape(&agent).await;
            let idle = value(&s, "telespool_buffered_items", &[]) == 0.0
                && value(&s, "telespool_spool_rows", &[]) == 0.0
                && value(&s, "telespool_spool_delete_pending_rows", &[]) == 0.0;
            idle.then_some(())
        },
    )
    .await);
    let delivered = upstream.unique_ids(Signal::Traces);
    let dropped = gauge(&agent, dropped_sample).await as usize;
    assert!(
        delivered.is_subset(acknowledged),
        "upstream got only acknowledged ids"
    );
    assert_eq!(
        acknowledged.len() - dropped,
        delivered.len(),
        "acknowledged − dropped = delivered"
    );
    assert_eq!(
        upstream.duplicates(Signal::Traces),
        0,
        "no row was sent twice by one process"
    );
    let s = scrape(&agent).await;
    assert_accounting(&s, Signal::Traces);
    assert_eq!(
        value(
            &s,
            "telespool_forwarded_items_total",
            &[("signal", "traces")]
        ) as usize,
        delivered.len(),
        "forwarded counts each item once"
    );
    let room = eventually("the disk has room again", DEADLINE, || async {
        (gauge(&agent, "telespool_spool_disk_full").await == 0.0).then_some(())
    })
    .await;
    if let Err(e) = room {
        let ls = Command::new("ls").arg("-la").arg(disk.path()).output();
        panic!("{e}: {}", String::from_utf8_lossy(&ls.expect("ls").stdout));
    }
    eprintln!("available after the drain: {} bytes", disk.available());
    agent.signal(SIGTERM);
    let exit = agent.wait_exit(DEADLINE).await.expect("exits");
    assert!(exit.success(), "{}", agent.stderr());
    assert_eq!(agent.summary_field("spool_rows_left"), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_disk_with_upstream_down_loses_nothing_acknowledged_and_empties_when_upstream_returns()
{
    let Some(disk) = Tmpfs::mount(DISK) else {
        return;
    };
    let upstream = Upstream::start().await;
    upstream.stop().await;
    let agent = start_on(&disk, &upstream, "", "").await;
    let acknowledged = fill_the_disk(&agent, false).await;
    assert!(!acknowledged.is_empty());
    recover(agent, &upstream, &acknowledged, &disk).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_disk_in_durable_mode_refuses_retryably_and_delivers_every_acknowledged_id() {
    let Some(disk) = Tmpfs::mount(DISK) else {
        return;
    };
    let upstream = Upstream::start().await;
    upstream.stop().await;
    let agent = start_on(&disk, &upstream, "durability = \"spool\"\n", "").await;
    let acknowledged = fill_the_disk(&agent, false).await;
    assert!(!acknowledged.is_empty());
    recover(agent, &upstream, &acknowledged, &disk).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drop_oldest_evicts_on_a_full_disk_and_acknowledged_minus_dropped_is_delivered() {
    let Some(disk) = Tmpfs::mount(DISK) else {
        return;
    };
    let upstream = Upstream::start().await;
    upstream.stop().await;
    let agent = start_on(&disk, &upstream, "", "when_full = \"drop_oldest\"\n").await;
    let acknowledged = fill_the_disk(&agent, true).await;
    recover(agent, &upstream, &acknowledged, &disk).await;
}

fn row(i: usize) -> NewBatch {
    NewBatch {
        signal: Signal::Logs,
        items: 10,
        created_ms: 1000 + i as i64,
        attempts: 0,
        payload: vec![Bytes::from(vec![(i % 251) as u8; 64 << 10])],
    }
}

/// Fills what is left of the filesystem with a file, until ENOSPC.
fn fill_rest(disk: &Tmpfs) -> std::path::PathBuf {
    let path = disk.join("filler");
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .expect("filler");
    let chunk = vec![7u8; 4096];
    while file.write_all(&chunk).and_then(|()| file.flush()).is_ok() {}
    path
}

/// A spool on `disk` with a 1 MiB reserve (max_bytes / 16), and a reader
/// pinned to a snapshot: it keeps every later commit in the WAL (no
/// checkpoint can pass it, so the WAL never starts over) until it commits.
fn open_pinned(disk: &Tmpfs) -> (Spool, std::path::PathBuf, rusqlite::Connection) {
    let path = disk.join("spool.db");
    let opts = SpoolOptions {
        max_bytes: 16 << 20,
        synchronous: Synchronous::Normal,
    };
    let (spool, _) = ok(Spool::open(&path, opts));
    let reader = ok(rusqlite::Connection::open(&path));
    ok(reader.execute_batch("BEGIN"));
    let _: i64 = ok(reader.query_row("SELECT count(*) FROM batches", [], |r| r.get(0)));
    (spool, path, reader)
}

#[tokio::test]
async fn the_reserve_lets_deletes_run_on_a_full_disk_and_a_delete_that_still_fails_stays_pending() {
    let Some(disk) = Tmpfs::mount(8 << 20) else {
        return;
    };
    let (spool, path, reader) = open_pinned(&disk);
    // Each delete must append to the WAL, which needs disk space.
    let ids = ok(spool.insert((0..12).map(row).collect()).await).ids;
    assert_eq!(ids.len(), 12);

    // Disk full: the first delete releases the reserve and goes through.
    let filler = fill_rest(&disk);
    ok(spool.delete(ids[..2].to_vec()).await);
    let stats = ok(spool.stats().await);
    assert_eq!(
        (stats.rows, stats.delete_pending_rows),
        (10, 0),
        "{stats:?}"
    );
    assert_eq!(stats.full, Some(FullReason::Disk), "{stats:?}");
    // While the disk is full, rows go only into pages free inside the file.
    let refused = ok(spool.insert((20..24).map(row).collect()).await);
    assert!(refused.full && refused.written == 0, "{refused:?}");
    let reused = ok(spool.insert(vec![row(30)]).await);
    assert_eq!(reused.written, 1, "a row fits into the freed pages");

    // Not even the reserve left: the delete cannot commit, the rows stay
    // delete-pending: not counted, never handed out again.
    fill_rest(&disk);
    let exported = ids[2..6].to_vec();
    ok(spool.delete(exported.clone()).await);
    let stats = ok(spool.stats().await);
    assert_eq!(stats.delete_pending_rows, 4, "{stats:?}");
    assert_eq!(stats.delete_pending_items, 40);
    assert_eq!(stats.rows, 7, "pending rows are not counted");
    let run = ok(spool
        .oldest_run(0, Default::default(), u64::MAX, u64::MAX)
        .await);
    assert_eq!(run.len(), 7);
    assert!(
        run.iter().all(|r| !exported.contains(&r.id)),
        "a delete-pending row is never handed out again"
    );

    // Room again: the spool thread retries the deletes on its own.
    ok(reader.execute_batch("COMMIT"));
    drop(reader);
    ok(std::fs::remove_file(filler));
    let started = Instant::now();
    loop {
        let stats = ok(spool.stats().await);
        if stats.delete_pending_rows == 0 {
            break;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "pending deletes never retried"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left: Vec<i64> = ok(spool.oldest(0, usize::MAX).await)
        .iter()
        .map(|r| r.id)
        .collect();
    let mut want = ids[6..].to_vec();
    want.extend(reused.ids);
    assert_eq!(left, want);
    assert_eq!(ok(spool.stats().await), spool.stats_cached());
    ok(spool.close().await);
    let db = ok(rusqlite::Connection::open(&path));
    let present: i64 = ok(db.query_row("SELECT count(*) FROM batches", [], |r| r.get(0)));
    assert_eq!(present, 7, "the deletes reached the file");
    let auto_vacuum: i64 = ok(db.query_row("PRAGMA auto_vacuum", [], |r| r.get(0)));
    assert_eq!(auto_vacuum, 2, "new spools vacuum incrementally");
}

/// Bytes the spool's files hold on the disk.
fn spool_bytes(path: &std::path::Path) -> u64 {
    ["", "-wal", "-shm"]
        .iter()
        .filter_map(|s| std::fs::metadata(format!("{}{s}", path.display())).ok())
        .map(|m| m.len())
        .sum()
}

#[tokio::test]
async fn an_empty_spool_that_cannot_shrink_on_a_full_disk_starts_over_and_keeps_its_row_ids() {
    let Some(disk) = Tmpfs::mount(8 << 20) else {
        return;
    };
    // The database file does not grow while the rows go in.
    let (spool, path, reader) = open_pinned(&disk);
    let mut ids = Vec::new();
    for chunk in 0..5 {
        ids.extend(
            ok(spool
                .insert((chunk * 12..chunk * 12 + 12).map(row).collect())
                .await)
            .ids,
        );
    }
    assert_eq!(ids.len(), 60);

    // The disk fills; upstream acknowledges every row: the delete goes
    // through on the released reserve, and the spool is empty.
    let filler = fill_rest(&disk);
    ok(spool.delete(ids.clone()).await);
    let stats = ok(spool.stats().await);
    assert_eq!((stats.rows, stats.delete_pending_rows), (0, 0), "{stats:?}");
    // The rest of the reserve goes too; then the reader lets go. A checkpoint
    // now has to grow the file past the full disk, so the WAL cannot start
    // over, and no vacuum step has room to give the pages back.
    let more = fill_rest(&disk);
    ok(reader.execute_batch("COMMIT"));
    drop(reader);
    let held = spool_bytes(&path);
    assert!(
        held > 3 << 20,
        "the spool's files hold the rows' pages: {held}"
    );

    // The empty spool starts over: the space comes back, the disk-full
    // state ends, and row ids go on from where they were.
    let started = Instant::now();
    loop {
        let stats = ok(spool.stats().await);
        if stats.full.is_none() {
            break;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "the empty spool never gave its space back: {} bytes, {stats:?}",
            spool_bytes(&path)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let now = spool_bytes(&path);
    assert!(
        now < 1 << 20,
        "a fresh spool file: {now} bytes (was {held})"
    );
    let next = ok(spool.insert(vec![row(100)]).await).ids;
    let last = ids.iter().copied().max().unwrap_or(0);
    assert!(
        next.len() == 1 && next[0] > last,
        "row ids go on after {last}: {next:?}"
    );
    let back = ok(spool.oldest(0, usize::MAX).await);
    assert_eq!(back.iter().map(|r| r.id).collect::<Vec<_>>(), next);
    assert_eq!(back[0].payload, row(100).payload[0]);
    ok(spool.close().await);
    drop((filler, more));
}
