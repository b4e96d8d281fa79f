//! The handover socket's trust boundary (security reviews H1, H2, M3, M4, M6, M7, L2, L12): what
//! a peer gets before it committed, what a relay in another network namespace or a process of
//! another user gets, what a successor accepts from something posing as a predecessor, what a
//! slow or greedy peer costs, and what happens when either side fails half-way.
//!
//! The peers here are played by this test with the crate's own wire types, over the real
//! abstract socket of an agent process, found by the name it publishes.

use crate::support;
use crate::support::node::{logged, Load, Node, REQUEST_TIMEOUT};
use crate::support::*;
use pod_identity_agent::handover::auth::{Nonce, Secret};
use pod_identity_agent::handover::rendezvous::{self, Named, Published};
use pod_identity_agent::handover::wire::{Channel, Msg, WireEntry, WireListener};
use pod_identity_agent::handover::wire::{MIN_PROTOCOL, PROTOCOL};
use pod_identity_agent::server::bind::Role;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A successor's hello to the agent `named`, proving it read the name file.
fn hello(named: &Named) -> Msg {
    let nonce = Nonce::generate().expect("nonce");
    Msg::Hello {
        protocol: PROTOCOL,
        min_protocol: MIN_PROTOCOL,
        version: "test".into(),
        pid: std::process::id(),
        nonce: nonce.to_hex(),
        proof: named.secret.successor_proof(&nonce, &named.name),
    }
}

fn named_in(dir: &str) -> Named {
    rendezvous::read_name(Path::new(dir))
        .expect("name file")
        .expect("named")
}

/// The agent's abstract socket, by the name in `dir`.
fn connect_to(dir: &str) -> UnixStream {
    rendezvous::connect(&named_in(dir).name, Duration::ZERO).expect("connect")
}

/// A peer posing as a successor, with the name file read: says hello, and reads until
/// `Listeners`.
fn successor_until_listeners(dir: &str) -> (Channel, Vec<&'static str>, Vec<OwnedFd>) {
    let mut channel = Channel::new(connect_to(dir), Duration::from_secs(10)).expect("channel");
    channel.set_max_frame(1 << 20);
    channel.send(&hello(&named_in(dir))).expect("hello");
    let mut seen = Vec::new();
    loop {
        let (msg, fds) = channel.recv().expect("a message");
        seen.push(msg.name());
        if let Msg::Listeners { .. } = msg {
            return (channel, seen, fds);
        }
    }
}

/// A peer that says a hello's length (100 bytes), then one byte of it every `every`, up to
/// `bytes`: each read succeeds within a handover timeout, the hello never does. Its thread
/// answers how long it wrote until the agent cut it off, or `None` if it never did.
fn slow_peer(
    dir: &str,
    every: Duration,
    bytes: usize,
) -> std::thread::JoinHandle<Option<Duration>> {
    let mut s = connect_to(dir);
    s.write_all(&100u32.to_be_bytes()).expect("length");
    std::thread::spawn(move || {
        let started = Instant::now();
        for _ in 0..bytes {
            std::thread::sleep(every);
            if s.write_all(b" ").is_err() {
                return Some(started.elapsed());
            }
        }
        None
    })
}

async fn serving_agent(node: &Node, dir: &str, extra: &[&str]) -> support::process::Spawned {
    let agent = node.agent(dir, extra);
    logged(&agent, "ready").await;
    agent
}

/// A node and its serving agent, with handover in the node's directory.
async fn node_with_agent() -> (Node, String, support::process::Spawned) {
    let node = Node::new().await;
    let dir = node.handover_dir();
    let agent = serving_agent(&node, &dir, &[]).await;
    (node, dir, agent)
}

/// A genuine successor, started now, that takes over within 3 s: whatever else holds the
/// predecessor's socket does not hold it up.
async fn takes_over_at_once(node: &Node, dir: &str) -> support::process::Spawned {
    let started = Instant::now();
    let successor = node.agent(dir, &[]);
    logged(&successor, "took over from the previous agent").await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the successor was held up: {:?}",
        started.elapsed()
    );
    successor
}

async fn warm(node: &Node, n: usize) -> Vec<String> {
    let tokens: Vec<String> = (0..n).map(|_| token()).collect();
    for t in &tokens {
        let r = get(node.addr(), "/v1/credentials", &[("authorization", t)]).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    tokens
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_takes_over_gets_no_token_or_credential() {
    let node = Node::new().await;
    let dir = node.handover_dir();
    let agent = serving_agent(&node, &dir, &[]).await;
    warm(&node, 2).await;
    let d = dir.clone();
    let (seen, rest, fds) = tokio::task::spawn_blocking(move || {
        let (mut channel, seen, fds) = successor_until_listeners(&d);
        // Never `Taken`: the agent gives up on us after six handover timeouts (6 s).
        let waited = Instant::now();
        let rest: Vec<&'static str> =
            std::iter::from_fn(|| channel.recv().ok().map(|(m, _)| m.name())).collect();
        let waited = waited.elapsed();
        assert!(
            waited > Duration::from_secs(5) && waited < Duration::from_secs(8),
            "a successor building its server is given six handover timeouts: {waited:?}"
        );
        (seen, rest, fds.len())
    })
    .await
    .expect("peer");
    assert_eq!(seen.first(), Some(&"welcome"), "{seen:?}");
    assert!(
        seen.iter()
            .all(|m| ["welcome", "keys", "listeners"].contains(m)),
        "{seen:?}"
    );
    assert_eq!(fds, 3, "the listening sockets, and only those");
    assert!(
        rest.is_empty(),
        "sent after an uncommitted listeners: {rest:?}"
    );
    let m = get(node.metrics_addr(), "/metrics", &[]).await.text();
    assert_eq!(
        metric(
            &m,
            "pod_identity_handover_total{result=\"abandoned\",role=\"predecessor\"}"
        ),
        1.0,
        "{m}"
    );
    // Still serving, and still ready to hand over to a real successor.
    node.serves().await;
    let next = node.agent(&dir, &[]);
    logged(&next, "took over from the previous agent").await;
    drop((agent, next));
}

/// A process of the agent's own user in its network namespace (any root hostNetwork container)
/// finds the socket in /proc/net/unix; without the name file's secret it is sent nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_did_not_read_the_name_file_is_sent_nothing() {
    let node = Node::new().await;
    let dir = node.handover_dir();
    let agent = serving_agent(&node, &dir, &[]).await;
    warm(&node, 2).await;
    let named = named_in(&dir);
    let nonce = Nonce::generate().expect("nonce");
    let other = Secret::generate().expect("secret");
    let hellos = [
        // Protocol 3's hello: no proof at all.
        r#"{"type":"hello","protocol":4,"min_protocol":3,"version":"x","pid":1}"#.to_owned(),
        // A proof under a guessed secret.
        serde_json::json!({"type": "hello", "protocol": 4, "min_protocol": 4, "version": "x",
            "pid": 1, "nonce": nonce.to_hex(), "proof": other.successor_proof(&nonce, &named.name)})
        .to_string(),
        // The real secret's proof, replayed for another nonce.
        serde_json::json!({"type": "hello", "protocol": 4, "min_protocol": 4, "version": "x",
            "pid": 1, "nonce": Nonce::generate().expect("nonce").to_hex(),
            "proof": named.secret.successor_proof(&nonce, &named.name)})
        .to_string(),
        // The predecessor's own proof turned around.
        serde_json::json!({"type": "hello", "protocol": 4, "min_protocol": 4, "version": "x",
            "pid": 1, "nonce": nonce.to_hex(),
            "proof": named.secret.predecessor_proof(&nonce, &named.name)})
        .to_string(),
    ];
    let name = named.name.clone();
    let answers = tokio::task::spawn_blocking(move || {
        hellos
            .iter()
            .map(|hello| {
                let mut s = rendezvous::connect(&name, Duration::ZERO).expect("connect");
                s.write_all(&(hello.len() as u32).to_be_bytes())
                    .expect("length");
                s.write_all(hello.as_bytes()).expect("hello");
                s.set_read_timeout(Some(Duration::from_secs(5)))
                    .expect("timeout");
                // Descriptors travel with bytes: no byte, no socket.
                let mut got = Vec::new();
                let read = s.read_to_end(&mut got);
                (read.is_ok(), got.len())
            })
            .collect::<Vec<_>>()
    })
    .await
    .expect("peers");
    assert_eq!(answers, vec![(true, 0); 4], "closed, with nothing sent");
    let m = get(node.metrics_addr(), "/metrics", &[]).await.text();
    assert_eq!(
        metric(
            &m,
            "pod_identity_handover_total{result=\"unauthenticated\",role=\"predecessor\"}"
        ),
        4.0,
        "{m}"
    );
    assert!(agent
        .stderr
        .joined()
        .contains("could not prove it read this agent's name file"));
    // Still serving, and a successor that read the file takes over.
    node.serves().await;
    let next = node.agent(&dir, &[]);
    let took = logged(&next, "took over from the previous agent").await;
    // The two pods warmed, and the one `serves` asked for.
    assert_eq!(took["entries"], 3, "{took}");
    drop((agent, next));
}

/// Anyone root in the namespace can connect to the handover socket and go again before a word
/// (or send half a frame, or a message that is not `Hello`) as fast as it likes: each is counted
/// `unauthenticated`, not a failed handover, and logged at a pace, so it neither floods the log
/// queue (and the audit lines behind it) nor makes the operators' failure count mean nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_that_go_before_proving_anything_are_unauthenticated_and_logged_at_a_pace() {
    const PEERS: usize = 300;
    let (node, dir, agent) = node_with_agent().await;
    let name = named_in(&dir).name;
    tokio::task::spawn_blocking(move || {
        for i in 0..PEERS {
            let mut s = rendezvous::connect(&name, Duration::ZERO).expect("connect");
            match i % 3 {
                0 => {}
                1 => s.write_all(&[0, 0]).expect("half a length"),
                _ => {
                    let taken = br#"{"type":"taken"}"#;
                    s.write_all(&(taken.len() as u32).to_be_bytes())
                        .and_then(|()| s.write_all(taken))
                        .expect("a message that is not hello");
                }
            }
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    })
    .await
    .expect("peers");
    let sample = |result: &str| {
        format!("pod_identity_handover_total{{result=\"{result}\",role=\"predecessor\"}}")
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let m = loop {
        let m = get(node.metrics_addr(), "/metrics", &[]).await.text();
        if metric(&m, &sample("unauthenticated")) >= PEERS as f64 || Instant::now() > deadline {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(metric(&m, &sample("unauthenticated")), PEERS as f64, "{m}");
    assert_eq!(metric(&m, &sample("failed")), 0.0, "{m}");
    let lines = agent.stderr.joined();
    let warned = lines.matches("could not prove it read").count();
    assert!(
        (1..=3).contains(&warned),
        "{warned} lines for {PEERS} peers"
    );
    assert_eq!(lines.matches("handover to a new agent failed").count(), 0);
    // Still serving, and a successor that read the file takes over at once.
    node.serves().await;
    let next = takes_over_at_once(&node, &dir).await;
    drop((agent, next));
}

/// A name file that names the running agent with a secret not its own (restored from a backup,
/// or written by something with the directory): every successor would fail to prove it read
/// it and bind fresh. The agent writes its own secret back within a look or two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_file_with_another_secret_is_written_again() {
    let (node, dir, agent) = node_with_agent().await;
    warm(&node, 2).await;
    let own = named_in(&dir);
    let other = Secret::generate().expect("secret");
    rendezvous::write_name(Path::new(&dir), &own.name, &other).expect("name");
    let written = Instant::now();
    loop {
        let now = named_in(&dir);
        if now.secret.is(&own.secret) {
            assert_eq!(now.name, own.name);
            break;
        }
        assert!(now.secret.is(&other), "a third secret");
        assert!(
            written.elapsed() < Duration::from_secs(5),
            "not written again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let next = takes_over_at_once(&node, &dir).await;
    let took = logged(&next, "took over from the previous agent").await;
    assert_eq!(took["entries"], 2, "{took}");
    drop((agent, next));
}

/// The handover directory cannot be made when the agent starts (here a file is in its place;
/// on a node, a mount not there yet or a full disk): the agent serves, and names its socket
/// as soon as it can, so the next agent still takes over instead of binding fresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_file_that_cannot_be_written_at_start_is_written_once_it_can() {
    let node = Node::new().await;
    let dir = node.handover_dir();
    std::fs::write(&dir, b"not a directory").expect("a file in the directory's place");
    let agent = serving_agent(&node, &dir, &[]).await;
    warm(&node, 2).await;
    agent
        .stderr
        .find(|l| {
            l.contains("cannot name this agent's handover socket yet")
                .then_some(())
        })
        .await;
    std::fs::remove_file(&dir).expect("the file goes");
    let gone = Instant::now();
    while !matches!(rendezvous::read_name(Path::new(&dir)), Ok(Some(_))) {
        assert!(gone.elapsed() < Duration::from_secs(5), "not named");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let next = takes_over_at_once(&node, &dir).await;
    let took = logged(&next, "took over from the previous agent").await;
    assert_eq!(took["entries"], 2, "{took}");
    drop((agent, next));
}

/// An agent died without a successor; something of its user bound its abstract name and waits
/// for the next agent. Without the name file's secret it cannot show it is the agent named
/// there: the next agent uses nothing it offers and binds fresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_at_a_dead_agents_name_hands_the_next_agent_nothing() {
    let node = Node::new().await;
    let dir = node.handover_dir();
    std::fs::create_dir_all(&dir).expect("dir");
    let impostor = Published::listen().expect("listen");
    // The dead agent's file: the name the impostor took, and a secret it never saw.
    rendezvous::write_name(
        Path::new(&dir),
        &impostor.name,
        &Secret::generate().expect("secret"),
    )
    .expect("write");
    // It offers a listening socket at the agent's own address, which the next agent would take
    // over (and the impostor keep a copy of) if it believed it.
    let listener = std::net::TcpListener::bind(node.addr()).expect("bind");
    let credentials = node.addr();
    let impostor = std::thread::spawn(move || {
        let (stream, _) = impostor.listener.accept().expect("the next agent connects");
        let mut channel = Channel::new(stream, Duration::from_secs(10)).expect("channel");
        let Ok((Msg::Hello { nonce, .. }, _)) = channel.recv() else {
            panic!("no hello");
        };
        let nonce = Nonce::from_hex(&nonce).expect("a nonce");
        // Its best guess: a proof under the secret it made itself.
        let _ = channel.send(&Msg::Welcome {
            protocol: PROTOCOL,
            grace_ms: 0,
            proof: impostor.secret.predecessor_proof(&nonce, &impostor.name),
        });
        let listeners = vec![WireListener {
            role: Role::Credentials,
            addr: credentials,
        }];
        let _ = channel.send_with_fds(&Msg::Listeners { listeners }, &[listener.as_raw_fd()]);
        let sent: Vec<&'static str> =
            std::iter::from_fn(|| channel.recv().ok().map(|(m, _)| m.name())).collect();
        sent
    });
    let agent = node.agent(&dir, &[]);
    logged(&agent, "ready").await;
    let sent: Vec<&'static str> = tokio::task::spawn_blocking(move || impostor.join())
        .await
        .expect("join")
        .expect("impostor");
    assert!(sent.is_empty(), "the agent went on: {sent:?}");
    let logs = agent.stderr.joined();
    assert!(
        logs.contains("could not prove it read the handover name file"),
        "{logs}"
    );
    assert!(
        !logs.contains("took over from the previous agent"),
        "{logs}"
    );
    node.serves().await;
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successor_that_dies_after_the_predecessor_retired_makes_it_serve_again() {
    let node = Node::new().await;
    let dir = node.handover_dir();
    let mut agent = serving_agent(&node, &dir, &[]).await;
    let tokens = Arc::new(warm(&node, 3).await);
    let calls = node.fake.calls();
    let named = named_in(&dir);
    // Pods asking throughout, on fresh connections.
    let load = Load::start(node.addr(), tokens.clone(), 2);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let d = dir.clone();
    let died = tokio::task::spawn_blocking(move || {
        let (mut channel, _, _fds) = successor_until_listeners(&d);
        channel.set_max_frame(64 << 20);
        channel.send(&Msg::Taken).expect("taken");
        // The snapshot, then the predecessor retires; we die while importing the rest.
        loop {
            match channel.recv().expect("snapshot").0 {
                Msg::Retiring => break,
                Msg::Entries { .. } => {}
                other => panic!("unexpected {}", other.name()),
            }
        }
        std::thread::sleep(Duration::from_millis(300));
        Instant::now()
    })
    .await
    .expect("peer");
    // Nobody else accepts on its sockets: it must, again, with its own cache.
    let r = tokio::time::timeout(
        REQUEST_TIMEOUT,
        get(
            node.addr(),
            "/v1/credentials",
            &[("authorization", &tokens[0])],
        ),
    )
    .await
    .expect("answered: the predecessor accepts again");
    assert_eq!(r.status, 200);
    assert!(died.elapsed() < REQUEST_TIMEOUT);
    logged(&agent, "serving again, with this agent's cache").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (ok, failed, errors) = load.stop().await;
    assert_eq!(failed, 0, "failed requests: {errors:?}");
    assert!(ok > 20, "the load ran: {ok}");
    assert_eq!(node.fake.calls(), calls, "its cache came along");
    assert!(
        agent.child.try_wait().expect("wait").is_none(),
        "it did not exit: {}",
        agent.stderr.joined()
    );
    // And it offers itself again, on the same socket, which stayed open and named meanwhile
    // (a successor that came then waited in its queue).
    let again = named_in(&dir);
    assert!(again.name == named.name && again.secret.is(&named.secret));
    let next = node.agent(&dir, &[]);
    let took = logged(&next, "took over from the previous agent").await;
    assert_eq!(took["entries"], 3, "{took}");
    drop((agent, next));
}

/// A peer posing as a predecessor, named in `dir`: welcomes the successor, offers `listeners`
/// with `fds`, then runs `then`; returns what `then` returns.
fn predecessor_offering<T: Send + 'static>(
    dir: &str,
    listeners: Vec<WireListener>,
    fds: Vec<OwnedFd>,
    then: impl FnOnce(&mut Channel) -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    std::fs::create_dir_all(dir).expect("dir");
    let published = Published::listen().expect("listen");
    published.publish(Path::new(dir)).expect("publish");
    std::thread::spawn(move || {
        let (stream, _) = published.listener.accept().expect("the successor connects");
        let mut channel = Channel::new(stream, Duration::from_secs(10)).expect("channel");
        let Ok((Msg::Hello { nonce, .. }, _)) = channel.recv() else {
            panic!("no hello");
        };
        let nonce = Nonce::from_hex(&nonce).expect("a nonce");
        channel
            .send(&Msg::Welcome {
                protocol: PROTOCOL,
                grace_ms: 0,
                proof: published.secret.predecessor_proof(&nonce, &published.name),
            })
            .expect("welcome");
        let raw: Vec<_> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        channel
            .send_with_fds(&Msg::Listeners { listeners }, &raw)
            .expect("listeners");
        then(&mut channel)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successor_drops_sockets_that_are_not_its_own_and_binds_their_addresses_itself() {
    let node = Node::new().await;
    let credentials = node.addr();
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
    let elsewhere = std::net::TcpListener::bind("127.0.0.9:0").expect("listener");
    for (what, fd) in [
        ("a UDP socket", OwnedFd::from(udp.try_clone().expect("dup"))),
        (
            "a listener on 127.0.0.9",
            OwnedFd::from(elsewhere.try_clone().expect("dup")),
        ),
    ] {
        let dir = node
            .dir
            .path()
            .join(format!("h-{}", fastrand::u32(..)))
            .display()
            .to_string();
        let fake = predecessor_offering(
            &dir,
            vec![WireListener {
                role: Role::Credentials,
                addr: credentials,
            }],
            vec![fd],
            |channel| {
                let answer = channel.recv().map(|(m, _)| m.name());
                let _ = channel.send(&Msg::Retiring);
                let _ = channel.send(&Msg::Done);
                answer.ok()
            },
        );
        let agent = node.agent(&dir, &[]);
        logged(&agent, "took over from the previous agent").await;
        logged(&agent, "ready").await;
        let answered = tokio::task::spawn_blocking(move || fake.join().expect("fake"))
            .await
            .expect("join");
        assert_eq!(answered, Some("taken"), "{what}");
        let logs = agent.stderr.joined();
        assert!(
            logs.contains("not taking over a socket of the running agent"),
            "{what}: {logs}"
        );
        // Served on its own socket at that address.
        node.serves().await;
        drop(agent);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successor_holds_no_more_cache_than_it_can_and_still_serves() {
    let node = Node::new().await;
    let dir = node.handover_dir();
    // The real listening socket the successor expects, handed over by the fake predecessor.
    let listener = std::net::TcpListener::bind(node.addr()).expect("bind");
    let fd = OwnedFd::from(listener.try_clone().expect("dup"));
    let fake = predecessor_offering(
        &dir,
        vec![WireListener {
            role: Role::Credentials,
            addr: node.addr(),
        }],
        vec![fd],
        |channel| {
            let Ok((Msg::Taken, _)) = channel.recv() else {
                panic!("no taken");
            };
            // Entries of 64 KiB each, far past what --max-cache-size 1 holds.
            let entry = || WireEntry {
                token: "t".repeat(64 * 1024),
                body: String::new(),
                refresh_at_ms: 0,
                hard_at_ms: 0,
                serve_queued_until_ms: 0,
                valid_until_ms: 0,
                demand: 0,
                failures: 0,
                retry_after_ms: 0,
                pod: None,
            };
            for _ in 0..40 {
                if channel
                    .send(&Msg::Entries {
                        entries: (0..1).map(|_| entry()).collect(),
                    })
                    .is_err()
                {
                    break;
                }
            }
        },
    );
    let agent = node.agent(&dir, &["--max-cache-size", "1"]);
    agent
        .stderr
        .find(|l| l.contains("more than this agent holds").then_some(()))
        .await;
    logged(&agent, "ready").await;
    drop(listener);
    node.serves().await;
    let _ = tokio::task::spawn_blocking(move || fake.join()).await;
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_the_predecessor_remembers_are_remembered_after_it() {
    let node = Node::new().await;
    node.fake.answer_namespace("forged", "error-invalid-token");
    let dir = node.handover_dir();
    let first = serving_agent(&node, &dir, &[]).await;
    let forged = mint("forged", "x", 3600);
    let r = get(
        node.addr(),
        "/v1/credentials",
        &[("authorization", &forged)],
    )
    .await;
    assert_eq!(r.status, 400);
    let calls = node.fake.calls();
    let second = node.agent(&dir, &[]);
    logged(&second, "took over from the previous agent").await;
    first.sigterm();
    let r = get(
        node.addr(),
        "/v1/credentials",
        &[("authorization", &forged)],
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(r.text().contains("remembered"), "{}", r.text());
    assert_eq!(node.fake.calls(), calls, "the successor did not ask again");
    drop((first, second));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fifo_planted_for_the_name_wedges_no_agent() {
    let node = Node::new().await;
    let dir = node.handover_dir();
    let mut first = serving_agent(&node, &dir, &[]).await;
    warm(&node, 2).await;
    // Root elsewhere with the directory: a FIFO where the name goes, which blocks whoever
    // opens it to read until someone writes.
    let file = Path::new(&dir).join(rendezvous::NAME_FILE);
    std::fs::remove_file(&file).expect("remove");
    let path = std::ffi::CString::new(file.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
    // The serving agent names its socket again, and a new agent takes over as usual.
    first
        .stderr
        .find(|l| {
            l.contains("named this agent's handover socket again")
                .then_some(())
        })
        .await;
    let second = node.agent(&dir, &[]);
    let took = logged(&second, "took over from the previous agent").await;
    assert_eq!(took["entries"], 2, "{took}");
    first.sigterm();
    let status = tokio::time::timeout(Duration::from_secs(10), first.child.wait())
        .await
        .expect("it stops")
        .expect("status");
    assert!(status.success(), "{}", first.stderr.joined());
    drop(second);
}

#[tokio::test]
async fn a_name_in_a_directory_someone_else_owns_is_not_followed() {
    let node = Node::new().await;
    let dir = node.handover_dir();
    std::fs::create_dir_all(&dir).expect("dir");
    let planted = Published::listen().expect("listen");
    planted.publish(Path::new(&dir)).expect("publish");
    planted.listener.set_nonblocking(true).expect("nonblocking");
    std::os::unix::fs::chown(&dir, Some(1234), Some(1234)).expect("chown");
    let agent = node.agent(&dir, &[]);
    logged(&agent, "ready").await;
    assert!(
        matches!(planted.listener.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the agent connected to a name in a directory it does not own"
    );
    node.serves().await;
    drop(agent);
}

/// What a relay in another network namespace managed.
#[derive(Debug, Default)]
struct Relayed {
    /// Whether it could reach the predecessor's abstract name.
    reached_predecessor: bool,
    /// Connections it accepted on its own name or on a planted `agent.sock`.
    accepted: usize,
    /// Bytes those connections sent it.
    received: Vec<u8>,
}

#[test]
fn a_relay_in_another_network_namespace_sits_between_no_one() {
    let ns = format!("pia-relay-{}", std::process::id());
    let Some(spaces) = netns::namespaces(&[&ns]) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let _in = rt.enter();
    let (node, dir, predecessor) = rt.block_on(node_with_agent());
    let tokens = rt.block_on(warm(&node, 3));
    // Root in a pod's network namespace with the hostPath: it moves the predecessor's name
    // aside, names its own socket (and plants a pathname `agent.sock`, which crosses
    // namespaces), and tries to relay between whoever connects and the predecessor.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let d = dir.clone();
    let relay = spaces[0].run(move || async move {
        let dir = Path::new(&d);
        let real = rendezvous::read_name(dir)
            .expect("read")
            .expect("named")
            .name;
        std::fs::rename(dir.join(rendezvous::NAME_FILE), dir.join("agent.name.real"))
            .expect("rename");
        let mut got = Relayed {
            reached_predecessor: rendezvous::connect(&real, Duration::ZERO).is_ok(),
            ..Relayed::default()
        };
        let own = Published::listen().expect("listen in the pod namespace");
        own.publish(dir).expect("publish");
        own.listener.set_nonblocking(true).expect("nonblocking");
        let planted = UnixListener::bind(dir.join("agent.sock")).expect("plant");
        planted.set_nonblocking(true).expect("nonblocking");
        ready_tx.send(()).expect("ready");
        let until = Instant::now() + Duration::from_secs(4);
        while Instant::now() < until {
            // The predecessor names its socket again when the name is dead where it runs: keep
            // the relay's name in place.
            if rendezvous::read_name(dir).ok().flatten().map(|n| n.name) != Some(own.name.clone()) {
                own.publish(dir).expect("publish");
            }
            for l in [&own.listener, &planted] {
                if let Ok((mut s, _)) = l.accept() {
                    got.accepted += 1;
                    // Whatever comes goes to the predecessor, if it can be reached.
                    got.reached_predecessor |= rendezvous::connect(&real, Duration::ZERO).is_ok();
                    s.set_nonblocking(false).expect("blocking");
                    s.set_read_timeout(Some(Duration::from_millis(500)))
                        .expect("timeout");
                    let mut buf = Vec::new();
                    let _ = s.read_to_end(&mut buf);
                    got.received.extend(buf);
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        got
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("relay ready");
    // The real successor starts under the relay's name.
    let successor = node.agent(&dir, &[]);
    let found = rt.block_on(successor.stderr.find(|l| {
        ["older agent", "is gone", "did not hand over", "took over"]
            .into_iter()
            .find(|m| l.contains(m))
    }));
    let got = relay.join().expect("relay");
    assert!(!got.reached_predecessor, "{got:?}");
    assert!(
        got.received.is_empty(),
        "the relay was sent {} bytes",
        got.received.len()
    );
    // Nobody answered under the relay's name where the successor runs; the planted socket
    // looks like an older agent's, which is never sent anything.
    assert_eq!(found, "older agent", "{}", successor.stderr.joined());
    let logs = successor.stderr.joined();
    assert!(
        !logs.contains("offers its sockets") && !logs.contains("took over"),
        "the successor took something: {logs}"
    );
    // The predecessor still serves, from its cache, and names its socket again.
    let calls = node.fake.calls();
    for t in &tokens {
        let r = rt.block_on(get(node.addr(), "/v1/credentials", &[("authorization", t)]));
        assert_eq!(r.status, 200);
    }
    assert_eq!(node.fake.calls(), calls);
    rt.block_on(predecessor.stderr.find(|l| {
        l.contains("named this agent's handover socket again")
            .then_some(())
    }));
    drop(successor);
    drop(spaces);
    let _ = std::fs::remove_file(Path::new(&dir).join("agent.sock"));
    let healed = Instant::now();
    while rendezvous::read_name(Path::new(&dir))
        .ok()
        .flatten()
        .is_none_or(|n| !rendezvous::listening(&n.name))
    {
        assert!(healed.elapsed() < Duration::from_secs(3), "not named again");
        std::thread::sleep(Duration::from_millis(50));
    }
    // With the relay gone, the next agent takes over as usual: the relay cost a delay only.
    let next = node.agent(&dir, &[]);
    rt.block_on(logged(&next, "took over from the previous agent"));
    drop((predecessor, next));
}

/// Run `f` on a thread whose user is `nobody` (a raw `setresuid`, which changes only the
/// calling thread's credentials, unlike libc's wrapper).
fn as_nobody<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    std::thread::spawn(move || {
        // SAFETY: a raw setresuid system call affects only this thread.
        let rc = unsafe { libc::syscall(libc::SYS_setresuid, 65534, 65534, 65534) };
        assert_eq!(rc, 0, "setresuid: {}", std::io::Error::last_os_error());
        f()
    })
}

/// Whether this test can play another user (root only); skipped with a message otherwise,
/// unless CI requires it.
fn can_play_another_user() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        std::env::var("PIA_REQUIRE_NETNS").as_deref() != Ok("1"),
        "needs root"
    );
    eprintln!("SKIPPED: needs root to play another user");
    false
}

#[test]
fn a_predecessor_of_another_user_is_sent_nothing() {
    if !can_play_another_user() {
        return;
    }
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let _in = rt.enter();
    let node = rt.block_on(Node::new());
    let dir = node.handover_dir();
    std::fs::create_dir_all(&dir).expect("dir");
    // Another user in the agent's namespace listens on an abstract name, and the name file
    // (written by root elsewhere, say) names it.
    let (named_tx, named_rx) = std::sync::mpsc::channel();
    let impostor = as_nobody(move || {
        let p = Published::listen().expect("listen as nobody");
        named_tx.send(p.name.clone()).expect("send");
        p.listener.set_nonblocking(true).expect("nonblocking");
        let until = Instant::now() + Duration::from_secs(3);
        let (mut accepted, mut got) = (0, Vec::new());
        while Instant::now() < until {
            if let Ok((mut s, _)) = p.listener.accept() {
                accepted += 1;
                s.set_nonblocking(false).expect("blocking");
                s.set_read_timeout(Some(Duration::from_millis(500)))
                    .expect("timeout");
                let _ = s.read_to_end(&mut got);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        (accepted, got)
    });
    let name = named_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("named");
    rendezvous::write_name(Path::new(&dir), &name, &Secret::generate().expect("secret"))
        .expect("name");
    let agent = node.agent(&dir, &[]);
    rt.block_on(logged(&agent, "ready"));
    let (accepted, got) = impostor.join().expect("impostor");
    assert_eq!(accepted, 1, "the successor connected");
    assert!(got.is_empty(), "the impostor was sent {} bytes", got.len());
    let logs = agent.stderr.joined();
    assert!(logs.contains("runs as user 65534"), "{logs}");
    rt.block_on(node.serves());
    drop(agent);
}

#[test]
fn another_user_in_the_agents_namespace_gets_nothing_and_holds_up_no_one() {
    if !can_play_another_user() {
        return;
    }
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let _in = rt.enter();
    let (node, dir, predecessor) = rt.block_on(node_with_agent());
    let name = named_in(&dir).name;
    // Abstract names are listed in /proc/net/unix for anyone: it can find and connect to it.
    let (connected_tx, connected_rx) = std::sync::mpsc::channel();
    let stranger = as_nobody(move || {
        let mut s = rendezvous::connect(&name, Duration::ZERO).expect("anyone can connect");
        let hello = br#"{"type":"hello","protocol":4,"min_protocol":4,"version":"x","pid":1}"#;
        let _ = s.write_all(&(hello.len() as u32).to_be_bytes());
        let _ = s.write_all(hello);
        connected_tx.send(()).expect("connected");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let started = Instant::now();
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        (got, started.elapsed())
    });
    connected_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("connected");
    // A real successor, while that connection is open.
    let successor = rt.block_on(takes_over_at_once(&node, &dir));
    let (got, waited) = stranger.join().expect("stranger");
    assert!(got.is_empty(), "the stranger was sent {} bytes", got.len());
    assert!(
        waited < Duration::from_secs(2),
        "closed at once: {waited:?}"
    );
    assert!(predecessor.stderr.joined().contains("from another user"));
    rt.block_on(node.serves());
    drop((predecessor, successor));
}

#[test]
fn an_oversized_frame_is_cut_at_4_kib() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let _in = rt.enter();
    let (node, dir, agent) = rt.block_on(node_with_agent());
    let mut s = connect_to(&dir);
    s.set_write_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    // A 64 MiB hello, written as fast as the agent reads it.
    let started = Instant::now();
    let mut written = 0usize;
    let mut cut = s.write_all(&(64u32 << 20).to_be_bytes()).is_err();
    let chunk = vec![b' '; 64 * 1024];
    while !cut && written < 8 << 20 {
        match s.write(&chunk) {
            Ok(n) => written += n,
            Err(_) => cut = true,
        }
    }
    assert!(cut, "the agent kept reading: {written} bytes");
    assert!(written < 1 << 20, "{written} bytes were taken");
    assert!(started.elapsed() < Duration::from_secs(3));
    rt.block_on(
        agent
            .stderr
            .find(|l| l.contains("larger than allowed").then_some(())),
    );
    rt.block_on(node.serves());
    let next = node.agent(&dir, &[]);
    rt.block_on(logged(&next, "took over from the previous agent"));
    drop((agent, next));
}

#[test]
fn silent_peers_are_dropped_at_their_deadline_and_a_successor_after_them_takes_over() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let _in = rt.enter();
    let (node, dir, agent) = rt.block_on(node_with_agent());
    rt.block_on(warm(&node, 2));
    // As many peers as the agent serves at once connect and never say a word.
    let silent: Vec<_> = (0..4)
        .map(|_| {
            let mut s = connect_to(&dir);
            std::thread::spawn(move || {
                s.set_read_timeout(Some(Duration::from_secs(10)))
                    .expect("timeout");
                let started = Instant::now();
                let mut got = Vec::new();
                let closed = s.read_to_end(&mut got).is_ok();
                (closed, got.len(), started.elapsed())
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    // A genuine successor comes after them, and takes over without waiting for them.
    let successor = node.agent(&dir, &[]);
    let took = rt.block_on(logged(&successor, "took over from the previous agent"));
    assert_eq!(took["entries"], 2, "{took}");
    for peer in silent {
        let (closed, got, waited) = peer.join().expect("silent peer");
        assert!(
            closed && got == 0,
            "closed, and sent nothing: {closed} {got}"
        );
        // One handover timeout (1 s) for its hello.
        assert!(
            waited > Duration::from_millis(800) && waited < Duration::from_secs(3),
            "{waited:?}"
        );
    }
    rt.block_on(node.serves());
    drop((agent, successor));
}

/// Far more silent and slow peers than the agent serves at once, all connected before the
/// successor: they wait in the lobby without a thread or a place, so the successor, whose
/// `Hello` proves it read the name file, is served at once (with places held by whoever
/// connected first, it would wait seconds per four of them and give up).
#[test]
fn many_silent_and_slow_peers_ahead_hold_up_no_successor() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let _in = rt.enter();
    let (node, dir, agent) = rt.block_on(node_with_agent());
    rt.block_on(warm(&node, 2));
    let silent: Vec<UnixStream> = (0..48).map(|_| connect_to(&dir)).collect();
    let slow: Vec<_> = (0..16)
        .map(|_| slow_peer(&dir, Duration::from_millis(200), 20))
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    let successor = rt.block_on(takes_over_at_once(&node, &dir));
    for mut s in silent {
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut got = Vec::new();
        assert!(
            s.read_to_end(&mut got).is_ok() && got.is_empty(),
            "closed, sent nothing"
        );
    }
    for peer in slow {
        assert!(
            peer.join().expect("slow peer").is_some(),
            "a slow peer was not cut off"
        );
    }
    rt.block_on(node.serves());
    drop((agent, successor));
}

#[test]
fn a_slow_peer_is_cut_off_at_its_deadline_and_holds_up_no_successor() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let _in = rt.enter();
    let (node, dir, agent) = rt.block_on(node_with_agent());
    rt.block_on(warm(&node, 2));
    // One byte every 300 ms: each read succeeds well within the handover timeout (1 s), and
    // the hello would take 30 s.
    let loris = slow_peer(&dir, Duration::from_millis(300), 100);
    std::thread::sleep(Duration::from_millis(200));
    let successor = rt.block_on(takes_over_at_once(&node, &dir));
    let cut = loris.join().expect("loris");
    assert!(
        cut.is_some_and(|t| t < Duration::from_secs(4)),
        "the slow peer was not cut off: {cut:?}"
    );
    rt.block_on(node.serves());
    drop((agent, successor));
}
