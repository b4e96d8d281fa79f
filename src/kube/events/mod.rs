//! Events: why a pod gets no credentials, put where people look first (`kubectl describe pod`),
//! and a warning on the Node when EKS Auth refuses the node's own credentials.
//!
//! Contract: [`Events::refused`] is told of every credential request the agent refuses, beside
//! its audit line, and [`Events::node_refused`] of every refusal of the node's credentials a
//! background refresh met (no request saw it); neither ever waits: they pick the refusals
//! [`reported`] names and put them on a bounded queue (full: dropped and counted). One task
//! ([`Events::start`], on the server's tracker, stopped with it; [`worker`], [`series`],
//! [`identify`]) turns the queue into
//! `events.k8s.io/v1` Events ([`body`]), type `Warning`, reporting controller
//! `pod-identity-agent`, reporting instance the node's name:
//! - on the **pod**, for a refusal that is the pod's own doing ([`POD_REASONS`]: no association,
//!   its role's trust policy, an expired or invalid token), and only for a token the cluster's
//!   keys verify: the identity the request path verified (an exchange refusal carries it), or,
//!   for a token refused before any exchange (expired), one the keys held now verify. The
//!   `regarding` object (namespace, name, uid) comes from verified claims, which no one can
//!   choose. A token that names another node, or expired more than [`REPORTED_EXPIRY`] ago, gets
//!   no Event, nor does an unverified one (verification off included);
//! - on the **Node** (`--node-name`, in namespace `default` as the kubelet's), for a refusal of
//!   the node's own credentials or permissions ([`Fault::Node`]).
//!
//! The note is the one table's words for the code, on the side the Event is about
//! ([`crate::explain`]): an Event and `diagnose` never disagree. It never carries a token, nor
//! EKS Auth's message (which names the node's role and instance).
//!
//! Deduplicated: one Event per object and reason per `interval`; repeats within it are counted
//! into the Event's `series` (`count`, `lastObservedTime`, sent as a merge patch at most every
//! `series_every` and once more after the interval ends), which `kubectl describe` shows as
//! `(x12 over 3m)`. Rate-limited per node: creates and patches share one token bucket (`burst`,
//! then `rate` a second), and no more than [`IN_FLIGHT`] calls run at once; what the budget
//! holds back waits in its series and is sent, oldest first, as soon as the budget refills (a
//! pod's first Event before a later count). Verifying expired tokens for Events has a budget of
//! its own ([`VERIFY_RATE`]), spent only on tokens that name a key the agent holds, so forged
//! tokens cannot starve the Events of refusals the request path verified. Memory is bounded: at
//! most `max_series` series (an ended interval's unsent count included), and verdicts remembered
//! for [`REMEMBERED_TOKENS`] tokens. A call that fails (after the client's own retries) is
//! counted, and its series sends nothing more; the client logs a 403 once. Counted in
//! `pod_identity_events_total{object,result}`.

pub(crate) mod body;
mod identify;
mod series;
mod worker;

use super::KubeClient;
use crate::codes::ErrorCode;
use crate::eks_auth::{ExchangeError, Fault};
use crate::error::Error;
use crate::token::{PodIdentity, Token, TokenError};
use crate::verify::Verifier;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The refusals reported on the pod: the code the pod was answered with, and the Event's reason.
/// Only the pod's own doing (its token, its association, its role's trust policy); what a code
/// means is the one table's ([`crate::explain`]). Keyed by the code string, so it moves with the
/// codes.
pub const POD_REASONS: &[(&str, &str)] = &[
    ("ResourceNotFoundException", "PodIdentityNoAssociation"),
    ("AccessDeniedException", "PodIdentityRoleNotTrusted"),
    ("ExpiredTokenException", "PodIdentityTokenExpired"),
    (ErrorCode::ExpiredToken.as_str(), "PodIdentityTokenExpired"),
    ("InvalidTokenException", "PodIdentityTokenInvalid"),
];
/// The reason of the Node's Event when EKS Auth refuses the node's own credentials.
pub const NODE_REASON: &str = "PodIdentityNodeCredentialsRefused";
/// `reportingController`, and what `kubectl describe` shows under "From".
pub const CONTROLLER: &str = "pod-identity-agent";
/// API calls under way at once; past it, a call waits for one to finish.
pub const IN_FLIGHT: usize = 4;
/// Tokens whose verdict is remembered, so a flood of one token is verified once.
pub const REMEMBERED_TOKENS: u64 = 1024;
/// Verifications of expired tokens for Events per second (and at once): a flood of forged
/// tokens costs the worker no more than this.
pub const VERIFY_RATE: u32 = 100;
/// A token that expired longer ago than this names no pod for an Event: the kubelet renews a
/// pod's token hourly, so an older one is a copy (of a pod perhaps long gone), and replaying it
/// must not keep writing Events on that pod's name.
pub const REPORTED_EXPIRY: Duration = Duration::from_secs(24 * 3600);

/// `--events`, with this node.
#[derive(Debug, Clone)]
pub struct EventSettings {
    /// `--node-name`: the Node's Events, the reporting instance, and the node a pod's token must
    /// name (if it names one) for a pod Event.
    pub node: String,
    /// One Event per object and reason per this long.
    pub interval: Duration,
    /// A series' count is sent at most this often.
    pub series_every: Duration,
    /// The node's budget of creates and patches: a second, and at once.
    pub rate: f64,
    pub burst: u32,
    /// Refusals waiting for the task; more are dropped.
    pub queue: usize,
    /// Series tracked at once.
    pub max_series: usize,
}

impl EventSettings {
    /// The defaults: one Event per pod and reason per 10 minutes, counts every 30 s, 10 at once
    /// then one a second for the node.
    pub fn new(node: String) -> EventSettings {
        EventSettings {
            node,
            interval: Duration::from_secs(600),
            series_every: Duration::from_secs(30),
            rate: 1.0,
            burst: 10,
            queue: 256,
            max_series: 4096,
        }
    }
}

/// Which object an Event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum On {
    /// The pod whose token was refused, under this reason.
    Pod(&'static str),
    /// This node.
    Node,
}

impl On {
    fn label(self) -> &'static str {
        match self {
            On::Pod(_) => "pod",
            On::Node => "node",
        }
    }

    fn reason(self) -> &'static str {
        match self {
            On::Pod(reason) => reason,
            On::Node => NODE_REASON,
        }
    }

    /// Whose fault the Event says it is: the table's words for that side only.
    fn side(self) -> Fault {
        match self {
            On::Pod(_) => Fault::Token,
            On::Node => Fault::Node,
        }
    }
}

/// The Event reason for a pod refused with `code`, if that refusal is reported on the pod.
pub fn pod_reason(code: &str) -> Option<&'static str> {
    POD_REASONS
        .iter()
        .find(|(c, _)| *c == code)
        .map(|(_, reason)| *reason)
}

/// Whether and where a refusal is reported.
pub fn reported(error: &Error) -> Option<On> {
    match error {
        Error::Exchange(e) | Error::Remembered { error: e, .. } => match e.fault() {
            Fault::Node => Some(On::Node),
            Fault::Token => pod_reason(e.code()).map(On::Pod),
            Fault::Transient => None,
        },
        Error::Token(TokenError::Expired(_)) => pod_reason(error.code()).map(On::Pod),
        _ => None,
    }
}

/// A refusal on its way to the task.
struct Report {
    on: On,
    token: Option<Token>,
    /// Who the token is, as the request path verified it.
    pod: Option<Arc<PodIdentity>>,
    code: String,
    status: u16,
}

/// The reporting side, held by the request handler and the cache; cheap to clone.
#[derive(Clone)]
pub struct Events {
    tx: mpsc::Sender<Report>,
    counted: Option<prometheus::IntCounterVec>,
}

impl Events {
    /// Start the task on `tasks` until `stop`, calling the API server through `client` (the
    /// agent's one client).
    pub fn start(
        settings: &EventSettings,
        client: Arc<KubeClient>,
        verifier: Option<Arc<Verifier>>,
        counted: Option<prometheus::IntCounterVec>,
        tasks: &TaskTracker,
        stop: CancellationToken,
    ) -> Events {
        if verifier.is_none() {
            tracing::info!(
                "Events on the Node only: without token verification no pod can be named"
            );
        }
        let (tx, rx) = mpsc::channel(settings.queue.max(1));
        let worker = worker::Worker::new(settings, client, verifier, counted.clone());
        tasks.spawn(worker.run(rx, stop));
        Events { tx, counted }
    }

    /// Report a refused request (see the module contract): `token` as the request carried it,
    /// if it parsed, and `pod`, who the request path verified it to be, if it did. Never waits.
    pub fn refused(&self, token: Option<&Token>, pod: Option<&Arc<PodIdentity>>, error: &Error) {
        let Some(on) = reported(error) else { return };
        let report = Report {
            on,
            token: token.cloned(),
            pod: pod.cloned(),
            code: error.code().chars().take(64).collect(),
            status: error.status(),
        };
        if self.tx.try_send(report).is_err() {
            count(&self.counted, on, "dropped");
        }
    }

    /// Report a refusal of the node's own credentials that no request saw (a background
    /// refresh's); anything else is not reported. Never waits.
    pub fn node_refused(&self, e: &ExchangeError) {
        if e.fault() == Fault::Node {
            self.refused(None, None, &Error::Exchange(e.clone()));
        }
    }
}

fn count(counted: &Option<prometheus::IntCounterVec>, on: On, result: &str) {
    if let Some(c) = counted {
        c.with_label_values(&[on.label(), result]).inc();
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::eks_auth::{known_codes, status_of_code, ExchangeError};

    fn upstream(status: u16, code: &str, message: &str) -> Error {
        Error::Exchange(ExchangeError::Service {
            status,
            code: code.into(),
            message: message.into(),
            request_id: None,
        })
    }

    /// Every answer the agent can refuse a pod with: each EKS Auth code at its own status and
    /// at 403, both kinds of AccessDeniedException, remembered refusals, and the agent's own.
    fn every_refusal() -> Vec<Error> {
        let mut all = Vec::new();
        for code in known_codes().chain(["UnknownError", "SomethingNew"]) {
            for status in [status_of_code(code).unwrap_or(400), 403] {
                all.push(upstream(status, code, "m"));
            }
        }
        all.push(upstream(400, "AccessDeniedException", "User: arn:aws:sts::1:assumed-role/node/i-1 is not authorized to perform: eks-auth:AssumeRoleForPodIdentity"));
        all.push(Error::Remembered {
            error: ExchangeError::Service {
                status: 404,
                code: "ResourceNotFoundException".into(),
                message: "m".into(),
                request_id: None,
            },
            age_s: 1,
            ttl_s: 60,
        });
        all.extend([
            TokenError::Missing.into(),
            TokenError::Expired(5).into(),
            TokenError::NotYetValid(5).into(),
            TokenError::Malformed("x").into(),
            TokenError::TooLarge(1).into(),
            Error::Unverified("bad signature".into()),
            Error::OtherNode("node-b".into()),
            Error::ClientOverBudget(Duration::from_secs(1)),
            Error::NodeOverBudget(Duration::from_secs(1)),
            Error::ShuttingDown,
            ExchangeError::Unavailable("x".into()).into(),
            ExchangeError::BadResponse("x".into()).into(),
            Error::HostNotAllowed("x".into()),
        ]);
        all
    }

    /// One table: the Event's words for a refusal are the table's for the same code on the
    /// Event's side, which `diagnose`'s words for the code contain, and every code reported is
    /// one the table explains (never its catch-all).
    #[test]
    fn every_reported_refusal_says_what_diagnose_says() {
        use crate::explain::{explain, explained};
        let catch_all = explain("SomethingNew", 400, None);
        let mut pod_codes = std::collections::BTreeSet::new();
        let mut node_codes = std::collections::BTreeSet::new();
        for e in every_refusal() {
            let Some(on) = reported(&e) else { continue };
            let (code, status) = (e.code(), e.status());
            let side = Some(on.side());
            assert_eq!(
                body::note(code, status, on),
                explained(code, status, side),
                "{code}"
            );
            assert!(explain(code, status, None).contains(explain(code, status, side)));
            assert_ne!(explain(code, status, side), catch_all, "{code} {status}");
            match on {
                On::Pod(reason) => {
                    assert_eq!(pod_reason(code), Some(reason));
                    pod_codes.insert(code.to_owned());
                }
                On::Node => {
                    node_codes.insert(code.to_owned());
                }
            }
        }
        // The pod's own refusals, and no row of the table unreachable.
        let table: std::collections::BTreeSet<String> =
            POD_REASONS.iter().map(|(c, _)| (*c).to_owned()).collect();
        assert_eq!(pod_codes, table);
        // The node's: every code EKS Auth refuses the node's credentials with.
        for code in [
            "AccessDeniedException",
            "UnrecognizedClientException",
            "InvalidSignatureException",
            "ExpiredTokenException",
        ] {
            assert!(node_codes.contains(code), "{code}: {node_codes:?}");
        }
        // Not the pod's doing, or not a verified statement about it: no Event.
        for e in [
            upstream(400, "InvalidParameterException", "m"),
            upstream(429, "ThrottlingException", "m"),
            Error::Unverified("x".into()),
            Error::OtherNode("b".into()),
            TokenError::NotYetValid(5).into(),
        ] {
            assert_eq!(reported(&e), None, "{}", e.code());
        }
    }
}
