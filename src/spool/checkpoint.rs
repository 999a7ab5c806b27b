//! WAL checkpoints on their own thread and connection, off the commit path.
//!
//! With SQLite's automatic checkpoints, the commit that crosses
//! `wal_autocheckpoint` copies the WAL into the database file (and fsyncs it)
//! before it returns, so every few thousand pages one durable-mode request
//! waits for a checkpoint. Here a second connection runs a `PASSIVE`
//! checkpoint every [`INTERVAL`]: it copies committed frames without blocking
//! the writer, and once it has caught up the writer's next transaction starts
//! the WAL from the beginning again (truncated to `journal_size_limit`).
//! Rows live briefly and their pages are reused, so each checkpoint copies
//! little. The writer keeps a high `wal_autocheckpoint` as a backstop should
//! this thread fall behind.

use std::path::Path;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

use super::store::sql_err;
use super::{SpoolError, Synchronous};

/// How often the checkpointer copies the WAL into the database file.
const INTERVAL: Duration = Duration::from_millis(100);

/// The checkpoint thread; stopped and joined on [`Checkpointer::stop`] or drop.
pub(super) struct Checkpointer {
    /// Dropping it stops the thread.
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Checkpointer {
    /// Opens a second connection to the (already configured) spool at `path`.
    pub(super) fn start(path: &Path, synchronous: Synchronous) -> Result<Self, SpoolError> {
        let sql = sql_err(path);
        let conn =
            Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE).map_err(&sql)?;
        conn.busy_timeout(Duration::from_millis(100))
            .map_err(&sql)?;
        let sync = match synchronous {
            Synchronous::Normal => "NORMAL",
            Synchronous::Full => "FULL",
        };
        conn.pragma_update(None, "synchronous", sync)
            .map_err(&sql)?;
        let (stop, stopped) = mpsc::channel();
        let path = path.to_owned();
        let thread = thread::Builder::new()
            .name("telespool-checkpoint".into())
            .spawn(move || run(conn, &stopped, &path))
            .map_err(SpoolError::Thread)?;
        Ok(Checkpointer {
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Stops the thread and waits for it (at most one checkpoint).
    pub(super) fn stop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("the spool checkpoint thread panicked");
            }
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(conn: Connection, stopped: &mpsc::Receiver<()>, path: &Path) {
    let mut failing = false;
    while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(INTERVAL) {
        match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            Ok(()) => failing = false,
            // Logged once per failure streak; the writer's backstop
            // autocheckpoint keeps the WAL bounded meanwhile.
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(path = %path.display(), error = %e, "spool checkpoint failed; will retry");
            }
            Err(_) => {}
        }
    }
}
