//! The memory budget shared by every signal's buffered data.
//!
//! A request reserves its body size here before it is batched; the reservation
//! travels with the batch and is released (by `Drop`) when upstream acknowledged
//! the batch, it was spooled, or it was dropped. Buffered bytes therefore never
//! exceed `buffer.max_bytes`, whatever the load. A request that finds no room
//! waits up to `buffer.max_wait` (FIFO, via the semaphore's fairness) and is then
//! refused with a retry hint derived from how fast the budget is draining.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::signal::Signal;

/// Bytes of buffered request data, bounded by a semaphore holding one permit per byte.
#[derive(Debug)]
pub struct MemoryBudget {
    permits: Arc<Semaphore>,
    limit: u64,
    /// Buffered items per signal, for metrics and accounting (bytes are the bound).
    items: [AtomicU64; 3],
    /// Estimate of how fast reservations are released, for the retry hint.
    drain: Mutex<DrainRate>,
}

/// Room held for buffered data; returned to the budget when dropped.
#[derive(Debug)]
pub struct Reservation {
    permit: Option<OwnedSemaphorePermit>,
    items: u64,
    signal: Signal,
    budget: Arc<MemoryBudget>,
}

/// The budget had no room within the allowed wait.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NoRoom {
    /// When the client should try again, from the current drain rate.
    pub retry_after: Duration,
}

impl MemoryBudget {
    pub fn new(limit_bytes: u64) -> Arc<MemoryBudget> {
        let limit = limit_bytes
            .min(Semaphore::MAX_PERMITS as u64)
            .min(u32::MAX as u64);
        Arc::new(MemoryBudget {
            permits: Arc::new(Semaphore::new(limit as usize)),
            limit,
            items: Default::default(),
            drain: Mutex::new(DrainRate::new(Instant::now())),
        })
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes currently reserved.
    pub fn used(&self) -> u64 {
        self.limit - self.permits.available_permits() as u64
    }

    /// Items currently reserved, all signals.
    pub fn items(&self) -> u64 {
        Signal::ALL.iter().map(|s| self.items_of(*s)).sum()
    }

    /// Items of one signal currently reserved.
    pub fn items_of(&self, signal: Signal) -> u64 {
        self.items[signal.index()].load(Ordering::Relaxed)
    }

    /// Reserve `bytes` for `items`, waiting at most `max_wait` for room.
    ///
    /// `bytes` above the whole limit can never fit; callers bound request size
    /// below the limit (config validation guarantees it).
    pub async fn reserve(
        self: &Arc<Self>,
        signal: Signal,
        bytes: u64,
        items: u64,
        max_wait: Duration,
    ) -> Result<Reservation, NoRoom> {
        let n = u32::try_from(bytes.min(self.limit)).unwrap_or(u32::MAX);
        let permit = match self.permits.clone().try_acquire_many_owned(n) {
            Ok(permit) => permit,
            Err(_) => {
                let acquire = self.permits.clone().acquire_many_owned(n);
                match tokio::time::timeout(max_wait, acquire).await {
                    Ok(Ok(permit)) => permit,
                    // Timed out, or the semaphore was closed (never happens: we never close it).
                    _ => return Err(self.no_room(bytes)),
                }
            }
        };
        self.items[signal.index()].fetch_add(items, Ordering::Relaxed);
        Ok(Reservation {
            permit: Some(permit),
            items,
            signal,
            budget: self.clone(),
        })
    }

    /// A reservation of nothing, for batches that hold no buffer memory (replayed rows).
    pub fn empty(self: &Arc<Self>, signal: Signal) -> Reservation {
        Reservation {
            permit: None,
            items: 0,
            signal,
            budget: self.clone(),
        }
    }

    fn no_room(&self, bytes: u64) -> NoRoom {
        let rate = self.drain.lock().map(|d| d.bytes_per_sec()).unwrap_or(0.0);
        NoRoom {
            retry_after: retry_hint(bytes, self.used(), rate),
        }
    }

    fn released(&self, signal: Signal, bytes: u64, items: u64) {
        self.items[signal.index()].fetch_sub(items, Ordering::Relaxed);
        if let Ok(mut drain) = self.drain.lock() {
            drain.record(bytes, Instant::now());
        }
    }
}

impl Reservation {
    /// Fold another reservation of the same signal into this one (a batch
    /// holds one reservation).
    pub fn merge(&mut self, mut other: Reservation) {
        self.items += other.items;
        other.items = 0;
        match (&mut self.permit, other.permit.take()) {
            (Some(mine), Some(theirs)) => mine.merge(theirs),
            (mine @ None, theirs) => *mine = theirs,
            (Some(_), None) => {}
        }
    }

    /// An empty reservation against the same budget, to merge others into.
    pub fn budget_empty(&self) -> Reservation {
        self.budget.empty(self.signal)
    }

    pub fn bytes(&self) -> u64 {
        self.permit.as_ref().map_or(0, |p| p.num_permits() as u64)
    }

    /// Keep the bytes but stop counting the items as buffered: they are
    /// accounted elsewhere now (durable mode: committed to the spool, while the
    /// memory copy is on its way upstream).
    pub fn forget_items(&mut self) {
        if self.items > 0 {
            self.budget.items[self.signal.index()].fetch_sub(self.items, Ordering::Relaxed);
            self.items = 0;
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let bytes = self.bytes();
        // Return the permits before recording, so `used()` is current for observers.
        drop(self.permit.take());
        if bytes > 0 || self.items > 0 {
            self.budget.released(self.signal, bytes, self.items);
        }
    }
}

/// How long a refused client should wait: the time the budget needs to free
/// `wanted` bytes at the observed drain rate, clamped to [250ms, 30s]. With no
/// drain observed (upstream stalled) the answer is a few seconds.
pub fn retry_hint(wanted: u64, used: u64, bytes_per_sec: f64) -> Duration {
    const MIN: Duration = Duration::from_millis(250);
    const MAX: Duration = Duration::from_secs(30);
    const STALLED: Duration = Duration::from_secs(5);
    if bytes_per_sec < 1.0 {
        return STALLED;
    }
    // Room frees in FIFO order; a fair guess is "until a fraction of the backlog drained".
    let backlog = (used / 4).max(wanted) as f64;
    let secs = backlog / bytes_per_sec;
    Duration::from_secs_f64(secs.min(MAX.as_secs_f64())).clamp(MIN, MAX)
}

/// Exponentially weighted bytes-per-second of released reservations.
#[derive(Debug)]
struct DrainRate {
    window_start: Instant,
    window_bytes: u64,
    rate: f64,
}

impl DrainRate {
    const WINDOW: Duration = Duration::from_millis(500);

    fn new(now: Instant) -> Self {
        DrainRate {
            window_start: now,
            window_bytes: 0,
            rate: 0.0,
        }
    }

    fn record(&mut self, bytes: u64, now: Instant) {
        self.window_bytes += bytes;
        let elapsed = now.saturating_duration_since(self.window_start);
        if elapsed >= Self::WINDOW {
            let sample = self.window_bytes as f64 / elapsed.as_secs_f64();
            self.rate = 0.5 * self.rate + 0.5 * sample;
            self.window_start = now;
            self.window_bytes = 0;
        }
    }

    fn bytes_per_sec(&self) -> f64 {
        // A window long past without releases means nothing drains now.
        if self.window_start.elapsed() > Self::WINDOW * 4 {
            0.0
        } else {
            self.rate
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn reservation_beyond_the_limit_waits_then_is_refused_with_a_hint() {
        let budget = MemoryBudget::new(100);
        let held = budget
            .reserve(Signal::Traces, 80, 1, Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(budget.used(), 80);
        let refused = budget
            .reserve(Signal::Traces, 30, 1, Duration::from_millis(500))
            .await;
        assert!(refused.is_err());
        assert_eq!(budget.used(), 80);
        drop(held);
        assert_eq!(budget.used(), 0);
        assert_eq!(budget.items(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_request_gets_room_when_a_reservation_is_released() {
        let budget = MemoryBudget::new(100);
        let held = budget
            .reserve(Signal::Traces, 80, 1, Duration::ZERO)
            .await
            .unwrap();
        let waiter = {
            let budget = budget.clone();
            tokio::spawn(async move {
                budget
                    .reserve(Signal::Traces, 50, 2, Duration::from_secs(1))
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(held);
        let got = waiter.await.unwrap().unwrap();
        assert_eq!(got.bytes(), 50);
        assert_eq!(budget.items(), 2);
    }

    #[tokio::test]
    async fn merged_reservations_release_everything_once() {
        let budget = MemoryBudget::new(100);
        let mut a = budget
            .reserve(Signal::Traces, 10, 1, Duration::ZERO)
            .await
            .unwrap();
        let b = budget
            .reserve(Signal::Traces, 20, 2, Duration::ZERO)
            .await
            .unwrap();
        a.merge(b);
        assert_eq!(a.bytes(), 30);
        assert_eq!(budget.items(), 3);
        drop(a);
        assert_eq!(budget.used(), 0);
        assert_eq!(budget.items(), 0);
    }

    #[test]
    fn retry_hint_is_bounded() {
        assert_eq!(retry_hint(10, 10, 0.0), Duration::from_secs(5));
        assert_eq!(retry_hint(10, 10, 1e12), Duration::from_millis(250));
        assert_eq!(retry_hint(1 << 30, 1 << 30, 1.0), Duration::from_secs(30));
    }
}
