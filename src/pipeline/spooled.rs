//! The pipeline's spool side ([`Spooled`]): spilling memory batches to the
//! spool, reading replay runs, and finishing or releasing the rows exporters
//! held; and the two loops that drive it, the spiller and the replay workers.
//!
//! Which rows an exporter holds is the spool thread's business
//! (`spool/claims.rs`): a replay read claims its run, a delete forgets the
//! claim, a release gives the rows back, each in one spool command. Nothing
//! here holds a lock across spool I/O, and an exporter done with a row sends
//! its delete or release without waiting for the commit.
//!
//! In memory mode replay gives way to live load (`pace.rs`): a probe loop
//! measures the runtime's scheduling lag and the machine's CPU pressure while
//! there is a backlog, and each replay worker claims smaller runs and waits
//! the paced gap before its next one.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use tokio_util::sync::CancellationToken;

use super::pace::{CpuPressure, Pace, PROBE_EVERY, RUN_SPLIT};
use super::spool_writes::SpoolWrites;
use super::{Pipeline, SPILL_HIGH_WATER, SPILL_LOW_WATER};
use crate::batch::{Batch, Origin};
use crate::buffer::MemoryBudget;
use crate::config::{Config, ReplayPacing, WhenFull};
use crate::durable::Handoff;
use crate::metrics::{DropReason, Metrics};
use crate::signal::Signal;
use crate::spool::{ExpirySweeper, NewBatch, Spool, SpooledBatch};

/// The spool as the pipeline uses it.
pub struct Spooled {
    spool: Spool,
    /// Durable mode: committed rows on their way upstream from memory.
    handoff: Option<Arc<Handoff>>,
    /// `spool.max_age`: expired rows are deleted before replay claims a row.
    expiry: Option<ExpirySweeper>,
    when_full: WhenFull,
    /// Replay runs stay within `batch.max_items` and this many bytes.
    max_items: u64,
    max_bytes: u64,
    /// Memory batches inside an unfinished spool write (for the shutdown count).
    writes: SpoolWrites,
    /// Items evicted by `spool.when_full = "drop_oldest"` so far (shutdown
    /// counts what its own write evicted).
    evicted_items: AtomicU64,
    metrics: Arc<Metrics>,
    budget: Arc<MemoryBudget>,
    /// The wait before each replay claim under live load (memory mode).
    pace: Mutex<Pace>,
    /// `spool.replay_pacing = "auto"`.
    pacing: bool,
}

impl Spooled {
    pub(super) fn new(
        config: &Config,
        spool: Spool,
        handoff: Option<Arc<Handoff>>,
        metrics: Arc<Metrics>,
        budget: Arc<MemoryBudget>,
        max_bytes: u64,
    ) -> Spooled {
        Spooled {
            spool,
            handoff,
            expiry: ExpirySweeper::new(config.spool.max_age),
            when_full: config.spool.when_full,
            max_items: config.batch.max_items,
            max_bytes,
            writes: SpoolWrites::default(),
            evicted_items: AtomicU64::new(0),
            metrics,
            budget,
            pace: Mutex::new(Pace::new()),
            pacing: config.spool.replay_pacing == ReplayPacing::Auto,
        }
    }

    /// Whether replay is paced against live load: in memory mode, unless
    /// `spool.replay_pacing = "off"`. In durable mode the replay workers
    /// carry the live data too.
    pub(super) fn paced(&self) -> bool {
        self.pacing && self.handoff.is_none()
    }

    /// How long a replay worker waits now before it claims a run: only
    /// while spooled rows wait (the probe samples only then).
    fn gap(&self) -> Duration {
        if !self.paced() || !self.spool.unclaimed().any() {
            return Duration::ZERO;
        }
        self.pace
            .lock()
            .map(|p| p.gap(Instant::now()))
            .unwrap_or(Duration::ZERO)
    }

    pub fn spool(&self) -> &Spool {
        &self.spool
    }

    /// Items per signal inside a spool write that has not finished.
    pub(super) fn writes_in_flight(&self) -> Vec<(Signal, u64)> {
        self.writes.in_flight()
    }

    /// Upstream is done with this spooled batch (acknowledged or rejected
    /// it): delete its rows, without waiting for the commit.
    pub(super) fn finish(&self, batch: &Batch) {
        if let Origin::Spool { ids } = &batch.origin {
            self.spool.finish(ids.clone());
        }
    }

    /// This spooled batch was not delivered: its rows go back to the spool
    /// for a later pass (`attempted`: one more export attempt is recorded).
    pub(super) fn release(&self, batch: &Batch, attempted: bool) {
        if let Origin::Spool { ids } = &batch.origin {
            self.spool.release(ids.clone(), attempted);
        }
    }

    /// Write memory batches to the spool in one transaction. Returns those that
    /// did not fit (spool full), still owned by the caller; written ones are
    /// dropped from memory and counted. With `spool.when_full = "drop_oldest"`
    /// the oldest spooled batches are evicted (and counted) to make room.
    pub async fn write(&self, batches: Vec<Batch>) -> Vec<Batch> {
        let _in_flight = self.writes.track(&batches);
        let mut pending = batches;
        for _attempt in 0..3 {
            if pending.is_empty() {
                break;
            }
            let (written, full) = self.insert_rows(&pending).await;
            let rest = pending.split_off(written.min(pending.len()));
            for b in &pending {
                self.metrics.spooled(b.signal, b.items);
            }
            pending = rest;
            if !full || pending.is_empty() || self.when_full != WhenFull::DropOldest {
                break;
            }
            // Page overhead makes the usable payload a little smaller than the bound.
            let need: u64 = pending.iter().map(|b| b.bytes).sum::<u64>() * 11 / 10 + 64 * 1024;
            // Rows exporters hold are not evicted: their fate is upstream's answer.
            let evicted = self.spool.drop_oldest(need, Vec::new()).await;
            match evicted {
                Ok(evicted) if !evicted.is_empty() => {
                    let mut items = 0;
                    for (signal, n) in &evicted {
                        self.metrics.dropped(*signal, DropReason::SpoolEvicted, *n);
                        items += n;
                    }
                    self.evicted_items.fetch_add(items, Ordering::Relaxed);
                    tracing::warn!(
                        batches = evicted.len(),
                        items,
                        "spool full: dropped the oldest spooled batches (spool.when_full = \"drop_oldest\")"
                    );
                }
                Ok(_) => break,
                Err(e) => {
                    tracing::error!(error = %e, "cannot evict from the spool");
                    break;
                }
            }
        }
        pending
    }

    /// One insert transaction: how many of `batches` (from the front) were
    /// written, and whether the spool was full.
    async fn insert_rows(&self, batches: &[Batch]) -> (usize, bool) {
        let rows = batches
            .iter()
            .map(|b| NewBatch {
                signal: b.signal,
                items: b.items,
                created_ms: b.created_ms,
                attempts: b.attempts,
                payload: b.chunks.clone(),
            })
            .collect();
        match self.spool.insert(rows).await {
            Ok(outcome) => {
                if outcome.full {
                    tracing::warn!(
                        written = outcome.written,
                        refused = batches.len() - outcome.written,
                        "spool is full (spool.max_bytes or the disk)"
                    );
                }
                (outcome.written, outcome.full)
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot write to the spool");
                (0, false)
            }
        }
    }

    /// The next spool rows to export, claimed: a hand-off from memory while
    /// no unclaimed rows wait in the spool, else the oldest unclaimed run,
    /// within `1/split` of a full run's items and bytes (at least one row).
    /// `None` when there is neither.
    pub(super) async fn next(&self, split: u64) -> Option<Batch> {
        let unclaimed = self.spool.unclaimed().any();
        let handoff = self.handoff.as_deref();
        if !unclaimed {
            return handoff.and_then(|h| h.pop_run(self.max_items, self.max_bytes));
        }
        if let Some(expiry) = &self.expiry {
            expiry.sweep_if_due(&self.spool, &self.metrics).await;
        }
        let (items, bytes) = (self.max_items / split.max(1), self.max_bytes / split.max(1));
        match self.spool.claim_run(items.max(1), bytes.max(1)).await {
            Ok(rows) if !rows.is_empty() => return Some(self.batch_from_rows(rows)),
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "cannot read the spool for replay"),
        }
        handoff.and_then(|h| h.pop_run(self.max_items, self.max_bytes))
    }

    /// One upstream request from a run of rows of one signal.
    fn batch_from_rows(&self, rows: Vec<SpooledBatch>) -> Batch {
        let signal = rows[0].signal;
        let mut batch = Batch {
            signal,
            chunks: Vec::with_capacity(rows.len()),
            items: 0,
            bytes: 0,
            created_ms: i64::MAX,
            attempts: 0,
            origin: Origin::Spool {
                ids: Vec::with_capacity(rows.len()),
            },
            reservation: self.budget.empty(signal),
        };
        for row in rows {
            batch.items += row.items;
            batch.bytes += row.bytes;
            batch.created_ms = batch.created_ms.min(row.created_ms);
            batch.attempts = batch.attempts.max(row.attempts);
            batch.chunks.push(row.payload);
            if let Origin::Spool { ids } = &mut batch.origin {
                ids.push(row.id);
            }
        }
        batch
    }
}

impl Pipeline {
    /// While upstream is failing, move the oldest sealed batches to the spool
    /// so clients keep getting OK. Hysteresis: an episode starts when memory
    /// goes above the high-water mark while upstream fails; during it, batches
    /// move whenever memory is above the low-water mark, down to that mark;
    /// it ends when upstream is back. Each episode logs one start line and
    /// one stop line with what it moved.
    pub async fn run_spiller(self: Arc<Self>, stop: CancellationToken) {
        if self.upstream.is_none() {
            return;
        }
        let mut episode: Option<SpillEpisode> = None;
        let mut full_logged = false;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
            let limit = self.budget.limit();
            let (high, low) = (
                (limit as f64 * SPILL_HIGH_WATER) as u64,
                (limit as f64 * SPILL_LOW_WATER) as u64,
            );
            let failing = self.probe.is_failing();
            let used = self.budget.used();
            match &episode {
                None if failing && used > high => {
                    tracing::info!(buffered_bytes = used, "spill to spool started");
                    episode = Some(SpillEpisode::new());
                }
                Some(e) if !failing => {
                    tracing::info!(
                        batches = e.batches,
                        items = e.items,
                        bytes = e.bytes,
                        lasted = ?e.started.elapsed(),
                        "spill to spool stopped: upstream is back"
                    );
                    episode = None;
                    full_logged = false;
                }
                _ => {}
            }
            let Some(current) = episode.as_mut() else {
                continue;
            };
            if used <= low {
                continue;
            }
            let batches = self.queue.take_oldest((used - low).min(limit / 8));
            if batches.is_empty() {
                continue;
            }
            let taken: (u64, u64, u64) = batches
                .iter()
                .fold((0, 0, 0), |(n, i, b), x| (n + 1, i + x.items, b + x.bytes));
            let unwritten = self.spooled.write(batches).await;
            let left: (u64, u64, u64) = unwritten
                .iter()
                .fold((0, 0, 0), |(n, i, b), x| (n + 1, i + x.items, b + x.bytes));
            current.batches += taken.0 - left.0;
            current.items += taken.1 - left.1;
            current.bytes += taken.2 - left.2;
            if !unwritten.is_empty() {
                if !full_logged {
                    tracing::warn!("spool full while spilling; clients get backpressure until upstream recovers");
                    full_logged = true;
                }
                self.queue.push_front(unwritten);
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
        }
    }

    /// One replay worker: export spooled rows oldest first, alongside live data
    /// (in durable mode also the rows the writer handed off from memory).
    /// Stops taking rows at `stop`; a row in flight at `force` stays in the spool.
    ///
    /// Unpaced, it exports one run at a time. Paced (`pace.rs`), its runs
    /// are [`RUN_SPLIT`] times smaller and it keeps several in flight, up to
    /// a full run's bytes, so a distant upstream's round trip does not cut
    /// replay to a fraction: the same bytes are in flight as with one full
    /// run, in smaller pieces. (A row larger than a small run can take the
    /// bytes in flight up to one row above that.)
    pub async fn run_replay_worker(
        self: Arc<Self>,
        stop: CancellationToken,
        force: CancellationToken,
    ) {
        if self.upstream.is_none() {
            return;
        }
        let mut in_flight = InFlight::default();
        self.clone()
            .replay_loop(&stop, &force, &mut in_flight)
            .await;
        // Deliveries in flight finish (or, at `force`, leave their rows in
        // the spool) before the worker ends.
        while !in_flight.is_empty() {
            in_flight.join_one().await;
        }
    }

    async fn replay_loop(
        self: Arc<Self>,
        stop: &CancellationToken,
        force: &CancellationToken,
        in_flight: &mut InFlight,
    ) {
        let spooled = &self.spooled;
        let mut last_progress = Instant::now();
        // Items of the last run this worker claimed (its pacing wait).
        let mut last_items = 0;
        loop {
            if stop.is_cancelled() {
                return;
            }
            // Enabled before `next` looks, so rows that appear meanwhile wake us.
            let wake = spooled.spool.unclaimed().wake().notified();
            tokio::pin!(wake);
            wake.as_mut().enable();
            let handed_off = async {
                match &spooled.handoff {
                    Some(handoff) => handoff.ready.notified().await,
                    None => std::future::pending().await,
                }
            };
            tokio::pin!(handed_off);
            // Under live load, give way before the next claim (`pace.rs`):
            // the gap is per full run, waited in proportion to the last
            // run's items, and runs are smaller meanwhile.
            let gap = spooled.gap();
            let split = if gap.is_zero() { 1 } else { RUN_SPLIT };
            // Room for the next run: one full run's bytes in flight at most.
            let room = spooled.max_bytes.saturating_sub(spooled.max_bytes / split);
            while !in_flight.is_empty() && (split == 1 || in_flight.bytes > room) {
                in_flight.join_one().await;
            }
            let wait = gap.mul_f64(last_items as f64 / spooled.max_items.max(1) as f64);
            if !wait.is_zero() {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
            in_flight.reap();
            match spooled.next(split).await {
                Some(batch) => {
                    last_items = batch.items;
                    let bytes = batch.bytes;
                    // `deliver` deletes or releases the rows, without waiting.
                    let this = self.clone();
                    let force = force.clone();
                    in_flight.spawn(bytes, async move {
                        this.deliver(batch, &force).await;
                    });
                    if spooled.handoff.is_none() && last_progress.elapsed() > Duration::from_secs(5)
                    {
                        last_progress = Instant::now();
                        let stats = spooled.spool.stats_cached();
                        tracing::info!(
                            rows_left = stats.rows,
                            bytes_left = stats.bytes,
                            "replay progress"
                        );
                    }
                }
                None => {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = &mut wake => {}
                        _ = &mut handed_off => {}
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
    }

    /// The replay pace probe (memory mode, `pace.rs`): while the spool has
    /// rows to replay, every `PROBE_EVERY` measure how long a ready task
    /// waits for a worker thread, the machine's CPU pressure, and whether
    /// live data is in memory. Idle (no timer) while there is nothing to
    /// replay. Ends at `stop`.
    pub async fn run_replay_pace(self: Arc<Self>, stop: CancellationToken) {
        let spooled = &self.spooled;
        if self.upstream.is_none() || !spooled.paced() {
            return;
        }
        let mut cpu = CpuPressure::new();
        loop {
            let unclaimed = spooled.spool.unclaimed();
            let wake = unclaimed.wake().notified();
            tokio::pin!(wake);
            wake.as_mut().enable();
            if !unclaimed.any() {
                // The next pressure share starts with the next backlog.
                cpu = CpuPressure::new();
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = &mut wake => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                continue;
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(PROBE_EVERY) => {}
            }
            let ready = Instant::now();
            tokio::task::yield_now().await;
            let lag = ready.elapsed();
            let now = Instant::now();
            let live = self.budget.used() > 0;
            let pressure = cpu.sample(now);
            if let Ok(mut pace) = spooled.pace.lock() {
                if live {
                    pace.live_seen(now);
                }
                pace.sample(lag, pressure, now);
            }
        }
    }

    /// Write memory batches to the spool (see [`Spooled::write`]); returns
    /// those that did not fit.
    pub async fn write_to_spool(&self, batches: Vec<Batch>) -> Vec<Batch> {
        self.spooled.write(batches).await
    }

    /// Items `spool.when_full = "drop_oldest"` has evicted from the spool
    /// since start.
    pub fn spool_evicted_items(&self) -> u64 {
        self.spooled.evicted_items.load(Ordering::Relaxed)
    }
}

/// A replay worker's deliveries in flight, and the bytes they hold.
#[derive(Default)]
struct InFlight {
    tasks: tokio::task::JoinSet<u64>,
    bytes: u64,
}

impl InFlight {
    fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    fn spawn(&mut self, bytes: u64, delivery: impl Future<Output = ()> + Send + 'static) {
        self.bytes += bytes;
        self.tasks.spawn(async move {
            delivery.await;
            bytes
        });
    }

    /// Waits for one delivery to finish (none: returns at once).
    async fn join_one(&mut self) {
        if let Some(done) = self.tasks.join_next().await {
            self.finished(done);
        }
    }

    /// Takes in the deliveries that have finished, without waiting.
    fn reap(&mut self) {
        while let Some(done) = self.tasks.try_join_next() {
            self.finished(done);
        }
    }

    fn finished(&mut self, done: Result<u64, tokio::task::JoinError>) {
        match done {
            Ok(bytes) => self.bytes = self.bytes.saturating_sub(bytes),
            Err(e) => tracing::error!(error = %e, "a replay delivery task failed"),
        }
        // A failed task's bytes are unknown; none are in flight once all ended.
        if self.tasks.is_empty() {
            self.bytes = 0;
        }
    }
}

/// What one spill episode moved, for its stop line.
struct SpillEpisode {
    started: Instant,
    batches: u64,
    items: u64,
    bytes: u64,
}

impl SpillEpisode {
    fn new() -> SpillEpisode {
        SpillEpisode {
            started: Instant::now(),
            batches: 0,
            items: 0,
            bytes: 0,
        }
    }
}
