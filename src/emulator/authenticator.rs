//! The control plane's IAM authenticator: who a `k8s-aws-v1.` token says its bearer is.
//!
//! Contract: a token is `k8s-aws-v1.` + the unpadded base64url of a presigned STS
//! `GetCallerIdentity` URL, as `aws eks get-token` and aws-iam-authenticator make it. [`verify`]
//! checks it as aws-iam-authenticator's `pkg/token` `Verify` does, in its order and with its
//! messages: at most 4 KiB; the prefix; the URL's host must be this emulator's STS (a real STS
//! host, or any other, is refused: the emulator can only vouch for its own credentials); path
//! `/`; only the query parameters a presigned `GetCallerIdentity` has, each once; `Action` is
//! `GetCallerIdentity`; `x-k8s-aws-id` is among the signed headers; `X-Amz-Expires` is 0-900;
//! `X-Amz-Date` is no more than 15 minutes old (STS ignores `X-Amz-Expires`). Where the real one
//! then calls STS with `x-k8s-aws-id: <cluster>`, this checks the signature itself against the
//! sealed session ([`Sessions`]), with that header set to this cluster's name, so a token for
//! another cluster fails its signature. The caller's ARN is canonicalised ([`canonicalize`]:
//! an assumed role becomes its role, without path). Nothing here logs the token.

use super::presigned::{self, Presigned};
use super::sessions::Sessions;
use super::sigv4::{self, Mismatch};
use super::sts::role_of;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hyper::HeaderMap;
use std::time::{Duration, SystemTime};

pub const TOKEN_PREFIX: &str = "k8s-aws-v1.";
const MAX_TOKEN: usize = 4096;
/// Presigned STS URLs are valid this long after `X-Amz-Date`, whatever `X-Amz-Expires` says.
const LIFETIME: Duration = Duration::from_secs(15 * 60);
const ALLOWED: [&str; 9] = [
    "action",
    "version",
    "x-amz-algorithm",
    "x-amz-credential",
    "x-amz-date",
    "x-amz-expires",
    "x-amz-security-token",
    "x-amz-signature",
    "x-amz-signedheaders",
];
pub const CLUSTER_ID_HEADER: &str = "x-k8s-aws-id";

/// Who signed a token, as STS `GetCallerIdentity` names them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// As STS returned it: `arn:aws:sts::<account>:assumed-role/<role>/<session>`.
    pub arn: String,
    /// `arn:aws:iam::<account>:role/<role>` for an assumed role; otherwise the ARN.
    pub canonical_arn: String,
    pub account: String,
    /// The role or user id (`AROA…`), without the session.
    pub user_id: String,
    pub session_name: String,
    pub access_key_id: String,
}

/// Why a token does not authenticate, in aws-iam-authenticator's words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("input token was not properly formatted: {0}")]
    Format(String),
    #[error("sts getCallerIdentity failed: {0}")]
    Sts(String),
}

fn format(m: impl Into<String>) -> TokenError {
    TokenError::Format(m.into())
}

/// The IAM ARN aws-iam-authenticator maps: an assumed role becomes its role (the path is not in
/// an assumed-role ARN, so it is lost); roles, users, roots and federated users stay.
pub fn canonicalize(arn: &str) -> Result<String, String> {
    let parts: Vec<&str> = arn.splitn(6, ':').collect();
    let [_, partition, service, _, account, resource] = parts[..] else {
        return Err(format!("arn '{arn}' is invalid"));
    };
    if !matches!(partition, "aws" | "aws-cn" | "aws-us-gov") {
        return Err(format!("arn '{arn}' does not have a recognized partition"));
    }
    let kind = resource.split('/').next().unwrap_or_default();
    match (service, kind) {
        ("sts", "assumed-role") => {
            role_of(arn).ok_or_else(|| format!("assumed-role arn '{arn}' does not have a role"))
        }
        ("sts", "federated-user") | ("iam", "role" | "user" | "root") => Ok(arn.to_owned()),
        ("iam", _) | ("sts", _) => Err(format!(
            "unrecognized resource {resource} for service {service}"
        )),
        _ => Err(format!(
            "service {service} in arn {arn} is not a valid service for identities ({account})"
        )),
    }
}

/// A presigned URL's parts: host, path and decoded query pairs.
type UrlParts = (String, String, Vec<(String, String)>);

/// Split a token into its presigned URL's parts.
fn decode(token: &str) -> Result<UrlParts, TokenError> {
    if token.len() > MAX_TOKEN {
        return Err(format("token is too large"));
    }
    let encoded = token
        .strip_prefix(TOKEN_PREFIX)
        .ok_or_else(|| format(format!("token is missing expected {TOKEN_PREFIX:?} prefix")))?;
    let bytes = URL_SAFE_NO_PAD
        .decode(encoded)
        .map_err(|e| format(e.to_string()))?;
    let url = String::from_utf8(bytes).map_err(|_| format("the URL is not UTF-8"))?;
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| format("unexpected scheme in pre-signed URL"))?;
    let (authority, path_query) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
    let (path, query) = path_query.split_once('?').unwrap_or((path_query, ""));
    let pairs = form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    Ok((authority.to_ascii_lowercase(), path.to_owned(), pairs))
}

/// The query checks that need no secret.
fn check_query(pairs: &[(String, String)], now: SystemTime) -> Result<(), TokenError> {
    for (i, (k, _)) in pairs.iter().enumerate() {
        if !ALLOWED.contains(&k.to_ascii_lowercase().as_str()) {
            return Err(format(format!("non-whitelisted query parameter {k:?}")));
        }
        if pairs[..i].iter().any(|(o, _)| o.eq_ignore_ascii_case(k)) {
            return Err(format("query parameter with multiple values not supported"));
        }
    }
    let get = |name: &str| {
        pairs
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .unwrap_or_default()
    };
    if get("action") != "GetCallerIdentity" {
        return Err(format("unexpected action parameter in pre-signed URL"));
    }
    if !get("x-amz-signedheaders")
        .split(';')
        .any(|h| h.eq_ignore_ascii_case(CLUSTER_ID_HEADER))
    {
        return Err(format(format!(
            "client did not sign the {CLUSTER_ID_HEADER} header in the pre-signed URL"
        )));
    }
    match get("x-amz-expires").parse::<i64>() {
        Ok(e) if (0..=900).contains(&e) => {}
        _ => return Err(format("invalid X-Amz-Expires parameter in pre-signed URL")),
    }
    let date = get("x-amz-date");
    if date.is_empty() {
        return Err(format(
            "X-Amz-Date parameter must be present in pre-signed URL",
        ));
    }
    let signed_at = sigv4::parse_amz_date(date)
        .ok_or_else(|| format(format!("error parsing X-Amz-Date parameter {date}")))?;
    if now > signed_at + LIFETIME {
        return Err(format(format!(
            "X-Amz-Date parameter is expired (15 minute expiration) {date}"
        )));
    }
    Ok(())
}

/// What the emulator's STS would answer the presigned request: who signed it, or its error.
fn sts_answer(
    sessions: &Sessions,
    host: &str,
    path: &str,
    pairs: &[(String, String)],
    cluster: &str,
    now: SystemTime,
) -> Result<Caller, TokenError> {
    let sts = |code: &str, message: &str| {
        TokenError::Sts(format!(
            "error from AWS (expected 200, got 403). {code}: {message}"
        ))
    };
    let p = Presigned::parse(pairs).map_err(|m| sts("SignatureDoesNotMatch", &m.to_string()))?;
    let session = p
        .security_token
        .as_deref()
        .and_then(|t| sessions.open(&p.auth.access_key_id, t))
        .ok_or_else(|| {
            sts(
                "InvalidClientTokenId",
                "The security token included in the request is invalid.",
            )
        })?;
    if now >= session.expiration {
        return Err(sts(
            "ExpiredToken",
            "The security token included in the request is expired",
        ));
    }
    if p.auth.service != "sts" {
        return Err(sts(
            "SignatureDoesNotMatch",
            "Credential should be scoped to correct service: 'sts'.",
        ));
    }
    let mut headers = HeaderMap::new();
    let values = (host.parse(), cluster.parse());
    let (Ok(h), Ok(c)) = values else {
        return Err(format(
            "the host or cluster name is not a valid header value",
        ));
    };
    headers.insert(hyper::header::HOST, h);
    headers.insert(CLUSTER_ID_HEADER, c);
    presigned::verify_presigned(path, &p, &headers, &session.secret_access_key, now).map_err(
        |m| match m {
            Mismatch::Signature => sts("SignatureDoesNotMatch", super::sts::SIGNATURE_MISMATCH),
            other => sts("SignatureDoesNotMatch", &other.to_string()),
        },
    )?;
    let (user_id, session_name) = session
        .user_id
        .split_once(':')
        .map(|(u, s)| (u.to_owned(), s.to_owned()))
        .unwrap_or((session.user_id.clone(), String::new()));
    Ok(Caller {
        canonical_arn: canonicalize(&session.arn).map_err(TokenError::Sts)?,
        arn: session.arn,
        account: session.account,
        user_id,
        session_name,
        access_key_id: p.auth.access_key_id.clone(),
    })
}

/// Who `token` is for `cluster`, if its URL goes to one of `sts_hosts` (this emulator).
pub fn verify(
    token: &str,
    cluster: &str,
    sts_hosts: &[String],
    sessions: &Sessions,
    now: SystemTime,
) -> Result<Caller, TokenError> {
    let (host, path, pairs) = decode(token)?;
    if !sts_hosts.iter().any(|h| h.eq_ignore_ascii_case(&host)) {
        return Err(format(format!(
            "unexpected hostname {host:?} in pre-signed URL (only this emulator's STS, {}, can vouch for its credentials)",
            sts_hosts.join(" or ")
        )));
    }
    if path != "/" {
        return Err(format("unexpected path in pre-signed URL"));
    }
    check_query(&pairs, now)?;
    sts_answer(sessions, &host, &path, &pairs, cluster, now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_arns_as_the_authenticator_makes_them() {
        assert_eq!(
            canonicalize("arn:aws:sts::111122223333:assumed-role/dev/s").as_deref(),
            Ok("arn:aws:iam::111122223333:role/dev")
        );
        for same in [
            "arn:aws:iam::111122223333:role/team/dev",
            "arn:aws:iam::111122223333:user/alice",
            "arn:aws:iam::111122223333:root",
            "arn:aws:sts::111122223333:federated-user/bob",
        ] {
            assert_eq!(canonicalize(same).as_deref(), Ok(same));
        }
        for bad in [
            "nope",
            "arn:aws:s3:::bucket",
            "arn:other:iam::111122223333:role/x",
            "arn:aws:iam::111122223333:group/g",
        ] {
            assert!(canonicalize(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn malformed_tokens_are_refused_before_any_signature_check() {
        let sessions = Sessions::new(&[1; 32]);
        let hosts = ["127.0.0.1:8090".to_owned()];
        let now = SystemTime::now();
        let token = |url: &str| format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(url));
        let good_query = "Action=GetCallerIdentity&Version=2011-06-15&X-Amz-Expires=60&X-Amz-SignedHeaders=host%3Bx-k8s-aws-id&X-Amz-Date=20150830T123600Z";
        for (t, says) in [
            ("Bearer x".to_owned(), "prefix"),
            (format!("{TOKEN_PREFIX}!!!"), "properly formatted"),
            (
                token(&format!("http://sts.amazonaws.com/?{good_query}")),
                "unexpected hostname",
            ),
            (
                token(&format!("http://127.0.0.1:8090/x?{good_query}")),
                "unexpected path",
            ),
            (
                token(&format!("http://127.0.0.1:8090/?{good_query}&Extra=1")),
                "non-whitelisted",
            ),
            (
                token(&format!(
                    "http://127.0.0.1:8090/?{}",
                    good_query.replace("GetCallerIdentity", "AssumeRole")
                )),
                "action",
            ),
            (
                token(&format!(
                    "http://127.0.0.1:8090/?{}",
                    good_query.replace("%3Bx-k8s-aws-id", "")
                )),
                "did not sign the x-k8s-aws-id",
            ),
            (
                token(&format!(
                    "http://127.0.0.1:8090/?{}",
                    good_query.replace("Expires=60", "Expires=3600")
                )),
                "X-Amz-Expires",
            ),
            (
                token(&format!("http://127.0.0.1:8090/?{good_query}")),
                "expired",
            ),
            ("x".repeat(5000), "too large"),
        ] {
            let e = verify(&t, "dev", &hosts, &sessions, now)
                .expect_err(says)
                .to_string();
            assert!(e.contains(says), "{says}: {e}");
        }
    }
}
