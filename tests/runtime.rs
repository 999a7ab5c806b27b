//! `[runtime] worker_threads`: the real binary on the worker count it is
//! given. One worker is the case that would show a task waiting, on the
//! runtime's only thread, for another task (a deadlock two workers hide).
// Tests drive real processes and sockets: wall-clock time, not tokio's.
#![allow(clippy::disallowed_types)]

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use nix::sys::signal::Signal::SIGTERM;
use support::client::Client;
use support::scrape::{scrape, value};
use support::*;

const DEADLINE: Duration = Duration::from_secs(20);

/// 8 concurrent gRPC clients and an OpenTelemetry SDK per signal into an
/// agent with `config`; every acknowledged id arrives upstream exactly once,
/// and SIGTERM ends the agent with exit 0.
async fn forwards_everything_and_stops_clean(config: &str, workers: f64) {
    let upstream = Upstream::start().await;
    let mut agent = start_agent(&upstream, config).await;
    let metrics = scrape(&agent).await;
    assert_eq!(
        value(&metrics, "telespool_runtime_workers", &[]),
        workers,
        "the agent reports the workers it runs on"
    );
    for signal in Signal::ALL {
        let mut clients = Vec::new();
        for _ in 0..8 {
            let client = Client::new(agent.grpc_addr());
            clients.push(tokio::spawn(async move {
                let mut sent = Vec::new();
                for _ in 0..50 {
                    let ids = fresh_ids(20);
                    ok(client.export(signal, &ids).await);
                    sent.extend(ids);
                }
                sent
            }));
        }
        let mut sent: BTreeSet<u64> =
            ok(support::sdk::emit(signal, &agent.grpc_endpoint(), 200).await)
                .into_iter()
                .collect();
        for client in clients {
            sent.extend(ok(client.await));
        }
        assert_eq!(sent.len(), 8 * 50 * 20 + 200);
        ok(upstream.wait_for_ids(signal, &sent, DEADLINE).await);
        upstream.assert_received_exactly(signal, &sent);
    }
    agent.signal(SIGTERM);
    let status = agent.wait_exit(DEADLINE).await.expect("agent exits");
    assert!(status.success(), "{status:?}\n{}", agent.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_worker_thread_forwards_every_acknowledged_item_and_stops_clean() {
    forwards_everything_and_stops_clean(
        "[runtime]\nworker_threads = 1\n[batch]\ntimeout = \"50ms\"\n",
        1.0,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_worker_thread_in_durable_mode_commits_and_forwards_every_acknowledged_item() {
    forwards_everything_and_stops_clean(
        "durability = \"spool\"\n[runtime]\nworker_threads = 1\n[batch]\ntimeout = \"50ms\"\n",
        1.0,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_worker_threads_from_the_environment_are_what_the_agent_runs_on() {
    let upstream = Upstream::start().await;
    let agent = ok(AgentProcess::builder()
        .upstream(&upstream.endpoint())
        .env("TELESPOOL_RUNTIME_WORKER_THREADS", "3")
        .start()
        .await);
    let metrics = scrape(&agent).await;
    assert_eq!(value(&metrics, "telespool_runtime_workers", &[]), 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_count_past_the_limit_is_refused_naming_the_key() {
    let upstream = Upstream::start().await;
    let err = AgentProcess::builder()
        .upstream(&upstream.endpoint())
        .config_toml("[runtime]\nworker_threads = 5000\n")
        .start()
        .await
        .err()
        .expect("the agent refuses to start");
    assert!(
        err.contains("runtime.worker_threads = 5000"),
        "the error names the key and value: {err}"
    );
}
