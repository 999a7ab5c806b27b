//! The agent's state as one admin-API `Status` snapshot (proto/telespool/admin/v1).
//!
//! A snapshot is read, never kept: counters from [`Metrics`], the memory
//! budget from the pipeline, the spool's cached stats (no SQLite round trip),
//! upstream health from the exporter, and the fixed parts (version, limits,
//! listeners) captured once at start in [`StatusSource`]. Reading one takes a
//! few mutexes for microseconds and allocates a few kilobytes, so watchers
//! cannot slow the data path; [`crate::admin::grpc`] caps how often they read.
//!
//! No payload data is ever in a snapshot: counts, sizes, addresses, states and
//! the last upstream error message only.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use tokio::time::Instant;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::api as proto;
use crate::batch::unix_ms;
use crate::config::{Config, Durability, UpstreamProtocol, WhenFull};
use crate::metrics::latency::{quantile_ms, BOUNDS_MS};
use crate::metrics::{DropReason, Metrics, Refusal};
use crate::pipeline::Pipeline;
use crate::reloadable::Reloadable;
use crate::resource::Stamping;
use crate::signal::Signal;
use crate::spool::FullReason;

pub use proto::Phase;

pub mod text;

/// What a snapshot is built from; one per agent, in [`crate::admin::AdminState`].
pub struct StatusSource {
    /// When the agent started serving: uptime is measured from here.
    started: Instant,
    /// A [`Phase`] as its proto number; written by the shutdown sequence.
    phase: AtomicI32,
    /// Every address the agent serves on, as bound at start.
    listeners: Vec<proto::Listener>,
    /// The parts of the config a snapshot reports.
    fixed: Fixed,
    metrics: Arc<Metrics>,
    pipeline: Arc<Pipeline>,
    /// The resource attributes stamped on arrival (reloaded on SIGHUP).
    resource: Option<Reloadable<Stamping>>,
}

/// Configured values that do not change while the agent runs.
struct Fixed {
    endpoint: Option<String>,
    protocol: String,
    concurrency: u32,
    working_max_request_bytes: u64,
    buffer_max_bytes: u64,
    spool_path: String,
    spool_max_bytes: u64,
    when_full: &'static str,
    durability: &'static str,
}

impl StatusSource {
    pub fn new(
        config: &Config,
        listeners: Vec<proto::Listener>,
        metrics: Arc<Metrics>,
        pipeline: Arc<Pipeline>,
    ) -> StatusSource {
        let fixed = Fixed {
            endpoint: config.upstream.endpoint.clone(),
            protocol: match config.upstream.protocol {
                UpstreamProtocol::Grpc => "grpc",
                UpstreamProtocol::HttpProtobuf => "http/protobuf",
            }
            .to_owned(),
            concurrency: u32::try_from(config.upstream.concurrency).unwrap_or(u32::MAX),
            working_max_request_bytes: config.upstream.max_request_bytes.0,
            buffer_max_bytes: config.buffer.max_bytes.0,
            spool_path: config.spool.resolved_path().display().to_string(),
            spool_max_bytes: config.spool.max_bytes.0,
            when_full: match config.spool.when_full {
                WhenFull::Backpressure => "backpressure",
                WhenFull::DropOldest => "drop_oldest",
            },
            durability: match config.durability {
                Durability::Memory => "memory",
                Durability::Spool => "spool",
            },
        };
        StatusSource {
            started: Instant::now(),
            phase: AtomicI32::new(Phase::Serving as i32),
            listeners,
            fixed,
            metrics,
            pipeline,
            resource: None,
        }
    }

    /// Report the attributes `stamping` holds (`[resource]` configured).
    pub fn with_resource(mut self, stamping: Option<Reloadable<Stamping>>) -> StatusSource {
        self.resource = stamping;
        self
    }

    pub fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as i32, Ordering::Release);
    }

    pub fn phase(&self) -> Phase {
        Phase::try_from(self.phase.load(Ordering::Acquire)).unwrap_or(Phase::Unspecified)
    }

    /// The state now. `ready` is the /readyz flag; `now` the wall clock.
    pub fn snapshot(&self, ready: bool, now: SystemTime) -> proto::Status {
        let now_ms = unix_ms(now);
        let m = &self.metrics;
        let budget = self.pipeline.budget();
        let spool = self.pipeline.spool().stats_cached();
        let upstream = self.fixed.endpoint.as_ref().map(|endpoint| {
            let health = self
                .pipeline
                .upstream()
                .map(|u| u.health().snapshot())
                .unwrap_or_default();
            proto::Upstream {
                endpoint: endpoint.clone(),
                protocol: self.fixed.protocol.clone(),
                up: health.up,
                failing_since_unix_ms: health.failing_since.map(unix_ms).unwrap_or(0),
                last_error: health.last_error.unwrap_or_default(),
                consecutive_failures: health.consecutive_failures,
                // Lowered by the exporter when upstream refuses a size.
                working_max_request_bytes: self
                    .pipeline
                    .upstream()
                    .map_or(self.fixed.working_max_request_bytes, |u| u.working_limit()),
                concurrency: self.fixed.concurrency,
            }
        });
        let counts = m.export_latency_buckets.counts();
        proto::Status {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            taken_unix_ms: now_ms,
            uptime_ms: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            ready,
            phase: self.phase.load(Ordering::Acquire),
            listeners: self.listeners.clone(),
            upstream,
            buffer: Some(proto::Buffer {
                bytes: budget.used(),
                max_bytes: self.fixed.buffer_max_bytes,
                items: budget.items(),
                // There is no item limit (buffer.max_bytes bounds memory).
                max_items: 0,
                queued_batches: self.pipeline.queued_batches() as u64,
            }),
            spool: Some(proto::Spool {
                path: self.fixed.spool_path.clone(),
                rows: spool.rows,
                bytes: spool.bytes,
                max_bytes: self.fixed.spool_max_bytes,
                oldest_age_ms: spool
                    .oldest_created_ms
                    .map(|ms| u64::try_from(now_ms - ms).unwrap_or(0))
                    .unwrap_or(0),
                disk_full: spool.full == Some(FullReason::Disk),
                when_full: self.fixed.when_full.to_owned(),
                max_bytes_reached: spool.full == Some(FullReason::MaxBytes),
                delete_pending_rows: spool.delete_pending_rows,
            }),
            signals: Signal::ALL
                .iter()
                .map(|s| signal_totals(m, *s, budget.items_of(*s), spool.items[s.index()]))
                .collect(),
            export_latency: Some(proto::Latency {
                count: counts.iter().sum(),
                p50_ms: quantile_ms(&counts, 0.5),
                p90_ms: quantile_ms(&counts, 0.9),
                p99_ms: quantile_ms(&counts, 0.99),
                bucket_bounds_ms: BOUNDS_MS.to_vec(),
                bucket_counts: counts,
            }),
            resource_attributes: self.resource.as_ref().map_or_else(Vec::new, |r| {
                let stamping = r.get();
                let mut attributes: Vec<proto::Attribute> = stamping
                    .attributes
                    .iter()
                    .map(|(key, value)| proto::Attribute {
                        key: key.clone(),
                        value: value.clone(),
                    })
                    .collect();
                attributes.sort_by(|a, b| a.key.cmp(&b.key));
                attributes
            }),
            resource_on_conflict: self
                .resource
                .as_ref()
                .map(|r| r.get().on_conflict_str().to_owned())
                .unwrap_or_default(),
            durability: self.fixed.durability.to_owned(),
        }
    }
}

/// A counter family labelled by signal, and by signal and one more label.
type PerSignal = Family<[(&'static str, &'static str); 1], Counter>;
type PerSignalAnd = Family<[(&'static str, &'static str); 2], Counter>;

/// One signal's counters, read without creating label sets (so /metrics
/// does not grow zero series because someone asked for a status).
fn signal_totals(m: &Metrics, s: Signal, buffered: u64, spooled_now: u64) -> proto::SignalTotals {
    let name = s.as_str();
    let read = |family: &PerSignalAnd, key: &'static str, value: &'static str| {
        family
            .get(&[("signal", name), (key, value)])
            .map_or(0, |c| c.get())
    };
    let one = |family: &PerSignal| family.get(&[("signal", name)]).map_or(0, |c| c.get());
    proto::SignalTotals {
        signal: name.to_owned(),
        accepted_items_total: read(&m.received_items, "outcome", "accepted"),
        refused_requests_total: Refusal::ALL
            .iter()
            .map(|r| proto::Count {
                reason: r.as_str().to_owned(),
                value: read(&m.received_requests, "outcome", r.as_str()),
            })
            .collect(),
        forwarded_items_total: one(&m.forwarded_items),
        spooled_items_total: one(&m.spooled_items),
        replayed_items_total: one(&m.replayed_items),
        dropped_items_total: DropReason::ALL
            .iter()
            .map(|r| proto::Count {
                reason: r.as_str().to_owned(),
                value: read(&m.dropped_items, "reason", r.as_str()),
            })
            .collect(),
        buffered_items: buffered,
        spooled_items: spooled_now,
        spooled_at_start_items: m
            .spooled_at_start
            .get(&[("signal", name)])
            .map_or(0, |g| u64::try_from(g.get()).unwrap_or(0)),
    }
}

pub use crate::api::phase_name;
