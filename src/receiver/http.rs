//! OTLP/HTTP receiver: `POST /v1/traces`, `/v1/metrics`, `/v1/logs`.
//!
//! A request ends in the same [`Receiver::accept`] as a gRPC call, so it shares
//! the buffer, batching, backpressure, shutdown and spool. Per request:
//!
//! 1. `Content-Type` picks the encoding: `application/x-protobuf` stays the
//!    bytes the client sent; `application/json` is converted once to protobuf
//!    ([`otlp_json::json_to_protobuf`]). Anything else: 415.
//! 2. `Content-Encoding`: none, `identity`, `gzip` or `zstd` (decompressed by
//!    [`decompress`], bounded by `receiver.max_request_bytes` while decoding);
//!    anything else: 415.
//! 3. The body is read up to `receiver.max_request_bytes` (a little more when
//!    compressed, whose output is bounded exactly); above it: 413.
//!
//! Answers follow the OTLP/HTTP specification: 200 with an empty
//! Export*ServiceResponse in the request's encoding (zero bytes for protobuf,
//! `{}` for JSON); errors carry a `google.rpc.Status` naming the problem, in
//! the request's encoding (JSON when the content type is unknown, and for 404
//! and 405). Status codes come from [`IngestError::to_http`]; 429 and 503 carry
//! `Retry-After`. Refusals before `accept` are counted with [`Receiver::refused`].
//!
//! CORS (`receiver.http.cors.allowed_origins`) is a small hand-written
//! middleware: preflights from an allowed origin get POST and the OTLP
//! headers; answers to allowed origins get `Access-Control-Allow-Origin` and
//! expose `Retry-After`.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use prost::Message;

use super::auth;
use super::decompress::{self, Compression};
use super::otlp_json;
use super::{IngestError, Receiver};
use crate::config::CorsConfig;
use crate::signal::Signal;

const PROTOBUF: &str = "application/x-protobuf";
const JSON: &str = "application/json";

/// How a request body (and so its answer) is encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Encoding {
    Protobuf,
    Json,
}

/// Routes for the three OTLP/HTTP export paths, with CORS when configured.
/// With `tokens`, every OTLP request needs a bearer token (see [`super::auth`]);
/// CORS preflights are answered before that check.
pub fn router(
    receiver: Arc<Receiver>,
    cors: &CorsConfig,
    tokens: Option<crate::reloadable::Reloadable<auth::Tokens>>,
) -> Router {
    let allow: &'static str = match cors.enabled() {
        true => "POST, OPTIONS",
        false => "POST",
    };
    let mut router = Router::new();
    for signal in Signal::ALL {
        let receiver = receiver.clone();
        let method_router = post(move |headers: HeaderMap, body: Body| {
            let receiver = receiver.clone();
            async move { export(&receiver, signal, &headers, body).await }
        })
        .fallback(move |method: Method| async move {
            let mut response = status_response(
                Encoding::Json,
                StatusCode::METHOD_NOT_ALLOWED,
                tonic::Code::Unimplemented,
                &format!(
                    "method {method} is not allowed on {}: use POST",
                    signal.http_path()
                ),
            );
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(allow));
            response
        });
        router = router.route(signal.http_path(), method_router);
    }
    router = router.fallback(|uri: http::Uri| async move {
        status_response(
            Encoding::Json,
            StatusCode::NOT_FOUND,
            tonic::Code::NotFound,
            &format!(
                "no such path {}: OTLP/HTTP paths are /v1/traces, /v1/metrics and /v1/logs",
                uri.path()
            ),
        )
    });
    if let Some(tokens) = tokens {
        router = auth::require_token(router, tokens, receiver, auth::Protocol::Http);
    }
    if cors.enabled() {
        let cors = Arc::new(cors.clone());
        router = router.layer(middleware::from_fn_with_state(cors, cors_middleware));
    }
    router
}

async fn export(receiver: &Receiver, signal: Signal, headers: &HeaderMap, body: Body) -> Response {
    let encoding = match content_type(headers) {
        Ok(encoding) => encoding,
        Err(e) => {
            receiver.refused(signal, &e, 0);
            return error_response(Encoding::Json, &e);
        }
    };
    let payload = match read_payload(receiver, signal, encoding, headers, body).await {
        Ok(payload) => payload,
        Err((e, bytes)) => {
            receiver.refused(signal, &e, bytes);
            return error_response(encoding, &e);
        }
    };
    match receiver.accept(signal, payload).await {
        Ok(_) => ok_response(encoding),
        Err(e) => error_response(encoding, &e),
    }
}

/// The encoding named by `Content-Type` (parameters such as `charset` ignored).
fn content_type(headers: &HeaderMap) -> Result<Encoding, IngestError> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Err(IngestError::UnsupportedMediaType("(none)".into()));
    };
    let text = value.to_str().unwrap_or("");
    let media = text.split(';').next().unwrap_or("").trim();
    if media.eq_ignore_ascii_case(PROTOBUF) {
        Ok(Encoding::Protobuf)
    } else if media.eq_ignore_ascii_case(JSON) {
        Ok(Encoding::Json)
    } else {
        Err(IngestError::UnsupportedMediaType(
            String::from_utf8_lossy(value.as_bytes()).into_owned(),
        ))
    }
}

/// Read, decompress and (for JSON) convert the body to protobuf bytes.
/// On error, also the number of bytes read, for the refusal counter.
async fn read_payload(
    receiver: &Receiver,
    signal: Signal,
    encoding: Encoding,
    headers: &HeaderMap,
    body: Body,
) -> Result<Bytes, (IngestError, u64)> {
    let limit = receiver.max_request_bytes();
    let compression = content_encoding(headers).map_err(|e| (e, 0))?;
    // Compressed output is bounded exactly by `decompress`; its input may
    // exceed the output by a little (incompressible data).
    let wire_limit = match compression {
        Some(_) => limit.saturating_add(Compression::wire_slack(limit)),
        None => limit,
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(size) = declared.filter(|size| *size > wire_limit) {
        return Err((IngestError::TooLarge { size, limit }, 0));
    }
    let raw = receiver
        .read_body(body, usize::try_from(wire_limit).unwrap_or(usize::MAX))
        .await
        .map_err(|e| (e, 0))?
        .map_err(|e| {
            let error = match super::grpc::is_length_limit(&e) {
                true => IngestError::TooLarge {
                    size: wire_limit.saturating_add(1),
                    limit,
                },
                false => IngestError::BadEncoding(format!("cannot read request body: {e}")),
            };
            (error, 0)
        })?;
    let read = raw.len() as u64;
    let plain = match compression {
        Some(c) => decompress::decompress(c, &raw, limit).map_err(|e| (e, read))?,
        None => raw,
    };
    match encoding {
        Encoding::Protobuf => Ok(plain),
        Encoding::Json => otlp_json::json_to_protobuf(signal, &plain)
            .map(Bytes::from)
            .map_err(|e| (IngestError::InvalidJson(e), read)),
    }
}

/// The compression `Content-Encoding` names; none and `identity` mean plain.
fn content_encoding(headers: &HeaderMap) -> Result<Option<Compression>, IngestError> {
    match headers.get(header::CONTENT_ENCODING) {
        None => Ok(None),
        Some(value) => Compression::parse(&String::from_utf8_lossy(value.as_bytes())),
    }
}

/// 200 with an empty Export*ServiceResponse (the same bytes for every signal).
fn ok_response(encoding: Encoding) -> Response {
    let (content_type, body) = match encoding {
        Encoding::Protobuf => (PROTOBUF, Bytes::new()),
        Encoding::Json => (JSON, Bytes::from_static(b"{}")),
    };
    let mut response = Response::new(Body::from(body));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// The answer to a request refused before its body was read, in the
/// request's encoding (JSON when the content type is unknown).
pub(super) fn refusal_response(headers: &HeaderMap, e: &IngestError) -> Response {
    error_response(content_type(headers).unwrap_or(Encoding::Json), e)
}

/// The answer to a refused request, from the one mapping in `receiver/mod.rs`.
fn error_response(encoding: Encoding, e: &IngestError) -> Response {
    let mut response = status_response(encoding, e.to_http(), e.to_status().code(), &e.to_string());
    if let Some(delay) = e.retry_after() {
        response.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from(retry_after_secs(delay)),
        );
    }
    response
}

/// `Retry-After` takes whole seconds: round up, and never say 0 (retry at once).
fn retry_after_secs(delay: Duration) -> u64 {
    let secs = delay.as_secs() + u64::from(delay.subsec_nanos() > 0);
    secs.max(1)
}

/// A response whose body is a `google.rpc.Status` in `encoding`.
fn status_response(
    encoding: Encoding,
    status: StatusCode,
    code: tonic::Code,
    message: &str,
) -> Response {
    let (content_type, body) = match encoding {
        Encoding::Protobuf => {
            let status = tonic_types::Status {
                code: code as i32,
                message: message.to_owned(),
                details: Vec::new(),
            };
            (PROTOBUF, status.encode_to_vec())
        }
        Encoding::Json => {
            let status = serde_json::json!({ "code": code as i32, "message": message });
            (JSON, status.to_string().into_bytes())
        }
    };
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// Answer preflights, and mark answers to allowed origins.
async fn cors_middleware(
    State(cors): State<Arc<CorsConfig>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(origin) = request.headers().get(header::ORIGIN).cloned() else {
        return next.run(request).await;
    };
    let wildcard = cors.allowed_origins.iter().any(|o| o == "*");
    let allowed = wildcard
        || cors
            .allowed_origins
            .iter()
            .any(|o| o.as_bytes() == origin.as_bytes());
    let preflight = request.method() == Method::OPTIONS
        && request
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    if preflight && !allowed {
        return status_response(
            Encoding::Json,
            StatusCode::FORBIDDEN,
            tonic::Code::PermissionDenied,
            &format!(
                "origin {} is not in receiver.http.cors.allowed_origins",
                String::from_utf8_lossy(origin.as_bytes())
            ),
        );
    }
    let mut response = match preflight {
        true => {
            let mut response = Response::new(Body::empty());
            *response.status_mut() = StatusCode::NO_CONTENT;
            let h = response.headers_mut();
            h.insert(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static("POST"),
            );
            let mut allow_headers = String::from("content-type, content-encoding");
            if let Some(asked) = request
                .headers()
                .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
                .and_then(|v| v.to_str().ok())
                .filter(|v| !v.trim().is_empty())
            {
                allow_headers.push_str(", ");
                allow_headers.push_str(asked);
            }
            if let Ok(value) = HeaderValue::from_str(&allow_headers) {
                h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, value);
            }
            h.insert(
                header::ACCESS_CONTROL_MAX_AGE,
                HeaderValue::from_static("7200"),
            );
            response
        }
        false => next.run(request).await,
    };
    if allowed {
        let h = response.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        h.append(header::VARY, HeaderValue::from_static("Origin"));
        h.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static("Retry-After"),
        );
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_rounds_up_to_whole_seconds_and_is_never_zero() {
        assert_eq!(retry_after_secs(Duration::from_millis(10)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1000)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
    }

    #[test]
    fn content_type_ignores_parameters_and_case() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("Application/JSON; charset=utf-8"),
        );
        assert_eq!(content_type(&h).ok(), Some(Encoding::Json));
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-protobuf"),
        );
        assert_eq!(content_type(&h).ok(), Some(Encoding::Protobuf));
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        assert!(
            matches!(content_type(&h), Err(IngestError::UnsupportedMediaType(t)) if t == "text/plain")
        );
    }
}
