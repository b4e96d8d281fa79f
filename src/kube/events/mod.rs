//! Events: why a pod gets no credentials, put where people look first (`kubectl describe pod`),
//! and a warning on the Node when EKS Auth refuses the node's own credentials.
//!
//! Contract: [`Events::refused`] is told of every credential request the agent refuses, beside
//! its audit line, and never waits: it picks the refusals [`reported`] names and puts them on a
//! bounded queue (full: dropped and counted). One task ([`Events::start`], on the server's
//! tracker, stopped with it) turns the queue into `events.k8s.io/v1` Events, type `Warning`,
//! reporting controller `pod-identity-agent`, reporting instance the node's name:
//! - on the **pod**, for a refusal that is the pod's own doing ([`POD_REASONS`]: no association,
//!   its role's trust policy, an expired or invalid token), and only when the keys the agent
//!   holds verify the token ([`Verifier::identify_held`]) and it names no other node: the
//!   `regarding` object (namespace, name, uid) comes from verified claims, which no one can
//!   choose. An unverified token (verification off included) gets no pod Event;
//! - on the **Node** (`--node-name`, in namespace `default` as the kubelet's), for a refusal of
//!   the node's own credentials or permissions ([`Fault::Node`]).
//!
//! The note is `diagnose`'s words for the code ([`crate::diagnose::explained`]): one table, so an
//! Event and `diagnose` never disagree. It never carries a token, nor EKS Auth's message (which
//! names the node's role and instance).
//!
//! Deduplicated: one Event per object and reason per `interval`; repeats within it are counted
//! into the Event's `series` (`count`, `lastObservedTime`, sent as a merge patch at most every
//! `series_every` and once more when the interval ends), which `kubectl describe` shows as
//! `(x12 over 3m)`. Rate-limited per node: creates and patches share one token bucket (`burst`,
//! then `rate` a second), and no more than [`IN_FLIGHT`] calls run at once; a refusal past the
//! budget is kept in its series' count and sent by a later create or patch. Verifying tokens for
//! Events has a budget of its own ([`VERIFY_RATE`]). Memory is bounded: at most `max_series`
//! series, and verdicts remembered for [`REMEMBERED_TOKENS`] tokens. A call that fails (after
//! the client's own retries) is counted, and its series sends nothing more; the client logs a
//! 403 once. Counted in `pod_identity_events_total{object,result}`.

use super::{is_dns_subdomain, KubeClient, KubeError, KubeSettings};
use crate::bucket::TokenBucket;
use crate::eks_auth::Fault;
use crate::error::Error;
use crate::token::{PodIdentity, Token, TokenError, TokenHash};
use crate::verify::Verifier;
use bytes::Bytes;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The refusals reported on the pod: the code the pod was answered with, and the Event's reason.
/// Only the pod's own doing (its token, its association, its role's trust policy); what a code
/// means is `diagnose`'s table. Keyed by the code string, so it moves with the codes.
pub const POD_REASONS: &[(&str, &str)] = &[
    ("ResourceNotFoundException", "PodIdentityNoAssociation"),
    ("AccessDeniedException", "PodIdentityRoleNotTrusted"),
    ("ExpiredTokenException", "PodIdentityTokenExpired"),
    ("ExpiredToken", "PodIdentityTokenExpired"),
    ("InvalidTokenException", "PodIdentityTokenInvalid"),
];
/// The reason of the Node's Event when EKS Auth refuses the node's own credentials.
pub const NODE_REASON: &str = "PodIdentityNodeCredentialsRefused";
/// `reportingController`, and what `kubectl describe` shows under "From".
pub const CONTROLLER: &str = "pod-identity-agent";
/// The Event's `action`.
const ACTION: &str = "AssumeRoleForPodIdentity";
/// API calls under way at once; past it, a call waits for a later refusal or tick.
pub const IN_FLIGHT: usize = 4;
/// Tokens whose verdict is remembered, so a flood of one token is verified once.
pub const REMEMBERED_TOKENS: u64 = 1024;
/// Verifications for Events per second (and at once): a flood of forged tokens costs the
/// worker no more than this.
pub const VERIFY_RATE: u32 = 100;
/// Notes longer than this are cut (the API server's limit is 1 KiB).
const MAX_NOTE: usize = 1000;
/// An Event whose `series` is patched is found at this path under its namespace.
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces";

/// `--events`, with the API server and this node.
#[derive(Debug, Clone)]
pub struct EventSettings {
    pub kube: KubeSettings,
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
    pub fn new(kube: KubeSettings, node: String) -> EventSettings {
        EventSettings {
            kube,
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
    code: String,
    status: u16,
}

/// The reporting side, held by the request handler; cheap to clone.
#[derive(Clone)]
pub struct Events {
    tx: mpsc::Sender<Report>,
    counted: Option<prometheus::IntCounterVec>,
}

impl Events {
    /// Start the task on `tasks` until `stop`; `None` if the API client cannot be built (a CA
    /// that cannot be read), which is logged.
    pub fn start(
        settings: &EventSettings,
        verifier: Option<Arc<Verifier>>,
        counted: Option<prometheus::IntCounterVec>,
        kube_calls: Option<prometheus::IntCounterVec>,
        tasks: &TaskTracker,
        stop: CancellationToken,
    ) -> Option<Events> {
        let client = match KubeClient::new(settings.kube.clone(), kube_calls) {
            Ok(c) => Arc::new(c),
            Err(e) => {
                tracing::error!(error = %e, "cannot reach the API server for Events; refusals are in the audit trail only");
                return None;
            }
        };
        if verifier.is_none() {
            tracing::info!(
                "Events on the Node only: without token verification no pod can be named"
            );
        }
        let (tx, rx) = mpsc::channel(settings.queue.max(1));
        let worker = Worker {
            settings: settings.clone(),
            client,
            verifier,
            verdicts: moka::sync::Cache::builder()
                .max_capacity(REMEMBERED_TOKENS)
                .time_to_live(settings.interval)
                .build(),
            verify_budget: TokenBucket::with_burst(f64::from(VERIFY_RATE), VERIFY_RATE),
            budget: TokenBucket::with_burst(settings.rate, settings.burst),
            series: HashMap::new(),
            calls: JoinSet::new(),
            counted: counted.clone(),
        };
        tasks.spawn(worker.run(rx, stop));
        Some(Events { tx, counted })
    }

    /// Report a refused request (see the module contract): `token` as the request carried it,
    /// if it parsed. Never waits.
    pub fn refused(&self, token: Option<&Token>, error: &Error) {
        let Some(on) = reported(error) else { return };
        let report = Report {
            on,
            token: token.cloned(),
            code: error.code().chars().take(64).collect(),
            status: error.status(),
        };
        if self.tx.try_send(report).is_err() {
            count(&self.counted, on, "dropped");
        }
    }
}

fn count(counted: &Option<prometheus::IntCounterVec>, on: On, result: &str) {
    if let Some(c) = counted {
        c.with_label_values(&[on.label(), result]).inc();
    }
}

/// One object and reason within an interval.
struct Series {
    on: On,
    /// The Event's namespace and name, and what its name starts with (the object's name).
    namespace: String,
    name: String,
    base: String,
    /// The object it is about.
    regarding: Value,
    note: String,
    started: Instant,
    /// Refusals counted, and how many of them the API server has (0: no Event yet).
    count: u32,
    reported: u32,
    last_observed: SystemTime,
    last_sent: Option<Instant>,
    in_flight: bool,
    /// A call failed: nothing more is sent for this series.
    given_up: bool,
}

type Key = (String, &'static str);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    Create,
    Patch,
}

struct Worker {
    settings: EventSettings,
    client: Arc<KubeClient>,
    verifier: Option<Arc<Verifier>>,
    /// Verdicts by token: who the token is, if verified.
    verdicts: moka::sync::Cache<TokenHash, Option<Arc<PodIdentity>>>,
    verify_budget: TokenBucket,
    budget: TokenBucket,
    series: HashMap<Key, Series>,
    calls: JoinSet<(Key, Call, u32, Result<(), KubeError>)>,
    counted: Option<prometheus::IntCounterVec>,
}

impl Worker {
    async fn run(mut self, mut rx: mpsc::Receiver<Report>, stop: CancellationToken) {
        let mut tick =
            tokio::time::interval(self.settings.series_every.max(Duration::from_millis(10)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                report = rx.recv() => match report {
                    Some(r) => self.report(r).await,
                    None => return,
                },
                Some(joined) = self.calls.join_next() => {
                    // A call cannot panic (no unwrap on its path); one that did leaves its series
                    // marked under way until the agent stops, which costs that series only.
                    if let Ok((key, call, sent, result)) = joined {
                        self.done(key, call, sent, result);
                    }
                }
                _ = tick.tick() => self.tick(),
            }
        }
    }

    fn count(&self, on: On, result: &str) {
        count(&self.counted, on, result);
    }

    /// Who `token` is, if the keys held verify it and it names no other node.
    async fn pod(&self, token: &Token) -> Option<Arc<PodIdentity>> {
        let verifier = self.verifier.as_ref()?;
        if let Some(known) = self.verdicts.get(&token.hash()) {
            return known;
        }
        self.verify_budget.try_take().ok()?;
        let id = verifier
            .identify_held(token)
            .await
            .filter(|id| {
                id.node_name
                    .as_deref()
                    .is_none_or(|n| n == self.settings.node)
            })
            .filter(|id| {
                is_dns_subdomain(&id.namespace)
                    && is_dns_subdomain(&id.pod_name)
                    && id.pod_uid.len() <= 128
            })
            .map(Arc::new);
        // "Not verified" is final only once keys are held: before, the same token may verify.
        if id.is_some() || verifier.keys().is_some() {
            self.verdicts.insert(token.hash(), id.clone());
        }
        id
    }

    async fn report(&mut self, r: Report) {
        let (key, namespace, base, regarding) = match r.on {
            On::Node => (
                (String::new(), NODE_REASON),
                "default".to_owned(),
                self.settings.node.clone(),
                json!({"apiVersion": "v1", "kind": "Node", "name": self.settings.node,
                       "uid": self.settings.node}),
            ),
            On::Pod(reason) => {
                let Some(id) = (match &r.token {
                    Some(t) => self.pod(t).await,
                    None => None,
                }) else {
                    self.count(r.on, "unverified");
                    return;
                };
                (
                    (id.pod_uid.clone(), reason),
                    id.namespace.clone(),
                    id.pod_name.clone(),
                    json!({"apiVersion": "v1", "kind": "Pod", "namespace": id.namespace,
                           "name": id.pod_name, "uid": id.pod_uid}),
                )
            }
        };
        let now = Instant::now();
        if let Some(s) = self.series.get_mut(&key) {
            if now < s.started + self.settings.interval {
                s.count = s.count.saturating_add(1);
                s.last_observed = SystemTime::now();
                if s.reported == 0 && !s.in_flight && !s.given_up {
                    self.send(&key, Call::Create);
                } else {
                    self.count(r.on, "deduplicated");
                }
                return;
            }
            // The interval is over: what it counted goes out with the series' last patch.
            self.flush(&key);
            self.series.remove(&key);
        }
        if self.series.len() >= self.settings.max_series {
            self.purge(now);
            if self.series.len() >= self.settings.max_series {
                self.count(r.on, "dropped");
                return;
            }
        }
        let first = SystemTime::now();
        self.series.insert(
            key.clone(),
            Series {
                on: r.on,
                name: event_name(&base, &key, first),
                base,
                namespace,
                regarding,
                note: note(&r.code, r.status),
                started: now,
                count: 1,
                reported: 0,
                last_observed: first,
                last_sent: None,
                in_flight: false,
                given_up: false,
            },
        );
        self.send(&key, Call::Create);
    }

    /// Create the series' Event or send its count, within the node's budget.
    fn send(&mut self, key: &Key, call: Call) {
        let Some(s) = self.series.get_mut(key) else {
            return;
        };
        if self.calls.len() >= IN_FLIGHT || self.budget.try_take().is_err() {
            count(&self.counted, s.on, "rate_limited");
            return;
        }
        s.in_flight = true;
        s.last_sent = Some(Instant::now());
        let sent = s.count;
        let client = self.client.clone();
        let collection = format!("{EVENTS}/{}/events", s.namespace);
        let (path, body) = match call {
            Call::Create => (collection, create_body(s, &self.settings.node)),
            Call::Patch => (format!("{collection}/{}", s.name), patch_body(s)),
        };
        let key = key.clone();
        self.calls.spawn(async move {
            let result = match call {
                Call::Create => client.post(&path, body).await,
                Call::Patch => {
                    client
                        .patch(&path, "application/merge-patch+json", body)
                        .await
                }
            };
            (key, call, sent, result.map(|_| ()))
        });
    }

    fn done(&mut self, key: Key, call: Call, sent: u32, result: Result<(), KubeError>) {
        let Some(s) = self.series.get_mut(&key) else {
            return;
        };
        s.in_flight = false;
        let on = s.on;
        match result {
            Ok(()) => {
                s.reported = sent;
                self.count(
                    on,
                    if call == Call::Create {
                        "sent"
                    } else {
                        "updated"
                    },
                );
            }
            Err(KubeError::Status(404)) if call == Call::Patch => {
                // The Event is gone (its TTL, or deleted): the next report creates a new one.
                s.reported = 0;
                s.name = event_name(&s.base, &key, SystemTime::now());
                self.count(on, "failed");
            }
            Err(e) => {
                s.given_up = true;
                tracing::debug!(reason = key.1, error = %e, "an Event could not be sent");
                self.count(on, "failed");
            }
        }
    }

    /// Send what the series counted since its last call, if anything.
    fn flush(&mut self, key: &Key) {
        let Some(s) = self.series.get(key) else {
            return;
        };
        if s.in_flight || s.given_up || s.count <= s.reported {
            return;
        }
        let call = if s.reported == 0 {
            Call::Create
        } else {
            Call::Patch
        };
        self.send(key, call);
    }

    /// Send counts that are due, create Events the budget held back, end series whose interval
    /// is over.
    fn tick(&mut self) {
        let now = Instant::now();
        let (interval, every) = (self.settings.interval, self.settings.series_every);
        let due: Vec<Key> = self
            .series
            .iter()
            .filter(|(_, s)| {
                let over = now >= s.started + interval;
                let quiet = s.last_sent.is_none_or(|t| now >= t + every);
                s.count > s.reported && (over || quiet || s.reported == 0)
            })
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            self.flush(&key);
        }
        self.purge(now);
    }

    /// Forget series whose interval is over and that have nothing under way.
    fn purge(&mut self, now: Instant) {
        let interval = self.settings.interval;
        self.series
            .retain(|_, s| s.in_flight || now < s.started + interval);
    }
}

/// The Event's note: `diagnose`'s words for the code.
pub fn note(code: &str, status: u16) -> String {
    let words = crate::diagnose::explained(code, status);
    match words.char_indices().nth(MAX_NOTE) {
        Some((at, _)) => format!("{}…", &words[..at]),
        None => words,
    }
}

/// `<object>.<16 hex digits>`, unique per series, at most 253 characters.
fn event_name(base: &str, key: &Key, first: SystemTime) -> String {
    let mut h = Sha256::new();
    for part in [key.0.as_bytes(), key.1.as_bytes(), base.as_bytes()] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    h.update(crate::util::millis(first).to_be_bytes());
    h.update(fastrand::u64(..).to_be_bytes());
    let digest = h.finalize();
    let suffix: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    let base: String = base.chars().take(253 - 17).collect();
    format!("{}.{suffix}", base.trim_end_matches(['-', '.']))
}

fn micro_time(t: SystemTime) -> String {
    humantime::format_rfc3339_micros(t).to_string()
}

/// A new Event of the series, with its count so far if it has more than one.
fn create_body(s: &Series, node: &str) -> Bytes {
    let mut event = json!({
        "apiVersion": "events.k8s.io/v1",
        "kind": "Event",
        "metadata": {"name": s.name, "namespace": s.namespace},
        "eventTime": micro_time(SystemTime::now()),
        "reportingController": CONTROLLER,
        // This node, as the kubelet reports its own Events.
        "reportingInstance": node.chars().take(128).collect::<String>(),
        "action": ACTION,
        "reason": s.on.reason(),
        "regarding": s.regarding,
        "note": s.note,
        "type": "Warning",
    });
    if s.count > 1 {
        event["series"] = series(s);
    }
    Bytes::from(serde_json::to_vec(&event).unwrap_or_default())
}

fn series(s: &Series) -> Value {
    json!({"count": s.count, "lastObservedTime": micro_time(s.last_observed)})
}

/// The merge patch that sends the series' count.
fn patch_body(s: &Series) -> Bytes {
    Bytes::from(serde_json::to_vec(&json!({"series": series(s)})).unwrap_or_default())
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

    /// One table: the Event's words for a refusal are `diagnose`'s for the same code, and
    /// every code reported is one `diagnose` explains (never its catch-all).
    #[test]
    fn every_reported_refusal_says_what_diagnose_says() {
        let catch_all = crate::diagnose::explain("SomethingNew", 400);
        let mut pod_codes = std::collections::BTreeSet::new();
        let mut node_codes = std::collections::BTreeSet::new();
        for e in every_refusal() {
            let Some(on) = reported(&e) else { continue };
            let (code, status) = (e.code(), e.status());
            assert_eq!(
                note(code, status),
                crate::diagnose::explained(code, status),
                "{code}"
            );
            assert_ne!(
                crate::diagnose::explain(code, status),
                catch_all,
                "{code} {status}"
            );
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

    #[test]
    fn event_names_are_unique_dns_subdomains() {
        let key: Key = ("uid-1".into(), "PodIdentityNoAssociation");
        let now = SystemTime::now();
        let a = event_name("api-7d9c.v2", &key, now);
        let b = event_name("api-7d9c.v2", &key, now);
        assert_ne!(a, b);
        assert!(a.starts_with("api-7d9c.v2.") && is_dns_subdomain(&a), "{a}");
        let long = event_name(&"x".repeat(253), &key, now);
        assert!(long.len() <= 253 && is_dns_subdomain(&long), "{long}");
    }
}
