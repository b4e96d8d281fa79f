//! One run of the scheduler's loop, from a start (or a restart) to the end of its inbox.
//!
//! Contract: the loop takes the earliest work that has come due (or must start early, see
//! [`Queue::next_look`]) and is still worth an exchange ([`Refresher::due`]), waits for a token
//! of the bucket and a refresh slot while it keeps reading messages (a message can replace or
//! cancel the work that waits), then starts it ([`Refresher::refresh`]) in a task of its own on
//! the tracker, which holds the slot until the refresh ends. Before it looks at the queue, and
//! before it applies a message, it catches up with a suspend ([`Clocks::catch_up`]), so work
//! overdue from before the suspend keeps its place ahead of work that arrives after it. It wakes
//! at least every [`CLOCK_CHECK`] to notice a suspend even when nothing is due.

use super::queue::Queue;
use super::suspend::{Clocks, CLOCK_CHECK};
use super::{Msg, Refresher};
use crate::bucket::TokenBucket;
use crate::cache::clock::Clock;
use futures_util::future::BoxFuture;
use std::hash::Hash;
use std::sync::Arc;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Messages handled per wake-up before the queue is looked at again.
const BATCH: usize = 1024;

/// What one run of the loop needs; shared by restarts.
pub(super) struct Ctx<R: Refresher> {
    pub(super) refresher: Arc<R>,
    pub(super) bucket: Arc<TokenBucket>,
    pub(super) slots: Arc<Semaphore>,
    pub(super) rate: f64,
    pub(super) tracker: TaskTracker,
    pub(super) stop: CancellationToken,
    pub(super) clock: Clock,
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
            clock: self.clock.clone(),
        }
    }
}

/// The inbox, borrowed by one run at a time so that it outlives a run that panics.
pub(super) type SharedInbox<K> = Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Msg<K>>>>;

/// The loop's state between wake-ups.
struct State<K> {
    queue: Queue<K>,
    clocks: Clocks,
    /// Work that came due and is waiting for budget.
    waiting: Option<(K, u64)>,
    /// Budget granted and not yet spent.
    granted: Option<OwnedSemaphorePermit>,
    acquiring: Option<BoxFuture<'static, Option<OwnedSemaphorePermit>>>,
}

impl<K: Clone + Eq + Hash> State<K> {
    /// Apply one message; drops `waiting` if it is replaced or cancelled.
    fn apply(&mut self, msg: Msg<K>) {
        match msg {
            Msg::Schedule(key, generation, at) => {
                if self.waiting.as_ref().is_some_and(|(k, _)| *k == key) {
                    self.waiting = None;
                }
                let at = self.clocks.instant_of(at);
                self.queue.schedule(key, generation, at);
            }
            Msg::Cancel(key, generation) => {
                if self
                    .waiting
                    .as_ref()
                    .is_some_and(|w| w.0 == key && w.1 == generation)
                {
                    self.waiting = None;
                }
                self.queue.cancel(&key, generation);
            }
        }
    }

    /// Unless work already waits, take the next piece that is due and still worth doing into
    /// `waiting`; returns when to look again if none is due yet.
    fn take_due<R: Refresher<Key = K>>(&mut self, ctx: &Ctx<R>) -> Option<Instant> {
        if self.waiting.is_some() {
            return None;
        }
        loop {
            let next = self.queue.next_look(ctx.rate, ctx.clock.instant());
            if next.is_none_or(|t| t > ctx.clock.instant()) {
                return next;
            }
            let (key, generation) = self.queue.pop()?;
            if ctx.refresher.due(&key, generation) {
                self.waiting = Some((key, generation));
                return None;
            }
        }
    }

    /// Start the waiting work with the granted budget, if there are both; returns whether it
    /// did something (a refresh that became moot keeps the budget for the next one).
    fn start_granted<R: Refresher<Key = K>>(&mut self, ctx: &Ctx<R>) -> bool {
        if self.waiting.is_none() || self.granted.is_none() {
            return false;
        }
        if let (Some((key, generation)), Some(slot)) = (self.waiting.take(), self.granted.take()) {
            if let Some(work) = ctx.refresher.refresh(key, generation) {
                ctx.tracker.spawn(async move {
                    work.await;
                    drop(slot);
                });
            } else {
                self.granted = Some(slot);
            }
        }
        true
    }
}

/// Take one token of the bucket, then one refresh slot.
async fn budget(bucket: Arc<TokenBucket>, slots: Arc<Semaphore>) -> Option<OwnedSemaphorePermit> {
    bucket.acquire().await;
    slots.acquire_owned().await.ok()
}

/// Run the loop until the inbox closes or `stop` is cancelled; with `resync`, first queue what
/// the refresher says is pending (a restart after a panic).
pub(super) async fn run<R: Refresher>(ctx: Ctx<R>, inbox: SharedInbox<R::Key>, resync: bool) {
    let mut rx = inbox.lock().await;
    let mut s = State {
        queue: Queue::new(),
        clocks: Clocks::new(ctx.clock.clone()),
        waiting: None,
        granted: None,
        acquiring: None,
    };
    if resync {
        for (key, generation, at) in ctx.refresher.pending() {
            let at = s.clocks.instant_of(at);
            s.queue.schedule(key, generation, at);
        }
    }
    loop {
        s.clocks.catch_up(&mut s.queue);
        let next = s.take_due(&ctx);
        if s.start_granted(&ctx) {
            continue;
        }
        if s.waiting.is_some() && s.granted.is_none() && s.acquiring.is_none() {
            s.acquiring = Some(Box::pin(budget(ctx.bucket.clone(), ctx.slots.clone())));
        }
        ctx.refresher
            .queued(s.queue.len() + usize::from(s.waiting.is_some()));
        // Also awake now and then, to notice a suspend.
        let check = ctx.clock.instant() + CLOCK_CHECK;
        let wake = next.map_or(check, |n| n.min(check));
        tokio::select! {
            msg = rx.recv() => match msg {
                Some(msg) => {
                    // A message that woke us after a suspend is made into an instant after the
                    // queue is shifted, not shifted with it.
                    s.clocks.catch_up(&mut s.queue);
                    s.apply(msg);
                    // Whatever else is waiting, before the queue is looked at again.
                    for _ in 0..BATCH {
                        let Ok(msg) = rx.try_recv() else { break };
                        s.apply(msg);
                    }
                }
                None => return,
            },
            slot = poll_some(&mut s.acquiring), if s.acquiring.is_some() => {
                s.acquiring = None;
                match slot {
                    Some(slot) => s.granted = Some(slot),
                    None => return,
                }
            }
            _ = tokio::time::sleep_until(wake) => {}
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
