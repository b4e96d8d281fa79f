//! The time the cache and its refresh scheduler read, passed in so their rules can be tested, and
//! a day of them simulated, without waiting for it.
//!
//! Contract: [`Clock::wall`] is the wall clock that credential and token expirations (wall-clock
//! times from EKS Auth and the token's claims) are compared with; [`Clock::instant`] is tokio's
//! monotonic clock, which the scheduler's deadlines and sleeps use. [`Clock::System`] reads the
//! system's wall clock. [`Clock::Manual`] is for tests and simulations: its wall clock runs with
//! tokio's from a fixed start, so a paused runtime moves both together (`tokio::time::advance`,
//! or on its own to the next timer when every task is idle), and [`ManualClock::jump`] moves the
//! wall clock alone, as a suspend of the node does (the monotonic clock stops, the wall clock does
//! not) or an NTP step.
//!
//! An enum, not a trait object or a type parameter: the hit path reads the wall clock once per
//! request, and matching two variants (a null test: `System` is the `Arc`'s niche) is a
//! predicted branch in front of the same `SystemTime::now()` it called before, with no indirect
//! call; and the cache's type stays `CredentialCache` for every room that holds one.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

/// Where the cache reads the time; see the module documentation.
#[derive(Debug, Clone, Default)]
pub enum Clock {
    /// The system's clocks: production.
    #[default]
    System,
    /// A wall clock driven by tokio's (paused) clock: tests and simulations.
    Manual(Arc<ManualClock>),
}

impl Clock {
    /// A manual clock whose wall time is `start` now; the handle moves its wall clock alone.
    /// Call within a Tokio runtime (its clock is the one that runs it).
    pub fn manual(start: SystemTime) -> (Clock, Arc<ManualClock>) {
        let m = Arc::new(ManualClock::new(start));
        (Clock::Manual(m.clone()), m)
    }

    /// The wall clock: what credential and token expirations are compared with.
    #[inline]
    pub fn wall(&self) -> SystemTime {
        match self {
            Clock::System => SystemTime::now(),
            Clock::Manual(m) => m.wall(),
        }
    }

    /// The monotonic clock: tokio's, for both variants (a paused runtime moves it).
    #[inline]
    pub fn instant(&self) -> Instant {
        Instant::now()
    }
}

/// A wall clock that runs with tokio's from a fixed start, and can be moved on its own.
#[derive(Debug)]
pub struct ManualClock {
    start_wall: SystemTime,
    start: Instant,
    /// Nanoseconds the wall clock was moved on its own (negative: back).
    jumped_ns: AtomicI64,
}

impl ManualClock {
    /// A clock reading `start` now.
    pub fn new(start: SystemTime) -> ManualClock {
        ManualClock {
            start_wall: start,
            start: Instant::now(),
            jumped_ns: AtomicI64::new(0),
        }
    }

    pub fn wall(&self) -> SystemTime {
        let ran = self.start_wall + Instant::now().saturating_duration_since(self.start);
        let jumped = self.jumped_ns.load(Ordering::Relaxed);
        let by = Duration::from_nanos(jumped.unsigned_abs());
        if jumped >= 0 {
            ran + by
        } else {
            ran.checked_sub(by).unwrap_or(SystemTime::UNIX_EPOCH)
        }
    }

    /// Move the wall clock forward by `by` and not the monotonic one: a suspend of that length.
    pub fn jump(&self, by: Duration) {
        self.shift(i64::try_from(by.as_nanos()).unwrap_or(i64::MAX));
    }

    /// Move the wall clock back by `by` (an NTP step).
    pub fn step_back(&self, by: Duration) {
        self.shift(-i64::try_from(by.as_nanos()).unwrap_or(i64::MAX));
    }

    fn shift(&self, ns: i64) {
        let _ = self
            .jumped_ns
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |j| {
                Some(j.saturating_add(ns))
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_wall_clock_runs_with_tokio_and_jumps_alone() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let (clock, m) = Clock::manual(start);
        let t0 = clock.instant();
        assert_eq!(clock.wall(), start);
        tokio::time::advance(Duration::from_secs(90)).await;
        assert_eq!(clock.wall(), start + Duration::from_secs(90));
        m.jump(Duration::from_secs(3600));
        assert_eq!(clock.wall(), start + Duration::from_secs(3690));
        assert_eq!(clock.instant() - t0, Duration::from_secs(90), "a suspend");
        m.step_back(Duration::from_secs(10));
        assert_eq!(clock.wall(), start + Duration::from_secs(3680));
    }
}
