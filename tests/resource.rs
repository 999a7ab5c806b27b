//! `[resource]`: attributes stamped on every resource on arrival, through the
//! real binary, from the OpenTelemetry SDK and the harness client to the
//! in-process upstream, across a spool and a restart.
// Tests and benches drive real processes and sockets: wall-clock time,
// not tokio's (clippy.toml keeps std's Instant out of the agent's code).
#![allow(clippy::disallowed_types)]

mod support;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal::{SIGHUP, SIGTERM};
use prost::Message;
use support::client::Client;
use support::http::{emit_http, HttpSdkOptions};
use support::resources::{ids_of, SeenEntry};
use support::sdk::{emit_ids, SdkOptions};
use support::*;

const DEADLINE: Duration = Duration::from_secs(30);

/// Three static attributes (one the SDK also sets) and the `os` detector.
const STAMP: &str = "[resource]\n\
    attributes = { \"deployment.environment\" = \"prod\", \"k8s.cluster.name\" = \"c1\", \
    \"service.name\" = \"from-agent\" }\n\
    detect = [\"os\"]\n";

fn os_type() -> &'static str {
    match std::env::consts::OS {
        "macos" => "darwin",
        other => other,
    }
}

/// Every entry carries `stamped` (each key once), its own `service.name`,
/// and no key twice; the entries hold exactly the ids `sent`.
#[track_caller]
fn assert_stamped(
    what: &str,
    entries: &[SeenEntry],
    sent: &BTreeSet<u64>,
    stamped: &[(&str, &str)],
    service_name: &str,
) {
    assert!(!entries.is_empty(), "{what}: upstream received no entries");
    for entry in entries {
        assert_eq!(
            entry.duplicate_keys(),
            Vec::<String>::new(),
            "{what}: {entry:?}"
        );
        for (key, value) in stamped {
            assert_eq!(entry.get(key), Some(*value), "{what}: {key} in {entry:?}");
        }
        assert_eq!(
            entry.get("service.name"),
            Some(service_name),
            "{what}: {entry:?}"
        );
    }
    assert_ids_eq(what, &id_set(&ids_of(entries)), sent);
}

const KEPT: [(&str, &str); 2] = [
    ("deployment.environment", "prod"),
    ("k8s.cluster.name", "c1"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sdk_items_over_grpc_reach_upstream_stamped_with_the_apps_own_attributes_intact() {
    let upstream = Upstream::start().await;
    let agent = start_agent(&upstream, STAMP).await;
    for signal in Signal::ALL {
        let ids = fresh_ids(40);
        ok(emit_ids(signal, &agent.grpc_endpoint(), &ids, &SdkOptions::default()).await);
        let sent = id_set(&ids);
        ok(upstream.wait_for_ids(signal, &sent, DEADLINE).await);
        let entries = upstream.received_entries(signal);
        let stamped = [KEPT[0], KEPT[1], ("os.type", os_type())];
        // on_conflict = "keep": the SDK's service.name wins over the agent's.
        assert_stamped(
            signal.as_str(),
            &entries,
            &sent,
            &stamped,
            "telespool-sdk-test",
        );
        for entry in &entries {
            assert!(
                entry.get("telemetry.sdk.name").is_some(),
                "the SDK's own attributes stay: {entry:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sdk_items_over_http_json_reach_upstream_stamped_with_the_apps_own_attributes_intact() {
    let upstream = Upstream::start().await;
    let agent = start_agent(&upstream, STAMP).await;
    let options = HttpSdkOptions {
        json: true,
        gzip: false,
    };
    for signal in Signal::ALL {
        let ids = fresh_ids(40);
        ok(emit_http(signal, agent.http_addr(), &ids, options).await);
        let sent = id_set(&ids);
        ok(upstream.wait_for_ids(signal, &sent, DEADLINE).await);
        let stamped = [KEPT[0], KEPT[1], ("os.type", os_type())];
        assert_stamped(
            signal.as_str(),
            &upstream.received_entries(signal),
            &sent,
            &stamped,
            "telespool-sdk-test",
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replace_cuts_the_apps_value_out_and_an_entry_without_a_resource_gets_one() {
    let upstream = Upstream::start().await;
    let config = "[resource]\non_conflict = \"replace\"\n\
                  attributes = { \"service.name\" = \"replaced\", env = \"prod\" }\n";
    let agent = start_agent(&upstream, config).await;
    for signal in Signal::ALL {
        // The harness's requests carry service.name = "telespool-test".
        let with_resource = fresh_ids(5);
        ok(Client::new(agent.grpc_addr())
            .export(signal, &with_resource)
            .await);
        // The same shape with the resource taken away, sent as raw bytes.
        let without = fresh_ids(5);
        let body = without_resource(ExportRequest::build(signal, &without));
        ok(send_raw(agent.grpc_addr(), signal.grpc_path(), body).await);
        let sent = id_set(with_resource.iter().chain(&without));
        ok(upstream.wait_for_ids(signal, &sent, DEADLINE).await);
        let entries = upstream.received_entries(signal);
        assert_stamped(
            signal.as_str(),
            &entries,
            &sent,
            &[("env", "prod")],
            "replaced",
        );
        for entry in &entries {
            assert_eq!(entry.attributes.len(), 2, "nothing else: {entry:?}");
        }
    }
}

fn without_resource(request: ExportRequest) -> bytes::Bytes {
    let encoded = match request {
        ExportRequest::Traces(mut r) => {
            r.resource_spans.iter_mut().for_each(|e| e.resource = None);
            r.encode_to_vec()
        }
        ExportRequest::Metrics(mut r) => {
            r.resource_metrics
                .iter_mut()
                .for_each(|e| e.resource = None);
            r.encode_to_vec()
        }
        ExportRequest::Logs(mut r) => {
            r.resource_logs.iter_mut().for_each(|e| e.resource = None);
            r.encode_to_vec()
        }
    };
    encoded.into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_spooled_batch_replayed_after_a_restart_carries_the_attributes_it_was_stamped_with() {
    let upstream = Upstream::start().await;
    upstream.stop().await;
    let shutdown = "[shutdown]\nflush_budget = \"1s\"\ntimeout = \"5s\"\n\
                    [upstream.retry]\ninitial_backoff = \"50ms\"\nmax_backoff = \"200ms\"\n";
    let mut agent = ok(AgentProcess::builder()
        .upstream(&upstream.endpoint())
        .config_toml(&format!("{shutdown}{STAMP}"))
        .start()
        .await);
    let client = Client::new(agent.grpc_addr());
    let mut sent = Vec::new();
    for signal in Signal::ALL {
        let ids = fresh_ids(30);
        ok(client.export(signal, &ids).await);
        sent.push((signal, id_set(&ids)));
    }
    agent.signal(SIGTERM);
    let status = agent.wait_exit(DEADLINE).await.expect("agent exits");
    assert!(status.success(), "{status:?}\n{}", agent.stderr());
    assert_eq!(
        agent.summary_field("spooled"),
        Some(90),
        "{}",
        agent.stderr()
    );

    // Restarted without [resource]: whatever carries the attributes now was
    // stamped before it went into the spool.
    upstream.restart().await;
    ok(agent
        .restart_with(agent.builder_for_restart().config_toml(shutdown))
        .await);
    for (signal, ids) in &sent {
        ok(upstream.wait_for_ids(*signal, ids, DEADLINE).await);
        let stamped = [KEPT[0], KEPT[1], ("os.type", os_type())];
        assert_stamped(
            signal.as_str(),
            &upstream.received_entries(*signal),
            ids,
            &stamped,
            "telespool-test",
        );
    }
    agent.signal(SIGTERM);
    assert!(agent.wait_exit(DEADLINE).await.is_some_and(|s| s.success()));
    assert_eq!(agent.summary_field("replayed"), Some(90));
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

fn check_config(toml: &str) -> std::process::Output {
    let dir = ok(tempfile::tempdir());
    let path = dir.path().join("telespool.toml");
    ok(std::fs::write(&path, toml));
    telespool(&["check-config", "--config", &path.to_string_lossy()])
}

#[test]
fn check_config_lists_the_static_and_detected_attributes_in_effect() {
    let out = check_config(
        "[resource]\nattributes = { \"deployment.environment\" = \"prod\" }\n\
         detect = [\"host\", \"os\"]\n",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let hostname = ok(nix::unistd::gethostname())
        .to_string_lossy()
        .into_owned();
    for line in [
        "# resource attributes in effect (on_conflict = \"keep\"):".to_owned(),
        "#   \"deployment.environment\" = \"prod\"".to_owned(),
        format!("#   \"host.name\" = {hostname:?}"),
        format!("#   \"os.type\" = {:?}", os_type()),
    ] {
        assert!(stdout.lines().any(|l| l == line), "{line:?} in\n{stdout}");
    }
    let machine_id = std::fs::read_to_string("/etc/machine-id")
        .or_else(|_| std::fs::read_to_string("/var/lib/dbus/machine-id"));
    match machine_id {
        Ok(id) => assert!(
            stdout.contains(&format!("#   \"host.id\" = {:?}", id.trim())),
            "{stdout}"
        ),
        Err(_) => assert!(stdout.contains("host.id left out"), "{stdout}"),
    }
    let plain = check_config("");
    assert!(
        !text(&plain.stdout).contains("resource"),
        "no [resource], no listing"
    );
}

#[test]
fn config_errors_in_resource_name_the_key() {
    for (toml, needles) in [
        (
            "[resource]\nattributes = { \"\" = \"x\" }\n",
            &["resource.attributes", "empty"][..],
        ),
        (
            "[resource]\nattributes = { rack = \"a\", rack = \"b\" }\n",
            &["rack", "duplicate"],
        ),
        (
            "[resource]\ndetect = [\"host\", \"kubernetes\"]\n",
            &["resource.detect", "\"kubernetes\""],
        ),
    ] {
        let out = check_config(toml);
        assert_eq!(out.status.code(), Some(2), "{toml}");
        let stderr = text(&out.stderr);
        for needle in needles {
            assert!(
                stderr.contains(needle),
                "{toml}: {stderr:?} lacks {needle:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_lists_the_attributes_and_a_sighup_detects_them_again() {
    let upstream = Upstream::start().await;
    let agent = start_agent(&upstream, STAMP).await;
    let admin = agent.admin_addr().to_string();
    let status = || {
        let admin = admin.clone();
        tokio::task::spawn_blocking(move || telespool(&["status", "--admin-listen", &admin]))
    };
    let out = status().await.unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let expected = format!(
        "resource: deployment.environment=prod, k8s.cluster.name=c1, os.type={}, \
         service.name=from-agent (on_conflict keep)",
        os_type()
    );
    let summary = text(&out.stdout);
    assert!(
        summary.lines().any(|l| l == expected),
        "{expected:?} in\n{summary}"
    );

    agent.signal(SIGHUP);
    ok(agent
        .wait_for_log("reloaded=resource attributes", DEADLINE)
        .await);
    let out = status().await.unwrap();
    let summary = text(&out.stdout);
    assert!(
        summary.lines().any(|l| l == expected),
        "{expected:?} in\n{summary}"
    );
    let ids = fresh_ids(10);
    ok(send(agent.grpc_addr(), Signal::Logs, &ids).await);
    ok(upstream
        .wait_for_ids(Signal::Logs, &id_set(&ids), DEADLINE)
        .await);
    let stamped = [KEPT[0], KEPT[1], ("os.type", os_type())];
    assert_stamped(
        "logs after SIGHUP",
        &upstream.received_entries(Signal::Logs),
        &id_set(&ids),
        &stamped,
        "telespool-test",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_a_resource_table_the_apps_resources_arrive_as_sent() {
    let upstream = Upstream::start().await;
    let agent = start_agent(&upstream, "").await;
    for signal in Signal::ALL {
        let ids = fresh_ids(5);
        ok(send(agent.grpc_addr(), signal, &ids).await);
        ok(upstream.wait_for_ids(signal, &id_set(&ids), DEADLINE).await);
        for entry in upstream.received_entries(signal) {
            let expected = vec![("service.name".to_owned(), "telespool-test".to_owned())];
            assert_eq!(entry.attributes, expected, "{signal}");
        }
    }
    let (_, metrics) = ok(agent.admin_get("/metrics").await);
    assert!(
        !metrics.contains("telespool_resource_attribute_info{"),
        "no attributes in effect"
    );
}
