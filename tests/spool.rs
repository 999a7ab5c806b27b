//! The SQLite spool against real files in temporary directories.
// Tests and benches drive real processes and sockets: wall-clock time,
// not tokio's (clippy.toml keeps std's Instant out of the agent's code).
#![allow(clippy::disallowed_types)]

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use telespool::signal::Signal;
use telespool::spool::{
    self, NewBatch, OpenReport, Spool, SpoolError, SpoolOptions, SpoolStats, SpooledBatch,
    Synchronous, APPLICATION_ID,
};
use tempfile::TempDir;

fn options(max_bytes: u64) -> SpoolOptions {
    SpoolOptions {
        max_bytes,
        synchronous: Synchronous::Normal,
    }
}

fn open(path: &Path) -> (Spool, OpenReport) {
    match Spool::open(path, options(64 << 20)) {
        Ok(opened) => opened,
        Err(e) => panic!("opening {}: {e}", path.display()),
    }
}

fn spool_path(dir: &TempDir) -> PathBuf {
    dir.path().join("state").join("spool.db")
}

fn batch(signal: Signal, items: u64, created_ms: i64, chunks: &[&[u8]]) -> NewBatch {
    NewBatch {
        signal,
        items,
        created_ms,
        attempts: 0,
        payload: chunks.iter().map(|c| Bytes::copy_from_slice(c)).collect(),
    }
}

/// `n` batches of `len` bytes each, item counts 1..=n, created at 1000 + i.
fn batches(n: usize, len: usize) -> Vec<NewBatch> {
    (0..n)
        .map(|i| {
            let payload = vec![(i % 251) as u8; len];
            batch(
                Signal::ALL[i % 3],
                i as u64 + 1,
                1000 + i as i64,
                &[&payload],
            )
        })
        .collect()
}

async fn all_rows(spool: &Spool) -> Vec<SpooledBatch> {
    spool.oldest(0, usize::MAX).await.expect("oldest")
}

/// The cached counts equal a fresh count from the table; returns them.
async fn assert_stats_consistent(spool: &Spool) -> SpoolStats {
    let cached = spool.stats_cached();
    let fresh = spool.stats().await.expect("stats");
    assert_eq!(cached, fresh, "stats_cached drifted from the table");
    fresh
}

fn quarantined_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".corrupt-"))
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn inserted_batches_read_back_with_concatenated_payload_and_are_gone_after_delete() {
    let dir = TempDir::new().expect("tempdir");
    let (spool, report) = open(&spool_path(&dir));
    assert_eq!(report.quarantined, None);
    assert_eq!(report.stats, SpoolStats::default());

    let outcome = spool
        .insert(vec![
            batch(Signal::Traces, 3, 111, &[b"abc", b"", b"defg"]),
            batch(Signal::Logs, 5, 99, &[b"only"]),
            batch(Signal::Metrics, 0, 222, &[]),
        ])
        .await
        .expect("insert");
    assert_eq!((outcome.written, outcome.full), (3, false));

    let rows = all_rows(&spool).await;
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0].payload, Bytes::from_static(b"abcdefg"));
    assert_eq!(
        (rows[0].signal, rows[0].items, rows[0].bytes),
        (Signal::Traces, 3, 7)
    );
    assert_eq!((rows[0].created_ms, rows[0].attempts), (111, 0));
    assert_eq!(rows[1].payload, Bytes::from_static(b"only"));
    assert_eq!(rows[2].payload.len(), 0);
    let stats = assert_stats_consistent(&spool).await;
    assert_eq!(stats.rows, 3);
    assert_eq!(stats.bytes, 11);
    assert_eq!(stats.items, [3, 0, 5]);
    assert_eq!(stats.oldest_created_ms, Some(99));

    spool
        .record_attempt(rows[0].id)
        .await
        .expect("record_attempt");
    spool
        .record_attempt(rows[0].id)
        .await
        .expect("record_attempt");
    assert_eq!(all_rows(&spool).await[0].attempts, 2);

    spool
        .delete(vec![rows[1].id, 987_654])
        .await
        .expect("delete");
    let left: Vec<i64> = all_rows(&spool).await.iter().map(|r| r.id).collect();
    assert_eq!(left, [rows[0].id, rows[2].id]);
    let stats = assert_stats_consistent(&spool).await;
    assert_eq!((stats.rows, stats.bytes, stats.items), (2, 7, [3, 0, 0]));
    assert_eq!(stats.oldest_created_ms, Some(111));

    spool
        .delete(vec![rows[0].id, rows[2].id])
        .await
        .expect("delete");
    assert!(all_rows(&spool).await.is_empty());
    assert_eq!(assert_stats_consistent(&spool).await, SpoolStats::default());
    spool.close().await.expect("close");
}

#[tokio::test]
async fn oldest_returns_rows_in_insert_order_and_pages_with_after_id() {
    let dir = TempDir::new().expect("tempdir");
    let (spool, _) = open(&spool_path(&dir));
    spool.insert(batches(4, 10)).await.expect("insert");
    spool.insert(batches(6, 20)).await.expect("insert");

    let all = all_rows(&spool).await;
    assert_eq!(all.len(), 10);
    assert!(
        all.windows(2).all(|w| w[0].id < w[1].id),
        "ids not increasing"
    );

    let mut paged = Vec::new();
    let mut after = 0;
    loop {
        let page = spool.oldest(after, 3).await.expect("oldest");
        assert!(page.len() <= 3);
        let Some(last) = page.last() else { break };
        after = last.id;
        paged.extend(page);
    }
    assert_eq!(paged, all);
    spool.close().await.expect("close");
}

#[tokio::test]
async fn insert_returns_the_new_row_ids_in_input_order() {
    let dir = TempDir::new().expect("tempdir");
    let (spool, _) = open(&spool_path(&dir));
    let outcome = spool.insert(batches(5, 10)).await.expect("insert");
    let ids: Vec<i64> = all_rows(&spool).await.iter().map(|r| r.id).collect();
    assert_eq!(outcome.ids, ids);
    assert_eq!(outcome.written, 5);
    spool.close().await.expect("close");
}

#[tokio::test]
async fn oldest_unclaimed_skips_claimed_rows_and_starts_after_the_cursor() {
    let dir = TempDir::new().expect("tempdir");
    let (spool, _) = open(&spool_path(&dir));
    let ids = spool.insert(batches(5, 10)).await.expect("insert").ids;
    let claimed: HashSet<i64> = [ids[0], ids[1], ids[3]].into();
    let next = |after, claimed: &HashSet<i64>| {
        let (spool, claimed) = (spool.clone(), claimed.clone());
        async move {
            let row = spool.oldest_unclaimed(after, claimed).await;
            row.expect("read").map(|r| r.id)
        }
    };
    assert_eq!(next(0, &claimed).await, Some(ids[2]));
    assert_eq!(next(ids[2], &claimed).await, Some(ids[4]));
    assert_eq!(next(ids[4], &claimed).await, None);
    let all: HashSet<i64> = ids.iter().copied().collect();
    assert_eq!(next(0, &all).await, None);
    let row = spool.oldest_unclaimed(0, claimed).await.expect("read");
    assert_eq!(row.expect("a row").payload, Bytes::from(vec![2u8; 10]));
    spool.close().await.expect("close");
}

#[tokio::test]
async fn concurrent_deletes_all_take_effect_and_keep_the_counts_exact() {
    let dir = TempDir::new().expect("tempdir");
    let (spool, _) = open(&spool_path(&dir));
    let ids = spool.insert(batches(60, 100)).await.expect("insert").ids;
    // Deletes issued at once queue up behind one another and share
    // transactions; every caller still gets its own answer.
    let deletes = ids[..50].iter().map(|id| {
        let spool = spool.clone();
        let id = *id;
        async move { spool.delete(vec![id]).await }
    });
    for result in futures::future::join_all(deletes).await {
        result.expect("delete");
    }
    let left: Vec<i64> = all_rows(&spool).await.iter().map(|r| r.id).collect();
    assert_eq!(left, ids[50..].to_vec());
    assert_eq!(assert_stats_consistent(&spool).await.rows, 10);
    spool.close().await.expect("close");
}

#[tokio::test]
async fn committed_rows_reach_the_database_file_without_a_close_by_the_checkpoint_thread() {
    let dir = TempDir::new().expect("tempdir");
    let path = spool_path(&dir);
    let (spool, _) = open(&path);
    let before = fs::metadata(&path).expect("db file").len();
    // 4 MiB: far below the writer's own autocheckpoint (16384 pages), so only
    // the checkpoint thread moves these pages from the WAL into the file.
    spool.insert(batches(64, 64 * 1024)).await.expect("insert");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let grown = loop {
        let len = fs::metadata(&path).expect("db file").len();
        if len >= before + (4 << 20) || std::time::Instant::now() > deadline {
            break len;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert!(
        grown >= before + (4 << 20),
        "the database file stayed at {grown} bytes (was {before}): nothing was checkpointed"
    );
    spool.close().await.expect("close");
}

/// Durable mode's pattern: rows committed back to back, each deleted a few
/// commits later. The WAL must start over in place, and stay bounded when
/// commits outpace the checkpoints, rather than grow to the writer's backstop
/// autocheckpoint (16384 pages, 64 MiB) or beyond and be cut back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_steady_stream_of_commits_and_deletes_keeps_the_wal_within_its_size_limit() {
    const ROW: usize = 192 * 1024;
    const ROWS: usize = 800; // 150 MiB
    let dir = TempDir::new().expect("tempdir");
    // A file name without `.db`: SQLite's WAL is the name plus `-wal`.
    let path = dir.path().join("state").join("telemetry-spool");
    let (spool, _) = open(&path);
    let wal = dir.path().join("state").join("telemetry-spool-wal");
    let mut live = std::collections::VecDeque::new();
    let mut deleted = 0;
    let mut largest = 0;
    for i in 0..ROWS {
        let payload: Vec<u8> = (0..ROW).map(|k| (k * 31 + i) as u8).collect();
        let row = batch(Signal::Traces, 100, i as i64, &[&payload]);
        let outcome = spool.insert_claimed(vec![row]).await.expect("insert");
        assert_eq!(outcome.ids.len(), 1, "row {i} not written: {outcome:?}");
        live.extend(outcome.ids);
        if live.len() > 4 {
            let id = live.pop_front().expect("a live row");
            spool.delete(vec![id]).await.expect("delete");
            deleted += 1;
        }
        largest = largest.max(fs::metadata(&wal).map(|m| m.len()).unwrap_or(0));
    }
    deleted += live.len();
    spool
        .delete(live.into_iter().collect())
        .await
        .expect("delete");
    assert_eq!(deleted, ROWS);
    assert_eq!(assert_stats_consistent(&spool).await.rows, 0);
    // journal_size_limit is 32 MiB; past 64 MiB the spool thread waits for a
    // complete checkpoint before its next commit. The rest is slack for a slow
    // machine. Before the WAL restarted in place, it grew to the autocheckpoint
    // backstop and (in a release build, with the checkpoint thread busy) past
    // 130 MiB.
    assert!(
        largest < 80 << 20,
        "the WAL grew to {largest} bytes while {} MiB went through",
        (ROWS * ROW) >> 20
    );
    spool.close().await.expect("close");
}

#[tokio::test]
async fn rows_survive_close_and_reopen_and_ids_are_not_reused() {
    let dir = TempDir::new().expect("tempdir");
    let path = spool_path(&dir);
    let (spool, _) = open(&path);
    spool.insert(batches(5, 1000)).await.expect("insert");
    let before = assert_stats_consistent(&spool).await;
    let rows = all_rows(&spool).await;
    spool.delete(vec![rows[4].id]).await.expect("delete");
    let before_rows = all_rows(&spool).await;
    spool.close().await.expect("close");
    assert!(!Path::new(&format!("{}-wal", path.display())).exists_nonempty());

    let (spool, report) = open(&path);
    assert_eq!(report.quarantined, None);
    assert_eq!(report.stats.rows, 4);
    assert_eq!(report.stats.bytes, before.bytes - 1000);
    assert_eq!(all_rows(&spool).await, before_rows);
    spool.insert(batches(1, 1)).await.expect("insert");
    let newest = all_rows(&spool).await.pop().expect("a row");
    assert!(newest.id > rows[4].id, "a deleted id was reused");
    spool.close().await.expect("close");
}

trait ExistsNonEmpty {
    fn exists_nonempty(&self) -> bool;
}

impl ExistsNonEmpty for Path {
    fn exists_nonempty(&self) -> bool {
        fs::metadata(self).is_ok_and(|m| m.len() > 0)
    }
}

#[tokio::test]
async fn garbage_file_is_quarantined_with_its_wal_and_a_fresh_spool_is_created() {
    let dir = TempDir::new().expect("tempdir");
    let path = spool_path(&dir);
    fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    let garbage: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 3) as u8).collect();
    fs::write(&path, &garbage).expect("write garbage");
    fs::write(format!("{}-wal", path.display()), b"more garbage").expect("write wal");

    let (spool, report) = open(&path);
    let (moved, why) = report
        .quarantined
        .expect("the garbage file was quarantined");
    assert!(why.contains("not a SQLite database"), "reason: {why}");
    assert_eq!(fs::read(&moved).expect("read quarantined"), garbage);
    let names = quarantined_files(path.parent().expect("parent"));
    assert_eq!(names.len(), 2, "db and -wal moved aside: {names:?}");
    assert!(names.iter().any(|n| n.ends_with("-wal")));
    assert_eq!(report.stats, SpoolStats::default());

    spool
        .insert(batches(2, 10))
        .await
        .expect("insert into the fresh spool");
    spool.close().await.expect("close");
    assert!(spool::verify(&path).expect("verify").is_ok());
}

#[tokio::test]
async fn sqlite_file_of_another_application_is_quarantined() {
    let dir = TempDir::new().expect("tempdir");
    let path = spool_path(&dir);
    fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    {
        let conn = rusqlite::Connection::open(&path).expect("sqlite");
        conn.execute_batch(
            "PRAGMA application_id = 1234; CREATE TABLE notes(body TEXT); INSERT INTO notes VALUES ('hi');",
        )
        .expect("foreign db");
    }
    let (spool, report) = open(&path);
    let (moved, why) = report
        .quarantined
        .expect("the foreign file was quarantined");
    assert!(why.contains("application_id 0x4d2"), "reason: {why}");
    let conn = rusqlite::Connection::open(&moved).expect("quarantined file opens");
    let body: String = conn
        .query_row("SELECT body FROM notes", [], |r| r.get(0))
        .expect("its data is intact");
    assert_eq!(body, "hi");
    spool.close().await.expect("close");
}

#[tokio::test]
async fn spool_with_a_newer_schema_version_is_refused_and_left_in_place() {
    let dir = TempDir::new().expect("tempdir");
    let path = spool_path(&dir);
    let (spool, _) = open(&path);
    spool.close().await.expect("close");
    {
        let conn = rusqlite::Connection::open(&path).expect("sqlite");
        conn.execute_batch("PRAGMA user_version = 7")
            .expect("bump version");
    }
    let err = Spool::open(&path, options(1 << 20)).err().expect("refused");
    assert!(
        matches!(err, SpoolError::SchemaTooNew { version: 7, .. }),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        format!(
            "spool {} has schema version 7, newer than this telespool supports (1); upgrade telespool or move the file aside",
            path.display()
        )
    );
    assert!(path.exists());
    assert!(quarantined_files(path.parent().expect("parent")).is_empty());
}

#[test]
fn spool_path_under_a_regular_file_is_a_clear_error() {
    // Tests run as root, where a chmod 0500 directory is still writable; a path
    // through a regular file fails for root too (ENOTDIR).
    let dir = TempDir::new().expect("tempdir");
    let file = dir.path().join("file");
    fs::write(&file, b"not a directory").expect("write");

    let err = Spool::open(&file.join("spool.db"), options(1 << 20))
        .err()
        .expect("error");
    let msg = err.to_string();
    assert!(matches!(err, SpoolError::Directory { .. }), "{err:?}");
    assert!(
        msg.contains(&format!("cannot create spool directory {}", file.display())),
        "{msg}"
    );
    assert!(
        msg.contains("set spool.path to a writable location"),
        "{msg}"
    );

    let err = Spool::open(&file.join("deeper").join("spool.db"), options(1 << 20))
        .err()
        .expect("error");
    let msg = err.to_string();
    assert!(msg.contains("Not a directory (os error 20)"), "{msg}");
    assert!(msg.contains("set spool.path"), "{msg}");
}

#[tokio::test]
async fn spool_directory_is_created_0700_and_its_files_are_0600() {
    let dir = TempDir::new().expect("tempdir");
    let path = dir.path().join("a").join("b").join("spool.db");
    let (spool, _) = open(&path);
    spool.insert(batches(1, 10)).await.expect("insert");
    let mode = |p: &Path| fs::metadata(p).expect("metadata").permissions().mode() & 0o777;
    assert_eq!(mode(path.parent().expect("parent")), 0o700);
    assert_eq!(mode(&path), 0o600);
    assert_eq!(mode(Path::new(&format!("{}-wal", path.display()))), 0o600);
    assert_eq!(mode(Path::new(&format!("{}-shm", path.display()))), 0o600);
    assert_eq!(mode(Path::new(&format!("{}.lock", path.display()))), 0o600);
    spool.close().await.expect("close");
}

#[tokio::test]
async fn full_spool_writes_the_batches_that_fit_and_stays_valid() {
    let dir = TempDir::new().expect("tempdir");
    let path = spool_path(&dir);
    let (spool, _) = Spool::open(&path, options(256 << 10)).expect("open");
    let input = batches(100, 8 << 10);
    let outcome = spool.insert(input.clone()).await.expect("insert");
    assert!(outcome.full);
    assert!(
        outcome.written > 0 && outcome.written < input.len(),
        "{outcome:?}"
    );
    let rows = all_rows(&spool).await;
    assert_eq!(rows.len(), outcome.written);
    for (row, sent) in rows.iter().zip(&input) {
        assert_eq!(
            (row.items, &row.payload[..]),
            (sent.items, &sent.payload[0][..])
        );
    }
    assert_stats_consistent(&spool).await;

    let again = spool.insert(batches(1, 8 << 10)).await.expect("insert");
    assert_eq!((again.written, again.full), (0, true));

    spool
        .drop_oldest(16 << 10, Vec::new())
        .await
        .expect("drop_oldest");
    let after_drop = spool.insert(batches(1, 8 << 10)).await.expect("insert");
    assert_eq!((after_drop.written, after_drop.full), (1, false));
    assert_stats_consistent(&spool).await;
    spool.close().await.expect("close");

    assert!(fs::metadata(&path).expect("metadata").len() <= 256 << 10);
    let report = spool::verify(&path).expect("verify");
    assert!(report.is_ok(), "{:?}", report.problems);
    assert_eq!(report.stats.rows as usize, outcome.written - 2 + 1);
}

#[tokio::test]
async fn drop_oldest_frees_space_and_reports_exactly_what_it_dropped() {
    let dir = TempDir::new().expect("tempdir");
    let (spool, _) = open(&spool_path(&dir));
    spool
        .insert(vec![
            batch(Signal::Logs, 4, 10, &[&[1; 100]]),
            batch(Signal::Traces, 7, 20, &[&[2; 100]]),
            batch(Signal::Logs, 9, 30, &[&[3; 100]]),
            batch(Signal::Metrics, 2, 40, &[&[4; 100]]),
        ])
        .await
        .expect("insert");

    assert!(spool
        .drop_oldest(0, Vec::new())
        .await
        .expect("drop")
        .is_empty());
    let dropped = spool.drop_oldest(150, Vec::new()).await.expect("drop");
    assert_eq!(dropped, [(Signal::Logs, 4), (Signal::Traces, 7)]);
    let stats = assert_stats_consistent(&spool).await;
    assert_eq!((stats.rows, stats.bytes, stats.items), (2, 200, [0, 2, 9]));
    assert_eq!(stats.oldest_created_ms, Some(30));

    let dropped = spool.drop_oldest(10_000, Vec::new()).await.expect("drop");
    assert_eq!(dropped, [(Signal::Logs, 9), (Signal::Metrics, 2)]);
    assert_eq!(assert_stats_consistent(&spool).await, SpoolStats::default());
    assert!(spool
        .drop_oldest(1, Vec::new())
        .await
        .expect("drop")
        .is_empty());
    spool.close().await.expect("close");
}

#[tokio::test]
async fn second_open_of_a_spool_in_use_fails_with_locked_until_the_first_closes() {
    let dir = TempDir::new().expect("tempdir");
    let path = spool_path(&dir);
    let (spool, _) = open(&path);

    let err = Spool::open(&path, options(1 << 20)).err().expect("locked");
    assert!(matches!(err, SpoolError::Locked { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("is in use by another telespool process"),
        "{msg}"
    );
    assert!(msg.contains(&format!("{}.lock", path.display())), "{msg}");
    assert!(matches!(
        spool::purge(&path),
        Err(SpoolError::Locked { .. })
    ));
    assert!(matches!(
        spool::verify(&path),
        Err(SpoolError::Locked { .. })
    ));

    spool.close().await.expect("close");
    let (spool, _) = open(&path);
    spool.close().await.expect("close");
}

#[tokio::test]
async fn clones_of_a_closed_spool_get_closed_errors() {
    let dir = TempDir::new().expect("tempdir");
    let (spool, _) = open(&spool_path(&dir));
    let other = spool.clone();
    spool.insert(batches(2, 10)).await.expect("insert");
    spool.close().await.expect("close");
    assert!(matches!(other.stats().await, Err(SpoolError::Closed)));
    assert!(matches!(
        other.insert(batches(1, 1)).await,
        Err(SpoolError::Closed)
    ));
    assert_eq!(other.stats_cached().rows, 2);
    assert!(matches!(other.close().await, Err(SpoolError::Closed)));
}

#[tokio::test]
async fn stats_cached_matches_stats_after_every_operation() {
    let dir = TempDir::new().expect("tempdir");
    let path = spool_path(&dir);
    let (spool, report) = open(&path);
    assert_eq!(spool.stats_cached(), report.stats);
    spool.insert(batches(7, 300)).await.expect("insert");
    assert_stats_consistent(&spool).await;
    let rows = all_rows(&spool).await;
    spool
        .delete(vec![rows[0].id, rows[3].id])
        .await
        .expect("delete");
    assert_stats_consistent(&spool).await;
    spool.record_attempt(rows[1].id).await.expect("attempt");
    assert_stats_consistent(&spool).await;
    spool.drop_oldest(1, Vec::new()).await.expect("drop");
    assert_stats_consistent(&spool).await;
    let before_close = spool.stats_cached();
    spool.close().await.expect("close");
    let (spool, report) = open(&path);
    assert_eq!(report.stats, before_close);
    assert_eq!(spool.stats_cached(), before_close);
    spool.close().await.expect("close");
}

#[tokio::test]
async fn offline_tools_read_filter_verify_and_purge_a_closed_spool() {
    let dir = TempDir::new().expect("tempdir");
    let path = spool_path(&dir);
    assert!(matches!(
        spool::verify(&path),
        Err(SpoolError::Missing { .. })
    ));
    let (spool, _) = open(&path);
    spool.insert(batches(9, 50)).await.expect("insert");
    let rows = all_rows(&spool).await;
    spool.close().await.expect("close");

    let all: Vec<SpooledBatch> = spool::read_all(&path, None)
        .expect("read_all")
        .collect::<Result<_, _>>()
        .expect("rows");
    assert_eq!(all, rows);
    let logs: Vec<SpooledBatch> = spool::read_all(&path, Some(Signal::Logs))
        .expect("read_all")
        .collect::<Result<_, _>>()
        .expect("rows");
    assert_eq!(logs.len(), 3);
    assert!(logs.iter().all(|b| b.signal == Signal::Logs));

    let report = spool::verify(&path).expect("verify");
    assert!(report.is_ok(), "{:?}", report.problems);
    assert_eq!((report.schema_version, report.stats.rows), (1, 9));

    let purged = spool::purge(&path).expect("purge");
    assert_eq!((purged.rows, purged.bytes), (9, 450));
    assert_eq!(
        spool::verify(&path).expect("verify").stats,
        SpoolStats::default()
    );
}

#[test]
fn verify_reports_a_foreign_file_instead_of_failing() {
    let dir = TempDir::new().expect("tempdir");
    let path = dir.path().join("other.db");
    {
        let conn = rusqlite::Connection::open(&path).expect("sqlite");
        conn.execute_batch("CREATE TABLE t(x)").expect("create");
    }
    let report = spool::verify(&path).expect("verify");
    assert!(!report.is_ok());
    assert!(report.problems[0].contains(&format!("{APPLICATION_ID:#x}")));
    assert!(matches!(
        spool::purge(&path),
        Err(SpoolError::NotASpool { .. })
    ));
}

// ---- model test ---------------------------------------------------------------

#[derive(Clone, Debug)]
enum Op {
    /// Batches as (signal index, items, payload length, chunk count).
    Insert(Vec<(usize, u64, usize, usize)>),
    /// `after` picks a model row (or 0 when out of range), then `limit`.
    Oldest {
        after: usize,
        limit: usize,
    },
    /// Model rows to delete (indices wrap), plus one id that does not exist.
    Delete(Vec<usize>),
    RecordAttempt(usize),
    DropOldest(u64),
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => prop::collection::vec((0usize..3, 0u64..50, 0usize..300, 1usize..4), 0..5).prop_map(Op::Insert),
        2 => (0usize..12, 0usize..6).prop_map(|(after, limit)| Op::Oldest { after, limit }),
        2 => prop::collection::vec(0usize..12, 0..4).prop_map(Op::Delete),
        1 => (0usize..12).prop_map(Op::RecordAttempt),
        1 => (0u64..700).prop_map(Op::DropOldest),
        1 => Just(Op::Reopen),
    ]
}

fn model_stats(model: &[SpooledBatch]) -> SpoolStats {
    let mut stats = SpoolStats::default();
    for row in model {
        stats.rows += 1;
        stats.bytes += row.bytes;
        stats.items[row.signal.index()] += row.items;
        stats.oldest_created_ms = Some(
            stats
                .oldest_created_ms
                .map_or(row.created_ms, |o| o.min(row.created_ms)),
        );
    }
    stats
}

async fn run_model(ops: Vec<Op>) {
    let dir = TempDir::new().expect("tempdir");
    let path = spool_path(&dir);
    let (mut spool, _) = open(&path);
    let mut model: Vec<SpooledBatch> = Vec::new();
    let mut max_id = 0i64;
    let mut clock = 0i64;
    for op in ops {
        match op {
            Op::Insert(specs) => {
                let mut expected = Vec::new();
                let input: Vec<NewBatch> = specs
                    .iter()
                    .map(|&(sig, items, len, chunks)| {
                        clock += 1;
                        let created_ms = (clock * 7919) % 1000; // not monotonic in id
                        let payload: Vec<u8> = (0..len).map(|i| (i as i64 + clock) as u8).collect();
                        let step = len.div_ceil(chunks).max(1);
                        expected.push((Signal::ALL[sig], items, created_ms, payload.clone()));
                        NewBatch {
                            signal: Signal::ALL[sig],
                            items,
                            created_ms,
                            attempts: (clock % 3) as u32,
                            payload: payload.chunks(step).map(Bytes::copy_from_slice).collect(),
                        }
                    })
                    .collect();
                let attempts: Vec<u32> = input.iter().map(|b| b.attempts).collect();
                let outcome = spool.insert(input).await.expect("insert");
                assert_eq!((outcome.written, outcome.full), (expected.len(), false));
                let new = spool.oldest(max_id, usize::MAX).await.expect("oldest");
                assert_eq!(new.len(), expected.len());
                for ((row, (signal, items, created_ms, payload)), attempts) in
                    new.iter().zip(expected).zip(attempts)
                {
                    assert!(row.id > max_id, "ids must only grow");
                    max_id = row.id;
                    model.push(SpooledBatch {
                        id: row.id,
                        signal,
                        items,
                        bytes: payload.len() as u64,
                        created_ms,
                        attempts,
                        payload: Bytes::from(payload),
                    });
                }
            }
            Op::Oldest { after, limit } => {
                let after_id = model.get(after).map_or(0, |r| r.id);
                let got = spool.oldest(after_id, limit).await.expect("oldest");
                let want: Vec<SpooledBatch> = model
                    .iter()
                    .filter(|r| r.id > after_id)
                    .take(limit)
                    .cloned()
                    .collect();
                assert_eq!(got, want);
            }
            Op::Delete(picks) => {
                let mut ids: Vec<i64> = picks
                    .iter()
                    .filter(|_| !model.is_empty())
                    .map(|&i| model[i % model.len()].id)
                    .collect();
                ids.push(max_id + 1000);
                model.retain(|r| !ids.contains(&r.id));
                spool.delete(ids).await.expect("delete");
            }
            Op::RecordAttempt(pick) => {
                if let Some(row) = model.get_mut(pick) {
                    row.attempts += 1;
                    spool.record_attempt(row.id).await.expect("attempt");
                }
            }
            Op::DropOldest(needed) => {
                let mut freed = 0;
                let mut want = Vec::new();
                while freed < needed && !model.is_empty() {
                    let row = model.remove(0);
                    freed += row.bytes;
                    want.push((row.signal, row.items));
                }
                assert_eq!(
                    spool.drop_oldest(needed, Vec::new()).await.expect("drop"),
                    want
                );
            }
            Op::Reopen => {
                spool.close().await.expect("close");
                let (reopened, report) = open(&path);
                assert_eq!(report.quarantined, None);
                assert_eq!(report.stats, model_stats(&model));
                spool = reopened;
            }
        }
        assert_eq!(spool.stats_cached(), model_stats(&model));
        assert_eq!(all_rows(&spool).await, model);
        assert_eq!(spool.stats().await.expect("stats"), model_stats(&model));
    }
    spool.close().await.expect("close");
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 48,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct("proptest-regressions/spool.txt"))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn spool_contents_always_equal_a_simple_model(ops in prop::collection::vec(op(), 1..16)) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        runtime.block_on(run_model(ops));
    }
}

#[tokio::test]
async fn drop_oldest_never_evicts_rows_being_exported() {
    let dir = TempDir::new().expect("tempdir");
    let (spool, _) = open(&spool_path(&dir));
    spool
        .insert(vec![
            batch(Signal::Logs, 4, 10, &[&[1; 100]]),
            batch(Signal::Traces, 7, 20, &[&[2; 100]]),
            batch(Signal::Logs, 9, 30, &[&[3; 100]]),
        ])
        .await
        .expect("insert");
    let rows = spool.oldest(0, 10).await.expect("oldest");
    let in_flight = vec![rows[0].id];
    let dropped = spool.drop_oldest(150, in_flight).await.expect("drop");
    assert_eq!(dropped, [(Signal::Traces, 7), (Signal::Logs, 9)]);
    let left = spool.oldest(0, 10).await.expect("oldest");
    assert_eq!(left.iter().map(|r| r.id).collect::<Vec<_>>(), [rows[0].id]);
    assert_stats_consistent(&spool).await;
    spool.close().await.expect("close");
}
