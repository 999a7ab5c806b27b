//! Gauges read from state (memory budget, spool, upstream health) rather
//! than counted, refreshed before each scrape and status snapshot.

use super::Pipeline;
use crate::signal::Signal;

impl Pipeline {
    /// Refresh gauges that are read from state rather than counted.
    pub fn refresh_gauges(&self) {
        let m = &self.metrics;
        m.buffered_bytes.set(self.budget.used() as i64);
        for s in Signal::ALL {
            m.buffered_items
                .get_or_create(&[("signal", s.as_str())])
                .set(self.budget.items_of(s) as i64);
        }
        let stats = self.spool().stats_cached();
        m.spool_rows.set(stats.rows as i64);
        m.spool_bytes.set(stats.bytes as i64);
        for s in Signal::ALL {
            m.spool_items
                .get_or_create(&[("signal", s.as_str())])
                .set(stats.items[s.index()] as i64);
        }
        let age = stats
            .oldest_created_ms
            .map(|ms| (crate::batch::unix_ms(std::time::SystemTime::now()) - ms).max(0) / 1000)
            .unwrap_or(0);
        m.spool_oldest_age_seconds.set(age);
        let full = stats.full;
        m.spool_disk_full
            .set(i64::from(full == Some(crate::spool::FullReason::Disk)));
        m.spool_max_bytes_reached
            .set(i64::from(full == Some(crate::spool::FullReason::MaxBytes)));
        m.spool_delete_pending_rows
            .set(i64::try_from(stats.delete_pending_rows).unwrap_or(i64::MAX));
        if let Some(upstream) = &self.upstream {
            let health = upstream.health().snapshot();
            let since = health
                .failing_since
                .map(|t| crate::batch::unix_ms(t) / 1000)
                .unwrap_or(0);
            m.upstream_failing_since.set(since);
            m.upstream_up.set(i64::from(health.up));
            m.upstream_max_request_bytes
                .set(i64::try_from(upstream.working_limit()).unwrap_or(i64::MAX));
        }
    }
}
