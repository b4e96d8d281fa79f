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
//! | `access_key_id`, `expiration` | the issued key id (not secret, in CloudTrail), its expiry | — | the key id and expiry delivered |
//! | `request_id` | EKS Auth's request id | — | — |
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

/// The schema's one reader, shared with the integration tests.
#[cfg(test)]
#[path = "../tests/it/support/audit_schema.rs"]
mod schema;

#[cfg(test)]
mod tests {
    use super::schema;
    use super::testing::*;
    use super::*;
    use std::collections::BTreeSet;

    /// The keys of the module's table, by event: a key renamed or dropped fails here.
    fn documented(event: &str) -> BTreeSet<String> {
        schema::documented(include_str!("audit.rs"), event)
    }

    fn every_kind_of_line(token: &Token, creds: &Credentials) {
        let client: IpAddr = "10.0.0.7".parse().expect("ip");
        let identity = Identity {
            assumed_role_arn: "arn:aws:sts::111122223333:assumed-role/r/s".into(),
            association_id: "a-1".into(),
            association_arn: "arn:aws:eks:us-west-2:111122223333:podidentityassociation/c/a-1"
                .into(),
            request_id: "req-1".into(),
        };
        exchange(
            token,
            Trigger::Request(Some(client)),
            Ok((&identity, creds)),
        );
        let refused = ExchangeError::Service {
            status: 404,
            code: "ResourceNotFoundException".into(),
            message: "no association".into(),
            request_id: Some("req-2".into()),
        };
        exchange(token, Trigger::Refresh, Err(&refused));
        refusal(
            client,
            Some(token),
            404,
            "ResourceNotFoundException",
            Decided::EksAuth,
            0,
        );
        refusal(client, None, 400, "MissingToken", Decided::Locally, 3);
        delivery(client, token, "hit", creds, 0);
    }

    /// Every line has exactly the documented keys of its event (plus the log format's own),
    /// all present, with the values the table names.
    #[test]
    fn each_line_has_its_events_schema() {
        let (captured, _guard) = Captured::start();
        let token = Token::parse(pod_token("team-a", "web-1").as_bytes()).expect("token");
        every_kind_of_line(&token, &credentials());
        let lines = captured.audit_lines();
        assert_eq!(lines.len(), 5, "{}", captured.text());
        for line in &lines {
            let event = line["event"].as_str().expect("event");
            let keys: BTreeSet<String> = line
                .as_object()
                .expect("object")
                .keys()
                .filter(|k| !matches!(k.as_str(), "timestamp" | "level" | "target" | "message"))
                .cloned()
                .collect();
            assert_eq!(keys, documented(event), "{line}");
            assert_eq!(line["level"], "INFO");
        }
        let (ok, failed, by_pod, before_parse, delivered) =
            (&lines[0], &lines[1], &lines[2], &lines[3], &lines[4]);
        assert_eq!(ok["outcome"], "success");
        assert_eq!(ok["client"], "10.0.0.7");
        assert_eq!(ok["namespace"], "team-a");
        assert_eq!(ok["pod"], "web-1");
        assert_eq!(ok["token"], token.hash().to_string());
        assert_eq!(ok["association_id"], "a-1");
        assert_eq!(ok["access_key_id"], "ASIAAUDITEXAMPLE");
        assert_eq!(failed["trigger"], "refresh");
        assert_eq!(failed["client"], "");
        assert_eq!(failed["fault"], "token");
        assert_eq!(failed["request_id"], "req-2");
        assert_eq!(by_pod["decided"], "eks_auth");
        assert_eq!(by_pod["status"], 404);
        // Refused before the token parsed: every key still there, empty.
        assert_eq!(before_parse["decided"], "locally");
        assert_eq!(before_parse["token"], "");
        assert_eq!(before_parse["namespace"], "");
        assert_eq!(before_parse["not_logged"], 3);
        assert_eq!(delivered["outcome"], "hit");
    }

    /// No line, of any event, carries the token (or any of its segments), the secret key or
    /// the session token.
    #[test]
    fn no_line_carries_a_secret() {
        let (captured, _guard) = Captured::start();
        let raw = pod_token("team-b", "api-1");
        let token = Token::parse(raw.as_bytes()).expect("token");
        every_kind_of_line(&token, &credentials());
        let text = captured.text();
        assert!(captured.audit_lines().len() == 5, "{text}");
        for secret in raw.split('.').chain([SECRET_KEY, SESSION_TOKEN]) {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
    }

    /// A line is written only when the client's pacer allows one, and then says how many of
    /// that client's were held back; another client is not held back by the first.
    #[tokio::test(start_paused = true)]
    async fn a_flooding_client_gets_bounded_lines_that_count_the_rest() {
        let (captured, _guard) = Captured::start();
        let pacer = Pacer::default();
        let flood: IpAddr = "10.0.0.8".parse().expect("ip");
        let other: IpAddr = "10.0.0.9".parse().expect("ip");
        let write = |ip: IpAddr| {
            if let Some(not_logged) = pacer.allow(ClientKey::Source(ip)) {
                refusal(ip, None, 400, "MissingToken", Decided::Locally, not_logged);
            }
        };
        for _ in 0..500 {
            write(flood);
        }
        write(other);
        tokio::time::sleep(Duration::from_secs(1)).await;
        write(flood);
        let lines = captured.audit_lines();
        let of = |ip: &str| {
            lines
                .iter()
                .filter(|l| l["client"] == ip)
                .collect::<Vec<_>>()
        };
        let flooded = of("10.0.0.8");
        assert_eq!(flooded.len(), REFUSAL_LINES_BURST as usize + 1);
        assert_eq!(
            flooded.last().expect("a line")["not_logged"],
            500 - u64::from(REFUSAL_LINES_BURST)
        );
        assert_eq!(of("10.0.0.9").len(), 1);
        assert_eq!(of("10.0.0.9")[0]["not_logged"], 0);
    }

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

/// What the handler's and this module's tests share: log lines captured as the agent writes
/// them, a pod's token, credentials with known secrets.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use crate::credentials::Unvalidated;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    use serde_json::{json, Value};
    use std::sync::Mutex;
    use std::time::{SystemTime, UNIX_EPOCH};

    /// Log lines written while a [`Captured::start`] guard lives on this thread, as the agent
    /// writes them (`--log-format json`).
    #[derive(Clone, Default)]
    pub(crate) struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let mut bytes = self.0.lock().unwrap_or_else(|p| p.into_inner());
            bytes.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Captured {
            self.clone()
        }
    }

    impl Captured {
        pub(crate) fn start() -> (Captured, tracing::subscriber::DefaultGuard) {
            let captured = Captured::default();
            let subscriber = tracing_subscriber::fmt()
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_span_list(false)
                .with_max_level(tracing::Level::INFO)
                .with_writer(captured.clone())
                .finish();
            (captured, tracing::subscriber::set_default(subscriber))
        }

        pub(crate) fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|p| p.into_inner())).into()
        }

        /// The audit lines, each a JSON object.
        pub(crate) fn audit_lines(&self) -> Vec<Value> {
            self.text()
                .lines()
                .map(|l| serde_json::from_str::<Value>(l).expect("a JSON line"))
                .filter(|v| v["target"] == TARGET)
                .collect()
        }
    }

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }

    /// A service-account token for `pod` in `ns`, valid for an hour, with a signature nobody
    /// checks (the agent checks none without `--token-issuer`).
    pub(crate) fn pod_token(ns: &str, pod: &str) -> String {
        let claims = json!({"aud": ["pods.eks.amazonaws.com"], "exp": now() + 3600,
            "nbf": now(), "iat": now(), "sub": format!("system:serviceaccount:{ns}:app"),
            "kubernetes.io": {"namespace": ns, "pod": {"name": pod, "uid": format!("{pod}-uid")},
                "serviceaccount": {"name": "app", "uid": "sa-uid"}}});
        format!(
            "{}.{}.{}",
            URL_SAFE_NO_PAD.encode(json!({"alg": "RS256", "kid": "k1"}).to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string()),
            URL_SAFE_NO_PAD.encode(b"signature-nobody-checks"),
        )
    }

    pub(crate) const SECRET_KEY: &str = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYSECRETKEY";
    pub(crate) const SESSION_TOKEN: &str = "IQoJb3JpZ2luX2VjSESSIONTOKEN";

    pub(crate) fn credentials() -> Credentials {
        Credentials::validate(
            Unvalidated {
                access_key_id: "ASIAAUDITEXAMPLE",
                secret_access_key: SECRET_KEY,
                session_token: SESSION_TOKEN,
                expiration: SystemTime::now() + Duration::from_secs(3600),
                assumed_role_arn: "arn:aws:sts::111122223333:assumed-role/r/s",
            },
            SystemTime::now(),
        )
        .expect("valid credentials")
    }
}
