//! The environment checks: where the SDK will ask (`AWS_CONTAINER_CREDENTIALS_FULL_URI`) and
//! what an SDK would use before container credentials.
//!
//! Contract: [`check_uri`] accepts only what SDKs accept over plain HTTP (loopback,
//! `169.254.170.23`, `fd00:ec2::23`, ECS's `169.254.170.2`) and returns where to ask;
//! [`check_shadowing`] warns, never fails: a shadowing source is a choice, not a fault.

use super::report::Report;
use super::Env;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The agent's address and path, from `AWS_CONTAINER_CREDENTIALS_FULL_URI`.
pub(super) struct Target {
    pub(super) host: String,
    pub(super) port: u16,
    pub(super) path_and_query: String,
}

pub(super) fn check_uri(env: &dyn Env, r: &mut Report) -> Option<Target> {
    const CHECK: &str = "environment";
    let Some(uri) = env.var("AWS_CONTAINER_CREDENTIALS_FULL_URI") else {
        if let Some(rel) = env.var("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI") {
            r.fail(CHECK, format!("AWS_CONTAINER_CREDENTIALS_FULL_URI is not set, but AWS_CONTAINER_CREDENTIALS_RELATIVE_URI={rel} is: \
                that is ECS's task-role endpoint, not Pod Identity."));
            return None;
        }
        r.fail(CHECK, "AWS_CONTAINER_CREDENTIALS_FULL_URI is not set. EKS sets it (with the token file) in pods whose service account \
            has a Pod Identity association when the pod is created: check the association (aws eks list-pod-identity-associations), \
            then recreate the pod; the eks-pod-identity-webhook must be running.");
        return None;
    };
    let parsed = match uri.parse::<hyper::Uri>() {
        Ok(u) => u,
        Err(e) => {
            r.fail(
                CHECK,
                format!("AWS_CONTAINER_CREDENTIALS_FULL_URI={uri} is not a URI: {e}"),
            );
            return None;
        }
    };
    if parsed.scheme_str() != Some("http") {
        r.fail(CHECK, format!("AWS_CONTAINER_CREDENTIALS_FULL_URI={uri}: the agent speaks plain http (it is a link-local address on the node)."));
        return None;
    }
    let host = parsed
        .host()
        .unwrap_or_default()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    if !plain_http_allowed(&host) {
        r.fail(CHECK, format!("AWS_CONTAINER_CREDENTIALS_FULL_URI={uri}: SDKs refuse plain http to {host}; only loopback, \
            169.254.170.23, fd00:ec2::23 and 169.254.170.2 are accepted."));
        return None;
    }
    r.ok(CHECK, format!("AWS_CONTAINER_CREDENTIALS_FULL_URI={uri}"));
    Some(Target {
        host,
        port: parsed.port_u16().unwrap_or(80),
        path_and_query: parsed
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_else(|| "/".into()),
    })
}

/// Whether SDKs' container providers will send a token over plain http to `host`.
fn plain_http_allowed(host: &str) -> bool {
    match host.parse::<IpAddr>() {
        Ok(ip) => {
            ip.is_loopback()
                || ip == IpAddr::V4(Ipv4Addr::new(169, 254, 170, 23))
                || ip == IpAddr::V4(Ipv4Addr::new(169, 254, 170, 2))
                || ip == IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x23))
        }
        Err(_) => host == "localhost",
    }
}

pub(super) fn check_shadowing(env: &dyn Env, r: &mut Report) {
    const CHECK: &str = "precedence";
    let mut shadowed = false;
    if env.var("AWS_ACCESS_KEY_ID").is_some() {
        shadowed = true;
        r.warn(CHECK, "AWS_ACCESS_KEY_ID is set: every SDK uses environment keys before container credentials, so Pod Identity is not used.");
    }
    if let Some(profile) = env.var("AWS_PROFILE") {
        shadowed = true;
        r.warn(CHECK, format!("AWS_PROFILE={profile} is set: SDKs use that profile from the shared config and credentials files \
            instead of container credentials (and fail if it does not exist)."));
    }
    if env.var("AWS_ROLE_ARN").is_some() && env.var("AWS_WEB_IDENTITY_TOKEN_FILE").is_some() {
        shadowed = true;
        r.warn(CHECK, "AWS_ROLE_ARN and AWS_WEB_IDENTITY_TOKEN_FILE are set: that is IRSA, which SDKs try before container credentials; \
            remove the eks.amazonaws.com/role-arn annotation from the service account to use Pod Identity.");
    }
    let shared = env
        .var("AWS_SHARED_CREDENTIALS_FILE")
        .or_else(|| env.var("HOME").map(|h| format!("{h}/.aws/credentials")));
    if let Some(path) = shared.filter(|p| {
        std::fs::read_to_string(p)
            .map(|t| t.contains("[default]"))
            .unwrap_or(false)
    }) {
        shadowed = true;
        r.warn(
            CHECK,
            format!("{path} has a [default] profile: SDKs use it before container credentials."),
        );
    }
    if !shadowed {
        r.ok(
            CHECK,
            "nothing in the environment comes before container credentials",
        );
    }
}
