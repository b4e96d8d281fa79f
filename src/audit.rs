//! The audit trail: one line for every EKS Auth exchange, every refused credential request and
//! every first delivery of a token's credentials to a new address, answering "which workload
//! received which role, where, and who was turned away".
//!
//! Contract (a stable schema: fields are added, never renamed or removed). Lines are `info`
//! events of the target `pod_identity_agent::audit`, written at every `-v` level and turned
//! off only by `--no-audit-log`; in the default JSON format each is one object
//! with these keys, every one present on every line of its event (empty string when unknown):
//!
//! | key | `exchange` | `refusal` | `delivery` |
//! |---|---|---|---|
//! | `event` | `"exchange"` | `"refusal"` | `"delivery"` |
//! | `trigger` | `request` (a pod asked) or `refresh` (refresh-ahead) | `request` | `request` |
//! | `client` | source IP of the request that started it; `""` for refreshes | source IP | source IP |
//! | `namespace`, `service_account`, `pod`, `pod_uid` | from the token's claims | same, `""` when the token did not parse | same |
//! | `token` | short hash of the token (never the token) | same | same |
//! | `outcome` | `success` or EKS Auth's error code | the error code the pod received | how it was answered: `hit`, `stale`, `coalesced`, `rotated` |
//! | `status` | — | HTTP status the pod received | — |
//! | `decided` | — | `locally` (no EKS Auth call: validation, remembered refusal, budget, signature) or `eks_auth` | — |
//! | `not_logged` | — | refusals of this client not written since its last line | deliveries of this client not written since its last line |
//! | `fault` | `""` on success; `token`, `node` or `transient` | — | — |
//! | `role_arn`, `association_id`, `association_arn` | from EKS Auth's answer (success only) | — | — |
//! | `access_key_id`, `expiration`, `request_id` | the issued key id (not secret, in CloudTrail), its expiry, EKS Auth's request id | — | the key id and expiry delivered |
//!
//! Claims are attacker-chosen (unverified tokens reach this too): they come through
//! [`Token::subject`], cut and cleaned. Never written: the token, a secret key, a session token.
//! Only credential decisions are written: a request refused for its path, method or `Host` is
//! counted in the metrics, not audited. Refusal lines are bounded per client by [`Pacer`]: at
//! most [`REFUSAL_LINES_BURST`] at once and [`REFUSAL_LINES_PER_SECOND`] after, every client (as
//! [`crate::client`] counts them) on its own, with the number not written carried by the next
//! line, so a flood can neither fill the node's disk nor push other pods' lines out of it.
//! Delivery lines are bounded the same way, by a pacer of their own. A delivery line is written
//! for a token's first delivery to an address other than the one it was last served to, unless
//! the exchange's line already names it (the exchanging address, kept across renewals), and for
//! every rotated token's first delivery.

use crate::bucket::TokenBucket;
use crate::client::ClientKey;
use crate::credentials::{format_expiration, Credentials};
use crate::eks_auth::{ExchangeError, Identity};
use crate::token::Token;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Refusal lines one client may have written at once, and per second after that.
pub const REFUSAL_LINES_BURST: u32 = 20;
pub const REFUSAL_LINES_PER_SECOND: f64 = 5.0;

/// The `tracing` target of every audit line; filters and log shippers select on it.
pub const TARGET: &str = "pod_identity_agent::audit";

/// What made the agent call EKS Auth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// A pod's request found nothing servable; the client address when the gate knows it.
    Request(Option<IpAddr>),
    /// The refresh scheduler renewing an entry before it grows old.
    Refresh,
}

impl Trigger {
    fn parts(self) -> (&'static str, String) {
        match self {
            Trigger::Request(client) => {
                ("request", client.map(|c| c.to_string()).unwrap_or_default())
            }
            Trigger::Refresh => ("refresh", String::new()),
        }
    }
}

/// One EKS Auth exchange and its result.
pub fn exchange(
    token: &Token,
    trigger: Trigger,
    result: Result<(&Identity, &Credentials), &ExchangeError>,
) {
    if !tracing::enabled!(target: TARGET, tracing::Level::INFO) {
        return;
    }
    let s = token.subject();
    let (trigger, client) = trigger.parts();
    let empty = Identity::default();
    let (outcome, fault, identity, access_key_id, expiration) = match result {
        Ok((identity, c)) => (
            "success",
            "",
            identity,
            c.access_key_id(),
            format_expiration(c.expiration()),
        ),
        Err(e) => (e.code(), e.fault().as_str(), &empty, "", String::new()),
    };
    let request_id = match result {
        Err(ExchangeError::Service {
            request_id: Some(id),
            ..
        }) => id.as_str(),
        _ => identity.request_id.as_str(),
    };
    tracing::info!(target: TARGET, event = "exchange", trigger, client = %client,
        namespace = %s.namespace, service_account = %s.service_account, pod = %s.pod,
        pod_uid = %s.pod_uid, token = %token.hash(), outcome, fault,
        role_arn = %identity.assumed_role_arn, association_id = %identity.association_id,
        association_arn = %identity.association_arn, access_key_id, expiration = %expiration, request_id,
        "EKS Auth exchange");
}

/// Who decided a refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decided {
    /// The agent, without an EKS Auth call (validation, remembered refusal, budget, signature).
    Locally,
    /// EKS Auth, asked for this request.
    EksAuth,
}

impl Decided {
    fn as_str(self) -> &'static str {
        match self {
            Decided::Locally => "locally",
            Decided::EksAuth => "eks_auth",
        }
    }
}

/// One credential request answered with an error. `token` is `None` when the request was
/// refused before its token parsed; `not_logged` is what the [`Pacer`] held back before it.
pub fn refusal(
    client: IpAddr,
    token: Option<&Token>,
    status: u16,
    code: &str,
    decided: Decided,
    not_logged: u64,
) {
    if !tracing::enabled!(target: TARGET, tracing::Level::INFO) {
        return;
    }
    let s = token.map(Token::subject).unwrap_or_default();
    let hash = token.map(|t| t.hash().to_string()).unwrap_or_default();
    tracing::info!(target: TARGET, event = "refusal", trigger = "request", client = %client,
        namespace = %s.namespace, service_account = %s.service_account, pod = %s.pod,
        pod_uid = %s.pod_uid, token = %hash, outcome = code, status, decided = decided.as_str(),
        not_logged, "credential request refused");
}

/// The first time a token's credentials are delivered to an address, other than by the
/// exchange that fetched them (which has its own line).
pub fn delivery(
    client: IpAddr,
    token: &Token,
    outcome: &str,
    credentials: &Credentials,
    not_logged: u64,
) {
    if !tracing::enabled!(target: TARGET, tracing::Level::INFO) {
        return;
    }
    let s = token.subject();
    tracing::info!(target: TARGET, event = "delivery", trigger = "request", client = %client,
        namespace = %s.namespace, service_account = %s.service_account, pod = %s.pod,
        pod_uid = %s.pod_uid, token = %token.hash(), outcome, not_logged,
        access_key_id = credentials.access_key_id(),
        expiration = %format_expiration(credentials.expiration()), "credentials delivered");
}

/// Bounds refusal lines per client (see the module contract).
pub struct Pacer {
    clients: moka::sync::Cache<ClientKey, Arc<(TokenBucket, AtomicU64)>>,
}

impl Default for Pacer {
    fn default() -> Self {
        Pacer {
            clients: moka::sync::Cache::builder()
                .max_capacity(65_536)
                .eviction_policy(moka::policy::EvictionPolicy::lru())
                .time_to_idle(Duration::from_secs(600))
                .build(),
        }
    }
}

impl Pacer {
    /// `Some(lines held back since the last one)` if a line for `client` may be written now.
    pub fn allow(&self, client: ClientKey) -> Option<u64> {
        let state = self.clients.get_with(client, || {
            Arc::new((
                TokenBucket::with_burst(REFUSAL_LINES_PER_SECOND, REFUSAL_LINES_BURST),
                AtomicU64::new(0),
            ))
        });
        if state.0.try_take().is_ok() {
            Some(state.1.swap(0, Ordering::Relaxed))
        } else {
            state.1.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn each_client_gets_its_own_bounded_number_of_lines() {
        let p = Pacer::default();
        let host = ClientKey::Host;
        let pod: ClientKey = ClientKey::Source("10.0.0.9".parse().expect("ip"));
        let written = (0..1000).filter(|_| p.allow(host).is_some()).count();
        assert_eq!(written, REFUSAL_LINES_BURST as usize);
        // Another client is not held back by the first.
        assert_eq!(p.allow(pod), Some(0));
        tokio::time::sleep(Duration::from_secs(1)).await;
        // The next line says how many were held back.
        assert_eq!(p.allow(host), Some(1000 - REFUSAL_LINES_BURST as u64));
    }
}
