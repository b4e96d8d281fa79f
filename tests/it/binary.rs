//! The `pod-identity-agent` binary as an operator runs it: exit codes and one-line errors,
//! the endpoint override from the environment, graceful shutdown on SIGTERM, and a scan of
//! everything it logs at trace level for secrets.

use crate::support::fake_eks_auth::{FakeEksAuth, Step};
use crate::support::process::{agent_command, loopback_server, spawn, Spawned};
use crate::support::*;
use std::time::Duration;
use tokio::process::Command;

/// Start the agent and wait for its credential listener's address in the JSON logs.
async fn spawn_agent(cmd: Command) -> (Spawned, std::net::SocketAddr) {
    let agent = spawn(cmd);
    let addr = agent.listening("serving credentials").await;
    (agent, addr)
}

async fn exit_code(mut cmd: Command) -> (i32, String) {
    let out = cmd.output().await.expect("run");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn version_prints_the_version() {
    let out = agent_command(&["version"]).output().await.expect("run");
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("pod-identity-agent {}", env!("CARGO_PKG_VERSION"))
    );
}

#[tokio::test]
async fn startup_errors_are_one_line_and_exit_2() {
    let mut no_region = agent_command(&loopback_server(CLUSTER, ["0"; 3]));
    no_region.env_remove("AWS_REGION");
    let (code, err) = exit_code(no_region).await;
    assert_eq!(code, 2, "{err}");
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("pod-identity-agent: no AWS region"),
        "{err}"
    );

    let (code, err) = exit_code(agent_command(&["server", "-c", "x", "--port", "eighty"])).await;
    assert_eq!(code, 2, "{err}");
    assert!(!err.contains("panicked"));

    let (code, err) = exit_code(agent_command(&["server"])).await;
    assert_eq!(code, 2, "missing --cluster-name: {err}");

    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = busy.local_addr().expect("addr").port().to_string();
    let mut args = loopback_server(CLUSTER, ["0"; 3]);
    args[6] = &port;
    let (code, err) = exit_code(agent_command(&args)).await;
    assert_eq!(code, 2, "{err}");
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.contains("cannot listen on 127.0.0.1:") && !err.contains("panicked"),
        "{err}"
    );
}

#[tokio::test]
async fn endpoint_from_environment_and_graceful_shutdown() {
    let fake = FakeEksAuth::start(CLUSTER).await;
    let mut cmd = agent_command(&loopback_server(CLUSTER, ["0"; 3]));
    cmd.env("AWS_ENDPOINT_URL_EKS_AUTH", fake.endpoint());
    let (mut agent, addr) = spawn_agent(cmd).await;
    // An exchange in flight when SIGTERM arrives still completes.
    fake.set_default(Step {
        fixture: "success".into(),
        delay: Duration::from_millis(800),
        hang: false,
    });
    let t = token();
    let inflight =
        tokio::spawn(async move { get(addr, "/v1/credentials", &[("authorization", &t)]).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    agent.sigterm();
    let reply = inflight.await.expect("join");
    assert_eq!(reply.status, 200, "{}", reply.text());
    let status = tokio::time::timeout(Duration::from_secs(10), agent.child.wait())
        .await
        .expect("exits")
        .expect("status");
    assert_eq!(status.code(), Some(0), "{}", agent.stderr.joined());
    assert_eq!(fake.calls(), 1, "AWS_ENDPOINT_URL_EKS_AUTH was honoured");
    // New connections are refused once it stopped.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn shutdown_ends_what_outlives_the_grace_period() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fake = FakeEksAuth::start(CLUSTER).await;
    fake.set_default(Step {
        fixture: "success".into(),
        delay: Duration::ZERO,
        hang: true,
    });
    let endpoint = fake.endpoint();
    let mut args = loopback_server(CLUSTER, ["0"; 3]);
    args.extend([
        "--endpoint",
        &endpoint,
        "--eks-auth-timeout",
        "60s",
        "--shutdown-grace",
        "1s",
    ]);
    let (mut agent, addr) = spawn_agent(agent_command(&args)).await;
    // A request waiting on an exchange that never ends; a client that sent half its headers;
    // an idle keep-alive connection.
    let t = token();
    let stuck =
        tokio::spawn(
            async move { get_result(addr, "/v1/credentials", &[("authorization", &t)]).await },
        );
    let mut half = tokio::net::TcpStream::connect(addr).await.expect("connect");
    half.write_all(b"GET /v1/credentials HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .await
        .expect("write");
    let idle = tokio::net::TcpStream::connect(addr).await.expect("connect");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let signalled = std::time::Instant::now();
    agent.sigterm();
    let reply = tokio::time::timeout(Duration::from_secs(5), stuck)
        .await
        .expect("the stuck request ends with the grace period, not with the exchange")
        .expect("join")
        .expect("answered, not cut off");
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert_eq!(reply.json()["code"], "ShuttingDown");
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), half.read_to_end(&mut rest)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "the half-sent request's connection was closed: {read:?}"
    );
    let status = tokio::time::timeout(Duration::from_secs(5), agent.child.wait())
        .await
        .expect("exits")
        .expect("status");
    let took = signalled.elapsed();
    assert_eq!(status.code(), Some(0), "{}", agent.stderr.joined());
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "waited for the grace period, then stopped: {took:?}"
    );
    let line = agent
        .stderr
        .find(|l| {
            l.contains("shutdown grace period over")
                .then(|| l.to_owned())
        })
        .await;
    let v: serde_json::Value = serde_json::from_str(&line).expect("json log line");
    assert_eq!(
        v["connections"], 1,
        "the half-sent request; the idle one closed gracefully: {line}"
    );
    drop(idle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_the_logs_at_any_level() {
    let fake = FakeEksAuth::start(CLUSTER).await;
    let mut args = loopback_server(CLUSTER, ["0"; 3]);
    let endpoint = fake.endpoint();
    args.extend([
        "--endpoint",
        &endpoint,
        "-v",
        "trace",
        "--max-credential-retention-before-renewal",
        "1s",
    ]);
    let (mut agent, addr) = spawn_agent(agent_command(&args)).await;
    let mut tokens = Vec::new();
    // Success, a cache hit, a refresh, upstream errors of each kind, and refused tokens.
    let t = token();
    tokens.push(t.clone());
    assert_eq!(
        get(addr, "/v1/credentials", &[("authorization", &t)])
            .await
            .status,
        200
    );
    assert_eq!(
        get(addr, "/v1/credentials", &[("authorization", &t)])
            .await
            .status,
        200
    );
    tokio::time::sleep(Duration::from_millis(1300)).await;
    for fixture in [
        "error-invalid-token",
        "error-throttling",
        "malformed-json",
        "missing-session-token",
    ] {
        fake.respond_with(fixture);
        let t = token();
        tokens.push(t.clone());
        let status = get(addr, "/v1/credentials", &[("authorization", &t)])
            .await
            .status;
        assert_ne!(status, 200, "{fixture}");
    }
    let expired = mint("default", "app", -7200);
    tokens.push(expired.clone());
    assert_eq!(
        get(addr, "/v1/credentials", &[("authorization", &expired)])
            .await
            .status,
        400
    );
    agent.sigterm();
    let _ = tokio::time::timeout(Duration::from_secs(10), agent.child.wait()).await;
    tokio::time::sleep(Duration::from_millis(100)).await;

    let logs = agent.stderr.joined();
    assert!(
        logs.contains("\"served credentials\"") || logs.contains("served credentials"),
        "debug line per request missing"
    );
    assert!(
        logs.contains("\"level\":\"TRACE\"") || logs.contains("\"level\":\"DEBUG\""),
        "ran at a verbose level"
    );
    let mut secrets: Vec<String> = vec!["node-secret-key-value".into()];
    for t in &tokens {
        secrets.push(t.clone());
        // Each segment alone would also be a leak (the payload identifies the pod, the signature
        // completes it).
        secrets.extend(t.split('.').map(str::to_owned));
    }
    for call in 1..=fake.calls() {
        secrets.push(format!("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLE{call:04}"));
        secrets.push(format!("IQoJb3JpZ2luX2VjEXAMPLESESSIONTOKEN{call:04}"));
    }
    secrets.push("wJalrXUtnFEMI".into());
    secrets.push("IQoJb3JpZ2luX2Vj".into());
    secrets.push("dGhpcyBpcyBhIGZha2Ugc2Vzc2lvbiB0b2tlbg".into());
    for s in &secrets {
        assert!(
            !logs.contains(s.as_str()),
            "secret {}… found in the logs",
            &s[..s.len().min(12)]
        );
    }
    assert!(
        fake.calls() >= 5,
        "the scenario exercised EKS Auth ({} calls)",
        fake.calls()
    );
}

#[tokio::test]
async fn rotate_credentials_rereads_the_shared_credentials_file() {
    let fake = FakeEksAuth::start(CLUSTER).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("credentials");
    let write = |akid: &str| {
        std::fs::write(&file, format!("[default]\naws_access_key_id = {akid}\naws_secret_access_key = rotated-secret-{akid}\naws_session_token = rotated-token-{akid}\n")).expect("write")
    };
    write("AKIAHYBRIDNODE000001");
    let endpoint = fake.endpoint();
    let mut args = loopback_server(CLUSTER, ["0"; 3]);
    args.extend(["--endpoint", &endpoint, "--rotate-credentials", "true"]);
    let mut cmd = agent_command(&args);
    cmd.env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env("AWS_SHARED_CREDENTIALS_FILE", &file);
    let (agent, addr) = spawn_agent(cmd).await;
    let fetch = |t: String| async move {
        get(addr, "/v1/credentials", &[("authorization", &t)])
            .await
            .status
    };

    assert_eq!(fetch(token()).await, 200);
    // The node's credential process rotates the keys: the next exchange is signed with the new ones.
    write("AKIAHYBRIDNODE000002");
    assert_eq!(fetch(token()).await, 200);
    // A half-written file, then a missing one: the last good keys stay in use, with a warning.
    std::fs::write(
        &file,
        "[default]\naws_access_key_id = AKIAHALFWRITTEN00003\n",
    )
    .expect("write");
    assert_eq!(fetch(token()).await, 200);
    std::fs::remove_file(&file).expect("remove");
    assert_eq!(fetch(token()).await, 200);
    assert_eq!(
        fake.access_key_ids(),
        vec![
            "AKIAHYBRIDNODE000001",
            "AKIAHYBRIDNODE000002",
            "AKIAHYBRIDNODE000002",
            "AKIAHYBRIDNODE000002"
        ]
    );
    let logs = agent.stderr.joined();
    assert!(
        logs.contains("cannot use the shared credentials file"),
        "{logs}"
    );
    assert!(
        !logs.contains("rotated-secret") && !logs.contains("rotated-token"),
        "secrets in logs"
    );
}

#[tokio::test]
async fn refusals_are_logged_naming_the_client_never_the_token() {
    let fake = FakeEksAuth::start(CLUSTER).await;
    fake.answer_namespace("attacker", "error-invalid-token");
    let endpoint = fake.endpoint();
    let mut args = loopback_server(CLUSTER, ["0"; 3]);
    args.extend(["--endpoint", &endpoint]);
    let (mut agent, addr) = spawn_agent(agent_command(&args)).await;

    // The open-files limit was raised to the hard limit at start.
    let pid = agent.child.id().expect("pid");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let nofile: Vec<&str> = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .map(|l| l.split_whitespace().skip(3).take(2).collect())
        .unwrap_or_default();
    assert_eq!(nofile.first(), nofile.get(1), "soft == hard: {nofile:?}");

    let client: std::net::IpAddr = "127.0.0.7".parse().expect("ip");
    let mut tokens = Vec::new();
    for _ in 0..15 {
        let t = mint("attacker", "x", 3600);
        tokens.push(t.clone());
        let r = get_from(client, addr, "/v1/credentials", &[("authorization", &t)]).await;
        assert!(matches!(r.status, 400 | 429), "{}", r.status);
    }
    let again = get_from(
        client,
        addr,
        "/v1/credentials",
        &[("authorization", &tokens[0])],
    )
    .await;
    assert_eq!(again.status, 400, "remembered");
    agent.sigterm();
    let _ = tokio::time::timeout(Duration::from_secs(10), agent.child.wait()).await;
    tokio::time::sleep(Duration::from_millis(100)).await;

    let logs = agent.stderr.joined();
    let warnings: Vec<serde_json::Value> = agent
        .stderr
        .all()
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == "refused a request without asking EKS Auth")
        .collect();
    assert_eq!(warnings.len(), 1, "once per client per 10 s: {logs}");
    let w = &warnings[0];
    assert_eq!(w["level"], "WARN");
    // Loopback is the host: one client, whatever address it binds; the address is named too.
    assert_eq!(w["client"], "host");
    assert_eq!(w["address"], "127.0.0.7");
    assert_eq!(w["namespace"], "attacker");
    assert_eq!(w["service_account"], "x");
    assert!(
        w["reason"] == "client_budget" || w["reason"] == "negative_cache",
        "{w}"
    );
    for t in &tokens {
        for part in t.split('.') {
            assert!(!logs.contains(part), "a token segment reached the logs");
        }
    }
}
