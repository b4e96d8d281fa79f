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

pub mod associations;
pub mod import;
pub mod issuer;
pub mod minting;
pub mod sessions;
pub mod sigv4;
pub mod state;
pub mod sts;
pub mod wire;

use crate::server::limits::{ConnectionLimiter, ConnectionLimits};
use crate::server::listener::{self, Connections};
use crate::server::response::json_response;
use associations::{Associations, Trust};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use issuer::{Issuer, Rejection};
use minting::{Context, Minting};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

const MAX_BODY: usize = 64 * 1024;

/// Where the association table comes from.
#[derive(Debug, Clone)]
pub enum AssociationsFrom {
    /// Every service account maps to a role named after it.
    Default,
    File(PathBuf),
    /// A real cluster's table, read with the caller's AWS credentials.
    Cluster(String),
}

/// Where emulated credentials come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialsFrom {
    Fake,
    Sts,
}

/// Everything an emulator is built from.
#[derive(Debug, Clone)]
pub struct EmulatorConfig {
    pub state_dir: PathBuf,
    pub associations: AssociationsFrom,
    pub credentials: CredentialsFrom,
}

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
        bound: listener::Bound,
        stop: CancellationToken,
        connections: Connections,
    ) -> tokio::task::JoinHandle<()> {
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

    async fn exchange(
        &self,
        cluster: &str,
        req: Request<Incoming>,
    ) -> Result<wire::WireResponse, minting::Refusal> {
        check_sigv4(&req)?;
        let body = Limited::new(req.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|_| {
                (
                    "InvalidRequestException",
                    "the request body could not be read".to_owned(),
                )
            })?
            .to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).map_err(|_| {
            (
                "InvalidRequestException",
                "the request body is not JSON".to_owned(),
            )
        })?;
        let token = json["token"]
            .as_str()
            .filter(|t| !t.is_empty())
            .ok_or(("InvalidParameterException", "token is required".to_owned()))?;
        let subject = self.issuer.verify(token).map_err(|r| match r {
            Rejection::Expired => ("ExpiredTokenException", r.to_string()),
            Rejection::Invalid(m) => ("InvalidTokenException", m),
        })?;
        let association = self.associations.lookup(&subject.namespace, &subject.service_account).ok_or_else(|| {
            (
                "ResourceNotFoundException",
                format!(
                    "No Pod Identity Association found for service account {}/{} in cluster {cluster}",
                    subject.namespace, subject.service_account
                ),
            )
        })?;
        let cluster_arn = format!(
            "arn:aws:eks:{}:{}:cluster/{cluster}",
            self.region, self.account
        );
        let ctx = Context {
            cluster,
            cluster_arn: &cluster_arn,
            subject: &subject,
            association: &association,
        };
        let mut issued = self.minting.issue(&ctx).await?;
        if matches!(self.minting, Minting::Fake) {
            // So the pod's credentials can sign STS requests here: GetCallerIdentity, chaining.
            self.sessions.seal(&mut issued);
        }
        let association_id = association.id();
        let association_arn = format!(
            "arn:aws:eks:{}:{}:podidentityassociation/{cluster}/{association_id}",
            self.region, self.account
        );
        tracing::info!(%cluster, namespace = %subject.namespace, service_account = %subject.service_account,
            role = %association.role_arn, access_key_id = %issued.access_key_id, "emulated EKS Auth issued credentials");
        Ok(wire::success(
            &wire::Success {
                namespace: &subject.namespace,
                service_account: &subject.service_account,
                association_arn: &association_arn,
                association_id: &association_id,
                assumed_role_arn: &issued.assumed_role_arn,
                assume_role_id: &issued.assume_role_id,
                access_key_id: &issued.access_key_id,
                secret_access_key: &issued.secret_access_key,
                session_token: &issued.session_token,
                expiration: issued.expiration,
            },
            &issuer::uuid_like(),
        ))
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

/// The form of a SigV4 `Authorization` header for `eks-auth`, and an `x-amz-date`. The
/// signature itself is not checked: the emulator has no secret to check it against.
fn check_sigv4<B>(req: &Request<B>) -> Result<(), minting::Refusal> {
    let denied = |why: &str| {
        (
            "AccessDeniedException",
            format!("the request is not signed for eks-auth: {why}"),
        )
    };
    let auth = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| denied("no Authorization header"))?;
    let rest = auth
        .strip_prefix("AWS4-HMAC-SHA256 ")
        .ok_or_else(|| denied("not AWS4-HMAC-SHA256"))?;
    let field = |name: &str| {
        rest.split(',')
            .map(str::trim)
            .find_map(|p| p.strip_prefix(name))
    };
    let scope: Vec<&str> = field("Credential=")
        .ok_or_else(|| denied("no Credential"))?
        .split('/')
        .collect();
    if scope.len() != 5
        || scope[0].is_empty()
        || scope[3] != "eks-auth"
        || scope[4] != "aws4_request"
    {
        return Err(denied(
            "credential scope is not <key>/<date>/<region>/eks-auth/aws4_request",
        ));
    }
    field("SignedHeaders=")
        .filter(|h| h.contains("host"))
        .ok_or_else(|| denied("SignedHeaders must include host"))?;
    let sig = field("Signature=").ok_or_else(|| denied("no Signature"))?;
    if sig.len() != 64 || !sig.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(denied("Signature is not 64 hex digits"));
    }
    if !req.headers().contains_key("x-amz-date") {
        return Err(denied("no x-amz-date"));
    }
    Ok(())
}
