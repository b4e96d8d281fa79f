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

use crate::bucket::TokenBucket;
use futures_util::future::BoxFuture;
use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Entries examined at most when deciding whether to start early; beyond that many, the queue
/// is so long that starting now is right anyway.
const LOOKAHEAD: usize = 65_536;
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
/// on `tracker` too, so shutdown can wait for them.
pub fn spawn<R: Refresher>(
    refresher: Arc<R>,
    inbox: Inbox<R::Key>,
    budget: Budget,
    stop: CancellationToken,
    tracker: &TaskTracker,
    health: &Health,
) {
    health.0.store(true, Ordering::Relaxed);
    let ctx = Ctx {
        refresher,
        bucket: Arc::new(TokenBucket::new(budget.rate)),
        slots: Arc::new(Semaphore::new(budget.concurrency.max(1))),
        rate: budget.rate,
        tracker: tracker.clone(),
        stop,
    };
    tracker.spawn(supervise(ctx, inbox, health.clone()));
}

/// What one run of the loop needs; shared by restarts.
struct Ctx<R: Refresher> {
    refresher: Arc<R>,
    bucket: Arc<TokenBucket>,
    slots: Arc<Semaphore>,
    rate: f64,
    tracker: TaskTracker,
    stop: CancellationToken,
}

impl<R: Refresher> Clone for Ctx<R> {
    fn clone(&self) -> Self {
        Ctx {
            refresher: self.refresher.clone(),
            bucket: self.bucket.clone(),
            slots: self.slots.clone(),
            rate: self.rate,
            tracker: self.tracker.clone(),
            stop: self.stop.clone(),
        }
    }
}

async fn supervise<R: Refresher>(ctx: Ctx<R>, inbox: Inbox<R::Key>, health: Health) {
    // The inbox outlives a panicking run: the loop borrows it through this mutex, whose guard
    // is released while the panic unwinds.
    let inbox = Arc::new(tokio::sync::Mutex::new(inbox.rx));
    let mut panics: Vec<Instant> = Vec::new();
    let mut resync = false;
    loop {
        let run = tokio::spawn(run(ctx.clone(), inbox.clone(), resync));
        match run.await {
            Ok(()) => break,
            Err(e) if e.is_panic() => {
                ctx.refresher.panicked();
                let now = Instant::now();
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

/// Deadline-ordered queue with one piece of work per key.
struct Queue<K> {
    by_time: BTreeMap<(Instant, u64), (K, u64)>,
    by_key: HashMap<K, ((Instant, u64), u64)>,
    seq: u64,
}

impl<K: Clone + Eq + Hash> Queue<K> {
    fn new() -> Self {
        Queue {
            by_time: BTreeMap::new(),
            by_key: HashMap::new(),
            seq: 0,
        }
    }

    fn schedule(&mut self, key: K, generation: u64, at: Instant) {
        self.seq += 1;
        let slot = (at, self.seq);
        if let Some((old, _)) = self.by_key.insert(key.clone(), (slot, generation)) {
            self.by_time.remove(&old);
        }
        self.by_time.insert(slot, (key, generation));
    }

    fn cancel(&mut self, key: &K, generation: u64) {
        if let Some(&(slot, queued)) = self.by_key.get(key) {
            if queued == generation {
                self.by_key.remove(key);
                self.by_time.remove(&slot);
            }
        }
    }

    /// Bring every deadline `by` earlier (the monotonic clock lost that much to a suspend).
    fn shift_earlier(&mut self, by: Duration) {
        let old = std::mem::take(&mut self.by_time);
        self.by_key.clear();
        for ((at, seq), (key, generation)) in old {
            let at = at.checked_sub(by).unwrap_or(at);
            self.by_key.insert(key.clone(), ((at, seq), generation));
            self.by_time.insert((at, seq), (key, generation));
        }
    }

    fn pop(&mut self) -> Option<(K, u64)> {
        let (_, (key, generation)) = self.by_time.pop_first()?;
        self.by_key.remove(&key);
        Some((key, generation))
    }

    fn len(&self) -> usize {
        self.by_time.len()
    }

    fn start_at(&self, rate: f64) -> Option<Instant> {
        start_at(self.by_time.keys().map(|k| k.0), self.len(), rate)
    }

    /// When the scheduler must next look at the queue: [`start_at`] when work is near, and
    /// otherwise a cheap lower bound of it, `first deadline - (all the queued work)` (every
    /// deadline is at least the first one), so that a queue of many far-off refreshes (a node's
    /// worth of new entries) does not cost a walk of the whole queue per message.
    fn next_look(&self, rate: f64, now: Instant) -> Option<Instant> {
        let first = self.by_time.keys().next()?.0;
        let per = Duration::from_secs_f64(1.0 / rate.max(0.001));
        let all = per.saturating_mul(u32::try_from(self.len()).unwrap_or(u32::MAX));
        match first.checked_sub(all) {
            Some(bound) if bound > now => Some(bound),
            _ => self.start_at(rate),
        }
    }
}

/// How often, at most, the scheduler compares its clocks.
const CLOCK_CHECK: Duration = Duration::from_secs(30);
/// A monotonic clock behind the wall clock by more than this was suspended.
const SUSPEND_FLOOR: Duration = Duration::from_secs(2);

/// The monotonic and wall clocks read together, to tell a suspend from the passage of time.
struct Clocks {
    instant: Instant,
    wall: SystemTime,
}

impl Clocks {
    fn now() -> Clocks {
        Clocks {
            instant: Instant::now(),
            wall: SystemTime::now(),
        }
    }

    /// How much longer the wall clock ran than the monotonic one since the last look, if that
    /// is a suspend's worth; the clocks are read afresh either way.
    fn suspended(&mut self) -> Option<Duration> {
        let now = Clocks::now();
        let lost = lost_to_suspend(self, &now);
        *self = now;
        lost
    }
}

/// Wall time that passed between `before` and `after` while the monotonic clock did not.
fn lost_to_suspend(before: &Clocks, after: &Clocks) -> Option<Duration> {
    let wall = after.wall.duration_since(before.wall).ok()?;
    let mono = after.instant.saturating_duration_since(before.instant);
    wall.checked_sub(mono).filter(|lost| *lost > SUSPEND_FLOOR)
}

/// Deadlines are monotonic instants made from wall-clock times; a suspend (EC2 hibernation)
/// stops the monotonic clock, so the queued ones would all come late by its length.
fn catch_up_after_suspend<K: Clone + Eq + Hash>(clocks: &mut Clocks, queue: &mut Queue<K>) {
    if let Some(lost) = clocks.suspended() {
        tracing::info!(
            suspended_s = lost.as_secs(),
            "the node was suspended; refreshes brought forward"
        );
        queue.shift_earlier(lost);
    }
}

/// Messages handled per wake-up before the queue is looked at again.
const BATCH: usize = 1024;

/// Apply one message; drops `waiting` if it is replaced or cancelled.
fn apply<K: Clone + Eq + Hash>(queue: &mut Queue<K>, waiting: &mut Option<(K, u64)>, msg: Msg<K>) {
    match msg {
        Msg::Schedule(key, generation, at) => {
            if waiting.as_ref().is_some_and(|(k, _)| *k == key) {
                *waiting = None;
            }
            queue.schedule(key, generation, instant_of(at));
        }
        Msg::Cancel(key, generation) => {
            if waiting
                .as_ref()
                .is_some_and(|w| w.0 == key && w.1 == generation)
            {
                *waiting = None;
            }
            queue.cancel(&key, generation);
        }
    }
}

fn instant_of(at: SystemTime) -> Instant {
    Instant::now() + at.duration_since(SystemTime::now()).unwrap_or_default()
}

/// Take one token of the bucket, then one refresh slot.
async fn budget(bucket: Arc<TokenBucket>, slots: Arc<Semaphore>) -> Option<OwnedSemaphorePermit> {
    bucket.acquire().await;
    slots.acquire_owned().await.ok()
}

async fn run<R: Refresher>(
    ctx: Ctx<R>,
    inbox: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Msg<R::Key>>>>,
    resync: bool,
) {
    let mut rx = inbox.lock().await;
    let mut queue = Queue::new();
    if resync {
        for (key, generation, at) in ctx.refresher.pending() {
            queue.schedule(key, generation, instant_of(at));
        }
    }
    // Work that came due and is waiting for budget, and budget waiting for work.
    let mut waiting: Option<(R::Key, u64)> = None;
    let mut granted: Option<OwnedSemaphorePermit> = None;
    let mut acquiring: Option<BoxFuture<'static, Option<OwnedSemaphorePermit>>> = None;
    let mut clocks = Clocks::now();
    loop {
        catch_up_after_suspend(&mut clocks, &mut queue);
        let mut next = None;
        if waiting.is_none() {
            // Take the next piece of work that is due and still worth doing.
            loop {
                next = queue.next_look(ctx.rate, Instant::now());
                if next.is_none_or(|t| t > Instant::now()) {
                    break;
                }
                let Some((key, generation)) = queue.pop() else {
                    break;
                };
                if ctx.refresher.due(&key, generation) {
                    waiting = Some((key, generation));
                    next = None;
                    break;
                }
            }
        }
        if waiting.is_some() && granted.is_some() {
            if let (Some((key, generation)), Some(slot)) = (waiting.take(), granted.take()) {
                if let Some(work) = ctx.refresher.refresh(key, generation) {
                    ctx.tracker.spawn(async move {
                        work.await;
                        drop(slot);
                    });
                } else {
                    // Moot by now: keep the budget for the next one.
                    granted = Some(slot);
                }
            }
            continue;
        }
        if waiting.is_some() && granted.is_none() && acquiring.is_none() {
            acquiring = Some(Box::pin(budget(ctx.bucket.clone(), ctx.slots.clone())));
        }
        ctx.refresher
            .queued(queue.len() + usize::from(waiting.is_some()));
        tokio::select! {
            msg = rx.recv() => match msg {
                Some(msg) => {
                    // A message that woke us after a suspend is made into an instant after the
                    // queue is shifted, not shifted with it.
                    catch_up_after_suspend(&mut clocks, &mut queue);
                    apply(&mut queue, &mut waiting, msg);
                    // Whatever else is waiting, before the queue is looked at again.
                    for _ in 0..BATCH {
                        let Ok(msg) = rx.try_recv() else { break };
                        apply(&mut queue, &mut waiting, msg);
                    }
                }
                None => return,
            },
            slot = poll_some(&mut acquiring), if acquiring.is_some() => {
                acquiring = None;
                match slot {
                    Some(slot) => granted = Some(slot),
                    None => return,
                }
            }
            // Also awake now and then, to notice a suspend.
            _ = tokio::time::sleep_until(next.map_or(Instant::now() + CLOCK_CHECK, |n| n.min(Instant::now() + CLOCK_CHECK))) => {}
            _ = ctx.stop.cancelled() => return,
        }
    }
}

/// The future in `f`, or never if there is none (the `select!` guard keeps that from happening).
async fn poll_some<T>(f: &mut Option<BoxFuture<'static, T>>) -> T {
    match f {
        Some(f) => f.await,
        None => std::future::pending().await,
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
    use std::sync::atomic::AtomicUsize;
    use std::sync::Mutex;

    #[test]
    fn a_suspend_brings_the_queue_forward_and_nothing_else_does() {
        let t0 = Instant::now();
        let w0 = SystemTime::now();
        let before = Clocks {
            instant: t0,
            wall: w0,
        };
        let ran = |mono: u64, wall: u64| Clocks {
            instant: t0 + Duration::from_secs(mono),
            wall: w0 + Duration::from_secs(wall),
        };
        assert_eq!(lost_to_suspend(&before, &ran(30, 30)), None);
        assert_eq!(lost_to_suspend(&before, &ran(30, 31)), None, "jitter");
        assert_eq!(
            lost_to_suspend(&before, &ran(30, 630)),
            Some(Duration::from_secs(600))
        );
        // The wall clock stepped back (NTP): not a suspend.
        let back = Clocks {
            instant: t0 + Duration::from_secs(30),
            wall: w0 - Duration::from_secs(100),
        };
        assert_eq!(lost_to_suspend(&before, &back), None);
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
}
