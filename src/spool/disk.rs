//! Headroom on a filesystem that fills up.
//!
//! On a full disk SQLite cannot even delete: a delete (and an eviction) writes
//! pages to the WAL, and a checkpoint may grow the database file. So the spool
//! keeps space of its own: `<file>.reserve`, a preallocated file of
//! [`Headroom::size`] bytes. When a write finds the disk full, the reserve is
//! deleted, which gives the next deletes, evictions, checkpoints and vacuum
//! steps room to run; from then on the spool is in the *disk full* state and
//! takes new rows only into pages already free inside its file (which
//! eviction and acknowledged deletes provide), keeping half the released
//! headroom for deletes. Once the filesystem has room for the reserve again
//! (the file shrank after a drain, or the operator freed space), the reserve
//! is made again and the state ends.
//!
//! Disk full is told apart from `spool.max_bytes` (both are `SQLITE_FULL`) by
//! asking the filesystem (`statvfs`) how much is available.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::open::sibling;

/// The most headroom kept, for large spools.
const MAX_RESERVE: u64 = 4 << 20;
/// The least, for small ones.
const MIN_RESERVE: u64 = 256 << 10;

/// Why the spool refused a write for lack of room.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FullReason {
    /// The file reached `spool.max_bytes`.
    MaxBytes,
    /// The filesystem holding the spool has no space left.
    Disk,
}

/// The reserve file and the disk-full state.
#[derive(Debug)]
pub(super) struct Headroom {
    path: PathBuf,
    dir: PathBuf,
    size: u64,
    /// The reserve file exists with `size` bytes allocated.
    held: bool,
    /// Set when a write found the disk full; cleared once the reserve is back.
    disk_full: bool,
}

impl Headroom {
    /// Makes the reserve for the spool at `spool` if the disk has room for it.
    pub(super) fn new(spool: &Path, max_bytes: u64) -> Headroom {
        let dir = match spool.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
            _ => PathBuf::from("."),
        };
        let mut headroom = Headroom {
            path: sibling(spool, ".reserve"),
            dir,
            size: (max_bytes / 16).clamp(MIN_RESERVE, MAX_RESERVE),
            held: false,
            disk_full: false,
        };
        headroom.restore();
        headroom
    }

    pub(super) fn size(&self) -> u64 {
        self.size
    }

    pub(super) fn disk_full(&self) -> bool {
        self.disk_full
    }

    /// Bytes the filesystem lets an unprivileged writer add; None if unknown.
    pub(super) fn available(&self) -> Option<u64> {
        let stat = nix::sys::statvfs::statvfs(&self.dir).ok()?;
        Some((stat.blocks_available() as u64).saturating_mul(stat.fragment_size() as u64))
    }

    /// Whether an `SQLITE_FULL` for a write of about `bytes` was the disk (as
    /// opposed to `spool.max_bytes`).
    pub(super) fn reason(&self, bytes: u64) -> FullReason {
        match self.available() {
            Some(free) if free < bytes.saturating_add(self.size / 4) => FullReason::Disk,
            Some(_) => FullReason::MaxBytes,
            None => FullReason::Disk,
        }
    }

    /// The disk is full: delete the reserve so deletes and checkpoints can run.
    /// Returns true if space was released now.
    pub(super) fn release(&mut self) -> bool {
        self.disk_full = true;
        if !self.held {
            return false;
        }
        self.held = false;
        match fs::remove_file(&self.path) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot delete the spool's reserve file");
                false
            }
        }
    }

    /// While the disk is full, may an insert of `bytes` go ahead, given
    /// `free_in_file` bytes of free pages inside the spool? Only into free
    /// pages, and only while half the released headroom stays available.
    pub(super) fn admits(&self, bytes: u64, free_in_file: u64) -> bool {
        if !self.disk_full {
            return true;
        }
        let keep = self.size / 2;
        free_in_file >= bytes && self.available().is_some_and(|a| a >= keep)
    }

    /// Makes the reserve again when the filesystem has room for it (and
    /// some to spare), ending the disk-full state. Returns true if it did.
    pub(super) fn restore(&mut self) -> bool {
        if self.held {
            return false;
        }
        match self.available() {
            Some(free) if free >= self.size.saturating_mul(2) => {}
            _ => return false,
        }
        match allocate(&self.path, self.size) {
            Ok(()) => {
                self.held = true;
                std::mem::replace(&mut self.disk_full, false)
            }
            Err(e) => {
                let _ = fs::remove_file(&self.path);
                tracing::debug!(path = %self.path.display(), error = %e, "cannot make the spool's reserve file yet");
                false
            }
        }
    }
}

/// Creates `path` with `size` bytes really allocated (not a sparse file):
/// `posix_fallocate` where the filesystem supports it, else written out.
fn allocate(path: &Path, size: u64) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)?;
    let len = i64::try_from(size).unwrap_or(i64::MAX);
    match nix::fcntl::posix_fallocate(&file, 0, len) {
        Ok(()) => return file.sync_all(),
        Err(nix::errno::Errno::ENOSPC) => {
            return Err(io::Error::from_raw_os_error(
                nix::errno::Errno::ENOSPC as i32,
            ))
        }
        Err(_) => {} // not supported here: write it out
    }
    // Bytes that a compressing filesystem cannot squeeze away.
    let mut chunk = vec![0u8; 64 << 10];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut left = size;
    while left > 0 {
        for b in chunk.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        let n = left.min(chunk.len() as u64) as usize;
        file.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reserve_is_made_released_and_made_again() {
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("spool.db");
        let mut h = Headroom::new(&spool, 1 << 30);
        let reserve = sibling(&spool, ".reserve");
        assert_eq!(fs::metadata(&reserve).unwrap().len(), MAX_RESERVE);
        assert!(!h.disk_full());
        assert!(h.release());
        assert!(h.disk_full() && !reserve.exists());
        assert!(!h.admits(1, 0), "no free pages: nothing is admitted");
        assert!(h.restore());
        assert!(!h.disk_full() && reserve.exists());
    }

    #[test]
    fn a_small_spool_gets_a_small_reserve() {
        let dir = tempfile::tempdir().unwrap();
        let h = Headroom::new(&dir.path().join("spool.db"), 1 << 20);
        assert_eq!(h.size(), MIN_RESERVE);
    }
}
