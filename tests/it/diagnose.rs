//! `pod-identity-agent diagnose` against `dev`: the healthy case names the role (through the
//! emulator's STS) and exits 0; each broken setup exits 1 with the check that failed and what it
//! means; shadowing keys are warnings. No output ever holds the token or a secret.

use crate::support::process::{agent_command, loopback_server, spawn, start_dev, BIN};
use crate::support::*;
use std::net::SocketAddr;
use std::path::Path;

struct Outcome {
    code: i32,
    out: String,
}

/// `diagnose` with exactly `vars` as its environment (plus PATH), as a pod's would be.
async fn diagnose(vars: &[(&str, &str)], home: &Path, extra: &[&str]) -> Outcome {
    let out = tokio::process::Command::new(BIN)
        .arg("diagnose")
        .args(extra)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", home)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .envs(vars.iter().copied())
        .output()
        .await
        .expect("run diagnose");
    Outcome {
        code: out.status.code().unwrap_or(-1),
        out: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

fn failed(o: &Outcome, check: &str, words: &str) {
    assert_eq!(o.code, 1, "{}", o.out);
    let line = o
        .out
        .lines()
        .find(|l| l.starts_with("FAIL") && l.contains(check))
        .unwrap_or_else(|| panic!("no FAIL {check} line:\n{}", o.out));
    assert!(
        o.out.contains(words),
        "{check}: expected {words:?} in\n{line}\n{}",
        o.out
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diagnose_explains_the_healthy_case_and_every_broken_setup() {
    let state = tempfile::tempdir().expect("tempdir");
    let state_arg = state.path().display().to_string();
    let (mut dev, uri, token_file) = start_dev(state.path()).await;
    let sts = dev.export("AWS_ENDPOINT_URL_STS").await;
    let home = state.path();
    let pod = |extra: &[(&'static str, String)]| {
        let mut v: Vec<(&'static str, String)> = vec![
            ("AWS_CONTAINER_CREDENTIALS_FULL_URI", uri.clone()),
            ("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", token_file.clone()),
            ("AWS_ENDPOINT_URL_STS", sts.clone()),
            ("AWS_REGION", "us-east-1".into()),
        ];
        for (k, val) in extra {
            v.retain(|(key, _)| key != k);
            if !val.is_empty() {
                v.push((k, val.clone()));
            }
        }
        v
    };
    let run = |vars: Vec<(&'static str, String)>| async move {
        let refs: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
        diagnose(&refs, home, &[]).await
    };

    // Healthy: every check ok, the role named by STS.
    let healthy = run(pod(&[])).await;
    assert_eq!(healthy.code, 0, "{}", healthy.out);
    for check in ["environment", "token", "precedence", "agent", "role"] {
        assert!(
            healthy
                .out
                .lines()
                .any(|l| l.starts_with("ok") && l.contains(check)),
            "{check}:\n{}",
            healthy.out
        );
    }
    assert!(
        healthy
            .out
            .contains("namespace default, service account default"),
        "{}",
        healthy.out
    );
    assert!(
        healthy
            .out
            .contains("default-default (arn:aws:sts::000000000000:assumed-role/default-default/"),
        "{}",
        healthy.out
    );
    // Never the token or the credentials' secrets: the agent serves this token's cached ones.
    let token = std::fs::read_to_string(&token_file).expect("token");
    let creds = get(
        uri.trim_start_matches("http://")
            .trim_end_matches("/v1/credentials")
            .parse()
            .expect("addr"),
        "/v1/credentials",
        &[("authorization", &token)],
    )
    .await
    .json();
    let secret = creds["SecretAccessKey"].as_str().expect("secret");
    let session = creds["Token"].as_str().expect("session token");
    for (what, s) in [("secret key", secret), ("session token", session)] {
        assert!(!healthy.out.contains(s), "the {what} was printed");
    }
    for part in token.split('.') {
        assert!(!healthy.out.contains(part), "a token segment was printed");
    }
    // An STS endpoint in the clear (not loopback): the signed request, a proof of the role, is
    // not sent there.
    let clear = run(pod(&[(
        "AWS_ENDPOINT_URL_STS",
        "http://sts.example.com".into(),
    )]))
    .await;
    assert!(
        clear
            .out
            .lines()
            .any(|l| l.starts_with("warn") && l.contains("role") && l.contains("not https")),
        "{}",
        clear.out
    );
    // --no-sts skips the role.
    let refs: Vec<(String, String)> = pod(&[])
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    let refs: Vec<(&str, &str)> = refs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let no_sts = diagnose(&refs, home, &["--no-sts"]).await;
    assert_eq!(no_sts.code, 0, "{}", no_sts.out);
    assert!(!no_sts.out.contains("role "), "{}", no_sts.out);

    // Shadowing: warnings, still exit 0.
    let shadowed = run(pod(&[
        ("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE".into()),
        ("AWS_PROFILE", "dev".into()),
    ]))
    .await;
    assert_eq!(shadowed.code, 0, "{}", shadowed.out);
    assert!(
        shadowed
            .out
            .contains("warn  precedence   AWS_ACCESS_KEY_ID is set"),
        "{}",
        shadowed.out
    );
    assert!(shadowed.out.contains("AWS_PROFILE=dev"), "{}", shadowed.out);

    // 1. No Pod Identity environment at all.
    let bare = run(vec![]).await;
    failed(
        &bare,
        "environment",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI is not set",
    );
    // 2. ECS's variable instead.
    let ecs = run(vec![(
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "/v2/credentials/x".into(),
    )])
    .await;
    failed(&ecs, "environment", "ECS's task-role endpoint");
    // 3. An address SDKs refuse over plain http.
    let remote = run(pod(&[(
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "http://10.1.2.3/v1/credentials".into(),
    )]))
    .await;
    failed(&remote, "environment", "SDKs refuse plain http to 10.1.2.3");
    // 4. The token volume not mounted.
    let missing = run(pod(&[(
        "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
        home.join("nope.jwt").display().to_string(),
    )]))
    .await;
    failed(&missing, "token", "projected token volume");
    // 5. A trailing newline.
    let newline = home.join("newline.jwt");
    std::fs::write(&newline, format!("{token}\n")).expect("write");
    let nl = run(pod(&[(
        "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
        newline.display().to_string(),
    )]))
    .await;
    failed(&nl, "token", "ends with a newline");
    // 6. IRSA's token in Pod Identity's place.
    let mut minted = spawn(agent_command(&[
        "dev",
        "token",
        "--state-dir",
        &state_arg,
        "-n",
        "default",
        "-s",
        "default",
        "--audience",
        "sts.amazonaws.com",
    ]));
    let irsa = minted.export("AWS_WEB_IDENTITY_TOKEN_FILE").await;
    let _ = minted.child.wait().await;
    let wrong_audience = run(pod(&[("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", irsa)])).await;
    failed(&wrong_audience, "token", "that is an IRSA token");
    // 7. An expired token.
    let expired = home.join("expired.jwt");
    std::fs::write(&expired, mint("default", "default", -600)).expect("write");
    let old = run(pod(&[(
        "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
        expired.display().to_string(),
    )]))
    .await;
    failed(&old, "token", "expired 10 min ago");
    // 8. No agent listening.
    let closed = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let down = run(pod(&[(
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        format!("http://{closed}/v1/credentials"),
    )]))
    .await;
    failed(&down, "agent", "the agent is not running or not ready");
    // 9. The agent refuses: EKS Auth rejects a token the cluster did not sign.
    let forged = home.join("forged.jwt");
    let (head_payload, _) = token.rsplit_once('.').expect("jwt");
    std::fs::write(&forged, format!("{head_payload}.c2lnbmF0dXJl")).expect("write");
    let rejected = run(pod(&[(
        "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
        forged.display().to_string(),
    )]))
    .await;
    failed(
        &rejected,
        "agent",
        "400 InvalidTokenException: EKS Auth rejected the token",
    );
    // 10. The agent refuses: a wrong path in the URI.
    let wrong_path = run(pod(&[(
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        uri.replace("/v1/credentials", "/v2/credentials"),
    )]))
    .await;
    failed(
        &wrong_path,
        "agent",
        "404 NotFound: the URI's path is wrong",
    );

    for o in [
        &bare,
        &missing,
        &nl,
        &wrong_audience,
        &old,
        &down,
        &rejected,
        &wrong_path,
    ] {
        for part in token.split('.') {
            assert!(
                !o.out.contains(part),
                "a token segment was printed:\n{}",
                o.out
            );
        }
    }
    dev.sigterm();
    let _ = dev.child.wait().await;
}

/// Every answer the agent relays from EKS Auth (each recorded error in `proto-fixtures/eks-auth/`)
/// and its own budget refusal, seen through `diagnose`: exit 1, the agent's status and code,
/// and an explanation of its own (never the catch-all).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diagnose_explains_every_error_the_agent_gives() {
    use crate::support::fake_eks_auth::{fixture_names, load_fixture, FakeEksAuth};
    let fake = FakeEksAuth::start(CLUSTER).await;
    let errors: Vec<(String, u64, String)> = fixture_names()
        .into_iter()
        .filter_map(|name| {
            let agent = load_fixture(&name)["agent"].clone();
            let status = agent["status"].as_u64()?;
            (status != 200).then(|| (name, status, agent["code"].as_str().unwrap_or("").into()))
        })
        .collect();
    assert!(errors.len() >= 15, "{errors:?}");
    for (i, (name, _, _)) in errors.iter().enumerate() {
        fake.answer_namespace(&format!("ns-{i}"), name);
    }
    let endpoint = fake.endpoint();
    let mut args = loopback_server(CLUSTER, ["0"; 3]);
    // Room for one new exchange per error, a few more, then a long wait: the budget refusal.
    let burst = (errors.len() + 5).to_string();
    args.extend([
        "--endpoint",
        &endpoint,
        "--client-exchange-burst",
        &burst,
        "--client-exchange-qps",
        "0.01",
    ]);
    let agent = spawn(agent_command(&args));
    let addr = agent.listening("serving credentials").await;
    let home_dir = tempfile::tempdir().expect("tempdir");
    let home = home_dir.path();
    let uri = format!("http://{addr}/v1/credentials");
    let catch_all = pod_identity_agent::explain::explain("SomethingNew", 400, None);

    let ask = |ns: String| {
        let uri = uri.clone();
        let file = home.join(format!("{ns}.jwt"));
        async move {
            std::fs::write(&file, mint(&ns, "sa", 3600)).expect("token");
            let file = file.display().to_string();
            diagnose(
                &[
                    ("AWS_CONTAINER_CREDENTIALS_FULL_URI", &uri),
                    ("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", &file),
                ],
                home,
                &["--no-sts", "--timeout", "15s"],
            )
            .await
        }
    };
    for (i, (name, status, code)) in errors.iter().enumerate() {
        let o = ask(format!("ns-{i}")).await;
        failed(
            &o,
            "agent",
            &format!("the agent answered {status} {code}: "),
        );
        let explanation = pod_identity_agent::explain::explain(code, *status as u16, None);
        assert_ne!(explanation, catch_all, "{name}: {code} unexplained");
        assert!(o.out.contains(explanation), "{name}:\n{}", o.out);
    }
    // The agent's own refusal: this address has spent its burst of new exchanges.
    let mut refused = None;
    for n in 0..50 {
        let o = ask(format!("budget-{n}")).await;
        if o.out.contains("429 ExchangeRateExceeded") {
            refused = Some(o);
            break;
        }
    }
    let o = refused.expect("the client budget refused at last");
    failed(&o, "agent", "this pod asked for new credentials too often");
    agent.sigterm();
}

/// A server on loopback that answers every request with `answer` (raw HTTP), then closes.
async fn impostor(answer: Vec<u8>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(&answer).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diagnose_is_not_driven_by_whatever_answers() {
    let home = tempfile::tempdir().expect("tempdir");
    let token_file = home.path().join("token");
    std::fs::write(&token_file, token()).expect("token");
    let token_arg = token_file.display().to_string();
    // A huge answer: refused, not buffered.
    let mut huge =
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100000000\r\n\r\n"
            .to_vec();
    huge.extend(std::iter::repeat_n(b'x', 256 * 1024));
    let at = impostor(huge).await;
    let uri = format!("http://{at}/v1/credentials");
    let o = diagnose(
        &[
            ("AWS_CONTAINER_CREDENTIALS_FULL_URI", &uri),
            ("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", &token_arg),
        ],
        home.path(),
        &["--no-sts", "--timeout", "2s"],
    )
    .await;
    failed(&o, "agent", "not a credentials answer");
    // Escape sequences in what it says do not reach the terminal.
    let body = "{\"code\":\"X\\u001b[2J\",\"message\":\"\\u001b]0;owned\\u0007hi\"}";
    let escaping = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let at = impostor(escaping.into_bytes()).await;
    let uri = format!("http://{at}/v1/credentials");
    let o = diagnose(
        &[
            ("AWS_CONTAINER_CREDENTIALS_FULL_URI", &uri),
            ("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", &token_arg),
        ],
        home.path(),
        &["--no-sts"],
    )
    .await;
    assert_eq!(o.code, 1, "{}", o.out);
    assert!(
        !o.out.contains('\u{1b}') && !o.out.contains('\u{7}'),
        "{:?}",
        o.out
    );
}
