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
//!
//! Catching up: under a steady stream of commits a passive checkpoint never
//! reaches the end of the WAL (frames are appended while it copies), and
//! SQLite starts the WAL over only once every frame is copied. So the WAL
//! grew to the backstop (then 64 MiB), a commit then checkpointed it on the
//! commit path, and the file was cut back to `journal_size_limit`, dropping
//! its page cache, every few seconds. Now, after each pass that copied
//! frames, the spool thread copies the few frames committed during the pass
//! itself, between two commands (`Store::finish_checkpoint`): the WAL then
//! starts over in place, within `journal_size_limit`. When commits outpace
//! the checkpoints (a slow disk), the WAL still grows; past twice that size
//! the spool thread waits for a complete checkpoint, and commits with it.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
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
    /// Set after each pass that copied frames: the writer then finishes it.
    passed: Arc<AtomicBool>,
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
        let passed = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&passed);
        let thread = thread::Builder::new()
            .name("telespool-checkpoint".into())
            .spawn(move || run(conn, &stopped, &path, &flag))
            .map_err(SpoolError::Thread)?;
        Ok(Checkpointer {
            stop: Some(stop),
            thread: Some(thread),
            passed,
        })
    }

    /// Whether a pass copied frames since the last call.
    pub(super) fn take_pass(&self) -> bool {
        self.passed.swap(false, Ordering::Relaxed)
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

fn run(conn: Connection, stopped: &mpsc::Receiver<()>, path: &Path, passed: &AtomicBool) {
    let mut failing = false;
    while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(INTERVAL) {
        let pass = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get::<_, i64>(2));
        match pass {
            Ok(copied) => {
                failing = false;
                if copied > 0 {
                    passed.store(true, Ordering::Relaxed);
                }
            }
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
