//! An upgrade on a (namespaced) node, as the DaemonSet's surge does it: the agent serves the
//! link-local addresses on port 80 to a pod namespace under steady load (aws-config's container
//! provider, and plain requests on fresh connections); a second agent starts with the same flags;
//! the first gets SIGTERM. With the handover: no failed request and no EKS Auth call for any
//! token cached before. The same run with the handover off shows what it prevents: the second
//! agent cannot start beside the first, there is a gap once the first stops (the kubelet restarts
//! the second a second later, quicker than a real pod start), and every pod's token is exchanged
//! again.
//!
//! Needs root (`ip netns add`); skipped with a message otherwise, unless PIA_REQUIRE_NETNS=1.
//! It sets the environment `aws-config` reads, so it runs alone in a process of its own
//! (`support::alone`).

use crate::support::netns::{fake_in, namespaces, wire_pod, Netns};
use crate::support::process::{agent_command_in, init_in, spawn, Spawned};
use crate::support::*;
use aws_credential_types::provider::ProvideCredentials;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const V4: &str = "169.254.170.23:80";

/// What one upgrade cost the pods.
#[derive(Debug)]
struct Outcome {
    ok: u64,
    failed: u64,
    /// EKS Auth calls after every token had been cached.
    extra_calls: usize,
    /// From the second agent's start to its taking over.
    handover: Option<Duration>,
}

fn agent(node: &Netns, fake_endpoint: &str, handover_dir: &str) -> Spawned {
    let mut cmd = agent_command_in(
        &node.name,
        &["server", "-c", CLUSTER, "--endpoint", fake_endpoint],
    );
    cmd.env("POD_IDENTITY_AGENT_HANDOVER_DIR", handover_dir);
    spawn(cmd)
}

async fn logged(agent: &Spawned, message: &str) {
    agent
        .stderr
        .find(|l| {
            l.contains(&format!("\"message\":\"{message}\""))
                .then_some(())
        })
        .await
}

/// Steady load from inside `pod` until `stop`: two aws-config loops on the token file, two
/// loops of plain requests over `tokens` on fresh connections.
fn load(
    pod: &Netns,
    tokens: Arc<Vec<String>>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<String>> {
    pod.run(move || async move {
        let mut tasks = Vec::new();
        for _ in 0..2 {
            let (ok, failed, stop) = (ok.clone(), failed.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let provider = aws_config::ecs::EcsCredentialsProvider::builder().build();
                let mut errors = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    match provider.provide_credentials().await {
                        Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            errors.push(format!("sdk: {e:?}"));
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                errors
            }));
        }
        for w in 0..2 {
            let (ok, failed, stop, tokens) =
                (ok.clone(), failed.clone(), stop.clone(), tokens.clone());
            tasks.push(tokio::spawn(async move {
                let addr = V4.parse().expect("addr");
                let mut errors = Vec::new();
                let mut i = w;
                while !stop.load(Ordering::Relaxed) {
                    let t = &tokens[i % tokens.len()];
                    i += 2;
                    match get_result(addr, "/v1/credentials", &[("authorization", t)]).await {
                        Ok(r) if r.status == 200 => ok.fetch_add(1, Ordering::Relaxed),
                        other => {
                            errors.push(format!("plain: {:?}", other.map(|r| r.status)));
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                errors
            }));
        }
        let mut errors = Vec::new();
        for t in tasks {
            errors.extend(t.await.unwrap_or_default());
        }
        errors
    })
}

fn upgrade(handover: bool, rt: &tokio::runtime::Runtime) -> Option<Outcome> {
    let id = format!("{}{}", std::process::id(), if handover { "h" } else { "o" });
    let (node_name, pod_name) = (format!("pia-node-{id}"), format!("pia-pod-{id}"));
    let spaces = namespaces(&[&node_name, &pod_name])?;
    let (node, pod) = (&spaces[0], &spaces[1]);
    wire_pod(node, pod, &id);
    rt.block_on(init_in(&node.name, &[]));
    let fake = fake_in(node);
    let endpoint = fake.endpoint();
    let state = tempfile::tempdir().expect("tempdir");
    let dir = if handover {
        state.path().join("handover").display().to_string()
    } else {
        String::new()
    };

    let mut first = agent(node, &endpoint, &dir);
    rt.block_on(logged(&first, "ready"));

    // The pods' tokens: one in a file for the SDK, five more for plain requests. All cached.
    let token_file = state.path().join("token");
    std::fs::write(&token_file, token()).expect("token");
    std::env::set_var("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", &token_file);
    std::env::set_var(
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "http://169.254.170.23/v1/credentials",
    );
    let tokens: Arc<Vec<String>> = Arc::new((0..5).map(|_| token()).collect());
    let warm = tokens.clone();
    pod.run(move || async move {
        aws_config::ecs::EcsCredentialsProvider::builder()
            .build()
            .provide_credentials()
            .await
            .expect("sdk warm");
        for t in warm.iter() {
            let r = get(
                V4.parse().expect("addr"),
                "/v1/credentials",
                &[("authorization", t)],
            )
            .await;
            assert_eq!(r.status, 200);
        }
    })
    .join()
    .expect("warm");
    let cached = fake.calls();
    assert_eq!(cached, 6);

    let (ok, failed, stop) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    let running = load(pod, tokens, ok.clone(), failed.clone(), stop.clone());
    std::thread::sleep(Duration::from_millis(500));

    let started = Instant::now();
    let mut second = agent(node, &endpoint, &dir);
    let took = if handover {
        rt.block_on(logged(&second, "took over from the previous agent"));
        Some(started.elapsed())
    } else {
        // Without the handover the ports are taken: it fails to start, as the reference does.
        let status = rt
            .block_on(async {
                tokio::time::timeout(Duration::from_secs(10), second.child.wait()).await
            })
            .expect("exits")
            .expect("status");
        assert_eq!(status.code(), Some(2), "{}", second.stderr.joined());
        None
    };
    std::thread::sleep(Duration::from_millis(300));
    first.sigterm();
    let exited = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(15), first.child.wait()).await })
        .expect("the first agent exits")
        .expect("status");
    assert_eq!(exited.code(), Some(0), "{}", first.stderr.joined());
    if !handover {
        // The kubelet restarts the second agent; a second is quicker than a real restart.
        std::thread::sleep(Duration::from_secs(1));
        second = agent(node, &endpoint, &dir);
        rt.block_on(logged(&second, "ready"));
    }
    std::thread::sleep(Duration::from_millis(1000));
    stop.store(true, Ordering::Relaxed);
    let errors = running.join().expect("load");
    let outcome = Outcome {
        ok: ok.load(Ordering::Relaxed),
        failed: failed.load(Ordering::Relaxed),
        extra_calls: fake.calls() - cached,
        handover: took,
    };
    eprintln!(
        "handover {}: {outcome:?}; first errors: {:?}",
        if handover { "on" } else { "off" },
        errors.iter().take(3).collect::<Vec<_>>()
    );
    drop(second);
    Some(outcome)
}

#[test]
fn an_upgrade_loses_no_request_and_no_cached_credentials() {
    if !alone("netns_handover::an_upgrade_loses_no_request_and_no_cached_credentials") {
        return;
    }
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let _in = rt.enter();
    let Some(with) = upgrade(true, &rt) else {
        return;
    };
    assert_eq!(with.failed, 0, "{with:?}");
    assert_eq!(with.extra_calls, 0, "{with:?}");
    assert!(with.ok > 100, "{with:?}");
    assert!(
        with.handover.is_some_and(|d| d < Duration::from_secs(3)),
        "{with:?}"
    );

    // The same upgrade without the handover: the test can tell the difference.
    let Some(without) = upgrade(false, &rt) else {
        return;
    };
    assert!(without.failed > 0, "{without:?}");
    assert!(
        without.extra_calls >= 6,
        "every cached token exchanged again: {without:?}"
    );
}
