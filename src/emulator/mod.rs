//! A local EKS Auth: `AssumeRoleForPodIdentity` on loopback, with real token verification.
//!
//! Contract: `POST /clusters/{cluster}/assume-role-for-pod-identity` with a SigV4-signed request
//! (service `eks-auth`; the header's form is checked, not the secret) and body `{"token": …}`
//! answers exactly as EKS Auth does (status, `x-amzn-errortype`, `x-amzn-requestid`, JSON body),
//! rendered from the recorded exchanges ([`wire`]):
//! - unsigned or not signed for `eks-auth` → `AccessDeniedException`;
//! - a body that is not JSON → `InvalidRequestException`; no token → `InvalidParameterException`;
//! - a token not signed by this emulator's issuer, or with a wrong audience or issuer →
//!   `InvalidTokenException`; an expired one → `ExpiredTokenException`;
//! - a service account with no association → `ResourceNotFoundException`;
//! - otherwise credentials from [`minting`].
//!
//! `GET /.well-known/openid-configuration` and `GET /openid/v1/jwks` make it an OIDC issuer: the
//! discovery document names the issuer (`iss` of the tokens it mints) and the JWKS at this
//! emulator's own address, as a cluster's issuer does, so `--token-issuer` can verify locally.
//! The agent reaches the emulator only over HTTP, exactly as it reaches EKS Auth.
//! [`Emulator::build`] makes one from its [`EmulatorConfig`] (state directory, association
//! table, credential source); [`Emulator::serve`] runs it on a listener.

pub mod access;
pub mod associations;
pub(crate) mod authenticator;
pub(crate) mod aws_auth;
pub mod cluster;
mod config;
pub(crate) mod discovery;
pub(crate) mod eks_api;
pub mod entries;
pub(crate) mod explain;
pub(crate) mod identity;
pub(crate) mod import;
pub mod issuer;
pub(crate) mod kube;
pub(crate) mod kube_proto;
pub(crate) mod kube_tls;
pub mod minting;
pub(crate) mod pod_associations;
mod pod_identity;
pub(crate) mod presigned;
pub(crate) mod recorded;
pub(crate) mod sessions;
pub(crate) mod sigv4;
pub(crate) mod state;
pub(crate) mod sts;
mod sts_wire;
pub(crate) mod wire;

use crate::server::limits::{ConnectionLimiter, ConnectionLimits};
use crate::server::listener::{self, Connections};
use crate::server::response::json_response;
use associations::{Associations, Trust};
use bytes::Bytes;
pub use config::{
    AssociationsFrom, ClusterConfig, CredentialsFrom, EmulatorConfig, DEFAULT_CLUSTER,
    DEFAULT_CREATOR, DEFAULT_MODE,
};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use issuer::Issuer;
use minting::Minting;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use tokio_util::sync::CancellationToken;

const MAX_BODY: usize = 64 * 1024;

pub struct Emulator {
    pub issuer: Arc<Issuer>,
    pub associations: Associations,
    /// Who STS lets assume which role (IRSA grants, role trust).
    pub trust: Trust,
    /// Seals the credentials this emulator issues, so they can sign STS requests.
    pub sessions: sessions::Sessions,
    pub minting: Minting,
    /// Region and account used in the cluster ARN of session tags and association ARNs.
    pub region: String,
    pub account: String,
    /// Exchanges answered, successful or not (tests and logs).
    pub calls: AtomicU64,
    /// Discovery documents and key sets served (tests of how often verifiers fetch them).
    pub key_fetches: AtomicU64,
    /// The emulated cluster's identity state (access entries, mode, associations made through
    /// the EKS API).
    pub cluster: cluster::Store,
    pub aws_auth: Option<PathBuf>,
    /// `host:port`s this emulator serves on: the only STS hosts tokens may name.
    pub addresses: RwLock<Vec<String>>,
}

impl Emulator {
    pub fn new(issuer: Arc<Issuer>, associations: Associations, minting: Minting) -> Emulator {
        let sessions = sessions::Sessions::new(&issuer.derive_key("sts-sessions"));
        Emulator {
            issuer,
            associations,
            trust: Trust::default(),
            sessions,
            minting,
            region: "us-east-1".into(),
            account: "000000000000".into(),
            calls: AtomicU64::new(0),
            key_fetches: AtomicU64::new(0),
            cluster: cluster::Store::in_memory(
                cluster::Cluster::new(&config::seed(
                    &ClusterConfig::default(),
                    "us-east-1",
                    "000000000000",
                ))
                .unwrap_or_else(|e| unreachable!("the default cluster is valid: {e}")),
            ),
            aws_auth: None,
            addresses: RwLock::new(Vec::new()),
        }
    }

    /// Load or create the issuer key, read the association table, set up the credential source.
    pub async fn build(config: &EmulatorConfig) -> Result<Emulator, String> {
        let issuer =
            Arc::new(Issuer::load_or_create(&config.state_dir).map_err(|e| e.to_string())?);
        let (associations, trust) = match &config.associations {
            AssociationsFrom::File(path) => Associations::load(path)?,
            AssociationsFrom::Cluster(cluster) => {
                (import::from_cluster(cluster).await?, Trust::default())
            }
            AssociationsFrom::Default => (Associations::Default, Trust::default()),
        };
        let minting = match config.credentials {
            CredentialsFrom::Fake => Minting::Fake,
            CredentialsFrom::Sts => {
                let mut sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
                    .load()
                    .await;
                if sdk.region().is_none() {
                    sdk = sdk
                        .into_builder()
                        .region(aws_config::Region::new("us-east-1"))
                        .build();
                }
                Minting::Sts(Box::new(sdk))
            }
        };
        let mut emulator = Emulator::new(issuer, associations, minting);
        emulator.trust = trust;
        let c = &config.cluster;
        let store = cluster::Store::open(
            &config.state_dir,
            &config::seed(c, &emulator.region, &emulator.account),
        )?;
        if let Some(mode) = &c.authentication_mode {
            if store.snapshot().authentication_mode != *mode {
                store.change(|cl| cl.update_mode(mode)).map_err(|e| {
                    format!("--authentication-mode {mode}: {} ({})", e.message, e.code)
                })?;
            }
        }
        emulator.cluster = store;
        if let Some(path) = &config.aws_auth {
            aws_auth::AwsAuth::load(path)?;
        }
        emulator.aws_auth = config.aws_auth.clone();
        Ok(emulator)
    }

    /// STS as this emulator answers it.
    pub fn sts(&self) -> sts::Sts<'_> {
        sts::Sts {
            issuer: &self.issuer,
            trust: &self.trust,
            sessions: &self.sessions,
        }
    }

    /// Serve on `bound` until `stop`; the returned task ends once its connections have (or
    /// `connections` were closed).
    pub fn serve(
        self: Arc<Self>,
        bound: crate::server::bind::Bound,
        stop: CancellationToken,
        connections: Connections,
    ) -> tokio::task::JoinHandle<()> {
        if let Ok(mut a) = self.addresses.write() {
            let port = bound.addr.port();
            a.extend([bound.addr.to_string(), format!("localhost:{port}")]);
            if bound.addr.ip().is_unspecified() {
                a.extend([format!("127.0.0.1:{port}"), format!("[::1]:{port}")]);
            }
        }
        tokio::spawn(listener::serve(
            bound,
            move |req, _peer| {
                let e = self.clone();
                async move { e.handle(req).await }
            },
            stop,
            connections,
            ConnectionLimiter::new(ConnectionLimits::default(), None),
        ))
    }

    pub async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path().to_owned();
        if req.method() == Method::GET && path == "/openid/v1/jwks" {
            self.key_fetches.fetch_add(1, Ordering::Relaxed);
            return json_response(StatusCode::OK, Bytes::from(self.issuer.jwks().to_string()));
        }
        if req.method() == Method::GET && path == "/.well-known/openid-configuration" {
            self.key_fetches.fetch_add(1, Ordering::Relaxed);
            let host = req
                .headers()
                .get(hyper::header::HOST)
                .and_then(|h| h.to_str().ok())
                .unwrap_or("127.0.0.1");
            return json_response(
                StatusCode::OK,
                Bytes::from(self.issuer.discovery(&format!("http://{host}")).to_string()),
            );
        }
        if path == "/" {
            return self.handle_sts(req).await;
        }
        if !path.ends_with("/assume-role-for-pod-identity")
            && (eks_api::serves(&path) || kube::serves(&path))
        {
            return self.handle_identity(req).await;
        }
        let cluster = path
            .strip_prefix("/clusters/")
            .and_then(|rest| rest.strip_suffix("/assume-role-for-pod-identity"))
            .filter(|c| !c.is_empty() && !c.contains('/'))
            .map(str::to_owned);
        let (Some(cluster), &Method::POST) = (cluster, req.method()) else {
            let mut res = json_response(
                StatusCode::NOT_FOUND,
                Bytes::from(serde_json::json!({"message": format!("no operation at {} {path}", req.method())}).to_string()),
            );
            res.headers_mut().insert(
                "x-amzn-errortype",
                hyper::header::HeaderValue::from_static("UnknownOperationException"),
            );
            return res;
        };
        self.calls.fetch_add(1, Ordering::Relaxed);
        let request_id = issuer::uuid_like();
        let wire = match self.exchange(&cluster, req).await {
            Ok(w) => w,
            Err((code, message)) => {
                tracing::info!(%cluster, code, %message, request_id, "emulated EKS Auth refused an exchange");
                wire::error(code, &message, &request_id)
            }
        };
        to_response(wire)
    }

    /// The EKS API for identity and the Kubernetes API.
    async fn handle_identity(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let (parts, body) = req.into_parts();
        let body = match Limited::new(body, MAX_BODY).collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => Bytes::new(),
        };
        let path = parts.uri.path();
        if kube::serves(path) {
            let kreq = kube::KubeRequest {
                method: parts.method.as_str(),
                path,
                headers: &parts.headers,
                body: &body,
            };
            return to_response(kube::handle(&kreq, &|token| self.authenticate(token)));
        }
        let incoming = sigv4::Request {
            method: parts.method.as_str(),
            path,
            query: parts.uri.query().unwrap_or(""),
            headers: &parts.headers,
            body: &body,
        };
        let api = eks_api::EksApi {
            sessions: &self.sessions,
            store: &self.cluster,
            file: &self.associations,
        };
        to_response(api.handle(&incoming, &issuer::uuid_like()))
    }

    /// Who a `k8s-aws-v1.` token's bearer is in the cluster, or why no one.
    pub fn authenticate(&self, token: &str) -> Result<identity::Identity, String> {
        let c = self.cluster.snapshot();
        let hosts = self.addresses.read().map(|a| a.clone()).unwrap_or_default();
        let caller = authenticator::verify(
            token,
            &c.name,
            &hosts,
            &self.sessions,
            std::time::SystemTime::now(),
        )
        .map_err(|e| e.to_string())?;
        identity::resolve(&c, &self.read_aws_auth(), &caller)
    }

    /// The `aws-auth` ConfigMap as it is now (none: an empty one).
    pub fn read_aws_auth(&self) -> Result<aws_auth::AwsAuth, String> {
        match &self.aws_auth {
            Some(path) => aws_auth::AwsAuth::load(path),
            None => Ok(aws_auth::AwsAuth::default()),
        }
    }

    /// The association EKS Auth uses: one made through the EKS API, else the table's.
    pub fn association(
        &self,
        namespace: &str,
        service_account: &str,
    ) -> Option<associations::Association> {
        pod_associations::lookup(
            &self.cluster.snapshot(),
            &self.associations,
            namespace,
            service_account,
        )
    }

    /// STS's query API on `/`.
    async fn handle_sts(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let (parts, body) = req.into_parts();
        let body = match Limited::new(body, MAX_BODY).collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => Bytes::new(),
        };
        let incoming = sts::Incoming {
            method: parts.method.as_str(),
            path: parts.uri.path(),
            query: parts.uri.query().unwrap_or(""),
            headers: &parts.headers,
            body: &body,
        };
        let (result, request_id) = self.sts().handle(&incoming);
        let wire = result.unwrap_or_else(|e| {
            tracing::info!(code = e.code, message = %e.message, request_id, "emulated STS refused a request");
            sts::error(&e, &request_id)
        });
        to_response(wire)
    }
}

fn to_response(wire: wire::WireResponse) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(Bytes::from(wire.body)));
    *res.status_mut() =
        StatusCode::from_u16(wire.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    for (k, v) in wire.headers {
        if let (Ok(k), Ok(v)) = (
            hyper::header::HeaderName::from_bytes(k.as_bytes()),
            v.parse(),
        ) {
            res.headers_mut().insert(k, v);
        }
    }
    res
}
