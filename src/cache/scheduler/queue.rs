//! The scheduler's queue: one piece of work per key, in deadline order, and when the first of it
//! must start so that all of it is done in time at the budget's rate.
//!
//! Contract: [`Queue::schedule`] replaces whatever was queued for the key; [`Queue::cancel`]
//! removes it only if it is still the given generation; [`Queue::pop`] takes the earliest
//! deadline. [`start_at`] is the latest start that refreshes every queued entry by its deadline
//! at `rate` per second; [`Queue::next_look`] is that, or a cheap lower bound of it while work is
//! far off, never later than it.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::time::Duration;
use tokio::time::Instant;

/// Entries examined at most when deciding whether to start early; beyond that many, the queue
/// is so long that starting now is right anyway.
const LOOKAHEAD: usize = 65_536;

/// Deadline-ordered queue with one piece of work per key.
pub(super) struct Queue<K> {
    pub(super) by_time: BTreeMap<(Instant, u64), (K, u64)>,
    by_key: HashMap<K, ((Instant, u64), u64)>,
    seq: u64,
}

impl<K: Clone + Eq + Hash> Queue<K> {
    pub(super) fn new() -> Self {
        Queue {
            by_time: BTreeMap::new(),
            by_key: HashMap::new(),
            seq: 0,
        }
    }

    pub(super) fn schedule(&mut self, key: K, generation: u64, at: Instant) {
        self.seq += 1;
        let slot = (at, self.seq);
        if let Some((old, _)) = self.by_key.insert(key.clone(), (slot, generation)) {
            self.by_time.remove(&old);
        }
        self.by_time.insert(slot, (key, generation));
    }

    pub(super) fn cancel(&mut self, key: &K, generation: u64) {
        if let Some(&(slot, queued)) = self.by_key.get(key) {
            if queued == generation {
                self.by_key.remove(key);
                self.by_time.remove(&slot);
            }
        }
    }

    /// Bring every deadline `by` earlier (the monotonic clock lost that much to a suspend).
    pub(super) fn shift_earlier(&mut self, by: Duration) {
        let old = std::mem::take(&mut self.by_time);
        self.by_key.clear();
        for ((at, seq), (key, generation)) in old {
            let at = at.checked_sub(by).unwrap_or(at);
            self.by_key.insert(key.clone(), ((at, seq), generation));
            self.by_time.insert((at, seq), (key, generation));
        }
    }

    pub(super) fn pop(&mut self) -> Option<(K, u64)> {
        let (_, (key, generation)) = self.by_time.pop_first()?;
        self.by_key.remove(&key);
        Some((key, generation))
    }

    pub(super) fn len(&self) -> usize {
        self.by_time.len()
    }

    pub(super) fn start_at(&self, rate: f64) -> Option<Instant> {
        start_at(self.by_time.keys().map(|k| k.0), self.len(), rate)
    }

    /// When the scheduler must next look at the queue: [`start_at`] when work is near, and
    /// otherwise a cheap lower bound of it, `first deadline - (all the queued work)` (every
    /// deadline is at least the first one), so that a queue of many far-off refreshes (a node's
    /// worth of new entries) does not cost a walk of the whole queue per message.
    pub(super) fn next_look(&self, rate: f64, now: Instant) -> Option<Instant> {
        let first = self.by_time.keys().next()?.0;
        let per = Duration::from_secs_f64(1.0 / rate.max(0.001));
        let all = per.saturating_mul(u32::try_from(self.len()).unwrap_or(u32::MAX));
        match first.checked_sub(all) {
            Some(bound) if bound > now => Some(bound),
            _ => self.start_at(rate),
        }
    }
}

/// When the first queued refresh must start so that, refreshing one after another at `rate` per
/// second in deadline order, every queued entry is refreshed by its deadline: the minimum over
/// `j` of `deadline_j - j / rate`, and never later than the first deadline. When entries created
/// together (a node restart) come due together, this starts early enough to spread them within
/// the budget instead of letting the last ones run late.
pub fn start_at(
    deadlines: impl IntoIterator<Item = Instant>,
    len: usize,
    rate: f64,
) -> Option<Instant> {
    let per = Duration::from_secs_f64(1.0 / rate.max(0.001));
    let mut best: Option<Instant> = None;
    for (j, d) in deadlines.into_iter().enumerate().take(LOOKAHEAD) {
        let work = per.saturating_mul(u32::try_from(j + 1).unwrap_or(u32::MAX));
        let latest = d.checked_sub(work).unwrap_or(d);
        best = Some(best.map_or(latest, |b| b.min(latest)));
        // Later entries cannot start earlier than `d - (all the work)`.
        let floor = d
            .checked_sub(per.saturating_mul(u32::try_from(len).unwrap_or(u32::MAX)))
            .unwrap_or(d);
        if best.is_some_and(|b| b <= floor) {
            break;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_index_follows_a_shift() {
        let t0 = Instant::now();
        let mut q: Queue<u32> = Queue::new();
        q.schedule(1, 7, t0 + Duration::from_secs(1000));
        q.schedule(2, 7, t0 + Duration::from_secs(2000));
        q.shift_earlier(Duration::from_secs(600));
        assert_eq!(
            q.by_time.keys().next().map(|k| k.0),
            Some(t0 + Duration::from_secs(400))
        );
        assert_eq!(q.pop(), Some((1, 7)));
        q.cancel(&2, 7);
        assert_eq!(q.len(), 0, "the key index follows the shift");
    }

    #[test]
    fn sparse_queue_starts_at_the_first_deadline() {
        let now = Instant::now();
        let d = [
            now + Duration::from_secs(100),
            now + Duration::from_secs(200),
        ];
        let at = start_at(d, 2, 10.0).expect("some");
        assert_eq!(
            at,
            now + Duration::from_secs(100) - Duration::from_millis(100)
        );
    }

    #[test]
    fn the_cheap_bound_never_lets_work_start_late() {
        let now = Instant::now();
        let mut q: Queue<u32> = Queue::new();
        // Far-off work: the bound answers without walking, and it is not after the exact start.
        for k in 0..5000 {
            q.schedule(
                k,
                1,
                now + Duration::from_secs(3 * 3600 + u64::from(k % 600)),
            );
        }
        let look = q.next_look(3.0, now).expect("some");
        let exact = q.start_at(3.0).expect("some");
        assert!(look <= exact && look > now, "{look:?} vs {exact:?}");
        // Near work: exact.
        q.schedule(9999, 1, now + Duration::from_secs(1));
        assert_eq!(q.next_look(3.0, now), q.start_at(3.0));
    }

    #[test]
    fn burst_starts_early_enough_to_finish_within_the_rate() {
        let now = Instant::now();
        // 10,000 entries all due in 300 s, 20 refreshes/s: 500 s of work, so start now-200 s.
        let d = vec![now + Duration::from_secs(300); 10_000];
        let at = start_at(d, 10_000, 20.0).expect("some");
        assert!(at <= now, "must already be under way");
        // 1,000 entries due in 300 s: 50 s of work; start at 250 s.
        let d = vec![now + Duration::from_secs(300); 1_000];
        let at = start_at(d, 1_000, 20.0).expect("some");
        assert_eq!(at, now + Duration::from_secs(250));
        assert_eq!(start_at(Vec::<Instant>::new(), 0, 20.0), None);
    }
}
