//! IRSA, role chaining and Pod Identity through the Rust SDK's own credential chain, against
//! `dev`'s emulator: `aws-config` with `AWS_ROLE_ARN` + `AWS_WEB_IDENTITY_TOKEN_FILE` (its web
//! identity provider), a profile chained through `source_profile`, and the container provider,
//! each followed by `GetCallerIdentity` naming the role.
//!
//! The first test sets the process environment `aws-config` reads, so it runs alone in a process
//! of its own (`support::alone`); the second reads none of it.

use crate::support;
use crate::support::process::{agent_command, spawn, start_dev};
use std::time::Duration;

/// Who STS (the emulator) says these credentials are.
async fn caller_arn() -> Result<String, String> {
    let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .load()
        .await;
    let out = aws_sdk_sts::Client::new(&sdk)
        .get_caller_identity()
        .send()
        .await
        .map_err(|e| format!("{e:?}"))?;
    Ok(out.arn().unwrap_or_default().to_owned())
}

/// Only `vars` (and the emulator's STS endpoint) from here on: no key from the developer's shell.
fn aws_env(sts: &str, vars: &[(&str, &dyn AsRef<std::ffi::OsStr>)]) {
    clear_aws_env();
    std::env::set_var("AWS_ENDPOINT_URL_STS", sts);
    for (k, v) in vars {
        std::env::set_var(k, v.as_ref());
    }
}

fn clear_aws_env() {
    for (k, _) in std::env::vars() {
        if k.starts_with("AWS_") {
            std::env::remove_var(k);
        }
    }
    std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
    std::env::set_var("AWS_SHARED_CREDENTIALS_FILE", "/dev/null");
    std::env::set_var("AWS_CONFIG_FILE", "/dev/null");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_sdk_irsa_chaining_and_pod_identity_name_their_roles() {
    if !support::alone("sts_rust::rust_sdk_irsa_chaining_and_pod_identity_name_their_roles") {
        return;
    }
    let state = tempfile::tempdir().expect("tempdir");
    let config = state.path().join("aws-config");
    let mut dev = spawn(agent_command(&[
        "dev",
        "--port",
        "0",
        "--state-dir",
        &state.path().display().to_string(),
        "--aws-config",
        &config.display().to_string(),
    ]));
    let sts = dev.export("AWS_ENDPOINT_URL_STS").await;
    let uri = dev.export("AWS_CONTAINER_CREDENTIALS_FULL_URI").await;
    let token_file = dev.export("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE").await;
    let irsa_token = dev
        .stdout
        .find(|l| {
            l.strip_prefix("#   export AWS_WEB_IDENTITY_TOKEN_FILE=")
                .map(str::to_owned)
        })
        .await;
    let role = dev
        .stdout
        .find(|l| {
            l.strip_prefix("#   export AWS_ROLE_ARN=")
                .map(str::to_owned)
        })
        .await;

    // IRSA, as EKS's webhook sets it up: the web identity provider calls AssumeRoleWithWebIdentity.
    aws_env(
        &sts,
        &[
            ("AWS_ROLE_ARN", &role),
            ("AWS_WEB_IDENTITY_TOKEN_FILE", &irsa_token),
        ],
    );
    let arn = caller_arn().await.expect("IRSA credentials");
    assert!(
        arn.starts_with("arn:aws:sts::000000000000:assumed-role/default-default/"),
        "{arn}"
    );

    // The profile `dev --aws-config` wrote: chained from the IRSA one to another account's role.
    aws_env(
        &sts,
        &[
            ("AWS_CONFIG_FILE", &config),
            ("AWS_PROFILE", &"pod-identity-dev-cross"),
        ],
    );
    let arn = caller_arn().await.expect("chained credentials");
    assert!(
        arn.starts_with("arn:aws:sts::444455556666:assumed-role/cross-account/"),
        "{arn}"
    );

    // Pod Identity through the agent; the emulator knows the credentials it issued.
    aws_env(
        &sts,
        &[
            ("AWS_CONTAINER_CREDENTIALS_FULL_URI", &uri),
            ("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", &token_file),
        ],
    );
    let arn = caller_arn().await.expect("Pod Identity credentials");
    assert!(
        arn.starts_with("arn:aws:sts::000000000000:assumed-role/default-default/eks-dev-"),
        "{arn}"
    );

    // A token the issuer did not sign is refused with STS's code.
    aws_env(&sts, &[("AWS_ROLE_ARN", &role)]);
    let forged = state.path().join("forged.jwt");
    let real = std::fs::read_to_string(&irsa_token).expect("token");
    let (head, rest) = real.split_once('.').expect("jwt");
    let (payload, _) = rest.split_once('.').expect("jwt");
    std::fs::write(&forged, format!("{head}.{payload}.c2lnbmF0dXJl")).expect("write");
    std::env::set_var("AWS_WEB_IDENTITY_TOKEN_FILE", &forged);
    let err = caller_arn().await.expect_err("forged token");
    assert!(err.contains("InvalidIdentityToken"), "{err}");

    dev.sigterm();
    let _ = tokio::time::timeout(Duration::from_secs(10), dev.child.wait()).await;
}

/// `GetCallerIdentity` with explicit credentials and endpoint, reading nothing from the
/// environment.
async fn identity_of(endpoint: &str, creds: &serde_json::Value) -> Result<String, String> {
    let field = |k: &str| creds[k].as_str().unwrap_or_default().to_owned();
    let config = aws_sdk_sts::Config::builder()
        .behavior_version(aws_sdk_sts::config::BehaviorVersion::latest())
        .region(aws_sdk_sts::config::Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .credentials_provider(aws_sdk_sts::config::Credentials::new(
            field("AccessKeyId"),
            field("SecretAccessKey"),
            Some(field("Token")),
            None,
            "test",
        ))
        .build();
    aws_sdk_sts::Client::from_conf(config)
        .get_caller_identity()
        .send()
        .await
        .map(|out| out.arn().unwrap_or_default().to_owned())
        .map_err(|e| {
            use aws_sdk_sts::error::ProvideErrorMetadata;
            e.code().unwrap_or("no code").to_owned()
        })
}

/// The AWS CLI caches assumed-role credentials on disk, so a developer restarting `dev` keeps
/// using them: like AWS, the emulator must still know them, with no memory of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issued_credentials_survive_a_restart_with_the_same_state_dir_only() {
    let state = tempfile::tempdir().expect("tempdir");
    let (mut dev, uri, token_file) = start_dev(state.path()).await;
    let sts = dev.export("AWS_ENDPOINT_URL_STS").await;
    let token = std::fs::read_to_string(&token_file).expect("token");
    let addr = uri
        .trim_start_matches("http://")
        .trim_end_matches("/v1/credentials")
        .parse()
        .expect("addr");
    let creds = support::get(addr, "/v1/credentials", &[("authorization", &token)])
        .await
        .json();
    let before = identity_of(&sts, &creds).await.expect("known");
    assert!(
        before.contains(":assumed-role/default-default/"),
        "{before}"
    );
    dev.sigterm();
    let _ = dev.child.wait().await;

    let (mut again, _, _) = start_dev(state.path()).await;
    let sts_again = again.export("AWS_ENDPOINT_URL_STS").await;
    assert_ne!(sts, sts_again, "a new process on a new port");
    assert_eq!(identity_of(&sts_again, &creds).await, Ok(before));
    again.sigterm();
    let _ = again.child.wait().await;

    // Another state dir is another issuer key: the credentials mean nothing there.
    let other = tempfile::tempdir().expect("tempdir");
    let (mut stranger, _, _) = start_dev(other.path()).await;
    let sts_other = stranger.export("AWS_ENDPOINT_URL_STS").await;
    assert_eq!(
        identity_of(&sts_other, &creds).await,
        Err("InvalidClientTokenId".to_owned())
    );
    stranger.sigterm();
    let _ = stranger.child.wait().await;
}
