//! Upstream reachability as the rest of the agent sees it: up, failing
//! since, last error. Logged on each change of state.

use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::ExportFailure;

/// Upstream reachability as the rest of the agent sees it.
#[derive(Debug)]
pub struct Health {
    endpoint: String,
    state: Mutex<HealthState>,
}

/// A snapshot of upstream health.
#[derive(Debug, Clone, Default)]
pub struct HealthState {
    /// True until an export fails, and again after one succeeds.
    pub up: bool,
    /// Wall-clock time of the first failure in the current failing stretch.
    pub failing_since: Option<SystemTime>,
    failing_since_mono: Option<Instant>,
    pub last_error: Option<String>,
    pub consecutive_failures: u64,
}

impl Health {
    pub(super) fn new(endpoint: &str) -> Health {
        Health {
            endpoint: endpoint.to_owned(),
            state: Mutex::new(HealthState {
                up: true,
                ..HealthState::default()
            }),
        }
    }

    pub fn snapshot(&self) -> HealthState {
        self.state.lock().map(|s| s.clone()).unwrap_or_default()
    }

    pub fn is_up(&self) -> bool {
        self.state.lock().map(|s| s.up).unwrap_or(false)
    }

    /// How long upstream has been failing, if it is.
    pub fn failing_for(&self) -> Option<Duration> {
        self.state
            .lock()
            .ok()
            .and_then(|s| s.failing_since_mono.map(|t| t.elapsed()))
    }

    pub(super) fn record_ok(&self) {
        let Ok(mut s) = self.state.lock() else { return };
        if !s.up {
            let down_for = s
                .failing_since_mono
                .map(|t| t.elapsed())
                .unwrap_or_default();
            tracing::info!(
                upstream = %self.endpoint,
                down_for = ?down_for,
                failures = s.consecutive_failures,
                "upstream is up again"
            );
        }
        s.up = true;
        s.failing_since = None;
        s.failing_since_mono = None;
        s.consecutive_failures = 0;
    }

    pub(super) fn record_failure(&self, f: &ExportFailure) {
        let Ok(mut s) = self.state.lock() else { return };
        let error = format!("{}: {}", f.cause, f.message);
        if s.up {
            tracing::warn!(upstream = %self.endpoint, cause = %f.cause, error = %f.message, "upstream is failing");
            s.failing_since = Some(SystemTime::now());
            s.failing_since_mono = Some(Instant::now());
        }
        s.up = false;
        s.consecutive_failures += 1;
        s.last_error = Some(error);
    }
}
