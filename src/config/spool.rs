//! `[spool]`, `[shutdown]` and `durability`: where data that cannot be
//! delivered now is kept, when a request is acknowledged, and how long a
//! stop may flush before the rest goes to the spool.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::units::{duration, duration_opt, ByteSize};
use super::ConfigError;

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SpoolConfig {
    /// SQLite file. None: `$STATE_DIRECTORY/spool.db`, else `./telespool-data/spool.db`.
    pub path: Option<PathBuf>,
    /// Bound on the spool file (enforced by SQLite's `max_page_count`).
    pub max_bytes: ByteSize,
    pub when_full: WhenFull,
    /// SQLite `synchronous`: "normal" survives a process kill, "full" also a
    /// power loss (an fsync per commit).
    pub synchronous: SyncMode,
    /// Rows older than this are deleted instead of replayed (counted as
    /// dropped, reason spool_expired). None: no age limit.
    #[serde(
        default,
        with = "duration_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_age: Option<Duration>,
    /// Whether a replaying backlog gives way to live clients (memory mode):
    /// "auto" slows replay while live data is served and the cores are
    /// contended (`src/pipeline/pace.rs`), "off" replays at full speed.
    pub replay_pacing: ReplayPacing,
}

/// `spool.replay_pacing`.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ReplayPacing {
    /// Replay slows down under live load when the runtime's scheduling lag
    /// or the machine's CPU pressure is over target, never below a floor.
    #[default]
    Auto,
    /// Replay claims full runs as fast as upstream takes them.
    Off,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SyncMode {
    #[default]
    Normal,
    Full,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            path: None,
            max_bytes: ByteSize(1 << 30),
            when_full: WhenFull::Backpressure,
            synchronous: SyncMode::Normal,
            max_age: None,
            replay_pacing: ReplayPacing::Auto,
        }
    }
}

impl SpoolConfig {
    /// The spool path after applying the documented defaults.
    pub fn resolved_path(&self) -> PathBuf {
        if let Some(path) = &self.path {
            return path.clone();
        }
        match std::env::var_os("STATE_DIRECTORY") {
            // systemd may pass several colon-separated directories; the first is ours.
            Some(dirs) if !dirs.is_empty() => {
                let first = dirs
                    .to_string_lossy()
                    .split(':')
                    .next()
                    .unwrap_or("")
                    .to_owned();
                Path::new(&first).join("spool.db")
            }
            _ => Path::new("telespool-data").join("spool.db"),
        }
    }

    /// Checks `[spool]`; called by [`Config::validate`](super::Config::validate).
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let bad = |msg: String| Err(ConfigError::Invalid(msg));
        if self.max_age.is_some_and(|age| age.is_zero()) {
            return bad("spool.max_age must be above 0s (leave it out for no limit)".into());
        }
        if self.max_bytes.0 < 64 * 1024 {
            return bad("spool.max_bytes must be at least 64KiB".into());
        }
        Ok(())
    }
}

/// What to do when the spool has no room left.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// Refuse new data with a retryable answer; never drop acknowledged data.
    Backpressure,
    /// Delete the oldest spooled batches to make room, counting every dropped item.
    DropOldest,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownConfig {
    /// How long open batches may take to reach upstream after a stop signal.
    #[serde(with = "duration")]
    pub flush_budget: Duration,
    /// Hard deadline for the whole shutdown sequence.
    #[serde(with = "duration")]
    pub timeout: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            flush_budget: Duration::from_secs(10),
            timeout: Duration::from_secs(20),
        }
    }
}

impl ShutdownConfig {
    /// Checks `[shutdown]`; called by [`Config::validate`](super::Config::validate).
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let bad = |msg: String| Err(ConfigError::Invalid(msg));
        if self.flush_budget > self.timeout {
            return bad(format!(
                "shutdown.flush_budget ({}) must not exceed shutdown.timeout ({})",
                humantime::format_duration(self.flush_budget),
                humantime::format_duration(self.timeout)
            ));
        }
        Ok(())
    }
}

/// When an export request is acknowledged.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// Once it is in the memory buffer.
    #[default]
    Memory,
    /// Once it is committed to the spool.
    Spool,
}
