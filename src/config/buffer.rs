//! `[buffer]` and `[batch]`: the memory bound on what is accepted and not
//! yet exported, and when a batch is sealed.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::units::{duration, ByteSize};
use super::ConfigError;

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BufferConfig {
    /// Memory bound for all buffered request bytes, every signal together.
    pub max_bytes: ByteSize,
    /// How long a request may wait for room before it is refused as retryable.
    #[serde(with = "duration")]
    pub max_wait: Duration,
}

impl Default for BufferConfig {
    fn default() -> Self {
        BufferConfig {
            max_bytes: ByteSize(64 << 20),
            max_wait: Duration::from_millis(500),
        }
    }
}

impl BufferConfig {
    /// Checks `[buffer]`; `max_request_bytes` is `receiver.max_request_bytes`,
    /// the largest request the buffer must be able to hold. Called by
    /// [`Config::validate`](super::Config::validate).
    pub(super) fn validate(&self, max_request_bytes: ByteSize) -> Result<(), ConfigError> {
        let bad = |msg: String| Err(ConfigError::Invalid(msg));
        if self.max_bytes.0 < max_request_bytes.0 {
            return bad(format!(
                "buffer.max_bytes ({}) must be at least receiver.max_request_bytes ({}), \
                 or a largest request could never be accepted",
                self.max_bytes, max_request_bytes
            ));
        }
        if self.max_bytes.0 > u32::MAX as u64 {
            return bad(format!(
                "buffer.max_bytes ({}) must be below 4GiB",
                self.max_bytes
            ));
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BatchConfig {
    /// A batch is sealed when it holds this many items...
    pub max_items: u64,
    /// ...or this many bytes...
    pub max_bytes: ByteSize,
    /// ...or has been open this long.
    #[serde(with = "duration")]
    pub timeout: Duration,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_items: 8192,
            max_bytes: ByteSize(4 << 20),
            timeout: Duration::from_millis(200),
        }
    }
}

impl BatchConfig {
    /// Checks `[batch]`; called by [`Config::validate`](super::Config::validate).
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let bad = |msg: String| Err(ConfigError::Invalid(msg));
        if self.max_items == 0 {
            return bad("batch.max_items must be at least 1".into());
        }
        if self.max_bytes.0 == 0 {
            return bad("batch.max_bytes must be at least 1 byte".into());
        }
        Ok(())
    }
}
