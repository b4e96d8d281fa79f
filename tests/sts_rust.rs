//! IRSA, role chaining and Pod Identity through the Rust SDK's own credential chain, against
//! `dev`'s emulator: `aws-config` with `AWS_ROLE_ARN` + `AWS_WEB_IDENTITY_TOKEN_FILE` (its web
//! identity provider), a profile chained through `source_profile`, and the container provider,
//! each followed by `GetCallerIdentity` naming the role.
//!
//! One test per process (this file): it sets the process environment `aws-config` reads.

mod support;

use std::time::Duration;
use support::process::{agent_command, spawn};

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
