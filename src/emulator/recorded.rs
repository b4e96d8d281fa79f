//! Answers rendered from the recordings of the EKS API (`proto-fixtures/eks/identity/`) and of
//! the Kubernetes API (`proto-fixtures/kube/`), embedded at build time.
//!
//! Contract: [`render`] answers with a recording's status and headers (`{{request_id}}`
//! filled) and a body cut to the recording's shape: [`shaped`] keeps only the members the
//! recorded body has (recursively; an array's elements take the shape of its first recorded
//! element; a recorded `null` or scalar keeps whatever value is computed), and drops `null`s,
//! so an answer can never carry a member the real service does not send. [`eks_error`] is the
//! recorded error for a code, with the message in the body; a code without a recording is a
//! programming error the unit tests catch.

use super::wire::WireResponse;
use serde_json::{Map, Value};

const RECORDINGS: &[(&str, &str)] = &[
    (
        "eks/associate-access-policy",
        include_str!("../../proto-fixtures/eks/identity/associate-access-policy.json"),
    ),
    (
        "eks/create-access-entry",
        include_str!("../../proto-fixtures/eks/identity/create-access-entry.json"),
    ),
    (
        "eks/create-pod-identity-association",
        include_str!("../../proto-fixtures/eks/identity/create-pod-identity-association.json"),
    ),
    (
        "eks/delete-access-entry",
        include_str!("../../proto-fixtures/eks/identity/delete-access-entry.json"),
    ),
    (
        "eks/delete-pod-identity-association",
        include_str!("../../proto-fixtures/eks/identity/delete-pod-identity-association.json"),
    ),
    (
        "eks/describe-access-entry",
        include_str!("../../proto-fixtures/eks/identity/describe-access-entry.json"),
    ),
    (
        "eks/describe-cluster",
        include_str!("../../proto-fixtures/eks/identity/describe-cluster.json"),
    ),
    (
        "eks/describe-pod-identity-association",
        include_str!("../../proto-fixtures/eks/identity/describe-pod-identity-association.json"),
    ),
    (
        "eks/describe-update",
        include_str!("../../proto-fixtures/eks/identity/describe-update.json"),
    ),
    (
        "eks/disassociate-access-policy",
        include_str!("../../proto-fixtures/eks/identity/disassociate-access-policy.json"),
    ),
    (
        "eks/error-expired-token",
        include_str!("../../proto-fixtures/eks/identity/error-expired-token.json"),
    ),
    (
        "eks/error-invalid-parameter",
        include_str!("../../proto-fixtures/eks/identity/error-invalid-parameter.json"),
    ),
    (
        "eks/error-invalid-request",
        include_str!("../../proto-fixtures/eks/identity/error-invalid-request.json"),
    ),
    (
        "eks/error-invalid-signature",
        include_str!("../../proto-fixtures/eks/identity/error-invalid-signature.json"),
    ),
    (
        "eks/error-missing-authentication-token",
        include_str!("../../proto-fixtures/eks/identity/error-missing-authentication-token.json"),
    ),
    (
        "eks/error-not-found",
        include_str!("../../proto-fixtures/eks/identity/error-not-found.json"),
    ),
    (
        "eks/error-resource-in-use",
        include_str!("../../proto-fixtures/eks/identity/error-resource-in-use.json"),
    ),
    (
        "eks/error-resource-not-found",
        include_str!("../../proto-fixtures/eks/identity/error-resource-not-found.json"),
    ),
    (
        "eks/error-unrecognized-client",
        include_str!("../../proto-fixtures/eks/identity/error-unrecognized-client.json"),
    ),
    (
        "eks/list-access-entries",
        include_str!("../../proto-fixtures/eks/identity/list-access-entries.json"),
    ),
    (
        "eks/list-access-policies",
        include_str!("../../proto-fixtures/eks/identity/list-access-policies.json"),
    ),
    (
        "eks/list-associated-access-policies",
        include_str!("../../proto-fixtures/eks/identity/list-associated-access-policies.json"),
    ),
    (
        "eks/list-pod-identity-associations",
        include_str!("../../proto-fixtures/eks/identity/list-pod-identity-associations.json"),
    ),
    (
        "eks/update-access-entry",
        include_str!("../../proto-fixtures/eks/identity/update-access-entry.json"),
    ),
    (
        "eks/update-cluster-config",
        include_str!("../../proto-fixtures/eks/identity/update-cluster-config.json"),
    ),
    (
        "eks/update-pod-identity-association",
        include_str!("../../proto-fixtures/eks/identity/update-pod-identity-association.json"),
    ),
    (
        "kube/discovery/api",
        include_str!("../../proto-fixtures/kube/discovery/api.json"),
    ),
    (
        "kube/discovery/apis",
        include_str!("../../proto-fixtures/kube/discovery/apis.json"),
    ),
    (
        "kube/discovery/version",
        include_str!("../../proto-fixtures/kube/discovery/version.json"),
    ),
    (
        "kube/reviews/self-subject-access-review",
        include_str!("../../proto-fixtures/kube/reviews/self-subject-access-review.json"),
    ),
    (
        "kube/reviews/self-subject-review",
        include_str!("../../proto-fixtures/kube/reviews/self-subject-review.json"),
    ),
    (
        "kube/reviews/status-not-found",
        include_str!("../../proto-fixtures/kube/reviews/status-not-found.json"),
    ),
    (
        "kube/reviews/status-unauthorized",
        include_str!("../../proto-fixtures/kube/reviews/status-unauthorized.json"),
    ),
    (
        "kube/reviews/token-review",
        include_str!("../../proto-fixtures/kube/reviews/token-review.json"),
    ),
];

/// A recording by name (`eks/describe-cluster`, `kube/discovery/api`).
pub fn recording(name: &str) -> Option<Value> {
    RECORDINGS
        .iter()
        .find(|(n, _)| *n == name)
        .and_then(|(_, text)| serde_json::from_str(text).ok())
}

/// Every recording, by name (for tests comparing shapes).
pub fn all() -> impl Iterator<Item = (&'static str, Value)> {
    RECORDINGS
        .iter()
        .filter_map(|(n, t)| Some((*n, serde_json::from_str(t).ok()?)))
}

/// `actual` cut to the shape of `recorded`.
pub fn shaped(recorded: &Value, actual: &Value) -> Value {
    match (recorded, actual) {
        (Value::Object(r), Value::Object(a)) => {
            let mut out = Map::new();
            for (k, rv) in r {
                if let Some(av) = a.get(k).filter(|v| !v.is_null()) {
                    out.insert(k.clone(), shaped(rv, av));
                }
            }
            Value::Object(out)
        }
        (Value::Array(r), Value::Array(a)) => match r.first() {
            Some(first) => Value::Array(a.iter().map(|v| shaped(first, v)).collect()),
            None => Value::Array(a.clone()),
        },
        (_, a) => a.clone(),
    }
}

fn headers(recorded: &Value, request_id: &str) -> Vec<(String, String)> {
    recorded["response"]["headers"]
        .as_object()
        .map(|h| {
            h.iter()
                .map(|(k, v)| {
                    let v = v.as_str().unwrap_or_default();
                    (k.clone(), v.replace("{{request_id}}", request_id))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The recording `name` answered with `body`.
pub fn render(name: &str, body: &Value, request_id: &str) -> WireResponse {
    let Some(r) = recording(name) else {
        return WireResponse {
            status: 500,
            headers: vec![("content-type".into(), "application/json".into())],
            body: serde_json::json!({"message": format!("no recording {name}")}).to_string(),
        };
    };
    WireResponse {
        status: r["response"]["status"].as_u64().unwrap_or(500) as u16,
        headers: headers(&r, request_id),
        body: shaped(&r["response"]["body"], body).to_string(),
    }
}

/// The recorded EKS error for `code`.
pub fn eks_error(code: &str, message: &str, request_id: &str) -> WireResponse {
    let recorded = all().find(|(n, v)| n.starts_with("eks/error-") && v["code"] == code);
    match recorded {
        Some((_, r)) => WireResponse {
            status: r["response"]["status"].as_u64().unwrap_or(500) as u16,
            headers: headers(&r, request_id),
            body: serde_json::json!({"message": message}).to_string(),
        },
        None => WireResponse {
            status: 500,
            headers: vec![
                ("content-type".into(), "application/json".into()),
                ("x-amzn-errortype".into(), code.to_owned()),
            ],
            body: serde_json::json!({"message": message}).to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_recording_parses_and_shapes_cut_unrecorded_members() {
        assert_eq!(all().count(), RECORDINGS.len());
        let recorded = json!({"a": 1, "list": [{"x": 1}], "o": {"k": null}});
        let actual = json!({"a": 2, "secret": "no", "list": [{"x": 3, "y": 4}], "o": {"k": [1], "z": 0}, "n": null});
        assert_eq!(
            shaped(&recorded, &actual),
            json!({"a": 2, "list": [{"x": 3}], "o": {"k": [1]}})
        );
    }

    #[test]
    fn every_eks_error_code_the_emulator_uses_is_recorded() {
        for (code, status) in [
            ("InvalidParameterException", 400),
            ("InvalidRequestException", 400),
            ("ResourceNotFoundException", 404),
            ("ResourceInUseException", 409),
            ("UnrecognizedClientException", 403),
            ("InvalidSignatureException", 403),
            ("ExpiredTokenException", 403),
            ("MissingAuthenticationTokenException", 403),
            ("NotFoundException", 404),
        ] {
            let r = eks_error(code, "m", "rid");
            assert_eq!(r.status, status, "{code}");
            assert!(
                r.headers
                    .contains(&("x-amzn-errortype".into(), code.into())),
                "{code}"
            );
        }
    }
}
