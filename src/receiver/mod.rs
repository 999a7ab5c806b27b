//! Receivers: OTLP/gRPC (and OTLP/HTTP) in, one shared ingest path.
//!
//! Both protocols end in [`Receiver::accept`]: size check, the wire walk that
//! validates and counts, the `[resource]` stamp ([`crate::resource`]), then
//! the pipeline. [`IngestError`] is mapped to a gRPC
//! status in exactly one place ([`IngestError::to_status`]) and to an HTTP
//! status right beside it ([`IngestError::to_http`]).

pub mod auth;
pub mod connections;
pub mod decompress;
pub mod grpc;
pub mod http;
pub mod otlp_json;
pub mod unix_socket;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tonic::Code;
use tonic_types::{ErrorDetails, StatusExt};

use crate::metrics::{Metrics, Refusal};
use crate::pipeline::{Pipeline, Refused};
use crate::reloadable::Reloadable;
use crate::resource::Stamping;
use crate::signal::Signal;
use crate::wire::stamp::StampError;
use crate::wire::{self, WireError};
use otlp_json::JsonError;

/// Why a request was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The payload is not a valid OTLP export request; the client must fix it.
    #[error(transparent)]
    Malformed(#[from] WireError),
    /// The payload (after decompression) is above `receiver.max_request_bytes`;
    /// the client must send smaller requests.
    #[error("request of {size} bytes is larger than the limit of {limit} bytes (receiver.max_request_bytes); send smaller batches")]
    TooLarge { size: u64, limit: u64 },
    /// An OTLP/JSON body that cannot be converted; the client must fix it.
    #[error(transparent)]
    InvalidJson(#[from] JsonError),
    /// An OTLP/HTTP request whose Content-Type is neither protobuf nor JSON.
    #[error("unsupported content type {0:?}: OTLP/HTTP takes application/x-protobuf or application/json")]
    UnsupportedMediaType(String),
    /// The body is not a usable frame or compressed stream.
    #[error("{0}")]
    BadEncoding(String),
    /// The body did not arrive within `receiver.body_timeout` (a slow or
    /// stalled client); the client may retry: gRPC DEADLINE_EXCEEDED, HTTP
    /// 503 with `Retry-After` (OTLP/HTTP clients retry only 429, 502, 503
    /// and 504, so 408 would make them drop the data).
    #[error("request body not received within {0:?} (receiver.body_timeout)")]
    BodyTimeout(Duration),
    /// `receiver.auth.token_file` is set and the request has no bearer token
    /// or not one of the configured ones. The token is never part of the message.
    #[error("missing or invalid bearer token (Authorization: Bearer ...)")]
    Unauthenticated,
    /// The compression is not one this receiver speaks.
    #[error("unsupported compression {0:?}: use gzip, zstd or none")]
    UnsupportedEncoding(String),
    /// The buffer is full; retry after the delay.
    #[error("telespool buffer is full; retry after {retry_after:?}")]
    BufferFull { retry_after: Duration },
    /// Shutdown has begun; retry (against the restarted agent).
    #[error("telespool is shutting down; retry shortly")]
    ShuttingDown,
    /// Durable mode: the spool has no room (or cannot be written); retry later.
    #[error("telespool spool is full; retry after {retry_after:?}")]
    SpoolFull { retry_after: Duration },
    /// `[resource]` attributes could not be stamped: a malformed resource
    /// attribute, or a stamped body too large; the client must fix the request.
    #[error(transparent)]
    Stamp(#[from] StampError),
}

/// Delay suggested to clients refused during shutdown: about one restart.
pub const SHUTDOWN_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Delay suggested to an OTLP/HTTP client whose body did not arrive in time.
pub const BODY_TIMEOUT_RETRY_AFTER: Duration = Duration::from_secs(1);

impl IngestError {
    /// The one mapping from ingest errors to gRPC statuses. Retryable refusals
    /// are UNAVAILABLE with a RetryInfo, as the OTLP specification asks;
    /// a too-large request is RESOURCE_EXHAUSTED *without* RetryInfo
    /// (non-retryable: the same request would be refused again).
    pub fn to_status(&self) -> tonic::Status {
        let msg = self.to_string();
        match self {
            IngestError::Malformed(_)
            | IngestError::InvalidJson(_)
            | IngestError::BadEncoding(_) => tonic::Status::new(Code::InvalidArgument, msg),
            IngestError::TooLarge { .. } => tonic::Status::new(Code::ResourceExhausted, msg),
            IngestError::UnsupportedEncoding(_) | IngestError::UnsupportedMediaType(_) => {
                tonic::Status::new(Code::Unimplemented, msg)
            }
            IngestError::BufferFull { retry_after } | IngestError::SpoolFull { retry_after } => {
                retryable(msg, *retry_after)
            }
            IngestError::ShuttingDown => retryable(msg, SHUTDOWN_RETRY_AFTER),
            IngestError::BodyTimeout(_) => tonic::Status::new(Code::DeadlineExceeded, msg),
            IngestError::Unauthenticated => tonic::Status::new(Code::Unauthenticated, msg),
            IngestError::Stamp(StampError::Malformed(_)) => {
                tonic::Status::new(Code::InvalidArgument, msg)
            }
            IngestError::Stamp(StampError::TooLarge { .. }) => {
                tonic::Status::new(Code::ResourceExhausted, msg)
            }
        }
    }

    /// The one mapping from ingest errors to OTLP/HTTP statuses. Retryable
    /// refusals are 429 (buffer full) or 503 (shutting down, spool full, body
    /// not received within `receiver.body_timeout`), answered with a
    /// `Retry-After` of [`IngestError::retry_after`]; the others are not
    /// retryable: 400 malformed, 413 too large, 415 unsupported content type or
    /// content encoding. The body (a `google.rpc.Status`) carries the message and
    /// the gRPC code of [`IngestError::to_status`].
    pub fn to_http(&self) -> ::http::StatusCode {
        use ::http::StatusCode;
        match self {
            IngestError::Malformed(_)
            | IngestError::InvalidJson(_)
            | IngestError::BadEncoding(_) => StatusCode::BAD_REQUEST,
            IngestError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            IngestError::UnsupportedEncoding(_) | IngestError::UnsupportedMediaType(_) => {
                StatusCode::UNSUPPORTED_MEDIA_TYPE
            }
            IngestError::BufferFull { .. } => StatusCode::TOO_MANY_REQUESTS,
            IngestError::ShuttingDown | IngestError::SpoolFull { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            IngestError::BodyTimeout(_) => StatusCode::SERVICE_UNAVAILABLE,
            IngestError::Unauthenticated => StatusCode::UNAUTHORIZED,
            IngestError::Stamp(StampError::Malformed(_)) => StatusCode::BAD_REQUEST,
            IngestError::Stamp(StampError::TooLarge { .. }) => StatusCode::PAYLOAD_TOO_LARGE,
        }
    }

    /// When a retryable refusal suggests retrying.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            IngestError::BufferFull { retry_after } | IngestError::SpoolFull { retry_after } => {
                Some(*retry_after)
            }
            IngestError::ShuttingDown => Some(SHUTDOWN_RETRY_AFTER),
            IngestError::BodyTimeout(_) => Some(BODY_TIMEOUT_RETRY_AFTER),
            _ => None,
        }
    }

    fn refusal(&self) -> Refusal {
        match self {
            IngestError::Malformed(_)
            | IngestError::InvalidJson(_)
            | IngestError::UnsupportedMediaType(_)
            | IngestError::BadEncoding(_)
            | IngestError::UnsupportedEncoding(_) => Refusal::Invalid,
            IngestError::TooLarge { .. } => Refusal::TooLarge,
            IngestError::BufferFull { .. } => Refusal::BufferFull,
            IngestError::ShuttingDown => Refusal::ShuttingDown,
            IngestError::SpoolFull { .. } => Refusal::SpoolFull,
            IngestError::BodyTimeout(_) => Refusal::Timeout,
            IngestError::Unauthenticated => Refusal::Unauthenticated,
            IngestError::Stamp(StampError::Malformed(_)) => Refusal::Invalid,
            IngestError::Stamp(StampError::TooLarge { .. }) => Refusal::TooLarge,
        }
    }
}

fn retryable(msg: String, delay: Duration) -> tonic::Status {
    tonic::Status::with_error_details(
        Code::Unavailable,
        msg,
        ErrorDetails::with_retry_info(Some(delay)),
    )
}

/// The ingest path shared by every protocol.
pub struct Receiver {
    pipeline: Arc<Pipeline>,
    metrics: Arc<Metrics>,
    max_request_bytes: u64,
    /// `receiver.body_timeout`: deadline for reading one request body.
    body_timeout: Duration,
    /// `[resource]`: attributes stamped on every accepted request. None: no
    /// `[resource]` table, and the request path does not look at resources.
    resource: Option<Reloadable<Stamping>>,
}

impl Receiver {
    pub fn new(
        pipeline: Arc<Pipeline>,
        metrics: Arc<Metrics>,
        max_request_bytes: u64,
        body_timeout: Duration,
        resource: Option<Reloadable<Stamping>>,
    ) -> Arc<Receiver> {
        Arc::new(Receiver {
            pipeline,
            metrics,
            max_request_bytes,
            body_timeout,
            resource,
        })
    }

    pub fn max_request_bytes(&self) -> u64 {
        self.max_request_bytes
    }

    /// Read a whole request body within `receiver.body_timeout`, bounded by
    /// `limit` bytes (`to_bytes`' error says when the limit was hit).
    pub async fn read_body(
        &self,
        body: axum::body::Body,
        limit: usize,
    ) -> Result<Result<Bytes, axum::Error>, IngestError> {
        tokio::time::timeout(self.body_timeout, axum::body::to_bytes(body, limit))
            .await
            .map_err(|_| IngestError::BodyTimeout(self.body_timeout))
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Validate, count and buffer one serialized export request.
    pub async fn accept(&self, signal: Signal, body: Bytes) -> Result<u64, IngestError> {
        let bytes = body.len() as u64;
        let result = self.accept_inner(signal, body).await;
        match &result {
            Ok(items) => self.metrics.accepted(signal, *items, bytes),
            Err(e) => self.refused(signal, e, bytes),
        }
        result
    }

    /// Count and log a refusal. [`Receiver::accept`] does this itself; a
    /// protocol handler calls it for requests it refuses before `accept`
    /// (unsupported content type, body too large, undecodable), so every
    /// refusal shows in the metrics.
    pub fn refused(&self, signal: Signal, e: &IngestError, bytes: u64) {
        self.metrics.refused(signal, e.refusal(), 0, bytes);
        match e {
            IngestError::BufferFull { .. } | IngestError::ShuttingDown => {
                tracing::debug!(%signal, error = %e, "request refused")
            }
            _ => tracing::info!(%signal, error = %e, "request refused"),
        }
    }

    async fn accept_inner(&self, signal: Signal, body: Bytes) -> Result<u64, IngestError> {
        let size = body.len() as u64;
        if size > self.max_request_bytes {
            return Err(IngestError::TooLarge {
                size,
                limit: self.max_request_bytes,
            });
        }
        let counts = wire::walk(signal, &body)?;
        if counts.items == 0 {
            // Nothing to forward (empty request, or resources without items).
            return Ok(0);
        }
        // Stamped once, here, so the budget, batches and spool see the result.
        let body = match &self.resource {
            None => body,
            Some(stamping) => {
                let limit = usize::try_from(self.max_request_bytes.saturating_mul(2));
                let limit = limit.unwrap_or(usize::MAX);
                stamping.get().stamp.apply(signal, &body, limit)?
            }
        };
        self.pipeline
            .ingest(signal, body, counts.items)
            .await
            .map_err(|r| match r {
                Refused::BufferFull { retry_after } => IngestError::BufferFull { retry_after },
                Refused::ShuttingDown => IngestError::ShuttingDown,
                Refused::SpoolFull { retry_after } => IngestError::SpoolFull { retry_after },
            })?;
        Ok(counts.items)
    }

    /// Refuse everything from now on (first moment of shutdown).
    pub fn stop_accepting(&self) {
        self.pipeline.stop_accepting();
    }
}
