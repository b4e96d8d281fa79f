//! A token judged against the keys held: the rules of [`super`]'s contract that decide a
//! [`Verdict`].
//!
//! Contract: `alg` `none` or HMAC is refused (a forgery whatever it says); an asymmetric
//! algorithm other than RS256 and ES256 is left to EKS Auth. A token naming a key not held
//! causes a fetch (when asked to) and is then judged on the keys held: a key still unknown to
//! a fetch that started after the token was issued refuses it (not remembered); one unknown
//! otherwise, or no keys at all, leaves it unverifiable. The signature must be a current key's
//! (a retiring key's makes it unverifiable, any other mismatch refuses it), then `iss` must be
//! the keys' issuer and `aud` name the configured audience. A token that passes and names its
//! pod fully is `Verified`. Time claims are not checked here.

use super::keys::KeySet;
use super::{Verdict, Verifier};
use crate::jwt::Jws;
use crate::token::{PodIdentity, Token};
use serde::Deserialize;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long after a token's `iat` a fetch must have started to be sure to hold its key.
const ISSUE_MARGIN: Duration = Duration::from_secs(2);

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

fn refused(why: &str, remember: bool) -> Verdict {
    Verdict::Refused {
        why: format!("the token failed local verification: {why}"),
        remember,
    }
}

fn epoch_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

/// A verdict on the algorithm alone, unless it is one checked here.
fn screen(alg: &str) -> Option<Verdict> {
    match alg {
        "RS256" | "ES256" => None,
        // Never a cluster's signature: a key-less or shared-secret token is forged.
        "none" | "HS256" | "HS384" | "HS512" => Some(refused("alg must be RS256 or ES256", true)),
        // A cluster may sign with another asymmetric algorithm (ES384): EKS Auth decides.
        _ => Some(Verdict::Unverifiable(
            "signed with an algorithm not checked here".into(),
        )),
    }
}

/// When a fetch must have started to hold the token's key, if the cluster publishes it: after
/// the token arrived (`now`), or well after it was issued (iat has whole seconds, and the
/// node's clock is not the issuer's).
fn key_published_by(claims: &Claims, now: SystemTime) -> SystemTime {
    let issued_at = claims
        .iat
        .filter(|v| v.is_finite() && *v >= 0.0)
        .map(|v| UNIX_EPOCH + Duration::from_secs((v as u64).min(epoch_secs(now))))
        .unwrap_or(now);
    now.min(issued_at + ISSUE_MARGIN)
}

impl Verifier {
    pub(super) async fn check(self: &Arc<Self>, token: &Token) -> Verdict {
        self.judge(token, true).await
    }

    /// [`Verifier::check`], fetching keys a token names only when `fetch`.
    pub(super) async fn judge(self: &Arc<Self>, token: &Token, fetch: bool) -> Verdict {
        let jws = match Jws::parse(token.raw()) {
            Ok(jws) => jws,
            Err(e) => return refused(&e.to_string(), true),
        };
        if let Some(verdict) = screen(&jws.header.alg) {
            return verdict;
        }
        let Some(claims) = jws.claims::<Claims>() else {
            return refused("the payload is not JSON claims", true);
        };
        let now = SystemTime::now();
        let current = key_published_by(&claims, now);
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
        judge_with(&keys, &jws, claims, now, current, &self.settings.audience)
    }
}

/// The verdict on `jws` by the keys held, `now`, for a token whose key a fetch started at
/// `current` would hold.
fn judge_with(
    keys: &KeySet,
    jws: &Jws<'_>,
    claims: Claims,
    now: SystemTime,
    current: SystemTime,
    audience: &str,
) -> Verdict {
    let kid = jws.header.kid.as_deref();
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

#[cfg(test)]
mod tests {
    use super::super::testing::{claims, token, Issuer, Key};
    use super::super::{Verdict, VerifySettings};
    use serde_json::json;
    use std::time::Duration;

    fn refused(v: &Verdict, remembered: bool) -> bool {
        matches!(v, Verdict::Refused { remember, .. } if *remember == remembered)
    }

    /// A verifier holding `key` (fetched a minute ago), for tokens that need no fetch.
    async fn holding(key: &Key) -> (Issuer, std::sync::Arc<super::Verifier>) {
        let issuer = Issuer::start(vec![key.jwk()]).await;
        let held = Some((vec![key.jwk()], vec![], Duration::from_secs(60)));
        let v = issuer.verifier(VerifySettings::default(), held);
        (issuer, v)
    }

    #[tokio::test]
    async fn a_token_signed_by_a_held_key_names_its_pod() {
        let key = Key::new("k1");
        let (issuer, v) = holding(&key).await;
        let Verdict::Verified(id) = v.verify(&key.sign(&claims(&issuer.url))).await else {
            panic!("not verified");
        };
        assert_eq!(
            (id.namespace.as_str(), id.service_account.as_str()),
            ("shop", "cart")
        );
        assert_eq!(
            (id.pod_name.as_str(), id.pod_uid.as_str()),
            ("cart-0", "uid-1")
        );
        assert_eq!(id.node_name.as_deref(), Some("node-a"));
        assert_eq!(id.issuer, issuer.url);
        assert_eq!(id.audience, "pods.eks.amazonaws.com");
        // A single audience string is as good as a list; a trailing slash on iss is the same.
        let mut c = claims(&format!("{}/", issuer.url));
        c["aud"] = json!("pods.eks.amazonaws.com");
        assert!(matches!(
            v.verify(&key.sign(&c)).await,
            Verdict::Verified(_)
        ));
        assert_eq!(issuer.fetches(), 0, "the key was held: no fetch");
    }

    #[tokio::test]
    async fn hmac_and_algorithm_swaps_are_forgeries_other_algorithms_go_to_eks_auth() {
        let key = Key::new("k1");
        let (issuer, v) = holding(&key).await;
        let c = claims(&issuer.url);
        for alg in ["HS256", "HS384", "HS512"] {
            let t = token(&key.sign_with(&json!({"alg": alg, "kid": "k1"}), &c));
            assert!(refused(&v.verify(&t).await, true), "{alg}");
        }
        // An ES256 signature presented as RS256: the key's own algorithm only.
        let t = token(&key.sign_with(&json!({"alg": "RS256", "kid": "k1"}), &c));
        assert!(refused(&v.verify(&t).await, true));
        // A cluster may sign ES384: not checked here, never refused.
        let t = token(&key.sign_with(&json!({"alg": "ES384", "kid": "k1"}), &c));
        assert!(matches!(v.verify(&t).await, Verdict::Unverifiable(_)));
        // `none` never gets this far: it is not a token.
        let unsigned = key.sign_with(&json!({"alg": "none", "kid": "k1"}), &c);
        assert!(crate::token::Token::parse(unsigned.as_bytes()).is_err());
        assert_eq!(issuer.fetches(), 0);
    }

    #[tokio::test]
    async fn another_issuer_audience_or_a_tampered_payload_is_refused() {
        let key = Key::new("k1");
        let (issuer, v) = holding(&key).await;
        let mut c = claims("https://someone-else.example");
        assert!(refused(&v.verify(&key.sign(&c)).await, true), "issuer");
        c = claims(&issuer.url);
        c["aud"] = json!(["sts.amazonaws.com"]);
        assert!(refused(&v.verify(&key.sign(&c)).await, true), "audience");
        c.as_object_mut().expect("object").remove("aud");
        assert!(refused(&v.verify(&key.sign(&c)).await, true), "no audience");
        // Signed for one pod, presented for another.
        let genuine = key.sign(&claims(&issuer.url)).raw().to_owned();
        let mut other = claims(&issuer.url);
        other["kubernetes.io"]["pod"]["name"] = json!("admin-0");
        let forged_payload = key
            .sign(&other)
            .raw()
            .split('.')
            .nth(1)
            .expect("payload")
            .to_owned();
        let parts: Vec<&str> = genuine.split('.').collect();
        let tampered = format!("{}.{forged_payload}.{}", parts[0], parts[2]);
        assert!(
            refused(&v.verify(&token(&tampered)).await, true),
            "tampered"
        );
        // Signed by a key of the same name that is not the cluster's.
        let impostor = Key::new("k1");
        assert!(refused(
            &v.verify(&impostor.sign(&claims(&issuer.url))).await,
            true
        ));
        // The cluster's, but naming no pod: not trusted, not refused.
        let mut c = claims(&issuer.url);
        c["kubernetes.io"]["pod"] = json!(null);
        assert!(matches!(
            v.verify(&key.sign(&c)).await,
            Verdict::Unverifiable(_)
        ));
    }
}
