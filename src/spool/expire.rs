//! `spool.max_age`: spooled rows older than the limit are deleted instead of
//! replayed.
//!
//! Old telemetry is often worse than none, and a week-old backlog should not
//! hold back live data. The replay side sweeps before it claims a row, at
//! most once per [`Expiry::interval`] (the first sweep right at start, so an
//! old backlog is gone before anything is replayed). A sweep deletes, in one
//! transaction, every row whose `created_ms` is older than `now - max_age`
//! except the rows a replay worker holds (their fate is upstream's answer;
//! when they come back unacknowledged the next sweep takes them). Each
//! deleted item is counted in `dropped_items_total{reason="spool_expired"}`,
//! so the accounting invariant of `metrics.rs` holds, and each sweep that
//! deleted something logs one line.

use std::collections::HashSet;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use rusqlite::params;

use super::store::{sql_err, Store};
use super::{Command, Spool, SpoolError};
use crate::metrics::{DropReason, Metrics};
use crate::signal::Signal;

/// When to sweep, and what is too old: plain values, `now` passed in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expiry {
    max_age: Duration,
    last_sweep: Option<Instant>,
}

impl Expiry {
    pub fn new(max_age: Duration) -> Expiry {
        Expiry {
            max_age,
            last_sweep: None,
        }
    }

    /// Time between sweeps: a tenth of the age limit, within 1s..60s, so a
    /// row outlives the limit by at most a tenth (and by at most a minute).
    pub fn interval(&self) -> Duration {
        (self.max_age / 10).clamp(Duration::from_secs(1), Duration::from_secs(60))
    }

    /// Whether a sweep is due at `now`; if so, records it as done.
    pub fn take_due(&mut self, now: Instant) -> bool {
        let due = self
            .last_sweep
            .is_none_or(|last| now.saturating_duration_since(last) >= self.interval());
        if due {
            self.last_sweep = Some(now);
        }
        due
    }

    /// Rows created before this unix time (ms) are expired at `now_ms`.
    pub fn cutoff_ms(&self, now_ms: i64) -> i64 {
        let age = i64::try_from(self.max_age.as_millis()).unwrap_or(i64::MAX);
        now_ms.saturating_sub(age)
    }
}

/// The replay side's hook: `sweep_if_due` before claiming a row.
#[derive(Debug)]
pub struct ExpirySweeper {
    expiry: Mutex<Expiry>,
}

impl ExpirySweeper {
    /// None when `spool.max_age` is not set.
    pub fn new(max_age: Option<Duration>) -> Option<ExpirySweeper> {
        max_age.map(|age| ExpirySweeper {
            expiry: Mutex::new(Expiry::new(age)),
        })
    }

    /// Deletes expired rows (but not claimed ones: their exporters decide)
    /// if a sweep is due, counting and logging them. Returns the items deleted.
    pub async fn sweep_if_due(&self, spool: &Spool, metrics: &Metrics) -> u64 {
        let cutoff = {
            let mut expiry = self.expiry.lock().unwrap_or_else(PoisonError::into_inner);
            if !expiry.take_due(Instant::now()) {
                return 0;
            }
            expiry.cutoff_ms(crate::batch::unix_ms(SystemTime::now()))
        };
        let expired = match spool.expire(cutoff, Vec::new()).await {
            Ok(expired) => expired,
            Err(e) => {
                tracing::error!(error = %e, "cannot delete expired spool rows (spool.max_age)");
                return 0;
            }
        };
        if expired.is_empty() {
            return 0;
        }
        let mut per_signal = [0u64; 3];
        for (signal, items) in &expired {
            metrics.dropped(*signal, DropReason::SpoolExpired, *items);
            per_signal[signal.index()] += items;
        }
        let max_age = self
            .expiry
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .max_age;
        tracing::warn!(
            batches = expired.len(),
            traces = per_signal[Signal::Traces.index()],
            metrics = per_signal[Signal::Metrics.index()],
            logs = per_signal[Signal::Logs.index()],
            max_age = %humantime::format_duration(max_age),
            "dropped spooled batches older than spool.max_age instead of replaying them"
        );
        per_signal.iter().sum()
    }
}

impl Spool {
    /// Deletes every row created before `before_ms` (unix ms) whose id is not
    /// in `keep`, in one transaction. Returns each deleted row's signal and
    /// item count, oldest first. Rows already delete-pending (delivered,
    /// their delete waiting for disk space) are not expired: they were
    /// counted as forwarded. A delete that fails leaves the expired rows
    /// delete-pending (out of replay, deleted by a later retry), so they
    /// are reported as expired all the same.
    pub async fn expire(
        &self,
        before_ms: i64,
        keep: Vec<i64>,
    ) -> Result<Vec<(Signal, u64)>, SpoolError> {
        self.call(|reply| Command::Expire(before_ms, keep, reply))
            .await
    }
}

impl Store {
    pub(super) fn expire(
        &mut self,
        before_ms: i64,
        keep: &HashSet<i64>,
    ) -> Result<Vec<(Signal, u64)>, SpoolError> {
        let mut expired: Vec<(i64, Signal, u64)> = Vec::new();
        {
            let sql = sql_err(self.path());
            let mut stmt = self
                .conn()
                .prepare_cached(
                    "SELECT id, signal, items FROM batches WHERE created_ms < ?1 ORDER BY id",
                )
                .map_err(&sql)?;
            let mut rows = stmt.query(params![before_ms]).map_err(&sql)?;
            while let Some(row) = rows.next().map_err(&sql)? {
                let id: i64 = row.get(0).map_err(&sql)?;
                if keep.contains(&id) || self.pending.contains_key(&id) {
                    continue;
                }
                let signal: String = row.get(1).map_err(&sql)?;
                let items: i64 = row.get(2).map_err(&sql)?;
                // A row whose signal cannot be read is left for `spool verify`.
                if let Ok(signal) = signal.parse::<Signal>() {
                    expired.push((id, signal, items.unsigned_abs()));
                }
            }
        }
        let ids: Vec<i64> = expired.iter().map(|(id, _, _)| *id).collect();
        // One worker thread owns the connection: nothing changes the table
        // between the read above and this delete.
        if let Err(e) = self.delete(&ids) {
            tracing::warn!(
                error = %e,
                rows = ids.len(),
                "expired spool rows could not be deleted now; they leave replay and are deleted later"
            );
        }
        Ok(expired
            .into_iter()
            .map(|(_, signal, items)| (signal, items))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::{NewBatch, SpoolOptions};
    use bytes::Bytes;

    #[test]
    fn the_first_sweep_is_due_at_once_then_once_per_interval() {
        let start = Instant::now();
        let mut e = Expiry::new(Duration::from_secs(3600));
        assert_eq!(e.interval(), Duration::from_secs(60));
        assert!(e.take_due(start));
        assert!(!e.take_due(start + Duration::from_secs(59)));
        assert!(e.take_due(start + Duration::from_secs(60)));
        assert!(!e.take_due(start + Duration::from_secs(61)));
        assert_eq!(
            Expiry::new(Duration::from_millis(500)).interval(),
            Duration::from_secs(1)
        );
        assert_eq!(
            Expiry::new(Duration::from_secs(100)).interval(),
            Duration::from_secs(10)
        );
    }

    #[test]
    fn the_cutoff_is_now_minus_the_age_limit() {
        let e = Expiry::new(Duration::from_secs(10));
        assert_eq!(e.cutoff_ms(1_000_000), 990_000);
        assert_eq!(Expiry::new(Duration::MAX).cutoff_ms(5), 5 - i64::MAX);
    }

    fn batch(signal: Signal, items: u64, created_ms: i64) -> NewBatch {
        NewBatch {
            signal,
            items,
            created_ms,
            attempts: 0,
            payload: vec![Bytes::from_static(b"\x0a\x00")],
        }
    }

    #[test]
    fn rows_already_delete_pending_are_not_expired_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("spool.db");
        let (mut store, _) = Store::open(&path, &SpoolOptions::default()).expect("open");
        let ids = store
            .insert(&[
                batch(Signal::Traces, 3, 1_000),
                batch(Signal::Logs, 5, 2_000),
            ])
            .expect("insert")
            .ids;
        // Delivered, but its delete could not commit (a full disk).
        store.mark_pending(&ids[..1]);
        let expired = store.expire(5_000, &HashSet::new()).expect("expire");
        assert_eq!(
            expired,
            vec![(Signal::Logs, 5)],
            "the delivered row is not counted as dropped"
        );
    }

    #[tokio::test]
    async fn expire_deletes_old_rows_except_those_in_flight_and_reports_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (spool, _) =
            Spool::open(&dir.path().join("spool.db"), SpoolOptions::default()).expect("open");
        let ids = spool
            .insert(vec![
                batch(Signal::Traces, 3, 1_000),
                batch(Signal::Logs, 5, 2_000),
                batch(Signal::Traces, 7, 3_000),
                batch(Signal::Metrics, 11, 9_000),
            ])
            .await
            .expect("insert")
            .ids;
        let expired = spool.expire(5_000, vec![ids[2]]).await.expect("expire");
        assert_eq!(expired, vec![(Signal::Traces, 3), (Signal::Logs, 5)]);
        let stats = spool.stats_cached();
        assert_eq!(stats.rows, 2);
        assert_eq!(stats.items, [7, 11, 0]);
        assert_eq!(stats.oldest_created_ms, Some(3_000));
        assert_eq!(
            spool.stats().await.expect("stats"),
            stats,
            "counts kept in step"
        );

        let metrics = Metrics::new();
        let sweeper = ExpirySweeper::new(Some(Duration::from_secs(1))).expect("limit set");
        let swept = sweeper.sweep_if_due(&spool, &metrics).await;
        assert_eq!(swept, 18, "created in 1970: far older than 1s");
        assert_eq!(metrics.dropped_total(Signal::Traces), 7);
        assert_eq!(metrics.dropped_total(Signal::Metrics), 11);
        assert_eq!(spool.stats().await.expect("stats").rows, 0);
        spool.close().await.expect("close");
    }
}
