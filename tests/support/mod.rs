//! The shared integration-test harness.
//!
//! - [`ids`]: requests whose items carry unique `u64` ids, and `ids_in` to
//!   read them back; "nothing lost" is equality of id sets.
//! - [`resources`]: resource entries as upstream saw them (attributes, ids).
//! - [`upstream::Upstream`]: an in-process OTLP/gRPC upstream that records
//!   ids and can fail, stall, go down and come back on the same port.
//! - [`http_upstream::HttpUpstream`]: an in-process OTLP/HTTP upstream that
//!   records ids, with scripted answers (503 + Retry-After, 400 + Status) and
//!   a size limit answered with 413.
//! - [`client`]: `send`, `send_raw` and the background [`client::Sender`].
//! - [`sdk`]: emit through the real OpenTelemetry SDK exporters.
//! - [`agent::AgentProcess`]: the real telespool binary as a child process.
//! - [`http`]: a raw OTLP/HTTP client and the SDK's HTTP exporters.
//! - [`held::Held`]: an HTTP/1 connection that holds a connection slot open.
//! - [`tls`]: certificates made in the test, TLS clients that trust them.
//! - [`admin`]: the admin API's generated tonic client, `get_status`, `watch`.
//! - [`scrape`]: parsed `/metrics` and the accounting invariant.
//! - [`tmpfs::Tmpfs`]: a small real filesystem that fills (mounted as root).
//!
//! Rules: loopback only, port 0, no fixed sleeps for readiness (poll with a
//! deadline), every loop bounded in count and time.
//!
//! Use from a test file with `mod support;`. Each test binary uses a subset.
#![allow(dead_code, unused_imports)]

pub mod admin;
pub mod agent;
pub mod client;
pub mod held;
pub mod http;
pub mod http_upstream;
pub mod ids;
pub mod resources;
pub mod scrape;
pub mod sdk;
pub mod tls;
pub mod tmpfs;
pub mod upstream;

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::future::Future;
use std::time::{Duration, Instant};

pub use telespool::signal::Signal;

pub use agent::AgentProcess;
pub use client::{send, send_concurrently, send_raw, SendReport, Sender};
pub use ids::{fresh_ids, ids_in, ExportRequest, ItemSpec};
pub use upstream::{Mode, Upstream};

/// Collects ids into a set.
pub fn id_set<'a>(ids: impl IntoIterator<Item = &'a u64>) -> BTreeSet<u64> {
    ids.into_iter().copied().collect()
}

fn sample(ids: impl Iterator<Item = u64>) -> Vec<u64> {
    ids.take(8).collect()
}

/// Asserts two id sets are equal; on failure says how many are missing and
/// extra, with a few of each.
#[track_caller]
pub fn assert_ids_eq(what: &str, actual: &BTreeSet<u64>, expected: &BTreeSet<u64>) {
    if actual == expected {
        return;
    }
    let missing: Vec<u64> = expected.difference(actual).copied().collect();
    let extra: Vec<u64> = actual.difference(expected).copied().collect();
    panic!(
        "{what}: expected {} ids, got {}; {} missing (e.g. {:?}), {} unexpected (e.g. {:?})",
        expected.len(),
        actual.len(),
        missing.len(),
        sample(missing.iter().copied()),
        extra.len(),
        sample(extra.iter().copied()),
    );
}

/// Asserts `expected ⊆ actual` (at-least-once delivery: extras allowed).
#[track_caller]
pub fn assert_ids_subset(what: &str, expected: &BTreeSet<u64>, actual: &BTreeSet<u64>) {
    let missing: Vec<u64> = expected.difference(actual).copied().collect();
    assert!(
        missing.is_empty(),
        "{what}: {} of {} ids lost, e.g. {:?}",
        missing.len(),
        expected.len(),
        sample(missing.iter().copied()),
    );
}

/// Polls `probe` every 10 ms until it returns `Some`, or fails after
/// `deadline` naming `what`.
pub async fn eventually<T, F, Fut>(
    what: &str,
    deadline: Duration,
    mut probe: F,
) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(v) = probe().await {
            return Ok(v);
        }
        if started.elapsed() >= deadline {
            return Err(format!("{what}: not true within {deadline:?}"));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The real binary with `upstream` as its upstream and `config` as its TOML
/// config; panics with the agent's stderr if it does not start.
pub async fn start_agent(upstream: &Upstream, config: &str) -> AgentProcess {
    ok(AgentProcess::builder()
        .upstream(&upstream.endpoint())
        .config_toml(config)
        .start()
        .await)
}

/// `result.unwrap()` with the error printed as text, at the caller's line.
#[track_caller]
pub fn ok<T, E: Debug>(result: Result<T, E>) -> T {
    match result {
        Ok(v) => v,
        Err(e) => panic!("{e:?}"),
    }
}
