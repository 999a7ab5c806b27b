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
//! When upstream refuses a part's content for good (`Verdict::Refused`: gRPC
//! INVALID_ARGUMENT or INTERNAL, HTTP 400), the refusal may be about one of
//! the many requests joined in it: the part is cut in two the same way
//! (request boundaries, then resource entries) and both halves go first.
//! What upstream still refuses when it is one resource entry is dropped
//! (counted as `upstream_rejected`), so one bad request costs about
//! 2·log2(n) attempts instead of its n − 1 neighbours. At most
//! [`MAX_REFUSED_CUTS`] cuts per batch: an upstream that refuses everything
//! with such a status costs a bounded number of attempts, and the parts
//! left are dropped whole.
//!
//! If shutdown or `upstream.retry.max_elapsed` stops delivery midway, the
//! parts not yet acknowledged are joined back into the batch, so a memory
//! batch is spooled with exactly what upstream has not acknowledged. A spool
//! row stays whole in the spool: its parts already delivered are sent again
//! when it is replayed (at-least-once, as for any row whose acknowledgement
//! was in flight), and their items are counted as duplicates risked.

use std::collections::VecDeque;

use crate::batch::Batch;
use crate::exporter::split::{pack, Part};
use crate::exporter::{ExportFailure, Upstream};
use crate::metrics::DropReason;

use super::Pipeline;

/// Cuts of refused parts per batch: enough to find two bad requests among a
/// hundred (each takes about 2·log2(100) ≈ 14 attempts, 7 cuts).
pub(super) const MAX_REFUSED_CUTS: u32 = 16;

/// Upstream refused the content of the part in `batch`: cut it in two at
/// request boundaries (inside a request at its resource entries), put both
/// halves in front of `rest` and make the first the one in `batch`. False,
/// and `batch` unchanged, when the part is one resource entry.
pub(super) fn cut_refused(batch: &mut Batch, rest: &mut VecDeque<Part>) -> bool {
    let parts = pack(batch.signal, &batch.chunks, (batch.bytes / 2).max(1));
    if parts.len() <= 1 {
        return false;
    }
    send_first(parts, batch, rest)
}

/// Put `parts` in front of `rest`, in order, and make the first the one in
/// `batch`.
fn send_first(parts: VecDeque<Part>, batch: &mut Batch, rest: &mut VecDeque<Part>) -> bool {
    for part in parts.into_iter().rev() {
        rest.push_front(part);
    }
    next(batch, rest)
}

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
        send_first(parts, batch, rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::Origin;
    use crate::buffer::MemoryBudget;
    use crate::config::{ByteSize, UpstreamConfig};
    use crate::exporter::split::tests::resource_spans;
    use crate::exporter::UpstreamSetup;
    use crate::signal::Signal;
    use bytes::Bytes;

    fn upstream(limit: u64) -> Upstream {
        let cfg = UpstreamConfig {
            max_request_bytes: ByteSize(limit),
            ..UpstreamConfig::default()
        };
        let endpoint = "http://127.0.0.1:9";
        Upstream::new(&cfg, endpoint, UpstreamSetup::load(&cfg, endpoint).unwrap())
    }

    fn batch(chunks: Vec<Bytes>, items: u64) -> Batch {
        Batch {
            signal: Signal::Traces,
            bytes: chunks.iter().map(|c| c.len() as u64).sum(),
            chunks,
            items,
            created_ms: 0,
            attempts: 0,
            origin: Origin::Memory,
            reservation: MemoryBudget::new(1 << 20).empty(Signal::Traces),
        }
    }

    #[tokio::test]
    async fn a_batch_above_the_limit_is_sent_in_parts_and_what_is_left_rejoins_whole() {
        let entry = resource_spans(4, 200);
        let chunks: Vec<Bytes> = (0..6).map(|_| Bytes::from(entry.clone())).collect();
        let whole: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
        let mut b = batch(chunks, 24);
        let mut rest = cut_to_limit(&upstream(2 * entry.len() as u64), &mut b);
        assert_eq!((b.chunks.len(), b.items, rest.len()), (2, 8, 2));
        // The first part is acknowledged; shutdown cuts the second off.
        assert!(next(&mut b, &mut rest));
        rejoin(&mut b, rest);
        assert_eq!((b.items, b.bytes), (16, 4 * entry.len() as u64));
        let left: Vec<u8> = b.chunks.iter().flat_map(|c| c.iter().copied()).collect();
        assert_eq!(
            left,
            whole[2 * entry.len()..],
            "exactly the parts not acknowledged"
        );
    }

    #[tokio::test]
    async fn a_refused_part_is_cut_in_two_down_to_one_resource_entry() {
        // Three requests, the second of two resource entries.
        let one = resource_spans(2, 50);
        let two = [resource_spans(1, 50), resource_spans(3, 50)].concat();
        let chunks = vec![
            Bytes::from(one.clone()),
            Bytes::from(two.clone()),
            Bytes::from(one.clone()),
        ];
        let whole: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
        let mut b = batch(chunks, 8);
        let mut rest = VecDeque::new();
        assert!(cut_refused(&mut b, &mut rest));
        assert!(b.bytes < whole.len() as u64 && !rest.is_empty());
        // Every part cut down to single entries: nothing lost, nothing twice,
        // item counts add up, and a single entry is not cut.
        let mut done: Vec<(Vec<u8>, u64)> = Vec::new();
        loop {
            if !cut_refused(&mut b, &mut rest) {
                let bytes: Vec<u8> = b.chunks.iter().flat_map(|c| c.iter().copied()).collect();
                done.push((bytes, b.items));
                if !next(&mut b, &mut rest) {
                    break;
                }
            }
        }
        let joined: Vec<u8> = done.iter().flat_map(|(d, _)| d.iter().copied()).collect();
        assert_eq!(joined, whole, "the entries, in order, each once");
        assert_eq!(done.iter().map(|(_, i)| i).sum::<u64>(), 8);
        let entries = [
            one.len(),
            resource_spans(1, 50).len(),
            resource_spans(3, 50).len(),
            one.len(),
        ];
        assert_eq!(
            done.iter().map(|(d, _)| d.len()).collect::<Vec<_>>(),
            entries,
            "cut down to single resource entries"
        );
    }

    #[tokio::test]
    async fn a_batch_within_the_limit_is_one_part() {
        let mut b = batch(vec![Bytes::from(resource_spans(3, 10))], 3);
        let mut rest = cut_to_limit(&upstream(1 << 20), &mut b);
        assert!(rest.is_empty());
        assert!(!next(&mut b, &mut rest));
        assert_eq!(b.items, 3);
    }

    #[tokio::test]
    async fn lowering_the_limit_halves_it_and_never_raises_it() {
        let u = upstream(4 << 20);
        assert_eq!(u.lower_limit(3 << 20), Some(3 << 19));
        assert_eq!(
            u.lower_limit(4 << 20),
            None,
            "a larger refusal changes nothing"
        );
        assert_eq!(u.working_limit(), 3 << 19);
    }
}
