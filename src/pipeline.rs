//! The pipeline between receivers and upstream: memory budget, per-signal
//! batchers, the export queue, export workers, the spiller and replay.
//!
//! ```text
//! ingest ─► budget.reserve ─► Batcher (per signal) ─► ExportQueue ─► export workers ─► upstream
//!                                                         │ spill (upstream down,        ▲
//!                                                         ▼  memory above high water)    │
//!                                                       spool ───────► replay workers ───┘
//! ```
//!
//! Every batch is owned by exactly one place at a time (a batcher, the queue, a
//! worker, the shutdown collection), so nothing is held twice and nothing is
//! forgotten. A batch that came from the spool carries its row id; its row is
//! deleted only after upstream acknowledged it (or rejected it for good).
//!
//! The mode is chosen once, at start ([`Ingest`]): in memory mode requests
//! go to the batchers, in durable mode to the group-commit writer
//! (`durable.rs`, which also hands committed rows to the replay workers).
//!
//! This file holds ingest, batching and export; the spool side (spilling,
//! replay runs, finishing and releasing rows, the spiller and replay loops)
//! is [`Spooled`], in `pipeline/spooled.rs`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::batch::{Batch, Batcher, Limits, Origin};
use crate::buffer::MemoryBudget;
use crate::config::{Config, Durability, RetryConfig};
use crate::durable::{DurableIngest, DurableWriter, Refusal};
use crate::exporter::Upstream;
use crate::metrics::{DropReason, Metrics};
use crate::probe::{Admit, Gate, Outcome};
use crate::queue::ExportQueue;
use crate::retry::{verdict, Backoff, Verdict};
use crate::signal::Signal;
use crate::spool::Spool;

mod gauges;
mod pace;
mod parts;
mod spool_writes;
mod spooled;
#[cfg(test)]
mod tests;

pub use spooled::Spooled;

/// Why `ingest` refused a request. Both are retryable for the client.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Refused {
    /// No room in the memory budget within `buffer.max_wait`.
    BufferFull { retry_after: Duration },
    /// Shutdown has begun.
    ShuttingDown,
    /// Durable mode: the spool could not take the request.
    SpoolFull { retry_after: Duration },
}

/// The fraction of the memory budget above which, with upstream failing, the
/// oldest sealed batches move to the spool.
const SPILL_HIGH_WATER: f64 = 0.5;
/// Once spilling, memory is brought down to this fraction (hysteresis).
const SPILL_LOW_WATER: f64 = 0.25;

pub struct Pipeline {
    budget: Arc<MemoryBudget>,
    max_wait: Duration,
    retry: RetryConfig,
    lanes: [Mutex<Lane>; 3],
    /// Wakes the batch timer when a lane opens a batch.
    timer: Notify,
    queue: ExportQueue,
    accepting: AtomicBool,
    metrics: Arc<Metrics>,
    upstream: Option<Upstream>,
    /// Memory batches whose export shutdown cut off; they go to the spool.
    cut: Mutex<Vec<Batch>>,
    ingest: Ingest,
    spooled: Spooled,
    /// While upstream is failing, lets one probe export through at a time.
    probe: Gate,
}

/// Where requests go, fixed at start by `durability`.
enum Ingest {
    /// Into the batchers; acknowledged once in memory.
    Memory,
    /// To the group-commit writer; acknowledged once committed to the spool.
    Durable {
        commits: DurableIngest,
        /// Taken once, by [`Pipeline::run_durable_writer`].
        writer: Mutex<Option<DurableWriter>>,
    },
}

struct Lane {
    batcher: Batcher,
    /// False once shutdown sealed the lane: later requests are refused.
    open: bool,
}

impl Pipeline {
    pub fn new(
        config: &Config,
        metrics: Arc<Metrics>,
        spool: Spool,
        upstream: Option<Upstream>,
    ) -> Arc<Pipeline> {
        let limits = Limits {
            max_items: config.batch.max_items,
            max_bytes: config
                .batch
                .max_bytes
                .0
                .min(config.upstream.max_request_bytes.0),
            timeout: config.batch.timeout,
        };
        let lane = |signal| {
            Mutex::new(Lane {
                batcher: Batcher::new(signal, limits),
                open: true,
            })
        };
        // Rows (durable commits, replay runs) stay below what upstream takes.
        let max_row_bytes = config
            .batch
            .max_bytes
            .0
            .min(config.upstream.max_request_bytes.0);
        let budget = MemoryBudget::new(config.buffer.max_bytes.0);
        let (ingest, handoff) = match config.durability {
            Durability::Spool => {
                // A quarter of the budget: the rest stays free for requests
                // waiting for their commit.
                let (commits, writer, handoff) = crate::durable::channel(
                    spool.clone(),
                    metrics.clone(),
                    upstream.clone(),
                    max_row_bytes,
                    config.buffer.max_bytes.0 / 4,
                );
                let writer = Mutex::new(Some(writer));
                (Ingest::Durable { commits, writer }, Some(handoff))
            }
            Durability::Memory => (Ingest::Memory, None),
        };
        Arc::new(Pipeline {
            spooled: Spooled::new(
                config,
                spool,
                handoff,
                metrics.clone(),
                budget.clone(),
                max_row_bytes,
            ),
            ingest,
            budget,
            max_wait: config.buffer.max_wait,
            retry: config.upstream.retry.clone(),
            lanes: [
                lane(Signal::Traces),
                lane(Signal::Metrics),
                lane(Signal::Logs),
            ],
            timer: Notify::new(),
            queue: ExportQueue::new(),
            accepting: AtomicBool::new(true),
            metrics,
            upstream,
            cut: Mutex::new(Vec::new()),
            probe: Gate::new(
                config.upstream.retry.probe_interval,
                config.upstream.retry.initial_backoff,
            ),
        })
    }

    pub fn budget(&self) -> &Arc<MemoryBudget> {
        &self.budget
    }

    pub fn upstream(&self) -> Option<&Upstream> {
        self.upstream.as_ref()
    }

    pub fn spool(&self) -> &Spool {
        self.spooled.spool()
    }

    /// Take one validated request body. `Ok` means the pipeline owns it.
    pub async fn ingest(&self, signal: Signal, body: Bytes, items: u64) -> Result<(), Refused> {
        if !self.accepting.load(Ordering::Acquire) {
            return Err(Refused::ShuttingDown);
        }
        let reservation = self
            .budget
            .reserve(signal, body.len() as u64, items, self.max_wait)
            .await
            .map_err(|no| Refused::BufferFull {
                retry_after: no.retry_after,
            })?;
        if let Ingest::Durable { commits, .. } = &self.ingest {
            return commits
                .commit(signal, body, items, reservation)
                .await
                .map_err(|refusal| match refusal {
                    Refusal::ShuttingDown => Refused::ShuttingDown,
                    Refusal::Spool(e) => {
                        tracing::debug!(error = %e, "durable commit refused");
                        Refused::SpoolFull {
                            retry_after: Duration::from_secs(5),
                        }
                    }
                });
        }
        let mut sealed = Vec::new();
        let opened = {
            let Ok(mut lane) = self.lanes[signal.index()].lock() else {
                return Err(Refused::ShuttingDown);
            };
            if !lane.open {
                return Err(Refused::ShuttingDown);
            }
            let was_empty = lane.batcher.deadline().is_none();
            lane.batcher
                .offer(body, items, reservation, Instant::now(), &mut sealed);
            was_empty && lane.batcher.deadline().is_some()
        };
        // Once per batch (one opened, or one sealed by size): the spool's
        // vacuum waits while clients are being served.
        if opened || !sealed.is_empty() {
            self.spool().live_load_seen();
        }
        for batch in sealed {
            self.queue.push(batch);
        }
        if opened {
            self.timer.notify_one();
        }
        Ok(())
    }

    pub fn is_durable(&self) -> bool {
        matches!(self.ingest, Ingest::Durable { .. })
    }

    /// Durable mode: the group-commit writer (`durable.rs`); returns at once
    /// in memory mode, and for every call after the first.
    pub async fn run_durable_writer(self: Arc<Self>, force: CancellationToken) {
        let Ingest::Durable { writer, .. } = &self.ingest else {
            return;
        };
        let writer = writer.lock().ok().and_then(|mut w| w.take());
        if let Some(writer) = writer {
            writer.run(force).await;
        }
    }

    /// Seal open batches when they reach `batch.timeout`. Ends at `stop`;
    /// shutdown seals what is still open.
    pub async fn run_batch_timer(self: Arc<Self>, stop: CancellationToken) {
        loop {
            let next = self
                .lanes
                .iter()
                .filter_map(|l| l.lock().ok().and_then(|l| l.batcher.deadline()))
                .min();
            let sleep = async {
                match next {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.timer.notified() => continue,
                _ = sleep => {}
            }
            let now = Instant::now();
            for lane in &self.lanes {
                let sealed = lane.lock().ok().and_then(|mut l| l.batcher.poll(now));
                if let Some(batch) = sealed {
                    self.queue.push(batch);
                }
            }
        }
    }

    /// Refuse new requests from now on (requests already past this check complete).
    pub fn stop_accepting(&self) {
        self.accepting.store(false, Ordering::Release);
    }

    /// Seal every open batch and close the queue: export workers finish once
    /// it is empty.
    pub fn close(&self) {
        self.stop_accepting();
        // Durable mode: the writer commits what waits, then ends.
        if let Ingest::Durable { commits, .. } = &self.ingest {
            commits.close();
        }
        for lane in &self.lanes {
            let sealed = lane.lock().ok().and_then(|mut l| {
                l.open = false;
                l.batcher.take()
            });
            if let Some(batch) = sealed {
                self.queue.push(batch);
            }
        }
        self.queue.close();
    }

    /// One export worker: take batches until the queue is closed and empty,
    /// or `force` fires.
    pub async fn run_export_worker(self: Arc<Self>, force: CancellationToken) {
        if self.upstream.is_none() {
            return;
        }
        loop {
            let batch = tokio::select! {
                biased;
                _ = force.cancelled() => return,
                b = self.queue.pop() => b,
            };
            match batch {
                Some(batch) => self.deliver(batch, &force).await,
                None => return,
            }
        }
    }

    /// Export one batch, retrying as the policy says, until it is acknowledged,
    /// rejected for good, parked in the spool, or cut off by `force`.
    async fn deliver(&self, mut batch: Batch, force: &CancellationToken) {
        let Some(upstream) = &self.upstream else {
            self.cut_off(batch, false);
            return;
        };
        let signal = batch.signal;
        let mut backoff = Backoff::new(self.retry.initial_backoff, self.retry.max_backoff);
        let started = Instant::now();
        // `batch` holds the part being sent; `rest` the parts after it, when
        // the batch is above upstream's size limit (see pipeline/parts.rs).
        let mut rest = parts::cut_to_limit(upstream, &mut batch);
        let give_up_at = tokio::time::Instant::now() + self.retry.max_elapsed;
        let mut refused_cuts = 0;
        // Items of parts upstream took so far (a spooled batch that stops
        // midway is sent again whole, these included).
        let mut taken = 0;
        let mut retry_at = tokio::time::Instant::now();
        loop {
            // While upstream is failing only the probe goes out (src/probe.rs).
            let probe = match self.probe.admit(retry_at, give_up_at, force).await {
                Admit::Send { probe } => probe,
                Admit::Cut => {
                    parts::rejoin(&mut batch, rest);
                    self.sent_again(&batch, taken);
                    return self.cut_off(batch, false);
                }
                Admit::GiveUp => {
                    parts::rejoin(&mut batch, rest);
                    self.sent_again(&batch, taken);
                    return self.give_up_retrying(batch).await;
                }
            };
            batch.attempts = batch.attempts.saturating_add(1);
            let t0 = Instant::now();
            let result = tokio::select! {
                biased;
                _ = force.cancelled() => {
                    parts::rejoin(&mut batch, rest);
                    self.sent_again(&batch, taken);
                    self.cut_off(batch, true);
                    return;
                }
                r = upstream.export(signal, &batch.chunks) => r,
            };
            self.metrics.upstream_up.set(i64::from(result.is_ok()));
            self.probe.record(probe, Outcome::of(&result));
            match result {
                Ok(accepted) => {
                    self.metrics.export_result(signal, "ok", t0.elapsed());
                    let rejected = accepted.rejected.min(batch.items);
                    if rejected > 0 {
                        tracing::warn!(
                            %signal,
                            rejected,
                            items = batch.items,
                            message = %accepted.message,
                            "upstream accepted the batch partially; rejected items are not retried"
                        );
                        self.metrics.partial_rejected(signal, rejected);
                        self.metrics.dropped(signal, DropReason::Rejected, rejected);
                    }
                    let from_spool = matches!(batch.origin, Origin::Spool { .. });
                    self.metrics
                        .forwarded(signal, batch.items - rejected, from_spool);
                    taken += batch.items - rejected;
                    if parts::next(&mut batch, &mut rest) {
                        backoff.reset();
                        continue;
                    }
                    self.spooled.finish(&batch);
                    return;
                }
                Err(failure) => match verdict(&failure) {
                    Verdict::TooLarge => {
                        self.metrics
                            .export_result(signal, "too_large", t0.elapsed());
                        if self.split_refused(upstream, &mut batch, &mut rest, &failure) {
                            continue;
                        }
                        self.spooled.finish(&batch);
                        return;
                    }
                    permanent @ (Verdict::Refused | Verdict::Drop) => {
                        self.metrics.export_result(signal, "rejected", t0.elapsed());
                        if permanent == Verdict::Refused
                            && refused_cuts < parts::MAX_REFUSED_CUTS
                            && parts::cut_refused(&mut batch, &mut rest)
                        {
                            refused_cuts += 1;
                            tracing::debug!(%signal, cause = %failure.cause, message = %failure.message, "upstream refused a request's content; sending it in halves to find what it refuses");
                            continue;
                        }
                        tracing::error!(
                            %signal,
                            items = batch.items,
                            bytes = batch.bytes,
                            cause = %failure.cause,
                            message = %failure.message,
                            "upstream rejected the batch with a non-retryable status; dropped"
                        );
                        self.metrics
                            .dropped(signal, DropReason::Rejected, batch.items);
                        if parts::next(&mut batch, &mut rest) {
                            continue;
                        }
                        self.spooled.finish(&batch);
                        return;
                    }
                    Verdict::Retry => {
                        self.metrics
                            .export_result(signal, "retryable", t0.elapsed());
                        let delay = backoff.next_delay(failure.retry_after, &mut rand::rng());
                        tracing::debug!(%signal, cause = %failure.cause, message = %failure.message, ?delay, "export failed; will retry");
                        if started.elapsed() + delay > self.retry.max_elapsed {
                            parts::rejoin(&mut batch, rest);
                            self.sent_again(&batch, taken);
                            self.give_up_retrying(batch).await;
                            return;
                        }
                        retry_at = tokio::time::Instant::now() + delay;
                    }
                },
            }
        }
    }

    /// Delivery of a batch in parts stops midway (`taken`: items of the parts
    /// upstream took). A memory batch keeps only the parts not taken; a
    /// spooled one stays whole in the spool, so the parts taken will be sent
    /// again: counted as duplicates risked.
    fn sent_again(&self, batch: &Batch, taken: u64) {
        if taken > 0 && matches!(batch.origin, Origin::Spool { .. }) {
            tracing::warn!(
                signal = %batch.signal,
                items = taken,
                "a spooled batch stopped midway through its parts; its rows stay whole in the spool, so the items upstream already took will be sent again"
            );
            self.metrics.add_duplicates_risked(taken);
        }
    }

    /// A batch retried longer than `upstream.retry.max_elapsed`: a memory batch
    /// moves to the spool, a spooled one stays there for a later pass.
    async fn give_up_retrying(&self, batch: Batch) {
        match &batch.origin {
            Origin::Spool { .. } => self.spooled.release(&batch, true),
            Origin::Memory => {
                tracing::warn!(
                    signal = %batch.signal,
                    items = batch.items,
                    "batch retried past upstream.retry.max_elapsed; moving it to the spool"
                );
                let unwritten = self.write_to_spool(vec![batch]).await;
                // No room in the spool: keep it in memory, at the front of the queue.
                self.queue.push_front(unwritten);
            }
        }
    }

    /// Shutdown cut this batch off. `in_flight`: upstream may have received it.
    /// A memory batch goes to the spool; a spooled one stays there.
    fn cut_off(&self, batch: Batch, in_flight: bool) {
        if in_flight {
            self.metrics.add_duplicates_risked(batch.items);
        }
        match batch.origin {
            Origin::Memory => {
                if let Ok(mut cut) = self.cut.lock() {
                    cut.push(batch);
                }
            }
            Origin::Spool { .. } => self.spooled.release(&batch, false),
        }
    }

    /// Everything in memory that upstream has not acknowledged: batches cut off
    /// by shutdown and what is still queued or open. Call after the workers
    /// stopped.
    pub fn take_unfinished(&self) -> Vec<Batch> {
        let mut all = self
            .cut
            .lock()
            .map(|mut c| std::mem::take(&mut *c))
            .unwrap_or_default();
        all.extend(self.queue.drain());
        for lane in &self.lanes {
            if let Some(b) = lane.lock().ok().and_then(|mut l| l.batcher.take()) {
                all.push(b);
            }
        }
        all.sort_by_key(|b| b.created_ms);
        all
    }

    /// Items per signal inside a spool write that has not finished: after a
    /// cut shutdown, these are not known to be spooled.
    pub fn spool_writes_in_flight(&self) -> Vec<(Signal, u64)> {
        self.spooled.writes_in_flight()
    }

    /// Sealed batches waiting for an export worker.
    pub fn queued_batches(&self) -> usize {
        self.queue.len()
    }
}
