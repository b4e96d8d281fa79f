//! SigV4 in a query string: a presigned URL, as `aws eks get-token` makes one, checked with the
//! same canonicalisation as a header signature ([`sigv4`](super::sigv4)).
//!
//! Contract: [`Presigned::parse`] reads the `X-Amz-*` parameters (algorithm `AWS4-HMAC-SHA256`,
//! credential scope, date, expiry, signed headers, signature, security token).
//! [`verify_presigned`] rebuilds the canonical request of a `GET` (every parameter but the
//! signature, the signed headers, each of which must be supplied, the empty body's hash), checks
//! `host` is signed and the time is within 15 minutes, and compares in constant time.

use super::sigv4::{
    canonical_headers, canonical_query, canonical_uri, check_scope, compare, hex, signs,
    uri_encode, Authorization, Mismatch, Signed,
};
use hyper::HeaderMap;
use sha2::{Digest, Sha256};
use std::time::SystemTime;

/// A presigned URL's query (SigV4 in the query string, as `aws eks get-token` makes it):
/// the parameters, each once, keys as sent.
pub struct Presigned {
    pub auth: Authorization,
    pub amz_date: String,
    pub security_token: Option<String>,
    /// Every other parameter, for the canonical query and the caller's own checks.
    pub params: Vec<(String, String)>,
}

impl Presigned {
    /// Read the `X-Amz-*` parameters of a presigned URL's decoded query pairs.
    pub fn parse(pairs: &[(String, String)]) -> Result<Presigned, Mismatch> {
        let get = |name: &str| {
            pairs
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        };
        if get("X-Amz-Algorithm") != Some("AWS4-HMAC-SHA256") {
            return Err(Mismatch::Malformed(
                "X-Amz-Algorithm is not AWS4-HMAC-SHA256",
            ));
        }
        let header = format!(
            "AWS4-HMAC-SHA256 Credential={}, SignedHeaders={}, Signature={}",
            get("X-Amz-Credential").unwrap_or_default(),
            get("X-Amz-SignedHeaders").unwrap_or_default(),
            get("X-Amz-Signature").unwrap_or_default()
        );
        let auth = Authorization::parse(&header)?;
        // Required and a number, as STS requires; its value limits nothing (the authenticator
        // bounds it, and the date's age is what expires a URL).
        get("X-Amz-Expires")
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or(Mismatch::Malformed("X-Amz-Expires is not a number"))?;
        Ok(Presigned {
            auth,
            amz_date: get("X-Amz-Date").unwrap_or_default().to_owned(),
            security_token: get("X-Amz-Security-Token").map(str::to_owned),
            params: pairs.to_vec(),
        })
    }
}

/// Check a presigned GET of `path` whose query is `p`, as it would arrive with `headers`
/// (`host` and whatever else the signer listed: the verifier supplies those, as the EKS
/// authenticator supplies `x-k8s-aws-id`). `host` must be signed; the time window is the
/// caller's to enforce (STS ignores `X-Amz-Expires`), beyond the 15-minute skew checked here.
pub fn verify_presigned(
    path: &str,
    p: &Presigned,
    headers: &HeaderMap,
    secret: &str,
    now: SystemTime,
) -> Result<SystemTime, Mismatch> {
    let auth = &p.auth;
    // The time is a signed query parameter here, not a header; host must still be signed.
    if !signs(auth, &["host"]) {
        return Err(Mismatch::Malformed("X-Amz-SignedHeaders must include host"));
    }
    let when = check_scope(auth, &p.amz_date, now)?;
    let query: Vec<String> = p
        .params
        .iter()
        .filter(|(k, _)| !k.eq_ignore_ascii_case("X-Amz-Signature"))
        .map(|(k, v)| format!("{}={}", uri_encode(k, false), uri_encode(v, false)))
        .collect();
    let canonical = format!(
        "GET\n{}\n{}\n{}\n{}\n{}",
        canonical_uri(path),
        canonical_query(&query.join("&")),
        canonical_headers(headers, &auth.signed_headers)?,
        auth.signed_headers.join(";"),
        hex(&Sha256::digest(b""))
    );
    compare(
        &canonical,
        &Signed {
            amz_date: &p.amz_date,
            auth,
        },
        secret,
    )?;
    Ok(when)
}
