//! What `telespool top` shows, as a pure function of two snapshots.
//!
//! [`View::new`] turns the previous and the current admin-API snapshot into
//! rates (items/s over the time between them, measured on the agent's uptime
//! clock), fill fractions and a spool drain estimate; [`draw`] lays a view out
//! on any ratatui backend. Nothing here touches a terminal or a socket, so the
//! screen is tested on ratatui's `TestBackend` with fixed snapshots.

use std::time::Duration;

use crate::api::{Count, SignalTotals, Status};
use crate::metrics::latency::quantile_ms;
use crate::status::text::{bytes, duration, percent};

/// Whether the view is live.
#[derive(Debug, Clone, PartialEq)]
pub enum Connection {
    /// Snapshots are arriving.
    Live,
    /// No snapshot yet: connecting to the agent.
    Connecting,
    /// The stream ended or failed; `top` retries. Holds why.
    Lost(String),
}

/// One signal's line.
#[derive(Debug, Clone, PartialEq)]
pub struct SignalRow {
    pub signal: String,
    /// Items/s accepted and forwarded; None without a previous snapshot.
    pub in_rate: Option<f64>,
    pub out_rate: Option<f64>,
    pub accepted: u64,
    pub forwarded: u64,
    pub spooled: u64,
    pub replayed: u64,
    pub refused: u64,
    pub dropped: u64,
}

/// A non-zero refusal (requests) or drop (items) reason.
#[derive(Debug, Clone, PartialEq)]
pub struct ReasonRow {
    pub signal: String,
    pub reason: String,
    pub total: u64,
    /// Per second over the last interval; None without a previous snapshot.
    pub rate: Option<f64>,
}

/// Everything on the screen, computed.
#[derive(Debug, Clone, PartialEq)]
pub struct View {
    pub title: String,
    pub connection: Connection,
    pub upstream: String,
    /// The last export error, while upstream is failing.
    pub upstream_error: Option<String>,
    pub upstream_up: Option<bool>,
    /// "p50 ≤4 ms  p90 ≤8 ms  p99 ≤16 ms", over the last interval if there
    /// were calls in it, else since start.
    pub latency: String,
    pub buffer_fill: f64,
    pub buffer_text: String,
    pub spool_fill: f64,
    pub spool_text: String,
    pub drain: String,
    pub signals: Vec<SignalRow>,
    pub refusals: Vec<ReasonRow>,
    pub drops: Vec<ReasonRow>,
    pub interval: Duration,
}

impl View {
    /// The view of `cur`, with rates against `prev` when there is one.
    pub fn new(
        addr: &str,
        prev: Option<&Status>,
        cur: &Status,
        connection: Connection,
        interval: Duration,
    ) -> View {
        let secs = prev
            .map(|p| cur.uptime_ms.saturating_sub(p.uptime_ms) as f64 / 1000.0)
            .filter(|s| *s > 0.0);
        let rate = |now: u64, before: Option<u64>| -> Option<f64> {
            Some(now.saturating_sub(before?) as f64 / secs?)
        };
        let prev_signal = |name: &str| -> Option<&SignalTotals> {
            prev?.signals.iter().find(|t| t.signal == name)
        };
        let signals = cur
            .signals
            .iter()
            .map(|t| {
                let p = prev_signal(&t.signal);
                SignalRow {
                    signal: t.signal.clone(),
                    in_rate: rate(t.accepted_items_total, p.map(|p| p.accepted_items_total)),
                    out_rate: rate(t.forwarded_items_total, p.map(|p| p.forwarded_items_total)),
                    accepted: t.accepted_items_total,
                    forwarded: t.forwarded_items_total,
                    spooled: t.spooled_items_total,
                    replayed: t.replayed_items_total,
                    refused: sum(&t.refused_requests_total),
                    dropped: sum(&t.dropped_items_total),
                }
            })
            .collect();
        let reasons = |pick: fn(&SignalTotals) -> &[Count]| -> Vec<ReasonRow> {
            let mut rows = Vec::new();
            for t in &cur.signals {
                for c in pick(t).iter().filter(|c| c.value > 0) {
                    let before = prev_signal(&t.signal).map(|p| {
                        pick(p)
                            .iter()
                            .find(|b| b.reason == c.reason)
                            .map_or(0, |b| b.value)
                    });
                    rows.push(ReasonRow {
                        signal: t.signal.clone(),
                        reason: c.reason.clone(),
                        total: c.value,
                        rate: rate(c.value, before),
                    });
                }
            }
            rows
        };
        let (buffer_fill, buffer_text) = match &cur.buffer {
            Some(b) => (
                fraction(b.bytes, b.max_bytes),
                format!(
                    "{:>6}  {} of {}, {} items, {} batches queued",
                    percent(b.bytes, b.max_bytes),
                    bytes(b.bytes),
                    bytes(b.max_bytes),
                    b.items,
                    b.queued_batches
                ),
            ),
            None => (0.0, "unknown".to_owned()),
        };
        let (spool_fill, spool_text) = match &cur.spool {
            Some(s) => (
                fraction(s.bytes, s.max_bytes),
                format!(
                    "{:>6}  {} of {}, {} rows, oldest {} old{}",
                    percent(s.bytes, s.max_bytes),
                    bytes(s.bytes),
                    bytes(s.max_bytes),
                    s.rows,
                    duration(Duration::from_millis(s.oldest_age_ms)),
                    if s.disk_full { ", DISK FULL" } else { "" }
                ),
            ),
            None => (0.0, "unknown".to_owned()),
        };
        let held: u64 = cur.signals.iter().map(|t| t.spooled_items).sum();
        let replayed_now: u64 = cur.signals.iter().map(|t| t.replayed_items_total).sum();
        let replayed_before = prev.map(|p| p.signals.iter().map(|t| t.replayed_items_total).sum());
        let drain = drain_estimate(held, rate(replayed_now, replayed_before));
        let (upstream, upstream_error) = crate::status::text::upstream_parts(cur);
        View {
            title: format!(
                " telespool {} at {addr} · {} · up {} ",
                cur.version,
                match cur.ready {
                    true => "ready".to_owned(),
                    false => format!("NOT READY ({})", crate::status::phase_name(cur.phase)),
                },
                duration(Duration::from_millis(cur.uptime_ms))
            ),
            connection,
            upstream,
            upstream_error,
            upstream_up: cur.upstream.as_ref().map(|u| u.up),
            latency: latency(prev, cur),
            buffer_fill,
            buffer_text,
            spool_fill,
            spool_text,
            drain,
            signals,
            refusals: reasons(|t| &t.refused_requests_total),
            drops: reasons(|t| &t.dropped_items_total),
            interval,
        }
    }
}

fn sum(counts: &[Count]) -> u64 {
    counts.iter().map(|c| c.value).sum()
}

fn fraction(part: u64, whole: u64) -> f64 {
    match whole {
        0 => 0.0,
        w => (part as f64 / w as f64).clamp(0.0, 1.0),
    }
}

/// Time to empty the spool at the current replay rate (items/s).
pub fn drain_estimate(held_items: u64, replay_rate: Option<f64>) -> String {
    match (held_items, replay_rate) {
        (0, _) => "spool empty".to_owned(),
        (_, None) => "measuring replay rate".to_owned(),
        (n, Some(r)) if r > 0.0 => format!(
            "empties in ~{} at {} items/s",
            duration(Duration::from_secs_f64((n as f64 / r).min(1e9))),
            rate_text(r)
        ),
        (n, Some(_)) => format!("{n} items held, not draining (upstream down or busy)"),
    }
}

/// Latency quantiles over the last interval's calls, else since start.
fn latency(prev: Option<&Status>, cur: &Status) -> String {
    let Some(l) = &cur.export_latency else {
        return "no exports yet".to_owned();
    };
    let before = prev
        .and_then(|p| p.export_latency.as_ref())
        .map(|p| p.bucket_counts.clone())
        .filter(|b| b.len() == l.bucket_counts.len());
    let window: Option<Vec<u64>> = before.map(|b| {
        l.bucket_counts
            .iter()
            .zip(b)
            .map(|(now, then)| now.saturating_sub(then))
            .collect()
    });
    let (counts, when) = match window {
        Some(w) if w.iter().sum::<u64>() > 0 => (w, "last interval"),
        _ => (l.bucket_counts.clone(), "since start"),
    };
    let calls: u64 = counts.iter().sum();
    if calls == 0 {
        return "no exports yet".to_owned();
    }
    let q = |q| quantile_ms(&counts, q);
    format!(
        "export p50 ≤{} ms  p90 ≤{} ms  p99 ≤{} ms  ({calls} calls, {when})",
        q(0.5),
        q(0.9),
        q(0.99)
    )
}

/// Items/s as printed: "0", "12.5", "1234".
pub fn rate_text(r: f64) -> String {
    if r == 0.0 {
        "0".to_owned()
    } else if r < 100.0 {
        format!("{r:.1}")
    } else {
        format!("{r:.0}")
    }
}
