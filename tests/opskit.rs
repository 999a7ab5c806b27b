//! Day-one operations through the real binary: every config key from the
//! environment, the generated manual pages and completions, and
//! `spool.max_age` at replay.
// Tests and benches drive real processes and sockets: wall-clock time,
// not tokio's (clippy.toml keeps std's Instant out of the agent's code).
#![allow(clippy::disallowed_types)]

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use support::tls::{PemFiles, TestCa};
use support::{assert_ids_eq, eventually, fresh_ids, id_set, ok, AgentProcess, ExportRequest};
use support::{Signal, Upstream};
use telespool::spool::{NewBatch, Spool, SpoolOptions};

const DEADLINE: Duration = Duration::from_secs(30);

/// The binary with `args`, a clean environment plus `env`.
fn telespool(args: &[&str], env: &[(String, String)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_telespool"));
    cmd.args(args).env_remove("RUST_LOG");
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("TELESPOOL_") {
            cmd.env_remove(name);
        }
    }
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    ok(cmd.output())
}

/// `check-config --show-origin` as key → (origin, value).
fn show_origin(env: &[(String, String)]) -> BTreeMap<String, (String, String)> {
    let out = telespool(&["check-config", "--show-origin"], env);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "check-config failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .map(|line| {
            let (origin, rest) = line.split_once('\t').expect("origin<TAB>key = value");
            let (key, value) = rest.split_once(" = ").expect("key = value");
            (key.to_owned(), (origin.to_owned(), value.to_owned()))
        })
        .collect()
}

fn var_of(key: &str) -> String {
    format!("TELESPOOL_{}", key.replace(['.', '-'], "_").to_uppercase())
}

fn quoted(path: &Path) -> String {
    format!("{:?}", path.display().to_string())
}

#[test]
fn every_config_key_set_by_its_environment_variable_reaches_the_effective_config() {
    let dir = ok(tempfile::tempdir());
    let d = dir.path();
    let ca = TestCa::new("telespool opskit CA");
    let server = PemFiles::write(d, "server", &ca.server_cert(), &ca);
    let client = PemFiles::write(d, "client", &ca.client_cert("agent"), &ca);
    let tokens = d.join("tokens");
    let headers = d.join("headers");
    ok(std::fs::write(&tokens, "a-token\n"));
    ok(std::fs::write(&headers, "x-from-file: v\n"));
    let spool = d.join("spool").join("spool.db");
    let p = |path: &Path| path.display().to_string();

    // (key, variable's value, value as check-config shows it). Values differ
    // from the defaults, and fit together: the files exist, the endpoint is
    // https:// for [upstream.tls].
    let table: Vec<(&str, String, String)> = vec![
        (
            "receiver.grpc.listen",
            "127.0.0.1:14317".into(),
            "\"127.0.0.1:14317\"".into(),
        ),
        ("receiver.grpc.enabled", "false".into(), "false".into()),
        (
            "receiver.grpc.unix_socket",
            "/run/t/g.sock".into(),
            "\"/run/t/g.sock\"".into(),
        ),
        (
            "receiver.grpc.unix_socket_mode",
            "0600".into(),
            "\"0600\"".into(),
        ),
        (
            "receiver.grpc.unix_socket_group",
            "1234".into(),
            "1234".into(),
        ),
        (
            "receiver.grpc.unix_socket_only",
            "true".into(),
            "true".into(),
        ),
        (
            "receiver.http.listen",
            "127.0.0.1:14318".into(),
            "\"127.0.0.1:14318\"".into(),
        ),
        ("receiver.http.enabled", "false".into(), "false".into()),
        (
            "receiver.http.unix_socket",
            "/run/t/h.sock".into(),
            "\"/run/t/h.sock\"".into(),
        ),
        (
            "receiver.http.unix_socket_mode",
            "0640".into(),
            "\"0640\"".into(),
        ),
        (
            "receiver.http.unix_socket_group",
            "otel".into(),
            "\"otel\"".into(),
        ),
        (
            "receiver.http.unix_socket_only",
            "true".into(),
            "true".into(),
        ),
        (
            "receiver.http.cors.allowed_origins",
            "[\"https://app.example.com\"]".into(),
            "[\"https://app.example.com\"]".into(),
        ),
        (
            "receiver.max_request_bytes",
            "8MiB".into(),
            "\"8MiB\"".into(),
        ),
        ("receiver.max_connections", "77".into(), "77".into()),
        ("receiver.max_concurrent_streams", "9".into(), "9".into()),
        (
            "receiver.max_header_bytes",
            "64KiB".into(),
            "\"64KiB\"".into(),
        ),
        ("receiver.body_timeout", "31s".into(), "\"31s\"".into()),
        ("receiver.header_timeout", "11s".into(), "\"11s\"".into()),
        ("receiver.idle_timeout", "6m".into(), "\"6m\"".into()),
        ("receiver.keepalive_interval", "0s".into(), "\"0s\"".into()),
        ("receiver.keepalive_timeout", "21s".into(), "\"21s\"".into()),
        ("receiver.auth.token_file", p(&tokens), quoted(&tokens)),
        (
            "receiver.tls.cert_file",
            p(&server.cert),
            quoted(&server.cert),
        ),
        ("receiver.tls.key_file", p(&server.key), quoted(&server.key)),
        (
            "receiver.tls.client_ca_file",
            p(&server.ca),
            quoted(&server.ca),
        ),
        ("buffer.max_bytes", "128MiB".into(), "\"128MiB\"".into()),
        ("buffer.max_wait", "750ms".into(), "\"750ms\"".into()),
        ("batch.max_items", "100".into(), "100".into()),
        ("batch.max_bytes", "1MiB".into(), "\"1MiB\"".into()),
        ("batch.timeout", "50ms".into(), "\"50ms\"".into()),
        (
            "upstream.endpoint",
            "https://127.0.0.1:1".into(),
            "\"https://127.0.0.1:1\"".into(),
        ),
        ("upstream.concurrency", "2".into(), "2".into()),
        ("upstream.timeout", "3s".into(), "\"3s\"".into()),
        ("upstream.compression", "none".into(), "\"none\"".into()),
        (
            "upstream.headers",
            "{ \"x-api-key\" = \"k\" }".into(),
            "{ \"x-api-key\" = \"k\" }".into(),
        ),
        ("upstream.headers_file", p(&headers), quoted(&headers)),
        (
            "upstream.retry.initial_backoff",
            "2s".into(),
            "\"2s\"".into(),
        ),
        ("upstream.retry.max_backoff", "20s".into(), "\"20s\"".into()),
        ("upstream.retry.max_elapsed", "10m".into(), "\"10m\"".into()),
        ("upstream.tls.ca_file", p(&client.ca), quoted(&client.ca)),
        (
            "upstream.tls.cert_file",
            p(&client.cert),
            quoted(&client.cert),
        ),
        ("upstream.tls.key_file", p(&client.key), quoted(&client.key)),
        (
            "upstream.tls.server_name",
            "collector.example".into(),
            "\"collector.example\"".into(),
        ),
        ("spool.path", p(&spool), quoted(&spool)),
        ("spool.max_bytes", "2GiB".into(), "\"2GiB\"".into()),
        (
            "spool.when_full",
            "drop_oldest".into(),
            "\"drop_oldest\"".into(),
        ),
        ("spool.synchronous", "full".into(), "\"full\"".into()),
        ("spool.max_age", "7d".into(), "\"7days\"".into()),
        ("spool.replay_pacing", "off".into(), "\"off\"".into()),
        ("shutdown.flush_budget", "5s".into(), "\"5s\"".into()),
        ("shutdown.timeout", "15s".into(), "\"15s\"".into()),
        ("durability", "spool".into(), "\"spool\"".into()),
        (
            "admin.listen",
            "127.0.0.1:13134".into(),
            "\"127.0.0.1:13134\"".into(),
        ),
        ("admin.enabled", "false".into(), "false".into()),
        ("log.level", "debug".into(), "\"debug\"".into()),
        ("log.format", "json".into(), "\"json\"".into()),
    ];

    // The binary's own list of keys: keys added later are covered too, set
    // to their default value when the table above has none for them.
    let defaults = show_origin(&[]);
    assert!(defaults.len() >= table.len(), "{defaults:?}");
    let mut env = Vec::new();
    let mut expected = BTreeMap::new();
    for (key, (origin, default)) in &defaults {
        assert_eq!(origin, "default", "{key} with no file and no environment");
        let (value, shown) = match table.iter().find(|(k, _, _)| k == key) {
            Some((_, value, shown)) => (value.clone(), shown.clone()),
            // A key with no default and no entry here: an empty variable
            // is still recognised (it means "the default"), which is what
            // can be checked without a valid value. Add it to the table.
            None if default == "(none)" => {
                eprintln!("{key}: no value in this test's table; checked as empty");
                (String::new(), default.clone())
            }
            None => (default.trim_matches('"').to_owned(), default.clone()),
        };
        env.push((var_of(key), value));
        expected.insert(key.clone(), shown);
    }
    for (key, _, _) in &table {
        assert!(
            defaults.contains_key(*key),
            "{key} is in the table but not a key"
        );
    }

    let got = show_origin(&env);
    for (key, shown) in &expected {
        let (origin, value) = got.get(key).unwrap_or_else(|| panic!("{key} not shown"));
        assert_eq!(origin, &format!("env:{}", var_of(key)), "origin of {key}");
        assert_eq!(value, shown, "value of {key}");
    }
}

#[test]
fn flags_win_over_the_environment_which_wins_over_the_file() {
    let dir = ok(tempfile::tempdir());
    let config = dir.path().join("telespool.toml");
    ok(std::fs::write(
        &config,
        "[admin]\nlisten = \"127.0.0.1:20001\"\n\n[buffer]\nmax_bytes = \"32MiB\"\nmax_wait = \"1s\"\n",
    ));
    let env = vec![
        ("TELESPOOL_CONFIG".to_owned(), config.display().to_string()),
        (
            "TELESPOOL_ADMIN_LISTEN".to_owned(),
            "127.0.0.1:20002".to_owned(),
        ),
        ("TELESPOOL_BUFFER_MAX_BYTES".to_owned(), "48MiB".to_owned()),
    ];
    let out = telespool(
        &[
            "check-config",
            "--show-origin",
            "--admin-listen",
            "127.0.0.1:20003",
        ],
        &env,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let file = config.display();
    for line in [
        "flag:--admin-listen\tadmin.listen = \"127.0.0.1:20003\"".to_owned(),
        "env:TELESPOOL_BUFFER_MAX_BYTES\tbuffer.max_bytes = \"48MiB\"".to_owned(),
        format!("file:{file}:6\tbuffer.max_wait = \"1s\""),
        "default\tbatch.max_items = 8192".to_owned(),
    ] {
        assert!(
            stdout.lines().any(|l| l == line),
            "{line:?} not in:\n{stdout}"
        );
    }
}

#[test]
fn a_misspelt_telespool_variable_stops_the_start_naming_it_and_the_closest_key() {
    let env = vec![("TELESPOOL_DURABLITY".to_owned(), "spool".to_owned())];
    let out = telespool(&["run"], &env);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("TELESPOOL_DURABLITY")
            && stderr.contains("TELESPOOL_DURABILITY (durability)"),
        "{stderr}"
    );
    let env = vec![("TELESPOOL_BATCH_MAX_ITEMS".to_owned(), "many".to_owned())];
    let out = telespool(&["check-config"], &env);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("batch.max_items (TELESPOOL_BATCH_MAX_ITEMS)"),
        "{stderr}"
    );
}

#[test]
fn generated_man_pages_render_and_completions_are_written() {
    let dir = ok(tempfile::tempdir());
    let man = dir.path().join("man");
    let completions = dir.path().join("completions");
    let out = telespool(&["generate", "man", &man.display().to_string()], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = telespool(
        &[
            "generate",
            "completions",
            &completions.display().to_string(),
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for name in ["telespool.bash", "_telespool", "telespool.fish"] {
        let text = ok(std::fs::read_to_string(completions.join(name)));
        assert!(
            text.contains("check-config") && text.contains("show-origin"),
            "{name}"
        );
    }
    let config_page = ok(std::fs::read_to_string(man.join("telespool.toml.5")));
    assert!(config_page.contains("TELESPOOL_SPOOL_MAX_AGE"));

    if Command::new("man").arg("--version").output().is_err() {
        eprintln!("SKIPPED rendering: `man` is not installed (apt-get install man-db)");
        return;
    }
    for (page, needles) in [
        (
            "telespool.1",
            &["check-config", "--show-origin", "spool purge"][..],
        ),
        (
            "telespool.toml.5",
            &["spool.max_age", "upstream.headers", "TELESPOOL_DURABILITY"][..],
        ),
    ] {
        let out = ok(Command::new("man")
            .args(["--warnings", "-l"])
            .arg(man.join(page))
            .env("MANWIDTH", "200")
            .env("LC_ALL", "C")
            .output());
        let text = String::from_utf8_lossy(&out.stdout);
        let warnings = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "man -l {page}: {warnings}");
        assert!(
            warnings.trim().is_empty(),
            "man -l {page} warns: {warnings}"
        );
        for needle in needles {
            assert!(text.contains(needle), "{needle} not in the rendered {page}");
        }
    }
}

fn batch(signal: Signal, ids: &[u64], created_ms: i64) -> NewBatch {
    NewBatch {
        signal,
        items: ids.len() as u64,
        created_ms,
        attempts: 0,
        payload: vec![ExportRequest::build(signal, ids).encode_to_bytes()],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spooled_rows_older_than_max_age_are_dropped_and_counted_and_younger_ones_delivered() {
    let dir = ok(tempfile::tempdir());
    let path = dir.path().join("spool.db");
    let now_ms = telespool::batch::unix_ms(std::time::SystemTime::now());
    let hour_ms = 3_600_000;
    let old = fresh_ids(30);
    let young = fresh_ids(20);
    let old_logs = fresh_ids(7);
    {
        let (spool, _) = ok(Spool::open(&path, SpoolOptions::default()));
        let rows = vec![
            batch(Signal::Traces, &old[..10], now_ms - 48 * hour_ms),
            batch(Signal::Traces, &young[..10], now_ms - hour_ms / 2),
            batch(Signal::Logs, &old_logs, now_ms - 3 * hour_ms),
            batch(Signal::Traces, &old[10..], now_ms - 2 * hour_ms),
            batch(Signal::Traces, &young[10..], now_ms),
        ];
        let outcome = ok(spool.insert(rows).await);
        assert_eq!(outcome.written, 5);
        ok(spool.close().await);
    }

    let upstream = Upstream::start().await;
    // The limit comes from the environment: it reaches the running agent.
    let mut agent = ok(AgentProcess::builder()
        .upstream(&upstream.endpoint())
        .spool(&path)
        .env("TELESPOOL_SPOOL_MAX_AGE", "1h")
        .start()
        .await);
    ok(eventually("the young rows replayed", DEADLINE, || async {
        (upstream.unique_ids(Signal::Traces).len() >= young.len()).then_some(())
    })
    .await);
    let line = ok(agent
        .wait_for_log("older than spool.max_age", DEADLINE)
        .await);
    assert!(line.contains("batches=3"), "{line}");
    let dropped = |signal: &str| {
        format!("telespool_dropped_items_total{{signal=\"{signal}\",reason=\"spool_expired\"}}")
    };
    ok(eventually("the spool is empty", DEADLINE, || async {
        let rows = agent.metric("telespool_spool_rows").await.ok()??;
        (rows == 0.0).then_some(())
    })
    .await);
    assert_ids_eq(
        "delivered: the young rows only",
        &upstream.unique_ids(Signal::Traces),
        &id_set(&young),
    );
    assert!(upstream.unique_ids(Signal::Logs).is_empty());
    let m = |sample: String| {
        let agent = &agent;
        async move { ok(agent.metric(&sample).await).unwrap_or(0.0) as u64 }
    };
    assert_eq!(m(dropped("traces")).await, old.len() as u64);
    assert_eq!(m(dropped("logs")).await, old_logs.len() as u64);
    // accepted + spooled_at_start = forwarded + dropped + buffered + spooled_now
    for (signal, at_start) in [("traces", 50), ("logs", 7)] {
        let start = m(format!(
            "telespool_spooled_at_start_items{{signal=\"{signal}\"}}"
        ))
        .await;
        let forwarded = m(format!(
            "telespool_forwarded_items_total{{signal=\"{signal}\"}}"
        ))
        .await;
        assert_eq!(start, at_start, "{signal}");
        assert_eq!(start, forwarded + m(dropped(signal)).await, "{signal}");
    }
    assert_eq!(
        agent
            .stderr_lines()
            .iter()
            .filter(|l| l.contains("older than spool.max_age"))
            .count(),
        1,
        "one log line per sweep"
    );
    agent.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(
        agent.wait_exit(DEADLINE).await.is_some(),
        "agent did not exit"
    );
}

/// The operator: a systemd drop-in sets `TELESPOOL_DURABILITY=spool`
/// and expects a SIGKILL to lose nothing acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durability_set_by_environment_variable_makes_a_sigkill_lose_nothing() {
    let upstream = Upstream::start_with(support::Mode::Stall).await;
    let mut agent = ok(AgentProcess::builder()
        .upstream(&upstream.endpoint())
        .env("TELESPOOL_DURABILITY", "spool")
        .start()
        .await);
    let client = support::client::Client::new(agent.grpc_addr());
    let mut acknowledged = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let ids = fresh_ids(10);
        ok(client.export(Signal::Logs, &ids).await);
        acknowledged.extend(ids);
    }
    agent.kill();
    upstream.set_mode(support::Mode::Healthy);
    ok(agent.restart().await);
    ok(upstream
        .wait_for_ids(Signal::Logs, &acknowledged, DEADLINE)
        .await);
}
