//! The `top` screen drawn on ratatui's `TestBackend` from fixed snapshots.

use std::time::Duration;

use ratatui::backend::TestBackend;
use ratatui::Terminal;

use super::draw::{self, bar};
use super::view::{drain_estimate, Connection, View};
use crate::api as proto;

fn totals(signal: &str, accepted: u64, forwarded: u64) -> proto::SignalTotals {
    proto::SignalTotals {
        signal: signal.into(),
        accepted_items_total: accepted,
        forwarded_items_total: forwarded,
        refused_requests_total: vec![proto::Count {
            reason: "refused_buffer_full".into(),
            value: 0,
        }],
        dropped_items_total: vec![proto::Count {
            reason: "upstream_rejected".into(),
            value: 0,
        }],
        ..Default::default()
    }
}

/// An agent 10 s up with a quarter-full buffer and an empty spool.
fn snapshot(uptime_ms: u64, accepted: u64, forwarded: u64) -> proto::Status {
    proto::Status {
        version: "0.1.0".into(),
        taken_unix_ms: 1_800_000_000_000 + uptime_ms as i64,
        uptime_ms,
        ready: true,
        phase: proto::Phase::Serving as i32,
        upstream: Some(proto::Upstream {
            endpoint: "http://gw:4317".into(),
            protocol: "grpc".into(),
            up: true,
            ..Default::default()
        }),
        buffer: Some(proto::Buffer {
            bytes: 16 << 20,
            max_bytes: 64 << 20,
            items: 500,
            ..Default::default()
        }),
        spool: Some(proto::Spool {
            max_bytes: 1 << 30,
            ..Default::default()
        }),
        signals: vec![
            totals("traces", accepted, forwarded),
            totals("metrics", 0, 0),
            totals("logs", 0, 0),
        ],
        export_latency: Some(proto::Latency::default()),
        ..Default::default()
    }
}

/// The view drawn on a 110×24 test terminal, as text lines.
fn screen(v: &View) -> Vec<String> {
    let mut terminal = Terminal::new(TestBackend::new(110, 24)).expect("test terminal");
    terminal.draw(|f| draw::draw(f, v)).expect("draw");
    draw::buffer_text(terminal.backend().buffer())
        .lines()
        .map(str::to_owned)
        .collect()
}

fn line<'a>(lines: &'a [String], starts: &str) -> &'a str {
    lines
        .iter()
        .map(|l| l.trim_start_matches('│'))
        .find(|l| l.starts_with(starts))
        .unwrap_or_else(|| panic!("no line starting {starts:?} in\n{}", lines.join("\n")))
}

#[test]
fn rates_are_items_per_second_between_two_snapshots() {
    let prev = snapshot(10_000, 1_000, 800);
    let cur = snapshot(12_000, 5_000, 4_800);
    let v = View::new(
        "a",
        Some(&prev),
        &cur,
        Connection::Live,
        Duration::from_secs(2),
    );
    let lines = screen(&v);
    let row: Vec<&str> = line(&lines, "traces").split_whitespace().collect();
    // signal, in/s, out/s, accepted, forwarded, ...
    assert_eq!(
        &row[..5],
        ["traces", "2000", "2000", "5000", "4800"],
        "{lines:#?}"
    );
    let idle: Vec<&str> = line(&lines, "metrics").split_whitespace().collect();
    assert_eq!(&idle[..3], ["metrics", "0", "0"]);
}

#[test]
fn without_a_previous_snapshot_rates_show_as_unknown() {
    let v = View::new(
        "a",
        None,
        &snapshot(1, 5, 5),
        Connection::Live,
        Duration::from_secs(1),
    );
    let lines = screen(&v);
    let row: Vec<&str> = line(&lines, "traces").split_whitespace().collect();
    assert_eq!(&row[..3], ["traces", "-", "-"]);
}

#[test]
fn buffer_and_spool_fill_are_drawn_as_bars() {
    let mut cur = snapshot(10_000, 0, 0);
    if let Some(s) = cur.spool.as_mut() {
        s.bytes = 1 << 30; // full
        s.rows = 900;
    }
    let v = View::new("a", None, &cur, Connection::Live, Duration::from_secs(1));
    let lines = screen(&v);
    let buffer = line(&lines, "buffer");
    assert!(
        buffer.contains(&format!("{}{}", "█".repeat(8), "░".repeat(22))),
        "a quarter of 30 cells: {buffer}"
    );
    assert!(
        buffer.contains("25.0%  16.0 MiB of 64.0 MiB, 500 items"),
        "{buffer}"
    );
    let spool = line(&lines, "spool");
    assert!(spool.contains(&"█".repeat(30)), "{spool}");
    assert!(
        spool.contains("100.0%  1.0 GiB of 1.0 GiB, 900 rows"),
        "{spool}"
    );
    assert_eq!(bar(0.0, 4), "░░░░");
    assert_eq!(bar(0.001, 4), "█░░░", "anything above zero shows");
}

#[test]
fn a_failing_upstream_shows_its_error_refusals_and_a_stalled_drain() {
    let mut prev = snapshot(10_000, 100, 100);
    let mut cur = snapshot(11_000, 100, 100);
    for s in [&mut prev, &mut cur] {
        s.signals[0].spooled_items = 4_000;
    }
    cur.upstream = Some(proto::Upstream {
        endpoint: "http://gw:4317".into(),
        protocol: "grpc".into(),
        up: false,
        failing_since_unix_ms: cur.taken_unix_ms - 75_000,
        last_error: "Unavailable: connection refused".into(),
        consecutive_failures: 12,
        ..Default::default()
    });
    cur.signals[0].refused_requests_total[0].value = 30;
    prev.signals[0].refused_requests_total[0].value = 10;
    cur.signals[0].dropped_items_total[0].value = 7;
    let v = View::new(
        "a",
        Some(&prev),
        &cur,
        Connection::Live,
        Duration::from_secs(1),
    );
    let text = screen(&v).join("\n");
    assert!(
        text.contains("upstream  http://gw:4317 (grpc), FAILING for 1m15s, 12 failed exports")
            && text.contains("          last error: Unavailable: connection refused"),
        "{text}"
    );
    assert!(text.contains("refused (requests):"), "{text}");
    let refused = line(&screen(&v), "  traces   refused_buffer_full").to_owned();
    assert!(
        refused.contains("30 total") && refused.contains("20.0/s"),
        "{refused}"
    );
    let dropped = line(&screen(&v), "  traces   upstream_rejected").to_owned();
    assert!(dropped.contains("7 total"), "{dropped}");
    assert!(text.contains("4000 items held, not draining"), "{text}");
}

#[test]
fn a_lost_connection_is_shown_with_the_last_snapshot() {
    let v = View::new(
        "127.0.0.1:13133",
        None,
        &snapshot(10_000, 1, 1),
        Connection::Lost("the agent ended the stream (shut down?)".into()),
        Duration::from_secs(1),
    );
    let lines = screen(&v);
    assert!(
        lines[0].contains("telespool 0.1.0 at 127.0.0.1:13133 · ready · up 10s"),
        "{}",
        lines[0]
    );
    let text = lines.join("\n");
    assert!(
        text.contains(
            "CONNECTION LOST (retrying every second): the agent ended the stream (shut down?)"
        ),
        "{text}"
    );
    assert!(
        line(&lines, "traces").contains("1"),
        "the last numbers stay"
    );
}

#[test]
fn the_drain_estimate_is_time_to_empty_at_the_replay_rate() {
    assert_eq!(drain_estimate(0, None), "spool empty");
    assert_eq!(drain_estimate(10, None), "measuring replay rate");
    assert_eq!(
        drain_estimate(6_000, Some(50.0)),
        "empties in ~2m00s at 50.0 items/s"
    );
    let mut prev = snapshot(10_000, 0, 0);
    let mut cur = snapshot(12_000, 0, 0);
    prev.signals[2].spooled_items = 1_200;
    cur.signals[2].spooled_items = 1_000;
    cur.signals[2].replayed_items_total = 200;
    let v = View::new(
        "a",
        Some(&prev),
        &cur,
        Connection::Live,
        Duration::from_secs(2),
    );
    assert_eq!(v.drain, "empties in ~10s at 100 items/s");
}
