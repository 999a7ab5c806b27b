//! The spool's one error type: each variant names the file and what to do.

use std::path::PathBuf;

use super::SCHEMA_VERSION;

/// Everything that can go wrong with the spool.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// The spool's directory is missing and cannot be created, or is not a directory.
    #[error("cannot create spool directory {dir}: {source}; set spool.path to a writable location or fix the directory's owner")]
    Directory {
        dir: PathBuf,
        source: std::io::Error,
    },
    /// The spool's directory is writable by every user: another user could
    /// replace or link the spool, lock or WAL files. Checked at start.
    #[error("spool directory {dir} is world-writable (mode {mode:o}); another user could replace the spool. Run `chmod o-w {dir}` or set spool.path to a directory only telespool can write")]
    InsecureDirectory { dir: PathBuf, mode: u32 },
    /// An existing spool file (the database, its -wal or -shm) is writable by
    /// every user: another user could change what is replayed upstream.
    /// Checked at start; telespool creates these files 0600.
    #[error("spool file {path} is world-writable (mode {mode:o}); another user could change spooled data. Run `chmod 600 {path}` (telespool creates its files 0600), or set spool.path to a file only telespool can write")]
    InsecureFile { path: PathBuf, mode: u32 },
    /// A spool file (database, lock file, quarantine rename) cannot be created,
    /// opened, renamed or chmod-ed.
    #[error("cannot {action} {path}: {source}; set spool.path to a writable location or fix the file's owner")]
    File {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// Another process holds `<file>.lock`: a running agent or spool tool.
    #[error("spool {path} is in use by another telespool process (lock file {lock}); stop it first or point spool.path elsewhere")]
    Locked { path: PathBuf, lock: PathBuf },
    /// The file was written by a newer telespool whose schema this binary does not know.
    #[error("spool {path} has schema version {version}, newer than this telespool supports ({SCHEMA_VERSION}); upgrade telespool or move the file aside")]
    SchemaTooNew { path: PathBuf, version: i64 },
    /// An offline tool was pointed at a path with no spool file.
    #[error("no spool at {path}; check spool.path or --spool")]
    Missing { path: PathBuf },
    /// An offline tool was pointed at a file that is not a telespool spool. (The agent
    /// quarantines such files instead.)
    #[error("{path} is not a telespool spool: {why}; check the path, or start the agent to move it aside")]
    NotASpool { path: PathBuf, why: String },
    /// A non-insert write hit `SQLITE_FULL`: the disk is full (or the file is at
    /// `max_bytes` and the operation needed a page). Insert reports fullness through
    /// [`InsertOutcome::full`] instead.
    #[error("spool {path} is full (spool.max_bytes reached or the disk is full); free disk space or raise spool.max_bytes")]
    Full { path: PathBuf },
    /// A row whose columns cannot be decoded (unknown signal, negative count).
    #[error("spool {path} row {id} is unreadable ({why}); run `telespool spool verify`, or purge the spool")]
    BadRow { path: PathBuf, id: i64, why: String },
    /// Any other SQLite failure: I/O error, corruption found while running.
    #[error(
        "spool {path}: SQLite error: {source}; check the disk, then run `telespool spool verify`"
    )]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    /// The OS refused to start the spool's worker thread.
    #[error("cannot start the spool thread: {0}; the host is out of threads or memory")]
    Thread(std::io::Error),
    /// The spool was closed (by this or another handle) before the call.
    #[error("the spool is closed; no further spool operations are possible")]
    Closed,
    /// The worker thread panicked: a bug. The file is checked on the next start.
    #[error("the spool worker thread panicked; this is a bug, please report it (the spool file is checked on the next start)")]
    WorkerPanicked,
}
