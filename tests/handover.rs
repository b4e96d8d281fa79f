//! Upgrades without a gap (issue 9), with real agent processes on loopback: a second agent
//! started with the same flags takes over the first one's sockets and cache, and the first one
//! stops at SIGTERM, without one failed request or one extra EKS Auth call; and every way the
//! handover can fail still ends with an agent serving, in bounded time.
//!
//! Each test names its own handover directory under a temp dir.

mod support;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::node::{logged, Node};
use support::*;

/// Requests on fresh connections, round-robin over `tokens`, until stopped; counts outcomes.
struct Load {
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Vec<String>>>,
}

impl Load {
    fn start(addr: SocketAddr, tokens: Arc<Vec<String>>, workers: usize) -> Load {
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..workers)
            .map(|w| {
                let (ok, failed, stop, tokens) = (
                    Arc::clone(&ok),
                    Arc::clone(&failed),
                    stop.clone(),
                    tokens.clone(),
                );
                tokio::spawn(async move {
                    let mut errors = Vec::new();
                    let mut i = w;
                    while !stop.load(Ordering::Relaxed) {
                        let t = &tokens[i % tokens.len()];
                        i += workers;
                        match get_result(addr, "/v1/credentials", &[("authorization", t)]).await {
                            Ok(r) if r.status == 200 => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(r) => {
                                failed.fetch_add(1, Ordering::Relaxed);
                                errors.push(format!("{}: {}", r.status, r.text()));
                            }
                            Err(e) => {
                                failed.fetch_add(1, Ordering::Relaxed);
                                errors.push(e);
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    errors
                })
            })
            .collect();
        Load {
            ok,
            failed,
            stop,
            tasks,
        }
    }

    async fn stop(self) -> (u64, u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let mut errors = Vec::new();
        for t in self.tasks {
            errors.extend(t.await.unwrap_or_default());
        }
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            errors,
        )
    }
}

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
    first.sigterm();
    let status = tokio::time::timeout(Duration::from_secs(5), first.child.wait())
        .await
        .expect("the first agent stops promptly once it handed over")
        .expect("status");
    assert_eq!(status.code(), Some(0), "{}", first.stderr.joined());
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
    assert_eq!(
        metric(
            &m,
            "pod_identity_handover_total{result=\"completed\",role=\"successor\"}"
        ),
        1.0,
        "{m}"
    );
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
    // The successor listens for its own successor now.
    assert!(std::os::unix::net::UnixStream::connect(Path::new(&dir).join("agent.sock")).is_ok());
    drop(second);
}

#[tokio::test]
async fn a_stale_socket_does_not_stop_a_new_agent() {
    let node = Node::new().await;
    let dir = node.handover_dir();
    std::fs::create_dir_all(&dir).expect("dir");
    // An agent that crashed left its socket behind.
    drop(UnixListener::bind(Path::new(&dir).join("agent.sock")).expect("bind"));
    let started = Instant::now();
    let agent = node.agent(&dir, &[]);
    logged(&agent, "ready").await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    node.serves().await;
    assert!(
        !agent.stderr.joined().contains("did not hand over"),
        "a stale socket is not a failed handover"
    );
}

#[tokio::test]
async fn a_predecessor_that_never_answers_is_given_up_on() {
    let node = Node::new().await;
    let dir = node.handover_dir();
    std::fs::create_dir_all(&dir).expect("dir");
    // Something listens on the socket and never says a word.
    let _silent = UnixListener::bind(Path::new(&dir).join("agent.sock")).expect("bind");
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
    std::fs::create_dir_all(&dir).expect("dir");
    let listener = UnixListener::bind(Path::new(&dir).join("agent.sock")).expect("bind");
    // A predecessor of another protocol: reads the hello, answers refused.
    let fake = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        let mut len = [0u8; 4];
        s.read_exact(&mut len).expect("len");
        let mut hello = vec![0u8; u32::from_be_bytes(len) as usize];
        s.read_exact(&mut hello).expect("hello");
        let reply = br#"{"type":"refused","reason":"protocol 1 is not this agent's 2"}"#;
        s.write_all(&(reply.len() as u32).to_be_bytes())
            .expect("write");
        s.write_all(reply).expect("write");
        String::from_utf8_lossy(&hello).into_owned()
    });
    let agent = node.agent(&dir, &[]);
    logged(&agent, "ready").await;
    let hello: serde_json::Value = serde_json::from_str(&fake.join().expect("fake")).expect("json");
    assert_eq!(hello["type"], "hello");
    assert_eq!(hello["protocol"], 2);
    assert!(agent
        .stderr
        .joined()
        .contains("protocol 1 is not this agent's 2"));
    node.serves().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_predecessor_that_holds_its_ports_is_waited_for() {
    let node = Node::new().await;
    // The first agent runs without handover (an old version), holding the ports.
    let mut first = node.agent("", &[]);
    logged(&first, "ready").await;
    // The new one finds a handover socket that never answers (a wedged agent), gives up on it,
    // and must not give up on the ports: it waits for them instead of failing to start.
    let dir = node.handover_dir();
    std::fs::create_dir_all(&dir).expect("dir");
    let _silent = UnixListener::bind(Path::new(&dir).join("agent.sock")).expect("bind");
    let second = node.agent(&dir, &[]);
    second
        .stderr
        .find(|l| l.contains("did not hand over").then_some(()))
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
