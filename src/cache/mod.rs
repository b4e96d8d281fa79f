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
//! tests pause and move it, and a day of a node can be simulated in seconds. The maps' own
//! expiry (an entry past its credentials, a remembered refusal, [`NODE_REFUSALS_WINDOW`]) runs
//! on moka's real clock: it frees memory, and every answer is decided on the [`Clock`] (an
//! entry's validity, a refusal's age) before it is given; only the window's count of refused
//! tokens is real time. The rooms: this
//! module holds `get` and its types; [`store`] the map and its bookkeeping; [`exchange`] a
//! flight; [`refresh`] the cache as the scheduler sees it; [`snapshot`] the handover.

pub(crate) mod clock;
pub(crate) mod entry;
mod exchange;
pub(crate) mod flight;
pub(crate) mod gate;
pub(crate) mod negative;
pub(crate) mod policy;
mod refresh;
pub(crate) mod scheduler;
pub(crate) mod snapshot;
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

#[cfg(test)]
mod tests {
    //! The cache's rules on a paused clock: time moves only when a test says so (or, when every
    //! task is idle, to the next timer), so hours pass in microseconds and nothing sleeps.
    use super::*;
    use crate::credentials::{Credentials, Unvalidated};
    use crate::eks_auth::FetchFuture;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    use futures_util::future::BoxFuture;
    use std::collections::VecDeque;
    use std::sync::Mutex;
    use std::time::SystemTime;

    const H: Duration = Duration::from_secs(3600);
    const POD: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 7));

    /// EKS Auth: credentials of `lifetime` from now, a distinct access key each call, or the
    /// next queued failure; it records when each call came.
    struct Fake {
        clock: Clock,
        lifetime: Duration,
        failures: Mutex<VecDeque<ExchangeError>>,
        calls: Mutex<Vec<SystemTime>>,
    }

    impl CredentialSource for Fake {
        fn fetch(&self, _: &Token) -> FetchFuture {
            let now = self.clock.wall();
            let n = {
                let mut calls = self.calls.lock().expect("lock");
                calls.push(now);
                calls.len()
            };
            let result = match self.failures.lock().expect("lock").pop_front() {
                Some(e) => Err(e),
                None => Credentials::validate(
                    Unvalidated {
                        access_key_id: &format!("ASIATEST{n:012}"),
                        secret_access_key: "secret",
                        session_token: "session",
                        expiration: now + self.lifetime,
                        assumed_role_arn: "arn:aws:sts::111122223333:assumed-role/r/s",
                    },
                    now,
                )
                .map(Into::into)
                .map_err(Into::into),
            };
            Box::pin(async move { result })
        }
    }

    /// Verifies nothing but believes the token's pod claims: rotation needs a verified pod.
    struct Believe;

    impl Gate for Believe {
        fn identify(
            self: Arc<Self>,
            token: Token,
        ) -> BoxFuture<'static, Result<Option<PodIdentity>, Denial>> {
            let s = token.subject();
            Box::pin(async move {
                Ok(Some(PodIdentity {
                    namespace: s.namespace,
                    service_account: s.service_account,
                    pod_name: s.pod,
                    pod_uid: s.pod_uid,
                    node_name: None,
                    issued_at: None,
                    issuer: "https://issuer.test".into(),
                    audience: "pods.eks.amazonaws.com".into(),
                }))
            })
        }

        fn admit(self: Arc<Self>, _: Caller) -> BoxFuture<'static, Result<gate::Ticket, Denial>> {
            Box::pin(async { Ok(gate::Ticket::free()) })
        }
    }

    struct Node {
        cache: CredentialCache,
        fake: Arc<Fake>,
        clock: Clock,
    }

    impl Node {
        fn new(lifetime: Duration, gate: Arc<dyn Gate>) -> Node {
            let (clock, _) = Clock::manual(SystemTime::UNIX_EPOCH + Duration::from_secs(1 << 31));
            let fake = Arc::new(Fake {
                clock: clock.clone(),
                lifetime,
                failures: Mutex::default(),
                calls: Mutex::default(),
            });
            let cache = CredentialCache::with_clock(
                fake.clone(),
                gate,
                &CacheSettings::default(),
                Duration::from_secs(60),
                Arc::new(Metrics::new().expect("metrics")),
                clock.clone(),
            );
            Node { cache, fake, clock }
        }

        fn calls(&self) -> usize {
            self.fake.calls.lock().expect("lock").len()
        }

        fn fail_next(&self, e: ExchangeError) {
            self.fake.failures.lock().expect("lock").push_back(e);
        }

        /// A pod's token, issued now for a day.
        fn token(&self, pod: &str) -> Token {
            let now = self.clock.wall();
            let secs = now
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let claims = serde_json::json!({"aud": ["pods.eks.amazonaws.com"], "iat": secs,
                "nbf": secs, "exp": secs + 86_400, "sub": "system:serviceaccount:ns:sa",
                "kubernetes.io": {"namespace": "ns", "serviceaccount": {"name": "sa", "uid": "s"},
                    "pod": {"name": pod, "uid": format!("uid-{pod}")}}});
            let jwt = format!(
                "{}.{}.{}",
                URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256","kid":"k"}"#),
                URL_SAFE_NO_PAD.encode(claims.to_string()),
                URL_SAFE_NO_PAD.encode("signature"),
            );
            Token::parse(jwt.as_bytes()).expect("token")
        }

        async fn get(&self, token: &Token) -> (Outcome, String) {
            let (entry, outcome) = self.cache.get(token, POD).await.expect("credentials");
            (outcome, entry.credentials().access_key_id().to_owned())
        }

        /// Let time run `by`, the scheduler and the flights doing what comes due meanwhile.
        async fn run(&self, by: Duration) {
            tokio::time::sleep(by).await;
        }

        /// Let time run in 100 ms steps until `calls` calls were made (at most `limit`).
        async fn run_until_calls(&self, calls: usize, limit: Duration) {
            let until = tokio::time::Instant::now() + limit;
            while self.calls() < calls && tokio::time::Instant::now() < until {
                self.run(Duration::from_millis(100)).await;
            }
        }
    }

    fn unavailable() -> ExchangeError {
        ExchangeError::Service {
            status: 503,
            code: "ServiceUnavailableException".into(),
            message: "m".into(),
            request_id: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn served_from_memory_until_the_hard_point_and_a_queued_refresh_until_expiry() {
        let node = Node::new(6 * H, Arc::new(Open));
        let t = node.token("a");
        let (outcome, first) = node.get(&t).await;
        assert_eq!((outcome, node.calls()), (Outcome::Miss, 1));
        // No refreshes: what a request is served is the rule alone.
        node.cache.stop_refreshing();
        let hard = 6 * H - Duration::from_secs(20 * 60);
        node.run(hard - Duration::from_secs(1)).await;
        assert_eq!(node.get(&t).await, (Outcome::Hit, first.clone()));
        // Past the hard point, a used entry's refresh is queued: served while it is on its way,
        // until a minute before expiry.
        node.run(Duration::from_secs(2)).await;
        assert_eq!(node.get(&t).await, (Outcome::Stale, first.clone()));
        node.run(Duration::from_secs(20 * 60 - 62)).await;
        assert_eq!(node.get(&t).await, (Outcome::Stale, first.clone()));
        assert_eq!(node.calls(), 1);
        node.run(Duration::from_secs(2)).await;
        let (outcome, second) = node.get(&t).await;
        assert_eq!((outcome, node.calls()), (Outcome::Miss, 2));
        assert_ne!(second, first);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_exchange_past_the_hard_point_serves_the_valid_credentials() {
        let node = Node::new(H, Arc::new(Open));
        let t = node.token("a");
        let (_, first) = node.get(&t).await;
        node.cache.stop_refreshing();
        // A minute and a half before expiry the request must exchange; EKS Auth fails.
        node.run(H - Duration::from_secs(30)).await;
        node.fail_next(unavailable());
        assert_eq!(node.get(&t).await, (Outcome::Stale, first));
        assert_eq!(node.calls(), 2);
        // Expired: nothing to fall back on.
        node.run(Duration::from_secs(31)).await;
        node.fail_next(unavailable());
        assert!(node.cache.get(&t, POD).await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn refreshed_at_the_refresh_point_only_while_pods_use_the_credentials() {
        let node = Node::new(6 * H, Arc::new(Open));
        let t = node.token("a");
        node.get(&t).await;
        // Refresh point: half the lifetime (3 h), less up to 10 % jitter.
        node.run(Duration::from_secs(2 * 3600 + 40 * 60)).await;
        assert_eq!(node.calls(), 1, "not before 0.9 of the refresh interval");
        node.run(Duration::from_secs(21 * 60)).await;
        assert_eq!(
            node.calls(),
            2,
            "renewed at the refresh point, with no request"
        );
        // Nobody used the renewed credentials: at their refresh point they go dormant.
        node.run(3 * H + Duration::from_secs(60)).await;
        assert_eq!(node.calls(), 2, "an unused entry is not renewed");
        // The next request is answered from memory and asks for the renewal at once.
        let (outcome, key) = node.get(&t).await;
        assert_eq!(outcome, Outcome::Hit);
        node.run(Duration::from_secs(1)).await;
        assert_eq!(node.calls(), 3);
        assert_ne!(node.get(&t).await.1, key, "served the renewal");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_refresh_backs_off_and_never_evicts_valid_credentials() {
        let node = Node::new(6 * H, Arc::new(Open));
        let t = node.token("a");
        let (_, first) = node.get(&t).await;
        node.fail_next(unavailable());
        node.fail_next(ExchangeError::Service {
            status: 403,
            code: "UnrecognizedClientException".into(),
            message: "the node's credentials".into(),
            request_id: None,
        });
        node.fail_next(ExchangeError::Unavailable("timed out".into()));
        // No refresh before 0.9 of the refresh interval (3 h); then step until it comes.
        node.run(Duration::from_secs(2 * 3600 + 40 * 60)).await;
        node.run_until_calls(2, H).await;
        assert_eq!(node.calls(), 2, "the first refresh failed");
        assert_eq!(node.get(&t).await, (Outcome::Hit, first.clone()), "kept");
        node.run(Duration::from_secs(10)).await;
        let calls = node.fake.calls.lock().expect("lock").clone();
        assert_eq!(calls.len(), 5, "three failures, then a success");
        let gaps: Vec<Duration> = calls
            .windows(2)
            .skip(1)
            .map(|w| w[1].duration_since(w[0]).expect("ordered"))
            .collect();
        // Backoff doubles from 1 s, with jitter in [d/2, d]; the scheduler starts work up to
        // one refresh interval (1 / --max-service-qps) before its deadline.
        let early = Duration::from_secs_f64(1.0 / CacheSettings::default().refresh_qps);
        for (gap, d) in gaps.iter().zip([1, 2, 4]) {
            let d = Duration::from_secs(d);
            assert!(*gap + early >= d / 2 && *gap <= d, "{gaps:?}");
        }
        assert_ne!(node.get(&t).await.1, first, "served the renewal");
        assert_eq!(node.calls(), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn a_rotated_token_takes_over_its_pods_credentials_and_the_old_one_leaves() {
        let node = Node::new(6 * H, Arc::new(Believe));
        let old = node.token("a");
        let (_, first) = node.get(&old).await;
        node.run(H).await;
        let new = node.token("a");
        assert_eq!(node.get(&new).await, (Outcome::Rotated, first.clone()));
        assert_eq!(node.calls(), 1, "no exchange for a rotated token");
        assert_eq!(node.cache.len(), 1, "the superseded entry left the map");
        // The old token (a container still reading the old file) is answered as it is.
        assert_eq!(node.get(&old).await, (Outcome::Rotated, first));
        // One renewal, for the new token's entry; none for the old token.
        node.run(3 * H).await;
        assert_eq!(node.calls(), 2);
        assert_eq!(node.get(&new).await.0, Outcome::Hit);
        assert_eq!(node.cache.len(), 1);
    }
}
