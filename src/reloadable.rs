//! A value that a reload (SIGHUP) can replace while readers keep using the
//! one they took: TLS configs, token sets, upstream metadata. A leaf: it
//! imports nothing of the crate, so the receivers and `tls` can hold one
//! without depending on the reload logic above them.

use std::sync::{Arc, RwLock};

/// A value that a reload can replace; readers get the current one.
#[derive(Debug)]
pub struct Reloadable<T>(Arc<RwLock<Arc<T>>>);

impl<T> Clone for Reloadable<T> {
    fn clone(&self) -> Self {
        Reloadable(self.0.clone())
    }
}

impl<T> Reloadable<T> {
    pub fn new(value: T) -> Reloadable<T> {
        Reloadable(Arc::new(RwLock::new(Arc::new(value))))
    }

    /// The current value; it stays valid for the holder after a reload.
    pub fn get(&self) -> Arc<T> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn set(&self, value: T) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(value);
    }
}
