//! `/v1/credentials`: validation → cache (whose flights ask admission) → response, with its
//! metrics, its one log line and its audit line ([`crate::audit`]): for a refusal of credentials
//! (bounded per client), and for the first delivery of a token's credentials to a new address. A
//! refusal of credentials is also handed to [`Events`], which never waits.
//!
//! Contract: every request gets exactly one answer, success or a JSON error, and is counted once in
//! `pod_identity_http_response` and the latency histogram. A refusal made without asking EKS Auth
//! (remembered rejection, budget, failed verification) is also counted by reason in
//! `pod_identity_rejected_locally_total` and reported to [`Admission::note_refusal`], which warns
//! about it now and then, naming the client; and it is answered after [`REFUSAL_PACE`], so a client
//! flooding the agent with tokens it will refuse gets at most about ten answers a second per
//! connection (HTTP/1.1 is serial) and cannot take the CPU from other pods. The debug line names
//! the token by its short hash, never by its value. If the client hangs up mid-exchange, this
//! future is dropped but the exchange goes on in the cache's own task.

use super::limits::Pace;
use super::response::{error_response, json_response};
use crate::admission::{Admission, Reason};
use crate::audit::{self, Decided};
use crate::cache::{CacheError, CredentialCache, Delivery, Denial, Entry, Outcome, Scope};
use crate::error::Error;
use crate::kube::events::Events;
use crate::metrics::Metrics;
use crate::request::{self, AllowedHosts};
use crate::token::{PodIdentity, Token, TokenError, TokenHash};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// What answering `/v1/credentials` needs.
pub struct CredentialHandler {
    /// Where credentials come from: memory, or one exchange per token.
    pub cache: CredentialCache,
    /// The `Host` values accepted: the addresses actually bound (DNS-rebinding defence).
    pub hosts: AllowedHosts,
    /// Clock leeway on the token's `exp`/`nbf`; the cache was built with the same value.
    pub leeway: Duration,
    /// Who may start an exchange (asked by the cache's flights); here, for its refusal warnings
    /// and for who a client is.
    pub admission: Arc<Admission>,
    pub metrics: Arc<Metrics>,
    /// Bounds refusal audit lines per client.
    pub refusal_lines: audit::Pacer,
    /// Bounds delivery audit lines per client: a host process cycling through 127/8 with a
    /// token it holds must not flood the trail.
    pub delivery_lines: audit::Pacer,
    /// Tokens delivered to addresses, so the first delivery to a new one is audited once.
    pub deliveries: moka::sync::Cache<(TokenHash, IpAddr), ()>,
    /// Refusals reported as Events (`--events`).
    pub events: Option<Events>,
}

/// Token-address pairs remembered for delivery audit lines.
pub const DELIVERIES_REMEMBERED: u64 = 65_536;

/// The delivery memory: least recently used first, an hour at most.
pub fn deliveries() -> moka::sync::Cache<(TokenHash, IpAddr), ()> {
    moka::sync::Cache::builder()
        .max_capacity(DELIVERIES_REMEMBERED)
        .eviction_policy(moka::policy::EvictionPolicy::lru())
        .time_to_live(Duration::from_secs(3600))
        .build()
}

/// How long a local refusal waits before it is answered. A pod meeting one now and then (a
/// token with no association yet) loses a tenth of a second; a flood loses its speed.
pub const REFUSAL_PACE: Duration = Duration::from_millis(100);

/// Who decided a refusal the cache gave.
enum Decider {
    /// The agent itself, for this reason: counted, warned about and paced.
    Agent(Reason),
    /// EKS Auth, asked for this request; with who the token is, if the flight verified it.
    EksAuth(Option<Arc<PodIdentity>>),
    /// Shutdown ended the exchange the request waited for: the agent answers, but the token
    /// was not refused.
    Shutdown,
}

impl Decider {
    fn audited(&self) -> Decided {
        match self {
            Decider::Agent(_) | Decider::Shutdown => Decided::Locally,
            Decider::EksAuth(_) => Decided::EksAuth,
        }
    }
}

/// The one reading of a cache refusal: the error the client gets, and who decided it. Every
/// variant is named, so a new one is a compile error here rather than silently the agent's.
fn interpret(e: CacheError) -> (Error, Decider) {
    match e {
        CacheError::Exchange(e, pod) => (Error::Exchange(e), Decider::EksAuth(pod)),
        CacheError::Remembered(r) => (Error::remembered(&r), Decider::Agent(Reason::NegativeCache)),
        CacheError::Denied(Denial::Invalid { why, .. }) => {
            (Error::Unverified(why), Decider::Agent(Reason::Signature))
        }
        CacheError::Denied(Denial::OtherNode { node }) => {
            (Error::OtherNode(node), Decider::Agent(Reason::OtherNode))
        }
        CacheError::Denied(Denial::Busy {
            scope: Scope::Client,
            retry_after,
        }) => (
            Error::ClientOverBudget(retry_after),
            Decider::Agent(Reason::ClientBudget),
        ),
        CacheError::Denied(Denial::Busy {
            scope: Scope::Node,
            retry_after,
        }) => (
            Error::NodeOverBudget(retry_after),
            Decider::Agent(Reason::NodeBudget),
        ),
        CacheError::ShuttingDown => (Error::ShuttingDown, Decider::Shutdown),
    }
}

/// A refusal on its way out: the token if it parsed, the error, and who decided it.
struct Refused {
    token: Option<Token>,
    error: Error,
    decided: Decided,
    /// The token of a request refused for its time, read again for an Event only (the audit
    /// line of such a refusal names no token).
    expired: Option<Token>,
    /// Who the token is, if the request's flight verified it before EKS Auth refused it.
    pod: Option<Arc<PodIdentity>>,
}

impl CredentialHandler {
    pub async fn handle<B>(&self, req: Request<B>, peer: SocketAddr) -> Response<Full<Bytes>> {
        let started = Instant::now();
        let pace = req.extensions().get::<Pace>().cloned().unwrap_or_default();
        let result = match request::validate(&req, &self.hosts, self.leeway) {
            Ok(token) => match self.cache.get(&token, peer.ip()).await {
                Ok((entry, outcome)) => Ok((token, entry, outcome)),
                Err(e) => Err(self.refused_by_cache(token, e, peer, &pace).await),
            },
            Err(error) => {
                let expired = self.expired_token(&req, &error);
                // Paced like every refusal the agent makes itself: a flood of bad requests on a
                // connection gets ten answers a second.
                pace.wait(REFUSAL_PACE).await;
                Err(Refused {
                    token: None,
                    error,
                    decided: Decided::Locally,
                    expired,
                    pod: None,
                })
            }
        };
        let elapsed = started.elapsed();
        match result {
            Ok((token, entry, outcome)) => self.served(&token, &entry, outcome, peer, elapsed),
            Err(refused) => self.refused(refused, peer, elapsed),
        }
    }

    /// What the cache's refusal becomes: counted, warned about and paced if the agent decided
    /// it itself.
    async fn refused_by_cache(
        &self,
        token: Token,
        e: CacheError,
        peer: SocketAddr,
        pace: &Pace,
    ) -> Refused {
        let (error, decider) = interpret(e);
        let decided = decider.audited();
        let pod = match decider {
            Decider::Agent(reason) => {
                self.metrics
                    .rejected_locally
                    .with_label_values(&[reason.as_str()])
                    .inc();
                self.admission
                    .note_refusal(peer.ip(), &token, reason, error.code());
                if reason != Reason::NodeBudget {
                    pace.wait(REFUSAL_PACE).await;
                }
                None
            }
            Decider::EksAuth(pod) => pod,
            Decider::Shutdown => None,
        };
        Refused {
            token: Some(token),
            error,
            decided,
            expired: None,
            pod,
        }
    }

    /// With Events on, the token of a request refused because it expired: its pod may be told.
    fn expired_token<B>(&self, req: &Request<B>, error: &Error) -> Option<Token> {
        if self.events.is_none() || !matches!(error, Error::Token(TokenError::Expired(_))) {
            return None;
        }
        let raw = req.headers().get(hyper::header::AUTHORIZATION)?;
        Token::parse(raw.as_bytes()).ok()
    }

    fn served(
        &self,
        token: &Token,
        entry: &Entry,
        outcome: Outcome,
        peer: SocketAddr,
        elapsed: Duration,
    ) -> Response<Full<Bytes>> {
        let m = &self.metrics;
        let creds = entry.credentials();
        let remaining = creds.remaining(SystemTime::now());
        m.http_ok.inc();
        m.request_duration(outcome.as_str())
            .observe(elapsed.as_secs_f64());
        m.served_remaining.observe(remaining.as_secs_f64());
        // A cheap compare for the address the entry last went to; only a new one is looked up.
        // The exchange's own line names its address (the first of a new or handed-over entry,
        // kept across renewals); a rotated token's first delivery is its only line.
        let delivery = entry.record_delivery(peer.ip());
        let audited = match delivery {
            Delivery::Changed => outcome != Outcome::Miss,
            Delivery::First => outcome == Outcome::Rotated,
            Delivery::Same => false,
        };
        if audited {
            let key = (token.hash(), peer.ip().to_canonical());
            if !self.deliveries.contains_key(&key) {
                self.deliveries.insert(key, ());
                let client = self.admission.source(peer.ip());
                if let Some(not_logged) = self.delivery_lines.allow(client) {
                    audit::delivery(key.1, token, outcome.as_str(), creds, not_logged);
                }
            }
        }
        if tracing::enabled!(tracing::Level::DEBUG) {
            let s = token.subject();
            tracing::debug!(status = 200, outcome = outcome.as_str(), token = %token.hash(),
                namespace = %s.namespace, service_account = %s.service_account, pod = %s.pod,
                access_key_id = creds.access_key_id(), remaining_s = remaining.as_secs(),
                micros = elapsed.as_micros() as u64, "served credentials");
        }
        if outcome == Outcome::Stale {
            // Per request, so debug: the cause (a failed exchange, a refresh backlog) is
            // logged once where it happens.
            tracing::debug!(token = %token.hash(), remaining_s = remaining.as_secs(),
                "served cached credentials past their hard point; a refresh is pending");
        }
        json_response(StatusCode::OK, creds.body().clone())
    }

    fn refused(&self, r: Refused, peer: SocketAddr, elapsed: Duration) -> Response<Full<Bytes>> {
        let m = &self.metrics;
        let e = &r.error;
        let status = e.status();
        // Only credential decisions are audited: a wrong path, method or Host is not one.
        let credential = !matches!(
            e,
            Error::NotFound(_) | Error::MethodNotAllowed(_) | Error::HostNotAllowed(_)
        );
        if credential {
            if let Some(not_logged) = self.refusal_lines.allow(self.admission.source(peer.ip())) {
                audit::refusal(
                    peer.ip().to_canonical(),
                    r.token.as_ref(),
                    status,
                    e.code(),
                    r.decided,
                    not_logged,
                );
            }
            if let Some(events) = &self.events {
                events.refused(r.token.as_ref().or(r.expired.as_ref()), r.pod.as_ref(), e);
            }
        }
        m.http_response
            .with_label_values(&[status_label(status)])
            .inc();
        m.request_duration("error").observe(elapsed.as_secs_f64());
        if status < 500 {
            tracing::debug!(status, code = e.code(), error = %e.message(), micros = elapsed.as_micros() as u64, "request refused");
        } else {
            tracing::warn!(status, code = e.code(), error = %e.message(), "request failed");
        }
        error_response(e)
    }
}

/// Static labels for the statuses this agent answers with; anything else is bucketed.
fn status_label(status: u16) -> &'static str {
    match status {
        200 => "200",
        400 => "400",
        403 => "403",
        404 => "404",
        405 => "405",
        429 => "429",
        500 => "500",
        502 => "502",
        503 => "503",
        s if s < 500 => "4xx",
        _ => "5xx",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::AdmissionSettings;
    use crate::audit::testing::{credentials, pod_token, Captured};
    use crate::cache::CacheSettings;
    use crate::client::Clients;
    use crate::eks_auth::{CredentialSource, ExchangeError, FetchFuture};
    use http_body_util::BodyExt;
    use serde_json::Value;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    /// EKS Auth as the cache sees it: credentials for every token, or this refusal.
    #[derive(Default)]
    struct FakeEksAuth {
        refusal: Mutex<Option<ExchangeError>>,
        calls: AtomicUsize,
    }

    impl CredentialSource for FakeEksAuth {
        fn fetch(&self, _: &Token) -> FetchFuture {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let answer = match self.refusal.lock().expect("lock").clone() {
                Some(e) => Err(e),
                None => Ok(credentials().into()),
            };
            Box::pin(async move { answer })
        }
    }

    fn not_found() -> ExchangeError {
        ExchangeError::Service {
            status: 404,
            code: "ResourceNotFoundException".into(),
            message: "no association".into(),
            request_id: Some("req-9".into()),
        }
    }

    const HOST: &str = "169.254.170.23";

    fn peer() -> SocketAddr {
        "10.0.0.5:40000".parse().expect("addr")
    }

    fn handler(eks_auth: Arc<FakeEksAuth>, budgets: AdmissionSettings) -> CredentialHandler {
        let metrics = Arc::new(Metrics::new().expect("metrics"));
        let leeway = Duration::from_secs(60);
        let clients = Arc::new(Clients::new(&[], 128));
        let admission = Arc::new(Admission::new(budgets, clients, None, None));
        CredentialHandler {
            cache: CredentialCache::new(
                eks_auth,
                admission.clone(),
                &CacheSettings::default(),
                leeway,
                metrics.clone(),
            ),
            hosts: AllowedHosts::new(&[HOST.parse().expect("ip")]),
            leeway,
            admission,
            metrics,
            refusal_lines: audit::Pacer::default(),
            delivery_lines: audit::Pacer::default(),
            deliveries: deliveries(),
            events: None,
        }
    }

    /// What the client got: status, `Retry-After`, the JSON body; and how long it waited.
    struct Answer {
        status: u16,
        retry_after: Option<String>,
        body: Value,
        took: Duration,
    }

    async fn ask(h: &CredentialHandler, path: &str, authorization: &str) -> Answer {
        let req = Request::get(path)
            .header("host", HOST)
            .header("authorization", authorization)
            .body(())
            .expect("request");
        let started = tokio::time::Instant::now();
        let res = h.handle(req, peer()).await;
        let took = started.elapsed();
        let status = res.status().as_u16();
        let retry_after = res
            .headers()
            .get(hyper::header::RETRY_AFTER)
            .map(|v| v.to_str().expect("ascii").to_owned());
        let bytes = res.into_body().collect().await.expect("body").to_bytes();
        let body = serde_json::from_slice(&bytes).expect("a JSON body");
        Answer {
            status,
            retry_after,
            body,
            took,
        }
    }

    fn rejected_locally(m: &Metrics, reason: Reason) -> u64 {
        m.rejected_locally
            .with_label_values(&[reason.as_str()])
            .get()
    }

    fn answered(m: &Metrics, status: &str) -> u64 {
        m.http_response.with_label_values(&[status]).get()
    }

    fn events(lines: &[Value], event: &str) -> Vec<Value> {
        lines
            .iter()
            .filter(|l| l["event"] == event)
            .cloned()
            .collect()
    }

    /// A miss exchanges once and a hit serves the same body from memory: both 200, counted as
    /// served, one exchange line and no refusal line.
    #[tokio::test(start_paused = true)]
    async fn a_miss_then_a_hit_serve_one_exchanges_credentials() {
        let (captured, _guard) = Captured::start();
        let eks_auth = Arc::new(FakeEksAuth::default());
        let h = handler(eks_auth.clone(), AdmissionSettings::unlimited());
        let token = pod_token("team-a", "web-1");
        let miss = ask(&h, "/v1/credentials", &token).await;
        let hit = ask(&h, "/v1/credentials", &token).await;
        for a in [&miss, &hit] {
            assert_eq!(a.status, 200, "{}", a.body);
            assert_eq!(a.body["AccessKeyId"], "ASIAAUDITEXAMPLE");
        }
        assert_eq!(miss.body, hit.body);
        assert_eq!(eks_auth.calls.load(Ordering::SeqCst), 1);
        assert_eq!(h.metrics.http_ok.get(), 2);
        let lines = captured.audit_lines();
        assert_eq!(events(&lines, "exchange").len(), 1, "{lines:?}");
        assert!(events(&lines, "refusal").is_empty(), "{lines:?}");
    }

    /// A token that does not parse is the agent's refusal: 400 `InvalidToken`, answered after
    /// the pace, audited as decided locally with no token, and EKS Auth never asked.
    #[tokio::test(start_paused = true)]
    async fn a_bad_token_is_refused_locally_after_the_pace() {
        let (captured, _guard) = Captured::start();
        let eks_auth = Arc::new(FakeEksAuth::default());
        let h = handler(eks_auth.clone(), AdmissionSettings::unlimited());
        let a = ask(&h, "/v1/credentials", "not-a-jwt").await;
        assert_eq!(
            (a.status, &a.body["code"]),
            (400, &Value::from("InvalidToken"))
        );
        assert!(a.took >= REFUSAL_PACE, "{:?}", a.took);
        assert_eq!(eks_auth.calls.load(Ordering::SeqCst), 0);
        assert_eq!(answered(&h.metrics, "400"), 1);
        let refusals = events(&captured.audit_lines(), "refusal");
        assert_eq!(refusals.len(), 1);
        assert_eq!(refusals[0]["decided"], "locally");
        assert_eq!(refusals[0]["outcome"], "InvalidToken");
        assert_eq!(refusals[0]["status"], 400);
        assert_eq!(refusals[0]["token"], "");
        assert_eq!(refusals[0]["client"], "10.0.0.5");
    }

    /// EKS Auth's refusal is answered with its status and code at once, audited as EKS Auth's
    /// and not counted as the agent's; the same token again is the agent's remembered refusal:
    /// same answer, counted, paced, decided locally, EKS Auth not asked again.
    #[tokio::test(start_paused = true)]
    async fn eks_auths_refusal_is_its_own_and_its_memory_the_agents() {
        let (captured, _guard) = Captured::start();
        let eks_auth = Arc::new(FakeEksAuth::default());
        *eks_auth.refusal.lock().expect("lock") = Some(not_found());
        let h = handler(eks_auth.clone(), AdmissionSettings::unlimited());
        let token = pod_token("team-b", "api-1");
        let first = ask(&h, "/v1/credentials", &token).await;
        let again = ask(&h, "/v1/credentials", &token).await;
        for a in [&first, &again] {
            assert_eq!(a.status, 404);
            assert_eq!(a.body["code"], "ResourceNotFoundException");
            assert!(a.body["message"]
                .as_str()
                .expect("message")
                .contains("req-9"));
        }
        assert!(first.took < REFUSAL_PACE, "{:?}", first.took);
        assert!(again.took >= REFUSAL_PACE, "{:?}", again.took);
        assert_eq!(eks_auth.calls.load(Ordering::SeqCst), 1);
        assert_eq!(rejected_locally(&h.metrics, Reason::NegativeCache), 1);
        assert_eq!(answered(&h.metrics, "404"), 2);
        let refusals = events(&captured.audit_lines(), "refusal");
        let decided: Vec<&Value> = refusals.iter().map(|l| &l["decided"]).collect();
        assert_eq!(decided, ["eks_auth", "locally"]);
        assert!(refusals.iter().all(|l| l["namespace"] == "team-b"));
    }

    /// A client past its budget of new exchanges: 429 `ExchangeRateExceeded` with
    /// `Retry-After`, counted by reason, decided locally; its cached credentials still served.
    #[tokio::test(start_paused = true)]
    async fn a_client_over_its_budget_gets_429_and_keeps_its_cache() {
        let (captured, _guard) = Captured::start();
        let eks_auth = Arc::new(FakeEksAuth::default());
        let budgets = AdmissionSettings {
            client_qps: 0.001,
            client_burst: 1,
            ..AdmissionSettings::unlimited()
        };
        let h = handler(eks_auth.clone(), budgets);
        let first = pod_token("team-c", "job-1");
        assert_eq!(ask(&h, "/v1/credentials", &first).await.status, 200);
        let a = ask(&h, "/v1/credentials", &pod_token("team-c", "job-2")).await;
        assert_eq!(
            (a.status, &a.body["code"]),
            (429, &Value::from("ExchangeRateExceeded"))
        );
        assert!(a.retry_after.is_some());
        assert!(a.took >= REFUSAL_PACE, "{:?}", a.took);
        assert_eq!(rejected_locally(&h.metrics, Reason::ClientBudget), 1);
        assert_eq!(eks_auth.calls.load(Ordering::SeqCst), 1);
        assert_eq!(ask(&h, "/v1/credentials", &first).await.status, 200);
        let refusals = events(&captured.audit_lines(), "refusal");
        assert_eq!(refusals.len(), 1);
        assert_eq!(refusals[0]["decided"], "locally");
        assert_eq!(refusals[0]["pod"], "job-2");
    }

    /// A wrong path is answered (404 `NotFound`) and counted, but is no credential decision:
    /// no audit line.
    #[tokio::test(start_paused = true)]
    async fn a_wrong_path_is_counted_not_audited() {
        let (captured, _guard) = Captured::start();
        let h = handler(Arc::default(), AdmissionSettings::unlimited());
        let a = ask(&h, "/v2/credentials", &pod_token("team-d", "x")).await;
        assert_eq!((a.status, &a.body["code"]), (404, &Value::from("NotFound")));
        assert_eq!(answered(&h.metrics, "404"), 1);
        assert!(captured.audit_lines().is_empty(), "{}", captured.text());
    }

    /// Each cache refusal read once: the code it is answered with, who decided it and, when
    /// the agent did, why.
    #[test]
    fn every_cache_refusal_is_read_once() {
        let wait = Duration::from_secs(2);
        let cases = [
            (
                CacheError::Exchange(not_found(), None),
                "ResourceNotFoundException",
                Decided::EksAuth,
                None,
            ),
            (
                CacheError::Denied(Denial::Invalid {
                    why: "bad signature".into(),
                    remember: true,
                }),
                "InvalidToken",
                Decided::Locally,
                Some(Reason::Signature),
            ),
            (
                CacheError::Denied(Denial::OtherNode {
                    node: "node-b".into(),
                }),
                "TokenForAnotherNode",
                Decided::Locally,
                Some(Reason::OtherNode),
            ),
            (
                CacheError::Denied(Denial::Busy {
                    scope: Scope::Client,
                    retry_after: wait,
                }),
                "ExchangeRateExceeded",
                Decided::Locally,
                Some(Reason::ClientBudget),
            ),
            (
                CacheError::Denied(Denial::Busy {
                    scope: Scope::Node,
                    retry_after: wait,
                }),
                "ExchangeCapacityExceeded",
                Decided::Locally,
                Some(Reason::NodeBudget),
            ),
            (
                CacheError::ShuttingDown,
                "ShuttingDown",
                Decided::Locally,
                None,
            ),
        ];
        for (e, code, decided, reason) in cases {
            let (error, decider) = interpret(e);
            assert_eq!(error.code(), code);
            assert_eq!(decider.audited(), decided, "{code}");
            let why = match decider {
                Decider::Agent(reason) => Some(reason),
                Decider::EksAuth(_) | Decider::Shutdown => None,
            };
            assert_eq!(why, reason, "{code}");
        }
    }
}
