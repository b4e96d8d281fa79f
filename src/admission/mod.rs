//! Who may start a new exchange with EKS Auth: the cache's [`Gate`], asked inside a token's one
//! flight (never for a hit or a request joining a flight).
//!
//! Contract, in order:
//! 1. *who the token is* ([`Gate::identify`]): with verification on ([`crate::verify`]), a
//!    token the cluster's keys refuse is refused here (400), and a verified token of a pod on
//!    another node (`--node-name` against the token's `kubernetes.io.node.name`) too: a token
//!    stolen on one node cannot be redeemed through the agent on another. Both are remembered,
//!    except a token naming a key the cluster does not publish, which a late publication heals.
//! 2. *the client's budget* ([`Gate::admit`]), where the client is the verified pod, or, for a
//!    token that is not verified, its source as [`Clients`] counts it (every host-local source is
//!    one client): at most `client_concurrency` of its exchanges under way at once, and a token
//!    bucket of `client_burst` refilled at `client_qps`. Over it, the request is refused at once
//!    with [`Scope::Client`] (429 and `Retry-After`): one client cannot spend the node's EKS Auth
//!    budget, and other clients do not notice it.
//! 3. *the node's ceiling* ([`fair`]): at most `node_concurrency` exchanges under way and a
//!    bucket of `node_burst` refilled at `node_qps`, shared round-robin between clients; a
//!    request waits up to `node_wait` (many pods starting together is legitimate), then gets
//!    [`Scope::Node`] (503 and `Retry-After`, which every SDK retries). A client's token taken
//!    for a request the node then refused is given back.
//!
//! Slots are held by the exchange, not the request. Client state is bounded (`max_clients`,
//! least recently used first) and forgotten after [`CLIENT_IDLE`]. Refused requests are logged
//! at warn, at most once per client per [`WARN_EVERY`], naming the client and the token's
//! namespace and service account (never the token), with how many refusals were not logged.

pub(crate) mod fair;

use crate::bucket::TokenBucket;
use crate::cache::{Caller, Denial, Gate, Scope, Ticket};
use crate::client::{ClientKey, Clients};
use crate::token::{PodIdentity, Token};
use crate::util::LogEvery;
use crate::verify::{Verdict, Verifier};
use fair::NodeQueue;
use futures_util::future::BoxFuture;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

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
        use crate::defaults::*;
        AdmissionSettings {
            client_qps: DEFAULT_CLIENT_EXCHANGE_QPS,
            client_burst: DEFAULT_CLIENT_EXCHANGE_BURST,
            client_concurrency: DEFAULT_CLIENT_MAX_CONCURRENT_EXCHANGES as usize,
            node_qps: DEFAULT_EXCHANGE_QPS,
            node_burst: DEFAULT_EXCHANGE_BURST,
            node_concurrency: DEFAULT_MAX_CONCURRENT_EXCHANGES as usize,
            node_wait: DEFAULT_MAX_EXCHANGE_WAIT,
            max_clients: DEFAULT_MAX_CLIENTS,
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
    warn: LogEvery,
}

/// The budgets, the verifier and the node binding, shared by every flight.
pub struct Admission {
    settings: AdmissionSettings,
    /// Budgets by client.
    clients: moka::sync::Cache<ClientKey, Arc<Client>>,
    node: Arc<NodeQueue>,
    /// Who a source address is.
    sources: Arc<Clients>,
    /// Verification of tokens, when on.
    verifier: Option<Arc<Verifier>>,
    /// `--node-name`: verified tokens of pods on other nodes are refused.
    node_name: Option<String>,
}

/// Why a request was refused locally, for the metric and the warning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    NegativeCache,
    ClientBudget,
    NodeBudget,
    Signature,
    OtherNode,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::NegativeCache => "negative_cache",
            Reason::ClientBudget => "client_budget",
            Reason::NodeBudget => "node_budget",
            Reason::Signature => "signature",
            Reason::OtherNode => "other_node",
        }
    }
}

fn busy(scope: Scope, retry_after: Duration) -> Denial {
    Denial::Busy {
        scope,
        retry_after: retry_after.max(Duration::from_secs(1)),
    }
}

impl Admission {
    pub fn new(
        settings: AdmissionSettings,
        sources: Arc<Clients>,
        verifier: Option<Arc<Verifier>>,
        node_name: Option<String>,
    ) -> Admission {
        Admission {
            settings,
            clients: moka::sync::Cache::builder()
                // No flag sets it: a library caller's 0 would track no client's budget.
                .max_capacity(settings.max_clients.max(1))
                .eviction_policy(moka::policy::EvictionPolicy::lru())
                .time_to_idle(CLIENT_IDLE)
                .build(),
            node: NodeQueue::new(
                settings.node_qps,
                settings.node_burst,
                settings.node_concurrency,
                settings.node_wait,
            ),
            sources,
            verifier,
            node_name,
        }
    }

    /// Who a connection from `ip` is, before a token says more.
    pub fn source(&self, ip: IpAddr) -> ClientKey {
        self.sources.source(ip)
    }

    fn client(&self, key: ClientKey) -> Arc<Client> {
        let s = &self.settings;
        self.clients.get_with(key, || {
            Arc::new(Client {
                bucket: TokenBucket::with_burst(s.client_qps, s.client_burst),
                slots: Arc::new(Semaphore::new(
                    // The flag refuses 0 where parsed; this guards library callers.
                    s.client_concurrency.clamp(1, Semaphore::MAX_PERMITS),
                )),
                warn: LogEvery::new(WARN_EVERY),
            })
        })
    }

    /// Log a local refusal at warn, at most once per client per [`WARN_EVERY`].
    pub fn note_refusal(&self, peer: IpAddr, token: &Token, reason: Reason, code: &str) {
        let key = self.source(peer);
        let Some(unlogged) = self.client(key).warn.due() else {
            return;
        };
        let subject = token.subject();
        tracing::warn!(client = %key, address = %peer.to_canonical(), namespace = %subject.namespace,
            service_account = %subject.service_account, pod = %subject.pod, reason = reason.as_str(),
            code, refusals_not_logged = unlogged, "refused a request without asking EKS Auth");
    }

    fn check_node(&self, id: &PodIdentity) -> Result<(), Denial> {
        match (&self.node_name, &id.node_name) {
            (Some(ours), Some(theirs)) if ours != theirs => Err(Denial::OtherNode {
                node: theirs.clone(),
            }),
            _ => Ok(()),
        }
    }

    async fn admit_now(&self, caller: Caller) -> Result<Ticket, Denial> {
        let key = match caller {
            Caller::Pod(pod) => ClientKey::Pod(pod),
            Caller::Source(ip) => self.source(ip),
        };
        let client = self.client(key);
        let client_slot = client
            .slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| busy(Scope::Client, Duration::from_secs(1)))?;
        client
            .bucket
            .try_take()
            .map_err(|wait| busy(Scope::Client, wait))?;
        match self.node.admit(key).await {
            Some(node_slot) => Ok(Ticket::holding((client_slot, node_slot))),
            None => {
                client.bucket.give_back();
                Err(busy(Scope::Node, Duration::from_secs(1)))
            }
        }
    }
}

impl Gate for Admission {
    fn identify(
        self: Arc<Self>,
        token: Token,
    ) -> BoxFuture<'static, Result<Option<PodIdentity>, Denial>> {
        Box::pin(async move {
            let Some(verifier) = &self.verifier else {
                return Ok(None);
            };
            match verifier.verify(&token).await {
                Verdict::Verified(id) => self.check_node(&id).map(|()| Some(id)),
                Verdict::Refused { why, remember } => Err(Denial::Invalid { why, remember }),
                Verdict::Unverifiable(_) => Ok(None),
            }
        })
    }

    fn admit(self: Arc<Self>, caller: Caller) -> BoxFuture<'static, Result<Ticket, Denial>> {
        Box::pin(async move { self.admit_now(caller).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn admission(s: AdmissionSettings) -> Arc<Admission> {
        Arc::new(Admission::new(
            s,
            Arc::new(Clients::new(&[], 128)),
            None,
            None,
        ))
    }

    fn from(ip: &str) -> Caller {
        Caller::Source(ip.parse().expect("ip"))
    }

    async fn admit(a: &Arc<Admission>, c: Caller) -> Result<Ticket, Denial> {
        a.clone().admit(c).await
    }

    fn is_client_busy(r: &Result<Ticket, Denial>) -> bool {
        matches!(
            r,
            Err(Denial::Busy {
                scope: Scope::Client,
                ..
            })
        )
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_over_its_budget_does_not_touch_another() {
        let a = admission(settings());
        // Concurrency: two held, the third refused at once.
        let one = admit(&a, from("10.0.0.1")).await.expect("1");
        let two = admit(&a, from("10.0.0.1")).await.expect("2");
        assert!(is_client_busy(&admit(&a, from("10.0.0.1")).await));
        // Another client is unaffected; IPv4-mapped IPv6 is the same client as IPv4.
        assert!(admit(&a, from("10.0.0.2")).await.is_ok());
        assert!(is_client_busy(&admit(&a, from("::ffff:10.0.0.1")).await));
        drop((one, two));
        // Rate: burst 3, two taken: one more, then refused until it refills.
        assert!(admit(&a, from("10.0.0.1")).await.is_ok());
        match admit(&a, from("10.0.0.1")).await {
            Err(Denial::Busy {
                scope: Scope::Client,
                retry_after,
            }) => assert!(retry_after >= Duration::from_secs(1), "{retry_after:?}"),
            Err(other) => panic!("refused for the wrong reason: {other:?}"),
            Ok(_) => panic!("admitted over the budget"),
        }
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert!(admit(&a, from("10.0.0.1")).await.is_ok(), "refilled");
    }

    #[tokio::test(start_paused = true)]
    async fn host_local_sources_are_one_client_and_pods_are_their_own() {
        let a = admission(settings());
        for ip in ["127.0.0.2", "127.0.0.3", "::1"] {
            let _ = admit(&a, from(ip)).await;
        }
        // Burst 3 spent by three "different" loopback addresses: the fourth is the same host.
        assert!(is_client_busy(&admit(&a, from("127.9.9.9")).await));
        let pod = Caller::Pod(crate::token::PodKey([7; 32]));
        assert!(
            admit(&a, pod).await.is_ok(),
            "a verified pod has its own budget"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_node_ceiling_waits_then_refuses_and_returns_the_clients_token() {
        let mut s = AdmissionSettings::unlimited();
        s.node_qps = 1.0;
        s.node_burst = 1;
        s.node_wait = Duration::from_millis(600);
        s.client_burst = 2;
        s.client_qps = 0.001;
        let a = admission(s);
        assert!(admit(&a, from("10.0.0.1")).await.is_ok());
        // The node's next token is a second away, past the wait: refused, and the client's
        // token it took is returned, so the client can still try again.
        assert!(matches!(
            admit(&a, from("10.0.0.1")).await,
            Err(Denial::Busy {
                scope: Scope::Node,
                ..
            })
        ));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(
            admit(&a, from("10.0.0.1")).await.is_ok(),
            "client token returned"
        );
    }
}
