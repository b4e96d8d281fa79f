//! The projected service-account token as data.
//!
//! Contract: [`Token::parse`] accepts the raw bytes of an `Authorization` header and returns a
//! structurally valid JWT (three base64url segments, a JSON header naming an `alg`, JSON claims
//! with a numeric `exp`) or a [`TokenError`] that says what is wrong without echoing the token.
//! The signature is *not* checked here: parsing is the hit path's work, and verification against
//! the cluster's keys ([`verify`](crate::verify)) runs only before an exchange. Time checks
//! (`exp`/`nbf` with leeway) are a separate step, [`Token::check_time`], so a cached token's
//! claims can be re-checked on every request. What a verified token vouches for is a
//! [`PodIdentity`]: the pod, its service account and node, named by a [`PodKey`].
//!
//! A token is a bearer secret. It never appears in `Debug` output, errors or logs; entries are
//! identified by [`TokenHash`], a SHA-256 of the raw bytes, shown as its first 8 bytes in hex.

use crate::jwt::decode;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Tokens larger than this are refused before any decoding: a projected token is about 1 KB,
/// and a bound keeps a hostile header from costing memory and CPU.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// The audience of Pod Identity tokens.
pub const AUDIENCE: &str = "pods.eks.amazonaws.com";

/// Why a token was refused. Messages never contain the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the Authorization header is missing or empty; send the projected service-account token read from AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE")]
    Missing,
    #[error("the token is {0} bytes, more than the {MAX_TOKEN_BYTES} allowed")]
    TooLarge(usize),
    #[error("the token is not a JWT: {0}")]
    Malformed(&'static str),
    #[error(
        "the token expired {0} s ago; the pod's token file should have been rotated by kubelet"
    )]
    Expired(u64),
    #[error("the token is not valid for another {0} s (nbf); check the node's clock")]
    NotYetValid(u64),
}

/// Kubernetes names are at most 253 characters; claims longer than that are cut.
pub const MAX_NAME: usize = 253;

/// A claim as it may appear in a log line: at most [`MAX_NAME`] characters, no control
/// characters (a forged claim cannot forge log lines), `…` where it was cut.
fn loggable(claim: String) -> String {
    let too_long = claim.chars().count() > MAX_NAME;
    if !too_long && !claim.chars().any(char::is_control) {
        return claim;
    }
    let mut out: String = claim
        .chars()
        .take(MAX_NAME)
        .map(|c| if c.is_control() { '\u{fffd}' } else { c })
        .collect();
    if too_long {
        out.push('…');
    }
    out
}

/// SHA-256 of the raw token bytes: the cache key, and the only name a token has in logs.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TokenHash(pub [u8; 32]);

impl TokenHash {
    pub fn of(raw: &[u8]) -> Self {
        TokenHash(Sha256::digest(raw).into())
    }
}

impl fmt::Display for TokenHash {
    /// Eight bytes are plenty to tell entries apart in logs and reveal nothing usable.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenHash({self})")
    }
}

/// Who the token says it speaks for. Not secret: these are logged to tell pods apart. They are
/// attacker-chosen (unverified tokens reach this too), so each is cut to [`MAX_NAME`] characters
/// with control characters replaced, before anything logs them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Subject {
    pub namespace: String,
    pub service_account: String,
    pub pod: String,
    pub pod_uid: String,
}

/// Who a token whose signature the cluster's keys vouch for speaks for: unlike [`Subject`],
/// this may decide things (a pod's budget, its cached credentials after its token rotates, the
/// node it may be redeemed on). Made only by [`verify`](crate::verify).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodIdentity {
    pub namespace: String,
    pub service_account: String,
    pub pod_name: String,
    pub pod_uid: String,
    /// `kubernetes.io.node.name`, in tokens of clusters that bind tokens to nodes (1.30+).
    pub node_name: Option<String>,
    /// `iat`: when the token was issued, if it says.
    pub issued_at: Option<u64>,
    /// The issuer and audience the token was verified for.
    pub issuer: String,
    pub audience: String,
}

impl PodIdentity {
    /// The pod this is, whatever token it currently holds: the same key for every token kubelet
    /// writes for one pod (same issuer, audience, namespace, service account and pod UID).
    pub fn key(&self) -> PodKey {
        let mut h = Sha256::new();
        for field in [
            &self.issuer,
            &self.audience,
            &self.namespace,
            &self.service_account,
            &self.pod_uid,
        ] {
            // Length-prefixed, so no two field lists hash alike.
            h.update((field.len() as u64).to_be_bytes());
            h.update(field.as_bytes());
        }
        PodKey(h.finalize().into())
    }

    /// The identity as log lines may show it: cut and cleaned like [`Subject`].
    pub fn subject(&self) -> Subject {
        Subject {
            namespace: loggable(self.namespace.clone()),
            service_account: loggable(self.service_account.clone()),
            pod: loggable(self.pod_name.clone()),
            pod_uid: loggable(self.pod_uid.clone()),
        }
    }
}

/// A pod, named by a hash of who it is (see [`PodIdentity::key`]); shown like [`TokenHash`].
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PodKey(pub [u8; 32]);

impl fmt::Display for PodKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        TokenHash(self.0).fmt(f)
    }
}

impl fmt::Debug for PodKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PodKey({self})")
    }
}

/// The claims every request needs. Who the token speaks for ([`Token::subject`]) is decoded
/// again from the raw payload only where it is logged: keeping three strings per request and
/// per cached entry for that would cost an allocation each on the hit path and ~200 bytes an entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub exp: u64,
    pub nbf: Option<u64>,
}

/// A structurally valid, unverified JWT.
#[derive(Clone)]
pub struct Token {
    /// The exact bytes the pod sent: forwarded to EKS Auth, which verifies them.
    raw: Arc<str>,
    hash: TokenHash,
    claims: Claims,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("hash", &self.hash)
            .field("claims", &self.claims)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct RawHeader<'a> {
    #[serde(borrow)]
    alg: std::borrow::Cow<'a, str>,
}

#[derive(Deserialize)]
struct RawClaims {
    exp: Option<f64>,
    nbf: Option<f64>,
}

fn decode_segment(segment: &str, what: &'static str) -> Result<Vec<u8>, TokenError> {
    decode(segment).ok_or(TokenError::Malformed(what))
}

/// 9999-12-31T23:59:59Z: later NumericDates are clamped to it, so that adding them (and the
/// leeway) to the epoch can never overflow a `SystemTime`.
pub const MAX_NUMERIC_DATE: u64 = 253_402_300_799;

/// A NumericDate may be fractional or absurd; clamp to whole seconds up to [`MAX_NUMERIC_DATE`].
fn numeric_date(v: f64) -> Result<u64, TokenError> {
    if v.is_finite() && v >= 0.0 {
        Ok((v as u64).min(MAX_NUMERIC_DATE))
    } else {
        Err(TokenError::Malformed(
            "a time claim is not a valid NumericDate",
        ))
    }
}

impl Token {
    /// Parse an `Authorization` header value. A `Bearer ` prefix is tolerated (some hand-written
    /// clients add one) even though SDKs send the token bare.
    pub fn parse(header: &[u8]) -> Result<Token, TokenError> {
        let text = std::str::from_utf8(header).map_err(|_| TokenError::Malformed("not UTF-8"))?;
        let text = text.strip_prefix("Bearer ").unwrap_or(text).trim();
        if text.is_empty() {
            return Err(TokenError::Missing);
        }
        if text.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::TooLarge(text.len()));
        }
        let mut parts = text.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed(
                "expected three dot-separated segments",
            ));
        };
        if h.is_empty() || p.is_empty() || s.is_empty() {
            return Err(TokenError::Malformed("a segment is empty"));
        }
        let header_bytes = decode_segment(h, "header is not base64url")?;
        let header: RawHeader = serde_json::from_slice(&header_bytes)
            .map_err(|_| TokenError::Malformed("header is not a JSON object with an alg"))?;
        if header.alg.is_empty() || header.alg.eq_ignore_ascii_case("none") {
            return Err(TokenError::Malformed("header alg is empty or none"));
        }
        decode_segment(s, "signature is not base64url")?;
        let raw: RawClaims =
            serde_json::from_slice(&decode_segment(p, "payload is not base64url")?)
                .map_err(|_| TokenError::Malformed("payload is not a JSON object of claims"))?;
        let exp = numeric_date(
            raw.exp
                .ok_or(TokenError::Malformed("the exp claim is missing"))?,
        )?;
        let nbf = raw.nbf.map(numeric_date).transpose()?;
        Ok(Token {
            hash: TokenHash::of(text.as_bytes()),
            raw: Arc::from(text),
            claims: Claims { exp, nbf },
        })
    }

    /// Who the token says it speaks for: the `kubernetes.io` claims, or `sub =
    /// system:serviceaccount:<ns>:<sa>` for tokens without them. Decoded from the raw payload
    /// each time (for logs, not for the hit path); a claim of the wrong type reads as empty.
    pub fn subject(&self) -> Subject {
        let claims = self.payload();
        let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_owned();
        let k = &claims["kubernetes.io"];
        let mut subject = Subject {
            namespace: text(&k["namespace"]),
            service_account: text(&k["serviceaccount"]["name"]),
            pod: text(&k["pod"]["name"]),
            pod_uid: text(&k["pod"]["uid"]),
        };
        if subject.namespace.is_empty() {
            if let Some((ns, sa)) = claims["sub"]
                .as_str()
                .and_then(|s| s.strip_prefix("system:serviceaccount:"))
                .and_then(|rest| rest.split_once(':'))
            {
                subject.namespace = ns.to_owned();
                subject.service_account = sa.to_owned();
            }
        }
        Subject {
            namespace: loggable(subject.namespace),
            service_account: loggable(subject.service_account),
            pod: loggable(subject.pod),
            pod_uid: loggable(subject.pod_uid),
        }
    }

    /// The `aud` claim (a string or a list), decoded from the raw payload like [`Token::subject`]:
    /// for reports, not for the hit path. EKS Auth, or `--token-issuer`, checks it.
    pub fn audiences(&self) -> Vec<String> {
        match self.payload()["aud"].take() {
            serde_json::Value::String(a) => vec![a],
            serde_json::Value::Array(list) => list
                .into_iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect(),
            _ => Vec::new(),
        }
    }

    /// The payload as JSON; `Null` if it does not decode (it did when the token was parsed).
    fn payload(&self) -> serde_json::Value {
        self.raw
            .split('.')
            .nth(1)
            .and_then(decode)
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Refuse a token outside `[nbf - leeway, exp + leeway]`. Leeway absorbs a node clock that
    /// is a little off, which would otherwise reject freshly minted tokens.
    pub fn check_time(&self, now: SystemTime, leeway: Duration) -> Result<(), TokenError> {
        self.claims.check_time(now, leeway)
    }

    pub fn raw(&self) -> &str {
        &self.raw
    }

    pub fn hash(&self) -> TokenHash {
        self.hash
    }

    pub fn claims(&self) -> &Claims {
        &self.claims
    }

    /// When the token stops being usable (exp + leeway): nothing derived from it outlives this.
    pub fn expires_at(&self, leeway: Duration) -> SystemTime {
        let exp = Duration::from_secs(self.claims.exp.min(MAX_NUMERIC_DATE));
        UNIX_EPOCH
            .checked_add(exp)
            .and_then(|t| t.checked_add(leeway))
            .unwrap_or(UNIX_EPOCH + Duration::from_secs(MAX_NUMERIC_DATE))
    }
}

impl Claims {
    pub fn check_time(&self, now: SystemTime, leeway: Duration) -> Result<(), TokenError> {
        let now = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let leeway = leeway.as_secs();
        if now > self.exp.saturating_add(leeway) {
            return Err(TokenError::Expired(now - self.exp));
        }
        if let Some(nbf) = self.nbf {
            if now.saturating_add(leeway) < nbf {
                return Err(TokenError::NotYetValid(nbf - now));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    use serde_json::json;

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }

    /// A well-formed JWT with a meaningless signature: parsing does not verify signatures.
    fn encode_unsigned(header: &serde_json::Value, claims: &serde_json::Value) -> String {
        format!(
            "{}.{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string()),
            URL_SAFE_NO_PAD.encode(b"not-a-real-signature"),
        )
    }

    fn token(claims: serde_json::Value) -> String {
        encode_unsigned(&json!({"alg": "RS256", "kid": "k1"}), &claims)
    }

    #[test]
    fn absurd_times_are_clamped_not_overflowed() {
        for exp in [
            json!(1e300),
            json!(u64::MAX),
            json!(18446744073709551615.0_f64),
        ] {
            let t =
                Token::parse(token(json!({"exp": exp, "nbf": 1e300})).as_bytes()).expect("parses");
            assert_eq!(t.claims().exp, MAX_NUMERIC_DATE);
            let at = t.expires_at(Duration::from_secs(u64::MAX / 4));
            assert!(at >= UNIX_EPOCH + Duration::from_secs(MAX_NUMERIC_DATE));
            assert!(t
                .check_time(SystemTime::now(), Duration::from_secs(60))
                .is_err());
        }
    }

    #[test]
    fn parses_projected_token_claims() {
        let t = token(json!({
            "aud": ["pods.eks.amazonaws.com"], "exp": now() + 100, "nbf": now() - 1,
            "sub": "system:serviceaccount:ns:sa",
            "kubernetes.io": {"namespace": "ns", "pod": {"name": "p", "uid": "u"},
                              "serviceaccount": {"name": "sa", "uid": "u2"}}
        }));
        let parsed = Token::parse(t.as_bytes()).expect("valid token");
        assert_eq!(
            parsed.subject(),
            Subject {
                namespace: "ns".into(),
                service_account: "sa".into(),
                pod: "p".into(),
                pod_uid: "u".into(),
            }
        );
        assert!(parsed
            .check_time(SystemTime::now(), Duration::from_secs(60))
            .is_ok());
        assert_eq!(parsed.raw(), t);
    }

    #[test]
    fn claims_are_cut_and_cleaned_for_logs() {
        let long = "n".repeat(10_000);
        let t = token(json!({"exp": now() + 100,
            "kubernetes.io": {"namespace": long, "pod": {"name": "p\n{\"level\":\"ERROR\"}"},
                              "serviceaccount": {"name": "sa"}}}));
        let parsed = Token::parse(t.as_bytes()).expect("parses");
        let s = parsed.subject();
        assert_eq!(
            s.namespace.chars().count(),
            MAX_NAME + 1,
            "cut, with a mark"
        );
        assert!(s.namespace.ends_with('…'));
        assert!(!s.pod.contains('\n'), "{:?}", s.pod);
        assert_eq!(s.service_account, "sa");
    }

    #[test]
    fn falls_back_to_sub_claim() {
        let t = token(json!({"exp": now() + 100, "sub": "system:serviceaccount:a:b"}));
        let parsed = Token::parse(t.as_bytes()).expect("valid token");
        assert_eq!(parsed.subject().namespace, "a");
        assert_eq!(parsed.subject().service_account, "b");
        // Claims of the wrong type are not a reason to refuse: they read as empty.
        let odd = token(json!({"exp": now() + 100, "kubernetes.io": {"namespace": 7}}));
        assert_eq!(
            Token::parse(odd.as_bytes())
                .expect("parses")
                .subject()
                .namespace,
            ""
        );
    }

    #[test]
    fn refuses_malformed_tokens() {
        for bad in ["", "   ", "abc", "a.b", "a.b.c.d", "..", "!!.??.##"] {
            assert!(Token::parse(bad.as_bytes()).is_err(), "{bad:?} accepted");
        }
        let no_exp = token(json!({"sub": "x"}));
        assert_eq!(
            Token::parse(no_exp.as_bytes()).unwrap_err(),
            TokenError::Malformed("the exp claim is missing")
        );
        let none_alg = encode_unsigned(&json!({"alg": "none"}), &json!({"exp": now() + 10}));
        assert!(Token::parse(none_alg.as_bytes()).is_err());
        let big = "a".repeat(MAX_TOKEN_BYTES + 1);
        assert_eq!(
            Token::parse(big.as_bytes()).unwrap_err(),
            TokenError::TooLarge(MAX_TOKEN_BYTES + 1)
        );
        assert!(Token::parse(&[0xff, 0xfe]).is_err());
    }

    #[test]
    fn time_checks_apply_leeway() {
        let leeway = Duration::from_secs(60);
        let expired_recently =
            Token::parse(token(json!({"exp": now() - 30})).as_bytes()).expect("parse");
        assert!(expired_recently
            .check_time(SystemTime::now(), leeway)
            .is_ok());
        let expired = Token::parse(token(json!({"exp": now() - 120})).as_bytes()).expect("parse");
        assert!(matches!(
            expired.check_time(SystemTime::now(), leeway),
            Err(TokenError::Expired(_))
        ));
        let future =
            Token::parse(token(json!({"exp": now() + 1000, "nbf": now() + 30})).as_bytes())
                .expect("parse");
        assert!(future.check_time(SystemTime::now(), leeway).is_ok());
        let far_future =
            Token::parse(token(json!({"exp": now() + 1000, "nbf": now() + 300})).as_bytes())
                .expect("parse");
        assert!(matches!(
            far_future.check_time(SystemTime::now(), leeway),
            Err(TokenError::NotYetValid(_))
        ));
    }

    #[test]
    fn debug_and_errors_never_show_the_token() {
        let t = token(json!({"exp": now() + 100}));
        let parsed = Token::parse(t.as_bytes()).expect("parse");
        let shown = format!("{parsed:?}");
        assert!(!shown.contains(&t) && !shown.contains(t.split('.').nth(1).unwrap_or("x")));
        assert_eq!(parsed.hash().to_string().len(), 16);
        assert_eq!(parsed.hash(), TokenHash::of(t.as_bytes()));
    }
}
