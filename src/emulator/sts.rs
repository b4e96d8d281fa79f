//! STS's query API as the emulator speaks it: IRSA (`AssumeRoleWithWebIdentity`), role chaining
//! (`AssumeRole`) and `GetCallerIdentity`, answered in STS's XML from the recordings in
//! `proto-fixtures/sts/` (embedded at build time, like EKS Auth's).
//!
//! Contract: `POST /` with a form body (or `GET /?…`), `Action=<operation>`:
//! - `AssumeRoleWithWebIdentity` (unsigned, as STS takes it): `RoleArn`, `RoleSessionName`,
//!   `WebIdentityToken`, `DurationSeconds` (900-43200, at most the role's 3600 by default). The
//!   token must be signed by this emulator's issuer, unexpired (`ExpiredTokenException`), for the
//!   audience the grant names, `sts.amazonaws.com` by default (else `InvalidIdentityToken`);
//!   its service account must be granted the role ([`Trust::irsa_grant`], else `AccessDenied`).
//! - `AssumeRole`: SigV4-signed ([`sigv4`](super::sigv4)) with credentials this emulator issued
//!   ([`Sessions`]; unknown key or session token `InvalidClientTokenId`, expired `ExpiredToken`,
//!   bad signature `SignatureDoesNotMatch`, unsigned `MissingAuthenticationToken`); `RoleArn`,
//!   `RoleSessionName`, `DurationSeconds` (at most 3600: every caller here is a role session,
//!   so this is role chaining), `ExternalId`; the target role must trust the caller's role
//!   ([`Trust::role_trust`]) and, if it names an external id, get it (else `AccessDenied`).
//! - `GetCallerIdentity`: signed the same way; the caller's assumed-role ARN, user id, account.
//! - malformed or missing parameters: `ValidationError`; any other action `InvalidAction`.
//!
//! Every credential issued here is sealed (`sessions.rs`), so it can sign the next request in a
//! chain, also after the emulator restarted with the same state dir.

use super::associations::{
    role_parts, valid_external_id, Trust, DEFAULT_MAX_SESSION, STS_AUDIENCE,
};
use super::issuer::{uuid_like, Issuer, Rejection};
use super::minting::fake_session;
use super::sessions::{Session, Sessions, Unsigned};
use super::sigv4::{self, Mismatch};
pub use super::sts_wire::{error, StsError, SIGNATURE_MISMATCH};
use super::sts_wire::{fail, fixture, render, session_fields, validation};
use super::wire::WireResponse;
use std::collections::HashMap;
use std::time::{Duration, SystemTime};

/// Session lengths STS accepts at all.
const DURATION: std::ops::RangeInclusive<u32> = 900..=43_200;

/// What STS needs of the emulator.
pub struct Sts<'a> {
    pub issuer: &'a Issuer,
    pub trust: &'a Trust,
    pub sessions: &'a Sessions,
}

/// A request as it arrived.
pub type Incoming<'a> = sigv4::Request<'a>;

/// The form parameters of a query-API request: the body for POST, the query string otherwise.
pub fn params(req: &Incoming<'_>) -> HashMap<String, String> {
    let source = if req.method == "POST" {
        req.body
    } else {
        req.query.as_bytes()
    };
    form_urlencoded::parse(source).into_owned().collect()
}

fn required<'p>(
    p: &'p HashMap<String, String>,
    name: &str,
    field: &str,
) -> Result<&'p str, StsError> {
    p.get(name)
        .map(String::as_str)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| validation(field, "Member must not be null", "null"))
}

fn role_arn(p: &HashMap<String, String>) -> Result<String, StsError> {
    let arn = required(p, "RoleArn", "roleArn")?;
    role_parts(arn)
        .map(|_| arn.to_owned())
        .ok_or_else(|| validation("roleArn", "Member must be an IAM role ARN", arn))
}

fn session_name(p: &HashMap<String, String>) -> Result<String, StsError> {
    let name = required(p, "RoleSessionName", "roleSessionName")?;
    if name.len() < 2 {
        return Err(validation(
            "roleSessionName",
            "Member must have length greater than or equal to 2",
            name,
        ));
    }
    if name.len() > 64 {
        return Err(validation(
            "roleSessionName",
            "Member must have length less than or equal to 64",
            name,
        ));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "_+=,.@-".contains(c))
    {
        return Err(validation(
            "roleSessionName",
            "Member must satisfy regular expression pattern: [\\w+=,.@-]*",
            name,
        ));
    }
    Ok(name.to_owned())
}

/// `DurationSeconds`, within STS's bounds and then `max` (the role's, or the chaining limit).
fn duration(p: &HashMap<String, String>, max: u32, too_long: &str) -> Result<Duration, StsError> {
    let Some(v) = p.get("DurationSeconds") else {
        return Ok(Duration::from_secs(u64::from(DEFAULT_MAX_SESSION.min(max))));
    };
    let secs: u32 = v
        .parse()
        .map_err(|_| validation("durationSeconds", "Member must be a number", v))?;
    if !DURATION.contains(&secs) {
        let constraint = if secs < 900 {
            "Member must have value greater than or equal to 900"
        } else {
            "Member must have value less than or equal to 43200"
        };
        return Err(validation("durationSeconds", constraint, v));
    }
    if secs > max {
        return Err(fail("ValidationError", too_long));
    }
    Ok(Duration::from_secs(u64::from(secs)))
}

fn expiration_text(t: u64) -> String {
    aws_smithy_types::DateTime::from_secs(t as i64)
        .fmt(aws_smithy_types::date_time::Format::DateTime)
        .unwrap_or_default()
}

/// `arn:aws:iam::<account>:role/<name>` for an assumed-role ARN.
pub(super) fn role_of(assumed: &str) -> Option<String> {
    let mut f = assumed.splitn(6, ':');
    let (Some("arn"), Some(partition), Some("sts"), Some(""), Some(account), Some(resource)) =
        (f.next(), f.next(), f.next(), f.next(), f.next(), f.next())
    else {
        return None;
    };
    let name = resource.strip_prefix("assumed-role/")?.split('/').next()?;
    Some(format!("arn:{partition}:iam::{account}:role/{name}"))
}

impl Sts<'_> {
    pub fn handle(&self, req: &Incoming<'_>) -> (Result<WireResponse, StsError>, String) {
        let request_id = uuid_like();
        let p = params(req);
        let result = match p.get("Action").map(String::as_str) {
            Some("AssumeRoleWithWebIdentity") => self.web_identity(&p, &request_id),
            Some("AssumeRole") => self
                .caller(req)
                .and_then(|caller| self.assume_role(&caller, &p, &request_id)),
            Some("GetCallerIdentity") => self.caller(req).map(|caller| {
                render(
                    &fixture("get-caller-identity").unwrap_or_default(),
                    &[
                        ("arn", &caller.arn),
                        ("user_id", &caller.user_id),
                        ("account", &caller.account),
                    ],
                    &request_id,
                )
            }),
            Some(other) => Err(fail(
                "InvalidAction",
                format!("Could not find operation {other} for version 2011-06-15"),
            )),
            None => Err(fail(
                "InvalidAction",
                "Could not find operation (no Action) for version 2011-06-15",
            )),
        };
        (result, request_id)
    }

    fn web_identity(
        &self,
        p: &HashMap<String, String>,
        request_id: &str,
    ) -> Result<WireResponse, StsError> {
        let role = role_arn(p)?;
        let session = session_name(p)?;
        let token = required(p, "WebIdentityToken", "webIdentityToken")?;
        let reject = |r: Rejection| match r {
            Rejection::Expired => fail(
                "ExpiredTokenException",
                "Token expired: the web identity token is past its exp",
            ),
            Rejection::Invalid(m) => fail("InvalidIdentityToken", m),
        };
        // Signature, issuer and time first; then whether the role trusts this subject.
        let subject = self.issuer.verify_any_audience(token).map_err(reject)?;
        let not_authorized = || {
            fail(
                "AccessDenied",
                "Not authorized to perform sts:AssumeRoleWithWebIdentity",
            )
        };
        let grant = self
            .trust
            .irsa_grant(&subject.namespace, &subject.service_account, &role);
        let audience = grant
            .as_ref()
            .map_or(STS_AUDIENCE.to_owned(), |g| g.audience.clone());
        self.issuer
            .verify_for(token, &audience)
            .map_err(|r| match r {
                Rejection::Invalid(_) => fail("InvalidIdentityToken", "Incorrect token audience"),
                other => reject(other),
            })?;
        let grant = grant.ok_or_else(not_authorized)?;
        let lifetime = duration(
            p,
            DEFAULT_MAX_SESSION,
            "The requested DurationSeconds exceeds the MaxSessionDuration set for this role.",
        )?;
        let mut issued = fake_session(&grant.role_arn, &session, lifetime);
        self.sessions.seal(&mut issued);
        let account = role_parts(&grant.role_arn)
            .map(|(a, _)| a)
            .unwrap_or("000000000000");
        let provider = format!(
            "arn:aws:iam::{account}:oidc-provider/{}",
            self.issuer.url().trim_start_matches("https://")
        );
        tracing::info!(role = %grant.role_arn, subject = %subject.sub(), access_key_id = %issued.access_key_id,
            "emulated STS: AssumeRoleWithWebIdentity");
        let expiration = expiration_text(issued.expiration);
        Ok(render(
            &fixture("assume-role-with-web-identity").unwrap_or_default(),
            &[
                session_fields(&issued, &expiration).as_slice(),
                &[
                    ("subject", &subject.sub()),
                    ("audience", &audience),
                    ("provider", &provider),
                ],
            ]
            .concat(),
            request_id,
        ))
    }

    /// The session that signed `req`, its signature checked.
    fn caller(&self, req: &Incoming<'_>) -> Result<Session, StsError> {
        self.sessions
            .signed_by(req, "sts", SystemTime::now())
            .map_err(|u| match u {
                Unsigned::Missing => fail(
                    "MissingAuthenticationToken",
                    "Request is missing Authentication Token",
                ),
                Unsigned::Unknown => fail(
                    "InvalidClientTokenId",
                    "The security token included in the request is invalid.",
                ),
                Unsigned::Expired => fail(
                    "ExpiredToken",
                    "The security token included in the request is expired",
                ),
                Unsigned::WrongService => fail(
                    "SignatureDoesNotMatch",
                    "Credential should be scoped to correct service: 'sts'.",
                ),
                Unsigned::Mismatch(Mismatch::Signature) => {
                    fail("SignatureDoesNotMatch", SIGNATURE_MISMATCH)
                }
                Unsigned::Malformed(m) | Unsigned::Mismatch(m) => {
                    fail("SignatureDoesNotMatch", m.to_string())
                }
            })
    }

    fn assume_role(
        &self,
        caller: &Session,
        p: &HashMap<String, String>,
        request_id: &str,
    ) -> Result<WireResponse, StsError> {
        let role = role_arn(p)?;
        let session = session_name(p)?;
        let external_id = p.get("ExternalId").map(String::as_str);
        if let Some(id) = external_id {
            if !valid_external_id(id) {
                return Err(validation(
                    "externalId",
                    "Member must satisfy regular expression pattern: [\\w+=,.@:/-]*",
                    id,
                ));
            }
        }
        // Every caller here holds a role session, so this is role chaining: one hour at most.
        let lifetime = duration(p, DEFAULT_MAX_SESSION, "The requested DurationSeconds exceeds the 1 hour session limit for roles assumed by role chaining.")?;
        let denied = || {
            fail(
                "AccessDenied",
                format!(
                    "User: {} is not authorized to perform: sts:AssumeRole on resource: {role}",
                    caller.arn
                ),
            )
        };
        let trust = self
            .trust
            .role_trust(&caller.role_arn, &caller.account, &role)
            .ok_or_else(denied)?;
        if let Some(required) = &trust.external_id {
            if external_id != Some(required.as_str()) {
                return Err(denied());
            }
        }
        if let Some(max) = trust.max_session_duration {
            if lifetime > Duration::from_secs(u64::from(max)) {
                return Err(fail("ValidationError", "The requested DurationSeconds exceeds the MaxSessionDuration set for this role."));
            }
        }
        let mut issued = fake_session(&role, &session, lifetime);
        self.sessions.seal(&mut issued);
        tracing::info!(caller = %caller.arn, role = %role, access_key_id = %issued.access_key_id,
            "emulated STS: AssumeRole");
        Ok(render(
            &fixture("assume-role").unwrap_or_default(),
            &session_fields(&issued, &expiration_text(issued.expiration)),
            request_id,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::super::sts_wire::FIXTURES;
    use super::*;
    use serde_json::Value;

    #[test]
    fn every_fixture_parses_and_every_error_code_is_recorded() {
        for (name, text) in FIXTURES {
            let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(
                v["response"]["body_text"]
                    .as_str()
                    .is_some_and(|b| b.starts_with('<')),
                "{name}"
            );
        }
        for (code, status) in [
            ("AccessDenied", 403),
            ("ExpiredToken", 400),
            ("ExpiredTokenException", 400),
            ("InvalidAction", 400),
            ("InvalidClientTokenId", 403),
            ("InvalidIdentityToken", 400),
            ("MissingAuthenticationToken", 403),
            ("SignatureDoesNotMatch", 403),
            ("ValidationError", 400),
        ] {
            let r = error(&fail(code, "a <b> & 'c'"), "rid");
            assert_eq!(r.status, status, "{code}");
            assert!(r.body.contains(&format!("<Code>{code}</Code>")), "{code}");
            assert!(
                r.body.contains("a &lt;b&gt; &amp; &apos;c&apos;"),
                "escaped: {}",
                r.body
            );
        }
    }

    #[test]
    fn parameters_are_validated_as_sts_does() {
        let p = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(
            session_name(&p(&[("RoleSessionName", "x")])).map_err(|e| e.code),
            Err("ValidationError")
        );
        assert_eq!(
            session_name(&p(&[("RoleSessionName", "ok session")])).map_err(|e| e.code),
            Err("ValidationError")
        );
        assert!(session_name(&p(&[("RoleSessionName", "botocore-session-1")])).is_ok());
        assert!(role_arn(&p(&[("RoleArn", "arn:aws:s3:::bucket")])).is_err());
        assert!(role_arn(&p(&[])).is_err());
        assert_eq!(duration(&p(&[]), 3600, "x"), Ok(Duration::from_secs(3600)));
        assert!(duration(&p(&[("DurationSeconds", "899")]), 3600, "x").is_err());
        assert!(duration(&p(&[("DurationSeconds", "7200")]), 3600, "too long").is_err());
        assert!(duration(&p(&[("DurationSeconds", "soon")]), 3600, "x").is_err());
        assert_eq!(
            role_of("arn:aws:sts::111122223333:assumed-role/app/session"),
            Some("arn:aws:iam::111122223333:role/app".to_owned())
        );
    }
}
