//! Spawning the agent's tasks so that a panic is never ignored: it is logged
//! with the task's name and makes the shutdown not graceful (non-zero exit).
//! A leaf: every stage that spawns imports it; it imports nothing of the crate.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use futures::FutureExt;
use tokio_util::task::TaskTracker;

/// Records whether any task panicked; a panic makes the shutdown not graceful.
#[derive(Debug, Default, Clone)]
pub struct PanicFlag(Arc<AtomicBool>);

impl PanicFlag {
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    /// Spawn `fut` on `tracker`; a panic is logged with the task's name and recorded.
    pub fn spawn<F>(&self, tracker: &TaskTracker, name: &'static str, fut: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let flag = self.0.clone();
        tracker.spawn(async move {
            if let Err(panic) = std::panic::AssertUnwindSafe(fut).catch_unwind().await {
                let msg = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                tracing::error!(task = name, panic = %msg, "task panicked");
                flag.store(true, Ordering::Release);
            }
        });
    }
}
