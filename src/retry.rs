//! Which upstream failures are retried, and how long to wait between attempts.
//!
//! Classification follows the OTLP specification for exporters: CANCELLED,
//! DEADLINE_EXCEEDED, ABORTED, OUT_OF_RANGE, UNAVAILABLE and DATA_LOSS are
//! retryable; RESOURCE_EXHAUSTED is retryable only when the server sent a
//! `RetryInfo` (the server says it will recover); everything else is permanent
//! and the batch is dropped with a counted reason. Pure functions, no runtime.

use std::time::Duration;

use rand::Rng;
use tonic::Code;

/// What to do with a batch after a failed export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Retry,
    Drop,
}

/// Classify a gRPC status from upstream.
pub fn classify(code: Code, has_retry_info: bool) -> Verdict {
    match code {
        Code::Cancelled
        | Code::DeadlineExceeded
        | Code::Aborted
        | Code::OutOfRange
        | Code::Unavailable
        | Code::DataLoss => Verdict::Retry,
        Code::ResourceExhausted if has_retry_info => Verdict::Retry,
        _ => Verdict::Drop,
    }
}

/// Exponential backoff with full jitter, bounded by `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max: max.max(initial),
            attempt: 0,
        }
    }

    /// The ceiling of the next delay: `initial * 2^attempt`, capped at `max`.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// The next delay: uniformly random in [ceiling/2, ceiling] (jitter spreads
    /// a fleet's retries), or the server's `RetryInfo` delay when it gave one,
    /// bounded by `max`.
    pub fn next_delay(&mut self, retry_info: Option<Duration>, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        if let Some(server) = retry_info {
            return server.min(self.max);
        }
        let ceiling_ms = ceiling.as_millis().max(1) as u64;
        let ms = rng.random_range(ceiling_ms / 2..=ceiling_ms);
        Duration::from_millis(ms)
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;

    #[test]
    fn resource_exhausted_is_retried_only_with_retry_info() {
        assert_eq!(classify(Code::ResourceExhausted, false), Verdict::Drop);
        assert_eq!(classify(Code::ResourceExhausted, true), Verdict::Retry);
        assert_eq!(classify(Code::Unavailable, false), Verdict::Retry);
        assert_eq!(classify(Code::InvalidArgument, true), Verdict::Drop);
        assert_eq!(classify(Code::Unauthenticated, false), Verdict::Drop);
    }

    #[test]
    fn retry_info_delay_wins_but_is_capped() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        assert_eq!(
            b.next_delay(Some(Duration::from_secs(7)), &mut rng),
            Duration::from_secs(7)
        );
        assert_eq!(
            b.next_delay(Some(Duration::from_secs(700)), &mut rng),
            Duration::from_secs(30)
        );
    }

    proptest! {
        #[test]
        fn delays_stay_within_half_ceiling_and_max(
            initial_ms in 1u64..5_000, max_ms in 1u64..120_000, attempts in 1usize..80, seed: u64,
        ) {
            let initial = Duration::from_millis(initial_ms);
            let max = Duration::from_millis(max_ms);
            let mut b = Backoff::new(initial, max);
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut last_ceiling = Duration::ZERO;
            for _ in 0..attempts {
                let ceiling = b.ceiling();
                prop_assert!(ceiling >= last_ceiling);
                prop_assert!(ceiling <= max.max(initial));
                let d = b.next_delay(None, &mut rng);
                prop_assert!(d <= ceiling.max(Duration::from_millis(1)));
                prop_assert!(d >= ceiling / 2 - Duration::from_millis(1).min(ceiling / 2));
                last_ceiling = ceiling;
            }
        }
    }
}
