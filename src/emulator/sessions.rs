//! Credentials the emulator issued (through EKS Auth, `AssumeRoleWithWebIdentity` or
//! `AssumeRole`), so that when they sign a request (`AssumeRole` for chaining,
//! `GetCallerIdentity`) the emulator knows whose they are and can check the signature.
//!
//! Contract: a session is found by its access key id until an hour after it expires (so an
//! expired one is told apart from an unknown one, as STS does); at most [`MAX_SESSIONS`] are kept (least recently used go first), so a long `dev` run cannot grow without bound.
//! Sessions hold secrets: no `Debug`, never logged.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

pub const MAX_SESSIONS: u64 = 100_000;
const KEPT_AFTER_EXPIRY: Duration = Duration::from_secs(3600);

/// One issued set of credentials and the identity they stand for.
pub struct Session {
    pub secret_access_key: String,
    pub session_token: String,
    /// `arn:aws:sts::<account>:assumed-role/<role>/<session>`.
    pub arn: String,
    /// `arn:aws:iam::<account>:role/<role>` (path included).
    pub role_arn: String,
    /// `<role id>:<session>`.
    pub user_id: String,
    pub account: String,
    pub expiration: SystemTime,
}

struct UntilExpiry;

impl moka::Expiry<String, Arc<Session>> for UntilExpiry {
    fn expire_after_create(&self, _: &String, s: &Arc<Session>, _: Instant) -> Option<Duration> {
        Some(
            s.expiration
                .duration_since(SystemTime::now())
                .unwrap_or_default()
                + KEPT_AFTER_EXPIRY,
        )
    }
}

pub struct Sessions {
    by_key: moka::sync::Cache<String, Arc<Session>>,
}

impl Default for Sessions {
    fn default() -> Self {
        Sessions {
            by_key: moka::sync::Cache::builder()
                .max_capacity(MAX_SESSIONS)
                .expire_after(UntilExpiry)
                .build(),
        }
    }
}

impl Sessions {
    pub fn insert(&self, access_key_id: &str, session: Session) {
        self.by_key
            .insert(access_key_id.to_owned(), Arc::new(session));
    }

    pub fn get(&self, access_key_id: &str) -> Option<Arc<Session>> {
        self.by_key.get(access_key_id)
    }
}
