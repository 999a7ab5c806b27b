//! Bearer tokens on the receivers (`receiver.auth.token_file`) and upstream
//! headers from a file (`upstream.headers_file`), through the real binary.
// Tests and benches drive real processes and sockets: wall-clock time,
// not tokio's (clippy.toml keeps std's Instant out of the agent's code).
#![allow(clippy::disallowed_types)]

mod support;

use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use support::*;
use tonic::transport::Endpoint;
use tonic::Code;

const DEADLINE: Duration = Duration::from_secs(20);
const TOKEN: &str = "s3cret-token-for-tests";

async fn agent_with_tokens(upstream: &Upstream) -> (AgentProcess, tempfile::TempDir) {
    let dir = ok(tempfile::tempdir());
    let tokens = dir.path().join("tokens");
    ok(std::fs::write(
        &tokens,
        format!("# clients\nanother-token\n{TOKEN}\n"),
    ));
    let headers = dir.path().join("upstream-headers");
    ok(std::fs::write(
        &headers,
        "# upstream auth\nAuthorization: Bearer upstream-secret\nx-tenant: blue\n",
    ));
    let config = format!(
        "[receiver.auth]\ntoken_file = {:?}\n[upstream]\nheaders_file = {:?}\n",
        tokens.display().to_string(),
        headers.display().to_string()
    );
    let agent = ok(AgentProcess::builder()
        .upstream(&upstream.endpoint())
        .config_toml(&config)
        .start()
        .await);
    (agent, dir)
}

async fn grpc_export(
    agent: &AgentProcess,
    authorization: Option<&str>,
    ids: &[u64],
) -> Result<(), tonic::Status> {
    let channel = ok(Endpoint::from_shared(agent.grpc_endpoint()))
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect_lazy();
    let mut request = tonic::Request::new(support::ids::traces_request(ids));
    if let Some(value) = authorization {
        request
            .metadata_mut()
            .insert("authorization", ok(value.parse()));
    }
    TraceServiceClient::new(channel)
        .export(request)
        .await
        .map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grpc_right_token_is_accepted_and_missing_or_wrong_is_unauthenticated() {
    let upstream = Upstream::start().await;
    let (agent, _dir) = agent_with_tokens(&upstream).await;

    let ids = fresh_ids(10);
    ok(grpc_export(&agent, Some(&format!("Bearer {TOKEN}")), &ids).await);
    ok(upstream
        .wait_for_ids(Signal::Traces, &id_set(&ids), DEADLINE)
        .await);
    // Upstream got the metadata from upstream.headers_file.
    assert_eq!(
        upstream.last_header("authorization").as_deref(),
        Some("Bearer upstream-secret")
    );
    assert_eq!(upstream.last_header("x-tenant").as_deref(), Some("blue"));

    for authorization in [
        None,
        Some("Bearer wrong-token"),
        Some(&format!("Basic {TOKEN}")[..]),
        Some(&format!("Bearer {TOKEN}x")[..]),
    ] {
        let status = grpc_export(&agent, authorization, &fresh_ids(3))
            .await
            .expect_err("refused");
        assert_eq!(
            status.code(),
            Code::Unauthenticated,
            "{authorization:?}: {status:?}"
        );
    }
    let refused = ok(agent
        .metric("telespool_received_requests_total{signal=\"traces\",outcome=\"unauthenticated\"}")
        .await);
    assert_eq!(refused, Some(4.0), "every refusal is counted");
    assert_eq!(upstream.unique_ids(Signal::Traces), id_set(&ids));
    assert!(
        !agent.stderr().contains(TOKEN) && !agent.stderr().contains("upstream-secret"),
        "tokens never appear in the log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http_right_token_is_accepted_and_missing_or_wrong_gets_401() {
    let upstream = Upstream::start().await;
    let (agent, _dir) = agent_with_tokens(&upstream).await;
    let ids = fresh_ids(10);
    let body = ExportRequest::build(Signal::Logs, &ids).encode_to_bytes();
    let protobuf = ("Content-Type", "application/x-protobuf");
    let right = format!("Bearer {TOKEN}");

    let reply = ok(support::http::request(
        agent.http_addr(),
        "POST",
        "/v1/logs",
        &[protobuf, ("Authorization", &right)],
        &body,
    )
    .await);
    assert_eq!(reply.status, 200, "{}", reply.text());
    ok(upstream
        .wait_for_ids(Signal::Logs, &id_set(&ids), DEADLINE)
        .await);

    for headers in [
        vec![protobuf],
        vec![protobuf, ("Authorization", "Bearer nope")],
    ] {
        let reply =
            ok(
                support::http::request(agent.http_addr(), "POST", "/v1/logs", &headers, &body)
                    .await,
            );
        assert_eq!(reply.status, 401, "{headers:?}: {}", reply.text());
        assert_eq!(reply.header("www-authenticate"), Some("Bearer"));
    }
    assert_eq!(upstream.unique_ids(Signal::Logs), id_set(&ids));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unreadable_or_empty_token_file_stops_the_start_naming_the_path() {
    let dir = ok(tempfile::tempdir());
    let empty = dir.path().join("empty-tokens");
    ok(std::fs::write(&empty, "# nothing here\n\n"));
    let missing = dir.path().join("no-such-file");
    for path in [empty, missing] {
        let config = format!(
            "[receiver.auth]\ntoken_file = {:?}\n",
            path.display().to_string()
        );
        let started = AgentProcess::builder().config_toml(&config).start().await;
        let e = match started {
            Ok(_) => panic!("agent started with token file {}", path.display()),
            Err(e) => e,
        };
        assert!(
            e.contains("receiver.auth.token_file") && e.contains(&path.display().to_string()),
            "{e}"
        );
    }
}
