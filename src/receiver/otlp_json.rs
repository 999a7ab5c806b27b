//! OTLP/JSON to protobuf, once, on arrival.
//!
//! Everything downstream of the receivers sees one format (protobuf bytes, kept
//! as `Bytes` and concatenated into batches), so a JSON request is converted at
//! the door: parse, normalise, deserialize into the `opentelemetry-proto`
//! message types (their `with-serde` derives), encode with prost. The result
//! then takes the same wire walk as a protobuf request.
//!
//! # What the crate's serde gets right, and what is fixed here
//!
//! The derives use lowerCamelCase keys, hex trace and span ids, integer enums,
//! 64-bit integers as strings or numbers, and the AnyValue forms (`intValue` as
//! string or number, `bytesValue` as base64), and they ignore unknown keys.
//! What they get wrong, fixed by `normalize` on the `serde_json::Value`
//! before deserializing:
//!
//! - **Errors swallowed in flattened oneofs.** `Metric`'s data
//!   (`gauge`/`sum`/`histogram`/`exponentialHistogram`/`summary`) and the
//!   `asInt`/`asDouble` value of number data points and exemplars are
//!   `#[serde(flatten)] Option<oneof>`; serde turns *any* error inside such a
//!   field into `None`. A metric whose `sum` has one bad data point silently
//!   lost all its points, and `"asInt": "abc"` became a point with no value.
//!   Here the metric data is taken out and deserialized strictly (errors name
//!   their path), and `asInt`/`asDouble` are checked before deserializing.
//! - **`null` means "default"** in the protobuf JSON mapping; the derives refuse
//!   `null` for strings, numbers and lists. Null members are removed.
//! - **Empty `arrayValue` / `kvlistValue`**: an encoder omits the empty
//!   `values` list (`{"arrayValue": {}}`), which the derives refuse as a
//!   missing field; an empty list is inserted. Likewise a `KeyValue` whose
//!   empty `key` was omitted gets `"key": ""`.
//! - **`bytesValue`** must be accepted in standard or URL-safe base64, with or
//!   without padding; the derives take only padded standard base64. It is
//!   rewritten to the padded standard form.
//! - **Id lengths** are not checked by the derives (`"traceId": "ab"` gave a
//!   one-byte id, which upstream collectors reject, poisoning the whole batch
//!   it is concatenated into). `traceId` must be 32 hex digits, `spanId` and
//!   `parentSpanId` 16, or empty.
//!
//! Not handled: `"NaN"`, `"Infinity"` and `"-Infinity"` as strings for double
//! fields other than summary quantiles (a `serde_json::Value` cannot hold them);
//! such a request is refused with an error naming the field.
//!
//! Errors name the problem: syntax errors carry serde_json's line and column,
//! schema errors the JSON path (`resourceSpans[0].scopeSpans[0].spans[3].traceId`)
//! and, where the raw text shows the same problem, its line and column too.

use std::fmt::{self, Write as _};

use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::metrics::v1::metric;
use prost::Message;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::signal::Signal;

/// A request body that is not a valid OTLP/JSON export request.
///
/// The client sent something the agent cannot convert; it is refused as
/// malformed (HTTP 400) and must not be retried unchanged.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum JsonError {
    /// Not JSON at all: bad syntax, bad UTF-8, nesting too deep, trailing data.
    #[error("invalid JSON at line {line} column {column}: {message}")]
    Syntax {
        line: usize,
        column: usize,
        message: String,
    },
    /// JSON, but not an OTLP/JSON export request of this signal: `path` is
    /// where (`.` for the whole document), `position` the line and column if known.
    #[error("invalid OTLP/JSON {signal} request at {path}{}: {message}", Position(*position))]
    Schema {
        signal: Signal,
        path: String,
        position: Option<(usize, usize)>,
        message: String,
    },
}

struct Position(Option<(usize, usize)>);

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some((line, column)) => write!(f, " (line {line} column {column})"),
            None => Ok(()),
        }
    }
}

/// Convert one OTLP/JSON `Export*ServiceRequest` of `signal` to its protobuf encoding.
pub fn json_to_protobuf(signal: Signal, json: &[u8]) -> Result<Vec<u8>, JsonError> {
    let mut value: Value = serde_json::from_slice(json).map_err(syntax_error)?;
    if !value.is_object() {
        return Err(schema_error(
            signal,
            &[],
            format!(
                "expected a JSON object (an Export*ServiceRequest), got {}",
                kind(&value)
            ),
        ));
    }
    normalize(signal, &mut value, &mut Vec::new())?;
    let encoded = match signal {
        Signal::Traces => decode::<ExportTraceServiceRequest>(signal, value, json)?.encode_to_vec(),
        Signal::Logs => decode::<ExportLogsServiceRequest>(signal, value, json)?.encode_to_vec(),
        Signal::Metrics => {
            let data = take_metric_data(signal, &mut value)?;
            let mut request = decode::<ExportMetricsServiceRequest>(signal, value, json)?;
            let metrics = request
                .resource_metrics
                .iter_mut()
                .flat_map(|r| r.scope_metrics.iter_mut())
                .flat_map(|s| s.metrics.iter_mut());
            let metrics: Vec<_> = metrics.collect();
            if metrics.len() != data.len() {
                // Cannot happen once positional messages are refused; never
                // pair data with the wrong metric if it does.
                return Err(schema_error(
                    signal,
                    &[],
                    format!(
                        "{} metrics but {} metric data entries: the document does not line up",
                        metrics.len(),
                        data.len()
                    ),
                ));
            }
            for (metric, data) in metrics.into_iter().zip(data) {
                // One entry was taken per metric object, in document order.
                metric.data = data;
            }
            request.encode_to_vec()
        }
    };
    Ok(encoded)
}

fn syntax_error(e: serde_json::Error) -> JsonError {
    JsonError::Syntax {
        line: e.line(),
        column: e.column(),
        message: bare_message(&e),
    }
}

/// serde_json's message without its " at line L column C" suffix.
fn bare_message(e: &serde_json::Error) -> String {
    let text = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    match text.strip_suffix(&suffix) {
        Some(bare) => bare.to_owned(),
        None => text,
    }
}

/// Deserialize the normalised document; on error, name the path, and look in
/// the raw text for a line and column of the same problem.
fn decode<T: DeserializeOwned>(signal: Signal, value: Value, raw: &[u8]) -> Result<T, JsonError> {
    serde_path_to_error::deserialize::<_, T>(value).map_err(|e| {
        let path = e.path().to_string();
        let message = e.inner().to_string();
        let mut de = serde_json::Deserializer::from_slice(raw);
        let position = match serde_path_to_error::deserialize::<_, T>(&mut de) {
            Err(raw_err) if raw_err.path().to_string() == path && raw_err.inner().line() > 0 => {
                Some((raw_err.inner().line(), raw_err.inner().column()))
            }
            _ => None,
        };
        JsonError::Schema {
            signal,
            path,
            position,
            message,
        }
    })
}

/// One step of a JSON path, for error messages.
enum Step<'a> {
    Key(&'a str),
    Index(usize),
}

fn path_string(path: &[Step<'_>]) -> String {
    let mut out = String::new();
    for step in path {
        match step {
            Step::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Step::Index(i) => {
                let _ = write!(out, "[{i}]");
            }
        }
    }
    if out.is_empty() {
        out.push('.');
    }
    out
}

fn schema_error(signal: Signal, path: &[Step<'_>], message: impl Into<String>) -> JsonError {
    JsonError::Schema {
        signal,
        path: path_string(path),
        position: None,
        message: message.into(),
    }
}

/// Keys whose value is a list of `KeyValue`.
const KEY_VALUE_LISTS: [&str; 3] = ["attributes", "filteredAttributes", "metadata"];

/// Keys whose value is one message (never a list) in OTLP/JSON.
const MESSAGE_KEYS: [&str; 5] = ["resource", "scope", "status", "positive", "negative"];

/// OTLP/JSON writes every message as an object. serde would also take a
/// struct as a positional array, which would slip past every key-based
/// check here (ids, integers) and, for metrics, pair data with the wrong
/// metric: a list inside a list, a `KeyValue` or one of [`MESSAGE_KEYS`]
/// given as an array is refused.
fn check_not_positional(
    signal: Signal,
    value: &Value,
    what: &str,
    path: &[Step<'_>],
) -> Result<(), JsonError> {
    match value {
        Value::Array(_) => Err(schema_error(
            signal,
            path,
            format!("{what} is a list; OTLP/JSON writes each message as an object"),
        )),
        _ => Ok(()),
    }
}

/// The fix-ups listed in the module docs, over the whole document. Recursion
/// depth is bounded by serde_json's nesting limit (128) at parse time.
fn normalize<'a>(
    signal: Signal,
    value: &'a mut Value,
    path: &mut Vec<Step<'a>>,
) -> Result<(), JsonError> {
    match value {
        Value::Object(map) => {
            map.retain(|_, v| !v.is_null());
            for (key, v) in map.iter_mut() {
                check_member(signal, key, v, path)?;
                let kv_list = KEY_VALUE_LISTS.contains(&key.as_str());
                path.push(Step::Key(key));
                if MESSAGE_KEYS.contains(&key.as_str()) {
                    check_not_positional(signal, v, "this message", path)?;
                }
                match (kv_list, v) {
                    (true, Value::Array(items)) => {
                        for (i, item) in items.iter_mut().enumerate() {
                            path.push(Step::Index(i));
                            normalize_key_value(signal, item, path)?;
                            path.pop();
                        }
                    }
                    (_, v) => normalize(signal, v, path)?,
                }
                path.pop();
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                path.push(Step::Index(i));
                // OTLP has no list of lists: an element that is a list is a
                // message written positionally.
                check_not_positional(signal, item, "this list element", path)?;
                normalize(signal, item, path)?;
                path.pop();
            }
        }
        _ => {}
    }
    Ok(())
}

fn normalize_key_value<'a>(
    signal: Signal,
    item: &'a mut Value,
    path: &mut Vec<Step<'a>>,
) -> Result<(), JsonError> {
    check_not_positional(signal, item, "this KeyValue", path)?;
    if let Value::Object(map) = item {
        map.retain(|_, v| !v.is_null());
        map.entry("key")
            .or_insert_with(|| Value::String(String::new()));
    }
    normalize(signal, item, path)
}

/// Check or rewrite one object member whose meaning its key fixes.
fn check_member<'a>(
    signal: Signal,
    key: &'a str,
    value: &mut Value,
    path: &mut Vec<Step<'a>>,
) -> Result<(), JsonError> {
    path.push(Step::Key(key));
    let result = match key {
        "traceId" => check_id(value, 16),
        "spanId" | "parentSpanId" => check_id(value, 8),
        "asInt" | "intValue" => check_int(value),
        "asDouble" => match value {
            Value::Number(_) => Ok(()),
            _ => Err("expected a number".to_owned()),
        },
        "bytesValue" => normalize_base64(value),
        "arrayValue" | "kvlistValue" => {
            if let Value::Object(map) = value {
                map.retain(|_, v| !v.is_null());
                map.entry("values")
                    .or_insert_with(|| Value::Array(Vec::new()));
                if key == "kvlistValue" {
                    if let Some(Value::Array(items)) = map.get_mut("values") {
                        for item in items {
                            if let Value::Object(kv) = item {
                                kv.retain(|_, v| !v.is_null());
                                kv.entry("key")
                                    .or_insert_with(|| Value::String(String::new()));
                            }
                        }
                    }
                }
            }
            Ok(())
        }
        _ => Ok(()),
    };
    let result = result.map_err(|message| schema_error(signal, path, message));
    path.pop();
    result
}

/// An id is hex of exactly `bytes` bytes, or empty (absent).
fn check_id(value: &Value, bytes: usize) -> Result<(), String> {
    let Value::String(hex) = value else {
        return Err(format!(
            "expected a string of {} hex digits, got {}",
            bytes * 2,
            kind(value)
        ));
    };
    if hex.is_empty() {
        return Ok(());
    }
    if let Some(bad) = hex.chars().find(|c| !c.is_ascii_hexdigit()) {
        return Err(format!(
            "{bad:?} is not a hex digit: ids are hex-encoded (not base64) in OTLP/JSON"
        ));
    }
    if hex.len() != bytes * 2 {
        return Err(format!(
            "expected {} hex digits ({bytes} bytes), got {}",
            bytes * 2,
            hex.len()
        ));
    }
    Ok(())
}

/// A 64-bit signed integer, as a JSON integer or a decimal string.
fn check_int(value: &Value) -> Result<(), String> {
    let fits = match value {
        Value::Number(n) => n.as_i64().is_some(),
        Value::String(s) => s.parse::<i64>().is_ok(),
        _ => false,
    };
    match fits {
        true => Ok(()),
        false => Err(format!(
            "expected a 64-bit signed integer (number or decimal string), got {}",
            short(value)
        )),
    }
}

/// Rewrite standard or URL-safe base64, padded or not, as padded standard base64.
fn normalize_base64(value: &mut Value) -> Result<(), String> {
    let Value::String(text) = value else {
        return Err(format!("expected a base64 string, got {}", kind(value)));
    };
    let mut standard: String = text
        .trim_end_matches('=')
        .chars()
        .map(|c| match c {
            '-' => '+',
            '_' => '/',
            c => c,
        })
        .collect();
    if let Some(bad) = standard
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '+' || *c == '/'))
    {
        return Err(format!("{bad:?} is not a base64 character"));
    }
    if standard.len() % 4 == 1 {
        return Err(format!(
            "{} base64 characters cannot encode whole bytes",
            standard.len()
        ));
    }
    while !standard.len().is_multiple_of(4) {
        standard.push('=');
    }
    *text = standard;
    Ok(())
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A value for an error message, cut short.
fn short(value: &Value) -> String {
    let mut text = value.to_string();
    if text.len() > 40 {
        let mut end = 40;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

const METRIC_DATA_KEYS: [&str; 5] = [
    "gauge",
    "sum",
    "histogram",
    "exponentialHistogram",
    "summary",
];

/// Take each metric's data out of the document and deserialize it strictly,
/// one entry per metric object in document order (see the module docs).
fn take_metric_data(
    signal: Signal,
    value: &mut Value,
) -> Result<Vec<Option<metric::Data>>, JsonError> {
    let mut out = Vec::new();
    let mut path = Vec::new();
    let Some(resources) = array_member(value, "resourceMetrics") else {
        return Ok(out);
    };
    path.push(Step::Key("resourceMetrics"));
    for (r, resource) in resources.iter_mut().enumerate() {
        path.push(Step::Index(r));
        let Some(scopes) = array_member(resource, "scopeMetrics") else {
            path.pop();
            continue;
        };
        path.push(Step::Key("scopeMetrics"));
        for (s, scope) in scopes.iter_mut().enumerate() {
            path.push(Step::Index(s));
            if let Some(metrics) = array_member(scope, "metrics") {
                path.push(Step::Key("metrics"));
                for (m, metric) in metrics.iter_mut().enumerate() {
                    path.push(Step::Index(m));
                    out.push(take_one_metric_data(signal, metric, &mut path)?);
                    path.pop();
                }
                path.pop();
            }
            path.pop();
        }
        path.pop();
        path.pop();
    }
    Ok(out)
}

fn array_member<'v>(value: &'v mut Value, key: &str) -> Option<&'v mut Vec<Value>> {
    match value {
        Value::Object(map) => match map.get_mut(key) {
            Some(Value::Array(items)) => Some(items),
            _ => None,
        },
        _ => None,
    }
}

fn take_one_metric_data(
    signal: Signal,
    metric: &mut Value,
    path: &mut Vec<Step<'_>>,
) -> Result<Option<metric::Data>, JsonError> {
    let Value::Object(map) = metric else {
        return Ok(None);
    };
    let present: Vec<&str> = METRIC_DATA_KEYS
        .into_iter()
        .filter(|k| map.contains_key(*k))
        .collect();
    let key = match present.as_slice() {
        [] => return Ok(None),
        [one] => *one,
        many => {
            return Err(schema_error(
                signal,
                path,
                format!(
                    "a metric holds one kind of data, found {}",
                    many.join(" and ")
                ),
            ))
        }
    };
    let Some(data) = map.remove(key) else {
        return Ok(None);
    };
    let mut tagged = Map::new();
    tagged.insert(key.to_owned(), data);
    serde_path_to_error::deserialize::<_, metric::Data>(Value::Object(tagged))
        .map(Some)
        .map_err(|e| JsonError::Schema {
            signal,
            path: format!("{}.{}", path_string(path), e.path()),
            position: None,
            message: e.inner().to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
    use opentelemetry_proto::tonic::common::v1::{
        any_value::Value as V, AnyValue, ArrayValue, InstrumentationScope, KeyValue, KeyValueList,
    };
    use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
    use opentelemetry_proto::tonic::metrics::v1::{
        exemplar, exponential_histogram_data_point::Buckets, number_data_point, summary_data_point,
        Exemplar, ExponentialHistogram, ExponentialHistogramDataPoint, Gauge, Histogram,
        HistogramDataPoint, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum, Summary,
        SummaryDataPoint,
    };
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::{span, ResourceSpans, ScopeSpans, Span, Status};
    use proptest::prelude::*;

    fn kv(key: &str, value: Option<V>) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: Some(AnyValue { value }),
            ..Default::default()
        }
    }

    /// The `test.id` attribute the integration tests read ids from.
    fn id(n: i64) -> KeyValue {
        kv("test.id", Some(V::IntValue(n)))
    }

    fn s(text: &str) -> Option<V> {
        Some(V::StringValue(text.into()))
    }

    fn hex(text: &str) -> Vec<u8> {
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("test hex"))
            .collect()
    }

    fn convert<T: Message + Default>(signal: Signal, json: &str) -> T {
        let bytes = json_to_protobuf(signal, json.as_bytes())
            .unwrap_or_else(|e| panic!("conversion failed: {e}"));
        T::decode(bytes.as_slice()).expect("converted bytes decode")
    }

    fn error(signal: Signal, json: &str) -> String {
        match json_to_protobuf(signal, json.as_bytes()) {
            Ok(_) => panic!("expected an error for {json}"),
            Err(e) => e.to_string(),
        }
    }

    /// Every AnyValue form, both 64-bit integer forms, hex ids in either case,
    /// integer enums, nulls, unknown keys, empty arrays/kvlists.
    const TRACES_JSON: &str = include_str!("../../tests/data/otlp_json/traces.json");

    fn traces_twin() -> ExportTraceServiceRequest {
        let first = Span {
            trace_id: hex("5b8efff798038103d269b633813fc60c"),
            span_id: hex("eee19b7ec3c1b174"),
            parent_span_id: hex("eee19b7ec3c1b173"),
            trace_state: "a=b".into(),
            flags: 257,
            name: "GET /".into(),
            kind: span::SpanKind::Server as i32,
            start_time_unix_nano: 1_544_712_660_000_000_000,
            end_time_unix_nano: 1_544_712_661_000_000_000,
            attributes: vec![
                id(7_000_000_001),
                kv("s", s("x")),
                kv("i_str", Some(V::IntValue(i64::MIN))),
                kv("i_num", Some(V::IntValue(42))),
                kv("d", Some(V::DoubleValue(1.5))),
                kv("d_int", Some(V::DoubleValue(3.0))),
                kv("b", Some(V::BoolValue(false))),
                kv(
                    "arr",
                    Some(V::ArrayValue(ArrayValue {
                        values: vec![
                            AnyValue { value: s("a") },
                            AnyValue {
                                value: Some(V::IntValue(7)),
                            },
                            AnyValue {
                                value: Some(V::ArrayValue(ArrayValue::default())),
                            },
                        ],
                    })),
                ),
                kv(
                    "kv",
                    Some(V::KvlistValue(KeyValueList {
                        values: vec![
                            kv("n", Some(V::DoubleValue(-0.25))),
                            kv("", Some(V::BoolValue(true))),
                        ],
                    })),
                ),
                kv("empty_kv", Some(V::KvlistValue(KeyValueList::default()))),
                kv("bytes", Some(V::BytesValue(b"hello".to_vec()))),
                kv("bytes_url", Some(V::BytesValue(vec![0xfb, 0xff]))),
                kv("nothing", None),
                KeyValue {
                    key: "null_value".into(),
                    value: None,
                    ..Default::default()
                },
            ],
            events: vec![span::Event {
                time_unix_nano: 1_544_712_660_500_000_000,
                name: "ev".into(),
                attributes: vec![kv("e", Some(V::IntValue(1)))],
                dropped_attributes_count: 0,
            }],
            links: vec![span::Link {
                trace_id: hex("5b8efff798038103d269b633813fc60d"),
                span_id: hex("0000000000000001"),
                flags: 1,
                ..Default::default()
            }],
            status: Some(Status {
                message: "boom".into(),
                code: 2,
            }),
            ..Default::default()
        };
        let second = Span {
            trace_id: hex("5b8efff798038103d269b633813fc60c"),
            span_id: hex("0102030405060708"),
            kind: span::SpanKind::Internal as i32,
            attributes: vec![id(7_000_000_002)],
            status: Some(Status::default()),
            ..Default::default()
        };
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![kv("service.name", s("checkout"))],
                    dropped_attributes_count: 1,
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "lib".into(),
                        version: "1.2".into(),
                        attributes: vec![kv("k", Some(V::BoolValue(true)))],
                        dropped_attributes_count: 0,
                    }),
                    spans: vec![first, second],
                    schema_url: String::new(),
                }],
                schema_url: "https://opentelemetry.io/schemas/1.21.0".into(),
            }],
        }
    }

    /// Two resources, every metric kind, 64-bit fields in both forms, a metric
    /// without data (its neighbours must keep their own data).
    const METRICS_JSON: &str = include_str!("../../tests/data/otlp_json/metrics.json");

    fn metrics_twin() -> ExportMetricsServiceRequest {
        let gauge = Metric {
            name: "g".into(),
            unit: "1".into(),
            data: Some(metric::Data::Gauge(Gauge {
                data_points: vec![
                    NumberDataPoint {
                        time_unix_nano: 10,
                        value: Some(number_data_point::Value::AsDouble(0.5)),
                        attributes: vec![kv("a", s("b")), id(7_100_000_001)],
                        ..Default::default()
                    },
                    NumberDataPoint {
                        time_unix_nano: 11,
                        value: Some(number_data_point::Value::AsInt(-3)),
                        flags: 1,
                        attributes: vec![id(7_100_000_002)],
                        exemplars: vec![Exemplar {
                            time_unix_nano: 9,
                            value: Some(exemplar::Value::AsInt(4)),
                            span_id: hex("0102030405060708"),
                            trace_id: hex("0102030405060708090a0b0c0d0e0f10"),
                            filtered_attributes: vec![kv("f", Some(V::IntValue(5)))],
                        }],
                        ..Default::default()
                    },
                ],
            })),
            ..Default::default()
        };
        let nodata = Metric {
            name: "nodata".into(),
            description: "no data at all".into(),
            ..Default::default()
        };
        let sum = Metric {
            name: "s".into(),
            data: Some(metric::Data::Sum(Sum {
                aggregation_temporality: 2,
                is_monotonic: true,
                data_points: vec![NumberDataPoint {
                    start_time_unix_nano: 1,
                    time_unix_nano: 2,
                    value: Some(number_data_point::Value::AsInt(9_007_199_254_740_993)),
                    attributes: vec![id(7_100_000_003)],
                    ..Default::default()
                }],
            })),
            ..Default::default()
        };
        let histogram = Metric {
            name: "h".into(),
            data: Some(metric::Data::Histogram(Histogram {
                aggregation_temporality: 1,
                data_points: vec![HistogramDataPoint {
                    count: 3,
                    sum: Some(6.5),
                    bucket_counts: vec![1, 2],
                    explicit_bounds: vec![1.0],
                    min: Some(0.5),
                    max: Some(4.0),
                    time_unix_nano: 3,
                    attributes: vec![id(7_100_000_004)],
                    ..Default::default()
                }],
            })),
            ..Default::default()
        };
        let exponential = Metric {
            name: "e".into(),
            data: Some(metric::Data::ExponentialHistogram(ExponentialHistogram {
                aggregation_temporality: 2,
                data_points: vec![ExponentialHistogramDataPoint {
                    count: 7,
                    scale: -1,
                    zero_count: 0,
                    zero_threshold: 0.001,
                    positive: Some(Buckets {
                        offset: -2,
                        bucket_counts: vec![3, 4],
                    }),
                    negative: Some(Buckets::default()),
                    attributes: vec![id(7_100_000_005)],
                    ..Default::default()
                }],
            })),
            ..Default::default()
        };
        let summary = Metric {
            name: "q".into(),
            data: Some(metric::Data::Summary(Summary {
                data_points: vec![SummaryDataPoint {
                    count: 3,
                    sum: 4.5,
                    quantile_values: vec![
                        summary_data_point::ValueAtQuantile {
                            quantile: 0.5,
                            value: 1.0,
                        },
                        summary_data_point::ValueAtQuantile {
                            quantile: 0.0,
                            value: 2.0,
                        },
                    ],
                    attributes: vec![id(7_100_000_006)],
                    ..Default::default()
                }],
            })),
            ..Default::default()
        };
        ExportMetricsServiceRequest {
            resource_metrics: vec![
                ResourceMetrics {
                    scope_metrics: vec![ScopeMetrics {
                        scope: Some(InstrumentationScope {
                            name: "m".into(),
                            ..Default::default()
                        }),
                        metrics: vec![gauge, nodata, sum],
                        ..Default::default()
                    }],
                    ..Default::default()
                },
                ResourceMetrics {
                    resource: Some(Resource {
                        attributes: vec![kv("host", s("h"))],
                        ..Default::default()
                    }),
                    scope_metrics: vec![ScopeMetrics {
                        metrics: vec![histogram, exponential, summary],
                        ..Default::default()
                    }],
                    ..Default::default()
                },
            ],
        }
    }

    const LOGS_JSON: &str = include_str!("../../tests/data/otlp_json/logs.json");

    fn logs_twin() -> ExportLogsServiceRequest {
        ExportLogsServiceRequest {
            resource_logs: vec![ResourceLogs {
                scope_logs: vec![ScopeLogs {
                    log_records: vec![
                        LogRecord {
                            time_unix_nano: 1_700_000_000_000_000_000,
                            observed_time_unix_nano: 1_700_000_000_000_000_001,
                            severity_number: 9,
                            severity_text: "INFO".into(),
                            body: Some(AnyValue {
                                value: Some(V::KvlistValue(KeyValueList {
                                    values: vec![
                                        kv("msg", s("hello")),
                                        kv(
                                            "list",
                                            Some(V::ArrayValue(ArrayValue {
                                                values: vec![
                                                    AnyValue {
                                                        value: Some(V::BoolValue(true)),
                                                    },
                                                    AnyValue {
                                                        value: Some(V::DoubleValue(2.5)),
                                                    },
                                                ],
                                            })),
                                        ),
                                        kv("raw", Some(V::BytesValue(vec![0, 1, 2]))),
                                    ],
                                })),
                            }),
                            attributes: vec![kv("n", Some(V::IntValue(-1))), id(7_200_000_001)],
                            dropped_attributes_count: 2,
                            flags: 1,
                            trace_id: hex("0102030405060708090a0b0c0d0e0f10"),
                            span_id: hex("1112131415161718"),
                            event_name: "app.start".into(),
                        },
                        LogRecord {
                            body: Some(AnyValue { value: s("plain") }),
                            attributes: vec![id(7_200_000_002)],
                            ..Default::default()
                        },
                    ],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }

    /// serde takes a struct written as a positional array; OTLP/JSON never
    /// writes one, and such a document would slip past the id checks or pair
    /// metric data with the wrong metric.
    #[test]
    fn messages_written_as_lists_are_refused() {
        let cases = [
            // A scope as a list: its metric would get the next scope's data.
            (
                Signal::Metrics,
                r#"{"resourceMetrics":[{"scopeMetrics":[[null,[{"name":"a"}]],{"metrics":[{"name":"b","sum":{"dataPoints":[{"asInt":"1"}],"aggregationTemporality":2,"isMonotonic":true}}]}]}]}"#,
                "resourceMetrics[0].scopeMetrics[0]",
            ),
            // A span as a list: its 1-byte trace id would pass unchecked.
            (
                Signal::Traces,
                r#"{"resourceSpans":[{"scopeSpans":[{"spans":[["ab"]]}]}]}"#,
                "resourceSpans[0].scopeSpans[0].spans[0]",
            ),
            (
                Signal::Logs,
                r#"{"resourceLogs":[{"resource":["x"],"scopeLogs":[]}]}"#,
                "resourceLogs[0].resource",
            ),
            (
                Signal::Logs,
                r#"{"resourceLogs":[{"scopeLogs":[{"logRecords":[{"attributes":[["k",{"stringValue":"v"}]]}]}]}]}"#,
                "attributes[0]",
            ),
        ];
        for (signal, json, at) in cases {
            match json_to_protobuf(signal, json.as_bytes()) {
                Err(e @ JsonError::Schema { .. }) => {
                    let text = e.to_string();
                    assert!(text.contains(at), "{json}: {text}");
                    assert!(text.contains("as an object"), "{json}: {text}");
                }
                other => panic!("{json}: {other:?}"),
            }
        }
    }

    #[test]
    fn traces_document_with_every_value_form_matches_its_protobuf_twin() {
        let got: ExportTraceServiceRequest = convert(Signal::Traces, TRACES_JSON);
        assert_eq!(got, traces_twin());
    }

    #[test]
    fn metrics_document_with_every_metric_kind_matches_its_protobuf_twin() {
        let got: ExportMetricsServiceRequest = convert(Signal::Metrics, METRICS_JSON);
        assert_eq!(got, metrics_twin());
    }

    #[test]
    fn logs_document_matches_its_protobuf_twin() {
        let got: ExportLogsServiceRequest = convert(Signal::Logs, LOGS_JSON);
        assert_eq!(got, logs_twin());
    }

    #[test]
    fn converted_bytes_pass_the_wire_walk_with_the_right_counts() {
        let cases = [
            (Signal::Traces, TRACES_JSON, 2),
            (Signal::Metrics, METRICS_JSON, 6),
            (Signal::Logs, LOGS_JSON, 2),
        ];
        for (signal, json, items) in cases {
            let bytes = json_to_protobuf(signal, json.as_bytes()).expect("converts");
            let counts = crate::wire::walk(signal, &bytes).expect("walks");
            assert_eq!(counts.items, items, "{signal}");
        }
    }

    #[test]
    fn empty_documents_are_empty_requests() {
        for signal in Signal::ALL {
            for json in [
                "{}",
                r#"{"resourceSpans": null, "resourceMetrics": [], "resourceLogs": []}"#,
            ] {
                let bytes = json_to_protobuf(signal, json.as_bytes()).expect("converts");
                assert!(bytes.is_empty(), "{signal} {json}");
            }
        }
    }

    #[test]
    fn crate_serde_round_trip_matches_the_twin() {
        // What the SDK's JSON exporter sends: the crate's own serialization.
        let json = serde_json::to_string(&metrics_twin()).expect("serializes");
        let got: ExportMetricsServiceRequest = convert(Signal::Metrics, &json);
        assert_eq!(got, metrics_twin());
        let json = serde_json::to_string(&traces_twin()).expect("serializes");
        let got: ExportTraceServiceRequest = convert(Signal::Traces, &json);
        assert_eq!(got, traces_twin());
    }

    #[test]
    fn syntax_errors_carry_line_and_column() {
        let e = json_to_protobuf(Signal::Traces, b"{\n  \"resourceSpans\": [\n  }").unwrap_err();
        match e {
            JsonError::Syntax { line, column, .. } => assert_eq!((line, column), (3, 3)),
            other => panic!("expected a syntax error, got {other}"),
        }
        let text = error(Signal::Logs, "{} trailing");
        assert!(
            text.starts_with("invalid JSON at line 1 column 4: trailing characters"),
            "{text}"
        );
        let text = error(Signal::Logs, "");
        assert!(text.contains("EOF"), "{text}");
        let text = error(Signal::Logs, "[1]");
        assert!(
            text.contains("at .: expected a JSON object") && text.contains("an array"),
            "{text}"
        );
    }

    #[test]
    fn bad_ids_are_refused_with_their_path() {
        let doc = |field: &str, value: &str| {
            format!(
                r#"{{"resourceSpans":[{{"scopeSpans":[{{"spans":[{{"{field}":{value}}}]}}]}}]}}"#
            )
        };
        let text = error(Signal::Traces, &doc("traceId", r#""abcd""#));
        assert!(
            text.contains("resourceSpans[0].scopeSpans[0].spans[0].traceId")
                && text.contains("expected 32 hex digits (16 bytes), got 4"),
            "{text}"
        );
        let text = error(Signal::Traces, &doc("spanId", r#""W4337/eYA4E=""#));
        assert!(
            text.contains("spans[0].spanId") && text.contains("not a hex digit"),
            "{text}"
        );
        let text = error(Signal::Traces, &doc("parentSpanId", "12"));
        assert!(
            text.contains("parentSpanId") && text.contains("got a number"),
            "{text}"
        );
    }

    #[test]
    fn bad_values_inside_metric_data_are_refused_not_dropped() {
        // The crate's flattened oneofs turn these errors into missing data.
        let gauge_point = |point: &str| {
            format!(
                r#"{{"resourceMetrics":[{{"scopeMetrics":[{{"metrics":[{{"name":"g","gauge":{{"dataPoints":[{point}]}}}}]}}]}}]}}"#
            )
        };
        let text = error(Signal::Metrics, &gauge_point(r#"{"asInt":"abc"}"#));
        assert!(
            text.contains("metrics[0].gauge.dataPoints[0].asInt")
                && text.contains("64-bit signed integer"),
            "{text}"
        );
        let text = error(Signal::Metrics, &gauge_point(r#"{"asDouble":"1.5"}"#));
        assert!(
            text.contains("asDouble") && text.contains("expected a number"),
            "{text}"
        );
        let text = error(
            Signal::Metrics,
            &gauge_point(r#"{"timeUnixNano":"yesterday","asInt":1}"#),
        );
        assert!(
            text.contains(
                "resourceMetrics[0].scopeMetrics[0].metrics[0].gauge.dataPoints[0].timeUnixNano"
            ),
            "{text}"
        );
        let text = error(
            Signal::Metrics,
            r#"{"resourceMetrics":[{"scopeMetrics":[{"metrics":[{"sum":{"dataPoints":7}}]}]}]}"#,
        );
        assert!(text.contains("metrics[0].sum.dataPoints"), "{text}");
        let text = error(
            Signal::Metrics,
            r#"{"resourceMetrics":[{"scopeMetrics":[{"metrics":[{"sum":{},"gauge":{}}]}]}]}"#,
        );
        assert!(
            text.contains("one kind of data, found gauge and sum"),
            "{text}"
        );
    }

    #[test]
    fn schema_errors_name_the_path_and_position() {
        let json = "{\"resourceLogs\": [{\"scopeLogs\": [{\"logRecords\": [\n{\"severityNumber\": \"INFO\"}]}]}]}";
        let text = error(Signal::Logs, json);
        assert!(
            text.contains(
                "resourceLogs[0].scopeLogs[0].logRecords[0].severityNumber (line 2 column"
            ) && text.contains("invalid type: string \"INFO\""),
            "{text}"
        );
        let text = error(
            Signal::Logs,
            r#"{"resourceLogs": [{"scopeLogs": [{"logRecords": [{"body": {"intValue": 1.5}}]}]}]}"#,
        );
        assert!(
            text.contains("logRecords[0].body.intValue") && text.contains("1.5"),
            "{text}"
        );
        let text = error(
            Signal::Logs,
            r#"{"resourceLogs": [{"scopeLogs": [{"logRecords": [{"body": {"bytesValue": "a*"}}]}]}]}"#,
        );
        assert!(
            text.contains("body.bytesValue") && text.contains("not a base64 character"),
            "{text}"
        );
    }

    /// What the crate's derives do on their own: the gaps listed in the module
    /// docs. If a crate upgrade fixes one, this test says so; the fix-up can go.
    #[test]
    fn crate_serde_gaps_this_module_fixes() {
        use opentelemetry_proto::tonic::common::v1::AnyValue as Any;
        let raw = |json: &str| serde_json::from_str::<Any>(json).map(|a| a.value);
        assert!(
            raw(r#"{"arrayValue": {}}"#).is_err(),
            "empty arrayValue refused"
        );
        assert!(
            raw(r#"{"kvlistValue": {}}"#).is_err(),
            "empty kvlistValue refused"
        );
        assert!(
            raw(r#"{"bytesValue": "-_8"}"#).is_err(),
            "URL-safe base64 refused"
        );
        assert!(
            raw(r#"{"bytesValue": "aGVsbG8"}"#).is_err(),
            "unpadded base64 refused"
        );
        let point: NumberDataPoint =
            serde_json::from_str(r#"{"asInt": "abc"}"#).expect("the error is swallowed");
        assert_eq!(point.value, None, "bad asInt silently becomes no value");
        let metric: Metric = serde_json::from_str(r#"{"name": "m", "sum": {"dataPoints": 7}}"#)
            .expect("the error is swallowed");
        assert_eq!(metric.data, None, "bad sum silently becomes no data");
        let span: Span = serde_json::from_str(r#"{"traceId": "ab"}"#).expect("no length check");
        assert_eq!(span.trace_id, vec![0xab], "one-byte trace id accepted");
        assert!(
            serde_json::from_str::<Span>(r#"{"name": null}"#).is_err(),
            "null refused"
        );
    }

    #[test]
    fn base64_forms_are_normalised() {
        for (input, expected) in [
            ("aGVsbG8=", "aGVsbG8="),
            ("aGVsbG8", "aGVsbG8="),
            ("-_8", "+/8="),
            ("", ""),
        ] {
            let mut value = Value::String(input.into());
            normalize_base64(&mut value).expect("valid");
            assert_eq!(value, Value::String(expected.into()), "{input}");
        }
        assert!(normalize_base64(&mut Value::String("abcde".into())).is_err());
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            for signal in Signal::ALL {
                let _ = json_to_protobuf(signal, &bytes);
            }
        }

        /// Cut or corrupt a valid document anywhere: an error or a request, never a panic,
        /// and whatever converts passes the wire walk.
        #[test]
        fn mangled_documents_never_panic(
            doc in 0usize..3, at in any::<prop::sample::Index>(), byte in any::<u8>(), cut in any::<bool>(),
        ) {
            let (signal, json) = [
                (Signal::Traces, TRACES_JSON),
                (Signal::Metrics, METRICS_JSON),
                (Signal::Logs, LOGS_JSON),
            ][doc];
            let mut bytes = json.as_bytes().to_vec();
            let i = at.index(bytes.len());
            if cut { bytes.truncate(i) } else { bytes[i] = byte }
            if let Ok(out) = json_to_protobuf(signal, &bytes) {
                prop_assert!(crate::wire::walk(signal, &out).is_ok());
            }
        }
    }
}
