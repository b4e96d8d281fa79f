//! The cluster's signing keys as the verifier holds them: the set last fetched, the keys it
//! dropped (still trusted for a grace period), and the form in which keys are kept on disk and
//! handed to a successor agent.
//!
//! Contract: [`KeySet::after_fetch`] makes the new set from a fetch and the set before it; a key
//! the issuer stopped publishing stays usable until `grace` after the fetch that dropped it, so a
//! rotation that is still propagating (or an issuer behind a load balancer whose backends
//! disagree for a moment) never turns genuine tokens into refusals. [`KeySet::candidates`]
//! yields the keys a token may be checked with: the exact `kid` if the token names one, every
//! key otherwise. [`Stored`] is the one serialised form, for the state directory and the
//! handover: it names the source the keys came from, so keys of another cluster or source are
//! never used. Public keys are not secrets; they are still kept mode 0600, since whoever can
//! replace them can make the agent trust tokens it should not.

use crate::jwt::{Jwk, JwkSet, PublicKey};
use serde::{Deserialize, Serialize};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The stored format's version; another version is ignored, never misread.
const STORED_VERSION: u32 = 1;

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
    /// When the fetch that produced this set started (wall clock, since it is kept on disk and
    /// handed over): a token issued before it names a key this set would hold.
    pub fetch_started: SystemTime,
    /// Keys published at that fetch.
    current: Vec<Key>,
    /// Keys published before and dropped since, trusted until `previous_until`.
    previous: Vec<Key>,
    previous_until: SystemTime,
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

impl KeySet {
    /// The set after a successful fetch of `jwks` that started at `started`, given the set held
    /// before (if any); `Err` if the document holds no usable signing key.
    pub fn after_fetch(
        issuer: String,
        jwks: &JwkSet,
        started: SystemTime,
        before: Option<&KeySet>,
        grace: Duration,
    ) -> Result<KeySet, String> {
        let current = usable(jwks);
        if current.is_empty() {
            return Err("the key set holds no usable signing key".into());
        }
        let mut previous = Vec::new();
        let mut previous_until = started;
        if let Some(before) = before.filter(|b| b.issuer == issuer) {
            let dropped = before
                .current
                .iter()
                .filter(|old| !current.iter().any(|k| k.key == old.key));
            previous.extend(dropped.cloned());
            if before.previous_until > started {
                previous.extend(
                    before
                        .previous
                        .iter()
                        .filter(|old| !current.iter().any(|k| k.key == old.key))
                        .cloned(),
                );
            }
            previous_until = started + grace;
        }
        Ok(KeySet {
            issuer,
            fetch_started: started,
            current,
            previous,
            previous_until,
        })
    }

    /// Keys `kid` names (every key when the token names none), trusted at `now`.
    pub fn candidates<'a>(
        &'a self,
        kid: Option<&'a str>,
        now: SystemTime,
    ) -> impl Iterator<Item = &'a PublicKey> + 'a {
        let previous = if now < self.previous_until {
            self.previous.as_slice()
        } else {
            &[]
        };
        self.current
            .iter()
            .chain(previous)
            .filter(move |k| kid.is_none() || k.jwk.kid.as_deref() == kid)
            .map(|k| &k.key)
    }

    /// How many keys are trusted at `now`.
    pub fn len(&self, now: SystemTime) -> usize {
        self.candidates(None, now).count()
    }

    pub fn to_stored(&self, source: &str) -> Stored {
        let jwks = |keys: &[Key]| JwkSet {
            keys: keys.iter().map(|k| k.jwk.clone()).collect(),
        };
        Stored {
            version: STORED_VERSION,
            source: source.to_owned(),
            issuer: self.issuer.clone(),
            fetch_started: secs(self.fetch_started),
            keys: jwks(&self.current),
            previous: jwks(&self.previous),
            previous_until: secs(self.previous_until),
        }
    }

    /// The set `stored` describes, if it is for `source` and usable.
    pub fn from_stored(stored: &Stored, source: &str) -> Option<KeySet> {
        if stored.version != STORED_VERSION || stored.source != source {
            return None;
        }
        let current = usable(&stored.keys);
        if current.is_empty() {
            return None;
        }
        Some(KeySet {
            issuer: stored.issuer.clone(),
            fetch_started: time(stored.fetch_started),
            current,
            previous: usable(&stored.previous),
            previous_until: time(stored.previous_until),
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
    pub previous: JwkSet,
    #[serde(default)]
    pub previous_until: u64,
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

    #[test]
    fn a_dropped_key_is_trusted_for_the_grace_period_only() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let grace = Duration::from_secs(600);
        let first =
            KeySet::after_fetch("iss".into(), &set(vec![jwk("a", "AQAB")]), t0, None, grace)
                .expect("a");
        let t1 = t0 + Duration::from_secs(60);
        let rotated = KeySet::after_fetch(
            "iss".into(),
            &set(vec![jwk("b", "AQAC")]),
            t1,
            Some(&first),
            grace,
        )
        .expect("b");
        assert_eq!(rotated.candidates(Some("a"), t1).count(), 1, "a in grace");
        assert_eq!(rotated.candidates(Some("b"), t1).count(), 1);
        assert_eq!(rotated.candidates(None, t1).count(), 2);
        let later = t1 + grace;
        assert_eq!(rotated.candidates(Some("a"), later).count(), 0, "a retired");
        // Stored and read back, for the same source only.
        let stored = rotated.to_stored("issuer x");
        let back = KeySet::from_stored(&stored, "issuer x").expect("same source");
        assert_eq!(back.candidates(Some("a"), t1).count(), 1);
        assert_eq!(back.fetch_started, t1);
        assert!(KeySet::from_stored(&stored, "issuer y").is_none());
        // A document without usable keys is not a key set.
        assert!(KeySet::after_fetch("iss".into(), &set(vec![]), t1, None, grace).is_err());
    }
}
