//! Running real Python AWS clients (boto3, moto) from tests.
//!
//! A missing package fails the test when `PIA_REQUIRE_SDKS=1` (CI installs them) and skips it
//! with a message otherwise, so a developer without them still gets a green `cargo test`.

use std::process::Command;

/// `python3` if it can import every module, else `None` (or a panic under PIA_REQUIRE_SDKS=1).
pub fn python_with(modules: &[&str]) -> Option<&'static str> {
    let import = format!("import {}", modules.join(", "));
    let ok = Command::new("python3")
        .args(["-c", &import])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if ok {
        return Some("python3");
    }
    assert!(
        std::env::var("PIA_REQUIRE_SDKS").as_deref() != Ok("1"),
        "{modules:?} required (PIA_REQUIRE_SDKS=1) but not importable"
    );
    eprintln!("SKIPPED: python3 cannot import {modules:?} (pip install them, as .ci/run does)");
    None
}

/// A Python script from tests/sdk with an environment that has no AWS credentials, profiles or
/// instance metadata, plus `env`.
pub fn script(python: &str, name: &str, env: &[(&str, String)]) -> Command {
    let mut c = Command::new(python);
    c.arg(format!("{}/tests/sdk/{name}", env!("CARGO_MANIFEST_DIR")))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", "/nonexistent")
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .env("AWS_EC2_METADATA_DISABLED", "true");
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

/// Run a script off the async runtime; return its stdout parsed as one JSON document.
pub async fn run_json(mut cmd: Command) -> serde_json::Value {
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .expect("join")
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "python failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

/// `cmd` (program, arguments and environment) run inside network namespace `ns` instead.
pub fn in_netns(ns: &str, cmd: &Command) -> Command {
    let mut wrapped = Command::new("ip");
    wrapped
        .args(["netns", "exec", ns])
        .arg(cmd.get_program())
        .args(cmd.get_args())
        .env_clear()
        .envs(
            cmd.get_envs()
                .filter_map(|(k, v)| Some((k.to_owned(), v?.to_owned()))),
        );
    wrapped
}
