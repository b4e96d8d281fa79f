//! This agent: the real `CredentialCache` and refresh scheduler of every node, with its default
//! settings, on one manual clock, against an in-process EKS Auth that answers at once. Only the
//! HTTP layer is left out (a request here is a `get` with a token whose times the handler would
//! have checked).

use crate::workload::{count, Agent, Answer, Kind, Pod, CROSS_ACCOUNT, SECOND, SIX_HOURS};
use futures_util::future::BoxFuture;
use pod_identity_agent::cache::{
    CacheSettings, Caller, Clock, CredentialCache, Denial, Gate, Open, Outcome, Ticket,
};
use pod_identity_agent::credentials::{Credentials, Unvalidated};
use pod_identity_agent::eks_auth::{CredentialSource, FetchFuture};
use pod_identity_agent::metrics::Metrics;
use pod_identity_agent::token::{PodIdentity, Token};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

/// The agent's start on the wall clock: a fixed day, whole seconds (credentials carry no more).
pub const START: Duration = Duration::from_secs(1_780_272_000);

/// EKS Auth: 6 h credentials, or 59 minutes for a service account with a target role; every call
/// counted by the second it came in.
struct FakeEksAuth {
    clock: Clock,
    calls: Mutex<Vec<u32>>,
    cross_account: Mutex<Vec<u32>>,
}

impl FakeEksAuth {
    fn now_ms(&self) -> i64 {
        let since = self.clock.wall().duration_since(UNIX_EPOCH + START);
        since.map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
    }
}

impl CredentialSource for FakeEksAuth {
    fn fetch(&self, token: &Token) -> FetchFuture {
        let second = usize::try_from(self.now_ms() / SECOND).unwrap_or(0);
        let cross_account = token.subject().service_account == "cross-account";
        for (calls, counts) in [(&self.calls, true), (&self.cross_account, cross_account)] {
            if let (true, Ok(mut calls)) = (counts, calls.lock()) {
                count(&mut calls, second);
            }
        }
        let lifetime = if cross_account {
            CROSS_ACCOUNT
        } else {
            SIX_HOURS
        };
        let now = self.clock.wall();
        let result = Credentials::validate(
            Unvalidated {
                access_key_id: "ASIASIMULATEDEXAMPLE",
                secret_access_key: "simulated-secret-access-key",
                session_token: "simulated-session-token",
                expiration: now + Duration::from_millis(lifetime.unsigned_abs()),
                assumed_role_arn: "arn:aws:sts::111122223333:assumed-role/role/session",
            },
            now,
        );
        Box::pin(async move { Ok(result?.into()) })
    }
}

/// `--token-issuer`: the tokens are believed as verified (the simulation does not sign them),
/// so a rotated token finds its pod's credentials.
struct Verified;

impl Gate for Verified {
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
                issuer: "https://oidc.simulated".into(),
                audience: "pods.eks.amazonaws.com".into(),
            }))
        })
    }

    fn admit(self: Arc<Self>, _: Caller) -> BoxFuture<'static, Result<Ticket, Denial>> {
        Box::pin(async { Ok(Ticket::free()) })
    }
}

pub struct Ours {
    nodes: Vec<CredentialCache>,
    eks_auth: Arc<FakeEksAuth>,
    /// Each pod's current token (by pod), parsed once: a pod sends the same bytes until kubelet
    /// rewrites them.
    tokens: HashMap<u64, (u64, Token)>,
    start: tokio::time::Instant,
}

impl Ours {
    /// Call within a paused Tokio runtime: the clock is tokio's.
    pub fn new(nodes: usize, verified: bool) -> Ours {
        let (clock, _) = Clock::manual(UNIX_EPOCH + START);
        let eks_auth = Arc::new(FakeEksAuth {
            clock: clock.clone(),
            calls: Mutex::default(),
            cross_account: Mutex::default(),
        });
        let gate: Arc<dyn Gate> = if verified {
            Arc::new(Verified)
        } else {
            Arc::new(Open)
        };
        let nodes = (0..nodes)
            .map(|_| {
                CredentialCache::with_clock(
                    eks_auth.clone(),
                    gate.clone(),
                    &CacheSettings::default(),
                    Duration::from_secs(60),
                    Arc::new(Metrics::new().expect("metrics")),
                    clock.clone(),
                )
            })
            .collect();
        Ours {
            nodes,
            eks_auth,
            tokens: HashMap::new(),
            start: tokio::time::Instant::now(),
        }
    }

    fn token(&mut self, pod: &Pod) -> Token {
        let t = pod.token;
        if let Some((id, token)) = self.tokens.get(&pod.id) {
            if *id == t.id {
                return token.clone();
            }
        }
        let token = {
            let secs = |ms: i64| START.as_secs() as i64 + ms.div_euclid(SECOND);
            let sa = if pod.credentials == CROSS_ACCOUNT {
                "cross-account"
            } else {
                "app"
            };
            let claims = serde_json::json!({"aud": ["pods.eks.amazonaws.com"],
                    "iat": secs(t.issued), "nbf": secs(t.issued), "exp": secs(t.expires),
                    "sub": format!("system:serviceaccount:default:{sa}"), "jti": t.id,
                    "kubernetes.io": {"namespace": "default",
                        "serviceaccount": {"name": sa, "uid": "sa-uid"},
                        "pod": {"name": format!("pod-{}", pod.id), "uid": format!("uid-{}", pod.id)}}});
            Token::parse(crate::jwt(&claims).as_bytes()).expect("token")
        };
        self.tokens.insert(pod.id, (t.id, token.clone()));
        token
    }
}

impl Agent for Ours {
    async fn advance_to(&mut self, t: i64) {
        tokio::time::sleep_until(self.start + Duration::from_millis(t.unsigned_abs())).await;
    }

    async fn ask(&mut self, pod: &Pod, _t: i64) -> Answer {
        let token = self.token(pod);
        let source = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | (pod.id as u32 & 0xff_ffff)));
        let Some(cache) = self.nodes.get(pod.node) else {
            return Answer::Error;
        };
        match cache.get(&token, source).await {
            Ok((entry, outcome)) => {
                let expires = entry
                    .credentials()
                    .expiration()
                    .duration_since(UNIX_EPOCH + START)
                    .map_or(0, |d| d.as_millis() as i64);
                let kind = match outcome {
                    Outcome::Hit => Kind::Hit,
                    Outcome::Stale => Kind::Stale,
                    Outcome::Miss | Outcome::Coalesced => Kind::Miss,
                    Outcome::Rotated => Kind::Rotated,
                };
                Answer::Served { expires, kind }
            }
            Err(_) => Answer::Error,
        }
    }

    fn stopped(&mut self, pod: &Pod) {
        self.tokens.remove(&pod.id);
    }

    fn calls_per_second(&self) -> (Vec<u32>, Vec<u32>) {
        let read = |m: &Mutex<Vec<u32>>| m.lock().map(|c| c.clone()).unwrap_or_default();
        (
            read(&self.eks_auth.calls),
            read(&self.eks_auth.cross_account),
        )
    }
}
