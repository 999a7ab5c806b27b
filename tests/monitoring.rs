//! The shipped alert rules and dashboard against a real Prometheus server
//! scraping a real agent under load (Debian's `prometheus` package; `.ci/run`
//! installs it). Skipped, saying so, when `prometheus` is not on PATH.
// Tests and benches drive real processes and sockets: wall-clock time,
// not tokio's (clippy.toml keeps std's Instant out of the agent's code).
#![allow(clippy::disallowed_types)]

mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::agent::http_get;
use support::{eventually, ok, sdk, start_agent, Signal, Upstream};

const DEADLINE: Duration = Duration::from_secs(90);
const RULES: &str = include_str!("../packaging/monitoring/telespool-alerts.yml");
const DASHBOARD: &str = include_str!("../packaging/monitoring/telespool-dashboard.json");

/// A Prometheus server, killed on drop.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Scrapes `target` every second with the shipped rules loaded.
    /// Prometheus cannot listen on port 0 and report the port: take a free
    /// port from the kernel, release it, and pass it on.
    fn start(target: SocketAddr) -> Prometheus {
        let dir = ok(tempfile::tempdir());
        let rules =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/monitoring/telespool-alerts.yml");
        let config = dir.path().join("prometheus.yml");
        ok(std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {rules:?}\n\
                 scrape_configs:\n  - job_name: telespool\n    static_configs:\n      - targets: [\"{target}\"]\n",
                rules = rules.display().to_string()
            ),
        ));
        let addr = ok(ok(std::net::TcpListener::bind("127.0.0.1:0")).local_addr());
        let child = ok(Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn());
        Prometheus {
            child,
            addr,
            _dir: dir,
        }
    }

    /// `GET /api/v1/query?query=…`: the JSON `data.result` array.
    async fn query(&self, promql: &str) -> Result<Vec<serde_json::Value>, String> {
        let (status, body) = http_get(
            self.addr,
            &format!("/api/v1/query?query={}", urlencode(promql)),
        )
        .await?;
        let json: serde_json::Value =
            serde_json::from_str(&body).map_err(|e| format!("{promql}: {e}: {body}"))?;
        if status != 200 || json["status"] != "success" {
            return Err(format!("{promql}: {status} {body}"));
        }
        Ok(json["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// The single value of an instant query, if it has one.
    async fn scalar(&self, promql: &str) -> Option<f64> {
        let result = self.query(promql).await.ok()?;
        result.first()?["value"][1].as_str()?.parse().ok()
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Every `telespool_*` metric name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("telespool_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

/// The dashboard's queries, with its variables filled in.
fn dashboard_queries() -> Vec<String> {
    let dashboard: serde_json::Value = ok(serde_json::from_str(DASHBOARD));
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("expr");
            exprs.push(
                expr.replace("$__rate_interval", "1m")
                    .replace("$job", ".*")
                    .replace("$instance", ".*"),
            );
        }
    }
    exprs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scraping_an_agent_under_load_sees_every_series_the_rules_and_dashboard_use() {
    if Command::new("prometheus")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!(
            "SKIPPED: `prometheus` is not on PATH (apt-get install prometheus; .ci/run does)"
        );
        return;
    }
    let upstream = Upstream::start().await;
    let agent = start_agent(&upstream, "").await;
    let prometheus = Prometheus::start(agent.admin_addr());
    ok(eventually("prometheus ready", DEADLINE, || async {
        let (status, _) = http_get(prometheus.addr, "/-/ready").await.ok()?;
        (status == 200).then_some(())
    })
    .await);

    // Load: four SDK exporters at once, three signals.
    let endpoint = agent.grpc_endpoint();
    let senders: Vec<_> = (0..4)
        .map(|i| {
            let endpoint = endpoint.clone();
            tokio::spawn(async move {
                let spans = sdk::emit_spans(&endpoint, 1500 + i).await?;
                let logs = sdk::emit_logs(&endpoint, 200).await?;
                sdk::emit_metrics(&endpoint, 50).await?;
                Ok::<_, String>((spans.len(), logs.len()))
            })
        })
        .collect();
    let mut spans_sent = 0;
    for sender in senders {
        let (spans, _) = ok(ok(sender.await));
        spans_sent += spans;
    }
    ok(eventually("upstream has every span", DEADLINE, || async {
        (upstream.unique_ids(Signal::Traces).len() == spans_sent).then_some(())
    })
    .await);

    let accepted = "sum(telespool_received_items_total{job=\"telespool\",signal=\"traces\",outcome=\"accepted\"})";
    let seen = eventually(
        "prometheus has scraped the accepted spans",
        DEADLINE,
        || async {
            let v = prometheus.scalar(accepted).await?;
            (v as usize == spans_sent).then_some(v)
        },
    )
    .await;
    let last = prometheus.scalar(accepted).await;
    assert!(
        seen.is_ok(),
        "accepted spans in Prometheus: {last:?}, sent {spans_sent}"
    );

    // Every series the rules and the dashboard read exists.
    let names: BTreeSet<String> = metric_names(RULES)
        .into_iter()
        .chain(metric_names(DASHBOARD))
        .collect();
    assert!(names.len() >= 15, "{names:?}");
    let mut missing = Vec::new();
    for name in &names {
        let count = prometheus
            .scalar(&format!("count({{__name__=\"{name}\",job=\"telespool\"}})"))
            .await;
        if count.unwrap_or(0.0) < 1.0 {
            missing.push(name.clone());
        }
    }
    assert!(missing.is_empty(), "series not in Prometheus: {missing:?}");

    // Every dashboard query is valid PromQL and returns data (rates need
    // two scrapes in their window: poll).
    for expr in dashboard_queries() {
        ok(prometheus.query(&expr).await);
        if expr.contains("failing_since") {
            continue; // empty while upstream is up
        }
        let what = format!("data for {expr}");
        ok(eventually(&what, DEADLINE, || async {
            let result = prometheus.query(&expr).await.ok()?;
            (!result.is_empty()).then_some(())
        })
        .await);
    }

    // The server loaded the rules; none is broken, none fires.
    let (status, body) = ok(http_get(prometheus.addr, "/api/v1/rules").await);
    assert_eq!(status, 200, "{body}");
    let rules: serde_json::Value = ok(serde_json::from_str(&body));
    let loaded: Vec<(String, String)> = rules["data"]["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .map(|r| {
            (
                r["name"].as_str().unwrap_or("").to_owned(),
                r["health"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    assert_eq!(loaded.len(), 6, "{loaded:?}");
    for (name, health) in &loaded {
        assert!(health == "ok" || health == "unknown", "{name}: {health}");
    }
    let alerts = prometheus.query("ALERTS{alertstate=\"firing\"}").await;
    assert_eq!(
        ok(alerts),
        Vec::<serde_json::Value>::new(),
        "a healthy agent fires nothing"
    );
}
