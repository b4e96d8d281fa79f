//! Local mode's fourth identity (issue 20), with real clients: who an IAM principal is inside the
//! cluster. The AWS CLI v1 manages access entries, policies, the authentication mode and Pod
//! Identity associations against `dev`'s emulator and makes tokens with `aws eks get-token`;
//! kubectl 1.32 asks `auth whoami` and `auth can-i` through the kubeconfig `dev` wrote; the
//! TokenReview webhook answers what the control plane would, for each authentication mode and
//! for tokens it must refuse; the Rust SDK signs EKS API calls; `dev explain-access` explains.
//!
//! The AWS CLI (and awscli's own token code) is required in CI through PIA_REQUIRE_SDKS=1,
//! kubectl through PIA_REQUIRE_KUBECTL=1; elsewhere those tests skip with a message.

use crate::support::process::{agent_command, spawn, Spawned};
use crate::support::python::{python_with, run_json, script};
use crate::support::*;
use pod_identity_agent::emulator::issuer::{Issuer, MintRequest};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;

const VIEW: &str = "arn:aws:eks::aws:cluster-access-policy/AmazonEKSViewPolicy";
const ME: &str = "arn:aws:iam::000000000000:role/default-default";

/// Whether `tool --version` runs; else skip, or fail when `require` is set to 1.
fn have(tool: &str, require: &str) -> bool {
    let ok = std::process::Command::new(tool)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        assert!(
            std::env::var(require).as_deref() != Ok("1"),
            "{tool} is required ({require}=1)"
        );
        eprintln!("SKIPPED: {tool} is not installed");
    }
    ok
}

fn have_aws() -> bool {
    have("aws", "PIA_REQUIRE_SDKS")
}

fn have_kubectl() -> bool {
    let ok = std::process::Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        assert!(
            std::env::var("PIA_REQUIRE_KUBECTL").as_deref() != Ok("1"),
            "kubectl is required (PIA_REQUIRE_KUBECTL=1)"
        );
        eprintln!("SKIPPED: kubectl is not installed");
    }
    ok
}

/// A state directory and a home for the clients (kubectl's cache, the AWS CLI's).
fn dirs() -> (tempfile::TempDir, tempfile::TempDir) {
    let dir = || tempfile::tempdir().expect("tempdir");
    (dir(), dir())
}

struct Dev {
    process: Spawned,
    /// What a person pastes: dev's exports, plus a hermetic home and a region.
    env: BTreeMap<String, String>,
    emulator: String,
    /// The kubeconfig dev wrote.
    kubeconfig: String,
}

async fn start_dev(state: &Path, home: &Path, extra: &[&str]) -> Dev {
    let state_arg = state.display().to_string();
    let mut args = vec!["dev", "--port", "0", "--state-dir", &state_arg];
    args.extend_from_slice(extra);
    let process = spawn(agent_command(&args));
    let mut env = BTreeMap::new();
    for name in [
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
        "AWS_ENDPOINT_URL_STS",
        "AWS_ENDPOINT_URL_EKS",
        "KUBECONFIG",
    ] {
        env.insert(name.to_owned(), process.export(name).await);
    }
    let emulator = env["AWS_ENDPOINT_URL_STS"].clone();
    for (k, v) in [
        ("PATH", std::env::var("PATH").unwrap_or_default()),
        ("HOME", home.display().to_string()),
        ("AWS_CONFIG_FILE", "/dev/null".into()),
        ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null".into()),
        ("AWS_EC2_METADATA_DISABLED", "true".into()),
        ("AWS_DEFAULT_REGION", "us-east-1".into()),
    ] {
        env.insert(k.to_owned(), v);
    }
    Dev {
        process,
        kubeconfig: env["KUBECONFIG"].clone(),
        env,
        emulator,
    }
}

struct Ran {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Ran {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}\n{}", self.stdout, self.stderr))
    }
}

async fn run(dev: &Dev, program: &str, args: &[&str]) -> Ran {
    let mut cmd = std::process::Command::new(program);
    cmd.args(args).env_clear().envs(&dev.env);
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .expect("join")
        .expect("run");
    Ran {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    }
}

/// `aws eks …` that must succeed, its JSON output.
async fn eks(dev: &Dev, args: &[&str]) -> Value {
    let mut full = vec!["eks"];
    full.extend_from_slice(args);
    full.extend_from_slice(&["--cluster-name", "dev", "--output", "json"]);
    let r = run(dev, "aws", &full).await;
    assert!(r.ok, "aws {full:?}: {}\n{}", r.stdout, r.stderr);
    if r.stdout.is_empty() {
        Value::Null
    } else {
        r.json()
    }
}

/// Every member of `got` is one the recording has.
fn recorded_shape(recorded: &Value, got: &Value, path: &str) {
    match (recorded, got) {
        (Value::Object(r), Value::Object(g)) => {
            for (k, v) in g {
                let rv = r
                    .get(k)
                    .unwrap_or_else(|| panic!("{path}.{k} is not in the recording"));
                recorded_shape(rv, v, &format!("{path}.{k}"));
            }
        }
        (Value::Array(r), Value::Array(g)) => {
            if let Some(first) = r.first() {
                g.iter().for_each(|v| recorded_shape(first, v, path));
            }
        }
        _ => {}
    }
}

fn recording(name: &str) -> Value {
    let path = format!(
        "{}/proto-fixtures/eks/identity/{name}.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("recording")).expect("json");
    v["response"]["body"].clone()
}

/// A kubeconfig like dev's whose exec plugin assumes `role` first (`get-token --role-arn`).
fn kubeconfig_assuming(dev: &Dev, dir: &Path, role: &str) -> String {
    let text = std::fs::read_to_string(&dev.kubeconfig).expect("kubeconfig");
    let changed = text.replace(
        "--output, json]",
        &format!("--output, json, --role-arn, {role}]"),
    );
    assert_ne!(text, changed, "dev's kubeconfig runs aws eks get-token");
    let path = dir.join(format!(
        "kubeconfig-{}",
        role.rsplit('/').next().unwrap_or_default()
    ));
    std::fs::write(&path, changed).expect("write");
    path.display().to_string()
}

async fn whoami(dev: &Dev) -> Value {
    let r = run(dev, "kubectl", &["auth", "whoami", "-o", "json"]).await;
    assert!(r.ok, "kubectl auth whoami: {}\n{}", r.stdout, r.stderr);
    let review = r.json();
    // The shape is Kubernetes' own: every member survives a trip through k8s-openapi's type.
    let typed: k8s_openapi::api::authentication::v1::SelfSubjectReview =
        serde_json::from_value(review.clone()).expect("a SelfSubjectReview");
    let back = serde_json::to_value(&typed).expect("serialize");
    recorded_shape(&back, &review, "SelfSubjectReview");
    review["status"]["userInfo"].clone()
}

async fn can_i(dev: &Dev, args: &[&str]) -> String {
    let mut full = vec!["auth", "can-i"];
    full.extend_from_slice(args);
    let r = run(dev, "kubectl", &full).await;
    assert!(
        r.stdout.starts_with("yes") || r.stdout.starts_with("no"),
        "kubectl {full:?}: {}\n{}",
        r.stdout,
        r.stderr
    );
    assert_eq!(
        r.ok,
        r.stdout.starts_with("yes"),
        "exit code follows the answer"
    );
    r.stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_sees_what_the_access_entries_made_with_the_aws_cli_grant() {
    if !have_aws() || !have_kubectl() {
        return;
    }
    let (state, home) = dirs();
    let admin = "arn:aws:iam::000000000000:role/platform-admin";
    let mut dev = start_dev(state.path(), home.path(), &["--cluster-creator", admin]).await;
    let viewer = "arn:aws:iam::000000000000:role/viewer";
    for principal in [ME, viewer] {
        eks(
            &dev,
            &[
                "create-access-entry",
                "--principal-arn",
                principal,
                "--kubernetes-groups",
                "team-a-readers",
            ],
        )
        .await;
        eks(
            &dev,
            &[
                "associate-access-policy",
                "--principal-arn",
                principal,
                "--policy-arn",
                VIEW,
                "--access-scope",
                "type=namespace,namespaces=team-a",
            ],
        )
        .await;
    }
    let described = eks(&dev, &["describe-access-entry", "--principal-arn", ME]).await;
    recorded_shape(
        &recording("describe-access-entry"),
        &described,
        "DescribeAccessEntry",
    );
    assert_eq!(
        described["accessEntry"]["username"],
        "arn:aws:sts::000000000000:assumed-role/default-default/{{SessionName}}"
    );
    let listed = eks(
        &dev,
        &["list-access-entries", "--associated-policy-arn", VIEW],
    )
    .await;
    assert_eq!(listed["accessEntries"], json!([ME, viewer]));
    let policies = eks(
        &dev,
        &["list-associated-access-policies", "--principal-arn", viewer],
    )
    .await;
    recorded_shape(
        &recording("list-associated-access-policies"),
        &policies,
        "ListAssociatedAccessPolicies",
    );
    assert_eq!(
        policies["associatedAccessPolicies"][0]["accessScope"],
        json!({"type": "namespace", "namespaces": ["team-a"]})
    );

    // kubectl with dev's kubeconfig: aws eks get-token with the Pod Identity credentials.
    let user = whoami(&dev).await;
    let name = user["username"].as_str().unwrap_or_default();
    assert!(
        name.starts_with("arn:aws:sts::000000000000:assumed-role/default-default/eks-dev-"),
        "{user}"
    );
    assert_eq!(
        user["groups"],
        json!(["team-a-readers", "system:authenticated"])
    );
    assert_eq!(user["extra"]["canonicalArn"], json!([ME]));
    assert!(can_i(&dev, &["get", "pods", "-n", "team-a"])
        .await
        .starts_with("yes"));
    assert!(can_i(&dev, &["list", "deployments.apps", "-n", "team-a"])
        .await
        .starts_with("yes"));
    let no = can_i(&dev, &["delete", "pods", "-n", "team-a"]).await;
    assert!(no.starts_with("no") && no.contains("RBAC"), "{no}");
    assert!(can_i(&dev, &["delete", "pods"]).await.starts_with("no"));
    assert!(can_i(&dev, &["get", "pods", "-n", "team-b"])
        .await
        .starts_with("no"));

    // The same through a role assumed with --role-arn (AssumeRole at the emulator's STS).
    let kubeconfig = kubeconfig_assuming(&dev, home.path(), viewer);
    dev.env.insert("KUBECONFIG".into(), kubeconfig);
    let user = whoami(&dev).await;
    assert_eq!(
        user["username"],
        "arn:aws:sts::000000000000:assumed-role/viewer/EKSGetTokenAuth"
    );
    assert_eq!(
        user["groups"],
        json!(["team-a-readers", "system:authenticated"])
    );
    assert!(can_i(&dev, &["get", "pods", "-n", "team-a"])
        .await
        .starts_with("yes"));
    assert!(can_i(&dev, &["delete", "pods", "-n", "team-a"])
        .await
        .starts_with("no"));
    // The cluster's creator is its bootstrap admin (an access entry with cluster admin).
    dev.env.insert(
        "KUBECONFIG".into(),
        kubeconfig_assuming(&dev, home.path(), admin),
    );
    assert!(can_i(&dev, &["delete", "nodes"]).await.starts_with("yes"));
    let _ = dev.process.child.kill().await;
}

/// The agent's answer to a pod with `token`, which must be credentials.
async fn credentials(dev: &Dev, token: &str) -> Value {
    let agent: std::net::SocketAddr = dev.env["AWS_CONTAINER_CREDENTIALS_FULL_URI"]
        .trim_start_matches("http://")
        .trim_end_matches("/v1/credentials")
        .parse()
        .expect("addr");
    let reply = get(agent, "/v1/credentials", &[("authorization", token)]).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    reply.json()
}

/// `aws eks get-token` for `role` (through `--role-arn`), as the control plane's webhook sees it.
async fn token_for(dev: &Dev, role: &str) -> String {
    let r = run(
        dev,
        "aws",
        &[
            "eks",
            "get-token",
            "--cluster-name",
            "dev",
            "--role-arn",
            role,
            "--output",
            "json",
        ],
    )
    .await;
    assert!(r.ok, "get-token: {}", r.stderr);
    r.json()["status"]["token"]
        .as_str()
        .expect("token")
        .to_owned()
}

/// `aws eks update-cluster-config` of the authentication mode.
async fn set_mode(dev: &Dev, mode: &str) -> Ran {
    let config = format!("authenticationMode={mode}");
    let args = [
        "eks",
        "update-cluster-config",
        "--name",
        "dev",
        "--access-config",
        &config,
        "--output",
        "json",
    ];
    run(dev, "aws", &args).await
}

async fn review(dev: &Dev, token: &str) -> (u16, Value) {
    let addr: std::net::SocketAddr = dev
        .emulator
        .trim_start_matches("http://")
        .parse()
        .expect("addr");
    let body = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token}});
    let r = post_json(addr, "/authenticate", &body).await;
    (r.status, r.json())
}

async fn post_json(addr: std::net::SocketAddr, path: &str, body: &Value) -> Reply {
    use http_body_util::{BodyExt, Full};
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("handshake");
    tokio::spawn(conn);
    let req = hyper::Request::post(path)
        .header("host", addr.to_string())
        .header("content-type", "application/json")
        .body(Full::new(bytes::Bytes::from(body.to_string())))
        .expect("request");
    let res = sender.send_request(req).await.expect("response");
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    let body = res.into_body().collect().await.expect("body").to_bytes();
    Reply {
        status,
        headers,
        body,
    }
}

const AWS_AUTH: &str = "apiVersion: v1
kind: ConfigMap
metadata:
  name: aws-auth
  namespace: kube-system
data:
  mapRoles: |
    - rolearn: arn:aws:iam::000000000000:role/legacy
      username: legacy:{{SessionName}}
      groups:
        - legacy-devs
    - rolearn: arn:aws:iam::000000000000:role/both
      username: from-aws-auth
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_authentication_mode_maps_as_eks_does_and_survives_a_restart() {
    if !have_aws() {
        return;
    }
    let (state, home) = dirs();
    let aws_auth = home.path().join("aws-auth.yaml");
    std::fs::write(&aws_auth, AWS_AUTH).expect("write");
    let aws_auth_arg = aws_auth.display().to_string();
    let flags = [
        "--authentication-mode",
        "CONFIG_MAP",
        "--aws-auth",
        &aws_auth_arg,
    ];
    let mut dev = start_dev(state.path(), home.path(), &flags).await;
    let (legacy, both) = (
        "arn:aws:iam::000000000000:role/legacy",
        "arn:aws:iam::000000000000:role/both",
    );

    // CONFIG_MAP: aws-auth maps; access entries do not exist.
    let (status, r) = review(&dev, &token_for(&dev, legacy).await).await;
    assert_eq!(
        (status, &r["status"]["user"]["username"]),
        (200, &json!("legacy:EKSGetTokenAuth")),
        "{r}"
    );
    assert_eq!(r["status"]["user"]["groups"], json!(["legacy-devs"]));
    let refused = run(
        &dev,
        "aws",
        &["eks", "list-access-entries", "--cluster-name", "dev"],
    )
    .await;
    assert!(
        !refused.ok
            && refused.stderr.contains("InvalidRequestException")
            && refused.stderr.contains(
                "The cluster's authentication mode must be set to one of [API, API_AND_CONFIG_MAP]"
            ),
        "{}",
        refused.stderr
    );
    let skip = set_mode(&dev, "API").await;
    assert!(
        skip.stderr
            .contains("Unsupported authentication mode update from CONFIG_MAP to API"),
        "{}",
        skip.stderr
    );

    // API_AND_CONFIG_MAP: both are read; with both, the access entry wins.
    let update = set_mode(&dev, "API_AND_CONFIG_MAP").await;
    assert!(update.ok, "{}", update.stderr);
    recorded_shape(
        &recording("update-cluster-config"),
        &update.json(),
        "UpdateClusterConfig",
    );
    eks(
        &dev,
        &[
            "create-access-entry",
            "--principal-arn",
            both,
            "--username",
            "from-the-entry",
        ],
    )
    .await;
    assert_eq!(review(&dev, &token_for(&dev, legacy).await).await.0, 200);
    let (_, r) = review(&dev, &token_for(&dev, both).await).await;
    assert_eq!(r["status"]["user"]["username"], "from-the-entry", "{r}");

    // API: aws-auth is not read any more.
    let update = set_mode(&dev, "API").await;
    assert!(update.ok, "{}", update.stderr);
    let (status, r) = review(&dev, &token_for(&dev, legacy).await).await;
    assert_eq!(
        (status, &r["status"]["authenticated"]),
        (403, &json!(false)),
        "{r}"
    );
    assert!(
        r["status"]["error"]
            .as_str()
            .unwrap_or_default()
            .contains("authentication mode API: aws-auth is not read"),
        "{r}"
    );
    assert_eq!(review(&dev, &token_for(&dev, both).await).await.0, 200);

    // A restart with the same state dir keeps the mode and the entries; going back is refused.
    let _ = dev.process.child.kill().await;
    let _ = dev.process.child.wait().await;
    dev = start_dev(state.path(), home.path(), &["--aws-auth", &aws_auth_arg]).await;
    let described = eks(&dev, &["describe-access-entry", "--principal-arn", both]).await;
    assert_eq!(described["accessEntry"]["username"], "from-the-entry");
    let back = set_mode(&dev, "API_AND_CONFIG_MAP").await;
    assert!(!back.ok, "moving back from API must be refused");
    assert!(
        back.stderr.contains("(InvalidParameterException)")
            && back
                .stderr
                .contains("Unsupported authentication mode update from API to API_AND_CONFIG_MAP"),
        "{}",
        back.stderr
    );
    let cluster = run(
        &dev,
        "aws",
        &[
            "eks",
            "describe-cluster",
            "--name",
            "dev",
            "--output",
            "json",
        ],
    )
    .await;
    assert!(cluster.ok, "{}", cluster.stderr);
    let cluster = cluster.json();
    recorded_shape(&recording("describe-cluster"), &cluster, "DescribeCluster");
    assert_eq!(
        cluster["cluster"]["accessConfig"]["authenticationMode"],
        "API"
    );
    let state_arg = state.path().display().to_string();
    let mut started_back = spawn(agent_command(&[
        "dev",
        "--port",
        "0",
        "--state-dir",
        &state_arg,
        "--authentication-mode",
        "CONFIG_MAP",
    ]));
    let code = started_back.child.wait().await.expect("exits").code();
    assert_eq!(
        code,
        Some(2),
        "a backward --authentication-mode is refused at start"
    );
    started_back
        .stderr
        .find(|l| {
            l.contains("Unsupported authentication mode update from API to CONFIG_MAP")
                .then_some(())
        })
        .await;
    let _ = dev.process.child.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_the_control_plane_would_refuse_are_refused() {
    if !have_aws() {
        return;
    }
    let Some(python) = python_with(&["awscli", "botocore"]) else {
        return;
    };
    let (state, home) = dirs();
    let mut dev = start_dev(state.path(), home.path(), &[]).await;
    let cases = json!({
        "good": {"cluster": "dev"},
        "other_cluster": {"cluster": "prod"},
        "expired": {"cluster": "dev", "minutes_ago": 16},
        "tampered": {"cluster": "dev", "tamper": true},
        "unsigned_cluster_header": {"cluster": "dev", "sign_cluster_header": false},
        "other_host": {"cluster": "dev", "endpoint": "https://sts.us-east-1.amazonaws.com"},
    });
    let mut env: Vec<(&str, String)> = dev
        .env
        .iter()
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    env.push(("CASES", cases.to_string()));
    let tokens = run_json(script(python, "eks_tokens.py", &env)).await;
    let (status, r) = review(&dev, tokens["good"].as_str().expect("token")).await;
    assert_eq!(
        (status, &r["status"]["authenticated"]),
        (200, &json!(true)),
        "{r}"
    );
    for (case, says) in [
        ("other_cluster", "SignatureDoesNotMatch"),
        ("expired", "X-Amz-Date parameter is expired"),
        ("tampered", "SignatureDoesNotMatch"),
        (
            "unsigned_cluster_header",
            "did not sign the x-k8s-aws-id header",
        ),
        (
            "other_host",
            "unexpected hostname \"sts.us-east-1.amazonaws.com\"",
        ),
    ] {
        let (status, r) = review(&dev, tokens[case].as_str().expect("token")).await;
        assert_eq!(
            (status, &r["status"]["authenticated"]),
            (403, &json!(false)),
            "{case}: {r}"
        );
        let error = r["status"]["error"].as_str().unwrap_or_default();
        assert!(error.contains(says), "{case}: {error}");
    }
    // Nothing of a token reaches the logs.
    let secret = tokens["good"].as_str().unwrap_or_default();
    let logs = dev.process.stderr.joined();
    assert!(!logs.contains(&secret[20..60]), "a token in the logs");
    let _ = dev.process.child.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_identity_associations_made_with_the_aws_cli_take_effect_at_once() {
    if !have_aws() {
        return;
    }
    let (state, home) = dirs();
    let dev = start_dev(state.path(), home.path(), &[]).await;
    let created = eks(
        &dev,
        &[
            "create-pod-identity-association",
            "--namespace",
            "team",
            "--service-account",
            "api",
            "--role-arn",
            "arn:aws:iam::111122223333:role/api",
        ],
    )
    .await;
    recorded_shape(
        &recording("create-pod-identity-association"),
        &created,
        "CreatePodIdentityAssociation",
    );
    let id = created["association"]["associationId"]
        .as_str()
        .expect("id")
        .to_owned();
    let listed = eks(
        &dev,
        &["list-pod-identity-associations", "--namespace", "team"],
    )
    .await;
    assert_eq!(listed["associations"][0]["associationId"], id.as_str());
    let dup = run(
        &dev,
        "aws",
        &[
            "eks",
            "create-pod-identity-association",
            "--cluster-name",
            "dev",
            "--namespace",
            "team",
            "--service-account",
            "api",
            "--role-arn",
            "arn:aws:iam::111122223333:role/other",
        ],
    )
    .await;
    assert!(
        dup.stderr.contains("ResourceInUseException"),
        "{}",
        dup.stderr
    );

    // The agent, through the emulator's EKS Auth, now gets that role for team/api.
    let issuer = Issuer::load_or_create(state.path()).expect("issuer");
    let token = issuer.mint(&MintRequest::new("team", "api")).expect("mint");
    assert_eq!(credentials(&dev, &token).await["AccountId"], "111122223333");
    eks(
        &dev,
        &[
            "update-pod-identity-association",
            "--association-id",
            &id,
            "--role-arn",
            "arn:aws:iam::444455556666:role/api",
        ],
    )
    .await;
    eks(
        &dev,
        &["delete-pod-identity-association", "--association-id", &id],
    )
    .await;
    let gone = run(
        &dev,
        "aws",
        &[
            "eks",
            "describe-pod-identity-association",
            "--cluster-name",
            "dev",
            "--association-id",
            &id,
        ],
    )
    .await;
    assert!(
        gone.stderr.contains("ResourceNotFoundException"),
        "{}",
        gone.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_sdk_signs_for_the_eks_api_and_strangers_are_refused() {
    let (state, home) = dirs();
    let dev = start_dev(state.path(), home.path(), &[]).await;
    // Pod Identity credentials from dev's agent, as a pod's SDK gets them.
    let token =
        std::fs::read_to_string(&dev.env["AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"]).expect("token");
    let body = credentials(&dev, &token).await;
    let text = |k: &str| body[k].as_str().unwrap_or_default().to_owned();
    let issued = aws_credential_types::Credentials::new(
        text("AccessKeyId"),
        text("SecretAccessKey"),
        Some(text("Token")),
        None,
        "dev",
    );
    let client = |creds: aws_credential_types::Credentials| {
        let conf = aws_sdk_eks::Config::builder()
            .behavior_version(aws_sdk_eks::config::BehaviorVersion::latest())
            .region(aws_sdk_eks::config::Region::new("us-east-1"))
            .endpoint_url(dev.env["AWS_ENDPOINT_URL_EKS"].clone())
            .credentials_provider(creds)
            .build();
        aws_sdk_eks::Client::from_conf(conf)
    };
    let eks = client(issued);
    let policies = eks
        .list_access_policies()
        .send()
        .await
        .expect("list access policies");
    assert!(policies
        .access_policies()
        .iter()
        .any(|p| p.arn() == Some(VIEW)));
    let cluster = eks
        .describe_cluster()
        .name("dev")
        .send()
        .await
        .expect("describe");
    let mode = cluster
        .cluster()
        .and_then(|c| c.access_config())
        .and_then(|a| a.authentication_mode());
    assert_eq!(mode.map(|m| m.as_str()), Some("API_AND_CONFIG_MAP"));
    let entries = eks
        .list_access_entries()
        .cluster_name("dev")
        .send()
        .await
        .expect("list");
    assert_eq!(
        entries.access_entries(),
        [ME],
        "the creator's bootstrap entry"
    );
    let missing = eks
        .describe_cluster()
        .name("prod")
        .send()
        .await
        .expect_err("no such cluster");
    assert_eq!(
        aws_sdk_eks::error::ProvideErrorMetadata::code(&missing),
        Some("ResourceNotFoundException")
    );
    let stranger = client(aws_credential_types::Credentials::new(
        "ASIASTRANGER0000000",
        "secret",
        Some("token".into()),
        None,
        "test",
    ));
    let e = stranger
        .list_access_policies()
        .send()
        .await
        .expect_err("not the emulator's");
    assert_eq!(
        aws_sdk_eks::error::ProvideErrorMetadata::code(&e),
        Some("UnrecognizedClientException")
    );
    let unsigned = get(
        dev.emulator
            .trim_start_matches("http://")
            .parse()
            .expect("addr"),
        "/access-policies",
        &[],
    )
    .await;
    assert_eq!(unsigned.status, 403);
    assert_eq!(
        unsigned.headers["x-amzn-errortype"],
        "MissingAuthenticationTokenException"
    );
    let _ = home;
}

#[tokio::test]
async fn explain_access_names_the_mapping_the_policies_and_the_refusal() {
    use pod_identity_agent::emulator::cluster::{Seed, Store};
    use pod_identity_agent::emulator::entries::{self, Associate, CreateEntry};
    let state = tempfile::tempdir().expect("d");
    let store = Store::open(
        state.path(),
        &Seed {
            name: "dev".into(),
            region: "us-east-1".into(),
            account: "000000000000".into(),
            mode: "API_AND_CONFIG_MAP".into(),
            creator: ME.into(),
        },
    )
    .expect("store");
    let viewer = "arn:aws:iam::000000000000:role/viewer";
    store
        .change(|c| {
            entries::create(
                c,
                CreateEntry {
                    principal_arn: viewer.into(),
                    ..CreateEntry::default()
                },
            )
        })
        .expect("entry");
    let scope = pod_identity_agent::emulator::access::Scope {
        kind: "namespace".into(),
        namespaces: vec!["team-a".into()],
    };
    store
        .change(|c| {
            entries::associate(
                c,
                viewer,
                Associate {
                    policy_arn: VIEW.into(),
                    access_scope: Some(scope),
                },
            )
        })
        .expect("policy");
    let aws_auth = state.path().join("aws-auth.yaml");
    std::fs::write(&aws_auth, AWS_AUTH).expect("write");
    let explain = |arn: &str| {
        let (dir, file) = (
            state.path().display().to_string(),
            aws_auth.display().to_string(),
        );
        let arn = arn.to_owned();
        async move {
            agent_command(&[
                "dev",
                "explain-access",
                &arn,
                "--state-dir",
                &dir,
                "--aws-auth",
                &file,
            ])
            .output()
            .await
            .expect("run")
        }
    };
    let out = explain(viewer).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    for says in [
        "mapped by:  access entry arn:aws:iam::000000000000:role/viewer",
        "username:   arn:aws:sts::000000000000:assumed-role/viewer/explain-access",
        "policy:     AmazonEKSViewPolicy (like the Kubernetes view role), namespace scope [team-a]",
        "yes get pods -n team-a",
        "no  delete pods -n team-a",
    ] {
        assert!(text.contains(says), "{says:?} not in:\n{text}");
    }
    let out = explain("arn:aws:sts::000000000000:assumed-role/legacy/alice").await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("mapped by:  aws-auth mapRoles") && text.contains("username:   legacy:alice"),
        "{text}"
    );
    let out = explain("arn:aws:iam::000000000000:role/nobody").await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("refused:")
            && text.contains("no access entry names it and aws-auth does not map it"),
        "{text}"
    );
}
