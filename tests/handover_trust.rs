//! The handover socket's trust boundary (security review H2, M3, M4, L2, L12): what a peer on
//! the socket gets before it proved itself and committed, what a successor accepts from
//! something posing as a predecessor, and what happens when either side fails half-way.
//!
//! The peers here are played by this test with the crate's own wire types, over the real
//! socket of an agent process; the abstract-socket proof of a network namespace is answered or
//! not as each case needs.

mod support;

use pod_identity_agent::handover::wire::{Challenge, Channel, Msg, WireEntry, WireListener};
use pod_identity_agent::server::listener::Role;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};
use support::node::{logged, Node};
use support::*;

/// This test's side of the namespace proof: a challenge it issues and checks.
struct Proof {
    listener: UnixListener,
    challenge: Challenge,
}

impl Proof {
    fn issue() -> Proof {
        let name = format!("pod-identity-agent/test/{}", fastrand::u64(..));
        let listener =
            UnixListener::bind_addr(&UnixAddr::from_abstract_name(name.as_bytes()).expect("name"))
                .expect("bind");
        Proof {
            listener,
            challenge: Challenge {
                name,
                nonce: format!("{:032x}", fastrand::u128(..)),
            },
        }
    }

    fn expect_answer(&self) {
        let (mut s, _) = self
            .listener
            .accept()
            .expect("the agent answers the challenge");
        let mut got = vec![0u8; self.challenge.nonce.len()];
        s.read_exact(&mut got).expect("nonce");
        assert_eq!(got, self.challenge.nonce.as_bytes());
    }
}

fn answer(c: &Challenge) {
    let mut s =
        UnixStream::connect_addr(&UnixAddr::from_abstract_name(c.name.as_bytes()).expect("name"))
            .expect("the agent's challenge is reachable from here");
    s.write_all(c.nonce.as_bytes()).expect("nonce");
}

fn hello(proof: &Proof) -> Msg {
    Msg::Hello {
        protocol: 2,
        min_protocol: 2,
        version: "test".into(),
        pid: std::process::id(),
        challenge: Some(proof.challenge.clone()),
    }
}

/// A peer posing as a successor: connects, proves itself, and reads until `Listeners`.
fn successor_until_listeners(dir: &str) -> (Channel, Vec<&'static str>, Vec<OwnedFd>) {
    let stream = UnixStream::connect(Path::new(dir).join("agent.sock")).expect("connect");
    let mut channel = Channel::new(stream, Duration::from_secs(10)).expect("channel");
    let proof = Proof::issue();
    channel.send(&hello(&proof)).expect("hello");
    proof.expect_answer();
    let mut seen = Vec::new();
    loop {
        let (msg, fds) = channel.recv().expect("a message");
        seen.push(msg.name());
        match msg {
            Msg::Prove { challenge, .. } => answer(&challenge),
            Msg::Listeners { .. } => return (channel, seen, fds),
            _ => {}
        }
    }
}

async fn serving_agent(node: &Node, dir: &str, extra: &[&str]) -> support::process::Spawned {
    let agent = node.agent(dir, extra);
    logged(&agent, "ready").await;
    agent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_takes_over_gets_no_token_or_credential() {
    let node = Node::new().await;
    let dir = node.handover_dir();
    let agent = serving_agent(&node, &dir, &[]).await;
    node.serves().await;
    let d = dir.clone();
    let (seen, rest) = tokio::task::spawn_blocking(move || {
        let (mut channel, seen, fds) = successor_until_listeners(&d);
        drop(fds);
        // Never `Taken`: the agent gives up on us after five handover timeouts (5 s).
        let rest: Vec<&'static str> =
            std::iter::from_fn(|| channel.recv().ok().map(|(m, _)| m.name())).collect();
        (seen, rest)
    })
    .await
    .expect("peer");
    assert!(
        seen.iter()
            .all(|m| ["prove", "keys", "listeners"].contains(m)),
        "{seen:?}"
    );
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
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successor_that_dies_after_the_predecessor_retired_makes_it_exit_at_once() {
    let node = Node::new().await;
    let dir = node.handover_dir();
    let mut agent = serving_agent(&node, &dir, &[]).await;
    node.serves().await;
    let d = dir.clone();
    tokio::task::spawn_blocking(move || {
        let (mut channel, _, _fds) = successor_until_listeners(&d);
        channel.send(&Msg::Taken).expect("taken");
        // The snapshot, then the predecessor retires; we die before the rest.
        loop {
            match channel.recv().expect("snapshot").0 {
                Msg::Retiring => break,
                Msg::Entries { .. } => {}
                other => panic!("unexpected {}", other.name()),
            }
        }
    })
    .await
    .expect("peer");
    let started = Instant::now();
    let status = tokio::time::timeout(Duration::from_secs(15), agent.child.wait())
        .await
        .expect("the predecessor exits instead of idling unseen")
        .expect("status");
    assert_eq!(status.code(), Some(1), "{}", agent.stderr.joined());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    agent
        .stderr
        .find(|l| {
            l.contains("exiting so that an agent binds fresh")
                .then_some(())
        })
        .await;
    // Its descriptors are gone with it: a new agent binds fresh at once.
    let second = serving_agent(&node, &dir, &[]).await;
    node.serves().await;
    drop(second);
}

/// A peer posing as a predecessor on `dir`'s socket: proves itself, then offers `listeners`
/// with `fds`; returns what the successor answered.
fn predecessor_offering(
    dir: &str,
    listeners: Vec<WireListener>,
    fds: Vec<OwnedFd>,
    then: impl FnOnce(&mut Channel) + Send + 'static,
) -> std::thread::JoinHandle<Vec<&'static str>> {
    std::fs::create_dir_all(dir).expect("dir");
    let listener = UnixListener::bind(Path::new(dir).join("agent.sock")).expect("bind");
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().expect("the successor connects");
        let mut channel = Channel::new(stream, Duration::from_secs(10)).expect("channel");
        let Ok((
            Msg::Hello {
                challenge: Some(theirs),
                ..
            },
            _,
        )) = channel.recv()
        else {
            panic!("no hello with a challenge");
        };
        answer(&theirs);
        let ours = Proof::issue();
        channel
            .send(&Msg::Prove {
                protocol: 2,
                challenge: ours.challenge.clone(),
            })
            .expect("prove");
        ours.expect_answer();
        let raw: Vec<_> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        channel
            .send_with_fds(&Msg::Listeners { listeners }, &raw)
            .expect("listeners");
        then(&mut channel);
        std::iter::from_fn(|| channel.recv().ok().map(|(m, _)| m.name())).collect()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successor_refuses_sockets_that_are_not_its_own_and_binds_fresh() {
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
            |_| {},
        );
        let agent = node.agent(&dir, &[]);
        logged(&agent, "ready").await;
        let answered = tokio::task::spawn_blocking(move || fake.join().expect("fake"))
            .await
            .expect("join");
        assert_eq!(answered, vec!["refused"], "{what}");
        assert!(
            agent.stderr.joined().contains("unusable socket"),
            "{what}: {}",
            agent.stderr.joined()
        );
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

#[tokio::test]
async fn a_socket_in_a_directory_someone_else_owns_is_not_talked_to() {
    let node = Node::new().await;
    let dir = node.handover_dir();
    std::fs::create_dir_all(&dir).expect("dir");
    let planted = UnixListener::bind(Path::new(&dir).join("agent.sock")).expect("bind");
    planted.set_nonblocking(true).expect("nonblocking");
    std::os::unix::fs::chown(&dir, Some(1234), Some(1234)).expect("chown");
    let agent = node.agent(&dir, &[]);
    logged(&agent, "ready").await;
    assert!(
        matches!(planted.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the agent connected to a socket in a directory it does not own"
    );
    node.serves().await;
    drop(agent);
}

#[test]
fn a_peer_in_another_network_namespace_gets_nothing() {
    let node_ns = format!("pia-ho-{}", std::process::id());
    let Some(spaces) = netns::namespaces(&[&node_ns]) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let node = rt.block_on(Node::new());
    let dir = node.handover_dir();
    let agent = rt.block_on(serving_agent(&node, &dir, &[]));
    // A root process that shares the directory but not the network namespace (a root
    // container with the hostPath): its challenge cannot be answered from the agent's.
    let d = dir.clone();
    let seen = spaces[0]
        .run(move || async move {
            let stream = UnixStream::connect(Path::new(&d).join("agent.sock")).expect("connect");
            let mut channel = Channel::new(stream, Duration::from_secs(5)).expect("channel");
            let proof = Proof::issue();
            channel.send(&hello(&proof)).expect("hello");
            std::iter::from_fn(|| channel.recv().ok().map(|(m, _)| m.name())).collect::<Vec<_>>()
        })
        .join()
        .expect("peer");
    assert!(seen.is_empty(), "{seen:?}");
    let m = rt
        .block_on(get(node.metrics_addr(), "/metrics", &[]))
        .text();
    assert_eq!(
        metric(
            &m,
            "pod_identity_handover_total{result=\"failed\",role=\"predecessor\"}"
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "pod_identity_handover_total{result=\"started\",role=\"predecessor\"}"
        ),
        0.0,
        "{m}"
    );
    drop(agent);
}
