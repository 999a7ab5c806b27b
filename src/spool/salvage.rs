//! Salvage: after a spool that failed its check was moved aside, copy every
//! row that can still be read from it into the fresh spool, so the intact rows
//! are replayed instead of being left behind with the damaged ones.
//!
//! Rows are found three ways, since a damaged b-tree page can end a scan: a
//! forward scan by id until it fails, a backward scan until it fails, and a
//! lookup of every id in between (bounded by [`MAX_PROBES`]); a lookup that
//! fails marks a row that cannot be read. Each row read is checked before it
//! is copied: its payload must walk as an OTLP request of its signal with the
//! item count the row claims (garbage in an overflow page is caught here).
//! What is lost is counted: rows read whose payload is bad by their item count
//! (`dropped_items{reason="spool_corrupt"}`), rows that could not be read at
//! all by number only. Details, multi-line, go to a file beside the
//! quarantined spool; the caller logs one line naming it.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags, OptionalExtension};

use super::open::sibling;
use super::store::{decode_row, Store};
use super::{NewBatch, SpoolError};
use crate::signal::Signal;

/// Most ids looked up one by one between the two scans.
const MAX_PROBES: i64 = 2_000_000;
/// Rows copied per transaction.
const COPY_GROUP: usize = 64;

/// What salvage recovered from a quarantined spool.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Salvage {
    /// Rows copied into the fresh spool, and their items.
    pub rows: u64,
    pub items: u64,
    /// Rows that could not be read at all (their items are unknown).
    pub lost_rows: u64,
    /// Items of rows that were read but are damaged, per [`Signal::index`].
    pub lost_items: [u64; 3],
    /// The file with the details (check output, ids lost).
    pub details: PathBuf,
}

/// Copies the readable rows of `damaged` into `store`, writing the details
/// (starting with `why`) to `<damaged>.salvage.txt`.
pub(super) fn salvage(damaged: &Path, why: &str, store: &mut Store) -> Salvage {
    let mut out = Salvage {
        details: sibling(damaged, ".salvage.txt"),
        ..Salvage::default()
    };
    let mut notes = format!("spool {} failed its check:\n{why}\n\n", damaged.display());
    match Connection::open_with_flags(damaged, OpenFlags::SQLITE_OPEN_READ_WRITE) {
        Ok(conn) => copy_rows(&conn, damaged, store, &mut out, &mut notes),
        Err(e) => {
            let _ = writeln!(notes, "cannot open it at all: {e}; no row was salvaged");
        }
    }
    let _ = writeln!(
        notes,
        "\nsalvaged {} rows ({} items); lost {} unreadable rows and {} items of damaged rows",
        out.rows,
        out.items,
        out.lost_rows,
        out.lost_items.iter().sum::<u64>()
    );
    if let Err(e) = std::fs::write(&out.details, notes) {
        tracing::warn!(path = %out.details.display(), error = %e, "cannot write the spool salvage report");
    }
    out
}

/// Ids until the scan fails; the error, if it did.
fn scan(conn: &Connection, sql: &str) -> (Vec<i64>, Option<rusqlite::Error>) {
    let mut ids = Vec::new();
    let result = (|| {
        let mut stmt = conn.prepare(sql)?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            ids.push(row.get(0)?);
        }
        Ok(())
    })();
    (ids, result.err())
}

fn copy_rows(
    conn: &Connection,
    damaged: &Path,
    store: &mut Store,
    out: &mut Salvage,
    notes: &mut String,
) {
    let (mut ids, forward_err) = scan(conn, "SELECT id FROM batches ORDER BY id");
    if let Some(e) = forward_err {
        let (backward, backward_err) = scan(conn, "SELECT id FROM batches ORDER BY id DESC");
        let low = ids.last().copied().unwrap_or(0);
        let seq: Option<i64> = conn
            .query_row(
                "SELECT seq FROM sqlite_sequence WHERE name = 'batches'",
                [],
                |r| r.get(0),
            )
            .optional()
            .ok()
            .flatten();
        let high = backward
            .iter()
            .copied()
            .filter(|&id| id > low)
            .min()
            .or(seq.map(|s| s + 1))
            .unwrap_or(low + 1);
        let _ = writeln!(
            notes,
            "forward scan stopped after id {low}: {e}; backward scan: {}",
            backward_err.map_or("complete".into(), |e| e.to_string())
        );
        let mut unreadable = Vec::new();
        for id in (low + 1)..high.min(low + 1 + MAX_PROBES) {
            match conn
                .query_row("SELECT id FROM batches WHERE id = ?1", [id], |r| {
                    r.get::<_, i64>(0)
                })
                .optional()
            {
                Ok(Some(id)) => ids.push(id),
                Ok(None) => {}
                Err(_) => unreadable.push(id),
            }
        }
        ids.extend(backward.into_iter().filter(|&id| id >= high));
        out.lost_rows += unreadable.len() as u64;
        if !unreadable.is_empty() {
            let _ = writeln!(
                notes,
                "{} ids could not be read (a deleted row in a damaged page looks the same): {}",
                unreadable.len(),
                ranges(&unreadable)
            );
        }
    }
    ids.sort_unstable();
    ids.dedup();
    let mut group = Vec::with_capacity(COPY_GROUP);
    for id in ids {
        match read_checked(conn, damaged, id) {
            Ok(batch) => group.push(batch),
            Err(Damage::Items(signal, items, why)) => {
                out.lost_items[signal.index()] += items;
                let _ = writeln!(
                    notes,
                    "row {id}: {why}; its {items} {signal} items are lost"
                );
            }
            Err(Damage::Unreadable(why)) => {
                out.lost_rows += 1;
                let _ = writeln!(notes, "row {id}: {why}");
            }
        }
        if group.len() == COPY_GROUP {
            flush(store, &mut group, out, notes);
        }
    }
    flush(store, &mut group, out, notes);
}

enum Damage {
    /// Read, but the payload does not match: the row's items are known.
    Items(Signal, u64, String),
    Unreadable(String),
}

/// One row, its payload checked against its signal and item count.
fn read_checked(conn: &Connection, path: &Path, id: i64) -> Result<NewBatch, Damage> {
    let unreadable = |e: &dyn std::fmt::Display| Damage::Unreadable(e.to_string());
    let mut stmt = conn
        .prepare_cached(
            "SELECT id, signal, items, bytes, created_ms, attempts, payload
             FROM batches WHERE id = ?1",
        )
        .map_err(|e| unreadable(&e))?;
    let mut rows = stmt.query([id]).map_err(|e| unreadable(&e))?;
    let row = rows
        .next()
        .map_err(|e| unreadable(&e))?
        .ok_or_else(|| Damage::Unreadable("gone on a second read".into()))?;
    let batch = decode_row(path, row).map_err(|e: SpoolError| unreadable(&e))?;
    match crate::wire::walk(batch.signal, &batch.payload) {
        Ok(counts) if counts.items == batch.items => Ok(NewBatch {
            signal: batch.signal,
            items: batch.items,
            created_ms: batch.created_ms,
            attempts: batch.attempts,
            payload: vec![batch.payload],
        }),
        Ok(counts) => Err(Damage::Items(
            batch.signal,
            batch.items,
            format!("payload holds {} items", counts.items),
        )),
        Err(e) => Err(Damage::Items(batch.signal, batch.items, e.to_string())),
    }
}

fn flush(store: &mut Store, group: &mut Vec<NewBatch>, out: &mut Salvage, notes: &mut String) {
    if group.is_empty() {
        return;
    }
    let written = match store.insert(group) {
        Ok(outcome) => outcome.written,
        Err(e) => {
            let _ = writeln!(notes, "cannot write to the fresh spool: {e}");
            0
        }
    };
    for (i, batch) in group.drain(..).enumerate() {
        if i < written {
            out.rows += 1;
            out.items += batch.items;
        } else {
            out.lost_items[batch.signal.index()] += batch.items;
        }
    }
}

/// `3-7, 9, 12-13`
fn ranges(ids: &[i64]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < ids.len() {
        let start = ids[i];
        while i + 1 < ids.len() && ids[i + 1] == ids[i] + 1 {
            i += 1;
        }
        if !out.is_empty() {
            out.push_str(", ");
        }
        match ids[i] == start {
            true => {
                let _ = write!(out, "{start}");
            }
            false => {
                let _ = write!(out, "{start}-{}", ids[i]);
            }
        }
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_collapse_consecutive_ids() {
        assert_eq!(ranges(&[3, 4, 5, 7, 9, 10]), "3-5, 7, 9-10");
        assert_eq!(ranges(&[]), "");
    }
}
