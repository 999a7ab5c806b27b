//! Stamping resource attributes into a request's bytes, without decoding it.
//!
//! An export request is a list of resource entries (field 1: ResourceSpans,
//! ResourceMetrics or ResourceLogs), and each entry's field 1 is its
//! `Resource`. Protobuf merges repeated occurrences of an embedded message
//! field, and `Resource.attributes` (field 1) is a repeated `KeyValue`, so
//!
//! ```text
//! entry' = entry ++ [0x0a, len, (0x0a, len, KeyValue)*]
//! ```
//!
//! decodes to the entry with those attributes added to its resource (and
//! gives an entry without a resource one). Only the entry's own length prefix
//! in the request changes; scopes and items are copied as they are.
//!
//! - **keep** (the application's value wins): the entry's resource attribute
//!   keys are read (field 1 of each `KeyValue` in each `Resource` occurrence,
//!   the last occurrence of the key field winning, as protobuf says), and only
//!   the stamp's attributes whose key the application did not set are
//!   appended. An entry that already has every key is copied unchanged.
//! - **replace** (the agent's value wins): every stamp attribute is appended,
//!   and each application `KeyValue` whose key is one of the stamp's is cut out
//!   of its `Resource` occurrence (whose length prefix is rewritten), so no key
//!   appears twice.
//!
//! Cost: the body has already passed [`crate::wire::walk`]; stamping reads only
//! the request's entries and their resources' `KeyValue` keys (scopes and
//! items are skipped by length), computes the new size, then builds the new
//! body in one allocation of exactly that size. When nothing changes (keep,
//! and every entry already has every key) the original `Bytes` is returned and
//! nothing is allocated. The `KeyValue` encodings are built once, in
//! [`Stamp::new`].
//!
//! `KeyValue` messages are not checked by the walk (resources are walked flat);
//! one whose encoding is broken makes stamping fail with a [`WireError`], as a
//! decoder upstream would.

use bytes::Bytes;

use super::{Fault, Reader, WireError, WireType};
use crate::signal::Signal;

/// Most attributes one stamp holds (the keys found in an entry are a bit set).
pub const MAX_ATTRIBUTES: usize = 64;

/// Whose value wins when the application's resource already has a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Conflict {
    /// The application's attribute stays; the stamp's is left out.
    Keep,
    /// The application's attribute is cut out; the stamp's is added.
    Replace,
}

/// Why a request could not be stamped.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StampError {
    /// A resource attribute (`KeyValue`) of the request is not well formed;
    /// the client must fix the request (gRPC `INVALID_ARGUMENT`, HTTP 400).
    #[error(transparent)]
    Malformed(#[from] WireError),
    /// The stamped request would exceed `limit` bytes: only possible with very
    /// many resource entries in one request. The client should send fewer
    /// entries per request.
    #[error("request would be {size} bytes after stamping resource attributes, above the limit of {limit} bytes (twice receiver.max_request_bytes); send fewer resource entries per request")]
    TooLarge { size: u64, limit: u64 },
}

/// String attributes to stamp on every resource, encoded once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stamp {
    attrs: Vec<Attr>,
    conflict: Conflict,
}

/// One attribute: its key, and its encoding as field 1 of `Resource`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Attr {
    key: Box<[u8]>,
    field: Box<[u8]>,
}

/// What stamping does to one entry.
#[derive(Clone, Copy)]
struct Plan {
    /// Stamp attributes appended (bit i: `attrs[i]`).
    add: u64,
    /// Bytes of the appended `Resource` body (the added fields).
    add_len: usize,
    /// Replace mode and the app had a stamp key: its resources are rewritten.
    cut: bool,
    /// Length of the entry's own contents after cutting (before appending).
    body_len: usize,
}

impl Plan {
    fn changes(&self) -> bool {
        self.add != 0 || self.cut
    }

    /// The entry's new contents length: rewritten body, then the appended field.
    fn new_len(&self) -> usize {
        match self.add {
            0 => self.body_len,
            _ => self.body_len + 1 + varint_len(self.add_len as u64) + self.add_len,
        }
    }
}

impl Stamp {
    /// A stamp of `attributes` (key, string value), in this order. Keys are
    /// expected distinct and non-empty, and at most [`MAX_ATTRIBUTES`] (the
    /// config checks all three); attributes beyond that are ignored.
    pub fn new(attributes: &[(String, String)], conflict: Conflict) -> Stamp {
        let attrs = attributes
            .iter()
            .take(MAX_ATTRIBUTES)
            .map(|(key, value)| {
                let kv = key_value(key.as_bytes(), value.as_bytes());
                let mut field = Vec::with_capacity(kv.len() + 6);
                field.push(0x0a);
                put_varint(&mut field, kv.len() as u64);
                field.extend_from_slice(&kv);
                Attr {
                    key: key.as_bytes().into(),
                    field: field.into(),
                }
            })
            .collect();
        Stamp { attrs, conflict }
    }

    pub fn is_empty(&self) -> bool {
        self.attrs.is_empty()
    }

    pub fn conflict(&self) -> Conflict {
        self.conflict
    }

    /// Stamp every resource entry of `body`, a request of `signal` that
    /// [`crate::wire::walk`] accepted. Returns `body` itself when no entry
    /// changes; refuses a result above `limit` bytes before allocating it.
    pub fn apply(&self, signal: Signal, body: &Bytes, limit: usize) -> Result<Bytes, StampError> {
        self.apply_inner(body, limit).map_err(|e| match e {
            Failure::Fault(Fault { offset, kind }) => StampError::Malformed(WireError {
                signal,
                offset,
                kind,
            }),
            Failure::TooLarge(size) => StampError::TooLarge {
                size: size as u64,
                limit: limit as u64,
            },
        })
    }

    fn apply_inner(&self, body: &Bytes, limit: usize) -> Result<Bytes, Failure> {
        if self.attrs.is_empty() {
            return Ok(body.clone());
        }
        // Pass 1: the new size, and whether anything changes at all.
        let mut size = 0usize;
        let mut changed = false;
        let mut request = Reader::new(body, 0);
        loop {
            let start = request.pos;
            let Some(field) = request.next_field()? else {
                break;
            };
            if field.number != 1 {
                size += request.pos - start;
                continue;
            }
            let plan = self.plan(Reader::new(field.body, field.body_at))?;
            if plan.changes() {
                changed = true;
                let len = plan.new_len();
                size += 1 + varint_len(len as u64) + len;
            } else {
                size += request.pos - start;
            }
        }
        if !changed {
            return Ok(body.clone());
        }
        if size > limit {
            return Err(Failure::TooLarge(size));
        }
        // Pass 2: write it.
        let mut out = Vec::with_capacity(size);
        let mut request = Reader::new(body, 0);
        loop {
            let start = request.pos;
            let Some(field) = request.next_field()? else {
                break;
            };
            let raw = &body[start..request.pos];
            if field.number != 1 {
                out.extend_from_slice(raw);
                continue;
            }
            let plan = self.plan(Reader::new(field.body, field.body_at))?;
            if !plan.changes() {
                out.extend_from_slice(raw);
                continue;
            }
            out.push(0x0a);
            put_varint(&mut out, plan.new_len() as u64);
            if plan.cut {
                self.write_cut(Reader::new(field.body, field.body_at), &mut out)?;
            } else {
                out.extend_from_slice(field.body);
            }
            if plan.add != 0 {
                out.push(0x0a);
                put_varint(&mut out, plan.add_len as u64);
                for (i, attr) in self.attrs.iter().enumerate() {
                    if plan.add & (1 << i) != 0 {
                        out.extend_from_slice(&attr.field);
                    }
                }
            }
        }
        debug_assert_eq!(out.len(), size);
        Ok(Bytes::from(out))
    }

    /// Which stamp keys the entry's resource has, and what changes.
    fn plan(&self, mut entry: Reader<'_>) -> Result<Plan, Fault> {
        let all = all_bits(self.attrs.len());
        let mut present = 0u64;
        // Entry contents length if the conflicting KeyValues are cut out.
        let mut cut_len = 0usize;
        loop {
            let start = entry.pos;
            let Some(field) = entry.next_field()? else {
                break;
            };
            if field.number != 1 {
                cut_len += entry.pos - start;
                continue;
            }
            let mut resource = field.message("resource entry")?;
            let mut kept = 0usize;
            loop {
                let start = resource.pos;
                let Some(field) = resource.next_field()? else {
                    break;
                };
                let len = resource.pos - start;
                if field.number == 1 {
                    let bit = self.key_bit(key_of(field.message("Resource")?)?);
                    present |= bit;
                    if bit != 0 {
                        continue;
                    }
                }
                kept += len;
            }
            cut_len += 1 + varint_len(kept as u64) + kept;
        }
        let (add, cut) = match self.conflict {
            Conflict::Keep => (all & !present, false),
            Conflict::Replace => (all, present != 0),
        };
        let add_len = self
            .attrs
            .iter()
            .enumerate()
            .filter(|(i, _)| add & (1 << i) != 0)
            .map(|(_, a)| a.field.len())
            .sum();
        Ok(Plan {
            add,
            add_len,
            cut,
            body_len: if cut { cut_len } else { entry.data.len() },
        })
    }

    /// Copy an entry's contents with every stamp key cut out of its resources.
    fn write_cut(&self, mut entry: Reader<'_>, out: &mut Vec<u8>) -> Result<(), Fault> {
        loop {
            let start = entry.pos;
            let Some(field) = entry.next_field()? else {
                break;
            };
            if field.number != 1 {
                out.extend_from_slice(&entry.data[start..entry.pos]);
                continue;
            }
            // Two passes over this resource: its new length, then its fields.
            let kept = |write: &mut dyn FnMut(&[u8])| -> Result<(), Fault> {
                let mut resource = field.message("resource entry")?;
                loop {
                    let start = resource.pos;
                    let Some(f) = resource.next_field()? else {
                        break;
                    };
                    if f.number == 1 && self.key_bit(key_of(f.message("Resource")?)?) != 0 {
                        continue;
                    }
                    write(&resource.data[start..resource.pos]);
                }
                Ok(())
            };
            let mut len = 0usize;
            kept(&mut |raw| len += raw.len())?;
            out.push(0x0a);
            put_varint(out, len as u64);
            kept(&mut |raw| out.extend_from_slice(raw))?;
        }
        Ok(())
    }

    /// The bit of the stamp attribute with this key, or 0.
    #[inline]
    fn key_bit(&self, key: &[u8]) -> u64 {
        self.attrs
            .iter()
            .position(|a| *a.key == *key)
            .map_or(0, |i| 1 << i)
    }
}

enum Failure {
    Fault(Fault),
    TooLarge(usize),
}

impl From<Fault> for Failure {
    fn from(f: Fault) -> Failure {
        Failure::Fault(f)
    }
}

/// The key of a `KeyValue` (its last field 1; empty when it has none).
fn key_of(mut kv: Reader<'_>) -> Result<&[u8], Fault> {
    let mut key: &[u8] = &[];
    while let Some(field) = kv.next_field()? {
        if field.number == 1 {
            field.expect("KeyValue", WireType::Len)?;
            key = field.body;
        }
    }
    Ok(key)
}

fn all_bits(n: usize) -> u64 {
    match n {
        0 => 0,
        64.. => u64::MAX,
        n => (1u64 << n) - 1,
    }
}

/// `KeyValue { key, value: AnyValue { string_value } }`, encoded.
fn key_value(key: &[u8], value: &[u8]) -> Vec<u8> {
    let any_len = 1 + varint_len(value.len() as u64) + value.len();
    let mut kv = Vec::with_capacity(key.len() + any_len + 12);
    kv.push(0x0a); // key
    put_varint(&mut kv, key.len() as u64);
    kv.extend_from_slice(key);
    kv.push(0x12); // value
    put_varint(&mut kv, any_len as u64);
    kv.push(0x0a); // string_value
    put_varint(&mut kv, value.len() as u64);
    kv.extend_from_slice(value);
    kv
}

fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::tests::{kv, logs, metrics, traces};
    use crate::wire::walk;
    use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
    use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::KeyValue;
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use proptest::collection::vec;
    use proptest::prelude::*;
    use prost::Message;

    /// Keys both the stamp and the "application" draw from, so they conflict often.
    const KEYS: [&str; 5] = ["host.name", "env", "a", "service.name", "rack"];

    fn stamp_of(pairs: &[(&str, &str)], conflict: Conflict) -> Stamp {
        let owned: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Stamp::new(&owned, conflict)
    }

    /// The model: decode, then add the attributes with the message types.
    fn model(resource: &mut Option<Resource>, stamp: &[(String, String)], conflict: Conflict) {
        let has = |r: &Option<Resource>, key: &str| {
            r.as_ref()
                .is_some_and(|r| r.attributes.iter().any(|kv| kv.key == key))
        };
        let add: Vec<KeyValue> = stamp
            .iter()
            .filter(|(k, _)| conflict == Conflict::Replace || !has(resource, k))
            .map(|(k, v)| kv(k, v))
            .collect();
        let cut = conflict == Conflict::Replace && stamp.iter().any(|(k, _)| has(resource, k));
        if add.is_empty() && !cut {
            return;
        }
        let r = resource.get_or_insert_with(Resource::default);
        if conflict == Conflict::Replace {
            r.attributes
                .retain(|kv| !stamp.iter().any(|(k, _)| *k == kv.key));
        }
        r.attributes.extend(add);
    }

    /// Per entry: 0 leaves it, 1 takes its resource away, 2 gives it some
    /// stamp keys (with other values; a key may come twice).
    fn edit(resource: &mut Option<Resource>, how: &(u8, Vec<usize>)) {
        match how.0 % 3 {
            1 => *resource = None,
            2 => {
                let r = resource.get_or_insert_with(Resource::default);
                for &k in &how.1 {
                    r.attributes.push(kv(KEYS[k % KEYS.len()], "from the app"));
                }
            }
            _ => {}
        }
    }

    fn edits() -> impl Strategy<Value = Vec<(u8, Vec<usize>)>> {
        vec((any::<u8>(), vec(0..KEYS.len(), 0..3)), 0..6)
    }

    fn stamp_attrs() -> impl Strategy<Value = Vec<(String, String)>> {
        proptest::sample::subsequence(KEYS.to_vec(), 1..=KEYS.len()).prop_flat_map(|keys| {
            let n = keys.len();
            (Just(keys), vec("\\PC{0,12}", n)).prop_map(|(keys, values)| {
                keys.into_iter()
                    .map(str::to_owned)
                    .zip(values)
                    .collect::<Vec<_>>()
            })
        })
    }

    fn conflict() -> impl Strategy<Value = Conflict> {
        prop_oneof![Just(Conflict::Keep), Just(Conflict::Replace)]
    }

    /// Stamp `request`'s encoding; the result must walk with the same counts
    /// and decode to the model.
    fn check<M: Message + Default + PartialEq + std::fmt::Debug>(
        signal: Signal,
        request: &M,
        expected: &M,
        stamp: &Stamp,
    ) -> Result<(), TestCaseError> {
        let body = Bytes::from(request.encode_to_vec());
        let counts = walk(signal, &body).expect("valid request");
        let stamped = stamp
            .apply(signal, &body, usize::MAX)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(walk(signal, &stamped), Ok(counts));
        let decoded = M::decode(&stamped[..]).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&decoded, expected);
        // Stamping is idempotent: a second pass finds every key.
        if stamp.conflict() == Conflict::Keep {
            prop_assert_eq!(
                stamp.apply(signal, &stamped, usize::MAX).ok(),
                Some(stamped)
            );
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn stamped_trace_requests_decode_to_the_request_with_the_attributes_added(
            mut request in traces(), edits in edits(), attrs in stamp_attrs(), conflict in conflict()
        ) {
            for (entry, how) in request.resource_spans.iter_mut().zip(&edits) {
                edit(&mut entry.resource, how);
            }
            let mut expected = request.clone();
            for entry in &mut expected.resource_spans {
                model(&mut entry.resource, &attrs, conflict);
            }
            let stamp = Stamp::new(&attrs, conflict);
            check::<ExportTraceServiceRequest>(Signal::Traces, &request, &expected, &stamp)?;
        }

        #[test]
        fn stamped_metric_requests_decode_to_the_request_with_the_attributes_added(
            mut request in metrics(), edits in edits(), attrs in stamp_attrs(), conflict in conflict()
        ) {
            for (entry, how) in request.resource_metrics.iter_mut().zip(&edits) {
                edit(&mut entry.resource, how);
            }
            let mut expected = request.clone();
            for entry in &mut expected.resource_metrics {
                model(&mut entry.resource, &attrs, conflict);
            }
            let stamp = Stamp::new(&attrs, conflict);
            check::<ExportMetricsServiceRequest>(Signal::Metrics, &request, &expected, &stamp)?;
        }

        #[test]
        fn stamped_log_requests_decode_to_the_request_with_the_attributes_added(
            mut request in logs(), edits in edits(), attrs in stamp_attrs(), conflict in conflict()
        ) {
            for (entry, how) in request.resource_logs.iter_mut().zip(&edits) {
                edit(&mut entry.resource, how);
            }
            let mut expected = request.clone();
            for entry in &mut expected.resource_logs {
                model(&mut entry.resource, &attrs, conflict);
            }
            let stamp = Stamp::new(&attrs, conflict);
            check::<ExportLogsServiceRequest>(Signal::Logs, &request, &expected, &stamp)?;
        }

        #[test]
        fn stamping_arbitrary_bytes_never_panics(
            buf in vec(any::<u8>(), 0..256), conflict in conflict()
        ) {
            let stamp = stamp_of(&[("a", "b"), ("env", "prod")], conflict);
            let body = Bytes::from(buf);
            if walk(Signal::Logs, &body).is_ok() {
                let _ = stamp.apply(Signal::Logs, &body, usize::MAX);
            }
        }
    }

    #[test]
    fn a_request_that_already_has_every_key_is_returned_without_copying() {
        let request = ExportTraceServiceRequest {
            resource_spans: vec![Default::default()],
        };
        let mut request = request;
        request.resource_spans[0].resource = Some(Resource {
            attributes: vec![kv("env", "dev")],
            ..Default::default()
        });
        let body = Bytes::from(request.encode_to_vec());
        let stamp = stamp_of(&[("env", "prod")], Conflict::Keep);
        let stamped = stamp.apply(Signal::Traces, &body, usize::MAX).unwrap();
        assert_eq!(stamped.as_ptr(), body.as_ptr(), "same buffer, no copy");
        let replaced = stamp_of(&[("env", "prod")], Conflict::Replace)
            .apply(Signal::Traces, &body, usize::MAX)
            .unwrap();
        let decoded = ExportTraceServiceRequest::decode(&replaced[..]).unwrap();
        let attrs = &decoded.resource_spans[0]
            .resource
            .as_ref()
            .unwrap()
            .attributes;
        assert_eq!(attrs, &vec![kv("env", "prod")]);
    }

    #[test]
    fn an_entry_without_a_resource_gets_one_and_only_its_length_prefix_changes() {
        // One ResourceLogs holding only an empty ScopeLogs: 0x0a 0x02 0x12 0x00.
        let body = Bytes::from_static(&[0x0a, 0x02, 0x12, 0x00]);
        let stamped = stamp_of(&[("a", "b")], Conflict::Keep)
            .apply(Signal::Logs, &body, usize::MAX)
            .unwrap();
        // KeyValue{a, AnyValue{"b"}} = 0a 01 61 12 03 0a 01 62 (8 bytes).
        let kv = [0x0a, 0x01, b'a', 0x12, 0x03, 0x0a, 0x01, b'b'];
        let expected = [&[0x0a, 0x0e, 0x12, 0x00, 0x0a, 0x0a, 0x0a, 0x08][..], &kv].concat();
        assert_eq!(&stamped[..], &expected[..]);
    }

    #[test]
    fn a_result_above_the_limit_is_refused_before_it_is_built() {
        let body = Bytes::from_static(&[0x0a, 0x02, 0x12, 0x00, 0x0a, 0x02, 0x12, 0x00]);
        let stamp = stamp_of(&[("a", "b")], Conflict::Keep);
        let err = stamp.apply(Signal::Logs, &body, 20).unwrap_err();
        assert_eq!(
            err,
            StampError::TooLarge {
                size: 32,
                limit: 20
            }
        );
        assert!(stamp.apply(Signal::Logs, &body, 32).is_ok());
    }

    #[test]
    fn a_broken_resource_attribute_is_a_malformed_request() {
        // Resource { attributes: KeyValue { field 1 as a varint } }.
        let kv = [0x08, 0x01];
        let resource = [&[0x0a, kv.len() as u8][..], &kv].concat();
        let entry = [&[0x0a, resource.len() as u8][..], &resource].concat();
        let body = Bytes::from([&[0x0a, entry.len() as u8][..], &entry].concat());
        walk(Signal::Traces, &body).expect("the walk does not look inside KeyValue");
        let err = stamp_of(&[("a", "b")], Conflict::Keep)
            .apply(Signal::Traces, &body, usize::MAX)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "malformed traces request at byte 6: field 1 of KeyValue must be \
             length-delimited, found wire type 0"
        );
    }

    #[test]
    fn varint_lengths_match_the_encoding() {
        for v in [0u64, 1, 127, 128, 16_383, 16_384, u32::MAX as u64, u64::MAX] {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            assert_eq!(varint_len(v), out.len(), "{v}");
        }
    }
}
