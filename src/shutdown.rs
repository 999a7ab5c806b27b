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
//! `TimeoutStopSec` exceeds.

use std::fmt;
use std::time::{Duration, Instant};

use crate::app::Agent;
use crate::metrics::DropReason;
use crate::signal::Signal;

/// What happened in one run of the agent, for the summary line and the exit code.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub accepted: [u64; 3],
    pub refused: [u64; 3],
    pub forwarded: [u64; 3],
    pub spooled: [u64; 3],
    pub replayed: [u64; 3],
    pub dropped: [u64; 3],
    /// Items dropped during shutdown (spool full, deadline): the exit status.
    pub dropped_at_shutdown: u64,
    pub duplicates_risked: u64,
    pub spool_rows_left: u64,
    pub phases: Vec<(&'static str, Duration)>,
    pub panicked: bool,
}

impl Summary {
    pub fn exit_code(&self) -> i32 {
        if self.dropped_at_shutdown > 0 || self.panicked {
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
        for (phase, d) in &self.phases {
            write!(f, " {phase}_ms={}", d.as_millis())?;
        }
        Ok(())
    }
}

/// Run phases 1–5. Returns once the spool is closed.
pub async fn run(agent: Agent) -> Summary {
    crate::systemd::stopping();
    let t0 = Instant::now();
    let flush_deadline = t0 + agent.config.shutdown.flush_budget;
    let hard_deadline = t0 + agent.config.shutdown.timeout;
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
        flush_budget = ?agent.config.shutdown.flush_budget,
        timeout = ?agent.config.shutdown.timeout,
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

    // 2. Refuse new requests, close listeners, let in-flight requests finish.
    agent.receiver.stop_accepting();
    agent.close_listeners.cancel();
    agent.stop_background.cancel();
    agent.servers.close();
    wait_until(agent.servers.wait(), flush_deadline, &agent).await;
    end_phase("drain_requests", &mut phases);

    // 3. Flush: seal open batches, close the queue, let workers drain it.
    agent.pipeline.close();
    agent.exporters.close();
    tracing::info!(
        batches = agent.pipeline.queued_batches(),
        "flushing open batches upstream"
    );
    wait_until(agent.exporters.wait(), flush_deadline, &agent).await;
    end_phase("flush", &mut phases);

    // 4. Spool whatever upstream has not acknowledged.
    agent.tokens.force.cancel();
    agent.exporters.wait().await;
    agent.background.close();
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
        let remaining = hard_deadline.saturating_duration_since(Instant::now());
        let counts: Vec<(Signal, u64)> = unfinished.iter().map(|b| (b.signal, b.items)).collect();
        let write = agent.pipeline.write_to_spool(unfinished);
        let (unwritten, reason) = match tokio::time::timeout(remaining, write).await {
            Ok(unwritten) => (
                unwritten.iter().map(|b| (b.signal, b.items)).collect(),
                DropReason::SpoolFull,
            ),
            Err(_) => {
                // The spool thread may still commit the transaction, but we cannot
                // wait to learn it: count the worst case.
                tracing::error!("shutdown.timeout reached while writing the spool");
                (counts, DropReason::ShutdownTimeout)
            }
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
    }
    end_phase("spool", &mut phases);

    // 5. Close the spool and report.
    let spool = agent.pipeline.spool().clone();
    if let Err(e) = spool.clone().close().await {
        tracing::error!(error = %e, "spool did not close cleanly");
    }
    // As of the close: rows whose delete never committed (full disk) are
    // left too, and will be sent again after a restart.
    let closed = spool.stats_cached();
    let spool_rows_left = closed.rows + closed.delete_pending_rows;
    agent.background.wait().await;
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

/// Wait for `fut` until `deadline`, or until `force` fires.
async fn wait_until(fut: impl std::future::Future<Output = ()>, deadline: Instant, agent: &Agent) {
    tokio::select! {
        _ = fut => {}
        _ = tokio::time::sleep_until(deadline.into()) => {
            tracing::warn!("flush budget used up");
        }
        _ = agent.tokens.force.cancelled() => {
            tracing::warn!("second signal: skipping to the spool step");
        }
    }
}
