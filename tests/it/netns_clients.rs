//! Who a client is, on a (namespaced) node (issue 16): every process in the host's network
//! namespace is one client however many addresses it binds, and pods on addresses of their own
//! are not hurt by it, for new exchanges or for connections.
//!
//! Topology as `tests/netns.rs`: a "node" and a "pod" namespace joined by a veth pair; `init`
//! puts 169.254.170.23 on the node; the fake EKS Auth runs on the node's loopback. The attacker
//! runs in the node namespace (where any process can bind 127.x.y.z and the node's addresses);
//! pods use addresses of their own in the pod namespace (192.0.2.10 and up). Needs root: skipped
//! otherwise, unless PIA_REQUIRE_NETNS=1 (CI).

use crate::support::netns::{exec, fake_in, namespaces, wire_pod, Netns};
use crate::support::process::{agent_command_in, init_in, spawn, Spawned};
use crate::support::*;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

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
    let _one_at_a_time = FLOODS.blocking_lock();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let _in_runtime = rt.enter();
    wire_pod(node, pod, &format!("c{id}"));
    let pod_dev = format!("piapc{id}");
    for i in 0..40 {
        let a = format!("{}/24", pod_ip(i));
        exec(&pod.name, &["ip", "addr", "add", &a, "dev", &pod_dev]);
    }
    rt.block_on(init_in(&node.name, &["--no-ipv6"]));
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
        .filter(|t| namespace_of(t).as_deref() == Some("attacker"))
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

    // Connections (review M4): the host holds half the pool (its most), four pods hold their
    // share, and every one of those connections loops on requests the agent refuses, paced, so
    // each looks busy nearly all the time. A new pod still gets in: a connection waiting out a
    // refusal's pace is idle, and the heaviest client's is closed to make room.
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
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s = stop.clone();
    let hog = node.run(move || async move {
        let from = |i: usize| -> IpAddr { format!("127.0.3.{}", i + 2).parse().expect("ip") };
        refusal_loops((0..60).map(from).collect(), s).await
    });
    std::thread::sleep(Duration::from_millis(500));
    let s = stop.clone();
    let pods = pod.run(move || async move {
        let from = |i: usize| pod_ip(30 + i / 8);
        refusal_loops((0..32).map(from).collect(), s).await
    });
    std::thread::sleep(Duration::from_millis(500));
    let newcomer = pod.run(|| async {
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
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let host_held = hog.join().expect("hog");
    let pods_held = pods.join().expect("pods");
    eprintln!(
        "connections: host held {host_held} of 60 tried, pods {pods_held} of 32; new pod {result:?} in {took:?}"
    );
    assert!(host_held <= 32, "at most half the pool: {host_held}");
    assert_eq!(pods_held, 32, "pods at their share");
    assert_eq!(result, Ok(200), "a new pod on a full, busy pool");
    assert!(took < Duration::from_secs(1), "{took:?}");
    drop(agent);
}

/// One keep-alive connection from each of `from`, opened at once, each looping on requests
/// without a token (refused, after the agent's pace) until `stop`; how many were accepted.
async fn refusal_loops(
    from: Vec<IpAddr>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> usize {
    let loops: Vec<_> = from
        .into_iter()
        .map(|ip| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let Ok(stream) = connect_from(Some(ip), agent_addr()).await else {
                    return false;
                };
                let Ok((mut sender, conn)) =
                    hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                        .await
                else {
                    return false;
                };
                tokio::spawn(conn);
                let mut accepted = false;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let req = hyper::Request::get("/v1/credentials")
                        .header("host", AGENT)
                        .body(http_body_util::Empty::<bytes::Bytes>::new())
                        .expect("request");
                    match sender.send_request(req).await {
                        // Refused for want of a token: the connection was accepted. (A refused
                        // connection gets a canned 429 or 503 and is closed.)
                        Ok(r) if r.status() == 400 => accepted = true,
                        _ => break,
                    }
                }
                accepted
            })
        })
        .collect();
    let mut accepted = 0;
    for l in loops {
        accepted += usize::from(l.await.unwrap_or(false));
    }
    accepted
}
