//! IRSA and role chaining locally (issue 10), through boto3's own credential providers: the
//! emulator as OIDC issuer and STS, with a trust table. An IRSA-configured client gets the role;
//! a profile chained to a second account's role through `source_profile` gets that role; forged
//! tokens, wrong audiences, roles the trust table does not allow, a wrong external id and a
//! chained session over an hour are each refused with STS's error code.

use crate::support::process::{agent_command, spawn, Spawned};
use crate::support::python::{python_with, run_json, script};
use crate::support::*;
use pod_identity_agent::emulator::issuer::{Issuer, MintRequest};
use serde_json::json;
use std::path::Path;

const TRUST: &str = "associations:
  - namespace: default
    serviceAccount: app
    roleArn: arn:aws:iam::111122223333:role/app
irsa:
  - namespace: default
    serviceAccount: app
    roleArn: arn:aws:iam::111122223333:role/app
roles:
  - roleArn: arn:aws:iam::444455556666:role/cross
    trustedBy: [arn:aws:iam::111122223333:role/app]
    externalId: shared-1
  - roleArn: arn:aws:iam::444455556666:role/open
    trustedBy: [arn:aws:iam::111122223333:root]
";

/// `emulate-eks-auth` with `TRUST`; its URL.
async fn emulator(state: &Path) -> (Spawned, String) {
    let assoc = state.join("trust.yaml");
    std::fs::write(&assoc, TRUST).expect("write");
    let emu = spawn(agent_command(&[
        "emulate-eks-auth",
        "--listen",
        "127.0.0.1:0",
        "--state-dir",
        &state.display().to_string(),
        "--associations",
        &assoc.display().to_string(),
    ]));
    let url = emu.export("AWS_ENDPOINT_URL_STS").await;
    (emu, url)
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    path.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boto3_irsa_and_chained_profiles_against_the_emulator() {
    let Some(python) = python_with(&["boto3"]) else {
        return;
    };
    let state = tempfile::tempdir().expect("tempdir");
    let (emu, url) = emulator(state.path()).await;
    let issuer = Issuer::load_or_create(state.path()).expect("the emulator's issuer");
    let sts_token = |ns: &str, sa: &str| {
        let mut r = MintRequest::new(ns, sa);
        r.audience = "sts.amazonaws.com".into();
        issuer.mint(&r).expect("mint")
    };
    let dir = state.path();
    let good = write(dir, "good.jwt", &sts_token("default", "app"));
    let stranger_dir = tempfile::tempdir().expect("tempdir");
    let stranger = Issuer::load_or_create(stranger_dir.path()).expect("another issuer");
    let mut forged_req = MintRequest::new("default", "app");
    forged_req.audience = "sts.amazonaws.com".into();
    let forged = write(
        dir,
        "forged.jwt",
        &stranger.mint(&forged_req).expect("mint"),
    );
    let pods_audience = write(
        dir,
        "pods.jwt",
        &issuer
            .mint(&MintRequest::new("default", "app"))
            .expect("mint"),
    );
    let now = now_secs();
    let expired = write(
        dir,
        "expired.jwt",
        &issuer
            .sign(
                &json!({"iss": Issuer::ISSUER, "aud": ["sts.amazonaws.com"], "exp": now - 10,
                "sub": "system:serviceaccount:default:app",
                "kubernetes.io": {"namespace": "default", "serviceaccount": {"name": "app"}}}),
            )
            .expect("sign"),
    );
    let config = write(
        dir,
        "config",
        &format!(
            "[profile irsa]\nrole_arn = arn:aws:iam::111122223333:role/app\nweb_identity_token_file = {good}\n\n\
             [profile cross]\nrole_arn = arn:aws:iam::444455556666:role/cross\nsource_profile = irsa\nexternal_id = shared-1\n\n\
             [profile open]\nrole_arn = arn:aws:iam::444455556666:role/open\nsource_profile = irsa\n\n\
             [profile locked]\nrole_arn = arn:aws:iam::444455556666:role/locked\nsource_profile = irsa\n\n\
             [profile wrong_external_id]\nrole_arn = arn:aws:iam::444455556666:role/cross\nsource_profile = irsa\nexternal_id = guessed\n\n\
             [profile too_long]\nrole_arn = arn:aws:iam::444455556666:role/cross\nsource_profile = irsa\nexternal_id = shared-1\nduration_seconds = 7200\n"
        ),
    );
    let irsa = |token: &str, role: &str| json!({"env": {"AWS_ROLE_ARN": role, "AWS_WEB_IDENTITY_TOKEN_FILE": token}});
    let app = "arn:aws:iam::111122223333:role/app";
    let profile = |name: &str| json!({"env": {"AWS_CONFIG_FILE": config}, "profile": name});
    let cases = json!({
        "irsa": irsa(&good, app),
        "chained": profile("cross"),
        "chained_by_account_trust": profile("open"),
        "forged_token": irsa(&forged, app),
        "wrong_audience": irsa(&pods_audience, app),
        "expired_token": irsa(&expired, app),
        "role_not_granted": irsa(&good, "arn:aws:iam::111122223333:role/admin"),
        "role_not_trusting": profile("locked"),
        "wrong_external_id": profile("wrong_external_id"),
        "chained_over_an_hour": profile("too_long"),
        "wrong_secret": {"env": {"AWS_ROLE_ARN": app, "AWS_WEB_IDENTITY_TOKEN_FILE": good}, "tamper": "secret"},
        "unknown_key": {"env": {"AWS_ROLE_ARN": app, "AWS_WEB_IDENTITY_TOKEN_FILE": good}, "tamper": "key"},
        "wrong_session_token": {"env": {"AWS_ROLE_ARN": app, "AWS_WEB_IDENTITY_TOKEN_FILE": good}, "tamper": "token"},
    });
    let got = run_json(script(
        python,
        "boto3_sts.py",
        &[
            ("CASES", cases.to_string()),
            ("AWS_ENDPOINT_URL_STS", url),
            ("AWS_DEFAULT_REGION", "us-east-1".into()),
        ],
    ))
    .await;

    let arn = |case: &str| got[case]["arn"].as_str().unwrap_or_default().to_owned();
    assert_eq!(got["irsa"]["ok"], true, "{got}");
    assert!(
        arn("irsa").starts_with("arn:aws:sts::111122223333:assumed-role/app/"),
        "{got}"
    );
    assert_eq!(got["chained"]["ok"], true, "{got}");
    assert!(
        arn("chained").starts_with("arn:aws:sts::444455556666:assumed-role/cross/"),
        "{got}"
    );
    assert_eq!(got["chained"]["account"], "444455556666");
    assert!(
        arn("chained_by_account_trust").starts_with("arn:aws:sts::444455556666:assumed-role/open/"),
        "{got}"
    );
    for (case, code) in [
        ("forged_token", "InvalidIdentityToken"),
        ("wrong_audience", "InvalidIdentityToken"),
        ("expired_token", "ExpiredTokenException"),
        ("role_not_granted", "AccessDenied"),
        ("role_not_trusting", "AccessDenied"),
        ("wrong_external_id", "AccessDenied"),
        ("chained_over_an_hour", "ValidationError"),
        ("wrong_secret", "SignatureDoesNotMatch"),
        ("unknown_key", "InvalidClientTokenId"),
        ("wrong_session_token", "InvalidClientTokenId"),
    ] {
        let c = &got[case];
        assert_eq!(c["ok"], false, "{case}: {c}");
        let says = format!("{} {}", c["code"], c["error"]);
        assert!(says.contains(code), "{case}: wanted {code}, got {says}");
    }
    // The chain really went through a signed AssumeRole by the IRSA session.
    let logs = emu.stderr.joined();
    assert!(
        logs.contains("emulated STS: AssumeRole")
            && logs.contains("caller=arn:aws:sts::111122223333:assumed-role/app/"),
        "{logs}"
    );
}
