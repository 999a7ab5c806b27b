//! `telespool status` (text and `--json`) and `telespool top --once` against
//! a live agent, and their error when no agent answers.
// Tests and benches drive real processes and sockets: wall-clock time,
// not tokio's (clippy.toml keeps std's Instant out of the agent's code).
#![allow(clippy::disallowed_types)]

mod support;

use std::process::{Command, Output};
use std::time::Duration;

use support::*;

const DEADLINE: Duration = Duration::from_secs(30);

/// The telespool binary with `args`, run off the test's runtime.
async fn telespool(args: &[&str]) -> Output {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let run = move || {
        Command::new(env!("CARGO_BIN_EXE_telespool"))
            .args(&args)
            .env_remove("RUST_LOG")
            .output()
    };
    ok(ok(tokio::task::spawn_blocking(run).await))
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

/// `telespool <command...> --admin-listen <agent's>`, which must succeed; stdout.
async fn ask(agent: &AgentProcess, command: &[&str]) -> String {
    let admin = agent.admin_addr().to_string();
    let mut args = command.to_vec();
    args.extend(["--admin-listen", &admin]);
    let out = telespool(&args).await;
    assert!(
        out.status.success(),
        "telespool {command:?}: {}\n{}",
        out.status,
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn line<'a>(text: &'a str, starts: &str) -> &'a str {
    text.lines()
        .map(|l| l.trim_start_matches('│'))
        .find(|l| l.starts_with(starts))
        .unwrap_or_else(|| panic!("no line starting {starts:?} in\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_of_an_idle_agent_without_upstream_prints_zeros_as_0_and_none_configured() {
    let agent = ok(AgentProcess::builder().start().await);
    let summary = ask(&agent, &["status"]).await;
    for needle in [
        format!("at {}: ready, up ", agent.admin_addr()),
        format!("grpc: tcp {}\n", agent.grpc_addr()),
        format!("http: tcp {}\n", agent.http_addr()),
        "upstream: none configured".to_owned(),
        "buffer: 0 B of 64.0 MiB (0%), 0 items, 0 batches queued".to_owned(),
        "spool: 0 rows, 0 B of 1.0 GiB (0%), oldest 0s old".to_owned(),
        "export latency: no exports yet".to_owned(),
    ] {
        assert!(summary.contains(&needle), "{needle:?} not in\n{summary}");
    }
    for signal in Signal::ALL {
        let row: Vec<&str> = line(&summary, signal.as_str()).split_whitespace().collect();
        assert_eq!(row[1..], ["0"; 6], "{signal}: {summary}");
    }
    assert!(!summary.contains("-0"), "{summary}");

    let json: serde_json::Value = ok(serde_json::from_str(
        &ask(&agent, &["status", "--json"]).await,
    ));
    assert_eq!(json["ready"], true);
    assert_eq!(json["phase"], "serving");
    assert_eq!(json["version"], env!("CARGO_PKG_VERSION"));
    assert!(json["upstream"].is_null(), "{json}");
    assert_eq!(json["buffer"]["bytes"], 0);
    assert_eq!(json["buffer"]["max_bytes"], 64 << 20);
    assert_eq!(json["spool"]["rows"], 0);
    assert_eq!(json["spool"]["max_bytes"], 1u64 << 30);
    assert_eq!(
        json["spool"]["path"],
        agent.spool_path().display().to_string()
    );
    let listeners = json["listeners"].as_array().expect("listeners");
    let grpc = serde_json::json!({
        "receiver": "grpc", "transport": "tcp", "address": agent.grpc_addr().to_string()
    });
    assert!(listeners.contains(&grpc), "{listeners:?}");
    let signals = json["signals"].as_array().expect("signals");
    assert_eq!(signals.len(), 3);
    for (s, signal) in signals.iter().zip(Signal::ALL) {
        assert_eq!(s["signal"], signal.as_str());
        for key in [
            "accepted_items_total",
            "forwarded_items_total",
            "spooled_items_total",
        ] {
            assert_eq!(s[key], 0, "{signal} {key}: {s}");
        }
        let refused = s["refused_requests_total"].as_array().expect("refusals");
        assert!(refused.iter().all(|c| c["value"] == 0), "{s}");
        assert!(
            refused.iter().any(|c| c["reason"] == "refused_buffer_full"),
            "{s}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_of_a_forwarding_agent_counts_what_was_sent() {
    let upstream = Upstream::start().await;
    let agent = ok(AgentProcess::builder()
        .upstream(&upstream.endpoint())
        .config_toml("[batch]\ntimeout = \"10ms\"\n")
        .start()
        .await);
    let ids = fresh_ids(70);
    ok(send(agent.grpc_addr(), Signal::Logs, &ids).await);
    ok(upstream
        .wait_for_ids(Signal::Logs, &id_set(&ids), DEADLINE)
        .await);
    let summary = ok(eventually("forwarded counted", DEADLINE, || async {
        let s = ask(&agent, &["status"]).await;
        let row: Vec<String> = line(&s, "logs")
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        (row[1] == "70" && row[3] == "70").then_some(s)
    })
    .await);
    assert!(
        summary.contains(&format!("upstream: {} (grpc), up", upstream.endpoint())),
        "{summary}"
    );
    assert!(summary.contains("export latency: p50 ≤"), "{summary}");
    let json: serde_json::Value = ok(serde_json::from_str(
        &ask(&agent, &["status", "--json"]).await,
    ));
    assert_eq!(json["upstream"]["endpoint"], upstream.endpoint());
    assert_eq!(json["upstream"]["up"], true);
    assert_eq!(json["signals"][2]["signal"], "logs");
    assert_eq!(json["signals"][2]["accepted_items_total"], 70);
    assert_eq!(json["signals"][2]["forwarded_items_total"], 70);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_and_top_exit_2_naming_the_address_when_no_agent_answers() {
    // A port nothing listens on: bound, then released.
    let free = ok(std::net::TcpListener::bind("127.0.0.1:0"));
    let addr = ok(free.local_addr()).to_string();
    drop(free);
    for command in [&["status"][..], &["status", "--json"], &["top", "--once"]] {
        let mut args = command.to_vec();
        args.extend(["--admin-listen", &addr]);
        let out = telespool(&args).await;
        assert_eq!(
            out.status.code(),
            Some(2),
            "{command:?}: {}",
            text(&out.stderr)
        );
        let stderr = text(&out.stderr);
        assert!(
            stderr.contains(&format!(
                "cannot reach the telespool admin listener at {addr}"
            )) && stderr.contains("is the agent running"),
            "{command:?}: {stderr}"
        );
        assert!(out.stdout.is_empty(), "{command:?}: nothing on stdout");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn top_once_under_load_prints_rates_and_fill_bars() {
    // A slow upstream: exports stay in flight, so the buffer holds data
    // while items keep moving in and out.
    let upstream = Upstream::start_with(Mode::Delay(Duration::from_millis(200))).await;
    let agent = ok(AgentProcess::builder()
        .upstream(&upstream.endpoint())
        .config_toml("[buffer]\nmax_bytes = \"4MiB\"\n[batch]\ntimeout = \"10ms\"\n")
        .start()
        .await);
    let sender = Sender::builder(agent.grpc_addr(), Signal::Traces)
        .batch(50)
        .pause(Duration::from_millis(5))
        .max_duration(Duration::from_secs(60))
        .start();
    ok(sender.wait_acknowledged(500, DEADLINE).await);
    let frame = ask(&agent, &["top", "--once", "--interval", "500ms"]).await;
    let report = sender.stop().await;
    assert!(!report.acknowledged.is_empty());

    assert!(
        frame.contains(&format!(
            "telespool {} at {}",
            env!("CARGO_PKG_VERSION"),
            agent.admin_addr()
        )),
        "{frame}"
    );
    let header: Vec<&str> = line(&frame, "signal").split_whitespace().collect();
    assert_eq!(&header[..3], ["signal", "in/s", "out/s"], "{frame}");
    let traces: Vec<&str> = line(&frame, "traces").split_whitespace().collect();
    let in_rate: f64 = traces[1]
        .parse()
        .unwrap_or_else(|_| panic!("a rate: {frame}"));
    assert!(in_rate > 0.0, "traces are coming in: {frame}");
    let out_rate: f64 = traces[2]
        .parse()
        .unwrap_or_else(|_| panic!("a rate: {frame}"));
    assert!(out_rate >= 0.0, "{frame}");
    let buffer = line(&frame, "buffer");
    assert!(
        buffer.contains('█') && buffer.contains("of 4.0 MiB"),
        "{frame}"
    );
    assert!(line(&frame, "spool").contains("of 1.0 GiB"), "{frame}");
    assert!(
        line(&frame, "upstream").contains(&upstream.endpoint()),
        "{frame}"
    );
    assert!(line(&frame, "drain").len() > "drain".len(), "{frame}");
    assert!(frame.contains("live · refresh 500ms"), "{frame}");
}
