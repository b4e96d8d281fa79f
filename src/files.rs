//! Files the agent keeps for itself (verification keys, the handover socket's directory), in
//! directories that other processes on the node may be able to reach.
//!
//! Contract: [`private_dir`] makes a directory mode 0700 if missing and refuses one that is not
//! a directory owned by this user (a symlink included), tightening a looser mode. [`write_private`]
//! replaces a file atomically with one only its owner can read: the content goes to a new file
//! opened `O_CREAT|O_EXCL|O_NOFOLLOW` with mode 0600 under a name nobody can have planted, and
//! is renamed over the target, so a planted file or symlink can neither receive the content nor
//! redirect the write, and a crash leaves the old file or the new one, never half of one.
//! [`read_private`] reads a file only if it is a regular file (not a symlink) owned by this user
//! and at most `max` bytes.

use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Make `dir` if needed; refuse it unless it is a directory owned by this user; make it 0700.
pub fn private_dir(dir: &Path) -> Result<(), String> {
    if std::fs::symlink_metadata(dir).is_err() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| e.to_string())?;
    }
    let meta = std::fs::symlink_metadata(dir).map_err(|e| e.to_string())?;
    let me = euid();
    if !meta.is_dir() || meta.uid() != me {
        return Err(format!(
            "not a directory owned by user {me} (owner {}, {})",
            meta.uid(),
            if meta.file_type().is_symlink() {
                "a symlink"
            } else if meta.is_dir() {
                "a directory"
            } else {
                "not a directory"
            }
        ));
    }
    if meta.mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("cannot make it mode 0700: {e}"))?;
    }
    Ok(())
}

/// Replace `path` with `contents`, readable by its owner only (see the module contract).
pub fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(
        ".{name}.{}.{:016x}.tmp",
        std::process::id(),
        fastrand::u64(..)
    ));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)?;
    let written = f
        .write_all(contents)
        .and_then(|()| f.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// `path`'s content if it is a regular file owned by this user of at most `max` bytes;
/// `Ok(None)` if it does not exist.
pub fn read_private(path: &Path, max: u64) -> Result<Option<Vec<u8>>, String> {
    // O_NONBLOCK: a FIFO planted here would otherwise block the open until someone writes to
    // it (it is refused below, as not a regular file); regular files ignore the flag.
    let f = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let meta = f.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() || meta.uid() != euid() {
        return Err(format!(
            "not a regular file owned by user {} (owner {})",
            euid(),
            meta.uid()
        ));
    }
    if meta.len() > max {
        return Err(format!("{} bytes, more than the {max} allowed", meta.len()));
    }
    let mut out = Vec::with_capacity(meta.len() as usize);
    f.take(max + 1)
        .read_to_end(&mut out)
        .map_err(|e| e.to_string())?;
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn planted_files_and_symlinks_get_nothing() {
        let dir = tempfile::tempdir().expect("dir");
        let target = dir.path().join("keys.json");
        let elsewhere = dir.path().join("elsewhere");
        std::fs::write(&elsewhere, "theirs").expect("write");
        // A symlink where the file goes: replaced by a file, the link's target untouched.
        std::os::unix::fs::symlink(&elsewhere, &target).expect("symlink");
        write_private(&target, b"ours").expect("write");
        assert_eq!(std::fs::read(&elsewhere).expect("read"), b"theirs");
        assert_eq!(std::fs::read(&target).expect("read"), b"ours");
        let mode = std::fs::metadata(&target)
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // A symlink is not read.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).expect("symlink");
        assert!(read_private(&link, 100).is_err());
        assert_eq!(
            read_private(&target, 100).expect("read"),
            Some(b"ours".to_vec())
        );
        assert!(read_private(&target, 2).is_err(), "over the size limit");
        assert_eq!(
            read_private(&dir.path().join("none"), 100).expect("ok"),
            None
        );
        // No temporary file is left behind.
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .expect("list")
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(left.is_empty());
    }

    #[test]
    fn a_directory_is_made_private_and_a_symlink_refused() {
        let dir = tempfile::tempdir().expect("dir");
        let d = dir.path().join("state");
        private_dir(&d).expect("made");
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        private_dir(&d).expect("tightened");
        let mode = std::fs::metadata(&d).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&d, &link).expect("symlink");
        assert!(private_dir(&link).is_err());
    }
}
