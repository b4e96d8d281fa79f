//! Credentials the emulator issued (through EKS Auth, `AssumeRoleWithWebIdentity` or
//! `AssumeRole`), made so that when they sign a request (`AssumeRole` for chaining,
//! `GetCallerIdentity`) the emulator can tell whose they are and check the signature, as STS
//! does, without remembering anything.
//!
//! Contract: the session token is sealed: `IQoJb3JpZ2luX2Vj` (the prefix of real STS tokens) and
//! the base64 of `[version 1][payload length u16 BE][payload JSON][random padding][HMAC-SHA256 of
//! all the preceding bytes]`, ~1 KB like a real one; any changed byte makes it unknown. The payload
//! names the access key id, the assumed-role ARN, the role id and the expiry. The secret key is
//! derived from the access key id under the same key. That key is derived from the issuer's private
//! key (`Issuer::derive_key`), so credentials stay valid across restarts of an emulator with the
//! same state dir (the AWS CLI caches assumed-role credentials on disk and reuses them), memory
//! does not grow with the number of sessions issued, and a token whose MAC fails is unknown
//! (`InvalidClientTokenId`), whoever made it. Nothing here is logged.

use super::associations::role_parts;
use super::minting::Issued;
use super::sigv4::{self, Authorization, Mismatch};
use super::sts::role_of;
use aws_lc_rs::hmac;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::{Deserialize, Serialize};
use std::time::{Duration, SystemTime};

/// Every issued session token starts with this, as real STS session tokens do.
pub const TOKEN_PREFIX: &str = "IQoJb3JpZ2luX2Vj";
const VERSION: u8 = 1;
const MAC_LEN: usize = 32;
/// Sealed bytes before base64, padding included: the size of a real STS session token.
const SEALED_LEN: usize = 768;

/// One issued set of credentials and the identity they stand for.
pub struct Session {
    pub secret_access_key: String,
    /// `arn:aws:sts::<account>:assumed-role/<role>/<session>`.
    pub arn: String,
    /// `arn:aws:iam::<account>:role/<role>` (path included).
    pub role_arn: String,
    /// `<role id>:<session>`.
    pub user_id: String,
    pub account: String,
    pub expiration: SystemTime,
}

/// What the token carries (short keys: it travels in every signed request).
#[derive(Serialize, Deserialize)]
struct Payload {
    /// Access key id.
    k: String,
    /// Assumed-role ARN.
    a: String,
    /// `<role id>:<session>`.
    u: String,
    /// Expiry, Unix seconds.
    e: u64,
}

/// Why a request is not signed by a session this emulator issued; each service names these
/// with its own error codes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unsigned {
    /// No `Authorization` header.
    Missing,
    /// The header is not SigV4.
    Malformed(Mismatch),
    /// An access key or session token this emulator did not issue.
    Unknown,
    Expired,
    /// Signed for another service.
    WrongService,
    /// The signature (or its time) does not verify.
    Mismatch(Mismatch),
}

/// Seals and opens session credentials under one key.
pub struct Sessions {
    key: hmac::Key,
}

impl Sessions {
    pub fn new(secret: &[u8; 32]) -> Sessions {
        Sessions {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
        }
    }

    /// Replace `issued`'s secret key and session token with sealed ones for its identity.
    pub fn seal(&self, issued: &mut Issued) {
        let payload = Payload {
            k: issued.access_key_id.clone(),
            a: issued.assumed_role_arn.clone(),
            u: issued.assume_role_id.clone(),
            e: issued.expiration,
        };
        let Ok(json) = serde_json::to_vec(&payload) else {
            return;
        };
        let Ok(len) = u16::try_from(json.len()) else {
            return;
        };
        let mut sealed = Vec::with_capacity(SEALED_LEN.max(3 + json.len() + MAC_LEN));
        sealed.push(VERSION);
        sealed.extend_from_slice(&len.to_be_bytes());
        sealed.extend_from_slice(&json);
        while sealed.len() < SEALED_LEN - MAC_LEN {
            sealed.push(fastrand::u8(..));
        }
        let tag = hmac::sign(&self.key, &sealed);
        sealed.extend_from_slice(tag.as_ref());
        issued.session_token = format!("{TOKEN_PREFIX}{}", STANDARD.encode(&sealed));
        issued.secret_access_key = self.secret_for(&issued.access_key_id);
    }

    /// The session `access_key_id` and `session_token` stand for, if this emulator sealed them.
    pub fn open(&self, access_key_id: &str, session_token: &str) -> Option<Session> {
        let sealed = STANDARD
            .decode(session_token.strip_prefix(TOKEN_PREFIX)?)
            .ok()?;
        let signed = sealed.len().checked_sub(MAC_LEN)?;
        let (body, tag) = sealed.split_at(signed);
        hmac::verify(&self.key, body, tag).ok()?;
        let [version, hi, lo, rest @ ..] = body else {
            return None;
        };
        if *version != VERSION {
            return None;
        }
        let len = usize::from(u16::from_be_bytes([*hi, *lo]));
        let payload: Payload = serde_json::from_slice(rest.get(..len)?).ok()?;
        if payload.k != access_key_id {
            return None;
        }
        let role_arn = role_of(&payload.a)?;
        let account = role_parts(&role_arn)
            .map(|(a, _)| a.to_owned())
            .unwrap_or_default();
        Some(Session {
            secret_access_key: self.secret_for(access_key_id),
            arn: payload.a,
            role_arn,
            user_id: payload.u,
            account,
            expiration: SystemTime::UNIX_EPOCH + Duration::from_secs(payload.e),
        })
    }

    /// The session that signed `req` (header SigV4 for `service`), its signature checked.
    pub fn signed_by(
        &self,
        req: &sigv4::Request<'_>,
        service: &str,
        now: SystemTime,
    ) -> Result<Session, Unsigned> {
        let header = req
            .headers
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or(Unsigned::Missing)?;
        let auth = Authorization::parse(header).map_err(Unsigned::Malformed)?;
        let token = req
            .headers
            .get("x-amz-security-token")
            .and_then(|v| v.to_str().ok())
            .ok_or(Unsigned::Unknown)?;
        let session = self
            .open(&auth.access_key_id, token)
            .ok_or(Unsigned::Unknown)?;
        if now >= session.expiration {
            return Err(Unsigned::Expired);
        }
        if auth.service != service {
            return Err(Unsigned::WrongService);
        }
        sigv4::verify(req, &auth, &session.secret_access_key, now).map_err(Unsigned::Mismatch)?;
        Ok(session)
    }

    /// 40 characters of base64, like an AWS secret key, bound to the access key id.
    fn secret_for(&self, access_key_id: &str) -> String {
        let tag = hmac::sign(&self.key, format!("secret:{access_key_id}").as_bytes());
        let mut s = STANDARD.encode(tag.as_ref());
        s.truncate(40);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emulator::minting::fake_session;

    fn issued() -> Issued {
        fake_session(
            "arn:aws:iam::111122223333:role/app",
            "s",
            Duration::from_secs(3600),
        )
    }

    #[test]
    fn sealed_credentials_open_to_their_identity_under_the_same_key_only() {
        let sessions = Sessions::new(&[7; 32]);
        let mut i = issued();
        sessions.seal(&mut i);
        assert!(i.session_token.starts_with(TOKEN_PREFIX));
        assert!(i.session_token.len() > 1000, "{}", i.session_token.len());
        assert_eq!(i.secret_access_key.len(), 40);
        let s = sessions
            .open(&i.access_key_id, &i.session_token)
            .expect("opens");
        assert_eq!(s.arn, i.assumed_role_arn);
        assert_eq!(s.role_arn, "arn:aws:iam::111122223333:role/app");
        assert_eq!(s.account, "111122223333");
        assert_eq!(s.secret_access_key, i.secret_access_key);
        // A restarted emulator with the same key opens it too; another key does not.
        assert!(Sessions::new(&[7; 32])
            .open(&i.access_key_id, &i.session_token)
            .is_some());
        assert!(Sessions::new(&[8; 32])
            .open(&i.access_key_id, &i.session_token)
            .is_none());
        // Another key id, or any flipped bit in the signed part, is unknown.
        assert!(sessions
            .open("ASIAOTHEROTHEROTHER1", &i.session_token)
            .is_none());
        let mut raw = STANDARD
            .decode(&i.session_token[TOKEN_PREFIX.len()..])
            .expect("b64");
        for at in [5, raw.len() - MAC_LEN - 1, raw.len() - 1] {
            let mut changed = raw.clone();
            changed[at] ^= 1;
            let tampered = format!("{TOKEN_PREFIX}{}", STANDARD.encode(&changed));
            assert!(sessions.open(&i.access_key_id, &tampered).is_none(), "{at}");
        }
        raw.truncate(raw.len() - 1);
        let short = format!("{TOKEN_PREFIX}{}", STANDARD.encode(&raw));
        assert!(sessions.open(&i.access_key_id, &short).is_none());
        for garbage in ["", TOKEN_PREFIX, "IQoJb3JpZ2luX2VjAAAA", "not a token"] {
            assert!(sessions.open(&i.access_key_id, garbage).is_none());
        }
    }
}
