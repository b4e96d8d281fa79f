//! Acceptance through a real SDK client: `aws-config`'s container credential provider, the one
//! every Rust AWS SDK uses in a pod, configured only by the two environment variables EKS sets.
//!
//! It sets the process environment, which the provider reads, so it runs alone in a process of
//! its own (`support::alone`).

use crate::support::*;
use aws_credential_types::provider::ProvideCredentials;
use std::time::{Duration, SystemTime};

#[tokio::test]
async fn aws_config_container_provider_gets_credentials() {
    if !alone("sdk_rust::aws_config_container_provider_gets_credentials") {
        return;
    }
    let h = Harness::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("eks-pod-identity-token");
    let first = token();
    std::fs::write(&token_file, &first).expect("write token (no trailing newline)");
    std::env::set_var(
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        format!("http://{}/v1/credentials", h.addr()),
    );
    std::env::set_var("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", &token_file);

    let provider = aws_config::ecs::EcsCredentialsProvider::builder().build();
    let creds = provider
        .provide_credentials()
        .await
        .expect("credentials from the agent");
    assert_eq!(creds.access_key_id(), "ASIAEXAMPLE0001");
    assert!(creds
        .secret_access_key()
        .starts_with("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLE"));
    assert!(creds
        .session_token()
        .is_some_and(|t| t.starts_with("IQoJb3JpZ2luX2Vj")));
    assert_eq!(creds.account_id().map(|a| a.as_str()), Some("111122223333"));
    let left = creds
        .expiry()
        .expect("expiry")
        .duration_since(SystemTime::now())
        .expect("future");
    assert!(left > Duration::from_secs(5 * 3600), "{left:?}");
    assert_eq!(
        h.fake.tokens(),
        vec![first.clone()],
        "the token went to EKS Auth unchanged"
    );

    // kubelet rotates the token file: the SDK re-reads it and the agent exchanges the new token.
    let second = token();
    std::fs::write(&token_file, &second).expect("rotate token");
    let creds = provider
        .provide_credentials()
        .await
        .expect("credentials for the rotated token");
    assert_eq!(creds.access_key_id(), "ASIAEXAMPLE0002");
    assert_eq!(h.fake.tokens(), vec![first, second]);

    // An error answer reaches the SDK as an error, not as garbage credentials.
    h.fake.respond_with("error-resource-not-found");
    std::fs::write(&token_file, token()).expect("third token");
    let err = provider
        .provide_credentials()
        .await
        .expect_err("no association");
    let shown = format!("{err:?}");
    assert!(
        shown.contains("ResourceNotFoundException") || shown.contains("404"),
        "{shown}"
    );
}
