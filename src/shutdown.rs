//! The shutdown sequence.
//!
//! Triggered by `ShutdownTokens::begin` (first SIGTERM/SIGINT); `force` (second
//! signal, or the end of the flush budget) skips to the spool step. Phases, in
//! order, each logged with its duration:
//!
//! 1. **readiness off**: `/readyz` answers 503, gRPC health NOT_SERVING;
//! 2. **refuse**: new requests get UNAVAILABLE ("shutting down") with a
//!    RetryInfo; the OTLP listeners close; requests already in flight complete
//!    (they may still be refused if they wait for room past this point, which
//!    the client retries);
//! 3. **flush**: open batches are sealed, the export queue is closed, and
//!    export workers drain it upstream until it is empty or
//!    `shutdown.flush_budget` (counted from the signal) ends;
//! 4. **spool**: `force` fires; every memory batch upstream has not
//!    acknowledged (queued, open, cut off mid-export, retrying) is written to the
//!    spool in one transaction, bounded by `shutdown.timeout`. A batch cut off
//!    while its export was in flight may also have reached upstream: such items
//!    are counted as "duplicates risked";
//! 5. **close**: the spool is checkpointed and closed; one summary line is
//!    logged. The exit status is non-zero if anything was dropped at shutdown
//!    or a task panicked.
//!
//! The whole sequence is bounded by `shutdown.timeout`, which the systemd unit's
//! `TimeoutStopSec` exceeds: phases 1–3 by the flush budget, and every wait
//! after `force` (exporters and the durable writer stopping, background tasks
//! stopping, the spool write, the spool close) by the hard deadline. The durable
//! writer stops at `force` and refuses what it had not committed (clients
//! retry). When the deadline cuts a step, the summary names it
//! (`cut_by_deadline=`), items not known to be spooled are counted as dropped
//! (`shutdown_timeout`), and the exit status is 1.
//!
//! Tokens: one tree. `force` is the root; `begin`, the listeners' close and
//! the background stop are its children, cancelled in the order above.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::AdminState;
use crate::config::ShutdownConfig;
use crate::metrics::DropReason;
use crate::metrics::Metrics;
use crate::pipeline::Pipeline;
use crate::receiver::Receiver;
use crate::signal::Signal;
use crate::task::PanicFlag;

/// The two shutdown triggers, one tree: cancelling `force` also cancels `begin`.
#[derive(Debug, Clone)]
pub struct ShutdownTokens {
    /// Skip the flush: spool what is left now (second signal, flush deadline).
    pub force: CancellationToken,
    /// Start the shutdown sequence (first signal).
    pub begin: CancellationToken,
}

impl ShutdownTokens {
    pub fn new() -> ShutdownTokens {
        let force = CancellationToken::new();
        let begin = force.child_token();
        ShutdownTokens { force, begin }
    }
}

impl Default for ShutdownTokens {
    fn default() -> Self {
        ShutdownTokens::new()
    }
}

/// What the sequence stops, in its order; `app` hands them over when the
/// first signal arrives.
pub struct Stages {
    pub config: ShutdownConfig,
    pub metrics: Arc<Metrics>,
    pub pipeline: Arc<Pipeline>,
    pub receiver: Arc<Receiver>,
    /// Readiness (`/readyz`), turned off first.
    pub admin: Arc<AdminState>,
    /// gRPC health, NOT_SERVING first.
    pub health: tonic_health::server::HealthReporter,
    /// Closes the OTLP listeners (graceful: in-flight requests complete).
    pub close_listeners: CancellationToken,
    /// Stops background loops (batch timer, spiller) and replay intake.
    pub stop_background: CancellationToken,
    pub servers: TaskTracker,
    pub exporters: TaskTracker,
    pub background: TaskTracker,
    pub panics: PanicFlag,
    pub tokens: ShutdownTokens,
}

/// What happened in one run of the agent, for the summary line and the exit code.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub accepted: [u64; 3],
    pub refused: [u64; 3],
    pub forwarded: [u64; 3],
    pub spooled: [u64; 3],
    pub replayed: [u64; 3],
    pub dropped: [u64; 3],
    /// Items dropped during shutdown (spool full, deadline, older rows
    /// evicted to make room): the exit status.
    pub dropped_at_shutdown: u64,
    pub duplicates_risked: u64,
    pub spool_rows_left: u64,
    pub phases: Vec<(&'static str, Duration)>,
    pub panicked: bool,
    /// The first step of the spool and close phases that `shutdown.timeout`
    /// cut short, if any.
    pub cut_step: Option<&'static str>,
}

impl Summary {
    pub fn exit_code(&self) -> i32 {
        if self.dropped_at_shutdown > 0 || self.panicked || self.cut_step.is_some() {
            1
        } else {
            0
        }
    }

    fn total(a: &[u64; 3]) -> u64 {
        a.iter().sum()
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "received={} refused_requests={} forwarded={} spooled={} replayed={} dropped={} dropped_at_shutdown={} duplicates_risked={} spool_rows_left={}",
            Self::total(&self.accepted),
            Self::total(&self.refused),
            Self::total(&self.forwarded),
            Self::total(&self.spooled),
            Self::total(&self.replayed),
            Self::total(&self.dropped),
            self.dropped_at_shutdown,
            self.duplicates_risked,
            self.spool_rows_left,
        )?;
        if let Some(step) = self.cut_step {
            write!(f, " cut_by_deadline={step}")?;
        }
        for (phase, d) in &self.phases {
            write!(f, " {phase}_ms={}", d.as_millis())?;
        }
        Ok(())
    }
}

/// Run phases 1–5. Returns once the spool is closed.
pub async fn run(agent: Stages) -> Summary {
    crate::systemd::stopping();
    let t0 = Instant::now();
    let flush_deadline = t0 + agent.config.flush_budget;
    let hard_deadline = t0 + agent.config.timeout;
    let mut phases = Vec::new();
    let mut phase_start = Instant::now();
    let mut end_phase = |name: &'static str, phases: &mut Vec<_>| {
        let d = phase_start.elapsed();
        tracing::info!(
            phase = name,
            elapsed_ms = d.as_millis() as u64,
            "shutdown phase done"
        );
        phases.push((name, d));
        phase_start = Instant::now();
    };
    tracing::info!(
        flush_budget = ?agent.config.flush_budget,
        timeout = ?agent.config.timeout,
        "shutdown started"
    );

    // 1. Readiness off.
    agent
        .admin
        .ready
        .store(false, std::sync::atomic::Ordering::Release);
    agent
        .health
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    end_phase("readiness_off", &mut phases);

    agent
        .admin
        .status
        .set_phase(crate::status::Phase::DrainingRequests);
    // 2. Refuse new requests, close listeners, let in-flight requests finish.
    agent.receiver.stop_accepting();
    agent.close_listeners.cancel();
    agent.stop_background.cancel();
    agent.servers.close();
    wait_until(agent.servers.wait(), flush_deadline, &agent.tokens.force).await;
    end_phase("drain_requests", &mut phases);

    agent.admin.status.set_phase(crate::status::Phase::Flushing);
    // 3. Flush: seal open batches, close the queue, let workers drain it.
    agent.pipeline.close();
    agent.exporters.close();
    tracing::info!(
        batches = agent.pipeline.queued_batches(),
        "flushing open batches upstream"
    );
    wait_until(agent.exporters.wait(), flush_deadline, &agent.tokens.force).await;
    end_phase("flush", &mut phases);

    agent.admin.status.set_phase(crate::status::Phase::Spooling);
    // 4. Spool whatever upstream has not acknowledged. From here on every
    // wait is bounded by the hard deadline; the first step it cuts is named
    // in the summary and makes the exit status 1.
    agent.tokens.force.cancel();
    let mut hard = HardDeadline::new(hard_deadline);
    hard.bound("stop_exporters", agent.exporters.wait()).await;
    // The spiller may hold batches on their way into the spool: wait for it
    // before collecting what is left, so each batch is either spooled, still
    // here, or (deadline) counted below as in flight.
    agent.background.close();
    hard.bound("stop_background", agent.background.wait()).await;
    let unfinished = agent.pipeline.take_unfinished();
    let mut dropped_at_shutdown = 0;
    if !unfinished.is_empty() {
        let items: u64 = unfinished.iter().map(|b| b.items).sum();
        let bytes: u64 = unfinished.iter().map(|b| b.bytes).sum();
        tracing::info!(
            batches = unfinished.len(),
            items,
            bytes,
            "writing unacknowledged batches to the spool"
        );
        let counts: Vec<(Signal, u64)> = unfinished.iter().map(|b| (b.signal, b.items)).collect();
        let evicted_before = agent.pipeline.spool_evicted_items();
        let write = agent.pipeline.write_to_spool(unfinished);
        let (unwritten, reason) = match hard.bound("spool", write).await {
            Some(unwritten) => (
                unwritten.iter().map(|b| (b.signal, b.items)).collect(),
                DropReason::SpoolFull,
            ),
            // The spool thread may still commit the transaction, but we cannot
            // wait to learn it: count the worst case.
            None => (counts, DropReason::ShutdownTimeout),
        };
        for (signal, items) in &unwritten {
            agent.metrics.dropped(*signal, reason, *items);
            dropped_at_shutdown += items;
        }
        if !unwritten.is_empty() {
            tracing::error!(
                batches = unwritten.len(),
                items = dropped_at_shutdown,
                reason = reason.as_str(),
                "could not spool everything at shutdown; these items are lost"
            );
        }
        // `spool.when_full = "drop_oldest"` made room by evicting older rows
        // (counted and logged as `spool_evicted`): acknowledged data dropped
        // at shutdown, so the exit status says so.
        dropped_at_shutdown += agent
            .pipeline
            .spool_evicted_items()
            .saturating_sub(evicted_before);
    }
    end_phase("spool", &mut phases);

    agent.admin.status.set_phase(crate::status::Phase::Closing);
    // 5. Close the spool and report.
    let spool = agent.pipeline.spool().clone();
    if let Some(Err(e)) = hard.bound("close", spool.clone().close()).await {
        tracing::error!(error = %e, "spool did not close cleanly");
    }
    // As of the close: rows whose delete never committed (full disk) are
    // left too, and will be sent again after a restart.
    let closed = spool.stats_cached();
    let spool_rows_left = closed.rows + closed.delete_pending_rows;
    // Batches still inside a spool write that the deadline cut (a spiller or
    // an export worker moving them to the spool): not known to be spooled.
    let mut in_flight = 0;
    for (signal, items) in agent.pipeline.spool_writes_in_flight() {
        agent
            .metrics
            .dropped(signal, DropReason::ShutdownTimeout, items);
        in_flight += items;
    }
    if in_flight > 0 {
        tracing::error!(
            items = in_flight,
            reason = DropReason::ShutdownTimeout.as_str(),
            "batches on their way into the spool when the deadline cut; these items are lost"
        );
        dropped_at_shutdown += in_flight;
    }
    end_phase("close", &mut phases);

    let m = &agent.metrics;
    let per = |f: &dyn Fn(Signal) -> u64| Signal::ALL.map(f);
    let summary = Summary {
        accepted: per(&|s| m.accepted_total(s)),
        refused: per(&|s| m.refused_total(s)),
        forwarded: per(&|s| m.forwarded_total(s)),
        spooled: per(&|s| m.spooled_total(s)),
        replayed: per(&|s| m.replayed_total(s)),
        dropped: per(&|s| m.dropped_total(s)),
        dropped_at_shutdown,
        duplicates_risked: m.duplicates_risked() + closed.delete_pending_items,
        spool_rows_left,
        phases,
        panicked: agent.panics.is_set(),
        cut_step: hard.cut,
    };
    if summary.panicked {
        tracing::error!("a task panicked during the run; exiting non-zero");
    }
    tracing::info!(
        total_ms = t0.elapsed().as_millis() as u64,
        exit_code = summary.exit_code(),
        "shutdown complete {summary}"
    );
    summary
}

/// The hard deadline of the shutdown sequence, and the first step it cut.
#[derive(Debug)]
struct HardDeadline {
    at: Instant,
    cut: Option<&'static str>,
}

impl HardDeadline {
    fn new(at: Instant) -> HardDeadline {
        HardDeadline { at, cut: None }
    }

    /// Run `fut` until the deadline. `None` when the deadline cut it (the
    /// future is dropped); once one step was cut, later steps still get a
    /// first poll, so work that completes at once is not lost.
    async fn bound<T>(&mut self, step: &'static str, fut: impl Future<Output = T>) -> Option<T> {
        match tokio::time::timeout_at(self.at, fut).await {
            Ok(value) => Some(value),
            Err(_) => {
                if self.cut.is_none() {
                    tracing::error!(step, "shutdown.timeout reached; cutting this step short");
                    self.cut = Some(step);
                }
                None
            }
        }
    }
}

/// How a wait within the flush budget ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Waited {
    Done,
    BudgetUsedUp,
    Forced,
}

/// Wait for `fut` until `deadline`, or until `force` fires.
async fn wait_until(
    fut: impl Future<Output = ()>,
    deadline: Instant,
    force: &CancellationToken,
) -> Waited {
    tokio::select! {
        _ = fut => Waited::Done,
        _ = tokio::time::sleep_until(deadline) => {
            tracing::warn!("flush budget used up");
            Waited::BudgetUsedUp
        }
        _ = force.cancelled() => {
            tracing::warn!("second signal: skipping to the spool step");
            Waited::Forced
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_flush_wait_ends_when_its_work_is_done_at_the_budget_or_at_force() {
        let start = Instant::now();
        let budget = start + Duration::from_secs(5);
        let force = CancellationToken::new();

        let done = tokio::time::sleep(Duration::from_secs(1));
        assert_eq!(wait_until(done, budget, &force).await, Waited::Done);
        assert_eq!(start.elapsed(), Duration::from_secs(1));

        let never = std::future::pending();
        assert_eq!(
            wait_until(never, budget, &force).await,
            Waited::BudgetUsedUp
        );
        assert_eq!(
            start.elapsed(),
            Duration::from_secs(5),
            "the budget counts from the signal"
        );

        let later = start + Duration::from_secs(60);
        let second_signal = {
            let force = force.clone();
            async move {
                tokio::time::sleep(Duration::from_secs(2)).await;
                force.cancel();
            }
        };
        let (waited, ()) = tokio::join!(
            wait_until(std::future::pending(), later, &force),
            second_signal
        );
        assert_eq!(waited, Waited::Forced);
        assert_eq!(start.elapsed(), Duration::from_secs(7));
    }

    #[tokio::test(start_paused = true)]
    async fn the_hard_deadline_cuts_a_stalled_step_at_the_deadline_and_names_it() {
        let start = Instant::now();
        let mut hard = HardDeadline::new(start + Duration::from_secs(20));
        assert_eq!(hard.bound("quick", async { 7 }).await, Some(7));
        let stalled = hard.bound("spool", std::future::pending::<()>()).await;
        assert_eq!(stalled, None);
        assert_eq!(start.elapsed(), Duration::from_secs(20));
        assert_eq!(hard.cut, Some("spool"));
        // Later steps still get their first poll; the first cut stays named.
        assert_eq!(hard.bound("close", async { 1 }).await, Some(1));
        assert_eq!(
            hard.bound("close", std::future::pending::<()>()).await,
            None
        );
        assert_eq!(hard.cut, Some("spool"));
        assert_eq!(start.elapsed(), Duration::from_secs(20));
    }

    #[test]
    fn a_cut_step_is_in_the_summary_line_and_makes_the_exit_status_one() {
        let summary = Summary {
            cut_step: Some("close"),
            ..Summary::default()
        };
        assert_eq!(summary.exit_code(), 1);
        assert!(summary.to_string().contains(" cut_by_deadline=close"));
        assert_eq!(Summary::default().exit_code(), 0);
    }
}
