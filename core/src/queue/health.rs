//! The connection health of one ready queue (`egress_source->site_name`): a circuit
//! breaker fed by connection attempts, with no I/O and no clock of its own.
//!
//! A failed connection (TCP, banner, EHLO, STARTTLS) says something about the site
//! or the path to it, nothing about the recipients; so it never bounces anything, and
//! one failure does not condemn the whole queue either — a single reset or timeout
//! would otherwise push every waiting message out by a retry interval. Each failure
//! defers one part (which pays for the attempt with its own retry schedule) and
//! closes the queue to new connections for a backoff that doubles with each failure
//! in a row; while failures are recorded only one connection at a time probes the
//! site. Only after `failures_max` failures in a row is the site taken to be down and
//! everything waiting deferred, as Postfix does for a dead destination.

use std::time::Duration;

/// What the first failed connection's backoff is; it doubles per failure in a row.
pub const BACKOFF_FIRST: Duration = Duration::from_secs(1);

/// Connection failures of a ready queue.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ConnectHealth {
    /// Connection failures in a row; 0 once a connection succeeds.
    pub failures: u32,
    /// No new connection is opened before this (unix ms).
    pub retry_at_ms: u64,
}

/// What a failed connection does to the parts of its ready queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterFailure {
    /// Defer the part at the head of the queue; the rest wait for the next try.
    DeferOne,
    /// The site looks down: defer every part waiting.
    DeferAll,
}

impl ConnectHealth {
    /// Records a failed connection at `now_ms`.
    pub fn failed(
        &mut self,
        now_ms: u64,
        failures_max: u32,
        backoff_max: Duration,
    ) -> AfterFailure {
        self.failures = self.failures.saturating_add(1);
        let doublings = (self.failures - 1).min(31);
        let backoff = BACKOFF_FIRST
            .saturating_mul(1 << doublings)
            .min(backoff_max.max(BACKOFF_FIRST));
        self.retry_at_ms = now_ms.saturating_add(backoff.as_millis() as u64);
        if self.failures >= failures_max {
            AfterFailure::DeferAll
        } else {
            AfterFailure::DeferOne
        }
    }

    /// Records a connection that reached the point of sending mail.
    pub fn succeeded(&mut self) {
        *self = ConnectHealth::default();
    }

    /// How many connections the queue may have open at `now_ms`, given its
    /// connection_limit: none during a backoff, one probe after failures, else the
    /// limit.
    pub fn connections_allowed(&self, now_ms: u64, limit: usize) -> usize {
        if self.failures == 0 {
            limit
        } else if now_ms < self.retry_at_ms {
            0
        } else {
            1.min(limit)
        }
    }

    /// Whether the queue is backing off at `now_ms` (it must then be kept, not
    /// forgotten, so that the backoff holds).
    pub fn backing_off(&self, now_ms: u64) -> bool {
        self.failures > 0 && now_ms < self.retry_at_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_back_off_doubling_and_defer_everything_only_at_the_bound() {
        let mut h = ConnectHealth::default();
        let max = Duration::from_secs(5);
        assert_eq!(h.connections_allowed(0, 32), 32);
        assert_eq!(h.failed(1000, 3, max), AfterFailure::DeferOne);
        assert_eq!(h.retry_at_ms, 2000);
        assert_eq!(h.connections_allowed(1999, 32), 0);
        assert!(h.backing_off(1999));
        assert_eq!(h.connections_allowed(2000, 32), 1, "one probe");
        assert!(!h.backing_off(2000));
        assert_eq!(h.failed(2000, 3, max), AfterFailure::DeferOne);
        assert_eq!(h.retry_at_ms, 4000);
        assert_eq!(h.failed(4000, 3, max), AfterFailure::DeferAll);
        assert_eq!(h.retry_at_ms, 8000);
        assert_eq!(h.failed(8000, 3, max), AfterFailure::DeferAll);
        assert_eq!(h.retry_at_ms, 13_000, "capped at the maximum");
        h.succeeded();
        assert_eq!(h.connections_allowed(8001, 32), 32);
        assert_eq!(h, ConnectHealth::default());
    }

    #[test]
    fn a_bound_of_one_defers_everything_at_the_first_failure() {
        let mut h = ConnectHealth::default();
        assert_eq!(
            h.failed(0, 1, Duration::from_secs(1)),
            AfterFailure::DeferAll
        );
        // A maximum below the first backoff still waits the first backoff.
        let mut h2 = ConnectHealth::default();
        h2.failed(0, 5, Duration::ZERO);
        assert_eq!(h2.retry_at_ms, 1000);
        // Many failures in a row do not overflow.
        for _ in 0..100 {
            h.failed(u64::MAX - 10, 3, Duration::from_secs(86_400));
        }
        assert_eq!(h.retry_at_ms, u64::MAX);
    }
}
