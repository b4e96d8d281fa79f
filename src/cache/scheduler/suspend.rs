//! Wall-clock times made into the scheduler's monotonic deadlines, and the queue brought forward
//! when the node was suspended.
//!
//! Contract: work arrives with a wall-clock time (an entry's refresh point) and is queued at the
//! monotonic instant that is as far from now ([`instant_of`]). A suspend (EC2 hibernation) stops
//! the monotonic clock and not the wall clock, so every queued deadline would come late by the
//! suspend's length: [`Clocks::catch_up`] compares the two clocks since its last look and, when
//! the wall clock ran more than [`SUSPEND_FLOOR`] longer, brings every queued deadline that much
//! earlier, so refreshes that became overdue during the suspend run first, before work queued
//! after it. A wall clock stepped back (NTP) is not a suspend.

use super::queue::Queue;
use crate::cache::clock::Clock;
use std::hash::Hash;
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

/// How often, at most, the scheduler compares its clocks.
pub(super) const CLOCK_CHECK: Duration = Duration::from_secs(30);
/// A monotonic clock behind the wall clock by more than this was suspended.
const SUSPEND_FLOOR: Duration = Duration::from_secs(2);

/// The monotonic and wall clocks read together, to tell a suspend from the passage of time.
pub(super) struct Clocks {
    clock: Clock,
    instant: Instant,
    wall: SystemTime,
}

impl Clocks {
    pub(super) fn new(clock: Clock) -> Clocks {
        Clocks {
            instant: clock.instant(),
            wall: clock.wall(),
            clock,
        }
    }

    /// How much longer the wall clock ran than the monotonic one since the last look, if that
    /// is a suspend's worth; the clocks are read afresh either way.
    fn suspended(&mut self) -> Option<Duration> {
        let (instant, wall) = (self.clock.instant(), self.clock.wall());
        let lost = lost_to_suspend((self.instant, self.wall), (instant, wall));
        (self.instant, self.wall) = (instant, wall);
        lost
    }

    /// After a suspend, bring every deadline in `queue` forward by its length.
    pub(super) fn catch_up<K: Clone + Eq + Hash>(&mut self, queue: &mut Queue<K>) {
        if let Some(lost) = self.suspended() {
            tracing::info!(
                suspended_s = lost.as_secs(),
                "the node was suspended; refreshes brought forward"
            );
            queue.shift_earlier(lost);
        }
    }

    /// The monotonic instant as far from now as `at` is on the wall clock (now, if it passed).
    pub(super) fn instant_of(&self, at: SystemTime) -> Instant {
        instant_of(&self.clock, at)
    }
}

pub(super) fn instant_of(clock: &Clock, at: SystemTime) -> Instant {
    clock.instant() + at.duration_since(clock.wall()).unwrap_or_default()
}

/// Wall time that passed between `before` and `after` while the monotonic clock did not.
fn lost_to_suspend(
    before: (Instant, SystemTime),
    after: (Instant, SystemTime),
) -> Option<Duration> {
    let wall = after.1.duration_since(before.1).ok()?;
    let mono = after.0.saturating_duration_since(before.0);
    wall.checked_sub(mono).filter(|lost| *lost > SUSPEND_FLOOR)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_suspend_counts_as_lost_time() {
        let t0 = Instant::now();
        let w0 = SystemTime::now();
        let ran = |mono: u64, wall: u64| {
            (
                t0 + Duration::from_secs(mono),
                w0 + Duration::from_secs(wall),
            )
        };
        assert_eq!(lost_to_suspend((t0, w0), ran(30, 30)), None);
        assert_eq!(lost_to_suspend((t0, w0), ran(30, 31)), None, "jitter");
        assert_eq!(
            lost_to_suspend((t0, w0), ran(30, 630)),
            Some(Duration::from_secs(600))
        );
        // The wall clock stepped back (NTP): not a suspend.
        let back = (t0 + Duration::from_secs(30), w0 - Duration::from_secs(100));
        assert_eq!(lost_to_suspend((t0, w0), back), None);
    }
}
