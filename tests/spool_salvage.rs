//! A spool with garbage over some of its pages: moved aside, its readable
//! rows salvaged into a fresh spool and replayed, the rest counted.
// Tests and benches drive real processes and sockets: wall-clock time,
// not tokio's (clippy.toml keeps std's Instant out of the agent's code).
#![allow(clippy::disallowed_types)]

mod support;

use std::collections::BTreeSet;
use std::io::{Seek, SeekFrom, Write};
use std::time::Duration;

use support::scrape::{assert_accounting, scrape, value};
use support::*;
use telespool::spool::{NewBatch, Spool, SpoolOptions};

const DEADLINE: Duration = Duration::from_secs(60);
const ROWS: usize = 2000;
const PER_ROW: usize = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn garbage_over_some_pages_loses_only_those_rows_and_says_so_in_one_line() {
    let dir = ok(tempfile::tempdir());
    let path = dir.path().join("spool.db");
    let (spool, _) = ok(Spool::open(&path, SpoolOptions::default()));
    let mut sent = BTreeSet::new();
    for _ in 0..ROWS / 100 {
        let rows = (0..100)
            .map(|_| {
                let ids = fresh_ids(PER_ROW);
                sent.extend(ids.iter().copied());
                NewBatch {
                    signal: Signal::Traces,
                    items: PER_ROW as u64,
                    created_ms: 1,
                    attempts: 0,
                    payload: vec![ExportRequest::build(Signal::Traces, &ids).encode_to_bytes()],
                }
            })
            .collect();
        ok(spool.insert(rows).await);
    }
    ok(spool.close().await);

    // 16 KiB of garbage over four pages in the middle of the file.
    let len = ok(std::fs::metadata(&path)).len();
    let offset = (len / 2) / 4096 * 4096;
    let mut file = ok(std::fs::OpenOptions::new().write(true).open(&path));
    ok(file.seek(SeekFrom::Start(offset)));
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let garbage: Vec<u8> = (0..16 << 10)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    ok(file.write_all(&garbage));
    drop(file);

    let upstream = Upstream::start().await;
    let mut agent = ok(AgentProcess::builder()
        .upstream(&upstream.endpoint())
        .spool(&path)
        .config_toml("[batch]\ntimeout = \"10ms\"\n")
        .start()
        .await);
    assert_eq!(ok(agent.admin_get("/readyz").await).0, 200, "starts ready");
    ok(eventually("salvaged rows replayed", DEADLINE, || async {
        let s = scrape(&agent).await;
        (value(&s, "telespool_spool_rows", &[]) == 0.0).then_some(())
    })
    .await);
    let delivered = upstream.unique_ids(Signal::Traces);
    assert!(delivered.is_subset(&sent));
    let lost = sent.len() - delivered.len();
    assert!(lost > 0, "the garbage hit rows");
    assert!(
        delivered.len() >= sent.len() / 2,
        "only the damaged pages' rows are lost: {} of {} delivered",
        delivered.len(),
        sent.len()
    );

    let s = scrape(&agent).await;
    let lost_rows = value(&s, "telespool_spool_lost_rows_total", &[]) as usize;
    let corrupt_items = value(
        &s,
        "telespool_dropped_items_total",
        &[("signal", "traces"), ("reason", "spool_corrupt")],
    ) as usize;
    assert_eq!(
        lost_rows * PER_ROW + corrupt_items,
        lost,
        "every lost row is counted: {lost_rows} unreadable rows, {corrupt_items} items of damaged rows"
    );
    assert_accounting(&s, Signal::Traces);

    // One log record on one line, naming the file with the details.
    let lines = agent.stderr_lines();
    let record: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("copied its readable rows"))
        .collect();
    assert_eq!(record.len(), 1, "{lines:?}");
    assert!(
        lines.iter().all(|l| l.starts_with("20")),
        "every stderr line is a log record: {lines:?}"
    );
    let details = agent::log_field(record[0], "details").expect("details=");
    let text = ok(std::fs::read_to_string(details));
    assert!(text.lines().count() > 2, "{text}");
    assert_eq!(
        agent::log_field(record[0], "lost_rows").and_then(|v| v.parse::<usize>().ok()),
        Some(lost_rows)
    );

    agent.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(agent.wait_exit(DEADLINE).await.expect("exits").success());
}
