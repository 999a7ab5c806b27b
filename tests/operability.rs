//! Operability: /metrics against real counts, readiness and gRPC health at
//! shutdown, the accounting invariant, and the operator commands.
// Tests and benches drive real processes and sockets: wall-clock time,
// not tokio's (clippy.toml keeps std's Instant out of the agent's code).
#![allow(clippy::disallowed_types)]

mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal::SIGTERM;
use support::scrape::{assert_accounting, scrape, value};
use support::*;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const DEADLINE: Duration = Duration::from_secs(20);

async fn quiet(agent: &AgentProcess) {
    ok(eventually("nothing buffered", DEADLINE, || async {
        let s = scrape(agent).await;
        (value(&s, "telespool_buffered_items", &[]) == 0.0).then_some(())
    })
    .await);
}

fn telespool(args: &[&str]) -> std::process::Output {
    ok(Command::new(env!("CARGO_BIN_EXE_telespool"))
        .args(args)
        .env_remove("RUST_LOG")
        .output())
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_scrape_counts_equal_what_was_sent_and_what_upstream_received() {
    let upstream = Upstream::start().await;
    let agent = ok(AgentProcess::builder()
        .upstream(&upstream.endpoint())
        .config_toml("[batch]\ntimeout = \"10ms\"\n")
        .start()
        .await);
    let mut sent = [0usize; 3];
    for signal in Signal::ALL {
        for n in [3, 10, 40] {
            let ids = fresh_ids(n);
            ok(send(agent.grpc_addr(), signal, &ids).await);
            sent[signal.index()] += n;
        }
    }
    let garbage = bytes::Bytes::from_static(&[0x0a, 0x50]);
    assert!(
        send_raw(agent.grpc_addr(), Signal::Logs.grpc_path(), garbage)
            .await
            .is_err()
    );
    for signal in Signal::ALL {
        ok(upstream
            .wait_until("all arrived", DEADLINE, |u| {
                u.unique_ids(signal).len() == sent[signal.index()]
            })
            .await);
    }
    quiet(&agent).await;
    let scrape = scrape(&agent).await;
    for signal in Signal::ALL {
        let s = signal.as_str();
        let accepted = value(
            &scrape,
            "telespool_received_items_total",
            &[("signal", s), ("outcome", "accepted")],
        );
        assert_eq!(accepted as usize, sent[signal.index()], "{signal} accepted");
        let requests = value(
            &scrape,
            "telespool_received_requests_total",
            &[("signal", s), ("outcome", "accepted")],
        );
        assert_eq!(requests, 3.0, "{signal} requests");
        let forwarded = value(&scrape, "telespool_forwarded_items_total", &[("signal", s)]);
        assert_eq!(
            forwarded as usize,
            upstream.unique_ids(signal).len(),
            "{signal} forwarded"
        );
        let ok_batches = value(
            &scrape,
            "telespool_exported_batches_total",
            &[("signal", s), ("result", "ok")],
        );
        assert_eq!(
            ok_batches as usize,
            upstream.requests(signal),
            "{signal} batches"
        );
        assert_accounting(&scrape, signal);
    }
    let invalid = value(
        &scrape,
        "telespool_received_requests_total",
        &[("signal", "logs"), ("outcome", "invalid")],
    );
    assert_eq!(invalid, 1.0);
    assert_eq!(value(&scrape, "telespool_upstream_up", &[]), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readyz_and_grpc_health_flip_at_the_first_signal() {
    let upstream = Upstream::start_with(Mode::Stall).await;
    let mut agent = ok(AgentProcess::builder()
        .upstream(&upstream.endpoint())
        .config_toml(
            "[shutdown]\nflush_budget = \"2s\"\ntimeout = \"5s\"\n[batch]\ntimeout = \"10ms\"\n",
        )
        .start()
        .await);
    assert_eq!(ok(agent.admin_get("/readyz").await).0, 200);
    assert_eq!(ok(agent.admin_get("/healthz").await).0, 200);
    let mut health = HealthClient::new(
        ok(tonic::transport::Endpoint::from_shared(
            agent.grpc_endpoint(),
        ))
        .connect()
        .await
        .expect("connect"),
    );
    let mut watch = ok(health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await)
    .into_inner();
    let first = ok(watch.message().await).expect("a status");
    assert_eq!(first.status(), ServingStatus::Serving);
    // Hold the agent in its flush phase: a batch stalled upstream.
    ok(send(agent.grpc_addr(), Signal::Traces, &fresh_ids(5)).await);
    ok(upstream
        .wait_until("export stalled", DEADLINE, |u| u.stalled() >= 1)
        .await);

    agent.signal(SIGTERM);
    let next = tokio::time::timeout(DEADLINE, watch.message())
        .await
        .expect("in time");
    let next = ok(next).expect("a status before the stream ends");
    assert_eq!(next.status(), ServingStatus::NotServing);
    assert!(agent.is_running(), "flipped while the agent still runs");
    assert_eq!(ok(agent.admin_get("/readyz").await).0, 503);
    assert_eq!(ok(agent.admin_get("/healthz").await).0, 200, "still alive");
    assert!(agent.wait_exit(DEADLINE).await.expect("exits").success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn accounting_invariant_holds_after_load_after_an_outage_and_across_a_restart() {
    let upstream = Upstream::start().await;
    let mut agent = ok(AgentProcess::builder()
        .upstream(&upstream.endpoint())
        .config_toml(
            "[batch]\ntimeout = \"10ms\"\n[shutdown]\nflush_budget = \"300ms\"\ntimeout = \"5s\"\n\
             [upstream.retry]\ninitial_backoff = \"20ms\"\nmax_backoff = \"100ms\"\n",
        )
        .start()
        .await);
    let mut sent = BTreeSet::new();
    for signal in Signal::ALL {
        let ids = fresh_ids(60);
        ok(send(agent.grpc_addr(), signal, &ids).await);
        sent.extend(ids);
    }
    quiet(&agent).await;
    let scrape1 = scrape(&agent).await;
    Signal::ALL
        .iter()
        .for_each(|s| assert_accounting(&scrape1, *s));

    // Outage: data waits in memory, then is spooled at shutdown.
    upstream.stop().await;
    for signal in Signal::ALL {
        let ids = fresh_ids(40);
        ok(send(agent.grpc_addr(), signal, &ids).await);
        sent.extend(ids);
    }
    let scrape2 = scrape(&agent).await;
    Signal::ALL
        .iter()
        .for_each(|s| assert_accounting(&scrape2, *s));
    agent.signal(SIGTERM);
    assert!(
        agent.wait_exit(DEADLINE).await.expect("exits").success(),
        "{}",
        agent.stderr()
    );
    let spooled = agent.summary_field("spooled").expect("summary");
    assert_eq!(spooled, 120, "the outage's items went to the spool");

    // Restart: what was spooled is replayed and counted as spooled_at_start.
    upstream.restart().await;
    ok(agent.restart().await);
    let received = || {
        Signal::ALL
            .iter()
            .flat_map(|s| upstream.unique_ids(*s))
            .collect::<BTreeSet<_>>()
    };
    ok(eventually("all delivered", DEADLINE, || async {
        (received() == sent).then_some(())
    })
    .await);
    ok(eventually("spool empty", DEADLINE, || async {
        let s = scrape(&agent).await;
        (value(&s, "telespool_spool_rows", &[]) == 0.0).then_some(())
    })
    .await);
    let scrape3 = scrape(&agent).await;
    for signal in Signal::ALL {
        assert_accounting(&scrape3, signal);
        assert_eq!(
            value(
                &scrape3,
                "telespool_spooled_at_start_items",
                &[("signal", signal.as_str())]
            ),
            40.0
        );
    }
}

fn spooled_ids(path: &Path, signal: Signal) -> BTreeSet<u64> {
    let out = telespool(&[
        "spool",
        "export",
        "--signal",
        signal.as_str(),
        "--spool",
        &path.display().to_string(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut ids = BTreeSet::new();
    for line in text(&out.stdout).lines() {
        let request: opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest =
            ok(serde_json::from_str(line));
        ids.extend(ids_in(&request));
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn spool_commands_work_on_a_real_spool_and_refuse_one_held_by_an_agent() {
    let upstream = Upstream::start().await;
    upstream.stop().await;
    let mut agent = ok(AgentProcess::builder()
        .upstream(&upstream.endpoint())
        .config_toml("[shutdown]\nflush_budget = \"0s\"\ntimeout = \"5s\"\n")
        .start()
        .await);
    let spool = agent.spool_path().display().to_string();

    // Held by the running agent: offline tools refuse instead of fighting over it.
    let out = telespool(&["spool", "stats", "--spool", &spool]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("in use by another telespool process"),
        "{}",
        text(&out.stderr)
    );

    let ids = fresh_ids(25);
    ok(send(agent.grpc_addr(), Signal::Traces, &ids).await);
    ok(send(agent.grpc_addr(), Signal::Logs, &fresh_ids(5)).await);
    agent.signal(SIGTERM);
    assert!(agent.wait_exit(DEADLINE).await.expect("exits").success());

    let out = telespool(&["spool", "stats", "--spool", &spool]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stats = text(&out.stdout);
    assert!(
        stats.contains("traces   25 items") && stats.contains("logs     5 items"),
        "{stats}"
    );

    let out = telespool(&["spool", "verify", "--spool", &spool]);
    assert!(out.status.success(), "{}", text(&out.stdout));
    assert!(text(&out.stdout).contains("is sound"));

    assert_eq!(
        spooled_ids(agent.spool_path(), Signal::Traces),
        id_set(&ids)
    );

    let out = telespool(&["spool", "purge", "--spool", &spool]);
    assert_eq!(out.status.code(), Some(2), "purge wants --yes");
    let out = telespool(&["spool", "purge", "--yes", "--spool", &spool]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("removed 2 rows"),
        "{}",
        text(&out.stdout)
    );
    assert!(spooled_ids(agent.spool_path(), Signal::Traces).is_empty());

    // A damaged file: verify says so and exits non-zero.
    std::fs::write(agent.spool_path(), b"garbage").unwrap();
    let out = telespool(&["spool", "verify", "--spool", &spool]);
    assert!(!out.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drain_forwards_the_spool_and_exits_zero_or_reports_what_is_left() {
    let upstream = Upstream::start().await;
    upstream.stop().await;
    let mut agent = ok(AgentProcess::builder()
        .upstream(&upstream.endpoint())
        .config_toml("[shutdown]\nflush_budget = \"0s\"\ntimeout = \"5s\"\n")
        .start()
        .await);
    let ids = fresh_ids(30);
    ok(send(agent.grpc_addr(), Signal::Metrics, &ids).await);
    agent.signal(SIGTERM);
    assert!(agent.wait_exit(DEADLINE).await.expect("exits").success());
    let spool = agent.spool_path().display().to_string();

    // Upstream still down: drain gives up at its timeout and says what is left.
    let endpoint = upstream.endpoint();
    let drain = |timeout: &'static str| {
        let (spool, endpoint) = (spool.clone(), endpoint.clone());
        tokio::task::spawn_blocking(move || {
            telespool(&[
                "drain",
                "--timeout",
                timeout,
                "--spool",
                &spool,
                "--upstream",
                &endpoint,
                "--admin-listen",
                "127.0.0.1:0",
            ])
        })
    };
    let out = ok(drain("500ms").await);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("drain incomplete: 1 batches left"),
        "{}",
        text(&out.stderr)
    );

    upstream.restart().await;
    let out = ok(drain("20s").await);
    assert!(out.status.success(), "{}", text(&out.stderr));
    upstream.assert_received_exactly(Signal::Metrics, &id_set(&ids));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_command_summarises_a_running_agent() {
    let upstream = Upstream::start().await;
    let agent = ok(AgentProcess::builder()
        .upstream(&upstream.endpoint())
        .start()
        .await);
    ok(send(agent.grpc_addr(), Signal::Logs, &fresh_ids(7)).await);
    let admin = agent.admin_addr().to_string();
    let out = tokio::task::spawn_blocking(move || telespool(&["status", "--admin-listen", &admin]))
        .await
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let summary = text(&out.stdout);
    assert!(summary.contains(": ready"), "{summary}");
    assert!(
        summary
            .lines()
            .any(|l| l.starts_with("logs") && l.contains(" 7 ")),
        "{summary}"
    );
    let out = telespool(&["status", "--admin-listen", "127.0.0.1:1"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("cannot reach the telespool admin listener"));
}
