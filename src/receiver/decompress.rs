//! Request decompression for both receivers: gzip and zstd, bounded while
//! decoding.
//!
//! gRPC (`grpc-encoding`) and OTLP/HTTP (`Content-Encoding`) name the same two
//! codings; [`Compression::parse`] reads the name and [`decompress`] expands
//! the body. The invariant is that a body never costs more memory than
//! `receiver.max_request_bytes` allows, whatever its compression ratio:
//!
//! - The decoder is a stream read through `take(limit + 1)`: it stops once it
//!   has produced one byte more than the limit, and that extra byte is what
//!   says "too large" (`RESOURCE_EXHAUSTED` / 413). A 2 GiB bomb that
//!   compresses to a few MB costs at most `limit + 1` bytes of output buffer
//!   and the CPU to expand `limit` bytes, never the 2 GiB.
//! - zstd: a frame whose header declares a content size above the limit is
//!   refused before any decoding, and the decoder's window (the memory it
//!   keeps to resolve back-references) is capped with `window_log_max` at the
//!   size of the limit, at least 8 MiB (zstd level 19's window) and at most
//!   128 MiB (libzstd's own default cap): a frame asking for a larger window
//!   is refused instead of allocating it. A valid request never needs a
//!   window larger than itself.
//! - gzip: the window is 32 KiB by construction. Concatenated members (as
//!   `pigz` or appending writers produce) are all decoded
//!   ([`flate2::read::MultiGzDecoder`]), so no data after the first member is
//!   silently dropped; bytes after the last member that are not a member are
//!   an error.
//!
//! The output buffer grows with the output (it starts at four times the input,
//! capped at the limit), so small requests stay cheap.

use std::io::Read;

use bytes::Bytes;

use super::IngestError;

/// A compression a receiver accepts (identity is the absence of one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    Gzip,
    Zstd,
}

/// The `grpc-accept-encoding` the gRPC receiver advertises.
pub const GRPC_ACCEPT_ENCODING: &str = "gzip,zstd";

/// zstd window bounds (log2 bytes): 8 MiB floor (level 19 streams), 128 MiB
/// ceiling (libzstd's default `ZSTD_WINDOWLOG_LIMIT_DEFAULT`).
const ZSTD_MIN_WINDOW_LOG: u32 = 23;
const ZSTD_MAX_WINDOW_LOG: u32 = 27;

impl Compression {
    /// Reads a coding name (`gzip`, `zstd`, any case); `Ok(None)` for none:
    /// an empty name or `identity`. Anything else is
    /// [`IngestError::UnsupportedEncoding`] naming what was sent.
    pub fn parse(name: &str) -> Result<Option<Compression>, IngestError> {
        let name = name.trim();
        if name.eq_ignore_ascii_case("gzip") {
            Ok(Some(Compression::Gzip))
        } else if name.eq_ignore_ascii_case("zstd") {
            Ok(Some(Compression::Zstd))
        } else if name.is_empty() || name.eq_ignore_ascii_case("identity") {
            Ok(None)
        } else {
            Err(IngestError::UnsupportedEncoding(name.to_owned()))
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        }
    }

    /// How many more bytes than `limit` a compressed body may have on the
    /// wire: incompressible data grows a little in either format (gzip stored
    /// blocks: 5 bytes per 64 KiB; zstd raw blocks: 3 bytes per 128 KiB; plus
    /// headers). The decompressed size is then bounded exactly.
    pub fn wire_slack(limit: u64) -> u64 {
        limit / 512 + 1024
    }
}

/// Decompresses `body`, refusing output above `limit` bytes without producing
/// more than `limit + 1` of it.
pub fn decompress(compression: Compression, body: &[u8], limit: u64) -> Result<Bytes, IngestError> {
    let bad = |e: std::io::Error| {
        IngestError::BadEncoding(format!(
            "{} body cannot be decompressed: {e}",
            compression.name()
        ))
    };
    let capacity = body.len().saturating_mul(4).min(limit_usize(limit));
    let out = match compression {
        Compression::Gzip => {
            read_bounded(flate2::read::MultiGzDecoder::new(body), capacity, limit).map_err(bad)?
        }
        Compression::Zstd => {
            if let Ok(Some(size)) = zstd::zstd_safe::get_frame_content_size(body) {
                if size > limit {
                    return Err(IngestError::TooLarge { size, limit });
                }
            }
            let mut decoder = zstd::stream::read::Decoder::with_buffer(body).map_err(bad)?;
            decoder
                .window_log_max(zstd_window_log(limit))
                .map_err(bad)?;
            read_bounded(decoder, capacity, limit).map_err(bad)?
        }
    };
    if out.len() as u64 > limit {
        return Err(IngestError::TooLarge {
            size: out.len() as u64,
            limit,
        });
    }
    Ok(Bytes::from(out))
}

/// Reads at most `limit + 1` bytes of `reader`.
fn read_bounded(reader: impl Read, capacity: usize, limit: u64) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(capacity);
    reader.take(limit.saturating_add(1)).read_to_end(&mut out)?;
    Ok(out)
}

fn limit_usize(limit: u64) -> usize {
    usize::try_from(limit).unwrap_or(usize::MAX)
}

/// The smallest window log that holds `limit` bytes, within the bounds above.
fn zstd_window_log(limit: u64) -> u32 {
    let log = u64::BITS - limit.saturating_sub(1).leading_zeros();
    log.clamp(ZSTD_MIN_WINDOW_LOG, ZSTD_MAX_WINDOW_LOG)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).expect("gzip into memory");
        e.finish().expect("gzip into memory")
    }

    /// zstd without a content size in the frame header (as a streaming
    /// encoder writes it), so only the bounded decoder can stop a bomb.
    fn zstd_streamed(data: &[u8]) -> Vec<u8> {
        let mut e = zstd::stream::write::Encoder::new(Vec::new(), 3).expect("zstd encoder");
        e.write_all(data).expect("zstd into memory");
        e.finish().expect("zstd into memory")
    }

    #[test]
    fn names_are_read_case_insensitively_and_identity_means_none() {
        assert_eq!(
            Compression::parse("GZIP").ok(),
            Some(Some(Compression::Gzip))
        );
        assert_eq!(
            Compression::parse(" zstd ").ok(),
            Some(Some(Compression::Zstd))
        );
        assert_eq!(Compression::parse("identity").ok(), Some(None));
        assert_eq!(Compression::parse("").ok(), Some(None));
        assert!(matches!(
            Compression::parse("br"),
            Err(IngestError::UnsupportedEncoding(name)) if name == "br"
        ));
    }

    #[test]
    fn both_codings_round_trip_a_body_at_exactly_the_limit() {
        let data: Vec<u8> = (0..100_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        let limit = data.len() as u64;
        for (c, body) in [
            (Compression::Gzip, gzip(&data)),
            (
                Compression::Zstd,
                zstd::encode_all(&data[..], 3).expect("zstd"),
            ),
            (Compression::Zstd, zstd_streamed(&data)),
        ] {
            let out = decompress(c, &body, limit).expect("within the limit");
            assert_eq!(out.as_ref(), &data[..], "{c:?}");
        }
    }

    #[test]
    fn a_bomb_is_refused_as_too_large_having_produced_at_most_one_byte_over_the_limit() {
        let zeros = vec![0u8; 64 << 20];
        let limit = 1 << 20;
        for (c, body) in [
            (Compression::Gzip, gzip(&zeros)),
            (Compression::Zstd, zstd_streamed(&zeros)),
            (
                Compression::Zstd,
                zstd::encode_all(&zeros[..], 3).expect("zstd"),
            ),
        ] {
            assert!(body.len() < (1 << 20), "{c:?} bomb is {} bytes", body.len());
            match decompress(c, &body, limit) {
                Err(IngestError::TooLarge { size, limit: l }) => {
                    assert_eq!(l, limit);
                    // Streamed: stopped at limit + 1; with a declared size: the declared size.
                    assert!(
                        size == limit + 1 || size == zeros.len() as u64,
                        "{c:?}: {size}"
                    );
                }
                other => panic!("{c:?}: expected TooLarge, got {other:?}"),
            }
        }
    }

    #[test]
    fn concatenated_gzip_members_are_all_decoded() {
        let mut body = gzip(b"first ");
        body.extend(gzip(b"second"));
        let out = decompress(Compression::Gzip, &body, 1024).expect("two members");
        assert_eq!(out.as_ref(), b"first second");
    }

    #[test]
    fn corrupt_bodies_are_bad_encoding_naming_the_coding() {
        for c in [Compression::Gzip, Compression::Zstd] {
            match decompress(c, b"definitely not compressed", 1024) {
                Err(IngestError::BadEncoding(msg)) => {
                    assert!(msg.starts_with(c.name()), "{msg}")
                }
                other => panic!("{c:?}: expected BadEncoding, got {other:?}"),
            }
        }
    }

    #[test]
    fn a_zstd_frame_asking_for_a_window_above_the_cap_is_refused() {
        // A long-distance frame with a 256 MiB window (log 28), content size unknown.
        let mut e = zstd::stream::write::Encoder::new(Vec::new(), 3).expect("zstd encoder");
        e.long_distance_matching(true).expect("ldm");
        e.window_log(28).expect("window log");
        e.write_all(&[7u8; 4096]).expect("write");
        let body = e.finish().expect("finish");
        assert!(matches!(
            decompress(Compression::Zstd, &body, 4 << 20),
            Err(IngestError::BadEncoding(_))
        ));
    }

    #[test]
    fn window_log_fits_the_limit_within_its_bounds() {
        assert_eq!(zstd_window_log(4 << 20), 23);
        assert_eq!(zstd_window_log(64 << 20), 26);
        assert_eq!(zstd_window_log((64 << 20) + 1), 27);
        assert_eq!(zstd_window_log(u64::MAX), 27);
        assert_eq!(zstd_window_log(0), 23);
    }
}
