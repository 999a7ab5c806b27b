//! End-to-end load bench: the release binary of telespool as a separate
//! process between a load generator and a counting sink, against a baseline
//! of the same load sent straight to the same sink, in the same run.
//!
//! ```text
//! cargo build --release && cargo bench --bench e2e                  # all scenarios, a few minutes
//! cargo bench --bench e2e -- --quick                               # ~30 s smoke run
//! cargo bench --bench e2e -- --scenario typical --runs 3           # medians of three runs
//! cargo bench --bench e2e -- --scenario typical --items 500 --concurrency 16
//! cargo bench --bench e2e -- --help
//! ```
//!
//! Without `--bench` (as `cargo test --all-targets` runs bench targets) it
//! exits at once. It never builds telespool: it runs `target/release/telespool`
//! and says so if that is missing or older than the sources.
//!
//! Per scenario it prints items/s and MB/s (acknowledged items over the time
//! from the first call until the sink holds them all), telespool's CPU-seconds
//! per million items (utime+stime from /proc/PID/stat, before the load and
//! after delivery), its peak RSS (VmHWM), client-side p50/p99 Export latency,
//! acknowledged vs delivered ids (after a SIGTERM drain), and telespool's
//! figures as ratios to the baseline. Loopback only; every load is bounded by
//! a request count and a duration.
//!
//! Transports: OTLP/gRPC over TCP (most scenarios), over a Unix socket
//! (`typical-uds`) and over TLS (`typical-tls`), and OTLP/HTTP (`typical-http`).
// Tests and benches drive real processes and sockets: wall-clock time,
// not tokio's (clippy.toml keeps std's Instant out of the agent's code).
#![allow(clippy::disallowed_types)]

#[path = "../tests/support/mod.rs"]
mod support;

#[path = "e2e/load.rs"]
mod load;
#[path = "e2e/procfs.rs"]
mod procfs;
#[path = "e2e/realistic.rs"]
mod realistic;
#[path = "e2e/replay.rs"]
mod replay;
#[path = "e2e/sink.rs"]
mod sink;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::Signal as UnixSignal;

use load::{Bodies, LoadReport, LoadSpec};
use sink::LeanSink;
use support::{AgentProcess, Mode, Signal, Upstream};

const MIB: f64 = 1024.0 * 1024.0;
/// How long to wait for the sink to hold every acknowledged item.
const DELIVERY_DEADLINE: Duration = Duration::from_secs(60);
/// How long telespool may take to exit after SIGTERM (its own hard
/// deadline, `shutdown.timeout`, is 20 s by default).
const EXIT_DEADLINE: Duration = Duration::from_secs(30);
/// The overload scenario's buffer bound and the allowance on top of it.
const OVERLOAD_BUFFER: u64 = 64 << 20;
const RSS_ALLOWANCE: u64 = 32 << 20;

/// `typical-stamped`: three static attributes, as an operator would stamp them.
const STAMPED: &str = "[resource]\nattributes = { \"deployment.environment\" = \"production\", \
    \"k8s.cluster.name\" = \"eu-west-1-prod\", \"host.name\" = \"node-0042.example.internal\" }\n";

const USAGE: &str = "\
usage: cargo bench --bench e2e -- [options]

  --quick              short runs (~30 s in all)
  --scenario NAME      run only NAME (repeatable, or comma-separated)
  --runs N             run each scenario N times and report medians (default 1)
  --list               list the scenarios and exit
  --bin PATH           telespool binary (default target/release/telespool)
  --before PATH        also run every throughput and compression scenario with
                       this binary (an older build), right after --bin's run in
                       each round; its rows are named \"before SCENARIO\"
  --sink lean|upstream sink for the throughput scenarios (default lean)
  load overrides for the throughput scenarios:
  --signal traces|metrics|logs  --concurrency N
  --items N            items per request (at most 10000)
  --payload realistic|synthetic|BYTES
                       realistic: HTTP-server-like spans, logs and metrics
                       (benches/e2e/realistic.rs); synthetic (today's items)
                       with a BYTES-long extra string attribute
  --compression LIST   compression-grpc/-http: the upstream compressions to
                       run (default none,gzip,zstd); overload and saturated:
                       the first of them (default gzip), so the memory bound
                       is checked with each
  --requests N         request count cap
  --duration SECS      duration cap
  --rate REQ_PER_S     rate cap over all clients

environment (the lean sink):
  E2E_SINK_RUNTIME=shared     the sink on the generator's runtime
  E2E_SINK_DELAY_MS=N         each gRPC answer held N ms
  E2E_SINK_H2_WINDOW=adaptive|BYTES
                       its HTTP/2 receive windows (default hyper's 1 MiB)";

/// Largest `--items` (per request): 10,000 realistic spans are ~5 MB.
const MAX_ITEMS_PER_REQUEST: usize = 10_000;

const SCENARIOS: &[(&str, &str)] = &[
    (
        "sink",
        "calibration: typical load straight to the lean sink and to the harness Upstream",
    ),
    ("small", "traces, 10 spans/request, no extra attribute"),
    ("typical", "traces, 100 spans/request, 200-byte attribute"),
    ("large", "traces, 1000 spans/request, no extra attribute"),
    ("metrics", "metrics, 100 points/request, 200-byte attribute"),
    ("logs", "logs, 100 records/request, 200-byte attribute"),
    (
        "typical-nogzip",
        "typical, with upstream.compression = \"none\"",
    ),
    (
        "typical-stamped",
        "typical, with three [resource] attributes stamped on every request (compare with typical in the same run)",
    ),
    (
        "typical-http",
        "typical over OTLP/HTTP (protobuf) into telespool; the baseline sends the same bodies over gRPC (the sink speaks gRPC only)",
    ),
    (
        "typical-uds",
        "typical over OTLP/gRPC on a Unix socket (receiver.grpc.unix_socket) into telespool; the baseline over TCP",
    ),
    (
        "typical-tls",
        "typical over OTLP/gRPC with TLS ([receiver.tls], certificates made by the bench) into telespool; the baseline in plaintext",
    ),
    (
        "durable-normal",
        "typical, durability = \"spool\", spool.synchronous = \"normal\"",
    ),
    (
        "durable-nogzip",
        "typical, durability = \"spool\", spool.synchronous = \"normal\", upstream.compression = \"none\" (compare with typical-nogzip)",
    ),
    (
        "durable-full",
        "typical, durability = \"spool\", spool.synchronous = \"full\" (fsync per commit)",
    ),
    (
        "outage",
        "typical at a capped rate; the sink is down for a stretch, then back",
    ),
    (
        "replay-live",
        "a 2 M-span (~1 GiB) spool backlog replayed while 50,000 spans/s of live load continue (400 K quick); not in the default set",
    ),
    (
        "soak",
        "10,000 spans/s for 3 minutes (30 s quick); the sink is down every other 15 s (5 s quick); not in the default set",
    ),
    (
        "overload",
        "32 clients of 1000-span requests into a stalled sink; buffer.max_bytes = 64MiB",
    ),
    (
        "saturated",
        "realistic typical load into an upstream that answers each export after 100 ms, so the buffer (64MiB) stays full: peak RSS against buffer.max_bytes + 32 MiB",
    ),
    (
        "compression-grpc",
        "realistic typical load, upstream.compression none / gzip / zstd (--compression) over a gRPC upstream: CPU per million spans as ratios against none, and the compression ratio",
    ),
    (
        "compression-http",
        "the same over an OTLP/HTTP upstream (upstream.protocol = \"http/protobuf\", the lean sink's /v1/*); the baseline sends over OTLP/HTTP straight to the sink",
    ),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SinkKind {
    Lean,
    Upstream,
}

#[derive(Clone, Debug, Default)]
struct Overrides {
    signal: Option<Signal>,
    concurrency: Option<usize>,
    items: Option<usize>,
    payload: Option<usize>,
    realistic: Option<bool>,
    requests: Option<usize>,
    duration: Option<Duration>,
    rate: Option<f64>,
}

#[derive(Clone, Debug)]
struct Options {
    quick: bool,
    scenarios: Vec<String>,
    runs: usize,
    bin: PathBuf,
    /// `--before`: a second binary run in each round, for before/after ratios.
    before: Option<PathBuf>,
    sink: SinkKind,
    overrides: Overrides,
    /// Upstream compressions of the compression-* scenarios.
    compressions: Vec<String>,
    /// Upstream compression of the memory scenarios (overload, saturated):
    /// the first of `--compression`, gzip (the default) without it.
    memory_compression: String,
}

fn parse_args(args: &[String]) -> Result<Option<Options>, String> {
    let mut o = Options {
        quick: false,
        scenarios: Vec::new(),
        runs: 1,
        bin: default_bin(),
        before: None,
        sink: SinkKind::Lean,
        overrides: Overrides::default(),
        compressions: ["none", "gzip", "zstd"].map(str::to_owned).to_vec(),
        memory_compression: "gzip".to_owned(),
    };
    let mut it = args.iter();
    fn value<'a>(it: &mut impl Iterator<Item = &'a String>, flag: &str) -> Result<&'a str, String> {
        it.next()
            .map(String::as_str)
            .ok_or_else(|| format!("{flag} needs a value"))
    }
    fn num<T: std::str::FromStr>(v: &str, flag: &str) -> Result<T, String> {
        v.parse()
            .map_err(|_| format!("{flag}: {v:?} is not a valid number"))
    }
    while let Some(arg) = it.next() {
        let a = arg.as_str();
        match a {
            "--bench" => {}
            "--help" | "-h" => {
                println!("{USAGE}");
                return Ok(None);
            }
            "--list" => {
                for (name, what) in SCENARIOS {
                    println!("{name:16} {what}");
                }
                return Ok(None);
            }
            "--quick" => o.quick = true,
            "--scenario" => o
                .scenarios
                .extend(value(&mut it, a)?.split(',').map(str::to_owned)),
            "--runs" => o.runs = num::<usize>(value(&mut it, a)?, a)?.max(1),
            "--bin" => o.bin = PathBuf::from(value(&mut it, a)?),
            "--before" => {
                // Absolute: the agent is started from a temporary directory.
                let path = PathBuf::from(value(&mut it, a)?);
                o.before = Some(std::path::absolute(&path).unwrap_or(path));
            }
            "--sink" => {
                o.sink = match value(&mut it, a)? {
                    "lean" => SinkKind::Lean,
                    "upstream" => SinkKind::Upstream,
                    v => return Err(format!("--sink: {v:?} is not `lean` or `upstream`")),
                }
            }
            "--signal" => {
                let v = value(&mut it, a)?;
                o.overrides.signal = Some(
                    v.parse()
                        .map_err(|_| format!("--signal: {v:?} is not traces, metrics or logs"))?,
                )
            }
            "--concurrency" => o.overrides.concurrency = Some(num(value(&mut it, a)?, a)?),
            "--items" => {
                let items: usize = num(value(&mut it, a)?, a)?;
                // Items per request, not per run: a 2,000,000-item request
                // is ~1 GB encoded, built in memory before the run.
                if items > MAX_ITEMS_PER_REQUEST {
                    return Err(format!(
                        "--items {items}: that is items per request (at most \
                         {MAX_ITEMS_PER_REQUEST}; the agent refuses requests over 4 MiB \
                         by default); --requests and --duration make a run longer"
                    ));
                }
                o.overrides.items = Some(items)
            }
            "--payload" => match value(&mut it, a)? {
                "realistic" => o.overrides.realistic = Some(true),
                "synthetic" => o.overrides.realistic = Some(false),
                v => {
                    o.overrides.payload = Some(num(v, a)?);
                    o.overrides.realistic = Some(false);
                }
            },
            "--compression" => {
                o.compressions = Vec::new();
                for c in value(&mut it, a)?.split(',') {
                    match c {
                        "none" | "gzip" | "zstd" => o.compressions.push(c.to_owned()),
                        v => return Err(format!("--compression: {v:?} is not none, gzip or zstd")),
                    }
                }
                o.memory_compression.clone_from(&o.compressions[0]);
            }
            "--requests" => o.overrides.requests = Some(num(value(&mut it, a)?, a)?),
            "--duration" => {
                o.overrides.duration = Some(Duration::from_secs_f64(num(value(&mut it, a)?, a)?))
            }
            "--rate" => o.overrides.rate = Some(num(value(&mut it, a)?, a)?),
            other => return Err(format!("unknown option {other:?}\n{USAGE}")),
        }
    }
    for name in &o.scenarios {
        if !SCENARIOS.iter().any(|(n, _)| n == name) {
            let names: Vec<&str> = SCENARIOS.iter().map(|(n, _)| *n).collect();
            return Err(format!(
                "unknown scenario {name:?}; known: {}",
                names.join(", ")
            ));
        }
    }
    Ok(Some(o))
}

fn default_bin() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("release").join("telespool")
}

/// Newest modification time of the files under `dir` (recursively).
fn newest_mtime(dir: &Path) -> Option<SystemTime> {
    let mut newest = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let t = if path.is_dir() {
            newest_mtime(&path)
        } else {
            entry.metadata().and_then(|m| m.modified()).ok()
        };
        newest = newest.max(t);
    }
    newest
}

fn check_binary(bin: &Path) -> Result<(), String> {
    let meta = std::fs::metadata(bin).map_err(|e| {
        format!(
            "the e2e bench runs the release binary {} but cannot use it ({e}).\n\
             Build it first: cargo build --release && cargo bench --bench e2e",
            bin.display()
        )
    })?;
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let sources = newest_mtime(&manifest.join("src"));
    if let (Ok(built), Some(src)) = (meta.modified(), sources) {
        if src > built {
            eprintln!(
                "warning: {} is older than the newest file in src/; \
                 run `cargo build --release` to measure the current code",
                bin.display()
            );
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `cargo test --all-targets` runs harness = false benches without --bench.
    if !args.iter().any(|a| a == "--bench") {
        return ExitCode::SUCCESS;
    }
    let options = match parse_args(&args) {
        Ok(Some(o)) => o,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("e2e: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(before) = options.before.as_ref().filter(|b| !b.exists()) {
        eprintln!("e2e: --before {}: no such file", before.display());
        return ExitCode::from(2);
    }
    if let Err(e) = check_binary(&options.bin) {
        eprintln!("e2e: {e}");
        return ExitCode::from(2);
    }
    // One worker per core, whatever TOKIO_WORKER_THREADS says: that
    // variable is for the agents the bench starts (they inherit it).
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .thread_name("e2e")
        .build()
        .expect("build tokio runtime");
    match runtime.block_on(run_all(&options)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("e2e: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Figures of one load run (baseline or through telespool).
#[derive(Clone, Debug, Default)]
struct Figures {
    /// Acknowledged items per second, until the sink held them all.
    items_s: f64,
    /// Items the sink held when the last call was answered, per second of
    /// the load: throughput without the agent's last `batch.timeout`.
    live_items_s: f64,
    /// From the last answer to the sink holding every acknowledged item.
    tail: Duration,
    mb_s: f64,
    p50: Duration,
    p99: Duration,
    acked: u64,
    delivered: Delivery,
    errors: String,
    /// Telespool only.
    cpu_per_m: Option<f64>,
    /// The generator's and sink's CPU and the machine's, over the run.
    machine: Option<procfs::CpuUse>,
    peak_rss: Option<u64>,
    summary: Option<String>,
}

/// Acknowledged ids compared with the ids the sink received.
#[derive(Clone, Debug, Default)]
struct Delivery {
    /// Distinct acknowledged ids the sink received.
    unique: u64,
    /// Items received more than once.
    duplicates: u64,
    /// Acknowledged ids the sink never received (lost).
    missing: u64,
    /// Ids received that were not acknowledged (refused or cut calls whose
    /// data still went through: allowed, at-least-once).
    unacked: u64,
}

impl Delivery {
    fn compare(bodies: &Bodies, acked: &[usize], received: &[u64]) -> Delivery {
        let total = bodies.bodies.len() * bodies.items;
        let mut seen = vec![0u32; total];
        let mut d = Delivery::default();
        for &id in received {
            match bodies.index_of(id) {
                Some(i) => seen[i] += 1,
                None => d.unacked += 1,
            }
        }
        let mut is_acked = vec![false; total];
        for &j in acked {
            for id in bodies.ids_of(j) {
                is_acked[(id - bodies.first_id) as usize] = true;
            }
        }
        for (i, &n) in seen.iter().enumerate() {
            d.duplicates += n.saturating_sub(1) as u64;
            match (is_acked[i], n > 0) {
                (true, true) => d.unique += 1,
                (true, false) => d.missing += 1,
                (false, true) => d.unacked += 1,
                (false, false) => {}
            }
        }
        d
    }

    fn text(&self, acked: u64) -> String {
        let verdict = if self.missing == 0 { "OK" } else { "LOST DATA" };
        format!(
            "acked {acked}, delivered {} ({} missing, {} duplicates, {} unacked extra): {verdict}",
            self.unique, self.missing, self.duplicates, self.unacked
        )
    }
}

/// A sink the bench can point load at.
enum Sink {
    Lean(LeanSink),
    Full(Upstream),
}

impl Sink {
    async fn start(kind: SinkKind) -> Result<Sink, String> {
        Ok(match kind {
            SinkKind::Lean => Sink::Lean(LeanSink::start_apart().await?),
            SinkKind::Upstream => Sink::Full(Upstream::start().await),
        })
    }
    fn addr(&self) -> SocketAddr {
        match self {
            Sink::Lean(s) => s.addr(),
            Sink::Full(u) => u.addr(),
        }
    }
    fn endpoint(&self) -> String {
        format!("http://{}", self.addr())
    }
    fn items(&self, signal: Signal) -> u64 {
        match self {
            Sink::Lean(s) => s.items(),
            Sink::Full(u) => u.accepted_sizes(signal).iter().sum::<usize>() as u64,
        }
    }
    fn ids(&self, signal: Signal) -> Vec<u64> {
        match self {
            Sink::Lean(s) => s.ids(signal),
            Sink::Full(u) => u.received_ids(signal),
        }
    }
    fn clear(&self) {
        match self {
            Sink::Lean(s) => s.clear(),
            Sink::Full(u) => u.clear(),
        }
    }
}

/// Waits until the sink holds at least `n` items; the instant it did, or
/// `None` after the deadline.
async fn wait_delivered(sink: &Sink, signal: Signal, n: u64) -> Option<Instant> {
    let started = Instant::now();
    loop {
        if sink.items(signal) >= n {
            return Some(Instant::now());
        }
        if started.elapsed() >= DELIVERY_DEADLINE {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn rates(report: &LoadReport, started: Instant, delivered_at: Option<Instant>) -> (f64, f64) {
    let end = delivered_at.unwrap_or_else(Instant::now);
    let secs = end.duration_since(started).as_secs_f64().max(1e-9);
    (
        report.acked_items as f64 / secs,
        report.acked_bytes as f64 / MIB / secs,
    )
}

/// What the sink held when the load's last call was answered.
struct Live {
    at: Instant,
    items_s: f64,
}

impl Live {
    fn now(sink: &Sink, signal: Signal, started: Instant) -> Live {
        let at = Instant::now();
        let secs = at.duration_since(started).as_secs_f64().max(1e-9);
        Live {
            at,
            items_s: sink.items(signal) as f64 / secs,
        }
    }

    fn tail(&self, delivered_at: Option<Instant>) -> Duration {
        delivered_at
            .unwrap_or_else(Instant::now)
            .saturating_duration_since(self.at)
    }
}

/// Sends the load straight to the sink.
async fn baseline(sink: &Sink, spec: &LoadSpec, bodies: &Arc<Bodies>) -> Figures {
    // The baseline sends over gRPC (the harness Upstream speaks nothing else).
    baseline_to(sink, sink.addr(), false, spec, bodies).await
}

/// Sends the load straight to the sink at `addr`, over OTLP/HTTP or gRPC.
async fn baseline_to(
    sink: &Sink,
    addr: SocketAddr,
    http: bool,
    spec: &LoadSpec,
    bodies: &Arc<Bodies>,
) -> Figures {
    sink.clear();
    let meter = procfs::CpuMeter::start();
    let started = Instant::now();
    let direct_spec = LoadSpec {
        http,
        channel: None,
        ..spec.clone()
    };
    let report = load::run(addr, &direct_spec, bodies.clone()).await;
    let live = Live::now(sink, spec.signal, started);
    let delivered_at = wait_delivered(sink, spec.signal, report.acked_items).await;
    let machine = meter.and_then(|m| m.finish(report.acked_items)).ok();
    let (items_s, mb_s) = rates(&report, started, delivered_at);
    Figures {
        machine,
        live_items_s: live.items_s,
        tail: live.tail(delivered_at),
        items_s,
        mb_s,
        p50: report.latency(0.5),
        p99: report.latency(0.99),
        acked: report.acked_items,
        delivered: Delivery::compare(bodies, &report.acked, &sink.ids(spec.signal)),
        errors: report.errors_text(),
        ..Figures::default()
    }
}

fn agent_config(compression: &str, extra: &str) -> String {
    // `extra` first: its top-level keys (durability) must precede any table.
    format!("{extra}\n[upstream]\ncompression = \"{compression}\"\n")
}

async fn start_agent(bin: &Path, endpoint: &str, config: &str) -> Result<AgentProcess, String> {
    AgentProcess::builder()
        .program(bin, &[])
        .upstream(endpoint)
        .config_toml(config)
        .start()
        .await
}

/// SIGTERM, wait for the exit, return the `shutdown complete` line.
async fn stop_agent(agent: &mut AgentProcess) -> String {
    agent.signal(UnixSignal::SIGTERM);
    let status = agent.wait_exit(EXIT_DEADLINE).await;
    let line = agent
        .summary_line()
        .unwrap_or_else(|| "(no `shutdown complete` line)".into());
    match status {
        Some(s) if s.success() => line,
        Some(s) => format!("{line} [exit: {s}]"),
        None => format!("{line} [did not exit within {EXIT_DEADLINE:?}; killed]"),
    }
}

/// Sends the same load through telespool to the same sink; `during` runs
/// alongside the load (for scenarios that change the sink mid-run).
async fn through_telespool<F>(
    options: &Options,
    sink: &Sink,
    config: &str,
    spec: &LoadSpec,
    bodies: &Arc<Bodies>,
    during: F,
) -> Result<Figures, String>
where
    F: std::future::Future<Output = ()>,
{
    through_telespool_to(options, sink, None, config, spec, bodies, during).await
}

/// [`through_telespool`] with the agent's `upstream.endpoint` given (default:
/// the sink's gRPC address).
async fn through_telespool_to<F>(
    options: &Options,
    sink: &Sink,
    endpoint: Option<String>,
    config: &str,
    spec: &LoadSpec,
    bodies: &Arc<Bodies>,
    during: F,
) -> Result<Figures, String>
where
    F: std::future::Future<Output = ()>,
{
    sink.clear();
    let endpoint = endpoint.unwrap_or_else(|| sink.endpoint());
    let mut agent = start_agent(&options.bin, &endpoint, config).await?;
    let pid = agent.pid();
    let ticks = procfs::clock_ticks();
    let cpu0 = procfs::cpu_time(pid, ticks)?;
    let meter = procfs::CpuMeter::start()?;
    let started = Instant::now();
    let addr = if spec.http {
        agent.http_addr()
    } else {
        agent.grpc_addr()
    };
    let (report, ()) = tokio::join!(load::run(addr, spec, bodies.clone()), during);
    let live = Live::now(sink, spec.signal, started);
    let delivered_at = wait_delivered(sink, spec.signal, report.acked_items).await;
    let cpu1 = procfs::cpu_time(pid, ticks)?;
    let machine = Some(meter.finish(report.acked_items)?);
    let peak_rss = procfs::status_bytes(pid, "VmHWM")?;
    let summary = stop_agent(&mut agent).await;
    // SQLite reuses freed pages and never shrinks the file: its size after the
    // run is the spool's high-water mark.
    let spool_bytes = std::fs::metadata(agent.spool_path()).map_or(0, |m| m.len());
    let summary = format!(
        "{summary}\n              spool file high-water mark: {:.1} MiB",
        spool_bytes as f64 / MIB
    );
    let (items_s, mb_s) = rates(&report, started, delivered_at);
    let cpu = (cpu1 - cpu0).as_secs_f64();
    Ok(Figures {
        machine,
        live_items_s: live.items_s,
        tail: live.tail(delivered_at),
        items_s,
        mb_s,
        p50: report.latency(0.5),
        p99: report.latency(0.99),
        acked: report.acked_items,
        delivered: Delivery::compare(bodies, &report.acked, &sink.ids(spec.signal)),
        errors: report.errors_text(),
        cpu_per_m: (report.acked_items > 0).then(|| cpu / (report.acked_items as f64 / 1e6)),
        peak_rss: Some(peak_rss),
        summary: Some(summary),
    })
}

/// One scenario's result in one run.
#[derive(Clone, Debug)]
struct Row {
    scenario: String,
    base: Figures,
    tele: Figures,
    /// Scenario-specific lines.
    notes: Vec<String>,
    /// The overload scenario's verdict on peak RSS.
    rss_bound: Option<(u64, bool)>,
    /// compression-* scenarios: the upstream compression and the ratio
    /// (decompressed / wire bytes) the sink saw.
    compression: Option<(String, f64)>,
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}", a / b)
    } else {
        "n/a".into()
    }
}

fn print_row(row: &Row, spec: &LoadSpec, bodies: &Bodies) {
    let (b, t) = (&row.base, &row.tele);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "== {}: {} × {} items/request, {} B/request, {} clients, {} requests max, {:?} max{}",
        row.scenario,
        spec.signal,
        spec.items,
        bodies.mean_len(),
        spec.concurrency,
        bodies.bodies.len(),
        spec.duration,
        spec.rate
            .map(|r| format!(", rate cap {r} req/s"))
            .unwrap_or_default()
    );
    let _ = writeln!(
        s,
        "   payload  : {}; {}",
        if bodies.realistic {
            "realistic"
        } else {
            "synthetic"
        },
        bodies.compression_text()
    );
    let _ = writeln!(
        s,
        "   baseline : {:>10.0} items/s {:>8.1} MB/s  p50 {} ms  p99 {} ms  errors {}",
        b.items_s,
        b.mb_s,
        ms(b.p50),
        ms(b.p99),
        b.errors
    );
    let _ = writeln!(s, "              {}", b.delivered.text(b.acked));
    let _ = writeln!(
        s,
        "   telespool: {:>10.0} items/s {:>8.1} MB/s  p50 {} ms  p99 {} ms  errors {}",
        t.items_s,
        t.mb_s,
        ms(t.p50),
        ms(t.p99),
        t.errors
    );
    if let (Some(cpu), Some(rss)) = (t.cpu_per_m, t.peak_rss) {
        let _ = writeln!(
            s,
            "              CPU {cpu:.3} core-s per million items, peak RSS {:.1} MiB",
            rss as f64 / MIB
        );
    }
    let _ = writeln!(s, "              {}", t.delivered.text(t.acked));
    if let Some(summary) = &t.summary {
        let _ = writeln!(s, "              agent: {summary}");
    }
    if b.live_items_s > 0.0 && t.live_items_s > 0.0 {
        let _ = writeln!(
            s,
            "   while sending: baseline {:.0}, telespool {:.0} items/s delivered (ratio {}); \
         everything delivered {} / {} ms after the last answer",
            b.live_items_s,
            t.live_items_s,
            ratio(t.live_items_s, b.live_items_s),
            ms(b.tail),
            ms(t.tail),
        );
    }
    let _ = writeln!(
        s,
        "   ratio    : items/s {}  p50 latency {}  p99 latency {}",
        ratio(t.items_s, b.items_s),
        ratio(t.p50.as_secs_f64(), b.p50.as_secs_f64()),
        ratio(t.p99.as_secs_f64(), b.p99.as_secs_f64()),
    );
    if let Some(line) = cpu_budget(b, t) {
        let _ = writeln!(s, "{line}");
    }
    for note in &row.notes {
        let _ = writeln!(s, "   {note}");
    }
    println!("{s}");
}

/// Where the machine's cores went in the two runs, and what that leaves the
/// agent: with the cores busy in both runs, items/s go as the inverse of the
/// machine's CPU per item, so telespool reaches 95 % of the direct items/s
/// only if the agent's CPU per item is at most the direct run's machine CPU
/// per item / 0.95 less what the generator, the sink and the kernel spent
/// beside the agent in its run.
fn cpu_budget(b: &Figures, t: &Figures) -> Option<String> {
    let (base, tele, agent) = (b.machine?, t.machine?, t.cpu_per_m?);
    let beside = (tele.machine_per_m - agent).max(0.0);
    let room = (base.machine_per_m / 0.95 - beside).max(0.0);
    Some(format!(
        "   cores    : baseline {:.2} busy, machine {:.3} CPU-s per M items (bench process {:.3}); \
         telespool {:.2} busy, machine {:.3} (bench process {:.3}, agent {agent:.3}, rest {:.3})\n   \
                    agent CPU that 95 % of the baseline's items/s leaves on these cores: {room:.3} CPU-s per M items",
        base.busy_cores,
        base.machine_per_m,
        base.bench_per_m,
        tele.busy_cores,
        tele.machine_per_m,
        tele.bench_per_m,
        (beside - tele.bench_per_m).max(0.0),
    ))
}

/// The load of a scenario, before overrides; scaled down by `--quick`.
fn scenario_spec(name: &str, quick: bool) -> LoadSpec {
    // Full runs send about a million items per run, quick runs a fifth.
    let items_per_run = if quick { 200_000 } else { 1_000_000 };
    let duration = Duration::from_secs(if quick { 10 } else { 30 });
    let spec = |signal, items: usize, payload| LoadSpec {
        signal,
        concurrency: 8,
        items,
        payload,
        realistic: false,
        requests: items_per_run / items,
        duration,
        rate: None,
        http: false,
        channel: None,
    };
    match name {
        "small" => spec(Signal::Traces, 10, 0),
        "large" => spec(Signal::Traces, 1000, 0),
        "metrics" => spec(Signal::Metrics, 100, 200),
        "logs" => spec(Signal::Logs, 100, 200),
        "outage" => {
            // 10 000 items/s for 12 s (6 s quick).
            let secs = if quick { 6 } else { 12 };
            LoadSpec {
                concurrency: 4,
                requests: 100 * secs,
                duration: Duration::from_secs(secs as u64),
                rate: Some(100.0),
                ..spec(Signal::Traces, 100, 200)
            }
        }
        "soak" => {
            let secs: usize = if quick { 30 } else { 180 };
            LoadSpec {
                concurrency: 4,
                requests: 100 * secs,
                duration: Duration::from_secs(secs as u64),
                rate: Some(100.0),
                ..spec(Signal::Traces, 100, 200)
            }
        }
        "overload" => LoadSpec {
            concurrency: 32,
            // Bounded by time (the stall) more than by count.
            requests: if quick { 500 } else { 1_200 },
            duration: Duration::from_secs(if quick { 5 } else { 8 }),
            ..spec(Signal::Traces, 1000, 200)
        },
        "saturated" => LoadSpec {
            realistic: true,
            // ~1.5 GiB of requests offered, against a 64 MiB buffer.
            requests: if quick { 6_000 } else { 30_000 },
            duration: Duration::from_secs(if quick { 5 } else { 15 }),
            ..spec(Signal::Traces, 100, 200)
        },
        "typical-http" => LoadSpec {
            http: true,
            ..spec(Signal::Traces, 100, 200)
        },
        "compression-grpc" | "compression-http" => LoadSpec {
            realistic: true,
            ..spec(Signal::Traces, 100, 200)
        },
        // "typical", "typical-nogzip", "typical-stamped", "sink"
        _ => spec(Signal::Traces, 100, 200),
    }
}

fn apply(mut spec: LoadSpec, o: &Overrides) -> LoadSpec {
    if let Some(v) = o.signal {
        spec.signal = v;
    }
    if let Some(v) = o.items {
        spec.items = v.max(1);
        spec.requests = (spec.requests * spec.items.max(1)) / v.max(1);
    }
    if let Some(v) = o.concurrency {
        spec.concurrency = v.max(1);
    }
    if let Some(v) = o.payload {
        spec.payload = v;
    }
    if let Some(v) = o.realistic {
        spec.realistic = v;
    }
    if let Some(v) = o.requests {
        spec.requests = v.max(1);
    }
    if let Some(v) = o.duration {
        spec.duration = v;
    }
    if o.rate.is_some() {
        spec.rate = o.rate;
    }
    spec
}

fn build_bodies(spec: &LoadSpec) -> Arc<Bodies> {
    let t = Instant::now();
    let bodies = Bodies::build(spec, 1);
    eprintln!(
        "[e2e] built {} request bodies ({:.1} MiB) in {:.1?}",
        bodies.bodies.len(),
        (bodies.bodies.len() * bodies.mean_len()) as f64 / MIB,
        t.elapsed()
    );
    Arc::new(bodies)
}

async fn throughput(
    options: &Options,
    name: &str,
    spec: &LoadSpec,
    bodies: &Arc<Bodies>,
) -> Result<Row, String> {
    let compression = if name == "typical-nogzip" || name == "durable-nogzip" {
        "none"
    } else {
        "gzip"
    };
    // Files for the Unix socket and the TLS certificates; removed at the end.
    let dir = tempfile::TempDir::new().map_err(|e| format!("temp dir: {e}"))?;
    let (extra, channel) = match name {
        "durable-normal" | "durable-nogzip" => (
            "durability = \"spool\"\n[spool]\nsynchronous = \"normal\"\n".to_owned(),
            None,
        ),
        "durable-full" => (
            "durability = \"spool\"\n[spool]\nsynchronous = \"full\"\n".to_owned(),
            None,
        ),
        "typical-stamped" => (STAMPED.to_owned(), None),
        "typical-uds" => {
            let path = dir.path().join("otlp.sock");
            let extra = format!(
                "[receiver.grpc]\nunix_socket = {}\n",
                support::tls::toml_path(&path)
            );
            let maker = move |_| support::client::unix_channel(&path);
            (extra, Some(load::ChannelMaker(Arc::new(maker))))
        }
        "typical-tls" => {
            let ca = support::tls::TestCa::new("telespool bench CA");
            let pem = support::tls::PemFiles::write(dir.path(), "server", &ca.server_cert(), &ca);
            let extra = format!(
                "[receiver.tls]\ncert_file = {}\nkey_file = {}\n",
                support::tls::toml_path(&pem.cert),
                support::tls::toml_path(&pem.key)
            );
            let ca = Arc::new(ca);
            let maker = move |addr| support::tls::grpc_channel(addr, &ca, None);
            (extra, Some(load::ChannelMaker(Arc::new(maker))))
        }
        _ => (String::new(), None),
    };
    let sink = Sink::start(options.sink).await?;
    let base = baseline(&sink, spec, bodies).await;
    let config = agent_config(compression, &extra);
    let tele_spec = LoadSpec {
        channel,
        ..spec.clone()
    };
    let tele = through_telespool(options, &sink, &config, &tele_spec, bodies, async {}).await?;
    Ok(Row {
        scenario: name.to_owned(),
        base,
        tele,
        notes: vec![format!(
            "sink: {:?}; upstream.compression = {compression:?}; {}",
            options.sink,
            extra.replace('\n', " ")
        )],
        rss_bound: None,
        compression: None,
    })
}

/// The same load to both sinks, no telespool: how much the sink itself costs.
async fn sink_calibration(spec: &LoadSpec, bodies: &Arc<Bodies>) -> Result<Row, String> {
    let ticks = procfs::clock_ticks();
    let me = std::process::id();
    let mut figures = Vec::new();
    for kind in [SinkKind::Lean, SinkKind::Upstream] {
        let sink = Sink::start(kind).await?;
        let cpu0 = procfs::cpu_time(me, ticks).unwrap_or_default();
        let mut f = baseline(&sink, spec, bodies).await;
        let cpu = (procfs::cpu_time(me, ticks).unwrap_or_default() - cpu0).as_secs_f64();
        f.cpu_per_m = (f.acked > 0).then(|| cpu / (f.acked as f64 / 1e6));
        figures.push(f);
    }
    let (lean, full) = (figures[0].clone(), figures[1].clone());
    let note = format!(
        "bench process (generator + sink) CPU per million items: lean {:.3} s, Upstream {:.3} s",
        lean.cpu_per_m.unwrap_or(0.0),
        full.cpu_per_m.unwrap_or(0.0)
    );
    Ok(Row {
        scenario: "sink".into(),
        base: lean,
        tele: full,
        notes: vec![
            "(here `baseline` = lean sink, `telespool` = harness Upstream sink; no agent)".into(),
            note,
        ],
        rss_bound: None,
        compression: None,
    })
}

/// Stops the sink at `down`, restarts it at `up` (both from now).
async fn outage_schedule(upstream: &Upstream, down: Duration, up: Duration) {
    tokio::time::sleep(down).await;
    eprintln!("[e2e] outage: stopping the sink");
    upstream.stop().await;
    tokio::time::sleep(up.saturating_sub(down)).await;
    eprintln!("[e2e] outage: restarting the sink");
    upstream.restart().await;
}

/// Down and up in turns of `turn`, starting up, until `total` has passed.
async fn flapping_schedule(upstream: &Upstream, turn: Duration, total: Duration) {
    let started = Instant::now();
    let mut up = true;
    while started.elapsed() + turn <= total {
        tokio::time::sleep(turn).await;
        if up {
            eprintln!("[e2e] soak: stopping the sink");
            upstream.stop().await;
        } else {
            eprintln!("[e2e] soak: restarting the sink");
            upstream.restart().await;
        }
        up = !up;
    }
    if !up {
        upstream.restart().await;
    }
}

/// A bounded soak: steady load with the sink down half the time, through
/// telespool only (a client straight to a flapping sink loses data by design).
async fn soak(options: &Options, spec: &LoadSpec, bodies: &Arc<Bodies>) -> Result<Row, String> {
    let turn = if options.quick {
        Duration::from_secs(5)
    } else {
        Duration::from_secs(15)
    };
    let upstream = Upstream::start().await;
    let sink = Sink::Full(upstream);
    let Sink::Full(u) = &sink else { unreachable!() };
    sink.clear();
    let config = agent_config("gzip", "[upstream.retry]\nmax_backoff = \"2s\"\n");
    let tele = through_telespool(
        options,
        &sink,
        &config,
        spec,
        bodies,
        flapping_schedule(u, turn, spec.duration),
    )
    .await?;
    Ok(Row {
        scenario: "soak".into(),
        base: Figures::default(),
        tele,
        notes: vec![format!(
            "sink down every other {turn:?}; the agent's summary line gives items spooled and replayed"
        )],
        rss_bound: None,
        compression: None,
    })
}

async fn outage(options: &Options, spec: &LoadSpec, bodies: &Arc<Bodies>) -> Result<Row, String> {
    let down = spec.duration / 4;
    let up = spec.duration * 2 / 3;
    let upstream = Upstream::start().await;
    let sink = Sink::Full(upstream);
    let Sink::Full(u) = &sink else { unreachable!() };
    sink.clear();
    let started = Instant::now();
    let (report, ()) = tokio::join!(
        load::run(sink.addr(), spec, bodies.clone()),
        outage_schedule(u, down, up)
    );
    let delivered_at = wait_delivered(&sink, spec.signal, report.acked_items).await;
    let (items_s, mb_s) = rates(&report, started, delivered_at);
    let base = Figures {
        items_s,
        mb_s,
        p50: report.latency(0.5),
        p99: report.latency(0.99),
        acked: report.acked_items,
        delivered: Delivery::compare(bodies, &report.acked, &sink.ids(spec.signal)),
        errors: report.errors_text(),
        ..Figures::default()
    };
    // Retry quickly enough that the scenario does not wait out a 30 s backoff.
    let config = agent_config("gzip", "[upstream.retry]\nmax_backoff = \"2s\"\n");
    let tele = through_telespool(
        options,
        &sink,
        &config,
        spec,
        bodies,
        outage_schedule(u, down, up),
    )
    .await?;
    Ok(Row {
        scenario: "outage".into(),
        base,
        tele,
        notes: vec![format!(
            "sink down from {down:?} to {up:?} after the load starts; \
             upstream.retry.max_backoff = 2s; the generator does not retry refused calls"
        )],
        rss_bound: None,
        compression: None,
    })
}

/// Stalls the sink for `stall`, then makes it healthy.
async fn stall_schedule(upstream: &Upstream, stall: Duration) {
    upstream.set_mode(Mode::Stall);
    tokio::time::sleep(stall).await;
    upstream.set_mode(Mode::Healthy);
}

async fn overload(options: &Options, spec: &LoadSpec, bodies: &Arc<Bodies>) -> Result<Row, String> {
    let stall = spec.duration;
    let sink = Sink::Full(Upstream::start().await);
    let Sink::Full(u) = &sink else { unreachable!() };
    // Baseline: the same clients straight into the stalled sink.
    sink.clear();
    let started = Instant::now();
    let (report, ()) = tokio::join!(
        load::run(sink.addr(), spec, bodies.clone()),
        stall_schedule(u, stall)
    );
    let delivered_at = wait_delivered(&sink, spec.signal, report.acked_items).await;
    let (items_s, mb_s) = rates(&report, started, delivered_at);
    let base = Figures {
        items_s,
        mb_s,
        p50: report.latency(0.5),
        p99: report.latency(0.99),
        acked: report.acked_items,
        delivered: Delivery::compare(bodies, &report.acked, &sink.ids(spec.signal)),
        errors: report.errors_text(),
        ..Figures::default()
    };
    let config = agent_config(
        &options.memory_compression,
        &format!("[buffer]\nmax_bytes = {OVERLOAD_BUFFER}\n"),
    );
    let tele = through_telespool(
        options,
        &sink,
        &config,
        spec,
        bodies,
        stall_schedule(u, stall),
    )
    .await?;
    let bound = OVERLOAD_BUFFER + RSS_ALLOWANCE;
    let peak = tele.peak_rss.unwrap_or(u64::MAX);
    let offered = bodies.bodies.len().min(spec.requests) as f64 * bodies.mean_len() as f64;
    Ok(Row {
        scenario: "overload".into(),
        base,
        tele,
        notes: vec![
            format!(
                "sink stalled for the first {stall:?}, then healthy; {:.0} MiB of requests \
                 available to send (at most) against a {} MiB buffer; upstream.compression = {:?}",
                offered / MIB,
                OVERLOAD_BUFFER >> 20,
                options.memory_compression
            ),
            format!(
                "peak RSS {:.1} MiB vs bound buffer.max_bytes + 32 MiB = {} MiB: {}",
                peak as f64 / MIB,
                bound >> 20,
                if peak <= bound { "within" } else { "EXCEEDED" }
            ),
        ],
        rss_bound: Some((bound, peak <= bound)),
        compression: None,
    })
}

/// How long the `saturated` scenario's upstream takes to answer an export.
const SLOW_UPSTREAM: Duration = Duration::from_millis(100);

/// The load into an upstream slower than the clients (4 exports of at most
/// 4 MiB in flight, each answered after [`SLOW_UPSTREAM`]: ~160 MiB/s), so
/// the agent's buffer stays full for the whole run while batches come and
/// go: the agent's peak RSS against `buffer.max_bytes` + 32 MiB. Clients
/// that find no room are refused (UNAVAILABLE) and move on; what was
/// acknowledged must all arrive.
async fn saturated(
    options: &Options,
    spec: &LoadSpec,
    bodies: &Arc<Bodies>,
) -> Result<Row, String> {
    let sink = Sink::Full(Upstream::start_with(Mode::Delay(SLOW_UPSTREAM)).await);
    let base = baseline(&sink, spec, bodies).await;
    let config = agent_config(
        &options.memory_compression,
        &format!("[buffer]\nmax_bytes = {OVERLOAD_BUFFER}\n"),
    );
    let tele = through_telespool(options, &sink, &config, spec, bodies, async {}).await?;
    let bound = OVERLOAD_BUFFER + RSS_ALLOWANCE;
    let peak = tele.peak_rss.unwrap_or(u64::MAX);
    Ok(Row {
        scenario: "saturated".into(),
        base,
        tele,
        notes: vec![format!(
            "upstream answers each export after {SLOW_UPSTREAM:?}, upstream.compression = {:?}; \
             peak RSS {:.1} MiB vs bound buffer.max_bytes + 32 MiB = {} MiB: {}",
            options.memory_compression,
            peak as f64 / MIB,
            bound >> 20,
            if peak <= bound { "within" } else { "EXCEEDED" }
        )],
        rss_bound: Some((bound, peak <= bound)),
        compression: None,
    })
}

/// The same realistic load through telespool once per upstream compression
/// (`--compression`, default none, gzip, zstd), over a gRPC or an OTLP/HTTP
/// upstream, against one baseline; each row notes its CPU per million items
/// as a ratio against `none` and the compression ratio the sink saw.
async fn compression(
    options: &Options,
    name: &str,
    spec: &LoadSpec,
    bodies: &Arc<Bodies>,
) -> Result<Vec<Row>, String> {
    let http = name == "compression-http";
    let lean = LeanSink::start_apart().await?;
    let http_addr = lean.http_addr();
    let http_endpoint = format!("http://{http_addr}");
    let sink = Sink::Lean(lean);
    // Baseline: the load straight to the sink over the upstream's protocol.
    let base = match http {
        true => baseline_to(&sink, http_addr, true, spec, bodies).await,
        false => baseline(&sink, spec, bodies).await,
    };
    eprintln!(
        "[e2e] {name} baseline ({}): {:.0} items/s, {}",
        if http { "OTLP/HTTP" } else { "gRPC" },
        base.items_s,
        base.delivered.text(base.acked)
    );
    let mut rows: Vec<Row> = Vec::new();
    for c in &options.compressions {
        let (endpoint, config) = match http {
            false => (None, format!("[upstream]\ncompression = \"{c}\"\n")),
            true => (
                Some(http_endpoint.clone()),
                format!("[upstream]\nprotocol = \"http/protobuf\"\ncompression = \"{c}\"\n"),
            ),
        };
        let tele =
            through_telespool_to(options, &sink, endpoint, &config, spec, bodies, async {}).await?;
        let Sink::Lean(lean) = &sink else {
            unreachable!("compression scenarios use the lean sink")
        };
        let wire_ratio = lean.compression_ratio();
        rows.push(Row {
            scenario: format!("{name}:{c}"),
            base: base.clone(),
            tele,
            notes: vec![format!(
                "upstream {}, upstream.compression = {c:?}: the sink saw a compression ratio of {wire_ratio:.2}",
                if http { "OTLP/HTTP protobuf" } else { "OTLP/gRPC" }
            )],
            rss_bound: None,
            compression: Some((c.clone(), wire_ratio)),
        });
    }
    let none = rows
        .iter()
        .find(|r| r.compression.as_ref().is_some_and(|(c, _)| c == "none"))
        .and_then(|r| r.tele.cpu_per_m);
    for row in &mut rows {
        if let (Some(none), Some(cpu)) = (none, row.tele.cpu_per_m) {
            row.notes.push(format!(
                "CPU per million items vs none: {}",
                ratio(cpu, none)
            ));
        }
    }
    Ok(rows)
}

/// The compression-* rows as a table: medians over runs, CPU as a ratio
/// against `none` of the same scenario.
fn compression_table(groups: &[(String, Vec<Row>)]) -> Vec<String> {
    let mut lines = vec![
        "| upstream, compression | CPU s / M items | CPU vs none | sink compression ratio | telespool items/s | ratio to baseline |".to_owned(),
        "|---|---|---|---|---|---|".to_owned(),
    ];
    let med = |rows: &[Row], f: &dyn Fn(&Row) -> f64| median(rows.iter().map(f).collect());
    for (name, rows) in groups {
        let Some((scenario, _)) = name.split_once(':') else {
            continue;
        };
        let none_cpu = groups
            .iter()
            .find(|(n, _)| *n == format!("{scenario}:none"))
            .map(|(_, r)| med(r, &|r| r.tele.cpu_per_m.unwrap_or(f64::NAN)));
        let cpu = med(rows, &|r| r.tele.cpu_per_m.unwrap_or(f64::NAN));
        let items = med(rows, &|r| r.tele.items_s);
        lines.push(format!(
            "| {name} | {cpu:.2} | {} | {:.2} | {items:.0} | {} |",
            none_cpu.map_or("n/a".into(), |n| ratio(cpu, n)),
            med(rows, &|r| r.compression.as_ref().map_or(f64::NAN, |c| c.1)),
            ratio(items, med(rows, &|r| r.base.items_s)),
        ));
    }
    lines
}

async fn run_scenario(options: &Options, name: &str) -> Result<Vec<Row>, String> {
    let mut spec = scenario_spec(name, options.quick);
    if !matches!(name, "outage" | "overload" | "soak") {
        spec = apply(spec, &options.overrides);
    }
    // replay-live builds its own bodies.
    if name == "replay-live" {
        spec.requests = 0;
    }
    let bodies = build_bodies(&spec);
    let mut rows = Vec::new();
    for run in 1..=options.runs {
        if options.runs > 1 {
            eprintln!("[e2e] {name}: run {run} of {}", options.runs);
        }
        let run_rows = match name {
            "sink" => vec![sink_calibration(&spec, &bodies).await?],
            "outage" => vec![outage(options, &spec, &bodies).await?],
            "soak" => vec![soak(options, &spec, &bodies).await?],
            "replay-live" => {
                let figures = replay::run(&options.bin, options.quick).await?;
                println!("\nreplay-live, run {run}:");
                for line in figures.lines() {
                    println!("  {line}");
                }
                Vec::new()
            }
            "overload" => vec![overload(options, &spec, &bodies).await?],
            "saturated" => vec![saturated(options, &spec, &bodies).await?],
            "compression-grpc" | "compression-http" => {
                compression(options, name, &spec, &bodies).await?
            }
            _ => vec![throughput(options, name, &spec, &bodies).await?],
        };
        // `--before`: the same load through the older binary, in the same round.
        let before_rows = match &options.before {
            Some(bin) if !matches!(name, "sink" | "outage" | "soak" | "overload") => {
                let before = Options {
                    bin: bin.clone(),
                    ..options.clone()
                };
                let mut rows = match name {
                    "compression-grpc" | "compression-http" => {
                        compression(&before, name, &spec, &bodies).await?
                    }
                    "saturated" => vec![saturated(&before, &spec, &bodies).await?],
                    _ => vec![throughput(&before, name, &spec, &bodies).await?],
                };
                for row in &mut rows {
                    row.scenario = format!("before {}", row.scenario);
                }
                rows
            }
            _ => Vec::new(),
        };
        for row in run_rows.into_iter().chain(before_rows) {
            print_row(&row, &spec, &bodies);
            rows.push(row);
        }
    }
    Ok(rows)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return 0.0;
    }
    v[v.len() / 2]
}

/// The medians over runs, as one markdown table row.
fn summary_line(rows: &[Row]) -> String {
    let m = |f: &dyn Fn(&Row) -> f64| median(rows.iter().map(f).collect());
    let base_items = m(&|r| r.base.items_s);
    let tele_items = m(&|r| r.tele.items_s);
    let all_delivered = rows
        .iter()
        .all(|r| r.tele.delivered.missing == 0 && r.base.delivered.missing == 0);
    let lost: u64 = rows.iter().map(|r| r.tele.delivered.missing).sum();
    let rss = if rows[0].scenario == "sink" {
        "—".to_owned()
    } else {
        format!("{:.0}", m(&|r| r.tele.peak_rss.unwrap_or(0) as f64) / MIB)
    };
    let cpu = if rows[0].scenario == "sink" {
        "—".to_owned()
    } else {
        format!("{:.2}", m(&|r| r.tele.cpu_per_m.unwrap_or(f64::NAN)))
    };
    let live = ratio(m(&|r| r.tele.live_items_s), m(&|r| r.base.live_items_s));
    format!(
        "| {} | {:.0} | {:.0} | {} | {live} | {:.0} | {} | {} | {} / {} | {} / {} | {} |",
        rows[0].scenario,
        base_items,
        tele_items,
        ratio(tele_items, base_items),
        m(&|r| r.tele.mb_s),
        cpu,
        rss,
        ms(Duration::from_secs_f64(m(&|r| r.base.p50.as_secs_f64()))),
        ms(Duration::from_secs_f64(m(&|r| r.tele.p50.as_secs_f64()))),
        ms(Duration::from_secs_f64(m(&|r| r.base.p99.as_secs_f64()))),
        ms(Duration::from_secs_f64(m(&|r| r.tele.p99.as_secs_f64()))),
        if all_delivered {
            format!(
                "yes ({}/{})",
                rows.last().map(|r| r.tele.delivered.unique).unwrap_or(0),
                rows.last().map(|r| r.tele.acked).unwrap_or(0)
            )
        } else {
            format!("NO: {lost} lost")
        },
    )
}

async fn run_all(options: &Options) -> Result<(), String> {
    let names: Vec<String> = if options.scenarios.is_empty() {
        // The soak takes minutes: only when asked for by name.
        SCENARIOS
            .iter()
            .filter(|(n, _)| !matches!(*n, "soak" | "replay-live"))
            .map(|(n, _)| (*n).to_owned())
            .collect()
    } else {
        options.scenarios.clone()
    };
    let started = Instant::now();
    println!(
        "e2e bench: {} ({}), {} run(s) per scenario, binary {}{}",
        if options.quick { "quick" } else { "full" },
        names.join(", "),
        options.runs,
        options.bin.display(),
        options
            .before
            .as_ref()
            .map_or(String::new(), |b| format!(", before: {}", b.display()))
    );
    let mut table = vec![
        "| scenario | baseline items/s | telespool items/s | ratio | ratio while sending | telespool MB/s | CPU s / M items | peak RSS MiB | p50 ms base / tele | p99 ms base / tele | acked = delivered |".to_owned(),
        "|---|---|---|---|---|---|---|---|---|---|---|".to_owned(),
    ];
    let mut failures = Vec::new();
    let mut compression_groups = Vec::new();
    for name in &names {
        match run_scenario(options, name).await {
            Ok(rows) => {
                // One summary line per scenario (compression-*: per compression).
                let mut groups: Vec<(String, Vec<Row>)> = Vec::new();
                for row in &rows {
                    match groups.iter_mut().find(|(n, _)| *n == row.scenario) {
                        Some((_, g)) => g.push(row.clone()),
                        None => groups.push((row.scenario.clone(), vec![row.clone()])),
                    }
                }
                for (_, group) in &groups {
                    table.push(summary_line(group));
                }
                if name.starts_with("compression-") {
                    compression_groups.extend(groups);
                }
                for r in &rows {
                    if r.tele.delivered.missing > 0 {
                        failures.push(format!(
                            "{name}: {} acknowledged items lost",
                            r.tele.delivered.missing
                        ));
                    }
                    if let Some((bound, false)) = r.rss_bound {
                        failures.push(format!(
                            "{name}: peak RSS {:.1} MiB above {} MiB",
                            r.tele.peak_rss.unwrap_or(0) as f64 / MIB,
                            bound >> 20
                        ));
                    }
                }
            }
            Err(e) => {
                eprintln!("[e2e] scenario {name} failed: {e}");
                failures.push(format!("{name}: {e}"));
            }
        }
    }
    println!(
        "summary ({} per scenario; sink row: baseline = lean sink, telespool column = harness Upstream):",
        if options.runs > 1 {
            format!("medians of {} runs", options.runs)
        } else {
            "one run".to_owned()
        }
    );
    for line in &table {
        println!("{line}");
    }
    if !compression_groups.is_empty() {
        println!("upstream compression (realistic payload unless overridden):");
        for line in compression_table(&compression_groups) {
            println!("{line}");
        }
    }
    println!("total time {:.0?}", started.elapsed());
    if failures.is_empty() {
        Ok(())
    } else {
        Err(format!("problems: {}", failures.join("; ")))
    }
}
