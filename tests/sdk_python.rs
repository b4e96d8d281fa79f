//! Acceptance through boto3: a real Python SDK resolves credentials from the agent through its
//! default chain, with every other source disabled.
//!
//! boto3 must be installed (`.ci/run` installs it). Without it the test fails when
//! `PIA_REQUIRE_SDKS=1` (CI) and is skipped with a message otherwise.

mod support;

use sha2::{Digest, Sha256};
use std::process::Command;
use support::*;

fn python_with_boto3() -> Option<String> {
    let ok = Command::new("python3")
        .args(["-c", "import boto3"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if ok {
        return Some("python3".into());
    }
    assert!(
        std::env::var("PIA_REQUIRE_SDKS").as_deref() != Ok("1"),
        "boto3 is required (PIA_REQUIRE_SDKS=1) but not importable"
    );
    eprintln!("SKIPPED: boto3 is not installed (pip install boto3)");
    None
}

fn hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boto3_default_chain_gets_credentials() {
    let Some(python) = python_with_boto3() else {
        return;
    };
    let h = Harness::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, token()).expect("token");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/boto3_fetch.py");
    let uri = format!("http://{}/v1/credentials", h.addr());
    let token_path = token_file.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(script)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", "/nonexistent")
            .env("AWS_CONFIG_FILE", "/dev/null")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("AWS_CONTAINER_CREDENTIALS_FULL_URI", uri)
            .env("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", token_path)
            .output()
    })
    .await
    .expect("join")
    .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "boto3 failed: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON line");
    assert_eq!(got["method"], "container-role");
    assert_eq!(got["access_key"], "ASIAEXAMPLE0001");
    let secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLE0001";
    assert_eq!(got["secret_sha256"], hex(secret.as_bytes()));
    assert_eq!(h.fake.calls(), 1);
}
