//! Items that carry test ids, and the requests that hold them.
//!
//! Every item a test sends carries a unique `u64` id: spans as their `span_id`
//! (big-endian) plus an int attribute `test.id`, metric data points and log
//! records as the int attribute `test.id`. "Nothing lost" is then equality of
//! id sets, and duplicates are visible as repeated ids. Id `0` is never handed
//! out (an all-zero span id is invalid in OTLP).

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use opentelemetry_proto::tonic::metrics::v1::{
    metric, number_data_point, AggregationTemporality, Gauge, Histogram, HistogramDataPoint,
    Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use prost::Message;

use super::Signal;

/// Attribute key that carries an item's id.
pub const ID_KEY: &str = "test.id";
/// Attribute key of the optional padding attribute.
pub const PAYLOAD_KEY: &str = "test.payload";

/// `n` ids never handed out before in this test process (starting at 1).
/// Tests running in parallel in one binary therefore never share ids.
pub fn fresh_ids(n: usize) -> Vec<u64> {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let start = NEXT.fetch_add(n as u64, Ordering::Relaxed);
    (start..start + n as u64).collect()
}

/// Which metric shapes a metrics request uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MetricShape {
    /// One monotonic delta Sum metric with one NumberDataPoint per id.
    #[default]
    Sum,
    /// One Gauge metric with one data point per id.
    Gauge,
    /// One Histogram metric with one data point per id.
    Histogram,
    /// Sum, Gauge and Histogram metrics, ids spread over them round-robin.
    Mixed,
}

/// How the items of a request are built.
#[derive(Clone, Debug, Default)]
pub struct ItemSpec {
    /// Size in bytes of an extra string attribute `test.payload` on every item
    /// (0: no such attribute). Makes requests big without more items.
    pub payload_bytes: usize,
    /// Metric shapes (metrics only).
    pub metric_shape: MetricShape,
}

impl ItemSpec {
    pub fn with_payload(payload_bytes: usize) -> Self {
        ItemSpec {
            payload_bytes,
            ..ItemSpec::default()
        }
    }
}

/// An OTLP export request of any signal.
#[derive(Clone, Debug, PartialEq)]
pub enum ExportRequest {
    Traces(ExportTraceServiceRequest),
    Metrics(ExportMetricsServiceRequest),
    Logs(ExportLogsServiceRequest),
}

impl ExportRequest {
    /// A request of `signal` holding one item per id.
    pub fn build(signal: Signal, ids: &[u64]) -> Self {
        Self::build_with(signal, ids, &ItemSpec::default())
    }

    pub fn build_with(signal: Signal, ids: &[u64], spec: &ItemSpec) -> Self {
        match signal {
            Signal::Traces => ExportRequest::Traces(traces_request_with(ids, spec)),
            Signal::Metrics => ExportRequest::Metrics(metrics_request_with(ids, spec)),
            Signal::Logs => ExportRequest::Logs(logs_request_with(ids, spec)),
        }
    }

    pub fn signal(&self) -> Signal {
        match self {
            ExportRequest::Traces(_) => Signal::Traces,
            ExportRequest::Metrics(_) => Signal::Metrics,
            ExportRequest::Logs(_) => Signal::Logs,
        }
    }

    /// Protobuf wire bytes (the body of an OTLP/HTTP protobuf request, or
    /// the message of a gRPC call before framing).
    pub fn encode_to_bytes(&self) -> Bytes {
        match self {
            ExportRequest::Traces(r) => r.encode_to_vec().into(),
            ExportRequest::Metrics(r) => r.encode_to_vec().into(),
            ExportRequest::Logs(r) => r.encode_to_vec().into(),
        }
    }

    /// OTLP/JSON body (for OTLP/HTTP JSON tests).
    pub fn to_json(&self) -> String {
        match self {
            ExportRequest::Traces(r) => serde_json::to_string(r),
            ExportRequest::Metrics(r) => serde_json::to_string(r),
            ExportRequest::Logs(r) => serde_json::to_string(r),
        }
        .expect("OTLP request serializes to JSON")
    }

    /// Decodes protobuf bytes of a `signal` request.
    pub fn decode(signal: Signal, bytes: &[u8]) -> Result<Self, prost::DecodeError> {
        Ok(match signal {
            Signal::Traces => ExportRequest::Traces(ExportTraceServiceRequest::decode(bytes)?),
            Signal::Metrics => ExportRequest::Metrics(ExportMetricsServiceRequest::decode(bytes)?),
            Signal::Logs => ExportRequest::Logs(ExportLogsServiceRequest::decode(bytes)?),
        })
    }

    pub fn ids(&self) -> Vec<u64> {
        match self {
            ExportRequest::Traces(r) => r.ids(),
            ExportRequest::Metrics(r) => r.ids(),
            ExportRequest::Logs(r) => r.ids(),
        }
    }
}

/// Anything that holds test items.
pub trait HasIds {
    /// Ids of every item, in order, duplicates kept. Items without a
    /// `test.id` attribute are skipped (spans fall back to their span id only
    /// when it is 8 bytes and the attribute is missing: never for SDK spans,
    /// which always get the attribute from the helpers).
    fn ids(&self) -> Vec<u64>;
}

/// Ids of every item in `request` (duplicates kept, in order).
pub fn ids_in<R: HasIds + ?Sized>(request: &R) -> Vec<u64> {
    request.ids()
}

/// Ids in the protobuf encoding of a `signal` export request.
pub fn ids_in_bytes(signal: Signal, bytes: &[u8]) -> Result<Vec<u64>, prost::DecodeError> {
    Ok(ExportRequest::decode(signal, bytes)?.ids())
}

fn id_attribute(attributes: &[KeyValue]) -> Option<u64> {
    attributes
        .iter()
        .find(|kv| kv.key == ID_KEY)
        .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
            any_value::Value::IntValue(v) => Some(*v as u64),
            any_value::Value::StringValue(s) => s.parse().ok(),
            _ => None,
        })
}

impl HasIds for ExportTraceServiceRequest {
    fn ids(&self) -> Vec<u64> {
        self.resource_spans
            .iter()
            .flat_map(|rs| &rs.scope_spans)
            .flat_map(|ss| &ss.spans)
            .filter_map(|span| {
                id_attribute(&span.attributes).or_else(|| {
                    let bytes: [u8; 8] = span.span_id.as_slice().try_into().ok()?;
                    Some(u64::from_be_bytes(bytes))
                })
            })
            .collect()
    }
}

impl HasIds for ExportMetricsServiceRequest {
    fn ids(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for metric in self
            .resource_metrics
            .iter()
            .flat_map(|rm| &rm.scope_metrics)
            .flat_map(|sm| &sm.metrics)
        {
            let Some(data) = &metric.data else { continue };
            match data {
                metric::Data::Sum(s) => out.extend(
                    s.data_points
                        .iter()
                        .filter_map(|p| id_attribute(&p.attributes)),
                ),
                metric::Data::Gauge(g) => out.extend(
                    g.data_points
                        .iter()
                        .filter_map(|p| id_attribute(&p.attributes)),
                ),
                metric::Data::Histogram(h) => out.extend(
                    h.data_points
                        .iter()
                        .filter_map(|p| id_attribute(&p.attributes)),
                ),
                metric::Data::ExponentialHistogram(h) => out.extend(
                    h.data_points
                        .iter()
                        .filter_map(|p| id_attribute(&p.attributes)),
                ),
                metric::Data::Summary(s) => out.extend(
                    s.data_points
                        .iter()
                        .filter_map(|p| id_attribute(&p.attributes)),
                ),
            }
        }
        out
    }
}

impl HasIds for ExportLogsServiceRequest {
    fn ids(&self) -> Vec<u64> {
        self.resource_logs
            .iter()
            .flat_map(|rl| &rl.scope_logs)
            .flat_map(|sl| &sl.log_records)
            .filter_map(|r| id_attribute(&r.attributes))
            .collect()
    }
}

impl HasIds for ExportRequest {
    fn ids(&self) -> Vec<u64> {
        ExportRequest::ids(self)
    }
}

fn kv_int(key: &str, v: i64) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::IntValue(v)),
        }),
        ..Default::default()
    }
}

fn kv_str(key: &str, v: String) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(v)),
        }),
        ..Default::default()
    }
}

fn item_attributes(id: u64, spec: &ItemSpec) -> Vec<KeyValue> {
    let mut attrs = vec![kv_int(ID_KEY, id as i64)];
    if spec.payload_bytes > 0 {
        // Not all one byte, so gzip does not make "large" requests tiny.
        let payload: String = (0..spec.payload_bytes)
            .map(|i| {
                let mix = (id as usize)
                    .wrapping_mul(31)
                    .wrapping_add(i.wrapping_mul(7));
                char::from(b'a' + (mix % 26) as u8)
            })
            .collect();
        attrs.push(kv_str(PAYLOAD_KEY, payload));
    }
    attrs
}

fn resource() -> Option<Resource> {
    Some(Resource {
        attributes: vec![kv_str("service.name", "telespool-test".to_owned())],
        ..Default::default()
    })
}

fn scope() -> Option<InstrumentationScope> {
    Some(InstrumentationScope {
        name: "telespool-test-harness".to_owned(),
        ..Default::default()
    })
}

const NOW_NANOS: u64 = 1_700_000_000_000_000_000;

pub fn traces_request(ids: &[u64]) -> ExportTraceServiceRequest {
    traces_request_with(ids, &ItemSpec::default())
}

pub fn traces_request_with(ids: &[u64], spec: &ItemSpec) -> ExportTraceServiceRequest {
    let spans = ids
        .iter()
        .map(|&id| {
            let mut trace_id = vec![0x7e; 8];
            trace_id.extend_from_slice(&id.to_be_bytes());
            Span {
                trace_id,
                span_id: id.to_be_bytes().to_vec(),
                name: format!("span-{id}"),
                kind: 1,
                start_time_unix_nano: NOW_NANOS + id,
                end_time_unix_nano: NOW_NANOS + id + 1_000,
                attributes: item_attributes(id, spec),
                ..Default::default()
            }
        })
        .collect();
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: resource(),
            scope_spans: vec![ScopeSpans {
                scope: scope(),
                spans,
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    }
}

pub fn metrics_request(ids: &[u64]) -> ExportMetricsServiceRequest {
    metrics_request_with(ids, &ItemSpec::default())
}

pub fn metrics_request_with(ids: &[u64], spec: &ItemSpec) -> ExportMetricsServiceRequest {
    let number_point = |id: u64| NumberDataPoint {
        attributes: item_attributes(id, spec),
        start_time_unix_nano: NOW_NANOS,
        time_unix_nano: NOW_NANOS + id,
        value: Some(number_data_point::Value::AsInt(1)),
        ..Default::default()
    };
    let histogram_point = |id: u64| HistogramDataPoint {
        attributes: item_attributes(id, spec),
        start_time_unix_nano: NOW_NANOS,
        time_unix_nano: NOW_NANOS + id,
        count: 1,
        sum: Some(id as f64),
        bucket_counts: vec![0, 1],
        explicit_bounds: vec![0.0],
        ..Default::default()
    };
    let sum = |ids: &[u64]| Metric {
        name: "test.counter".to_owned(),
        data: Some(metric::Data::Sum(Sum {
            data_points: ids.iter().map(|&id| number_point(id)).collect(),
            aggregation_temporality: AggregationTemporality::Delta as i32,
            is_monotonic: true,
        })),
        ..Default::default()
    };
    let gauge = |ids: &[u64]| Metric {
        name: "test.gauge".to_owned(),
        data: Some(metric::Data::Gauge(Gauge {
            data_points: ids.iter().map(|&id| number_point(id)).collect(),
        })),
        ..Default::default()
    };
    let histogram = |ids: &[u64]| Metric {
        name: "test.histogram".to_owned(),
        data: Some(metric::Data::Histogram(Histogram {
            data_points: ids.iter().map(|&id| histogram_point(id)).collect(),
            aggregation_temporality: AggregationTemporality::Delta as i32,
        })),
        ..Default::default()
    };
    let metrics = match spec.metric_shape {
        MetricShape::Sum => vec![sum(ids)],
        MetricShape::Gauge => vec![gauge(ids)],
        MetricShape::Histogram => vec![histogram(ids)],
        MetricShape::Mixed => {
            let pick = |k: usize| -> Vec<u64> {
                ids.iter()
                    .enumerate()
                    .filter(|(i, _)| i % 3 == k)
                    .map(|(_, &id)| id)
                    .collect()
            };
            vec![sum(&pick(0)), gauge(&pick(1)), histogram(&pick(2))]
        }
    };
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: resource(),
            scope_metrics: vec![ScopeMetrics {
                scope: scope(),
                metrics,
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    }
}

pub fn logs_request(ids: &[u64]) -> ExportLogsServiceRequest {
    logs_request_with(ids, &ItemSpec::default())
}

pub fn logs_request_with(ids: &[u64], spec: &ItemSpec) -> ExportLogsServiceRequest {
    let log_records = ids
        .iter()
        .map(|&id| LogRecord {
            time_unix_nano: NOW_NANOS + id,
            observed_time_unix_nano: NOW_NANOS + id,
            severity_number: 9,
            severity_text: "INFO".to_owned(),
            body: Some(AnyValue {
                value: Some(any_value::Value::StringValue(format!("log {id}"))),
            }),
            attributes: item_attributes(id, spec),
            ..Default::default()
        })
        .collect();
    ExportLogsServiceRequest {
        resource_logs: vec![ResourceLogs {
            resource: resource(),
            scope_logs: vec![ScopeLogs {
                scope: scope(),
                log_records,
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    }
}
