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

//!
//! The rooms: [`keys`] (the key set and its retiring keys), [`source`] (where keys come from),
//! `fetch` (when keys are fetched, and kept on disk), `judge` (a token against the keys held).

mod fetch;
mod judge;
pub(crate) mod keys;
pub(crate) mod source;

use crate::jwt::Jws;
use crate::token::{PodIdentity, Token, AUDIENCE};
use crate::util::LogEvery;
use fetch::FetchLog;
use keys::{KeySet, Stored};
use source::KeySource;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};
use tokio_util::task::TaskTracker;

/// The state file's name in the state directory.
pub const KEYS_FILE: &str = "verification-keys.json";
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
    /// Where fetches run: the serving server's tracker, so its shutdown waits for them; a
    /// server that serves again on this verifier brings its own ([`Verifier::start`]).
    tasks: Mutex<TaskTracker>,
}

impl Verifier {
    /// A verifier of `source`'s keys, holding `handed_over` keys (from a predecessor) or else the
    /// state file's. Nothing runs until [`Verifier::start`].
    pub fn new(
        source: KeySource,
        settings: VerifySettings,
        handed_over: Option<Stored>,
        counted: Option<(prometheus::IntCounterVec, prometheus::IntCounterVec)>,
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
            tasks: Mutex::default(),
        })
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
}

#[cfg(test)]
mod testing;
