//! Resource entries as upstream received them: each entry's resource
//! attributes and the ids of its items, to check what the agent stamped.

use std::collections::BTreeMap;

use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;

use super::ids::HasIds;

/// One resource entry (ResourceSpans / ResourceMetrics / ResourceLogs).
#[derive(Clone, Debug, PartialEq)]
pub struct SeenEntry {
    /// The resource's attributes in order, values as text; duplicates kept.
    pub attributes: Vec<(String, String)>,
    /// Ids of the entry's items.
    pub ids: Vec<u64>,
}

impl SeenEntry {
    /// The value of `key`, if it appears exactly once; panics naming the
    /// entry if it appears more than once.
    #[track_caller]
    pub fn get(&self, key: &str) -> Option<&str> {
        let mut found = self.attributes.iter().filter(|(k, _)| k == key);
        let first = found.next().map(|(_, v)| v.as_str());
        assert!(found.next().is_none(), "{key} appears twice in {self:?}");
        first
    }

    /// Keys that appear more than once.
    pub fn duplicate_keys(&self) -> Vec<String> {
        let mut counts = BTreeMap::<&str, usize>::new();
        for (k, _) in &self.attributes {
            *counts.entry(k).or_default() += 1;
        }
        counts
            .into_iter()
            .filter(|(_, n)| *n > 1)
            .map(|(k, _)| k.to_owned())
            .collect()
    }
}

fn value_text(kv: &KeyValue) -> String {
    match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        other => format!("{other:?}"),
    }
}

fn attributes(resource: &Option<Resource>) -> Vec<(String, String)> {
    resource
        .iter()
        .flat_map(|r| &r.attributes)
        .map(|kv| (kv.key.clone(), value_text(kv)))
        .collect()
}

/// Requests made of resource entries.
pub trait HasEntries {
    /// The entries, each moved into a request of its own to read its ids.
    fn into_entries(self) -> Vec<SeenEntry>;
}

/// All ids of `entries`, in order.
pub fn ids_of(entries: &[SeenEntry]) -> Vec<u64> {
    entries.iter().flat_map(|e| e.ids.iter().copied()).collect()
}

impl HasEntries for ExportTraceServiceRequest {
    fn into_entries(self) -> Vec<SeenEntry> {
        self.resource_spans
            .into_iter()
            .map(|e| SeenEntry {
                attributes: attributes(&e.resource),
                ids: ExportTraceServiceRequest {
                    resource_spans: vec![e],
                }
                .ids(),
            })
            .collect()
    }
}

impl HasEntries for ExportMetricsServiceRequest {
    fn into_entries(self) -> Vec<SeenEntry> {
        self.resource_metrics
            .into_iter()
            .map(|e| SeenEntry {
                attributes: attributes(&e.resource),
                ids: ExportMetricsServiceRequest {
                    resource_metrics: vec![e],
                }
                .ids(),
            })
            .collect()
    }
}

impl HasEntries for ExportLogsServiceRequest {
    fn into_entries(self) -> Vec<SeenEntry> {
        self.resource_logs
            .into_iter()
            .map(|e| SeenEntry {
                attributes: attributes(&e.resource),
                ids: ExportLogsServiceRequest {
                    resource_logs: vec![e],
                }
                .ids(),
            })
            .collect()
    }
}
