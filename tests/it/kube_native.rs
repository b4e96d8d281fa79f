//! Kubernetes-native (issue 19): the node's startup taint goes once the agent serves, and a pod
//! refused for its own fault is told why in an Event, in `diagnose`'s words.
//!
//! The API server is the tests' fake (`tests/support/fake_kube.rs`), answering only the
//! recordings in `proto-fixtures/kube/` (`nodes/`, `events/`, `keys/`), scripted per test: a
//! node with the taint, a patch conflict, 403, 500, a server that hangs. EKS Auth is the tests'
//! fake; pods' tokens are signed by an emulator issuer whose keys the fake API server publishes.
//! Agents run in this process (`Server`, and the taint task as `agent::run` starts it) or as
//! the real binary (the composition root, handover included). Everything is on loopback.

use crate::support;
use crate::support::fake_eks_auth::{load_fixture, Step};
use crate::support::fake_kube::{keys_of, Answer, FakeKube, Seen};
use crate::support::node::{logged, Node};
use crate::support::pod::Pod;
use crate::support::*;
use pod_identity_agent::eks_auth::Fault;
use pod_identity_agent::emulator::issuer::Issuer;
use pod_identity_agent::explain::{explain, explained};
use pod_identity_agent::kube::events::{EventSettings, NODE_REASON};
use pod_identity_agent::kube::taint::{Serving, StartupTaint, TaintSettings, DEFAULT_KEY};
use pod_identity_agent::kube::{KubeClient, KubeSettings, PERMISSIONS};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const NODE: &str = "node-a";
const NODES: &str = "/api/v1/nodes/{name}";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/{namespace}/events";
const EVENT: &str = "/apis/events.k8s.io/v1/namespaces/{namespace}/events/{name}";

/// The fake API server publishing an emulator issuer's keys, and the agent's token for it.
struct Cluster {
    kube: FakeKube,
    issuer: Issuer,
    _dir: tempfile::TempDir,
    token_file: std::path::PathBuf,
}

impl Cluster {
    async fn new() -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let issuer = Issuer::load_or_create(dir.path()).expect("issuer");
        let kube = FakeKube::start().await;
        kube.set_issuer(Issuer::ISSUER);
        kube.publish(keys_of(&issuer));
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, "agent-service-account-token").expect("token");
        Cluster {
            kube,
            issuer,
            _dir: dir,
            token_file,
        }
    }

    fn settings(&self) -> KubeSettings {
        kube_settings(&self.kube.url(), &self.token_file)
    }

    /// A client of this API server of its own (agents in these tests build theirs).
    fn client(&self) -> Arc<KubeClient> {
        Arc::new(KubeClient::new(self.settings(), None).expect("client"))
    }

    fn taint(&self) -> TaintSettings {
        TaintSettings::new(NODE.into(), DEFAULT_KEY.into())
    }

    /// The binary on `node` removing the startup taint, tokens unverified (verification is not
    /// what these tests are about), handing over through `handover_dir` ("" for none).
    fn tainting_agent(&self, node: &Node, handover_dir: &str) -> support::process::Spawned {
        let mut flags = self.flags();
        flags.extend(["--node-startup-taint", "--token-verification", "off"].map(String::from));
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        node.agent(handover_dir, &flags)
    }

    /// What the node answers to reads, in turn.
    fn node_answers(&self, answers: &[&str]) {
        let answers = answers
            .iter()
            .map(|a| match *a {
                "hang" => Answer::Hang,
                name => Answer::recording(name),
            })
            .collect();
        self.kube.script("GET", NODES, answers);
    }

    /// The flags that point the binary at this API server.
    fn flags(&self) -> Vec<String> {
        [
            "--kube-api-server",
            &self.kube.url(),
            "--kube-token-file",
            &self.token_file.display().to_string(),
            "--kube-ca-file",
            "",
            "--node-name",
            NODE,
        ]
        .map(str::to_owned)
        .to_vec()
    }

    fn patches(&self) -> Vec<Seen> {
        self.kube.seen_matching("PATCH", NODES)
    }

    fn node_reads(&self) -> Vec<Seen> {
        self.kube.seen_matching("GET", NODES)
    }

    fn posted(&self) -> Vec<Value> {
        self.kube
            .seen_matching("POST", EVENTS)
            .iter()
            .map(Seen::json)
            .collect()
    }

    /// Every request the agent made is one its ClusterRole grants: a resource verb of
    /// [`PERMISSIONS`] or a read of the key set. The resource verbs used: (group, resource, verb).
    fn assert_permitted(&self) -> std::collections::BTreeSet<(String, String, String)> {
        let mut used = std::collections::BTreeSet::new();
        for s in self.kube.seen() {
            if s.method == "GET"
                && ["/.well-known/openid-configuration", "/openid/v1/jwks"]
                    .contains(&s.path.as_str())
            {
                continue;
            }
            let verb = match s.method.as_str() {
                "GET" => "get",
                "PATCH" => "patch",
                "POST" => "create",
                other => panic!("unexpected method {other} {}", s.path),
            };
            let (group, resource) = match s.path.split('/').collect::<Vec<_>>()[..] {
                ["", "api", "v1", "nodes", _] => ("", "nodes"),
                ["", "apis", group, "v1", "namespaces", _, resource, ..] => (group, resource),
                _ => panic!("unexpected path {}", s.path),
            };
            assert!(
                PERMISSIONS.iter().any(|p| p.api_group == group
                    && p.resource == resource
                    && p.verbs.contains(&verb)),
                "{} {} is not in kube::PERMISSIONS",
                s.method,
                s.path
            );
            used.insert((group.to_owned(), resource.to_owned(), verb.to_owned()));
        }
        used
    }

    /// No body the agent sent holds a token or a part of one.
    fn assert_no_secrets(&self, tokens: &[&str]) {
        for s in self.kube.seen() {
            let body = String::from_utf8_lossy(&s.body);
            for t in tokens {
                for part in t.split('.').filter(|p| p.len() > 16) {
                    assert!(
                        !body.contains(part),
                        "a token went to the API server: {body}"
                    );
                }
            }
            assert!(!body.contains("agent-service-account-token"), "{body}");
        }
    }
}

/// Wait until `done` holds, up to `within`.
async fn until(within: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    done()
}

// ---------------------------------------------------------------------------------------------
// The startup taint
// ---------------------------------------------------------------------------------------------

/// The taint task as `agent::run` starts it, against an in-process agent.
fn taint_for(cluster: &Cluster, h: &Harness) -> (StartupTaint, prometheus::IntCounterVec) {
    let serving = Serving {
        probe: h.agent.probe_addr,
        credentials: h.agent.credential_addrs.clone(),
        verifier: h.agent.verifier.clone(),
    };
    let counted = h.agent.metrics.startup_taint.clone();
    let client = h.agent.kube.clone().unwrap_or_else(|| cluster.client());
    let task = StartupTaint::spawn(&cluster.taint(), serving, Some(counted.clone()), client);
    (task, counted)
}

/// An agent on loopback verifying tokens against the cluster.
async fn verifying(cluster: &Cluster) -> Harness {
    let url = cluster.kube.url();
    let file = cluster.token_file.clone();
    Harness::start_with(move |s, _| {
        verify_with_api_server(s, &url, &file);
        s.node_name = Some(NODE.into());
    })
    .await
}

/// Whether `counted{result}` reaches 1 within `secs`.
async fn counted_once(counted: &prometheus::IntCounterVec, result: &str, secs: u64) -> bool {
    until(Duration::from_secs(secs), || {
        counted.with_label_values(&[result]).get() == 1
    })
    .await
}

/// What the agent patched: the test of the taints as read, then the list without ours.
fn assert_removal_patch(patch: &Seen) {
    assert_eq!(patch.content_type, "application/json-patch+json");
    let read = load_kube("nodes/node-tainted")["response"]["body"]["spec"]["taints"].clone();
    let kept: Vec<Value> = read
        .as_array()
        .expect("taints")
        .iter()
        .filter(|t| t["key"] != DEFAULT_KEY)
        .cloned()
        .collect();
    assert_eq!(kept.len(), 1);
    assert_eq!(
        patch.json(),
        json!([
            {"op": "test", "path": "/spec/taints", "value": read},
            {"op": "replace", "path": "/spec/taints", "value": kept},
        ])
    );
}

fn load_kube(name: &str) -> Value {
    let path = format!(
        "{}/proto-fixtures/kube/{name}.json",
        env!("CARGO_MANIFEST_DIR")
    );
    serde_json::from_str(&std::fs::read_to_string(&path).expect("fixture")).expect("JSON")
}

/// The keys gate: while the verification keys are neither loaded nor known to be unavailable,
/// the node is not touched; once they are, it is read and patched exactly once, and never again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_taint_goes_once_the_keys_are_settled_and_never_comes_back() {
    let cluster = Cluster::new().await;
    let keys_take = Duration::from_millis(1500);
    cluster.kube.script(
        "GET",
        "/openid/v1/jwks",
        vec![Answer::After(keys_take, "keys/jwks".into())],
    );
    cluster.node_answers(&["nodes/node-tainted"]);
    let h = verifying(&cluster).await;
    let (task, counted) = taint_for(&cluster, &h);
    assert!(until(Duration::from_secs(5), || !cluster.patches().is_empty()).await);
    let jwks = cluster.kube.seen_matching("GET", "/openid/v1/jwks");
    let first_read = &cluster.node_reads()[0];
    assert!(
        first_read.at >= jwks[0].at + keys_take,
        "the node was read {:?} after the keys were asked for, before they arrived",
        first_read.at - jwks[0].at
    );
    // The agent serves while the taint goes: a pod gets credentials now.
    let pod = Pod::new(1).token(&cluster.issuer, 0, 3600);
    assert_eq!(h.get(&pod).await.status, 200);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        (cluster.node_reads().len(), cluster.patches().len()),
        (1, 1)
    );
    assert_removal_patch(&cluster.patches()[0]);
    assert_eq!(counted.with_label_values(&["removed"]).get(), 1);
    cluster.assert_permitted();
    task.stop().await;
}

/// A `/readyz` of our own: 503 until `ready` is set.
async fn readyz(ready: Arc<AtomicBool>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let ready = ready.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| {
                    let status = if ready.load(Ordering::Relaxed) {
                        200
                    } else {
                        503
                    };
                    async move {
                        let mut res = hyper::Response::new(http_body_util::Full::new(
                            bytes::Bytes::from_static(b"{}"),
                        ));
                        *res.status_mut() = hyper::StatusCode::from_u16(status).expect("status");
                        Ok::<_, std::convert::Infallible>(res)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// The readiness gate: as long as `/readyz` says no, the node is not touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_taint_waits_for_readiness() {
    let cluster = Cluster::new().await;
    cluster.node_answers(&["nodes/node-tainted"]);
    let ready = Arc::new(AtomicBool::new(false));
    let probe = readyz(ready.clone()).await;
    let serving = Serving {
        probe: Some(probe),
        credentials: vec![],
        verifier: None,
    };
    let task = StartupTaint::spawn(&cluster.taint(), serving, None, cluster.client());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        cluster.kube.seen().is_empty(),
        "the node was touched before the agent was ready"
    );
    ready.store(true, Ordering::Relaxed);
    assert!(until(Duration::from_secs(3), || cluster.patches().len() == 1).await);
    assert_removal_patch(&cluster.patches()[0]);
    task.stop().await;
}

/// A concurrent change of the taints (409 from the API server, or 422 when the patch's test
/// failed) makes the agent read the node again and patch anew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflict_reads_the_node_again() {
    let cluster = Cluster::new().await;
    cluster.node_answers(&["nodes/node-tainted"]);
    cluster.kube.script(
        "PATCH",
        NODES,
        vec![
            Answer::recording("nodes/patch-conflict"),
            Answer::recording("nodes/patch-test-failed"),
            Answer::recording("nodes/node-patched"),
        ],
    );
    let h = Harness::start().await;
    let (task, counted) = taint_for(&cluster, &h);
    assert!(counted_once(&counted, "removed", 5).await);
    assert_eq!(
        (cluster.node_reads().len(), cluster.patches().len()),
        (3, 3)
    );
    // Each patch tests what its own read saw.
    for p in cluster.patches() {
        assert_removal_patch(&p);
    }
    assert_eq!(counted.with_label_values(&["conflict"]).get(), 2);
    task.stop().await;
}

/// A failing API server (500) is retried with backoff, within the client's attempts and then
/// the task's own rounds, until the taint goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_api_server_is_retried_with_backoff() {
    let cluster = Cluster::new().await;
    let errors = ["nodes/server-error"; 4];
    cluster.node_answers(&[&errors[..], &["nodes/node-tainted"]].concat());
    let h = Harness::start().await;
    let (task, counted) = taint_for(&cluster, &h);
    assert!(counted_once(&counted, "removed", 8).await);
    let reads: Vec<Instant> = cluster.node_reads().iter().map(|s| s.at).collect();
    assert_eq!(
        reads.len(),
        5,
        "three attempts, a round's backoff, two more"
    );
    let gaps: Vec<Duration> = reads.windows(2).map(|w| w[1] - w[0]).collect();
    // The client's backoff (200 ms doubling, jittered by half), then the task's (1 s, jittered).
    assert!(gaps[0] >= Duration::from_millis(100), "{gaps:?}");
    assert!(gaps[1] >= Duration::from_millis(200), "{gaps:?}");
    assert!(gaps[2] >= Duration::from_millis(500), "{gaps:?}");
    assert_eq!(counted.with_label_values(&["retried"]).get(), 1);
    assert_eq!(cluster.patches().len(), 1);
    task.stop().await;
}

/// A node without the taint is read and left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_the_taint_is_not_patched() {
    let cluster = Cluster::new().await;
    cluster.node_answers(&["nodes/node-untainted"]);
    let h = Harness::start().await;
    let (task, counted) = taint_for(&cluster, &h);
    assert!(counted_once(&counted, "absent", 5).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        (cluster.node_reads().len(), cluster.patches().len()),
        (1, 0)
    );
    task.stop().await;
}

/// The binary, as the DaemonSet runs it: the first agent removes the taint once it serves; a
/// successor that takes over its sockets checks again, finds the taint gone, and patches
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_removes_the_taint_and_its_successor_only_checks() {
    let cluster = Cluster::new().await;
    cluster.node_answers(&["nodes/node-tainted", "nodes/node-untainted"]);
    let node = Node::new().await;
    let dir = node.handover_dir();
    let mut first = cluster.tainting_agent(&node, &dir);
    logged(
        &first,
        "removed the node's startup taint: pods may now be scheduled here",
    )
    .await;
    node.serves().await;
    assert_eq!(cluster.patches().len(), 1);
    assert_removal_patch(&cluster.patches()[0]);
    let m = get(node.metrics_addr(), "/metrics", &[]).await.text();
    assert_eq!(
        metric(&m, r#"pod_identity_startup_taint_total{result="removed"}"#),
        1.0
    );

    let mut second = cluster.tainting_agent(&node, &dir);
    logged(&second, "took over from the previous agent").await;
    logged(&second, "the node has no startup taint to remove").await;
    assert_eq!(
        (cluster.node_reads().len(), cluster.patches().len()),
        (2, 1)
    );
    node.serves().await;
    cluster.assert_permitted();
    first.sigterm();
    let _ = first.child.wait().await;
    second.sigterm();
    let _ = second.child.wait().await;
}

/// An API server that forbids the agent its node at first (its RBAC binding or admission
/// policy lagging the DaemonSet at install): retried with backoff, one warning from the task and
/// one from the client however often it is refused, and the taint goes once it is allowed.
/// Credentials are served throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forbidden_node_is_retried_until_allowed() {
    let cluster = Cluster::new().await;
    cluster.node_answers(&["nodes/forbidden", "nodes/forbidden", "nodes/node-tainted"]);
    let node = Node::new().await;
    let mut agent = cluster.tainting_agent(&node, "");
    logged(&agent, "ready").await;
    node.serves().await;
    logged(
        &agent,
        "removed the node's startup taint: pods may now be scheduled here",
    )
    .await;
    assert_eq!(
        (cluster.node_reads().len(), cluster.patches().len()),
        (3, 1)
    );
    let lines = |needle: &str| {
        agent
            .stderr
            .all()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    };
    assert_eq!(
        lines("the Kubernetes API server refuses the agent"),
        1,
        "{}",
        agent.stderr.joined()
    );
    assert_eq!(
        lines("the API server forbids the agent to get or patch its node"),
        1,
        "{}",
        agent.stderr.joined()
    );
    let m = get(node.metrics_addr(), "/metrics", &[]).await.text();
    for (sample, value) in [
        (
            r#"pod_identity_startup_taint_total{result="forbidden"}"#,
            2.0,
        ),
        (r#"pod_identity_startup_taint_total{result="retried"}"#, 2.0),
        (r#"pod_identity_startup_taint_total{result="removed"}"#, 1.0),
        (
            r#"pod_identity_kube_api_requests_total{result="forbidden"}"#,
            2.0,
        ),
    ] {
        assert_eq!(metric(&m, sample), value, "{sample}");
    }
    node.serves().await;
    agent.sigterm();
    let _ = agent.child.wait().await;
}

/// The agent has one API client: with everything it asks the API server forbidden (the key
/// set, its node, an Event on the node), the refusal is logged once, not once per caller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_logs_a_refusal_once() {
    let cluster = Cluster::new().await;
    cluster
        .kube
        .set_mode(support::fake_kube::Mode::Always("keys/forbidden".into()));
    let node = Node::new().await;
    node.fake.set_default(Step::fixture("error-access-denied"));
    let mut flags = cluster.flags();
    flags.extend(
        [
            "--node-startup-taint",
            "--events",
            "true",
            "--token-verification",
            "api-server",
        ]
        .map(String::from),
    );
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut agent = node.agent("", &flags);
    logged(&agent, "ready").await;
    // EKS Auth refuses the node's credentials: an Event on the Node, which is forbidden too.
    let r = get(
        node.addr(),
        "/v1/credentials",
        &[("authorization", &token())],
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text());
    let asked = || {
        (
            cluster.kube.requests("/openid/v1/jwks")
                + cluster.kube.requests("/.well-known/openid-configuration"),
            cluster.node_reads().len(),
            cluster.kube.seen_matching("POST", EVENTS).len(),
        )
    };
    assert!(
        until(Duration::from_secs(5), || {
            let (keys, nodes, events) = asked();
            keys >= 1 && nodes >= 1 && events >= 1
        })
        .await,
        "{:?}",
        asked()
    );
    let refusals = agent
        .stderr
        .all()
        .iter()
        .filter(|l| l.contains("the Kubernetes API server refuses the agent"))
        .count();
    assert_eq!(refusals, 1, "{}", agent.stderr.joined());
    agent.sigterm();
    let _ = agent.child.wait().await;
}

/// The binary's wiring of readiness for the taint (`agent::run`): with api-server
/// verification, the node is read only after the key set arrived, however long it takes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_touches_its_node_only_after_the_keys_arrive() {
    let cluster = Cluster::new().await;
    let keys_take = Duration::from_millis(1500);
    cluster.kube.script(
        "GET",
        "/openid/v1/jwks",
        vec![Answer::After(keys_take, "keys/jwks".into())],
    );
    cluster.node_answers(&["nodes/node-tainted"]);
    let node = Node::new().await;
    let mut flags = cluster.flags();
    flags.extend(["--node-startup-taint", "--token-verification", "api-server"].map(String::from));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut agent = node.agent("", &flags);
    logged(
        &agent,
        "removed the node's startup taint: pods may now be scheduled here",
    )
    .await;
    let jwks = cluster.kube.seen_matching("GET", "/openid/v1/jwks");
    let first_read = &cluster.node_reads()[0];
    assert!(
        first_read.at >= jwks[0].at + keys_take,
        "the node was read {:?} after the keys were asked for, before they arrived",
        first_read.at.saturating_duration_since(jwks[0].at)
    );
    assert_eq!(cluster.patches().len(), 1);
    agent.sigterm();
    let _ = agent.child.wait().await;
}

/// An API server that accepts and never answers: credentials are served with no added
/// latency, and the agent still stops promptly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_api_server_delays_no_credential_and_no_shutdown() {
    let cluster = Cluster::new().await;
    cluster.node_answers(&["hang"]);
    let node = Node::new().await;
    let mut agent = cluster.tainting_agent(&node, "");
    logged(&agent, "ready").await;
    assert!(until(Duration::from_secs(5), || !cluster.node_reads().is_empty()).await);
    // A new pod's first request, then its cached credentials, while the node's read hangs.
    let t = token();
    let started = Instant::now();
    let first = get(node.addr(), "/v1/credentials", &[("authorization", &t)]).await;
    let miss = started.elapsed();
    assert_eq!(first.status, 200, "{}", first.text());
    // Bounds far below the client's 2 s timeout a request waiting on the API server would pay.
    assert!(miss < Duration::from_secs(1), "first request took {miss:?}");
    let mut hits = Vec::new();
    for _ in 0..200 {
        let started = Instant::now();
        let r = get(node.addr(), "/v1/credentials", &[("authorization", &t)]).await;
        hits.push(started.elapsed());
        assert_eq!(r.status, 200);
    }
    hits.sort();
    let p99 = hits[hits.len() * 99 / 100];
    assert!(p99 < Duration::from_millis(250), "cached p99 {p99:?}");
    // The read is still hanging; shutdown does not wait for it.
    assert!(cluster.patches().is_empty());
    let stopping = Instant::now();
    agent.sigterm();
    let status = tokio::time::timeout(Duration::from_secs(5), agent.child.wait())
        .await
        .expect("the agent stops while the API server hangs")
        .expect("status");
    assert_eq!(status.code(), Some(0), "{}", agent.stderr.joined());
    assert!(
        stopping.elapsed() < Duration::from_secs(3),
        "{:?}",
        stopping.elapsed()
    );
}

// ---------------------------------------------------------------------------------------------
// Events
// ---------------------------------------------------------------------------------------------

/// An in-process agent that verifies tokens and reports refusals as Events, with series sent
/// every 300 ms.
async fn reporting(
    cluster: &Cluster,
    verify: bool,
    tweak: impl FnOnce(&mut EventSettings, &mut KubeSettings),
) -> Harness {
    let url = cluster.kube.url();
    let file = cluster.token_file.clone();
    let mut events = EventSettings::new(NODE.into());
    events.series_every = Duration::from_millis(300);
    let mut kube = cluster.settings();
    tweak(&mut events, &mut kube);
    let h = Harness::start_with(move |s, _| {
        if verify {
            verify_with_api_server(s, &url, &file);
        }
        s.kube = Some(kube);
        s.node_name = Some(NODE.into());
        s.events = Some(events);
    })
    .await;
    if verify {
        let v = h.agent.verifier.clone().expect("verifier");
        assert!(
            until(Duration::from_secs(5), || v.state()
                == pod_identity_agent::verify::KeysState::Loaded)
            .await
        );
    }
    h
}

fn pod_in(namespace: &str, i: usize) -> Pod {
    Pod {
        namespace: namespace.into(),
        ..Pod::new(i)
    }
}

/// Ask with every token at once; each must be refused 404 (no association).
async fn all_refused(h: &Harness, tokens: Vec<String>) {
    let addr = h.addr();
    let asks: Vec<_> = tokens
        .into_iter()
        .map(|t| {
            tokio::spawn(
                async move { get(addr, "/v1/credentials", &[("authorization", &t)]).await },
            )
        })
        .collect();
    for a in asks {
        assert_eq!(a.await.expect("join").status, 404);
    }
}

/// An Event body read into `k8s-openapi`'s type (no field it does not know), as a pod's.
fn typed_event(body: &Value) -> k8s_openapi::api::events::v1::Event {
    support::manifest::typed(body, "Event")
}

fn events_metric(h_metrics: &str, object: &str, result: &str) -> f64 {
    metric(
        h_metrics,
        &format!(r#"pod_identity_events_total{{object="{object}",result="{result}"}}"#),
    )
}

/// In-process `diagnose` with a pod's environment: its failure line for the agent's answer.
async fn diagnose_line(agent: SocketAddr, token: &str) -> String {
    use pod_identity_agent::diagnose::{diagnose, Env, Level};
    struct Pod(Vec<(String, String)>);
    impl Env for Pod {
        fn var(&self, name: &str) -> Option<String> {
            self.0
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        }
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("token");
    std::fs::write(&file, token).expect("token file");
    let env = Pod(vec![
        (
            "AWS_CONTAINER_CREDENTIALS_FULL_URI".into(),
            format!("http://{agent}/v1/credentials"),
        ),
        (
            "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE".into(),
            file.display().to_string(),
        ),
        ("HOME".into(), dir.path().display().to_string()),
    ]);
    let args = pod_identity_agent::cli::DiagnoseArgs {
        no_sts: true,
        timeout: Duration::from_secs(5),
    };
    let report = diagnose(&env, &args).await;
    report
        .findings
        .iter()
        .find(|f| f.level == Level::Fail && f.check == "agent")
        .map(|f| f.message.clone())
        .unwrap_or_else(|| panic!("no agent failure: {}", report.render()))
}

/// Each refusal that is the pod's own becomes one Event on that pod: named from the verified
/// token, the reason of the table, and exactly the words `diagnose` gives for the same answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_pod_is_told_why_in_diagnoses_words() {
    let cluster = Cluster::new().await;
    let h = reporting(&cluster, true, |_, _| {}).await;
    let cases = [
        ("error-resource-not-found", "PodIdentityNoAssociation"),
        (
            "error-access-denied-trust-policy",
            "PodIdentityRoleNotTrusted",
        ),
        ("error-expired-token", "PodIdentityTokenExpired"),
        ("error-invalid-token", "PodIdentityTokenInvalid"),
    ];
    let mut tokens = Vec::new();
    for (i, (fixture, _)) in cases.iter().enumerate() {
        let pod = pod_in(&format!("team-{i}"), i);
        h.fake.answer_namespace(&pod.namespace, fixture);
        let t = pod.token(&cluster.issuer, 0, 3600);
        let agent = &load_fixture(fixture)["agent"];
        let r = h.get(&t).await;
        assert_eq!(
            u64::from(r.status),
            agent["status"].as_u64().expect("status")
        );
        tokens.push((pod, t));
    }
    assert!(
        until(Duration::from_secs(5), || cluster.posted().len()
            == cases.len())
        .await
    );
    let posted = cluster.posted();
    for (i, (fixture, reason)) in cases.iter().enumerate() {
        let (pod, t) = &tokens[i];
        let agent = &load_fixture(fixture)["agent"];
        let (code, status) = (
            agent["code"].as_str().expect("code"),
            agent["status"].as_u64().expect("status") as u16,
        );
        let body = posted
            .iter()
            .find(|e| e["regarding"]["uid"] == pod.uid.as_str())
            .unwrap_or_else(|| panic!("no Event for {fixture}: {posted:?}"));
        let e = typed_event(body);
        let regarding = &e.regarding.as_ref().expect("regarding");
        assert_eq!(
            (
                regarding.kind.as_deref(),
                regarding.namespace.as_deref(),
                regarding.name.as_deref(),
                regarding.api_version.as_deref(),
            ),
            (
                Some("Pod"),
                Some(pod.namespace.as_str()),
                Some(pod.name.as_str()),
                Some("v1")
            )
        );
        assert_eq!(
            e.metadata.namespace.as_deref(),
            Some(pod.namespace.as_str())
        );
        assert!(e
            .metadata
            .name
            .as_deref()
            .is_some_and(|n| n.starts_with(&format!("{}.", pod.name))));
        assert_eq!(e.reason.as_deref(), Some(*reason));
        assert_eq!(e.type_.as_deref(), Some("Warning"));
        assert_eq!(
            e.reporting_controller.as_deref(),
            Some("pod-identity-agent")
        );
        assert_eq!(e.reporting_instance.as_deref(), Some(NODE));
        assert!(e.series.is_none());
        let note = e.note.clone().expect("note");
        assert_eq!(
            note,
            explained(code, status, Some(Fault::Token)),
            "{fixture}"
        );
        // What `diagnose` prints for this pod's token says the same words (and, where it
        // cannot tell whose fault it is, the node's side too).
        let line = diagnose_line(h.addr(), t).await;
        let words = explain(code, status, Some(Fault::Token));
        assert!(line.contains(words), "{fixture}: {line}\n{note}");
        // The pod is told only of its own side.
        assert!(!note.contains("node's IAM role"), "{note}");
        // EKS Auth's own message (which may name accounts and roles) is not passed on.
        assert!(!note.contains("arn:"), "{note}");
    }
    let created = cluster.kube.seen_matching("POST", EVENTS);
    assert!(created.iter().all(|s| s.content_type == "application/json"));
    let token_refs: Vec<&str> = tokens.iter().map(|(_, t)| t.as_str()).collect();
    cluster.assert_no_secrets(&token_refs);
    cluster.assert_permitted();
    let m = h.metrics().await;
    assert_eq!(events_metric(&m, "pod", "sent"), cases.len() as f64);
}

/// A pod refused again and again is one Event whose series counts every refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeats_are_one_event_with_a_count() {
    let cluster = Cluster::new().await;
    let h = reporting(&cluster, true, |_, _| {}).await;
    h.fake
        .answer_namespace("payments", "error-resource-not-found");
    let t = Pod::new(1).token(&cluster.issuer, 0, 3600);
    all_refused(&h, vec![t.clone(); 30]).await;
    let last_count = || {
        cluster
            .kube
            .seen_matching("PATCH", EVENT)
            .last()
            .map(|p| p.json()["series"]["count"].as_u64().unwrap_or(0))
    };
    assert!(
        until(Duration::from_secs(5), || last_count() == Some(30)).await,
        "{:?}",
        last_count()
    );
    assert_eq!(cluster.posted().len(), 1);
    let created = &cluster.posted()[0];
    for p in cluster.kube.seen_matching("PATCH", EVENT) {
        assert_eq!(p.content_type, "application/merge-patch+json");
        assert!(p
            .path
            .ends_with(created["metadata"]["name"].as_str().expect("name")));
        let patch = p.json();
        assert_eq!(patch.as_object().map(|o| o.len()), Some(1), "{patch}");
        assert!(patch["series"]["lastObservedTime"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')));
    }
    // The series as it is now stored is a valid Event.
    let mut stored = created.clone();
    stored["series"] = cluster
        .kube
        .seen_matching("PATCH", EVENT)
        .last()
        .expect("patch")
        .json()["series"]
        .clone();
    let e = typed_event(&stored);
    assert_eq!(e.series.map(|s| s.count), Some(30));
    let m = h.metrics().await;
    assert_eq!(events_metric(&m, "pod", "deduplicated"), 29.0);
    assert_eq!(events_metric(&m, "pod", "sent"), 1.0);
    cluster.assert_no_secrets(&[&t]);
}

/// Many pods refused at once: no more Events than the node's budget allows (a burst, then one
/// a second); the rest wait in their series.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_refused_pods_is_bounded_by_the_nodes_budget() {
    let _one_at_a_time = FLOODS.lock().await;
    let cluster = Cluster::new().await;
    let h = reporting(&cluster, true, |e, _| {
        e.burst = 5;
        e.rate = 2.0;
    })
    .await;
    h.fake
        .answer_namespace("payments", "error-resource-not-found");
    let started = Instant::now();
    let tokens = (0..40).map(|i| Pod::new(i).token(&cluster.issuer, 0, 3600));
    all_refused(&h, tokens.collect()).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let created = cluster.posted().len();
    let allowed = 5 + (started.elapsed().as_secs_f64() * 2.0).ceil() as usize;
    assert!(created <= allowed, "{created} Events, {allowed} allowed");
    assert!(created >= 5, "{created}");
    let m = h.metrics().await;
    assert!(events_metric(&m, "pod", "rate_limited") > 0.0, "{m}");
    // Every Event names a different pod.
    let uids: std::collections::BTreeSet<String> = cluster
        .posted()
        .iter()
        .map(|e| {
            e["regarding"]["uid"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    assert_eq!(uids.len(), created);
}

/// A token the keys do not verify names no pod: no Event, whatever its claims say. The node's
/// own Event needs no pod and is still sent without verification.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_pod_event_for_a_token_the_keys_do_not_verify() {
    let cluster = Cluster::new().await;
    // Verification on: an expired token that claims a real pod but is not signed by the cluster.
    let h = reporting(&cluster, true, |_, _| {}).await;
    let real = Pod::new(7);
    let forged = jwt::encode_unsigned(
        &json!({"alg": "RS256", "kid": "made-up"}),
        &json!({"aud": ["pods.eks.amazonaws.com"], "iss": Issuer::ISSUER, "exp": now_secs() - 7200,
                "iat": now_secs() - 10800, "kubernetes.io": {"namespace": real.namespace,
                "pod": {"name": real.name, "uid": real.uid}, "serviceaccount": {"name": "api"}}}),
    );
    assert_eq!(h.get(&forged).await.status, 400);
    // Verification off: a refusal EKS Auth made for a token no one verified.
    let cluster_off = Cluster::new().await;
    let off = reporting(&cluster_off, false, |_, _| {}).await;
    off.fake
        .answer_namespace("payments", "error-resource-not-found");
    assert_eq!(off.get(&mint("payments", "api", 3600)).await.status, 404);
    off.fake.answer_namespace("nodes", "error-access-denied");
    assert_eq!(off.get(&mint("nodes", "api", 3600)).await.status, 400);
    assert!(until(Duration::from_secs(3), || cluster_off.posted().len() == 1).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(cluster.posted().is_empty(), "{:?}", cluster.posted());
    assert_eq!(cluster_off.posted()[0]["regarding"]["kind"], "Node");
    assert_eq!(events_metric(&h.metrics().await, "pod", "unverified"), 1.0);
    assert_eq!(
        events_metric(&off.metrics().await, "pod", "unverified"),
        1.0
    );
}

/// A verified token that expired: refused by the agent itself, and its pod is told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_of_the_cluster_is_reported_on_its_pod() {
    let cluster = Cluster::new().await;
    let h = reporting(&cluster, true, |_, _| {}).await;
    let pod = Pod::new(3);
    let t = pod.token(&cluster.issuer, 7200, 3600);
    let r = h.get(&t).await;
    assert_eq!(
        (r.status, r.json()["code"].as_str()),
        (400, Some("ExpiredToken"))
    );
    assert!(until(Duration::from_secs(3), || cluster.posted().len() == 1).await);
    let e = typed_event(&cluster.posted()[0]);
    assert_eq!(e.reason.as_deref(), Some("PodIdentityTokenExpired"));
    assert_eq!(
        e.note.as_deref(),
        Some(explained("ExpiredToken", 400, Some(Fault::Token)).as_str())
    );
    assert_eq!(
        e.regarding.and_then(|r| r.uid).as_deref(),
        Some(pod.uid.as_str())
    );
    cluster.assert_no_secrets(&[&t]);
}

/// EKS Auth refusing the node's own credentials is one Warning on the Node, however many pods
/// it refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_node_credentials_are_a_warning_on_the_node() {
    let cluster = Cluster::new().await;
    let h = reporting(&cluster, true, |_, _| {}).await;
    h.fake.set_default(Step::fixture("error-access-denied"));
    for i in 0..5 {
        let r = h.get(&Pod::new(i).token(&cluster.issuer, 0, 3600)).await;
        assert_eq!(r.status, 400);
    }
    assert!(until(Duration::from_secs(3), || cluster.posted().len() == 1).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(cluster.posted().len(), 1);
    let body = &cluster.posted()[0];
    let e = typed_event(body);
    assert_eq!(e.metadata.namespace.as_deref(), Some("default"));
    let regarding = e.regarding.expect("regarding");
    assert_eq!(
        (
            regarding.kind.as_deref(),
            regarding.name.as_deref(),
            regarding.namespace.as_deref()
        ),
        (Some("Node"), Some(NODE), None)
    );
    assert_eq!(e.reason.as_deref(), Some(NODE_REASON));
    assert_eq!(
        e.note.as_deref(),
        Some(explained("AccessDeniedException", 400, Some(Fault::Node)).as_str())
    );
    // EKS Auth's message names the node's role and instance: not in the Event.
    let message = load_fixture("error-access-denied")["response"]["body"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(!message.is_empty() && !body.to_string().contains(&message));
    // Four more refusals went into its series.
    assert!(
        until(Duration::from_secs(3), || cluster
            .kube
            .seen_matching("PATCH", EVENT)
            .last()
            .is_some_and(|p| p.json()["series"]["count"] == 5))
        .await
    );
    assert_eq!(
        events_metric(&h.metrics().await, "node", "deduplicated"),
        4.0
    );
    cluster.assert_permitted();
}

/// The API server hanging, refusing (403) or failing (500) on Events: refusals and cached
/// credentials are answered as fast as ever; a 403 is tried once per Event (the client logs it
/// once), a hang (each attempt timed out) and a 500 within the client's three attempts; every
/// failure is counted, and nothing is tried after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_server_that_hangs_or_refuses_delays_no_answer() {
    const TIMEOUT: Duration = Duration::from_millis(300);
    for (answer, posts_per_event) in [
        (Answer::Hang, 3),
        (Answer::recording("events/forbidden"), 1),
        (Answer::recording("events/server-error"), 3),
    ] {
        let cluster = Cluster::new().await;
        cluster.kube.script("POST", EVENTS, vec![answer.clone()]);
        let h = reporting(&cluster, true, |_, k| k.timeout = TIMEOUT).await;
        h.fake
            .answer_namespace("payments", "error-resource-not-found");
        let cached = pod_in("team", 100).token(&cluster.issuer, 0, 3600);
        assert_eq!(h.get(&cached).await.status, 200);
        let mut refusals = Vec::new();
        for i in 0..3 {
            let started = Instant::now();
            let r = h.get(&Pod::new(i).token(&cluster.issuer, 0, 3600)).await;
            assert_eq!(r.status, 404);
            refusals.push(started.elapsed());
        }
        let mut hits = Vec::new();
        for _ in 0..100 {
            let started = Instant::now();
            assert_eq!(h.get(&cached).await.status, 200);
            hits.push(started.elapsed());
        }
        hits.sort();
        let p99 = hits[98];
        // Bounds far below the 2 s a request waiting on the API server would pay.
        assert!(
            p99 < Duration::from_millis(250),
            "{answer:?}: cached p99 {p99:?}"
        );
        assert!(
            refusals.iter().all(|d| *d < Duration::from_secs(1)),
            "{answer:?}: {refusals:?}"
        );
        let posts = 3 * posts_per_event;
        assert!(
            until(Duration::from_secs(5), || cluster.posted().len() == posts).await,
            "{answer:?}: {} posts",
            cluster.posted().len()
        );
        assert!(
            until(Duration::from_secs(3), || failed(&h) == 3).await,
            "{answer:?}"
        );
        // Nothing more: a failed Event is not tried again (beyond the client's attempts). Longer
        // than all of one Event's attempts with their backoff (3 × 300 ms + 600 ms).
        tokio::time::sleep(TIMEOUT * 3 + Duration::from_millis(1000)).await;
        assert_eq!(cluster.posted().len(), posts, "{answer:?}");
    }
}

fn failed(h: &Harness) -> u64 {
    h.agent
        .metrics
        .events
        .with_label_values(&["pod", "failed"])
        .get()
}

/// An Event the API server no longer has (its TTL passed): the series is created again under a
/// new name, with the count so far.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_gone_from_the_api_server_is_created_again() {
    let cluster = Cluster::new().await;
    cluster
        .kube
        .script("PATCH", EVENT, vec![Answer::recording("events/gone")]);
    let h = reporting(&cluster, true, |_, _| {}).await;
    h.fake
        .answer_namespace("payments", "error-resource-not-found");
    let t = Pod::new(5).token(&cluster.issuer, 0, 3600);
    for _ in 0..3 {
        assert_eq!(h.get(&t).await.status, 404);
    }
    assert!(until(Duration::from_secs(5), || cluster.posted().len() == 2).await);
    let posted = cluster.posted();
    assert_ne!(posted[0]["metadata"]["name"], posted[1]["metadata"]["name"]);
    assert_eq!(posted[1]["series"]["count"], 3, "{}", posted[1]);
    typed_event(&posted[1]);
    assert_eq!(cluster.kube.seen_matching("PATCH", EVENT).len(), 1);
}

/// Review M2: an answer that comes after its series' interval ended belongs to that series, not
/// to the next one under the same pod and reason. The last patch of the first series finds its
/// Event gone (after 300 ms); the second series, created meanwhile, is not taken for gone, so
/// its next refusal is counted into it, not created again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_answer_for_an_ended_series_leaves_the_next_one_alone() {
    let cluster = Cluster::new().await;
    cluster.kube.script(
        "PATCH",
        EVENT,
        vec![Answer::After(
            Duration::from_millis(300),
            "events/gone".into(),
        )],
    );
    let h = reporting(&cluster, true, |e, _| {
        e.interval = Duration::from_secs(1);
        e.series_every = Duration::from_secs(30);
    })
    .await;
    h.fake
        .answer_namespace("payments", "error-resource-not-found");
    let t = Pod::new(5).token(&cluster.issuer, 0, 3600);
    for _ in 0..2 {
        assert_eq!(h.get(&t).await.status, 404);
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(h.get(&t).await.status, 404);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(h.get(&t).await.status, 404);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // One Event per interval; the first interval's last count went to its own (gone) Event.
    assert_eq!(cluster.posted().len(), 2, "{:?}", cluster.posted());
    let patches = cluster.kube.seen_matching("PATCH", EVENT);
    assert_eq!(patches.len(), 1);
    assert!(patches[0].path.ends_with(
        cluster.posted()[0]["metadata"]["name"]
            .as_str()
            .expect("name")
    ));
    assert_eq!(
        events_metric(&h.metrics().await, "pod", "deduplicated"),
        2.0
    );
}

/// Review M3: Events the node's budget holds back go out as it refills (one every half second
/// here), not when the next refusal or the next series tick (30 s) comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_back_events_go_out_as_the_budget_refills() {
    let cluster = Cluster::new().await;
    let h = reporting(&cluster, true, |e, _| {
        e.burst = 5;
        e.rate = 2.0;
        e.series_every = Duration::from_secs(30);
    })
    .await;
    h.fake
        .answer_namespace("payments", "error-resource-not-found");
    let started = Instant::now();
    let tokens = (0..40).map(|i| Pod::new(i).token(&cluster.issuer, 0, 3600));
    all_refused(&h, tokens.collect()).await;
    tokio::time::sleep(Duration::from_secs(5).saturating_sub(started.elapsed())).await;
    let created = cluster.posted().len();
    let allowed = 5 + (started.elapsed().as_secs_f64() * 2.0).ceil() as usize;
    assert!(
        created >= 13 && created <= allowed,
        "{created} Events, {allowed} allowed"
    );
}

/// Review M4: one pod flooding the agent with forged expired tokens (a key the cluster
/// publishes, a signature that does not match) cannot spend what another pod's Event needs: a
/// refusal EKS Auth made for a token the request path verified needs no second verification.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_tokens_do_not_hide_another_pods_event() {
    let _one_at_a_time = FLOODS.lock().await;
    let cluster = Cluster::new().await;
    let h = reporting(&cluster, true, |_, _| {}).await;
    h.fake
        .answer_namespace("payments", "error-resource-not-found");
    let expired = pod_in("attacker", 9000).token(&cluster.issuer, 7200, 3600);
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let addr = h.addr();
    let flooding = Instant::now();
    let flood: Vec<_> = (0..60)
        .map(|c| {
            let (stop, sent, expired) = (stop.clone(), sent.clone(), expired.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    // A distinct token each time: no verdict is remembered for the next.
                    let forged = jwt::tampered(&expired, "attacker", &format!("a{c:03}x{n:09}"));
                    if let Ok(r) =
                        get_result(addr, "/v1/credentials", &[("authorization", &forged)]).await
                    {
                        assert_eq!(r.status, 400);
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    for victim in 0..5 {
        let before = cluster.posted().len();
        let t = Pod::new(victim).token(&cluster.issuer, 0, 3600);
        assert_eq!(h.get(&t).await.status, 404);
        assert!(
            until(Duration::from_secs(3), || cluster.posted().len()
                == before + 1)
            .await,
            "victim {victim}: no Event within 3 s under the flood"
        );
        let posted = cluster.posted();
        assert_eq!(
            posted[before]["regarding"]["uid"],
            Pod::new(victim).uid.as_str()
        );
    }
    stop.store(true, Ordering::Relaxed);
    for f in flood {
        f.await.expect("flood task");
    }
    // It was a flood: more forged tokens than Events may verify, every second.
    let rate = sent.load(Ordering::Relaxed) as f64 / flooding.elapsed().as_secs_f64();
    let budget = f64::from(pod_identity_agent::kube::events::VERIFY_RATE);
    assert!(rate > 2.0 * budget, "{rate:.0} forged tokens a second");
    assert_eq!(cluster.posted().len(), 5, "forged tokens name no pod");
}

/// Review L7: a token of the cluster that expired long ago (a copy of a pod perhaps gone) names
/// no pod: replaying it writes no Event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_expired_long_ago_names_no_pod() {
    let cluster = Cluster::new().await;
    let h = reporting(&cluster, true, |_, _| {}).await;
    let old = Pod::new(3).token(&cluster.issuer, 49 * 3600, 3600);
    let r = h.get(&old).await;
    assert_eq!(
        (r.status, r.json()["code"].as_str()),
        (400, Some("ExpiredToken"))
    );
    // The same pod's token expired two hours ago is still reported: the cut is the age.
    let recent = Pod::new(4).token(&cluster.issuer, 3 * 3600, 3600);
    assert_eq!(h.get(&recent).await.status, 400);
    assert!(until(Duration::from_secs(3), || cluster.posted().len() == 1).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let posted = cluster.posted();
    assert_eq!(posted.len(), 1, "{posted:?}");
    assert_eq!(posted[0]["regarding"]["uid"], Pod::new(4).uid.as_str());
    assert_eq!(events_metric(&h.metrics().await, "pod", "unverified"), 1.0);
}

/// Review L8: a verified token that names another node gets no Event on this one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_of_another_node_names_no_pod() {
    let cluster = Cluster::new().await;
    let h = reporting(&cluster, true, |_, _| {}).await;
    let elsewhere = Pod {
        node: Some("node-b".into()),
        ..Pod::new(6)
    };
    let here = Pod::new(7);
    for pod in [&elsewhere, &here] {
        let r = h.get(&pod.token(&cluster.issuer, 7200, 3600)).await;
        assert_eq!(
            (r.status, r.json()["code"].as_str()),
            (400, Some("ExpiredToken"))
        );
    }
    assert!(until(Duration::from_secs(3), || cluster.posted().len() == 1).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let posted = cluster.posted();
    assert_eq!(posted.len(), 1, "{posted:?}");
    assert_eq!(posted[0]["regarding"]["uid"], here.uid.as_str());
}

/// Review L15: EKS Auth refusing the node's credentials at a background refresh (no pod asked,
/// so no request reports it) is a warning on the Node too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_refused_for_the_nodes_credentials_warns_on_the_node() {
    let cluster = Cluster::new().await;
    let url = cluster.kube.url();
    let file = cluster.token_file.clone();
    let h = Harness::start_with(move |s, _| {
        s.cache.policy.max_retention = Duration::from_millis(300);
        s.kube = Some(kube_settings(&url, &file));
        s.node_name = Some(NODE.into());
        s.events = Some(EventSettings::new(NODE.into()));
    })
    .await;
    let t = token();
    assert_eq!(h.get(&t).await.status, 200);
    assert_eq!(h.get(&t).await.status, 200, "used, so it is renewed");
    h.fake.set_default(Step::fixture("error-access-denied"));
    // No request from here on: only the refresh meets the refusal.
    assert!(
        until(Duration::from_secs(3), || cluster.posted().len() == 1).await,
        "no Event on the Node"
    );
    let e = typed_event(&cluster.posted()[0]);
    assert_eq!(e.reason.as_deref(), Some(NODE_REASON));
    assert_eq!(e.regarding.and_then(|r| r.kind).as_deref(), Some("Node"));
    assert!(
        h.agent
            .metrics
            .node_refused
            .with_label_values(&["AccessDeniedException"])
            .get()
            >= 1
    );
}

/// Review L16: a taint put back on the node after the agent removed it (a managed node group's
/// taints applied to existing nodes) is removed at the next re-check; the agent only removes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taint_put_back_is_removed_at_the_next_check() {
    let cluster = Cluster::new().await;
    cluster.node_answers(&[
        "nodes/node-tainted",
        "nodes/node-untainted",
        "nodes/node-tainted",
        "nodes/node-untainted",
    ]);
    let h = Harness::start().await;
    let serving = Serving {
        probe: h.agent.probe_addr,
        credentials: h.agent.credential_addrs.clone(),
        verifier: None,
    };
    let counted = h.agent.metrics.startup_taint.clone();
    let mut settings = cluster.taint();
    settings.recheck = Duration::from_millis(300);
    let task = StartupTaint::spawn(&settings, serving, Some(counted.clone()), cluster.client());
    assert!(
        until(Duration::from_secs(5), || counted
            .with_label_values(&["removed"])
            .get()
            == 2)
        .await
    );
    // Checked again and again, patched only when the taint was there.
    assert!(until(Duration::from_secs(3), || cluster.node_reads().len() >= 6).await);
    assert_eq!(cluster.patches().len(), 2);
    for p in cluster.patches() {
        assert_removal_patch(&p);
    }
    assert_eq!(counted.with_label_values(&["absent"]).get(), 0);
    task.stop().await;
}

/// Every resource verb the ClusterRole grants (`kube::PERMISSIONS`) is one the agent uses: the
/// taint reads and patches the node, Events are created and their series patched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_permission_granted_is_used() {
    let cluster = Cluster::new().await;
    cluster.node_answers(&["nodes/node-tainted"]);
    let h = reporting(&cluster, true, |_, _| {}).await;
    let (task, counted) = taint_for(&cluster, &h);
    h.fake
        .answer_namespace("payments", "error-resource-not-found");
    let t = Pod::new(1).token(&cluster.issuer, 0, 3600);
    for _ in 0..3 {
        assert_eq!(h.get(&t).await.status, 404);
    }
    assert!(counted_once(&counted, "removed", 5).await);
    assert!(
        until(Duration::from_secs(3), || !cluster
            .kube
            .seen_matching("PATCH", EVENT)
            .is_empty())
        .await
    );
    let used = cluster.assert_permitted();
    for p in PERMISSIONS {
        for verb in p.verbs {
            assert!(
                used.contains(&(
                    p.api_group.to_owned(),
                    p.resource.to_owned(),
                    (*verb).to_owned()
                )),
                "{verb} {} is granted but never used: {used:?}",
                p.resource
            );
        }
    }
    task.stop().await;
}
