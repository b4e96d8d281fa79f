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
//!
//! Every rule here reads the time from the cache's [`Clock`] (`SystemTime::now()` nowhere), so
//! tests pause and move it, and a day of a node can be simulated in seconds. The rooms: this
//! module holds `get` and its types; [`store`] the map and its bookkeeping; [`exchange`] a
//! flight; [`refresh`] the cache as the scheduler sees it; [`snapshot`] the handover.

pub mod clock;
pub mod entry;
mod exchange;
pub mod flight;
pub mod gate;
pub mod negative;
pub mod policy;
mod refresh;
pub mod scheduler;
pub mod snapshot;
mod store;

pub use clock::{Clock, ManualClock};
pub use entry::{Carried, Delivery, Demand, Entry, Outcome};
pub use gate::{Caller, Denial, Gate, Open, Scope, Ticket};
pub use negative::{NegativeSettings, Refusal, Remembered};
pub use snapshot::{Exported, Imported};

use crate::eks_auth::{CredentialSource, ExchangeError};
use crate::metrics::Metrics;
use crate::token::{PodIdentity, Token};
use exchange::Start;
use policy::RefreshPolicy;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use store::Inner;

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

/// The cache; cheap to clone, all clones share one map and one scheduler.
#[derive(Clone)]
pub struct CredentialCache {
    inner: Arc<Inner>,
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
        Self::with_clock(source, gate, settings, leeway, metrics, Clock::System)
    }

    /// [`CredentialCache::new`] on `clock`: every rule of the cache and of its scheduler reads
    /// the time there (tests and simulations pass a [`Clock::Manual`]).
    pub fn with_clock(
        source: Arc<dyn CredentialSource>,
        gate: Arc<dyn Gate>,
        settings: &CacheSettings,
        leeway: Duration,
        metrics: Arc<Metrics>,
        clock: Clock,
    ) -> Self {
        let (handle, inbox) = scheduler::channel();
        let parts = store::Parts {
            source,
            gate,
            leeway,
            metrics,
            clock,
        };
        let inner = Arc::new(Inner::new(parts, settings, handle));
        scheduler::spawn(
            Arc::new(refresh::Refresh(Arc::downgrade(&inner))),
            inbox,
            scheduler::Budget {
                rate: settings.refresh_qps,
                concurrency: settings.refresh_concurrency,
            },
            inner.stop_refreshing.clone(),
            &inner.tasks,
            &inner.scheduler_health,
            inner.clock.clone(),
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
        let now = inner.clock.wall();
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
        answer_from_flight(inner, result, cached, started)
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

/// A request's answer once the flight it waited for ended with `result`: `cached` is what the
/// map held for the token before (served while valid if the exchange failed recoverably), and
/// `started` whether this request started the flight.
fn answer_from_flight(
    inner: &Inner,
    result: FlightResult,
    cached: Option<Arc<Entry>>,
    started: bool,
) -> Result<(Arc<Entry>, Outcome), CacheError> {
    let now = inner.clock.wall();
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
