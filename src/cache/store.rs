//! The entry map and its bookkeeping: what the cache holds, and the operations every room of it
//! uses to change what it holds.
//!
//! Contract: [`Inner::put`] gives an entry the next generation and puts it in the map under the
//! `installing` lock (so an export that reads the newest generation finds every older entry in
//! the map), points its pod at it, and queues its refresh; [`Inner::evict`] removes an entry for
//! its token's fault (or moved to its pod's newer token) and logs it for a successor. The map is
//! bounded (least recently used out first), and an entry leaves by itself when its credentials
//! expire ([`ExpireWithCredentials`], on the cache's clock); its queued refresh leaves with it.
//! A served entry marks demand ([`Inner::touch`]); a dormant one asks for its refresh at once.

use super::clock::Clock;
use super::flight::Flights;
use super::negative::Rejections;
use super::policy::RefreshPolicy;
use super::{
    scheduler, CacheSettings, Demand, Entry, FlightResult, Gate, NodeRefused, Outcome,
    NODE_REFUSALS_WINDOW,
};
use crate::eks_auth::CredentialSource;
use crate::metrics::Metrics;
use crate::token::{PodKey, TokenHash};
use moka::policy::EvictionPolicy;
use moka::Expiry;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Evictions remembered for a successor.
const EVICTIONS_KEPT: usize = 10_000;

pub(super) struct Inner {
    /// The entries by token hash: bounded (LRU), each leaving by itself when its credentials or
    /// token expire ([`ExpireWithCredentials`]).
    pub(super) entries: moka::sync::Cache<TokenHash, Arc<Entry>>,
    /// The current token of each pod whose token was verified: how a rotated token finds its
    /// pod's entry. Bounded like the entries; a stale pointer just misses.
    pub(super) pods: moka::sync::Cache<PodKey, TokenHash>,
    /// Flights under way, one per token, their result shared by every request waiting on it.
    pub(super) flights: Flights<TokenHash, FlightResult>,
    /// Tokens refused a short while ago, answered without asking again.
    pub(super) rejections: Rejections,
    /// Tokens whose exchange EKS Auth refused for the node's own credentials in the last
    /// [`NODE_REFUSALS_WINDOW`]: the node alert fires on several, not on one pod's.
    pub(super) node_refusals: moka::sync::Cache<TokenHash, ()>,
    /// EKS Auth in production; fakes in tests.
    pub(super) source: Arc<dyn CredentialSource>,
    /// Verification and budgets, asked inside a request's flight.
    pub(super) gate: Arc<dyn Gate>,
    pub(super) policy: RefreshPolicy,
    /// Clock leeway on the token's times: the one value request validation also uses, so an
    /// entry never outlives the token a request would still accept.
    pub(super) leeway: Duration,
    pub(super) metrics: Arc<Metrics>,
    /// Where refresh work goes; the scheduler sees hashes and generations, never entries.
    pub(super) scheduler: scheduler::Handle<TokenHash>,
    pub(super) scheduler_health: scheduler::Health,
    /// Source of entry generations.
    pub(super) generations: AtomicU64,
    /// Held while an entry gets its generation and goes into the map, and while an export reads
    /// the newest generation: so every entry older than what an export reads is in the map.
    pub(super) installing: std::sync::Mutex<()>,
    /// Tokens evicted for their own fault, with the newest generation then: a successor learns
    /// of those evicted after the snapshot it got. Bounded to the last [`EVICTIONS_KEPT`].
    pub(super) evictions: std::sync::Mutex<std::collections::VecDeque<(u64, TokenHash)>>,
    /// Flight and refresh tasks, so shutdown can wait for them.
    pub(super) tasks: TaskTracker,
    /// Cancelled to stop refreshing (shutdown, handover).
    pub(super) stop_refreshing: CancellationToken,
    /// Cancelled to end exchanges still under way after the shutdown grace period.
    pub(super) abort: CancellationToken,
    /// Told of the node's credentials refused at a refresh, once someone listens.
    pub(super) node_refused: std::sync::OnceLock<NodeRefused>,
    /// The time every rule of the cache reads.
    pub(super) clock: Clock,
}

/// What the cache is built from, beyond its settings.
pub(super) struct Parts {
    pub(super) source: Arc<dyn CredentialSource>,
    pub(super) gate: Arc<dyn Gate>,
    pub(super) leeway: Duration,
    pub(super) metrics: Arc<Metrics>,
    pub(super) clock: Clock,
}

/// Entries leave the map when their credentials expire, by the cache's clock.
struct ExpireWithCredentials(Clock);

impl ExpireWithCredentials {
    fn left(&self, e: &Entry) -> Option<Duration> {
        Some(
            e.valid_until
                .duration_since(self.0.wall())
                .unwrap_or_default(),
        )
    }
}

impl Expiry<TokenHash, Arc<Entry>> for ExpireWithCredentials {
    fn expire_after_create(&self, _: &TokenHash, e: &Arc<Entry>, _: Instant) -> Option<Duration> {
        self.left(e)
    }

    fn expire_after_update(
        &self,
        _: &TokenHash,
        e: &Arc<Entry>,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        self.left(e)
    }
}

/// The entry map: bounded, least recently used out first, each entry leaving when its
/// credentials expire; a removed entry's queued refresh leaves with it.
fn entries(
    capacity: u64,
    scheduler: scheduler::Handle<TokenHash>,
    metrics: &Metrics,
    clock: Clock,
) -> moka::sync::Cache<TokenHash, Arc<Entry>> {
    let evicted = metrics.cache_state.with_label_values(&["evicted"]);
    moka::sync::Cache::builder()
        .max_capacity(capacity)
        .eviction_policy(EvictionPolicy::lru())
        .expire_after(ExpireWithCredentials(clock))
        .eviction_listener(move |hash: Arc<TokenHash>, entry: Arc<Entry>, cause| {
            // Queued refresh work for a removed entry goes at once. For a replaced one the
            // generation no longer matches, so this is a no-op.
            scheduler.cancel(*hash, entry.generation);
            let moved = entry.is_superseded();
            if cause != moka::notification::RemovalCause::Replaced && !moved {
                evicted.inc();
            }
        })
        .build()
}

impl Inner {
    /// An empty cache that sends its refresh work to `scheduler` (not started here).
    pub(super) fn new(
        parts: Parts,
        settings: &CacheSettings,
        scheduler: scheduler::Handle<TokenHash>,
    ) -> Inner {
        let Parts {
            source,
            gate,
            leeway,
            metrics,
            clock,
        } = parts;
        let capacity = settings.max_entries.max(1);
        metrics
            .cache_capacity
            .set(i64::try_from(capacity).unwrap_or(i64::MAX));
        Inner {
            entries: entries(capacity, scheduler.clone(), &metrics, clock.clone()),
            pods: moka::sync::Cache::builder()
                .max_capacity(capacity)
                .eviction_policy(EvictionPolicy::lru())
                .build(),
            flights: Flights::default(),
            rejections: Rejections::new(&settings.negative),
            node_refusals: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .eviction_policy(EvictionPolicy::lru())
                .time_to_live(NODE_REFUSALS_WINDOW)
                .build(),
            source,
            gate,
            policy: settings.policy,
            leeway,
            metrics,
            scheduler,
            scheduler_health: scheduler::Health::default(),
            generations: AtomicU64::new(0),
            installing: std::sync::Mutex::new(()),
            evictions: std::sync::Mutex::default(),
            tasks: TaskTracker::new(),
            stop_refreshing: CancellationToken::new(),
            abort: CancellationToken::new(),
            node_refused: std::sync::OnceLock::new(),
            clock,
        }
    }
    /// The current entry for `hash` and how to label it, if a request may be answered from it
    /// without an exchange: the hit path's rule, re-checked under the flights lock.
    pub(super) fn servable(
        &self,
        hash: &TokenHash,
        now: SystemTime,
    ) -> Option<(Arc<Entry>, Outcome)> {
        let entry = self.entries.get(hash)?;
        let outcome = entry.serve_without_exchange(now)?;
        Some((entry, outcome))
    }

    /// The entry the map holds for `hash`, if it is generation `generation`.
    pub(super) fn current(&self, hash: &TokenHash, generation: u64) -> Option<Arc<Entry>> {
        self.entries
            .get(hash)
            .filter(|e| e.generation == generation)
    }

    /// A request was served from `entry`: it is in use. A dormant entry past its refresh point
    /// asks for a refresh at once.
    pub(super) fn touch(&self, entry: &Arc<Entry>, now: SystemTime) {
        if entry.mark_used() == Demand::Dormant {
            self.scheduler.schedule(
                entry.token.hash(),
                entry.generation,
                now.max(entry.plan.refresh_at),
            );
        }
    }

    /// Make the entry of the next generation with `make` and put it in the map (replacing its
    /// token's previous one), point its pod at it, and queue its refresh.
    pub(super) fn put(&self, make: impl FnOnce(u64) -> Entry) -> Arc<Entry> {
        self.put_refreshing_after(make, SystemTime::UNIX_EPOCH)
    }

    /// [`Inner::put`], its refresh not before `not_before`.
    pub(super) fn put_refreshing_after(
        &self,
        make: impl FnOnce(u64) -> Entry,
        not_before: SystemTime,
    ) -> Arc<Entry> {
        let entry = {
            let _installing = self.installing.lock().unwrap_or_else(|p| p.into_inner());
            let generation = self
                .generations
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                + 1;
            let entry = Arc::new(make(generation));
            self.entries.insert(entry.token.hash(), entry.clone());
            entry
        };
        let hash = entry.token.hash();
        if let Some(pod) = entry.pod {
            self.pods.insert(pod, hash);
        }
        if let Some(at) = entry.next_refresh() {
            self.scheduler
                .schedule(hash, entry.generation, at.max(not_before));
        }
        entry
    }

    /// Evict `hash` (for its token's fault, or moved to its pod's newer token), remembering it
    /// for a successor.
    pub(super) fn evict(&self, hash: &TokenHash) {
        let newest = self.generations.load(std::sync::atomic::Ordering::Relaxed);
        self.entries.invalidate(hash);
        let mut log = self.evictions.lock().unwrap_or_else(|p| p.into_inner());
        if log.len() >= EVICTIONS_KEPT {
            log.pop_front();
        }
        log.push_back((newest, *hash));
    }

    /// The newest generation installed: every entry of it or older is in the map.
    pub(super) fn newest_generation(&self) -> u64 {
        let _installing = self.installing.lock().unwrap_or_else(|p| p.into_inner());
        self.generations.load(std::sync::atomic::Ordering::Relaxed)
    }
}
