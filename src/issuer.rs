//! Local verification of service-account tokens against the cluster's OIDC issuer
//! (`--token-issuer`), so a forged token costs no EKS Auth call.
//!
//! Contract: [`Verifier::start`] fetches the issuer's discovery document
//! (`<issuer>/.well-known/openid-configuration`, or `--token-issuer-discovery-url`) and the JWKS
//! it names, in the background, then again every [`IssuerSettings::refresh_every`].
//! [`Verifier::verify`] checks a token the way EKS Auth does, before any exchange: RS256 (or
//! ES256) signature by a published key (`kid`), `iss` equal to the issuer, and `aud` containing
//! `pods.eks.amazonaws.com`. (Time claims are checked for every request elsewhere.) Its
//! [`Verdict`]:
//! - `Valid`;
//! - `Invalid`: the token is refused with 400 and never reaches EKS Auth;
//! - `Unverifiable`: the keys could not be had (the issuer was never reached, or a token names an
//!   unknown key while the issuer is unreachable). The token goes on to EKS Auth as it would
//!   without verification, with a warning: an unreachable issuer never blocks a pod.
//!
//! Keys are cached. A token naming a key not in the cache causes one re-fetch, shared by every
//! request that needs it and at most once per [`IssuerSettings::min_refresh_interval`], so
//! random `kid`s cannot turn into a flood of fetches. A fetch failure keeps the keys already
//! held. Only the miss path verifies: a cache hit was already accepted by EKS Auth.

use crate::token::Token;
use aws_lc_rs::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// The audience of Pod Identity tokens.
pub const AUDIENCE: &str = "pods.eks.amazonaws.com";
/// Discovery documents and key sets larger than this are refused.
const MAX_DOCUMENT: usize = 256 * 1024;
/// How long a request waits for a key fetch it needs; the fetch itself goes on regardless.
const WAIT_FOR_KEYS: Duration = Duration::from_secs(1);
/// At most one warning this often that tokens went to EKS Auth unverified.
const WARN_EVERY: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct IssuerSettings {
    /// The `iss` every token must carry (the cluster's OIDC issuer URL).
    pub issuer: String,
    /// Where the discovery document is; by default under the issuer.
    pub discovery_url: String,
    pub audience: String,
    /// Re-fetches caused by unknown keys happen at most this often.
    pub min_refresh_interval: Duration,
    /// Keys are re-fetched this often regardless (issuers rotate keys).
    pub refresh_every: Duration,
    /// One fetch (discovery and JWKS) may take this long.
    pub fetch_timeout: Duration,
}

impl IssuerSettings {
    pub fn new(issuer: &str) -> IssuerSettings {
        let issuer = issuer.trim_end_matches('/').to_owned();
        IssuerSettings {
            discovery_url: format!("{issuer}/.well-known/openid-configuration"),
            issuer,
            audience: AUDIENCE.to_owned(),
            min_refresh_interval: Duration::from_secs(30),
            refresh_every: Duration::from_secs(3600),
            fetch_timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Valid,
    Invalid(String),
    Unverifiable(String),
}

/// A public key from the JWKS.
enum Key {
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    /// Uncompressed P-256 point.
    P256(Vec<u8>),
}

#[derive(Default)]
struct Keys {
    by_kid: HashMap<String, Arc<Key>>,
    /// Keys without a `kid`, tried for tokens without one.
    anonymous: Vec<Arc<Key>>,
    fetched: bool,
}

#[derive(Default)]
struct Fetching {
    last_attempt: Option<Instant>,
    last_ok: bool,
}

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>;

pub struct Verifier {
    settings: IssuerSettings,
    client: HttpsClient,
    keys: RwLock<Arc<Keys>>,
    /// Held while fetching: concurrent re-fetches wait for the one under way, then find it done.
    fetching: tokio::sync::Mutex<Fetching>,
    warned_unverifiable: std::sync::Mutex<Option<Instant>>,
}

#[derive(Deserialize)]
struct Discovery {
    issuer: Option<String>,
    jwks_uri: String,
}

#[derive(Deserialize)]
struct JwkSet {
    keys: Vec<Jwk>,
}

#[derive(Deserialize)]
struct Jwk {
    kty: String,
    kid: Option<String>,
    #[serde(rename = "use")]
    use_: Option<String>,
    n: Option<String>,
    e: Option<String>,
    crv: Option<String>,
    x: Option<String>,
    y: Option<String>,
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    kid: Option<String>,
}

#[derive(Deserialize)]
struct Claims {
    iss: Option<String>,
    aud: Option<Audience>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

fn b64(s: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(s.trim_end_matches('=')).ok()
}

impl Jwk {
    fn key(&self) -> Option<Key> {
        if self.use_.as_deref().is_some_and(|u| u != "sig") {
            return None;
        }
        match self.kty.as_str() {
            "RSA" => Some(Key::Rsa {
                n: b64(self.n.as_deref()?)?,
                e: b64(self.e.as_deref()?)?,
            }),
            "EC" if self.crv.as_deref() == Some("P-256") => {
                let (x, y) = (b64(self.x.as_deref()?)?, b64(self.y.as_deref()?)?);
                if x.len() != 32 || y.len() != 32 {
                    return None;
                }
                let mut point = vec![4u8];
                point.extend(x);
                point.extend(y);
                Some(Key::P256(point))
            }
            _ => None,
        }
    }
}

impl Key {
    fn verify(&self, alg: &str, message: &[u8], sig: &[u8]) -> bool {
        match (self, alg) {
            (Key::Rsa { n, e }, "RS256") => RsaPublicKeyComponents { n, e }
                .verify(&signature::RSA_PKCS1_2048_8192_SHA256, message, sig)
                .is_ok(),
            (Key::P256(point), "ES256") => {
                UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                    .verify(message, sig)
                    .is_ok()
            }
            _ => false,
        }
    }
}

fn invalid(why: &str) -> Verdict {
    Verdict::Invalid(format!("the token failed local verification: {why}"))
}

impl Verifier {
    /// Build the verifier and start fetching keys in the background; must be called within a
    /// Tokio runtime. Fails only if no HTTPS client can be built (no root certificates).
    pub fn start(settings: IssuerSettings) -> Result<Arc<Verifier>, String> {
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_native_roots(rustls::crypto::aws_lc_rs::default_provider())
            .map_err(|e| {
                format!("--token-issuer: cannot load the system's root certificates: {e}")
            })?
            .https_or_http()
            .enable_http1()
            .build();
        let client = Client::builder(hyper_util::rt::TokioExecutor::new()).build(https);
        let verifier = Arc::new(Verifier {
            settings,
            client,
            keys: RwLock::default(),
            fetching: tokio::sync::Mutex::default(),
            warned_unverifiable: std::sync::Mutex::default(),
        });
        let weak = Arc::downgrade(&verifier);
        let every = verifier.settings.refresh_every;
        tokio::spawn(async move {
            let mut first = true;
            loop {
                let Some(v) = weak.upgrade() else { return };
                v.refresh(!first).await;
                first = false;
                drop(v);
                tokio::time::sleep(every).await;
            }
        });
        Ok(verifier)
    }

    fn keys(&self) -> Arc<Keys> {
        self.keys
            .read()
            .map(|k| k.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Ask for a re-fetch in a task of its own and wait for it at most [`WAIT_FOR_KEYS`]:
    /// `false` if it failed or is still going.
    async fn refresh_for_request(self: &Arc<Self>) -> bool {
        let me = self.clone();
        let fetch = tokio::spawn(async move { me.refresh(false).await });
        matches!(
            tokio::time::timeout(WAIT_FOR_KEYS, fetch).await,
            Ok(Ok(true))
        )
    }

    /// Re-fetch the keys unless another fetch is under way (then wait for it) or one was tried
    /// within the minimum interval (unless `forced`). Returns whether the last fetch succeeded.
    async fn refresh(&self, forced: bool) -> bool {
        let mut state = self.fetching.lock().await;
        let recent = state
            .last_attempt
            .is_some_and(|t| t.elapsed() < self.settings.min_refresh_interval);
        if recent && !forced {
            return state.last_ok;
        }
        state.last_attempt = Some(Instant::now());
        let fetched = tokio::time::timeout(self.settings.fetch_timeout, self.fetch()).await;
        state.last_ok = match fetched {
            Ok(Ok(keys)) => {
                tracing::info!(issuer = %self.settings.issuer, keys = keys.by_kid.len() + keys.anonymous.len(),
                    "fetched the token issuer's signing keys");
                let keys = Arc::new(keys);
                match self.keys.write() {
                    Ok(mut k) => *k = keys,
                    Err(p) => *p.into_inner() = keys,
                }
                true
            }
            Ok(Err(why)) => {
                tracing::warn!(issuer = %self.settings.issuer, error = %why,
                    have_keys = self.keys().fetched, "cannot fetch the token issuer's signing keys");
                false
            }
            Err(_) => {
                tracing::warn!(issuer = %self.settings.issuer, timeout_s = self.settings.fetch_timeout.as_secs_f64(),
                    have_keys = self.keys().fetched, "the token issuer did not answer in time");
                false
            }
        };
        state.last_ok
    }

    async fn get_json<T: for<'de> Deserialize<'de>>(&self, url: &str) -> Result<T, String> {
        let uri: hyper::Uri = url.parse().map_err(|_| format!("{url:?} is not a URL"))?;
        let req = hyper::Request::get(uri)
            .header(hyper::header::ACCEPT, "application/json")
            .body(Empty::new())
            .map_err(|e| e.to_string())?;
        let res = self
            .client
            .request(req)
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        if !res.status().is_success() {
            return Err(format!("{url}: HTTP {}", res.status()));
        }
        let body = Limited::new(res.into_body(), MAX_DOCUMENT)
            .collect()
            .await
            .map_err(|e| format!("{url}: {e}"))?
            .to_bytes();
        serde_json::from_slice(&body).map_err(|e| format!("{url}: not the expected JSON: {e}"))
    }

    async fn fetch(&self) -> Result<Keys, String> {
        let discovery: Discovery = self.get_json(&self.settings.discovery_url).await?;
        if let Some(issuer) = &discovery.issuer {
            if issuer.trim_end_matches('/') != self.settings.issuer {
                return Err(format!(
                    "the discovery document names issuer {issuer:?}, not {:?}",
                    self.settings.issuer
                ));
            }
        }
        let set: JwkSet = self.get_json(&discovery.jwks_uri).await?;
        let mut keys = Keys {
            fetched: true,
            ..Keys::default()
        };
        for jwk in &set.keys {
            let Some(key) = jwk.key() else { continue };
            match &jwk.kid {
                Some(kid) => {
                    keys.by_kid.insert(kid.clone(), Arc::new(key));
                }
                None => keys.anonymous.push(Arc::new(key)),
            }
        }
        if keys.by_kid.is_empty() && keys.anonymous.is_empty() {
            return Err("the JWKS holds no usable signing key".into());
        }
        Ok(keys)
    }

    fn candidates(keys: &Keys, kid: Option<&str>) -> Vec<Arc<Key>> {
        match kid {
            Some(kid) => keys.by_kid.get(kid).cloned().into_iter().collect(),
            None => keys
                .anonymous
                .iter()
                .chain(keys.by_kid.values())
                .cloned()
                .collect(),
        }
    }

    /// Check `token`'s signature, issuer and audience.
    pub async fn verify(self: &Arc<Self>, token: &Token) -> Verdict {
        let verdict = self.check(token).await;
        if let Verdict::Unverifiable(why) = &verdict {
            let mut at = self
                .warned_unverifiable
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if at.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
                *at = Some(Instant::now());
                tracing::warn!(issuer = %self.settings.issuer, reason = %why,
                    "token verification is on but cannot be done; tokens go to EKS Auth unverified");
            }
        }
        verdict
    }

    async fn check(self: &Arc<Self>, token: &Token) -> Verdict {
        let raw = token.raw();
        let mut parts = raw.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return invalid("not a JWS compact serialisation");
        };
        let Some(header) = b64(h).and_then(|b| serde_json::from_slice::<Header>(&b).ok()) else {
            return invalid("the header is not base64url JSON with an alg");
        };
        if header.alg != "RS256" && header.alg != "ES256" {
            return invalid("alg must be RS256 or ES256");
        }
        let Some(sig) = b64(s) else {
            return invalid("the signature is not base64url");
        };
        let kid = header.kid.as_deref();
        let mut keys = self.keys();
        if !keys.fetched || Self::candidates(&keys, kid).is_empty() {
            let ok = self.refresh_for_request().await;
            keys = self.keys();
            if !keys.fetched {
                return Verdict::Unverifiable("the issuer's keys could not be fetched".into());
            }
            if Self::candidates(&keys, kid).is_empty() {
                return if ok {
                    invalid("signed by a key the issuer does not publish")
                } else {
                    Verdict::Unverifiable(
                        "the token names a key not seen yet and the issuer is unreachable".into(),
                    )
                };
            }
        }
        let message = format!("{h}.{p}");
        let signed = Self::candidates(&keys, kid)
            .iter()
            .any(|key| key.verify(&header.alg, message.as_bytes(), &sig));
        if !signed {
            return invalid("the signature does not match the issuer's key");
        }
        let Some(claims) = b64(p).and_then(|b| serde_json::from_slice::<Claims>(&b).ok()) else {
            return invalid("the payload is not base64url JSON");
        };
        if claims.iss.as_deref().map(|i| i.trim_end_matches('/')) != Some(&self.settings.issuer) {
            return invalid("it was issued by another issuer");
        }
        let audience_ok = match &claims.aud {
            Some(Audience::One(a)) => *a == self.settings.audience,
            Some(Audience::Many(list)) => list.iter().any(|a| *a == self.settings.audience),
            None => false,
        };
        if !audience_ok {
            return invalid("its audience is not pods.eks.amazonaws.com");
        }
        Verdict::Valid
    }
}
