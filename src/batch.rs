//! Batching by concatenation.
//!
//! Two serialized OTLP export requests, concatenated, are one valid request
//! holding both resource lists. A batch is therefore just the list of request
//! bodies (`Bytes`, never copied here) plus their counts. [`Batcher`] is the pure
//! per-signal logic: `offer` a request, and the batch is sealed when it reaches
//! `batch.max_items` or `batch.max_bytes`, or when `poll(now)` finds it older
//! than `batch.timeout`. The async loop that drives the timeout lives in
//! `pipeline.rs`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use bytes::Bytes;

use crate::buffer::Reservation;
use crate::signal::Signal;

/// A sealed batch on its way upstream (or to the spool).
#[derive(Debug)]
pub struct Batch {
    pub signal: Signal,
    /// Request bodies; their concatenation is the upstream request.
    pub chunks: Vec<Bytes>,
    pub items: u64,
    pub bytes: u64,
    /// Wall-clock creation time, milliseconds since the Unix epoch (kept in the spool).
    pub created_ms: i64,
    /// Export attempts so far, across restarts.
    pub attempts: u32,
    /// Where the batch came from; decides what "done" means for it.
    pub origin: Origin,
    /// Buffer memory this batch holds; released when the batch is dropped.
    pub reservation: Reservation,
}

/// Where a batch lives until upstream acknowledges it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// Only in memory: if it is not exported it must be spooled.
    Memory,
    /// Rows of the spool (replay puts several in one request): exporting the
    /// batch means deleting them, together.
    Spool { ids: Vec<i64> },
}

/// Limits that seal a batch.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_items: u64,
    pub max_bytes: u64,
    pub timeout: Duration,
}

/// The open (still growing) batch of one signal.
#[derive(Debug)]
pub struct Batcher {
    signal: Signal,
    limits: Limits,
    open: Option<Open>,
}

#[derive(Debug)]
struct Open {
    chunks: Vec<Bytes>,
    items: u64,
    bytes: u64,
    opened: Instant,
    reservation: Reservation,
}

impl Batcher {
    pub fn new(signal: Signal, limits: Limits) -> Self {
        Batcher {
            signal,
            limits,
            open: None,
        }
    }

    /// Add one request body. Sealed batches are pushed to `sealed`: the open
    /// batch if the body would not fit into it, and the new batch if the body
    /// filled it. A body larger than `max_bytes` becomes a batch of its own.
    pub fn offer(
        &mut self,
        body: Bytes,
        items: u64,
        reservation: Reservation,
        now: Instant,
        sealed: &mut Vec<Batch>,
    ) {
        let bytes = body.len() as u64;
        if let Some(open) = &self.open {
            if open.bytes + bytes > self.limits.max_bytes
                || open.items + items > self.limits.max_items
            {
                sealed.extend(self.take());
            }
        }
        let open = self.open.get_or_insert_with(|| Open {
            chunks: Vec::new(),
            items: 0,
            bytes: 0,
            opened: now,
            reservation: reservation.budget_empty(),
        });
        open.chunks.push(body);
        open.items += items;
        open.bytes += bytes;
        open.reservation.merge(reservation);
        if open.bytes >= self.limits.max_bytes || open.items >= self.limits.max_items {
            sealed.extend(self.take());
        }
    }

    /// Seal the open batch if it is older than the timeout.
    pub fn poll(&mut self, now: Instant) -> Option<Batch> {
        match self.deadline() {
            Some(deadline) if now >= deadline => self.take(),
            _ => None,
        }
    }

    /// When the open batch must be sealed, if there is one.
    pub fn deadline(&self) -> Option<Instant> {
        self.open.as_ref().map(|o| o.opened + self.limits.timeout)
    }

    /// Seal whatever is open, regardless of size or age.
    pub fn take(&mut self) -> Option<Batch> {
        let open = self.open.take()?;
        Some(Batch {
            signal: self.signal,
            chunks: open.chunks,
            items: open.items,
            bytes: open.bytes,
            created_ms: unix_ms(SystemTime::now()),
            attempts: 0,
            origin: Origin::Memory,
            reservation: open.reservation,
        })
    }

    /// Items and bytes in the open batch.
    pub fn open_size(&self) -> (u64, u64) {
        self.open.as_ref().map_or((0, 0), |o| (o.items, o.bytes))
    }
}

/// Milliseconds since the Unix epoch (0 for clocks before it).
pub fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::MemoryBudget;
    use proptest::prelude::*;

    fn limits(max_items: u64, max_bytes: u64) -> Limits {
        Limits {
            max_items,
            max_bytes,
            timeout: Duration::from_millis(200),
        }
    }

    async fn offer_all(b: &mut Batcher, reqs: &[(usize, u64)], now: Instant) -> Vec<Batch> {
        let budget = MemoryBudget::new(1 << 30);
        let mut sealed = Vec::new();
        for &(len, items) in reqs {
            let r = budget
                .reserve(Signal::Traces, len as u64, items, Duration::ZERO)
                .await
                .unwrap();
            b.offer(Bytes::from(vec![0u8; len]), items, r, now, &mut sealed);
        }
        sealed.extend(b.take());
        sealed
    }

    #[tokio::test]
    async fn batch_is_sealed_when_it_reaches_max_items() {
        let mut b = Batcher::new(Signal::Traces, limits(10, 1 << 20));
        let sealed = offer_all(&mut b, &[(5, 4), (5, 4), (5, 4)], Instant::now()).await;
        let items: Vec<u64> = sealed.iter().map(|b| b.items).collect();
        assert_eq!(items, vec![8, 4]);
    }

    #[tokio::test]
    async fn oversized_body_becomes_its_own_batch() {
        let mut b = Batcher::new(Signal::Logs, limits(1000, 100));
        let sealed = offer_all(&mut b, &[(10, 1), (500, 1), (10, 1)], Instant::now()).await;
        let bytes: Vec<u64> = sealed.iter().map(|b| b.bytes).collect();
        assert_eq!(bytes, vec![10, 500, 10]);
    }

    #[tokio::test]
    async fn open_batch_is_sealed_by_poll_after_the_timeout() {
        let mut b = Batcher::new(Signal::Metrics, limits(1000, 1000));
        let t0 = Instant::now();
        let budget = MemoryBudget::new(1000);
        let r = budget
            .reserve(Signal::Metrics, 3, 1, Duration::ZERO)
            .await
            .unwrap();
        let mut sealed = Vec::new();
        b.offer(Bytes::from_static(b"abc"), 1, r, t0, &mut sealed);
        assert!(sealed.is_empty());
        assert!(b.poll(t0 + Duration::from_millis(199)).is_none());
        let batch = b.poll(t0 + Duration::from_millis(200)).unwrap();
        assert_eq!(
            (batch.items, batch.bytes, batch.reservation.bytes()),
            (1, 3, 3)
        );
        assert!(b.deadline().is_none());
    }

    proptest! {
        #[test]
        fn batching_keeps_every_byte_and_item_in_order_and_respects_limits(
            reqs in proptest::collection::vec((1usize..300, 1u64..50), 0..60),
            max_items in 1u64..200,
            max_bytes in 1u64..2000,
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
            let sealed = rt.block_on(async {
                let mut b = Batcher::new(Signal::Traces, limits(max_items, max_bytes));
                offer_all(&mut b, &reqs, Instant::now()).await
            });
            let lens: Vec<usize> = sealed.iter().flat_map(|b| b.chunks.iter().map(|c| c.len())).collect();
            let want: Vec<usize> = reqs.iter().map(|r| r.0).collect();
            prop_assert_eq!(lens, want);
            prop_assert_eq!(sealed.iter().map(|b| b.items).sum::<u64>(), reqs.iter().map(|r| r.1).sum::<u64>());
            for batch in &sealed {
                prop_assert_eq!(batch.reservation.bytes(), batch.bytes);
                // Only a single request larger than the limits makes a batch above them.
                if batch.chunks.len() > 1 {
                    prop_assert!(batch.bytes <= max_bytes && batch.items <= max_items);
                }
            }
        }
    }
}
