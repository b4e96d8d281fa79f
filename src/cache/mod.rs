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
//! Entries are keyed by SHA-256 of the token; the raw token lives only inside the entry, for
//! refresh. The map is bounded by `--max-cache-size` with least-recently-used eviction, and an
//! entry leaves by itself when its credentials or its token expire. Refresh ahead of expiry is
//! driven by demand, through one deadline-ordered [`scheduler`]. The cache knows nothing of HTTP.

mod bucket;
pub mod flight;
pub mod policy;
mod scheduler;

use crate::credentials::Credentials;
use crate::eks_auth::{CredentialSource, ExchangeError};
use crate::metrics::Metrics;
use crate::token::{Token, TokenHash};
use flight::{Flights, Lookup};
use moka::notification::RemovalCause;
use moka::policy::EvictionPolicy;
use moka::Expiry;
use policy::{Plan, RefreshPolicy};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How a request was answered; a label of the latency histogram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// From memory.
    Hit,
    /// From memory, past the hard point: EKS Auth is failing (static stability) or a queued
    /// refresh has not run yet (more refreshes due than the rate allows).
    Stale,
    /// This request started the exchange.
    Miss,
    /// This request joined an exchange already under way.
    Coalesced,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Stale => "stale",
            Outcome::Miss => "miss",
            Outcome::Coalesced => "coalesced",
        }
    }
}

/// One token's credentials and the schedule that keeps them fresh.
pub struct Entry {
    /// Kept for refresh: the exchange needs the raw token, not its hash.
    token: Token,
    credentials: Credentials,
    plan: Plan,
    /// Nothing served from this entry outlives the credentials or the token.
    valid_until: SystemTime,
    /// Set by the first request served from this entry: only used entries are refreshed.
    used: AtomicBool,
    /// Set when the scheduler skipped this entry's refresh because nobody used it; the next
    /// request past the refresh point asks for a refresh at once.
    dormant: AtomicBool,
    /// Consecutive recoverable failures of exchanges for this token, for backoff.
    failures: AtomicU32,
    /// No new exchange for this token before this time (ms since the epoch): backoff.
    retry_after_ms: AtomicU64,
}

impl Entry {
    pub fn credentials(&self) -> &Credentials {
        &self.credentials
    }

    fn mark_used(&self) {
        // Read first: the flag is set once per refresh period, read on every hit; a plain store
        // would bounce the cache line between cores on a busy entry.
        if !self.used.load(Ordering::Relaxed) {
            self.used.store(true, Ordering::Relaxed);
        }
    }

    fn in_backoff(&self, now: SystemTime) -> bool {
        millis(now) < self.retry_after_ms.load(Ordering::Relaxed)
    }

    /// Whether a request at `now` is answered from this entry without an exchange (see
    /// [`policy`] for the points): before the hard point always; past it while EKS Auth is
    /// backing off (static stability, until expiry), or while a queued refresh is on its way
    /// (until the last point).
    fn serve_without_exchange(&self, now: SystemTime) -> Option<Outcome> {
        if now < self.plan.hard_at {
            return Some(Outcome::Hit);
        }
        let backing_off = self.in_backoff(now) && now < self.valid_until;
        let refresh_queued =
            !self.dormant.load(Ordering::Relaxed) && now < self.plan.last_at.min(self.valid_until);
        (backing_off || refresh_queued).then_some(Outcome::Stale)
    }
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

type FlightResult = Result<Arc<Entry>, ExchangeError>;

/// Settings of the cache, from the command line.
#[derive(Debug, Clone)]
pub struct CacheSettings {
    pub max_entries: u64,
    pub policy: RefreshPolicy,
    /// `--max-service-qps`: refreshes per second, across all entries.
    pub refresh_qps: f64,
    /// Refresh exchanges under way at once.
    pub refresh_concurrency: usize,
    /// Clock leeway for token times, as in request validation.
    pub leeway: Duration,
}

impl Default for CacheSettings {
    /// The reference agent's defaults: 2000 entries, renewal after at most 3 h, 3 refreshes/s;
    /// 16 refreshes at once and 60 s of clock leeway.
    fn default() -> Self {
        CacheSettings {
            max_entries: 2000,
            policy: RefreshPolicy {
                max_retention: Duration::from_secs(3 * 3600),
            },
            refresh_qps: 3.0,
            refresh_concurrency: 16,
            leeway: Duration::from_secs(60),
        }
    }
}

struct Inner {
    entries: moka::sync::Cache<TokenHash, Arc<Entry>>,
    flights: Flights<TokenHash, FlightResult>,
    source: Arc<dyn CredentialSource>,
    policy: RefreshPolicy,
    leeway: Duration,
    metrics: Arc<Metrics>,
    scheduler: scheduler::Handle,
}

/// The cache; cheap to clone, all clones share one map and one scheduler.
#[derive(Clone)]
pub struct CredentialCache {
    inner: Arc<Inner>,
}

struct ExpireWithCredentials;

impl Expiry<TokenHash, Arc<Entry>> for ExpireWithCredentials {
    fn expire_after_create(&self, _: &TokenHash, e: &Arc<Entry>, _: Instant) -> Option<Duration> {
        Some(
            e.valid_until
                .duration_since(SystemTime::now())
                .unwrap_or_default(),
        )
    }

    fn expire_after_update(
        &self,
        _: &TokenHash,
        e: &Arc<Entry>,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(
            e.valid_until
                .duration_since(SystemTime::now())
                .unwrap_or_default(),
        )
    }
}

impl CredentialCache {
    /// Must be called within a Tokio runtime: it starts the refresh scheduler.
    pub fn new(
        source: Arc<dyn CredentialSource>,
        settings: &CacheSettings,
        metrics: Arc<Metrics>,
    ) -> Self {
        let evicted = metrics.cache_state.with_label_values(&["evicted"]);
        let entries = moka::sync::Cache::builder()
            .max_capacity(settings.max_entries.max(1))
            .eviction_policy(EvictionPolicy::lru())
            .expire_after(ExpireWithCredentials)
            .eviction_listener(move |_, _, cause| {
                if cause != RemovalCause::Replaced {
                    evicted.inc();
                }
            })
            .build();
        let inner = Arc::new_cyclic(|weak| Inner {
            entries,
            flights: Flights::default(),
            source,
            policy: settings.policy,
            leeway: settings.leeway,
            metrics,
            scheduler: scheduler::start(
                weak.clone(),
                settings.refresh_qps,
                settings.refresh_concurrency,
            ),
        });
        CredentialCache { inner }
    }

    /// Credentials for `token`, whose time claims the caller has checked.
    pub async fn get(&self, token: &Token) -> Result<(Arc<Entry>, Outcome), ExchangeError> {
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
        inner.metrics.cache_misses.inc();
        let (rx, started) = match inner
            .flights
            .join_or_start(&hash, || inner.fresh(&hash, now))
        {
            Lookup::Cached((entry, outcome)) => {
                inner.touch(&entry, now);
                return Ok((entry, outcome));
            }
            Lookup::Joined(rx) => (rx, false),
            Lookup::Started(tx, rx) => {
                let inner = self.inner.clone();
                let token = token.clone();
                tokio::spawn(async move { inner.exchange(token, tx).await });
                (rx, true)
            }
        };
        let result = flight::wait(rx).await.unwrap_or_else(|| {
            Err(ExchangeError::Unavailable(
                "the exchange was abandoned".into(),
            ))
        });
        match result {
            Ok(entry) => {
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
            Err(e) if e.recoverable() => match cached.filter(|c| SystemTime::now() < c.valid_until)
            {
                Some(old) => {
                    old.mark_used();
                    Ok((old, Outcome::Stale))
                }
                None => Err(e),
            },
            Err(e) => Err(e),
        }
    }

    /// Entries in the map, pending housekeeping applied first so the figure is exact.
    pub fn len(&self) -> u64 {
        self.inner.entries.run_pending_tasks();
        self.inner.entries.entry_count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Inner {
    /// The current entry for `hash` and how to label it, if a request may be answered from it
    /// without an exchange: the same rule as the hit path, re-checked under the flights lock.
    fn fresh(&self, hash: &TokenHash, now: SystemTime) -> Option<(Arc<Entry>, Outcome)> {
        let entry = self.entries.get(hash)?;
        let outcome = entry.serve_without_exchange(now)?;
        Some((entry, outcome))
    }

    fn touch(&self, entry: &Arc<Entry>, now: SystemTime) {
        entry.mark_used();
        if now >= entry.plan.refresh_at && entry.dormant.swap(false, Ordering::Relaxed) {
            self.scheduler.refresh_now(entry);
        }
    }

    /// Is `entry` still the one the map holds for its token? Refresh work for a replaced or
    /// evicted entry is dropped.
    fn is_current(&self, entry: &Arc<Entry>) -> bool {
        self.entries
            .get(&entry.token.hash())
            .is_some_and(|e| Arc::ptr_eq(&e, entry))
    }

    /// One exchange, run in its own task; its result goes to every waiter through `tx`.
    async fn exchange(self: Arc<Self>, token: Token, tx: flight::Sender<TokenHash, FlightResult>) {
        let hash = token.hash();
        let m = &self.metrics;
        m.eks_auth_in_flight.inc();
        let started = Instant::now();
        let result = self.source.fetch(&token).await;
        m.eks_auth_in_flight.dec();
        m.eks_auth_duration.observe(started.elapsed().as_secs_f64());
        let result = match result {
            Ok(credentials) => {
                m.eks_auth_calls.with_label_values(&["Success"]).inc();
                let fetched_at = SystemTime::now();
                let plan = self.policy.plan(fetched_at, credentials.expiration());
                let valid_until = credentials.expiration().min(token.expires_at(self.leeway));
                let entry = Arc::new(Entry {
                    token,
                    credentials,
                    plan,
                    valid_until,
                    used: AtomicBool::new(false),
                    dormant: AtomicBool::new(false),
                    failures: AtomicU32::new(0),
                    retry_after_ms: AtomicU64::new(0),
                });
                self.entries.insert(hash, entry.clone());
                self.scheduler.schedule(&entry, entry.plan.refresh_at);
                tracing::debug!(token = %hash, access_key_id = entry.credentials.access_key_id(),
                    expires = %crate::credentials::format_expiration(entry.credentials.expiration()),
                    "exchanged token for credentials");
                Ok(entry)
            }
            Err(e) => {
                let kind = if e.recoverable() {
                    "Recoverable"
                } else {
                    "NonRecoverable"
                };
                m.eks_auth_calls.with_label_values(&[e.code()]).inc();
                m.cache_errors.with_label_values(&[kind, e.code()]).inc();
                if let Some(current) = self.entries.get(&hash) {
                    if e.recoverable() {
                        let failures = current.failures.fetch_add(1, Ordering::Relaxed) + 1;
                        let retry_at = SystemTime::now() + policy::backoff(failures);
                        current
                            .retry_after_ms
                            .store(millis(retry_at), Ordering::Relaxed);
                        if retry_at < current.valid_until {
                            self.scheduler.schedule(&current, retry_at);
                        }
                    } else {
                        self.entries.invalidate(&hash);
                    }
                }
                tracing::warn!(token = %hash, namespace = %token.claims().subject.namespace,
                    service_account = %token.claims().subject.service_account,
                    code = e.code(), recoverable = e.recoverable(), error = %e, "EKS Auth exchange failed");
                Err(e)
            }
        };
        tx.finish(result);
    }
}
