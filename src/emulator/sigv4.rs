//! Checking an AWS Signature Version 4 the way AWS does, for requests signed with credentials
//! the emulator issued (so it knows the secret).
//!
//! Contract: [`Authorization::parse`] reads `AWS4-HMAC-SHA256 Credential=<key>/<date>/<region>/
//! <service>/aws4_request, SignedHeaders=<a;b>, Signature=<hex>`. [`verify`] rebuilds the
//! canonical request from what arrived (method, path, query, the signed headers as the client
//! listed them, each of which must be present, and the SHA-256 of the body actually received:
//! an `x-amz-content-sha256` header must equal it, `UNSIGNED-PAYLOAD` is refused), derives the
//! signing key from the secret, and compares signatures in constant time. `host` and
//! `x-amz-date` must be signed; the request time must agree with the credential scope's date
//! (`YYYYMMDD`) and be within 15 minutes of now. [`presigned`](super::presigned) does the same
//! for a presigned URL (SigV4 in the query string), for the EKS authenticator.
//! Every way it can fail is a [`Mismatch`] with a reason; nothing panics.

use aws_lc_rs::hmac;
use hyper::HeaderMap;
use sha2::{Digest, Sha256};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How far the request time may be from the emulator's clock.
const MAX_SKEW: Duration = Duration::from_secs(15 * 60);

/// The parsed `Authorization` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorization {
    pub access_key_id: String,
    pub date: String,
    pub region: String,
    pub service: String,
    pub signed_headers: Vec<String>,
    pub signature: String,
}

/// Why a signature does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Mismatch {
    #[error("the Authorization header is not AWS4-HMAC-SHA256: {0}")]
    Malformed(&'static str),
    #[error("{0}")]
    Time(String),
    #[error("the signature does not match")]
    Signature,
}

impl Authorization {
    pub fn parse(header: &str) -> Result<Authorization, Mismatch> {
        let rest = header
            .strip_prefix("AWS4-HMAC-SHA256 ")
            .ok_or(Mismatch::Malformed("unknown algorithm"))?;
        let field = |name: &str| {
            rest.split(',')
                .map(str::trim)
                .find_map(|p| p.strip_prefix(name))
        };
        let scope: Vec<&str> = field("Credential=")
            .ok_or(Mismatch::Malformed("no Credential"))?
            .split('/')
            .collect();
        let [key, date, region, service, "aws4_request"] = scope[..] else {
            return Err(Mismatch::Malformed(
                "Credential is not <key>/<date>/<region>/<service>/aws4_request",
            ));
        };
        let signed_headers: Vec<String> = field("SignedHeaders=")
            .ok_or(Mismatch::Malformed("no SignedHeaders"))?
            .split(';')
            .map(str::to_ascii_lowercase)
            .collect();
        let signature = field("Signature=").ok_or(Mismatch::Malformed("no Signature"))?;
        if key.is_empty()
            || signature.len() != 64
            || !signature.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Err(Mismatch::Malformed(
                "empty key or a signature that is not 64 hex digits",
            ));
        }
        Ok(Authorization {
            access_key_id: key.to_owned(),
            date: date.to_owned(),
            region: region.to_owned(),
            service: service.to_owned(),
            signed_headers,
            signature: signature.to_ascii_lowercase(),
        })
    }
}

pub(super) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// AWS's URI encoding: everything but unreserved characters, uppercase hex.
pub(super) fn uri_encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            b'/' if keep_slash => out.push('/'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            if let Some(v) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub(super) fn canonical_query(query: &str) -> String {
    let mut pairs: Vec<(String, String)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (
                uri_encode(&percent_decode(k), false),
                uri_encode(&percent_decode(v), false),
            )
        })
        .collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

pub fn parse_amz_date(s: &str) -> Option<SystemTime> {
    // YYYYMMDDTHHMMSSZ
    let t = aws_smithy_types::DateTime::from_str(
        &format!(
            "{}-{}-{}T{}:{}:{}Z",
            s.get(0..4)?,
            s.get(4..6)?,
            s.get(6..8)?,
            s.get(9..11)?,
            s.get(11..13)?,
            s.get(13..15)?
        ),
        aws_smithy_types::date_time::Format::DateTime,
    )
    .ok()?;
    UNIX_EPOCH.checked_add(Duration::from_secs(u64::try_from(t.secs()).ok()?))
}

/// A request as it arrived, for checking its signature.
pub struct Request<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub query: &'a str,
    pub headers: &'a HeaderMap,
    pub body: &'a [u8],
}

/// What a signature covers besides the request itself: the time, the scope and the headers
/// the signer listed.
pub(super) struct Signed<'a> {
    pub amz_date: &'a str,
    pub auth: &'a Authorization,
}

/// The canonical headers of `signed`, each of which must have arrived: a signed header that
/// is absent would otherwise canonicalise as empty, letting a signer claim headers it never
/// sent.
pub(super) fn canonical_headers(
    headers: &HeaderMap,
    signed: &[String],
) -> Result<String, Mismatch> {
    let mut out = String::new();
    for name in signed {
        let values: Vec<String> = headers
            .get_all(name.as_str())
            .iter()
            .map(|v| {
                String::from_utf8_lossy(v.as_bytes())
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect();
        if values.is_empty() {
            return Err(Mismatch::Malformed(
                "a signed header is missing from the request",
            ));
        }
        out.push_str(&format!("{name}:{}\n", values.join(",")));
    }
    Ok(out)
}

/// Whether every one of `names` is in the signed headers.
pub(super) fn signs(auth: &Authorization, names: &[&str]) -> bool {
    names
        .iter()
        .all(|n| auth.signed_headers.iter().any(|h| h == n))
}

/// The scope date must be the request's date (eight digits, so an empty one cannot match
/// everything), and the time must be within 15 minutes of `now`.
pub(super) fn check_scope(
    auth: &Authorization,
    amz_date: &str,
    now: SystemTime,
) -> Result<SystemTime, Mismatch> {
    let when = parse_amz_date(amz_date)
        .ok_or(Mismatch::Malformed("x-amz-date is not YYYYMMDDTHHMMSSZ"))?;
    if auth.date.len() != 8 || !auth.date.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Mismatch::Malformed(
            "the credential scope's date is not YYYYMMDD",
        ));
    }
    if !amz_date.starts_with(&auth.date) {
        return Err(Mismatch::Time(
            "the credential scope's date is not the request's".into(),
        ));
    }
    if skew(now, when) > MAX_SKEW {
        return Err(Mismatch::Time(format!(
            "Signature expired: {amz_date} is more than 15 minutes from the current time"
        )));
    }
    Ok(when)
}

fn skew(now: SystemTime, when: SystemTime) -> Duration {
    now.duration_since(when).unwrap_or_else(|e| e.duration())
}

/// The payload hash a signature covers: always the SHA-256 of the body that arrived. A client
/// may also send it as `x-amz-content-sha256`, which must then be that hash: trusting the
/// header would let a captured signature be replayed with another body. `UNSIGNED-PAYLOAD`
/// is for S3 only, so never accepted here.
fn payload_hash(headers: &HeaderMap, body: &[u8]) -> Result<String, Mismatch> {
    let hash = hex(&Sha256::digest(body));
    match headers.get("x-amz-content-sha256") {
        None => Ok(hash),
        Some(v) if v.as_bytes().eq_ignore_ascii_case(hash.as_bytes()) => Ok(hash),
        Some(_) => Err(Mismatch::Signature),
    }
}

/// HMAC the canonical request with the key derived from `secret` and compare with the
/// claimed signature in constant time.
pub(super) fn compare(canonical: &str, signed: &Signed<'_>, secret: &str) -> Result<(), Mismatch> {
    let auth = signed.auth;
    let scope = format!(
        "{}/{}/{}/aws4_request",
        auth.date, auth.region, auth.service
    );
    let to_sign = format!(
        "AWS4-HMAC-SHA256\n{}\n{scope}\n{}",
        signed.amz_date,
        hex(&Sha256::digest(canonical.as_bytes()))
    );
    let mut key = hmac::Key::new(hmac::HMAC_SHA256, format!("AWS4{secret}").as_bytes());
    for part in [&auth.date, &auth.region, &auth.service, "aws4_request"] {
        let tag = hmac::sign(&key, part.as_bytes());
        key = hmac::Key::new(hmac::HMAC_SHA256, tag.as_ref());
    }
    let expected = hex(hmac::sign(&key, to_sign.as_bytes()).as_ref());
    let same = expected.len() == auth.signature.len()
        && expected
            .bytes()
            .zip(auth.signature.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if same {
        Ok(())
    } else {
        Err(Mismatch::Signature)
    }
}

pub(super) fn canonical_uri(path: &str) -> String {
    if path.is_empty() {
        "/".to_owned()
    } else {
        uri_encode(path, true)
    }
}

/// Check `auth` (an `Authorization` header) over `req` with the key's `secret`.
pub fn verify(
    req: &Request<'_>,
    auth: &Authorization,
    secret: &str,
    now: SystemTime,
) -> Result<(), Mismatch> {
    let amz_date = req
        .headers
        .get("x-amz-date")
        .and_then(|v| v.to_str().ok())
        .ok_or(Mismatch::Malformed("no x-amz-date"))?;
    // AWS requires both signed: an unsigned host lets a signature be replayed elsewhere.
    if !signs(auth, &["host", "x-amz-date"]) {
        return Err(Mismatch::Malformed(
            "SignedHeaders must include host and x-amz-date",
        ));
    }
    check_scope(auth, amz_date, now)?;
    let headers = canonical_headers(req.headers, &auth.signed_headers)?;
    let canonical = format!(
        "{}\n{}\n{}\n{headers}\n{}\n{}",
        req.method,
        canonical_uri(req.path),
        canonical_query(req.query),
        auth.signed_headers.join(";"),
        payload_hash(req.headers, req.body)?
    );
    compare(&canonical, &Signed { amz_date, auth }, secret)
}

#[cfg(test)]
mod tests {
    use super::super::presigned::{verify_presigned, Presigned};
    use super::*;

    const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
    const EXAMPLE_AUTH: &str =
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/iam/aws4_request, \
         SignedHeaders=content-type;host;x-amz-date, \
         Signature=5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7";
    const EXAMPLE_QUERY: &str = "Action=ListUsers&Version=2010-05-08";

    fn example_headers() -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            "content-type",
            "application/x-www-form-urlencoded; charset=utf-8"
                .parse()
                .expect("h"),
        );
        headers.insert("host", "iam.amazonaws.com".parse().expect("h"));
        headers.insert("x-amz-date", "20150830T123600Z".parse().expect("h"));
        headers
    }

    fn example_time() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_440_938_160)
    }

    fn request<'a>(headers: &'a HeaderMap, query: &'a str, body: &'a [u8]) -> Request<'a> {
        Request {
            method: "GET",
            path: "/",
            query,
            headers,
            body,
        }
    }

    /// AWS's documented example (IAM ListUsers, "Create a signed request" in the SigV4 guide):
    /// key AKIDEXAMPLE, secret wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY, 20150830T123600Z.
    #[test]
    fn verifies_the_documented_example() {
        let headers = example_headers();
        let auth = Authorization::parse(EXAMPLE_AUTH).expect("parses");
        let at = example_time();
        let q = EXAMPLE_QUERY;
        assert_eq!(
            verify(&request(&headers, q, b""), &auth, SECRET, at),
            Ok(())
        );
        assert_eq!(
            verify(&request(&headers, q, b""), &auth, "another-secret", at),
            Err(Mismatch::Signature)
        );
        let other = "Action=ListUsers&Version=2010-05-09";
        assert_eq!(
            verify(&request(&headers, other, b""), &auth, SECRET, at),
            Err(Mismatch::Signature)
        );
        assert!(matches!(
            verify(
                &request(&headers, q, b""),
                &auth,
                SECRET,
                at + Duration::from_secs(3600)
            ),
            Err(Mismatch::Time(_))
        ));
    }

    /// M6: the payload hash is the body's, whatever `x-amz-content-sha256` claims, so a captured
    /// signature cannot carry another body (another `RoleArn`).
    #[test]
    fn the_body_is_hashed_whatever_the_content_sha256_header_says() {
        let mut headers = example_headers();
        let empty = hex(&Sha256::digest(b""));
        headers.insert("x-amz-content-sha256", empty.parse().expect("h"));
        let auth = Authorization::parse(EXAMPLE_AUTH).expect("parses");
        let (q, at) = (EXAMPLE_QUERY, example_time());
        assert_eq!(
            verify(&request(&headers, q, b""), &auth, SECRET, at),
            Ok(())
        );
        let forged = b"Action=AssumeRole&RoleArn=arn:aws:iam::111122223333:role/admin";
        assert_eq!(
            verify(&request(&headers, q, forged), &auth, SECRET, at),
            Err(Mismatch::Signature)
        );
        headers.insert(
            "x-amz-content-sha256",
            "UNSIGNED-PAYLOAD".parse().expect("h"),
        );
        assert_eq!(
            verify(&request(&headers, q, b""), &auth, SECRET, at),
            Err(Mismatch::Signature)
        );
    }

    #[test]
    fn host_date_and_every_signed_header_are_required() {
        let headers = example_headers();
        let (q, at) = (EXAMPLE_QUERY, example_time());
        let with = |credential: &str, signed: &str| {
            Authorization::parse(&format!(
                "AWS4-HMAC-SHA256 Credential={credential}, SignedHeaders={signed}, Signature={}",
                "0".repeat(64)
            ))
            .expect("parses")
        };
        let scope = "AKIDEXAMPLE/20150830/us-east-1/iam/aws4_request";
        for (auth, why) in [
            (with(scope, "content-type;x-amz-date"), "no host"),
            (with(scope, "content-type;host"), "no x-amz-date"),
            (
                with(
                    "AKIDEXAMPLE//us-east-1/iam/aws4_request",
                    "content-type;host;x-amz-date",
                ),
                "empty date",
            ),
            (
                with(
                    "AKIDEXAMPLE/2015083/us-east-1/iam/aws4_request",
                    "content-type;host;x-amz-date",
                ),
                "short date",
            ),
            (
                with(scope, "content-type;host;x-amz-date;x-amz-security-token"),
                "absent header",
            ),
        ] {
            assert!(
                matches!(
                    verify(&request(&headers, q, b""), &auth, SECRET, at),
                    Err(Mismatch::Malformed(_))
                ),
                "{why}"
            );
        }
    }

    /// A URL botocore presigned (`generate_presigned_url('get_caller_identity')` with an
    /// `x-k8s-aws-id: dev` header injected before signing, as `aws eks get-token` does).
    const PRESIGNED: &str = "Action=GetCallerIdentity&Version=2011-06-15&X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIDEXAMPLE%2F20261201%2Fus-east-1%2Fsts%2Faws4_request&X-Amz-Date=20261201T070032Z&X-Amz-Expires=60&X-Amz-SignedHeaders=host%3Bx-k8s-aws-id&X-Amz-Security-Token=SESSION%2FTOKEN%2B1%3D&X-Amz-Signature=41855997d80bed23dc5748da63de2410bc014fb52554d2dcb04edb032b1c51d9";

    fn presigned(query: &str) -> Presigned {
        let pairs: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
            .into_owned()
            .collect();
        Presigned::parse(&pairs).expect("parses")
    }

    #[test]
    fn verifies_a_botocore_presigned_url_for_its_cluster_only() {
        let p = presigned(PRESIGNED);
        assert_eq!(p.security_token.as_deref(), Some("SESSION/TOKEN+1="));
        let at = UNIX_EPOCH + Duration::from_secs(1_796_108_432);
        let headers = |cluster: &str| {
            let mut h = HeaderMap::new();
            h.insert("host", "127.0.0.1:8090".parse().expect("h"));
            h.insert("x-k8s-aws-id", cluster.parse().expect("h"));
            h
        };
        assert!(verify_presigned("/", &p, &headers("dev"), SECRET, at).is_ok());
        assert_eq!(
            verify_presigned("/", &p, &headers("prod"), SECRET, at),
            Err(Mismatch::Signature)
        );
        assert_eq!(
            verify_presigned("/", &p, &headers("dev"), "wrong", at),
            Err(Mismatch::Signature)
        );
        let tampered = presigned(&PRESIGNED.replace("Version=2011-06-15", "Version=2011-06-16"));
        assert_eq!(
            verify_presigned("/", &tampered, &headers("dev"), SECRET, at),
            Err(Mismatch::Signature)
        );
        assert!(matches!(
            verify_presigned(
                "/",
                &p,
                &headers("dev"),
                SECRET,
                at + Duration::from_secs(16 * 60)
            ),
            Err(Mismatch::Time(_))
        ));
        let mut no_cluster = headers("dev");
        no_cluster.remove("x-k8s-aws-id");
        assert!(matches!(
            verify_presigned("/", &p, &no_cluster, SECRET, at),
            Err(Mismatch::Malformed(_))
        ));
    }

    #[test]
    fn refuses_malformed_headers() {
        for bad in [
            "",
            "AWS4-HMAC-SHA1 Credential=a/b/c/d/aws4_request, SignedHeaders=host, Signature=00",
            "AWS4-HMAC-SHA256 Credential=a/b/c/aws4_request, SignedHeaders=host, Signature=00",
            "AWS4-HMAC-SHA256 Credential=a/20200101/r/s/aws4_request, SignedHeaders=host, Signature=xyz",
        ] {
            assert!(Authorization::parse(bad).is_err(), "{bad}");
        }
    }
}
