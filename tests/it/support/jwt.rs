//! Projected-token-shaped JWTs for tests and benchmarks. Self-contained: `benches/` include it.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

/// A well-formed JWT with a meaningless signature: the agent does not verify signatures unless
/// `--token-issuer` is set, and the fake EKS Auth does not either.
pub fn encode_unsigned(header: &serde_json::Value, claims: &serde_json::Value) -> String {
    format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string()),
        URL_SAFE_NO_PAD.encode(b"not-a-real-signature"),
    )
}

/// `token` with `from` replaced by `to` in its payload, and its header and signature kept: a
/// signature that no longer matches what it signs.
pub fn tampered(token: &str, from: &str, to: &str) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    let payload = URL_SAFE_NO_PAD
        .decode(parts.get(1).copied().unwrap_or_default())
        .unwrap_or_default();
    let changed = String::from_utf8_lossy(&payload).replace(from, to);
    format!(
        "{}.{}.{}",
        parts.first().copied().unwrap_or_default(),
        URL_SAFE_NO_PAD.encode(changed),
        parts.get(2).copied().unwrap_or_default()
    )
}

/// The `kubernetes.io.namespace` claim of a JWT; `None` if it has none or is not a JWT.
pub fn namespace_of(token: &str) -> Option<String> {
    let payload = URL_SAFE_NO_PAD.decode(token.split('.').nth(1)?).ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&payload).ok()?;
    claims["kubernetes.io"]["namespace"]
        .as_str()
        .map(str::to_owned)
}
