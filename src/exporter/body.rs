//! An upstream request body that is a list of `Bytes`, sent as they are.
//!
//! A batch is the list of the request bodies it was built from, and their
//! concatenation is the upstream request. Without compression the body is
//! sent as that list: (for gRPC) the 5-byte message header, then each chunk
//! as its own data frame. hyper and h2 hand `Bytes` of more than a few hundred
//! bytes to the socket with vectored writes, so the payload goes from the
//! receive buffer to the upstream socket without being copied in between.
//! Copying a 4 MiB batch into one frame buffer was one full pass over the
//! payload per export.
//!
//! The length is exact (`size_hint`), so HTTP/1.1 sends a `Content-Length`
//! and h2 knows the stream ends with the last chunk.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

/// Chunks yielded one data frame each, in order; empty chunks are skipped.
#[derive(Debug, Default)]
pub(crate) struct ChunkBody {
    chunks: VecDeque<Bytes>,
    /// Bytes not yet yielded: the exact remaining length.
    remaining: u64,
}

impl ChunkBody {
    /// `head` (if not empty) then the chunks, without copying any of them.
    pub(crate) fn new(head: Option<Bytes>, chunks: &[Bytes]) -> ChunkBody {
        let mut all = VecDeque::with_capacity(chunks.len() + 1);
        all.extend(head);
        all.extend(chunks.iter().cloned());
        all.retain(|c| !c.is_empty());
        let remaining = all.iter().map(|c| c.len() as u64).sum();
        ChunkBody {
            chunks: all,
            remaining,
        }
    }

    /// A body of one buffer (a compressed request).
    pub(crate) fn one(bytes: Bytes) -> ChunkBody {
        ChunkBody::new(None, std::slice::from_ref(&bytes))
    }
}

impl Body for ChunkBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        match this.chunks.pop_front() {
            Some(chunk) => {
                this.remaining -= chunk.len() as u64;
                Poll::Ready(Some(Ok(Frame::data(chunk))))
            }
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn the_body_is_the_head_then_the_chunks_in_order_with_an_exact_length() {
        let chunks = [
            Bytes::from_static(b"first "),
            Bytes::new(),
            Bytes::from_static(b"second "),
            Bytes::from_static(b"third"),
        ];
        let body = ChunkBody::new(Some(Bytes::from_static(b"[head] ")), &chunks);
        assert_eq!(body.size_hint().exact(), Some(25));
        assert!(!body.is_end_stream());
        let mut frames = 0;
        let mut body = body;
        let mut all = Vec::new();
        while let Some(frame) = body.frame().await {
            let data = frame.expect("infallible").into_data().expect("data frame");
            all.extend_from_slice(&data);
            frames += 1;
            assert_eq!(body.size_hint().exact(), Some(25 - all.len() as u64));
        }
        assert_eq!(all, b"[head] first second third");
        assert_eq!(frames, 4, "the empty chunk is skipped, nothing is merged");
        assert!(body.is_end_stream());
    }

    #[tokio::test]
    async fn an_empty_body_ends_at_once() {
        let body = ChunkBody::new(None, &[]);
        assert!(body.is_end_stream());
        assert_eq!(body.size_hint().exact(), Some(0));
        let collected = body.collect().await.expect("infallible").to_bytes();
        assert!(collected.is_empty());
    }
}
