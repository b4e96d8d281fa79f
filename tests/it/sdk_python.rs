//! Acceptance through boto3: a real Python SDK resolves credentials from the agent through its
//! default chain, with every other source disabled.

use crate::support::python::{python_with, run_json, script};
use crate::support::*;
use sha2::{Digest, Sha256};

fn hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boto3_default_chain_gets_credentials() {
    let Some(python) = python_with(&["boto3"]) else {
        return;
    };
    let h = Harness::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, token()).expect("token");
    let got = run_json(script(
        python,
        "boto3_fetch.py",
        &[
            (
                "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                format!("http://{}/v1/credentials", h.addr()),
            ),
            (
                "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
                token_file.display().to_string(),
            ),
        ],
    ))
    .await;
    assert_eq!(got["method"], "container-role");
    assert_eq!(got["access_key"], "ASIAEXAMPLE0001");
    assert_eq!(
        got["secret_sha256"],
        hex(b"wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLE0001")
    );
    assert_eq!(h.fake.calls(), 1);
}
