//! Cost of building one upstream request body from a batch.
//!
//! A batch of 80 realistic trace requests (100 HTTP-server spans each, about
//! 4 MB: what `batch.max_items = 8192` seals) is turned into a request body
//! three ways per compression:
//! - `agent`: [`telespool::exporter::compress`], what the exporter does now
//!   (whole-buffer: the chunks fed to the compressor, output into one buffer
//!   sized once, compressor state reused per thread);
//! - `write_adapter`: the previous way, a `flate2::write::GzEncoder` /
//!   `zstd::stream::write::Encoder` (new state per batch) fed each chunk;
//! - `gzip/zlib_rs_whole_buffer`: the agent's gzip without the `isal`
//!   feature (`compress_with(.., Deflate::ZlibRs)`), the baseline for ISA-L:
//!   `cargo bench --features isal --bench compress -- request_body`;
//! - for `none`, `copy_into_frame` is what the exporter did before it sent the
//!   chunks as they are (`src/exporter/body.rs`): one copy of the batch.
//!
//! Throughput is in bytes of uncompressed batch.
#![allow(clippy::disallowed_types)]

#[path = "../tests/support/mod.rs"]
mod support;

#[path = "e2e/realistic.rs"]
#[allow(dead_code)]
mod realistic;

use std::hint::black_box;
use std::io::Write;

use bytes::{BufMut, Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use telespool::config::Compression;
use telespool::exporter::Deflate;

const REQUESTS: usize = 80;
const SPANS: usize = 100;

fn batch() -> Vec<Bytes> {
    (0..REQUESTS)
        .map(|j| {
            let start = (j * SPANS) as u64;
            let ids: Vec<u64> = (start..start + SPANS as u64).collect();
            realistic::build(support::Signal::Traces, j, &ids).encode_to_bytes()
        })
        .collect()
}

/// The exporter's previous encoder: a `Write` adapter per batch.
fn write_adapter(chunks: &[Bytes], compression: Compression) -> BytesMut {
    let total: usize = chunks.iter().map(Bytes::len).sum();
    let mut out = BytesMut::with_capacity(5 + total);
    out.put_bytes(0, 5);
    match compression {
        Compression::None => chunks.iter().for_each(|c| out.put_slice(c)),
        Compression::Gzip => {
            let mut gz = flate2::write::GzEncoder::new(out.writer(), flate2::Compression::fast());
            for chunk in chunks {
                gz.write_all(chunk).expect("gzip");
            }
            out = gz.finish().expect("gzip").into_inner();
        }
        Compression::Zstd => {
            let mut zs = zstd::stream::write::Encoder::new(out.writer(), 1).expect("zstd");
            zs.set_pledged_src_size(Some(total as u64)).expect("zstd");
            zs.include_contentsize(true).expect("zstd");
            for chunk in chunks {
                zs.write_all(chunk).expect("zstd");
            }
            out = zs.finish().expect("zstd").into_inner();
        }
    }
    out
}

fn request_body(c: &mut Criterion) {
    let chunks = batch();
    let total: usize = chunks.iter().map(Bytes::len).sum();
    let mut group = c.benchmark_group("request_body_4MB_realistic");
    group.throughput(Throughput::Bytes(total as u64));
    group.sample_size(20);
    for (name, compression) in [
        ("gzip", Compression::Gzip),
        ("zstd", Compression::Zstd),
        ("none", Compression::None),
    ] {
        let agent = telespool::exporter::compress(&chunks, compression, 5).expect("compress");
        eprintln!(
            "{name}: {total} bytes -> {} (ratio {:.2})",
            agent.len(),
            total as f64 / agent.len() as f64
        );
        if compression == Compression::None {
            group.bench_function("none/copy_into_frame", |b| {
                b.iter(|| black_box(write_adapter(black_box(&chunks), compression)))
            });
            group.bench_function("none/chunk_list", |b| {
                b.iter(|| black_box(black_box(&chunks).to_vec()))
            });
            continue;
        }
        group.bench_function(format!("{name}/agent"), |b| {
            b.iter(|| {
                black_box(telespool::exporter::compress(
                    black_box(&chunks),
                    compression,
                    5,
                ))
            })
        });
        group.bench_function(format!("{name}/write_adapter"), |b| {
            b.iter(|| black_box(write_adapter(black_box(&chunks), compression)))
        });
        if compression == Compression::Gzip {
            let zlib = telespool::exporter::compress_with(&chunks, compression, 5, Deflate::ZlibRs)
                .expect("compress");
            eprintln!(
                "gzip (zlib-rs, level 1): {total} bytes -> {} (ratio {:.2}); the agent's \
                 gzip above is {:?}",
                zlib.len(),
                total as f64 / zlib.len() as f64,
                telespool::exporter::GZIP
            );
            group.bench_function("gzip/zlib_rs_whole_buffer", |b| {
                b.iter(|| {
                    black_box(telespool::exporter::compress_with(
                        black_box(&chunks),
                        compression,
                        5,
                        Deflate::ZlibRs,
                    ))
                })
            });
        }
    }
    group.finish();
}

/// zstd at one level over the whole batch, the agent's way (raw encoder,
/// chunks fed as they are, pledged size), for the level sweep.
fn zstd_at(chunks: &[Bytes], level: i32) -> Vec<u8> {
    zstd_win(chunks, level, None)
}

/// [`zstd_at`] with a window of `2^wlog` bytes (libzstd lowers it to the
/// batch's size), or the level's default.
fn zstd_win(chunks: &[Bytes], level: i32, wlog: Option<u32>) -> Vec<u8> {
    use zstd::stream::raw::{CParameter, InBuffer, Operation, OutBuffer};
    let total: usize = chunks.iter().map(Bytes::len).sum();
    let mut out = vec![0u8; total / 2 + (64 << 10)];
    let mut encoder = zstd::stream::raw::Encoder::new(level).expect("zstd");
    if let Some(w) = wlog {
        encoder
            .set_parameter(CParameter::WindowLog(w))
            .expect("window log");
    }
    encoder
        .set_pledged_src_size(Some(total as u64))
        .expect("zstd");
    let mut pos = 0;
    for chunk in chunks {
        let mut input = InBuffer::around(chunk);
        while input.pos() < chunk.len() {
            let mut output = OutBuffer::around_pos(&mut out[..], pos);
            encoder.run(&mut input, &mut output).expect("zstd");
            pos = output.pos();
        }
    }
    loop {
        let mut output = OutBuffer::around_pos(&mut out[..], pos);
        let left = encoder.finish(&mut output, true).expect("zstd");
        pos = output.pos();
        if left == 0 {
            break;
        }
    }
    out.truncate(pos);
    out
}

/// zstd's fast (negative) levels next to level 1, each with its ratio.
fn zstd_levels(c: &mut Criterion) {
    let chunks = batch();
    let total: usize = chunks.iter().map(Bytes::len).sum();
    let mut group = c.benchmark_group("zstd_level_4MB_realistic");
    group.throughput(Throughput::Bytes(total as u64));
    group.sample_size(20);
    for level in [3, 1, -1, -2, -3, -5] {
        let out = zstd_at(&chunks, level);
        eprintln!(
            "zstd level {level}: {total} bytes -> {} (ratio {:.2})",
            out.len(),
            total as f64 / out.len() as f64
        );
        group.bench_function(format!("level_{level}"), |b| {
            b.iter(|| black_box(zstd_at(black_box(&chunks), level)))
        });
    }
    group.finish();
}

/// zstd -1 three ways, each with its ratio: the streaming API with
/// libzstd's default window for the level (512 KiB; what the agent does),
/// the streaming API with a window that covers the batch, and the chunks
/// joined into one buffer and compressed in one call with that window.
/// Streaming state is new in each iteration, as in `zstd_level`; the one-shot
/// compressor and buffers are reused. The covering window is 10-15 % faster
/// (libzstd's input buffer no longer wraps, so no block takes the slower
/// split-window match finder) but needs the whole batch in one buffer: a
/// second copy of every batch being compressed, which under a buffer held
/// full took the agent's peak RSS past `buffer.max_bytes` + 32 MiB
/// (benches/RESULTS.md, "zstd with one window per batch: measured, not kept").
fn zstd_windows(c: &mut Criterion) {
    let chunks = batch();
    let total: usize = chunks.iter().map(Bytes::len).sum();
    let mut group = c.benchmark_group("zstd_window_4MB_realistic");
    group.throughput(Throughput::Bytes(total as u64));
    group.sample_size(20);
    for (name, wlog) in [
        ("stream_window_512KiB", None),
        ("stream_window_covering_the_batch", Some(23)),
    ] {
        let out = zstd_win(&chunks, -1, wlog);
        eprintln!(
            "zstd -1, {name}: {total} bytes -> {} (ratio {:.2})",
            out.len(),
            total as f64 / out.len() as f64
        );
        group.bench_function(name, |b| {
            b.iter(|| black_box(zstd_win(black_box(&chunks), -1, wlog)))
        });
    }
    let mut cctx = zstd::bulk::Compressor::new(-1).expect("zstd");
    cctx.set_parameter(zstd::stream::raw::CParameter::WindowLog(23))
        .expect("zstd");
    let mut joined = Vec::with_capacity(total);
    let mut out = Vec::with_capacity(total);
    let mut one_shot = |joined: &mut Vec<u8>, out: &mut Vec<u8>| {
        joined.clear();
        chunks.iter().for_each(|c| joined.extend_from_slice(c));
        out.clear();
        cctx.compress_to_buffer(joined, out).expect("zstd");
        out.len()
    };
    let len = one_shot(&mut joined, &mut out);
    eprintln!(
        "zstd -1, joined_one_shot_window_covering_the_batch: {total} bytes -> {len} (ratio {:.2})",
        total as f64 / len as f64
    );
    group.bench_function("joined_one_shot_window_covering_the_batch", |b| {
        b.iter(|| black_box(one_shot(&mut joined, &mut out)))
    });
    group.finish();
}

/// zstd -1 through the streaming API in frames of at most `2^wlog` bytes of
/// input, each frame with a window of that size, the encoder reused across
/// batches as the agent's is. Within a frame libzstd's input buffer never
/// wraps: a profile shows no block in the split-window match finder
/// (`ZSTD_compressBlock_fast_extDict_generic`, 40 % of the agent's path),
/// yet the one-window finder took as long per byte, so 512 KiB frames cost
/// what the agent's path does (benches/RESULTS.md, "zstd in frames").
fn zstd_frames(
    encoder: &mut zstd::stream::raw::Encoder<'static>,
    chunks: &[Bytes],
    wlog: u32,
    out: &mut Vec<u8>,
) -> usize {
    use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
    let frame_max = 1usize << wlog;
    let total: usize = chunks.iter().map(Bytes::len).sum();
    out.clear();
    out.resize(total / 2 + (64 << 10), 0);
    let mut pos = 0;
    let mut left = total;
    let mut in_frame = 0;
    let finish = |encoder: &mut zstd::stream::raw::Encoder<'static>,
                  pos: &mut usize,
                  out: &mut Vec<u8>| loop {
        let mut output = OutBuffer::around_pos(&mut out[..], *pos);
        let more = encoder.finish(&mut output, true).expect("zstd");
        *pos = output.pos();
        if more == 0 {
            break;
        }
    };
    encoder.reinit().expect("zstd");
    encoder
        .set_pledged_src_size(Some(left.min(frame_max) as u64))
        .expect("zstd");
    for chunk in chunks {
        let mut rest: &[u8] = chunk;
        while !rest.is_empty() {
            if in_frame == frame_max {
                finish(encoder, &mut pos, out);
                encoder.reinit().expect("zstd");
                encoder
                    .set_pledged_src_size(Some(left.min(frame_max) as u64))
                    .expect("zstd");
                in_frame = 0;
            }
            let take = rest.len().min(frame_max - in_frame);
            let mut input = InBuffer::around(&rest[..take]);
            while input.pos() < take {
                let mut output = OutBuffer::around_pos(&mut out[..], pos);
                encoder.run(&mut input, &mut output).expect("zstd");
                pos = output.pos();
            }
            rest = &rest[take..];
            in_frame += take;
            left -= take;
        }
    }
    finish(encoder, &mut pos, out);
    out.truncate(pos);
    pos
}

/// zstd -1 with one frame per request body, each compressed in one pass
/// straight from the body (libzstd's `ZSTD_e_end` shortcut: no copy into
/// its input buffer, no split window), no history shared across bodies.
fn zstd_frame_per_chunk(
    cctx: &mut zstd::zstd_safe::CCtx<'static>,
    chunks: &[Bytes],
    out: &mut Vec<u8>,
) -> usize {
    use zstd::zstd_safe::zstd_sys::ZSTD_EndDirective as EndDirective;
    use zstd::zstd_safe::{InBuffer, OutBuffer, ResetDirective};
    out.clear();
    for chunk in chunks {
        cctx.reset(ResetDirective::SessionOnly).expect("zstd");
        cctx.set_pledged_src_size(Some(chunk.len() as u64))
            .expect("zstd");
        out.reserve(zstd::zstd_safe::compress_bound(chunk.len()));
        let mut input = InBuffer::around(chunk);
        loop {
            let pos = out.len();
            let mut output = OutBuffer::around_pos(out, pos);
            let left = cctx
                .compress_stream2(&mut output, &mut input, EndDirective::ZSTD_e_end)
                .expect("zstd");
            if left == 0 {
                break;
            }
            out.reserve(left);
        }
    }
    out.len()
}

/// The agent's zstd against frames of a window each ([`zstd_frames`]) and
/// one frame per request ([`zstd_frame_per_chunk`]), each with its ratio.
/// None was kept: see benches/RESULTS.md, "zstd in frames".
fn zstd_framed(c: &mut Criterion) {
    use zstd::stream::raw::CParameter;
    let chunks = batch();
    let total: usize = chunks.iter().map(Bytes::len).sum();
    let mut group = c.benchmark_group("zstd_frames_4MB_realistic");
    group.throughput(Throughput::Bytes(total as u64));
    group.sample_size(20);
    let agent = telespool::exporter::compress(&chunks, Compression::Zstd, 5).expect("zstd");
    eprintln!(
        "zstd -1, agent: {total} bytes -> {} (ratio {:.2})",
        agent.len(),
        total as f64 / agent.len() as f64
    );
    group.bench_function("agent", |b| {
        b.iter(|| {
            black_box(telespool::exporter::compress(
                black_box(&chunks),
                Compression::Zstd,
                5,
            ))
        })
    });
    {
        let mut cctx = zstd::zstd_safe::CCtx::create();
        cctx.set_parameter(zstd::zstd_safe::CParameter::CompressionLevel(-1))
            .expect("zstd");
        cctx.set_parameter(zstd::zstd_safe::CParameter::ContentSizeFlag(true))
            .expect("zstd");
        let mut out = Vec::new();
        let len = zstd_frame_per_chunk(&mut cctx, &chunks, &mut out);
        let back = zstd::stream::decode_all(&out[..]).expect("decode");
        assert_eq!(back.len(), total, "frames decode to the batch");
        eprintln!(
            "zstd -1, one_frame_per_request: {total} bytes -> {len} (ratio {:.2})",
            total as f64 / len as f64
        );
        group.bench_function("one_frame_per_request", |b| {
            b.iter(|| {
                black_box(zstd_frame_per_chunk(
                    &mut cctx,
                    black_box(&chunks),
                    &mut out,
                ))
            })
        });
    }
    for wlog in [19, 20, 21] {
        let mut encoder = zstd::stream::raw::Encoder::new(-1).expect("zstd");
        encoder
            .set_parameter(CParameter::WindowLog(wlog))
            .expect("zstd");
        encoder
            .set_parameter(CParameter::ContentSizeFlag(true))
            .expect("zstd");
        let mut out = Vec::new();
        let len = zstd_frames(&mut encoder, &chunks, wlog, &mut out);
        let back = zstd::stream::decode_all(&out[..]).expect("decode");
        assert_eq!(back.len(), total, "frames decode to the batch");
        eprintln!(
            "zstd -1, frames_of_{}KiB: {total} bytes -> {len} (ratio {:.2})",
            1 << (wlog - 10),
            total as f64 / len as f64
        );
        group.bench_function(format!("frames_of_{}KiB", 1 << (wlog - 10)), |b| {
            b.iter(|| {
                black_box(zstd_frames(
                    &mut encoder,
                    black_box(&chunks),
                    wlog,
                    &mut out,
                ))
            })
        });
    }
    group.finish();
}

criterion_group!(
    benches,
    request_body,
    zstd_levels,
    zstd_windows,
    zstd_framed
);
criterion_main!(benches);
