//! Local verification of service-account tokens against the cluster's keys, so that a verified
//! token, not a source address, says who a client is, and a forged one costs no EKS Auth call.
//!
//! Contract: [`Verifier::verify`] checks a token the way EKS Auth does, before any exchange:
//! an RS256 or ES256 signature by a key of the cluster ([`keys`], from a [`source`]), `iss` equal
//! to the keys' issuer and `aud` containing `pods.eks.amazonaws.com`. (Time claims are checked for
//! every request elsewhere.) Its [`Verdict`]:
//! - `Verified`: the token's [`PodIdentity`] can be trusted (budgets per pod, the pod's cached
//!   credentials after its token rotates, node binding);
//! - `Refused`: the token is not the cluster's (bad signature, wrong issuer or audience, or a key
//!   the cluster does not publish although keys were fetched after the token was issued). It is
//!   answered 400 without asking EKS Auth; it is remembered only when no key set could explain
//!   the failure (a key the agent holds, and the signature does not match);
//! - `Unverifiable`: no keys could be had yet, or the token names a key the agent has not fetched
//!   and no fetch started after the token was issued. The token goes on to EKS Auth exactly as
//!   without verification: verification never blocks a genuine token.
//!
//! Keys are fetched at start (unless a predecessor handed them over, or the state directory
//! holds fresh ones), then every `refresh_every`. A token naming a key the agent does not hold
//! causes a fetch unless one started after the token was issued (after its `iat` plus a margin
//! for whole seconds and clock skew, or after the token arrived); such fetches are shared by
//! every request waiting for one and start at most every `fetch_floor` (a request waits for the
//! next one rather than go unverified), and, when a fetch after the token's issue already found
//! no such key, again only every `min_refresh_interval` (an issuer that published late heals).
//! So made-up `kid`s cost at most one fetch a second and no EKS Auth call. A request waits at
//! most `wait_for_keys` for a fetch, which goes on without it. A failed fetch keeps the keys
//! held. A key the issuer stops publishing is recognised for `grace` after the fetch that found
//! it gone ([`keys`]): a token it signs is `Unverifiable`, never trusted (the key may have been
//! revoked) and never refused (the rotation may still be propagating). Fetches are timed on the
//! monotonic clock. A fetch that changed the keys is kept in the state directory (mode 0600), so
//! a restart starts with keys.

pub mod keys;
pub mod source;

use crate::jwt::Jws;
use crate::token::{PodIdentity, Token, AUDIENCE};
use crate::util::LogEvery;
use keys::{KeySet, Stored};
use serde::Deserialize;
use source::KeySource;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The state file's name in the state directory.
pub const KEYS_FILE: &str = "verification-keys.json";
/// Stored key sets larger than this are not read.
const MAX_STORED: u64 = 1024 * 1024;
/// Retries of the first fetch when no keys are held, doubling up to the refresh interval.
const RETRY_FIRST: Duration = Duration::from_secs(5);
/// How long after a token's `iat` a fetch must have started to be sure to hold its key.
const ISSUE_MARGIN: Duration = Duration::from_secs(2);
/// At most one warning this often that tokens went to EKS Auth unverified.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// Where the keys come from, as configured.
#[derive(Debug, Clone)]
pub enum KeysFrom {
    /// The API server, through the agent's one client ([`crate::kube`]).
    ApiServer,
    /// An issuer's discovery document.
    Issuer {
        issuer: String,
        discovery_url: String,
    },
}

impl KeysFrom {
    /// The source these settings name; the API server's through `kube`, the agent's client.
    pub fn source(&self, kube: Option<&Arc<crate::kube::KubeClient>>) -> Result<KeySource, String> {
        match self {
            KeysFrom::ApiServer => kube
                .map(|k| KeySource::ApiServer(k.clone()))
                .ok_or_else(|| "no Kubernetes API client (see the error above)".to_owned()),
            KeysFrom::Issuer {
                issuer,
                discovery_url,
            } => KeySource::discovery(issuer, discovery_url),
        }
    }
}

/// Verification, as configured: where keys come from and how they are used.
#[derive(Debug, Clone)]
pub struct VerificationSettings {
    pub keys: KeysFrom,
    pub verify: VerifySettings,
}

/// How verification runs.
#[derive(Debug, Clone)]
pub struct VerifySettings {
    /// The audience every token must name.
    pub audience: String,
    /// Fetches caused by tokens happen at most this often.
    pub fetch_floor: Duration,
    /// After a fetch that started after a token's issue, an unknown `kid` fetches again only
    /// this long after the last attempt (heals an issuer that published late).
    pub min_refresh_interval: Duration,
    /// Keys are fetched again this often regardless.
    pub refresh_every: Duration,
    /// One fetch may take this long.
    pub fetch_timeout: Duration,
    /// Keys the issuer stopped publishing stay trusted this long.
    pub grace: Duration,
    /// How long a request waits for a fetch it needs.
    pub wait_for_keys: Duration,
    /// Where fetched keys are kept across restarts.
    pub state_file: Option<PathBuf>,
}

impl Default for VerifySettings {
    fn default() -> Self {
        use crate::defaults::*;
        VerifySettings {
            audience: AUDIENCE.to_owned(),
            fetch_floor: DEFAULT_VERIFY_FETCH_FLOOR,
            min_refresh_interval: DEFAULT_VERIFY_MIN_REFRESH_INTERVAL,
            refresh_every: DEFAULT_VERIFY_REFRESH_EVERY,
            fetch_timeout: DEFAULT_VERIFY_FETCH_TIMEOUT,
            grace: DEFAULT_VERIFY_GRACE,
            wait_for_keys: DEFAULT_VERIFY_WAIT_FOR_KEYS,
            state_file: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Verified(PodIdentity),
    /// Not the cluster's token; `remember` when no key set could explain it.
    Refused {
        why: String,
        remember: bool,
    },
    Unverifiable(String),
}

impl Verdict {
    pub fn label(&self) -> &'static str {
        match self {
            Verdict::Verified(_) => "verified",
            Verdict::Refused { .. } => "refused",
            Verdict::Unverifiable(_) => "unverifiable",
        }
    }
}

/// Whether the verifier has keys, for readiness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeysState {
    /// No fetch has finished yet.
    Pending,
    /// Keys are held.
    Loaded,
    /// A fetch failed and no keys are held: tokens go to EKS Auth unverified.
    Unavailable,
}

/// The claims verification reads.
#[derive(Deserialize)]
struct Claims {
    iss: Option<String>,
    aud: Option<Audience>,
    iat: Option<f64>,
    #[serde(rename = "kubernetes.io")]
    kubernetes: Option<KubernetesClaims>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct Named {
    name: Option<String>,
    uid: Option<String>,
}

#[derive(Deserialize)]
struct KubernetesClaims {
    namespace: Option<String>,
    pod: Option<Named>,
    serviceaccount: Option<Named>,
    node: Option<Named>,
}

/// Token-caused fetches: when the last one was tried.
#[derive(Default)]
struct FetchLog {
    last_attempt: Option<Instant>,
}

pub struct Verifier {
    settings: VerifySettings,
    source: KeySource,
    /// `source` as stored with its keys.
    describe: String,
    keys: RwLock<Option<Arc<KeySet>>>,
    /// Held while fetching: requests that need a fetch wait for the one under way.
    fetching: tokio::sync::Mutex<FetchLog>,
    /// [`KeysState`] as a number.
    state: AtomicU8,
    warn_unverifiable: LogEvery,
    /// `pod_identity_token_verifications_total{result}` and key-fetch results, when counted.
    counted: Option<(prometheus::IntCounterVec, prometheus::IntCounterVec)>,
    /// Where fetches run, so shutdown and retirement stop them.
    tasks: TaskTracker,
    stop: CancellationToken,
}

fn refused(why: &str, remember: bool) -> Verdict {
    Verdict::Refused {
        why: format!("the token failed local verification: {why}"),
        remember,
    }
}

fn epoch_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

impl Verifier {
    /// A verifier of `source`'s keys, holding `handed_over` keys (from a predecessor) or else the
    /// state file's. Nothing runs until [`Verifier::start`].
    pub fn new(
        source: KeySource,
        settings: VerifySettings,
        handed_over: Option<Stored>,
        counted: Option<(prometheus::IntCounterVec, prometheus::IntCounterVec)>,
        tasks: TaskTracker,
        stop: CancellationToken,
    ) -> Arc<Verifier> {
        let describe = source.describe();
        let stored = handed_over.or_else(|| Self::read_state(&settings, &describe));
        let keys = stored
            .and_then(|s| KeySet::from_stored(&s, &describe, SystemTime::now(), settings.grace));
        let state = if keys.is_some() {
            KeysState::Loaded
        } else {
            KeysState::Pending
        };
        Arc::new(Verifier {
            settings,
            source,
            describe,
            keys: RwLock::new(keys.map(Arc::new)),
            fetching: tokio::sync::Mutex::default(),
            state: AtomicU8::new(state as u8),
            warn_unverifiable: LogEvery::new(WARN_EVERY),
            counted,
            tasks,
            stop,
        })
    }

    fn read_state(settings: &VerifySettings, describe: &str) -> Option<Stored> {
        let path = settings.state_file.as_ref()?;
        match read_private(path) {
            Ok(Some(bytes)) => match serde_json::from_slice::<Stored>(&bytes) {
                Ok(s) if s.source == describe => Some(s),
                Ok(_) => None,
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "ignoring an unreadable key file");
                    None
                }
            },
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "ignoring the key file");
                None
            }
        }
    }

    /// Start the periodic fetch: at once when no keys are held, else when they are due.
    pub fn start(self: &Arc<Self>) {
        let me = self.clone();
        self.tasks.spawn(async move {
            let mut retry = RETRY_FIRST;
            loop {
                // On the monotonic clock: a wall clock stepped back does not postpone it.
                let due = me.keys().map_or(Duration::ZERO, |k| {
                    me.settings.refresh_every.saturating_sub(k.age())
                });
                tokio::select! {
                    _ = tokio::time::sleep(due) => {}
                    _ = me.stop.cancelled() => return,
                }
                let ok = tokio::select! {
                    ok = me.fetch_now() => ok,
                    _ = me.stop.cancelled() => return,
                };
                if !ok && me.keys().is_none() {
                    // No keys at all: try again soon, backing off to the refresh interval.
                    tokio::select! {
                        _ = tokio::time::sleep(retry) => {}
                        _ = me.stop.cancelled() => return,
                    }
                    retry = (retry * 2).min(me.settings.refresh_every);
                }
            }
        });
    }

    pub fn keys(&self) -> Option<Arc<KeySet>> {
        match self.keys.read() {
            Ok(k) => k.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub fn state(&self) -> KeysState {
        match self.state.load(Ordering::Relaxed) {
            1 => KeysState::Loaded,
            2 => KeysState::Unavailable,
            _ => KeysState::Pending,
        }
    }

    /// The keys held, as a successor agent takes them.
    pub fn snapshot(&self) -> Option<Stored> {
        self.keys()
            .map(|k| k.to_stored(&self.describe, SystemTime::now()))
    }

    /// How long ago the keys held were fetched.
    pub fn keys_age(&self) -> Option<Duration> {
        self.keys().map(|k| k.age())
    }

    /// Fetch now, under the fetch lock; whether it succeeded.
    async fn fetch_now(&self) -> bool {
        let mut log = self.fetching.lock().await;
        log.last_attempt = Some(Instant::now());
        self.fetch_locked().await
    }

    async fn fetch_locked(&self) -> bool {
        let (started, fetched) = (SystemTime::now(), Instant::now());
        // The source's own retries included: the fetch lock is held meanwhile.
        let timeout = self.settings.fetch_timeout;
        let result = tokio::time::timeout(timeout, self.source.fetch(timeout))
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")));
        let before = self.keys();
        let result = result.and_then(|f| {
            KeySet::after_fetch(
                f.issuer,
                &f.jwks,
                fetched,
                started,
                before.as_deref(),
                self.settings.grace,
            )
        });
        let ok = result.is_ok();
        if let Some((_, fetches)) = &self.counted {
            fetches
                .with_label_values(&[if ok { "ok" } else { "failed" }])
                .inc();
        }
        match result {
            Ok(set) => {
                // Fetches a flood of made-up `kid`s provokes find the same keys: said and kept
                // only when something changed.
                if before.as_deref().is_some_and(|b| b.same_keys(&set)) {
                    tracing::debug!(source = %self.describe, "fetched the cluster's token signing keys: unchanged");
                } else {
                    tracing::info!(source = %self.describe, issuer = %set.issuer, keys = set.len(started),
                        "fetched the cluster's token signing keys");
                    self.persist(&set);
                }
                let set = Arc::new(set);
                match self.keys.write() {
                    Ok(mut k) => *k = Some(set),
                    Err(p) => *p.into_inner() = Some(set),
                }
                self.state.store(KeysState::Loaded as u8, Ordering::Relaxed);
            }
            Err(why) => {
                tracing::warn!(source = %self.describe, error = %why, have_keys = before.is_some(),
                    "cannot fetch the cluster's token signing keys");
                if before.is_none() {
                    self.state
                        .store(KeysState::Unavailable as u8, Ordering::Relaxed);
                }
            }
        }
        ok
    }

    fn persist(&self, set: &KeySet) {
        let Some(path) = self.settings.state_file.clone() else {
            return;
        };
        let Ok(bytes) = serde_json::to_vec(&set.to_stored(&self.describe, SystemTime::now()))
        else {
            return;
        };
        // A small file, but a blocking write all the same: off the runtime's workers.
        self.tasks.spawn_blocking(move || {
            if let Err(e) = write_private(&path, &bytes) {
                tracing::warn!(file = %path.display(), error = %e, "cannot keep the token signing keys");
            }
        });
    }

    /// Make sure a fetch that started at or after `need` has been tried, for a token naming a
    /// key not held: one just done is shared; otherwise one starts, at most one per
    /// `fetch_floor` (waiting for the floor: requests arriving meanwhile share the fetch). With
    /// `again_after`, a fetch is made only if the last attempt is that old (an issuer that
    /// published late). Waits at most `wait_for_keys`; the fetch goes on regardless.
    async fn fetch_for(self: &Arc<Self>, need: SystemTime, again_after: Option<Duration>) {
        let me = self.clone();
        let fetch = self.tasks.spawn(async move {
            let mut log = me.fetching.lock().await;
            if me
                .keys()
                .is_some_and(|k| k.fetch_started(SystemTime::now()) >= need)
            {
                return;
            }
            let since = log.last_attempt.map(|t| t.elapsed());
            match (again_after, since) {
                (Some(gap), Some(since)) if since < gap => return,
                (None, Some(since)) => {
                    tokio::time::sleep(me.settings.fetch_floor.saturating_sub(since)).await;
                }
                _ => {}
            }
            log.last_attempt = Some(Instant::now());
            me.fetch_locked().await;
        });
        let _ = tokio::time::timeout(self.settings.wait_for_keys, fetch).await;
    }

    /// Check `token`'s signature, issuer and audience (see the module contract).
    pub async fn verify(self: &Arc<Self>, token: &Token) -> Verdict {
        let verdict = self.check(token).await;
        if let Some((results, _)) = &self.counted {
            results.with_label_values(&[verdict.label()]).inc();
        }
        if let Verdict::Unverifiable(why) = &verdict {
            if let Some(suppressed) = self.warn_unverifiable.due() {
                tracing::warn!(source = %self.describe, reason = %why, not_logged = suppressed,
                    "a token could not be verified locally; it goes to EKS Auth unverified");
            }
        }
        verdict
    }

    /// Whether a key held now is the one `token` names: only then can [`Verifier::identify_held`]
    /// verify it. Reads the token's header, checks no signature: a made-up `kid` costs nothing.
    pub fn holds_key_for(&self, token: &Token) -> bool {
        let Ok(jws) = Jws::parse(token.raw()) else {
            return false;
        };
        self.keys()
            .is_some_and(|k| k.knows(jws.header.kid.as_deref(), SystemTime::now()))
    }

    /// Who `token` speaks for, if the keys held now verify it: no fetch, no count, no warning.
    /// For reports made off the request path (an Event on the pod), so they cost no key fetch
    /// and do not count as verifications. Time claims are not checked: an expired token of the
    /// cluster still names its pod.
    pub async fn identify_held(self: &Arc<Self>, token: &Token) -> Option<PodIdentity> {
        match self.judge(token, false).await {
            Verdict::Verified(id) => Some(id),
            _ => None,
        }
    }

    async fn check(self: &Arc<Self>, token: &Token) -> Verdict {
        self.judge(token, true).await
    }

    /// [`Verifier::check`], fetching keys a token names only when `fetch`.
    async fn judge(self: &Arc<Self>, token: &Token, fetch: bool) -> Verdict {
        let jws = match Jws::parse(token.raw()) {
            Ok(jws) => jws,
            Err(e) => return refused(&e.to_string(), true),
        };
        match jws.header.alg.as_str() {
            "RS256" | "ES256" => {}
            // Never a cluster's signature: a key-less or shared-secret token is forged.
            "none" | "HS256" | "HS384" | "HS512" => {
                return refused("alg must be RS256 or ES256", true)
            }
            // A cluster may sign with another asymmetric algorithm (ES384): EKS Auth decides.
            _ => return Verdict::Unverifiable("signed with an algorithm not checked here".into()),
        }
        let Some(claims) = jws.claims::<Claims>() else {
            return refused("the payload is not JSON claims", true);
        };
        let now = SystemTime::now();
        let issued_at = claims
            .iat
            .filter(|v| v.is_finite() && *v >= 0.0)
            .map(|v| UNIX_EPOCH + Duration::from_secs((v as u64).min(epoch_secs(now))))
            .unwrap_or(now);
        // A fetch that started by then had the token's key, if the cluster publishes it: one
        // started after the token arrived, or one well after it was issued (iat has whole
        // seconds, and the node's clock is not the issuer's).
        let current = now.min(issued_at + ISSUE_MARGIN);
        let kid = jws.header.kid.as_deref();
        let mut keys = self.keys();
        if fetch && keys.as_ref().is_none_or(|k| !k.knows(kid, now)) {
            let again = keys
                .as_ref()
                .is_some_and(|k| k.fetch_started(now) >= current);
            if again {
                self.fetch_for(now, Some(self.settings.min_refresh_interval))
                    .await;
            } else {
                self.fetch_for(current, None).await;
            }
            keys = self.keys();
        }
        let Some(keys) = keys else {
            return Verdict::Unverifiable("the cluster's keys could not be fetched yet".into());
        };
        if !keys.knows(kid, now) {
            // The wall clock now, not before the fetch: the set's start is measured back from it.
            return if keys.fetch_started(SystemTime::now()) >= current {
                // Keys fetched after the token was issued do not hold its key: not the cluster's.
                // Not remembered: an issuer that publishes late heals at the next fetch.
                refused("signed by a key the cluster does not publish", false)
            } else {
                Verdict::Unverifiable(
                    "the token names a key not fetched yet and no fetch could be made now".into(),
                )
            };
        }
        if !keys.current(kid).any(|k| jws.verify(k)) {
            return if keys.retiring(kid, now).any(|k| jws.verify(k)) {
                // Neither trusted (the cluster no longer vouches for the key: it may have been
                // revoked) nor refused (a rotation may still be propagating): EKS Auth decides.
                Verdict::Unverifiable("signed by a key the cluster stopped publishing".into())
            } else {
                refused("the signature does not match the cluster's key", true)
            };
        }
        if claims.iss.as_deref().map(|i| i.trim_end_matches('/')) != Some(keys.issuer.as_str()) {
            return refused("it was issued by another issuer", true);
        }
        let audience = &self.settings.audience;
        let audience_ok = match &claims.aud {
            Some(Audience::One(a)) => a == audience,
            Some(Audience::Many(list)) => list.iter().any(|a| a == audience),
            None => false,
        };
        if !audience_ok {
            return refused("its audience is not pods.eks.amazonaws.com", true);
        }
        match identity(claims, &keys.issuer, audience) {
            Some(id) => Verdict::Verified(id),
            None => Verdict::Unverifiable("the token is the cluster's but names no pod".into()),
        }
    }
}

#[cfg(target_os = "linux")]
fn read_private(path: &std::path::Path) -> Result<Option<Vec<u8>>, String> {
    crate::files::read_private(path, MAX_STORED)
}

#[cfg(target_os = "linux")]
fn write_private(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    crate::files::write_private(path, bytes)
}

#[cfg(not(target_os = "linux"))]
fn read_private(_: &std::path::Path) -> Result<Option<Vec<u8>>, String> {
    Ok(None)
}

#[cfg(not(target_os = "linux"))]
fn write_private(_: &std::path::Path, _: &[u8]) -> std::io::Result<()> {
    Ok(())
}

/// The pod a verified token names, if it names one fully.
fn identity(claims: Claims, issuer: &str, audience: &str) -> Option<PodIdentity> {
    let k = claims.kubernetes?;
    let pod = k.pod?;
    let non_empty = |s: Option<String>| s.filter(|s| !s.is_empty());
    Some(PodIdentity {
        namespace: non_empty(k.namespace)?,
        service_account: non_empty(k.serviceaccount?.name)?,
        pod_name: non_empty(pod.name)?,
        pod_uid: non_empty(pod.uid)?,
        node_name: k.node.and_then(|n| non_empty(n.name)),
        issued_at: claims
            .iat
            .filter(|v| v.is_finite() && *v >= 0.0)
            .map(|v| v as u64),
        issuer: issuer.to_owned(),
        audience: audience.to_owned(),
    })
}
