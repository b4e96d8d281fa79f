//! Upgrades without a gap (issue 9), with real agent processes on loopback: a second agent
//! started with the same flags takes over the first one's sockets and cache, and the first one
//! stops at SIGTERM, without one failed request or one extra EKS Auth call; and every way the
//! handover can fail still ends with an agent serving, in bounded time.
//!
//! Each test names its own handover directory under a temp dir.

use crate::support;
use crate::support::node::{logged, Load, Node};
use crate::support::*;
use pod_identity_agent::handover::rendezvous::{self, Published};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_agent_takes_over_without_a_failed_request_or_an_exchange() {
    let node = Node::new().await;
    let dir = node.handover_dir();
    let mut first = node.agent(&dir, &[]);
    logged(&first, "ready").await;
    let tokens: Arc<Vec<String>> = Arc::new((0..20).map(|_| token()).collect());
    // Twenty pods, each from its own address (one client to the agent: loopback is the host).
    for (i, t) in tokens.iter().enumerate() {
        let pod: std::net::IpAddr = format!("127.0.1.{}", i + 1).parse().expect("ip");
        let r = get_from(pod, node.addr(), "/v1/credentials", &[("authorization", t)]).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let exchanged = node.fake.calls();
    assert_eq!(exchanged, 20);

    let load = Load::start(node.addr(), tokens.clone(), 4);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let second = node.agent(&dir, &[]);
    let took = logged(&second, "took over from the previous agent").await;
    let handover = started.elapsed();
    assert_eq!(took["entries"], 20, "{took}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stops_cleanly(&mut first, Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (ok, failed, errors) = load.stop().await;

    assert_eq!(failed, 0, "failed requests: {errors:?}");
    assert!(ok > 100, "the load ran: {ok}");
    assert_eq!(
        node.fake.calls(),
        exchanged,
        "no cached token was exchanged again"
    );
    assert!(handover < Duration::from_secs(3), "{handover:?}");
    let m = get(
        SocketAddr::from(([127, 0, 0, 1], node.ports[2])),
        "/metrics",
        &[],
    )
    .await
    .text();
    assert_eq!(completed_takeovers(&m), 1.0, "{m}");
    assert_eq!(
        metric(
            &m,
            "pod_identity_handover_entries_total{direction=\"received\"}"
        ),
        20.0,
        "{m}"
    );
    let logs = first.stderr.joined();
    assert!(logs.contains("handed over to the next agent"), "{logs}");
    // The secrets that crossed the socket were not logged by either side.
    for t in tokens.iter() {
        for part in t.split('.') {
            assert!(!logs.contains(part) && !second.stderr.joined().contains(part));
        }
    }
    // The successor listens for its own successor now, under a new name.
    let named = rendezvous::read_name(Path::new(&dir))
        .expect("name file")
        .expect("named");
    assert!(rendezvous::listening(&named.name));
    assert!(rendezvous::connect(&named.name, Duration::ZERO).is_ok());
    drop(second);
}

/// A name file naming an abstract socket that this test listens on, in `dir`.
fn fake_predecessor(dir: &str) -> Published {
    std::fs::create_dir_all(dir).expect("dir");
    let p = Published::listen().expect("listen");
    p.publish(Path::new(dir)).expect("publish");
    p
}

/// An agent started with `dir` that binds fresh and serves within 3 s.
async fn serves_at_once(node: &Node, dir: &str) -> support::process::Spawned {
    let started = Instant::now();
    let agent = node.agent(dir, &[]);
    logged(&agent, "ready").await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    node.serves().await;
    agent
}

#[tokio::test]
async fn a_stale_name_does_not_stop_a_new_agent() {
    let node = Node::new().await;
    let dir = node.handover_dir();
    // An agent that crashed left its name behind, and one of protocol 1 its socket.
    drop(fake_predecessor(&dir));
    drop(UnixListener::bind(Path::new(&dir).join("agent.sock")).expect("bind"));
    let agent = serves_at_once(&node, &dir).await;
    let logs = agent.stderr.joined();
    assert!(
        !logs.contains("did not hand over") && logs.contains("is gone"),
        "a stale name is not a failed handover: {logs}"
    );
    assert!(
        !Path::new(&dir).join("agent.sock").exists(),
        "the stale socket file was removed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_file_that_names_no_handover_socket_is_bound_around() {
    let node = Node::new().await;
    let dir = node.handover_dir();
    std::fs::create_dir_all(&dir).expect("dir");
    let file = Path::new(&dir).join(rendezvous::NAME_FILE);
    for garbage in [
        "/run/containerd/containerd.sock".as_bytes(),
        b"pod-identity-agent/handover/../../x",
        &[0xff; 40],
        &[b'a'; 4096],
        // An agent of protocol 3 wrote its name alone: it could prove nothing, so it is not
        // taken over from (the first upgrade from it binds fresh).
        b"pod-identity-agent/handover/0123456789abcdef0123456789abcdef",
    ] {
        std::fs::write(&file, garbage).expect("write");
        let agent = serves_at_once(&node, &dir).await;
        let logs = agent.stderr.joined();
        assert!(logs.contains("did not hand over"), "{logs}");
        drop(agent);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_predecessor_that_never_answers_is_given_up_on() {
    let node = Node::new().await;
    let dir = node.handover_dir();
    // Something listens under the name and never says a word.
    let _silent = fake_predecessor(&dir);
    let started = Instant::now();
    let agent = node.agent(&dir, &[]);
    logged(&agent, "ready").await;
    let waited = started.elapsed();
    assert!(waited < Duration::from_secs(6), "{waited:?}");
    assert!(agent.stderr.joined().contains("did not hand over"));
    node.serves().await;
}

#[tokio::test]
async fn a_predecessor_that_refuses_is_bound_around() {
    let node = Node::new().await;
    let dir = node.handover_dir();
    let listener = fake_predecessor(&dir).listener;
    // A predecessor of another protocol: reads the hello, answers refused.
    let fake = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        let mut len = [0u8; 4];
        s.read_exact(&mut len).expect("len");
        let mut hello = vec![0u8; u32::from_be_bytes(len) as usize];
        s.read_exact(&mut hello).expect("hello");
        let reply = br#"{"type":"refused","reason":"protocol 5 is not this agent's 4"}"#;
        s.write_all(&(reply.len() as u32).to_be_bytes())
            .expect("write");
        s.write_all(reply).expect("write");
        String::from_utf8_lossy(&hello).into_owned()
    });
    let agent = node.agent(&dir, &[]);
    logged(&agent, "ready").await;
    let hello: serde_json::Value = serde_json::from_str(&fake.join().expect("fake")).expect("json");
    assert_eq!(hello["type"], "hello");
    assert_eq!(hello["protocol"], 4);
    assert!(agent
        .stderr
        .joined()
        .contains("protocol 5 is not this agent's 4"));
    node.serves().await;
}

/// The first agent holds the ports (it runs without handover); the second finds `found` in
/// the directory, must not fail to start, and binds once the first lets go.
async fn ports_are_waited_for(node: &Node, dir: &str, found: &str) -> support::process::Spawned {
    let mut first = node.agent("", &[]);
    logged(&first, "ready").await;
    let second = node.agent(dir, &[]);
    second
        .stderr
        .find(|l| l.contains(found).then_some(()))
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !second.stderr.joined().contains("\"ready\""),
        "it cannot serve yet"
    );
    first.sigterm();
    let _ = tokio::time::timeout(Duration::from_secs(10), first.child.wait()).await;
    let gone = Instant::now();
    logged(&second, "ready").await;
    assert!(
        gone.elapsed() < Duration::from_secs(2),
        "bound soon after the first let go: {:?}",
        gone.elapsed()
    );
    node.serves().await;
    second
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_predecessor_that_holds_its_ports_is_waited_for() {
    let node = Node::new().await;
    let dir = node.handover_dir();
    // A handover socket that never answers (a wedged agent): given up on, and the ports are
    // waited for instead of failing to start.
    let _silent = fake_predecessor(&dir);
    ports_are_waited_for(&node, &dir, "did not hand over").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_agent_is_never_talked_to_and_its_ports_are_waited_for() {
    let node = Node::new().await;
    let dir = node.handover_dir();
    std::fs::create_dir_all(&dir).expect("dir");
    // An agent of protocol 1: a pathname socket, no name file. It would hand its secrets to
    // anyone; it is sent nothing, and not waited on for an answer.
    let older = UnixListener::bind(Path::new(&dir).join("agent.sock")).expect("bind");
    let heard = std::thread::spawn(move || {
        let mut got = Vec::new();
        older.set_nonblocking(true).expect("nonblocking");
        let until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < until {
            if let Ok((mut s, _)) = older.accept() {
                s.set_nonblocking(false).expect("blocking");
                s.set_read_timeout(Some(Duration::from_millis(500)))
                    .expect("timeout");
                let _ = s.read_to_end(&mut got);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        got
    });
    let second = ports_are_waited_for(&node, &dir, "an older agent").await;
    let heard = tokio::task::spawn_blocking(move || heard.join().expect("older"))
        .await
        .expect("join");
    assert!(heard.is_empty(), "the older agent was sent {heard:?}");
    drop(second);
}

#[tokio::test]
async fn without_handover_a_second_agent_cannot_start_beside_the_first() {
    // Today's behaviour, and the reason for the handover: the ports are taken.
    let node = Node::new().await;
    let first = node.agent("", &[]);
    logged(&first, "ready").await;
    let out = node.agent("", &[]);
    let mut out = out;
    let status = tokio::time::timeout(Duration::from_secs(10), out.child.wait())
        .await
        .expect("exits")
        .expect("status");
    assert_eq!(status.code(), Some(2));
    // The exit can be seen before the last lines are read from the pipe: wait for them.
    out.stderr
        .find(|l| l.contains("cannot listen").then_some(()))
        .await;
    drop(first);
}

#[tokio::test]
async fn handed_over_entries_are_checked_like_fresh_ones() {
    use pod_identity_agent::cache::Exported;
    let old = Harness::start().await;
    let tokens: Vec<String> = (0..3).map(|_| token()).collect();
    for t in &tokens {
        assert_eq!(old.get(t).await.status, 200);
    }
    let (mut entries, _) = old.agent.cache.export(0);
    assert_eq!(entries.len(), 3);
    // One arrives garbled, one with a token that has since expired.
    let of = |entries: &[Exported], t: &str| {
        entries.iter().position(|e| e.token == t).expect("exported")
    };
    let garbled = of(&entries, &tokens[0]);
    entries[garbled].body = "{\"AccessKeyId\":\"ASIA\"}".into();
    let good = of(&entries, &tokens[1]);
    let expired = Exported {
        token: mint("default", "app", -3600),
        body: entries[good].body.clone(),
        plan: entries[good].plan,
        valid_until: entries[good].valid_until,
        state: entries[good].state,
        pod: None,
    };
    entries.push(expired);

    let new = Harness::start().await;
    // The new agent already has fresher credentials for one of them.
    new.fake.set_lifetime(Duration::from_secs(12 * 3600));
    assert_eq!(new.get(&tokens[2]).await.status, 200);
    let imported = new.agent.cache.import(entries);
    assert_eq!(
        (imported.installed, imported.kept_ours, imported.refused),
        (1, 1, 2),
        "{imported:?}"
    );
    // The one installed is served from memory: no exchange on the new side.
    let calls = new.fake.calls();
    assert_eq!(new.get(&tokens[1]).await.status, 200);
    assert_eq!(new.fake.calls(), calls);
    let old_key = old.get(&tokens[1]).await.json()["AccessKeyId"].clone();
    assert_eq!(
        new.get(&tokens[1]).await.json()["AccessKeyId"],
        old_key,
        "the same credentials"
    );
}

/// SIGTERM `agent`; it exits 0 within `within`.
async fn stops_cleanly(agent: &mut support::process::Spawned, within: Duration) {
    agent.sigterm();
    let status = tokio::time::timeout(within, agent.child.wait())
        .await
        .expect("the agent stops in time")
        .expect("status");
    assert_eq!(status.code(), Some(0), "{}", agent.stderr.joined());
}

/// Handovers a successor completed, as its `/metrics` text `m` counts them.
fn completed_takeovers(m: &str) -> f64 {
    metric(
        m,
        "pod_identity_handover_total{result=\"completed\",role=\"successor\"}",
    )
}

/// Warm `node`'s first agent with `n` tokens; they are in its cache afterwards.
async fn warm(node: &Node, n: usize) -> Arc<Vec<String>> {
    let tokens: Arc<Vec<String>> = Arc::new((0..n).map(|_| token()).collect());
    for t in tokens.iter() {
        let r = get(node.addr(), "/v1/credentials", &[("authorization", t)]).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    tokens
}

/// A first agent of `node`, warmed with `n` tokens, and a second (with `extra`) that took over
/// and offers itself in turn.
async fn handed_over(
    node: &Node,
    dir: &str,
    n: usize,
    extra: &[&str],
) -> (
    support::process::Spawned,
    support::process::Spawned,
    Arc<Vec<String>>,
) {
    let first = node.agent(dir, &[]);
    logged(&first, "ready").await;
    let tokens = warm(node, n).await;
    let second = node.agent(dir, extra);
    logged(&second, "took over from the previous agent").await;
    // Ready once it offers itself to the next agent in turn.
    logged(&second, "ready").await;
    (first, second, tokens)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_predecessor_with_a_longer_grace_is_waited_for() {
    use crate::support::fake_eks_auth::Step;
    let node = Node::new().await;
    let dir = node.handover_dir();
    let mut first = node.agent(&dir, &["--shutdown-grace", "8s"]);
    logged(&first, "ready").await;
    let tokens = warm(&node, 5).await;
    // A pod's first request whose exchange takes 1.8 s (under the 2 s an EKS Auth attempt
    // gets): in flight when the first agent retires, and longer than the second agent's own
    // handover timeout and grace (1 s and none) would wait for it.
    node.fake.script([Step {
        delay: Duration::from_millis(1800),
        ..Step::fixture("success")
    }]);
    let slow = token();
    let (addr, s) = (node.addr(), slow.clone());
    let slow_request =
        tokio::spawn(
            async move { get_result(addr, "/v1/credentials", &[("authorization", &s)]).await },
        );
    tokio::time::sleep(Duration::from_millis(100)).await;
    let calls = node.fake.calls();
    assert_eq!(calls, 6, "the slow exchange started");
    let load = Load::start(node.addr(), tokens.clone(), 2);
    let second = node.agent(&dir, &["--shutdown-grace", "0s"]);
    logged(&second, "took over from the previous agent").await;
    let slow_answer = slow_request.await.expect("join").expect("answered");
    assert_eq!(slow_answer.status, 200, "{}", slow_answer.text());
    stops_cleanly(&mut first, Duration::from_secs(5)).await;
    let (ok, failed, errors) = load.stop().await;
    assert_eq!(failed, 0, "failed requests: {errors:?}");
    assert!(ok > 20, "the load ran: {ok}");
    // The slow pod's entry came with the last entries: the second agent has it.
    let r = get(node.addr(), "/v1/credentials", &[("authorization", &slow)]).await;
    assert_eq!(r.status, 200);
    assert_eq!(node.fake.calls(), calls, "nothing was exchanged again");
    let m = get(node.metrics_addr(), "/metrics", &[]).await.text();
    assert_eq!(completed_takeovers(&m), 1.0, "{m}");
    drop(second);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_stops_after_taking_over_hands_serving_back() {
    // An old agent restarted in its old pod takes over from the new one; then the DaemonSet
    // deletes the old pod. The new agent must not be left idle with nobody accepting.
    let node = Node::new().await;
    let dir = node.handover_dir();
    let (new, mut restarted_old, tokens) =
        handed_over(&node, &dir, 5, &["--handover-wait", "1s"]).await;
    let calls = node.fake.calls();
    let theirs = rendezvous::read_name(Path::new(&dir))
        .expect("read")
        .map(|n| n.name);
    let load = Load::start(node.addr(), tokens.clone(), 4);
    tokio::time::sleep(Duration::from_millis(300)).await;
    restarted_old.sigterm();
    new.stderr
        .find(|l| l.contains("the agent that took over is gone").then_some(()))
        .await;
    // The name file names the agent that is going (for the second it serves on): this one
    // names itself again at once, so an agent starting now finds the one that stays.
    let gone = Instant::now();
    loop {
        let named = rendezvous::read_name(Path::new(&dir))
            .expect("read")
            .map(|n| n.name);
        if named != theirs && named.as_ref().is_some_and(|n| rendezvous::listening(n)) {
            break;
        }
        assert!(
            gone.elapsed() < Duration::from_millis(500),
            "not named again"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stops_cleanly(&mut restarted_old, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (ok, failed, errors) = load.stop().await;
    assert_eq!(failed, 0, "failed requests: {errors:?}");
    assert!(ok > 50, "the load ran: {ok}");
    assert_eq!(node.fake.calls(), calls, "served from its own cache again");
    node.serves().await;
    // It offers itself again: the next agent takes over from it.
    let next = node.agent(&dir, &[]);
    let took = logged(&next, "took over from the previous agent").await;
    assert!(took["entries"].as_u64() >= Some(5), "{took}");
    drop((new, next));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successor_that_crashes_hands_serving_back() {
    let node = Node::new().await;
    let dir = node.handover_dir();
    let (first, mut second, tokens) = handed_over(&node, &dir, 3, &[]).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    second.child.start_kill().expect("kill");
    let _ = second.child.wait().await;
    let killed = Instant::now();
    let r = tokio::time::timeout(
        Duration::from_secs(2),
        get(
            node.addr(),
            "/v1/credentials",
            &[("authorization", &tokens[0])],
        ),
    )
    .await
    .expect("answered: the first agent accepts again");
    assert_eq!(r.status, 200);
    assert!(killed.elapsed() < Duration::from_secs(2));
    first
        .stderr
        .find(|l| l.contains("the agent that took over is gone").then_some(()))
        .await;
    drop(first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_at_a_changed_address_is_left_and_the_rest_taken_over() {
    let node = Node::new().await;
    let dir = node.handover_dir();
    let mut first = node.agent(&dir, &[]);
    logged(&first, "ready").await;
    let tokens = warm(&node, 5).await;
    let calls = node.fake.calls();
    let load = Load::start(node.addr(), tokens.clone(), 2);
    // The metrics overlay moves metrics from the loopback to the node's IP (here 127.0.0.2),
    // same port: that socket is not taken over, the others are.
    let second = node.agent_with_metrics_at(&dir, "127.0.0.2", &["--handover-wait", "1s"]);
    let took = logged(&second, "took over from the previous agent").await;
    assert_eq!(took["entries"], 5, "{took}");
    // Ready once it offers itself to the next agent (the third, below).
    logged(&second, "ready").await;
    let logs = second.stderr.joined();
    assert!(
        logs.contains("not taking over a socket") && logs.contains("Metrics 127.0.0.1"),
        "{logs}"
    );
    stops_cleanly(&mut first, Duration::from_secs(5)).await;
    let metrics_at = SocketAddr::from(([127, 0, 0, 2], node.ports[2]));
    let m = get(metrics_at, "/metrics", &[]).await.text();
    assert_eq!(completed_takeovers(&m), 1.0, "{m}");
    let (ok, failed, errors) = load.stop().await;
    assert_eq!(failed, 0, "failed requests: {errors:?}");
    assert!(ok > 20, "the load ran: {ok}");
    assert_eq!(node.fake.calls(), calls, "the cache came along");

    // An address that overlaps the running agent's (every address, same port) cannot be bound
    // beside it: no handover, and its ports are waited for instead of failing to start.
    let third = node.agent_with_metrics_at(&dir, "0.0.0.0", &[]);
    third
        .stderr
        .find(|l| l.contains("is held by another socket").then_some(()))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!third.stderr.joined().contains("\"ready\""));
    node.serves().await;
    let mut second = second;
    second.sigterm();
    let _ = tokio::time::timeout(Duration::from_secs(10), second.child.wait()).await;
    logged(&third, "ready").await;
    node.serves().await;
    drop(third);
}
