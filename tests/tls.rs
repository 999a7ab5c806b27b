//! TLS and mutual TLS on the receivers and to upstream, start-up errors for
//! bad files, and SIGHUP reloads of certificates and tokens, through the real
//! binary with certificates made in the test.
// Tests and benches drive real processes and sockets: wall-clock time,
// not tokio's (clippy.toml keeps std's Instant out of the agent's code).
#![allow(clippy::disallowed_types)]

mod support;

use std::path::Path;
use std::time::Duration;

use nix::sys::signal::Signal as UnixSignal;
use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
use support::client::Client;
use support::tls::{grpc_channel, https_post, toml_path, write_atomically, PemFiles, TestCa};
use support::*;
use tonic::transport::{ClientTlsConfig, ServerTlsConfig};

const DEADLINE: Duration = Duration::from_secs(20);

/// `[receiver.tls]` naming `files` (with the client CA for mutual TLS).
fn receiver_tls(files: &PemFiles, mutual: bool) -> String {
    let mut toml = format!(
        "[receiver.tls]\ncert_file = {}\nkey_file = {}\n",
        toml_path(&files.cert),
        toml_path(&files.key)
    );
    if mutual {
        toml.push_str(&format!("client_ca_file = {}\n", toml_path(&files.ca)));
    }
    toml
}

/// Server certificate files from a fresh CA in `dir`; the CA file holds
/// the same CA (used as the client CA in mutual TLS tests).
fn server_files(dir: &Path, prefix: &str) -> (TestCa, PemFiles) {
    let ca = TestCa::new(&format!("telespool test CA {prefix}"));
    let files = PemFiles::write(dir, prefix, &ca.server_cert(), &ca);
    (ca, files)
}

async fn export_over(channel: tonic::transport::Channel, ids: &[u64]) -> Result<(), tonic::Status> {
    Client::with_channel(channel)
        .export(Signal::Traces, ids)
        .await
        .map(|_| ())
}

async fn export_with_token(
    endpoint: String,
    token: &str,
    ids: Vec<u64>,
) -> Result<(), tonic::Status> {
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
    let channel = ok(tonic::transport::Endpoint::from_shared(endpoint))
        .timeout(Duration::from_secs(10))
        .connect_lazy();
    let mut request = tonic::Request::new(support::ids::traces_request(&ids));
    request
        .metadata_mut()
        .insert("authorization", ok(format!("Bearer {token}").parse()));
    TraceServiceClient::new(channel)
        .export(request)
        .await
        .map(|_| ())
}

async fn handshake_failures(agent: &AgentProcess, reason: &str) -> f64 {
    let sample =
        format!("telespool_tls_handshake_failures_total{{listener=\"grpc\",reason=\"{reason}\"}}");
    ok(agent.metric(&sample).await).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grpc_over_tls_delivers_spans_and_a_plaintext_client_is_refused() {
    let dir = ok(tempfile::tempdir());
    let (ca, files) = server_files(dir.path(), "server");
    let upstream = Upstream::start().await;
    let agent = start_agent(&upstream, &receiver_tls(&files, false)).await;

    let ids = fresh_ids(25);
    ok(export_over(grpc_channel(agent.grpc_addr(), &ca, None), &ids).await);
    ok(upstream
        .wait_for_ids(Signal::Traces, &id_set(&ids), DEADLINE)
        .await);

    let plain = support::send(agent.grpc_addr(), Signal::Traces, &fresh_ids(3)).await;
    assert!(plain.is_err(), "a plaintext client must not be served");
    // The plaintext client's bytes are not a TLS hello: counted as an error.
    ok(eventually("failed handshake counted", DEADLINE, || async {
        (handshake_failures(&agent, "error").await >= 1.0).then_some(())
    })
    .await);
    upstream.assert_received_exactly(Signal::Traces, &id_set(&ids));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_sdk_exporter_sends_spans_over_tls() {
    let dir = ok(tempfile::tempdir());
    let (ca, files) = server_files(dir.path(), "server");
    let upstream = Upstream::start().await;
    let agent = start_agent(&upstream, &receiver_tls(&files, false)).await;

    let ids = fresh_ids(40);
    let exporter = ok(opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(format!("https://localhost:{}", agent.grpc_addr().port()))
        .with_tls_config(ClientTlsConfig::new().ca_certificate(ca.certificate()))
        .with_timeout(Duration::from_secs(5))
        .build());
    ok(support::sdk::export_spans(exporter, &ids).await);
    ok(upstream
        .wait_for_ids(Signal::Traces, &id_set(&ids), DEADLINE)
        .await);
    upstream.assert_received_exactly(Signal::Traces, &id_set(&ids));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn otlp_http_over_tls_is_accepted() {
    let dir = ok(tempfile::tempdir());
    let (ca, files) = server_files(dir.path(), "server");
    let upstream = Upstream::start().await;
    let agent = start_agent(&upstream, &receiver_tls(&files, false)).await;

    let ids = fresh_ids(12);
    let body = ExportRequest::build(Signal::Logs, &ids).encode_to_bytes();
    let reply = ok(https_post(
        agent.http_addr(),
        &ca,
        Signal::Logs.http_path(),
        "application/x-protobuf",
        &body,
    )
    .await);
    assert_eq!(reply.status, 200, "{}", reply.text());
    ok(upstream
        .wait_for_ids(Signal::Logs, &id_set(&ids), DEADLINE)
        .await);
    upstream.assert_received_exactly(Signal::Logs, &id_set(&ids));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mutual_tls_accepts_the_right_client_certificate_and_refuses_others() {
    let dir = ok(tempfile::tempdir());
    let (ca, files) = server_files(dir.path(), "server");
    let upstream = Upstream::start().await;
    let agent = start_agent(&upstream, &receiver_tls(&files, true)).await;
    let addr = agent.grpc_addr();

    let ids = fresh_ids(20);
    let good = ca.client_cert("app-1");
    ok(export_over(grpc_channel(addr, &ca, Some(&good)), &ids).await);
    ok(upstream
        .wait_for_ids(Signal::Traces, &id_set(&ids), DEADLINE)
        .await);

    // The call fails (how depends on when the client sees the server's
    // alert: UNAVAILABLE, or CANCELLED for a connection closed under it),
    // and none of its ids reach upstream (checked at the end).
    let refused = |what: &str, result: Result<(), tonic::Status>| {
        assert!(result.is_err(), "{what}: the call was served");
    };
    // No client certificate.
    refused(
        "without a client certificate",
        export_over(grpc_channel(addr, &ca, None), &fresh_ids(3)).await,
    );
    // A certificate from another CA.
    let stranger = TestCa::new("another CA").client_cert("app-2");
    refused(
        "with a certificate from another CA",
        export_over(grpc_channel(addr, &ca, Some(&stranger)), &fresh_ids(3)).await,
    );
    // Plaintext.
    refused(
        "in plaintext",
        support::send(addr, Signal::Traces, &fresh_ids(3)).await,
    );
    ok(
        eventually("refused handshakes counted", DEADLINE, || async {
            let certs = handshake_failures(&agent, "client_certificate").await;
            let errors = handshake_failures(&agent, "error").await;
            (certs >= 2.0 && errors >= 1.0).then_some(())
        })
        .await,
    );
    upstream.assert_received_exactly(Signal::Traces, &id_set(&ids));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upstream_over_tls_with_a_custom_ca_and_a_client_certificate_gets_the_data() {
    let dir = ok(tempfile::tempdir());
    // The upstream's own PKI: its server certificate, and the CA that issues
    // the agent's client certificate (required).
    let upstream_ca = TestCa::new("upstream CA");
    let server = upstream_ca.server_cert();
    let clients_ca = TestCa::new("upstream clients CA");
    let upstream = Upstream::start_tls(
        ServerTlsConfig::new()
            .identity(server.identity())
            .client_ca_root(clients_ca.certificate()),
    )
    .await;
    let agent_cert = clients_ca.client_cert("telespool-agent");
    let files = PemFiles::write(dir.path(), "to-upstream", &agent_cert, &upstream_ca);
    let config = format!(
        "[upstream.tls]\nca_file = {}\ncert_file = {}\nkey_file = {}\nserver_name = \"localhost\"\n",
        toml_path(&files.ca),
        toml_path(&files.cert),
        toml_path(&files.key),
    );
    let agent = start_agent(&upstream, &config).await;

    let ids = fresh_ids(30);
    ok(send(agent.grpc_addr(), Signal::Metrics, &ids).await);
    ok(upstream
        .wait_for_ids(Signal::Metrics, &id_set(&ids), DEADLINE)
        .await);
    upstream.assert_received_exactly(Signal::Metrics, &id_set(&ids));
}

/// Starts the binary with `config`, expecting it to exit 2 before binding
/// with an error naming `needle` (a path).
async fn assert_start_refused(config: &str, needle: &str) {
    let result = AgentProcess::builder().config_toml(config).start().await;
    let Err(stderr) = result else {
        panic!("the agent started with a bad file ({needle})");
    };
    assert!(
        stderr.contains("exited with exit status: 2"),
        "expected exit status 2: {stderr}"
    );
    assert!(
        stderr.contains(needle),
        "error does not name {needle}: {stderr}"
    );
    assert!(
        !stderr.contains("spool open"),
        "the spool was opened before the bad file was found: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_certificate_stops_the_start_naming_the_file() {
    let dir = ok(tempfile::tempdir());
    let (_, files) = server_files(dir.path(), "server");
    let missing = dir.path().join("no-such-cert.pem");
    let config = format!(
        "[receiver.tls]\ncert_file = {}\nkey_file = {}\n",
        toml_path(&missing),
        toml_path(&files.key)
    );
    let needle = missing.display().to_string();
    assert_start_refused(&config, &needle).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_that_does_not_match_the_certificate_stops_the_start_naming_the_files() {
    let dir = ok(tempfile::tempdir());
    let (ca, files) = server_files(dir.path(), "server");
    let other = ca.server_cert();
    let wrong_key = dir.path().join("other-key.pem");
    write_atomically(&wrong_key, &other.key_pem);
    let config = format!(
        "[receiver.tls]\ncert_file = {}\nkey_file = {}\n",
        toml_path(&files.cert),
        toml_path(&wrong_key)
    );
    assert_start_refused(&config, "does not match the certificate").await;
    assert_start_refused(&config, &wrong_key.display().to_string()).await;

    // The same check on the upstream client certificate.
    let config = format!(
        "[upstream]\nendpoint = \"https://127.0.0.1:9\"\n[upstream.tls]\ncert_file = {}\nkey_file = {}\n",
        toml_path(&files.cert),
        toml_path(&wrong_key)
    );
    assert_start_refused(&config, "upstream.tls.key_file").await;
}

#[test]
fn check_config_reads_the_tls_files_it_names() {
    let dir = ok(tempfile::tempdir());
    let (_, files) = server_files(dir.path(), "server");
    let run = |cert: &Path| {
        let config = dir.path().join("config.toml");
        ok(std::fs::write(
            &config,
            format!(
                "[receiver.tls]\ncert_file = {}\nkey_file = {}\n",
                toml_path(cert),
                toml_path(&files.key)
            ),
        ));
        ok(std::process::Command::new(env!("CARGO_BIN_EXE_telespool"))
            .arg("check-config")
            .arg("--config")
            .arg(&config)
            .env_remove("RUST_LOG")
            .output())
    };
    let good = run(&files.cert);
    assert!(
        good.status.success(),
        "{}",
        String::from_utf8_lossy(&good.stderr)
    );
    // The key file given as the certificate: no certificate in it.
    let bad = run(&files.key);
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("receiver.tls.cert_file") && stderr.contains("holds no certificate"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_tls_keys_with_a_plaintext_endpoint_are_a_config_error() {
    let upstream = Upstream::start().await;
    let result = AgentProcess::builder()
        .upstream(&upstream.endpoint())
        .config_toml("[upstream.tls]\nserver_name = \"localhost\"\n")
        .start()
        .await;
    let Err(stderr) = result else {
        panic!("[upstream.tls] with an http:// endpoint was accepted");
    };
    assert!(
        stderr.contains("[upstream.tls] is set but upstream.endpoint"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sighup_swaps_the_certificate_without_losing_data_and_a_broken_file_keeps_the_old_one() {
    let dir = ok(tempfile::tempdir());
    let (ca_a, files) = server_files(dir.path(), "server");
    let ca_b = TestCa::new("telespool test CA B");
    let upstream = Upstream::start().await;
    let agent = start_agent(&upstream, &receiver_tls(&files, false)).await;
    let addr = agent.grpc_addr();

    // Before: a client trusting CA A.
    let before = fresh_ids(50);
    ok(export_over(grpc_channel(addr, &ca_a, None), &before).await);

    // During: a sender on one connection made with CA A keeps sending
    // across the reload (connections already open keep their certificate).
    let sender = Sender::builder(addr, Signal::Traces)
        .channel(grpc_channel(addr, &ca_a, None))
        .batch(20)
        .pause(Duration::from_millis(5))
        .max_batches(2_000)
        .max_duration(Duration::from_secs(20))
        .start();
    ok(sender.wait_acknowledged(200, DEADLINE).await);

    let cert_b = ca_b.server_cert();
    files.replace(&cert_b, &ca_b);
    agent.signal(UnixSignal::SIGHUP);
    ok(agent.wait_for_log("reloaded files", DEADLINE).await);
    // New connections present certificate B: poll until a client trusting
    // only CA B gets through (each attempt is a new channel).
    ok(
        eventually("a client trusting only CA B connects", DEADLINE, || async {
            export_over(grpc_channel(addr, &ca_b, None), &[]).await.ok()
        })
        .await,
    );
    let acked_at_reload = sender.acknowledged_count();
    ok(sender
        .wait_acknowledged(acked_at_reload + 200, DEADLINE)
        .await);
    let during = sender.stop().await;
    assert!(
        during.given_up.is_empty(),
        "the sender gave up {} ids across the reload",
        during.given_up.len()
    );

    // After: a client trusting CA B; one trusting only CA A is refused.
    let after = fresh_ids(50);
    ok(export_over(grpc_channel(addr, &ca_b, None), &after).await);
    assert!(
        export_over(grpc_channel(addr, &ca_a, None), &fresh_ids(2))
            .await
            .is_err(),
        "a new connection still presents certificate A"
    );

    // A broken key file: the reload keeps certificate B and says why.
    write_atomically(
        &files.key,
        "-----BEGIN PRIVATE KEY-----\nbroken\n-----END PRIVATE KEY-----\n",
    );
    agent.signal(UnixSignal::SIGHUP);
    let line = ok(agent
        .wait_for_log("kept the previous receiver TLS", DEADLINE)
        .await);
    assert!(
        line.contains(&files.key.display().to_string()),
        "the error does not name the key file: {line}"
    );
    let last = fresh_ids(10);
    ok(export_over(grpc_channel(addr, &ca_b, None), &last).await);

    let mut expected = id_set(&before);
    expected.extend(&during.acknowledged);
    expected.extend(&after);
    expected.extend(&last);
    ok(upstream
        .wait_for_ids(Signal::Traces, &expected, DEADLINE)
        .await);
    upstream.assert_received_exactly(Signal::Traces, &expected);
    let key_body = cert_b.key_pem.lines().nth(1).expect("a PEM body line");
    assert!(
        !agent.stderr().contains(key_body),
        "key material in the log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sighup_rereads_the_token_file_new_token_accepted_old_refused() {
    let dir = ok(tempfile::tempdir());
    let tokens = dir.path().join("tokens");
    write_atomically(&tokens, "old-token\n");
    let upstream = Upstream::start().await;
    let config = format!("[receiver.auth]\ntoken_file = {}\n", toml_path(&tokens));
    let agent = start_agent(&upstream, &config).await;

    let with_token =
        |token: &'static str, ids: Vec<u64>| export_with_token(agent.grpc_endpoint(), token, ids);
    let first = fresh_ids(10);
    ok(with_token("old-token", first.clone()).await);

    write_atomically(&tokens, "# rotated\nnew-token\n");
    agent.signal(UnixSignal::SIGHUP);
    ok(agent.wait_for_log("reloaded files", DEADLINE).await);

    let second = fresh_ids(10);
    ok(with_token("new-token", second.clone()).await);
    let old = with_token("old-token", fresh_ids(3))
        .await
        .expect_err("old token");
    assert_eq!(old.code(), tonic::Code::Unauthenticated, "{old:?}");

    let mut expected = id_set(&first);
    expected.extend(&second);
    ok(upstream
        .wait_for_ids(Signal::Traces, &expected, DEADLINE)
        .await);
    upstream.assert_received_exactly(Signal::Traces, &expected);
    assert!(
        !agent.stderr().contains("new-token") && !agent.stderr().contains("old-token"),
        "a token appeared in the log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sighup_fixes_a_wrong_upstream_ca_and_the_held_data_arrives() {
    let dir = ok(tempfile::tempdir());
    let upstream_ca = TestCa::new("upstream CA");
    let upstream =
        Upstream::start_tls(ServerTlsConfig::new().identity(upstream_ca.server_cert().identity()))
            .await;
    // The agent starts trusting the wrong CA: exports fail and are retried.
    let wrong = TestCa::new("not the upstream's CA");
    let ca_file = dir.path().join("upstream-ca.pem");
    write_atomically(&ca_file, &wrong.pem);
    let config = format!(
        "[upstream.tls]\nca_file = {}\nserver_name = \"localhost\"\n\
         [upstream.retry]\ninitial_backoff = \"50ms\"\nmax_backoff = \"200ms\"\n",
        toml_path(&ca_file)
    );
    let agent = start_agent(&upstream, &config).await;

    let ids = fresh_ids(40);
    ok(send(agent.grpc_addr(), Signal::Logs, &ids).await);
    ok(
        eventually("the agent reports upstream down", DEADLINE, || async {
            let up = ok(agent.metric("telespool_upstream_up").await);
            (up == Some(0.0)).then_some(())
        })
        .await,
    );
    assert!(upstream.received_ids(Signal::Logs).is_empty());

    write_atomically(&ca_file, &upstream_ca.pem);
    agent.signal(UnixSignal::SIGHUP);
    ok(agent.wait_for_log("reloaded files", DEADLINE).await);
    ok(upstream
        .wait_for_ids(Signal::Logs, &id_set(&ids), DEADLINE)
        .await);
    upstream.assert_received_exactly(Signal::Logs, &id_set(&ids));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sighup_rereads_the_upstream_headers_file() {
    let dir = ok(tempfile::tempdir());
    let headers = dir.path().join("upstream-headers");
    write_atomically(&headers, "authorization: Bearer first-secret\n");
    let upstream = Upstream::start().await;
    let config = format!("[upstream]\nheaders_file = {}\n", toml_path(&headers));
    let agent = start_agent(&upstream, &config).await;

    let first = fresh_ids(5);
    ok(send(agent.grpc_addr(), Signal::Traces, &first).await);
    ok(upstream
        .wait_for_ids(Signal::Traces, &id_set(&first), DEADLINE)
        .await);
    assert_eq!(
        upstream.last_header("authorization").as_deref(),
        Some("Bearer first-secret")
    );

    write_atomically(&headers, "authorization: Bearer second-secret\n");
    agent.signal(UnixSignal::SIGHUP);
    ok(agent.wait_for_log("reloaded files", DEADLINE).await);
    let second = fresh_ids(5);
    ok(send(agent.grpc_addr(), Signal::Traces, &second).await);
    ok(upstream
        .wait_for_ids(Signal::Traces, &id_set(&second), DEADLINE)
        .await);
    assert_eq!(
        upstream.last_header("authorization").as_deref(),
        Some("Bearer second-secret")
    );
    let stderr = agent.stderr();
    assert!(
        !stderr.contains("first-secret") && !stderr.contains("second-secret"),
        "an upstream secret appeared in the log"
    );
}
