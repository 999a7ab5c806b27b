//! Replay pacing under live load (issue 17, item 5).
//!
//! On a small machine a backlog replayed at full speed takes every core, and
//! live requests (acknowledged from memory, so their latency is the agent's
//! own) wait for a worker thread behind replay's work. Replay has no deadline
//! and live clients do, so replay gives way:
//!
//! - **Only under live load.** Live load is "the memory budget holds live
//!   data" (replay batches reserve nothing), seen within [`LIVE_WINDOW`].
//!   Without it the gap is zero: a backlog alone replays at full speed.
//! - **Driven by what live requests wait for.** A probe on the runtime
//!   measures its scheduling lag (how long a task that is ready to run waits
//!   for a worker thread: what a live request waits before it is read) every
//!   [`PROBE_EVERY`]. Above [`TARGET_LAG`] the gap each replay worker waits
//!   before claiming its next run doubles; at or below it, it shrinks by
//!   [`GAP_STEP`] (additive increase of the replay rate, multiplicative
//!   decrease, as TCP does with its window).
//! - **Never starved.** The gap is at most [`MAX_GAP`]: each worker still
//!   claims a run (up to `batch.max_items` items) every `MAX_GAP` plus its
//!   export time, so steady live load slows replay, never stops it. With the
//!   default two workers and 8192-item runs, that floor is above 250 K items/s
//!   while a run takes under 45 ms to claim and export (about 20 ms here at
//!   full speed).
//!
//! Durable mode is not paced: there the replay workers also carry the live
//! data (hand-offs), so slowing them would slow live delivery.
//!
//! Pure logic here ([`Pace`], `now` passed in); the probe loop and the wait
//! before a claim are in `spooled.rs`.

use std::time::Duration;

use tokio::time::Instant;

/// Live load counts as present this long after it was last seen.
pub(crate) const LIVE_WINDOW: Duration = Duration::from_millis(500);
/// How often the probe measures the runtime's scheduling lag.
pub(crate) const PROBE_EVERY: Duration = Duration::from_millis(10);
/// Scheduling lag above which replay slows down.
pub(crate) const TARGET_LAG: Duration = Duration::from_micros(500);
/// The first gap once the lag is over target, and the step it shrinks by.
pub(crate) const GAP_STEP: Duration = Duration::from_millis(1);
/// The longest a replay worker waits before claiming its next run.
pub(crate) const MAX_GAP: Duration = Duration::from_millis(20);

/// How long replay workers wait between runs: the AIMD state.
#[derive(Debug)]
pub(crate) struct Pace {
    /// The wait before each claim while live load is present.
    gap: Duration,
    /// Live load is present until then; `None`: not seen yet.
    live_until: Option<Instant>,
}

impl Pace {
    pub(crate) fn new() -> Pace {
        Pace {
            gap: Duration::ZERO,
            live_until: None,
        }
    }

    /// Live data was seen at `now`.
    pub(crate) fn live_seen(&mut self, now: Instant) {
        self.live_until = Some(now + LIVE_WINDOW);
    }

    /// Whether live load is present at `now`.
    pub(crate) fn live(&self, now: Instant) -> bool {
        self.live_until.is_some_and(|until| now < until)
    }

    /// One lag measurement: over target doubles the gap (from at least
    /// [`GAP_STEP`], up to [`MAX_GAP`]); otherwise it shrinks by one step.
    /// Without live load the gap decays the same way, so it starts near
    /// zero when live load comes back.
    pub(crate) fn lag_sample(&mut self, lag: Duration, now: Instant) {
        self.gap = if lag > TARGET_LAG && self.live(now) {
            (self.gap * 2).clamp(GAP_STEP, MAX_GAP)
        } else {
            self.gap.saturating_sub(GAP_STEP)
        };
    }

    /// How long a replay worker waits at `now` before it claims a run.
    pub(crate) fn gap(&self, now: Instant) -> Duration {
        if self.live(now) {
            self.gap
        } else {
            Duration::ZERO
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HIGH: Duration = Duration::from_millis(3);
    const LOW: Duration = Duration::from_micros(100);

    #[tokio::test(start_paused = true)]
    async fn without_live_load_replay_never_waits_whatever_the_lag() {
        let mut pace = Pace::new();
        for _ in 0..100 {
            pace.lag_sample(HIGH, Instant::now());
            tokio::time::advance(PROBE_EVERY).await;
        }
        assert_eq!(pace.gap(Instant::now()), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lag_over_target_under_live_load_doubles_the_gap_up_to_the_cap() {
        let mut pace = Pace::new();
        let mut gaps = Vec::new();
        for _ in 0..10 {
            let now = Instant::now();
            pace.live_seen(now);
            pace.lag_sample(HIGH, now);
            gaps.push(pace.gap(now).as_millis());
            tokio::time::advance(PROBE_EVERY).await;
        }
        assert_eq!(gaps, [1, 2, 4, 8, 16, 20, 20, 20, 20, 20]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lag_at_or_below_target_shrinks_the_gap_one_step_a_sample() {
        let mut pace = Pace::new();
        let now = Instant::now();
        pace.live_seen(now);
        for _ in 0..6 {
            pace.lag_sample(HIGH, now);
        }
        assert_eq!(pace.gap(now), MAX_GAP);
        pace.lag_sample(TARGET_LAG, now);
        assert_eq!(pace.gap(now), MAX_GAP - GAP_STEP);
        for _ in 0..100 {
            pace.lag_sample(LOW, now);
        }
        assert_eq!(pace.gap(now), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn the_gap_ends_at_once_when_live_load_has_not_been_seen_for_the_window() {
        let mut pace = Pace::new();
        pace.live_seen(Instant::now());
        for _ in 0..6 {
            pace.lag_sample(HIGH, Instant::now());
        }
        tokio::time::advance(LIVE_WINDOW - Duration::from_millis(1)).await;
        assert_eq!(pace.gap(Instant::now()), MAX_GAP, "still inside the window");
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(pace.gap(Instant::now()), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn under_steady_live_load_and_any_lag_the_gap_never_exceeds_the_cap() {
        let mut pace = Pace::new();
        for i in 0..10_000u64 {
            let now = Instant::now();
            pace.live_seen(now);
            let lag = Duration::from_micros((i * 7919) % 5000);
            pace.lag_sample(lag, now);
            assert!(pace.gap(now) <= MAX_GAP);
            tokio::time::advance(PROBE_EVERY).await;
        }
    }
}
