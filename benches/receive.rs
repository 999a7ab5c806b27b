//! Cost of turning a request's HTTP/2 DATA frames into one body.
//!
//! The receiver reads a request body with `axum::body::to_bytes` (through
//! `http_body_util`'s collect): one frame becomes the body as it is, several
//! are joined with a copy. A realistic 100-span export (about 51 KB) arrives
//! in four frames at HTTP/2's default 16 KiB frame size and in one at the
//! 1 MiB the receiver advertises (`src/receiver/connections.rs`). The frames
//! are `Bytes` slices of one buffer, as h2 hands them over.
//!
//! Throughput is in bytes of body.
#![allow(clippy::disallowed_types)]

use std::convert::Infallible;
use std::hint::black_box;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;

/// About the size of one realistic 100-span export request.
const BODY: usize = 51_455;

fn collect(frames: Vec<Bytes>) -> Bytes {
    let stream = futures::stream::iter(
        frames
            .into_iter()
            .map(|f| Ok::<_, Infallible>(Frame::data(f))),
    );
    let body = StreamBody::new(stream);
    futures::executor::block_on(async {
        match body.collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(never) => match never {},
        }
    })
}

fn frames_of(buffer: &Bytes, frame: usize) -> Vec<Bytes> {
    (0..buffer.len())
        .step_by(frame)
        .map(|at| buffer.slice(at..(at + frame).min(buffer.len())))
        .collect()
}

fn request_body(c: &mut Criterion) {
    let buffer = Bytes::from((0..BODY).map(|i| (i * 7) as u8).collect::<Vec<u8>>());
    let mut group = c.benchmark_group("request_body_51KB");
    group.throughput(Throughput::Bytes(BODY as u64));
    for (name, frame) in [("16KiB_frames", 16 << 10), ("1MiB_frames", 1 << 20)] {
        let frames = frames_of(&buffer, frame);
        assert_eq!(collect(frames.clone()), buffer);
        group.bench_function(name, |b| {
            b.iter(|| black_box(collect(black_box(frames.clone()))))
        });
    }
    group.finish();
}

criterion_group!(benches, request_body);
criterion_main!(benches);
