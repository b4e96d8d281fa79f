//! Per-pod credentials: one entry per service-account token, exchanged once, refreshed ahead,
//! and found again when the pod's token rotates.
//!
//! Contract of [`CredentialCache::get`], given a token whose time claims were already checked:
//! - *hit*: a cached entry before its hard point is answered from memory, with no lock, no
//!   allocation of credentials and no await;
//! - *miss*: otherwise exactly one flight runs per token ([`flight`]), in a task of its own, so
//!   a client hanging up neither cancels it nor loses its result; every concurrent caller waits
//!   for that one result, error included (errors are not cached beyond their flight);
//! - *static stability*: when an exchange for a cached token fails recoverably, the cached
//!   credentials are served while still valid, and no new exchange is tried for that token until
//!   its backoff has passed; an irrecoverable failure (the token or association is wrong) evicts.
//!
//! The flight a miss starts first asks the [`Gate`] ([`gate`]) who the token is. A verified token
//! of a pod whose credentials are cached under an older token (kubelet rotates the pod's token
//! about daily) is answered from them with no exchange ([`Outcome::Rotated`]): the entry moves to
//! the newer token. Otherwise the gate's budgets are asked inside the flight, so requests that
//! join it never pay and one denial reaches them all, and then EKS Auth. A remembered refusal of
//! the token ([`negative`]) answers before any flight. What happens to cached credentials when an
//! exchange fails depends on whose fault it is ([`Fault`]): the token's evicts and is remembered;
//! the node's keeps the pod's valid credentials (with a warning and a metric; one a refresh met
//! is also told to whoever listens, [`NodeRefused`], since no request reports it); a transient
//! one backs off. A refusal from a request's flight carries who the token is, if it was verified.
//!
//! Entries ([`entry`]) are keyed by SHA-256 of the token, and those of verified tokens also by
//! pod; the raw token lives only inside the entry, for refresh. The map is bounded by
//! `--max-cache-size` with least-recently-used eviction, and an entry leaves by itself when its
//! credentials or its token expire. Refresh ahead of expiry is driven by demand, through one
//! deadline-ordered [`scheduler`] that sees only token hashes and entry generations
//! ([`refresh`]). The cache knows nothing of HTTP. Every flight and refresh runs on the cache's
//! own task tracker, so shutdown can stop refreshing, wait for exchanges under way, and end the
//! ones that outlive the grace period. Entries leave for a successor agent and arrive from a
//! predecessor through [`snapshot`].

pub mod entry;
mod exchange;
pub mod flight;
pub mod gate;
pub mod negative;
pub mod policy;
mod refresh;
pub mod scheduler;
pub mod snapshot;

pub use entry::{Carried, Delivery, Demand, Entry, Outcome};
pub use gate::{Caller, Denial, Gate, Open, Scope, Ticket};
pub use negative::{NegativeSettings, Refusal, Remembered};
pub use snapshot::{Exported, Imported};

use crate::eks_auth::{CredentialSource, ExchangeError};
use crate::metrics::Metrics;
use crate::token::{PodIdentity, PodKey, Token, TokenHash};
use exchange::Start;
use flight::Flights;
use moka::policy::EvictionPolicy;
use moka::Expiry;
use negative::Rejections;
use policy::RefreshPolicy;
use std::net::IpAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Evictions remembered for a successor.
const EVICTIONS_KEPT: usize = 10_000;

/// How long a token refused for the node's credentials counts towards the node alert.
pub const NODE_REFUSALS_WINDOW: Duration = Duration::from_secs(300);

/// What a flight ends with: the entry and how it was found, or why not.
type FlightResult = Result<(Arc<Entry>, Found), CacheError>;

/// How a flight found its entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Found {
    Exchanged,
    Rotated,
}

/// Why the cache could not answer a request.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CacheError {
    /// The exchange for this token failed, and nothing cached may be served instead; with who
    /// the token is, if the request's flight verified it (an Event on the pod needs no second
    /// verification).
    #[error("{0}")]
    Exchange(ExchangeError, Option<Arc<PodIdentity>>),
    /// This token was refused a short while ago; it was not asked about again.
    #[error("refused {:?} ago", .0.age())]
    Remembered(Arc<Remembered>),
    /// The gate would not let this request start an exchange.
    #[error("{0:?}")]
    Denied(Denial),
    /// The exchange this request waited for was ended by shutdown.
    #[error("the agent is shutting down; retry")]
    ShuttingDown,
}

impl From<ExchangeError> for CacheError {
    fn from(e: ExchangeError) -> Self {
        CacheError::Exchange(e, None)
    }
}

/// Told of every refusal of the node's own credentials that a refresh met (no request waits on
/// a refresh, so no request reports it): the cache does not know who listens (Events).
pub type NodeRefused = Arc<dyn Fn(&ExchangeError) + Send + Sync>;

/// Settings of the cache, from the command line.
#[derive(Debug, Clone)]
pub struct CacheSettings {
    pub max_entries: u64,
    pub policy: RefreshPolicy,
    /// `--max-service-qps`: refreshes per second, across all entries.
    pub refresh_qps: f64,
    /// Refresh exchanges under way at once.
    pub refresh_concurrency: usize,
    /// Remembered refusals (`--negative-cache-ttl`, `--negative-cache-size`).
    pub negative: NegativeSettings,
}

impl Default for CacheSettings {
    /// The reference agent's defaults: 2000 entries, renewal after at most 3 h, 3 refreshes/s;
    /// and 16 refreshes at once ([`crate::defaults`]).
    fn default() -> Self {
        use crate::defaults::*;
        CacheSettings {
            max_entries: DEFAULT_MAX_CACHE_SIZE,
            policy: RefreshPolicy {
                max_retention: DEFAULT_MAX_CREDENTIAL_RETENTION,
            },
            refresh_qps: f64::from(DEFAULT_MAX_SERVICE_QPS),
            refresh_concurrency: DEFAULT_REFRESH_CONCURRENCY,
            negative: NegativeSettings::default(),
        }
    }
}

struct Inner {
    /// The entries by token hash: bounded (LRU), each leaving by itself when its credentials or
    /// token expire ([`ExpireWithCredentials`]).
    entries: moka::sync::Cache<TokenHash, Arc<Entry>>,
    /// The current token of each pod whose token was verified: how a rotated token finds its
    /// pod's entry. Bounded like the entries; a stale pointer just misses.
    pods: moka::sync::Cache<PodKey, TokenHash>,
    /// Flights under way, one per token, their result shared by every request waiting on it.
    flights: Flights<TokenHash, FlightResult>,
    /// Tokens refused a short while ago, answered without asking again.
    rejections: Rejections,
    /// Tokens whose exchange EKS Auth refused for the node's own credentials in the last
    /// [`NODE_REFUSALS_WINDOW`]: the node alert fires on several, not on one pod's.
    node_refusals: moka::sync::Cache<TokenHash, ()>,
    /// EKS Auth in production; fakes in tests.
    source: Arc<dyn CredentialSource>,
    /// Verification and budgets, asked inside a request's flight.
    gate: Arc<dyn Gate>,
    policy: RefreshPolicy,
    /// Clock leeway on the token's times: the one value request validation also uses, so an
    /// entry never outlives the token a request would still accept.
    leeway: Duration,
    metrics: Arc<Metrics>,
    /// Where refresh work goes; the scheduler sees hashes and generations, never entries.
    scheduler: scheduler::Handle<TokenHash>,
    scheduler_health: scheduler::Health,
    /// Source of entry generations.
    generations: AtomicU64,
    /// Held while an entry gets its generation and goes into the map, and while an export reads
    /// the newest generation: so every entry older than what an export reads is in the map.
    installing: std::sync::Mutex<()>,
    /// Tokens evicted for their own fault, with the newest generation then: a successor learns
    /// of those evicted after the snapshot it got. Bounded to the last [`EVICTIONS_KEPT`].
    evictions: std::sync::Mutex<std::collections::VecDeque<(u64, TokenHash)>>,
    /// Flight and refresh tasks, so shutdown can wait for them.
    tasks: TaskTracker,
    /// Cancelled to stop refreshing (shutdown, handover).
    stop_refreshing: CancellationToken,
    /// Cancelled to end exchanges still under way after the shutdown grace period.
    abort: CancellationToken,
    /// Told of the node's credentials refused at a refresh, once someone listens.
    node_refused: std::sync::OnceLock<NodeRefused>,
}

/// The cache; cheap to clone, all clones share one map and one scheduler.
#[derive(Clone)]
pub struct CredentialCache {
    inner: Arc<Inner>,
}

struct ExpireWithCredentials;

impl ExpireWithCredentials {
    fn left(e: &Entry) -> Option<Duration> {
        Some(
            e.valid_until
                .duration_since(SystemTime::now())
                .unwrap_or_default(),
        )
    }
}

impl Expiry<TokenHash, Arc<Entry>> for ExpireWithCredentials {
    fn expire_after_create(&self, _: &TokenHash, e: &Arc<Entry>, _: Instant) -> Option<Duration> {
        Self::left(e)
    }

    fn expire_after_update(
        &self,
        _: &TokenHash,
        e: &Arc<Entry>,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Self::left(e)
    }
}

impl CredentialCache {
    /// Must be called within a Tokio runtime: it starts the refresh scheduler.
    pub fn new(
        source: Arc<dyn CredentialSource>,
        gate: Arc<dyn Gate>,
        settings: &CacheSettings,
        leeway: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        let (handle, inbox) = scheduler::channel();
        let capacity = settings.max_entries.max(1);
        metrics
            .cache_capacity
            .set(i64::try_from(capacity).unwrap_or(i64::MAX));
        let evicted = metrics.cache_state.with_label_values(&["evicted"]);
        let on_removal = handle.clone();
        let entries = moka::sync::Cache::builder()
            .max_capacity(capacity)
            .eviction_policy(EvictionPolicy::lru())
            .expire_after(ExpireWithCredentials)
            .eviction_listener(move |hash: Arc<TokenHash>, entry: Arc<Entry>, cause| {
                // Queued refresh work for a removed entry goes at once. For a replaced one the
                // generation no longer matches, so this is a no-op.
                on_removal.cancel(*hash, entry.generation);
                let moved = entry.is_superseded();
                if cause != moka::notification::RemovalCause::Replaced && !moved {
                    evicted.inc();
                }
            })
            .build();
        let tasks = TaskTracker::new();
        let stop_refreshing = CancellationToken::new();
        let inner = Arc::new(Inner {
            entries,
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
            scheduler: handle,
            scheduler_health: scheduler::Health::default(),
            generations: AtomicU64::new(0),
            installing: std::sync::Mutex::new(()),
            evictions: std::sync::Mutex::default(),
            tasks: tasks.clone(),
            stop_refreshing: stop_refreshing.clone(),
            abort: CancellationToken::new(),
            node_refused: std::sync::OnceLock::new(),
        });
        scheduler::spawn(
            Arc::new(refresh::Refresh(Arc::downgrade(&inner))),
            inbox,
            scheduler::Budget {
                rate: settings.refresh_qps,
                concurrency: settings.refresh_concurrency,
            },
            stop_refreshing,
            &tasks,
            &inner.scheduler_health,
        );
        CredentialCache { inner }
    }

    /// Tell `hook` of every refusal of the node's own credentials a refresh meets (see
    /// [`NodeRefused`]); the first hook set stays.
    pub fn on_node_refused(&self, hook: NodeRefused) {
        let _ = self.inner.node_refused.set(hook);
    }

    /// Credentials for `token`, whose time claims the caller has checked, asked for from
    /// `source` (who pays, if the token cannot say).
    pub async fn get(
        &self,
        token: &Token,
        source: IpAddr,
    ) -> Result<(Arc<Entry>, Outcome), CacheError> {
        let inner = &self.inner;
        let hash = token.hash();
        let now = SystemTime::now();
        let cached = inner.entries.get(&hash);
        if let Some(entry) = &cached {
            if let Some(outcome) = entry.serve_without_exchange(now) {
                inner.touch(entry, now);
                inner.metrics.cache_hits.inc();
                return Ok((entry.clone(), outcome));
            }
        }
        if let Some(remembered) = inner.rejections.recall(&hash) {
            return Err(CacheError::Remembered(remembered));
        }
        let start = Start::Request(source);
        let (rx, started) = match inner.start_or_join(token, || inner.servable(&hash, now), start) {
            exchange::Join::Servable((entry, outcome)) => {
                inner.touch(&entry, now);
                inner.metrics.cache_hits.inc();
                return Ok((entry, outcome));
            }
            exchange::Join::Waiting { rx, started } => (rx, started),
        };
        let Some(result) = flight::wait(rx).await else {
            return Err(if inner.abort.is_cancelled() {
                CacheError::ShuttingDown
            } else {
                ExchangeError::Unavailable("the exchange was abandoned".into()).into()
            });
        };
        let now = SystemTime::now();
        if !matches!(result, Ok((_, Found::Rotated))) {
            inner.metrics.cache_misses.inc();
        }
        let (entry, found) = match result {
            Ok(found) => found,
            // Static stability: the token's credentials, while valid, outlive a failed renewal.
            Err(CacheError::Exchange(e, pod)) if e.recoverable() => {
                return match cached.filter(|c| now < c.valid_until) {
                    Some(old) => {
                        old.mark_used();
                        Ok((old, Outcome::Stale))
                    }
                    None => Err(CacheError::Exchange(e, pod)),
                }
            }
            Err(e) => return Err(e),
        };
        if found == Found::Rotated {
            inner.metrics.cache_hits.inc();
            inner.metrics.rotated_tokens.inc();
            return Ok((entry, Outcome::Rotated));
        }
        if now >= entry.valid_until {
            return Err(ExchangeError::Unavailable(
                "the credentials stopped being valid while the request waited".into(),
            )
            .into());
        }
        entry.mark_used();
        Ok((
            entry,
            if started {
                Outcome::Miss
            } else {
                Outcome::Coalesced
            },
        ))
    }

    /// Refusals remembered now.
    pub fn remembered(&self) -> u64 {
        self.inner.rejections.len()
    }

    /// Distinct tokens EKS Auth refused for the node's own credentials in the last
    /// [`NODE_REFUSALS_WINDOW`] (pending housekeeping applied first).
    pub fn node_refused_tokens(&self) -> u64 {
        self.inner.node_refusals.run_pending_tasks();
        self.inner.node_refusals.entry_count()
    }

    /// Entries in the map, pending housekeeping applied first so the figure is exact.
    pub fn len(&self) -> u64 {
        self.inner.entries.run_pending_tasks();
        self.inner.entries.entry_count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the refresh scheduler runs (it stops for good only after repeated panics).
    pub fn scheduler_running(&self) -> bool {
        self.inner.scheduler_health.is_running()
    }

    /// Stop renewing entries; serving from memory and first exchanges go on.
    pub fn stop_refreshing(&self) {
        self.inner.stop_refreshing.cancel();
    }

    /// Wait until no exchange or refresh is under way (each is bounded by the EKS Auth deadline).
    pub async fn finish_exchanges(&self) {
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
    }

    /// End the exchanges still under way; their waiters get an error.
    pub fn abort_exchanges(&self) {
        self.inner.abort.cancel();
    }
}

impl Inner {
    /// The current entry for `hash` and how to label it, if a request may be answered from it
    /// without an exchange: the hit path's rule, re-checked under the flights lock.
    fn servable(&self, hash: &TokenHash, now: SystemTime) -> Option<(Arc<Entry>, Outcome)> {
        let entry = self.entries.get(hash)?;
        let outcome = entry.serve_without_exchange(now)?;
        Some((entry, outcome))
    }

    /// The entry the map holds for `hash`, if it is generation `generation`.
    fn current(&self, hash: &TokenHash, generation: u64) -> Option<Arc<Entry>> {
        self.entries
            .get(hash)
            .filter(|e| e.generation == generation)
    }

    /// A request was served from `entry`: it is in use. A dormant entry past its refresh point
    /// asks for a refresh at once.
    fn touch(&self, entry: &Arc<Entry>, now: SystemTime) {
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
    fn put(&self, make: impl FnOnce(u64) -> Entry) -> Arc<Entry> {
        self.put_refreshing_after(make, SystemTime::UNIX_EPOCH)
    }

    /// [`Inner::put`], its refresh not before `not_before`.
    fn put_refreshing_after(
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
    fn evict(&self, hash: &TokenHash) {
        let newest = self.generations.load(std::sync::atomic::Ordering::Relaxed);
        self.entries.invalidate(hash);
        let mut log = self.evictions.lock().unwrap_or_else(|p| p.into_inner());
        if log.len() >= EVICTIONS_KEPT {
            log.pop_front();
        }
        log.push_back((newest, *hash));
    }

    /// The newest generation installed: every entry of it or older is in the map.
    fn newest_generation(&self) -> u64 {
        let _installing = self.installing.lock().unwrap_or_else(|p| p.into_inner());
        self.generations.load(std::sync::atomic::Ordering::Relaxed)
    }
}
