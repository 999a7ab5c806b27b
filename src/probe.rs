//! The recovery probe: while upstream is failing, one export at a time tries
//! it, at a short fixed interval (`upstream.retry.probe_interval`), instead of
//! every batch retrying on its own exponential backoff.
//!
//! Without it, recovery lags an outage by up to `upstream.retry.max_backoff`
//! (30 s by default): every batch sleeps out its own backoff before it learns
//! that upstream is back. With it:
//!
//! - A retryable failure puts the gate in the *failing* state. While failing,
//!   no export goes out except the probe; only one probe is in flight at a
//!   time. The first probe goes `upstream.retry.initial_backoff` after the
//!   failure (at most one interval: a single lost request on a flapping
//!   upstream costs little), each later one `probe_interval` after the last
//!   (or later, when upstream sent a `RetryInfo` delay). A down upstream
//!   therefore sees one request per interval, not one per batch.
//! - The probe is whichever waiting batch asks first once the interval is due
//!   (export workers and replay workers take batches oldest first, so it is
//!   one of the oldest batches in flight).
//! - Any answer from upstream other than a retryable failure (an ack or a
//!   permanent rejection: upstream is reachable) ends the failing state and
//!   wakes every waiting batch at once: export and replay resume within about
//!   one interval of upstream's return.
//! - While upstream is up, a batch that failed still waits out its own
//!   backoff (so a `RetryInfo` from a throttling upstream is honoured), unless
//!   it saw upstream fail and recover while it waited.
//!
//! [`ProbeState`] is the pure logic and takes `now`; [`Gate`] is the thin async
//! wrapper the delivery loop awaits before each attempt.

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::exporter::{Accepted, ExportFailure};
use crate::retry::{verdict, Verdict};

/// How an export attempt ended, as far as the probe is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Upstream answered (acknowledged, or rejected for good): it is reachable.
    Answered,
    /// A retryable failure, with upstream's `RetryInfo` delay if it sent one.
    Retryable { retry_after: Option<Duration> },
}

impl Outcome {
    /// How the probe sees an export result: only a retryable failure means
    /// upstream is (still) failing.
    pub(crate) fn of(result: &Result<Accepted, ExportFailure>) -> Outcome {
        match result {
            Err(f) if verdict(f) == Verdict::Retry => Outcome::Retryable {
                retry_after: f.retry_after,
            },
            _ => Outcome::Answered,
        }
    }
}

/// What [`ProbeState::try_send`] allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Permit {
    /// Upstream is not known to be failing: send.
    Send,
    /// Upstream is failing and this attempt is the probe: send it, then
    /// report with `probe = true`.
    Probe,
    /// Upstream is failing; ask again at this time (the next probe slot).
    WaitUntil(Instant),
    /// Upstream is failing and a probe is in flight; ask again once it ends.
    WaitForProbe,
}

/// The probe's pure state. One per pipeline.
#[derive(Debug)]
pub(crate) struct ProbeState {
    interval: Duration,
    /// Delay of the first probe of a failing stretch (at most `interval`).
    first: Duration,
    failing: bool,
    probe_in_flight: bool,
    /// Earliest start of the next probe, while failing.
    next_probe: Instant,
}

impl ProbeState {
    pub(crate) fn new(interval: Duration, first: Duration, now: Instant) -> ProbeState {
        ProbeState {
            interval,
            first: first.min(interval),
            failing: false,
            probe_in_flight: false,
            next_probe: now,
        }
    }

    pub(crate) fn is_failing(&self) -> bool {
        self.failing
    }

    /// May an attempt start at `now`? A [`Permit::Probe`] reserves the one
    /// probe slot until [`ProbeState::record`] with `probe = true`.
    pub(crate) fn try_send(&mut self, now: Instant) -> Permit {
        if !self.failing {
            return Permit::Send;
        }
        if self.probe_in_flight {
            return Permit::WaitForProbe;
        }
        if now < self.next_probe {
            return Permit::WaitUntil(self.next_probe);
        }
        self.probe_in_flight = true;
        Permit::Probe
    }

    /// Records how an attempt ended. Returns true when waiting attempts
    /// should look again (upstream recovered, or the probe slot is free).
    pub(crate) fn record(&mut self, now: Instant, probe: bool, outcome: Outcome) -> bool {
        if probe {
            self.probe_in_flight = false;
        }
        match outcome {
            Outcome::Answered => {
                let recovered = self.failing;
                self.failing = false;
                recovered || probe
            }
            Outcome::Retryable { retry_after } => {
                let server = retry_after.unwrap_or_default();
                if !self.failing {
                    self.failing = true;
                    self.next_probe = now + self.first.max(server);
                } else if probe {
                    self.next_probe = now + self.interval.max(server);
                }
                probe
            }
        }
    }
}

/// Why [`Gate::admit`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admit {
    /// Send now; `probe` says whether this attempt is the probe.
    Send { probe: bool },
    /// `force` fired while waiting.
    Cut,
    /// `give_up_at` passed while waiting.
    GiveUp,
}

/// The probe shared by every delivery loop of a pipeline.
#[derive(Debug)]
pub(crate) struct Gate {
    state: Mutex<ProbeState>,
    /// Woken when upstream recovered or the probe slot became free.
    changed: Notify,
}

impl Gate {
    /// `first`: delay of the first probe of a failing stretch (capped at `interval`).
    pub(crate) fn new(interval: Duration, first: Duration) -> Gate {
        Gate {
            state: Mutex::new(ProbeState::new(interval, first, Instant::now())),
            changed: Notify::new(),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut ProbeState) -> T) -> T {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut state)
    }

    /// Waits until this attempt may go out: at `retry_at` (its own backoff)
    /// while upstream is up, as the probe or after recovery while it is
    /// failing. Returns early at `force` or at `give_up_at`.
    pub(crate) async fn admit(
        &self,
        retry_at: Instant,
        give_up_at: Instant,
        force: &CancellationToken,
    ) -> Admit {
        let mut saw_failing = false;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let now = Instant::now();
            let wake_at = match self.with(|s| s.try_send(now)) {
                Permit::Probe => return Admit::Send { probe: true },
                Permit::Send if saw_failing || now >= retry_at => {
                    return Admit::Send { probe: false }
                }
                Permit::Send => Some(retry_at),
                Permit::WaitUntil(at) => {
                    saw_failing = true;
                    Some(at)
                }
                Permit::WaitForProbe => {
                    saw_failing = true;
                    None
                }
            };
            if now >= give_up_at {
                return Admit::GiveUp;
            }
            let wake_at = wake_at.map_or(give_up_at, |at| at.min(give_up_at));
            tokio::select! {
                biased;
                _ = force.cancelled() => return Admit::Cut,
                _ = &mut changed => {}
                _ = tokio::time::sleep_until(wake_at) => {}
            }
        }
    }

    /// Reports how an admitted attempt ended.
    pub(crate) fn record(&self, probe: bool, outcome: Outcome) {
        if self.with(|s| s.record(Instant::now(), probe, outcome)) {
            self.changed.notify_waiters();
        }
    }

    pub(crate) fn is_failing(&self) -> bool {
        self.with(|s| s.is_failing())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    const INTERVAL: Duration = Duration::from_secs(1);

    #[test]
    fn only_one_probe_at_a_time_and_the_next_one_interval_later() {
        let t0 = Instant::now();
        let mut s = ProbeState::new(INTERVAL, INTERVAL, t0);
        assert_eq!(s.try_send(t0), Permit::Send);
        s.record(t0, false, Outcome::Retryable { retry_after: None });
        assert_eq!(s.try_send(t0), Permit::WaitUntil(t0 + INTERVAL));
        let t1 = t0 + INTERVAL;
        assert_eq!(s.try_send(t1), Permit::Probe);
        assert_eq!(s.try_send(t1), Permit::WaitForProbe);
        let t2 = t1 + Duration::from_millis(300);
        assert!(s.record(t2, true, Outcome::Retryable { retry_after: None }));
        assert_eq!(s.try_send(t2), Permit::WaitUntil(t2 + INTERVAL));
    }

    #[test]
    fn the_first_probe_of_a_failing_stretch_waits_only_the_initial_backoff() {
        let t0 = Instant::now();
        let first = Duration::from_millis(50);
        let mut s = ProbeState::new(INTERVAL, first, t0);
        s.record(t0, false, Outcome::Retryable { retry_after: None });
        assert_eq!(s.try_send(t0 + first), Permit::Probe);
        s.record(t0 + first, true, Outcome::Retryable { retry_after: None });
        assert_eq!(
            s.try_send(t0 + first),
            Permit::WaitUntil(t0 + first + INTERVAL)
        );
    }

    #[test]
    fn a_retry_info_delay_longer_than_the_interval_spaces_the_probes() {
        let t0 = Instant::now();
        let mut s = ProbeState::new(INTERVAL, INTERVAL, t0);
        let slow = Outcome::Retryable {
            retry_after: Some(Duration::from_secs(5)),
        };
        s.record(t0, false, slow);
        assert_eq!(
            s.try_send(t0),
            Permit::WaitUntil(t0 + Duration::from_secs(5))
        );
    }

    #[test]
    fn any_answer_from_upstream_ends_the_failing_state() {
        let t0 = Instant::now();
        let mut s = ProbeState::new(INTERVAL, INTERVAL, t0);
        s.record(t0, false, Outcome::Retryable { retry_after: None });
        let t1 = t0 + INTERVAL;
        assert_eq!(s.try_send(t1), Permit::Probe);
        assert!(s.record(t1, true, Outcome::Answered));
        assert!(!s.is_failing());
        assert_eq!(s.try_send(t1), Permit::Send);
        // A late failure of an attempt sent before the recovery starts a
        // new failing stretch, one interval from now.
        s.record(t1, false, Outcome::Retryable { retry_after: None });
        assert_eq!(s.try_send(t1), Permit::WaitUntil(t1 + INTERVAL));
    }

    /// An upstream that is down until `up_at`, seen by `batches` delivery
    /// loops each with a 30 s backoff (the default cap).
    struct Fake {
        up_at: Instant,
        requests_while_down: AtomicUsize,
        first_success: Mutex<Option<Instant>>,
    }

    async fn deliver(gate: Arc<Gate>, fake: Arc<Fake>, force: CancellationToken) {
        let mut retry_at = Instant::now();
        let give_up_at = Instant::now() + Duration::from_secs(3600);
        loop {
            let probe = match gate.admit(retry_at, give_up_at, &force).await {
                Admit::Send { probe } => probe,
                Admit::Cut | Admit::GiveUp => return,
            };
            tokio::time::sleep(Duration::from_millis(5)).await; // the export's latency
            let now = Instant::now();
            if now >= fake.up_at {
                let mut first = fake.first_success.lock().unwrap();
                first.get_or_insert(now);
                drop(first);
                gate.record(probe, Outcome::Answered);
                return;
            }
            fake.requests_while_down.fetch_add(1, Ordering::SeqCst);
            gate.record(probe, Outcome::Retryable { retry_after: None });
            retry_at = now + Duration::from_secs(30);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn after_an_outage_longer_than_the_backoff_cap_delivery_resumes_within_one_interval() {
        let gate = Arc::new(Gate::new(INTERVAL, INTERVAL));
        let outage = Duration::from_secs(95);
        let fake = Arc::new(Fake {
            up_at: Instant::now() + outage,
            requests_while_down: AtomicUsize::new(0),
            first_success: Mutex::new(None),
        });
        let force = CancellationToken::new();
        let loops: Vec<_> = (0..8)
            .map(|_| tokio::spawn(deliver(gate.clone(), fake.clone(), force.clone())))
            .collect();
        for l in loops {
            l.await.unwrap();
        }
        let first = fake.first_success.lock().unwrap().expect("delivered");
        let lag = first - fake.up_at;
        assert!(
            lag <= INTERVAL + Duration::from_millis(20),
            "first success {lag:?} after upstream returned"
        );
        // 8 first attempts, then about one probe per interval.
        let seen = fake.requests_while_down.load(Ordering::SeqCst);
        let most = 8 + outage.as_secs() as usize + 1;
        assert!(seen <= most, "{seen} requests during a {outage:?} outage");
        assert!(!gate.is_failing());
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_attempt_gives_up_at_its_deadline_and_is_cut_by_force() {
        let gate = Gate::new(INTERVAL, INTERVAL);
        gate.record(false, Outcome::Retryable { retry_after: None });
        let now = Instant::now();
        let force = CancellationToken::new();
        // The probe slot is taken and never returned.
        assert_eq!(
            gate.admit(now, now + Duration::from_secs(60), &force).await,
            Admit::Send { probe: true }
        );
        let started = Instant::now();
        let give_up = started + Duration::from_secs(10);
        assert_eq!(gate.admit(now, give_up, &force).await, Admit::GiveUp);
        assert_eq!(Instant::now(), give_up);
        force.cancel();
        assert_eq!(
            gate.admit(now, Instant::now() + Duration::from_secs(10), &force)
                .await,
            Admit::Cut
        );
    }

    #[tokio::test(start_paused = true)]
    async fn while_upstream_is_up_a_failed_attempt_waits_out_its_own_backoff() {
        let gate = Gate::new(INTERVAL, INTERVAL);
        let force = CancellationToken::new();
        let retry_at = Instant::now() + Duration::from_secs(7);
        let far = Instant::now() + Duration::from_secs(60);
        assert_eq!(
            gate.admit(retry_at, far, &force).await,
            Admit::Send { probe: false }
        );
        assert_eq!(Instant::now(), retry_at);
    }
}
