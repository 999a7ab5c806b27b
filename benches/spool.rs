//! Spool cost: writing a full 64 MiB buffer at shutdown, and replaying it.
//!
//! `cargo bench --bench spool`. Files live in a temporary directory, so the figures
//! are for whatever disk backs `$TMPDIR`.
// Tests and benches drive real processes and sockets: wall-clock time,
// not tokio's (clippy.toml keeps std's Instant out of the agent's code).
#![allow(clippy::disallowed_types)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use telespool::signal::Signal;
use telespool::spool::{NewBatch, Spool, SpoolOptions, Synchronous};
use tempfile::TempDir;

#[path = "../tests/support/mod.rs"]
mod support;

#[path = "e2e/realistic.rs"]
#[allow(dead_code)]
mod realistic;

#[path = "e2e/procfs.rs"]
#[allow(dead_code)]
mod procfs;

const TOTAL: usize = 64 << 20;
const BATCH: usize = 4 << 20;

fn buffer() -> Vec<NewBatch> {
    (0..TOTAL / BATCH)
        .map(|i| {
            // Four 1 MiB requests per batch, as the batcher would concatenate them.
            let chunk = Bytes::from(vec![i as u8; BATCH / 4]);
            NewBatch {
                signal: Signal::ALL[i % 3],
                items: 8192,
                created_ms: i as i64,
                attempts: 0,
                payload: vec![chunk; 4],
            }
        })
        .collect()
}

fn open(dir: &TempDir, synchronous: Synchronous) -> Spool {
    let opts = SpoolOptions {
        max_bytes: 1 << 30,
        synchronous,
    };
    match Spool::open(&dir.path().join("spool.db"), opts) {
        Ok((spool, _)) => spool,
        Err(e) => panic!("open: {e}"),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// One `insert` of 16 × 4 MiB into an empty spool (the shutdown spool step).
fn insert_64mib(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("spool_insert_64MiB_as_16x4MiB");
    group.throughput(Throughput::Bytes(TOTAL as u64));
    group.sample_size(10);
    for sync in [Synchronous::Normal, Synchronous::Full] {
        group.bench_function(BenchmarkId::from_parameter(format!("{sync:?}")), |b| {
            b.iter_custom(|iters| {
                let mut spent = Duration::ZERO;
                for _ in 0..iters {
                    let dir = TempDir::new().expect("tempdir");
                    let spool = open(&dir, sync);
                    let batches = buffer();
                    let start = Instant::now();
                    let outcome = rt.block_on(spool.insert(batches)).expect("insert");
                    spent += start.elapsed();
                    assert_eq!(outcome.written, TOTAL / BATCH);
                    rt.block_on(spool.close()).expect("close");
                }
                spent
            })
        });
    }
    group.finish();
}

/// Replay: `oldest` + `delete` one batch at a time until 64 MiB are drained.
fn replay_64mib(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("spool_replay_64MiB");
    group.throughput(Throughput::Bytes(TOTAL as u64));
    group.sample_size(10);
    group.bench_function("oldest_then_delete", |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            for _ in 0..iters {
                let dir = TempDir::new().expect("tempdir");
                let spool = open(&dir, Synchronous::Normal);
                rt.block_on(spool.insert(buffer())).expect("fill");
                let start = Instant::now();
                let drained = rt.block_on(async {
                    let mut drained = 0;
                    loop {
                        let rows = spool.oldest(0, 1).await.expect("oldest");
                        if rows.is_empty() {
                            break drained;
                        }
                        drained += rows.iter().map(|r| r.payload.len()).sum::<usize>();
                        let ids = rows.iter().map(|r| r.id).collect();
                        spool.delete(ids).await.expect("delete");
                    }
                });
                spent += start.elapsed();
                assert_eq!(drained, TOTAL);
                rt.block_on(spool.close()).expect("close");
            }
            spent
        })
    });
    group.finish();
}

/// Replay of 2,000 small rows (1 KiB, 10 items: what durable mode commits
/// under light load), one row per round trip as replay did before, against
/// runs of rows up to the batch limits (`oldest_run`, deleted together).
fn replay_small_rows(c: &mut Criterion) {
    const ROWS: usize = 2_000;
    let rt = runtime();
    let mut group = c.benchmark_group("spool_replay_2k_small_rows");
    group.throughput(Throughput::Elements(ROWS as u64));
    group.sample_size(10);
    let rows = || -> Vec<NewBatch> {
        (0..ROWS)
            .map(|i| NewBatch {
                signal: Signal::Traces,
                items: 10,
                created_ms: i as i64,
                attempts: 0,
                payload: vec![Bytes::from(vec![i as u8; 1024])],
            })
            .collect()
    };
    for per_request in ["one_row", "run_8192_items"] {
        group.bench_function(per_request, |b| {
            b.iter_custom(|iters| {
                let mut spent = Duration::ZERO;
                for _ in 0..iters {
                    let dir = TempDir::new().expect("tempdir");
                    let spool = open(&dir, Synchronous::Normal);
                    rt.block_on(spool.insert(rows())).expect("fill");
                    let start = Instant::now();
                    let drained = rt.block_on(async {
                        let mut drained = 0;
                        loop {
                            let run = match per_request {
                                "one_row" => spool
                                    .oldest_unclaimed(0, Default::default())
                                    .await
                                    .expect("oldest_unclaimed")
                                    .into_iter()
                                    .collect::<Vec<_>>(),
                                _ => spool
                                    .oldest_run(0, Default::default(), 8192, 4 << 20)
                                    .await
                                    .expect("oldest_run"),
                            };
                            if run.is_empty() {
                                break drained;
                            }
                            drained += run.len();
                            spool
                                .delete(run.iter().map(|r| r.id).collect())
                                .await
                                .expect("delete");
                        }
                    });
                    spent += start.elapsed();
                    assert_eq!(drained, ROWS);
                    rt.block_on(spool.close()).expect("close");
                }
                spent
            })
        });
    }
    group.finish();
}

/// Durable mode's steady state, as the spool thread sees it: 128 MiB of
/// realistic trace requests go through as groups of 3.5 requests (~180 KB, what
/// 8 clients make) committed with `insert_claimed`, each group deleted once
/// the four groups after it are committed (upstream acknowledging a few
/// batches behind). Rows live briefly, so the WAL, its checkpoints and page
/// reuse are exercised as in `durable-nogzip`. Reported: wall time, and the
/// process's CPU time (spool and checkpoint threads) per GiB on stderr.
fn durable_cycle(c: &mut Criterion) {
    const VOLUME: usize = 128 << 20;
    const LAG: usize = 4;
    let requests = realistic_requests();
    let per_request = requests.iter().map(Bytes::len).sum::<usize>() / requests.len();
    let groups = VOLUME / (per_request * 7 / 2);
    let rt = runtime();
    // Read once: `clock_ticks` runs `getconf`, which must stay out of the timing.
    let ticks = procfs::clock_ticks();
    let mut group = c.benchmark_group("spool_durable_cycle_128MiB");
    group.throughput(Throughput::Bytes(VOLUME as u64));
    group.sample_size(10);
    group.bench_function("insert_claimed_then_delete", |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            let mut cpu = Duration::ZERO;
            for _ in 0..iters {
                let dir = TempDir::new().expect("tempdir");
                let spool = open(&dir, Synchronous::Normal);
                let cpu0 = process_cpu(ticks);
                let start = Instant::now();
                rt.block_on(async {
                    let mut live = std::collections::VecDeque::new();
                    for g in 0..groups {
                        // 3 or 4 requests a group, 3.5 on average.
                        let n = 3 + g % 2;
                        let payload: Vec<Bytes> = (0..n)
                            .map(|k| requests[(g * 4 + k) % requests.len()].clone())
                            .collect();
                        let batch = NewBatch {
                            signal: Signal::Traces,
                            items: 100 * n as u64,
                            created_ms: g as i64,
                            attempts: 0,
                            payload,
                        };
                        let outcome = spool.insert_claimed(vec![batch]).await.expect("insert");
                        live.extend(outcome.ids);
                        if live.len() > LAG {
                            let id = live.pop_front().expect("a live row");
                            spool.delete(vec![id]).await.expect("delete");
                        }
                    }
                    spool
                        .delete(live.into_iter().collect())
                        .await
                        .expect("delete");
                });
                spent += start.elapsed();
                cpu += process_cpu(ticks).saturating_sub(cpu0);
                rt.block_on(spool.close()).expect("close");
            }
            let gib = (VOLUME as f64 * iters as f64) / f64::from(1 << 30);
            eprintln!(
                "durable cycle: {:.2} CPU-s per GiB (wall {:.2} s per GiB)",
                cpu.as_secs_f64() / gib,
                spent.as_secs_f64() / gib
            );
            spent
        })
    });
    group.finish();
}

/// What bounds durable mode's CPU (issue 17, item 4), SQLite alone: the
/// insert/delete cycle of `durable_cycle` on a bare connection, in WAL mode
/// (the spool's) and in a rollback-journal mode (`PERSIST`, where a payload
/// is written once, into the database file, but each commit fsyncs twice),
/// with rows of realistic requests as they are, as raw deflate segments
/// (zlib-rs level 1, sync-flushed per request: the row format that would let
/// a gzip upstream take stored rows as they are) and as one zstd frame per
/// row (level -1, the exporter's; fewer bytes through SQLite). The
/// compression is timed with the rest. CPU of the whole process per GiB of
/// *uncompressed* requests is printed, so the variants compare directly.
fn journal_modes(c: &mut Criterion) {
    const VOLUME: usize = 64 << 20;
    let requests = realistic_requests();
    let per_request = requests.iter().map(Bytes::len).sum::<usize>() / requests.len();
    let groups = VOLUME / (per_request * 7 / 2);
    let ticks = procfs::clock_ticks();
    let mut group = c.benchmark_group("spool_sqlite_journal_64MiB");
    group.throughput(Throughput::Bytes(VOLUME as u64));
    group.sample_size(10);
    for (mode, row_format) in [
        ("WAL", Row::Raw),
        ("WAL", Row::Deflate),
        ("WAL", Row::Zstd),
        ("PERSIST", Row::Raw),
    ] {
        let name = format!("{mode}/{}", row_format.name());
        group.bench_function(name.as_str(), |b| {
            b.iter_custom(|iters| {
                let mut spent = Duration::ZERO;
                let mut cpu = Duration::ZERO;
                let mut stored = 0usize;
                for _ in 0..iters {
                    let dir = TempDir::new().expect("tempdir");
                    let conn = bare_connection(&dir, mode);
                    let mut deflater =
                        flate2::Compress::new(flate2::Compression::fast(), false);
                    let mut zstd = zstd::bulk::Compressor::new(-1).expect("zstd");
                    let cpu0 = process_cpu(ticks);
                    let start = Instant::now();
                    let mut live = std::collections::VecDeque::new();
                    for g in 0..groups {
                        let n = 3 + g % 2;
                        let mut row = Vec::new();
                        for k in 0..n {
                            let request = &requests[(g * 4 + k) % requests.len()];
                            if let Row::Deflate = row_format {
                                deflater.reset();
                                row.reserve(request.len() / 2 + 64);
                                deflater
                                    .compress_vec(request, &mut row, flate2::FlushCompress::Sync)
                                    .expect("deflate");
                            } else {
                                row.extend_from_slice(request);
                            }
                        }
                        if let Row::Zstd = row_format {
                            row = zstd.compress(&row).expect("zstd");
                        }
                        stored += row.len();
                        conn.execute(
                            "INSERT INTO batches(signal, items, bytes, created_ms, attempts, payload)
                             VALUES('traces', ?1, ?2, ?3, 0, ?4)",
                            rusqlite::params![100 * n as i64, row.len() as i64, g as i64, row],
                        )
                        .expect("insert");
                        live.push_back(conn.last_insert_rowid());
                        if live.len() > 4 {
                            let id = live.pop_front().expect("a live row");
                            conn.execute("DELETE FROM batches WHERE id = ?1", [id])
                                .expect("delete");
                        }
                        // The checkpoint thread's passive pass, about every 100 ms.
                        if mode == "WAL" && g % 20 == 19 {
                            conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                                .expect("checkpoint");
                        }
                    }
                    spent += start.elapsed();
                    cpu += process_cpu(ticks).saturating_sub(cpu0);
                }
                let gib = (VOLUME as f64 * iters as f64) / f64::from(1 << 30);
                eprintln!(
                    "{mode} {}: {:.2} CPU-s per GiB of requests (wall {:.2} s), stored {:.2}x smaller",
                    row_format.name(),
                    cpu.as_secs_f64() / gib,
                    spent.as_secs_f64() / gib,
                    (VOLUME * iters as usize) as f64 / stored.max(1) as f64,
                );
                spent
            })
        });
    }
    group.finish();
}

/// How `journal_modes` stores a row of requests.
#[derive(Clone, Copy)]
enum Row {
    /// The requests as received, one after the other (the spool's).
    Raw,
    /// Each request a sync-flushed raw deflate segment.
    Deflate,
    /// The joined requests as one zstd frame at level -1.
    Zstd,
}

impl Row {
    fn name(self) -> &'static str {
        match self {
            Row::Raw => "raw_rows",
            Row::Deflate => "deflate_rows",
            Row::Zstd => "zstd_rows",
        }
    }
}

/// A connection set up as the spool's writer is (`spool/store.rs`), in
/// journal mode `mode`, with `synchronous = NORMAL`.
fn bare_connection(dir: &TempDir, mode: &str) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(dir.path().join("bare.db")).expect("open");
    conn.execute_batch(&format!(
        "PRAGMA auto_vacuum = INCREMENTAL;
         PRAGMA journal_mode = {mode};
         PRAGMA synchronous = NORMAL;
         PRAGMA wal_autocheckpoint = 32768;
         PRAGMA journal_size_limit = 33554432;
         CREATE TABLE batches(id INTEGER PRIMARY KEY AUTOINCREMENT, signal TEXT NOT NULL,
             items INTEGER NOT NULL, bytes INTEGER NOT NULL, created_ms INTEGER NOT NULL,
             attempts INTEGER NOT NULL, payload BLOB NOT NULL);"
    ))
    .expect("pragmas");
    conn
}

/// 200 realistic trace requests of 100 spans each (~51 KB), as the e2e
/// bench's load generator sends them.
fn realistic_requests() -> Vec<Bytes> {
    (0..200)
        .map(|j| {
            let start = (j * 100) as u64;
            let ids: Vec<u64> = (start..start + 100).collect();
            realistic::build(support::Signal::Traces, j, &ids).encode_to_bytes()
        })
        .collect()
}

/// Deleting one row at a time from the oldest end of a 4,000-row backlog
/// (what replay does; each delete recomputes the oldest row's age) against
/// the newest end (no recompute): the baseline of the same run. Before the
/// `created_ms` index the oldest end cost a scan of every row per delete.
fn delete_from_a_backlog(c: &mut Criterion) {
    const ROWS: usize = 4_000;
    const DELETES: usize = 200;
    let rt = runtime();
    let mut group = c.benchmark_group("spool_delete_one_row_of_4000");
    group.throughput(Throughput::Elements(DELETES as u64));
    group.sample_size(10);
    let rows = || -> Vec<NewBatch> {
        (0..ROWS)
            .map(|i| NewBatch {
                signal: Signal::Traces,
                items: 100,
                created_ms: i as i64,
                attempts: 0,
                payload: vec![Bytes::from(vec![i as u8; 32 << 10])],
            })
            .collect()
    };
    for end in ["oldest", "newest"] {
        group.bench_function(end, |b| {
            b.iter_custom(|iters| {
                let mut spent = Duration::ZERO;
                for _ in 0..iters {
                    let dir = TempDir::new().expect("tempdir");
                    let spool = open(&dir, Synchronous::Normal);
                    let mut ids = rt.block_on(spool.insert(rows())).expect("fill").ids;
                    if end == "newest" {
                        ids.reverse();
                    }
                    let start = Instant::now();
                    rt.block_on(async {
                        for &id in &ids[..DELETES] {
                            spool.delete(vec![id]).await.expect("delete");
                        }
                    });
                    spent += start.elapsed();
                    let stats = rt.block_on(spool.stats()).expect("stats");
                    assert_eq!(stats.rows as usize, ROWS - DELETES);
                    rt.block_on(spool.close()).expect("close");
                }
                spent
            })
        });
    }
    group.finish();
}

/// CPU time of this process, all threads (utime + stime).
fn process_cpu(ticks: u64) -> Duration {
    procfs::cpu_time(std::process::id(), ticks).unwrap_or_default()
}

criterion_group!(
    benches,
    insert_64mib,
    replay_64mib,
    replay_small_rows,
    delete_from_a_backlog,
    durable_cycle,
    journal_modes
);
criterion_main!(benches);
