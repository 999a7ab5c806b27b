//! `telespool status`: a snapshot as human text. Pure: the snapshot in,
//! lines out, so the wording is tested without an agent.

use std::fmt::Write;
use std::time::Duration;

use crate::api::{Count, Status};

/// The snapshot from the agent at `addr`, for a person.
pub fn render(addr: &str, s: &Status) -> String {
    let mut out = String::new();
    let ready = match s.ready {
        true => "ready".to_owned(),
        false => format!("NOT READY ({})", super::phase_name(s.phase)),
    };
    let _ = writeln!(
        out,
        "telespool {} at {addr}: {ready}, up {}",
        s.version,
        duration(Duration::from_millis(s.uptime_ms))
    );
    for receiver in ["grpc", "http"] {
        let on: Vec<String> = s
            .listeners
            .iter()
            .filter(|l| l.receiver == receiver)
            .map(|l| format!("{} {}", l.transport, l.address))
            .collect();
        let on = match on.is_empty() {
            true => "disabled".to_owned(),
            false => on.join(", "),
        };
        let _ = writeln!(out, "{receiver}: {on}");
    }
    let _ = writeln!(out, "{}", resource(s));
    let _ = writeln!(out, "upstream: {}", upstream(s));
    if let Some(u) = &s.upstream {
        let _ = writeln!(
            out,
            "upstream request limit: {} (uncompressed)",
            bytes(u.working_max_request_bytes)
        );
    }
    if let Some(b) = &s.buffer {
        let _ = writeln!(
            out,
            "buffer: {} of {} ({}), {} items, {} batches queued",
            bytes(b.bytes),
            bytes(b.max_bytes),
            percent(b.bytes, b.max_bytes),
            b.items,
            b.queued_batches
        );
    }
    if let Some(sp) = &s.spool {
        let _ = writeln!(
            out,
            "spool: {} rows, {} of {} ({}), oldest {} old{}",
            sp.rows,
            bytes(sp.bytes),
            bytes(sp.max_bytes),
            percent(sp.bytes, sp.max_bytes),
            duration(Duration::from_millis(sp.oldest_age_ms)),
            if sp.disk_full {
                ", DISK FULL: the spool's filesystem has no space left; free disk space"
            } else if sp.max_bytes_reached {
                ", FULL: at spool.max_bytes; raise it or restore upstream"
            } else {
                ""
            }
        );
    }
    if let Some(l) = &s.export_latency {
        let _ = match l.count {
            0 => writeln!(out, "export latency: no exports yet"),
            n => writeln!(
                out,
                "export latency: p50 ≤{} ms, p90 ≤{} ms, p99 ≤{} ms over {n} calls",
                l.p50_ms, l.p90_ms, l.p99_ms
            ),
        };
    }
    let _ = writeln!(
        out,
        "{:<8} {:>10} {:>9} {:>10} {:>9} {:>9} {:>9}",
        "signal", "accepted", "refused", "forwarded", "spooled", "replayed", "dropped"
    );
    for t in &s.signals {
        let _ = writeln!(
            out,
            "{:<8} {:>10} {:>9} {:>10} {:>9} {:>9} {:>9}",
            t.signal,
            t.accepted_items_total,
            sum(&t.refused_requests_total),
            t.forwarded_items_total,
            t.spooled_items_total,
            t.replayed_items_total,
            sum(&t.dropped_items_total),
        );
    }
    // The reasons behind non-zero refusals (requests) and drops (items).
    for (what, unit, pick) in [
        ("refused", "requests", refused as fn(&_) -> &[Count]),
        ("dropped", "items", dropped),
    ] {
        for t in &s.signals {
            let reasons: Vec<String> = pick(t)
                .iter()
                .filter(|c| c.value > 0)
                .map(|c| format!("{} {}", c.reason, c.value))
                .collect();
            if !reasons.is_empty() {
                let _ = writeln!(out, "{what} {} {unit}: {}", t.signal, reasons.join(", "));
            }
        }
    }
    out
}

fn refused(t: &crate::api::SignalTotals) -> &[Count] {
    &t.refused_requests_total
}

fn dropped(t: &crate::api::SignalTotals) -> &[Count] {
    &t.dropped_items_total
}

fn sum(counts: &[Count]) -> u64 {
    counts.iter().map(|c| c.value).sum()
}

/// "none configured", "http://… (grpc), up" or "… FAILING for …; last error: …".
/// `resource: k=v, ... (on_conflict keep)`, sorted by key.
pub fn resource(s: &Status) -> String {
    if s.resource_on_conflict.is_empty() {
        return "resource: no attributes stamped".to_owned();
    }
    let attributes: Vec<String> = s
        .resource_attributes
        .iter()
        .map(|a| format!("{}={}", a.key, a.value))
        .collect();
    format!(
        "resource: {} (on_conflict {})",
        attributes.join(", "),
        s.resource_on_conflict
    )
}

pub fn upstream(s: &Status) -> String {
    match upstream_parts(s) {
        (state, Some(error)) => format!("{state}; last error: {error}"),
        (state, None) => state,
    }
}

/// The upstream's state, and its last error while it is failing.
pub fn upstream_parts(s: &Status) -> (String, Option<String>) {
    let Some(u) = &s.upstream else {
        return ("none configured (data is buffered, refused with backpressure when full, and spooled at shutdown)".to_owned(), None);
    };
    if u.up {
        return (format!("{} ({}), up", u.endpoint, u.protocol), None);
    }
    let since = match u.failing_since_unix_ms {
        0 => String::new(),
        ms => format!(
            " for {}",
            duration(Duration::from_millis(
                u64::try_from(s.taken_unix_ms - ms).unwrap_or(0)
            ))
        ),
    };
    let state = format!(
        "{} ({}), FAILING{since}, {} failed exports",
        u.endpoint, u.protocol, u.consecutive_failures
    );
    (state, Some(u.last_error.clone()))
}

/// Bytes with a binary unit: "0 B", "512 B", "1.5 MiB".
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// `part` of `whole` as "12.5%"; "0%" when either is zero.
pub fn percent(part: u64, whole: u64) -> String {
    if part == 0 || whole == 0 {
        return "0%".to_owned();
    }
    format!("{:.1}%", part as f64 * 100.0 / whole as f64)
}

/// A duration as "0s", "42s", "3m12s", "2h05m", "3d04h".
pub fn duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api as proto;

    fn snapshot() -> Status {
        Status {
            version: "0.1.0".into(),
            taken_unix_ms: 1_000_000,
            uptime_ms: 65_000,
            ready: true,
            phase: proto::Phase::Serving as i32,
            listeners: vec![proto::Listener {
                receiver: "grpc".into(),
                transport: "tcp".into(),
                address: "127.0.0.1:4317".into(),
            }],
            buffer: Some(proto::Buffer {
                max_bytes: 64 << 20,
                ..Default::default()
            }),
            spool: Some(proto::Spool {
                max_bytes: 1 << 30,
                ..Default::default()
            }),
            signals: vec![proto::SignalTotals {
                signal: "traces".into(),
                refused_requests_total: vec![proto::Count {
                    reason: "refused_buffer_full".into(),
                    value: 0,
                }],
                ..Default::default()
            }],
            export_latency: Some(proto::Latency::default()),
            ..Default::default()
        }
    }

    #[test]
    fn an_idle_agent_without_upstream_prints_zeros_and_none_configured() {
        let text = render("127.0.0.1:13133", &snapshot());
        assert!(text.contains(": ready, up 1m05s"), "{text}");
        assert!(
            text.contains("grpc: tcp 127.0.0.1:4317\nhttp: disabled\n"),
            "{text}"
        );
        assert!(text.contains("upstream: none configured"), "{text}");
        assert!(
            text.contains("buffer: 0 B of 64.0 MiB (0%), 0 items"),
            "{text}"
        );
        assert!(
            text.contains("spool: 0 rows, 0 B of 1.0 GiB (0%), oldest 0s old"),
            "{text}"
        );
        let row = text.lines().find(|l| l.starts_with("traces")).unwrap();
        assert_eq!(
            row.split_whitespace().collect::<Vec<_>>(),
            ["traces", "0", "0", "0", "0", "0", "0"]
        );
        assert!(
            !text.contains("-0") && !text.contains("refused traces"),
            "{text}"
        );
    }

    #[test]
    fn a_failing_upstream_shows_for_how_long_and_the_last_error() {
        let mut s = snapshot();
        s.upstream = Some(proto::Upstream {
            endpoint: "http://gw:4317".into(),
            protocol: "grpc".into(),
            up: false,
            failing_since_unix_ms: 1_000_000 - 192_000,
            last_error: "Unavailable: connection refused".into(),
            consecutive_failures: 7,
            ..Default::default()
        });
        s.signals[0].refused_requests_total[0].value = 3;
        let text = render("a", &s);
        assert!(
            text.contains("upstream: http://gw:4317 (grpc), FAILING for 3m12s, 7 failed exports; last error: Unavailable: connection refused"),
            "{text}"
        );
        assert!(
            text.contains("refused traces requests: refused_buffer_full 3"),
            "{text}"
        );
    }

    #[test]
    fn sizes_and_durations_read_like_a_person_writes_them() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 << 30), "3.0 GiB");
        assert_eq!(duration(Duration::from_secs(7325)), "2h02m");
        assert_eq!(duration(Duration::from_secs(90061)), "1d01h");
        assert_eq!(percent(1, 8), "12.5%");
    }
}
