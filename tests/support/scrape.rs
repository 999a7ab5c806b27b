//! `/metrics` scrapes parsed with `prometheus-parse`, and the accounting
//! invariant checked on one.

use prometheus_parse::{Scrape, Value};

use super::{ok, AgentProcess, Signal};

/// One parsed scrape of the agent's `/metrics`.
pub async fn scrape(agent: &AgentProcess) -> Scrape {
    let (status, body) = ok(agent.admin_get("/metrics").await);
    assert_eq!(status, 200, "/metrics answered {status}: {body}");
    let lines = body.lines().map(|l| Ok(l.to_owned()));
    ok(Scrape::parse(lines))
}

/// Sum of the samples of `name` whose labels include all of `labels`.
pub fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

/// Per signal: accepted + spooled_at_start = forwarded + dropped + buffered + spooled_now.
#[track_caller]
pub fn assert_accounting(scrape: &Scrape, signal: Signal) {
    let s = [("signal", signal.as_str())];
    let accepted = value(
        scrape,
        "telespool_received_items_total",
        &[("signal", signal.as_str()), ("outcome", "accepted")],
    );
    let at_start = value(scrape, "telespool_spooled_at_start_items", &s);
    let forwarded = value(scrape, "telespool_forwarded_items_total", &s);
    let dropped = value(scrape, "telespool_dropped_items_total", &s);
    let spooled_now = value(scrape, "telespool_spool_held_items", &s);
    let buffered = value(scrape, "telespool_buffered_items", &s);
    assert_eq!(
        accepted + at_start,
        forwarded + dropped + buffered + spooled_now,
        "{signal}: accepted {accepted} + at start {at_start} != forwarded {forwarded} + dropped {dropped} + buffered {buffered} + spooled {spooled_now}"
    );
}
