//! Upstream outages and overload: spill to the spool, replay when upstream
//! returns, bounded disk, flapping, partial success.
// Tests and benches drive real processes and sockets: wall-clock time,
// not tokio's (clippy.toml keeps std's Instant out of the agent's code).
#![allow(clippy::disallowed_types)]

mod support;

use std::time::Duration;

use support::client::{retry_delay, Client};
use support::*;
use tonic::Code;

const DEADLINE: Duration = Duration::from_secs(30);

fn integrity(path: &std::path::Path) -> String {
    let db = ok(rusqlite::Connection::open(path));
    ok(db.query_row("PRAGMA integrity_check", [], |r| r.get::<_, String>(0)))
}

async fn metric(agent: &AgentProcess, sample: &str) -> f64 {
    ok(agent.metric(sample).await).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upstream_down_mid_load_spills_to_the_spool_and_every_acknowledged_id_arrives() {
    let upstream = Upstream::start().await;
    let limit = 1 << 20;
    let agent = ok(AgentProcess::builder()
        .upstream(&upstream.endpoint())
        .config_toml(&format!(
            "[buffer]\nmax_bytes = {limit}\nmax_wait = \"50ms\"\n[receiver]\nmax_request_bytes = \"64KiB\"\n\
             [batch]\nmax_bytes = \"64KiB\"\ntimeout = \"10ms\"\n\
             [upstream.retry]\ninitial_backoff = \"50ms\"\nmax_backoff = \"200ms\"\n"
        ))
        .start()
        .await);
    let sender = Sender::builder(agent.grpc_addr(), Signal::Traces)
        .batch(20)
        .workers(4)
        .spec(ItemSpec {
            payload_bytes: 200,
            ..ItemSpec::default()
        })
        .max_duration(Duration::from_secs(20))
        .start();
    ok(sender.wait_acknowledged(500, DEADLINE).await);
    upstream.stop().await;
    let mut peak: f64 = 0.0;
    let started = std::time::Instant::now();
    loop {
        peak = peak.max(metric(&agent, "telespool_buffered_bytes").await);
        if metric(&agent, "telespool_spooled_items_total{signal=\"traces\"}").await > 0.0 {
            break;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "the spool never took overflow"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let failing_since = metric(&agent, "telespool_upstream_failing_since_seconds").await;
    assert!(
        failing_since > 1.7e9,
        "the failing stretch has a start time: {failing_since}"
    );
    assert_eq!(metric(&agent, "telespool_upstream_up").await, 0.0);
    let during = sender.acknowledged_count();
    ok(sender.wait_acknowledged(during + 2000, DEADLINE).await);
    peak = peak.max(metric(&agent, "telespool_buffered_bytes").await);
    upstream.restart().await;
    let report = sender.stop().await;
    ok(upstream
        .wait_for_ids(Signal::Traces, &report.acknowledged, DEADLINE)
        .await);
    upstream.assert_received_all(Signal::Traces, &report.acknowledged);
    assert!(
        peak <= limit as f64,
        "buffered bytes peaked at {peak}, above {limit}"
    );
    ok(eventually("spool drained", DEADLINE, || async {
        (metric(&agent, "telespool_spool_rows").await == 0.0).then_some(())
    })
    .await);
    assert!(metric(&agent, "telespool_replayed_items_total{signal=\"traces\"}").await > 0.0);
    assert_eq!(
        metric(&agent, "telespool_upstream_failing_since_seconds").await,
        0.0
    );
    ok(eventually(
        "the outage and the recovery are logged",
        DEADLINE,
        || async {
            let stderr = agent.stderr();
            (stderr.contains("upstream is failing") && stderr.contains("upstream is up again"))
                .then_some(())
        },
    )
    .await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_spool_with_upstream_down_refuses_retryably_loses_nothing_and_drains_after() {
    let upstream = Upstream::start().await;
    upstream.stop().await;
    let agent = ok(AgentProcess::builder()
        .upstream(&upstream.endpoint())
        .config_toml(
            "[buffer]\nmax_bytes = \"256KiB\"\nmax_wait = \"20ms\"\n[receiver]\nmax_request_bytes = \"32KiB\"\n\
             [batch]\nmax_bytes = \"32KiB\"\ntimeout = \"10ms\"\n[spool]\nmax_bytes = \"64KiB\"\n\
             [upstream.retry]\ninitial_backoff = \"50ms\"\nmax_backoff = \"100ms\"\n",
        )
        .start()
        .await);
    let client = Client::new(agent.grpc_addr());
    let spec = ItemSpec {
        payload_bytes: 300,
        ..ItemSpec::default()
    };
    let mut acknowledged = std::collections::BTreeSet::new();
    let mut refusal = None;
    let started = std::time::Instant::now();
    for _ in 0..5000 {
        let ids = fresh_ids(20);
        match client.export_with(Signal::Logs, &ids, &spec).await {
            Ok(_) => acknowledged.extend(ids),
            // Refusals before the spool filled (memory full before the
            // spiller started) do not count: wait for spill, then go on.
            Err(status) if agent.stderr().contains("spool is full") => {
                refusal = Some(status);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
        assert!(started.elapsed() < DEADLINE, "the spool never filled");
    }
    let refusal = refusal.expect("buffer and spool both full must refuse");
    assert_eq!(refusal.code(), Code::Unavailable, "{refusal:?}");
    assert!(retry_delay(&refusal).is_some(), "with RetryInfo");
    assert!(metric(&agent, "telespool_spooled_items_total{signal=\"logs\"}").await > 0.0);
    assert_eq!(integrity(agent.spool_path()), "ok");
    // Still serving: health and metrics answer; the refusal is the only answer to data.
    assert_eq!(ok(agent.admin_get("/healthz").await).0, 200);

    upstream.restart().await;
    ok(upstream
        .wait_for_ids(Signal::Logs, &acknowledged, DEADLINE)
        .await);
    upstream.assert_received_all(Signal::Logs, &acknowledged);
    assert_eq!(
        metric(
            &agent,
            "telespool_dropped_items_total{signal=\"logs\",reason=\"spool_evicted\"}"
        )
        .await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drop_oldest_drops_exactly_acknowledged_minus_delivered() {
    let upstream = Upstream::start().await;
    upstream.stop().await;
    let mut agent = ok(AgentProcess::builder()
        .upstream(&upstream.endpoint())
        .config_toml(
            "[buffer]\nmax_bytes = \"256KiB\"\nmax_wait = \"200ms\"\n[receiver]\nmax_request_bytes = \"32KiB\"\n\
             [batch]\nmax_bytes = \"32KiB\"\ntimeout = \"10ms\"\n[spool]\nmax_bytes = \"128KiB\"\nwhen_full = \"drop_oldest\"\n\
             [upstream.retry]\ninitial_backoff = \"50ms\"\nmax_backoff = \"100ms\"\n",
        )
        .start()
        .await);
    let client = Client::new(agent.grpc_addr());
    let spec = ItemSpec {
        payload_bytes: 300,
        ..ItemSpec::default()
    };
    let mut acknowledged = std::collections::BTreeSet::new();
    for _ in 0..300 {
        let ids = fresh_ids(20);
        if client
            .export_with(Signal::Traces, &ids, &spec)
            .await
            .is_ok()
        {
            acknowledged.extend(ids);
        }
    }
    let evicted_sample =
        "telespool_dropped_items_total{signal=\"traces\",reason=\"spool_evicted\"}";
    assert!(
        metric(&agent, evicted_sample).await > 0.0,
        "the spool overflowed"
    );
    upstream.restart().await;
    // Quiet: nothing buffered, nothing spooled.
    ok(eventually("buffer and spool empty", DEADLINE, || async {
        let buffered = metric(&agent, "telespool_buffered_items{signal=\"traces\"}").await;
        let rows = metric(&agent, "telespool_spool_rows").await;
        (buffered == 0.0 && rows == 0.0).then_some(())
    })
    .await);
    let delivered = upstream.unique_ids(Signal::Traces);
    let dropped = metric(&agent, evicted_sample).await as usize;
    assert!(delivered.is_subset(&acknowledged));
    assert_eq!(
        dropped,
        acknowledged.len() - delivered.len(),
        "every dropped item is counted, exactly"
    );
    agent.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(agent.wait_exit(DEADLINE).await.expect("exits").success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn flapping_upstream_still_receives_every_acknowledged_id() {
    let upstream = Upstream::start_with(Mode::FailFraction {
        code: Code::Unavailable,
        fraction: 0.3,
        seed: 7,
    })
    .await;
    let agent = ok(AgentProcess::builder()
        .upstream(&upstream.endpoint())
        .config_toml(
            "[batch]\ntimeout = \"5ms\"\nmax_items = 100\n[upstream.retry]\ninitial_backoff = \"10ms\"\nmax_backoff = \"50ms\"\n",
        )
        .start()
        .await);
    let sender = Sender::builder(agent.grpc_addr(), Signal::Metrics)
        .batch(25)
        .workers(4)
        .max_batches(400)
        .max_duration(Duration::from_secs(20))
        .start();
    let report = sender.finish().await;
    assert_eq!(report.acknowledged.len(), 400 * 25);
    ok(upstream
        .wait_for_ids(Signal::Metrics, &report.acknowledged, DEADLINE)
        .await);
    upstream.assert_received_all(Signal::Metrics, &report.acknowledged);
    // A refused export records nothing upstream, so retries cause no duplicates.
    assert_eq!(upstream.duplicates(Signal::Metrics), 0);
    assert!(
        upstream.refused(Signal::Metrics) > 0,
        "the upstream did flap"
    );
    let retried = metric(
        &agent,
        "telespool_exported_batches_total{signal=\"metrics\",result=\"retryable\"}",
    )
    .await;
    assert_eq!(
        retried as usize,
        upstream.refused(Signal::Metrics),
        "every refusal was retried"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partial_success_replies_are_counted_and_not_retried() {
    let upstream = Upstream::start_with(Mode::PartialSuccess {
        rejected: 2,
        message: "two spans had no name".into(),
    })
    .await;
    let agent = ok(AgentProcess::builder()
        .upstream(&upstream.endpoint())
        .config_toml("[batch]\ntimeout = \"5ms\"\n")
        .start()
        .await);
    let ids = fresh_ids(30);
    ok(send(agent.grpc_addr(), Signal::Traces, &ids).await);
    ok(upstream
        .wait_for_ids(Signal::Traces, &id_set(&ids), DEADLINE)
        .await);
    let batches = upstream.requests(Signal::Traces) as f64;
    ok(eventually("partial success counted", DEADLINE, || async {
        let n = metric(
            &agent,
            "telespool_partial_rejected_items_total{signal=\"traces\"}",
        )
        .await;
        (n == 2.0 * batches).then_some(())
    })
    .await);
    assert_eq!(upstream.duplicates(Signal::Traces), 0, "not retried");
    // The agent's stderr reaches the harness through a pipe and a reader
    // thread: the line can arrive after the metric was scraped.
    ok(
        eventually("upstream's message is logged", DEADLINE, || async {
            agent
                .stderr()
                .contains("two spans had no name")
                .then_some(())
        })
        .await,
    );
}
