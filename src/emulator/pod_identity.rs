//! EKS Auth's `AssumeRoleForPodIdentity` as the emulator answers it (see the module contract of
//! [`emulator`](super)): the SigV4 header's form, the token, the association, the credentials.

use super::issuer::{self, Rejection};
use super::minting::{self, Context, Minting};
use super::{wire, Emulator, MAX_BODY};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::Request;

impl Emulator {
    pub(super) async fn exchange(
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
        let association = self.association(&subject.namespace, &subject.service_account).ok_or_else(|| {
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
