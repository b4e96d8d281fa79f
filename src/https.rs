//! The agent's own outbound HTTP calls that are not EKS Auth (the SDK has its own client): the
//! cluster's verification keys and the Kubernetes API.
//!
//! Contract: [`Https::new`] builds one client per destination kind with rustls (the same TLS
//! stack and crypto provider the SDK builds, so no second one), trusting either the system's
//! roots or one CA bundle (the API server's). Plain `http://` is refused by [`check_url`] unless
//! the host is a loopback address (tests and local doubles): keys fetched over plain HTTP from
//! anywhere else could be replaced on the path and turn every pod's token into a refusal.
//! [`Https::send`] bounds every call by a timeout and the answer's body by a size limit, follows
//! no redirects and ignores proxy variables (the destinations are the cluster's own).

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Request, StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use std::net::IpAddr;
use std::time::Duration;

type Inner = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// A bounded HTTPS client.
#[derive(Clone)]
pub struct Https {
    client: Inner,
    /// Answers larger than this are an error, not a buffer.
    max_body: usize,
}

/// Why a call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HttpsError {
    /// The server could not be reached or did not answer in time.
    #[error("{0}")]
    Unreachable(String),
    /// The server answered with this non-success status.
    #[error("HTTP {0}")]
    Status(StatusCode, Bytes),
    /// The answer was too large or cut off.
    #[error("{0}")]
    Body(String),
}

/// Where the client's trust comes from.
pub enum Roots<'a> {
    /// The system's root certificates (public issuers).
    Native,
    /// Only the certificates in this PEM bundle (the API server's CA).
    Pem(&'a [u8]),
}

/// `url` as a [`Uri`] if it is `https`, or `http` to a loopback address; else why not.
pub fn check_url(url: &str) -> Result<Uri, String> {
    let uri: Uri = url
        .trim()
        .parse()
        .map_err(|_| format!("{url:?} is not a URL"))?;
    let host = uri.host().unwrap_or("");
    if host.is_empty() {
        return Err(format!("{url:?} has no host"));
    }
    match uri.scheme_str() {
        Some("https") => Ok(uri),
        Some("http") if is_loopback(host) => Ok(uri),
        Some("http") => Err(format!(
            "{url:?}: plain http is allowed only to a loopback address; use https"
        )),
        _ => Err(format!("{url:?} is not an https URL")),
    }
}

fn is_loopback(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare.eq_ignore_ascii_case("localhost")
        || bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

impl Https {
    pub fn new(roots: Roots<'_>, max_body: usize) -> Result<Https, String> {
        let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = hyper_rustls::HttpsConnectorBuilder::new();
        let builder = match roots {
            Roots::Native => builder
                .with_provider_and_native_roots(provider)
                .map_err(|e| format!("cannot load the system's root certificates: {e}"))?,
            Roots::Pem(pem) => {
                use rustls::pki_types::pem::PemObject;
                let mut store = rustls::RootCertStore::empty();
                for cert in rustls::pki_types::CertificateDer::pem_slice_iter(pem) {
                    let cert = cert.map_err(|e| format!("the CA bundle is not PEM: {e}"))?;
                    store
                        .add(cert)
                        .map_err(|e| format!("the CA bundle holds an unusable certificate: {e}"))?;
                }
                if store.is_empty() {
                    return Err("the CA bundle holds no certificate".into());
                }
                let config = rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .map_err(|e| e.to_string())?
                    .with_root_certificates(store)
                    .with_no_client_auth();
                builder.with_tls_config(config)
            }
        };
        let connector = builder.https_or_http().enable_http1().build();
        Ok(Https {
            client: Client::builder(hyper_util::rt::TokioExecutor::new()).build(connector),
            max_body,
        })
    }

    /// Send `req` (its URL already passed [`check_url`]) and collect a success's body, all
    /// within `timeout`.
    pub async fn send(
        &self,
        req: Request<Full<Bytes>>,
        timeout: Duration,
    ) -> Result<Bytes, HttpsError> {
        let call = async {
            let res = self
                .client
                .request(req)
                .await
                .map_err(|e| HttpsError::Unreachable(e.to_string()))?;
            let status = res.status();
            let body = Limited::new(res.into_body(), self.max_body)
                .collect()
                .await
                .map_err(|e| HttpsError::Body(e.to_string()))?
                .to_bytes();
            if status.is_success() {
                Ok(body)
            } else {
                Err(HttpsError::Status(status, body))
            }
        };
        tokio::time::timeout(timeout, call)
            .await
            .unwrap_or_else(|_| Err(HttpsError::Unreachable("no answer in time".into())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_only_to_loopback() {
        for ok in [
            "https://oidc.eks.us-west-2.amazonaws.com/id/X",
            "http://127.0.0.1:8080/x",
            "http://[::1]:1/x",
            "http://localhost/x",
        ] {
            assert!(check_url(ok).is_ok(), "{ok}");
        }
        for bad in [
            "http://oidc.example/x",
            "http://10.0.0.1/x",
            "ftp://127.0.0.1/",
            "oidc.example",
            "https:///x",
        ] {
            assert!(check_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_bundle_without_certificates_is_refused() {
        assert!(Https::new(Roots::Pem(b"not pem"), 1024).is_err());
    }
}
