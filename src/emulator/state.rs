//! The emulator's state directory: where the issuer key and minted tokens live.
//!
//! Contract: the directory is `--state-dir` when given, else `$XDG_CACHE_HOME/pod-identity-agent`,
//! else `$HOME/.cache/pod-identity-agent`. With none of them it is an error asking for
//! `--state-dir`: never the working directory, where a private key would land in whatever
//! checkout the command ran from. Token files are written without a trailing newline (every SDK
//! sends the file's bytes as they are), owner-only, atomically ([`write_private`], which every
//! state file goes through, safe in a directory others can write to).

use super::issuer::{short_id, Issuer, MintRequest};
use std::path::{Path, PathBuf};

/// `$XDG_CACHE_HOME/pod-identity-agent`, or `~/.cache/pod-identity-agent`; `None` without either.
pub fn default_state_dir() -> Option<PathBuf> {
    let nonempty = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    let base = nonempty("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| nonempty("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("pod-identity-agent"))
}

/// The given directory, or the default one, or an error that says how to give one.
pub fn state_dir(given: Option<&Path>) -> Result<PathBuf, String> {
    match given {
        Some(dir) => Ok(dir.to_path_buf()),
        None => default_state_dir().ok_or_else(|| {
            "no state directory: neither HOME nor XDG_CACHE_HOME is set; pass --state-dir DIR \
             (it keeps the emulator's private issuer key)"
                .to_owned()
        }),
    }
}

/// Where `dev token` writes by default: `<ns>_<sa>.jwt` for Pod Identity's audience,
/// `<ns>_<sa>.<audience>.jwt` for another (IRSA's `sts.amazonaws.com`).
pub fn token_path(dir: &Path, namespace: &str, service_account: &str) -> PathBuf {
    token_path_for(dir, namespace, service_account, super::issuer::AUDIENCE)
}

pub fn token_path_for(
    dir: &Path,
    namespace: &str,
    service_account: &str,
    audience: &str,
) -> PathBuf {
    let name = if audience == super::issuer::AUDIENCE {
        format!("{namespace}_{service_account}.jwt")
    } else {
        let safe: String = audience
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        format!("{namespace}_{service_account}.{safe}.jwt")
    };
    dir.join("tokens").join(name)
}

/// An AWS config file with an IRSA profile and one chained from it to `cross_role`.
pub fn chained_profiles(irsa_role: &str, irsa_token: &Path, cross_role: &str) -> String {
    format!(
        "# Written by pod-identity-agent dev. STS is the local emulator: export AWS_ENDPOINT_URL_STS.\n\
         [profile pod-identity-dev-irsa]\n\
         role_arn = {irsa_role}\n\
         web_identity_token_file = {}\n\
         \n\
         [profile pod-identity-dev-cross]\n\
         role_arn = {cross_role}\n\
         source_profile = pod-identity-dev-irsa\n",
        irsa_token.display()
    )
}

/// A kubeconfig for the emulated cluster's API at `server` (HTTPS, its certificate `ca_pem`), whose
/// user runs `aws eks get-token` with STS pointed at the emulator (`sts`) (`AWS_ENDPOINT_URL_STS`,
/// which the AWS CLI honours for the presigned URL and for `--role-arn`'s `AssumeRole`), as `aws
/// eks update-kubeconfig` writes one for a real cluster.
pub fn kubeconfig(cluster: &str, server: &str, sts: &str, ca_pem: &str) -> String {
    use base64::Engine;
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    format!(
        "# Written by pod-identity-agent dev: the emulated cluster {cluster}.\n\
         apiVersion: v1\n\
         kind: Config\n\
         clusters:\n\
         - name: {cluster}\n\
         \x20 cluster:\n\
         \x20   server: {server}\n\
         \x20   certificate-authority-data: {ca}\n\
         contexts:\n\
         - name: {cluster}\n\
         \x20 context:\n\
         \x20   cluster: {cluster}\n\
         \x20   user: {cluster}\n\
         current-context: {cluster}\n\
         users:\n\
         - name: {cluster}\n\
         \x20 user:\n\
         \x20   exec:\n\
         \x20     apiVersion: client.authentication.k8s.io/v1beta1\n\
         \x20     command: aws\n\
         \x20     args: [eks, get-token, --cluster-name, {cluster}, --output, json]\n\
         \x20     env:\n\
         \x20     - name: AWS_ENDPOINT_URL_STS\n\
         \x20       value: {sts}\n\
         \x20     interactiveMode: Never\n"
    )
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

/// Write a file only its owner can read, atomically (a crash leaves no half-written key), safely
/// in a directory others can write to: the bytes go to a fresh temporary file that this call
/// creates itself (a unique name, `O_CREAT|O_EXCL|O_NOFOLLOW`, mode 0600 from the start), so a
/// file or symlink planted in advance can neither receive them nor redirect them; then it is
/// renamed over `path`. Every state file of the emulator is written through here.
pub fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    let (tmp, mut file) = create_private_temp(path)?;
    let written = file
        .write_all(contents.as_bytes())
        .and_then(|_| file.sync_all())
        .and_then(|_| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// A new, empty, owner-only file beside `path`, under a name no one could have chosen for us.
fn create_private_temp(path: &Path) -> std::io::Result<(PathBuf, std::fs::File)> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut last = None;
    for _ in 0..8 {
        let tmp = path.with_file_name(format!(
            ".{name}.{}.{}.tmp",
            std::process::id(),
            short_id(12)
        ));
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.custom_flags(libc::O_NOFOLLOW);
        }
        match opts.open(&tmp) {
            Ok(f) => return Ok((tmp, f)),
            // Someone holds that name (by chance or not): never reuse it, pick another.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no free temporary name")))
}
