//! The emulator's service-account token issuer: an RSA key, tokens signed with it, and their
//! verification, the way EKS Auth verifies a cluster's projected tokens.
//!
//! Contract: [`Issuer::load_or_create`] keeps one RSA-2048 key per state directory in
//! `issuer-key.pem` (PKCS#8, mode 0600). A missing file is created; a file that exists but does
//! not parse is an error, never silently replaced (tokens minted with it would stop working).
//! [`Issuer::mint`] writes projected-token-shaped JWTs: RS256, a `kid` (SHA-256 thumbprint of the
//! public key), audience `pods.eks.amazonaws.com`, `sub`, `jti` and the nested `kubernetes.io`
//! claims. [`Issuer::verify`] checks signature, `kid`, issuer, audience and time, and returns the
//! subject or the EKS Auth error a real cluster would return.

use crate::jwt::{Jws, PublicKey};
use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::{KeyPair, KeySize};
use aws_lc_rs::signature::{self, KeyPair as _};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use super::state::write_private;
pub use crate::token::AUDIENCE;
pub const KEY_FILE: &str = "issuer-key.pem";
const PEM_BEGIN: &str = "-----BEGIN PRIVATE KEY-----";
const PEM_END: &str = "-----END PRIVATE KEY-----";

#[derive(Debug, thiserror::Error)]
pub enum IssuerError {
    #[error("cannot use state directory {0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error(
        "{0} is not an RSA private key in PKCS#8 PEM ({1}); move it away to start with a new key"
    )]
    Corrupt(PathBuf, &'static str),
    #[error("cannot generate an RSA key")]
    KeyGen,
    #[error("cannot sign the token")]
    Sign,
}

/// Why a token was refused, as EKS Auth codes it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("{0}")]
    Invalid(String),
    #[error("the service account token has expired")]
    Expired,
}

impl VerifiedSubject {
    /// `system:serviceaccount:<namespace>:<service account>`, the token's `sub`.
    pub fn sub(&self) -> String {
        format!(
            "system:serviceaccount:{}:{}",
            self.namespace, self.service_account
        )
    }
}

/// Who a verified token speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedSubject {
    pub namespace: String,
    pub service_account: String,
    pub pod_name: String,
    pub pod_uid: String,
}

/// What to put in a minted token.
#[derive(Debug, Clone)]
pub struct MintRequest {
    pub namespace: String,
    pub service_account: String,
    pub pod: Option<String>,
    pub ttl: Duration,
    /// Overridable for tests of the audience check.
    pub audience: String,
}

impl MintRequest {
    pub fn new(namespace: &str, service_account: &str) -> Self {
        MintRequest {
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
            pod: None,
            ttl: Duration::from_secs(86400),
            audience: AUDIENCE.to_owned(),
        }
    }
}

pub struct Issuer {
    key: KeyPair,
    kid: String,
    issuer: String,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

impl Issuer {
    /// The issuer URL in `iss`; tokens of other issuers are refused.
    pub const ISSUER: &'static str = "https://oidc.pod-identity-agent.local/id/dev";

    pub fn load_or_create(dir: &Path) -> Result<Issuer, IssuerError> {
        std::fs::create_dir_all(dir).map_err(|e| IssuerError::Io(dir.to_owned(), e))?;
        let path = dir.join(KEY_FILE);
        match std::fs::read_to_string(&path) {
            Ok(pem) => Issuer::from_pem(&pem).map_err(|why| IssuerError::Corrupt(path, why)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = KeyPair::generate(KeySize::Rsa2048).map_err(|_| IssuerError::KeyGen)?;
                let der = key.as_der().map_err(|_| IssuerError::KeyGen)?;
                write_private(&path, &to_pem(der.as_ref()))
                    .map_err(|e| IssuerError::Io(path.clone(), e))?;
                Ok(Issuer::from_key(key))
            }
            Err(e) => Err(IssuerError::Io(path, e)),
        }
    }

    fn from_pem(pem: &str) -> Result<Issuer, &'static str> {
        let body = pem
            .trim()
            .strip_prefix(PEM_BEGIN)
            .and_then(|r| r.strip_suffix(PEM_END))
            .ok_or("no PRIVATE KEY block")?;
        let b64: String = body.split_whitespace().collect();
        let der = STANDARD.decode(b64).map_err(|_| "bad base64")?;
        let key = KeyPair::from_pkcs8(&der).map_err(|_| "not an RSA PKCS#8 key")?;
        Ok(Issuer::from_key(key))
    }

    fn from_key(key: KeyPair) -> Issuer {
        let kid = URL_SAFE_NO_PAD.encode(&Sha256::digest(key.public_key().as_ref())[..16]);
        Issuer {
            key,
            kid,
            issuer: Issuer::ISSUER.to_owned(),
        }
    }

    /// A 32-byte key for `purpose`, derived from the private key: stable for as long as the
    /// state dir keeps the key, and different for every purpose. If the key cannot be encoded
    /// (it always can), a random one: what it protects then lasts one run.
    pub fn derive_key(&self, purpose: &str) -> [u8; 32] {
        let mut out = [0u8; 32];
        match self.key.as_der() {
            Ok(der) => {
                let key = aws_lc_rs::hmac::Key::new(
                    aws_lc_rs::hmac::HMAC_SHA256,
                    &Sha256::digest(der.as_ref()),
                );
                out.copy_from_slice(aws_lc_rs::hmac::sign(&key, purpose.as_bytes()).as_ref());
            }
            Err(_) => out.iter_mut().for_each(|b| *b = fastrand::u8(..)),
        }
        out
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The issuer URL tokens carry in `iss`.
    pub fn url(&self) -> &str {
        &self.issuer
    }

    /// The OIDC discovery document, with the key set served at `base` (this emulator's URL).
    pub fn discovery(&self, base: &str) -> Value {
        json!({
            "issuer": self.issuer,
            "jwks_uri": format!("{base}/openid/v1/jwks"),
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
        })
    }

    /// The public key as a JWKS document, as a cluster's OIDC discovery serves it.
    pub fn jwks(&self) -> Value {
        let (n, e) = self.modulus_exponent();
        json!({"keys": [{
            "kty": "RSA", "alg": "RS256", "use": "sig", "kid": self.kid,
            "n": URL_SAFE_NO_PAD.encode(n),
            "e": URL_SAFE_NO_PAD.encode(e),
        }]})
    }

    /// The signing key's public half, as the agent's verifier holds keys.
    fn public_key(&self) -> PublicKey {
        let (n, e) = self.modulus_exponent();
        PublicKey::Rsa { n, e }
    }

    fn modulus_exponent(&self) -> (Vec<u8>, Vec<u8>) {
        let pk = self.key.public_key();
        (
            pk.modulus().big_endian_without_leading_zero().to_vec(),
            pk.exponent().big_endian_without_leading_zero().to_vec(),
        )
    }

    pub fn mint(&self, req: &MintRequest) -> Result<String, IssuerError> {
        let now = now();
        let pod = req
            .pod
            .clone()
            .unwrap_or_else(|| format!("{}-{}", req.service_account, short_id(8)));
        let claims = json!({
            "aud": [req.audience],
            "exp": now + req.ttl.as_secs(),
            "iat": now,
            "nbf": now,
            "iss": self.issuer,
            "jti": uuid_like(),
            "sub": format!("system:serviceaccount:{}:{}", req.namespace, req.service_account),
            "kubernetes.io": {
                "namespace": req.namespace,
                "pod": {"name": pod, "uid": uuid_like()},
                "serviceaccount": {"name": req.service_account, "uid": uuid_like()},
            },
        });
        self.sign(&claims)
    }

    /// Sign arbitrary claims (tests use this for tokens a kubelet would never write).
    pub fn sign(&self, claims: &Value) -> Result<String, IssuerError> {
        let header = json!({"alg": "RS256", "kid": self.kid});
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let mut sig = vec![0; self.key.public_modulus_len()];
        self.key
            .sign(
                &signature::RSA_PKCS1_SHA256,
                &SystemRandom::new(),
                signing_input.as_bytes(),
                &mut sig,
            )
            .map_err(|_| IssuerError::Sign)?;
        Ok(format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig)))
    }

    /// Verify as EKS Auth does: signature by this issuer's key, issuer, audience, time.
    pub fn verify(&self, token: &str) -> Result<VerifiedSubject, Rejection> {
        self.verify_for(token, AUDIENCE)
    }

    /// Verify signature, issuer, time and subject, whatever the audience (STS checks the
    /// audience against the role's trust afterwards).
    pub fn verify_any_audience(&self, token: &str) -> Result<VerifiedSubject, Rejection> {
        self.check(token, None)
    }

    /// Verify a token meant for `audience` (IRSA tokens are for `sts.amazonaws.com`).
    pub fn verify_for(&self, token: &str, audience: &str) -> Result<VerifiedSubject, Rejection> {
        self.check(token, Some(audience))
    }

    fn check(&self, token: &str, audience: Option<&str>) -> Result<VerifiedSubject, Rejection> {
        let invalid = |why: &str| {
            Rejection::Invalid(format!("the service account token is not valid: {why}"))
        };
        // The agent's one JWS reader: the emulator and the agent cannot disagree on a token.
        let jws = Jws::parse(token).map_err(|e| invalid(&e.to_string()))?;
        if jws.header.alg != "RS256" {
            return Err(invalid("alg must be RS256"));
        }
        if jws.header.kid.as_deref() != Some(self.kid.as_str()) {
            return Err(invalid("signed by an unknown key (kid)"));
        }
        if !jws.verify(&self.public_key()) {
            return Err(invalid("signature verification failed"));
        }
        let claims: Value = jws
            .claims()
            .ok_or_else(|| invalid("payload is not base64url JSON"))?;
        if claims["iss"] != self.issuer.as_str() {
            return Err(invalid("unexpected issuer"));
        }
        if let Some(audience) = audience {
            let aud_ok = match &claims["aud"] {
                Value::String(a) => a == audience,
                Value::Array(list) => list.iter().any(|a| a == audience),
                _ => false,
            };
            if !aud_ok {
                return Err(invalid(&format!("audience must be {audience}")));
            }
        }
        let now = now();
        let exp = claims["exp"].as_u64().ok_or_else(|| invalid("no exp"))?;
        if now >= exp {
            return Err(Rejection::Expired);
        }
        if claims["nbf"].as_u64().is_some_and(|nbf| now + 5 < nbf) {
            return Err(invalid("not valid yet (nbf)"));
        }
        let k = &claims["kubernetes.io"];
        let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
        let subject = VerifiedSubject {
            namespace: text(&k["namespace"]),
            service_account: text(&k["serviceaccount"]["name"]),
            pod_name: text(&k["pod"]["name"]),
            pod_uid: text(&k["pod"]["uid"]),
        };
        if subject.namespace.is_empty() || subject.service_account.is_empty() {
            return Err(invalid("no kubernetes.io namespace and service account"));
        }
        Ok(subject)
    }
}

fn to_pem(der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = String::from(PEM_BEGIN);
    out.push('\n');
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(PEM_END);
    out.push('\n');
    out
}

/// Random lowercase alphanumerics.
pub fn short_id(len: usize) -> String {
    (0..len)
        .map(|_| fastrand::alphanumeric().to_ascii_lowercase())
        .collect()
}

/// A random UUID-shaped string (v4 layout).
pub fn uuid_like() -> String {
    let hex = |n: usize| -> String {
        (0..n)
            .map(|_| char::from_digit(fastrand::u32(0..16), 16).unwrap_or('0'))
            .collect()
    };
    format!(
        "{}-{}-4{}-{}{}-{}",
        hex(8),
        hex(4),
        hex(3),
        ['8', '9', 'a', 'b'][fastrand::usize(0..4)],
        hex(3),
        hex(12)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mint_and_verify_round_trip_and_key_persists() {
        let dir = tempfile::tempdir().expect("tempdir");
        let issuer = Issuer::load_or_create(dir.path()).expect("issuer");
        let token = issuer.mint(&MintRequest::new("ns", "sa")).expect("mint");
        let subject = issuer.verify(&token).expect("verifies");
        assert_eq!(
            (subject.namespace.as_str(), subject.service_account.as_str()),
            ("ns", "sa")
        );
        // The agent's own parser accepts it too.
        let parsed = crate::token::Token::parse(token.as_bytes()).expect("agent parses");
        assert_eq!(parsed.subject().namespace, "ns");
        // Same key on reload.
        let again = Issuer::load_or_create(dir.path()).expect("reload");
        assert_eq!(again.kid(), issuer.kid());
        assert!(again.verify(&token).is_ok());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(KEY_FILE))
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert_eq!(issuer.jwks()["keys"][0]["kid"], issuer.kid());
    }

    #[test]
    fn refuses_foreign_tampered_and_wrong_tokens() {
        let a = Issuer::load_or_create(tempfile::tempdir().expect("d").path()).expect("a");
        let b = Issuer::load_or_create(tempfile::tempdir().expect("d").path()).expect("b");
        let from_b = b.mint(&MintRequest::new("ns", "sa")).expect("mint");
        assert!(matches!(a.verify(&from_b), Err(Rejection::Invalid(_))));
        let good = a.mint(&MintRequest::new("ns", "sa")).expect("mint");
        let parts: Vec<&str> = good.split('.').collect();
        let forged_payload = URL_SAFE_NO_PAD.encode(
            String::from_utf8(URL_SAFE_NO_PAD.decode(parts[1]).expect("b64"))
                .expect("utf8")
                .replace("\"ns\"", "\"kube-system\""),
        );
        let tampered = format!("{}.{}.{}", parts[0], forged_payload, parts[2]);
        assert!(
            matches!(a.verify(&tampered), Err(Rejection::Invalid(m)) if m.contains("signature"))
        );
        let mut wrong_aud = MintRequest::new("ns", "sa");
        wrong_aud.audience = "sts.amazonaws.com".into();
        assert!(
            matches!(a.verify(&a.mint(&wrong_aud).expect("mint")), Err(Rejection::Invalid(m)) if m.contains("audience"))
        );
        let expired = a
            .sign(
                &json!({"iss": Issuer::ISSUER, "aud": AUDIENCE, "exp": now() - 10,
            "kubernetes.io": {"namespace": "ns", "serviceaccount": {"name": "sa"}}}),
            )
            .expect("sign");
        assert_eq!(a.verify(&expired), Err(Rejection::Expired));
    }

    /// L9: in a shared state directory, a file or symlink planted where the old code put its
    /// temporary file (`issuer-key.tmp`) receives nothing, and the key ends up owner-only.
    #[cfg(unix)]
    #[test]
    fn a_planted_temporary_file_or_symlink_gets_nothing() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let elsewhere = tempfile::tempdir().expect("tempdir");
        let target = elsewhere.path().join("stolen");
        std::fs::write(&target, "").expect("write");
        std::os::unix::fs::symlink(&target, dir.path().join("issuer-key.tmp")).expect("symlink");
        let planted = dir.path().join("tokens.tmp");
        std::fs::write(&planted, "").expect("write");
        std::fs::set_permissions(&planted, std::fs::Permissions::from_mode(0o666)).expect("chmod");
        Issuer::load_or_create(dir.path()).expect("issuer");
        write_private(&dir.path().join("tokens"), "secret").expect("write");
        assert_eq!(
            std::fs::read_to_string(&target).expect("read"),
            "",
            "written through a symlink"
        );
        assert_eq!(
            std::fs::read_to_string(&planted).expect("read"),
            "",
            "written into a planted file"
        );
        for file in [KEY_FILE, "tokens"] {
            let meta = std::fs::symlink_metadata(dir.path().join(file)).expect("meta");
            assert!(meta.is_file(), "{file}");
            assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{file}");
        }
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .expect("ls")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(left.is_empty(), "temporary files left: {left:?}");
    }

    #[test]
    fn corrupt_key_is_an_error_not_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(KEY_FILE), "garbage").expect("write");
        assert!(matches!(
            Issuer::load_or_create(dir.path()),
            Err(IssuerError::Corrupt(..))
        ));
        assert_eq!(
            std::fs::read_to_string(dir.path().join(KEY_FILE)).expect("read"),
            "garbage"
        );
    }
}
