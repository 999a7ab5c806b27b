//! The batch timer on paused time: an open batch is sealed at
//! `batch.timeout`, not before, and a full batch at once.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use super::Pipeline;
use crate::config::{Config, ReplayPacing};
use crate::metrics::Metrics;
use crate::signal::Signal;
use crate::spool::{Spool, SpoolOptions};

fn pipeline(dir: &tempfile::TempDir, timeout: Duration, max_items: u64) -> Arc<Pipeline> {
    let (spool, _) =
        Spool::open(&dir.path().join("spool.db"), SpoolOptions::default()).expect("open spool");
    let mut config = Config::default();
    config.batch.timeout = timeout;
    config.batch.max_items = max_items;
    Pipeline::new(&config, Arc::new(Metrics::new()), spool, None)
}

/// Lets the timer task run after time moved.
async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn the_batch_timer_seals_an_open_batch_at_batch_timeout_and_not_before() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = pipeline(&dir, Duration::from_millis(200), 1000);
    let stop = CancellationToken::new();
    let timer = tokio::spawn(p.clone().run_batch_timer(stop.clone()));
    settle().await;

    p.ingest(Signal::Traces, Bytes::from_static(b"\x0a\x00"), 3)
        .await
        .expect("ingest");
    tokio::time::sleep(Duration::from_millis(199)).await;
    settle().await;
    assert_eq!(p.queued_batches(), 0, "still open 1 ms before the timeout");
    tokio::time::sleep(Duration::from_millis(1)).await;
    settle().await;
    assert_eq!(p.queued_batches(), 1, "sealed at the timeout");

    // A batch opened later gets its own full timeout.
    tokio::time::sleep(Duration::from_millis(500)).await;
    p.ingest(Signal::Logs, Bytes::from_static(b"\x0a\x00"), 1)
        .await
        .expect("ingest");
    tokio::time::sleep(Duration::from_millis(150)).await;
    settle().await;
    assert_eq!(p.queued_batches(), 1);
    tokio::time::sleep(Duration::from_millis(50)).await;
    settle().await;
    assert_eq!(p.queued_batches(), 2);

    stop.cancel();
    timer.await.expect("timer task");
    let unfinished = p.take_unfinished();
    assert_eq!(unfinished.iter().map(|b| b.items).sum::<u64>(), 4);
    p.spool().clone().close().await.expect("close spool");
}

#[tokio::test(start_paused = true)]
async fn a_batch_at_batch_max_items_is_sealed_without_waiting_for_the_timer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = pipeline(&dir, Duration::from_secs(3600), 4);
    for _ in 0..2 {
        p.ingest(Signal::Metrics, Bytes::from_static(b"\x0a\x00"), 2)
            .await
            .expect("ingest");
    }
    assert_eq!(
        p.queued_batches(),
        1,
        "sealed on the request that filled it"
    );
    p.spool().clone().close().await.expect("close spool");
}

#[tokio::test(start_paused = true)]
async fn steady_live_load_keeps_the_spool_from_vacuuming_while_batches_seal_by_size() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Two-item requests into five-item batches: each third request finds no
    // room, seals the open batch and starts the next one. Never sealed by
    // the timer or by filling up exactly, so the lane is never empty and
    // only the first request opens a batch into an empty lane.
    let p = pipeline(&dir, Duration::from_secs(3600), 5);
    assert!(!p.spool().live_load_present(), "no load yet");
    for _ in 0..50 {
        p.ingest(Signal::Traces, Bytes::from_static(b"\x0a\x00"), 2)
            .await
            .expect("ingest");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            p.spool().live_load_present(),
            "live load is seen for as long as requests keep coming"
        );
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!p.spool().live_load_present(), "and not once they stop");
    p.spool().clone().close().await.expect("close spool");
}

/// While replay is paced it claims runs of 1/split of the batch limits
/// (`pace.rs`), never splitting a row: a row over that goes out alone.
#[tokio::test]
async fn a_paced_replay_claims_smaller_runs_and_a_large_row_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = pipeline(&dir, Duration::from_secs(3600), 80);
    let row = |items: u64, created_ms: i64| crate::spool::NewBatch {
        signal: Signal::Logs,
        items,
        created_ms,
        attempts: 0,
        payload: vec![Bytes::from_static(b"\x0a\x00")],
    };
    let mut rows: Vec<_> = (0..20).map(|i| row(5, i)).collect();
    rows.push(row(30, 20));
    rows.extend((21..41).map(|i| row(5, i)));
    p.spool().insert(rows).await.expect("insert");

    let paced = p.spooled.next(8).await.expect("a paced run");
    assert_eq!(paced.items, 10, "80 / 8 items: two rows of 5");
    let full = p.spooled.next(1).await.expect("a full run");
    assert_eq!(full.items, 80, "sixteen rows of 5");
    let paced = p.spooled.next(8).await.expect("a paced run");
    assert_eq!(
        paced.items, 10,
        "the last two rows of 5 before the large one"
    );
    let large = p.spooled.next(8).await.expect("the large row");
    assert_eq!(large.items, 30, "a row over the paced limit goes out alone");
    let mut left = 0;
    while let Some(run) = p.spooled.next(8).await {
        assert!(run.items <= 10, "{} items", run.items);
        left += run.items;
    }
    assert_eq!(
        left, 100,
        "every row claimed once: 20 + 80 + 30 + 100 = 230 items"
    );
    p.spool().clone().close().await.expect("close spool");
}

/// `spool.replay_pacing`: memory mode paces replay unless it is "off";
/// durable mode never does (its replay workers carry the live data).
#[tokio::test]
async fn replay_is_paced_in_memory_mode_unless_pacing_is_off() {
    for (pacing, durable, paced) in [
        (ReplayPacing::Auto, false, true),
        (ReplayPacing::Off, false, false),
        (ReplayPacing::Auto, true, false),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let (spool, _) =
            Spool::open(&dir.path().join("spool.db"), SpoolOptions::default()).expect("open spool");
        let mut config = Config::default();
        config.spool.replay_pacing = pacing;
        if durable {
            config.durability = crate::config::Durability::Spool;
        }
        let p = Pipeline::new(&config, Arc::new(Metrics::new()), spool, None);
        assert_eq!(p.spooled.paced(), paced, "{pacing:?}, durable {durable}");
        p.spool().clone().close().await.expect("close spool");
    }
}
