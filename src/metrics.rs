//! Counters and gauges: the agent's accounting, exposed on `/metrics` and in the
//! shutdown summary.
//!
//! Longer than 500 lines on purpose: every metric's name, help text and
//! labels are in one table here, which is what operators and the alert rules
//! (`packaging/monitoring`) are checked against.
//!
//! Accounting invariant, per signal, at any quiet moment:
//!
//! ```text
//! accepted + spooled_at_start = forwarded + dropped + buffered + spooled_now
//! ```
//!
//! `forwarded` counts items upstream acknowledged, whether they came from memory
//! or the spool; `spooled_total` and `replayed_total` describe traffic through
//! the spool and are informational.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::signal::Signal;

pub mod latency;

type SignalLabel = [(&'static str, &'static str); 1];
type SignalAnd = [(&'static str, &'static str); 2];
/// receiver (grpc, http), transport (tcp, unix), address (ip:port or path).
type ListenerLabels = [(&'static str, String); 3];

/// Why a request was not accepted (a label value of `received_*_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The buffer had no room within `buffer.max_wait`.
    BufferFull,
    /// The spool had no room (durable mode or spill).
    SpoolFull,
    /// The agent is shutting down.
    ShuttingDown,
    /// The payload is not a valid OTLP request.
    Invalid,
    /// The payload is over `receiver.max_request_bytes`.
    TooLarge,
    /// The body did not arrive within `receiver.body_timeout`.
    Timeout,
    /// No bearer token, or not a configured one (`receiver.auth.token_file`).
    Unauthenticated,
}

impl Refusal {
    pub const ALL: [Refusal; 7] = [
        Refusal::BufferFull,
        Refusal::SpoolFull,
        Refusal::ShuttingDown,
        Refusal::Invalid,
        Refusal::TooLarge,
        Refusal::Timeout,
        Refusal::Unauthenticated,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::BufferFull => "refused_buffer_full",
            Refusal::SpoolFull => "refused_spool_full",
            Refusal::ShuttingDown => "refused_shutting_down",
            Refusal::Invalid => "invalid",
            Refusal::TooLarge => "too_large",
            Refusal::Timeout => "timeout",
            Refusal::Unauthenticated => "unauthenticated",
        }
    }
}

/// Why accepted items were dropped (label `reason` of `dropped_items_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Upstream answered with a non-retryable status.
    Rejected,
    /// The spool was full at shutdown (or the disk was).
    SpoolFull,
    /// `spool.when_full = "drop_oldest"` evicted spooled batches.
    SpoolEvicted,
    /// The shutdown hard deadline passed before the data could be spooled.
    ShutdownTimeout,
    /// Writing to the spool failed for another reason.
    SpoolError,
    /// A spooled batch was older than `spool.max_age`.
    SpoolExpired,
    /// One resource entry larger than upstream accepts, even alone.
    UpstreamTooLarge,
    /// A damaged spool file: rows that could not be salvaged at start.
    SpoolCorrupt,
}

impl DropReason {
    pub const ALL: [DropReason; 8] = [
        DropReason::Rejected,
        DropReason::SpoolFull,
        DropReason::SpoolEvicted,
        DropReason::ShutdownTimeout,
        DropReason::SpoolError,
        DropReason::SpoolExpired,
        DropReason::UpstreamTooLarge,
        DropReason::SpoolCorrupt,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Rejected => "upstream_rejected",
            DropReason::SpoolFull => "spool_full",
            DropReason::SpoolEvicted => "spool_evicted",
            DropReason::ShutdownTimeout => "shutdown_timeout",
            DropReason::SpoolError => "spool_error",
            DropReason::SpoolExpired => "spool_expired",
            DropReason::UpstreamTooLarge => "upstream_too_large",
            DropReason::SpoolCorrupt => "spool_corrupt",
        }
    }
}

/// Every metric the agent keeps. One instance per agent, shared by `Arc`.
#[derive(Debug)]
pub struct Metrics {
    pub received_items: Family<SignalAnd, Counter>,
    pub received_requests: Family<SignalAnd, Counter>,
    pub received_bytes: Family<SignalAnd, Counter>,
    pub forwarded_items: Family<SignalLabel, Counter>,
    pub exported_batches: Family<SignalAnd, Counter>,
    pub export_latency: Family<SignalLabel, Histogram>,
    /// The same calls, all signals, in buckets the admin API can read.
    pub export_latency_buckets: latency::LatencyBuckets,
    pub partial_rejected_items: Family<SignalLabel, Counter>,
    pub spooled_items: Family<SignalLabel, Counter>,
    pub replayed_items: Family<SignalLabel, Counter>,
    pub dropped_items: Family<SignalAnd, Counter>,
    pub spooled_at_start: Family<SignalLabel, Gauge>,
    pub buffered_bytes: Gauge,
    pub buffered_items: Family<SignalLabel, Gauge>,
    pub spool_rows: Gauge,
    pub spool_bytes: Gauge,
    pub spool_items: Family<SignalLabel, Gauge>,
    pub spool_oldest_age_seconds: Gauge,
    /// 1 while the disk holding the spool is full (the spool then takes rows
    /// only into its own free pages).
    pub spool_disk_full: Gauge,
    /// 1 while the spool refuses rows because its file is at `spool.max_bytes`.
    pub spool_max_bytes_reached: Gauge,
    /// Exported rows whose delete has not committed yet (full disk).
    pub spool_delete_pending_rows: Gauge,
    /// Rows of a damaged spool file that could not be read at start (their
    /// items are not known; rows whose items are known count as
    /// `dropped_items{reason="spool_corrupt"}`).
    pub spool_lost_rows: Counter,
    pub upstream_up: Gauge,
    /// Unix time (seconds) of the first failure of the current failing
    /// stretch; 0 while upstream is up.
    pub upstream_failing_since: Gauge,
    /// The exporter's working request-size limit (uncompressed bytes):
    /// `upstream.max_request_bytes`, lowered when upstream refused less.
    pub upstream_max_request_bytes: Gauge,
    /// TLS handshakes on the OTLP listeners that failed, by listener (grpc,
    /// http) and reason (timeout, client_certificate, error).
    pub tls_handshake_failures: Family<SignalAnd, Counter>,
    /// Items whose export was in flight when shutdown cut it: they are spooled
    /// and may reach upstream twice.
    pub duplicates_risked: AtomicU64,
    /// 1 for every address the receivers serve on.
    pub listener_info: Family<ListenerLabels, Gauge>,
    /// 1 for every resource attribute stamped on arrival (`telespool status`
    /// lists them); labels key, value, on_conflict.
    pub resource_attribute_info: Family<[(&'static str, String); 3], Gauge>,
    /// `buffer.max_bytes` and `spool.max_bytes`, so dashboards and alerts
    /// can show fill ratios; set by [`Metrics::started`].
    pub buffer_max_bytes: Gauge,
    pub spool_max_bytes: Gauge,
    /// Unix time the agent started (alerts on a restart with a backlog).
    pub start_time_seconds: Gauge,
    /// The async runtime's worker threads (`runtime.worker_threads`, or one
    /// per CPU the process may use).
    pub runtime_workers: Gauge,
}

fn sig(signal: Signal) -> SignalLabel {
    [("signal", signal.as_str())]
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics {
            received_items: Family::default(),
            received_requests: Family::default(),
            received_bytes: Family::default(),
            forwarded_items: Family::default(),
            exported_batches: Family::default(),
            export_latency: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 2.0, 16))
            }),
            export_latency_buckets: latency::LatencyBuckets::default(),
            partial_rejected_items: Family::default(),
            spooled_items: Family::default(),
            replayed_items: Family::default(),
            dropped_items: Family::default(),
            spooled_at_start: Family::default(),
            buffered_bytes: Gauge::default(),
            buffered_items: Family::default(),
            spool_rows: Gauge::default(),
            spool_bytes: Gauge::default(),
            spool_items: Family::default(),
            spool_oldest_age_seconds: Gauge::default(),
            spool_disk_full: Gauge::default(),
            spool_max_bytes_reached: Gauge::default(),
            spool_delete_pending_rows: Gauge::default(),
            spool_lost_rows: Counter::default(),
            upstream_up: Gauge::default(),
            upstream_failing_since: Gauge::default(),
            upstream_max_request_bytes: Gauge::default(),
            tls_handshake_failures: Family::default(),
            duplicates_risked: AtomicU64::new(0),
            listener_info: Family::default(),
            resource_attribute_info: Family::default(),
            buffer_max_bytes: Gauge::default(),
            spool_max_bytes: Gauge::default(),
            start_time_seconds: Gauge::default(),
            runtime_workers: Gauge::default(),
        }
    }

    /// At start: the limits and the start time, and every per-signal series
    /// an alert or the shipped dashboard reads created at 0, so that
    /// `increase()` and `rate()` see the first drop or refusal rather than
    /// a series that appears already at its first value.
    pub fn started(&self, buffer_max_bytes: u64, spool_max_bytes: u64, now_unix_s: i64) {
        let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.buffer_max_bytes.set(gauge(buffer_max_bytes));
        self.spool_max_bytes.set(gauge(spool_max_bytes));
        self.start_time_seconds.set(now_unix_s);
        for signal in Signal::ALL {
            let s = signal.as_str();
            for outcome in [
                "accepted",
                Refusal::BufferFull.as_str(),
                Refusal::SpoolFull.as_str(),
                Refusal::ShuttingDown.as_str(),
            ] {
                drop(
                    self.received_requests
                        .get_or_create(&[("signal", s), ("outcome", outcome)]),
                );
                drop(
                    self.received_items
                        .get_or_create(&[("signal", s), ("outcome", outcome)]),
                );
            }
            for reason in DropReason::ALL {
                drop(
                    self.dropped_items
                        .get_or_create(&[("signal", s), ("reason", reason.as_str())]),
                );
            }
            for family in [
                &self.forwarded_items,
                &self.spooled_items,
                &self.replayed_items,
            ] {
                drop(family.get_or_create(&sig(signal)));
            }
            drop(self.buffered_items.get_or_create(&sig(signal)));
            drop(self.spool_items.get_or_create(&sig(signal)));
            drop(self.export_latency.get_or_create(&sig(signal)));
        }
    }

    /// A registry exposing every metric under the `telespool_` prefix.
    pub fn registry(self: &std::sync::Arc<Self>) -> Registry {
        let mut r = Registry::with_prefix("telespool");
        let m = self.as_ref();
        r.register(
            "received_items",
            "Items received, by signal and outcome",
            m.received_items.clone(),
        );
        r.register(
            "received_requests",
            "Export requests received, by signal and outcome",
            m.received_requests.clone(),
        );
        r.register(
            "received_bytes",
            "Request bytes received, by signal and outcome",
            m.received_bytes.clone(),
        );
        r.register(
            "forwarded_items",
            "Items acknowledged by upstream",
            m.forwarded_items.clone(),
        );
        r.register(
            "exported_batches",
            "Export attempts by signal and result (ok, retryable, rejected)",
            m.exported_batches.clone(),
        );
        r.register(
            "export_latency_seconds",
            "Latency of upstream export calls",
            m.export_latency.clone(),
        );
        r.register(
            "partial_rejected_items",
            "Items upstream rejected in partial-success replies",
            m.partial_rejected_items.clone(),
        );
        r.register(
            "spooled_items",
            "Items written to the spool",
            m.spooled_items.clone(),
        );
        r.register(
            "replayed_items",
            "Items from the spool acknowledged by upstream",
            m.replayed_items.clone(),
        );
        r.register(
            "dropped_items",
            "Accepted items dropped, by signal and reason",
            m.dropped_items.clone(),
        );
        r.register(
            "spooled_at_start_items",
            "Items found in the spool at start",
            m.spooled_at_start.clone(),
        );
        r.register(
            "buffered_bytes",
            "Request bytes held in memory",
            m.buffered_bytes.clone(),
        );
        r.register(
            "buffered_items",
            "Items held in memory, by signal",
            m.buffered_items.clone(),
        );
        r.register("spool_rows", "Batches in the spool", m.spool_rows.clone());
        r.register(
            "spool_bytes",
            "Payload bytes in the spool",
            m.spool_bytes.clone(),
        );
        r.register(
            "spool_held_items",
            "Items in the spool, by signal",
            m.spool_items.clone(),
        );
        r.register(
            "spool_oldest_age_seconds",
            "Age of the oldest spooled batch",
            m.spool_oldest_age_seconds.clone(),
        );
        r.register(
            "spool_disk_full",
            "1 while the disk holding the spool is full",
            m.spool_disk_full.clone(),
        );
        r.register(
            "spool_max_bytes_reached",
            "1 while the spool file is at spool.max_bytes and refuses rows",
            m.spool_max_bytes_reached.clone(),
        );
        r.register(
            "spool_delete_pending_rows",
            "Exported spool rows whose delete has not committed yet (full disk)",
            m.spool_delete_pending_rows.clone(),
        );
        r.register(
            "spool_lost_rows",
            "Rows of a damaged spool file that could not be read at start",
            m.spool_lost_rows.clone(),
        );
        r.register(
            "upstream_up",
            "1 while the last upstream export succeeded",
            m.upstream_up.clone(),
        );
        r.register(
            "upstream_failing_since_seconds",
            "Unix time upstream started failing; 0 while it is up",
            m.upstream_failing_since.clone(),
        );
        r.register(
            "upstream_max_request_bytes",
            "Largest request sent upstream now, uncompressed; lowered when upstream refuses as too large",
            m.upstream_max_request_bytes.clone(),
        );
        r.register(
            "listener_info",
            "1 for each address a receiver serves on, by receiver, transport and address",
            m.listener_info.clone(),
        );
        r.register(
            "resource_attribute_info",
            "1 for each resource attribute stamped on arrival, by key, value and on_conflict",
            m.resource_attribute_info.clone(),
        );
        r.register(
            "buffer_max_bytes",
            "buffer.max_bytes: the bound of buffered_bytes",
            m.buffer_max_bytes.clone(),
        );
        r.register(
            "spool_max_bytes",
            "spool.max_bytes: the bound of the spool file (spool_bytes counts payload only)",
            m.spool_max_bytes.clone(),
        );
        r.register(
            "start_time_seconds",
            "Unix time the agent started",
            m.start_time_seconds.clone(),
        );
        r.register(
            "runtime_workers",
            "Async worker threads the agent runs on (runtime.worker_threads; 0 there means one per CPU)",
            m.runtime_workers.clone(),
        );
        r.register(
            "tls_handshake_failures",
            "Failed TLS handshakes on the OTLP listeners, by listener and reason",
            m.tls_handshake_failures.clone(),
        );
        r
    }

    /// Records that `receiver` serves on `address` over `transport` (tcp, unix).
    pub fn listening(&self, receiver: &'static str, transport: &'static str, address: &str) {
        let labels = [
            ("receiver", receiver.to_owned()),
            ("transport", transport.to_owned()),
            ("address", address.to_owned()),
        ];
        self.listener_info.get_or_create(&labels).set(1);
    }

    /// Records the resource attributes now stamped, replacing the previous set.
    pub fn resource_in_effect(&self, attributes: &[(String, String)], on_conflict: &'static str) {
        self.resource_attribute_info.clear();
        for (key, value) in attributes {
            let labels = [
                ("key", key.clone()),
                ("value", value.clone()),
                ("on_conflict", on_conflict.to_owned()),
            ];
            self.resource_attribute_info.get_or_create(&labels).set(1);
        }
    }

    pub fn received(&self, signal: Signal, outcome: &'static str, items: u64, bytes: u64) {
        let labels = [("signal", signal.as_str()), ("outcome", outcome)];
        self.received_requests.get_or_create(&labels).inc();
        self.received_items.get_or_create(&labels).inc_by(items);
        self.received_bytes.get_or_create(&labels).inc_by(bytes);
    }

    pub fn accepted(&self, signal: Signal, items: u64, bytes: u64) {
        self.received(signal, "accepted", items, bytes);
    }

    pub fn refused(&self, signal: Signal, why: Refusal, items: u64, bytes: u64) {
        self.received(signal, why.as_str(), items, bytes);
    }

    pub fn export_result(&self, signal: Signal, result: &'static str, latency: Duration) {
        let labels = [("signal", signal.as_str()), ("result", result)];
        self.exported_batches.get_or_create(&labels).inc();
        self.export_latency
            .get_or_create(&sig(signal))
            .observe(latency.as_secs_f64());
        self.export_latency_buckets.observe(latency);
    }

    pub fn forwarded(&self, signal: Signal, items: u64, from_spool: bool) {
        self.forwarded_items
            .get_or_create(&sig(signal))
            .inc_by(items);
        if from_spool {
            self.replayed_items
                .get_or_create(&sig(signal))
                .inc_by(items);
        }
    }

    pub fn spooled(&self, signal: Signal, items: u64) {
        self.spooled_items.get_or_create(&sig(signal)).inc_by(items);
    }

    pub fn dropped(&self, signal: Signal, reason: DropReason, items: u64) {
        let labels = [("signal", signal.as_str()), ("reason", reason.as_str())];
        self.dropped_items.get_or_create(&labels).inc_by(items);
    }

    pub fn partial_rejected(&self, signal: Signal, items: u64) {
        self.partial_rejected_items
            .get_or_create(&sig(signal))
            .inc_by(items);
    }

    // Totals for the shutdown summary.

    pub fn accepted_total(&self, signal: Signal) -> u64 {
        self.received_items
            .get_or_create(&[("signal", signal.as_str()), ("outcome", "accepted")])
            .get()
    }

    pub fn forwarded_total(&self, signal: Signal) -> u64 {
        self.forwarded_items.get_or_create(&sig(signal)).get()
    }

    pub fn spooled_total(&self, signal: Signal) -> u64 {
        self.spooled_items.get_or_create(&sig(signal)).get()
    }

    pub fn replayed_total(&self, signal: Signal) -> u64 {
        self.replayed_items.get_or_create(&sig(signal)).get()
    }

    pub fn dropped_total(&self, signal: Signal) -> u64 {
        DropReason::ALL
            .iter()
            .map(|r| {
                self.dropped_items
                    .get_or_create(&[("signal", signal.as_str()), ("reason", r.as_str())])
                    .get()
            })
            .sum()
    }

    /// Requests refused (a refused request's items are often not known).
    pub fn refused_total(&self, signal: Signal) -> u64 {
        [
            Refusal::BufferFull,
            Refusal::SpoolFull,
            Refusal::ShuttingDown,
            Refusal::Invalid,
            Refusal::TooLarge,
        ]
        .iter()
        .map(|r| {
            self.received_requests
                .get_or_create(&[("signal", signal.as_str()), ("outcome", r.as_str())])
                .get()
        })
        .sum()
    }

    pub fn set_spooled_at_start(&self, signal: Signal, items: u64) {
        self.spooled_at_start
            .get_or_create(&sig(signal))
            .set(i64::try_from(items).unwrap_or(i64::MAX));
    }

    pub fn add_duplicates_risked(&self, items: u64) {
        self.duplicates_risked.fetch_add(items, Ordering::Relaxed);
    }

    pub fn duplicates_risked(&self) -> u64 {
        self.duplicates_risked.load(Ordering::Relaxed)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
