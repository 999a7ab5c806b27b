//! Admin API cost: building one `Status` snapshot (what `GetStatus` and each
//! `Watch` tick do) and drawing one `top` frame, against encoding `/metrics`
//! (what a Prometheus scrape already costs) as the baseline, in the same run.
//!
//! `cargo bench --bench admin`. The agent's state is a real pipeline over a
//! real spool in a temporary directory, with every counter series created.
// Tests and benches drive real processes and sockets: wall-clock time,
// not tokio's (clippy.toml keeps std's Instant out of the agent's code).
#![allow(clippy::disallowed_types)]

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use criterion::{criterion_group, criterion_main, Criterion};
use telespool::config::Config;
use telespool::metrics::{DropReason, Metrics, Refusal};
use telespool::pipeline::Pipeline;
use telespool::signal::Signal;
use telespool::spool::{Spool, SpoolOptions, Synchronous};
use telespool::status::StatusSource;
use telespool::top::draw;
use telespool::top::view::{Connection, View};

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let opts = SpoolOptions {
        max_bytes: 1 << 30,
        synchronous: Synchronous::Normal,
    };
    let (spool, _) = Spool::open(&dir.path().join("spool.db"), opts).expect("spool");
    let config = Config::default();
    let metrics = Arc::new(Metrics::new());
    // Every series the snapshot reads exists, as on a busy agent.
    for s in Signal::ALL {
        metrics.accepted(s, 1_000, 100_000);
        for r in Refusal::ALL {
            metrics.refused(s, r, 1, 100);
        }
        for r in DropReason::ALL {
            metrics.dropped(s, r, 1);
        }
        metrics.forwarded(s, 900, true);
        metrics.spooled(s, 100);
        metrics.export_result(s, "ok", Duration::from_millis(3));
    }
    let registry = metrics.registry();
    let pipeline = Pipeline::new(&config, metrics.clone(), spool, None);
    let source = StatusSource::new(&config, Vec::new(), metrics, pipeline.clone());

    let mut group = c.benchmark_group("admin");
    group.bench_function("metrics_encode (baseline)", |b| {
        b.iter(|| {
            pipeline.refresh_gauges();
            let mut text = String::new();
            prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
            text
        })
    });
    group.bench_function("status_snapshot", |b| {
        b.iter(|| source.snapshot(true, SystemTime::now()))
    });
    let prev = source.snapshot(true, SystemTime::now());
    let cur = source.snapshot(true, SystemTime::now());
    group.bench_function("top_frame_text", |b| {
        b.iter(|| {
            let v = View::new(
                "127.0.0.1:13133",
                Some(&prev),
                &cur,
                Connection::Live,
                Duration::from_secs(1),
            );
            draw::text(&v)
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = bench
}
criterion_main!(benches);
