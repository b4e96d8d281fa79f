//! Where the cluster's signing keys come from, and one fetch of them.
//!
//! Contract: two sources, whichever the operator configures.
//! - [`KeySource::ApiServer`]: the API server itself, with the agent's service-account token
//!   ([`crate::kube`]): `GET /.well-known/openid-configuration` names the issuer tokens carry in
//!   `iss`, and `GET /openid/v1/jwks` the keys. The API server signs the tokens, so its key set is
//!   never behind (any Kubernetes that serves `/openid/v1/jwks`: 1.21 and later).
//! - [`KeySource::Discovery`]: an issuer's public discovery document (`--token-issuer`, e.g. an
//!   EKS cluster's OIDC URL): its `issuer` must equal the configured one, and its `jwks_uri` must
//!   be https (loopback excepted, see [`crate::https`]) on the discovery document's own origin, so
//!   a document that is tampered with cannot send the agent to someone else's keys.
//!
//! A fetch returns the issuer and the key set, or says why not; it never panics on what a server
//! sends (documents are size-limited and parsed into typed shapes).

use crate::https::{check_url, Https, Roots};
use crate::jwt::JwkSet;
use crate::kube::KubeClient;
use bytes::Bytes;
use http_body_util::Full;
use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;

/// Discovery documents and key sets larger than this are refused.
const MAX_DOCUMENT: usize = 256 * 1024;

#[derive(Deserialize)]
struct Discovery {
    issuer: Option<String>,
    jwks_uri: Option<String>,
}

/// What one fetch found.
pub struct Fetched {
    pub issuer: String,
    pub jwks: JwkSet,
}

pub enum KeySource {
    ApiServer(Arc<KubeClient>),
    Discovery {
        /// The `iss` tokens must carry.
        issuer: String,
        discovery_url: String,
        https: Box<Https>,
    },
}

fn parse<T: for<'de> Deserialize<'de>>(what: &str, body: &[u8]) -> Result<T, String> {
    serde_json::from_slice(body).map_err(|e| format!("{what} is not the expected JSON: {e}"))
}

fn origin(uri: &hyper::Uri) -> (Option<&str>, Option<String>) {
    (
        uri.scheme_str(),
        uri.authority().map(|a| a.as_str().to_ascii_lowercase()),
    )
}

impl KeySource {
    /// An issuer's discovery document at `discovery_url`, for tokens whose `iss` is `issuer`.
    pub fn discovery(issuer: &str, discovery_url: &str) -> Result<KeySource, String> {
        check_url(issuer).map_err(|e| format!("--token-issuer {e}"))?;
        check_url(discovery_url).map_err(|e| format!("--token-issuer-discovery-url {e}"))?;
        Ok(KeySource::Discovery {
            issuer: issuer.trim_end_matches('/').to_owned(),
            discovery_url: discovery_url.to_owned(),
            https: Box::new(Https::new(Roots::Native, MAX_DOCUMENT)?),
        })
    }

    /// What the keys are for, as stored with them: keys of another source are never reused.
    pub fn describe(&self) -> String {
        match self {
            KeySource::ApiServer(k) => format!("api-server {}", k.server()),
            KeySource::Discovery { issuer, .. } => format!("issuer {issuer}"),
        }
    }

    pub async fn fetch(&self, timeout: Duration) -> Result<Fetched, String> {
        match self {
            KeySource::ApiServer(kube) => {
                let get = |path: &'static str| async move {
                    kube.get(path).await.map_err(|e| format!("{path}: {e}"))
                };
                let discovery: Discovery = parse(
                    "the API server's discovery document",
                    &get("/.well-known/openid-configuration").await?,
                )?;
                let issuer = discovery
                    .issuer
                    .filter(|i| !i.is_empty())
                    .ok_or("the API server's discovery document names no issuer")?;
                let jwks = parse("the API server's key set", &get("/openid/v1/jwks").await?)?;
                Ok(Fetched {
                    issuer: issuer.trim_end_matches('/').to_owned(),
                    jwks,
                })
            }
            KeySource::Discovery {
                issuer,
                discovery_url,
                https,
            } => {
                let discovery: Discovery = parse(
                    "the discovery document",
                    &get(https, discovery_url, timeout).await?,
                )?;
                if let Some(named) = &discovery.issuer {
                    if named.trim_end_matches('/') != issuer {
                        return Err(format!(
                            "the discovery document names issuer {named:?}, not {issuer:?}"
                        ));
                    }
                }
                let jwks_uri = discovery
                    .jwks_uri
                    .ok_or("the discovery document names no jwks_uri")?;
                let (from, to) = (check_url(discovery_url)?, check_url(&jwks_uri)?);
                if origin(&from) != origin(&to) {
                    return Err(format!(
                        "jwks_uri {jwks_uri:?} is not on the discovery document's origin"
                    ));
                }
                let jwks = parse("the key set", &get(https, &jwks_uri, timeout).await?)?;
                Ok(Fetched {
                    issuer: issuer.clone(),
                    jwks,
                })
            }
        }
    }
}

async fn get(https: &Https, url: &str, timeout: Duration) -> Result<Bytes, String> {
    let uri = check_url(url)?;
    let req = hyper::Request::get(uri)
        .header(hyper::header::ACCEPT, "application/json")
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    https
        .send(req, timeout)
        .await
        .map_err(|e| format!("{url}: {e}"))
}
