//! Single-flight: at most one exchange per key at a time, its one result shared by all waiters.
//!
//! Contract: [`Flights::join_or_start`] either finds a usable cached value (checked under the
//! same lock, so a flight that just finished is never started again), joins the flight under
//! way, or starts one and hands its [`Sender`] to the caller, who runs the work in a detached task
//! and calls [`Sender::finish`]. Waiters are woken by a `watch` channel, not by polling. The
//! result, error included, lives only as long as the flight: the next caller after it starts anew.
//! The lock is held for a map operation, never across an await. A poisoned lock (a thread
//! panicked while holding it) is recovered everywhere the same way: the map is still sound,
//! since every operation on it is a single insert, get or remove.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

type Map<K, V> = Arc<Mutex<HashMap<K, watch::Receiver<Option<V>>>>>;

pub struct Flights<K, V> {
    map: Map<K, V>,
}

fn lock<K, V>(
    map: &Map<K, V>,
) -> std::sync::MutexGuard<'_, HashMap<K, watch::Receiver<Option<V>>>> {
    map.lock().unwrap_or_else(|p| p.into_inner())
}

impl<K, V> Default for Flights<K, V> {
    fn default() -> Self {
        Flights {
            map: Arc::default(),
        }
    }
}

pub enum Lookup<K: Hash + Eq, V, C> {
    Cached(C),
    Joined(watch::Receiver<Option<V>>),
    Started(Sender<K, V>, watch::Receiver<Option<V>>),
}

/// The right, and the duty, to publish a flight's result. Dropping it without finishing (the
/// task panicked or was aborted) still removes the flight, and waiters see a closed channel.
pub struct Sender<K: Hash + Eq, V> {
    key: Option<K>,
    tx: watch::Sender<Option<V>>,
    map: Map<K, V>,
}

impl<K: Hash + Eq, V> Sender<K, V> {
    /// Remove the flight, then publish: anyone arriving after removal finds the result in the
    /// cache (the caller stored it before finishing) or starts a fresh flight after an error.
    pub fn finish(mut self, value: V) {
        self.remove();
        self.tx.send_replace(Some(value));
    }

    fn remove(&mut self) {
        if let Some(key) = self.key.take() {
            lock(&self.map).remove(&key);
        }
    }
}

impl<K: Hash + Eq, V> Drop for Sender<K, V> {
    fn drop(&mut self) {
        self.remove();
    }
}

impl<K: Hash + Eq + Clone, V: Clone> Flights<K, V> {
    pub fn join_or_start<C>(&self, key: &K, cached: impl FnOnce() -> Option<C>) -> Lookup<K, V, C> {
        let mut map = lock(&self.map);
        if let Some(rx) = map.get(key) {
            return Lookup::Joined(rx.clone());
        }
        if let Some(c) = cached() {
            return Lookup::Cached(c);
        }
        let (tx, rx) = watch::channel(None);
        map.insert(key.clone(), rx.clone());
        Lookup::Started(
            Sender {
                key: Some(key.clone()),
                tx,
                map: self.map.clone(),
            },
            rx,
        )
    }

    /// Flights under way (the tests' check that every guard let go of its key).
    #[cfg(test)]
    pub fn in_flight(&self) -> usize {
        lock(&self.map).len()
    }
}

/// Wait for a flight's result; `None` if it ended without one.
pub async fn wait<V: Clone>(mut rx: watch::Receiver<Option<V>>) -> Option<V> {
    rx.wait_for(Option::is_some)
        .await
        .ok()
        .and_then(|v| v.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn concurrent_callers_share_one_flight() {
        let flights: Arc<Flights<u32, u64>> = Arc::default();
        let started = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..200 {
            let flights = flights.clone();
            let started = started.clone();
            tasks.push(tokio::spawn(async move {
                match flights.join_or_start(&7, || None::<u64>) {
                    Lookup::Cached(v) => Some(v),
                    Lookup::Joined(rx) => wait(rx).await,
                    Lookup::Started(tx, rx) => {
                        started.fetch_add(1, Ordering::SeqCst);
                        tokio::spawn(async move {
                            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                            tx.finish(42);
                        });
                        wait(rx).await
                    }
                }
            }));
        }
        for t in tasks {
            assert_eq!(t.await.ok().flatten(), Some(42));
        }
        assert_eq!(started.load(Ordering::SeqCst), 1);
        assert_eq!(flights.in_flight(), 0);
    }

    #[tokio::test]
    async fn abandoned_flight_releases_waiters() {
        let flights: Flights<u32, u64> = Flights::default();
        let Lookup::Started(tx, rx) = flights.join_or_start(&1, || None::<u64>) else {
            panic!("expected a new flight");
        };
        drop(tx);
        assert_eq!(wait(rx).await, None);
        assert!(matches!(
            flights.join_or_start(&1, || None::<u64>),
            Lookup::Started(..)
        ));
    }

    #[test]
    fn cached_value_short_circuits() {
        let flights: Flights<u32, u64> = Flights::default();
        assert!(matches!(
            flights.join_or_start(&1, || Some(5u64)),
            Lookup::Cached(5)
        ));
        assert_eq!(flights.in_flight(), 0);
    }
}
