//! systemd readiness and watchdog notifications (`sd_notify`).
//!
//! Everything here is a no-op unless `NOTIFY_SOCKET` is set, that is unless
//! systemd runs the agent as a `Type=notify` service (or a test stands in):
//!
//! - `READY=1` once the listeners are up and the spool is open (replay runs
//!   alongside live traffic) — [`ready`], called where `app` logs `listening`;
//! - `WATCHDOG=1` every half `WATCHDOG_USEC` while the agent runs, from a task
//!   on the agent's `background` tracker: a stuck runtime stops the pings and
//!   systemd restarts the service (`WatchdogSec=` in the unit). The task ends
//!   when the shutdown sequence reaches its spool step;
//! - `STOPPING=1` at the first moment of shutdown — [`stopping`].
//!
//! A failed notification is logged, never fatal: the agent keeps serving.

use std::time::Duration;

use sd_notify::NotifyState;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::task::PanicFlag;

/// Whether a service manager listens for notifications.
pub fn enabled() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some_and(|s| !s.is_empty())
}

fn notify(states: &[NotifyState<'_>]) {
    if !enabled() {
        return;
    }
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify systemd (NOTIFY_SOCKET)");
    }
}

/// `READY=1` with a status line, and start the watchdog if systemd asked for
/// one: a task on `tracker` that pings until `stop`.
pub fn ready(status: &str, panics: &PanicFlag, tracker: &TaskTracker, stop: CancellationToken) {
    if !enabled() {
        return;
    }
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
    let Some(interval) = watchdog_interval() else {
        return;
    };
    tracing::info!(
        ping_every_ms = interval.as_millis() as u64,
        "systemd watchdog enabled"
    );
    panics.spawn(tracker, "systemd watchdog", async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => notify(&[NotifyState::Watchdog]),
            }
        }
    });
}

/// `STOPPING=1`: the shutdown sequence has begun.
pub fn stopping() {
    notify(&[
        NotifyState::Stopping,
        NotifyState::Status("shutting down: flushing, then spooling"),
    ]);
}

/// Half of `WATCHDOG_USEC` (when it is meant for this pid), at least 1 ms.
fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled()
        .filter(|d| !d.is_zero())
        .map(|d| (d / 2).max(Duration::from_millis(1)))
}
