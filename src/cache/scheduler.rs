//! The refresh-ahead scheduler: one task, one deadline-ordered queue, one token bucket.
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
use std::cmp::Ordering as CmpOrdering;
use std::collections::BinaryHeap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::SystemTime;
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;

struct Due {
    at: Instant,
    seq: u64,
    entry: Weak<Entry>,
}

impl PartialEq for Due {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Due {}
impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}
impl Ord for Due {
    /// Reversed: `BinaryHeap` is a max-heap and the earliest deadline must come out first.
    fn cmp(&self, other: &Self) -> CmpOrdering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
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
) {
    let mut queue = BinaryHeap::new();
    let mut seq = 0u64;
    loop {
        let next = queue.peek().map(|d: &Due| d.at);
        tokio::select! {
            msg = rx.recv() => match msg {
                Some((at, entry)) => {
                    seq += 1;
                    queue.push(Due { at: instant_of(at), seq, entry });
                }
                None => return,
            },
            _ = sleep_until(next), if next.is_some() => {
                while queue.peek().is_some_and(|d| d.at <= Instant::now()) {
                    let Some(due) = queue.pop() else { break };
                    let Some(inner) = cache.upgrade() else { return };
                    let Some(entry) = due.entry.upgrade() else { continue };
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
