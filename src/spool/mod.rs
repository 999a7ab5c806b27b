//! The SQLite spool: batches that telespool acknowledged to clients but upstream
//! has not acknowledged yet, kept across restarts and outages.
//!
//! # Schema
//!
//! One SQLite file, one table; each row is one upstream batch of one signal:
//!
//! ```sql
//! CREATE TABLE batches(
//!     id         INTEGER PRIMARY KEY AUTOINCREMENT, -- never reused, so ids only grow
//!     signal     TEXT NOT NULL,     -- Signal::as_str(): traces | metrics | logs
//!     items      INTEGER NOT NULL,  -- spans / data points / log records in the payload
//!     bytes      INTEGER NOT NULL,  -- length of payload
//!     created_ms INTEGER NOT NULL,  -- unix ms when the batch was sealed
//!     attempts   INTEGER NOT NULL,  -- upstream export attempts so far
//!     payload    BLOB NOT NULL);
//! ```
//!
//! `PRAGMA application_id` is [`APPLICATION_ID`] ("TSPL"), so a SQLite file written
//! by some other program is recognised rather than written into, and
//! `PRAGMA user_version` is [`SCHEMA_VERSION`]. Both are set in the same transaction
//! that creates the table.
//!
//! # On-disk format
//!
//! `payload` is the concatenation of serialized OTLP `Export*ServiceRequest`
//! messages of the row's signal, exactly as they arrived. Protobuf concatenation of
//! two requests is a valid request holding both resource lists, so a row's payload is
//! itself one valid request and replay sends it upstream unchanged. Next to
//! `spool.db` live SQLite's `spool.db-wal` and `spool.db-shm` and telespool's
//! `spool.db.lock`. The directory is created 0700, the database 0600 (SQLite gives
//! the -wal and -shm files the database's mode): the spool holds telemetry, which
//! can carry anything applications log, so only the agent's user reads it (0640
//! would serve a group of readers that telespool has no use for). At start an
//! existing world-writable directory, database, -wal or -shm is refused
//! ([`SpoolError::InsecureDirectory`], [`SpoolError::InsecureFile`]).
//!
//! # Delivery guarantee
//!
//! At-least-once. A row is deleted only after upstream acknowledged its batch, so
//! nothing committed here is lost while the file survives. Duplicates happen when
//! the agent stops (crash, SIGKILL, power loss) after upstream received a batch but
//! before the delete committed: that batch is replayed on the next start. A delete
//! that cannot commit while the agent runs (a full disk) leaves its rows
//! *delete-pending* (`maintain.rs`): they are never handed out again by this
//! process, not counted in [`SpoolStats::rows`], and the delete is retried; only
//! if the agent stops first are they replayed, and they are counted
//! ([`SpoolStats::delete_pending_items`], the summary's `duplicates_risked`).
//! Journal mode is WAL. With [`Synchronous::Normal`] (the default) a commit survives a
//! process crash but the last commits may be lost on power loss;
//! [`Synchronous::Full`] fsyncs every commit, for the durable acknowledgement mode.
//!
//! # Size bound
//!
//! `max_bytes` is enforced by SQLite itself: every open sets
//! `PRAGMA max_page_count = max_bytes / page_size`. A full spool and a full disk are
//! then the same error, `SQLITE_FULL`, and SQLite rolls the statement back, so the
//! file stays valid either way. [`Spool::insert`] reports it as
//! [`InsertOutcome::full`] after writing as many leading batches as fit; it never
//! returns [`SpoolError::Full`] (other operations may, on a full disk).
//! The bound counts pages, not payload: b-tree and overflow-page overhead make the
//! usable payload a few percent smaller than `max_bytes`, so callers of
//! [`Spool::drop_oldest`] should ask for a little more than the batch they want to
//! fit and retry. Freed pages are reused; files created by this version use
//! incremental vacuum and shrink in bounded steps once mostly free
//! (`maintain.rs`). A full *disk* is told apart from `max_bytes` with `statvfs`
//! ([`SpoolStats::full`]) and met with a reserve file released for deletes and
//! checkpoints (`disk.rs`). The bound does not cover the WAL file. That file starts over in
//! place after each checkpoint, within `journal_size_limit` (32 MiB); should commits outpace
//! the checkpoints, past 64 MiB the spool thread waits for a complete one before its next
//! command (`checkpoint.rs`, `Store::finish_checkpoint`).
//! Lowering `max_bytes` below the current file size keeps the current size as the
//! bound until rows are deleted and their pages reused.
//!
//! # Locking and threads
//!
//! [`Spool::open`] takes an exclusive advisory lock (`flock`) on `<file>.lock` and
//! holds it until close; a second agent, or `telespool spool purge` run against a
//! live agent, gets [`SpoolError::Locked`]. The lock file is never deleted (deleting
//! it would let two processes lock two different files). Inside the process one
//! dedicated OS thread owns the `rusqlite::Connection`; [`Spool`] handles send it
//! commands over a channel and await a oneshot reply, so no SQLite call ever runs on
//! the tokio runtime and no in-process SQLite locking is needed. The worker publishes
//! [`SpoolStats`] into a mutex after every command for [`Spool::stats_cached`].
//! A second connection, on a thread of its own, only checkpoints the WAL
//! (`checkpoint.rs`), so commits do not wait for checkpoints.
//!
//! The spool thread also owns the replay claims (`claims.rs`): which rows an
//! exporter holds. [`Spool::claim_run`] reads and claims a run in one
//! command, [`Spool::insert_claimed`] inserts and claims, and
//! [`Spool::finish`] (delete) and [`Spool::release`] give rows up without
//! waiting; eviction and expiry skip claimed rows. So no lock on the async
//! side is held across SQLite I/O, and an exporter never waits for a commit.
//!
//! # Opening a damaged file
//!
//! A file that is not SQLite, carries a foreign `application_id`, has an unexpected
//! table layout or fails `PRAGMA quick_check` is renamed to
//! `<file>.corrupt-<unix seconds>` (with its -wal and -shm), reported in
//! [`OpenReport::quarantined`], and a fresh spool is created: the agent still starts.
//! When the file is a telespool spool that failed its check (not a foreign or
//! garbage file), every row that can still be read and whose payload checks
//! out is copied into the fresh spool and replayed; what is lost is counted
//! ([`OpenReport::salvaged`], `salvage.rs`).
//! A file whose `user_version` is newer than [`SCHEMA_VERSION`] is refused instead
//! ([`SpoolError::SchemaTooNew`]): it is probably fine, just written by a newer
//! telespool, and must not be thrown away by a downgrade.

mod checkpoint;
mod claims;
mod disk;
mod error;
mod expire;
mod maintain;
mod offline;
mod open;
mod read;
mod restart;
mod salvage;
mod store;
mod worker;

use maintain::LiveLoad;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};

use bytes::Bytes;
use tokio::sync::oneshot;

use crate::signal::Signal;
use store::Store;
use worker::{Claim, Command, Reply};

pub use claims::Unclaimed;

pub use disk::FullReason;
pub use error::SpoolError;
pub use expire::{Expiry, ExpirySweeper};
pub use offline::{purge, read_all, verify, SpoolReader, VerifyReport};
pub use salvage::Salvage;

/// `PRAGMA application_id` of a telespool spool: ASCII "TSPL".
pub const APPLICATION_ID: i32 = 0x5453_504C;
/// `PRAGMA user_version` this binary writes and understands.
pub const SCHEMA_VERSION: i64 = 1;

/// SQLite's `synchronous` setting for the spool (the journal is always WAL).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Synchronous {
    /// Commits survive a process crash; the last ones may be lost on power loss.
    #[default]
    Normal,
    /// Every commit is fsynced: survives power loss, costs an fsync per commit.
    Full,
}

/// How to open the spool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpoolOptions {
    /// Bound on the database file, enforced through `PRAGMA max_page_count`.
    pub max_bytes: u64,
    /// Durability of each commit.
    pub synchronous: Synchronous,
}

impl Default for SpoolOptions {
    fn default() -> Self {
        SpoolOptions {
            max_bytes: 1 << 30,
            synchronous: Synchronous::Normal,
        }
    }
}

/// A batch to write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewBatch {
    pub signal: Signal,
    pub items: u64,
    pub created_ms: i64,
    pub attempts: u32,
    /// Serialized OTLP requests of `signal`; stored concatenated as one BLOB.
    pub payload: Vec<Bytes>,
}

/// A batch read back from the spool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpooledBatch {
    /// Row id: grows with every insert and is never reused.
    pub id: i64,
    pub signal: Signal,
    pub items: u64,
    /// `payload.len()`.
    pub bytes: u64,
    pub created_ms: i64,
    pub attempts: u32,
    /// One valid OTLP export request of `signal`.
    pub payload: Bytes,
}

/// What the spool holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpoolStats {
    pub rows: u64,
    /// Sum of payload bytes (not the file size).
    pub bytes: u64,
    /// Items per signal, indexed by [`Signal::index`].
    pub items: [u64; 3],
    /// Smallest `created_ms` of any row; None when empty.
    pub oldest_created_ms: Option<i64>,
    /// Rows upstream acknowledged whose delete has not committed yet (full
    /// disk): not in `rows`, `bytes` or `items`, never handed out again; the
    /// delete is retried (see `maintain.rs`).
    pub delete_pending_rows: u64,
    /// Items in those rows: sent again after a restart if still pending.
    pub delete_pending_items: u64,
    /// Why the last write was refused for lack of room, while that lasts:
    /// the file is at `spool.max_bytes`, or the disk is full.
    pub full: Option<FullReason>,
}

/// What [`Spool::open`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenReport {
    /// Where an unusable file was moved, and why; the caller logs it.
    pub quarantined: Option<(PathBuf, String)>,
    /// For a damaged spool: what was copied from it into the fresh spool
    /// (and is in `stats`), and what was lost (`salvage.rs`).
    pub salvaged: Option<Salvage>,
    /// Contents after opening: the backlog to replay.
    pub stats: SpoolStats,
}

/// Result of [`Spool::insert`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InsertOutcome {
    /// The first `written` batches of the input were committed; the rest were not.
    pub written: usize,
    /// The spool (or the disk) had no room for batch number `written`.
    pub full: bool,
    /// The row ids of the `written` batches, in input order.
    pub ids: Vec<i64>,
}

/// Handle to the spool. Clones share one worker thread and one connection.
#[derive(Clone)]
pub struct Spool {
    inner: Arc<Inner>,
}

struct Inner {
    /// Commands to the worker; a send fails once the worker has exited.
    commands: mpsc::Sender<Command>,
    /// Written by the worker after every command, read by `stats_cached`.
    stats: Arc<Mutex<SpoolStats>>,
    /// Taken by the first `close` to join the worker.
    thread: Mutex<Option<JoinHandle<()>>>,
    /// Set by the worker while unclaimed rows may wait (`claims.rs`).
    unclaimed: Arc<Unclaimed>,
    /// Noted by the pipeline, read by the worker's vacuum (`maintain.rs`).
    live: Arc<LiveLoad>,
}

impl Spool {
    /// Opens (creating, checking or quarantining as needed) the spool at `path` and
    /// starts its worker thread. Blocks: call it before the runtime serves traffic.
    pub fn open(path: &Path, opts: SpoolOptions) -> Result<(Spool, OpenReport), SpoolError> {
        let (opened_tx, opened_rx) = mpsc::sync_channel(1);
        let (commands, rx) = mpsc::channel();
        let stats = Arc::new(Mutex::new(SpoolStats::default()));
        let worker_stats = Arc::clone(&stats);
        let unclaimed = Arc::new(Unclaimed::new());
        let worker_unclaimed = Arc::clone(&unclaimed);
        let live = Arc::new(LiveLoad::default());
        let worker_live = Arc::clone(&live);
        let path = path.to_owned();
        let thread = thread::Builder::new()
            .name("telespool-spool".into())
            .spawn(move || {
                let (store, report) = match Store::open(&path, &opts) {
                    Ok(opened) => opened,
                    Err(e) => {
                        let _ = opened_tx.send(Err(e));
                        return;
                    }
                };
                worker::publish(&worker_stats, store.stats());
                if opened_tx.send(Ok(report)).is_ok() {
                    worker::run(store, rx, &worker_stats, &worker_unclaimed, &worker_live);
                }
            })
            .map_err(SpoolError::Thread)?;
        match opened_rx.recv() {
            Ok(Ok(report)) => {
                let inner = Inner {
                    commands,
                    stats,
                    thread: Mutex::new(Some(thread)),
                    unclaimed,
                    live,
                };
                let spool = Spool {
                    inner: Arc::new(inner),
                };
                Ok((spool, report))
            }
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(SpoolError::WorkerPanicked)
            }
        }
    }

    /// Writes all `batches` in one transaction. When they do not fit, writes them
    /// one per transaction in order until one does not fit and reports `full`.
    /// The rows wait for replay.
    pub async fn insert(&self, batches: Vec<NewBatch>) -> Result<InsertOutcome, SpoolError> {
        self.call(|reply| Command::Insert(batches, Claim::No, reply))
            .await
    }

    /// As [`Spool::insert`], and the written rows are claimed for the caller
    /// in the same command (`claims.rs`): no replay read returns them until
    /// the caller deletes or releases them.
    pub async fn insert_claimed(
        &self,
        batches: Vec<NewBatch>,
    ) -> Result<InsertOutcome, SpoolError> {
        self.call(|reply| Command::Insert(batches, Claim::ForCaller, reply))
            .await
    }

    /// The next replay run, claimed: the oldest unclaimed row (after the
    /// last run's first row, wrapping round once) and after it further
    /// unclaimed rows of its signal within `max_items` and `max_bytes`. Empty
    /// when every row is claimed; then [`Unclaimed::any`] is false until
    /// unclaimed rows appear.
    pub async fn claim_run(
        &self,
        max_items: u64,
        max_bytes: u64,
    ) -> Result<Vec<SpooledBatch>, SpoolError> {
        self.call(|reply| Command::ClaimRun(max_items, max_bytes, reply))
            .await
    }

    /// Gives claimed rows back undelivered, to be replayed later;
    /// `attempted`: count one more export attempt for each. Does not wait:
    /// the spool thread runs it after every command sent before it.
    pub fn release(&self, ids: Vec<i64>, attempted: bool) {
        if !ids.is_empty() {
            // A closed spool has no claims left to release.
            let _ = self.inner.commands.send(Command::Release(ids, attempted));
        }
    }

    /// Deletes rows upstream is done with (and forgets their claims), as
    /// [`Spool::delete`], without waiting for the commit: an exporter goes on
    /// with its next batch while the delete waits for its turn. A failure is
    /// logged by the spool thread.
    pub fn finish(&self, ids: Vec<i64>) {
        if ids.is_empty() {
            return;
        }
        if self
            .inner
            .commands
            .send(Command::Delete(ids, None))
            .is_err()
        {
            tracing::error!("cannot delete exported batches: the spool is closed; they will be sent again after a restart");
        }
    }

    /// Whether unclaimed rows may wait in the spool, and the wake-up for
    /// when they appear.
    pub fn unclaimed(&self) -> &Unclaimed {
        &self.inner.unclaimed
    }

    /// The pipeline is serving live load now: giving free pages back to the
    /// disk waits until it has been quiet for a moment (at most a minute).
    pub fn live_load_seen(&self) {
        self.inner.live.seen(tokio::time::Instant::now());
    }

    /// Whether the worker's vacuum sees live load now.
    #[cfg(test)]
    pub(crate) fn live_load_present(&self) -> bool {
        self.inner.live.present(tokio::time::Instant::now())
    }

    /// Up to `limit` rows with `id > after_id`, oldest first (pass 0 to start).
    pub async fn oldest(
        &self,
        after_id: i64,
        limit: usize,
    ) -> Result<Vec<SpooledBatch>, SpoolError> {
        self.call(|reply| Command::Oldest(after_id, limit, reply))
            .await
    }

    /// The oldest row with `id > after_id` that is not in `claimed`.
    pub async fn oldest_unclaimed(
        &self,
        after_id: i64,
        claimed: HashSet<i64>,
    ) -> Result<Option<SpooledBatch>, SpoolError> {
        self.call(|reply| Command::OldestUnclaimed(after_id, claimed, reply))
            .await
    }

    /// A replay run: the oldest row with `id > after_id` not in `claimed`,
    /// and after it further unclaimed rows of its signal while their items and
    /// bytes stay within `max_items` and `max_bytes` (the first row is taken
    /// whatever its size). Empty when there is no such row.
    pub async fn oldest_run(
        &self,
        after_id: i64,
        claimed: HashSet<i64>,
        max_items: u64,
        max_bytes: u64,
    ) -> Result<Vec<SpooledBatch>, SpoolError> {
        self.call(|reply| Command::OldestRun(after_id, claimed, max_items, max_bytes, reply))
            .await
    }

    /// Deletes these rows in one transaction; ids no longer present are ignored.
    /// Deletes that queue up behind one another share a transaction. When the
    /// delete cannot commit (a full disk) the rows become delete-pending:
    /// excluded from reads and counts, retried in the background, and this
    /// returns Ok; other failures leave them delete-pending too and return the
    /// error.
    pub async fn delete(&self, ids: Vec<i64>) -> Result<(), SpoolError> {
        self.call(|reply| Command::Delete(ids, Some(reply))).await
    }

    /// Adds one to the row's `attempts`; a missing id is ignored.
    pub async fn record_attempt(&self, id: i64) -> Result<(), SpoolError> {
        self.call(|reply| Command::RecordAttempt(id, reply)).await
    }

    /// Deletes the oldest rows until their payloads add up to at least
    /// `bytes_needed` (or the spool is empty), in one transaction. Returns the signal
    /// and item count of every dropped row, oldest first, for drop counters.
    /// Claimed rows (being exported right now) and rows in `keep` are skipped.
    pub async fn drop_oldest(
        &self,
        bytes_needed: u64,
        keep: Vec<i64>,
    ) -> Result<Vec<(Signal, u64)>, SpoolError> {
        self.call(|reply| Command::DropOldest(bytes_needed, keep, reply))
            .await
    }

    /// Counts recomputed from the table (also refreshes [`Spool::stats_cached`]).
    pub async fn stats(&self) -> Result<SpoolStats, SpoolError> {
        self.call(Command::Stats).await
    }

    /// The counts as of the last completed command, without a round trip.
    pub fn stats_cached(&self) -> SpoolStats {
        self.inner
            .stats
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Checkpoints and truncates the WAL, closes the file, releases the lock and
    /// joins the worker. Other clones get [`SpoolError::Closed`] afterwards.
    pub async fn close(self) -> Result<(), SpoolError> {
        let closed = self.call(Command::Close).await;
        let thread = self
            .inner
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(thread) = thread {
            // The worker has replied and is returning; join off the runtime anyway.
            let joined = tokio::task::spawn_blocking(move || thread.join()).await;
            if !matches!(joined, Ok(Ok(()))) {
                return Err(SpoolError::WorkerPanicked);
            }
        }
        closed
    }

    async fn call<T>(&self, command: impl FnOnce(Reply<T>) -> Command) -> Result<T, SpoolError> {
        let (reply, answer) = oneshot::channel();
        self.inner
            .commands
            .send(command(reply))
            .map_err(|_| SpoolError::Closed)?;
        answer.await.map_err(|_| SpoolError::Closed)?
    }
}
