//! The role check: which role the agent's credentials belong to, from STS `GetCallerIdentity`.
//!
//! Contract: asked in `AWS_REGION` (or `AWS_DEFAULT_REGION`, else `us-east-1`), at
//! `AWS_ENDPOINT_URL_STS` if set and only if it is https or loopback (the signed request is a
//! bearer proof of the role); any failure is a warning, since the credentials may still work for
//! the services the pod reaches.

use super::agent::Returned;
use super::report::{clip, Report};
use super::Env;
use std::time::Duration;

pub(super) async fn check_role(env: &dyn Env, creds: &Returned, timeout: Duration, r: &mut Report) {
    const CHECK: &str = "role";
    let region = env
        .var("AWS_REGION")
        .or_else(|| env.var("AWS_DEFAULT_REGION"))
        .unwrap_or_else(|| "us-east-1".into());
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new(region))
        .credentials_provider(aws_credential_types::Credentials::new(
            creds.access_key_id.clone(),
            creds.secret_access_key.clone(),
            Some(creds.session_token.clone()),
            None,
            "pod-identity-agent-diagnose",
        ));
    if let Some(endpoint) = env.var("AWS_ENDPOINT_URL_STS") {
        // The signed GetCallerIdentity is a bearer proof of the role (Vault-style IAM auth
        // accepts it): over plain http anyone on the path could replay it.
        if crate::https::check_url(&endpoint).is_err() {
            r.warn(CHECK, format!("AWS_ENDPOINT_URL_STS is {}: not https (nor a loopback address), so the signed request, a proof of the role, would travel in the clear; not asked (--no-sts skips this check).", clip(&endpoint, 120)));
            return;
        }
        loader = loader.endpoint_url(endpoint);
    }
    let client = aws_sdk_sts::Client::new(&loader.load().await);
    match tokio::time::timeout(timeout, client.get_caller_identity().send()).await {
        Ok(Ok(out)) => {
            let arn = out.arn().unwrap_or_default();
            let role = arn
                .split_once(":assumed-role/")
                .and_then(|(_, rest)| rest.split('/').next())
                .unwrap_or(arn);
            r.ok(CHECK, format!("{role} ({arn})"));
        }
        Ok(Err(e)) => {
            use aws_sdk_sts::error::ProvideErrorMetadata;
            let detail = e
                .code()
                .map(|c| format!("{c}: {}", e.message().unwrap_or_default()))
                .unwrap_or_else(|| "no answer".into());
            r.warn(CHECK, format!("STS GetCallerIdentity failed ({}); the credentials may still work for the services \
                the pod reaches (--no-sts skips this check).", clip(&detail, 300)));
        }
        Err(_) => r.warn(
            CHECK,
            "STS did not answer in time; the pod may have no route to STS (--no-sts skips this check).",
        ),
    }
}
