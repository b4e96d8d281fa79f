//! Role credentials and the JSON body every SDK's container provider parses.
//!
//! Contract: a [`Credentials`] value is complete (non-empty key id, secret and session token, an
//! expiration in the future, and no further than [`MAX_LIFETIME`]) or it does not exist;
//! [`Credentials::validate`] is the gate from whatever EKS Auth sent. The body is serialised once,
//! when the value is built, as exactly
//! `{"AccessKeyId","SecretAccessKey","Token","AccountId","Expiration"}` in that order, with
//! `Expiration` in RFC 3339 UTC ending in `Z` and no fraction (the strictest parsers, Rust's and
//! JS's, accept only that). `AccountId` is the account field of the assumed-role ARN and is omitted
//! when the ARN has none. The secret fields never appear in `Debug` output.

use aws_smithy_types::date_time::Format;
use aws_smithy_types::DateTime;
use bytes::Bytes;
use serde::Serialize;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Why an EKS Auth answer could not become credentials (maps to 502).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidCredentials {
    #[error("EKS Auth returned no {0}")]
    Missing(&'static str),
    #[error("EKS Auth returned credentials that expired {0} s ago")]
    AlreadyExpired(u64),
    #[error("EKS Auth returned credentials that expire {0} s from now, more than any AWS credentials last")]
    Implausible(u64),
}

/// The longest credentials can last (STS's longest sessions are 36 h; EKS Auth issues 6 h).
/// Anything beyond is a garbled answer, and past year 9999 it could not even be written.
pub const MAX_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);

/// Credentials as the agent holds them: the serialised body plus what the cache needs to know.
#[derive(Clone)]
pub struct Credentials {
    access_key_id: String,
    expiration: SystemTime,
    /// The exact response body, built once; a cache hit clones a reference count, not bytes.
    body: Bytes,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("expiration", &format_expiration(self.expiration))
            .finish_non_exhaustive()
    }
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct Body<'a> {
    access_key_id: &'a str,
    secret_access_key: &'a str,
    token: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    account_id: Option<&'a str>,
    expiration: &'a str,
}

/// What EKS Auth handed back, before validation. Borrowed so the SDK's strings are not copied
/// until they are known to be usable.
pub struct Unvalidated<'a> {
    pub access_key_id: &'a str,
    pub secret_access_key: &'a str,
    pub session_token: &'a str,
    pub expiration: SystemTime,
    pub assumed_role_arn: &'a str,
}

/// `arn:aws:sts::111122223333:assumed-role/Role/session` → `111122223333`.
pub fn account_of(arn: &str) -> Option<&str> {
    let account = arn.split(':').nth(4)?;
    (account.len() == 12 && account.bytes().all(|b| b.is_ascii_digit())).then_some(account)
}

/// RFC 3339 in UTC with a literal `Z` and whole seconds.
pub fn format_expiration(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    DateTime::from_secs(secs as i64)
        .fmt(Format::DateTime)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".to_owned())
}

/// The body as it is written, read back (a successor agent receiving a predecessor's cache).
/// Members it does not know are ignored: a newer agent may write more, and a downgrade must not
/// throw every pod's credentials away for it.
#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Written {
    access_key_id: String,
    secret_access_key: String,
    token: String,
    account_id: Option<String>,
    expiration: String,
}

impl Credentials {
    /// Credentials from a body this agent (or its predecessor) wrote, checked as EKS Auth's
    /// answers are: complete, not expired, plausible. The body is rebuilt, so it is byte for
    /// byte what [`Credentials::validate`] would make.
    pub fn restore(body: &str, now: SystemTime) -> Result<Credentials, InvalidCredentials> {
        let w: Written = serde_json::from_str(body)
            .map_err(|_| InvalidCredentials::Missing("credentials body"))?;
        let expiration = DateTime::from_str(&w.expiration, Format::DateTime)
            .ok()
            .and_then(|d| u64::try_from(d.secs()).ok())
            .map(|s| UNIX_EPOCH + Duration::from_secs(s))
            .ok_or(InvalidCredentials::Missing("Expiration"))?;
        let arn = w
            .account_id
            .as_deref()
            .map(|a| format!("arn:aws:sts::{a}:assumed-role/restored/restored"))
            .unwrap_or_default();
        Credentials::validate(
            Unvalidated {
                access_key_id: &w.access_key_id,
                secret_access_key: &w.secret_access_key,
                session_token: &w.token,
                expiration,
                assumed_role_arn: &arn,
            },
            now,
        )
    }

    /// Accept only complete credentials that are still valid at `now`.
    pub fn validate(
        raw: Unvalidated<'_>,
        now: SystemTime,
    ) -> Result<Credentials, InvalidCredentials> {
        if raw.access_key_id.is_empty() {
            return Err(InvalidCredentials::Missing("accessKeyId"));
        }
        if raw.secret_access_key.is_empty() {
            return Err(InvalidCredentials::Missing("secretAccessKey"));
        }
        if raw.session_token.is_empty() {
            return Err(InvalidCredentials::Missing("sessionToken"));
        }
        if raw.expiration <= now {
            let ago = now
                .duration_since(raw.expiration)
                .unwrap_or_default()
                .as_secs();
            return Err(InvalidCredentials::AlreadyExpired(ago));
        }
        let lifetime = raw.expiration.duration_since(now).unwrap_or_default();
        if lifetime > MAX_LIFETIME {
            return Err(InvalidCredentials::Implausible(lifetime.as_secs()));
        }
        // Whole seconds: the body says no more, and the cache must not believe in more.
        let expiration = UNIX_EPOCH
            + Duration::from_secs(
                raw.expiration
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs(),
            );
        let account_id = account_of(raw.assumed_role_arn);
        let expiration_text = format_expiration(expiration);
        let body = serde_json::to_vec(&Body {
            access_key_id: raw.access_key_id,
            secret_access_key: raw.secret_access_key,
            token: raw.session_token,
            account_id,
            expiration: &expiration_text,
        })
        // The buffer grew by doubling; keep only what the body needs, since it lives as long as
        // the cache entry (measured: ~0.6 KB less per entry with ~1 KB session tokens).
        .map(|mut v| {
            v.shrink_to_fit();
            Bytes::from(v)
        })
        .map_err(|_| InvalidCredentials::Missing("serialisable fields"))?;
        Ok(Credentials {
            access_key_id: raw.access_key_id.to_owned(),
            expiration,
            body,
        })
    }

    /// The access key id is not secret (it appears in CloudTrail) and is useful in logs.
    pub fn access_key_id(&self) -> &str {
        &self.access_key_id
    }

    pub fn expiration(&self) -> SystemTime {
        self.expiration
    }

    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// Time left at `now`, zero once expired.
    pub fn remaining(&self, now: SystemTime) -> Duration {
        self.expiration.duration_since(now).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(exp: SystemTime) -> Unvalidated<'static> {
        Unvalidated {
            access_key_id: "ASIAEXAMPLE",
            secret_access_key: "secret/key+value",
            session_token: "session-token",
            expiration: exp,
            assumed_role_arn: "arn:aws:sts::111122223333:assumed-role/Role/eks-c-p-uuid",
        }
    }

    #[test]
    fn body_is_exact() {
        let exp = UNIX_EPOCH + Duration::from_secs(1_767_247_200); // 2026-01-01T06:00:00Z
        let fetched = exp - Duration::from_secs(6 * 3600);
        let c = Credentials::validate(raw(exp), fetched).expect("valid");
        assert_eq!(
            std::str::from_utf8(c.body()).expect("utf8"),
            r#"{"AccessKeyId":"ASIAEXAMPLE","SecretAccessKey":"secret/key+value","Token":"session-token","AccountId":"111122223333","Expiration":"2026-01-01T06:00:00Z"}"#
        );
    }

    #[test]
    fn refuses_incomplete_or_expired() {
        let now = SystemTime::now();
        let later = now + Duration::from_secs(3600);
        for (field, mut r) in [
            ("accessKeyId", raw(later)),
            ("secretAccessKey", raw(later)),
            ("sessionToken", raw(later)),
        ] {
            match field {
                "accessKeyId" => r.access_key_id = "",
                "secretAccessKey" => r.secret_access_key = "",
                _ => r.session_token = "",
            }
            assert_eq!(
                Credentials::validate(r, now).unwrap_err(),
                InvalidCredentials::Missing(field)
            );
        }
        assert!(matches!(
            Credentials::validate(raw(now - Duration::from_secs(5)), now),
            Err(InvalidCredentials::AlreadyExpired(_))
        ));
        assert!(Credentials::validate(raw(UNIX_EPOCH), now).is_err());
        // A garbled expiration far in the future would format as 1970 (expired to every SDK).
        let year_3000 = UNIX_EPOCH + Duration::from_secs(32_503_680_000);
        assert!(matches!(
            Credentials::validate(raw(year_3000), now),
            Err(InvalidCredentials::Implausible(_))
        ));
        assert!(Credentials::validate(raw(now + MAX_LIFETIME), now).is_ok());
    }

    #[test]
    fn account_id_only_from_a_real_account_field() {
        assert_eq!(
            account_of("arn:aws:sts::111122223333:assumed-role/R/s"),
            Some("111122223333")
        );
        assert_eq!(account_of("arn:aws:sts:::assumed-role/R/s"), None);
        assert_eq!(account_of(""), None);
        let mut r = raw(SystemTime::now() + Duration::from_secs(60));
        r.assumed_role_arn = "";
        let c = Credentials::validate(r, SystemTime::now()).expect("valid");
        assert!(!std::str::from_utf8(c.body())
            .expect("utf8")
            .contains("AccountId"));
    }

    #[test]
    fn a_written_body_restores_to_the_same_bytes() {
        let now = SystemTime::now();
        let c = Credentials::validate(raw(now + Duration::from_secs(3600)), now).expect("valid");
        let body = std::str::from_utf8(c.body()).expect("utf8");
        let back = Credentials::restore(body, now).expect("restores");
        assert_eq!(back.body(), c.body());
        assert_eq!(back.expiration(), c.expiration());
        for bad in ["", "{}", "not json", r#"{"AccessKeyId":"a"}"#] {
            assert!(Credentials::restore(bad, now).is_err(), "{bad}");
        }
        // Expired by the time it arrives: refused.
        assert!(Credentials::restore(body, now + Duration::from_secs(7200)).is_err());
        // A member a newer agent added: ignored, the rest restored.
        let newer = body.replacen('{', r#"{"SomethingNew":1,"#, 1);
        assert_eq!(
            Credentials::restore(&newer, now).expect("restores").body(),
            c.body()
        );
    }

    #[test]
    fn debug_hides_secrets() {
        let c = Credentials::validate(
            raw(SystemTime::now() + Duration::from_secs(60)),
            SystemTime::now(),
        )
        .expect("valid");
        let shown = format!("{c:?}");
        assert!(!shown.contains("secret/key+value") && !shown.contains("session-token"));
        assert!(shown.contains("ASIAEXAMPLE"));
    }
}
