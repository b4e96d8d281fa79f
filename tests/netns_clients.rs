//! Who a client is, on a (namespaced) node (issue 16): every process in the host's network
//! namespace is one client however many addresses it binds, and pods on addresses of their own
//! are not hurt by it, for new exchanges or for connections.
//!
//! Topology as `tests/netns.rs`: a "node" and a "pod" namespace joined by a veth pair; `init`
//! puts 169.254.170.23 on the node; the fake EKS Auth runs on the node's loopback. The attacker
//! runs in the node namespace (where any process can bind 127.x.y.z and the node's addresses);
//! pods use addresses of their own in the pod namespace (192.0.2.10 and up). Needs root: skipped
//! otherwise, unless PIA_REQUIRE_NETNS=1 (CI).

mod support;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};
use support::netns::{exec, fake_in, namespaces, wire_pod, Netns};
use support::process::{agent_command_in, spawn, Spawned};
use support::*;
use tokio::io::AsyncWriteExt;

const AGENT: &str = "169.254.170.23:80";

fn agent_addr() -> SocketAddr {
    AGENT.parse().expect("addr")
}

/// `server` in `ns` on 169.254.170.23:80 with `extra` flags; waits until it serves.
async fn server_in(ns: &Netns, endpoint: &str, extra: &[&str]) -> Spawned {
    let mut args = vec![
        "server",
        "-c",
        CLUSTER,
        "--endpoint",
        endpoint,
        "-b",
        "169.254.170.23",
    ];
    args.extend_from_slice(extra);
    let agent = spawn(agent_command_in(&ns.name, &args));
    agent.listening("serving credentials").await;
    agent
}

/// Pod addresses in the pod namespace: 192.0.2.10 and up.
fn pod_ip(i: usize) -> IpAddr {
    format!("192.0.2.{}", 10 + i).parse().expect("ip")
}

/// A token for a namespace the fake refuses (`InvalidTokenException`), as EKS Auth refuses forgeries.
fn forged() -> String {
    mint("attacker", "x", 3600)
}

#[test]
fn the_host_is_one_client_and_pods_on_their_own_addresses_are_not_hurt_by_it() {
    let id = std::process::id();
    let (node_name, pod_name) = (format!("pia-cn-{id}"), format!("pia-cp-{id}"));
    let Some(spaces) = namespaces(&[&node_name, &pod_name]) else {
        return;
    };
    let (node, pod) = (&spaces[0], &spaces[1]);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let _in_runtime = rt.enter();
    wire_pod(node, pod, &format!("c{id}"));
    let pod_dev = format!("piapc{id}");
    for i in 0..40 {
        let a = format!("{}/24", pod_ip(i));
        exec(&pod.name, &["ip", "addr", "add", &a, "dev", &pod_dev]);
    }
    let out = rt
        .block_on(agent_command_in(&node.name, &["init", "--no-ipv6"]).output())
        .expect("init");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fake = fake_in(node);
    fake.answer_namespace("attacker", "error-invalid-token");
    let endpoint = fake.endpoint();

    // New exchanges: 3,000 forged tokens from 500 host addresses, while 20 new pods start.
    let agent = rt.block_on(server_in(node, &endpoint, &[]));
    let started = Instant::now();
    let flood = node.run(|| async {
        let mut statuses = std::collections::BTreeMap::new();
        for wave in 0..30 {
            let tasks: Vec<_> = (0..100)
                .map(|j| {
                    let n = (wave * 100 + j) % 500;
                    let from: IpAddr = format!("127.0.{}.{}", n / 250 + 2, n % 250 + 2)
                        .parse()
                        .expect("ip");
                    let t = forged();
                    tokio::spawn(async move {
                        request_from(
                            Some(from),
                            agent_addr(),
                            "GET",
                            "/v1/credentials",
                            &[("authorization", &t)],
                        )
                        .await
                        .map(|r| r.status)
                        .unwrap_or(0)
                    })
                })
                .collect();
            for t in tasks {
                *statuses.entry(t.await.unwrap_or(0)).or_insert(0) += 1;
            }
        }
        statuses
    });
    let pods = pod.run(|| async {
        let mut slowest = Duration::ZERO;
        for i in 0..20 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let sent = Instant::now();
            let r = request_from(
                Some(pod_ip(i)),
                agent_addr(),
                "GET",
                "/v1/credentials",
                &[("authorization", &token())],
            )
            .await
            .unwrap_or_else(|e| panic!("pod {i}: {e}"));
            assert_eq!(r.status, 200, "pod {i} during the flood: {}", r.text());
            slowest = slowest.max(sent.elapsed());
        }
        slowest
    });
    let slowest = pods.join().expect("pods");
    let statuses = flood.join().expect("flood");
    let elapsed = started.elapsed();
    let attacker_calls = fake
        .tokens()
        .iter()
        .filter(|t| namespace_of(t) == "attacker")
        .count();
    let budget = 10 + elapsed.as_secs() as usize + 1;
    eprintln!(
        "flood: {statuses:?} in {elapsed:?}; {attacker_calls} EKS Auth calls (budget {budget}); slowest new pod {slowest:?}"
    );
    assert!(
        slowest < Duration::from_secs(1),
        "a new pod waited {slowest:?}"
    );
    assert_eq!(statuses.get(&200), None, "{statuses:?}");
    assert!(
        attacker_calls <= budget,
        "{attacker_calls} calls from 500 host addresses; one client's budget is {budget}"
    );
    drop(agent);

    // Connections: the pool is full (the host past its share while there was room, pods at
    // theirs); a new pod gets in by an idle connection of the heaviest client being closed.
    let agent = rt.block_on(server_in(
        node,
        &endpoint,
        &[
            "--max-connections",
            "64",
            "--max-connections-per-client",
            "8",
        ],
    ));
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let hog = node.run(move || async move {
        // 48 of 64 are accepted (three-quarters); the rest are refused for the host's share.
        let mut held = Vec::new();
        for i in 0..60 {
            let from: IpAddr = format!("127.0.3.{}", i + 2).parse().expect("ip");
            if let Ok(mut s) = connect_from(Some(from), agent_addr()).await {
                let _ = s.write_all(b"GET /v1/credentials HTTP/1.1\r\n").await;
                held.push(s);
            }
        }
        let _ = tokio::task::spawn_blocking(move || rx.recv()).await;
    });
    std::thread::sleep(Duration::from_millis(500));
    let newcomer = pod.run(|| async {
        // Two pods at their share, filling the pool; then a third.
        let mut held = Vec::new();
        for p in 0..2 {
            for _ in 0..8 {
                let mut s = connect_from(Some(pod_ip(30 + p)), agent_addr())
                    .await
                    .expect("connect");
                let _ = s.write_all(b"GET /v1/credentials HTTP/1.1\r\n").await;
                held.push(s);
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let sent = Instant::now();
        let r = request_from(
            Some(pod_ip(39)),
            agent_addr(),
            "GET",
            "/v1/credentials",
            &[("authorization", &token())],
        )
        .await;
        (r.map(|r| r.status), sent.elapsed())
    });
    let (result, took) = newcomer.join().expect("newcomer");
    let _ = tx.send(());
    hog.join().expect("hog");
    assert_eq!(result, Ok(200), "a new pod on a full pool");
    assert!(took < Duration::from_secs(1), "{took:?}");
    drop(agent);
}
