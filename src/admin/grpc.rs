//! The `telespool.admin.v1.Admin` gRPC service: `GetStatus` and `Watch`.
//!
//! Read-only. `Watch` is bounded twice: each stream sends at most one
//! snapshot per [`MIN_INTERVAL`], and at most [`MAX_WATCHERS`] streams run at
//! once (a permit moves into each stream and is released when it ends). A
//! stream ends with OK when `stop` fires, so the admin server's graceful
//! shutdown never waits on a watcher.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::Stream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use super::proto::admin_server::{Admin, AdminServer};
use super::proto::{GetStatusRequest, Status, WatchRequest};
use super::AdminState;

/// The shortest time between two snapshots of one watcher.
pub const MIN_INTERVAL: Duration = Duration::from_millis(250);
/// The interval when the request says 0.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);
/// Concurrent `Watch` streams at most.
pub const MAX_WATCHERS: usize = 8;

pub struct AdminService {
    state: Arc<AdminState>,
    watchers: Arc<Semaphore>,
    stop: CancellationToken,
}

impl AdminService {
    /// `stop` ends every `Watch` stream (the admin server's shutdown).
    pub fn server(state: Arc<AdminState>, stop: CancellationToken) -> AdminServer<AdminService> {
        AdminServer::new(AdminService {
            state,
            watchers: Arc::new(Semaphore::new(MAX_WATCHERS)),
            stop,
        })
    }
}

/// The interval a watcher gets for the one it asked for.
pub fn watch_interval(asked_ms: u32) -> Duration {
    match asked_ms {
        0 => DEFAULT_INTERVAL,
        ms => Duration::from_millis(u64::from(ms)).max(MIN_INTERVAL),
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<Status, tonic::Status>> + Send>>;

/// One watcher's stream state: the permit lives as long as the stream.
struct Watcher {
    state: Arc<AdminState>,
    ticks: tokio::time::Interval,
    stop: CancellationToken,
    _permit: OwnedSemaphorePermit,
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn get_status(
        &self,
        _request: tonic::Request<GetStatusRequest>,
    ) -> Result<tonic::Response<Status>, tonic::Status> {
        Ok(tonic::Response::new(self.state.snapshot(SystemTime::now())))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: tonic::Request<WatchRequest>,
    ) -> Result<tonic::Response<WatchStream>, tonic::Status> {
        let permit = self.watchers.clone().try_acquire_owned().map_err(|_| {
            tonic::Status::resource_exhausted(format!(
                "{MAX_WATCHERS} Watch streams are open already, the most the agent serves; close one, or poll GetStatus"
            ))
        })?;
        let mut ticks = tokio::time::interval(watch_interval(request.get_ref().interval_ms));
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let watcher = Watcher {
            state: self.state.clone(),
            ticks,
            stop: self.stop.clone(),
            _permit: permit,
        };
        let stream = futures::stream::unfold(watcher, |mut w| async move {
            tokio::select! {
                biased;
                _ = w.stop.cancelled() => None,
                _ = w.ticks.tick() => {
                    let snapshot = w.state.snapshot(SystemTime::now());
                    Some((Ok(snapshot), w))
                }
            }
        });
        Ok(tonic::Response::new(Box::pin(stream)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watch_intervals_are_capped_at_four_snapshots_a_second() {
        assert_eq!(watch_interval(0), DEFAULT_INTERVAL);
        assert_eq!(watch_interval(1), MIN_INTERVAL);
        assert_eq!(watch_interval(249), MIN_INTERVAL);
        assert_eq!(watch_interval(2000), Duration::from_secs(2));
    }
}
