//! Cutting a batch into requests no larger than upstream accepts.
//!
//! A batch is a list of request bodies (chunks) whose concatenation is the
//! upstream request. Any run of whole chunks is a valid request, and so is any
//! run of a request's top-level fields (its resource entries: each
//! ResourceSpans / ResourceMetrics / ResourceLogs is a request by itself).
//! [`pack`] cuts at those boundaries only, never inside a resource entry, and
//! never copies: pieces are `Bytes` slices of the chunks.
//!
//! Invariants (property-tested below): the parts' bytes, concatenated, are the
//! batch's bytes in order, each exactly once; item counts add up; every part
//! is at most `limit`, except a part that is one resource entry larger than
//! `limit` on its own (it cannot be cut; the caller drops it if upstream
//! refuses it).

use std::collections::VecDeque;

use bytes::Bytes;

use crate::signal::Signal;
use crate::wire;

/// One upstream request's worth of a batch.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Part {
    /// Whole chunks or slices of one; their concatenation is the request.
    pub(crate) chunks: Vec<Bytes>,
    pub(crate) bytes: u64,
    pub(crate) items: u64,
}

impl Part {
    /// Whether this part is a single resource entry, which cannot be cut.
    #[cfg(test)]
    pub(crate) fn is_one_entry(&self, signal: Signal) -> bool {
        match self.chunks.as_slice() {
            [one] => wire::top_level_fields(signal, one).map_or(true, |f| f.len() <= 1),
            _ => false,
        }
    }
}

fn items_in(signal: Signal, piece: &[u8]) -> u64 {
    // Every piece was walked at ingest (or when spooled); a failure here
    // would mean a bug elsewhere, and the count is only for accounting.
    wire::walk(signal, piece).map_or(0, |c| c.items)
}

/// Cut `chunks` into parts of at most `limit` bytes, in order, packing
/// greedily: whole chunks first, and a chunk larger than `limit` at its
/// resource entries.
pub(crate) fn pack(signal: Signal, chunks: &[Bytes], limit: u64) -> VecDeque<Part> {
    let mut parts = VecDeque::new();
    let mut open = Part {
        chunks: Vec::new(),
        bytes: 0,
        items: 0,
    };
    let mut add = |piece: Bytes, parts: &mut VecDeque<Part>| {
        let len = piece.len() as u64;
        if open.bytes > 0 && open.bytes + len > limit {
            parts.push_back(std::mem::replace(
                &mut open,
                Part {
                    chunks: Vec::new(),
                    bytes: 0,
                    items: 0,
                },
            ));
        }
        open.items += items_in(signal, &piece);
        open.bytes += len;
        open.chunks.push(piece);
    };
    for chunk in chunks {
        if chunk.is_empty() {
            continue;
        }
        if chunk.len() as u64 <= limit {
            add(chunk.clone(), &mut parts);
            continue;
        }
        match wire::top_level_fields(signal, chunk) {
            Ok(fields) => {
                for range in fields {
                    add(chunk.slice(range), &mut parts);
                }
            }
            // Cannot be cut: it goes as it is.
            Err(_) => add(chunk.clone(), &mut parts),
        }
    }
    if open.bytes > 0 {
        parts.push_back(open);
    }
    parts
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    fn varint(mut v: usize, out: &mut Vec<u8>) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    fn field(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        varint(body.len(), &mut out);
        out.extend_from_slice(body);
        out
    }

    /// One ResourceSpans entry (request field 1) holding `spans` spans whose
    /// names are `name_len` bytes.
    pub(crate) fn resource_spans(spans: usize, name_len: usize) -> Vec<u8> {
        let mut scope = Vec::new();
        for _ in 0..spans {
            let mut span = field(0x0a, &[1; 16]); // trace_id
            span.extend(field(0x2a, &vec![b'n'; name_len])); // name (field 5)
            scope.extend(field(0x12, &span)); // ScopeSpans.spans
        }
        field(0x0a, &field(0x12, &scope)) // Request.resource_spans { scope_spans }
    }

    fn concat(parts: &VecDeque<Part>) -> Vec<u8> {
        parts
            .iter()
            .flat_map(|p| p.chunks.iter().flat_map(|c| c.iter().copied()))
            .collect()
    }

    #[test]
    fn chunks_that_fit_stay_whole_and_a_big_one_is_cut_at_its_resources() {
        let small = Bytes::from(resource_spans(2, 10));
        let mut big = Vec::new();
        for _ in 0..4 {
            big.extend(resource_spans(5, 100));
        }
        let big = Bytes::from(big);
        let entry = resource_spans(5, 100).len() as u64;
        let parts = pack(Signal::Traces, &[small.clone(), big.clone()], 2 * entry);
        let sizes: Vec<(usize, u64, u64)> = parts
            .iter()
            .map(|p| (p.chunks.len(), p.bytes, p.items))
            .collect();
        assert_eq!(
            sizes,
            vec![
                (2, small.len() as u64 + entry, 7),
                (2, 2 * entry, 10),
                (1, entry, 5)
            ]
        );
        assert_eq!(concat(&parts), [&small[..], &big[..]].concat());
    }

    #[test]
    fn a_single_entry_above_the_limit_is_a_part_of_its_own() {
        let entry = Bytes::from(resource_spans(3, 500));
        let parts = pack(Signal::Traces, std::slice::from_ref(&entry), 100);
        assert_eq!(parts.len(), 1);
        assert!(parts[0].is_one_entry(Signal::Traces));
        assert_eq!(parts[0].items, 3);
    }

    proptest! {
        #[test]
        fn packing_keeps_every_byte_once_in_order_and_respects_the_limit(
            requests in proptest::collection::vec(
                proptest::collection::vec((1usize..6, 0usize..400), 0..5), 1..12),
            limit in 1u64..6000,
        ) {
            let mut total_items = 0u64;
            let chunks: Vec<Bytes> = requests.iter().map(|entries| {
                let mut body = Vec::new();
                for &(spans, name) in entries {
                    body.extend(resource_spans(spans, name));
                    total_items += spans as u64;
                }
                Bytes::from(body)
            }).collect();
            let parts = pack(Signal::Traces, &chunks, limit);
            let whole: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
            prop_assert_eq!(concat(&parts), whole);
            prop_assert_eq!(parts.iter().map(|p| p.items).sum::<u64>(), total_items);
            for p in &parts {
                prop_assert!(p.bytes > 0);
                prop_assert_eq!(p.bytes, p.chunks.iter().map(|c| c.len() as u64).sum::<u64>());
                prop_assert!(p.bytes <= limit || p.is_one_entry(Signal::Traces),
                    "part of {} bytes over limit {} holds more than one entry", p.bytes, limit);
                for c in &p.chunks {
                    prop_assert!(wire::walk(Signal::Traces, c).is_ok(), "every piece is a valid request");
                }
            }
            // Greedy: two neighbours never fit together.
            for w in parts.iter().collect::<Vec<_>>().windows(2) {
                prop_assert!(w[0].bytes + w[1].bytes > limit);
            }
        }
    }
}
