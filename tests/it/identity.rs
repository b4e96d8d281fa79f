//! Identity (issue 16): a verified token, not a source address, decides who a client is.
//!
//! The cluster's keys come from a fake API server that serves only `proto-fixtures/kube/` with
//! the test's own issuers' keys published beside the recorded one; tokens are signed by the
//! emulator's issuer code (RS256, a `kid`, the `kubernetes.io` claims). EKS Auth is the tests'
//! fake. Everything is on loopback, in this process.

use crate::support::fake_kube::{keys_of, FakeKube, Mode};
use crate::support::pod::Pod;
use crate::support::*;
use crate::support::{fake_eks_auth, process};
use pod_identity_agent::admission::AdmissionSettings;
use pod_identity_agent::emulator::issuer::Issuer;
use pod_identity_agent::server::limits::ConnectionLimits;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// An API server publishing `issuers`' keys, and a token file for the agent to present.
struct Cluster {
    kube: FakeKube,
    _dir: tempfile::TempDir,
    token_file: std::path::PathBuf,
}

impl Cluster {
    async fn new(issuers: &[&Issuer]) -> Cluster {
        let kube = FakeKube::start().await;
        kube.set_issuer(Issuer::ISSUER);
        kube.publish(issuers.iter().flat_map(|i| keys_of(i)).collect());
        let dir = tempfile::tempdir().expect("tempdir");
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, "agent-service-account-token").expect("token");
        Cluster {
            kube,
            _dir: dir,
            token_file,
        }
    }

    fn jwks_fetches(&self) -> usize {
        self.kube.requests("/openid/v1/jwks")
    }
}

fn issuer() -> (Issuer, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    (Issuer::load_or_create(dir.path()).expect("issuer"), dir)
}

async fn verifying(cluster: &Cluster) -> Harness {
    let url = cluster.kube.url();
    let file = cluster.token_file.clone();
    let h = Harness::start_with(move |s, _| {
        s.admission = AdmissionSettings::default();
        verify_with_api_server(s, &url, &file);
        s.node_name = Some("node-a".into());
    })
    .await;
    // Keys at start: the first request does not wait for them.
    let deadline = Instant::now() + Duration::from_secs(5);
    while cluster.jwks_fetches() == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_300_from_one_address_is_one_exchange() {
    // The agent's real defaults: budgets and connection bounds.
    let h = Harness::start_with(|s, _| {
        s.admission = AdmissionSettings::default();
        s.connections = ConnectionLimits::default();
    })
    .await;
    h.fake.set_default(fake_eks_auth::Step {
        delay: Duration::from_millis(300),
        ..fake_eks_auth::Step::fixture("success")
    });
    let t = token();
    let addr = h.addr();
    let tasks: Vec<_> = (0..300)
        .map(|_| {
            let t = t.clone();
            tokio::spawn(async move {
                get_result(addr, "/v1/credentials", &[("authorization", &t)]).await
            })
        })
        .collect();
    let mut statuses = std::collections::BTreeMap::new();
    for task in tasks {
        let status = match task.await.expect("join") {
            Ok(r) => r.status,
            Err(e) => panic!("a request failed: {e}"),
        };
        *statuses.entry(status).or_insert(0) += 1;
    }
    assert_eq!(statuses.get(&200), Some(&300), "{statuses:?}");
    assert_eq!(h.fake.calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_requests_pay_once_and_budget_they_did_not_use_goes_back() {
    let h = Harness::start_with(|s, _| {
        s.admission = AdmissionSettings {
            node_qps: 1.0,
            node_burst: 1,
            node_wait: Duration::from_secs(2),
            ..AdmissionSettings::default()
        };
    })
    .await;
    // The node's budget is spent by another pod: the next exchange waits about a second.
    assert_eq!(h.get(&token()).await.status, 200);
    let started = Instant::now();
    let t = token();
    let addr = h.addr();
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let t = t.clone();
            tokio::spawn(
                async move { get(addr, "/v1/credentials", &[("authorization", &t)]).await },
            )
        })
        .collect();
    for w in workers {
        let r = w.await.expect("join");
        assert_eq!(
            r.status,
            200,
            "a worker of the pod was refused: {}",
            r.text()
        );
    }
    assert_eq!(h.fake.calls(), 2, "one exchange for the eight workers");
    // One node token was used for them, not eight: the next comes a second after it, within
    // the wait. (With every worker booking one, the next would be 7 s away: a 503.)
    let waited = started.elapsed();
    let r = h.get(&token()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        started.elapsed() < waited + Duration::from_millis(1800),
        "{:?} after {waited:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_tokens_of_100_pods_cost_no_exchange() {
    let (a, _d) = issuer();
    let cluster = Cluster::new(&[&a]).await;
    let h = verifying(&cluster).await;
    let pods: Vec<Pod> = (0..100).map(Pod::new).collect();
    let mut first_keys = Vec::new();
    for p in &pods {
        // The pod's first token: issued a while ago, expiring before its next one.
        let r = h.get(&p.token(&a, 3600, 86400)).await;
        assert_eq!(r.status, 200, "{}", r.text());
        first_keys.push(r.json()["AccessKeyId"].clone());
    }
    assert_eq!(h.fake.calls(), 100, "a pod's first token goes to EKS Auth");
    // kubelet rotates every pod's token: each is served the pod's cached credentials.
    for (p, key) in pods.iter().zip(&first_keys) {
        let rotated = p.token(&a, 0, 86400);
        let r = h.get(&rotated).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(&r.json()["AccessKeyId"], key, "the pod's own credentials");
        // The rotated token is now the entry's: a hit.
        assert_eq!(h.get(&rotated).await.status, 200);
    }
    assert_eq!(h.fake.calls(), 100, "no exchange for a rotated token");
    let m = h.metrics().await;
    assert_eq!(
        metric(&m, "pod_identity_rotated_tokens_total"),
        100.0,
        "{m}"
    );
    // Another pod with the same service account is not a rotation: its own exchange.
    let stranger = Pod::new(1000);
    assert_eq!(h.get(&stranger.token(&a, 0, 86400)).await.status, 200);
    assert_eq!(h.fake.calls(), 101);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_verification_a_rotated_token_is_a_stranger() {
    // The control for the test above: unverified claims never find another token's credentials.
    let (a, _d) = issuer();
    let h = Harness::start().await;
    let p = Pod::new(1);
    assert_eq!(h.get(&p.token(&a, 3600, 86400)).await.status, 200);
    assert_eq!(h.get(&p.token(&a, 0, 86400)).await.status, 200);
    assert_eq!(h.fake.calls(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_rotation_is_served_after_one_fetch_and_never_remembered_as_forged() {
    let (a, _da) = issuer();
    let (b, _db) = issuer();
    let cluster = Cluster::new(&[&a]).await;
    let h = verifying(&cluster).await;
    assert_eq!(h.get(&Pod::new(1).token(&a, 0, 3600)).await.status, 200);
    let fetched = cluster.jwks_fetches();
    // Someone sends a token naming a key nobody publishes: a fetch, a refusal, no call.
    let (stranger, _ds) = issuer();
    let calls = h.fake.calls();
    let r = h.get(&Pod::new(2).token(&stranger, 0, 3600)).await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["code"], "InvalidToken");
    assert_eq!(h.fake.calls(), calls, "no EKS Auth call for a forgery");
    assert_eq!(cluster.jwks_fetches(), fetched + 1);
    // The cluster rotates to key B just after that fetch, and signs a new pod's token with it.
    cluster.kube.publish([keys_of(&a), keys_of(&b)].concat());
    let new_pod = Pod::new(3);
    let r = h.get(&new_pod.token(&b, 0, 3600)).await;
    assert_eq!(r.status, 200, "a token of the new key: {}", r.text());
    assert_eq!(
        cluster.jwks_fetches(),
        fetched + 2,
        "one fetch for the new key"
    );
    // And again: verified from the keys held, no fetch.
    assert_eq!(h.get(&Pod::new(4).token(&b, 0, 3600)).await.status, 200);
    assert_eq!(cluster.jwks_fetches(), fetched + 2);
    let m = h.metrics().await;
    assert_eq!(verifications(&m, "refused"), 1.0, "{m}");
}

/// Review M1: a key the cluster stopped publishing (it may have been revoked) vouches for no
/// pod: a token it signs is not served another token's credentials, however recent its claims;
/// it goes to EKS Auth, which decides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_the_cluster_dropped_vouches_for_no_pod() {
    let (a, _da) = issuer();
    let (b, _db) = issuer();
    let cluster = Cluster::new(&[&a]).await;
    let h = verifying(&cluster).await;
    let p = Pod::new(1);
    assert_eq!(h.get(&p.token(&a, 600, 86400)).await.status, 200);
    assert_eq!(h.fake.calls(), 1);
    // The cluster rotates to B and drops A; a token of B makes the agent see it.
    cluster.kube.publish(keys_of(&b));
    assert_eq!(h.get(&Pod::new(2).token(&b, 0, 3600)).await.status, 200);
    assert_eq!(h.fake.calls(), 2);
    // Whoever holds A forges a newer token of pod 1: not a rotation.
    let forged = p.token(&a, 0, 86400);
    let r = h.get(&forged).await;
    assert_eq!(
        r.status,
        200,
        "EKS Auth decides (the fake accepts): {}",
        r.text()
    );
    assert_eq!(
        h.fake.calls(),
        3,
        "an exchange, not pod 1's cached credentials"
    );
    let m = h.metrics().await;
    assert_eq!(metric(&m, "pod_identity_rotated_tokens_total"), 0.0, "{m}");
    assert_eq!(verifications(&m, "unverifiable"), 1.0, "{m}");
}

/// Review M2: a key set that claims a fetch in the future (a wall clock stepped back since, or a
/// forged file) must not stop the agent fetching a key the cluster has just published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_set_from_the_future_does_not_freeze_the_keys() {
    let (a, _da) = issuer();
    let (b, _db) = issuer();
    let cluster = Cluster::new(&[&a]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("verification-keys.json");
    let start = |state: std::path::PathBuf| {
        let (url, file) = (cluster.kube.url(), cluster.token_file.clone());
        Harness::start_with(move |s, _| {
            verify_with_api_server(s, &url, &file).verify.state_file = Some(state);
        })
    };
    let h = start(state.clone()).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !state.exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(h);
    let mut stored: Value =
        serde_json::from_slice(&std::fs::read(&state).expect("kept")).expect("json");
    stored["fetch_started"] = Value::from(now_secs() + 3600);
    std::fs::remove_file(&state).expect("rm");
    std::fs::write(&state, serde_json::to_vec(&stored).expect("json")).expect("write");
    std::fs::set_permissions(&state, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod");
    cluster.kube.publish([keys_of(&a), keys_of(&b)].concat());
    let h = start(state).await;
    let fetched = cluster.jwks_fetches();
    let r = h.get(&Pod::new(1).token(&b, 0, 3600)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        cluster.jwks_fetches(),
        fetched + 1,
        "one fetch for the new key"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_tokens_are_refused_without_a_call_and_tampering_is_remembered() {
    let (a, _d) = issuer();
    let cluster = Cluster::new(&[&a]).await;
    let h = verifying(&cluster).await;
    let real = Pod::new(1).token(&a, 0, 3600);
    let tampered = jwt::tampered(&real, "\"api-1\"", "\"admin\"");
    let wrong_audience = a
        .sign(&json!({"iss": Issuer::ISSUER, "aud": "sts.amazonaws.com", "exp": now_secs() + 600,
            "kubernetes.io": {"namespace": "x", "pod": {"name": "p", "uid": "u"}, "serviceaccount": {"name": "s"}}}))
        .expect("sign");
    for (what, t) in [("tampered", &tampered), ("wrong audience", &wrong_audience)] {
        let r = h.get(t).await;
        assert_eq!(
            (r.status, r.json()["code"].clone()),
            (400, Value::from("InvalidToken")),
            "{what}"
        );
        let again = h.get(t).await;
        assert_eq!(again.status, 400, "{what}");
        assert!(
            again.text().contains("remembered"),
            "{what}: {}",
            again.text()
        );
    }
    assert_eq!(h.fake.calls(), 0, "nothing reached EKS Auth");
    let m = h.metrics().await;
    assert_eq!(
        metric(
            &m,
            "pod_identity_rejected_locally_total{reason=\"negative_cache\"}"
        ),
        2.0,
        "the second asks were answered from memory: {m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_of_a_pod_on_another_node_is_refused_and_remembered() {
    let (a, _d) = issuer();
    let cluster = Cluster::new(&[&a]).await;
    let h = verifying(&cluster).await;
    let mut elsewhere = Pod::new(1);
    elsewhere.node = Some("node-b".into());
    let t = elsewhere.token(&a, 0, 3600);
    let r = h.get(&t).await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["code"], "TokenForAnotherNode");
    assert!(r.text().contains("node-b"), "{}", r.text());
    assert_eq!(h.get(&t).await.json()["code"], "TokenForAnotherNode");
    // A token that names no node (clusters before 1.30) and one naming this node are served.
    let mut unbound = Pod::new(2);
    unbound.node = None;
    assert_eq!(h.get(&unbound.token(&a, 0, 3600)).await.status, 200);
    assert_eq!(h.get(&Pod::new(3).token(&a, 0, 3600)).await.status, 200);
    assert_eq!(h.fake.calls(), 2);
    let m = h.metrics().await;
    assert_eq!(
        metric(
            &m,
            "pod_identity_rejected_locally_total{reason=\"other_node\"}"
        ),
        1.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_server_that_hangs_or_refuses_never_blocks_a_pod() {
    for mode in [Mode::Hang, Mode::Always("keys/forbidden".into())] {
        let (a, _d) = issuer();
        let cluster = Cluster::new(&[&a]).await;
        cluster.kube.set_mode(mode.clone());
        let url = cluster.kube.url();
        let file = cluster.token_file.clone();
        let h = Harness::start_with(move |s, _| {
            verify_with_api_server(s, &url, &file);
        })
        .await;
        let started = Instant::now();
        let r = h.get(&Pod::new(1).token(&a, 0, 3600)).await;
        assert_eq!(r.status, 200, "{mode:?}: {}", r.text());
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{mode:?}: waited {:?}",
            started.elapsed()
        );
        let m = h.metrics().await;
        assert!(verifications(&m, "unverifiable") >= 1.0, "{m}");
        if mode != Mode::Hang {
            assert!(
                metric(
                    &m,
                    "pod_identity_kube_api_requests_total{result=\"forbidden\"}"
                ) >= 1.0,
                "{m}"
            );
            assert!(
                cluster.kube.always_bearer(),
                "the agent's token went with every call"
            );
        }
    }
}

/// A JSON log line with this message, waited for.
async fn logged(agent: &process::Spawned, message: &str) -> Value {
    agent
        .stderr
        .find(|l| {
            let v: Value = serde_json::from_str(l).ok()?;
            (v["message"] == message).then_some(v)
        })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_cross_a_handover_and_a_restart_so_no_agent_starts_blind() {
    let (a, _d) = issuer();
    let cluster = Cluster::new(&[&a]).await;
    let fake = fake_eks_auth::FakeEksAuth::start(CLUSTER).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (state, handover) = (dir.path().join("state"), dir.path().join("handover"));
    let ports = [free_port(), free_port(), free_port()].map(|p| p.to_string());
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", ports[0]).parse().expect("addr");
    let (url, endpoint) = (cluster.kube.url(), fake.endpoint());
    let (state_s, token_s) = (
        state.display().to_string(),
        cluster.token_file.display().to_string(),
    );
    let agent = |handover: &std::path::Path| {
        let mut args = process::loopback_server(CLUSTER, [&ports[0], &ports[1], &ports[2]]);
        args.extend([
            "--endpoint",
            &endpoint,
            "--token-verification",
            "api-server",
            "--kube-api-server",
            &url,
            "--kube-token-file",
            &token_s,
            "--kube-ca-file",
            "",
            "--state-dir",
            &state_s,
            "--handover-timeout",
            "1s",
        ]);
        let mut cmd = process::agent_command(&args);
        cmd.env("POD_IDENTITY_AGENT_HANDOVER_DIR", handover);
        process::spawn(cmd)
    };
    let first = agent(&handover);
    logged(&first, "fetched the cluster's token signing keys").await;
    let r = get(
        addr,
        "/v1/credentials",
        &[("authorization", &Pod::new(1).token(&a, 0, 3600))],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let fetched = cluster.jwks_fetches();

    // An upgrade: the successor takes the keys with the sockets and verifies at once.
    let second = agent(&handover);
    logged(&second, "took over from the previous agent").await;
    let r = get(
        addr,
        "/v1/credentials",
        &[("authorization", &Pod::new(2).token(&a, 0, 3600))],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let metrics_addr: std::net::SocketAddr =
        format!("127.0.0.1:{}", ports[2]).parse().expect("addr");
    let m = get(metrics_addr, "/metrics", &[]).await.text();
    assert_eq!(
        verifications(&m, "verified"),
        1.0,
        "the successor verified pod 2: {m}"
    );
    assert_eq!(
        cluster.jwks_fetches(),
        fetched,
        "without fetching the keys again"
    );
    first.sigterm();
    second.sigterm();
    let _ = tokio::time::timeout(Duration::from_secs(10), second.child.wait_with_output()).await;
    drop(first);

    // A restart with the API server gone: the keys kept in the state directory verify.
    let mode = std::fs::metadata(state.join("verification-keys.json"))
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
        .expect("the keys are kept");
    assert_eq!(mode, 0o600);
    cluster.kube.set_mode(Mode::Hang);
    let third = agent(std::path::Path::new(""));
    logged(&third, "ready").await;
    let started = Instant::now();
    let r = get(
        addr,
        "/v1/credentials",
        &[("authorization", &Pod::new(3).token(&a, 0, 3600))],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    let m = get(metrics_addr, "/metrics", &[]).await.text();
    assert_eq!(
        verifications(&m, "verified"),
        1.0,
        "verified with the kept keys: {m}"
    );
    drop(third);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_fetches_stop_with_the_server() {
    let (a, _d) = issuer();
    let cluster = Cluster::new(&[&a]).await;
    let url = cluster.kube.url();
    let file = cluster.token_file.clone();
    let h = Harness::start_with(move |s, _| {
        verify_with_api_server(s, &url, &file).verify.refresh_every = Duration::from_millis(200);
    })
    .await;
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert!(cluster.jwks_fetches() >= 3, "{}", cluster.jwks_fetches());
    h.agent.shutdown().await;
    let after = cluster.jwks_fetches();
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        cluster.jwks_fetches(),
        after,
        "a stopped agent fetches no keys"
    );
}
