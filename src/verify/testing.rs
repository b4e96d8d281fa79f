//! For the verifier's unit tests: a cluster's signing keys made here, tokens they sign, and an
//! issuer on loopback that serves its discovery document and key set and counts the fetches.

use super::keys::{Retiring, Stored};
use super::source::KeySource;
use super::{Verifier, VerifySettings};
use crate::jwt::{Jwk, JwkSet};
use crate::token::Token;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A P-256 signing key of the cluster, named `kid`.
pub struct Key {
    pub kid: String,
    pair: EcdsaKeyPair,
}

impl Key {
    pub fn new(kid: &str) -> Key {
        let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).expect("key");
        Key {
            kid: kid.to_owned(),
            pair,
        }
    }

    pub fn jwk(&self) -> Jwk {
        let point = self.pair.public_key().as_ref();
        serde_json::from_value(json!({
            "kty": "EC", "crv": "P-256", "use": "sig", "kid": self.kid,
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
        }))
        .expect("jwk")
    }

    /// A compact JWS of `claims` with `header`, signed by this key whatever the header says.
    pub fn sign_with(&self, header: &Value, claims: &Value) -> String {
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let sig = self
            .pair
            .sign(&SystemRandom::new(), input.as_bytes())
            .expect("sign");
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
    }

    /// A token of the cluster at `issuer` for `claims`, signed ES256 under this key's `kid`.
    pub fn sign(&self, claims: &Value) -> Token {
        let header = json!({"alg": "ES256", "kid": self.kid});
        token(&self.sign_with(&header, claims))
    }
}

pub fn token(raw: &str) -> Token {
    Token::parse(raw.as_bytes()).expect("a well-formed token")
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
}

/// A pod's token claims, issued now by `issuer`.
pub fn claims(issuer: &str) -> Value {
    let now = now_secs();
    json!({
        "iss": issuer,
        "aud": ["pods.eks.amazonaws.com"],
        "iat": now, "nbf": now, "exp": now + 3600,
        "kubernetes.io": {
            "namespace": "shop",
            "pod": {"name": "cart-0", "uid": "uid-1"},
            "serviceaccount": {"name": "cart", "uid": "sa-1"},
            "node": {"name": "node-a", "uid": "n-1"},
        },
    })
}

/// An issuer on loopback: its discovery document, and the key set `keys` holds now.
pub struct Issuer {
    pub url: String,
    pub keys: Arc<Mutex<Vec<Jwk>>>,
    /// Key-set fetches served.
    pub fetches: Arc<AtomicUsize>,
}

impl Issuer {
    pub async fn start(keys: Vec<Jwk>) -> Issuer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let issuer = Issuer {
            url: format!("http://{addr}"),
            keys: Arc::new(Mutex::new(keys)),
            fetches: Arc::default(),
        };
        let (keys, fetches) = (issuer.keys.clone(), issuer.fetches.clone());
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let (keys, fetches) = (keys.clone(), fetches.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut n = 0;
                    while !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") && n < buf.len() {
                        match stream.read(&mut buf[n..]).await {
                            Ok(0) | Err(_) => return,
                            Ok(m) => n += m,
                        }
                    }
                    let request = String::from_utf8_lossy(&buf[..n]).into_owned();
                    let body = answer(&request, addr, &keys, &fetches);
                    let response = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                         content-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(response.as_bytes()).await;
                });
            }
        });
        issuer
    }

    pub fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }

    pub fn source(&self) -> KeySource {
        KeySource::discovery(
            &self.url,
            &format!("{}/.well-known/openid-configuration", self.url),
        )
        .expect("a loopback issuer")
    }

    /// A verifier of this issuer's keys holding `held` (fetched `age` ago; `retiring` keys
    /// dropped since), or none, started on a tracker of its own.
    pub fn verifier(
        &self,
        settings: VerifySettings,
        held: Option<(Vec<Jwk>, Vec<Jwk>, Duration)>,
    ) -> Arc<Verifier> {
        let source = self.source();
        let stored = held.map(|(current, retiring, age)| Stored {
            version: super::keys::STORED_VERSION,
            source: source.describe(),
            issuer: self.url.clone(),
            fetch_started: now_secs() - age.as_secs(),
            keys: JwkSet { keys: current },
            retiring: retiring
                .into_iter()
                .map(|key| Retiring {
                    key,
                    until: now_secs() + 900,
                })
                .collect(),
        });
        Verifier::new(source, settings, stored, None)
    }
}

fn answer(
    request: &str,
    addr: SocketAddr,
    keys: &Mutex<Vec<Jwk>>,
    fetches: &AtomicUsize,
) -> String {
    if request.starts_with("GET /.well-known/openid-configuration ") {
        json!({"issuer": format!("http://{addr}"), "jwks_uri": format!("http://{addr}/jwks")})
            .to_string()
    } else {
        fetches.fetch_add(1, Ordering::SeqCst);
        let keys = keys.lock().expect("keys").clone();
        serde_json::to_string(&JwkSet { keys }).expect("json")
    }
}
