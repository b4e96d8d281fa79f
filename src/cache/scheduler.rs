//! The refresh-ahead scheduler: one task, one deadline-ordered queue, one token bucket.
//!
//! Refreshes start at their deadline, or earlier when the queue holds more work than the
//! budget can do by then ([`start_at`]): earliest deadline first, never above the rate.
//!
//! Contract: entries are queued with the time they are due (their refresh point, or a backoff
//! after a failed exchange). When one comes due the scheduler drops it if it was replaced or
//! evicted, marks it dormant if no request used it since it was fetched (idle entries are not
//! renewed: they expire and leave), skips it if its token has expired, and otherwise refreshes it
//! through the cache's single-flight exchange, at most `--max-service-qps` per second and a
//! bounded number at once. The queue holds weak references: it never keeps an entry alive.

use super::{Entry, Inner};
use crate::cache::bucket::TokenBucket;
use crate::cache::flight::Lookup;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;

/// Queued refreshes in deadline order; `u64` breaks ties in arrival order.
type Queue = BTreeMap<(Instant, u64), Weak<Entry>>;

/// Entries examined at most when deciding whether to start early; beyond that many, the queue
/// is so long that starting now is right anyway.
const LOOKAHEAD: usize = 65_536;

/// When the first queued refresh must start so that, refreshing one after another at `rate` per
/// second in deadline order, every queued entry is refreshed by its deadline: the minimum over
/// `j` of `deadline_j - j / rate`, and never later than the first deadline. When entries created
/// together (a node restart) come due together, this starts early enough to spread them within
/// the budget instead of letting the last ones run late.
pub(super) fn start_at(
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

/// Where the cache sends work to the scheduler.
pub(super) struct Handle {
    tx: mpsc::UnboundedSender<(SystemTime, Weak<Entry>)>,
}

impl Handle {
    pub(super) fn schedule(&self, entry: &Arc<Entry>, at: SystemTime) {
        let _ = self.tx.send((at, Arc::downgrade(entry)));
    }

    pub(super) fn refresh_now(&self, entry: &Arc<Entry>) {
        self.schedule(entry, SystemTime::now());
    }
}

/// Start the scheduler task; it ends when the cache is dropped.
pub(super) fn start(cache: Weak<Inner>, qps: f64, concurrency: usize) -> Handle {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(run(
        cache,
        rx,
        TokenBucket::new(qps),
        Arc::new(Semaphore::new(concurrency.max(1))),
        qps,
    ));
    Handle { tx }
}

fn instant_of(at: SystemTime) -> Instant {
    let now = SystemTime::now();
    Instant::now() + at.duration_since(now).unwrap_or_default()
}

async fn run(
    cache: Weak<Inner>,
    mut rx: mpsc::UnboundedReceiver<(SystemTime, Weak<Entry>)>,
    bucket: TokenBucket,
    slots: Arc<Semaphore>,
    rate: f64,
) {
    let mut queue: Queue = BTreeMap::new();
    let mut seq = 0u64;
    loop {
        let next = start_at(queue.keys().map(|k| k.0), queue.len(), rate);
        tokio::select! {
            msg = rx.recv() => match msg {
                Some((at, entry)) => {
                    seq += 1;
                    queue.insert((instant_of(at), seq), entry);
                }
                None => return,
            },
            _ = sleep_until(next), if next.is_some() => {
                while start_at(queue.keys().map(|k| k.0), queue.len(), rate).is_some_and(|t| t <= Instant::now()) {
                    let Some((_, weak)) = queue.pop_first() else { break };
                    let Some(inner) = cache.upgrade() else { return };
                    let Some(entry) = weak.upgrade() else { continue };
                    if !due_for_refresh(&inner, &entry) {
                        continue;
                    }
                    drop(inner);
                    bucket.acquire().await;
                    let Ok(slot) = slots.clone().acquire_owned().await else { return };
                    let Some(inner) = cache.upgrade() else { return };
                    // A request may have replaced the entry while we waited for the bucket.
                    if !inner.is_current(&entry) {
                        continue;
                    }
                    tokio::spawn(async move {
                        refresh(inner, entry).await;
                        drop(slot);
                    });
                }
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at).await;
    }
}

/// Decide, without spending a token of the bucket, whether a due entry is worth an exchange.
fn due_for_refresh(inner: &Inner, entry: &Arc<Entry>) -> bool {
    if !inner.is_current(entry) {
        return false;
    }
    let refreshes = &inner.metrics.refreshes;
    let now = SystemTime::now();
    if entry.token.check_time(now, inner.leeway).is_err() {
        refreshes.with_label_values(&["token_expired"]).inc();
        return false;
    }
    if !entry.used.load(Ordering::Relaxed) {
        entry.dormant.store(true, Ordering::Relaxed);
        refreshes.with_label_values(&["idle"]).inc();
        return false;
    }
    true
}

async fn refresh(inner: Arc<Inner>, entry: Arc<Entry>) {
    let hash = entry.token.hash();
    let rx = match inner.flights.join_or_start(&hash, || None::<()>) {
        Lookup::Cached(()) => return,
        Lookup::Joined(rx) => rx,
        Lookup::Started(tx, rx) => {
            tokio::spawn(inner.clone().exchange(entry.token.clone(), tx));
            rx
        }
    };
    let result = match super::flight::wait(rx).await {
        Some(Ok(_)) => "success",
        Some(Err(e)) if e.recoverable() => "recoverable_error",
        Some(Err(_)) => "irrecoverable_error",
        None => "recoverable_error",
    };
    inner.metrics.refreshes.with_label_values(&[result]).inc();
}

#[cfg(test)]
mod tests {
    use super::*;

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
