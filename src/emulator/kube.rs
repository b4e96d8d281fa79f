//! Enough of a Kubernetes API server for real clients to ask who they are and what they may do:
//! discovery, `SelfSubjectReview` (`kubectl auth whoami`), `SelfSubjectAccessReview` (`kubectl
//! auth can-i`), and the TokenReview webhook the control plane calls.
//!
//! Contract: every request but the webhook carries `Authorization: Bearer k8s-aws-v1.…`, which
//! must authenticate ([`authenticator`](super::authenticator), then
//! [`identity::resolve`](super::identity::resolve)); otherwise 401 with the recorded `Status`
//! (and the reason in the emulator's log). `GET /api`, `/apis` answer the recorded aggregated
//! discovery (what kubectl 1.32 asks for; clients that do not accept it get the legacy lists
//! derived from it, and `GET /api/v1`, `/apis/<group>/<version>` the resource lists), `GET
//! /version` the recorded version. `POST /apis/authentication.k8s.io/v1/selfsubjectreviews`
//! returns the user (the API server adds `system:authenticated` to the groups);
//! `POST /apis/authorization.k8s.io/v1/selfsubjectaccessreviews` echoes the spec with
//! [`identity::authorize`](super::identity::authorize)'s decision. `POST /authenticate` (and
//! `/apis/authentication.k8s.io/v1/tokenreviews`) take a TokenReview and answer as
//! aws-iam-authenticator does: 200 with the user, or 403 with `authenticated: false` and the
//! reason in `status.error`. Other paths: 404 `Status`. Bodies are shaped by the recordings in
//! `proto-fixtures/kube/` ([`recorded`](super::recorded)).

use super::access::Attributes;
use super::identity::{authorize, Identity};
use super::recorded::{recording, render};
use super::wire::WireResponse;
use hyper::HeaderMap;
use serde_json::{json, Value};

pub const SELF_SUBJECT_REVIEWS: &str = "/apis/authentication.k8s.io/v1/selfsubjectreviews";
pub const SELF_SUBJECT_ACCESS_REVIEWS: &str =
    "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews";
pub const TOKEN_REVIEWS: &str = "/apis/authentication.k8s.io/v1/tokenreviews";
pub const WEBHOOK: &str = "/authenticate";
const AGGREGATED: &str = "as=APIGroupDiscoveryList";

/// Whether `path` is the Kubernetes API's.
pub fn serves(path: &str) -> bool {
    path == "/api"
        || path == "/apis"
        || path == "/version"
        || path == WEBHOOK
        || path.starts_with("/api/")
        || path.starts_with("/apis/")
        || path.starts_with("/openapi")
}

/// A request to the Kubernetes API.
pub struct KubeRequest<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub headers: &'a HeaderMap,
    pub body: &'a [u8],
}

fn now_rfc3339() -> String {
    let secs = super::cluster::now_secs() as i64;
    aws_smithy_types::DateTime::from_secs(secs)
        .fmt(aws_smithy_types::date_time::Format::DateTime)
        .unwrap_or_default()
}

fn status(name: &str) -> WireResponse {
    let body = recording(&format!("kube/reviews/{name}"))
        .map(|r| r["response"]["body"].clone())
        .unwrap_or_default();
    render(&format!("kube/reviews/{name}"), &body, "")
}

fn user_info(id: &Identity, authenticated_group: bool) -> Value {
    let mut groups = id.groups.clone();
    if authenticated_group {
        groups.push("system:authenticated".into());
    }
    json!({"username": id.username, "uid": id.uid, "groups": groups, "extra": id.extra})
}

/// Answer `req`; `authenticate` maps a bearer token to an identity or says why not.
pub fn handle(
    req: &KubeRequest<'_>,
    authenticate: &dyn Fn(&str) -> Result<Identity, String>,
) -> WireResponse {
    if req.path == WEBHOOK {
        return token_review(req, authenticate);
    }
    let token = req
        .headers
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    let id = match authenticate(token) {
        Ok(id) => id,
        Err(why) => {
            tracing::info!(reason = %why, path = req.path, "emulated API server: unauthenticated");
            return status("status-unauthorized");
        }
    };
    match (req.method, req.path) {
        ("POST", SELF_SUBJECT_REVIEWS) => render(
            "kube/reviews/self-subject-review",
            &json!({"kind": "SelfSubjectReview", "apiVersion": "authentication.k8s.io/v1",
                "metadata": {"creationTimestamp": now_rfc3339()}, "status": {"userInfo": user_info(&id, true)}}),
            "",
        ),
        ("POST", SELF_SUBJECT_ACCESS_REVIEWS) => access_review(req, &id),
        ("POST", TOKEN_REVIEWS) => token_review(req, authenticate),
        ("GET", _) => super::discovery::answer(req.path, accepts_aggregated(req.headers))
            .unwrap_or_else(|| status("status-not-found")),
        _ => status("status-not-found"),
    }
}

fn accepts_aggregated(headers: &HeaderMap) -> bool {
    headers
        .get(hyper::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains(AGGREGATED))
}

fn attributes(spec: &Value) -> Attributes {
    let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    if let Some(r) = spec.get("resourceAttributes").filter(|r| r.is_object()) {
        return Attributes {
            namespace: Some(text(&r["namespace"])).filter(|n| !n.is_empty()),
            verb: text(&r["verb"]),
            group: text(&r["group"]),
            resource: text(&r["resource"]),
            subresource: text(&r["subresource"]),
            path: None,
        };
    }
    let n = &spec["nonResourceAttributes"];
    Attributes {
        verb: text(&n["verb"]),
        path: Some(text(&n["path"])),
        ..Attributes::default()
    }
}

fn access_review(req: &KubeRequest<'_>, id: &Identity) -> WireResponse {
    let spec = match serde_json::from_slice::<Value>(req.body) {
        Ok(review) => review["spec"].clone(),
        Err(_) => match super::kube_proto::access_review_spec(req.body) {
            Some(spec) => spec,
            None => return status("status-bad-request"),
        },
    };
    let decision = authorize(id, &attributes(&spec));
    render(
        "kube/reviews/self-subject-access-review",
        &json!({"kind": "SelfSubjectAccessReview", "apiVersion": "authorization.k8s.io/v1",
            "metadata": {"creationTimestamp": now_rfc3339()}, "spec": spec,
            "status": {"allowed": decision.allowed, "reason": decision.reason}}),
        "",
    )
}

/// The webhook: the token is in the body's `spec.token`.
fn token_review(
    req: &KubeRequest<'_>,
    authenticate: &dyn Fn(&str) -> Result<Identity, String>,
) -> WireResponse {
    let review: Value = serde_json::from_slice(req.body).unwrap_or_default();
    let api_version = review["apiVersion"]
        .as_str()
        .unwrap_or("authentication.k8s.io/v1")
        .to_owned();
    let token = review["spec"]["token"].as_str().unwrap_or_default();
    let (ok, status_body) = match authenticate(token) {
        Ok(id) => (
            true,
            json!({"authenticated": true, "user": user_info(&id, false)}),
        ),
        Err(why) => (false, json!({"authenticated": false, "error": why})),
    };
    let mut r = render(
        "kube/reviews/token-review",
        &json!({"apiVersion": api_version, "kind": "TokenReview", "metadata": {"creationTimestamp": null},
            "spec": {}, "status": status_body}),
        "",
    );
    if !ok {
        // aws-iam-authenticator answers a refused token with 403.
        r.status = 403;
    }
    r
}
