//! Upkeep the spool thread does between commands: deletes that were left
//! pending, the disk-full state, and giving free pages back to the disk.
//!
//! # Delete pending
//!
//! A row whose batch upstream acknowledged must never be sent again by this
//! process, even when its delete cannot commit (a full disk cannot take the
//! WAL frames of a delete). Such a row is *delete-pending*: the worker keeps
//! its id (and counts) in memory, leaves it out of every read, of the counts
//! and of eviction, and retries the delete here. Were the agent to stop before
//! the retry succeeds, the row is replayed at the next start: the only
//! duplicate a full disk risks, and it is logged (with its items) at close.
//!
//! # Giving space back
//!
//! Freed pages stay in the file. Files this version creates use
//! `auto_vacuum = INCREMENTAL`, and once at least half the file is free pages
//! (and more than [`VACUUM_MIN_BYTES`]) each maintenance pass runs
//! `PRAGMA incremental_vacuum(N)` for a bounded N, so the file shrinks in small
//! steps (truncated at the next checkpoint) between commands, never in one long
//! stall of ingest. While replay is draining the spool (exported rows deleted
//! within the last [`DRAINING_FOR`]) the steps wait until it is empty: moving the pages of rows that
//! are about to be deleted would only slow the replay down (a 1 GiB backlog
//! replayed at about a quarter of the rate with those steps running: the
//! `replay-live` bench). Nor does it run while the pipeline serves live load
//! ([`LiveLoad`]), for up to [`LIVE_DEFER_MAX`]: the steps and the truncating
//! checkpoints after a 1 GiB drain took the CPU and the disk live clients
//! were waiting on. A file from an older version (`auto_vacuum = NONE`)
//! is converted with one `VACUUM` the first time it is empty, when that is
//! cheap.

use std::fs;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::disk::FullReason;
use super::open::sibling;
use super::store::{Removed, Store};

/// How often the worker runs [`Store::maintain`] (also when idle).
pub(super) const INTERVAL: Duration = Duration::from_millis(100);
/// Size of the WAL file past which the spool thread waits for a complete
/// checkpoint before its next command: twice `journal_size_limit`.
const WAL_HIGH: u64 = 64 << 20;
/// How long it waits at most (the checkpoint thread's pass plus the rest).
const WAL_WAIT: Duration = Duration::from_secs(5);
/// A delete this recent means replay is draining the spool: vacuum waits.
/// Durable mode under load deletes all the time, so its file keeps its
/// high-water size (free pages are reused) instead of shrinking and growing.
const DRAINING_FOR: Duration = Duration::from_secs(5);
/// Free space below which the file is left as it is.
const VACUUM_MIN_BYTES: u64 = 4 << 20;
/// Pages per vacuum step while rows remain (pages may have to move).
const VACUUM_STEP_BUSY: u64 = 1024;
/// Pages per vacuum step when the spool is empty (pages only drop off the end).
const VACUUM_STEP_EMPTY: u64 = 16384;
/// Live load counts as present this long after the pipeline last noted it.
const LIVE_WINDOW: Duration = Duration::from_secs(1);
/// The longest vacuum waits for live load to stop before it runs anyway.
pub(super) const LIVE_DEFER_MAX: Duration = Duration::from_secs(60);

/// Live load as the pipeline sees it (a batch opened in memory), so that
/// giving disk space back waits for a quiet moment: a 1 GiB spool's vacuum
/// after a drain, next to live clients, doubled their p99 in the
/// `replay-live` bench. Shared by the [`super::Spool`] handles and the
/// worker; noted about once per batch.
#[derive(Debug, Default)]
pub(super) struct LiveLoad {
    until: Mutex<Option<Instant>>,
}

impl LiveLoad {
    /// The pipeline holds live data at `now`.
    pub(super) fn seen(&self, now: Instant) {
        if let Ok(mut until) = self.until.lock() {
            *until = Some(now + LIVE_WINDOW);
        }
    }

    pub(super) fn present(&self, now: Instant) -> bool {
        self.until
            .lock()
            .map(|until| until.is_some_and(|t| now < t))
            .unwrap_or(false)
    }
}

/// Where giving a spool file's free pages back stands: each transition is
/// logged once, so an operator sees why an empty spool keeps its size for a
/// while (live load) and when it shrinks.
#[derive(Debug, Default)]
pub(super) struct VacuumEpisode {
    /// Since when an empty spool's vacuum has been waiting for live load.
    pub(super) waiting_since: Option<Instant>,
    /// Steps have started, with this many bytes free, and the file is not
    /// yet down to size.
    pub(super) started_with: Option<u64>,
}

/// Free space from which giving it back is logged at info (debug below):
/// a durable-mode spool under bursty load frees a few MiB after each burst.
const VACUUM_LOG_BYTES: u64 = 64 << 20;

/// A [`VacuumEpisode`] line: info when `$bytes` reach [`VACUUM_LOG_BYTES`].
macro_rules! vacuum_event {
    ($bytes:expr, $($line:tt)+) => {
        if $bytes >= VACUUM_LOG_BYTES {
            tracing::info!($($line)+)
        } else {
            tracing::debug!($($line)+)
        }
    };
}

impl Store {
    /// Remembers `ids` as delete-pending and takes them out of the counts.
    pub(super) fn mark_pending(&mut self, ids: &[i64]) {
        let mut newly: Vec<Removed> = Vec::new();
        for &id in ids {
            if self.pending.contains_key(&id) {
                continue;
            }
            let row = self.conn.query_row(
                "SELECT signal, items, bytes, created_ms FROM batches WHERE id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            );
            match row {
                Ok(row) => {
                    self.pending.insert(id, row.clone());
                    newly.push(row);
                }
                Err(rusqlite::Error::QueryReturnedNoRows) => {}
                Err(e) => {
                    // Unknown size: still never handed out again.
                    tracing::warn!(id, error = %e, "cannot read a spool row whose delete is pending");
                    self.pending.insert(id, (String::new(), 0, 0, 0));
                }
            }
        }
        if newly.is_empty() {
            return;
        }
        if self.pending.len() == newly.len() {
            tracing::warn!(
                path = %self.path.display(),
                rows = newly.len(),
                "cannot delete exported batches from the spool (disk full?); they are kept as delete pending, never sent again by this process, and the delete is retried"
            );
        }
        if let Err(e) = self.remove(&newly) {
            tracing::debug!(error = %e, "recomputing the oldest spool row");
        }
    }

    /// Tries the pending deletes again, in one transaction.
    pub(super) fn retry_pending(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let ids: Vec<i64> = self.pending.keys().copied().collect();
        match self.delete_rows(&ids) {
            Ok(_) => {
                tracing::info!(
                    path = %self.path.display(),
                    rows = ids.len(),
                    "deleted the exported batches whose delete was pending"
                );
                self.pending.clear();
            }
            Err(e) => {
                if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull) {
                    self.headroom.release();
                }
                tracing::debug!(error = %e, rows = ids.len(), "pending spool deletes still fail");
            }
        }
        self.sync_flags();
    }

    /// Between two commands of the spool thread: after a pass of the
    /// checkpoint thread, copies the frames committed while it ran
    /// (`checkpoint.rs`). Nothing is appended meanwhile, so this pass reaches
    /// the end of the WAL, and the next write transaction starts the WAL over
    /// from its beginning. When the WAL file has grown past [`WAL_HIGH`]
    /// anyway (commits outpacing what the disk takes), it waits for the
    /// checkpoint thread's pass and copies the rest: commits wait with it,
    /// which is the backpressure that keeps the WAL, outside `max_bytes`,
    /// bounded on disk. A failure (a full disk, say) is retried later.
    pub(super) fn finish_checkpoint(&mut self) {
        let passed = self.checkpointer.as_ref().is_some_and(|c| c.take_pass());
        let oversized =
            || fs::metadata(sibling(&self.path, "-wal")).is_ok_and(|m| m.len() > WAL_HIGH);
        if !passed && !oversized() {
            return;
        }
        let waited = Instant::now();
        loop {
            // (busy, frames in the WAL, frames copied): busy while the
            // checkpoint thread is in a pass.
            let pass = self
                .conn
                .prepare_cached("PRAGMA wal_checkpoint(PASSIVE)")
                .and_then(|mut stmt| stmt.query_row([], |r| r.get::<_, i64>(0)));
            match pass {
                Ok(0) => return,
                Ok(_) if waited.elapsed() < WAL_WAIT && oversized() => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Ok(_) => return,
                Err(e) => {
                    tracing::debug!(path = %self.path.display(), error = %e, "finishing a spool checkpoint failed");
                    return;
                }
            }
        }
    }

    /// One maintenance pass, at most every [`INTERVAL`]. `live`: the
    /// pipeline holds live data ([`LiveLoad`]); vacuum then waits, for at
    /// most [`LIVE_DEFER_MAX`] at a time.
    pub(super) fn maintain(&mut self, now: Instant, live: bool) {
        if now.duration_since(self.maintained) < INTERVAL {
            return;
        }
        self.maintained = now;
        self.retry_pending();
        let draining = self
            .last_delete
            .is_some_and(|t| now.saturating_duration_since(t) < DRAINING_FOR);
        let since = match live {
            true => *self.live_since.get_or_insert(now),
            false => {
                self.live_since = None;
                now
            }
        };
        let defer = live && now.saturating_duration_since(since) < LIVE_DEFER_MAX;
        self.vacuum_step(draining, defer);
        if self.headroom.disk_full() && !self.pending.is_empty() {
            // Deletes that cannot commit on a full disk.
            self.start_over_if_empty();
        }
        if self.headroom.disk_full() && self.headroom.restore() {
            tracing::info!(
                path = %self.path.display(),
                "the disk holding the spool has room again; spool reserve restored"
            );
            if self.full == Some(FullReason::Disk) {
                self.full = None;
            }
        }
        self.sync_flags();
    }

    fn page_counts(&self) -> rusqlite::Result<(u64, u64)> {
        let pages: i64 = self.conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
        let free: i64 = self
            .conn
            .query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
        Ok((pages.unsigned_abs(), free.unsigned_abs()))
    }

    /// Shrinks the file by one bounded step if it is mostly free pages.
    /// While rows remain and replay is `draining` them, it waits (unless the
    /// disk is full): moving the remaining rows' pages down the file would
    /// compete with the replay reading them, and once the spool is empty the
    /// step only drops pages off the end.
    /// `live`: live clients are being served; the step waits (unless the
    /// disk is full).
    pub(super) fn vacuum_step(&mut self, draining: bool, live: bool) {
        let Ok((pages, free)) = self.page_counts() else {
            return;
        };
        let empty = self.stats.rows == 0 && self.pending.is_empty();
        // On a full disk, space back comes first.
        let wait = ((draining && !empty) || live) && !self.headroom.disk_full();
        if self.auto_vacuum != 2 {
            if !wait && self.auto_vacuum == 0 && empty && pages * self.page_size > VACUUM_MIN_BYTES
            {
                self.convert_to_incremental();
            }
            return;
        }
        let worth = free * self.page_size > VACUUM_MIN_BYTES && free * 2 >= pages;
        // On a full disk an empty spool gives back whatever it holds.
        let full_and_empty = empty && self.headroom.disk_full() && free > 0;
        let free_bytes = free * self.page_size;
        let file_bytes = pages * self.page_size;
        if !worth && !full_and_empty {
            if let Some(freed) = self.vacuum.started_with {
                vacuum_event!(
                    freed,
                    path = %self.path.display(),
                    file_bytes,
                    "spool file gave its free pages back to the disk"
                );
            }
            self.vacuum = VacuumEpisode::default();
            return;
        }
        if wait {
            if live && empty && self.vacuum.waiting_since.is_none() {
                vacuum_event!(
                    free_bytes,
                    path = %self.path.display(),
                    free_bytes,
                    file_bytes,
                    max_wait_s = LIVE_DEFER_MAX.as_secs(),
                    "spool is empty; its free pages go back to the disk once live load pauses"
                );
                self.vacuum.waiting_since = Some(Instant::now());
            }
            return;
        }
        if self.vacuum.started_with.is_none() {
            let waited_ms = self
                .vacuum
                .waiting_since
                .map_or(0, |t| t.elapsed().as_millis());
            vacuum_event!(
                free_bytes,
                path = %self.path.display(),
                free_bytes,
                file_bytes,
                waited_ms,
                "giving the spool's free pages back to the disk"
            );
            self.vacuum.started_with = Some(free_bytes);
        }
        let step = if empty {
            VACUUM_STEP_EMPTY
        } else {
            VACUUM_STEP_BUSY
        };
        // The pragma frees one page per step of its statement (it returns a
        // row per page), so all rows are read; one statement, one transaction.
        let vacuumed = (|| {
            let mut stmt = self
                .conn
                .prepare(&format!("PRAGMA incremental_vacuum({step})"))?;
            let mut rows = stmt.query([])?;
            while rows.next()?.is_some() {}
            Ok::<(), rusqlite::Error>(())
        })();
        if let Err(e) = vacuumed {
            tracing::debug!(error = %e, "spool vacuum step failed; will retry");
            if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull) {
                self.headroom.release();
                self.start_over_if_empty();
            }
        }
    }

    /// An empty spool from an older version: one `VACUUM` (cheap when empty)
    /// switches it to incremental vacuum and gives its free pages back.
    fn convert_to_incremental(&mut self) {
        let converted = self
            .conn
            .execute_batch("PRAGMA auto_vacuum = INCREMENTAL; VACUUM;")
            .and_then(|()| {
                self.conn
                    .query_row("PRAGMA auto_vacuum", [], |r| r.get::<_, i64>(0))
            });
        match converted {
            Ok(mode) => {
                self.auto_vacuum = mode;
                tracing::info!(path = %self.path.display(), "spool is empty: vacuumed it and switched it to incremental vacuum");
            }
            Err(e) => {
                // Not retried in a loop: mark it done for this run.
                self.auto_vacuum = -1;
                tracing::warn!(path = %self.path.display(), error = %e, "cannot vacuum the empty spool; its file keeps its size");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{NewBatch, SpoolOptions};
    use super::*;
    use crate::signal::Signal;

    /// A spool in `dir` holding 200 rows of 64 KiB; their ids.
    fn store_of_200_rows(dir: &tempfile::TempDir) -> (Store, Vec<i64>) {
        let path = dir.path().join("spool.db");
        let (mut store, _) = Store::open(&path, &SpoolOptions::default()).unwrap();
        let rows: Vec<NewBatch> = (0..200)
            .map(|i| NewBatch {
                signal: Signal::Traces,
                items: 1,
                created_ms: i,
                attempts: 0,
                payload: vec![bytes::Bytes::from(vec![i as u8; 64 << 10])],
            })
            .collect();
        let ids = store.insert(&rows).unwrap().ids;
        (store, ids)
    }

    /// With no checkpoint thread keeping up (here: none at all), the WAL
    /// still stops near `WAL_HIGH`: the spool thread checkpoints it whole
    /// before its next command, and the next commit starts it over.
    #[test]
    fn a_wal_past_its_high_mark_is_checkpointed_whole_between_commands() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("telemetry-spool");
        let (mut store, _) = Store::open(&path, &SpoolOptions::default()).unwrap();
        if let Some(mut checkpointer) = store.checkpointer.take() {
            checkpointer.stop();
        }
        let wal = dir.path().join("telemetry-spool-wal");
        let mut largest = 0;
        for i in 0..96 {
            let row = NewBatch {
                signal: Signal::Logs,
                items: 1,
                created_ms: i,
                attempts: 0,
                payload: vec![bytes::Bytes::from(vec![i as u8; 1 << 20])],
            };
            store.finish_checkpoint();
            let ids = store.insert(std::slice::from_ref(&row)).unwrap().ids;
            store.delete(&ids).unwrap();
            largest = largest.max(fs::metadata(&wal).unwrap().len());
        }
        // 96 MiB went through; without the high mark the WAL holds all of it
        // (the writer's own autocheckpoint is at 128 MiB).
        assert!(
            largest < WAL_HIGH + (4 << 20),
            "the WAL grew to {largest} bytes"
        );
    }

    #[test]
    fn a_drained_spool_gives_its_pages_back_in_bounded_steps() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, ids) = store_of_200_rows(&dir);
        store.delete(&ids).unwrap();
        let (pages, free) = store.page_counts().unwrap();
        assert!(free * 2 > pages, "{free} of {pages} pages free");
        store.vacuum_step(false, false);
        let (after, _) = store.page_counts().unwrap();
        assert!(
            pages - after >= free.min(VACUUM_STEP_EMPTY) - 1,
            "one step frees a whole step: {pages} -> {after} pages"
        );
    }

    #[test]
    fn under_live_load_an_empty_spools_vacuum_waits_until_the_load_stops() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, ids) = store_of_200_rows(&dir);
        store.delete(&ids).unwrap();
        let (pages, _) = store.page_counts().unwrap();
        let t0 = Instant::now() + INTERVAL;
        for i in 0..10 {
            store.maintain(t0 + INTERVAL * i, true);
        }
        assert_eq!(
            store.page_counts().unwrap().0,
            pages,
            "no step while live clients are served"
        );
        store.maintain(t0 + INTERVAL * 10, false);
        let (after, _) = store.page_counts().unwrap();
        assert!(
            after < pages,
            "a step once it is quiet: {pages} -> {after} pages"
        );
    }

    #[test]
    fn steady_live_load_holds_vacuum_back_for_at_most_its_ceiling() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, ids) = store_of_200_rows(&dir);
        store.delete(&ids).unwrap();
        let (pages, _) = store.page_counts().unwrap();
        let t0 = Instant::now() + INTERVAL;
        store.maintain(t0, true);
        store.maintain(t0 + LIVE_DEFER_MAX - INTERVAL, true);
        assert_eq!(store.page_counts().unwrap().0, pages, "still waiting");
        store.maintain(t0 + LIVE_DEFER_MAX, true);
        let (after, _) = store.page_counts().unwrap();
        assert!(
            after < pages,
            "a step after {LIVE_DEFER_MAX:?} of live load: {pages} -> {after} pages"
        );
    }

    #[test]
    fn live_load_is_present_for_its_window_after_it_was_seen() {
        let live = LiveLoad::default();
        let t0 = Instant::now();
        assert!(!live.present(t0), "not seen yet");
        live.seen(t0);
        assert!(live.present(t0 + LIVE_WINDOW - Duration::from_millis(1)));
        assert!(!live.present(t0 + LIVE_WINDOW));
    }

    #[test]
    fn while_replay_drains_the_spool_vacuum_waits_and_it_runs_once_rows_stop_going() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, ids) = store_of_200_rows(&dir);
        // The oldest three quarters replayed; the newest rows remain.
        store.delete(&ids[..150]).unwrap();
        let (pages, free) = store.page_counts().unwrap();
        assert!(free * 2 > pages, "{free} of {pages} pages free");
        store.vacuum_step(true, false);
        assert_eq!(
            store.page_counts().unwrap().0,
            pages,
            "no step while draining"
        );
        store.vacuum_step(false, false);
        let (after, _) = store.page_counts().unwrap();
        assert!(
            after < pages,
            "a step once not draining: {pages} -> {after} pages"
        );
        assert_eq!(store.refresh_stats().unwrap().rows, 50, "rows kept");
    }
}
