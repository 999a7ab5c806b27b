//! What glibc's trim threshold costs the agent's allocation pattern.
//!
//! One batch as the agent handles it: 80 request bodies of a realistic
//! 100-span request (~51 KB each, written as a socket read would), held until
//! the batch is acknowledged, plus a 1.4 MB output buffer (a compressed
//! request), then all freed together. Run on a thread of its own, as on a
//! runtime worker, so in a non-main arena. First with glibc's default
//! thresholds, then after the `mallopt` calls `src/main.rs` (`tune_malloc`)
//! makes at start (64 MiB trim, 4 MiB mmap). The minor page faults per batch
//! are printed from `getrusage(RUSAGE_THREAD)`.
//! The order matters: mallopt cannot be undone in one process, so the
//! default group runs first.
#![allow(clippy::disallowed_types)]

use std::hint::black_box;

use criterion::{Criterion, Throughput};

const BODIES: usize = 80;
const BODY: usize = 51_400;
const OUTPUT: usize = 1_400_000;

fn one_batch() -> usize {
    let mut held: Vec<Vec<u8>> = Vec::with_capacity(BODIES + 1);
    for i in 0..BODIES {
        let mut body = Vec::with_capacity(BODY);
        body.resize(BODY, i as u8);
        held.push(body);
    }
    let mut out = Vec::with_capacity(OUTPUT);
    out.resize(OUTPUT / 4, 1);
    held.push(out);
    let len = held.iter().map(Vec::len).sum();
    drop(black_box(held));
    len
}

fn minor_faults() -> i64 {
    // SAFETY: getrusage writes into the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) };
    usage.ru_minflt
}

fn faults_per_batch() -> f64 {
    let before = minor_faults();
    for _ in 0..200 {
        black_box(one_batch());
    }
    (minor_faults() - before) as f64 / 200.0
}

fn batch_alloc(c: &mut Criterion, name: &str) {
    one_batch();
    eprintln!(
        "{name}: {:.0} minor page faults per batch",
        faults_per_batch()
    );
    let mut group = c.benchmark_group("batch_alloc_free");
    group.throughput(Throughput::Bytes((BODIES * BODY + OUTPUT / 4) as u64));
    group.bench_function(name, |b| b.iter(one_batch));
    group.finish();
}

fn main() {
    std::thread::spawn(|| {
        let mut c = Criterion::default().configure_from_args();
        batch_alloc(&mut c, "glibc_default");
        // SAFETY: mallopt only sets allocator parameters.
        let set = unsafe {
            libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20) == 1
                && libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20) == 1
        };
        assert!(set, "mallopt");
        batch_alloc(&mut c, "trim_64MiB_mmap_4MiB");
        c.final_summary();
    })
    .join()
    .expect("bench thread");
}
