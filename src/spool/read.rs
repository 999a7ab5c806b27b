//! Reading the spool for replay and the offline tools: rows oldest first,
//! skipping rows held by others and rows whose delete is pending, and the
//! runs of rows that replay sends as one upstream request.

use std::collections::HashSet;

use rusqlite::params;

use super::store::{decode_row, sql_err, Store};
use super::{SpoolError, SpooledBatch};

/// Metadata of one row, read without its payload: id, signal, items, bytes.
type RowMeta = (i64, String, u64, u64);

/// Rows scanned past the first candidate when building a replay run.
const RUN_SCAN_LIMIT: usize = 4096;

impl Store {
    pub(super) fn oldest(
        &self,
        after_id: i64,
        limit: usize,
    ) -> Result<Vec<SpooledBatch>, SpoolError> {
        let sql = sql_err(&self.path);
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT id, signal, items, bytes, created_ms, attempts, payload
                 FROM batches WHERE id > ?1 ORDER BY id LIMIT ?2",
            )
            .map_err(&sql)?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut rows = stmt.query(params![after_id, limit]).map_err(&sql)?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(&sql)? {
            let batch = decode_row(&self.path, row)?;
            if !self.pending.contains_key(&batch.id) {
                out.push(batch);
            }
        }
        Ok(out)
    }

    /// The oldest row with `id > after_id` whose id is not in `claimed`. Reads
    /// ids first, so rows held by others cost no payload read.
    pub(super) fn oldest_unclaimed(
        &self,
        after_id: i64,
        claimed: &HashSet<i64>,
    ) -> Result<Option<SpooledBatch>, SpoolError> {
        let sql = sql_err(&self.path);
        let limit = i64::try_from(claimed.len() + self.pending.len() + 1).unwrap_or(i64::MAX);
        let id = {
            let mut stmt = self
                .conn
                .prepare_cached("SELECT id FROM batches WHERE id > ?1 ORDER BY id LIMIT ?2")
                .map_err(&sql)?;
            let ids = stmt
                .query_map(params![after_id, limit], |r| r.get::<_, i64>(0))
                .map_err(&sql)?;
            let mut free = None;
            for id in ids {
                let id = id.map_err(&sql)?;
                if !claimed.contains(&id) && !self.pending.contains_key(&id) {
                    free = Some(id);
                    break;
                }
            }
            free
        };
        match id {
            Some(id) => self.row(id),
            None => Ok(None),
        }
    }

    /// One row with its payload.
    fn row(&self, id: i64) -> Result<Option<SpooledBatch>, SpoolError> {
        let sql = sql_err(&self.path);
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT id, signal, items, bytes, created_ms, attempts, payload
                 FROM batches WHERE id = ?1",
            )
            .map_err(&sql)?;
        let mut rows = stmt.query([id]).map_err(&sql)?;
        match rows.next().map_err(&sql)? {
            Some(row) => Ok(Some(decode_row(&self.path, row)?)),
            None => Ok(None),
        }
    }

    /// A replay run: the oldest row with `id > after_id` that is neither in
    /// `claimed` nor delete-pending, and after it further such rows of the
    /// same signal, oldest first, while their items and bytes stay within
    /// `max_items` and `max_bytes` (the first row is taken whatever its size).
    /// Rows of other signals in between are left for the next run. Reads ids
    /// and sizes first, so skipped rows cost no payload read.
    pub(super) fn oldest_run(
        &self,
        after_id: i64,
        claimed: &HashSet<i64>,
        unreadable: &HashSet<i64>,
        max_items: u64,
        max_bytes: u64,
    ) -> Result<Vec<SpooledBatch>, SpoolError> {
        let sql = sql_err(&self.path);
        let chosen = {
            let mut stmt = self
                .conn
                .prepare_cached(
                    "SELECT id, signal, items, bytes FROM batches WHERE id > ?1 ORDER BY id",
                )
                .map_err(&sql)?;
            let metas = stmt
                .query_map([after_id], |r| {
                    let meta: RowMeta = (
                        r.get(0)?,
                        r.get(1)?,
                        r.get::<_, i64>(2)?.unsigned_abs(),
                        r.get::<_, i64>(3)?.unsigned_abs(),
                    );
                    Ok(meta)
                })
                .map_err(&sql)?;
            let mut chosen: Vec<i64> = Vec::new();
            let (mut signal, mut items, mut bytes) = (String::new(), 0u64, 0u64);
            let mut scanned_past_first = 0usize;
            for meta in metas {
                let (id, row_signal, row_items, row_bytes) = meta.map_err(&sql)?;
                if claimed.contains(&id)
                    || unreadable.contains(&id)
                    || self.pending.contains_key(&id)
                {
                    continue;
                }
                if chosen.is_empty() {
                    (signal, items, bytes) = (row_signal, row_items, row_bytes);
                    chosen.push(id);
                    continue;
                }
                scanned_past_first += 1;
                if scanned_past_first > RUN_SCAN_LIMIT {
                    break;
                }
                if row_signal != signal {
                    continue;
                }
                if items + row_items > max_items || bytes + row_bytes > max_bytes {
                    break;
                }
                items += row_items;
                bytes += row_bytes;
                chosen.push(id);
            }
            chosen
        };
        let mut run = Vec::with_capacity(chosen.len());
        for id in chosen {
            run.extend(self.row(id)?);
        }
        Ok(run)
    }
}
