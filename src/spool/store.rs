//! The synchronous SQLite side of the spool: the connection's settings, the schema
//! and the statements. Only the worker thread and the offline tools call it.
//!
//! Longer than 500 lines on purpose: `Store`'s fields (`stats`, `pending`,
//! `full`, the headroom) are private to this file, and every statement that
//! changes rows keeps them in step, so those statements stay beside them.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, OpenOptions, Permissions};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use rusqlite::blob::{Blob, ZeroBlob};
use rusqlite::{params, Connection, ErrorCode, OpenFlags, OptionalExtension, MAIN_DB};

use super::checkpoint::Checkpointer;
use super::disk::{FullReason, Headroom};
use super::maintain::VacuumEpisode;
use super::open::{
    ensure_dir, ensure_files_private, file_err, inspect, is_damage, lock, quarantine, SpoolLock,
};
use super::salvage::salvage;
use super::{
    InsertOutcome, NewBatch, OpenReport, SpoolError, SpoolOptions, SpoolStats, SpooledBatch,
    Synchronous, APPLICATION_ID, SCHEMA_VERSION,
};
use crate::signal::Signal;

const CREATE_TABLE: &str = "CREATE TABLE IF NOT EXISTS batches(
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    signal TEXT NOT NULL,
    items INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    attempts INTEGER NOT NULL,
    payload BLOB NOT NULL)";
/// `min(created_ms)` (the oldest row's age, recomputed whenever the oldest
/// rows are deleted: after every replayed run) reads this index, not every
/// row. Without it the query visits one leaf page per row (payloads are
/// inline): on a 1 GiB backlog of 6624 rows, 27 MB of reads per delete, 26 %
/// of the agent's CPU while replaying (`replay-live` bench). The schema
/// version stays: older versions open such a file as before and SQLite keeps
/// the index up to date for them. Files without it get it at open (one pass
/// over the rows, like the counts at open); where that fails (a full disk),
/// the query scans as before.
const CREATE_INDEX: &str = "CREATE INDEX IF NOT EXISTS batches_created_ms ON batches(created_ms)";
/// The WAL is cut back to this size after a checkpoint that emptied it.
const JOURNAL_SIZE_LIMIT: i64 = 32 << 20;
/// Pages appended to the WAL before a commit checkpoints it itself (SQLite's
/// default is 1000). Only a backstop: [`Checkpointer`] checkpoints every
/// 100 ms on its own connection, off the commit path, and past `WAL_HIGH`
/// (`maintain.rs`, 64 MiB) the spool thread completes one itself; 128 MiB
/// at 4 KiB pages.
const WAL_AUTOCHECKPOINT_PAGES: i64 = 32768;

/// Creates the spool file ourselves so it is 0600 from the start; SQLite
/// gives the -wal and -shm files the same mode.
pub(super) fn create_private(path: &Path) -> Result<(), SpoolError> {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(path)
        .map_err(file_err("create", path))?;
    fs::set_permissions(path, Permissions::from_mode(0o600)).map_err(file_err("chmod", path))
}

pub(super) fn sql_err(path: &Path) -> impl Fn(rusqlite::Error) -> SpoolError + '_ {
    move |source| match source.sqlite_error_code() {
        Some(ErrorCode::DiskFull) => SpoolError::Full {
            path: path.to_owned(),
        },
        _ => SpoolError::Sqlite {
            path: path.to_owned(),
            source,
        },
    }
}

fn is_full(e: &rusqlite::Error) -> bool {
    e.sqlite_error_code() == Some(ErrorCode::DiskFull)
}

/// Counts recomputed from the table.
pub(super) fn compute_stats(conn: &Connection) -> rusqlite::Result<SpoolStats> {
    let mut stats = SpoolStats::default();
    let mut stmt = conn.prepare(
        "SELECT signal, count(*), sum(bytes), sum(items), min(created_ms)
         FROM batches GROUP BY signal",
    )?;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        let signal: String = row.get(0)?;
        stats.rows += row.get::<_, i64>(1)?.unsigned_abs();
        stats.bytes += row.get::<_, i64>(2)?.unsigned_abs();
        if let Ok(signal) = signal.parse::<Signal>() {
            stats.items[signal.index()] += row.get::<_, i64>(3)?.unsigned_abs();
        }
        let oldest: Option<i64> = row.get(4)?;
        stats.oldest_created_ms = min_opt(stats.oldest_created_ms, oldest);
    }
    Ok(stats)
}

fn min_opt(a: Option<i64>, b: Option<i64>) -> Option<i64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Signal, items, bytes and created_ms of a deleted row.
pub(super) type Removed = (String, i64, i64, i64);

/// An open spool: the connection, the lock, and counts kept in step with the table.
pub(super) struct Store {
    /// Checkpoints the WAL on its own connection; stopped before `conn` closes.
    pub(super) checkpointer: Option<Checkpointer>,
    pub(super) conn: Connection,
    /// What the spool was opened with (`restart.rs` opens a fresh file).
    pub(super) opts: SpoolOptions,
    pub(super) path: PathBuf,
    /// Counts of the rows that are live: rows whose delete is pending are not
    /// in them.
    pub(super) stats: SpoolStats,
    /// Rows upstream acknowledged whose delete did not commit (a full disk):
    /// never handed out again, excluded from the counts, deleted by
    /// `maintain`. Owned by the worker thread, like everything here.
    pub(super) pending: BTreeMap<i64, Removed>,
    /// The reserve file and the disk-full state (`disk.rs`).
    pub(super) headroom: Headroom,
    /// Why the last insert was refused for lack of room, while that lasts.
    pub(super) full: Option<FullReason>,
    pub(super) page_size: u64,
    /// `PRAGMA auto_vacuum` of the file: 2 (incremental) for files this
    /// version created; 0 for older ones until they are converted.
    pub(super) auto_vacuum: i64,
    /// Last time `maintain` ran.
    pub(super) maintained: tokio::time::Instant,
    /// When exported rows were last deleted: while that is recent, replay is
    /// draining the spool (`maintain.rs` then leaves vacuum for when it is empty).
    pub(super) last_delete: Option<tokio::time::Instant>,
    /// Since when live load has been present without a break (`maintain.rs`).
    pub(super) live_since: Option<tokio::time::Instant>,
    /// Where giving free pages back stands, for its log lines (`maintain.rs`).
    pub(super) vacuum: VacuumEpisode,
    _lock: SpoolLock,
}

impl Store {
    pub(super) fn open(
        path: &Path,
        opts: &SpoolOptions,
    ) -> Result<(Store, OpenReport), SpoolError> {
        ensure_dir(path)?;
        let lock = lock(path)?;
        ensure_files_private(path)?;
        let mut quarantined = None;
        if path.exists() {
            if let Some(why) = inspect(path)? {
                quarantined = Some((quarantine(path)?, why));
            }
        }
        // A telespool spool that is damaged (not a foreign or garbage file):
        // its readable rows are copied into the fresh spool below.
        let damaged = quarantined
            .as_ref()
            .filter(|(_, why)| is_damage(why))
            .cloned();
        create_private(path)?;

        let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE)
            .map_err(sql_err(path))?;
        let mut store = Store {
            checkpointer: None,
            conn,
            opts: opts.clone(),
            path: path.to_owned(),
            stats: SpoolStats::default(),
            pending: BTreeMap::new(),
            headroom: Headroom::new(path, opts.max_bytes),
            full: None,
            page_size: 4096,
            auto_vacuum: 0,
            maintained: tokio::time::Instant::now(),
            last_delete: None,
            live_since: None,
            vacuum: VacuumEpisode::default(),
            _lock: lock,
        };
        store.configure(opts).map_err(sql_err(path))?;
        store.checkpointer = Some(Checkpointer::start(path, opts.synchronous)?);
        let salvaged = damaged.map(|(moved, why)| salvage(&moved, &why, &mut store));
        store.refresh_stats()?;
        let stats = store.stats.clone();
        let report = OpenReport {
            quarantined,
            salvaged,
            stats,
        };
        Ok((store, report))
    }

    pub(super) fn configure(&mut self, opts: &SpoolOptions) -> rusqlite::Result<()> {
        let conn = &self.conn;
        conn.busy_timeout(Duration::from_secs(5))?;
        // Every statement the spool thread runs stays prepared (default: 16).
        conn.set_prepared_statement_cache_capacity(64);
        let objects: i64 =
            conn.query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))?;
        if objects == 0 {
            // Only takes effect before the file's header is written (before
            // WAL mode, before the first table): new files give their free
            // pages back to the disk (`maintain.rs`).
            conn.execute_batch("PRAGMA auto_vacuum = INCREMENTAL")?;
        }
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(path = %self.path.display(), %mode, "SQLite refused WAL journal mode for the spool");
        }
        let sync = match opts.synchronous {
            Synchronous::Normal => "NORMAL",
            Synchronous::Full => "FULL",
        };
        conn.pragma_update(None, "synchronous", sync)?;
        let page_size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
        self.page_size = page_size.max(512).unsigned_abs();
        let pages = i64::try_from(opts.max_bytes / page_size.max(1).unsigned_abs())
            .unwrap_or(i64::MAX)
            .max(1);
        let _: i64 = conn.query_row(&format!("PRAGMA max_page_count = {pages}"), [], |r| {
            r.get(0)
        })?;
        let _: i64 = conn.query_row(
            &format!("PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_PAGES}"),
            [],
            |r| r.get(0),
        )?;
        let _: i64 = conn.query_row(
            &format!("PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}"),
            [],
            |r| r.get(0),
        )?;
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version < SCHEMA_VERSION {
            conn.execute_batch(&format!(
                "BEGIN IMMEDIATE;
                 {CREATE_TABLE};
                 PRAGMA application_id = {APPLICATION_ID};
                 PRAGMA user_version = {SCHEMA_VERSION};
                 COMMIT;"
            ))?;
        }
        let conn = &self.conn;
        if let Err(e) = conn.execute_batch(CREATE_INDEX) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot index the spool by creation time; the oldest row's age is found by a scan");
        }
        self.auto_vacuum = conn.query_row("PRAGMA auto_vacuum", [], |r| r.get(0))?;
        Ok(())
    }

    pub(super) fn stats(&self) -> &SpoolStats {
        &self.stats
    }

    /// The connection, for statements kept in other files (`expire.rs`).
    pub(super) fn conn(&self) -> &Connection {
        &self.conn
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    pub(super) fn refresh_stats(&mut self) -> Result<&SpoolStats, SpoolError> {
        let mut stats = compute_stats(&self.conn).map_err(sql_err(&self.path))?;
        for (signal, items, bytes, _) in self.pending.values() {
            stats.rows = stats.rows.saturating_sub(1);
            stats.bytes = stats.bytes.saturating_sub(bytes.unsigned_abs());
            if let Ok(signal) = signal.parse::<Signal>() {
                let i = signal.index();
                stats.items[i] = stats.items[i].saturating_sub(items.unsigned_abs());
            }
        }
        self.stats = stats;
        self.sync_flags();
        Ok(&self.stats)
    }

    /// Copies the pending-delete and fullness state into `stats`.
    pub(super) fn sync_flags(&mut self) {
        self.stats.delete_pending_rows = self.pending.len() as u64;
        self.stats.delete_pending_items = self.pending.values().map(|r| r.1.unsigned_abs()).sum();
        if self.headroom.disk_full() {
            self.full = Some(FullReason::Disk);
        }
        self.stats.full = self.full;
    }

    /// Bytes of free pages inside the file.
    pub(super) fn free_in_file(&self) -> u64 {
        let pages: i64 = self
            .conn
            .query_row("PRAGMA freelist_count", [], |r| r.get(0))
            .unwrap_or(0);
        pages.unsigned_abs().saturating_mul(self.page_size)
    }

    /// Records that an insert of about `bytes` found no room, and why.
    fn record_full(&mut self, bytes: u64) {
        let reason = self.headroom.reason(bytes);
        if reason == FullReason::Disk && self.headroom.release() {
            tracing::warn!(
                path = %self.path.display(),
                reserve_bytes = self.headroom.size(),
                "the disk holding the spool is full; released the spool's reserve so deletes and checkpoints can run"
            );
        }
        self.full = Some(reason);
    }

    /// Runs `f` in a write transaction; rolls back if it fails.
    fn transaction<T>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<T> {
        // Cached statements: `execute_batch` would parse each one anew.
        let run = |sql: &str| self.conn.prepare_cached(sql)?.execute([]).map(|_| ());
        run("BEGIN IMMEDIATE")?;
        let result = f(&self.conn).and_then(|v| run("COMMIT").map(|()| v));
        // SQLite may already have rolled back on its own (SQLITE_FULL can do that).
        if result.is_err() && !self.conn.is_autocommit() {
            if let Err(e) = self.conn.execute_batch("ROLLBACK") {
                tracing::warn!(path = %self.path.display(), error = %e, "rolling back a spool transaction");
            }
        }
        result
    }

    /// Each payload goes from its chunks straight into the row's pages: the
    /// row is inserted with a zero-filled blob of the payload's length, which
    /// the chunks then overwrite through an incremental-blob handle. Binding
    /// the payload instead would copy it twice first (joining the chunks, then
    /// SQLite's own copy of a bound blob), into freshly mapped memory each time.
    fn insert_rows(conn: &Connection, batches: &[NewBatch]) -> rusqlite::Result<Vec<i64>> {
        let mut stmt = conn.prepare_cached(
            "INSERT INTO batches(signal, items, bytes, created_ms, attempts, payload)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?;
        let mut ids = Vec::with_capacity(batches.len());
        let mut blob: Option<Blob<'_>> = None;
        for batch in batches {
            let len: u64 = batch.payload.iter().map(|c| c.len() as u64).sum();
            stmt.execute(params![
                batch.signal.as_str(),
                i64::try_from(batch.items).unwrap_or(i64::MAX),
                i64::try_from(len).unwrap_or(i64::MAX),
                batch.created_ms,
                batch.attempts,
                ZeroBlob(len),
            ])?;
            let id = conn.last_insert_rowid();
            ids.push(id);
            if len == 0 {
                continue;
            }
            let handle = match blob.as_mut() {
                Some(handle) => {
                    handle.reopen(id)?;
                    handle
                }
                None => blob.insert(conn.blob_open(MAIN_DB, c"batches", c"payload", id, false)?),
            };
            let mut at = 0;
            for chunk in &batch.payload {
                handle.write_at(chunk, at)?;
                at += chunk.len();
            }
        }
        Ok(ids)
    }

    fn account_inserted(&mut self, batches: &[NewBatch]) {
        for batch in batches {
            let s = &mut self.stats;
            s.rows += 1;
            s.bytes += batch.payload.iter().map(|c| c.len() as u64).sum::<u64>();
            s.items[batch.signal.index()] += batch.items;
            s.oldest_created_ms = min_opt(s.oldest_created_ms, Some(batch.created_ms));
        }
    }

    pub(super) fn insert(&mut self, batches: &[NewBatch]) -> Result<InsertOutcome, SpoolError> {
        let result = self.insert_inner(batches);
        self.sync_flags();
        result
    }

    fn insert_inner(&mut self, batches: &[NewBatch]) -> Result<InsertOutcome, SpoolError> {
        self.retry_pending();
        let size = |b: &NewBatch| b.payload.iter().map(|c| c.len() as u64).sum::<u64>();
        if self.headroom.disk_full() {
            // Only into pages already free inside the file (`disk.rs`).
            let want: u64 = batches.iter().map(size).sum::<u64>() * 11 / 10 + self.page_size;
            if !self.headroom.admits(want, self.free_in_file()) {
                self.full = Some(FullReason::Disk);
                return Ok(InsertOutcome {
                    written: 0,
                    full: true,
                    ids: Vec::new(),
                });
            }
        }
        match self.transaction(|conn| Self::insert_rows(conn, batches)) {
            Ok(ids) => {
                self.account_inserted(batches);
                self.full = None;
                return Ok(InsertOutcome {
                    written: batches.len(),
                    full: false,
                    ids,
                });
            }
            Err(e) if is_full(&e) => {}
            Err(e) => return Err(sql_err(&self.path)(e)),
        }
        // Not all of them fit: keep as many leading batches as do.
        let mut ids = Vec::with_capacity(batches.len());
        for (i, batch) in batches.iter().enumerate() {
            let one = std::slice::from_ref(batch);
            match self.transaction(|conn| Self::insert_rows(conn, one)) {
                Ok(id) => {
                    self.account_inserted(one);
                    ids.extend(id);
                }
                Err(e) if is_full(&e) => {
                    self.record_full(size(batch));
                    return Ok(InsertOutcome {
                        written: i,
                        full: true,
                        ids,
                    });
                }
                Err(e) => return Err(sql_err(&self.path)(e)),
            }
        }
        self.full = None;
        Ok(InsertOutcome {
            written: batches.len(),
            full: false,
            ids,
        })
    }

    /// Deletes the rows and keeps `stats` in step.
    pub(super) fn remove(&mut self, removed: &[Removed]) -> rusqlite::Result<()> {
        let mut recompute_oldest = false;
        for (signal, items, bytes, created_ms) in removed {
            let s = &mut self.stats;
            s.rows = s.rows.saturating_sub(1);
            s.bytes = s.bytes.saturating_sub(bytes.unsigned_abs());
            if let Ok(signal) = signal.parse::<Signal>() {
                let i = signal.index();
                s.items[i] = s.items[i].saturating_sub(items.unsigned_abs());
            }
            recompute_oldest |= s.oldest_created_ms.is_none_or(|o| *created_ms <= o);
        }
        if recompute_oldest {
            self.stats.oldest_created_ms = self
                .conn
                .prepare_cached("SELECT min(created_ms) FROM batches")?
                .query_row([], |r| r.get(0))?;
        }
        Ok(())
    }

    /// Deletes the rows. Upstream has acknowledged them, so when the delete
    /// cannot commit they become delete-pending rather than being handed out
    /// again (`maintain.rs`): on a full disk that is not an error.
    pub(super) fn delete(&mut self, ids: &[i64]) -> Result<(), SpoolError> {
        let ids: Vec<i64> = ids
            .iter()
            .copied()
            .filter(|id| !self.pending.contains_key(id))
            .collect();
        let mut result = self.delete_rows(&ids);
        if matches!(&result, Err(e) if is_full(e)) && self.headroom.release() {
            result = self.delete_rows(&ids);
        }
        let result = match result {
            Ok(removed) => {
                if !removed.is_empty() {
                    self.last_delete = Some(tokio::time::Instant::now());
                }
                if self.full == Some(FullReason::MaxBytes) && !removed.is_empty() {
                    self.full = None;
                }
                self.remove(&removed).map_err(sql_err(&self.path))
            }
            Err(e) if is_full(&e) => {
                self.headroom.release();
                self.mark_pending(&ids);
                Ok(())
            }
            Err(e) => {
                self.mark_pending(&ids);
                Err(sql_err(&self.path)(e))
            }
        };
        self.sync_flags();
        result
    }

    /// One transaction deleting `ids`; what it removed.
    pub(super) fn delete_rows(&self, ids: &[i64]) -> rusqlite::Result<Vec<Removed>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        self.transaction(|conn| {
            // Not `DELETE .. RETURNING`: for RETURNING, SQLite loads every
            // column of the old row, so each delete read its whole payload
            // back (3 % of the agent's CPU in durable mode). These four
            // columns sit in the row's first page, before the payload.
            let mut select = conn.prepare_cached(
                "SELECT signal, items, bytes, created_ms FROM batches WHERE id = ?1",
            )?;
            let mut delete = conn.prepare_cached("DELETE FROM batches WHERE id = ?1")?;
            let mut removed = Vec::with_capacity(ids.len());
            for id in ids {
                let row = select
                    .query_row([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
                    .optional()?;
                if let Some(row) = row {
                    delete.execute([id])?;
                    removed.push(row);
                }
            }
            Ok(removed)
        })
    }

    pub(super) fn record_attempt(&mut self, id: i64) -> Result<(), SpoolError> {
        self.conn
            .prepare_cached("UPDATE batches SET attempts = attempts + 1 WHERE id = ?1")
            .and_then(|mut stmt| stmt.execute([id]))
            .map(|_| ())
            .map_err(sql_err(&self.path))
    }

    pub(super) fn drop_oldest(
        &mut self,
        bytes_needed: u64,
        keep: &HashSet<i64>,
    ) -> Result<Vec<(Signal, u64)>, SpoolError> {
        if bytes_needed == 0 {
            return Ok(Vec::new());
        }
        let mut result = self.evict(bytes_needed, keep);
        if matches!(&result, Err(e) if is_full(e)) && self.headroom.release() {
            result = self.evict(bytes_needed, keep);
        }
        let removed = result.map_err(sql_err(&self.path))?;
        self.remove(&removed).map_err(sql_err(&self.path))?;
        self.sync_flags();
        Ok(removed
            .iter()
            .filter_map(|(signal, items, _, _)| Some((signal.parse().ok()?, items.unsigned_abs())))
            .collect())
    }

    /// One transaction deleting the oldest rows not in `keep` (nor
    /// delete-pending) until `bytes_needed` are freed.
    fn evict(&self, bytes_needed: u64, keep: &HashSet<i64>) -> rusqlite::Result<Vec<Removed>> {
        self.transaction(|conn| {
            let mut removed: Vec<Removed> = Vec::new();
            let mut ids = Vec::new();
            let mut freed = 0u64;
            let mut stmt = conn.prepare_cached(
                "SELECT id, signal, items, bytes, created_ms FROM batches ORDER BY id",
            )?;
            let mut rows = stmt.query([])?;
            while freed < bytes_needed {
                let Some(row) = rows.next()? else { break };
                let id: i64 = row.get(0)?;
                // Rows being exported right now are not evicted: their
                // fate is upstream's answer.
                if keep.contains(&id) || self.pending.contains_key(&id) {
                    continue;
                }
                ids.push(id);
                let bytes: i64 = row.get(3)?;
                freed += bytes.unsigned_abs();
                removed.push((row.get(1)?, row.get(2)?, bytes, row.get(4)?));
            }
            drop(rows);
            let mut delete = conn.prepare_cached("DELETE FROM batches WHERE id = ?1")?;
            for id in ids {
                delete.execute([id])?;
            }
            Ok(removed)
        })
    }

    /// Checkpoints the WAL into the file and truncates it, then closes.
    pub(super) fn close(mut self) -> Result<(), SpoolError> {
        self.retry_pending();
        if !self.pending.is_empty() {
            self.sync_flags();
            tracing::warn!(
                path = %self.path.display(),
                rows = self.stats.delete_pending_rows,
                items = self.stats.delete_pending_items,
                "rows upstream acknowledged are still in the spool (their delete could not commit); they will be sent again after restart"
            );
        }
        if let Some(mut checkpointer) = self.checkpointer.take() {
            checkpointer.stop();
        }
        let sql = sql_err(&self.path);
        self.conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .map_err(&sql)?;
        self.conn.close().map_err(|(_, e)| sql(e))
    }
}

/// A `batches` row (columns as in [`Store::oldest`]) as a [`SpooledBatch`].
pub(super) fn decode_row(path: &Path, row: &rusqlite::Row<'_>) -> Result<SpooledBatch, SpoolError> {
    let sql = sql_err(path);
    let id: i64 = row.get(0).map_err(&sql)?;
    let bad = |why: String| SpoolError::BadRow {
        path: path.to_owned(),
        id,
        why,
    };
    let signal: String = row.get(1).map_err(&sql)?;
    let signal = signal.parse::<Signal>().map_err(|e| bad(e.to_string()))?;
    let count = |i: usize, name: &str| -> Result<u64, SpoolError> {
        let v: i64 = row.get(i).map_err(&sql)?;
        u64::try_from(v).map_err(|_| bad(format!("{name} is {v}")))
    };
    let items = count(2, "items")?;
    let bytes = count(3, "bytes")?;
    let created_ms: i64 = row.get(4).map_err(&sql)?;
    let attempts = u32::try_from(count(5, "attempts")?).unwrap_or(u32::MAX);
    let payload = row.get_ref(6).map_err(&sql)?;
    let payload = match payload {
        rusqlite::types::ValueRef::Blob(b) => Bytes::copy_from_slice(b),
        other => {
            return Err(bad(format!(
                "payload is {:?}, not a BLOB",
                other.data_type()
            )))
        }
    };
    if payload.len() as u64 != bytes {
        return Err(bad(format!(
            "bytes is {bytes} but the payload has {}",
            payload.len()
        )));
    }
    Ok(SpooledBatch {
        id,
        signal,
        items,
        bytes,
        created_ms,
        attempts,
        payload,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn min_opt_ignores_missing_values() {
        assert_eq!(min_opt(None, None), None);
        assert_eq!(min_opt(Some(3), None), Some(3));
        assert_eq!(min_opt(None, Some(4)), Some(4));
        assert_eq!(min_opt(Some(5), Some(2)), Some(2));
    }

    fn oldest_query_plan(conn: &Connection) -> String {
        let mut stmt = conn
            .prepare("EXPLAIN QUERY PLAN SELECT min(created_ms) FROM batches")
            .unwrap();
        let rows = stmt.query_map([], |r| r.get::<_, String>(3)).unwrap();
        rows.map(Result::unwrap).collect::<Vec<_>>().join("; ")
    }

    /// The oldest row's age is read from the index, also in a file made
    /// before the index existed (which gets it at open, rows kept).
    #[test]
    fn the_oldest_row_is_found_through_the_index_in_new_and_older_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.db");
        let (mut store, _) = Store::open(&path, &SpoolOptions::default()).unwrap();
        assert!(
            oldest_query_plan(&store.conn).contains("batches_created_ms"),
            "{}",
            oldest_query_plan(&store.conn)
        );
        let rows: Vec<NewBatch> = [30, 10, 20]
            .into_iter()
            .map(|created_ms| NewBatch {
                signal: Signal::Logs,
                items: 1,
                created_ms,
                attempts: 0,
                payload: vec![Bytes::from_static(b"x")],
            })
            .collect();
        let ids = store.insert(&rows).unwrap().ids;
        store.delete(&ids[1..2]).unwrap();
        assert_eq!(store.stats().oldest_created_ms, Some(20));
        store
            .conn
            .execute_batch("DROP INDEX batches_created_ms")
            .unwrap();
        assert!(!oldest_query_plan(&store.conn).contains("batches_created_ms"));
        drop(store);

        let (store, _) = Store::open(&path, &SpoolOptions::default()).unwrap();
        assert!(oldest_query_plan(&store.conn).contains("batches_created_ms"));
        assert_eq!(store.stats().rows, 2);
        assert_eq!(store.stats().oldest_created_ms, Some(20));
    }

    #[test]
    fn application_id_spells_tspl() {
        assert_eq!(&APPLICATION_ID.to_be_bytes(), b"TSPL");
    }
}
