//! The delivery loop's hook for upstream size limits.
//!
//! A batch above the upstream's working limit is cut into parts
//! (`exporter::split::pack`) before its first attempt; `deliver` sends them
//! one after the other, in order, the `Batch` holding the part in flight and
//! a queue holding the rest. When upstream refuses a part as too large, the
//! working limit is lowered to half the part and the part is cut again at
//! that size, in front of the rest; a part that is one resource entry cannot
//! be cut and is dropped (counted as `upstream_too_large`). The batch is done
//! (a spool row deleted) only when every part is acknowledged or dropped.
//!
//! If shutdown or `upstream.retry.max_elapsed` stops delivery midway, the
//! parts not yet acknowledged are joined back into the batch, so a memory
//! batch is spooled with exactly what upstream has not acknowledged. A spool
//! row stays whole in the spool: its parts already delivered are sent again
//! when it is replayed (at-least-once, as for any row whose acknowledgement
//! was in flight).

use std::collections::VecDeque;

use crate::batch::Batch;
use crate::exporter::split::{pack, Part};
use crate::exporter::{ExportFailure, Upstream};
use crate::metrics::DropReason;

use super::Pipeline;

/// Cut `batch` to the upstream's working limit: `batch` keeps the first
/// part, the others are returned (none when it fits).
pub(super) fn cut_to_limit(upstream: &Upstream, batch: &mut Batch) -> VecDeque<Part> {
    let limit = upstream.working_limit();
    if batch.bytes <= limit {
        return VecDeque::new();
    }
    let mut parts = pack(batch.signal, &batch.chunks, limit);
    next(batch, &mut parts);
    parts
}

/// Make the next part the one in `batch`; false when there is none.
pub(super) fn next(batch: &mut Batch, rest: &mut VecDeque<Part>) -> bool {
    let Some(part) = rest.pop_front() else {
        return false;
    };
    batch.chunks = part.chunks;
    batch.items = part.items;
    batch.bytes = part.bytes;
    true
}

/// Put the parts not yet sent back into `batch`, after the one it holds.
pub(super) fn rejoin(batch: &mut Batch, rest: VecDeque<Part>) {
    for part in rest {
        batch.chunks.extend(part.chunks);
        batch.items += part.items;
        batch.bytes += part.bytes;
    }
}

impl Pipeline {
    /// Upstream refused the part in `batch` as too large: lower the working
    /// limit and cut the part, or drop it if it is one resource entry. True
    /// when `batch` now holds a part to send.
    pub(super) fn split_refused(
        &self,
        upstream: &Upstream,
        batch: &mut Batch,
        rest: &mut VecDeque<Part>,
        failure: &ExportFailure,
    ) -> bool {
        let signal = batch.signal;
        upstream.lower_limit(batch.bytes);
        let limit = upstream.working_limit().min(batch.bytes / 2).max(1);
        let parts = pack(signal, &batch.chunks, limit);
        if parts.len() <= 1 {
            tracing::error!(
                %signal,
                items = batch.items,
                bytes = batch.bytes,
                cause = %failure.cause,
                message = %failure.message,
                "upstream refused one resource entry as too large even on its own; dropped"
            );
            self.metrics
                .dropped(signal, DropReason::UpstreamTooLarge, batch.items);
            return next(batch, rest);
        }
        tracing::debug!(%signal, bytes = batch.bytes, parts = parts.len(), limit, "upstream refused a request as too large; sending it in parts");
        for part in parts.into_iter().rev() {
            rest.push_front(part);
        }
        next(batch, rest)
    }
}
