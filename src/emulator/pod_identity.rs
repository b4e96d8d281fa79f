//! EKS Auth's `AssumeRoleForPodIdentity` as the emulator answers it (see the module contract of
//! [`emulator`](super)): the SigV4 header's form, the token, the association, the credentials.

use super::issuer::{self, Rejection};
use super::minting::{self, Context, Minting};
use super::sigv4::Authorization;
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
    let auth = Authorization::parse(auth).map_err(|e| denied(&e.to_string()))?;
    if auth.service != "eks-auth" {
        return Err(denied("the credential scope's service is not eks-auth"));
    }
    if !auth.signed_headers.iter().any(|h| h == "host") {
        return Err(denied("SignedHeaders must include host"));
    }
    if !req.headers().contains_key("x-amz-date") {
        return Err(denied("no x-amz-date"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIG: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn signed(auth: Option<&str>, date: bool) -> Request<()> {
        let mut req = Request::builder()
            .method("POST")
            .uri("/clusters/c/assume-role-for-pod-identity");
        if let Some(auth) = auth {
            req = req.header("authorization", auth);
        }
        if date {
            req = req.header("x-amz-date", "20261201T000000Z");
        }
        req.body(()).expect("request")
    }

    /// The emulator's EKS Auth reads the header with the one SigV4 parser, then asks for
    /// eks-auth's scope, a signed host and a date; anything else is EKS Auth's AccessDenied.
    #[test]
    fn only_a_request_signed_for_eks_auth_is_taken() {
        let good = format!(
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20261201/us-west-2/eks-auth/aws4_request, \
             SignedHeaders=content-type;host;x-amz-date, Signature={SIG}"
        );
        assert!(check_sigv4(&signed(Some(&good), true)).is_ok());
        let bad = [
            (None, true, "no Authorization header"),
            (
                Some(good.replace("/eks-auth/", "/sts/")),
                true,
                "service is not eks-auth",
            ),
            (Some(good.replace("host;", "")), true, "must include host"),
            (Some(good.replace(SIG, "abc")), true, "64 hex digits"),
            (
                Some(good.replace("AWS4-HMAC-SHA256", "AWS4-ECDSA")),
                true,
                "unknown algorithm",
            ),
            (Some(good.clone()), false, "no x-amz-date"),
        ];
        for (auth, date, why) in bad {
            let (code, message) = check_sigv4(&signed(auth.as_deref(), date)).expect_err("refused");
            assert_eq!(code, "AccessDeniedException");
            assert!(message.contains(why), "{why}: {message}");
        }
    }
}
