//! Memory batches on their way into the spool.
//!
//! Between the moment a caller hands batches to `write_to_spool` and the
//! moment the spool thread answers, the batches are in nobody's queue: not in
//! the export queue, not in the spool. If the shutdown deadline cuts that wait
//! (a spool write that blocks on a lock or a slow disk), those items are
//! counted here so the shutdown can report them as dropped instead of losing
//! them silently. The count is the worst case: the spool thread may still
//! commit the transaction before the process exits, in which case the items
//! are replayed at the next start although they were counted as dropped.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::batch::Batch;
use crate::signal::Signal;

/// Items per signal inside an unfinished `write_to_spool` call.
#[derive(Debug, Default)]
pub(crate) struct SpoolWrites {
    items: [AtomicU64; 3],
}

impl SpoolWrites {
    /// Count `batches` as in flight until the returned guard is dropped.
    pub(crate) fn track(&self, batches: &[Batch]) -> InFlight<'_> {
        let mut items = [0u64; 3];
        for b in batches {
            items[b.signal.index()] += b.items;
        }
        for (counter, n) in self.items.iter().zip(items) {
            counter.fetch_add(n, Ordering::AcqRel);
        }
        InFlight {
            writes: self,
            items,
        }
    }

    /// Items per signal whose spool write has not finished.
    pub(crate) fn in_flight(&self) -> Vec<(Signal, u64)> {
        Signal::ALL
            .into_iter()
            .map(|s| (s, self.items[s.index()].load(Ordering::Acquire)))
            .filter(|(_, n)| *n > 0)
            .collect()
    }
}

/// Holds batches' items in the in-flight count; the write finished (or its
/// future was dropped) when this is dropped.
pub(crate) struct InFlight<'a> {
    writes: &'a SpoolWrites,
    items: [u64; 3],
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        for (counter, n) in self.writes.items.iter().zip(self.items) {
            counter.fetch_sub(n, Ordering::AcqRel);
        }
    }
}
