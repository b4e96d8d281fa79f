//! Who may start a new exchange with EKS Auth: one budget per client, one for the node.
//!
//! Contract: asked only when a request would start an exchange (a cache miss with no exchange
//! for its token under way and no refusal of it remembered); cache hits and requests joining an
//! exchange are never limited. In order:
//! 1. *the client's budget*, by source IP (IPv4-mapped IPv6 counted as IPv4): at most
//!    `client_concurrency` of its exchanges under way at once, and a token bucket of
//!    `client_burst` refilled at `client_qps`. Over it, the request is refused at once with
//!    [`Scope::Client`] (429 and `Retry-After`): one pod cannot spend the node's EKS Auth budget,
//!    and other clients do not notice it. A legitimate pod needs one exchange per token (about
//!    one a day), so the defaults leave room for restarts and several service accounts.
//! 2. *local verification* of the token's signature, issuer and audience, when configured
//!    ([`issuer`](crate::issuer)): a token that fails is refused and remembered.
//! 3. *the node's ceiling*: at most `node_concurrency` exchanges under way and a bucket of
//!    `node_burst` refilled at `node_qps`. Here requests wait (fairly, in arrival order) up to
//!    `node_wait`, because many pods starting together (a node reboot) is legitimate; past
//!    that, [`Scope::Node`] (503 and `Retry-After`, which every SDK retries).
//!
//! The slots taken are held by the exchange, not the request: a client that hangs up keeps its
//! slot until its exchange ends. Client state is bounded (`max_clients`, least recently used
//! first) and forgotten after [`CLIENT_IDLE`] without requests. Refused requests are logged
//! at warn, at most once per client per [`WARN_EVERY`], naming the client and the token's
//! namespace and service account (never the token), with how many refusals were not logged.

use crate::bucket::TokenBucket;
use crate::cache::{Denial, Gate, Scope, Ticket};
use crate::issuer::{Verdict, Verifier};
use crate::token::Token;
use std::future::Future;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Client state not used for this long is forgotten.
pub const CLIENT_IDLE: Duration = Duration::from_secs(600);
/// At most one warning per client this often.
pub const WARN_EVERY: Duration = Duration::from_secs(10);

/// Budgets, from the command line.
#[derive(Debug, Clone, Copy)]
pub struct AdmissionSettings {
    /// `--client-exchange-qps`: new exchanges per second per client, sustained.
    pub client_qps: f64,
    /// `--client-exchange-burst`: new exchanges a client may start at once.
    pub client_burst: u32,
    /// `--client-max-concurrent-exchanges`.
    pub client_concurrency: usize,
    /// `--exchange-qps`: new exchanges per second for the whole node, sustained.
    pub node_qps: f64,
    /// `--exchange-burst`.
    pub node_burst: u32,
    /// `--max-concurrent-exchanges`.
    pub node_concurrency: usize,
    /// `--max-exchange-wait`: how long a request may wait for the node's budget.
    pub node_wait: Duration,
    /// Clients whose budgets are tracked at once.
    pub max_clients: u64,
}

impl Default for AdmissionSettings {
    fn default() -> Self {
        AdmissionSettings {
            client_qps: 1.0,
            client_burst: 10,
            client_concurrency: 4,
            node_qps: 50.0,
            node_burst: 200,
            node_concurrency: 64,
            node_wait: Duration::from_secs(2),
            max_clients: 65_536,
        }
    }
}

impl AdmissionSettings {
    /// No limits at all, for benchmarks of other things and tests that need none.
    pub fn unlimited() -> Self {
        AdmissionSettings {
            client_qps: 1e9,
            client_burst: u32::MAX,
            client_concurrency: Semaphore::MAX_PERMITS,
            node_qps: 1e9,
            node_burst: u32::MAX,
            node_concurrency: Semaphore::MAX_PERMITS,
            node_wait: Duration::from_secs(2),
            max_clients: 65_536,
        }
    }
}

/// One client's budget, and when it was last warned about.
struct Client {
    bucket: TokenBucket,
    slots: Arc<Semaphore>,
    warned_at: Mutex<Option<Instant>>,
    unlogged: AtomicU64,
}

/// The node's ceiling.
struct Node {
    bucket: TokenBucket,
    slots: Arc<Semaphore>,
    wait: Duration,
}

/// The budgets and the verifier, shared by every request.
pub struct Admission {
    settings: AdmissionSettings,
    clients: moka::sync::Cache<IpAddr, Arc<Client>>,
    node: Node,
    /// `--token-issuer`: verify tokens locally before any exchange.
    verifier: Option<Arc<Verifier>>,
    /// `pod_identity_token_verifications_total`, when counted.
    verifications: Option<prometheus::IntCounterVec>,
}

/// Why a request was refused locally, for the metric and the warning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    NegativeCache,
    ClientBudget,
    NodeBudget,
    Signature,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::NegativeCache => "negative_cache",
            Reason::ClientBudget => "client_budget",
            Reason::NodeBudget => "node_budget",
            Reason::Signature => "signature",
        }
    }
}

impl Admission {
    pub fn new(settings: AdmissionSettings, verifier: Option<Arc<Verifier>>) -> Admission {
        Admission::counted(settings, verifier, None)
    }

    /// [`Admission::new`], counting verification results in `verifications`.
    pub fn counted(
        settings: AdmissionSettings,
        verifier: Option<Arc<Verifier>>,
        verifications: Option<prometheus::IntCounterVec>,
    ) -> Admission {
        Admission {
            settings,
            clients: moka::sync::Cache::builder()
                .max_capacity(settings.max_clients.max(1))
                .time_to_idle(CLIENT_IDLE)
                .build(),
            node: Node {
                bucket: TokenBucket::with_burst(settings.node_qps, settings.node_burst),
                slots: Arc::new(Semaphore::new(
                    settings.node_concurrency.clamp(1, Semaphore::MAX_PERMITS),
                )),
                wait: settings.node_wait,
            },
            verifier,
            verifications,
        }
    }

    /// The gate for one request from `client`.
    pub fn gate(&self, client: IpAddr) -> Gatekeeper<'_> {
        Gatekeeper {
            admission: self,
            client: client.to_canonical(),
        }
    }

    fn client(&self, ip: IpAddr) -> Arc<Client> {
        let s = &self.settings;
        self.clients.get_with(ip, || {
            Arc::new(Client {
                bucket: TokenBucket::with_burst(s.client_qps, s.client_burst),
                slots: Arc::new(Semaphore::new(
                    s.client_concurrency.clamp(1, Semaphore::MAX_PERMITS),
                )),
                warned_at: Mutex::new(None),
                unlogged: AtomicU64::new(0),
            })
        })
    }

    /// Log a local refusal at warn, at most once per client per [`WARN_EVERY`].
    pub fn note_refusal(&self, client: IpAddr, token: &Token, reason: Reason, code: &str) {
        let client = client.to_canonical();
        let state = self.client(client);
        let due = {
            let mut at = state.warned_at.lock().unwrap_or_else(|p| p.into_inner());
            let due = at.is_none_or(|t| t.elapsed() >= WARN_EVERY);
            if due {
                *at = Some(Instant::now());
            }
            due
        };
        if !due {
            state.unlogged.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let unlogged = state.unlogged.swap(0, Ordering::Relaxed);
        let subject = token.subject();
        tracing::warn!(%client, namespace = %subject.namespace, service_account = %subject.service_account,
            pod = %subject.pod, reason = reason.as_str(), code, refusals_not_logged = unlogged,
            "refused a request without asking EKS Auth");
    }
}

/// The node's slot and the client's, held by one exchange.
struct Held {
    _client: OwnedSemaphorePermit,
    _node: OwnedSemaphorePermit,
}

/// [`Admission`] for one client: the [`Gate`] the cache asks.
pub struct Gatekeeper<'a> {
    admission: &'a Admission,
    client: IpAddr,
}

impl Gatekeeper<'_> {
    fn busy(scope: Scope, retry_after: Duration) -> Denial {
        Denial::Busy {
            scope,
            retry_after: retry_after.max(Duration::from_secs(1)),
        }
    }

    async fn admit_now(&self, token: &Token) -> Result<Ticket, Denial> {
        let a = self.admission;
        let client = a.client(self.client);
        let client_slot = client
            .slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| Self::busy(Scope::Client, Duration::from_secs(1)))?;
        client
            .bucket
            .try_take()
            .map_err(|wait| Self::busy(Scope::Client, wait))?;
        if let Some(verifier) = &a.verifier {
            let verdict = verifier.verify(token).await;
            if let Some(c) = &a.verifications {
                let result = match verdict {
                    Verdict::Valid => "valid",
                    Verdict::Invalid(_) => "invalid",
                    Verdict::Unverifiable(_) => "unverifiable",
                };
                c.with_label_values(&[result]).inc();
            }
            if let Verdict::Invalid(why) = verdict {
                return Err(Denial::Invalid(why));
            }
        }
        let wait = a
            .node
            .bucket
            .reserve(a.node.wait)
            .map_err(|wait| Self::busy(Scope::Node, wait))?;
        let started = Instant::now();
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        let left = a.node.wait.saturating_sub(started.elapsed());
        let node_slot = tokio::time::timeout(left, a.node.slots.clone().acquire_owned())
            .await
            .ok()
            .and_then(Result::ok)
            .ok_or_else(|| Self::busy(Scope::Node, Duration::from_secs(1)))?;
        Ok(Ticket::holding(Held {
            _client: client_slot,
            _node: node_slot,
        }))
    }
}

impl Gate for Gatekeeper<'_> {
    fn admit(&self, token: &Token) -> impl Future<Output = Result<Ticket, Denial>> + Send {
        self.admit_now(token)
    }

    fn client(&self) -> Option<IpAddr> {
        Some(self.client)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> Token {
        use base64::engine::general_purpose::URL_SAFE_NO_PAD;
        use base64::Engine;
        let seg = |v: serde_json::Value| URL_SAFE_NO_PAD.encode(v.to_string());
        let raw = format!(
            "{}.{}.{}",
            seg(serde_json::json!({"alg": "RS256"})),
            seg(serde_json::json!({"exp": 4_000_000_000u64})),
            URL_SAFE_NO_PAD.encode("sig")
        );
        Token::parse(raw.as_bytes()).expect("token")
    }

    fn settings() -> AdmissionSettings {
        AdmissionSettings {
            client_qps: 1.0,
            client_burst: 3,
            client_concurrency: 2,
            node_qps: 100.0,
            node_burst: 100,
            node_concurrency: 100,
            node_wait: Duration::from_millis(500),
            max_clients: 100,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_over_its_budget_does_not_touch_another() {
        let a = Admission::new(settings(), None);
        let (x, y): (IpAddr, IpAddr) = (
            "10.0.0.1".parse().expect("ip"),
            "10.0.0.2".parse().expect("ip"),
        );
        let t = token();
        // Concurrency: two held, the third refused at once.
        let one = a.gate(x).admit(&t).await.expect("1");
        let two = a.gate(x).admit(&t).await.expect("2");
        assert!(matches!(
            a.gate(x).admit(&t).await,
            Err(Denial::Busy {
                scope: Scope::Client,
                ..
            })
        ));
        // Another client is unaffected.
        assert!(a.gate(y).admit(&t).await.is_ok());
        drop((one, two));
        // Rate: burst 3, so the third admitted request emptied the bucket... (two taken, one
        // refused before taking): one more, then refused until it refills.
        assert!(a.gate(x).admit(&t).await.is_ok());
        match a.gate(x).admit(&t).await {
            Err(Denial::Busy {
                scope: Scope::Client,
                retry_after,
            }) => assert!(retry_after >= Duration::from_secs(1), "{retry_after:?}"),
            Err(other) => panic!("refused for the wrong reason: {other:?}"),
            Ok(_) => panic!("admitted over the budget"),
        }
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert!(a.gate(x).admit(&t).await.is_ok(), "refilled");
        // IPv4-mapped IPv6 is the same client.
        assert!(matches!(
            a.gate("::ffff:10.0.0.1".parse().expect("ip"))
                .admit(&t)
                .await,
            Err(Denial::Busy {
                scope: Scope::Client,
                ..
            })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn the_node_ceiling_waits_then_refuses() {
        let mut s = AdmissionSettings::unlimited();
        s.node_qps = 2.0;
        s.node_burst = 1;
        s.node_wait = Duration::from_millis(600);
        let a = Admission::new(s, None);
        let t = token();
        let started = tokio::time::Instant::now();
        assert!(a
            .gate("10.0.0.1".parse().expect("ip"))
            .admit(&t)
            .await
            .is_ok());
        // The next token comes in 500 ms: within the wait, so it waits.
        assert!(a
            .gate("10.0.0.2".parse().expect("ip"))
            .admit(&t)
            .await
            .is_ok());
        assert!(started.elapsed() >= Duration::from_millis(500));
        // Two booked ahead would be 1 s away: refused, with the wait as Retry-After.
        let _ = a.node.bucket.reserve(Duration::from_secs(1));
        assert!(matches!(
            a.gate("10.0.0.3".parse().expect("ip")).admit(&t).await,
            Err(Denial::Busy {
                scope: Scope::Node,
                ..
            })
        ));
    }
}
