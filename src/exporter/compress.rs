//! Whole-buffer compression of one upstream request, for both protocols.
//!
//! The batch's chunks are fed straight to the compressor (deflate with the
//! gzip wrapper, or libzstd's streaming API), which writes into one
//! output buffer that starts with `prefix` zero bytes (the gRPC frame header,
//! filled in by the caller; 0 for HTTP). For zstd and zlib-rs's gzip no
//! `Write` adapter sits in between (ISA-L's binding offers only one):
//! `flate2::write::GzEncoder` and `zstd::stream::write::Encoder` compress
//! into a 32 KiB buffer of their own and copy it out, chunk by chunk. The
//! output is sized from the input once (a third of it, grown if a batch
//! compresses worse), and the compressor state (a few hundred KiB each, whose
//! fresh pages cost a page fault per 4 KiB on every batch) is kept per thread
//! and reset between batches.
//!
//! gzip is ISA-L's igzip at level 1 when the crate is built with the `isal`
//! feature (the packages are), zlib-rs at level 1 otherwise. On the 4 MB
//! realistic batch of `cargo bench --features isal --bench compress --
//! request_body`: ISA-L 6.0 ms for a ratio of 4.62, zlib-rs 8.4 ms for 4.11
//! (0.72x the time, 11 % fewer bytes). ISA-L's level 1 hashes and matches
//! with SIMD and still builds dynamic Huffman tables; zlib-rs's level 1 is
//! zlib-ng's `deflate_quick` (static tables only).
//!
//! Levels: gzip at 1 and zstd at -1, zstd's first fast level.
//! On a 1.6 MB batch of 4000 HTTP-server-like spans (random ids, varied
//! URLs, user agents, addresses), one release run, three repeats: gzip-1
//! 3.15x at 93-123 MB/s, gzip-6 3.95x at 38-40 MB/s, zstd-1 3.87x at 175-182
//! MB/s, zstd-2 3.92x, zstd-3 3.93x at 84-105 MB/s. On the 4 MB batch of
//! `cargo bench --bench compress` (group `zstd_level`, machine under load):
//! level 1 5.33x in 19.5 ms, -1 4.48x in 8.6 ms, -2 4.21x, -3 3.89x in 7.2
//! ms, -5 3.57x in 6.1 ms. Level -1 costs less than half of level 1 for a
//! 19% larger body, still smaller than gzip-1's (4.11x on that batch);
//! lower levels save little more time and lose ratio fast.
//! The agent-level cost per protocol and compression is the e2e bench's; the
//! encoder's own is `cargo bench --bench compress`.

use std::cell::RefCell;
use std::io;

use bytes::Bytes;
use flate2::{Compress, FlushCompress, Status};
use zstd::stream::raw::{CParameter, InBuffer, Operation, OutBuffer};

use crate::config::Compression;

/// zstd level for upstream requests: the first fast (negative) level, no
/// Huffman coding of literals (see the module notes for the trade).
pub(crate) const ZSTD_LEVEL: i32 = -1;

/// Room kept free in the output before each compressor call.
const MIN_SPARE: usize = 16 << 10;

thread_local! {
    /// Compressor state reused by the batches compressed on this thread.
    static ENCODERS: RefCell<Encoders> = RefCell::new(Encoders::default());
}

#[derive(Default)]
struct Encoders {
    zlib_rs: Option<Compress>,
    #[cfg(feature = "isal")]
    isal: Option<isal::write::Encoder<Vec<u8>>>,
    zstd: Option<zstd::stream::raw::Encoder<'static>>,
}

/// The deflate behind `Compression::Gzip`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Deflate {
    ZlibRs,
    #[cfg(feature = "isal")]
    Isal,
}

/// This build's gzip: ISA-L with the `isal` feature, zlib-rs without.
#[cfg(feature = "isal")]
pub const GZIP: Deflate = Deflate::Isal;
/// This build's gzip: ISA-L with the `isal` feature, zlib-rs without.
#[cfg(not(feature = "isal"))]
pub const GZIP: Deflate = Deflate::ZlibRs;

/// `prefix` zero bytes, then the chunks' concatenation, compressed as asked:
/// the body of one upstream request (public for `benches/compress.rs`).
pub fn compress(chunks: &[Bytes], compression: Compression, prefix: usize) -> io::Result<Vec<u8>> {
    compress_with(chunks, compression, prefix, GZIP)
}

/// [`compress`] with gzip made by `deflate` (public for
/// `benches/compress.rs`, whose zlib-rs baseline runs in the `isal` build).
pub fn compress_with(
    chunks: &[Bytes],
    compression: Compression,
    prefix: usize,
    deflate: Deflate,
) -> io::Result<Vec<u8>> {
    let total: usize = chunks.iter().map(Bytes::len).sum();
    let capacity = match compression {
        Compression::None => total,
        _ => total / 3 + MIN_SPARE,
    };
    let mut out = Vec::with_capacity(prefix + capacity);
    out.resize(prefix, 0);
    match compression {
        Compression::None => chunks.iter().for_each(|c| out.extend_from_slice(c)),
        Compression::Gzip => ENCODERS.with(|e| {
            let mut e = e.borrow_mut();
            match deflate {
                Deflate::ZlibRs => gzip_zlib_rs(&mut e.zlib_rs, chunks, &mut out),
                #[cfg(feature = "isal")]
                Deflate::Isal => gzip_isal(&mut e.isal, chunks, &mut out),
            }
        })?,
        Compression::Zstd => {
            ENCODERS.with(|e| zstd(&mut e.borrow_mut().zstd, chunks, total, &mut out))?
        }
    }
    Ok(out)
}

/// Keep at least [`MIN_SPARE`] bytes of spare capacity (the compressors
/// write only into spare capacity and never grow the vector).
fn make_room(out: &mut Vec<u8>) {
    if out.capacity() - out.len() < MIN_SPARE {
        out.reserve(out.len().max(MIN_SPARE));
    }
}

/// gzip through ISA-L: its stateful stream fed chunk by chunk. The binding
/// deflates each chunk into a buffer of its own (grown 16 KiB at a time,
/// kept with the encoder) and appends that to `out`: one copy of the
/// output, about a quarter of the input. `flush` ends the gzip member and
/// resets the stream for the next batch.
#[cfg(feature = "isal")]
fn gzip_isal(
    state: &mut Option<isal::write::Encoder<Vec<u8>>>,
    chunks: &[Bytes],
    out: &mut Vec<u8>,
) -> io::Result<()> {
    use std::io::Write;
    let encoder = state.get_or_insert_with(|| {
        isal::write::Encoder::new(Vec::new(), isal::CompressionLevel::One, isal::Codec::Gzip)
    });
    *encoder.get_ref_mut() = std::mem::take(out);
    let written = chunks
        .iter()
        .try_for_each(|chunk| encoder.write_all(chunk))
        .and_then(|()| encoder.flush());
    *out = std::mem::take(encoder.get_ref_mut());
    if written.is_err() {
        // The stream stopped half-way: start the next batch on a new one.
        *state = None;
    }
    written
}

fn gzip_zlib_rs(
    state: &mut Option<Compress>,
    chunks: &[Bytes],
    out: &mut Vec<u8>,
) -> io::Result<()> {
    let deflate = match state {
        Some(d) => {
            d.reset();
            d
        }
        // 15: the 32 KiB window, as gzip(1) and every gateway use.
        None => state.insert(Compress::new_gzip(flate2::Compression::fast(), 15)),
    };
    for chunk in chunks {
        let mut input: &[u8] = chunk;
        while !input.is_empty() {
            make_room(out);
            let before = deflate.total_in();
            deflate
                .compress_vec(input, out, FlushCompress::None)
                .map_err(io::Error::other)?;
            let used = usize::try_from(deflate.total_in() - before).unwrap_or(input.len());
            input = input.get(used..).unwrap_or_default();
        }
    }
    loop {
        make_room(out);
        match deflate
            .compress_vec(&[], out, FlushCompress::Finish)
            .map_err(io::Error::other)?
        {
            Status::StreamEnd => return Ok(()),
            Status::Ok | Status::BufError => {}
        }
    }
}

fn zstd(
    state: &mut Option<zstd::stream::raw::Encoder<'static>>,
    chunks: &[Bytes],
    total: usize,
    out: &mut Vec<u8>,
) -> io::Result<()> {
    let encoder = match state {
        Some(e) => {
            e.reinit()?;
            e
        }
        None => {
            let mut e = zstd::stream::raw::Encoder::new(ZSTD_LEVEL)?;
            // The frame header then carries the size, so the receiver can
            // check its limit before expanding anything.
            e.set_parameter(CParameter::ContentSizeFlag(true))?;
            state.insert(e)
        }
    };
    encoder.set_pledged_src_size(Some(total as u64))?;
    for chunk in chunks {
        let mut input = InBuffer::around(chunk);
        while input.pos() < chunk.len() {
            make_room(out);
            let len = out.len();
            let mut output = OutBuffer::around_pos(out, len);
            encoder.run(&mut input, &mut output)?;
        }
    }
    loop {
        make_room(out);
        let len = out.len();
        let mut output = OutBuffer::around_pos(out, len);
        if encoder.finish(&mut output, true)? == 0 {
            return Ok(());
        }
    }
}

/// The `Content-Encoding` / `grpc-encoding` token, None for no compression.
pub(crate) fn encoding_name(compression: Compression) -> Option<&'static str> {
    match compression {
        Compression::None => None,
        Compression::Gzip => Some("gzip"),
        Compression::Zstd => Some("zstd"),
    }
}

/// Decompress a small reply body (`encoding` as the server named it), at
/// most `limit` bytes out; None if it cannot be read.
pub(crate) fn decompress_reply(encoding: Option<&str>, body: &[u8], limit: u64) -> Option<Bytes> {
    use std::io::Read;
    let mut out = Vec::new();
    let read = match encoding {
        None | Some("identity") => return Some(Bytes::copy_from_slice(body)),
        Some("gzip") => flate2::read::GzDecoder::new(body)
            .take(limit)
            .read_to_end(&mut out),
        Some("zstd") => {
            zstd::stream::read::Decoder::new(body).and_then(|d| d.take(limit).read_to_end(&mut out))
        }
        Some(_) => return None,
    };
    read.ok().map(|_| Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks() -> Vec<Bytes> {
        (0..20)
            .map(|i| Bytes::from(format!("chunk {i} ").repeat(50 + i)))
            .collect()
    }

    /// Bytes that do not compress (xorshift), so the output outgrows its
    /// first size and must be grown.
    fn noise(len: usize, mut seed: u64) -> Bytes {
        (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect::<Vec<u8>>()
            .into()
    }

    #[test]
    fn every_compression_round_trips_the_concatenated_chunks_after_the_prefix() {
        let chunks = chunks();
        let whole: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
        for c in [Compression::None, Compression::Gzip, Compression::Zstd] {
            let out = compress(&chunks, c, 5).expect("compress");
            assert_eq!(&out[..5], &[0; 5]);
            let back = decompress_reply(encoding_name(c), &out[5..], 1 << 20).expect("decompress");
            assert_eq!(&back[..], &whole[..], "{c:?}");
            if c != Compression::None {
                assert!(
                    out.len() < whole.len() / 4,
                    "{c:?} compresses repetitive text"
                );
            }
        }
    }

    #[test]
    fn incompressible_batches_and_reused_encoders_still_round_trip() {
        // Twice per compression on this thread: the second call reuses the
        // encoder state left by the first.
        for round in 0..2u64 {
            let chunks = vec![noise(300_000, 7 + round), Bytes::new(), noise(70_000, 9)];
            let whole: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
            for c in [Compression::Gzip, Compression::Zstd] {
                let out = compress(&chunks, c, 0).expect("compress");
                assert!(out.len() > whole.len() / 3, "{c:?} outgrew its first size");
                let back = decompress_reply(encoding_name(c), &out, 1 << 20).expect("decompress");
                assert_eq!(&back[..], &whole[..], "{c:?}, round {round}");
            }
        }
    }

    /// The build's gzip is the one the `isal` feature selects: ISA-L's
    /// fixed header ends in OS 255 ("unknown"), zlib's in 3 (Unix).
    #[test]
    fn gzip_is_isa_l_with_the_isal_feature_and_zlib_rs_without() {
        let out = compress(&chunks(), Compression::Gzip, 0).expect("compress");
        assert_eq!(&out[..3], &[0x1f, 0x8b, 8], "a gzip member, deflate");
        let os = if cfg!(feature = "isal") { 255 } else { 3 };
        assert_eq!(out[9], os, "gzip header {:?}", &out[..10]);
    }

    #[test]
    fn a_zstd_request_names_its_decompressed_size_in_the_frame_header() {
        let chunks = chunks();
        let total: usize = chunks.iter().map(Bytes::len).sum();
        let out = compress(&chunks, Compression::Zstd, 0).expect("compress");
        let size = zstd::zstd_safe::get_frame_content_size(&out).expect("a zstd frame");
        assert_eq!(size, Some(total as u64));
    }

    #[test]
    fn an_empty_batch_compresses_to_a_valid_empty_stream() {
        for c in [Compression::Gzip, Compression::Zstd] {
            let out = compress(&[], c, 0).expect("compress");
            let back = decompress_reply(encoding_name(c), &out, 10).expect("decompress");
            assert!(back.is_empty(), "{c:?}");
        }
    }

    #[test]
    fn reply_decompression_stops_at_the_limit_and_refuses_unknown_encodings() {
        let out = compress(&[Bytes::from(vec![7u8; 100_000])], Compression::Zstd, 0).unwrap();
        let back = decompress_reply(Some("zstd"), &out, 1000).unwrap();
        assert_eq!(back.len(), 1000);
        assert!(decompress_reply(Some("br"), b"x", 10).is_none());
    }
}
