//! Getting to an open spool file: the directory, the lock, the checks that decide
//! whether an existing file is used, refused or moved aside, and the move itself.

use std::ffi::OsString;
use std::fs::{self, DirBuilder, File, OpenOptions, Permissions};
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, ErrorCode, OpenFlags};

use super::store::sql_err;
use super::{SpoolError, APPLICATION_ID, SCHEMA_VERSION};

/// Column names of `batches`, in order, as `PRAGMA table_info` lists them.
pub(super) const COLUMNS: [&str; 7] = [
    "id",
    "signal",
    "items",
    "bytes",
    "created_ms",
    "attempts",
    "payload",
];
const SQLITE_MAGIC: &[u8; 16] = b"SQLite format 3\0";

/// `path` with `suffix` appended to its file name (`spool.db` → `spool.db.lock`).
pub(super) fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = OsString::from(path.as_os_str());
    name.push(suffix);
    PathBuf::from(name)
}

pub(super) fn file_err<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> SpoolError + 'a {
    move |source| SpoolError::File {
        action,
        path: path.to_owned(),
        source,
    }
}

/// The advisory lock on `<file>.lock`; released when dropped.
pub(super) struct SpoolLock {
    _file: File,
}

// `File::try_lock` is stable since Rust 1.89; the toolchain is 1.95 while
// Cargo.toml still says rust-version 1.85.
#[allow(clippy::incompatible_msrv)]
pub(super) fn lock(path: &Path) -> Result<SpoolLock, SpoolError> {
    let lock = sibling(path, ".lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock)
        .map_err(file_err("create the spool lock file", &lock))?;
    match file.try_lock() {
        Ok(()) => Ok(SpoolLock { _file: file }),
        Err(fs::TryLockError::WouldBlock) => Err(SpoolError::Locked {
            path: path.to_owned(),
            lock,
        }),
        Err(fs::TryLockError::Error(e)) => Err(file_err("lock", &lock)(e)),
    }
}

/// Creates the spool's directory (0700) if it is missing; refuses an existing
/// one that every user can write to (sticky bit or not).
pub(super) fn ensure_dir(path: &Path) -> Result<(), SpoolError> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => return Ok(()),
    };
    let dir_err = |source| SpoolError::Directory {
        dir: dir.to_owned(),
        source,
    };
    match fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => match meta.permissions().mode() & 0o7777 {
            mode if mode & 0o002 != 0 => Err(SpoolError::InsecureDirectory {
                dir: dir.to_owned(),
                mode,
            }),
            _ => Ok(()),
        },
        Ok(_) => Err(dir_err(io::Error::new(
            io::ErrorKind::NotADirectory,
            "it exists and is not a directory",
        ))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(dir_err)?;
            // The mode above is filtered by the umask; say it explicitly.
            fs::set_permissions(dir, Permissions::from_mode(0o700)).map_err(dir_err)
        }
        Err(e) => Err(dir_err(e)),
    }
}

/// Refuses an existing spool file, -wal or -shm that every user can write to.
/// (Group-writable is left to the operator, as for the directory.)
pub(super) fn ensure_files_private(path: &Path) -> Result<(), SpoolError> {
    for file in [
        path.to_owned(),
        sibling(path, "-wal"),
        sibling(path, "-shm"),
    ] {
        match fs::metadata(&file) {
            Ok(meta) if meta.permissions().mode() & 0o002 != 0 => {
                return Err(SpoolError::InsecureFile {
                    path: file,
                    mode: meta.permissions().mode() & 0o7777,
                })
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(file_err("check the permissions of", &file)(e)),
        }
    }
    Ok(())
}

/// The file's first 16 bytes are SQLite's magic, or the file is empty (SQLite treats
/// an empty file as an empty database).
pub(super) fn has_sqlite_header(path: &Path) -> Result<bool, SpoolError> {
    let mut file = File::open(path).map_err(file_err("open", path))?;
    let mut head = Vec::with_capacity(16);
    (&mut file)
        .take(16)
        .read_to_end(&mut head)
        .map_err(file_err("read", path))?;
    Ok(head.is_empty() || head == SQLITE_MAGIC)
}

/// `application_id`, `user_version` and the number of schema objects.
pub(super) fn identity(conn: &Connection) -> rusqlite::Result<(i32, i64, i64)> {
    let app: i32 = conn.query_row("PRAGMA application_id", [], |r| r.get(0))?;
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let objects: i64 = conn.query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))?;
    Ok((app, version, objects))
}

/// Why the `batches` table does not match [`COLUMNS`], if it does not.
pub(super) fn column_mismatch(conn: &Connection) -> rusqlite::Result<Option<String>> {
    let mut stmt = conn.prepare("SELECT name FROM pragma_table_info('batches')")?;
    let names = stmt
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok((names != COLUMNS)
        .then(|| format!("table batches has columns {names:?}, expected {COLUMNS:?}")))
}

/// Whether the existing file at `path` can be used: Ok(None) yes, Ok(Some(why)) move
/// it aside, Err refuse to start.
pub(super) fn inspect(path: &Path) -> Result<Option<String>, SpoolError> {
    if !has_sqlite_header(path)? {
        return Ok(Some("not a SQLite database (bad file header)".into()));
    }
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE)
        .map_err(sql_err(path))?;
    let verdict = (|| {
        let (app, version, objects) = identity(&conn)?;
        if app != APPLICATION_ID && !(app == 0 && objects == 0) {
            return Ok(Some(format!(
                "application_id {app:#x} is not telespool's ({APPLICATION_ID:#x}); the file belongs to another program"
            )));
        }
        if version > SCHEMA_VERSION {
            return Ok(None); // refused below, after the connection is closed
        }
        let problems = conn
            .prepare("PRAGMA quick_check(5)")?
            .query_map([], |r| r.get::<_, String>(0))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        if problems != ["ok"] {
            return Ok(Some(format!(
                "{QUICK_CHECK_FAILED}: {}",
                problems.join("; ")
            )));
        }
        if version == SCHEMA_VERSION {
            return column_mismatch(&conn);
        }
        Ok(None)
    })();
    let version = conn
        .query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))
        .unwrap_or(0);
    drop(conn);
    match verdict {
        Ok(None) if version > SCHEMA_VERSION => Err(SpoolError::SchemaTooNew {
            path: path.to_owned(),
            version,
        }),
        Ok(verdict) => Ok(verdict),
        Err(e) => match e.sqlite_error_code() {
            Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt) => {
                Ok(Some(format!("{UNREADABLE}: {e}")))
            }
            _ => Err(sql_err(path)(e)),
        },
    }
}

/// Whether a reason from [`inspect`] means a damaged telespool spool (whose
/// readable rows are worth salvaging), not a file of another kind.
pub(super) fn is_damage(why: &str) -> bool {
    why.starts_with(QUICK_CHECK_FAILED) || why.starts_with(UNREADABLE)
}

const QUICK_CHECK_FAILED: &str = "quick_check failed";
const UNREADABLE: &str = "unreadable";

/// Renames `path` (and its -wal and -shm) to `<path>.corrupt-<unix seconds>`.
pub(super) fn quarantine(path: &Path) -> Result<PathBuf, SpoolError> {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut dest = sibling(path, &format!(".corrupt-{secs}"));
    let mut n = 1;
    while dest.exists() {
        dest = sibling(path, &format!(".corrupt-{secs}.{n}"));
        n += 1;
    }
    for suffix in ["-wal", "-shm"] {
        let from = sibling(path, suffix);
        if from.exists() {
            fs::rename(&from, sibling(&dest, suffix)).map_err(file_err("move aside", &from))?;
        }
    }
    fs::rename(path, &dest).map_err(file_err("move aside", path))?;
    Ok(dest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sibling_appends_to_the_file_name() {
        let p = Path::new("/var/lib/telespool/spool.db");
        assert_eq!(
            sibling(p, ".lock"),
            Path::new("/var/lib/telespool/spool.db.lock")
        );
        assert_eq!(
            sibling(p, "-wal"),
            Path::new("/var/lib/telespool/spool.db-wal")
        );
    }
}
