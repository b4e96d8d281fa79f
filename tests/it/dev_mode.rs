//! `pod-identity-agent dev` end to end, as a person uses it: start it, paste the two exports,
//! and any SDK's default chain gets credentials; minted tokens for other service accounts work;
//! tokens the emulator must refuse are refused with the right status through the agent.
//!
//! It sets the process environment for `aws-config`, so it runs alone in a process of its own
//! (`support::alone`).

use crate::support::process::{agent_command, start_dev};
use crate::support::python::{python_with, run_json, script};
use crate::support::*;
use aws_credential_types::provider::ProvideCredentials;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use pod_identity_agent::emulator::issuer::{Issuer, MintRequest, AUDIENCE};
use serde_json::json;
use std::net::SocketAddr;
use std::time::Duration;

async fn status_and_code(addr: SocketAddr, token: &str) -> (u16, String) {
    let r = get(addr, "/v1/credentials", &[("authorization", token)]).await;
    let code = if r.status == 200 {
        String::new()
    } else {
        r.json()["code"].as_str().unwrap_or_default().to_owned()
    };
    (r.status, code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_mode_serves_sdks_through_the_printed_exports() {
    if !alone("dev_mode::dev_mode_serves_sdks_through_the_printed_exports") {
        return;
    }
    let state = tempfile::tempdir().expect("tempdir");
    let state_arg = state.path().display().to_string();
    let (mut dev, uri, token_file) = start_dev(state.path()).await;
    let token = std::fs::read_to_string(&token_file).expect("token file");
    assert!(
        !token.ends_with('\n'),
        "a trailing newline breaks every SDK"
    );
    let addr: SocketAddr = uri
        .strip_prefix("http://")
        .and_then(|r| r.strip_suffix("/v1/credentials"))
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("unexpected URI {uri}"));

    // The aws-config crate's container provider, configured only by the exports.
    std::env::set_var("AWS_CONTAINER_CREDENTIALS_FULL_URI", &uri);
    std::env::set_var("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", &token_file);
    let creds = aws_config::ecs::EcsCredentialsProvider::builder()
        .build()
        .provide_credentials()
        .await
        .expect("aws-config gets credentials from dev");
    assert!(creds.access_key_id().starts_with("ASIA") && creds.access_key_id().len() == 20);
    assert_eq!(creds.account_id().map(|a| a.as_str()), Some("000000000000"));
    let left = creds
        .expiry()
        .expect("expiry")
        .duration_since(std::time::SystemTime::now())
        .expect("future");
    assert!(left > Duration::from_secs(5 * 3600));

    // boto3's default chain, configured only by the exports.
    if let Some(python) = python_with(&["boto3"]) {
        let got = run_json(script(
            python,
            "boto3_fetch.py",
            &[
                ("AWS_CONTAINER_CREDENTIALS_FULL_URI", uri.clone()),
                ("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", token_file.clone()),
            ],
        ))
        .await;
        assert_eq!(got["method"], "container-role");
        assert_eq!(
            got["access_key"],
            creds.access_key_id(),
            "boto3 gets the cached credentials"
        );
    }

    // A token minted for another service account works.
    let out = agent_command(&[
        "dev",
        "token",
        "-n",
        "team",
        "-s",
        "api",
        "--state-dir",
        &state_arg,
    ])
    .output()
    .await
    .expect("dev token");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let team_file = stdout
        .trim()
        .strip_prefix("export AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE=")
        .expect("export line");
    let team_token = std::fs::read_to_string(team_file).expect("team token");
    let reply = get(addr, "/v1/credentials", &[("authorization", &team_token)]).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_ne!(reply.json()["AccessKeyId"], creds.access_key_id());

    // Tokens the emulator must refuse, through the agent.
    let issuer = Issuer::load_or_create(state.path()).expect("same issuer key");
    let other_dir = tempfile::tempdir().expect("tempdir");
    let stranger = Issuer::load_or_create(other_dir.path()).expect("another key");
    let foreign = stranger
        .mint(&MintRequest::new("default", "default"))
        .expect("mint");
    assert_eq!(
        status_and_code(addr, &foreign).await,
        (400, "InvalidTokenException".into()),
        "signed by another key"
    );

    let parts: Vec<&str> = token.split('.').collect();
    let payload = String::from_utf8(URL_SAFE_NO_PAD.decode(parts[1]).expect("b64")).expect("utf8");
    let forged = URL_SAFE_NO_PAD.encode(payload.replace("\"default\"", "\"kube-system\""));
    let tampered = format!("{}.{forged}.{}", parts[0], parts[2]);
    assert_eq!(
        status_and_code(addr, &tampered).await,
        (400, "InvalidTokenException".into()),
        "tampered payload"
    );

    let mut wrong_aud = MintRequest::new("default", "default");
    wrong_aud.audience = "sts.amazonaws.com".into();
    let wrong = issuer.mint(&wrong_aud).expect("mint");
    assert_eq!(
        status_and_code(addr, &wrong).await,
        (400, "InvalidTokenException".into()),
        "wrong audience"
    );

    // Expired 30 s ago: inside the agent's leeway, so EKS Auth (the emulator) is the one to refuse.
    let now = now_secs();
    let expired = issuer
        .sign(&json!({"iss": Issuer::ISSUER, "aud": [AUDIENCE], "exp": now - 30, "iat": now - 3600, "nbf": now - 3600,
            "sub": "system:serviceaccount:default:default",
            "kubernetes.io": {"namespace": "default", "serviceaccount": {"name": "default"}, "pod": {"name": "p", "uid": "u"}}}))
        .expect("sign");
    assert_eq!(
        status_and_code(addr, &expired).await,
        (400, "ExpiredTokenException".into()),
        "expired"
    );
    // Expired for longer than the leeway: the agent refuses it without asking.
    let long_expired = issuer
        .sign(
            &json!({"iss": Issuer::ISSUER, "aud": [AUDIENCE], "exp": now - 600,
            "kubernetes.io": {"namespace": "default", "serviceaccount": {"name": "default"}}}),
        )
        .expect("sign");
    assert_eq!(
        status_and_code(addr, &long_expired).await,
        (400, "ExpiredToken".into())
    );

    dev.sigterm();
    let status = tokio::time::timeout(Duration::from_secs(10), dev.child.wait())
        .await
        .expect("exits")
        .expect("status");
    assert_eq!(status.code(), Some(0), "{}", dev.stderr.joined());
}
