//! Socket activation without systemd: the test binds the OTLP/gRPC listener,
//! passes it to the real binary as fd 3 (`LISTEN_FDS=1`, `LISTEN_PID`), and
//! restarts the agent on the same socket while clients keep sending.
//!
//! Because the socket stays open in the test (as systemd keeps it open in
//! telespool.socket), connections made while no agent runs wait in the
//! kernel's backlog: a client never sees "connection refused", and every
//! request it retries like an OTLP SDK does (UNAVAILABLE → retry) is
//! acknowledged and reaches upstream.
// Tests and benches drive real processes and sockets: wall-clock time,
// not tokio's (clippy.toml keeps std's Instant out of the agent's code).
#![allow(clippy::disallowed_types)]

mod support;

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal as UnixSignal;
use tokio_util::sync::CancellationToken;
use tonic::Code;

use support::client::{is_retryable, retry_delay, Client};
use support::ids::fresh_ids;
use support::{assert_ids_subset, ok, AgentProcess, Signal, Upstream};

const CLIENTS: usize = 4;
const RESTARTS: usize = 2;
const IDS_PER_REQUEST: usize = 20;
/// Attempts per request, like an SDK's retry budget; the agent is down for
/// well under a second per restart.
const MAX_ATTEMPTS: usize = 50;
const DEADLINE: Duration = Duration::from_secs(30);

/// What the clients saw.
#[derive(Debug, Default)]
struct Outcome {
    acknowledged: BTreeSet<u64>,
    /// Requests that failed for good (non-retryable, or out of attempts).
    failed: Vec<(Code, String)>,
    /// Retryable answers that a retry then got past, by code and message.
    retried: Vec<(Code, String)>,
    requests: usize,
}

/// One client: requests of fresh ids, back to back, each retried on a
/// retryable answer (honouring RetryInfo) until acknowledged.
async fn client_loop(client: Client, outcome: Arc<Mutex<Outcome>>, stop: CancellationToken) {
    let started = Instant::now();
    while !stop.is_cancelled() && started.elapsed() < 2 * DEADLINE {
        let ids = fresh_ids(IDS_PER_REQUEST);
        let mut attempt = 0;
        let result = loop {
            attempt += 1;
            match client.export(Signal::Traces, &ids).await {
                Ok(_) => break Ok(()),
                Err(status) if is_retryable(&status) && attempt < MAX_ATTEMPTS => {
                    let wait = retry_delay(&status)
                        .unwrap_or(Duration::from_millis(20))
                        .min(Duration::from_millis(200));
                    outcome
                        .lock()
                        .unwrap()
                        .retried
                        .push((status.code(), status.message().to_owned()));
                    tokio::time::sleep(wait).await;
                }
                Err(status) => break Err((status.code(), status.message().to_owned())),
            }
        };
        let mut o = outcome.lock().unwrap();
        o.requests += 1;
        match result {
            Ok(()) => o.acknowledged.extend(&ids),
            Err(e) => o.failed.push(e),
        }
    }
}

fn acknowledged(outcome: &Mutex<Outcome>) -> usize {
    outcome.lock().unwrap().acknowledged.len()
}

async fn wait_for_more_acks(outcome: &Mutex<Outcome>, more: usize) {
    let target = acknowledged(outcome) + more;
    ok(
        support::eventually("clients acknowledged more ids", DEADLINE, || async {
            (acknowledged(outcome) >= target).then_some(())
        })
        .await,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restarts_on_an_inherited_listener_cost_clients_no_errors_and_no_items() {
    let upstream = Upstream::start().await;
    let listener = ok(TcpListener::bind("127.0.0.1:0"));
    let addr = ok(listener.local_addr());

    let mut agent = ok(AgentProcess::builder()
        .upstream(&upstream.endpoint())
        .listen_fds(&[&listener])
        .start()
        .await);
    assert_eq!(
        agent.grpc_addr(),
        addr,
        "the agent must serve the passed socket"
    );
    ok(agent
        .wait_for_log("socket activation", Duration::from_secs(5))
        .await);

    let outcome = Arc::new(Mutex::new(Outcome::default()));
    let stop = CancellationToken::new();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            tokio::spawn(client_loop(
                Client::new(addr),
                outcome.clone(),
                stop.clone(),
            ))
        })
        .collect();
    wait_for_more_acks(&outcome, 500).await;

    for round in 1..=RESTARTS {
        let old_pid = agent.pid();
        agent.signal(UnixSignal::SIGTERM);
        let status = agent.wait_exit(DEADLINE).await;
        assert!(
            status.is_some_and(|s| s.success()),
            "restart {round}: agent {old_pid} did not shut down cleanly: {status:?}"
        );
        // The listener stays open here meanwhile: connections queue in its backlog.
        ok(agent.restart_with(agent.builder_for_restart()).await);
        assert_ne!(agent.pid(), old_pid);
        assert_eq!(agent.grpc_addr(), addr, "restart {round}: same socket");
        wait_for_more_acks(&outcome, 500).await;
    }

    stop.cancel();
    for client in clients {
        let joined = tokio::time::timeout(DEADLINE, client).await;
        assert!(
            matches!(joined, Ok(Ok(()))),
            "client did not end: {joined:?}"
        );
    }
    agent.signal(UnixSignal::SIGTERM);
    let status = agent.wait_exit(DEADLINE).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "last agent: {status:?}"
    );

    let outcome = Arc::try_unwrap(outcome)
        .expect("clients ended")
        .into_inner()
        .unwrap();
    let refused_connections = outcome
        .retried
        .iter()
        .filter(|(_, message)| message.to_lowercase().contains("refused"))
        .count();
    eprintln!(
        "{} requests, {} ids acknowledged, {} retried answers ({} connection refused): {:?}",
        outcome.requests,
        outcome.acknowledged.len(),
        outcome.retried.len(),
        refused_connections,
        outcome.retried.iter().take(8).collect::<Vec<_>>()
    );
    assert!(
        outcome.failed.is_empty(),
        "client errors: {} requests failed, e.g. {:?}",
        outcome.failed.len(),
        &outcome.failed[..outcome.failed.len().min(5)]
    );
    assert_eq!(
        refused_connections, 0,
        "a connection was refused although the socket stayed open"
    );
    ok(upstream
        .wait_for_ids(Signal::Traces, &outcome.acknowledged, DEADLINE)
        .await);
    assert_ids_subset(
        "acknowledged ids at upstream",
        &outcome.acknowledged,
        &upstream.unique_ids(Signal::Traces),
    );
}

/// An agent whose upstream is its own listener would forward every batch
/// back to itself, forever. Here the inherited socket makes the port known
/// before the start, as `--grpc-listen` and `--upstream` naming the same
/// address would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_endpoint_naming_the_agents_own_listener_is_refused_at_start() {
    let listener = ok(TcpListener::bind("127.0.0.1:0"));
    let own = ok(listener.local_addr());
    for endpoint in [
        format!("http://{own}"),
        format!("http://localhost:{}", own.port()),
    ] {
        let result = AgentProcess::builder()
            .listen_fds(&[&listener])
            .upstream(&endpoint)
            .start()
            .await;
        let err = result.err().expect("the agent must refuse to start");
        assert!(
            err.contains(&format!(
                "upstream.endpoint {endpoint} is telespool's own OTLP/gRPC listener"
            )),
            "names the endpoint and the listener: {err}"
        );
    }
}
