//! Synchronous spool tools for the CLI (`telespool spool stats|verify|export|purge`).
//!
//! They run without the agent and take the same `<file>.lock`, so they refuse
//! ([`SpoolError::Locked`]) a spool that a running agent owns. They never create,
//! quarantine or migrate a file.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OpenFlags};

use super::open::{self, SpoolLock};
use super::store::{compute_stats, decode_row, sql_err};
use super::{SpoolError, SpoolStats, SpooledBatch, APPLICATION_ID, SCHEMA_VERSION};
use crate::signal::Signal;

/// Rows fetched per query by [`SpoolReader`]; bounds its memory to this many payloads.
const READ_PAGE: i64 = 16;

/// What [`verify`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyReport {
    pub path: PathBuf,
    /// `PRAGMA user_version` (0 when unreadable).
    pub schema_version: i64,
    /// Everything wrong, from `integrity_check`, the identity and schema checks and
    /// row checks; empty means the spool is sound.
    pub problems: Vec<String>,
    /// Contents (zero when the table cannot be read).
    pub stats: SpoolStats,
}

impl VerifyReport {
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Locks and opens an existing spool without creating anything but the lock file.
fn open_existing(path: &Path) -> Result<(Connection, SpoolLock), SpoolError> {
    if !path.is_file() {
        return Err(SpoolError::Missing {
            path: path.to_owned(),
        });
    }
    let lock = open::lock(path)?;
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE)
        .map_err(sql_err(path))?;
    Ok((conn, lock))
}

/// Refuses files that are not a spool of a schema version this binary knows.
fn check_spool(path: &Path, conn: &Connection) -> Result<(), SpoolError> {
    let not_spool = |why: String| SpoolError::NotASpool {
        path: path.to_owned(),
        why,
    };
    if !open::has_sqlite_header(path)? {
        return Err(not_spool("not a SQLite database".into()));
    }
    let (app, version, _) = open::identity(conn).map_err(|e| not_spool(e.to_string()))?;
    if app != APPLICATION_ID {
        return Err(not_spool(format!("application_id is {app:#x}")));
    }
    if version > SCHEMA_VERSION {
        return Err(SpoolError::SchemaTooNew {
            path: path.to_owned(),
            version,
        });
    }
    if let Some(why) = open::column_mismatch(conn).map_err(sql_err(path))? {
        return Err(not_spool(why));
    }
    Ok(())
}

/// `PRAGMA integrity_check`, identity and schema checks, row checks and totals.
/// Errors only when the file cannot be examined at all (missing, locked, I/O) or
/// was written by a newer telespool.
pub fn verify(path: &Path) -> Result<VerifyReport, SpoolError> {
    let (conn, _lock) = open_existing(path)?;
    let mut report = VerifyReport {
        path: path.to_owned(),
        schema_version: 0,
        problems: Vec::new(),
        stats: SpoolStats::default(),
    };
    if !open::has_sqlite_header(path)? {
        report
            .problems
            .push("not a SQLite database (bad file header)".into());
        return Ok(report);
    }
    let (app, version, _) = match open::identity(&conn) {
        Ok(identity) => identity,
        Err(e) => {
            report.problems.push(format!("unreadable: {e}"));
            return Ok(report);
        }
    };
    report.schema_version = version;
    if app != APPLICATION_ID {
        report.problems.push(format!(
            "application_id {app:#x} is not telespool's ({APPLICATION_ID:#x})"
        ));
        return Ok(report);
    }
    if version > SCHEMA_VERSION {
        return Err(SpoolError::SchemaTooNew {
            path: path.to_owned(),
            version,
        });
    }
    if version != SCHEMA_VERSION {
        report.problems.push(format!(
            "schema version {version}, expected {SCHEMA_VERSION}"
        ));
    }
    let integrity = (|| {
        conn.prepare("PRAGMA integrity_check(100)")?
            .query_map([], |r| r.get::<_, String>(0))?
            .collect::<rusqlite::Result<Vec<_>>>()
    })();
    match integrity {
        Ok(lines) if lines == ["ok"] => {}
        Ok(lines) => report.problems.extend(lines),
        Err(e) => report.problems.push(format!("integrity_check failed: {e}")),
    }
    match open::column_mismatch(&conn) {
        Ok(None) => {}
        Ok(Some(why)) => {
            report.problems.push(why);
            return Ok(report);
        }
        Err(e) => {
            report.problems.push(format!("cannot read the schema: {e}"));
            return Ok(report);
        }
    }
    let bad_rows = conn.query_row(
        "SELECT count(*) FROM batches
         WHERE signal NOT IN ('traces', 'metrics', 'logs') OR items < 0 OR attempts < 0
            OR typeof(payload) != 'blob' OR bytes != length(payload)",
        [],
        |r| r.get::<_, i64>(0),
    );
    match bad_rows {
        Ok(0) => {}
        Ok(n) => report
            .problems
            .push(format!("{n} rows have invalid columns")),
        Err(e) => report.problems.push(format!("cannot check rows: {e}")),
    }
    match compute_stats(&conn) {
        Ok(stats) => report.stats = stats,
        Err(e) => report.problems.push(format!("cannot count rows: {e}")),
    }
    Ok(report)
}

/// Deletes every row and shrinks the file. Returns what was deleted.
pub fn purge(path: &Path) -> Result<SpoolStats, SpoolError> {
    let (conn, _lock) = open_existing(path)?;
    check_spool(path, &conn)?;
    let sql = sql_err(path);
    let stats = compute_stats(&conn).map_err(&sql)?;
    conn.execute_batch("DELETE FROM batches; VACUUM;")
        .map_err(&sql)?;
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .map_err(&sql)?;
    conn.close().map_err(|(_, e)| sql(e))?;
    Ok(stats)
}

/// Every row, oldest first, optionally of one signal only. The reader holds the
/// lock until dropped and keeps at most a few batches in memory.
pub fn read_all(path: &Path, signal: Option<Signal>) -> Result<SpoolReader, SpoolError> {
    let (conn, lock) = open_existing(path)?;
    check_spool(path, &conn)?;
    Ok(SpoolReader {
        conn,
        _lock: lock,
        path: path.to_owned(),
        signal,
        after_id: 0,
        page: VecDeque::new(),
        done: false,
    })
}

/// Iterator over spooled batches returned by [`read_all`]; stops after an error.
pub struct SpoolReader {
    conn: Connection,
    _lock: SpoolLock,
    path: PathBuf,
    signal: Option<Signal>,
    /// Highest id read so far.
    after_id: i64,
    page: VecDeque<SpooledBatch>,
    done: bool,
}

impl SpoolReader {
    fn fetch(&mut self) -> Result<(), SpoolError> {
        let sql = sql_err(&self.path);
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT id, signal, items, bytes, created_ms, attempts, payload FROM batches
                 WHERE id > ?1 AND (?2 IS NULL OR signal = ?2) ORDER BY id LIMIT ?3",
            )
            .map_err(&sql)?;
        let signal = self.signal.map(Signal::as_str);
        let mut rows = stmt
            .query(params![self.after_id, signal, READ_PAGE])
            .map_err(&sql)?;
        let mut fetched = 0;
        while let Some(row) = rows.next().map_err(&sql)? {
            let batch = decode_row(&self.path, row)?;
            self.after_id = batch.id;
            self.page.push_back(batch);
            fetched += 1;
        }
        self.done = fetched < READ_PAGE;
        Ok(())
    }
}

impl Iterator for SpoolReader {
    type Item = Result<SpooledBatch, SpoolError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.page.is_empty() && !self.done {
            if let Err(e) = self.fetch() {
                self.done = true;
                return Some(Err(e));
            }
        }
        self.page.pop_front().map(Ok)
    }
}
