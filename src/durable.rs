//! Durable acknowledgements (`durability = "spool"`): a request is answered
//! OK only after its payload is committed to the spool.
//!
//! Group commit: requests queue here with a oneshot for their answer; one
//! writer task takes everything waiting (up to three rows' worth), writes one
//! row per signal per `batch.max_bytes` in ONE transaction, then answers every
//! request of the group. Concurrent clients therefore share commits, and
//! throughput does not collapse to one transaction per request.
//!
//! Hand-off: the committed row is the durable copy; the request bodies are
//! still in memory, so the writer passes them to the exporters as a batch that
//! carries the row id ([`Handoff`]) instead of making replay read back what
//! was just written. The insert claims the rows in the same spool command
//! ([`Spool::insert_claimed`], `spool/claims.rs`), so no replay read returns
//! them, and each is deleted only after upstream acknowledged it, exactly as
//! a replayed row. The hand-off queue is bounded (`Handoff::max_bytes`) and
//! only used while upstream is up: when it is full, or upstream is failing,
//! the bodies are dropped from memory and the rows are released to wait in
//! the spool for the replay workers. A kill loses nothing either way: every
//! acknowledged request is a committed row.
//!
//! The mode is chosen once, at start: in durable mode ingest holds a
//! [`DurableIngest`] (the writer's queue) and the writer task a
//! [`DurableWriter`]; nothing asks per request which mode is on. Shutdown
//! closes the queue ([`DurableIngest::close`]): the writer commits what was
//! already queued, and requests arriving later are refused as shutting down.
//!
//! What survives what: with `spool.synchronous = "normal"` (WAL, no fsync per
//! commit) an acknowledged request survives a crash or SIGKILL of the agent,
//! not a power loss or kernel crash; with `"full"` each commit is fsynced and
//! survives power loss too, at the cost of one fsync per group.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_util::sync::CancellationToken;

use crate::batch::{Batch, Origin};
use crate::buffer::Reservation;
use crate::exporter::Upstream;
use crate::metrics::Metrics;
use crate::signal::Signal;
use crate::spool::{NewBatch, Spool};

/// Requests the writer can hold waiting for a commit.
const QUEUE: usize = 4096;

/// Durable mode's two halves and the hand-off queue between the writer and
/// the replay workers. `handoff_bytes` bounds the hand-off queue; rows
/// (groups of requests of one signal) stay within `max_row_bytes`.
pub fn channel(
    spool: Spool,
    metrics: Arc<Metrics>,
    upstream: Option<Upstream>,
    max_row_bytes: u64,
    handoff_bytes: u64,
) -> (DurableIngest, DurableWriter, Arc<Handoff>) {
    let (commits, queue) = mpsc::channel(QUEUE);
    let closed = CancellationToken::new();
    let handoff = Arc::new(Handoff::new(handoff_bytes));
    let writer = DurableWriter {
        queue,
        closed: closed.clone(),
        spool,
        metrics,
        upstream,
        handoff: Arc::clone(&handoff),
        max_row_bytes,
    };
    (DurableIngest { commits, closed }, writer, handoff)
}

/// Why a request was not committed; each is retryable for the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Shutdown closed the queue, or cut the commit off at its deadline.
    ShuttingDown,
    /// The spool could not take the request.
    Spool(String),
}

/// Ingest's side: hands a request to the writer and waits for its commit.
pub struct DurableIngest {
    commits: mpsc::Sender<Pending>,
    closed: CancellationToken,
}

impl DurableIngest {
    /// `Ok` once the request's row is committed.
    pub async fn commit(
        &self,
        signal: Signal,
        body: Bytes,
        items: u64,
        reservation: Reservation,
    ) -> Result<(), Refusal> {
        let (done, answer) = oneshot::channel();
        let pending = Pending {
            signal,
            body,
            items,
            created_ms: crate::batch::unix_ms(std::time::SystemTime::now()),
            reservation,
            done,
        };
        self.commits
            .send(pending)
            .await
            .map_err(|_| Refusal::ShuttingDown)?;
        match answer.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Refusal::Spool(e.to_string())),
            Err(_) => Err(Refusal::ShuttingDown),
        }
    }

    /// Shutdown: the writer commits what is queued, then ends; later
    /// requests are refused as shutting down.
    pub fn close(&self) {
        self.closed.cancel();
    }
}

/// The group-commit writer (one task).
pub struct DurableWriter {
    queue: mpsc::Receiver<Pending>,
    closed: CancellationToken,
    spool: Spool,
    metrics: Arc<Metrics>,
    upstream: Option<Upstream>,
    handoff: Arc<Handoff>,
    max_row_bytes: u64,
}

impl DurableWriter {
    /// Commit groups until [`DurableIngest::close`] and every queued request
    /// is committed, or until `force`: then the group being committed and
    /// every request still queued are answered UNAVAILABLE (the clients
    /// retry), so a spool write that blocks cannot hold the process past
    /// `shutdown.timeout`.
    pub async fn run(mut self, force: CancellationToken) {
        let max_group = self.max_row_bytes * 3;
        loop {
            let open = !self.queue.is_closed();
            let next = tokio::select! {
                biased;
                _ = force.cancelled() => break,
                _ = self.closed.cancelled(), if open => None,
                group = next_group(&mut self.queue, max_group) => match group {
                    Some(group) => Some(group),
                    None => return,
                },
            };
            let Some(group) = next else {
                // Queued requests are still received; new sends fail.
                self.queue.close();
                continue;
            };
            let waiting = group.len();
            let commit = async {
                let committed =
                    commit_group(&self.spool, group, &self.metrics, self.max_row_bytes).await;
                self.hand_off(committed);
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
        self.queue.close();
        let mut refused = 0u64;
        while let Ok(pending) = self.queue.try_recv() {
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

    /// Pass committed rows (claimed by their insert) to the replay workers
    /// from memory. Rows that do not fit in the hand-off queue, or arrive
    /// while upstream is failing, leave memory: they are released to wait in
    /// the spool.
    fn hand_off(&self, committed: Vec<Batch>) {
        let upstream_up = self.upstream.as_ref().is_some_and(|u| u.health().is_up());
        let mut released = Vec::new();
        for batch in committed {
            if !upstream_up {
                released.extend(row_ids(batch));
                continue;
            }
            if let Err(batch) = self.handoff.try_push(batch) {
                released.extend(row_ids(batch));
            }
        }
        self.spool.release(released, false);
    }
}

/// A request waiting for its commit.
pub struct Pending {
    pub signal: Signal,
    pub body: Bytes,
    pub items: u64,
    pub created_ms: i64,
    /// Memory held while the request waits; after the commit it moves into
    /// the handed-off batch, or is released.
    pub reservation: Reservation,
    pub done: oneshot::Sender<Result<(), CommitError>>,
}

/// Why a request could not be committed; both are retryable for the client.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CommitError {
    #[error("the spool is full (spool.max_bytes or the disk)")]
    Full,
    #[error("cannot write to the spool: {0}")]
    Failed(String),
}

/// The next group: the first waiting request and everything queued behind
/// it, up to `max_bytes`. `None` once every sender is gone.
async fn next_group(rx: &mut mpsc::Receiver<Pending>, max_bytes: u64) -> Option<Vec<Pending>> {
    let first = rx.recv().await?;
    let mut bytes = first.body.len() as u64;
    let mut group = vec![first];
    while bytes < max_bytes {
        match rx.try_recv() {
            Ok(p) => {
                bytes += p.body.len() as u64;
                group.push(p);
            }
            Err(_) => break,
        }
    }
    Some(group)
}

/// Commit `group` in one transaction and answer its requests. Returns the
/// committed rows as batches (origin [`Origin::Spool`], holding the requests'
/// memory, claimed), for the caller to hand off or release.
async fn commit_group(
    spool: &Spool,
    group: Vec<Pending>,
    metrics: &Metrics,
    max_row_bytes: u64,
) -> Vec<Batch> {
    // Rows: per signal, consecutive requests up to max_row_bytes each.
    let mut rows: Vec<Vec<Pending>> = Vec::new();
    let mut open: [Option<(usize, u64)>; 3] = [None; 3];
    for p in group {
        let i = p.signal.index();
        let len = p.body.len() as u64;
        match open[i] {
            Some((row, bytes)) if bytes + len <= max_row_bytes => {
                rows[row].push(p);
                open[i] = Some((row, bytes + len));
            }
            _ => {
                rows.push(vec![p]);
                open[i] = Some((rows.len() - 1, len));
            }
        }
    }
    let batches = rows
        .iter()
        .map(|members| NewBatch {
            signal: members[0].signal,
            items: members.iter().map(|p| p.items).sum(),
            created_ms: members[0].created_ms,
            attempts: 0,
            payload: members.iter().map(|p| p.body.clone()).collect(),
        })
        .collect();
    let (ids, failure) = match spool.insert_claimed(batches).await {
        Ok(outcome) => (outcome.ids, CommitError::Full),
        Err(e) => {
            tracing::error!(error = %e, "durable commit failed");
            (Vec::new(), CommitError::Failed(e.to_string()))
        }
    };
    let mut committed = Vec::with_capacity(ids.len());
    for (i, members) in rows.into_iter().enumerate() {
        let Some(&id) = ids.get(i) else {
            for p in members {
                let _ = p.done.send(Err(failure.clone()));
            }
            continue;
        };
        let signal = members[0].signal;
        let created_ms = members[0].created_ms;
        let items: u64 = members.iter().map(|p| p.items).sum();
        metrics.spooled(signal, items);
        let mut chunks = Vec::with_capacity(members.len());
        let mut reservation: Option<Reservation> = None;
        for p in members {
            // The client may have gone away; its data is committed all the same.
            let _ = p.done.send(Ok(()));
            chunks.push(p.body);
            match &mut reservation {
                Some(r) => r.merge(p.reservation),
                None => reservation = Some(p.reservation),
            }
        }
        let Some(mut reservation) = reservation else {
            continue; // a row always has members
        };
        // The items are now counted as spooled, not as buffered.
        reservation.forget_items();
        committed.push(Batch {
            signal,
            bytes: chunks.iter().map(|c| c.len() as u64).sum(),
            chunks,
            items,
            created_ms,
            attempts: 0,
            origin: Origin::Spool { ids: vec![id] },
            reservation,
        });
    }
    committed
}

/// The spool rows of a committed batch; its bodies leave memory.
fn row_ids(batch: Batch) -> Vec<i64> {
    match batch.origin {
        Origin::Spool { ids } => ids,
        Origin::Memory => Vec::new(),
    }
}

/// Committed rows waiting for an exporter, in memory. Bounded in bytes.
pub struct Handoff {
    /// The batches and their bytes in all.
    queue: Mutex<(VecDeque<Batch>, u64)>,
    max_bytes: u64,
    /// Wakes an exporter when a batch was queued.
    pub ready: Notify,
}

impl Handoff {
    pub fn new(max_bytes: u64) -> Handoff {
        Handoff {
            queue: Mutex::new((VecDeque::new(), 0)),
            max_bytes,
            ready: Notify::new(),
        }
    }

    /// Queue `batch`, or give it back when the queue holds `max_bytes` already.
    pub fn try_push(&self, batch: Batch) -> Result<(), Batch> {
        let Ok(mut guard) = self.queue.lock() else {
            return Err(batch);
        };
        let (queue, held) = &mut *guard;
        if *held + batch.bytes > self.max_bytes && !queue.is_empty() {
            return Err(batch);
        }
        *held += batch.bytes;
        queue.push_back(batch);
        drop(guard);
        self.ready.notify_one();
        Ok(())
    }

    /// The first queued batch merged with those behind it of the same signal,
    /// while the merged items and bytes stay within `max_items` and
    /// `max_bytes`: one upstream request for several committed rows, whose
    /// ids it carries.
    pub fn pop_run(&self, max_items: u64, max_bytes: u64) -> Option<Batch> {
        let mut guard = self.queue.lock().ok()?;
        let (queue, held) = &mut *guard;
        let mut run = queue.pop_front()?;
        *held -= run.bytes;
        while let Some(next) = queue.front() {
            let fits = next.signal == run.signal
                && run.items + next.items <= max_items
                && run.bytes + next.bytes <= max_bytes;
            if !fits {
                break;
            }
            let Some(next) = queue.pop_front() else { break };
            *held -= next.bytes;
            merge(&mut run, next);
        }
        Some(run)
    }
}

/// Appends `next` (a committed row of the same signal) to `run`.
fn merge(run: &mut Batch, next: Batch) {
    run.items += next.items;
    run.bytes += next.bytes;
    run.created_ms = run.created_ms.min(next.created_ms);
    run.attempts = run.attempts.max(next.attempts);
    run.chunks.extend(next.chunks);
    run.reservation.merge(next.reservation);
    if let (Origin::Spool { ids }, Origin::Spool { ids: more }) = (&mut run.origin, next.origin) {
        ids.extend(more);
    }
}
