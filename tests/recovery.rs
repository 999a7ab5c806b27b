//! After an outage: the recovery probe brings export back, not each batch's
//! own backoff, and a long outage spills in one episode and leaves a small
//! spool file after the drain.
// Tests and benches drive real processes and sockets: wall-clock time,
// not tokio's (clippy.toml keeps std's Instant out of the agent's code).
#![allow(clippy::disallowed_types)]

mod support;

use std::time::{Duration, Instant};

use support::*;
use tonic::Code;

const DEADLINE: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_an_outage_export_resumes_on_the_probe_not_on_each_batchs_backoff() {
    let upstream = Upstream::start_with(Mode::Fail(Code::Unavailable)).await;
    // Every batch's own backoff is 2 minutes, longer than DEADLINE: without
    // the probe (one export a second while failing, which wakes every
    // waiting batch once it succeeds) nothing would reach upstream within
    // the waits below. No time is measured; the backoff makes the difference.
    // (With `probe_interval = "5m"` this test fails.)
    let agent = start_agent(
        &upstream,
        "[batch]\ntimeout = \"10ms\"\n\
         [upstream.retry]\ninitial_backoff = \"2m\"\nmax_backoff = \"2m\"\nprobe_interval = \"1s\"\n",
    )
    .await;
    let mut sent = std::collections::BTreeSet::new();
    for _ in 0..8 {
        let ids = fresh_ids(50);
        ok(send(agent.grpc_addr(), Signal::Traces, &ids).await);
        sent.extend(ids);
    }
    ok(upstream
        .wait_until("the agent tried", DEADLINE, |u| {
            u.refused(Signal::Traces) > 0
        })
        .await);
    let outage = Duration::from_secs(6);
    tokio::time::sleep(outage).await;
    let during = upstream.requests(Signal::Traces);
    // One probe per second once failing (plus the first attempts and the
    // first probe), not one request per batch per backoff.
    assert!(
        during <= 4 + 2 + outage.as_secs() as usize,
        "{during} requests reached a failing upstream in {outage:?}"
    );

    upstream.set_mode(Mode::Healthy);
    ok(upstream.wait_for_ids(Signal::Traces, &sent, DEADLINE).await);
    upstream.assert_received_exactly(Signal::Traces, &sent);
}

fn file_len(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// An agent with a small buffer, four clients sending 400-byte logs, and an
/// upstream that failed until the spool file held a good 16 MiB (still
/// failing when this returns; the clients still sending).
struct Outage {
    upstream: Upstream,
    agent: AgentProcess,
    sender: Sender,
    spool: std::path::PathBuf,
}

async fn spill_through_an_outage(extra_config: &str) -> Outage {
    let upstream = Upstream::start().await;
    let agent = start_agent(
        &upstream,
        &format!(
            "{extra_config}[buffer]\nmax_bytes = \"2MiB\"\nmax_wait = \"50ms\"\n[receiver]\nmax_request_bytes = \"256KiB\"\n\
             [batch]\nmax_bytes = \"256KiB\"\ntimeout = \"10ms\"\n\
             [upstream.retry]\ninitial_backoff = \"100ms\"\nmax_backoff = \"500ms\"\nprobe_interval = \"200ms\"\n"
        ),
    )
    .await;
    let sender = Sender::builder(agent.grpc_addr(), Signal::Logs)
        .batch(100)
        .workers(4)
        .spec(ItemSpec::with_payload(400))
        .max_duration(DEADLINE)
        .start();
    ok(sender.wait_acknowledged(1000, DEADLINE).await);
    upstream.set_mode(Mode::Fail(Code::Unavailable));
    let spool = agent.spool_path().to_owned();
    let started = Instant::now();
    while file_len(&spool) < 16 << 20 {
        assert!(started.elapsed() < DEADLINE, "the spool never grew");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Outage {
        upstream,
        agent,
        sender,
        spool,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_long_outage_spills_in_one_episode_and_the_spool_file_shrinks_after_the_drain() {
    let Outage {
        upstream,
        agent,
        sender,
        spool,
    } = spill_through_an_outage("").await;
    let peak = file_len(&spool);
    upstream.set_mode(Mode::Healthy);
    let report = sender.stop().await;
    ok(upstream
        .wait_for_ids(Signal::Logs, &report.acknowledged, DEADLINE)
        .await);
    upstream.assert_received_all(Signal::Logs, &report.acknowledged);

    let starts = agent
        .stderr_lines()
        .iter()
        .filter(|l| l.contains("spill to spool started"))
        .count();
    assert_eq!(starts, 1, "one spill episode per outage");
    let stops = agent
        .stderr_lines()
        .into_iter()
        .filter(|l| l.contains("spill to spool stopped"))
        .collect::<Vec<_>>();
    assert_eq!(stops.len(), 1, "{stops:?}");
    assert!(
        agent::log_field(&stops[0], "items").is_some_and(|n| n != "0"),
        "the stop line says what moved: {}",
        stops[0]
    );

    ok(eventually("the spool file shrank", DEADLINE, || async {
        let rows = ok(agent.metric("telespool_spool_rows").await).unwrap_or(1.0);
        (rows == 0.0 && file_len(&spool) <= 4 << 20).then_some(())
    })
    .await);
    eprintln!(
        "spool file: {peak} bytes at the peak, {} after the drain",
        file_len(&spool)
    );
}

/// The spool's free pages after a drain wait while live clients are served
/// (`spool/maintain.rs`, `LiveLoad`): the agent says so, with what the file
/// holds, and gives them back once the clients stop. Nothing acknowledged is
/// lost on the way.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_drained_spool_keeps_its_pages_while_live_clients_are_served_and_gives_them_back_after() {
    let Outage {
        upstream,
        agent,
        sender,
        spool,
    } = spill_through_an_outage("[log]\nlevel = \"info,telespool::spool::maintain=debug\"\n").await;
    upstream.set_mode(Mode::Healthy);

    // The clients go on sending while the backlog drains.
    ok(eventually("the spool drained", DEADLINE, || async {
        let rows = ok(agent.metric("telespool_spool_rows").await).unwrap_or(1.0);
        (rows == 0.0).then_some(())
    })
    .await);
    let waiting = ok(agent
        .wait_for_log(
            "free pages go back to the disk once live load pauses",
            DEADLINE,
        )
        .await);
    let free: u64 = agent::log_field(&waiting, "free_bytes")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("free_bytes in {waiting}"));
    assert!(
        free >= 8 << 20,
        "the drained spool held {free} free bytes: {waiting}"
    );
    // More live load after that line, then the clients stop.
    let so_far = sender.acknowledged_count();
    ok(sender.wait_acknowledged(so_far + 2000, DEADLINE).await);
    let report = sender.stop().await;

    let giving = ok(agent
        .wait_for_log("giving the spool's free pages back to the disk", DEADLINE)
        .await);
    assert!(
        agent::log_field(&giving, "waited_ms").is_some_and(|ms| ms.parse::<u64>().is_ok()),
        "the line says how long it waited: {giving}"
    );
    ok(agent
        .wait_for_log("spool file gave its free pages back to the disk", DEADLINE)
        .await);
    ok(eventually("the spool file shrank", DEADLINE, || async {
        (file_len(&spool) <= 4 << 20).then_some(())
    })
    .await);
    let lines = agent.stderr_lines();
    let at = |needle: &str| lines.iter().position(|l| l.contains(needle));
    assert!(
        at("once live load pauses") < at("giving the spool's free pages back"),
        "it waited before it gave pages back:\n{}",
        agent.stderr()
    );

    ok(upstream
        .wait_for_ids(Signal::Logs, &report.acknowledged, DEADLINE)
        .await);
    upstream.assert_received_all(Signal::Logs, &report.acknowledged);
}
