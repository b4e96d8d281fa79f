//! On a real (namespaced) node: `init`, then `server` with its default bind hosts and port 80,
//! fetched by real SDK clients from a pod namespace on the real link-local addresses.
//!
//! Topology: a "node" and a "pod" namespace joined by a veth pair (documentation addresses
//! 192.0.2.0/24 and 2001:db8::/64). The pod routes 169.254.170.23 and fd00:ec2::23 to the node's
//! veth address, as CNIs do (IPv6 neighbour discovery answers only for addresses on the link
//! asked). The fake EKS Auth runs on the node's loopback. Every packet to a link-local address is
//! sent and received inside these namespaces, which are deleted on exit, pass or fail.
//!
//! Needs root (`ip netns add`). Skipped with a message otherwise, unless PIA_REQUIRE_NETNS=1
//! (CI), where it fails. It sets the environment `aws-config` reads, so it runs alone in a
//! process of its own (`support::alone`).

use crate::support::fake_eks_auth::FakeEksAuth;
use crate::support::netns::{exec, fake_in, namespaces, wire_pod, Netns};
use crate::support::process::{agent_command_in, init_in, spawn, Spawned};
use crate::support::python::{in_netns, python_with, script};
use crate::support::*;
use aws_credential_types::provider::ProvideCredentials;

/// `server` in `ns` with default bind hosts and port 80; waits until `expect` listeners serve.
async fn server_in(ns: &Netns, fake: &FakeEksAuth, expect: usize) -> Spawned {
    let endpoint = fake.endpoint();
    let agent = spawn(agent_command_in(
        &ns.name,
        &["server", "-c", CLUSTER, "--endpoint", &endpoint],
    ));
    let mut seen = 0;
    agent
        .stderr
        .find(|l| {
            if l.contains("\"serving credentials\"") {
                seen += 1;
            }
            (seen == expect).then_some(())
        })
        .await;
    agent
}

/// GET from inside `ns`.
fn get_in(ns: &Netns, addr: &str, path: &str, headers: Vec<(String, String)>) -> Reply {
    let addr: std::net::SocketAddr = addr.parse().expect("addr");
    let path = path.to_owned();
    ns.run(move || async move {
        let h: Vec<(&str, &str)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        get(addr, &path, &h).await
    })
    .join()
    .expect("request thread")
}

#[test]
fn link_local_serving_end_to_end() {
    if !alone("netns::link_local_serving_end_to_end") {
        return;
    }
    let id = std::process::id();
    let (node_name, pod_name, bare_name, clash_name) = (
        format!("pia-node-{id}"),
        format!("pia-pod-{id}"),
        format!("pia-v4only-{id}"),
        format!("pia-clash-{id}"),
    );
    let Some(spaces) = namespaces(&[&node_name, &pod_name, &bare_name, &clash_name]) else {
        return;
    };
    let (node, pod, v4only, clash) = (&spaces[0], &spaces[1], &spaces[2], &spaces[3]);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let _in_runtime = rt.enter();

    // Wire node <-> pod.
    wire_pod(node, pod, &id.to_string());

    // init, twice: idempotent.
    for _ in 0..2 {
        rt.block_on(init_in(&node.name, &[]));
    }
    let fake = fake_in(node);
    let agent = rt.block_on(server_in(node, &fake, 2));

    // Readiness, from the node: both listeners accepting.
    let ready = get_in(node, "127.0.0.1:2703", "/readyz", vec![]);
    assert_eq!(ready.status, 200, "{}", ready.text());
    assert_eq!(ready.json()["listeners"].as_array().map(Vec::len), Some(2));

    // The pod's token file.
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, token()).expect("token");

    // aws-config's container provider from the pod, over IPv4 and over IPv6.
    std::env::set_var("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", &token_file);
    for uri in [
        "http://169.254.170.23/v1/credentials",
        "http://[fd00:ec2::23]/v1/credentials",
    ] {
        std::env::set_var("AWS_CONTAINER_CREDENTIALS_FULL_URI", uri);
        let creds = pod
            .run(|| async {
                aws_config::ecs::EcsCredentialsProvider::builder()
                    .build()
                    .provide_credentials()
                    .await
            })
            .join()
            .expect("thread")
            .unwrap_or_else(|e| panic!("{uri}: {e:?}\n{}", agent.stderr.joined()));
        assert_eq!(creds.access_key_id(), "ASIAEXAMPLE0001", "{uri}");
    }
    assert_eq!(fake.calls(), 1, "second fetch was a cache hit");

    // boto3 from the pod, over IPv4.
    if let Some(python) = python_with(&["boto3"]) {
        let mut cmd = script(
            python,
            "boto3_fetch.py",
            &[
                (
                    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                    "http://169.254.170.23/v1/credentials".into(),
                ),
                (
                    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
                    token_file.display().to_string(),
                ),
            ],
        );
        cmd = in_netns(&pod.name, &cmd);
        let out = cmd.output().expect("boto3");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got: serde_json::Value = serde_json::from_str(stdout.trim()).expect("json");
        assert_eq!(got["method"], "container-role");
        assert_eq!(got["access_key"], "ASIAEXAMPLE0001");
    }

    // A Host naming another address is refused (DNS rebinding), from the pod.
    let t = std::fs::read_to_string(&token_file).expect("token");
    let refused = get_in(
        pod,
        "169.254.170.23:80",
        "/v1/credentials",
        vec![
            ("host".into(), "169.254.170.2".into()),
            ("authorization".into(), t.clone()),
        ],
    );
    assert_eq!(refused.status, 403);
    let v6_spelling = get_in(
        pod,
        "[fd00:ec2::23]:80",
        "/v1/credentials",
        vec![
            ("host".into(), "[FD00:EC2:0::23]".into()),
            ("authorization".into(), t),
        ],
    );
    assert_eq!(v6_spelling.status, 200, "IPv6 Host compared as an address");
    drop(agent);

    // A node without IPv6: init still succeeds, the agent serves IPv4 and /readyz says so.
    exec(
        &v4only.name,
        &["sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1"],
    );
    exec(
        &v4only.name,
        &["sysctl", "-q", "-w", "net.ipv6.conf.default.disable_ipv6=1"],
    );
    let log = rt.block_on(init_in(&v4only.name, &[]));
    assert!(log.contains("IPv6 unavailable"), "{log}");
    let fake4 = fake_in(v4only);
    let agent4 = rt.block_on(server_in(v4only, &fake4, 1));
    let ready = get_in(v4only, "127.0.0.1:2703", "/readyz", vec![]);
    assert_eq!(ready.status, 200, "{}", ready.text());
    let body = ready.json();
    assert_eq!(body["listeners"].as_array().map(Vec::len), Some(1));
    assert_eq!(body["unavailable"][0], "[fd00:ec2::23]:80");
    let tok = token();
    let ok = get_in(
        v4only,
        "169.254.170.23:80",
        "/v1/credentials",
        vec![("authorization".into(), tok)],
    );
    assert_eq!(ok.status, 200, "{}", ok.text());
    drop(agent4);

    // A node that already routes the address through another link: init refuses, naming both.
    exec(&clash.name, &["ip", "link", "add", "other0", "type", "ifb"]);
    exec(&clash.name, &["ip", "link", "set", "other0", "up"]);
    exec(
        &clash.name,
        &["ip", "route", "add", "169.254.170.23/32", "dev", "other0"],
    );
    let out = rt
        .block_on(agent_command_in(&clash.name, &["init"]).output())
        .expect("init");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.contains("other0") && last.contains("pod-id-link0") && last.contains("169.254.170.23"),
        "{last}"
    );
}
