//! The token check: the token the SDK would send, read as the SDK reads it, and what the agent
//! would think of it before asking EKS Auth.
//!
//! Contract: the file (`AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE`) wins over the variable
//! (`AWS_CONTAINER_AUTHORIZATION_TOKEN`), as in SDKs; the token must have no trailing newline
//! (SDKs send the file as it is), parse as a JWT for [`AUDIENCE`], and be within its time (`nbf`
//! with a minute's leeway). The report names the token by its short hash, never its value.

use super::report::{human, or_unknown, Report};
use super::Env;
use crate::token::{Token, AUDIENCE};
use std::time::{SystemTime, UNIX_EPOCH};

const CHECK: &str = "token";

/// The token as the agent will be sent it, if it passes.
pub(super) fn check_token(env: &dyn Env, r: &mut Report) -> Option<String> {
    let (text, source) = read(env, r)?;
    let token = match Token::parse(text.as_bytes()) {
        Ok(t) => t,
        Err(e) => {
            r.fail(
                CHECK,
                format!("{source} is not a service-account token the agent accepts: {e}."),
            );
            return None;
        }
    };
    let s = token.subject();
    let who = format!(
        "namespace {}, service account {}{}",
        or_unknown(&s.namespace),
        or_unknown(&s.service_account),
        if s.pod.is_empty() {
            String::new()
        } else {
            format!(", pod {}", s.pod)
        }
    );
    let audiences = token.audiences();
    if !audiences.iter().any(|a| a == AUDIENCE) {
        r.fail(CHECK, format!("{source} ({who}) is for the audience {audiences:?}, not {AUDIENCE}: \
            {}", if audiences.iter().any(|a| a == "sts.amazonaws.com") {
                "that is an IRSA token (AWS_WEB_IDENTITY_TOKEN_FILE's); Pod Identity uses the eks-pod-identity-token volume."
            } else {
                "mount the eks-pod-identity-token projected volume (audience pods.eks.amazonaws.com)."
            }));
        return None;
    }
    let now_s = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let exp = token.claims().exp;
    if exp <= now_s {
        r.fail(CHECK, format!("{source} ({who}) expired {} ago: the kubelet renews projected tokens well before they expire, \
            so this file is a copy or the kubelet cannot reach the API server.", human(now_s - exp)));
        return None;
    }
    if let Some(nbf) = token.claims().nbf.filter(|&n| n > now_s + 60) {
        r.fail(CHECK, format!("{source} ({who}) is not valid for another {}: this machine's clock or the issuer's is wrong.",
            human(nbf - now_s)));
        return None;
    }
    r.ok(
        CHECK,
        format!(
            "{source}: {who}; expires in {}; token {}",
            human(exp - now_s),
            token.hash()
        ),
    );
    Some(text)
}

/// The token's text and where it came from, as an SDK would read it.
fn read(env: &dyn Env, r: &mut Report) -> Option<(String, String)> {
    let (raw, source) = match env.var("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE") {
        Some(path) => match std::fs::read(&path) {
            Ok(bytes) => (bytes, path),
            Err(e) => {
                let why = match e.kind() {
                    std::io::ErrorKind::NotFound => "it does not exist: the projected token volume (eks-pod-identity-token) is not mounted in this container",
                    std::io::ErrorKind::PermissionDenied => "permission denied: the container's user cannot read the projected token (set the pod's fsGroup, or runAsUser to the file's owner)",
                    _ => "it cannot be read",
                };
                r.fail(
                    CHECK,
                    format!("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE={path}: {why} ({e})."),
                );
                return None;
            }
        },
        None => match env.var("AWS_CONTAINER_AUTHORIZATION_TOKEN") {
            Some(t) => (t.into_bytes(), "AWS_CONTAINER_AUTHORIZATION_TOKEN".into()),
            None => {
                r.fail(CHECK, "neither AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE nor AWS_CONTAINER_AUTHORIZATION_TOKEN is set: \
                    the agent needs the pod's service-account token; EKS sets the file with the URI.");
                return None;
            }
        },
    };
    if raw.ends_with(b"\n") || raw.ends_with(b"\r") {
        r.fail(CHECK, format!("{source} ends with a newline: SDKs send the file as it is, and a newline in the Authorization header \
            is refused. The kubelet never writes one; whoever wrote this file did."));
        return None;
    }
    let Ok(text) = String::from_utf8(raw) else {
        r.fail(CHECK, format!("{source} is not text: it is not a JWT."));
        return None;
    };
    Some((text, source))
}
