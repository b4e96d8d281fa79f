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
