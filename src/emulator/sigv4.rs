//! Checking an AWS Signature Version 4 the way AWS does, for requests signed with credentials
//! the emulator issued (so it knows the secret).
//!
//! Contract: [`Authorization::parse`] reads `AWS4-HMAC-SHA256 Credential=<key>/<date>/<region>/
//! <service>/aws4_request, SignedHeaders=<a;b>, Signature=<hex>`. [`verify`] rebuilds the
//! canonical request from what arrived (method, path, query, the signed headers as the client
//! listed them, the payload hash: `x-amz-content-sha256` if sent, else the body's SHA-256),
//! derives the signing key from the secret, and compares signatures in constant time. The
//! request time (`x-amz-date`) must agree with the credential scope's date and be within 15
//! minutes of now. Every way it can fail is a [`Mismatch`] with a reason; nothing panics.

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

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// AWS's URI encoding: everything but unreserved characters, uppercase hex.
fn uri_encode(s: &str, keep_slash: bool) -> String {
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

fn canonical_query(query: &str) -> String {
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

fn parse_amz_date(s: &str) -> Option<SystemTime> {
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

/// Check `auth` over `req` with the key's `secret`.
pub fn verify(
    req: &Request<'_>,
    auth: &Authorization,
    secret: &str,
    now: SystemTime,
) -> Result<(), Mismatch> {
    let Request {
        method,
        path,
        query,
        headers,
        body,
    } = *req;
    let amz_date = headers
        .get("x-amz-date")
        .and_then(|v| v.to_str().ok())
        .ok_or(Mismatch::Malformed("no x-amz-date"))?;
    let when = parse_amz_date(amz_date)
        .ok_or(Mismatch::Malformed("x-amz-date is not YYYYMMDDTHHMMSSZ"))?;
    if !amz_date.starts_with(&auth.date) {
        return Err(Mismatch::Time(
            "the credential scope's date is not the request's".into(),
        ));
    }
    let skew = now
        .duration_since(when)
        .or_else(|e| Ok::<_, ()>(e.duration()))
        .unwrap_or_default();
    if skew > MAX_SKEW {
        return Err(Mismatch::Time(format!(
            "Signature expired: {amz_date} is more than 15 minutes from the current time"
        )));
    }
    let mut canonical_headers = String::new();
    for name in &auth.signed_headers {
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
        canonical_headers.push_str(&format!("{name}:{}\n", values.join(",")));
    }
    let payload = match headers
        .get("x-amz-content-sha256")
        .and_then(|v| v.to_str().ok())
    {
        Some(h) => h.to_owned(),
        None => hex(&Sha256::digest(body)),
    };
    let canonical_uri = if path.is_empty() {
        "/".to_owned()
    } else {
        uri_encode(path, true)
    };
    let canonical = format!(
        "{method}\n{canonical_uri}\n{}\n{canonical_headers}\n{}\n{payload}",
        canonical_query(query),
        auth.signed_headers.join(";")
    );
    let scope = format!(
        "{}/{}/{}/aws4_request",
        auth.date, auth.region, auth.service
    );
    let to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
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

#[cfg(test)]
mod tests {
    use super::*;

    /// AWS's documented example (IAM ListUsers, "Create a signed request" in the SigV4 guide):
    /// key AKIDEXAMPLE, secret wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY, 20150830T123600Z.
    #[test]
    fn verifies_the_documented_example() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "content-type",
            "application/x-www-form-urlencoded; charset=utf-8"
                .parse()
                .expect("h"),
        );
        headers.insert("host", "iam.amazonaws.com".parse().expect("h"));
        headers.insert("x-amz-date", "20150830T123600Z".parse().expect("h"));
        let auth = Authorization::parse(
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/iam/aws4_request, \
             SignedHeaders=content-type;host;x-amz-date, \
             Signature=5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7",
        )
        .expect("parses");
        let at = UNIX_EPOCH + Duration::from_secs(1_440_938_160);
        let secret = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
        let query = "Action=ListUsers&Version=2010-05-08";
        let request = |query| Request {
            method: "GET",
            path: "/",
            query,
            headers: &headers,
            body: b"",
        };
        assert_eq!(verify(&request(query), &auth, secret, at), Ok(()));
        assert_eq!(
            verify(&request(query), &auth, "another-secret", at),
            Err(Mismatch::Signature)
        );
        assert_eq!(
            verify(
                &request("Action=ListUsers&Version=2010-05-09"),
                &auth,
                secret,
                at
            ),
            Err(Mismatch::Signature)
        );
        assert!(matches!(
            verify(
                &request(query),
                &auth,
                secret,
                at + Duration::from_secs(3600)
            ),
            Err(Mismatch::Time(_))
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
