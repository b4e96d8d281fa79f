//! The cluster's signing keys as the verifier holds them: the set last fetched, the keys it
//! dropped (each still recognised for a grace period), and the form in which keys are kept on
//! disk and handed to a successor agent.
//!
//! Contract: [`KeySet::after_fetch`] makes the new set from a fetch and the set before it. A key
//! the issuer stopped publishing is *retiring* until `grace` after the fetch that first found it
//! gone, a deadline of its own that later fetches never extend: a rotation that is still
//! propagating (or an issuer behind a load balancer whose backends disagree for a moment) never
//! turns genuine tokens into refusals, and a key the cluster revoked stops counting at a known
//! time however often fetches are provoked. [`KeySet::current`] and [`KeySet::retiring`] yield the
//! keys a token may be checked with (the exact `kid` if the token names one, every key
//! otherwise); the verifier trusts only current keys, and a token signed by a retiring one is
//! neither trusted nor refused. When the fetch started is kept on the monotonic clock
//! ([`KeySet::fetch_started`] maps it onto today's wall clock), so a wall clock stepped back, or a
//! stored or handed-over time in the future, cannot make the set look newer than it is.
//! [`Stored`] is the one serialised form, for the state directory and the handover: it names the
//! source the keys came from, so keys of another cluster or source are never used. Public keys
//! are not secrets; they are still kept mode 0600, since whoever can replace them can make the
//! agent trust tokens it should not.

use crate::jwt::{Jwk, JwkSet, PublicKey};
use serde::{Deserialize, Serialize};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;

/// The stored format's version; another version is ignored, never misread.
pub(super) const STORED_VERSION: u32 = 2;

/// One usable key and the JWK it came from.
#[derive(Debug, Clone)]
struct Key {
    jwk: Jwk,
    key: PublicKey,
}

/// The keys tokens are verified with.
#[derive(Debug, Clone)]
pub struct KeySet {
    /// The issuer the keys belong to: every token's `iss` must equal it.
    pub issuer: String,
    /// When the fetch that produced this set started, on the monotonic clock: a token issued
    /// before it names a key this set would hold.
    fetched: Instant,
    /// Keys published at that fetch.
    current: Vec<Key>,
    /// Keys published before and dropped since, each with the wall-clock time it stops being
    /// recognised.
    retiring: Vec<(Key, SystemTime)>,
}

fn usable(set: &JwkSet) -> Vec<Key> {
    set.keys
        .iter()
        .filter_map(|jwk| {
            Some(Key {
                key: PublicKey::from_jwk(jwk)?,
                jwk: jwk.clone(),
            })
        })
        .collect()
}

fn matching<'a>(kid: Option<&'a str>) -> impl Fn(&&'a Key) -> bool + 'a {
    move |k| kid.is_none() || k.jwk.kid.as_deref() == kid
}

impl KeySet {
    /// The set after a successful fetch of `jwks` that started at `fetched` (wall clock `now`),
    /// given the set held before (if any); `Err` if the document holds no usable signing key.
    pub fn after_fetch(
        issuer: String,
        jwks: &JwkSet,
        fetched: Instant,
        now: SystemTime,
        before: Option<&KeySet>,
        grace: Duration,
    ) -> Result<KeySet, String> {
        let current = usable(jwks);
        if current.is_empty() {
            return Err("the key set holds no usable signing key".into());
        }
        let published = |k: &Key| current.iter().any(|c| c.key == k.key);
        let mut retiring = Vec::new();
        if let Some(before) = before.filter(|b| b.issuer == issuer) {
            // Dropped by this fetch: the grace starts now. Dropped earlier: it keeps its deadline.
            let until = now + grace;
            retiring.extend(
                before
                    .current
                    .iter()
                    .filter(|k| !published(k))
                    .map(|k| (k.clone(), until)),
            );
            retiring.extend(
                before
                    .retiring
                    .iter()
                    .filter(|(k, until)| *until > now && !published(k))
                    .cloned(),
            );
        }
        Ok(KeySet {
            issuer,
            fetched,
            current,
            retiring,
        })
    }

    /// When the fetch started, on the wall clock as it reads `now`.
    pub fn fetch_started(&self, now: SystemTime) -> SystemTime {
        now.checked_sub(self.fetched.elapsed())
            .unwrap_or(UNIX_EPOCH)
    }

    /// How long ago the fetch started.
    pub fn age(&self) -> Duration {
        self.fetched.elapsed()
    }

    /// Published keys `kid` names (every key when the token names none).
    pub fn current<'a>(&'a self, kid: Option<&'a str>) -> impl Iterator<Item = &'a PublicKey> + 'a {
        self.current.iter().filter(matching(kid)).map(|k| &k.key)
    }

    /// Keys `kid` names that the issuer stopped publishing and that are within their grace at
    /// `now`.
    pub fn retiring<'a>(
        &'a self,
        kid: Option<&'a str>,
        now: SystemTime,
    ) -> impl Iterator<Item = &'a PublicKey> + 'a {
        self.retiring
            .iter()
            .filter(move |(_, until)| now < *until)
            .map(|(k, _)| k)
            .filter(matching(kid))
            .map(|k| &k.key)
    }

    /// Whether any key, current or retiring, answers to `kid` at `now`.
    pub fn knows(&self, kid: Option<&str>, now: SystemTime) -> bool {
        self.current(kid).next().is_some() || self.retiring(kid, now).next().is_some()
    }

    /// Whether `other` holds the same issuer and keys, current and retiring, as this set.
    pub fn same_keys(&self, other: &KeySet) -> bool {
        let same = |a: &[Key], b: &[Key]| {
            a.len() == b.len() && a.iter().all(|k| b.iter().any(|o| o.key == k.key))
        };
        let retiring = |s: &KeySet| {
            s.retiring
                .iter()
                .map(|(k, _)| k.clone())
                .collect::<Vec<_>>()
        };
        self.issuer == other.issuer
            && same(&self.current, &other.current)
            && same(&retiring(self), &retiring(other))
    }

    /// How many keys are recognised at `now`.
    pub fn len(&self, now: SystemTime) -> usize {
        self.current(None).count() + self.retiring(None, now).count()
    }

    pub fn to_stored(&self, source: &str, now: SystemTime) -> Stored {
        Stored {
            version: STORED_VERSION,
            source: source.to_owned(),
            issuer: self.issuer.clone(),
            fetch_started: secs(self.fetch_started(now)),
            keys: JwkSet {
                keys: self.current.iter().map(|k| k.jwk.clone()).collect(),
            },
            retiring: self
                .retiring
                .iter()
                .map(|(k, until)| Retiring {
                    key: k.jwk.clone(),
                    until: secs(*until),
                })
                .collect(),
        }
    }

    /// The set `stored` describes, if it is for `source` and usable. Times later than they can
    /// be (a fetch in the future, a grace longer than `grace` from now) are brought back: a file
    /// or a predecessor cannot freeze the set or stretch a retired key's life.
    pub fn from_stored(
        stored: &Stored,
        source: &str,
        now: SystemTime,
        grace: Duration,
    ) -> Option<KeySet> {
        if stored.version != STORED_VERSION || stored.source != source {
            return None;
        }
        let current = usable(&stored.keys);
        if current.is_empty() {
            return None;
        }
        let age = now
            .duration_since(time(stored.fetch_started))
            .unwrap_or_default();
        let latest = now + grace;
        let retiring = stored
            .retiring
            .iter()
            .filter_map(|r| {
                let key = PublicKey::from_jwk(&r.key)?;
                let jwk = r.key.clone();
                Some((Key { jwk, key }, time(r.until).min(latest)))
            })
            .collect();
        Some(KeySet {
            issuer: stored.issuer.clone(),
            fetched: Instant::now().checked_sub(age).unwrap_or_else(Instant::now),
            current,
            retiring,
        })
    }
}

/// A key set as kept on disk and handed over.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stored {
    pub version: u32,
    /// Which source the keys came from (`api-server https://…` or `issuer https://…`).
    pub source: String,
    pub issuer: String,
    /// Seconds since the epoch.
    pub fetch_started: u64,
    pub keys: JwkSet,
    #[serde(default)]
    pub retiring: Vec<Retiring>,
}

/// A key the issuer stopped publishing, and until when (seconds since the epoch) it counts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Retiring {
    pub key: Jwk,
    pub until: u64,
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

fn time(s: u64) -> SystemTime {
    UNIX_EPOCH
        .checked_add(Duration::from_secs(s.min(crate::token::MAX_NUMERIC_DATE)))
        .unwrap_or(UNIX_EPOCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwk(kid: &str, e: &str) -> Jwk {
        serde_json::from_value(serde_json::json!({"kty": "RSA", "kid": kid, "n": "AQAB", "e": e}))
            .expect("jwk")
    }

    fn set(keys: Vec<Jwk>) -> JwkSet {
        JwkSet { keys }
    }

    fn fetch(keys: Vec<Jwk>, now: SystemTime, before: Option<&KeySet>) -> KeySet {
        KeySet::after_fetch("iss".into(), &set(keys), Instant::now(), now, before, GRACE)
            .expect("usable")
    }

    const GRACE: Duration = Duration::from_secs(900);

    #[test]
    fn a_dropped_key_retires_for_the_grace_period_only() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let first = fetch(vec![jwk("a", "AQAB")], t0, None);
        let t1 = t0 + Duration::from_secs(60);
        let rotated = fetch(vec![jwk("b", "AQAC")], t1, Some(&first));
        assert_eq!(rotated.current(Some("a")).count(), 0, "a is not published");
        assert_eq!(rotated.retiring(Some("a"), t1).count(), 1, "a in grace");
        assert_eq!(rotated.current(Some("b")).count(), 1);
        assert_eq!(rotated.len(t1), 2);
        assert!(!rotated.knows(Some("a"), t1 + GRACE), "a retired");
        // Stored and read back, for the same source only.
        let stored = rotated.to_stored("issuer x", t1);
        let back = KeySet::from_stored(&stored, "issuer x", t1, GRACE).expect("same source");
        assert_eq!(back.retiring(Some("a"), t1).count(), 1);
        assert!(!back.knows(Some("a"), t1 + GRACE));
        assert!(KeySet::from_stored(&stored, "issuer y", t1, GRACE).is_none());
        // A document without usable keys is not a key set.
        assert!(
            KeySet::after_fetch("iss".into(), &set(vec![]), Instant::now(), t1, None, GRACE)
                .is_err()
        );
    }

    /// Review M1: provoking fetches (a token with an unknown `kid` every 10 s) must not keep a
    /// dropped key alive.
    #[test]
    fn fetches_never_extend_a_retiring_keys_grace() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let mut held = fetch(vec![jwk("a", "AQAB"), jwk("b", "AQAC")], t0, None);
        held = fetch(vec![jwk("b", "AQAC")], t0, Some(&held));
        let mut t = t0;
        while t < t0 + Duration::from_secs(1200) {
            t += Duration::from_secs(10);
            held = fetch(vec![jwk("b", "AQAC")], t, Some(&held));
            let expected = usize::from(t < t0 + GRACE);
            assert_eq!(
                held.retiring(Some("a"), t).count(),
                expected,
                "at {:?}",
                t.duration_since(t0)
            );
        }
        // A key published again is current, not retiring.
        held = fetch(vec![jwk("a", "AQAB")], t, Some(&held));
        assert_eq!(held.current(Some("a")).count(), 1);
        assert_eq!(held.retiring(None, t).count(), 1, "only b retires");
    }

    /// Review M2: a stored set from the future (a clock stepped back, or a forged file or
    /// predecessor) reads as fetched now, and its grace deadlines are capped.
    #[test]
    fn a_stored_set_cannot_claim_a_future_fetch_or_a_long_grace() {
        let now = UNIX_EPOCH + Duration::from_secs(2_000_000);
        let stored = Stored {
            version: STORED_VERSION,
            source: "s".into(),
            issuer: "iss".into(),
            fetch_started: secs(now) + 3600,
            keys: set(vec![jwk("b", "AQAC")]),
            retiring: vec![Retiring {
                key: jwk("a", "AQAB"),
                until: secs(now) + 365 * 86400,
            }],
        };
        let k = KeySet::from_stored(&stored, "s", now, GRACE).expect("usable");
        assert!(k.fetch_started(now) <= now);
        assert!(k.age() < Duration::from_secs(1));
        assert!(!k.knows(Some("a"), now + GRACE), "grace capped");
        // An old fetch keeps its age.
        let old = Stored {
            fetch_started: secs(now) - 60,
            ..stored
        };
        let k = KeySet::from_stored(&old, "s", now, GRACE).expect("usable");
        assert!(k.age() >= Duration::from_secs(59), "{:?}", k.age());
    }
}
