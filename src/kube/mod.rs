//! The one Kubernetes API client: everything the agent asks of the API server goes through here.
//!
//! Contract: [`KubeSettings::in_cluster`] reads the standard in-cluster configuration (the
//! `KUBERNETES_SERVICE_HOST`/`_PORT` variables, the pod's service-account token and CA under
//! [`SERVICE_ACCOUNT_DIR`]); any part can be overridden (tests point it at a double on loopback,
//! where plain http is allowed, see [`crate::https`]). [`KubeClient::send`] makes one call with
//! the service-account token as a bearer (re-read from its file at most every
//! [`TOKEN_REREAD`], because kubelet rotates it), each attempt bounded by `timeout`; connection
//! failures, 429 and 5xx are retried up to `attempts` times with exponential backoff and jitter,
//! other statuses are answered at once. A 401/403 is logged once at warn (the agent's RBAC is
//! wrong, and saying so every call helps no one) and every call is counted by result in
//! `pod_identity_kube_api_requests_total`. The token never appears in a log line or an error.
//! Callers run these calls off the request path: the API server being slow, down or forbidding
//! never delays a credential.
//!
//! What the agent asks of the API server, besides the key set ([`crate::verify::source`]):
//! [`taint`] removes the node's startup taint once the agent serves, and [`events`] reports
//! refused pods and refused node credentials as Events. [`PERMISSIONS`] lists every resource
//! verb these use, so the manifests' ClusterRole grants exactly those (`tests/it/manifests.rs`).
//!
//! Why a thin client and not kube-rs: the agent needs five calls (two GETs of the key set, a GET
//! and a JSON patch of its Node, a POST and a merge patch of an Event) and already builds
//! hyper, rustls and serde_json for the SDK; kube-rs with k8s-openapi would add a second
//! client stack and a large generated crate to a binary whose size is a goal, for typed
//! objects the agent reads one field of. `k8s-openapi` stays a dev-dependency: the tests check
//! every body the agent sends against its types.

pub mod events;
pub mod taint;

use crate::https::{check_url, Https, HttpsError, Roots};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, StatusCode};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Where a pod's service-account credentials are mounted.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// The token file is re-read at most this often.
pub const TOKEN_REREAD: Duration = Duration::from_secs(60);
/// Answers larger than this are refused (a key set or an object, never a list of a cluster).
const MAX_BODY: usize = 1024 * 1024;
const BACKOFF_BASE: Duration = Duration::from_millis(200);

/// A rule of the agent's ClusterRole: an API group, a resource and the verbs used on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Permission {
    pub api_group: &'static str,
    pub resource: &'static str,
    pub verbs: &'static [&'static str],
}

/// Every resource verb the agent uses ([`taint`]: get and patch its Node; [`events`]: create
/// and patch `events.k8s.io` Events). The key set is read through non-resource URLs.
pub const PERMISSIONS: &[Permission] = &[
    Permission {
        api_group: "",
        resource: "nodes",
        verbs: &["get", "patch"],
    },
    Permission {
        api_group: "events.k8s.io",
        resource: "events",
        verbs: &["create", "patch"],
    },
];

/// How to reach the API server.
#[derive(Debug, Clone)]
pub struct KubeSettings {
    /// `https://host:port` (or `http://` to loopback).
    pub server: String,
    /// The bearer token's file.
    pub token_file: PathBuf,
    /// The CA bundle the server's certificate must chain to; `None`: the system's roots.
    pub ca_file: Option<PathBuf>,
    /// Each attempt's deadline.
    pub timeout: Duration,
    /// Attempts per call, the first included.
    pub attempts: u32,
}

impl KubeSettings {
    /// The settings a pod gets from Kubernetes, if this process runs in one.
    pub fn in_cluster() -> Option<KubeSettings> {
        let host = std::env::var("KUBERNETES_SERVICE_HOST").ok()?;
        let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host
        };
        Some(KubeSettings::new(format!("https://{host}:{port}")))
    }

    /// `server` with the in-cluster token and CA paths and the default bounds.
    pub fn new(server: String) -> KubeSettings {
        let dir = PathBuf::from(SERVICE_ACCOUNT_DIR);
        KubeSettings {
            server,
            token_file: dir.join("token"),
            ca_file: Some(dir.join("ca.crt")),
            timeout: Duration::from_secs(5),
            attempts: 3,
        }
    }
}

/// Why a call failed. Never carries the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KubeError {
    #[error("the API server refused the agent's credentials or permissions (HTTP {0})")]
    Forbidden(u16),
    #[error("the API server answered HTTP {0}")]
    Status(u16),
    #[error("the API server is unreachable: {0}")]
    Unreachable(String),
    #[error("cannot read the service-account token: {0}")]
    Token(String),
}

impl KubeError {
    fn retried(&self) -> bool {
        match self {
            KubeError::Unreachable(_) => true,
            KubeError::Status(s) => *s == 429 || *s >= 500,
            KubeError::Forbidden(_) | KubeError::Token(_) => false,
        }
    }

    fn label(&self) -> &'static str {
        match self {
            KubeError::Forbidden(_) => "forbidden",
            KubeError::Status(404) => "not_found",
            KubeError::Status(409) => "conflict",
            KubeError::Status(s) if *s >= 500 => "server_error",
            KubeError::Status(_) => "client_error",
            KubeError::Unreachable(_) => "unreachable",
            KubeError::Token(_) => "no_token",
        }
    }
}

/// A client of one API server.
pub struct KubeClient {
    settings: KubeSettings,
    /// The server's base, checked once.
    base: String,
    https: Https,
    /// The token and when it was read.
    token: tokio::sync::Mutex<Option<(Instant, String)>>,
    /// Whether a refusal of our credentials was logged already.
    refusal_logged: AtomicBool,
    /// `pod_identity_kube_api_requests_total{result}`, when counted.
    calls: Option<prometheus::IntCounterVec>,
}

impl KubeClient {
    pub fn new(
        settings: KubeSettings,
        calls: Option<prometheus::IntCounterVec>,
    ) -> Result<KubeClient, String> {
        check_url(&settings.server).map_err(|e| format!("Kubernetes API server {e}"))?;
        let https = match &settings.ca_file {
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| {
                    format!("cannot read the API server's CA {}: {e}", path.display())
                })?;
                Https::new(Roots::Pem(&pem), MAX_BODY)?
            }
            None => Https::new(Roots::Native, MAX_BODY)?,
        };
        Ok(KubeClient {
            base: settings.server.trim_end_matches('/').to_owned(),
            settings,
            https,
            token: tokio::sync::Mutex::new(None),
            refusal_logged: AtomicBool::new(false),
            calls,
        })
    }

    /// The server this client talks to.
    pub fn server(&self) -> &str {
        &self.base
    }

    pub async fn get(&self, path: &str) -> Result<Bytes, KubeError> {
        self.send(Method::GET, path, None, Bytes::new()).await
    }

    /// A `PATCH` of `path` with a body of `content_type` (a JSON patch or a merge patch).
    pub async fn patch(
        &self,
        path: &str,
        content_type: &str,
        body: Bytes,
    ) -> Result<Bytes, KubeError> {
        self.send(Method::PATCH, path, Some(content_type), body)
            .await
    }

    /// A `POST` of a JSON object to the collection at `path`.
    pub async fn post(&self, path: &str, body: Bytes) -> Result<Bytes, KubeError> {
        self.send(Method::POST, path, Some("application/json"), body)
            .await
    }

    /// One call, retried as the module says; the body of a success.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: Bytes,
    ) -> Result<Bytes, KubeError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let result = self.attempt(&method, path, content_type, &body).await;
            if let Some(c) = &self.calls {
                let label = result.as_ref().map_or_else(KubeError::label, |_| "ok");
                c.with_label_values(&[label]).inc();
            }
            match result {
                Err(e) if e.retried() && attempt < self.settings.attempts.max(1) => {
                    let exp = BACKOFF_BASE.saturating_mul(1 << (attempt - 1).min(6));
                    tokio::time::sleep(exp.mul_f64(0.5 + fastrand::f64() * 0.5)).await;
                }
                Err(e @ KubeError::Forbidden(_)) => {
                    if !self.refusal_logged.swap(true, Ordering::Relaxed) {
                        tracing::warn!(server = %self.base, path, error = %e,
                            "the Kubernetes API server refuses the agent; check its service account and ClusterRole (logged once)");
                    }
                    return Err(e);
                }
                other => return other,
            }
        }
    }

    async fn attempt(
        &self,
        method: &Method,
        path: &str,
        content_type: Option<&str>,
        body: &Bytes,
    ) -> Result<Bytes, KubeError> {
        let token = self.token().await?;
        let mut req = Request::builder()
            .method(method.clone())
            .uri(format!("{}{path}", self.base))
            .header(hyper::header::ACCEPT, "application/json")
            .header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
        if let Some(ct) = content_type {
            req = req.header(hyper::header::CONTENT_TYPE, ct);
        }
        let req = req
            .body(Full::new(body.clone()))
            .map_err(|_| KubeError::Unreachable(format!("cannot build a request for {path}")))?;
        match self.https.send(req, self.settings.timeout).await {
            Ok(body) => Ok(body),
            Err(HttpsError::Status(s, _))
                if s == StatusCode::UNAUTHORIZED || s == StatusCode::FORBIDDEN =>
            {
                // A rotated token the server no longer accepts: read it again next time.
                *self.token.lock().await = None;
                Err(KubeError::Forbidden(s.as_u16()))
            }
            Err(HttpsError::Status(s, _)) => Err(KubeError::Status(s.as_u16())),
            Err(HttpsError::Unreachable(e) | HttpsError::Body(e)) => Err(KubeError::Unreachable(e)),
        }
    }

    async fn token(&self) -> Result<String, KubeError> {
        let mut held = self.token.lock().await;
        if let Some((at, token)) = held.as_ref() {
            if at.elapsed() < TOKEN_REREAD {
                return Ok(token.clone());
            }
        }
        let path = &self.settings.token_file;
        let token = tokio::fs::read_to_string(path)
            .await
            .map_err(|e| KubeError::Token(format!("{}: {e}", path.display())))?
            .trim()
            .to_owned();
        if token.is_empty() {
            return Err(KubeError::Token(format!("{} is empty", path.display())));
        }
        *held = Some((Instant::now(), token.clone()));
        Ok(token)
    }
}

/// A DNS subdomain as Kubernetes names objects (nodes, pods, events): at most 253 characters of
/// lowercase letters, digits, `-` and `.`, starting and ending with a letter or digit. Names
/// put in a request path are checked with this first.
pub fn is_dns_subdomain(s: &str) -> bool {
    let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 253
        && b.iter().all(|&c| alnum(c) || c == b'-' || c == b'.')
        && alnum(b[0])
        && alnum(b[b.len() - 1])
}

/// A qualified name as Kubernetes keys labels and taints: an optional DNS-subdomain prefix and
/// `/`, then at most 63 letters, digits, `-`, `_` and `.`, starting and ending with a letter or
/// digit.
pub fn is_qualified_name(s: &str) -> bool {
    let (prefix, name) = match s.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    let alnum = |c: u8| c.is_ascii_alphanumeric();
    let b = name.as_bytes();
    prefix.is_none_or(is_dns_subdomain)
        && !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|&c| alnum(c) || c == b'-' || c == b'_' || c == b'.')
        && alnum(b[0])
        && alnum(b[b.len() - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_as_kubernetes_checks_them() {
        for ok in ["ip-10-0-1-2.us-west-2.compute.internal", "node-a", "a"] {
            assert!(is_dns_subdomain(ok), "{ok}");
        }
        for bad in [
            "",
            "Node",
            "-a",
            "a-",
            "a/b",
            "a b",
            "../x",
            &"a".repeat(254),
        ] {
            assert!(!is_dns_subdomain(bad), "{bad}");
        }
        for ok in [
            taint::DEFAULT_KEY,
            "node.kubernetes.io/not-ready",
            "dedicated",
            "a_b.C",
        ] {
            assert!(is_qualified_name(ok), "{ok}");
        }
        for bad in [
            "",
            "/x",
            "x/",
            "Bad.Prefix/x",
            "a/b/c",
            "-x",
            &"x".repeat(64),
            "a b",
        ] {
            assert!(!is_qualified_name(bad), "{bad}");
        }
    }
}
