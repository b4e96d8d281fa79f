//! Small things several rooms need: "say this at most every N", milliseconds since the epoch,
//! and keeping the process's memory out of core dumps.
//!
//! Contract: [`LogEvery::due`] answers `Some(suppressed)` at most once per period (the first
//! call included), with how many calls since the last `Some` were told no, so a warning can say
//! how many it stands for; it is safe to call from many threads at once and never blocks on I/O.
//! Time is tokio's, so tests that pause time control it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;

/// Rate-limits a log line.
pub struct LogEvery {
    every: Duration,
    last: Mutex<Option<Instant>>,
    suppressed: AtomicU64,
}

impl LogEvery {
    pub const fn new(every: Duration) -> LogEvery {
        LogEvery {
            every,
            last: Mutex::new(None),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(calls suppressed since the last Some)` if the period has passed; else `None`.
    pub fn due(&self) -> Option<u64> {
        let now = Instant::now();
        let due = {
            let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
            let due = last.is_none_or(|t| now.duration_since(t) >= self.every);
            if due {
                *last = Some(now);
            }
            due
        };
        if due {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// At most `max` characters of `text` (then `...`): text a peer chose, before it is logged.
pub fn cut(mut text: String, max: usize) -> String {
    if let Some((at, _)) = text.char_indices().nth(max) {
        text.truncate(at);
        text.push_str("...");
    }
    text
}

/// Mark the process not dumpable (`PR_SET_DUMPABLE` 0): a crash writes no core file, which
/// would hold every pod's token and credentials (the node's `core_pattern` may send cores to
/// disk), and processes of the same user cannot attach to it or read its memory through `/proc`.
/// Returns whether it took.
pub fn no_core_dumps() -> bool {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: prctl with PR_SET_DUMPABLE takes plain integers and touches no memory.
        unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) == 0 }
    }
    #[cfg(not(target_os = "linux"))]
    {
        false
    }
}

/// Milliseconds since the epoch (0 before it).
pub fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The time `ms` milliseconds after the epoch.
pub fn from_millis(ms: u64) -> SystemTime {
    UNIX_EPOCH
        .checked_add(Duration::from_millis(ms))
        .unwrap_or(UNIX_EPOCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn once_per_period_counting_the_rest() {
        let l = LogEvery::new(Duration::from_secs(10));
        assert_eq!(l.due(), Some(0));
        assert_eq!(l.due(), None);
        assert_eq!(l.due(), None);
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(l.due(), Some(2));
        assert_eq!(l.due(), None);
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn the_process_stops_being_dumpable() {
        assert!(no_core_dumps());
        // SAFETY: PR_GET_DUMPABLE reads a flag.
        assert_eq!(unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) }, 0);
    }

    #[test]
    fn millis_round_trip_and_saturate() {
        let t = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        assert_eq!(from_millis(millis(t)), t);
        assert_eq!(millis(UNIX_EPOCH - Duration::from_secs(1)), 0);
        assert!(from_millis(u64::MAX) >= UNIX_EPOCH);
    }

    #[test]
    fn text_a_peer_chose_is_kept_short_on_a_character_boundary() {
        let refusal = "no protocol in common (this agent speaks 4 to 4, the peer 5 to 6)";
        assert_eq!(cut(refusal.to_owned(), 160), refusal);
        let long = cut("é".repeat(10_000), 160);
        assert_eq!(long.chars().count(), 160 + 3);
        assert!(long.ends_with("..."));
    }
}
