//! The allocation-free wire walk: validate and count an OTLP export request
//! without decoding it.
//!
//! The forwarding path keeps each request body as bytes and builds upstream
//! batches by concatenation (DESIGN.md, decision 2). Before a body is accepted,
//! [`walk`] makes one pass over its protobuf encoding that both checks it and
//! counts what it holds:
//!
//! ```text
//! Export*ServiceRequest      1: Resource{Spans,Metrics,Logs}   (counted: resources)
//!  └ Resource*               1: Resource (flat)  2: Scope*  3: schema_url
//!     └ Scope*               1: scope (flat)     2: item    3: schema_url
//!        ├ traces:  Span                                    (flat, counted: items)
//!        ├ logs:    LogRecord                               (flat, counted: items)
//!        └ metrics: Metric   1,2,3: strings  12: metadata (flat)
//!                            5 Gauge | 7 Sum | 9 Histogram | 10 ExponentialHistogram | 11 Summary
//!                             └ 1: data point                (flat, counted: items)
//! ```
//!
//! What is checked, at every level down to the items: tags are well formed
//! (field number not 0, no groups, no wire types 6/7), varints end within ten
//! bytes, lengths and fixed-width values stay inside the enclosing message, and
//! the fields the walk knows have the wire type the schema gives them. Unknown
//! fields are skipped by wire type, so newer senders still pass. Items, resources
//! and scopes get a *flat* walk: their own top-level fields must be well formed,
//! but they are not descended into. String contents are not checked for UTF-8.
//!
//! The depth is fixed by the schema, so the walk has no recursion and no depth
//! limit to enforce. It never allocates and never panics: every read is a
//! checked slice access and lengths are compared as `u64` before any addition.
//!
//! [`stamp`] adds `[resource]` attributes to a body the walk accepted, on the
//! bytes as well (its own design note says how).
//!
//! Offsets in errors are absolute positions in the walked buffer: errors about
//! a field (bad field number, group, wrong wire type, a value running past the
//! end of its message) point at the field's tag; errors in a varint itself
//! (truncated, too long) point at the varint's first byte.

pub mod stamp;

use crate::signal::Signal;

/// What one request holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Resource entries (field 1 of the export request), saturating at `u32::MAX`.
    pub resources: u32,
    /// Spans, metric data points or log records.
    pub items: u64,
}

/// A request body that is not a well-formed export request for its signal.
///
/// The client sent bytes the agent cannot forward; reject the request as
/// invalid (gRPC `INVALID_ARGUMENT`, HTTP 400) and do not retry it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("malformed {signal} request at byte {offset}: {kind}")]
pub struct WireError {
    /// The signal whose request schema was walked.
    pub signal: Signal,
    /// Absolute byte offset in the walked buffer where the problem is.
    pub offset: usize,
    /// What is wrong there.
    pub kind: WireErrorKind,
}

/// What is wrong with a malformed request, at [`WireError::offset`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireErrorKind {
    /// A varint's bytes all have the continuation bit set up to the end of its message.
    #[error("truncated varint")]
    TruncatedVarint,
    /// A varint still had the continuation bit set on its tenth byte.
    #[error("varint longer than 10 bytes")]
    VarintTooLong,
    /// A ten-byte varint whose last byte carries bits beyond the 64th.
    #[error("varint overflows 64 bits")]
    VarintOverflow,
    /// A tag whose value does not fit in 32 bits, so its field number is out of range.
    #[error("tag value {tag} is out of range (field numbers must fit in 29 bits)")]
    TagOutOfRange { tag: u64 },
    /// A tag with field number 0, which protobuf reserves.
    #[error("invalid field number 0")]
    FieldNumberZero,
    /// A start-group or end-group tag; OTLP never uses groups.
    #[error("unsupported wire type {wire_type} (groups) on field {field}")]
    Group { field: u32, wire_type: u8 },
    /// Wire type 6 or 7, which protobuf does not define.
    #[error("invalid wire type {wire_type} on field {field}")]
    InvalidWireType { field: u32, wire_type: u8 },
    /// A length prefix larger than what is left of the enclosing message.
    #[error(
        "length-delimited field {field} runs past the end of its message \
         (needs {needs} bytes, {remain} remain)"
    )]
    LengthPastEnd {
        field: u32,
        needs: u64,
        remain: usize,
    },
    /// A fixed 32- or 64-bit value cut off by the end of the enclosing message.
    #[error(
        "{bits}-bit field {field} runs past the end of its message \
         (needs {} bytes, {remain} remain)", bits / 8
    )]
    FixedPastEnd { field: u32, bits: u8, remain: usize },
    /// A field the schema knows, encoded with a different wire type.
    #[error("field {field} of {message} must be {expected}, found wire type {found}")]
    WrongWireType {
        message: &'static str,
        field: u32,
        expected: &'static str,
        found: u8,
    },
}

/// Walk one serialized Export{Trace,Metrics,Logs}ServiceRequest.
///
/// Validates the encoding down to the items (see the module docs) and counts
/// resources and items. An empty buffer is a valid request with nothing in it.
pub fn walk(signal: Signal, buf: &[u8]) -> Result<Counts, WireError> {
    let names = match signal {
        Signal::Traces => &TRACES,
        Signal::Metrics => &METRICS,
        Signal::Logs => &LOGS,
    };
    let walked = match signal {
        Signal::Traces | Signal::Logs => walk_request(names, buf, flat_item),
        Signal::Metrics => walk_request(names, buf, metric),
    };
    walked.map_err(|Fault { offset, kind }| WireError {
        signal,
        offset,
        kind,
    })
}

/// The byte ranges of the top-level fields of an export request (its
/// resource entries, and any unknown fields), in order and covering `buf`
/// exactly. Each range, alone or with any of the others, is a valid request:
/// the exporter splits a request that upstream finds too large at these
/// boundaries. Only the top level is checked; `buf` was walked at ingest.
pub(crate) fn top_level_fields(
    signal: Signal,
    buf: &[u8],
) -> Result<Vec<std::ops::Range<usize>>, WireError> {
    let mut ranges = Vec::new();
    let mut request = Reader::new(buf, 0);
    loop {
        let start = request.pos;
        match request.next_field() {
            Ok(Some(_)) => ranges.push(start..request.pos),
            Ok(None) => return Ok(ranges),
            Err(Fault { offset, kind }) => {
                return Err(WireError {
                    signal,
                    offset,
                    kind,
                })
            }
        }
    }
}

/// Message names of one signal's three outer levels, for error messages.
struct Names {
    request: &'static str,
    resource: &'static str,
    scope: &'static str,
}

const TRACES: Names = Names {
    request: "ExportTraceServiceRequest",
    resource: "ResourceSpans",
    scope: "ScopeSpans",
};
const METRICS: Names = Names {
    request: "ExportMetricsServiceRequest",
    resource: "ResourceMetrics",
    scope: "ScopeMetrics",
};
const LOGS: Names = Names {
    request: "ExportLogsServiceRequest",
    resource: "ResourceLogs",
    scope: "ScopeLogs",
};

/// Walks the levels shared by every signal; `item` walks one field-2 entry of
/// a scope and returns how many items it holds.
#[inline(always)]
fn walk_request(
    names: &Names,
    buf: &[u8],
    item: fn(Reader<'_>) -> Result<u64, Fault>,
) -> Result<Counts, Fault> {
    let mut counts = Counts::default();
    let mut request = Reader::new(buf, 0);
    while let Some(field) = request.next_field()? {
        if field.number != 1 {
            continue;
        }
        let mut resource = field.message(names.request)?;
        counts.resources = counts.resources.saturating_add(1);
        while let Some(field) = resource.next_field()? {
            match field.number {
                1 => field.message(names.resource)?.flat()?,
                2 => {
                    let mut scope = field.message(names.resource)?;
                    while let Some(field) = scope.next_field()? {
                        match field.number {
                            1 => field.message(names.scope)?.flat()?,
                            2 => {
                                let n = item(field.message(names.scope)?)?;
                                counts.items = counts.items.saturating_add(n);
                            }
                            3 => field.expect(names.scope, WireType::Len)?,
                            _ => {}
                        }
                    }
                }
                3 => field.expect(names.resource, WireType::Len)?,
                _ => {}
            }
        }
    }
    Ok(counts)
}

/// A span or log record: one item, walked flat.
fn flat_item(item: Reader<'_>) -> Result<u64, Fault> {
    item.flat()?;
    Ok(1)
}

/// A metric: its data points are the items.
fn metric(mut metric: Reader<'_>) -> Result<u64, Fault> {
    let mut points = 0u64;
    while let Some(field) = metric.next_field()? {
        // The data kind's message name, and which of its fields are varints.
        let (kind, varints): (&'static str, &[u32]) = match field.number {
            1..=3 => {
                field.expect("Metric", WireType::Len)?;
                continue;
            }
            12 => {
                field.message("Metric")?.flat()?;
                continue;
            }
            5 => ("Gauge", &[]),
            7 => ("Sum", &[2, 3]),
            9 => ("Histogram", &[2]),
            10 => ("ExponentialHistogram", &[2]),
            11 => ("Summary", &[]),
            _ => continue,
        };
        let mut data = field.message("Metric")?;
        while let Some(field) = data.next_field()? {
            if field.number == 1 {
                field.message(kind)?.flat()?;
                points += 1;
            } else if varints.contains(&field.number) {
                field.expect(kind, WireType::Varint)?;
            }
        }
    }
    Ok(points)
}

/// An error before the signal is attached.
struct Fault {
    offset: usize,
    kind: WireErrorKind,
}

impl Fault {
    #[cold]
    fn new(offset: usize, kind: WireErrorKind) -> Fault {
        Fault { offset, kind }
    }
}

/// The wire types a known field may be required to have.
#[derive(Clone, Copy)]
enum WireType {
    Varint = 0,
    Len = 2,
}

impl WireType {
    fn name(self) -> &'static str {
        match self {
            WireType::Varint => "a varint",
            WireType::Len => "length-delimited",
        }
    }
}

/// One field, already read past: its value was skipped or, when
/// length-delimited, is available as `body`.
struct Field<'a> {
    number: u32,
    wire_type: u8,
    /// Absolute offset of the tag.
    at: usize,
    /// The bytes of a length-delimited value (empty for other wire types).
    body: &'a [u8],
    /// Absolute offset of `body`.
    body_at: usize,
}

impl<'a> Field<'a> {
    /// Checks that this field of `message` has wire type `expected`.
    #[inline(always)]
    fn expect(&self, message: &'static str, expected: WireType) -> Result<(), Fault> {
        if self.wire_type == expected as u8 {
            Ok(())
        } else {
            Err(Fault::new(
                self.at,
                WireErrorKind::WrongWireType {
                    message,
                    field: self.number,
                    expected: expected.name(),
                    found: self.wire_type,
                },
            ))
        }
    }

    /// This field of `message` as an embedded message to read.
    #[inline(always)]
    fn message(&self, message: &'static str) -> Result<Reader<'a>, Fault> {
        self.expect(message, WireType::Len)?;
        Ok(Reader::new(self.body, self.body_at))
    }
}

/// A cursor over the bytes of one message.
struct Reader<'a> {
    /// The message's bytes, and nothing after them.
    data: &'a [u8],
    /// Absolute offset of `data[0]` in the walked buffer, for error offsets.
    origin: usize,
    /// Position of the next unread byte within `data`.
    pos: usize,
}

impl<'a> Reader<'a> {
    #[inline(always)]
    fn new(data: &'a [u8], origin: usize) -> Reader<'a> {
        Reader {
            data,
            origin,
            pos: 0,
        }
    }

    /// Walks every top-level field without descending into any.
    #[inline]
    fn flat(mut self) -> Result<(), Fault> {
        while self.next_field()?.is_some() {}
        Ok(())
    }

    /// Reads the next field's tag and skips or slices its value.
    #[inline(always)]
    fn next_field(&mut self) -> Result<Option<Field<'a>>, Fault> {
        if self.pos >= self.data.len() {
            return Ok(None);
        }
        let at = self.origin + self.pos;
        let tag = self.varint()?;
        if tag > u64::from(u32::MAX) {
            return Err(Fault::new(at, WireErrorKind::TagOutOfRange { tag }));
        }
        let number = (tag >> 3) as u32;
        let wire_type = (tag & 7) as u8;
        if number == 0 {
            return Err(Fault::new(at, WireErrorKind::FieldNumberZero));
        }
        let mut body: &'a [u8] = &[];
        let mut body_at = 0;
        match wire_type {
            0 => {
                self.varint()?;
            }
            2 => {
                let len = self.varint()?;
                let rest = self.data.get(self.pos..).unwrap_or_default();
                match usize::try_from(len).ok().and_then(|len| rest.get(..len)) {
                    Some(value) => {
                        body = value;
                        body_at = self.origin + self.pos;
                        self.pos += value.len();
                    }
                    None => {
                        let kind = WireErrorKind::LengthPastEnd {
                            field: number,
                            needs: len,
                            remain: rest.len(),
                        };
                        return Err(Fault::new(at, kind));
                    }
                }
            }
            1 | 5 => {
                let width = if wire_type == 1 { 8 } else { 4 };
                let remain = self.data.len() - self.pos;
                if remain < width {
                    let kind = WireErrorKind::FixedPastEnd {
                        field: number,
                        bits: (width * 8) as u8,
                        remain,
                    };
                    return Err(Fault::new(at, kind));
                }
                self.pos += width;
            }
            3 | 4 => {
                return Err(Fault::new(
                    at,
                    WireErrorKind::Group {
                        field: number,
                        wire_type,
                    },
                ))
            }
            _ => {
                return Err(Fault::new(
                    at,
                    WireErrorKind::InvalidWireType {
                        field: number,
                        wire_type,
                    },
                ))
            }
        }
        Ok(Some(Field {
            number,
            wire_type,
            at,
            body,
            body_at,
        }))
    }

    /// Reads one varint.
    #[inline(always)]
    fn varint(&mut self) -> Result<u64, Fault> {
        // One- and two-byte varints (tags, most lengths) stay inline.
        match self.data.get(self.pos..self.pos + 2) {
            Some(&[b0, _]) if b0 < 0x80 => {
                self.pos += 1;
                Ok(u64::from(b0))
            }
            Some(&[b0, b1]) if b1 < 0x80 => {
                self.pos += 2;
                Ok(u64::from(b0 & 0x7f) | u64::from(b1) << 7)
            }
            _ => self.varint_slow(),
        }
    }

    /// The multi-byte (or truncated) case of [`Reader::varint`].
    #[inline(never)]
    fn varint_slow(&mut self) -> Result<u64, Fault> {
        let start = self.pos;
        let rest = self.data.get(start..).unwrap_or_default();
        let mut value = 0u64;
        for (i, &b) in rest.iter().take(10).enumerate() {
            value |= u64::from(b & 0x7f) << (7 * i);
            if b < 0x80 {
                if i == 9 && b > 1 {
                    return Err(Fault::new(
                        self.origin + start,
                        WireErrorKind::VarintOverflow,
                    ));
                }
                self.pos = start + i + 1;
                return Ok(value);
            }
        }
        let kind = if rest.len() >= 10 {
            WireErrorKind::VarintTooLong
        } else {
            WireErrorKind::TruncatedVarint
        };
        Err(Fault::new(self.origin + start, kind))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
    use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::{
        any_value, AnyValue, InstrumentationScope, KeyValue,
    };
    use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
    use opentelemetry_proto::tonic::metrics::v1::{
        exponential_histogram_data_point::Buckets, metric, number_data_point, summary_data_point,
        ExponentialHistogram, ExponentialHistogramDataPoint, Gauge, Histogram, HistogramDataPoint,
        Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum, Summary, SummaryDataPoint,
    };
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::{span, ResourceSpans, ScopeSpans, Span};
    use proptest::collection::vec;
    use proptest::prelude::*;
    use prost::Message;

    // ---- building requests with the real message types ----

    pub(super) fn kv(key: &str, value: &str) -> KeyValue {
        KeyValue {
            key: key.to_owned(),
            value: Some(AnyValue {
                value: Some(any_value::Value::StringValue(value.to_owned())),
            }),
            ..Default::default()
        }
    }

    fn resource(attributes: Vec<KeyValue>) -> Option<Resource> {
        Some(Resource {
            attributes,
            ..Default::default()
        })
    }

    fn scope(name: &str) -> Option<InstrumentationScope> {
        Some(InstrumentationScope {
            name: name.to_owned(),
            version: "1.2.3".to_owned(),
            attributes: vec![kv("scope.attr", "x")],
            ..Default::default()
        })
    }

    fn span(attributes: Vec<KeyValue>) -> Span {
        Span {
            trace_id: vec![7; 16],
            span_id: vec![9; 8],
            name: "GET /things".to_owned(),
            kind: span::SpanKind::Server as i32,
            start_time_unix_nano: 1_700_000_000_000_000_000,
            end_time_unix_nano: 1_700_000_000_000_500_000,
            attributes,
            events: vec![span::Event {
                name: "event".to_owned(),
                attributes: vec![kv("e", "v")],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn log_record(attributes: Vec<KeyValue>) -> LogRecord {
        LogRecord {
            time_unix_nano: 1_700_000_000_000_000_000,
            severity_number: 9,
            severity_text: "INFO".to_owned(),
            body: Some(AnyValue {
                value: Some(any_value::Value::StringValue("hello".to_owned())),
            }),
            attributes,
            flags: 1,
            trace_id: vec![1; 16],
            span_id: vec![2; 8],
            ..Default::default()
        }
    }

    fn number_points(n: usize, attributes: &[KeyValue]) -> Vec<NumberDataPoint> {
        (0..n)
            .map(|i| NumberDataPoint {
                attributes: attributes.to_vec(),
                time_unix_nano: 1_700_000_000_000_000_000 + i as u64,
                value: Some(number_data_point::Value::AsInt(i as i64 - 3)),
                ..Default::default()
            })
            .collect()
    }

    /// A metric of data kind `kind` (0..5: gauge, sum, histogram,
    /// exponential histogram, summary) holding `n` data points.
    fn metric_of_kind(kind: u8, n: usize, attributes: &[KeyValue]) -> Metric {
        let data = match kind % 5 {
            0 => metric::Data::Gauge(Gauge {
                data_points: number_points(n, attributes),
            }),
            1 => metric::Data::Sum(Sum {
                data_points: number_points(n, attributes),
                aggregation_temporality: 2,
                is_monotonic: true,
            }),
            2 => metric::Data::Histogram(Histogram {
                data_points: (0..n)
                    .map(|i| HistogramDataPoint {
                        attributes: attributes.to_vec(),
                        count: 3 + i as u64,
                        sum: Some(1.5),
                        bucket_counts: vec![1, 2, i as u64],
                        explicit_bounds: vec![0.5, 10.0],
                        min: Some(0.1),
                        ..Default::default()
                    })
                    .collect(),
                aggregation_temporality: 1,
            }),
            3 => metric::Data::ExponentialHistogram(ExponentialHistogram {
                data_points: (0..n)
                    .map(|i| ExponentialHistogramDataPoint {
                        attributes: attributes.to_vec(),
                        count: 4,
                        scale: -2,
                        positive: Some(Buckets {
                            offset: -1,
                            bucket_counts: vec![1, 0, i as u64],
                        }),
                        ..Default::default()
                    })
                    .collect(),
                aggregation_temporality: 2,
            }),
            _ => metric::Data::Summary(Summary {
                data_points: (0..n)
                    .map(|i| SummaryDataPoint {
                        attributes: attributes.to_vec(),
                        count: i as u64,
                        sum: 2.5,
                        quantile_values: vec![summary_data_point::ValueAtQuantile {
                            quantile: 0.99,
                            value: 12.0,
                        }],
                        ..Default::default()
                    })
                    .collect(),
            }),
        };
        Metric {
            name: format!("metric.kind{kind}"),
            description: "a metric".to_owned(),
            unit: "ms".to_owned(),
            metadata: vec![kv("meta", "data")],
            data: Some(data),
        }
    }

    fn walk_ok(signal: Signal, buf: &[u8]) -> Counts {
        match walk(signal, buf) {
            Ok(counts) => counts,
            Err(e) => panic!("walk rejected a valid request: {e}"),
        }
    }

    fn trace_counts(r: &ExportTraceServiceRequest) -> Counts {
        Counts {
            resources: r.resource_spans.len() as u32,
            items: r
                .resource_spans
                .iter()
                .flat_map(|rs| &rs.scope_spans)
                .map(|ss| ss.spans.len() as u64)
                .sum(),
        }
    }

    fn metric_points(m: &Metric) -> u64 {
        (match &m.data {
            None => 0,
            Some(metric::Data::Gauge(g)) => g.data_points.len(),
            Some(metric::Data::Sum(s)) => s.data_points.len(),
            Some(metric::Data::Histogram(h)) => h.data_points.len(),
            Some(metric::Data::ExponentialHistogram(h)) => h.data_points.len(),
            Some(metric::Data::Summary(s)) => s.data_points.len(),
        }) as u64
    }

    fn metric_counts(r: &ExportMetricsServiceRequest) -> Counts {
        Counts {
            resources: r.resource_metrics.len() as u32,
            items: r
                .resource_metrics
                .iter()
                .flat_map(|rm| &rm.scope_metrics)
                .flat_map(|sm| &sm.metrics)
                .map(metric_points)
                .sum(),
        }
    }

    fn log_counts(r: &ExportLogsServiceRequest) -> Counts {
        Counts {
            resources: r.resource_logs.len() as u32,
            items: r
                .resource_logs
                .iter()
                .flat_map(|rl| &rl.scope_logs)
                .map(|sl| sl.log_records.len() as u64)
                .sum(),
        }
    }

    // ---- counts against prost-built messages ----

    #[test]
    fn walk_counts_equal_prost_message_counts_for_traces() {
        let request = ExportTraceServiceRequest {
            resource_spans: vec![
                ResourceSpans {
                    resource: resource(vec![kv("service.name", "checkout")]),
                    scope_spans: vec![
                        ScopeSpans {
                            scope: scope("http"),
                            spans: vec![span(vec![kv("a", "b")]), span(vec![])],
                            schema_url: "https://opentelemetry.io/schemas/1.21.0".to_owned(),
                        },
                        ScopeSpans {
                            scope: None,
                            spans: vec![span(vec![kv("k", "v"); 5])],
                            schema_url: String::new(),
                        },
                    ],
                    schema_url: "https://opentelemetry.io/schemas/1.21.0".to_owned(),
                },
                ResourceSpans::default(),
            ],
        };
        let counts = walk_ok(Signal::Traces, &request.encode_to_vec());
        assert_eq!(counts, trace_counts(&request));
        assert_eq!(
            counts,
            Counts {
                resources: 2,
                items: 3
            }
        );
    }

    #[test]
    fn walk_counts_equal_prost_message_counts_for_every_metric_kind() {
        let attrs = [kv("host", "a"), kv("route", "/x")];
        let metrics: Vec<Metric> = (0..5u8)
            .map(|kind| metric_of_kind(kind, 2 + kind as usize, &attrs))
            .chain([Metric {
                name: "no data".to_owned(),
                ..Default::default()
            }])
            .collect();
        let request = ExportMetricsServiceRequest {
            resource_metrics: vec![ResourceMetrics {
                resource: resource(vec![kv("service.name", "checkout")]),
                scope_metrics: vec![ScopeMetrics {
                    scope: scope("runtime"),
                    metrics,
                    schema_url: "s".to_owned(),
                }],
                schema_url: "r".to_owned(),
            }],
        };
        let counts = walk_ok(Signal::Metrics, &request.encode_to_vec());
        assert_eq!(counts, metric_counts(&request));
        assert_eq!(
            counts,
            Counts {
                resources: 1,
                items: 2 + 3 + 4 + 5 + 6
            }
        );
    }

    #[test]
    fn walk_counts_equal_prost_message_counts_for_logs() {
        let request = ExportLogsServiceRequest {
            resource_logs: vec![ResourceLogs {
                resource: resource(vec![]),
                scope_logs: vec![ScopeLogs {
                    scope: scope("app"),
                    log_records: vec![log_record(vec![kv("x", "y")]); 4],
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        };
        let counts = walk_ok(Signal::Logs, &request.encode_to_vec());
        assert_eq!(counts, log_counts(&request));
        assert_eq!(
            counts,
            Counts {
                resources: 1,
                items: 4
            }
        );
    }

    #[test]
    fn empty_buffer_is_a_valid_request_with_nothing_in_it() {
        for signal in Signal::ALL {
            assert_eq!(walk(signal, &[]), Ok(Counts::default()));
        }
    }

    // ---- hand-encoded bytes ----

    fn varint(mut v: u64, out: &mut Vec<u8>) {
        while v >= 0x80 {
            out.push(v as u8 | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    fn tag(field: u32, wire_type: u8) -> Vec<u8> {
        let mut out = Vec::new();
        varint(u64::from(field) << 3 | u64::from(wire_type), &mut out);
        out
    }

    fn len_field(field: u32, body: &[u8]) -> Vec<u8> {
        let mut out = tag(field, 2);
        varint(body.len() as u64, &mut out);
        out.extend_from_slice(body);
        out
    }

    fn varint_field(field: u32, v: u64) -> Vec<u8> {
        let mut out = tag(field, 0);
        varint(v, &mut out);
        out
    }

    /// One unknown field of every wire type a sender may legally use.
    fn unknown_fields() -> Vec<u8> {
        let mut out = varint_field(90, 300);
        out.extend(tag(91, 1));
        out.extend([1; 8]);
        out.extend(len_field(92, b"future"));
        out.extend(tag(93, 5));
        out.extend([2; 4]);
        out
    }

    fn with_unknown(mut message: Vec<u8>) -> Vec<u8> {
        message.extend(unknown_fields());
        message
    }

    #[test]
    fn unknown_fields_are_skipped_at_every_level_and_prost_agrees() {
        let span = with_unknown(span(vec![kv("a", "b")]).encode_to_vec());
        let scope_spans = with_unknown(
            [
                unknown_fields(),
                len_field(2, &span),
                len_field(2, &span),
                len_field(3, b"schema"),
            ]
            .concat(),
        );
        let resource_spans = with_unknown(
            [
                len_field(1, &with_unknown(Vec::new())),
                len_field(2, &scope_spans),
            ]
            .concat(),
        );
        let request = [
            unknown_fields(),
            len_field(1, &resource_spans),
            len_field(1, &resource_spans),
        ]
        .concat();
        let decoded = ExportTraceServiceRequest::decode(&request[..]).expect("prost decodes");
        assert_eq!(walk_ok(Signal::Traces, &request), trace_counts(&decoded));
        assert_eq!(
            walk_ok(Signal::Traces, &request),
            Counts {
                resources: 2,
                items: 4
            }
        );

        let point = with_unknown(NumberDataPoint::default().encode_to_vec());
        let sum =
            with_unknown([len_field(1, &point), varint_field(2, 1), varint_field(3, 1)].concat());
        let metric = with_unknown([len_field(1, b"m"), len_field(7, &sum)].concat());
        let scope_metrics = with_unknown(len_field(2, &metric));
        let request = len_field(1, &with_unknown(len_field(2, &scope_metrics)));
        let decoded = ExportMetricsServiceRequest::decode(&request[..]).expect("prost decodes");
        assert_eq!(walk_ok(Signal::Metrics, &request), metric_counts(&decoded));
        assert_eq!(
            walk_ok(Signal::Metrics, &request),
            Counts {
                resources: 1,
                items: 1
            }
        );
    }

    // ---- named malformed cases, exact offsets ----

    #[track_caller]
    fn assert_fault(signal: Signal, buf: &[u8], offset: usize, kind: WireErrorKind) {
        assert_eq!(
            walk(signal, buf),
            Err(WireError {
                signal,
                offset,
                kind
            })
        );
    }

    #[test]
    fn truncated_varint_points_at_its_first_byte() {
        // A valid resource, then a tag whose length varint never ends.
        let mut buf = len_field(1, &[]);
        buf.extend([0x0a, 0xff, 0xff]);
        assert_fault(Signal::Traces, &buf, 3, WireErrorKind::TruncatedVarint);
        // Inside a span, the varint is cut off by the end of the span, not the buffer.
        let span = [0x10, 0x80];
        let buf = len_field(1, &len_field(2, &len_field(2, &span)));
        assert_fault(Signal::Traces, &buf, 7, WireErrorKind::TruncatedVarint);
    }

    #[test]
    fn varint_longer_than_ten_bytes_is_refused() {
        let buf = [
            0x0a, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
        ];
        assert_fault(Signal::Logs, &buf, 1, WireErrorKind::VarintTooLong);
        let buf = [
            0x0a, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02,
        ];
        assert_fault(Signal::Logs, &buf, 1, WireErrorKind::VarintOverflow);
    }

    #[test]
    fn length_past_the_end_of_the_enclosing_message_names_field_and_sizes() {
        // ResourceSpans (5 bytes at offset 2) holds a ScopeSpans claiming 7 bytes.
        let buf = [0x0a, 0x05, 0x12, 0x07, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00];
        let kind = WireErrorKind::LengthPastEnd {
            field: 2,
            needs: 7,
            remain: 3,
        };
        assert_fault(Signal::Traces, &buf, 2, kind);
        let err = walk(Signal::Traces, &buf).unwrap_err();
        assert_eq!(
            err.to_string(),
            "malformed traces request at byte 2: length-delimited field 2 runs past the end \
             of its message (needs 7 bytes, 3 remain)"
        );
    }

    #[test]
    fn maximum_length_varint_is_an_error_not_an_overflow() {
        let buf = [
            0x0a, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01, 0x00,
        ];
        let kind = WireErrorKind::LengthPastEnd {
            field: 1,
            needs: u64::MAX,
            remain: 1,
        };
        assert_fault(Signal::Metrics, &buf, 0, kind);
    }

    #[test]
    fn fixed_width_value_past_the_end_is_refused() {
        let span = [0x39, 1, 2, 3]; // field 7, fixed64, 3 bytes left
        let buf = len_field(1, &len_field(2, &len_field(2, &span)));
        let kind = WireErrorKind::FixedPastEnd {
            field: 7,
            bits: 64,
            remain: 3,
        };
        assert_fault(Signal::Traces, &buf, 6, kind);
    }

    #[test]
    fn field_number_zero_is_refused_where_it_occurs() {
        assert_fault(
            Signal::Traces,
            &[0x02, 0x00],
            0,
            WireErrorKind::FieldNumberZero,
        );
        // Inside a log record, after one good field.
        let record = [0x18, 0x01, 0x00, 0x00];
        let buf = len_field(1, &len_field(2, &len_field(2, &record)));
        assert_fault(Signal::Logs, &buf, 8, WireErrorKind::FieldNumberZero);
    }

    #[test]
    fn group_wire_types_are_refused() {
        let kind = WireErrorKind::Group {
            field: 1,
            wire_type: 3,
        };
        assert_fault(Signal::Traces, &[0x0b], 0, kind);
        let scope = [0x0c]; // field 1, end group, inside ScopeMetrics
        let buf = len_field(1, &len_field(2, &scope));
        let kind = WireErrorKind::Group {
            field: 1,
            wire_type: 4,
        };
        assert_fault(Signal::Metrics, &buf, 4, kind);
        let err = walk(Signal::Metrics, &buf).unwrap_err();
        assert_eq!(
            err.to_string(),
            "malformed metrics request at byte 4: unsupported wire type 4 (groups) on field 1"
        );
        let kind = WireErrorKind::InvalidWireType {
            field: 2,
            wire_type: 6,
        };
        assert_fault(Signal::Logs, &[0x16], 0, kind);
    }

    #[test]
    fn tag_beyond_32_bits_is_refused() {
        let buf = [0x80, 0x80, 0x80, 0x80, 0x10];
        let kind = WireErrorKind::TagOutOfRange { tag: 1 << 32 };
        assert_fault(Signal::Traces, &buf, 0, kind);
    }

    #[test]
    fn wrong_wire_type_for_a_known_field_names_message_and_field() {
        let buf = [0x0a, 0x02, 0x08, 0x01];
        let err = walk(Signal::Traces, &buf).unwrap_err();
        assert_eq!(err.offset, 2);
        assert_eq!(
            err.to_string(),
            "malformed traces request at byte 2: field 1 of ResourceSpans must be \
             length-delimited, found wire type 0"
        );
        let kind = |message, field, expected, found| WireErrorKind::WrongWireType {
            message,
            field,
            expected,
            found,
        };
        assert_fault(
            Signal::Logs,
            &varint_field(1, 1),
            0,
            kind("ExportLogsServiceRequest", 1, "length-delimited", 0),
        );
        // Sum.aggregation_temporality sent as bytes.
        let sum = len_field(2, b"x");
        let buf = len_field(1, &len_field(2, &len_field(2, &len_field(7, &sum))));
        assert_fault(Signal::Metrics, &buf, 8, kind("Sum", 2, "a varint", 2));
        // A span sent as a fixed32.
        let buf = len_field(1, &len_field(2, &[0x15, 0, 0, 0, 0]));
        assert_fault(
            Signal::Traces,
            &buf,
            4,
            kind("ScopeSpans", 2, "length-delimited", 5),
        );
    }

    // ---- properties ----

    fn attributes() -> impl Strategy<Value = Vec<KeyValue>> {
        vec(("[a-z.]{0,10}", "\\PC{0,24}"), 0..4)
            .prop_map(|pairs| pairs.iter().map(|(k, v)| kv(k, v)).collect())
    }

    /// Per resource: its attributes, then its scopes, each a list of items.
    type Shape<T> = Vec<(Vec<KeyValue>, Vec<Vec<T>>)>;

    /// resources → scopes → items, each item carrying its own attributes.
    fn shape<T: Strategy>(item: T) -> impl Strategy<Value = Shape<T::Value>>
    where
        T::Value: Clone,
    {
        vec((attributes(), vec(vec(item, 0..4), 0..3)), 0..4)
    }

    pub(super) fn traces() -> impl Strategy<Value = ExportTraceServiceRequest> {
        shape(attributes()).prop_map(|resources| ExportTraceServiceRequest {
            resource_spans: resources
                .into_iter()
                .map(|(attrs, scopes)| ResourceSpans {
                    resource: resource(attrs),
                    scope_spans: scopes
                        .into_iter()
                        .map(|spans| ScopeSpans {
                            scope: scope("s"),
                            spans: spans.into_iter().map(span).collect(),
                            schema_url: String::new(),
                        })
                        .collect(),
                    schema_url: String::new(),
                })
                .collect(),
        })
    }

    pub(super) fn metrics() -> impl Strategy<Value = ExportMetricsServiceRequest> {
        shape((0..5u8, 0..4usize, attributes())).prop_map(|resources| ExportMetricsServiceRequest {
            resource_metrics: resources
                .into_iter()
                .map(|(attrs, scopes)| ResourceMetrics {
                    resource: resource(attrs),
                    scope_metrics: scopes
                        .into_iter()
                        .map(|metrics| ScopeMetrics {
                            scope: scope("m"),
                            metrics: metrics
                                .iter()
                                .map(|(kind, n, attrs)| metric_of_kind(*kind, *n, attrs))
                                .collect(),
                            schema_url: "u".to_owned(),
                        })
                        .collect(),
                    schema_url: String::new(),
                })
                .collect(),
        })
    }

    pub(super) fn logs() -> impl Strategy<Value = ExportLogsServiceRequest> {
        shape(attributes()).prop_map(|resources| ExportLogsServiceRequest {
            resource_logs: resources
                .into_iter()
                .map(|(attrs, scopes)| ResourceLogs {
                    resource: resource(attrs),
                    scope_logs: scopes
                        .into_iter()
                        .map(|records| ScopeLogs {
                            scope: None,
                            log_records: records.into_iter().map(log_record).collect(),
                            schema_url: String::new(),
                        })
                        .collect(),
                    schema_url: String::new(),
                })
                .collect(),
        })
    }

    /// Any valid request of any signal, encoded, with its model counts.
    fn any_request() -> impl Strategy<Value = (Signal, Vec<u8>, Counts)> {
        prop_oneof![
            traces().prop_map(|r| (Signal::Traces, r.encode_to_vec(), trace_counts(&r))),
            metrics().prop_map(|r| (Signal::Metrics, r.encode_to_vec(), metric_counts(&r))),
            logs().prop_map(|r| (Signal::Logs, r.encode_to_vec(), log_counts(&r))),
        ]
    }

    fn sum(a: Counts, b: Counts) -> Counts {
        Counts {
            resources: a.resources + b.resources,
            items: a.items + b.items,
        }
    }

    /// Whenever prost accepts bytes, the walk must accept them with the same counts.
    fn walk_accepts_what_prost_accepts(signal: Signal, buf: &[u8]) -> Result<(), TestCaseError> {
        let walked = walk(signal, buf);
        let decoded = match signal {
            Signal::Traces => ExportTraceServiceRequest::decode(buf).map(|r| trace_counts(&r)),
            Signal::Metrics => ExportMetricsServiceRequest::decode(buf).map(|r| metric_counts(&r)),
            Signal::Logs => ExportLogsServiceRequest::decode(buf).map(|r| log_counts(&r)),
        };
        if let Ok(counts) = decoded {
            prop_assert_eq!(walked, Ok(counts));
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn walk_counts_equal_model_counts_for_random_requests((signal, buf, counts) in any_request()) {
            prop_assert_eq!(walk(signal, &buf), Ok(counts));
        }

        #[test]
        fn concatenated_trace_requests_decode_to_the_merged_request_and_walk_to_the_sum(
            a in traces(), b in traces()
        ) {
            let buf = [a.encode_to_vec(), b.encode_to_vec()].concat();
            let mut merged = a.clone();
            merged.resource_spans.extend(b.resource_spans.iter().cloned());
            prop_assert_eq!(ExportTraceServiceRequest::decode(&buf[..]).ok(), Some(merged));
            prop_assert_eq!(walk(Signal::Traces, &buf), Ok(sum(trace_counts(&a), trace_counts(&b))));
        }

        #[test]
        fn concatenated_metric_requests_decode_to_the_merged_request_and_walk_to_the_sum(
            a in metrics(), b in metrics()
        ) {
            let buf = [a.encode_to_vec(), b.encode_to_vec()].concat();
            let mut merged = a.clone();
            merged.resource_metrics.extend(b.resource_metrics.iter().cloned());
            prop_assert_eq!(ExportMetricsServiceRequest::decode(&buf[..]).ok(), Some(merged));
            prop_assert_eq!(walk(Signal::Metrics, &buf), Ok(sum(metric_counts(&a), metric_counts(&b))));
        }

        #[test]
        fn concatenated_log_requests_decode_to_the_merged_request_and_walk_to_the_sum(
            a in logs(), b in logs()
        ) {
            let buf = [a.encode_to_vec(), b.encode_to_vec()].concat();
            let mut merged = a.clone();
            merged.resource_logs.extend(b.resource_logs.iter().cloned());
            prop_assert_eq!(ExportLogsServiceRequest::decode(&buf[..]).ok(), Some(merged));
            prop_assert_eq!(walk(Signal::Logs, &buf), Ok(sum(log_counts(&a), log_counts(&b))));
        }

        #[test]
        fn truncating_a_valid_request_anywhere_never_panics_and_agrees_with_prost(
            (signal, buf, _counts) in any_request()
        ) {
            for len in 0..buf.len() {
                walk_accepts_what_prost_accepts(signal, &buf[..len])?;
            }
        }

        #[test]
        fn flipping_a_byte_never_panics_and_agrees_with_prost(
            (signal, mut buf, _counts) in any_request(),
            at in any::<prop::sample::Index>(),
            xor in 1..=255u8,
        ) {
            if !buf.is_empty() {
                let i = at.index(buf.len());
                buf[i] ^= xor;
            }
            walk_accepts_what_prost_accepts(signal, &buf)?;
        }

        #[test]
        fn random_bytes_never_panic_and_agree_with_prost(
            buf in vec(any::<u8>(), 0..256),
            signal in prop_oneof![Just(Signal::Traces), Just(Signal::Metrics), Just(Signal::Logs)],
        ) {
            walk_accepts_what_prost_accepts(signal, &buf)?;
        }
    }
}
