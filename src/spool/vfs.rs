//! The spool writer's VFS: each WAL frame reaches the kernel in one write.
//!
//! SQLite appends a WAL frame with two writes: the 24-byte frame header,
//! then the page (`walWriteOneFrame` in sqlite3.c). Half of the writer's
//! `pwrite` calls therefore carry 24 bytes, and a buffered write to ext4 costs
//! about the same per call whatever its size (the syscall, the folio lookup,
//! dirtying the page): in durable mode that was ~320 K `pwrite`s per million
//! realistic spans, a quarter of the agent's CPU.
//!
//! [`WRITER`] is a shim over SQLite's `unix` VFS that holds a frame header
//! back and writes it together with the page that follows it, one write of
//! header and page. Everything else goes straight to the `unix` VFS (locks,
//! shared memory, the files themselves), so connections with and without the
//! shim share one database exactly as two plain connections do.
//!
//! When a header is held, and why nothing held is ever lost:
//! - only a 24-byte write to a WAL file that starts where the previous
//!   operation on that file, a write, ended. That is the frame header of
//!   `walWriteOneFrame` in its loop over a commit's pages (the previous page
//!   ended there), and its page is SQLite's very next call on the file. The
//!   other 24-byte writes SQLite makes (checksums rewritten after a frame was
//!   overwritten in one transaction) each follow a read, so they go through.
//! - any other call on the file (a write elsewhere, a read, sync, truncate,
//!   size, file control, close) first writes a held header out, so the file
//!   never looks different to SQLite than it would without the shim.
//! - a commit returns to the caller only after its last frame's page was
//!   written, so an acknowledged commit is in the kernel as before: a SIGKILL
//!   after the answer loses nothing (`tests/durable.rs`).
//!
//! If the shim cannot be registered, the writer uses the default VFS.

#![allow(unsafe_code)]

use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::mem::size_of;
use std::ptr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use rusqlite::ffi;

/// The shim's registered name.
pub(crate) const WRITER: &str = "telespool-wal";
const WRITER_C: &CStr = c"telespool-wal";

/// `WAL_FRAME_HDRSIZE` in sqlite3.c.
const FRAME_HEADER: usize = 24;

/// Frames written as one write (header and page together), over the process.
static JOINED: AtomicU64 = AtomicU64::new(0);

/// Frames whose header and page went out as one write so far.
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) fn joined_frames() -> u64 {
    JOINED.load(Ordering::Relaxed)
}

/// Opens the spool's writer connection, through the shim when it is available.
pub(crate) fn open_writer(path: &std::path::Path) -> rusqlite::Result<rusqlite::Connection> {
    let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE;
    match writer() {
        Some(vfs) => rusqlite::Connection::open_with_flags_and_vfs(path, flags, vfs),
        None => rusqlite::Connection::open_with_flags(path, flags),
    }
}

/// The VFS name for the spool's writer connection: the shim, registered on
/// first use, or `None` (the default VFS) if it could not be.
pub(crate) fn writer() -> Option<&'static str> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| match register() {
        Ok(()) => true,
        Err(why) => {
            tracing::warn!(
                %why,
                "spool: the WAL frame-joining VFS is not available; using SQLite's default"
            );
            false
        }
    });
    ok.then_some(WRITER)
}

/// A shim file: SQLite's handle, then the `unix` VFS's own file after it
/// (`szOsFile` is the sum, SQLite allocates and frees the whole).
#[repr(C)]
struct ShimFile {
    base: ffi::sqlite3_file,
    real: *mut ffi::sqlite3_file,
    /// This is a WAL file (the only kind whose headers are held).
    wal: bool,
    /// Where the last operation on the file, if it was a write, ended.
    write_end: Option<i64>,
    /// A held frame header and its offset.
    held: Option<(i64, [u8; FRAME_HEADER])>,
}

thread_local! {
    /// Header and page, put together for one write.
    static JOIN: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

fn register() -> Result<(), String> {
    // SAFETY: sqlite3_vfs_find initialises SQLite and returns a pointer to
    // a registered VFS, which lives until it is unregistered (never, for unix).
    let real = unsafe { ffi::sqlite3_vfs_find(c"unix".as_ptr()) };
    if real.is_null() {
        return Err("SQLite has no \"unix\" VFS".into());
    }
    // SAFETY: `real` is a valid VFS (above); it is only read.
    let real_ref = unsafe { &*real };
    if real_ref.iVersion < 3 {
        return Err(format!("the unix VFS is version {}", real_ref.iVersion));
    }
    let own = (size_of::<ShimFile>() as c_int)
        .checked_add(real_ref.szOsFile)
        .ok_or("file size overflow")?;
    let vfs = Box::new(ffi::sqlite3_vfs {
        iVersion: 3,
        szOsFile: own,
        mxPathname: real_ref.mxPathname,
        pNext: ptr::null_mut(),
        zName: WRITER_C.as_ptr(),
        pAppData: real.cast(),
        xOpen: Some(open),
        xDelete: Some(delete),
        xAccess: Some(access),
        xFullPathname: Some(full_pathname),
        xDlOpen: Some(dl_open),
        xDlError: Some(dl_error),
        xDlSym: Some(dl_sym),
        xDlClose: Some(dl_close),
        xRandomness: Some(randomness),
        xSleep: Some(sleep),
        xCurrentTime: Some(current_time),
        xGetLastError: Some(get_last_error),
        xCurrentTimeInt64: Some(current_time_int64),
        xSetSystemCall: Some(set_system_call),
        xGetSystemCall: Some(get_system_call),
        xNextSystemCall: Some(next_system_call),
    });
    // The VFS must outlive every connection: it is registered for the
    // process, so it is never freed.
    let vfs = Box::leak(vfs);
    // SAFETY: `vfs` is a complete, 'static VFS; not made the default.
    let rc = unsafe { ffi::sqlite3_vfs_register(vfs, 0) };
    if rc != ffi::SQLITE_OK {
        return Err(format!("sqlite3_vfs_register returned {rc}"));
    }
    Ok(())
}

/// The `unix` VFS under the shim.
///
/// # Safety
/// `vfs` is the shim registered by [`register`].
unsafe fn real_vfs(vfs: *mut ffi::sqlite3_vfs) -> *mut ffi::sqlite3_vfs {
    unsafe { (*vfs).pAppData.cast() }
}

static METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    iVersion: 3,
    xClose: Some(close),
    xRead: Some(read),
    xWrite: Some(write),
    xTruncate: Some(truncate),
    xSync: Some(sync),
    xFileSize: Some(file_size),
    xLock: Some(lock),
    xUnlock: Some(unlock),
    xCheckReservedLock: Some(check_reserved_lock),
    xFileControl: Some(file_control),
    xSectorSize: Some(sector_size),
    xDeviceCharacteristics: Some(device_characteristics),
    xShmMap: Some(shm_map),
    xShmLock: Some(shm_lock),
    xShmBarrier: Some(shm_barrier),
    xShmUnmap: Some(shm_unmap),
    xFetch: Some(fetch),
    xUnfetch: Some(unfetch),
};

unsafe extern "C" fn open(
    vfs: *mut ffi::sqlite3_vfs,
    name: ffi::sqlite3_filename,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    unsafe {
        let shim = file.cast::<ShimFile>();
        // The real file lives right after ours, in the same allocation
        // (szOsFile covers both; ShimFile's size keeps it 8-aligned).
        let real = file.cast::<u8>().add(size_of::<ShimFile>()).cast();
        ptr::write(
            shim,
            ShimFile {
                base: ffi::sqlite3_file {
                    pMethods: ptr::null(),
                },
                real,
                wal: flags & ffi::SQLITE_OPEN_WAL != 0,
                write_end: None,
                held: None,
            },
        );
        let real_vfs = real_vfs(vfs);
        let Some(x_open) = (*real_vfs).xOpen else {
            return ffi::SQLITE_CANTOPEN;
        };
        let rc = x_open(real_vfs, name, real, flags, out_flags);
        // A null pMethods tells SQLite not to call xClose on a failed open.
        if rc == ffi::SQLITE_OK && !(*real).pMethods.is_null() {
            (*shim).base.pMethods = &METHODS;
        } else if !(*real).pMethods.is_null() {
            // Opened, but failed: close the real file ourselves.
            if let Some(x_close) = (*(*real).pMethods).xClose {
                x_close(real);
            }
        }
        rc
    }
}

/// The shim file and its real file.
///
/// # Safety
/// `file` was opened by [`open`] and not closed.
unsafe fn parts<'a>(
    file: *mut ffi::sqlite3_file,
) -> (&'a mut ShimFile, &'a ffi::sqlite3_io_methods) {
    unsafe {
        let shim = &mut *file.cast::<ShimFile>();
        let methods = &*(*shim.real).pMethods;
        (shim, methods)
    }
}

/// Writes a held header out. Any call but the page's write does this first.
///
/// # Safety
/// As for [`parts`].
unsafe fn flush(shim: &mut ShimFile, methods: &ffi::sqlite3_io_methods) -> c_int {
    shim.write_end = None;
    let Some((at, header)) = shim.held else {
        return ffi::SQLITE_OK;
    };
    let Some(x_write) = methods.xWrite else {
        return ffi::SQLITE_IOERR_WRITE;
    };
    let rc = unsafe { x_write(shim.real, header.as_ptr().cast(), FRAME_HEADER as c_int, at) };
    if rc == ffi::SQLITE_OK {
        shim.held = None;
    }
    rc
}

unsafe extern "C" fn write(
    file: *mut ffi::sqlite3_file,
    buf: *const c_void,
    amount: c_int,
    offset: ffi::sqlite3_int64,
) -> c_int {
    unsafe {
        let (shim, methods) = parts(file);
        let Some(x_write) = methods.xWrite else {
            return ffi::SQLITE_IOERR_WRITE;
        };
        let len = usize::try_from(amount).unwrap_or(0);
        let end = offset + i64::from(amount);
        if let Some((at, header)) = shim.held {
            if offset == at + FRAME_HEADER as i64 {
                // The held header's page: both in one write.
                let rc = JOIN.with_borrow_mut(|join| {
                    join.clear();
                    join.extend_from_slice(&header);
                    join.extend_from_slice(std::slice::from_raw_parts(buf.cast::<u8>(), len));
                    x_write(shim.real, join.as_ptr().cast(), join.len() as c_int, at)
                });
                shim.held = None;
                shim.write_end = (rc == ffi::SQLITE_OK).then_some(end);
                if rc == ffi::SQLITE_OK {
                    JOINED.fetch_add(1, Ordering::Relaxed);
                }
                return rc;
            }
            let rc = flush(shim, methods);
            if rc != ffi::SQLITE_OK {
                return rc;
            }
        }
        if shim.wal && len == FRAME_HEADER && shim.write_end == Some(offset) {
            let mut header = [0u8; FRAME_HEADER];
            ptr::copy_nonoverlapping(buf.cast::<u8>(), header.as_mut_ptr(), FRAME_HEADER);
            shim.held = Some((offset, header));
            shim.write_end = None;
            return ffi::SQLITE_OK;
        }
        let rc = x_write(shim.real, buf, amount, offset);
        shim.write_end = (rc == ffi::SQLITE_OK).then_some(end);
        rc
    }
}

/// A method that writes any held header out first, then forwards.
macro_rules! flushing {
    ($name:ident, $x:ident, ($($arg:ident: $ty:ty),*), $missing:expr) => {
        unsafe extern "C" fn $name(file: *mut ffi::sqlite3_file $(, $arg: $ty)*) -> c_int {
            unsafe {
                let (shim, methods) = parts(file);
                let rc = flush(shim, methods);
                if rc != ffi::SQLITE_OK {
                    return rc;
                }
                match methods.$x {
                    Some(x) => x(shim.real $(, $arg)*),
                    None => $missing,
                }
            }
        }
    };
}

flushing!(read, xRead, (buf: *mut c_void, amount: c_int, offset: ffi::sqlite3_int64), ffi::SQLITE_IOERR_READ);
flushing!(truncate, xTruncate, (size: ffi::sqlite3_int64), ffi::SQLITE_IOERR_TRUNCATE);
flushing!(sync, xSync, (flags: c_int), ffi::SQLITE_IOERR_FSYNC);
flushing!(file_size, xFileSize, (size: *mut ffi::sqlite3_int64), ffi::SQLITE_IOERR_FSTAT);
flushing!(file_control, xFileControl, (op: c_int, arg: *mut c_void), ffi::SQLITE_NOTFOUND);
flushing!(lock, xLock, (level: c_int), ffi::SQLITE_IOERR_LOCK);
flushing!(unlock, xUnlock, (level: c_int), ffi::SQLITE_IOERR_UNLOCK);
flushing!(check_reserved_lock, xCheckReservedLock, (out: *mut c_int), ffi::SQLITE_IOERR_CHECKRESERVEDLOCK);
flushing!(shm_map, xShmMap, (region: c_int, size: c_int, extend: c_int, out: *mut *mut c_void), ffi::SQLITE_IOERR_SHMMAP);
flushing!(shm_lock, xShmLock, (offset: c_int, n: c_int, flags: c_int), ffi::SQLITE_IOERR_SHMLOCK);
flushing!(shm_unmap, xShmUnmap, (delete: c_int), ffi::SQLITE_OK);
flushing!(fetch, xFetch, (offset: ffi::sqlite3_int64, amount: c_int, out: *mut *mut c_void), {
    *out = ptr::null_mut();
    ffi::SQLITE_OK
});
flushing!(unfetch, xUnfetch, (offset: ffi::sqlite3_int64, page: *mut c_void), ffi::SQLITE_OK);

unsafe extern "C" fn close(file: *mut ffi::sqlite3_file) -> c_int {
    unsafe {
        let (shim, methods) = parts(file);
        let flushed = flush(shim, methods);
        let rc = match methods.xClose {
            Some(x) => x(shim.real),
            None => ffi::SQLITE_OK,
        };
        if flushed != ffi::SQLITE_OK {
            flushed
        } else {
            rc
        }
    }
}

unsafe extern "C" fn sector_size(file: *mut ffi::sqlite3_file) -> c_int {
    unsafe {
        let (shim, methods) = parts(file);
        methods.xSectorSize.map_or(4096, |x| x(shim.real))
    }
}

unsafe extern "C" fn device_characteristics(file: *mut ffi::sqlite3_file) -> c_int {
    unsafe {
        let (shim, methods) = parts(file);
        methods.xDeviceCharacteristics.map_or(0, |x| x(shim.real))
    }
}

unsafe extern "C" fn shm_barrier(file: *mut ffi::sqlite3_file) {
    unsafe {
        let (shim, methods) = parts(file);
        if let Some(x) = methods.xShmBarrier {
            x(shim.real);
        }
    }
}

// The VFS's own methods: straight to the unix VFS.

unsafe extern "C" fn delete(
    vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    sync_dir: c_int,
) -> c_int {
    unsafe {
        let real = real_vfs(vfs);
        (*real)
            .xDelete
            .map_or(ffi::SQLITE_IOERR_DELETE, |x| x(real, name, sync_dir))
    }
}

unsafe extern "C" fn access(
    vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    flags: c_int,
    out: *mut c_int,
) -> c_int {
    unsafe {
        let real = real_vfs(vfs);
        (*real)
            .xAccess
            .map_or(ffi::SQLITE_IOERR_ACCESS, |x| x(real, name, flags, out))
    }
}

unsafe extern "C" fn full_pathname(
    vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    n: c_int,
    out: *mut c_char,
) -> c_int {
    unsafe {
        let real = real_vfs(vfs);
        (*real)
            .xFullPathname
            .map_or(ffi::SQLITE_CANTOPEN, |x| x(real, name, n, out))
    }
}

unsafe extern "C" fn dl_open(vfs: *mut ffi::sqlite3_vfs, name: *const c_char) -> *mut c_void {
    unsafe {
        let real = real_vfs(vfs);
        (*real).xDlOpen.map_or(ptr::null_mut(), |x| x(real, name))
    }
}

unsafe extern "C" fn dl_error(vfs: *mut ffi::sqlite3_vfs, n: c_int, out: *mut c_char) {
    unsafe {
        let real = real_vfs(vfs);
        if let Some(x) = (*real).xDlError {
            x(real, n, out);
        }
    }
}

type DlSym = unsafe extern "C" fn(*mut ffi::sqlite3_vfs, *mut c_void, *const c_char);

unsafe extern "C" fn dl_sym(
    vfs: *mut ffi::sqlite3_vfs,
    handle: *mut c_void,
    symbol: *const c_char,
) -> Option<DlSym> {
    unsafe {
        let real = real_vfs(vfs);
        (*real).xDlSym.and_then(|x| x(real, handle, symbol))
    }
}

unsafe extern "C" fn dl_close(vfs: *mut ffi::sqlite3_vfs, handle: *mut c_void) {
    unsafe {
        let real = real_vfs(vfs);
        if let Some(x) = (*real).xDlClose {
            x(real, handle);
        }
    }
}

unsafe extern "C" fn randomness(vfs: *mut ffi::sqlite3_vfs, n: c_int, out: *mut c_char) -> c_int {
    unsafe {
        let real = real_vfs(vfs);
        (*real).xRandomness.map_or(0, |x| x(real, n, out))
    }
}

unsafe extern "C" fn sleep(vfs: *mut ffi::sqlite3_vfs, micros: c_int) -> c_int {
    unsafe {
        let real = real_vfs(vfs);
        (*real).xSleep.map_or(0, |x| x(real, micros))
    }
}

unsafe extern "C" fn current_time(vfs: *mut ffi::sqlite3_vfs, out: *mut f64) -> c_int {
    unsafe {
        let real = real_vfs(vfs);
        (*real)
            .xCurrentTime
            .map_or(ffi::SQLITE_ERROR, |x| x(real, out))
    }
}

unsafe extern "C" fn get_last_error(
    vfs: *mut ffi::sqlite3_vfs,
    n: c_int,
    out: *mut c_char,
) -> c_int {
    unsafe {
        let real = real_vfs(vfs);
        (*real).xGetLastError.map_or(0, |x| x(real, n, out))
    }
}

unsafe extern "C" fn current_time_int64(
    vfs: *mut ffi::sqlite3_vfs,
    out: *mut ffi::sqlite3_int64,
) -> c_int {
    unsafe {
        let real = real_vfs(vfs);
        (*real)
            .xCurrentTimeInt64
            .map_or(ffi::SQLITE_ERROR, |x| x(real, out))
    }
}

unsafe extern "C" fn set_system_call(
    vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    call: ffi::sqlite3_syscall_ptr,
) -> c_int {
    unsafe {
        let real = real_vfs(vfs);
        (*real)
            .xSetSystemCall
            .map_or(ffi::SQLITE_NOTFOUND, |x| x(real, name, call))
    }
}

unsafe extern "C" fn get_system_call(
    vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
) -> ffi::sqlite3_syscall_ptr {
    unsafe {
        let real = real_vfs(vfs);
        (*real).xGetSystemCall.and_then(|x| x(real, name))
    }
}

unsafe extern "C" fn next_system_call(
    vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
) -> *const c_char {
    unsafe {
        let real = real_vfs(vfs);
        (*real)
            .xNextSystemCall
            .map_or(ptr::null(), |x| x(real, name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::{Connection, OpenFlags};

    fn shim(path: &std::path::Path) -> Connection {
        let vfs = writer().expect("the shim registers");
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE;
        let conn = Connection::open_with_flags_and_vfs(path, flags, vfs).expect("open");
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA wal_autocheckpoint = 0;
             CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, body BLOB NOT NULL);",
        )
        .expect("schema");
        conn
    }

    /// A body that differs per row and per byte.
    fn body(id: i64) -> Vec<u8> {
        (0..20_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(id as u32) >> 13) as u8)
            .collect()
    }

    /// What a SIGKILL right after the commits would leave: the files as the
    /// kernel has them, copied while the writer is still open, then opened
    /// with the default VFS.
    #[test]
    fn committed_frames_are_whole_in_the_wal_while_the_writer_is_still_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.db");
        let conn = shim(&path);
        let before = joined_frames();
        for id in 1..=40 {
            conn.execute("INSERT INTO t (id, body) VALUES (?1, ?2)", (id, body(id)))
                .expect("insert");
        }
        // A transaction larger than the page cache spills frames into the
        // WAL, then dirties the same pages again: SQLite overwrites those
        // frames in place and, at commit, rewrites their checksums with
        // 24-byte writes that each follow a read (they go straight through).
        conn.execute_batch("PRAGMA cache_size = 10; PRAGMA cache_spill = 10;")
            .expect("small cache");
        let tx = conn.unchecked_transaction().expect("begin");
        for id in 41..=80 {
            tx.execute("INSERT INTO t (id, body) VALUES (?1, ?2)", (id, body(id)))
                .expect("insert");
            tx.execute(
                "UPDATE t SET body = ?2 WHERE id = ?1",
                (id % 10 + 1, body(id + 100)),
            )
            .expect("update");
        }
        tx.commit().expect("commit");
        let joined = joined_frames() - before;
        // 80 rows of 20 KB: at least 4 overflow pages each went out joined.
        assert!(joined >= 320, "only {joined} frames were joined");

        let copy = dir.path().join("copy.db");
        std::fs::copy(&path, &copy).expect("copy db");
        std::fs::copy(dir.path().join("s.db-wal"), dir.path().join("copy.db-wal"))
            .expect("copy wal");
        let plain = Connection::open(&copy).expect("open copy");
        let check: String = plain
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .expect("integrity_check");
        assert_eq!(check, "ok");
        for id in 1..=80 {
            let got: Vec<u8> = plain
                .query_row("SELECT body FROM t WHERE id = ?1", [id], |r| r.get(0))
                .expect("row");
            // Row n (1..=10) was last updated after the insert of the last
            // id in 41..=80 with id % 10 == n - 1.
            let last = if id == 1 { 80 } else { 70 + id - 1 };
            let want = if id <= 10 { body(last + 100) } else { body(id) };
            assert!(got == want, "row {id} differs");
        }
        drop(conn);
    }

    #[test]
    fn a_checkpoint_through_a_plain_connection_reads_what_the_shim_wrote() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.db");
        let conn = shim(&path);
        let reader = Connection::open(&path).expect("plain");
        for round in 0..4i64 {
            for id in 1..=20 {
                let id = round * 100 + id;
                conn.execute("INSERT INTO t (id, body) VALUES (?1, ?2)", (id, body(id)))
                    .expect("insert");
            }
            let (busy, _, _): (i64, i64, i64) = reader
                .query_row("PRAGMA wal_checkpoint(RESTART)", [], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })
                .expect("checkpoint");
            assert_eq!(busy, 0, "the checkpoint completed");
            conn.execute("DELETE FROM t WHERE id % 2 = 0", [])
                .expect("delete");
        }
        drop(conn);
        let n: i64 = reader
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .expect("count");
        assert_eq!(n, 40);
        for round in 0..4i64 {
            for id in (1..=20).step_by(2) {
                let id = round * 100 + id;
                let got: Vec<u8> = reader
                    .query_row("SELECT body FROM t WHERE id = ?1", [id], |r| r.get(0))
                    .expect("row");
                assert!(got == body(id), "row {id} differs");
            }
        }
    }
}
