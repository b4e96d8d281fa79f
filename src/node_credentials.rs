//! Node credentials for `--rotate-credentials` (EKS Hybrid Nodes): the shared credentials file,
//! re-read when it changes.
//!
//! Contract: on hybrid nodes the node's credential process rewrites temporary keys into the
//! shared credentials file (`AWS_SHARED_CREDENTIALS_FILE`, default `~/.aws/credentials`; profile
//! `AWS_PROFILE`, default `default`). Every exchange asks this provider (the SDK's identity cache
//! is disabled), which stats the file and re-reads it when its modification time or size changed,
//! and at least once a minute. A file that is missing, unreadable or half-written (no key id or
//! no secret in the profile) keeps the last good credentials and logs a warning naming the file,
//! never its contents. Before any good read, exchanges fail with a clear error.

use aws_credential_types::provider::{self, error::CredentialsError, future, ProvideCredentials};
use aws_credential_types::Credentials;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

const REREAD_EVERY: Duration = Duration::from_secs(60);

#[derive(Debug)]
pub struct SharedFileCredentials {
    path: PathBuf,
    profile: String,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    last_good: Option<Credentials>,
    /// (modification time, size) when last read, to notice rewrites cheaply.
    seen: Option<(SystemTime, u64)>,
    read_at: Option<Instant>,
}

/// Keys of one profile of an INI credentials file.
fn parse(text: &str, profile: &str) -> Result<Credentials, &'static str> {
    let (mut in_profile, mut key, mut secret, mut token) = (false, None, None, None);
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let name = name.trim();
            in_profile =
                name == profile || name.strip_prefix("profile ").map(str::trim) == Some(profile);
            continue;
        }
        if !in_profile {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let v = v.trim().to_owned();
        match k.trim().to_ascii_lowercase().as_str() {
            "aws_access_key_id" => key = Some(v),
            "aws_secret_access_key" => secret = Some(v),
            "aws_session_token" => token = Some(v),
            _ => {}
        }
    }
    let key = key
        .filter(|k| !k.is_empty())
        .ok_or("the profile has no aws_access_key_id")?;
    let secret = secret
        .filter(|s| !s.is_empty())
        .ok_or("the profile has no aws_secret_access_key")?;
    Ok(Credentials::new(
        key,
        secret,
        token.filter(|t| !t.is_empty()),
        None,
        "rotated-shared-credentials-file",
    ))
}

impl SharedFileCredentials {
    pub fn new(path: PathBuf, profile: String) -> Self {
        SharedFileCredentials {
            path,
            profile,
            state: Mutex::default(),
        }
    }

    /// From `AWS_SHARED_CREDENTIALS_FILE` / `AWS_PROFILE`, with the SDK's defaults.
    pub fn from_env() -> Self {
        let path = std::env::var_os("AWS_SHARED_CREDENTIALS_FILE")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                std::env::var_os("HOME")
                    .map(PathBuf::from)
                    .unwrap_or_default()
                    .join(".aws")
                    .join("credentials")
            });
        let profile = std::env::var("AWS_PROFILE").unwrap_or_else(|_| "default".into());
        SharedFileCredentials::new(path, profile)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn load(&self) -> provider::Result {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let meta = std::fs::metadata(&self.path)
            .ok()
            .map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()));
        let stale = state.read_at.is_none_or(|t| t.elapsed() >= REREAD_EVERY);
        if meta != state.seen || stale || state.last_good.is_none() {
            state.seen = meta;
            state.read_at = Some(Instant::now());
            let read = std::fs::read_to_string(&self.path)
                .map_err(|e| e.to_string())
                .and_then(|text| parse(&text, &self.profile).map_err(str::to_owned));
            match read {
                Ok(creds) => {
                    let changed = state.last_good.as_ref().map(|c| c.access_key_id())
                        != Some(creds.access_key_id());
                    if changed {
                        tracing::info!(file = %self.path.display(), access_key_id = creds.access_key_id(), "node credentials loaded");
                    }
                    state.last_good = Some(creds);
                }
                Err(why) => {
                    tracing::warn!(file = %self.path.display(), profile = %self.profile, reason = %why,
                        keeping_last_good = state.last_good.is_some(), "cannot use the shared credentials file");
                }
            }
        }
        state.last_good.clone().ok_or_else(|| {
            CredentialsError::not_loaded(format!(
                "no usable credentials yet in {} (profile {})",
                self.path.display(),
                self.profile
            ))
        })
    }
}

impl ProvideCredentials for SharedFileCredentials {
    fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        future::ProvideCredentials::ready(self.load())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_profiles() {
        let text = "# comment\n[other]\naws_access_key_id = AKIAOTHER\naws_secret_access_key=x\n\n[default]\naws_access_key_id = AKIADEFAULT\naws_secret_access_key = s3cr3t\naws_session_token = tok\n";
        let c = parse(text, "default").expect("default");
        assert_eq!(
            (c.access_key_id(), c.secret_access_key(), c.session_token()),
            ("AKIADEFAULT", "s3cr3t", Some("tok"))
        );
        assert_eq!(
            parse(text, "other").expect("other").access_key_id(),
            "AKIAOTHER"
        );
        assert!(parse("[default]\naws_access_key_id = AKIA\n", "default").is_err());
        assert!(parse("", "default").is_err());
    }

    #[test]
    fn rereads_on_change_and_keeps_last_good() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("credentials");
        let p = SharedFileCredentials::new(path.clone(), "default".into());
        assert!(p.load().is_err(), "nothing good yet");
        std::fs::write(
            &path,
            "[default]\naws_access_key_id=AKIAONE\naws_secret_access_key=a\n",
        )
        .expect("write");
        assert_eq!(p.load().expect("one").access_key_id(), "AKIAONE");
        std::fs::write(
            &path,
            "[default]\naws_access_key_id=AKIATWOTWO\naws_secret_access_key=b\n",
        )
        .expect("write");
        assert_eq!(p.load().expect("two").access_key_id(), "AKIATWOTWO");
        std::fs::write(&path, "[default]\naws_access_key_id=AKIATHREE").expect("half-written");
        assert_eq!(p.load().expect("kept").access_key_id(), "AKIATWOTWO");
        std::fs::remove_file(&path).expect("remove");
        assert_eq!(p.load().expect("kept").access_key_id(), "AKIATWOTWO");
    }
}
