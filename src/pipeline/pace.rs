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
//! - **Driven by what live requests wait for.** Every [`PROBE_EVERY`] a
//!   probe takes two measures of contention. The runtime's scheduling lag:
//!   how long a task that is ready to run waits for a worker thread, what a
//!   live request waits before it is read. And the machine's CPU pressure
//!   (Linux PSI, the `some` line of `/proc/pressure/cpu`): the share of the
//!   interval in which some runnable thread waited for a CPU, which is what
//!   the agent's own threads wait for when the cores are full (the lag cannot
//!   see that: a worker thread that is not on a CPU measures nothing). On a
//!   2-core machine a backlog replayed at full speed next to live load kept
//!   the lag under target while every thread queued for a CPU, and the live
//!   p99 doubled. When either is over target ([`TARGET_LAG`],
//!   [`TARGET_PRESSURE`]) the gap each replay worker waits before claiming
//!   its next run doubles; otherwise it shrinks by [`GAP_STEP`] (additive
//!   increase of the replay rate, multiplicative decrease, as TCP does with
//!   its window). Machine-wide pressure also makes replay give way to the
//!   node's applications, which the agent is there to serve. Without PSI
//!   (older kernels, `psi=0`) the lag alone drives the pace.
//! - **Small runs while paced.** With a gap, a replay worker claims runs of
//!   at most 1/[`RUN_SPLIT`] of `batch.max_items` and `batch.max_bytes` and
//!   waits the gap in proportion to the items it last claimed. The rate is
//!   the same as full runs with the whole gap, but the bursts are shorter:
//!   reading and exporting one full run (4 MB here) takes both cores of a
//!   small machine for ~10 ms, and the live requests that arrive then wait
//!   it out. With full runs, replaying at a third of the speed left the live
//!   p99 while replaying where it was (3.1 ms against 3.6 ms at full speed).
//!   Spooled rows are not split: a row larger than the smaller run goes out
//!   alone, and the wait after it is in proportion to it. Each worker keeps
//!   small runs in flight up to a full run's bytes (`spooled.rs`), so an
//!   upstream a round trip away gets as many bytes in flight as unpaced: with
//!   the bench's sink answering after 20 ms, one small run at a time
//!   replayed 299-321 K spans/s, small runs in flight 564-584 K.
//! - **Never starved.** The gap is at most [`MAX_GAP`] per full run's
//!   worth of items: each worker still replays `batch.max_items` items every
//!   `MAX_GAP` plus the time it takes to claim and export them, so steady
//!   live load slows replay, never stops it. On the `replay-live` bench (2
//!   cores, 50 K live spans/s, CPU pressure over target throughout) that is
//!   709 K spans/s, against 1.0-1.1 M spans/s unpaced, and the live p99
//!   while replaying is 1.9-2.1 ms against 3.5-4.1 ms unpaced.
//!
//! Durable mode is not paced: there the replay workers also carry the live
//! data (hand-offs), so slowing them would slow live delivery. Nor is
//! replay with `spool.replay_pacing = "off"`, for operators who would rather
//! drain a backlog as fast as upstream takes it.
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
/// Share of wall time with some thread waiting for a CPU above which replay
/// slows down.
pub(crate) const TARGET_PRESSURE: f64 = 0.10;
/// The first gap once the lag is over target, and the step it shrinks by.
pub(crate) const GAP_STEP: Duration = Duration::from_millis(1);
/// While paced, replay runs are this many times smaller than full ones.
pub(crate) const RUN_SPLIT: u64 = 8;
/// The longest a replay worker waits before claiming its next run, per full
/// run's worth of items.
pub(crate) const MAX_GAP: Duration = Duration::from_millis(10);

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

    /// One lag measurement (see [`Pace::sample`]).
    #[cfg(test)]
    pub(crate) fn lag_sample(&mut self, lag: Duration, now: Instant) {
        self.sample(lag, None, now);
    }

    /// One probe: the runtime's scheduling `lag` and the CPU `pressure`
    /// since the last probe (None: not known). Either over target doubles
    /// the gap (from at least [`GAP_STEP`], up to [`MAX_GAP`]); otherwise it
    /// shrinks by one step. Without live load the gap decays the same way,
    /// so it starts near zero when live load comes back.
    pub(crate) fn sample(&mut self, lag: Duration, pressure: Option<f64>, now: Instant) {
        let contended = lag > TARGET_LAG || pressure.is_some_and(|p| p > TARGET_PRESSURE);
        self.gap = if contended && self.live(now) {
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

/// Where the machine's CPU pressure is read from (Linux PSI).
const PSI_CPU: &str = "/proc/pressure/cpu";

/// The machine's CPU pressure between two reads: the growth of PSI's
/// cumulative `some` stall time (microseconds) over the wall time between.
#[derive(Debug)]
pub(crate) struct CpuPressure {
    path: &'static str,
    last: Option<(u64, Instant)>,
}

impl CpuPressure {
    pub(crate) fn new() -> CpuPressure {
        CpuPressure {
            path: PSI_CPU,
            last: None,
        }
    }

    /// The share of wall time since the last call in which some runnable
    /// thread waited for a CPU; None on the first call or without PSI.
    pub(crate) fn sample(&mut self, now: Instant) -> Option<f64> {
        let total = std::fs::read_to_string(self.path)
            .ok()
            .and_then(|text| some_total_us(&text))?;
        let (before, then) = self.last.replace((total, now))?;
        let wall = now.saturating_duration_since(then).as_micros();
        (wall > 0).then(|| total.saturating_sub(before) as f64 / wall as f64)
    }
}

/// `total=` of the `some` line of a PSI file, in microseconds.
fn some_total_us(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("some "))?;
    line.split_whitespace()
        .find_map(|field| field.strip_prefix("total="))?
        .parse()
        .ok()
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
        assert_eq!(gaps, [1, 2, 4, 8, 10, 10, 10, 10, 10, 10]);
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

    #[tokio::test(start_paused = true)]
    async fn cpu_pressure_over_target_under_live_load_slows_replay_even_without_lag() {
        let mut pace = Pace::new();
        let now = Instant::now();
        pace.live_seen(now);
        pace.sample(LOW, Some(0.5), now);
        pace.sample(LOW, Some(0.5), now);
        assert_eq!(pace.gap(now), 2 * GAP_STEP);
        pace.sample(LOW, Some(TARGET_PRESSURE), now);
        assert_eq!(pace.gap(now), GAP_STEP, "at target it shrinks");
        pace.sample(LOW, None, now);
        assert_eq!(
            pace.gap(now),
            Duration::ZERO,
            "unknown pressure: the lag decides"
        );
    }

    #[test]
    fn the_some_total_is_read_from_a_psi_file() {
        let text = "some avg10=0.67 avg60=6.41 avg300=7.03 total=971785462\n\
                    full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n";
        assert_eq!(some_total_us(text), Some(971_785_462));
        assert_eq!(some_total_us("full avg10=0.00 total=5\n"), None);
        assert_eq!(some_total_us("some avg10=0.00 total=x\n"), None);
        assert_eq!(some_total_us(""), None);
    }

    /// On a Linux with PSI the reader gives a share in [0, cores] from its
    /// second read on (PSI's `some` is wall time, so at most 1 per interval).
    #[test]
    fn cpu_pressure_is_a_share_of_wall_time_where_the_kernel_has_psi() {
        let mut pressure = CpuPressure::new();
        let t0 = Instant::now();
        let first = pressure.sample(t0);
        assert_eq!(first, None, "no share from one read");
        if std::fs::metadata(PSI_CPU).is_err() {
            return; // No PSI here: the lag alone paces replay.
        }
        let spin = Instant::now();
        while spin.elapsed() < Duration::from_millis(20) {
            std::hint::spin_loop();
        }
        let share = pressure.sample(t0 + Duration::from_millis(20));
        assert!(share.is_some_and(|s| (0.0..=1.5).contains(&s)), "{share:?}");
    }
}
