//! When the committer starts a sync: at once, or after gathering more appends.
//!
//! A sync costs the core about the same CPU whatever its batch holds (the io_uring
//! submission, the file system's journal commit, waking the waiters). While the core
//! has time to spare, syncing at once costs nothing and gives the lowest latency. When
//! work queues up on the core, every sync saved is CPU given back to the sessions, and
//! holding a batch costs its records little next to what they already wait for the core
//! at every step of their sessions.
//!
//! The pace measures that wait directly: the *scheduling delay*, how long the committer
//! waits from being woken (by an append or a finished sync) to being polled, smoothed
//! over its last few dozen wake-ups (tens of milliseconds under load), and compares it
//! with the mean time a sync's fdatasync takes (the disk's part: the write before it
//! is a copy on the spool's writer thread, and that thread's own wait for a core
//! would make a loaded core look disk-bound):
//! - a delay under 1/[`SYNC_SHARE`] of a sync means the disk, not the core, sets the
//!   pace: **eager**, a sync starts as soon as a slot is free and a record waits, with
//!   up to `slots` overlapping;
//! - a longer delay means work is queued on the core. Once [`LOADED_STREAK`] batches
//!   in a row were closed that way, the committer **gathers**: one sync at a time (the
//!   next batch grows behind it), and the open batch is held while appends keep
//!   coming — until none came for [`QUIET_GAPS`] mean gaps between appends, and never
//!   longer than the *hold* after its first record. The hold starts at the delay and
//!   grows by half with every further batch closed on a loaded core, up to
//!   `gather_max`; the first batch closed on an unloaded core drops it to nothing.
//!
//! The smoothing and the streak are what keep a half-loaded core eager: its delay has
//! short spikes, a saturated core's stays long. Measured on the 2-core bench machine
//! (`bench/RESULTS.md`), a closed loop of 50 sessions at saturation went from about
//! 0.35 flushes per message to 0.1 with more throughput, and an open loop at half
//! that rate held no batch at all. Everything here is arithmetic on times the
//! committer passes in, tested without an executor.

use std::time::{Duration, Instant};

/// A batch being gathered is synced once no append came for this many mean gaps.
pub(super) const QUIET_GAPS: u32 = 3;
/// Batches are held once the scheduling delay reaches this fraction (1/N) of a sync.
pub(super) const SYNC_SHARE: u32 = 3;
/// Scheduling delays below this never hold a batch, however fast the disk.
pub(super) const HOLD_MIN: Duration = Duration::from_micros(50);
/// Batches closed in a row on a loaded core before any is held: a burst shorter than
/// this is left to the eager committer (its tail latency matters more than a few
/// flushes).
pub(super) const LOADED_STREAK: u32 = 8;
/// How much the hold grows with each batch closed on a loaded core.
const HOLD_GROWTH: f64 = 1.5;
/// Weight of a new gap in the mean gap (1/32: the last few dozen appends).
const GAP_WEIGHT: f64 = 1.0 / 32.0;
/// Weight of a new scheduling delay in the mean delay, and of a sync's duration in the
/// mean sync (1/64: tens of milliseconds under load, so a brief burst of queued work
/// does not count as a loaded core).
const DELAY_WEIGHT: f64 = 1.0 / 64.0;

/// The committer's choice for the open batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Next {
    /// Start its sync now.
    Sync,
    /// Look again at this time (appends in between only make the batch larger).
    WaitUntil(Instant),
    /// Wait for a running sync to finish.
    WaitForSlot,
}

/// The limits the pace works within (from the spool's configuration).
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    /// Syncs that may overlap while eager.
    pub slots: usize,
    /// The most a batch is held; zero never holds one.
    pub gather_max: Duration,
}

/// What the pace knows: the core's scheduling delay and the rhythm of appends.
#[derive(Debug)]
pub(super) struct Pace {
    limits: Limits,
    /// How long the next batch may be held while the core is loaded, in nanoseconds.
    hold_ns: f64,
    /// Batches closed in a row on a loaded core.
    loaded_streak: u32,
    /// Mean time from the committer being woken to its running, in nanoseconds.
    delay_ns: f64,
    /// When an append or a finished sync woke the waiting committer (until it runs).
    woken_at: Option<Instant>,
    /// Mean duration of a sync's fdatasync, in nanoseconds.
    sync_ns: f64,
    /// Mean time between appends, in nanoseconds.
    gap_ns: f64,
    last_append: Option<Instant>,
    /// When the open batch got its first record.
    batch_started: Option<Instant>,
}

impl Pace {
    pub(super) fn new(limits: Limits) -> Pace {
        Pace {
            limits,
            hold_ns: 0.0,
            loaded_streak: 0,
            delay_ns: 0.0,
            woken_at: None,
            sync_ns: 0.0,
            gap_ns: 0.0,
            last_append: None,
            batch_started: None,
        }
    }

    /// Counts an append; `first_in_batch` when it opened the batch.
    pub(super) fn appended(&mut self, now: Instant, first_in_batch: bool) {
        if let Some(last) = self.last_append {
            let gap = now.saturating_duration_since(last).as_nanos() as f64;
            self.gap_ns += (gap - self.gap_ns) * GAP_WEIGHT;
        }
        self.last_append = Some(now);
        if first_in_batch {
            self.batch_started = Some(now);
        }
    }

    /// The open batch was closed (its sync starts, or it waits for a slot): the hold
    /// grows while the core stays loaded and drops when it is not.
    pub(super) fn batch_closed(&mut self) {
        self.batch_started = None;
        if !self.loaded() {
            self.loaded_streak = 0;
            self.hold_ns = 0.0;
        } else if self.loaded_streak < LOADED_STREAK {
            self.loaded_streak += 1;
        } else {
            let max = self.limits.gather_max.as_nanos() as f64;
            self.hold_ns = (self.hold_ns * HOLD_GROWTH).max(self.delay_ns).min(max);
        }
    }

    /// Whether work queued on the core (rather than the disk) sets the pace.
    fn loaded(&self) -> bool {
        self.delay() >= HOLD_MIN && self.delay_ns * f64::from(SYNC_SHARE) >= self.sync_ns
    }

    /// An append or a finished sync woke the waiting committer.
    pub(super) fn woke(&mut self, now: Instant) {
        self.woken_at.get_or_insert(now);
    }

    /// The committer is polled; when something woke it, the delay since is sampled
    /// (`now` is only read then: most polls were not woken and cost no clock read).
    pub(super) fn ran(&mut self, now: impl FnOnce() -> Instant) {
        if let Some(woken) = self.woken_at.take() {
            self.ran_after(woken, now());
        }
    }

    /// The committer, runnable since `ready`, runs at `now`.
    pub(super) fn ran_after(&mut self, ready: Instant, now: Instant) {
        let delay = now.saturating_duration_since(ready).as_nanos() as f64;
        self.delay_ns += (delay - self.delay_ns) * DELAY_WEIGHT;
    }

    /// A sync's fdatasync took `took`.
    pub(super) fn synced(&mut self, took: Duration) {
        let took = took.as_nanos() as f64;
        self.sync_ns += (took - self.sync_ns) * DELAY_WEIGHT;
    }

    /// The mean scheduling delay.
    pub(super) fn delay(&self) -> Duration {
        Duration::from_nanos(self.delay_ns as u64)
    }

    /// How long a batch may be held now (zero: not at all).
    pub(super) fn hold(&self) -> Duration {
        Duration::from_nanos(self.hold_ns as u64).min(self.limits.gather_max)
    }

    /// How many syncs may ever run at once.
    pub(super) fn slots_max(&self) -> usize {
        self.limits.slots
    }

    /// How many syncs may run at once now.
    pub(super) fn slots(&self) -> usize {
        if self.hold().is_zero() {
            self.limits.slots
        } else {
            1
        }
    }

    /// What to do with an open batch that holds records, `in_flight` syncs running.
    pub(super) fn next(&self, now: Instant, in_flight: usize) -> Next {
        if in_flight >= self.slots() {
            return Next::WaitForSlot;
        }
        let hold = self.hold();
        let (Some(started), Some(last)) = (self.batch_started, self.last_append) else {
            return Next::Sync;
        };
        if hold.is_zero() {
            return Next::Sync;
        }
        let quiet = Duration::from_nanos((self.gap_ns * f64::from(QUIET_GAPS)) as u64).min(hold);
        let until = (last + quiet).min(started + hold);
        if now >= until {
            Next::Sync
        } else {
            Next::WaitUntil(until)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        slots: 4,
        gather_max: Duration::from_millis(5),
    };

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    /// Feeds `pace` many wake-ups that each waited `delay` (the mean settles on it).
    fn settle_delay(pace: &mut Pace, delay: Duration, t0: Instant) {
        for _ in 0..2_000 {
            pace.ran_after(t0, t0 + delay);
        }
    }

    /// A pace whose committer waited `delay` for the core at every wake-up, and whose
    /// syncs took 1.2 ms (so a delay from 400 µs on means a loaded core).
    fn pace_with(limits: Limits, delay: Duration, t0: Instant) -> Pace {
        let mut pace = Pace::new(limits);
        settle_delay(&mut pace, delay, t0);
        for _ in 0..2_000 {
            pace.synced(us(1_200));
        }
        pace
    }

    #[test]
    fn an_idle_core_syncs_at_once_with_overlap() {
        let t0 = Instant::now();
        for delay in [us(10), us(350)] {
            // Either the core is idle, or the disk rather than the core sets the pace.
            let mut pace = pace_with(LIMITS, delay, t0);
            pace.appended(t0, true);
            assert_eq!(pace.hold(), Duration::ZERO, "{delay:?}");
            assert_eq!(pace.slots(), 4);
            assert_eq!(pace.next(t0, 0), Next::Sync);
            assert_eq!(pace.next(t0, 3), Next::Sync);
            assert_eq!(pace.next(t0, 4), Next::WaitForSlot);
        }
    }

    #[test]
    fn a_loaded_core_holds_batches_longer_while_it_stays_loaded() {
        let t0 = Instant::now();
        let mut pace = pace_with(LIMITS, us(450), t0);
        let mut now = t0;
        // Appends every 100 µs: the mean gap settles near 100 µs.
        for i in 0..200 {
            pace.appended(now, i == 0);
            now += us(100);
        }
        // Nothing is held until the load has lasted a streak of batches …
        for _ in 0..LOADED_STREAK {
            assert_eq!(pace.hold(), Duration::ZERO);
            assert_eq!(pace.slots(), 4);
            pace.batch_closed();
        }
        assert_eq!(pace.hold(), Duration::ZERO);
        pace.batch_closed();
        // … then the first hold is the delay, and one sync runs at a time.
        assert!(pace.hold().abs_diff(us(450)) < us(2), "{:?}", pace.hold());
        assert_eq!(pace.slots(), 1);
        assert_eq!(pace.next(now, 1), Next::WaitForSlot);
        // Each batch closed while loaded lets the next be held half as long again …
        let mut holds = Vec::new();
        for _ in 0..8 {
            pace.batch_closed();
            holds.push(pace.hold());
        }
        assert!(holds.windows(2).all(|w| w[1] >= w[0]), "{holds:?}");
        assert!(holds[1] > holds[0]);
        // … up to gather_max.
        assert_eq!(*holds.last().unwrap(), LIMITS.gather_max);
        pace.appended(now, true);
        // Held for three mean gaps after the last append …
        let Next::WaitUntil(until) = pace.next(now, 0) else {
            panic!("a loaded core with appends arriving holds the batch");
        };
        let held = until - now;
        assert!(held > us(250) && held < us(350), "held {held:?}");
        // … each append moves that out, up to the hold after the first.
        let first = now;
        while now - first < LIMITS.gather_max {
            assert!(matches!(pace.next(now, 0), Next::WaitUntil(_)));
            now += us(80);
            pace.appended(now, false);
        }
        assert_eq!(pace.next(now, 0), Next::Sync);
        // A quiet spell ends the hold early.
        pace.batch_closed();
        let start = now + us(100);
        pace.appended(start, true);
        assert!(matches!(pace.next(start, 0), Next::WaitUntil(_)));
        assert_eq!(pace.next(start + us(400), 0), Next::Sync);
    }

    #[test]
    fn the_hold_ends_when_the_core_frees_up() {
        let t0 = Instant::now();
        let mut pace = pace_with(LIMITS, us(2_000), t0);
        for _ in 0..30 {
            pace.batch_closed();
        }
        assert_eq!(pace.hold(), LIMITS.gather_max);
        // Quick wake-ups bring the delay under a third of a sync: the next batch closed
        // forgets the grown hold.
        settle_delay(&mut pace, us(5), t0);
        pace.batch_closed();
        assert_eq!(pace.hold(), Duration::ZERO);
        assert_eq!(pace.slots(), 4);
        settle_delay(&mut pace, us(450), t0);
        pace.batch_closed();
        assert_eq!(pace.hold(), Duration::ZERO, "a new streak builds first");
        for _ in 0..LOADED_STREAK {
            pace.batch_closed();
        }
        assert!(
            pace.hold().abs_diff(us(450)) < us(2),
            "starts again from the delay"
        );
        // Slower syncs need a longer delay before batches are held.
        for _ in 0..2_000 {
            pace.synced(us(2_000));
        }
        pace.batch_closed();
        assert_eq!(pace.hold(), Duration::ZERO);
        // gather_max zero never holds, however loaded the core.
        let never = Limits {
            gather_max: Duration::ZERO,
            ..LIMITS
        };
        let mut pace = pace_with(never, us(50_000), t0);
        for _ in 0..30 {
            pace.batch_closed();
        }
        assert_eq!(pace.hold(), Duration::ZERO);
        assert_eq!(pace.slots(), 4);
    }

    #[test]
    fn the_delay_is_counted_from_the_first_wake_to_the_run() {
        let t0 = Instant::now();
        let mut pace = Pace::new(LIMITS);
        pace.woke(t0);
        pace.woke(t0 + us(100));
        pace.ran(|| t0 + us(6_400));
        assert_eq!(pace.delay(), us(100), "1/64 of the first 6.4 ms sample");
        pace.ran(|| t0 + us(50_000));
        assert_eq!(pace.delay(), us(100), "no wake, no sample");
    }
}
