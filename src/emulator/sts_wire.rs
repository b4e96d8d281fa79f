//! STS's wire format as the emulator answers it: the recordings in `proto-fixtures/sts/`
//! (embedded at build time), rendered with their placeholders filled and XML-escaped, and STS's
//! errors in its recorded XML.

use super::minting::Issued;
use super::wire::WireResponse;
use serde_json::Value;

pub(super) const FIXTURES: &[(&str, &str)] = &[
    (
        "assume-role-with-web-identity",
        include_str!("../../proto-fixtures/sts/assume-role-with-web-identity.json"),
    ),
    (
        "assume-role",
        include_str!("../../proto-fixtures/sts/assume-role.json"),
    ),
    (
        "get-caller-identity",
        include_str!("../../proto-fixtures/sts/get-caller-identity.json"),
    ),
    (
        "error-access-denied",
        include_str!("../../proto-fixtures/sts/error-access-denied.json"),
    ),
    (
        "error-expired-credentials",
        include_str!("../../proto-fixtures/sts/error-expired-credentials.json"),
    ),
    (
        "error-expired-web-identity-token",
        include_str!("../../proto-fixtures/sts/error-expired-web-identity-token.json"),
    ),
    (
        "error-invalid-action",
        include_str!("../../proto-fixtures/sts/error-invalid-action.json"),
    ),
    (
        "error-invalid-client-token-id",
        include_str!("../../proto-fixtures/sts/error-invalid-client-token-id.json"),
    ),
    (
        "error-invalid-identity-token",
        include_str!("../../proto-fixtures/sts/error-invalid-identity-token.json"),
    ),
    (
        "error-missing-authentication-token",
        include_str!("../../proto-fixtures/sts/error-missing-authentication-token.json"),
    ),
    (
        "error-signature-does-not-match",
        include_str!("../../proto-fixtures/sts/error-signature-does-not-match.json"),
    ),
    (
        "error-validation",
        include_str!("../../proto-fixtures/sts/error-validation.json"),
    ),
];

/// What AWS says when a signature does not verify.
pub const SIGNATURE_MISMATCH: &str = "The request signature we calculated does not match the signature you provided. Check your AWS Secret Access Key and signing method. Consult the service documentation for details.";

pub(super) fn fixture(name: &str) -> Option<Value> {
    FIXTURES
        .iter()
        .find(|(n, _)| *n == name)
        .and_then(|(_, text)| serde_json::from_str(text).ok())
}

pub(super) fn xml_escape(v: &str) -> String {
    v.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&apos;")
}

/// The template values every credential-issuing answer shares.
pub(super) fn session_fields<'a>(
    issued: &'a Issued,
    expiration: &'a str,
) -> [(&'static str, &'a str); 6] {
    [
        ("assumed_role_arn", &issued.assumed_role_arn),
        ("assumed_role_id", &issued.assume_role_id),
        ("access_key_id", &issued.access_key_id),
        ("secret_access_key", &issued.secret_access_key),
        ("session_token", &issued.session_token),
        ("expiration", expiration),
    ]
}

/// A recorded response with its placeholders filled (values XML-escaped).
pub(super) fn render(f: &Value, values: &[(&str, &str)], request_id: &str) -> WireResponse {
    let r = &f["response"];
    let mut body = r["body_text"].as_str().unwrap_or_default().to_owned();
    for (k, v) in values.iter().chain(&[("request_id", request_id)]) {
        body = body.replace(&format!("{{{{{k}}}}}"), &xml_escape(v));
    }
    let mut headers: Vec<(String, String)> = r["headers"]
        .as_object()
        .map(|h| {
            h.iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        v.as_str()
                            .unwrap_or_default()
                            .replace("{{request_id}}", request_id),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    headers.sort();
    WireResponse {
        status: r["status"].as_u64().unwrap_or(500) as u16,
        headers,
        body,
    }
}

/// A refusal: an STS error code and what it says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StsError {
    pub code: &'static str,
    pub message: String,
}

pub(super) fn fail(code: &'static str, message: impl Into<String>) -> StsError {
    StsError {
        code,
        message: message.into(),
    }
}

pub(super) fn validation(field: &str, constraint: &str, value: &str) -> StsError {
    fail(
        "ValidationError",
        format!("1 validation error detected: Value '{value}' at '{field}' failed to satisfy constraint: {constraint}"),
    )
}

/// STS's error for `e`, in its recorded XML.
pub fn error(e: &StsError, request_id: &str) -> WireResponse {
    let recorded = FIXTURES
        .iter()
        .filter_map(|(_, t)| serde_json::from_str::<Value>(t).ok())
        .find(|f| f["code"] == e.code);
    match recorded {
        Some(f) => render(&f, &[("message", &e.message)], request_id),
        None => WireResponse {
            status: 500,
            headers: vec![("content-type".into(), "text/xml".into())],
            body: format!(
                "<ErrorResponse><Error><Code>{}</Code></Error></ErrorResponse>",
                e.code
            ),
        },
    }
}
