//! The pipeline's spool side: spilling memory batches to the spool, durable
//! commits and their hand-off from memory, and the replay workers with the
//! claims that keep one spool row in one worker's hands at a time.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::{Pipeline, Refused, SPILL_HIGH_WATER, SPILL_LOW_WATER};
use crate::batch::{Batch, Origin};
use crate::config::WhenFull;
use crate::durable::Pending;
use crate::metrics::DropReason;
use crate::signal::Signal;
use crate::spool::{NewBatch, SpooledBatch};

/// Which spool rows replay workers hold, so no row is exported twice at once.
/// Changed only under `claim_or_evict`.
pub(super) struct ReplayClaims {
    cursor: i64,
    in_flight: HashSet<i64>,
    /// The spool may hold rows nobody has claimed (rows from before the
    /// start, spilled, or committed but not handed off). Replay workers read
    /// the spool while this is set and take hand-offs when it is not; cleared
    /// when a read finds nothing.
    unclaimed_rows: bool,
}

impl Default for ReplayClaims {
    fn default() -> Self {
        ReplayClaims {
            cursor: 0,
            in_flight: HashSet::new(),
            unclaimed_rows: true,
        }
    }
}

impl Pipeline {
    /// Durable mode: hand the request to the group-commit writer and wait for
    /// its transaction.
    pub(super) async fn commit(
        &self,
        writer: mpsc::Sender<Pending>,
        signal: Signal,
        body: Bytes,
        items: u64,
        reservation: crate::buffer::Reservation,
    ) -> Result<(), Refused> {
        let (done, answer) = oneshot::channel();
        let pending = Pending {
            signal,
            body,
            items,
            created_ms: crate::batch::unix_ms(std::time::SystemTime::now()),
            reservation,
            done,
        };
        writer
            .send(pending)
            .await
            .map_err(|_| Refused::ShuttingDown)?;
        match answer.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "durable commit refused");
                Err(Refused::SpoolFull {
                    retry_after: Duration::from_secs(5),
                })
            }
            Err(_) => Err(Refused::ShuttingDown),
        }
    }

    /// Durable mode: the group-commit writer; ends once shutdown closed the
    /// pipeline and every waiting request is committed, or at `force`: then
    /// the group being committed and every request still waiting are answered
    /// UNAVAILABLE (the clients retry), so a spool write that blocks cannot
    /// hold the process past `shutdown.timeout`.
    pub async fn run_durable_writer(self: Arc<Self>, force: CancellationToken) {
        let Some(mut rx) = self.durable_rx.lock().ok().and_then(|mut r| r.take()) else {
            return;
        };
        let max_group = self.max_row_bytes * 3;
        loop {
            let group = tokio::select! {
                biased;
                _ = force.cancelled() => break,
                group = crate::durable::next_group(&mut rx, max_group) => match group {
                    Some(group) => group,
                    None => return,
                },
            };
            let waiting = group.len();
            let commit = async {
                // Hold the claim lock from before the commit until the rows are
                // claimed: a replay worker that read a new row in between could
                // export it, delete it and release it before the hand-off, which
                // would then export it a second time.
                let claim_lock = self.claim_or_evict.lock().await;
                let committed = crate::durable::commit_group(
                    &self.spool,
                    group,
                    &self.metrics,
                    self.max_row_bytes,
                )
                .await;
                self.hand_off(committed, claim_lock);
            };
            tokio::select! {
                biased;
                _ = force.cancelled() => {
                    // Dropping the commit drops its requests' answers: they are
                    // refused as shutting down. The spool thread may still commit
                    // the rows; then the clients' retries are duplicates.
                    tracing::warn!(requests = waiting, "shutdown deadline: durable commit cut off; its requests are refused");
                    break;
                }
                _ = commit => {}
            }
        }
        rx.close();
        let mut refused = 0u64;
        while let Ok(pending) = rx.try_recv() {
            drop(pending);
            refused += 1;
        }
        if refused > 0 {
            tracing::warn!(
                requests = refused,
                "shutdown deadline: requests waiting for a durable commit are refused"
            );
        }
    }

    /// Durable mode: pass committed rows to the replay workers from memory,
    /// claimed so that no worker also reads them from the spool. Rows that do
    /// not fit in the hand-off queue, or arrive while upstream is failing,
    /// leave memory and wait in the spool.
    fn hand_off(&self, committed: Vec<Batch>, _claim_lock: tokio::sync::MutexGuard<'_, ()>) {
        let Some(handoff) = &self.handoff else {
            return;
        };
        if committed.is_empty() {
            return;
        }
        let upstream_up = self.upstream.as_ref().is_some_and(|u| u.health().is_up());
        let Ok(mut claims) = self.replay.lock() else {
            return;
        };
        for batch in committed {
            let Origin::Spool { ids } = &batch.origin else {
                continue;
            };
            if !upstream_up {
                claims.unclaimed_rows = true;
                continue;
            }
            let ids = ids.clone();
            claims.in_flight.extend(ids.iter().copied());
            if handoff.try_push(batch).is_err() {
                for id in &ids {
                    claims.in_flight.remove(id);
                }
                claims.unclaimed_rows = true;
            }
        }
        if claims.unclaimed_rows {
            self.replay_wake.notify_waiters();
        }
    }

    /// Write memory batches to the spool in one transaction. Returns those that
    /// did not fit (spool full), still owned by the caller; written ones are
    /// dropped from memory and counted. With `spool.when_full = "drop_oldest"`
    /// the oldest spooled batches are evicted (and counted) to make room.
    pub async fn write_to_spool(&self, batches: Vec<Batch>) -> Vec<Batch> {
        let _in_flight = self.spool_writes.track(&batches);
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
            if !pending.is_empty() {
                let _guard = self.claim_or_evict.lock().await;
                if let Ok(mut claims) = self.replay.lock() {
                    claims.unclaimed_rows = true;
                }
                self.replay_wake.notify_waiters();
            }
            pending = rest;
            if !full || pending.is_empty() || self.when_full != WhenFull::DropOldest {
                break;
            }
            // Page overhead makes the usable payload a little smaller than the bound.
            let need: u64 = pending.iter().map(|b| b.bytes).sum::<u64>() * 11 / 10 + 64 * 1024;
            let guard = self.claim_or_evict.lock().await;
            let in_flight: Vec<i64> = self
                .replay
                .lock()
                .map(|c| c.in_flight.iter().copied().collect())
                .unwrap_or_default();
            let evicted = self.spool.drop_oldest(need, in_flight).await;
            drop(guard);
            match evicted {
                Ok(evicted) if !evicted.is_empty() => {
                    let mut items = 0;
                    for (signal, n) in &evicted {
                        self.metrics.dropped(*signal, DropReason::SpoolEvicted, *n);
                        items += n;
                    }
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
            let unwritten = self.write_to_spool(batches).await;
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
    pub async fn run_replay_worker(
        self: Arc<Self>,
        stop: CancellationToken,
        force: CancellationToken,
    ) {
        if self.upstream.is_none() {
            return;
        }
        let mut last_progress = Instant::now();
        loop {
            if stop.is_cancelled() {
                return;
            }
            let wake = self.replay_wake.notified();
            tokio::pin!(wake);
            wake.as_mut().enable();
            match self.next_spooled().await {
                Some(batch) => {
                    let Origin::Spool { ids } = batch.origin.clone() else {
                        continue; // only spool rows come this way
                    };
                    self.deliver(batch, &force).await;
                    // Release the claims under the claim lock: a worker that read
                    // these rows before their delete committed must still find
                    // them claimed, or it would export them a second time. (A
                    // delete that could not commit leaves the rows
                    // delete-pending in the spool, which never hands them out
                    // again.)
                    let _guard = self.claim_or_evict.lock().await;
                    if let Ok(mut claims) = self.replay.lock() {
                        for id in &ids {
                            claims.in_flight.remove(id);
                        }
                    }
                    if self.handoff.is_none() && last_progress.elapsed() > Duration::from_secs(5) {
                        last_progress = Instant::now();
                        let stats = self.spool.stats_cached();
                        tracing::info!(
                            rows_left = stats.rows,
                            bytes_left = stats.bytes,
                            "replay progress"
                        );
                    }
                }
                None => {
                    let handed_off = async {
                        match &self.handoff {
                            Some(handoff) => handoff.ready.notified().await,
                            None => std::future::pending().await,
                        }
                    };
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = &mut wake => {}
                        _ = handed_off => {}
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
    }

    /// The next spool row to export, claimed: a hand-off from memory while no
    /// unclaimed rows wait in the spool, else the oldest unclaimed row.
    async fn next_spooled(&self) -> Option<Batch> {
        let (max_items, max_bytes) = (self.replay_max_items, self.max_row_bytes);
        if let Some(handoff) = &self.handoff {
            let backlog = self.replay.lock().map(|c| c.unclaimed_rows).unwrap_or(true);
            if !backlog {
                if let Some(batch) = handoff.pop_run(max_items, max_bytes) {
                    return Some(batch);
                }
            }
        }
        if let Some(rows) = self.claim_rows().await {
            return Some(self.batch_from_rows(rows));
        }
        self.handoff
            .as_ref()
            .and_then(|h| h.pop_run(max_items, max_bytes))
    }

    /// The oldest run of spool rows no other worker holds (one signal, within
    /// the batch limits), claimed. Starts after the first row of the last run
    /// and wraps to the start once, so rows left behind after `max_elapsed`
    /// are retried on the next pass.
    async fn claim_rows(&self) -> Option<Vec<SpooledBatch>> {
        let _guard = self.claim_or_evict.lock().await;
        let (cursor, held) = {
            let claims = self.replay.lock().ok()?;
            (claims.cursor, claims.in_flight.clone())
        };
        if let Some(expiry) = &self.expiry {
            expiry.sweep_if_due(&self.spool, &held, &self.metrics).await;
        }
        let mut found = self.read_unclaimed(cursor, held.clone()).await;
        if matches!(&found, Ok(run) if run.is_empty()) && cursor != 0 {
            found = self.read_unclaimed(0, held).await;
        }
        let run = found.ok()?;
        let mut claims = self.replay.lock().ok()?;
        match run.first() {
            Some(first) => {
                // Rows of other signals after the first are still ahead.
                claims.cursor = first.id;
                claims.in_flight.extend(run.iter().map(|r| r.id));
                Some(run)
            }
            None => {
                claims.cursor = 0;
                claims.unclaimed_rows = false;
                None
            }
        }
    }

    async fn read_unclaimed(
        &self,
        after: i64,
        held: HashSet<i64>,
    ) -> Result<Vec<SpooledBatch>, ()> {
        self.spool
            .oldest_run(after, held, self.replay_max_items, self.max_row_bytes)
            .await
            .map_err(|e| tracing::error!(error = %e, "cannot read the spool for replay"))
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
