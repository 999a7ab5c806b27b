//! Replay claims, owned by the spool thread.
//!
//! A claimed row is in one exporter's hands: no replay read returns it, no
//! eviction or expiry deletes it, until the holder deletes it (upstream
//! acknowledged or rejected it) or releases it (not delivered; it is replayed
//! later). Claims change only inside spool commands, which the one spool
//! thread runs in order, so "read a run and claim it", "insert and claim"
//! and "delete and forget the claim" are each atomic without any lock on the
//! async side: an exporter finishing a row sends its delete or release and
//! goes on, and never waits behind a commit (a stalled disk stalls the spool
//! thread, not the exporters holding rows in memory).
//!
//! [`Unclaimed`] tells the replay workers whether the spool may hold rows
//! nobody has claimed (rows from before the start, spilled rows, rows
//! released or not handed off): while it is set they read the spool, and
//! while it is clear durable mode's hand-offs from memory are all there is.
//! The spool thread sets it (and wakes the workers) when such rows appear and
//! clears it when a claim finds nothing, so it never claims "none" while an
//! unclaimed row exists.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Notify;

use super::store::Store;
use super::{SpoolError, SpooledBatch};

/// Whether unclaimed rows may wait in the spool, and a wake-up for replay
/// workers when they appear. Shared by the spool thread and the handles.
#[derive(Debug)]
pub struct Unclaimed {
    rows: AtomicBool,
    wake: Notify,
}

impl Unclaimed {
    pub(super) fn new() -> Unclaimed {
        Unclaimed {
            // Rows from before the start have not been looked for yet.
            rows: AtomicBool::new(true),
            wake: Notify::new(),
        }
    }

    /// The spool may hold rows nobody has claimed.
    pub fn any(&self) -> bool {
        self.rows.load(Ordering::Acquire)
    }

    /// Notified when unclaimed rows appear; enable the future before checking
    /// [`Unclaimed::any`] so no wake-up is missed.
    pub fn wake(&self) -> &Notify {
        &self.wake
    }

    fn set(&self) {
        self.rows.store(true, Ordering::Release);
        self.wake.notify_waiters();
    }

    fn clear(&self) {
        self.rows.store(false, Ordering::Release);
    }
}

/// The claim set and the replay cursor. Lives on the spool thread.
#[derive(Debug, Default)]
pub(super) struct Claims {
    /// Replay reads start after this id, so runs go round the spool instead
    /// of retrying the same failing row first.
    cursor: i64,
    held: HashSet<i64>,
    /// Rows whose columns do not decode (`SpoolError::BadRow`, e.g. a byte
    /// count that does not match the payload): replay skips them from then
    /// on instead of failing every run at the same row, which would hold up
    /// every row behind it. They stay in the file, where `spool verify`
    /// reports them and expiry or eviction may remove them.
    unreadable: HashSet<i64>,
}

impl Claims {
    pub(super) fn held(&self) -> &HashSet<i64> {
        &self.held
    }

    /// Rows replay skips because they cannot be read.
    pub(super) fn unreadable(&self) -> &HashSet<i64> {
        &self.unreadable
    }

    /// `keep` and every claimed id: rows eviction and expiry leave alone.
    pub(super) fn kept_with(&self, keep: &[i64]) -> HashSet<i64> {
        let mut all = self.held.clone();
        all.extend(keep.iter().copied());
        all
    }

    /// Claim rows just inserted for their inserter.
    pub(super) fn claim(&mut self, ids: &[i64]) {
        self.held.extend(ids.iter().copied());
    }

    /// The holder is done with these rows and deleted them.
    pub(super) fn forget(&mut self, ids: &[i64]) {
        for id in ids {
            self.held.remove(id);
        }
    }

    /// The holder gives these rows back undelivered: they are replayed later.
    pub(super) fn release(&mut self, ids: &[i64], unclaimed: &Unclaimed) {
        self.forget(ids);
        if !ids.is_empty() {
            unclaimed.set();
        }
    }

    /// Rows were inserted without a claim (spill, shutdown).
    pub(super) fn inserted_unclaimed(&self, written: usize, unclaimed: &Unclaimed) {
        if written > 0 {
            unclaimed.set();
        }
    }

    /// [`Store::oldest_run`] past the unreadable rows: a row found unreadable
    /// is logged, set aside, and the run is read again without it.
    fn readable_run(
        &mut self,
        store: &Store,
        after_id: i64,
        max_items: u64,
        max_bytes: u64,
    ) -> Result<Vec<SpooledBatch>, SpoolError> {
        loop {
            match store.oldest_run(after_id, &self.held, &self.unreadable, max_items, max_bytes) {
                Err(SpoolError::BadRow { path, id, why }) if self.unreadable.insert(id) => {
                    tracing::error!(
                        path = %path.display(),
                        row = id,
                        why,
                        "a spool row cannot be read; replay skips it and goes on with the others \
                         (`telespool spool verify` lists it; spool.max_age or eviction removes it)"
                    );
                }
                other => return other,
            }
        }
    }

    /// The oldest run of unclaimed rows after the cursor (wrapping to the
    /// start once), claimed. Empty, and [`Unclaimed`] cleared, when every row
    /// is claimed or delete-pending.
    pub(super) fn claim_run(
        &mut self,
        store: &Store,
        max_items: u64,
        max_bytes: u64,
        unclaimed: &Unclaimed,
    ) -> Result<Vec<SpooledBatch>, SpoolError> {
        let mut run = self.readable_run(store, self.cursor, max_items, max_bytes)?;
        if run.is_empty() && self.cursor != 0 {
            run = self.readable_run(store, 0, max_items, max_bytes)?;
        }
        match run.first() {
            Some(first) => {
                // Rows of other signals after the first are still ahead.
                self.cursor = first.id;
                self.held.extend(run.iter().map(|r| r.id));
            }
            None => {
                self.cursor = 0;
                unclaimed.clear();
            }
        }
        Ok(run)
    }
}
