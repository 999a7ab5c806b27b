//! Which upstream failures are retried, and how long to wait between attempts.
//!
//! Classification follows the OTLP specification for exporters, for both
//! protocols, in [`classify`]:
//!
//! - gRPC: CANCELLED, DEADLINE_EXCEEDED, ABORTED, OUT_OF_RANGE, UNAVAILABLE
//!   and DATA_LOSS are retryable; RESOURCE_EXHAUSTED is retryable when the
//!   server sent a `RetryInfo` (it says it will recover), and without one it
//!   means "message too large" (grpc-go, grpc C-core); tonic servers say
//!   that with OUT_OF_RANGE "decoded message length too large", which is
//!   recognised by its message. Everything else is permanent.
//! - HTTP: 429, 502, 503, 504 are retryable (`Retry-After` honoured, see
//!   [`parse_retry_after`]); 413 is too large; everything else is permanent.
//! - No answer at all (connection failed, reset, timeout) is retryable.
//!
//! Among the permanent ones, gRPC INVALID_ARGUMENT and INTERNAL and HTTP 400
//! say that upstream could not take what the request holds ([`Verdict::Refused`]):
//! grpc-go answers INTERNAL and the Collector's OTLP/HTTP receiver 400 when a
//! request does not decode, for instance a trace id of the wrong length,
//! which the agent's one-level walk does not look at. A batch joins many
//! clients' requests, so such an answer may be about one of them: the
//! exporter cuts the batch at request boundaries and drops only what
//! upstream refuses on its own. The rest (UNAUTHENTICATED, NOT_FOUND, 401,
//! 404, ...) would refuse any request and drop the batch as it is.
//!
//! Permanent failures drop what they refuse with a counted reason; "too
//! large" makes the exporter split it. Pure functions, no runtime.

use std::time::{Duration, SystemTime};

use rand::Rng;
use tonic::Code;

/// Who said no, as the retry policy needs to know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// A gRPC upstream answered with this status.
    Grpc(tonic::Code),
    /// An OTLP/HTTP upstream answered with this HTTP status.
    Http(u16),
    /// No answer: not reachable, connection reset, stream cut. Upstream did
    /// not refuse the batch.
    NoAnswer,
    /// No answer within `upstream.timeout`.
    Timeout,
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cause::Grpc(code) => write!(f, "gRPC {code:?}"),
            Cause::Http(status) => write!(f, "HTTP {status}"),
            Cause::NoAnswer => f.write_str("no answer"),
            Cause::Timeout => f.write_str("timeout"),
        }
    }
}

/// A failed export, with what the retry policy needs to know.
#[derive(Debug, Clone)]
pub struct ExportFailure {
    pub cause: Cause,
    pub message: String,
    /// The server's `RetryInfo` delay or `Retry-After`, if it sent one.
    pub retry_after: Option<Duration>,
}

/// What to do with a batch after a failed export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Retry,
    /// Upstream refused the request's size: send it in smaller parts.
    TooLarge,
    /// Upstream refused the request's content for good: cut it at request
    /// boundaries, and drop what is still refused on its own.
    Refused,
    /// Upstream would refuse any request (authentication, path, method):
    /// drop the batch.
    Drop,
}

/// Classify upstream's answer. `message` is only read to recognise tonic's
/// "too large", which it reports as OUT_OF_RANGE.
pub fn classify(cause: &Cause, has_retry_info: bool, message: &str) -> Verdict {
    match *cause {
        Cause::NoAnswer | Cause::Timeout => Verdict::Retry,
        Cause::Grpc(Code::OutOfRange) if message.contains("message length too large") => {
            Verdict::TooLarge
        }
        Cause::Grpc(
            Code::Cancelled
            | Code::DeadlineExceeded
            | Code::Aborted
            | Code::OutOfRange
            | Code::Unavailable
            | Code::DataLoss,
        ) => Verdict::Retry,
        Cause::Grpc(Code::ResourceExhausted) if has_retry_info => Verdict::Retry,
        Cause::Grpc(Code::ResourceExhausted) => Verdict::TooLarge,
        Cause::Grpc(Code::InvalidArgument | Code::Internal) => Verdict::Refused,
        Cause::Grpc(_) => Verdict::Drop,
        Cause::Http(429 | 502 | 503 | 504) => Verdict::Retry,
        Cause::Http(413) => Verdict::TooLarge,
        Cause::Http(400) => Verdict::Refused,
        Cause::Http(_) => Verdict::Drop,
    }
}

/// [`classify`] of a failed export.
pub fn verdict(failure: &ExportFailure) -> Verdict {
    classify(
        &failure.cause,
        failure.retry_after.is_some(),
        &failure.message,
    )
}

/// An HTTP `Retry-After` value: delay seconds, or an HTTP date (the wait
/// until it, zero if it has passed). None if it is neither.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let date = httpdate::parse_http_date(value).ok()?;
    Some(date.duration_since(now).unwrap_or(Duration::ZERO))
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

    fn grpc(code: Code, retry_info: bool) -> Verdict {
        classify(&Cause::Grpc(code), retry_info, "")
    }

    #[test]
    fn resource_exhausted_is_retried_with_retry_info_and_too_large_without() {
        assert_eq!(grpc(Code::ResourceExhausted, false), Verdict::TooLarge);
        assert_eq!(grpc(Code::ResourceExhausted, true), Verdict::Retry);
        assert_eq!(grpc(Code::Unavailable, false), Verdict::Retry);
        assert_eq!(grpc(Code::OutOfRange, false), Verdict::Retry);
        assert_eq!(grpc(Code::InvalidArgument, true), Verdict::Refused);
        assert_eq!(grpc(Code::Internal, false), Verdict::Refused);
        assert_eq!(grpc(Code::Unauthenticated, false), Verdict::Drop);
        assert_eq!(classify(&Cause::NoAnswer, false, ""), Verdict::Retry);
        assert_eq!(classify(&Cause::Timeout, false, ""), Verdict::Retry);
    }

    #[test]
    fn tonic_servers_out_of_range_message_too_large_is_too_large() {
        let tonic = "Error, decoded message length too large: found 3145728 bytes, the limit is: 1048576 bytes";
        assert_eq!(
            classify(&Cause::Grpc(Code::OutOfRange), false, tonic),
            Verdict::TooLarge
        );
    }

    #[test]
    fn http_statuses_are_classified_as_the_otlp_specification_says() {
        for (status, want) in [
            (429, Verdict::Retry),
            (502, Verdict::Retry),
            (503, Verdict::Retry),
            (504, Verdict::Retry),
            (413, Verdict::TooLarge),
            (400, Verdict::Refused),
            (401, Verdict::Drop),
            (404, Verdict::Drop),
            (500, Verdict::Drop),
            (301, Verdict::Drop),
        ] {
            assert_eq!(classify(&Cause::Http(status), false, ""), want, "{status}");
        }
    }

    #[test]
    fn retry_after_is_seconds_or_an_http_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after(" 2 ", now), Some(Duration::from_secs(2)));
        assert_eq!(
            parse_retry_after("Tue, 14 Nov 2023 22:14:20 GMT", now),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            parse_retry_after("Tue, 14 Nov 2023 22:00:00 GMT", now),
            Some(Duration::ZERO),
            "a date in the past means now"
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-1", now), None);
    }

    /// The wait before the next attempt is upstream's Retry-After, even
    /// above the backoff ceiling, and the sleep lasts exactly that long.
    #[tokio::test(start_paused = true)]
    async fn a_retry_after_of_two_seconds_is_waited_in_full() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let now = SystemTime::UNIX_EPOCH;
        let delay = b.next_delay(parse_retry_after("2", now), &mut rng);
        assert_eq!(delay, Duration::from_secs(2));
        let t0 = tokio::time::Instant::now();
        tokio::time::sleep(delay).await;
        assert_eq!(t0.elapsed(), Duration::from_secs(2));
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
