//! The audit trail: one line for every EKS Auth exchange and every refused credential request,
//! answering "which workload received which role, and who was turned away".
//!
//! Contract (a stable schema: fields are added, never renamed or removed). Lines are `info`
//! events of the target `pod_identity_agent::audit`, written at every `-v` level and turned
//! off only by `--no-audit-log`; in the default JSON format each is one object
//! with these keys, every one present on every line of its event (empty string when unknown):
//!
//! | key | `exchange` | `refusal` |
//! |---|---|---|
//! | `event` | `"exchange"` | `"refusal"` |
//! | `trigger` | `request` (a pod asked) or `refresh` (refresh-ahead) | `request` |
//! | `client` | source IP of the request that started it; `""` for refreshes | source IP |
//! | `namespace`, `service_account`, `pod`, `pod_uid` | from the token's claims | same, `""` when the token did not parse |
//! | `token` | short hash of the token (never the token) | same |
//! | `outcome` | `success` or EKS Auth's error code | the error code the pod received |
//! | `status` | — | HTTP status the pod received |
//! | `decided` | — | `locally` (no EKS Auth call: validation, remembered refusal, budget, signature) or `eks_auth` |
//! | `fault` | `""` on success; `token`, `node` or `transient` | — |
//! | `role_arn`, `association_id`, `association_arn` | from EKS Auth's answer (success only) | — |
//! | `access_key_id`, `expiration`, `request_id` | the issued key id (not secret, in CloudTrail), its expiry, EKS Auth's request id | — |
//!
//! Claims are attacker-chosen (the agent does not verify tokens by default): they come through
//! [`Token::subject`], cut and cleaned. Never written: the token, a secret key, a session token.
//! The rate of refusal lines is bounded by the handler's refusal pacing and connection caps.

use crate::credentials::{format_expiration, Credentials};
use crate::eks_auth::{ExchangeError, Identity};
use crate::token::Token;
use std::net::IpAddr;

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

/// One credential request answered with an error. `token` is `None` when the request was
/// refused before its token parsed.
pub fn refusal(client: IpAddr, token: Option<&Token>, status: u16, code: &str, local: bool) {
    if !tracing::enabled!(target: TARGET, tracing::Level::INFO) {
        return;
    }
    let s = token.map(Token::subject).unwrap_or_default();
    let hash = token.map(|t| t.hash().to_string()).unwrap_or_default();
    let decided = if local { "locally" } else { "eks_auth" };
    tracing::info!(target: TARGET, event = "refusal", trigger = "request", client = %client,
        namespace = %s.namespace, service_account = %s.service_account, pod = %s.pod,
        pod_uid = %s.pod_uid, token = %hash, outcome = code, status, decided,
        "credential request refused");
}
