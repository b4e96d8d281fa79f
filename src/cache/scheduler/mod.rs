//! The refresh-ahead scheduler: one task, one deadline-ordered queue, one token bucket.
//!
//! Contract: work is named by a key (a token hash) and a generation (which of the key's entries
//! it is for). [`Handle::schedule`] queues it for a time, replacing any work queued for the same
//! key; [`Handle::cancel`] removes it, unless newer work for the key replaced it already. So an
//! entry that is replaced or evicted leaves the queue at once, not when its deadline comes.
//!
//! Refreshes start at their deadline, or earlier when the queue holds more work than the budget
//! can do by then ([`start_at`]): earliest deadline first, never above `--max-service-qps`, and
//! never more than a bounded number at once. When work comes due the scheduler asks the
//! [`Refresher`] whether it is still worth an exchange ([`Refresher::due`], which may decide that
//! an idle entry is left to expire), then waits for budget while it keeps reading new work, then
//! starts it ([`Refresher::refresh`]) in a task of its own.
//!
//! The scheduler knows nothing of entries or exchanges. It is supervised: if its loop panics,
//! the panic is logged and counted, and after a second it restarts with the queue rebuilt from
//! [`Refresher::pending`]. After [`MAX_RESTARTS`] panics within a minute it stops for good and
//! [`Health::is_running`] turns false, which the probes report.
//!
//! Time is the cache's [`Clock`]: deadlines are tokio instants made from wall-clock times
//! ([`suspend`]), so tests and simulations move it by pausing tokio. The rooms: this module holds
//! the interface and the supervision; [`queue`] the deadline order and the early start;
//! [`suspend`] the wall-to-monotonic conversion and the catch-up after a suspend; [`run`] the
//! loop itself.

mod queue;
mod run;
mod suspend;

use super::clock::Clock;
use crate::bucket::TokenBucket;
use futures_util::future::BoxFuture;
use run::Ctx;
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Panics tolerated within [`RESTART_WINDOW`] before the scheduler gives up.
pub const MAX_RESTARTS: usize = 5;
const RESTART_WINDOW: Duration = Duration::from_secs(60);
const RESTART_DELAY: Duration = Duration::from_secs(1);

/// What the scheduler asks of the cache. Implementations must not block.
pub trait Refresher: Send + Sync + 'static {
    type Key: Clone + Eq + Hash + Send + Sync + 'static;

    /// Called once when work comes due, before any budget is spent: is it worth an exchange?
    /// `false` drops it (the entry was replaced, its token expired, or nobody used it).
    fn due(&self, key: &Self::Key, generation: u64) -> bool;

    /// Start the refresh, once budget was granted. `None` if the work became moot while waiting.
    /// The future ends when the exchange does; a refresh slot is held until then.
    fn refresh(&self, key: Self::Key, generation: u64) -> Option<BoxFuture<'static, ()>>;

    /// Everything that should be queued (key, generation, when), to rebuild the queue after a
    /// restart.
    fn pending(&self) -> Vec<(Self::Key, u64, SystemTime)>;

    /// A panic of the scheduler loop, for the metrics.
    fn panicked(&self);

    /// How much work is queued now, for the metrics; called whenever it changes.
    fn queued(&self, len: usize);
}

enum Msg<K> {
    Schedule(K, u64, SystemTime),
    Cancel(K, u64),
}

/// Where the cache sends work. Cheap to clone; sending never blocks.
pub struct Handle<K> {
    tx: mpsc::UnboundedSender<Msg<K>>,
}

impl<K> Clone for Handle<K> {
    fn clone(&self) -> Self {
        Handle {
            tx: self.tx.clone(),
        }
    }
}

impl<K> Handle<K> {
    /// Queue refresh work for `key`'s entry `generation` at `at`, replacing earlier work for `key`.
    pub fn schedule(&self, key: K, generation: u64, at: SystemTime) {
        let _ = self.tx.send(Msg::Schedule(key, generation, at));
    }

    /// Drop the work queued for `key`'s entry `generation`, if that is what is queued.
    pub fn cancel(&self, key: K, generation: u64) {
        let _ = self.tx.send(Msg::Cancel(key, generation));
    }
}

/// Whether the scheduler still runs, for the probes.
#[derive(Clone, Default)]
pub struct Health(Arc<AtomicBool>);

impl Health {
    pub fn is_running(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Limits of the scheduler.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// Refreshes per second (`--max-service-qps`).
    pub rate: f64,
    /// Refreshes under way at once.
    pub concurrency: usize,
}

/// The receiving side, until [`run`] takes it.
pub struct Inbox<K> {
    rx: mpsc::UnboundedReceiver<Msg<K>>,
}

/// A handle to send work and the inbox to start the scheduler with, once the refresher exists.
pub fn channel<K>() -> (Handle<K>, Inbox<K>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (Handle { tx }, Inbox { rx })
}

/// Start the supervised scheduler on `tracker`; it ends when every [`Handle`] is dropped or
/// `stop` is cancelled, and reports through `health` whether it runs. Refresh tasks are spawned
/// on `tracker` too, so shutdown can wait for them. Deadlines and sleeps follow `clock`.
pub fn spawn<R: Refresher>(
    refresher: Arc<R>,
    inbox: Inbox<R::Key>,
    budget: Budget,
    stop: CancellationToken,
    tracker: &TaskTracker,
    health: &Health,
    clock: Clock,
) {
    health.0.store(true, Ordering::Relaxed);
    let ctx = Ctx {
        refresher,
        bucket: Arc::new(TokenBucket::new(budget.rate)),
        slots: Arc::new(Semaphore::new(budget.concurrency.max(1))),
        rate: budget.rate,
        tracker: tracker.clone(),
        stop,
        clock,
    };
    tracker.spawn(supervise(ctx, inbox, health.clone()));
}

async fn supervise<R: Refresher>(ctx: Ctx<R>, inbox: Inbox<R::Key>, health: Health) {
    // The inbox outlives a panicking run: the loop borrows it through this mutex, whose guard
    // is released while the panic unwinds.
    let inbox = Arc::new(tokio::sync::Mutex::new(inbox.rx));
    let mut panics: Vec<Instant> = Vec::new();
    let mut resync = false;
    loop {
        let run = tokio::spawn(run::run(ctx.clone(), inbox.clone(), resync));
        match run.await {
            Ok(()) => break,
            Err(e) if e.is_panic() => {
                ctx.refresher.panicked();
                let now = ctx.clock.instant();
                panics.retain(|t| now.duration_since(*t) < RESTART_WINDOW);
                panics.push(now);
                if panics.len() >= MAX_RESTARTS {
                    tracing::error!(
                        panics = panics.len(),
                        "the refresh scheduler keeps panicking; it is stopped and the agent reports not ready"
                    );
                    break;
                }
                tracing::error!(
                    "the refresh scheduler panicked; restarting it with its queue rebuilt"
                );
                tokio::select! {
                    _ = tokio::time::sleep(RESTART_DELAY) => {}
                    _ = ctx.stop.cancelled() => break,
                }
                resync = true;
            }
            Err(_) => break,
        }
    }
    health.0.store(false, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Mutex;

    /// Records what the scheduler did; `panic_on` makes `due` panic once for that key.
    #[derive(Default)]
    struct Recorder {
        refreshed: Mutex<Vec<(u32, u64)>>,
        skip: Mutex<Vec<u32>>,
        panic_on: Mutex<Option<u32>>,
        pending: Mutex<Vec<(u32, u64, SystemTime)>>,
        panics: AtomicUsize,
        queued: AtomicUsize,
        hold: Mutex<Option<Arc<tokio::sync::Notify>>>,
    }

    impl Refresher for Recorder {
        type Key = u32;
        fn due(&self, key: &u32, _: u64) -> bool {
            if self.panic_on.lock().expect("lock").take() == Some(*key) {
                panic!("injected");
            }
            !self.skip.lock().expect("lock").contains(key)
        }
        fn refresh(&self, key: u32, generation: u64) -> Option<BoxFuture<'static, ()>> {
            self.refreshed.lock().expect("lock").push((key, generation));
            let hold = self.hold.lock().expect("lock").clone();
            Some(Box::pin(async move {
                if let Some(h) = hold {
                    h.notified().await;
                }
            }))
        }
        fn pending(&self) -> Vec<(u32, u64, SystemTime)> {
            self.pending.lock().expect("lock").clone()
        }
        fn panicked(&self) {
            self.panics.fetch_add(1, Ordering::SeqCst);
        }
        fn queued(&self, len: usize) {
            self.queued.store(len, Ordering::SeqCst);
        }
    }

    fn start(rate: f64, concurrency: usize) -> (Arc<Recorder>, Handle<u32>, Health) {
        start_on(rate, concurrency, Clock::System)
    }

    fn start_on(
        rate: f64,
        concurrency: usize,
        clock: Clock,
    ) -> (Arc<Recorder>, Handle<u32>, Health) {
        let r = Arc::new(Recorder::default());
        let (handle, inbox) = channel();
        let health = Health::default();
        spawn(
            r.clone(),
            inbox,
            Budget { rate, concurrency },
            CancellationToken::new(),
            &TaskTracker::new(),
            &health,
            clock,
        );
        (r, handle, health)
    }

    fn at(ms: u64) -> SystemTime {
        SystemTime::now() + Duration::from_millis(ms)
    }

    async fn settle(ms: u64) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn replaced_and_cancelled_work_leaves_the_queue() {
        let (r, h, _) = start(100.0, 4);
        h.schedule(1, 1, at(1000));
        h.schedule(1, 2, at(2000)); // the entry was replaced: only generation 2 remains
        h.schedule(2, 1, at(1000));
        h.cancel(2, 1); // evicted
        h.schedule(3, 1, at(1000));
        h.cancel(3, 0); // a stale cancel for an older generation changes nothing
        settle(10).await;
        assert_eq!(r.queued.load(Ordering::SeqCst), 2, "1 (generation 2) and 3");
        settle(3000).await;
        let mut got = r.refreshed.lock().expect("lock").clone();
        got.sort();
        assert_eq!(got, vec![(1, 2), (3, 1)]);
        assert_eq!(r.queued.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn work_that_is_not_due_is_dropped_without_budget() {
        let (r, h, _) = start(1.0, 4);
        r.skip.lock().expect("lock").extend([1, 2, 3]);
        for k in 1..=3 {
            h.schedule(k, 1, at(10));
        }
        h.schedule(4, 1, at(10));
        settle(100).await;
        // Three idle entries did not spend the 1/s budget: the fourth started at once.
        assert_eq!(*r.refreshed.lock().expect("lock"), vec![(4, 1)]);
    }

    #[tokio::test(start_paused = true)]
    async fn keeps_reading_work_while_waiting_for_budget() {
        // One slot, held by a refresh that does not finish: the next due work waits for budget.
        let (r, h, _) = start(100.0, 1);
        let hold = Arc::new(tokio::sync::Notify::new());
        *r.hold.lock().expect("lock") = Some(hold.clone());
        h.schedule(1, 1, at(0));
        h.schedule(2, 1, at(0));
        settle(50).await;
        assert_eq!(r.refreshed.lock().expect("lock").len(), 1);
        // While waiting, the scheduler still reads: work 2 is cancelled, work 3 arrives.
        h.cancel(2, 1);
        h.schedule(3, 1, at(0));
        settle(50).await;
        *r.hold.lock().expect("lock") = None;
        hold.notify_waiters();
        settle(100).await;
        let got = r.refreshed.lock().expect("lock").clone();
        assert_eq!(got, vec![(1, 1), (3, 1)], "2 was cancelled while it waited");
    }

    #[tokio::test(start_paused = true)]
    async fn a_panic_is_counted_and_the_queue_rebuilt() {
        let (r, h, health) = start(100.0, 4);
        *r.panic_on.lock().expect("lock") = Some(1);
        r.pending.lock().expect("lock").push((2, 7, at(1500)));
        h.schedule(1, 1, at(100));
        h.schedule(2, 7, at(1500));
        settle(500).await;
        assert_eq!(r.panics.load(Ordering::SeqCst), 1);
        // Restarted after a second with the queue rebuilt from `pending`; work sent after the
        // restart is read by the new loop.
        settle(1000).await;
        h.schedule(3, 1, at(0));
        settle(1000).await;
        let got = r.refreshed.lock().expect("lock").clone();
        assert!(got.contains(&(2, 7)) && got.contains(&(3, 1)), "{got:?}");
        assert!(health.is_running());
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_after_repeated_panics() {
        let (r, h, health) = start(100.0, 4);
        for _ in 0..MAX_RESTARTS {
            *r.panic_on.lock().expect("lock") = Some(9);
            h.schedule(9, 1, at(0));
            settle(1100).await;
        }
        assert_eq!(r.panics.load(Ordering::SeqCst), MAX_RESTARTS);
        assert!(!health.is_running());
    }

    /// Two refreshes queued for 10 minutes and an hour from now, then a two-hour suspend.
    async fn suspended_with_work_queued() -> (Arc<Recorder>, Handle<u32>, Clock) {
        let (clock, manual) = Clock::manual(SystemTime::UNIX_EPOCH + Duration::from_secs(1 << 30));
        let (r, h, _) = start_on(1.0, 1, clock.clone());
        let wall = clock.wall();
        h.schedule(1, 1, wall + Duration::from_secs(600));
        h.schedule(2, 1, wall + Duration::from_secs(3600));
        settle(10).await;
        manual.jump(Duration::from_secs(2 * 3600));
        (r, h, clock)
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_suspend_overdue_refreshes_run_before_new_work() {
        let (r, h, clock) = suspended_with_work_queued().await;
        // New work due now arrives first thing after the suspend; at 1 refresh/s the two that
        // became overdue during it still go first.
        h.schedule(3, 1, clock.wall());
        settle(2500).await;
        let got = r.refreshed.lock().expect("lock").clone();
        assert_eq!(got, vec![(1, 1), (2, 1), (3, 1)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_suspend_is_noticed_with_nothing_sent() {
        let (r, _h, _) = suspended_with_work_queued().await;
        // No message wakes the scheduler: its periodic look at the clocks does.
        tokio::time::sleep(suspend::CLOCK_CHECK + Duration::from_millis(1500)).await;
        let got = r.refreshed.lock().expect("lock").clone();
        assert_eq!(got, vec![(1, 1), (2, 1)]);
    }
}
