//! Export latency as fixed buckets the admin API can read (prometheus-client's
//! `Histogram` does not expose its buckets), and quantiles read from them.
//!
//! Bounds double from 1 ms to 16.384 s; a last bucket holds everything slower.
//! A quantile is the upper bound of the bucket it falls in, so it is exact to
//! within a factor of two: enough to tell 2 ms from 200 ms during an incident.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the buckets, milliseconds.
pub const BOUNDS_MS: [f64; 15] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0,
    16384.0,
];

/// Calls per bucket, one more bucket than [`BOUNDS_MS`]. Lock-free: export
/// workers add, the admin API reads.
#[derive(Debug, Default)]
pub struct LatencyBuckets {
    counts: [AtomicU64; BOUNDS_MS.len() + 1],
}

impl LatencyBuckets {
    pub fn observe(&self, latency: Duration) {
        let ms = latency.as_secs_f64() * 1000.0;
        let i = BOUNDS_MS
            .iter()
            .position(|b| ms <= *b)
            .unwrap_or(BOUNDS_MS.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
    }

    /// The counts per bucket (not cumulative).
    pub fn counts(&self) -> Vec<u64> {
        self.counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }
}

/// Quantile `q` (0..=1) of a histogram given as per-bucket `counts` over
/// [`BOUNDS_MS`]: the upper bound of the bucket holding it, in ms. Calls in
/// the overflow bucket report the last bound. 0 when there are no calls.
pub fn quantile_ms(counts: &[u64], q: f64) -> f64 {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return 0.0;
    }
    // The rank of the quantile call, 1-based: at least the first call.
    let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
    let mut seen = 0;
    for (i, c) in counts.iter().enumerate() {
        seen += c;
        if seen >= rank {
            return BOUNDS_MS[i.min(BOUNDS_MS.len() - 1)];
        }
    }
    BOUNDS_MS[BOUNDS_MS.len() - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_call_lands_in_the_first_bucket_whose_bound_holds_it() {
        let b = LatencyBuckets::default();
        b.observe(Duration::from_micros(500));
        b.observe(Duration::from_millis(1));
        b.observe(Duration::from_millis(3));
        b.observe(Duration::from_secs(60));
        let c = b.counts();
        assert_eq!(c.len(), BOUNDS_MS.len() + 1);
        assert_eq!((c[0], c[1], c[2], c[BOUNDS_MS.len()]), (2, 0, 1, 1));
        assert_eq!(c.iter().sum::<u64>(), 4);
    }

    #[test]
    fn quantiles_are_the_bound_of_the_bucket_they_fall_in() {
        let mut counts = vec![0; BOUNDS_MS.len() + 1];
        counts[2] = 90; // ≤ 4 ms
        counts[7] = 9; // ≤ 128 ms
        counts[BOUNDS_MS.len()] = 1; // slower than the last bound
        assert_eq!(quantile_ms(&counts, 0.5), 4.0);
        assert_eq!(quantile_ms(&counts, 0.9), 4.0);
        assert_eq!(quantile_ms(&counts, 0.99), 128.0);
        assert_eq!(quantile_ms(&counts, 1.0), 16384.0);
        assert_eq!(quantile_ms(&[0; 16], 0.5), 0.0);
    }
}
