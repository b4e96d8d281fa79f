//! What must never land in the repository, and the code paths that once put it there.
//!
//! A private issuer key was once committed at the repository root: a test ran the emulator with
//! no `HOME` and the state directory fell back to the working directory. Now there is no
//! fallback, and the tracked files are scanned for private keys.

use crate::support::process::agent_command;

#[tokio::test]
async fn no_state_dir_is_an_error_not_the_working_directory() {
    let cwd = tempfile::tempdir().expect("tempdir");
    for args in [
        vec!["dev", "token", "-n", "ns", "-s", "sa"],
        vec!["emulate-eks-auth", "--listen", "127.0.0.1:0"],
        vec!["dev", "--port", "0"],
    ] {
        // agent_command clears the environment: no HOME, no XDG_CACHE_HOME.
        let mut cmd = agent_command(&args);
        cmd.current_dir(cwd.path());
        let out = cmd.output().await.expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        let last = err.lines().last().unwrap_or_default();
        assert!(
            last.contains("no state directory") && last.contains("--state-dir"),
            "{args:?}: {last}"
        );
        let left: Vec<_> = std::fs::read_dir(cwd.path())
            .expect("read")
            .flatten()
            .map(|e| e.path())
            .collect();
        assert!(
            left.is_empty(),
            "{args:?} wrote into the working directory: {left:?}"
        );
    }
}

#[test]
fn no_tracked_file_holds_a_private_key() {
    let root = env!("CARGO_MANIFEST_DIR");
    let Ok(out) = std::process::Command::new("git")
        .args(["-C", root, "ls-files", "-z"])
        .output()
    else {
        eprintln!("SKIPPED: git not available");
        return;
    };
    if !out.status.success() {
        eprintln!("SKIPPED: not a git checkout");
        return;
    }
    let files: Vec<String> = out
        .stdout
        .split(|b| *b == 0)
        .filter(|f| !f.is_empty())
        .map(|f| String::from_utf8_lossy(f).into_owned())
        .collect();
    assert!(files.len() > 20, "{files:?}");
    for f in files {
        let path = std::path::Path::new(root).join(&f);
        let Ok(bytes) = std::fs::read(&path) else {
            continue; // deleted in the working tree
        };
        assert!(
            !holds_pem_private_key(&String::from_utf8_lossy(&bytes)),
            "{f} holds a private key"
        );
        assert!(
            !f.ends_with(".pem") && !f.ends_with(".key"),
            "{f}: key files do not belong in the repository"
        );
    }
}

/// A PEM private-key header followed by a line of base64: a key, not code that names the header.
fn holds_pem_private_key(text: &str) -> bool {
    // Assembled so that this file does not name the header itself.
    let header = format!("PRIVATE {}-----", "KEY");
    text.match_indices(&header).any(|(at, _)| {
        let after = &text[at + header.len()..];
        let Some(body) = after
            .strip_prefix("\r\n")
            .or_else(|| after.strip_prefix('\n'))
        else {
            return false;
        };
        let line: String = body.chars().take_while(|c| *c != '\n').collect();
        line.trim_end().len() >= 40
            && line
                .trim_end()
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '/' | '='))
    })
}

#[test]
fn the_key_detector_finds_keys() {
    let header = format!("-----BEGIN PRIVATE {}-----", "KEY");
    let key = format!("{header}\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7\n-----END");
    assert!(holds_pem_private_key(&key));
    assert!(!holds_pem_private_key(&format!(
        "const PEM_BEGIN: &str = \"{header}\";"
    )));
}
