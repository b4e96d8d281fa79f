//! The node's budget of new exchanges, shared fairly between clients.
//!
//! Contract: [`NodeQueue::admit`] grants a node slot (one of `concurrency` exchanges under way,
//! and one token of a bucket of `burst` refilled at `rate`) at once while nobody waits, or else
//! queues the request behind its own client's earlier requests and waits up to `wait`. Grants go
//! round-robin across the clients that have requests waiting, one per client per round, so a
//! client with a thousand waiting requests delays one with a single request by at most one grant
//! per other waiting client. A grant whose request stopped waiting is given back (the bucket
//! token is returned, the slot released), so no budget is spent on work that did not happen. One
//! dispatcher task runs while anyone waits and ends when nobody does.

use crate::bucket::TokenBucket;
use crate::client::ClientKey;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

type Waiter = oneshot::Sender<OwnedSemaphorePermit>;

#[derive(Default)]
struct Waiting {
    by_client: HashMap<ClientKey, VecDeque<Waiter>>,
    /// Clients with requests waiting, in the order they are served next.
    ring: VecDeque<ClientKey>,
    dispatching: bool,
}

impl Waiting {
    fn push(&mut self, client: ClientKey, waiter: Waiter) {
        let queue = self.by_client.entry(client).or_default();
        if queue.is_empty() {
            self.ring.push_back(client);
        }
        queue.push_back(waiter);
    }

    /// The next waiter in round-robin order that still waits.
    fn pop(&mut self) -> Option<Waiter> {
        while let Some(client) = self.ring.pop_front() {
            let Some(queue) = self.by_client.get_mut(&client) else {
                continue;
            };
            while let Some(w) = queue.pop_front() {
                if w.is_closed() {
                    continue;
                }
                if queue.is_empty() {
                    self.by_client.remove(&client);
                } else {
                    self.ring.push_back(client);
                }
                return Some(w);
            }
            self.by_client.remove(&client);
        }
        None
    }

    fn is_empty(&self) -> bool {
        self.ring.is_empty()
    }
}

pub struct NodeQueue {
    bucket: TokenBucket,
    slots: Arc<Semaphore>,
    wait: Duration,
    waiting: Mutex<Waiting>,
}

impl NodeQueue {
    pub fn new(rate: f64, burst: u32, concurrency: usize, wait: Duration) -> Arc<NodeQueue> {
        Arc::new(NodeQueue {
            bucket: TokenBucket::with_burst(rate, burst),
            // --max-concurrent-exchanges refuses 0 where parsed; this guards library callers.
            slots: Arc::new(Semaphore::new(concurrency.clamp(1, Semaphore::MAX_PERMITS))),
            wait,
            waiting: Mutex::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A node slot for `client`, or `None` after waiting `wait` in vain.
    pub async fn admit(self: &Arc<Self>, client: ClientKey) -> Option<OwnedSemaphorePermit> {
        let rx = {
            let mut waiting = self.lock();
            if waiting.is_empty() && self.bucket.try_take().is_ok() {
                match self.slots.clone().try_acquire_owned() {
                    Ok(slot) => return Some(slot),
                    Err(_) => self.bucket.give_back(),
                }
            }
            let (tx, rx) = oneshot::channel();
            waiting.push(client, tx);
            if !waiting.dispatching {
                waiting.dispatching = true;
                tokio::spawn(self.clone().dispatch());
            }
            rx
        };
        tokio::time::timeout(self.wait, rx).await.ok()?.ok()
    }

    /// Hand out slots as budget comes, while anyone waits.
    async fn dispatch(self: Arc<Self>) {
        loop {
            if self.stop_if_idle() {
                return;
            }
            self.bucket.acquire().await;
            let Ok(mut slot) = self.slots.clone().acquire_owned().await else {
                return;
            };
            loop {
                let next = self.lock().pop();
                let Some(waiter) = next else {
                    // Everyone who waited gave up: the budget goes back.
                    self.bucket.give_back();
                    break;
                };
                match waiter.send(slot) {
                    Ok(()) => break,
                    Err(returned) => slot = returned,
                }
            }
        }
    }

    fn stop_if_idle(&self) -> bool {
        let mut waiting = self.lock();
        let idle = waiting.is_empty();
        if idle {
            waiting.dispatching = false;
        }
        idle
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    fn source(s: &str) -> ClientKey {
        ClientKey::Source(s.parse::<IpAddr>().expect("ip"))
    }

    #[tokio::test(start_paused = true)]
    async fn one_request_is_not_stuck_behind_another_clients_many() {
        // One grant a second, nothing in the bucket to start with.
        let q = NodeQueue::new(1.0, 1, 100, Duration::from_secs(30));
        let _ = q.bucket.try_take();
        let mut greedy = Vec::new();
        for _ in 0..20 {
            let q = q.clone();
            greedy.push(tokio::spawn(
                async move { q.admit(source("10.0.0.1")).await },
            ));
        }
        tokio::task::yield_now().await;
        let started = tokio::time::Instant::now();
        let lone = q.admit(source("10.0.0.2")).await;
        assert!(lone.is_some());
        // Served within the second or third grant, not after the other client's twenty.
        assert!(
            started.elapsed() <= Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        for g in greedy {
            g.abort();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_grant_nobody_takes_goes_back() {
        let q = NodeQueue::new(1.0, 1, 100, Duration::from_millis(100));
        let _ = q.bucket.try_take();
        // Gives up after 100 ms; the token that comes at 1 s is not spent on it. At 1.5 s the
        // bucket holds it (given back), where a spent one would have refilled only half.
        assert!(q.admit(source("10.0.0.1")).await.is_none());
        tokio::time::sleep(Duration::from_millis(1400)).await;
        assert!(
            q.bucket.try_take().is_ok(),
            "the unused grant was given back"
        );
    }
}
