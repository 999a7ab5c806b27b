//! The queue of sealed batches between the batchers and the export workers.
//!
//! Bounded in bytes by the memory budget each batch holds a reservation of, so
//! it needs no bound of its own. A deque rather than a channel, because the
//! spiller takes the oldest batches from the front while upstream is down, and
//! a worker cut off by shutdown hands its batch back.

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::Notify;

use crate::batch::Batch;

#[derive(Debug, Default)]
pub struct ExportQueue {
    state: Mutex<State>,
    notify: Notify,
}

#[derive(Debug, Default)]
struct State {
    batches: VecDeque<Batch>,
    /// No more batches will be pushed; `pop` returns `None` once empty.
    closed: bool,
}

impl ExportQueue {
    pub fn new() -> ExportQueue {
        ExportQueue::default()
    }

    /// Add a batch at the back. After `close`, the batch is still queued (a
    /// late push is never lost): `drain` collects it.
    pub fn push(&self, batch: Batch) {
        if let Ok(mut s) = self.state.lock() {
            s.batches.push_back(batch);
        }
        self.notify.notify_one();
    }

    /// Wait for the oldest batch; `None` once closed and empty.
    pub async fn pop(&self) -> Option<Batch> {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut s = self.state.lock().ok()?;
                if let Some(b) = s.batches.pop_front() {
                    return Some(b);
                }
                if s.closed {
                    return None;
                }
            }
            notified.await;
        }
    }

    /// Take up to `max_bytes` of the oldest batches without waiting (at least one if any).
    pub fn take_oldest(&self, max_bytes: u64) -> Vec<Batch> {
        let Ok(mut s) = self.state.lock() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut bytes = 0;
        while let Some(front) = s.batches.front() {
            if !out.is_empty() && bytes + front.bytes > max_bytes {
                break;
            }
            bytes += front.bytes;
            out.extend(s.batches.pop_front());
        }
        out
    }

    /// Put batches back at the front, keeping their order.
    pub fn push_front(&self, batches: Vec<Batch>) {
        if let Ok(mut s) = self.state.lock() {
            for b in batches.into_iter().rev() {
                s.batches.push_front(b);
            }
        }
        self.notify.notify_waiters();
    }

    /// No more batches will come: waiting workers finish once the queue is empty.
    pub fn close(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.closed = true;
        }
        self.notify.notify_waiters();
    }

    /// Remove and return everything queued.
    pub fn drain(&self) -> Vec<Batch> {
        self.state
            .lock()
            .map(|mut s| s.batches.drain(..).collect())
            .unwrap_or_default()
    }

    pub fn len(&self) -> usize {
        self.state.lock().map(|s| s.batches.len()).unwrap_or(0)
    }
}
