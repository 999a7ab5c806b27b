//! Unix domain socket listeners (`receiver.*.unix_socket`) through the real
//! binary: data over the sockets arrives upstream, the files get their mode
//! and group, are removed at shutdown, a killed agent's stale socket does not
//! block the next start, anything else at the path is refused and left alone,
//! and the connection limit holds on the socket as on TCP.
// Tests and benches drive real processes and sockets: wall-clock time,
// not tokio's (clippy.toml keeps std's Instant out of the agent's code).
#![allow(clippy::disallowed_types)]

mod support;

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use nix::sys::signal::Signal as UnixSignal;
use support::client::Client;
use support::held::{served, Held};
use support::*;
use tokio::net::UnixStream;

const DEADLINE: Duration = Duration::from_secs(20);

/// A temp dir for sockets; its path is short enough for `sun_path`.
fn socket_dir() -> tempfile::TempDir {
    ok(tempfile::Builder::new().prefix("ts-uds-").tempdir())
}

/// Mode bits and group of the file at `path`, which must be a socket.
#[track_caller]
fn socket_mode_and_gid(path: &Path) -> (u32, u32) {
    let meta = ok(std::fs::symlink_metadata(path));
    assert!(
        meta.file_type().is_socket(),
        "{} is not a socket",
        path.display()
    );
    (meta.permissions().mode() & 0o7777, meta.gid())
}

/// POST a protobuf OTLP/HTTP request over the Unix socket with hyper's
/// HTTP/1 client; the status code.
async fn post_unix(path: &Path, signal: Signal, ids: &[u64]) -> Result<u16, String> {
    let body = ExportRequest::build(signal, ids).encode_to_bytes();
    let exchange = async {
        let stream = UnixStream::connect(path).await.map_err(|e| e.to_string())?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        let request = ::http::Request::post(signal.http_path())
            .header("host", "localhost")
            .header("content-type", "application/x-protobuf")
            .body(Full::new(body))
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?;
        match status {
            200 => Ok(status),
            _ => Err(format!("{status}: {:?}", body.to_bytes())),
        }
    };
    tokio::time::timeout(DEADLINE, exchange)
        .await
        .map_err(|_| format!("POST over {} timed out", path.display()))?
}

/// `telespool status` against the agent's admin listener; its stdout.
async fn status(agent: &AgentProcess) -> String {
    let admin = agent.admin_addr().to_string();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_telespool"))
            .args(["status", "--admin-listen", &admin])
            .env_remove("TELESPOOL_CONFIG")
            .output()
    })
    .await;
    let out = ok(ok(out));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grpc_and_http_over_unix_sockets_deliver_every_id_to_upstream() {
    let upstream = Upstream::start().await;
    let dir = socket_dir();
    let (grpc_sock, http_sock) = (dir.path().join("grpc.sock"), dir.path().join("http.sock"));
    let gid = nix::unistd::getegid().as_raw();
    let config = format!(
        "[receiver.grpc]\nunix_socket = {grpc_sock:?}\n\
         [receiver.http]\nunix_socket = {http_sock:?}\nunix_socket_mode = \"0600\"\n\
         unix_socket_group = \"{gid}\"\nunix_socket_only = true\n"
    );
    let mut agent = start_agent(&upstream, &config).await;

    // gRPC: the socket (default mode 0660, the agent's group) besides TCP.
    assert_eq!(socket_mode_and_gid(&grpc_sock), (0o660, gid));
    assert!(
        agent.addrs().grpc.is_some(),
        "the TCP address is served too"
    );
    // HTTP: the socket only, with the configured mode and group.
    assert_eq!(socket_mode_and_gid(&http_sock), (0o600, gid));
    assert_eq!(
        agent.addrs().http,
        None,
        "unix_socket_only: no TCP listener"
    );
    let line = ok(agent.wait_for_log("listening", DEADLINE).await);
    for needle in [
        format!("grpc_socket={}", grpc_sock.display()),
        format!("http_socket={}", http_sock.display()),
        "http=disabled".to_owned(),
    ] {
        assert!(line.contains(&needle), "{needle:?} not in {line:?}");
    }

    let client = Client::unix(&grpc_sock);
    let mut sent = Vec::new();
    for _ in 0..5 {
        let ids = fresh_ids(40);
        ok(client.export(Signal::Traces, &ids).await);
        sent.extend(ids);
    }
    let over_tcp = fresh_ids(10);
    ok(send(agent.grpc_addr(), Signal::Traces, &over_tcp).await);
    sent.extend(&over_tcp);
    for _ in 0..5 {
        let ids = fresh_ids(30);
        ok(post_unix(&http_sock, Signal::Traces, &ids).await);
        sent.extend(ids);
    }
    let sent = id_set(&sent);
    assert_eq!(sent.len(), 5 * 40 + 10 + 5 * 30);
    ok(upstream.wait_for_ids(Signal::Traces, &sent, DEADLINE).await);
    upstream.assert_received_exactly(Signal::Traces, &sent);

    let summary = status(&agent).await;
    assert!(
        summary.contains(&format!("unix {}", grpc_sock.display()))
            && summary.contains(&format!("unix {}", http_sock.display())),
        "{summary}"
    );

    agent.signal(UnixSignal::SIGTERM);
    let exit = agent.wait_exit(DEADLINE).await.expect("agent exits");
    assert!(exit.success(), "{exit}: {}", agent.stderr());
    assert!(!grpc_sock.exists(), "gRPC socket file removed at shutdown");
    assert!(!http_sock.exists(), "HTTP socket file removed at shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stale_socket_left_by_a_killed_agent_does_not_stop_the_next_start() {
    let upstream = Upstream::start().await;
    let dir = socket_dir();
    let sock = dir.path().join("otlp.sock");
    let mut agent = start_agent(
        &upstream,
        &format!("[receiver.grpc]\nunix_socket = {sock:?}\n"),
    )
    .await;
    let first = fresh_ids(25);
    ok(Client::unix(&sock).export(Signal::Logs, &first).await);
    ok(upstream
        .wait_for_ids(Signal::Logs, &id_set(&first), DEADLINE)
        .await);

    agent.signal(UnixSignal::SIGKILL);
    assert!(agent.wait_exit(DEADLINE).await.is_some());
    let (mode, _) = socket_mode_and_gid(&sock); // left behind
    assert_eq!(mode, 0o660);

    ok(agent.restart().await);
    ok(agent
        .wait_for_log("removed a stale Unix socket file", DEADLINE)
        .await);
    let second = fresh_ids(25);
    ok(Client::unix(&sock).export(Signal::Logs, &second).await);
    let all = id_set(first.iter().chain(&second));
    ok(upstream.wait_for_ids(Signal::Logs, &all, DEADLINE).await);
    upstream.assert_received_exactly(Signal::Logs, &all);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_agent_on_a_live_socket_is_refused_and_the_first_keeps_serving() {
    let upstream = Upstream::start().await;
    let dir = socket_dir();
    let sock = dir.path().join("otlp.sock");
    let config = format!("[receiver.http]\nunix_socket = {sock:?}\n");
    let _first = start_agent(&upstream, &config).await;

    let second = AgentProcess::builder()
        .upstream(&upstream.endpoint())
        .config_toml(&config)
        .start()
        .await;
    let e = match second {
        Ok(_) => panic!("a second agent started on a socket the first serves"),
        Err(e) => e,
    };
    assert!(
        e.contains(&format!(
            "another telespool is listening on {}",
            sock.display()
        )) && e.contains("receiver.http.unix_socket"),
        "{e}"
    );

    let ids = fresh_ids(20);
    ok(post_unix(&sock, Signal::Metrics, &ids).await);
    ok(upstream
        .wait_for_ids(Signal::Metrics, &id_set(&ids), DEADLINE)
        .await);
}

/// Starts an agent with `config`, expecting it to refuse; its error text.
async fn refused(upstream: &Upstream, config: &str) -> String {
    let started = AgentProcess::builder()
        .upstream(&upstream.endpoint())
        .config_toml(config)
        .start()
        .await;
    match started {
        Ok(_) => panic!("agent started with {config:?}"),
        Err(e) => e,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unusable_socket_paths_are_refused_naming_the_key_and_nothing_is_deleted() {
    let upstream = Upstream::start().await;
    let dir = socket_dir();

    // A regular file at the path: refused, never deleted or changed.
    let file = dir.path().join("otlp.sock");
    ok(std::fs::write(&file, b"someone's data"));
    let e = refused(
        &upstream,
        &format!("[receiver.grpc]\nunix_socket = {file:?}\n"),
    )
    .await;
    assert!(
        e.contains(&format!(
            "{} (receiver.grpc.unix_socket) exists and is not a socket",
            file.display()
        )),
        "{e}"
    );
    assert_eq!(ok(std::fs::read(&file)), b"someone's data");

    // A missing directory: refused, not created.
    let missing: PathBuf = dir.path().join("run").join("otlp.sock");
    let e = refused(
        &upstream,
        &format!("[receiver.http]\nunix_socket = {missing:?}\n"),
    )
    .await;
    assert!(
        e.contains(&format!(
            "directory {} does not exist",
            dir.path().join("run").display()
        )) && e.contains("receiver.http.unix_socket"),
        "{e}"
    );
    assert!(!dir.path().join("run").exists());

    // An unknown group: refused before anything is bound.
    let sock = dir.path().join("grpc.sock");
    let e = refused(
        &upstream,
        &format!(
            "[receiver.grpc]\nunix_socket = {sock:?}\nunix_socket_group = \"telespool-no-such-group\"\n"
        ),
    )
    .await;
    assert!(
        e.contains(
            "group \"telespool-no-such-group\" (receiver.grpc.unix_socket_group) does not exist"
        ),
        "{e}"
    );
    assert!(!sock.exists());

    // A relative path: a config error, exit status 2 before anything starts.
    let e = refused(&upstream, "[receiver.grpc]\nunix_socket = \"otlp.sock\"\n").await;
    assert!(
        e.contains("receiver.grpc.unix_socket \"otlp.sock\" must be an absolute path"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_connection_limit_holds_on_a_unix_socket_under_a_burst() {
    let upstream = Upstream::start().await;
    let dir = socket_dir();
    let sock = dir.path().join("http.sock");
    let agent = start_agent(
        &upstream,
        &format!(
            "[receiver]\nmax_connections = 2\nbody_timeout = \"30s\"\n\
             [receiver.http]\nunix_socket = {sock:?}\n"
        ),
    )
    .await;
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(Held::open(ok(UnixStream::connect(&sock).await), "localhost").await);
    }
    ok(eventually("2 connections served", DEADLINE, || async {
        (served(&held) >= 2).then_some(())
    })
    .await);
    // Give the agent every chance to serve more than its limit.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(served(&held), 2, "at most max_connections on the socket");

    let (first, waiting): (Vec<Held>, Vec<Held>) = held.into_iter().partition(Held::served);
    for h in first {
        h.task.abort();
    }
    ok(eventually("2 more connections served", DEADLINE, || async {
        (served(&waiting) >= 2).then_some(())
    })
    .await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(served(&waiting), 2, "still at most max_connections");
    for h in waiting {
        h.task.abort();
    }
    // The TCP listener has its own limit and serves meanwhile.
    let ids = fresh_ids(5);
    ok(send(agent.grpc_addr(), Signal::Logs, &ids).await);
    ok(upstream
        .wait_for_ids(Signal::Logs, &id_set(&ids), DEADLINE)
        .await);
}
