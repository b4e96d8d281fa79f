//! `emulate-eks-auth` as other projects use it: boto3's own `eks-auth` client against it
//! (success and every error it produces), `--from-cluster` against a fake EKS API, and the `sts`
//! credential source against moto's STS with the session tags checked on the wire.

use crate::support;
use crate::support::process::{agent_command, spawn, Spawned};
use crate::support::python::{python_with, run_json, script};
use crate::support::*;
use pod_identity_agent::eks_auth::{
    CredentialSource, EksAuthClient, ExchangeError, ExchangeSettings,
};
use pod_identity_agent::emulator::issuer::{Issuer, MintRequest, AUDIENCE};
use pod_identity_agent::token::Token;
use serde_json::json;
use std::net::SocketAddr;
use std::time::Duration;

const ASSOCIATIONS: &str = "associations:
  - namespace: default
    serviceAccount: app
    roleArn: arn:aws:iam::111122223333:role/app
  - namespace: default
    serviceAccount: cross
    roleArn: arn:aws:iam::111122223333:role/source
    targetRoleArn: arn:aws:iam::444455556666:role/target
";

/// Start `emulate-eks-auth` on a free loopback port; return it and its URL.
async fn emulate(args: &[&str], env: &[(&str, String)]) -> (Spawned, String) {
    let mut full = vec!["emulate-eks-auth", "--listen", "127.0.0.1:0"];
    full.extend_from_slice(args);
    let mut cmd = agent_command(&full);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let emu = spawn(cmd);
    let url = emu.export("AWS_ENDPOINT_URL_EKS_AUTH").await;
    (emu, url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boto3_eks_auth_client_gets_each_answer() {
    let Some(python) = python_with(&["boto3"]) else {
        return;
    };
    let state = tempfile::tempdir().expect("tempdir");
    let assoc = state.path().join("associations.yaml");
    std::fs::write(&assoc, ASSOCIATIONS).expect("write");
    let issuer = Issuer::load_or_create(state.path()).expect("issuer");
    let (_emu, url) = emulate(
        &[
            "--state-dir",
            &state.path().display().to_string(),
            "--associations",
            &assoc.display().to_string(),
        ],
        &[],
    )
    .await;

    let stranger_dir = tempfile::tempdir().expect("tempdir");
    let stranger = Issuer::load_or_create(stranger_dir.path()).expect("issuer");
    let now = now_secs();
    let mint = |ns: &str, sa: &str| issuer.mint(&MintRequest::new(ns, sa)).expect("mint");
    let cases = json!({
        "app": {"token": mint("default", "app")},
        "cross": {"token": mint("default", "cross")},
        "no_association": {"token": mint("default", "nobody")},
        "foreign_key": {"token": stranger.mint(&MintRequest::new("default", "app")).expect("mint")},
        "expired": {"token": issuer.sign(&json!({"iss": Issuer::ISSUER, "aud": AUDIENCE, "exp": now - 5,
            "kubernetes.io": {"namespace": "default", "serviceaccount": {"name": "app"}}})).expect("sign")},
        "wrong_audience": {"token": issuer.mint(&MintRequest { audience: "sts.amazonaws.com".into(), ..MintRequest::new("default", "app") }).expect("mint")},
        "unsigned": {"token": mint("default", "app"), "signed": false},
    });
    let got = run_json(script(
        python,
        "boto3_eks_auth.py",
        &[
            ("EMULATOR", url),
            ("CLUSTER", CLUSTER.into()),
            ("CASES", cases.to_string()),
        ],
    ))
    .await;

    let app = &got["app"];
    assert_eq!(app["ok"], true, "{got}");
    assert!(app["access_key"]
        .as_str()
        .is_some_and(|k| k.starts_with("ASIA") && k.len() == 20));
    assert_eq!(
        (
            app["has_secret"].as_bool(),
            app["has_session_token"].as_bool()
        ),
        (Some(true), Some(true))
    );
    assert_eq!(
        (app["namespace"].as_str(), app["service_account"].as_str()),
        (Some("default"), Some("app"))
    );
    assert_eq!(app["audience"], AUDIENCE);
    assert!(app["role_arn"]
        .as_str()
        .is_some_and(|a| a.starts_with("arn:aws:sts::111122223333:assumed-role/app/eks-")));
    assert!(app["association_id"]
        .as_str()
        .is_some_and(|a| a.starts_with("a-")));
    let six_hours = app["lifetime_s"].as_f64().unwrap_or(0.0);
    assert!((21500.0..=21600.0).contains(&six_hours), "{six_hours}");
    // A target role: EKS chains it itself and its credentials last 59 minutes.
    let cross = &got["cross"];
    assert!(
        cross["role_arn"]
            .as_str()
            .is_some_and(|a| a.starts_with("arn:aws:sts::444455556666:assumed-role/target/")),
        "{cross}"
    );
    let fifty_nine = cross["lifetime_s"].as_f64().unwrap_or(0.0);
    assert!((3440.0..=3540.0).contains(&fifty_nine), "{fifty_nine}");

    for (case, code, status) in [
        ("no_association", "ResourceNotFoundException", 404),
        ("foreign_key", "InvalidTokenException", 400),
        ("expired", "ExpiredTokenException", 400),
        ("wrong_audience", "InvalidTokenException", 400),
        ("unsigned", "AccessDeniedException", 400),
    ] {
        assert_eq!(got[case]["ok"], false, "{case}: {}", got[case]);
        assert_eq!(got[case]["code"], code, "{case}");
        assert_eq!(got[case]["status"], status, "{case}");
    }
}

#[tokio::test]
async fn from_cluster_imports_the_association_table() {
    let (eks, hits) = support::fake_eks_api::start().await;
    let state = tempfile::tempdir().expect("tempdir");
    let issuer = Issuer::load_or_create(state.path()).expect("issuer");
    let (_emu, url) = emulate(
        &[
            "--state-dir",
            &state.path().display().to_string(),
            "--from-cluster",
            "prod",
        ],
        &[("AWS_ENDPOINT_URL_EKS", format!("http://{eks}"))],
    )
    .await;
    assert_eq!(
        hits.load(std::sync::atomic::Ordering::SeqCst),
        4,
        "two list pages and two describes"
    );

    // Exchange with the real EKS Auth SDK client against the emulator.
    let mut settings = ExchangeSettings::new("prod");
    settings.endpoint = Some(url);
    let client = EksAuthClient::new(&sdk_config().await, &settings);
    let exchange = |ns: &str, sa: &str| {
        let t = Token::parse(
            issuer
                .mint(&MintRequest::new(ns, sa))
                .expect("mint")
                .as_bytes(),
        )
        .expect("parse");
        client.fetch(&t)
    };
    let api = exchange("payments", "api")
        .await
        .expect("imported association");
    let body: serde_json::Value = serde_json::from_slice(api.credentials.body()).expect("json");
    assert_eq!(body["AccountId"], "111122223333");
    // Who the answer says the credentials are for: what the audit line reports.
    assert!(
        api.identity
            .assumed_role_arn
            .starts_with("arn:aws:sts::111122223333:assumed-role/"),
        "{:?}",
        api.identity
    );
    assert!(
        api.identity
            .association_arn
            .contains(&api.identity.association_id)
            && !api.identity.association_id.is_empty(),
        "{:?}",
        api.identity
    );
    // The second page's association, with its target role and 59-minute lifetime.
    let reporter = exchange("batch", "reporter")
        .await
        .expect("second page imported");
    let body: serde_json::Value =
        serde_json::from_slice(reporter.credentials.body()).expect("json");
    assert_eq!(body["AccountId"], "444455556666");
    let left = reporter.credentials.remaining(std::time::SystemTime::now());
    assert!(
        left <= Duration::from_secs(59 * 60) && left > Duration::from_secs(57 * 60),
        "{left:?}"
    );
    match exchange("default", "default").await {
        Err(ExchangeError::Service {
            status: 404, code, ..
        }) => assert_eq!(code, "ResourceNotFoundException"),
        other => panic!("not imported, must be 404: {other:?}"),
    }
}

#[tokio::test]
async fn from_cluster_failure_is_a_clear_error() {
    let state = tempfile::tempdir().expect("tempdir");
    let state_arg = state.path().display().to_string();
    let mut cmd = agent_command(&[
        "emulate-eks-auth",
        "--listen",
        "127.0.0.1:0",
        "--state-dir",
        &state_arg,
        "--from-cluster",
        "missing",
    ]);
    cmd.env("AWS_ENDPOINT_URL_EKS", "http://127.0.0.1:9");
    let out = cmd.output().await.expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.lines()
            .last()
            .unwrap_or_default()
            .contains("ListPodIdentityAssociations for cluster missing failed"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sts_source_assumes_roles_in_moto_with_session_tags() {
    let Some(python) = python_with(&["moto.server", "flask"]) else {
        return;
    };
    let port = free_port();
    let mut moto = tokio::process::Command::new(python)
        .args([
            "-m",
            "moto.server",
            "-H",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start moto");
    let moto_addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(moto_addr).await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "moto did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (proxy, seen) = support::recording_proxy::start(moto_addr).await;

    let state = tempfile::tempdir().expect("tempdir");
    let assoc = state.path().join("associations.yaml");
    std::fs::write(
        &assoc,
        "associations:\n  - namespace: default\n    serviceAccount: default\n    roleArn: arn:aws:iam::123456789012:role/app\n    targetRoleArn: arn:aws:iam::123456789012:role/target\n",
    )
    .expect("write");
    let mut cmd = agent_command(&[
        "dev",
        "--port",
        "0",
        "--state-dir",
        &state.path().display().to_string(),
        "--associations",
        &assoc.display().to_string(),
        "--credential-source",
        "sts",
    ]);
    cmd.env("AWS_ENDPOINT_URL_STS", format!("http://{proxy}"))
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing");
    let dev = spawn(cmd);
    let uri = dev.export("AWS_CONTAINER_CREDENTIALS_FULL_URI").await;
    let token = std::fs::read_to_string(dev.export("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE").await)
        .expect("token");
    let addr: SocketAddr = uri
        .trim_start_matches("http://")
        .trim_end_matches("/v1/credentials")
        .parse()
        .expect("addr");
    let reply = get(addr, "/v1/credentials", &[("authorization", &token)]).await;
    assert_eq!(
        reply.status,
        200,
        "{}\n{}",
        reply.text(),
        dev.stderr.joined()
    );
    let key = reply.json()["AccessKeyId"]
        .as_str()
        .expect("key")
        .to_owned();

    let seen = seen.lock().expect("lock").clone();
    assert_eq!(
        seen.len(),
        2,
        "AssumeRole of the role, then of the target role: {seen:?}"
    );
    let (first, _) = &seen[0];
    assert!(
        first.contains("Action=AssumeRole")
            && first.contains("RoleArn=arn%3Aaws%3Aiam%3A%3A123456789012%3Arole%2Fapp"),
        "{first}"
    );
    for tag in [
        "eks-cluster-arn",
        "eks-cluster-name",
        "kubernetes-namespace",
        "kubernetes-service-account",
        "kubernetes-pod-name",
        "kubernetes-pod-uid",
    ] {
        assert!(
            first.contains(&format!("Key={tag}")),
            "tag {tag} not sent: {first}"
        );
    }
    assert!(first.contains("Value=default"));
    let (second, answer) = &seen[1];
    assert!(
        second.contains("RoleArn=arn%3Aaws%3Aiam%3A%3A123456789012%3Arole%2Ftarget"),
        "{second}"
    );
    assert!(
        answer.contains(&key),
        "the agent served the credentials moto issued for the target role"
    );
    let _ = moto.kill().await;
}
