//! Durable acknowledgements (`durability = "spool"`): a request is answered
//! OK only after its payload is committed to the spool.
//!
//! Group commit: requests queue here with a oneshot for their answer; one
//! writer task takes everything waiting (up to `batch.max_bytes` per signal),
//! writes one row per signal in ONE transaction, then answers every request
//! of the group. Concurrent clients therefore share commits, and throughput
//! does not collapse to one transaction per request. Rows reach upstream
//! through the replay workers, which delete a row only after upstream
//! acknowledged it.
//!
//! What survives what: with `spool.synchronous = "normal"` (WAL, no fsync per
//! commit) an acknowledged request survives a crash or SIGKILL of the agent,
//! not a power loss or kernel crash; with `"full"` each commit is fsynced and
//! survives power loss too, at the cost of one fsync per group.

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use crate::buffer::Reservation;
use crate::metrics::Metrics;
use crate::signal::Signal;
use crate::spool::{NewBatch, Spool};

/// A request waiting for its commit.
pub struct Pending {
    pub signal: Signal,
    pub body: Bytes,
    pub items: u64,
    pub created_ms: i64,
    /// Memory held while the request waits; released after the commit.
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

/// Take groups of pending requests and commit each group in one transaction,
/// until every sender is gone and the queue is empty.
pub async fn run_writer(
    spool: Spool,
    mut rx: mpsc::Receiver<Pending>,
    metrics: std::sync::Arc<Metrics>,
    max_row_bytes: u64,
    committed: impl Fn(),
) {
    while let Some(first) = rx.recv().await {
        let mut group = vec![first];
        let mut bytes = group[0].body.len() as u64;
        // Everything already waiting joins this commit, within a bound.
        while bytes < max_row_bytes * 3 {
            match rx.try_recv() {
                Ok(p) => {
                    bytes += p.body.len() as u64;
                    group.push(p);
                }
                Err(_) => break,
            }
        }
        commit_group(&spool, group, &metrics, max_row_bytes).await;
        committed();
    }
}

async fn commit_group(spool: &Spool, group: Vec<Pending>, metrics: &Metrics, max_row_bytes: u64) {
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
    let (written, failure) = match spool.insert(batches).await {
        Ok(outcome) if outcome.full => (outcome.written, CommitError::Full),
        Ok(outcome) => (outcome.written, CommitError::Full),
        Err(e) => {
            tracing::error!(error = %e, "durable commit failed");
            (0, CommitError::Failed(e.to_string()))
        }
    };
    for (i, members) in rows.into_iter().enumerate() {
        let answer = if i < written {
            let items = members.iter().map(|p| p.items).sum();
            metrics.spooled(members[0].signal, items);
            Ok(())
        } else {
            Err(failure.clone())
        };
        for p in members {
            // The client may have gone away; its data is committed all the same.
            let _ = p.done.send(answer.clone());
        }
    }
}
