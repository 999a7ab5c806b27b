//! OTLP/gRPC receiver over the shared HTTP/2 server.
//!
//! The three Export methods are unary calls; the handler reads the single
//! length-prefixed message (optionally gzip- or zstd-compressed, see
//! [`super::decompress`]; both are advertised in `grpc-accept-encoding`) as `Bytes`, hands it to
//! [`Receiver::accept`] and answers with an empty Export*ServiceResponse (the
//! empty message encodes to zero bytes for all three signals). No tonic codec,
//! no protobuf decoding: the body stays the bytes the client sent.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Body;
use axum::response::Response;
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, StatusCode};
use http_body_util::StreamBody;
use hyper::body::Frame;

use super::decompress::{self, Compression, GRPC_ACCEPT_ENCODING};
use super::{IngestError, Receiver};
use crate::signal::Signal;

/// Length of the gRPC message prefix: compressed flag + big-endian u32 length.
const PREFIX: usize = 5;

/// Routes for the three OTLP export methods.
pub fn router(receiver: Arc<Receiver>) -> Router {
    let mut router = Router::new();
    for signal in Signal::ALL {
        let receiver = receiver.clone();
        router = router.route(
            signal.grpc_path(),
            post(move |headers: HeaderMap, body: Body| {
                let receiver = receiver.clone();
                async move { export(&receiver, signal, &headers, body).await }
            }),
        );
    }
    router
}

async fn export(receiver: &Receiver, signal: Signal, headers: &HeaderMap, body: Body) -> Response {
    let payload = match read_message(receiver, headers, body).await {
        Ok(payload) => payload,
        Err(e) => {
            receiver.refused(signal, &e, 0);
            return error_response(&e);
        }
    };
    match receiver.accept(signal, payload).await {
        Ok(_) => ok_response(),
        Err(e) => error_response(&e),
    }
}

/// A refusal as a gRPC status, advertising the encodings this receiver takes.
fn error_response(e: &IngestError) -> Response {
    let mut response = e.to_status().into_http();
    advertise_encodings(response.headers_mut());
    response
}

fn advertise_encodings(headers: &mut HeaderMap) {
    headers.insert(
        "grpc-accept-encoding",
        HeaderValue::from_static(GRPC_ACCEPT_ENCODING),
    );
}

/// Read the one message of a unary call, bounded by `limit` bytes.
async fn read_message(
    receiver: &Receiver,
    headers: &HeaderMap,
    body: Body,
) -> Result<Bytes, IngestError> {
    let limit = receiver.max_request_bytes();
    // A compressed message may be larger than its decompressed form only by a
    // little; allow some slack on the wire and bound the decompressed size exactly.
    let slack = Compression::wire_slack(limit) as usize;
    let wire_limit = (limit as usize).saturating_add(PREFIX + slack);
    let frame = receiver.read_body(body, wire_limit).await?.map_err(|e| {
        if is_length_limit(&e) {
            IngestError::TooLarge {
                size: wire_limit as u64,
                limit,
            }
        } else {
            IngestError::BadEncoding(format!("cannot read request body: {e}"))
        }
    })?;
    if frame.len() < PREFIX {
        if frame.is_empty() {
            return Err(IngestError::BadEncoding(
                "request has no gRPC message".into(),
            ));
        }
        return Err(IngestError::BadEncoding(format!(
            "gRPC message prefix truncated: {} of 5 bytes",
            frame.len()
        )));
    }
    let compressed = frame[0];
    let len = u32::from_be_bytes([frame[1], frame[2], frame[3], frame[4]]) as usize;
    if frame.len() - PREFIX != len {
        return Err(IngestError::BadEncoding(format!(
            "gRPC message prefix says {len} bytes but the body holds {} (one message per unary call)",
            frame.len() - PREFIX
        )));
    }
    let message = frame.slice(PREFIX..);
    match compressed {
        0 => Ok(message),
        1 => {
            let encoding = headers
                .get("grpc-encoding")
                .map(|v| String::from_utf8_lossy(v.as_bytes()))
                .unwrap_or_default();
            match Compression::parse(&encoding)? {
                Some(compression) => decompress::decompress(compression, &message, limit),
                None => Err(IngestError::BadEncoding(
                    "message flagged compressed but grpc-encoding is identity".into(),
                )),
            }
        }
        flag => Err(IngestError::BadEncoding(format!(
            "invalid gRPC compressed flag {flag}"
        ))),
    }
}

pub(super) fn is_length_limit(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = err.source();
    }
    false
}

/// A successful unary reply: one empty message, then `grpc-status: 0`.
fn ok_response() -> Response {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    let frames = futures::stream::iter([
        Ok::<_, Infallible>(Frame::data(Bytes::from_static(&[0, 0, 0, 0, 0]))),
        Ok(Frame::trailers(trailers)),
    ]);
    let mut response = Response::new(Body::new(StreamBody::new(frames)));
    *response.status_mut() = StatusCode::OK;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    advertise_encodings(response.headers_mut());
    response
}
