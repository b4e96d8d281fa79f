//! The emulator's state directory: where the issuer key and minted tokens live.
//!
//! Contract: the directory is `--state-dir` when given, else `$XDG_CACHE_HOME/pod-identity-agent`,
//! else `$HOME/.cache/pod-identity-agent`. Token files are written without a trailing newline
//! (every SDK sends the file's bytes as they are), owner-only, atomically.

use super::issuer::{write_private, Issuer, MintRequest};
use std::path::{Path, PathBuf};

/// `~/.cache/pod-identity-agent` (or `$XDG_CACHE_HOME/pod-identity-agent`).
pub fn default_state_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("pod-identity-agent")
}

/// The given directory, or the default one.
pub fn state_dir(given: Option<&Path>) -> PathBuf {
    given
        .map(Path::to_path_buf)
        .unwrap_or_else(default_state_dir)
}

/// Where `dev token` writes by default.
pub fn token_path(dir: &Path, namespace: &str, service_account: &str) -> PathBuf {
    dir.join("tokens")
        .join(format!("{namespace}_{service_account}.jwt"))
}

/// Mint a token and write it to `path`.
pub fn mint_to(issuer: &Issuer, req: &MintRequest, path: &Path) -> Result<(), String> {
    let token = issuer.mint(req).map_err(|e| e.to_string())?;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    }
    write_private(path, &token).map_err(|e| format!("cannot write {}: {e}", path.display()))
}
