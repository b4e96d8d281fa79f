//! Per-pod credentials: one entry per service-account token, exchanged once, refreshed ahead.
//!
//! Contract of [`CredentialCache::get`], given a token whose time claims were already checked:
//! - *hit*: a cached entry before its hard point is answered from memory, with no lock, no
//!   allocation of credentials and no await;
//! - *miss*: otherwise exactly one exchange runs per token ([`flight`]), in a task of its own, so
//!   a client hanging up neither cancels it nor loses its result; every concurrent caller waits
//!   for that one result, error included (errors are not cached beyond their flight);
//! - *static stability*: when an exchange for a cached token fails recoverably, the cached
//!   credentials are served while still valid, and no new exchange is tried for that token until
//!   its backoff has passed; an irrecoverable failure (the token or association is wrong) evicts.
//!
//! Entries ([`entry`]) are keyed by SHA-256 of the token; the raw token lives only inside the
//! entry, for refresh. The map is bounded by `--max-cache-size` with least-recently-used
//! eviction, and an entry leaves by itself when its credentials or its token expire. Refresh
//! ahead of expiry is driven by demand, through one deadline-ordered [`scheduler`] that sees
//! only token hashes and entry generations. The cache knows nothing of HTTP.
//!
//! Before a request may start an exchange, two things are asked, in this order, and nothing
//! else on the request path is limited: a remembered refusal of the token ([`negative`])
//! answers at once; then the caller's [`Gate`] (per-client budgets, local verification) may
//! admit it, hold it back or refuse it. Hits and requests that join an exchange already under
//! way never ask the gate. What happens to cached credentials when an exchange fails depends
//! on whose fault it is ([`Fault`]): the token's evicts and is remembered; the node's keeps the
//! pod's valid credentials (with a warning and a metric); a transient one backs off.
//!
//! Every exchange and refresh runs on the cache's own task tracker, so shutdown can stop
//! refreshing, wait for exchanges under way, and end the ones that outlive the grace period.

pub mod entry;
pub mod flight;
pub mod negative;
pub mod policy;
pub mod scheduler;

pub use entry::{Carried, Demand, Entry, Outcome};
pub use negative::{NegativeSettings, Refusal, Remembered};

use crate::audit::{self, Trigger};
use crate::eks_auth::{CredentialSource, ExchangeError, Fault, Fetched};
use crate::metrics::Metrics;
use crate::token::{Token, TokenHash};
use flight::{Flights, Lookup};
use futures_util::future::BoxFuture;
use moka::policy::EvictionPolicy;
use moka::Expiry;
use negative::Rejections;
use policy::RefreshPolicy;
use std::future::Future;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

type FlightResult = Result<Arc<Entry>, ExchangeError>;

/// Why the cache could not answer a request.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CacheError {
    /// The exchange for this token failed, and nothing cached may be served instead.
    #[error(transparent)]
    Exchange(#[from] ExchangeError),
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

/// A cached entry leaving for a successor agent, or arriving from a predecessor: all it takes to
/// serve it and keep refreshing it. It holds a token and credentials: deliberately no `Debug`.
pub struct Exported {
    /// The pod's token, as it sent it.
    pub token: String,
    /// The credentials body, exactly as served.
    pub body: String,
    pub plan: policy::Plan,
    pub valid_until: SystemTime,
    pub state: Carried,
}

/// What an import made of a predecessor's entries.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Imported {
    pub installed: usize,
    /// Entries this cache already had as fresh or fresher.
    pub kept_ours: usize,
    /// Entries no longer usable (expired, or unreadable).
    pub refused: usize,
}

/// Decides whether a request may start a new exchange. Asked only on a miss, when no exchange
/// for the token is under way and no refusal of it is remembered; it may wait (for a shared
/// budget) but should not wait long.
pub trait Gate: Sync {
    fn admit(&self, token: &Token) -> impl Future<Output = Result<Ticket, Denial>> + Send;

    /// The address of the client asking, for the audit line of the exchange it starts.
    fn client(&self) -> Option<IpAddr> {
        None
    }
}

/// What a gate wants held for as long as the exchange it admitted runs (budget slots): the
/// exchange's task owns it, so a client hanging up does not free its slot early.
pub struct Ticket(#[allow(dead_code)] Option<Box<dyn Send + Sync>>);

impl Ticket {
    /// Nothing to hold.
    pub fn free() -> Ticket {
        Ticket(None)
    }

    pub fn holding(held: impl Send + Sync + 'static) -> Ticket {
        Ticket(Some(Box::new(held)))
    }
}

/// Who is over a budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The client that sent the request (its source address).
    Client,
    /// The node as a whole.
    Node,
}

/// Why a gate refused to start an exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    /// Over a budget: try again after `retry_after`. Not remembered.
    Busy { scope: Scope, retry_after: Duration },
    /// The token failed verification: remembered like an EKS Auth rejection of the token.
    Invalid(String),
}

/// A gate that admits every request: for callers with no budgets (benchmarks, tests).
pub struct Open;

impl Gate for Open {
    #[allow(clippy::manual_async_fn)]
    fn admit(&self, _: &Token) -> impl Future<Output = Result<Ticket, Denial>> + Send {
        async { Ok(Ticket::free()) }
    }
}

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
    /// and 16 refreshes at once.
    fn default() -> Self {
        CacheSettings {
            max_entries: 2000,
            policy: RefreshPolicy {
                max_retention: Duration::from_secs(3 * 3600),
            },
            refresh_qps: 3.0,
            refresh_concurrency: 16,
            negative: NegativeSettings::default(),
        }
    }
}

struct Inner {
    /// The entries by token hash: bounded (LRU), each leaving by itself when its credentials or
    /// token expire ([`ExpireWithCredentials`]).
    entries: moka::sync::Cache<TokenHash, Arc<Entry>>,
    /// Exchanges under way, one per token, their result shared by every request waiting on it.
    flights: Flights<TokenHash, FlightResult>,
    /// Tokens refused a short while ago, answered without asking again.
    rejections: Rejections,
    /// EKS Auth in production; fakes in tests.
    source: Arc<dyn CredentialSource>,
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
    /// Exchange and refresh tasks, so shutdown can wait for them.
    tasks: TaskTracker,
    /// Cancelled to stop refreshing (shutdown, handover).
    stop_refreshing: CancellationToken,
    /// Cancelled to end exchanges still under way after the shutdown grace period.
    abort: CancellationToken,
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

/// What `start_or_join` found.
enum Join<C> {
    /// A request may be answered from the cache after all (checked under the flights lock).
    Servable(C),
    /// Wait for the flight; `started` if this caller started it.
    Waiting {
        rx: tokio::sync::watch::Receiver<Option<FlightResult>>,
        started: bool,
    },
}

impl CredentialCache {
    /// Must be called within a Tokio runtime: it starts the refresh scheduler.
    pub fn new(
        source: Arc<dyn CredentialSource>,
        settings: &CacheSettings,
        leeway: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        let (handle, inbox) = scheduler::channel();
        metrics
            .cache_capacity
            .set(i64::try_from(settings.max_entries.max(1)).unwrap_or(i64::MAX));
        let evicted = metrics.cache_state.with_label_values(&["evicted"]);
        let on_removal = handle.clone();
        let entries = moka::sync::Cache::builder()
            .max_capacity(settings.max_entries.max(1))
            .eviction_policy(EvictionPolicy::lru())
            .expire_after(ExpireWithCredentials)
            .eviction_listener(move |hash: Arc<TokenHash>, entry: Arc<Entry>, cause| {
                // Queued refresh work for a removed entry goes at once. For a replaced one the
                // generation no longer matches, so this is a no-op.
                on_removal.cancel(*hash, entry.generation);
                if cause != moka::notification::RemovalCause::Replaced {
                    evicted.inc();
                }
            })
            .build();
        let tasks = TaskTracker::new();
        let stop_refreshing = CancellationToken::new();
        let inner = Arc::new(Inner {
            entries,
            flights: Flights::default(),
            rejections: Rejections::new(&settings.negative),
            source,
            policy: settings.policy,
            leeway,
            metrics,
            scheduler: handle,
            scheduler_health: scheduler::Health::default(),
            generations: AtomicU64::new(0),
            tasks: tasks.clone(),
            stop_refreshing: stop_refreshing.clone(),
            abort: CancellationToken::new(),
        });
        scheduler::spawn(
            Arc::new(Refresh(Arc::downgrade(&inner))),
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

    /// Credentials for `token`, whose time claims the caller has checked. `gate` is asked only
    /// if this request would start a new exchange.
    pub async fn get<G: Gate>(
        &self,
        token: &Token,
        gate: &G,
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
        let (rx, started) = match inner.flights.join(&hash) {
            Some(rx) => (rx, false),
            None => {
                let ticket = match gate.admit(token).await {
                    Ok(ticket) => ticket,
                    Err(Denial::Invalid(why)) => {
                        inner
                            .rejections
                            .remember(hash, Refusal::Unverified(why.clone()));
                        return Err(CacheError::Denied(Denial::Invalid(why)));
                    }
                    Err(busy) => return Err(CacheError::Denied(busy)),
                };
                let now = SystemTime::now();
                let trigger = Trigger::Request(gate.client());
                match inner.start_or_join(token, || inner.servable(&hash, now), ticket, trigger) {
                    Join::Servable((entry, outcome)) => {
                        inner.touch(&entry, now);
                        inner.metrics.cache_hits.inc();
                        return Ok((entry, outcome));
                    }
                    Join::Waiting { rx, started } => (rx, started),
                }
            }
        };
        inner.metrics.cache_misses.inc();
        let Some(result) = flight::wait(rx).await else {
            return Err(if inner.abort.is_cancelled() {
                CacheError::ShuttingDown
            } else {
                ExchangeError::Unavailable("the exchange was abandoned".into()).into()
            });
        };
        let now = SystemTime::now();
        match result {
            Ok(entry) if now < entry.valid_until => {
                entry.mark_used();
                let outcome = if started {
                    Outcome::Miss
                } else {
                    Outcome::Coalesced
                };
                Ok((entry, outcome))
            }
            Ok(_) => Err(ExchangeError::Unavailable(
                "the credentials stopped being valid while the request waited".into(),
            )
            .into()),
            Err(e) if e.recoverable() => match cached.filter(|c| now < c.valid_until) {
                Some(old) => {
                    old.mark_used();
                    Ok((old, Outcome::Stale))
                }
                None => Err(e.into()),
            },
            Err(e) => Err(e.into()),
        }
    }

    /// Refusals remembered now.
    pub fn remembered(&self) -> u64 {
        self.inner.rejections.len()
    }

    /// Every entry made or renewed after generation `since` (0: all), and the newest generation
    /// now, so a later call can ask for what changed since this one.
    pub fn export(&self, since: u64) -> (Vec<Exported>, u64) {
        let newest = self.inner.generations.load(Ordering::Relaxed);
        let now = SystemTime::now();
        let entries = self
            .inner
            .entries
            .iter()
            .filter(|(_, e)| e.generation > since && now < e.valid_until)
            .filter_map(|(_, e)| {
                Some(Exported {
                    token: e.token.raw().to_owned(),
                    body: std::str::from_utf8(e.credentials().body()).ok()?.to_owned(),
                    plan: e.plan,
                    valid_until: e.valid_until,
                    state: e.carried(),
                })
            })
            .collect();
        (entries, newest)
    }

    /// Install a predecessor's entries, each checked as if it had just been fetched (token
    /// parses and is within its time, credentials complete and unexpired), and queue their
    /// refreshes. An entry this cache already has with credentials lasting as long or longer
    /// is left alone.
    pub fn import(&self, entries: Vec<Exported>) -> Imported {
        let inner = &self.inner;
        let now = SystemTime::now();
        let mut out = Imported::default();
        for x in entries {
            let Ok(token) = Token::parse(x.token.as_bytes()) else {
                out.refused += 1;
                continue;
            };
            if token.check_time(now, inner.leeway).is_err() {
                out.refused += 1;
                continue;
            }
            let Ok(credentials) = crate::credentials::Credentials::restore(&x.body, now) else {
                out.refused += 1;
                continue;
            };
            let hash = token.hash();
            if inner
                .entries
                .get(&hash)
                .is_some_and(|ours| ours.credentials().expiration() >= credentials.expiration())
            {
                out.kept_ours += 1;
                continue;
            }
            let valid_until = x
                .valid_until
                .min(credentials.expiration())
                .min(token.expires_at(inner.leeway));
            let generation = inner.generations.fetch_add(1, Ordering::Relaxed) + 1;
            let entry = Arc::new(Entry::restored(
                token,
                credentials,
                x.plan,
                valid_until,
                generation,
                x.state,
            ));
            inner.entries.insert(hash, entry.clone());
            if let Some(at) = entry.next_refresh() {
                inner.scheduler.schedule(hash, generation, at.max(now));
            }
            out.installed += 1;
        }
        out
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

    /// Join the exchange under way for `token`, or start one in a task of its own that holds
    /// `ticket` until it ends; unless `servable` (called under the flights lock) finds that
    /// none is needed.
    fn start_or_join<C>(
        self: &Arc<Self>,
        token: &Token,
        servable: impl FnOnce() -> Option<C>,
        ticket: Ticket,
        trigger: Trigger,
    ) -> Join<C> {
        match self.flights.join_or_start(&token.hash(), servable) {
            Lookup::Cached(c) => Join::Servable(c),
            Lookup::Joined(rx) => Join::Waiting { rx, started: false },
            Lookup::Started(tx, rx) => {
                let inner = self.clone();
                let token = token.clone();
                self.tasks.spawn(async move {
                    let _ticket = ticket;
                    let abort = inner.abort.clone();
                    tokio::select! {
                        result = inner.exchange(&token, trigger) => tx.finish(result),
                        // Dropping `tx` unfinished tells the waiters the flight was abandoned.
                        _ = abort.cancelled() => {}
                    }
                });
                Join::Waiting { rx, started: true }
            }
        }
    }

    /// One exchange: fetch and build the entry, then install it or apply the failure policy.
    async fn exchange(&self, token: &Token, trigger: Trigger) -> FlightResult {
        match self.fetch_entry(token, trigger).await {
            Ok(entry) => Ok(self.install(entry)),
            Err(e) => {
                self.apply_failure(token, &e);
                Err(e)
            }
        }
    }

    /// Ask EKS Auth, and turn its answer into an entry with its refresh plan.
    async fn fetch_entry(&self, token: &Token, trigger: Trigger) -> Result<Entry, ExchangeError> {
        let m = &self.metrics;
        let result = {
            let _in_flight = m.eks_auth_in_flight_guard();
            let started = Instant::now();
            let result = self.source.fetch(token).await;
            m.eks_auth_duration.observe(started.elapsed().as_secs_f64());
            result
        };
        let code = match &result {
            Ok(_) => "Success",
            Err(e) => e.code(),
        };
        m.eks_auth_calls.with_label_values(&[code]).inc();
        let Fetched {
            credentials,
            identity,
        } = match result {
            Ok(fetched) => fetched,
            Err(e) => {
                audit::exchange(token, trigger, Err(&e));
                return Err(e);
            }
        };
        audit::exchange(token, trigger, Ok((&identity, &credentials)));
        let plan = self
            .policy
            .plan(SystemTime::now(), credentials.expiration());
        let valid_until = credentials.expiration().min(token.expires_at(self.leeway));
        let generation = self.generations.fetch_add(1, Ordering::Relaxed) + 1;
        Ok(Entry::new(
            token.clone(),
            credentials,
            plan,
            valid_until,
            generation,
        ))
    }

    /// Put a fresh entry in the map, replacing the token's previous one, and queue its refresh.
    fn install(&self, entry: Entry) -> Arc<Entry> {
        let hash = entry.token.hash();
        let entry = Arc::new(entry);
        self.entries.insert(hash, entry.clone());
        self.scheduler
            .schedule(hash, entry.generation, entry.plan.refresh_at);
        tracing::debug!(token = %hash, access_key_id = entry.credentials().access_key_id(),
            expires = %crate::credentials::format_expiration(entry.credentials().expiration()),
            "exchanged token for credentials");
        entry
    }

    /// A failed exchange. The token's fault evicts its entry and is remembered; the node's
    /// fault or a transient one backs the entry off (it keeps being served while valid, and is
    /// retried then), and the node's fault is remembered briefly too.
    fn apply_failure(&self, token: &Token, e: &ExchangeError) {
        let hash = token.hash();
        let fault = e.fault();
        let kind = if e.recoverable() {
            "Recoverable"
        } else {
            "NonRecoverable"
        };
        self.metrics
            .cache_errors
            .with_label_values(&[kind, e.code()])
            .inc();
        let current = self.entries.get(&hash);
        match (fault, &current) {
            (Fault::Token, Some(_)) => self.entries.invalidate(&hash),
            (_, Some(entry)) => {
                let retry_at = entry.back_off(SystemTime::now());
                if retry_at < entry.valid_until {
                    self.scheduler.schedule(hash, entry.generation, retry_at);
                }
            }
            (_, None) => {}
        }
        self.rejections.remember(hash, Refusal::Upstream(e.clone()));
        let s = token.subject();
        if fault == Fault::Node {
            self.metrics
                .node_refused
                .with_label_values(&[e.code()])
                .inc();
            tracing::warn!(token = %hash, namespace = %s.namespace, service_account = %s.service_account,
                code = e.code(), error = %e, kept_cached_credentials = current.is_some(),
                "EKS Auth refused the node's own credentials; pods keep their cached credentials");
        } else {
            tracing::warn!(token = %hash, namespace = %s.namespace, service_account = %s.service_account,
                code = e.code(), fault = fault.as_str(), error = %e, "EKS Auth exchange failed");
        }
    }
}

/// The cache as the scheduler sees it. Weak, so the scheduler never keeps the cache alive.
struct Refresh(Weak<Inner>);

impl scheduler::Refresher for Refresh {
    type Key = TokenHash;

    fn due(&self, hash: &TokenHash, generation: u64) -> bool {
        let Some(inner) = self.0.upgrade() else {
            return false;
        };
        let Some(entry) = inner.current(hash, generation) else {
            return false;
        };
        let refreshes = &inner.metrics.refreshes;
        if entry
            .token
            .check_time(SystemTime::now(), inner.leeway)
            .is_err()
        {
            refreshes.with_label_values(&["token_expired"]).inc();
            return false;
        }
        if !entry.claim_for_refresh() {
            refreshes.with_label_values(&["idle"]).inc();
            return false;
        }
        true
    }

    fn refresh(&self, hash: TokenHash, generation: u64) -> Option<BoxFuture<'static, ()>> {
        let inner = self.0.upgrade()?;
        // A request may have replaced the entry while the scheduler waited for budget.
        let entry = inner.current(&hash, generation)?;
        Some(Box::pin(async move {
            let result = match inner.start_or_join(
                &entry.token,
                || None::<()>,
                Ticket::free(),
                Trigger::Refresh,
            ) {
                Join::Servable(()) => return,
                Join::Waiting { rx, .. } => flight::wait(rx).await,
            };
            let label = match result {
                Some(Ok(_)) => "success",
                Some(Err(e)) if !e.recoverable() => "irrecoverable_error",
                Some(Err(_)) | None => "recoverable_error",
            };
            inner.metrics.refreshes.with_label_values(&[label]).inc();
        }))
    }

    fn pending(&self) -> Vec<(TokenHash, u64, SystemTime)> {
        let Some(inner) = self.0.upgrade() else {
            return Vec::new();
        };
        inner
            .entries
            .iter()
            .filter_map(|(hash, e)| Some((*hash, e.generation, e.next_refresh()?)))
            .collect()
    }

    fn panicked(&self) {
        if let Some(inner) = self.0.upgrade() {
            inner.metrics.scheduler_panics.inc();
        }
    }

    fn queued(&self, len: usize) {
        if let Some(inner) = self.0.upgrade() {
            inner.metrics.refresh_queue.set(len as i64);
        }
    }
}
