//! `replay-live`: a spool backlog replayed to a healthy upstream while live
//! load keeps arriving (issue 17, item 5).
//!
//! 1. Backlog: an agent in durable mode whose upstream is down takes
//!    `BACKLOG_ROUNDS` passes over the backlog bodies (realistic spans, 100 a
//!    request); every acknowledged request is a spool row. SIGTERM.
//! 2. Baseline: a fresh agent with an empty spool, the live load alone
//!    (`LIVE_RATE` requests/s of 100 realistic spans) into the lean sink.
//! 3. Replay: an agent started on the backlog, the same live load from its
//!    start; the spool's row gauge is polled until it is empty.
//!
//! Reported: how long the agent took to answer `/readyz` 200 after spawn,
//! the replay rate (backlog items over the time the spool took to empty), the
//! live load's p99 against the baseline's, the agent's peak RSS against
//! `buffer.max_bytes` + 32 MiB, and whether the sink received exactly the
//! backlog plus the acknowledged live items.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::load::{self, Bodies, LoadReport, LoadSpec};
use crate::sink::LeanSink;
use crate::support::{AgentProcess, Signal};
use crate::{procfs, stop_agent, MIB};

/// Requests per second of live load (100 spans each): 50,000 spans/s.
const LIVE_RATE: f64 = 500.0;
/// The agent's memory bound in every phase.
const BUFFER_BYTES: u64 = 64 << 20;
/// Allowance over the memory bound for the peak RSS verdict.
const RSS_ALLOWANCE: u64 = 32 << 20;
/// Bound on the spool emptying.
const REPLAY_DEADLINE: Duration = Duration::from_secs(120);

fn spec(requests: usize, duration: Duration, rate: Option<f64>) -> LoadSpec {
    LoadSpec {
        signal: Signal::Traces,
        concurrency: 8,
        items: 100,
        payload: 0,
        realistic: true,
        requests,
        duration,
        rate,
        http: false,
        channel: None,
    }
}

fn config(extra: &str) -> String {
    format!(
        "{extra}\n[buffer]\nmax_bytes = {BUFFER_BYTES}\n[spool]\nmax_bytes = \"4GiB\"\n\
         [upstream]\ncompression = \"none\"\n"
    )
}

async fn start(
    bin: &Path,
    endpoint: &str,
    spool: &Path,
    config: &str,
) -> Result<AgentProcess, String> {
    AgentProcess::builder()
        .program(bin, &[])
        .upstream(endpoint)
        .spool(spool)
        .config_toml(config)
        .start()
        .await
}

/// Polls `/readyz` until it answers 200.
async fn wait_ready(agent: &AgentProcess) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok((200, _)) = agent.admin_get("/readyz").await {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err("/readyz did not answer 200 within 30 s".into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn spool_rows(agent: &AgentProcess) -> Option<f64> {
    agent.metric("telespool_spool_rows").await.ok().flatten()
}

/// What one run measured.
pub struct ReplayFigures {
    pub backlog_items: u64,
    pub backlog_bytes: u64,
    pub ready_after: Duration,
    pub replay_took: Option<Duration>,
    /// The same backlog (a copy) replayed with no live load.
    pub replay_alone_took: Option<Duration>,
    pub live_p99_alone: Duration,
    pub live_p99_with_replay: Duration,
    /// The live p99 (and call count) of the calls that started while the
    /// spool was not yet empty, and of those after.
    pub live_p99_during: (Duration, usize),
    pub live_p99_after: (Duration, usize),
    pub live_acked_alone: u64,
    pub live_acked_with_replay: u64,
    pub peak_rss: u64,
    /// Items the sink received beyond the backlog plus the acknowledged live
    /// items (at-least-once duplicates); `None` when it received fewer.
    pub extra_delivered: Option<u64>,
    pub cpu_s: f64,
}

impl ReplayFigures {
    pub fn lines(&self) -> Vec<String> {
        let rate = self
            .replay_took
            .map(|t| self.backlog_items as f64 / t.as_secs_f64());
        let bound = BUFFER_BYTES + RSS_ALLOWANCE;
        vec![
            format!(
                "backlog: {} spans, {:.0} MiB of payload",
                self.backlog_items,
                self.backlog_bytes as f64 / MIB
            ),
            format!(
                "/readyz 200 after {:.0} ms (from spawn, with the backlog)",
                self.ready_after.as_secs_f64() * 1000.0
            ),
            match (rate, self.replay_took) {
                (Some(r), Some(t)) => format!(
                    "replay: {:.0} spans/s ({:.1} s to empty the spool) with {} live spans/s",
                    r,
                    t.as_secs_f64(),
                    LIVE_RATE * 100.0
                ),
                _ => format!("replay: the spool did not empty within {REPLAY_DEADLINE:?}"),
            },
            match self.replay_alone_took {
                Some(t) => format!(
                    "replay alone (no live load, a copy of the backlog): {:.0} spans/s ({:.1} s)",
                    self.backlog_items as f64 / t.as_secs_f64(),
                    t.as_secs_f64()
                ),
                None => format!("replay alone: the spool did not empty within {REPLAY_DEADLINE:?}"),
            },
            format!(
                "live p99: {:.2} ms with replay, {:.2} ms alone: {:.2}x (acked {} / {})",
                self.live_p99_with_replay.as_secs_f64() * 1000.0,
                self.live_p99_alone.as_secs_f64() * 1000.0,
                self.live_p99_with_replay.as_secs_f64()
                    / self.live_p99_alone.as_secs_f64().max(1e-9),
                self.live_acked_with_replay,
                self.live_acked_alone,
            ),
            format!(
                "live p99 while replaying: {:.2} ms ({} calls); after: {:.2} ms ({} calls)",
                self.live_p99_during.0.as_secs_f64() * 1000.0,
                self.live_p99_during.1,
                self.live_p99_after.0.as_secs_f64() * 1000.0,
                self.live_p99_after.1,
            ),
            format!(
                "peak RSS {:.1} MiB (bound buffer.max_bytes + 32 MiB = {:.0} MiB): {}",
                self.peak_rss as f64 / MIB,
                bound as f64 / MIB,
                if self.peak_rss <= bound {
                    "within"
                } else {
                    "OVER"
                }
            ),
            format!(
                "agent CPU {:.2} s for backlog + live ({:.2} CPU-s per M spans)",
                self.cpu_s,
                self.cpu_s / ((self.backlog_items + self.live_acked_with_replay) as f64 / 1e6)
            ),
            match self.extra_delivered {
                Some(0) => "delivered = backlog + acknowledged live: yes".to_owned(),
                Some(n) => {
                    format!("delivered = backlog + acknowledged live: yes, and {n} duplicate spans")
                }
                None => "delivered = backlog + acknowledged live: NO (fewer)".to_owned(),
            },
        ]
    }
}

/// Acknowledged bytes of a report.
fn acked_bytes(report: &LoadReport) -> u64 {
    report.acked_bytes
}

/// Copies a closed spool (its database and any WAL or shared-memory file).
fn copy_spool(from: &Path, to: &Path) -> Result<(), String> {
    for suffix in ["", "-wal", "-shm"] {
        let src = format!("{}{suffix}", from.display());
        if Path::new(&src).exists() {
            std::fs::copy(&src, format!("{}{suffix}", to.display()))
                .map_err(|e| format!("copy {src}: {e}"))?;
        }
    }
    Ok(())
}

/// The p99 latency and count of the calls of `report` that started in
/// `from..to` (ms from the load's start).
fn window_p99(report: &LoadReport, from: u32, to: u32) -> (Duration, usize) {
    let mut us: Vec<u32> = report
        .timeline
        .iter()
        .filter(|(at, _)| (from..to).contains(at))
        .map(|&(_, us)| us)
        .collect();
    us.sort_unstable();
    let p99 = match us.len() {
        0 => 0,
        n => us[((n - 1) as f64 * 0.99).round() as usize],
    };
    (Duration::from_micros(p99 as u64), us.len())
}

pub async fn run(bin: &Path, quick: bool) -> Result<ReplayFigures, String> {
    // 2 M spans (~1 GiB) full, 400 K quick: distinct bodies reused per round.
    let (backlog_requests, rounds) = if quick { (1_000, 4) } else { (2_000, 10) };
    let live_secs = if quick { 6 } else { 12 };
    let live_requests = (LIVE_RATE as usize) * live_secs;
    eprintln!("[replay-live] building {backlog_requests} backlog and {live_requests} live bodies");
    let backlog = Arc::new(Bodies::build(
        &spec(backlog_requests, Duration::from_secs(600), None),
        1 << 40,
    ));
    let live_spec = spec(
        live_requests,
        Duration::from_secs(live_secs as u64),
        Some(LIVE_RATE),
    );
    let live = Arc::new(Bodies::build(&live_spec, 1));

    let dir = tempfile::TempDir::new().map_err(|e| format!("temp dir: {e}"))?;
    let spool = dir.path().join("spool.db");

    // 1. Backlog, upstream down (a port nothing listens on any more).
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        l.local_addr().map_err(|e| e.to_string())?
    };
    let mut writer = start(
        bin,
        &format!("http://{dead}"),
        &spool,
        &config("durability = \"spool\""),
    )
    .await?;
    let (mut backlog_items, mut backlog_bytes) = (0u64, 0u64);
    for round in 0..rounds {
        let report = load::run(
            writer.grpc_addr(),
            &spec(backlog_requests, Duration::from_secs(120), None),
            backlog.clone(),
        )
        .await;
        backlog_items += report.acked_items;
        backlog_bytes += acked_bytes(&report);
        eprintln!(
            "[replay-live] backlog round {}/{rounds}: {} spans acknowledged ({})",
            round + 1,
            report.acked_items,
            report.errors_text()
        );
    }
    eprintln!(
        "[replay-live] backlog writer: {}",
        stop_agent(&mut writer).await
    );

    // A copy of the backlog for step 4 (the agent is stopped: the files are still).
    let copy = dir.path().join("copy.db");
    copy_spool(&spool, &copy)?;

    let sink = LeanSink::start_apart().await?;
    let endpoint = format!("http://{}", sink.addr());

    // 2. The live load alone, on an empty spool.
    let empty = dir.path().join("empty.db");
    let mut alone = start(bin, &endpoint, &empty, &config("")).await?;
    let report_alone = load::run(alone.grpc_addr(), &live_spec, live.clone()).await;
    stop_agent(&mut alone).await;
    sink.clear();

    // 3. Replay under the same live load.
    let spawned = Instant::now();
    let agent = start(bin, &endpoint, &spool, &config("")).await;
    let mut agent = agent?;
    wait_ready(&agent).await?;
    let ready_after = spawned.elapsed();
    let pid = agent.pid();
    let ticks = procfs::clock_ticks();
    let cpu0 = procfs::cpu_time(pid, ticks)?;
    let replay_started = Instant::now();
    let watch = async {
        loop {
            if spool_rows(&agent).await == Some(0.0) {
                return Some(replay_started.elapsed());
            }
            if replay_started.elapsed() > REPLAY_DEADLINE {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let (report, replay_took) = tokio::join!(
        load::run(agent.grpc_addr(), &live_spec, live.clone()),
        watch
    );
    // Everything delivered: the backlog plus what the live load had acknowledged.
    let expected = backlog_items + report.acked_items;
    let deadline = Instant::now() + Duration::from_secs(30);
    while sink.items() < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cpu1 = procfs::cpu_time(pid, ticks)?;
    let peak_rss = procfs::status_bytes(pid, "VmHWM")?;
    eprintln!(
        "[replay-live] replaying agent: {}",
        stop_agent(&mut agent).await
    );
    let delivered = sink.items();
    // 4. The same backlog replayed with no live load.
    sink.clear();
    let mut solo = start(bin, &endpoint, &copy, &config("")).await?;
    wait_ready(&solo).await?;
    let solo_started = Instant::now();
    let replay_alone_took = loop {
        if spool_rows(&solo).await == Some(0.0) {
            break Some(solo_started.elapsed());
        }
        if solo_started.elapsed() > REPLAY_DEADLINE {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!(
        "[replay-live] replay alone: {}",
        stop_agent(&mut solo).await
    );
    let emptied_ms = replay_took.map_or(u32::MAX, |t| t.as_millis() as u32);
    let live_p99_during = window_p99(&report, 0, emptied_ms);
    let live_p99_after = window_p99(&report, emptied_ms, u32::MAX);
    Ok(ReplayFigures {
        replay_alone_took,
        live_p99_during,
        live_p99_after,
        backlog_items,
        backlog_bytes,
        ready_after,
        replay_took,
        live_p99_alone: report_alone.latency(0.99),
        live_p99_with_replay: report.latency(0.99),
        live_acked_alone: report_alone.acked_items,
        live_acked_with_replay: report.acked_items,
        peak_rss,
        extra_delivered: delivered.checked_sub(expected),
        cpu_s: (cpu1 - cpu0).as_secs_f64(),
    })
}
