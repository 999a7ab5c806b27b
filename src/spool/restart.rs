//! An empty spool stuck on a full disk starts over in a fresh file.
//!
//! On a full disk the checkpoint is the first write to fail: it grows the
//! database file to hold pages that so far live only in the WAL, while
//! commits merely append to the WAL. Commits can go on appending until an
//! insert fails and the reserve (`disk.rs`) is released; by then the WAL may
//! hold more pages beyond the end of the file than the reserve gives room
//! for. Then no checkpoint completes, so the WAL never starts over, and
//! every later commit needs more WAL: deletes still fit for a while (they
//! write little), but the vacuum step that would give the space back does
//! not, and the spool stays in the disk-full state after it has drained.
//!
//! Once the spool is empty none of its pages matter. Then, if a vacuum step
//! failed for lack of room, the files are removed and a fresh, empty spool
//! is made in their place, under the lock the agent already holds. The row
//! id sequence carries over (`AUTOINCREMENT`'s `sqlite_sequence`), so a
//! delete still on its way for an old row can never hit a new one.

use std::fs;
use std::io;

use rusqlite::{Connection, OpenFlags, OptionalExtension};

use super::checkpoint::Checkpointer;
use super::open::sibling;
use super::store::{create_private, sql_err, Store};
use super::SpoolError;

impl Store {
    /// A vacuum step or a pending delete found no room: a spool with no
    /// row left but acknowledged ones starts over (see the module notes).
    /// Anything else waits for the next step.
    pub(super) fn start_over_if_empty(&mut self) {
        if !self.headroom.disk_full() || self.stats.rows != 0 {
            return;
        }
        match self.start_over() {
            Ok(Some(freed)) => tracing::warn!(
                path = %self.path.display(),
                freed_bytes = freed,
                "the spool was empty but could not shrink on the full disk; started a fresh spool file"
            ),
            Ok(None) => {}
            Err(e) => {
                tracing::error!(path = %self.path.display(), error = %e, "cannot start the empty spool over")
            }
        }
    }

    /// Replaces the files of an empty spool with a fresh one; the bytes the
    /// old files held, or `None` if the table was not empty after all.
    fn start_over(&mut self) -> Result<Option<u64>, SpoolError> {
        let path = self.path.clone();
        let sql = sql_err(&path);
        // Rows whose delete is pending were acknowledged upstream: they
        // may go. Any other row keeps the file.
        let unacknowledged = (|| {
            let mut stmt = self.conn.prepare("SELECT id FROM batches")?;
            let mut rows = stmt.query([])?;
            while let Some(row) = rows.next()? {
                if !self.pending.contains_key(&row.get::<_, i64>(0)?) {
                    return Ok(true);
                }
            }
            Ok::<_, rusqlite::Error>(false)
        })()
        .map_err(&sql)?;
        if unacknowledged {
            return Ok(None);
        }
        let seq: i64 = self
            .conn
            .query_row(
                "SELECT seq FROM sqlite_sequence WHERE name = 'batches'",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(&sql)?
            .unwrap_or(0);
        let files = ["", "-wal", "-shm"].map(|suffix| sibling(&path, suffix));
        let held: u64 = files
            .iter()
            .filter_map(|f| fs::metadata(f).ok())
            .map(|m| m.len())
            .sum();
        // Every connection to the files closes before they go.
        if let Some(mut checkpointer) = self.checkpointer.take() {
            checkpointer.stop();
        }
        let old = std::mem::replace(&mut self.conn, Connection::open_in_memory().map_err(&sql)?);
        drop(old);
        for file in &files {
            match fs::remove_file(file) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(super::open::file_err("remove", file)(e)),
            }
        }
        create_private(&path)?;
        self.conn =
            Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_WRITE).map_err(&sql)?;
        let opts = self.opts.clone();
        self.configure(&opts).map_err(&sql)?;
        if seq > 0 {
            self.conn
                .execute(
                    "INSERT INTO sqlite_sequence(name, seq) VALUES ('batches', ?1)",
                    [seq],
                )
                .map_err(&sql)?;
        }
        self.checkpointer = Some(Checkpointer::start(&path, opts.synchronous)?);
        self.pending.clear();
        self.refresh_stats()?;
        self.sync_flags();
        Ok(Some(held))
    }
}
