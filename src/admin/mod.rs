//! Admin listener: `/healthz` (liveness), `/readyz` (readiness),
//! `/metrics` (Prometheus text format) and the gRPC admin API
//! (`telespool.admin.v1.Admin`, see [`grpc`]), HTTP/1.1 and h2c on one port.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::pipeline::Pipeline;
use crate::status::StatusSource;

pub mod grpc;

/// The messages and the client/server of `proto/telespool/admin/v1/admin.proto`.
pub use crate::api as proto;

/// What the admin endpoints read.
pub struct AdminState {
    /// True while listeners are up and the spool is open; false from the first
    /// moment of shutdown.
    pub ready: AtomicBool,
    pub registry: Registry,
    pub pipeline: Arc<Pipeline>,
    /// What the admin API's snapshots are read from.
    pub status: StatusSource,
}

impl AdminState {
    /// The admin API's view of the agent now.
    pub fn snapshot(&self, now: std::time::SystemTime) -> proto::Status {
        self.status
            .snapshot(self.ready.load(Ordering::Acquire), now)
    }
}

/// The HTTP routes and the gRPC admin API; `stop` ends `Watch` streams.
pub fn router(state: Arc<AdminState>, stop: CancellationToken) -> Router {
    let api = grpc::AdminService::server(state.clone(), stop);
    let http = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state);
    tonic::service::Routes::new(api)
        .into_axum_router()
        .merge(http)
}

async fn readyz(State(state): State<Arc<AdminState>>) -> Response {
    if state.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}

async fn metrics(State(state): State<Arc<AdminState>>) -> Response {
    state.pipeline.refresh_gauges();
    let mut text = String::new();
    match prometheus_client::encoding::text::encode(&mut text, &state.registry) {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode metrics: {e}\n"),
        )
            .into_response(),
    }
}
