//! systemd notifications from the real binary, received on a Unix datagram
//! socket the test passes as `NOTIFY_SOCKET` (standing in for systemd).
// Tests and benches drive real processes and sockets: wall-clock time,
// not tokio's (clippy.toml keeps std's Instant out of the agent's code).
#![allow(clippy::disallowed_types)]

mod support;

use std::time::{Duration, Instant};

use nix::sys::signal::Signal as UnixSignal;
use tokio::net::UnixDatagram;

use support::{ok, AgentProcess};

const DEADLINE: Duration = Duration::from_secs(20);

/// Waits for a datagram with a line equal to `line`; returns every datagram
/// received until then.
async fn wait_for(socket: &UnixDatagram, line: &str) -> Result<Vec<String>, String> {
    let started = Instant::now();
    let mut seen = Vec::new();
    let mut buf = vec![0u8; 4096];
    while started.elapsed() < DEADLINE {
        let left = DEADLINE.saturating_sub(started.elapsed());
        let Ok(received) = tokio::time::timeout(left, socket.recv(&mut buf)).await else {
            break;
        };
        let n = received.map_err(|e| format!("recv on NOTIFY_SOCKET: {e}"))?;
        let message = String::from_utf8_lossy(&buf[..n]).into_owned();
        let found = message.lines().any(|l| l == line);
        seen.push(message);
        if found {
            return Ok(seen);
        }
    }
    Err(format!(
        "no {line:?} within {DEADLINE:?}; received {seen:?}"
    ))
}

#[tokio::test]
async fn the_agent_notifies_ready_pings_the_watchdog_and_notifies_stopping() {
    let dir = ok(tempfile::tempdir());
    let path = dir.path().join("notify.sock");
    let socket = ok(UnixDatagram::bind(&path));
    let otlp_socket = dir.path().join("otlp.sock");

    let mut agent = ok(AgentProcess::builder()
        .config_toml(&format!("[receiver.grpc]\nunix_socket = {otlp_socket:?}\n"))
        .env("NOTIFY_SOCKET", &path.to_string_lossy())
        // 200 ms: the agent pings every 100 ms.
        .env("WATCHDOG_USEC", "200000")
        .start()
        .await);

    let before_ready = ok(wait_for(&socket, "READY=1").await);
    let ready = before_ready.last().expect("at least the READY datagram");
    assert!(
        ready
            .lines()
            .any(|l| l.starts_with("STATUS=listening grpc=")
                && l.ends_with(&format!(" grpc_socket={}", otlp_socket.display()))),
        "READY=1 comes with a status line naming the Unix socket: {ready:?}"
    );
    for ping in 1..=2 {
        let seen = ok(wait_for(&socket, "WATCHDOG=1").await);
        assert!(
            seen.iter().all(|m| !m.contains("STOPPING=1")),
            "watchdog ping {ping}: {seen:?}"
        );
    }

    agent.signal(UnixSignal::SIGTERM);
    ok(wait_for(&socket, "STOPPING=1").await);
    let status = agent.wait_exit(DEADLINE).await;
    assert!(status.is_some_and(|s| s.success()), "exit: {status:?}");
}

#[tokio::test]
async fn without_notify_socket_the_agent_runs_and_stops_as_usual() {
    // WATCHDOG_USEC alone (no NOTIFY_SOCKET) must not start pinging anything.
    let mut agent = ok(AgentProcess::builder()
        .env("WATCHDOG_USEC", "200000")
        .start()
        .await);
    agent.signal(UnixSignal::SIGTERM);
    let status = agent.wait_exit(DEADLINE).await;
    assert!(status.is_some_and(|s| s.success()), "exit: {status:?}");
    assert!(
        !agent.stderr().contains("systemd watchdog enabled"),
        "watchdog started without NOTIFY_SOCKET:\n{}",
        agent.stderr()
    );
}
