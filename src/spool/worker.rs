//! The spool thread: it owns the connection and the replay claims
//! (`claims.rs`) and runs one command at a time, in the order they were sent.

use std::collections::HashSet;
use std::sync::{mpsc, Mutex, PoisonError};

use tokio::sync::oneshot;

use super::claims::{Claims, Unclaimed};
use super::maintain::{self, LiveLoad};
use super::store::Store;
use super::{InsertOutcome, NewBatch, SpoolError, SpoolStats, SpooledBatch};
use crate::signal::Signal;

pub(super) type Reply<T> = oneshot::Sender<Result<T, SpoolError>>;

/// Whether rows a command inserts are claimed for the inserter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Claim {
    /// Durable commits: the writer hands the rows to exporters from memory.
    ForCaller,
    /// Spill and shutdown: the rows wait for replay.
    No,
}

/// A request to the worker thread.
pub(super) enum Command {
    Insert(Vec<NewBatch>, Claim, Reply<InsertOutcome>),
    Oldest(i64, usize, Reply<Vec<SpooledBatch>>),
    OldestUnclaimed(i64, HashSet<i64>, Reply<Option<SpooledBatch>>),
    OldestRun(i64, HashSet<i64>, u64, u64, Reply<Vec<SpooledBatch>>),
    /// Claim the next replay run (`max_items`, `max_bytes`).
    ClaimRun(u64, u64, Reply<Vec<SpooledBatch>>),
    /// Give claimed rows back; `true`: count one more export attempt first.
    /// Nobody waits for it.
    Release(Vec<i64>, bool),
    /// Delete rows (and forget their claims). `None`: nobody waits for the
    /// answer; a failure is logged.
    Delete(Vec<i64>, Option<Reply<()>>),
    RecordAttempt(i64, Reply<()>),
    DropOldest(u64, Vec<i64>, Reply<Vec<(Signal, u64)>>),
    Expire(i64, Vec<i64>, Reply<Vec<(Signal, u64)>>),
    Stats(Reply<SpoolStats>),
    Close(Reply<()>),
}

/// Publishes the counts, then replies: a caller that saw the reply also sees the
/// counts in `stats_cached`. A caller that stopped waiting dropped its receiver; its
/// answer is moot, so a failed send is ignored.
fn answer<T>(
    reply: Reply<T>,
    result: Result<T, SpoolError>,
    store: &Store,
    stats: &Mutex<SpoolStats>,
) {
    publish(stats, store.stats());
    let _ = reply.send(result);
}

/// Answers a delete, or logs its failure when nobody waits for it.
fn answer_delete(
    reply: Option<Reply<()>>,
    result: Result<(), SpoolError>,
    store: &Store,
    stats: &Mutex<SpoolStats>,
    rows: usize,
) {
    match reply {
        Some(reply) => answer(reply, result, store, stats),
        None => {
            publish(stats, store.stats());
            if let Err(e) = result {
                tracing::error!(rows, error = %e, "cannot delete exported batches from the spool; they are not sent again by this process, but will be after a restart");
            }
        }
    }
}

pub(super) fn publish(shared: &Mutex<SpoolStats>, stats: &SpoolStats) {
    *shared.lock().unwrap_or_else(PoisonError::into_inner) = stats.clone();
}

/// Group commit for deletes: every `Delete` already queued behind this one joins
/// its transaction (exporters finish batches concurrently, and one commit per
/// acknowledged batch would make the spool thread the bottleneck). Returns the
/// first other command taken off the queue, to run next. If the shared
/// transaction fails, each delete runs alone so each caller gets its own answer.
fn delete_together(
    worker: &mut Worker<'_>,
    commands: &mpsc::Receiver<Command>,
    ids: Vec<i64>,
    reply: Option<Reply<()>>,
) -> Option<Command> {
    let mut group = vec![(ids, reply)];
    let mut next = None;
    while let Ok(command) = commands.try_recv() {
        match command {
            Command::Delete(ids, reply) => group.push((ids, reply)),
            other => {
                next = Some(other);
                break;
            }
        }
    }
    // Deleted or delete-pending, these rows are never handed out again.
    for (ids, _) in &group {
        worker.claims.forget(ids);
    }
    let store = &mut worker.store;
    if group.len() > 1 {
        let all: Vec<i64> = group
            .iter()
            .flat_map(|(ids, _)| ids.iter().copied())
            .collect();
        // A failed group delete leaves its rows delete-pending, so each
        // caller then gets the answer of its own (empty) delete.
        if store.delete(&all).is_ok() {
            publish(worker.stats, store.stats());
            for (_, reply) in group {
                if let Some(reply) = reply {
                    let _ = reply.send(Ok(()));
                }
            }
            return next;
        }
    }
    for (ids, reply) in group {
        let result = store.delete(&ids);
        answer_delete(reply, result, store, worker.stats, ids.len());
    }
    next
}

struct Worker<'a> {
    store: Store,
    claims: Claims,
    stats: &'a Mutex<SpoolStats>,
}

/// The worker thread's loop: one command at a time until `Close` or until every
/// handle is dropped (then it closes the store itself).
pub(super) fn run(
    store: Store,
    commands: mpsc::Receiver<Command>,
    stats: &Mutex<SpoolStats>,
    unclaimed: &Unclaimed,
    live: &LiveLoad,
) {
    let mut w = Worker {
        store,
        claims: Claims::default(),
        stats,
    };
    let mut next = None;
    loop {
        w.store.finish_checkpoint();
        let now = tokio::time::Instant::now();
        w.store.maintain(now, live.present(now));
        publish(stats, w.store.stats());
        let command = match next.take() {
            Some(command) => command,
            None => match commands.recv_timeout(maintain::INTERVAL) {
                Ok(command) => command,
                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            },
        };
        let store = &mut w.store;
        match command {
            Command::Insert(batches, claim, reply) => {
                let result = store.insert(&batches);
                if let Ok(outcome) = &result {
                    match claim {
                        Claim::ForCaller => w.claims.claim(&outcome.ids),
                        Claim::No => w.claims.inserted_unclaimed(outcome.written, unclaimed),
                    }
                }
                answer(reply, result, store, stats)
            }
            Command::Oldest(after_id, limit, reply) => {
                answer(reply, store.oldest(after_id, limit), store, stats)
            }
            Command::OldestRun(after_id, claimed, max_items, max_bytes, reply) => {
                let claimed: HashSet<i64> = claimed.union(w.claims.held()).copied().collect();
                let unreadable = w.claims.unreadable();
                let result = store.oldest_run(after_id, &claimed, unreadable, max_items, max_bytes);
                answer(reply, result, store, stats)
            }
            Command::OldestUnclaimed(after_id, claimed, reply) => {
                let claimed: HashSet<i64> = claimed.union(w.claims.held()).copied().collect();
                let result = store.oldest_unclaimed(after_id, &claimed);
                answer(reply, result, store, stats)
            }
            Command::ClaimRun(max_items, max_bytes, reply) => {
                let result = w.claims.claim_run(store, max_items, max_bytes, unclaimed);
                answer(reply, result, store, stats)
            }
            Command::Release(ids, attempted) => {
                if attempted {
                    for &id in &ids {
                        if let Err(e) = store.record_attempt(id) {
                            tracing::warn!(error = %e, "cannot record export attempt in the spool");
                        }
                    }
                }
                w.claims.release(&ids, unclaimed);
                publish(stats, store.stats());
            }
            Command::Delete(ids, reply) => {
                next = delete_together(&mut w, &commands, ids, reply);
            }
            Command::RecordAttempt(id, reply) => {
                answer(reply, store.record_attempt(id), store, stats)
            }
            Command::DropOldest(bytes_needed, keep, reply) => {
                let keep = w.claims.kept_with(&keep);
                answer(reply, store.drop_oldest(bytes_needed, &keep), store, stats)
            }
            Command::Expire(before_ms, keep, reply) => {
                let keep = w.claims.kept_with(&keep);
                answer(reply, store.expire(before_ms, &keep), store, stats)
            }
            Command::Stats(reply) => {
                let result = store.refresh_stats().cloned();
                answer(reply, result, store, stats)
            }
            Command::Close(reply) => {
                store.retry_pending();
                publish(stats, store.stats());
                // Reply only once the file is closed and the lock released.
                let _ = reply.send(w.store.close());
                return;
            }
        }
    }
    if let Err(e) = w.store.close() {
        tracing::warn!(error = %e, "closing the spool after its last handle was dropped");
    }
}
