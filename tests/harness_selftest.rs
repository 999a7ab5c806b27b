//! The harness proves itself without the agent: clients and the SDK talk to
//! the in-process upstream directly, and a shell script stands in for the
//! agent process.
// Tests and benches drive real processes and sockets: wall-clock time,
// not tokio's (clippy.toml keeps std's Instant out of the agent's code).
#![allow(clippy::disallowed_types)]

mod support;

use std::time::Duration;

use nix::sys::signal::Signal as UnixSignal;
use tonic::Code;

use support::client::{self, Client, Sender};
use support::ids::{self, ExportRequest, ItemSpec, MetricShape};
use support::{agent, id_set, sdk, send, AgentProcess, Mode, Signal, Upstream};

const DEADLINE: Duration = Duration::from_secs(5);

#[tokio::test]
async fn sent_ids_are_received_exactly_for_every_signal() {
    let upstream = Upstream::start().await;
    for signal in Signal::ALL {
        let plain = ids::fresh_ids(50);
        send(upstream.addr(), signal, &plain).await.unwrap();
        let zipped = ids::fresh_ids(50);
        client::send_gzip(upstream.addr(), signal, &zipped)
            .await
            .unwrap();
        let all = id_set(plain.iter().chain(&zipped));
        upstream.assert_received_exactly(signal, &all);
        assert_eq!(upstream.requests(signal), 2);
        assert_eq!(upstream.accepted_sizes(signal), vec![50, 50]);
    }
    assert_eq!(
        upstream.last_header("grpc-encoding").as_deref(),
        Some("gzip")
    );
}

#[test]
fn request_builders_round_trip_their_ids() {
    for signal in Signal::ALL {
        let ids = ids::fresh_ids(10);
        let request = ExportRequest::build(signal, &ids);
        assert_eq!(ids::ids_in(&request), ids);
        let bytes = request.encode_to_bytes();
        assert_eq!(ids::ids_in_bytes(signal, &bytes).unwrap(), ids);
        assert!(request.to_json().contains("test.id"));
    }
    let ids = ids::fresh_ids(30);
    let spec = ItemSpec {
        metric_shape: MetricShape::Mixed,
        payload_bytes: 100,
    };
    let request = ExportRequest::build_with(Signal::Metrics, &ids, &spec);
    let mut got = ids::ids_in(&request);
    got.sort_unstable();
    assert_eq!(got, ids);
    assert!(request.encode_to_bytes().len() > 30 * 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_helpers_deliver_every_id_for_every_signal() {
    let upstream = Upstream::start().await;
    // Metrics above the SDK's default cardinality limit of 2000.
    for (signal, n) in [
        (Signal::Traces, 1500),
        (Signal::Metrics, 2500),
        (Signal::Logs, 1500),
    ] {
        let ids = sdk::emit(signal, &upstream.endpoint(), n).await.unwrap();
        assert_eq!(ids.len(), n);
        upstream.assert_received_exactly(signal, &id_set(&ids));
    }
}

#[tokio::test]
async fn sdk_helpers_work_on_a_current_thread_runtime_with_gzip() {
    let upstream = Upstream::start().await;
    let options = sdk::SdkOptions {
        gzip: true,
        ..Default::default()
    };
    for signal in Signal::ALL {
        let ids = ids::fresh_ids(20);
        sdk::emit_ids(signal, &upstream.endpoint(), &ids, &options)
            .await
            .unwrap();
        upstream.assert_received_exactly(signal, &id_set(&ids));
    }
}

#[tokio::test]
async fn failing_upstream_refuses_with_its_code_and_records_nothing() {
    let upstream = Upstream::start_with(Mode::Fail(Code::Unavailable)).await;
    let status = send(upstream.addr(), Signal::Logs, &ids::fresh_ids(3))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(upstream.received_ids(Signal::Logs).is_empty());
    assert_eq!(
        (
            upstream.requests(Signal::Logs),
            upstream.refused(Signal::Logs)
        ),
        (1, 1)
    );

    upstream.set_mode(Mode::FailWithRetryInfo(
        Code::ResourceExhausted,
        Duration::from_millis(1500),
    ));
    let status = send(upstream.addr(), Signal::Logs, &ids::fresh_ids(3))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(
        client::retry_delay(&status),
        Some(Duration::from_millis(1500))
    );
    assert!(client::is_retryable(&status));
}

#[tokio::test]
async fn partial_success_is_answered_and_ids_still_count_as_received() {
    let upstream = Upstream::start_with(Mode::PartialSuccess {
        rejected: 2,
        message: "two were bad".into(),
    })
    .await;
    let ids = ids::fresh_ids(5);
    let accepted = Client::new(upstream.addr())
        .export(Signal::Metrics, &ids)
        .await
        .unwrap();
    assert_eq!(accepted.rejected, 2);
    assert_eq!(accepted.message, "two were bad");
    upstream.assert_received_exactly(Signal::Metrics, &id_set(&ids));
}

#[tokio::test]
async fn stopped_upstream_restarts_on_the_same_address() {
    let upstream = Upstream::start().await;
    let addr = upstream.addr();
    // One client across the outage: its open connection must be cut.
    let client = Client::new(addr);
    let before = ids::fresh_ids(4);
    client.export(Signal::Traces, &before).await.unwrap();

    upstream.stop().await;
    assert!(!upstream.is_running());
    let during = ids::fresh_ids(4);
    // Cancelled when the call raced the client noticing the cut connection.
    let status = client.export(Signal::Traces, &during).await.unwrap_err();
    assert!(
        matches!(status.code(), Code::Unavailable | Code::Cancelled),
        "{status:?}"
    );
    assert!(send(addr, Signal::Traces, &during).await.is_err());

    upstream.restart().await;
    assert_eq!(upstream.addr(), addr);
    let after = ids::fresh_ids(4);
    // The old channel reconnects on its own; allow it a bounded few tries.
    support::eventually("client reconnects after restart", DEADLINE, || async {
        client.export(Signal::Traces, &after).await.ok()
    })
    .await
    .unwrap();
    upstream.assert_received_exactly(Signal::Traces, &id_set(before.iter().chain(&after)));
}

#[tokio::test]
async fn poison_fails_only_the_request_that_contains_it() {
    let upstream = Upstream::start().await;
    let bad = ids::fresh_ids(3);
    let good = ids::fresh_ids(3);
    upstream.poison(bad[1]);
    let status = send(upstream.addr(), Signal::Traces, &bad)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    send(upstream.addr(), Signal::Traces, &good).await.unwrap();
    upstream.assert_received_exactly(Signal::Traces, &id_set(&good));
}

#[tokio::test]
async fn stall_holds_requests_until_the_mode_changes() {
    let upstream = Upstream::start_with(Mode::Stall).await;
    let ids = ids::fresh_ids(7);
    let call = tokio::spawn({
        let (addr, ids) = (upstream.addr(), ids.clone());
        async move { send(addr, Signal::Logs, &ids).await }
    });
    upstream
        .wait_until("one call stalled", DEADLINE, |u| u.stalled() == 1)
        .await
        .unwrap();
    assert!(upstream.received_ids(Signal::Logs).is_empty());
    upstream.set_mode(Mode::Healthy);
    call.await.unwrap().unwrap();
    upstream.assert_received_exactly(Signal::Logs, &id_set(&ids));
}

#[tokio::test]
async fn stop_cuts_stalled_calls_without_recording_them() {
    let upstream = Upstream::start_with(Mode::Stall).await;
    let call = tokio::spawn({
        let addr = upstream.addr();
        async move { send(addr, Signal::Metrics, &ids::fresh_ids(2)).await }
    });
    upstream
        .wait_until("one call stalled", DEADLINE, |u| u.stalled() == 1)
        .await
        .unwrap();
    upstream.stop().await;
    let status = tokio::time::timeout(DEADLINE, call)
        .await
        .expect("the stalled call ends when the upstream stops")
        .unwrap()
        .unwrap_err();
    assert_ne!(status.code(), Code::Ok);
    upstream.set_mode(Mode::Healthy);
    assert!(upstream.received_ids(Signal::Metrics).is_empty());
}

#[tokio::test]
async fn send_raw_passes_bytes_through_unchecked() {
    let upstream = Upstream::start().await;
    let ids = ids::fresh_ids(3);
    let body = ExportRequest::build(Signal::Traces, &ids).encode_to_bytes();
    client::send_raw(upstream.addr(), Signal::Traces.grpc_path(), body)
        .await
        .unwrap();
    upstream.assert_received_exactly(Signal::Traces, &id_set(&ids));

    let garbage = bytes::Bytes::from_static(&[0xff, 0xff, 0xff, 0x0f, 0x01]);
    let status = client::send_raw(upstream.addr(), Signal::Traces.grpc_path(), garbage)
        .await
        .unwrap_err();
    assert_ne!(status.code(), Code::Ok);
    assert_eq!(upstream.requests(Signal::Traces), 1);
}

#[tokio::test]
async fn sender_acknowledges_exactly_what_the_upstream_accepted() {
    let upstream = Upstream::start_with(Mode::FailFraction {
        code: Code::Unavailable,
        fraction: 0.3,
        seed: 7,
    })
    .await;
    let sender = Sender::builder(upstream.addr(), Signal::Traces)
        .batch(20)
        .workers(2)
        .max_batches(40)
        .start();
    sender.wait_acknowledged(100, DEADLINE).await.unwrap();
    let report = sender.finish().await;
    assert_eq!(report.acknowledged.len(), 40 * 20);
    assert!(report.given_up.is_empty(), "{report:?}");
    assert!(report.refused_with(Code::Unavailable) > 0, "{report:?}");
    assert_eq!(
        report.calls,
        report.ok_calls + report.refused_with(Code::Unavailable)
    );
    upstream.assert_received_exactly(Signal::Traces, &report.acknowledged);
}

#[tokio::test]
async fn sender_stops_promptly_and_reports_refusals() {
    let upstream = Upstream::start_with(Mode::Fail(Code::PermissionDenied)).await;
    let sender = Sender::builder(upstream.addr(), Signal::Logs)
        .batch(5)
        .pause(Duration::from_millis(5))
        .start();
    upstream
        .wait_until("some requests", DEADLINE, |u| u.requests(Signal::Logs) >= 3)
        .await
        .unwrap();
    let report = tokio::time::timeout(DEADLINE, sender.stop())
        .await
        .expect("stop is prompt");
    assert!(report.acknowledged.is_empty());
    assert_eq!(report.given_up, report.attempted);
    assert_eq!(report.refused_with(Code::PermissionDenied), report.calls);
}

/// Stands in for telespool: logs the `listening` line and its arguments,
/// and on SIGTERM the `shutdown complete` summary. Bounded to ~20 s.
const FAKE_AGENT: &str = r#"
echo "args: $*" >&2
printf '2025-01-01T00:00:00.000000Z  INFO telespool::app: listening grpc=127.0.0.1:4001 http=127.0.0.1:4002 admin="127.0.0.1:4003"\n' >&2
trap 'echo "2025-01-01T00:00:01Z  INFO telespool::shutdown: shutdown complete received=10 forwarded=7 spooled=3 dropped=0" >&2; exit 0' TERM
i=0
while [ $i -lt 400 ]; do sleep 0.05; i=$((i+1)); done
exit 3
"#;

#[tokio::test]
async fn agent_process_reads_addresses_and_summary_from_stderr() {
    let mut agent = AgentProcess::builder()
        .program("/bin/sh", &["-c", FAKE_AGENT, "fake-telespool"])
        .upstream("http://127.0.0.1:9")
        .config_toml("[buffer]\nmax_bytes = \"1MiB\"\n")
        .start()
        .await
        .unwrap();
    assert_eq!(agent.grpc_addr(), "127.0.0.1:4001".parse().unwrap());
    assert_eq!(agent.http_addr(), "127.0.0.1:4002".parse().unwrap());
    assert_eq!(agent.admin_addr(), "127.0.0.1:4003".parse().unwrap());
    let args = agent.wait_for_log("args:", DEADLINE).await.unwrap();
    assert!(args.contains("run --config "), "{args}");
    assert!(args.contains("--grpc-listen 127.0.0.1:0"), "{args}");
    assert!(
        args.contains(&format!("--spool {}", agent.spool_path().display())),
        "{args}"
    );
    assert!(args.contains("--upstream http://127.0.0.1:9"), "{args}");
    let config = std::fs::read_to_string(agent.data_dir().join("config.toml")).unwrap();
    assert!(config.contains("max_bytes"));

    agent.signal(UnixSignal::SIGTERM);
    let status = agent.wait_exit(DEADLINE).await.expect("exits on SIGTERM");
    assert!(status.success(), "{status}");
    assert_eq!(agent.summary_field("received"), Some(10));
    assert_eq!(agent.summary_field("spooled"), Some(3));
    assert_eq!(agent.summary_field("dropped"), Some(0));
    assert_eq!(agent.summary_field("missing"), None);

    let spool = agent.spool_path().to_owned();
    agent.restart().await.unwrap();
    assert_eq!(agent.spool_path(), spool);
    agent.kill();
    assert!(!agent.is_running());
}

#[tokio::test]
async fn agent_process_start_reports_an_early_exit_with_its_stderr() {
    let err = AgentProcess::builder()
        .program(
            "/bin/sh",
            &["-c", "echo 'error: bad config key foo' >&2; exit 2", "x"],
        )
        .start()
        .await
        .err()
        .expect("start fails");
    assert!(err.contains("exit status: 2"), "{err}");
    assert!(err.contains("bad config key foo"), "{err}");
}

#[test]
fn log_line_parsing_handles_absent_fields_and_colours() {
    let line = "\u{1b}[2m2025\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m listening grpc=127.0.0.1:5 admin=127.0.0.1:6";
    let addrs = agent::parse_listening_line(&agent::strip_ansi(line)).unwrap();
    assert_eq!(addrs.grpc, Some("127.0.0.1:5".parse().unwrap()));
    assert_eq!(addrs.http, None);
    assert_eq!(addrs.admin, Some("127.0.0.1:6".parse().unwrap()));
    assert_eq!(
        agent::parse_listening_line("INFO grpc receiver listening"),
        None
    );
    let metrics = "# HELP x\nfoo_total{signal=\"traces\"} 12\nfoo_total{signal=\"logs\"} 3\n";
    assert_eq!(
        agent::prometheus_sample(metrics, "foo_total{signal=\"logs\"}"),
        Some(3.0)
    );
}
