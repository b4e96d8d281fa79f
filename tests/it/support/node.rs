//! One node's agents as processes on loopback: fixed ports (so a successor wants the same
//! sockets), a handover directory under a temp dir, and the fake EKS Auth.

use super::fake_eks_auth::FakeEksAuth;
use super::process::{agent_command, loopback_server, spawn, Spawned};
use super::*;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The flags every agent of one test gets: fixed ports, so a successor wants the same sockets.
pub struct Node {
    pub fake: FakeEksAuth,
    pub dir: tempfile::TempDir,
    pub ports: [u16; 3],
}

impl Node {
    pub async fn new() -> Node {
        Node {
            fake: FakeEksAuth::start(CLUSTER).await,
            dir: tempfile::tempdir().expect("tempdir"),
            ports: [free_port(), free_port(), free_port()],
        }
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.ports[0]))
    }

    /// A new pod's first request is answered.
    pub async fn serves(&self) {
        let r = get(
            self.addr(),
            "/v1/credentials",
            &[("authorization", &token())],
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
    }

    pub fn metrics_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.ports[2]))
    }

    pub fn handover_dir(&self) -> String {
        self.dir.path().join("handover").display().to_string()
    }

    pub fn agent(&self, handover_dir: &str, extra: &[&str]) -> Spawned {
        self.agent_with_metrics_at(handover_dir, "127.0.0.1", extra)
    }

    /// [`Node::agent`] with its metrics listener on `metrics_ip` (same port).
    pub fn agent_with_metrics_at(
        &self,
        handover_dir: &str,
        metrics_ip: &str,
        extra: &[&str],
    ) -> Spawned {
        let endpoint = self.fake.endpoint();
        let [p, probe, metrics] = self.ports.map(|p| p.to_string());
        let mut args = loopback_server(CLUSTER, [&p, &probe, &metrics]);
        if let Some(at) = args.iter().position(|a| *a == "--metrics-address") {
            args[at + 1] = metrics_ip;
        }
        // Pods are played by loopback addresses, which the agent counts as one client (the
        // host): budgets for them are not what these tests are about.
        args.extend([
            "--endpoint",
            &endpoint,
            "--handover-timeout",
            "1s",
            "--client-exchange-burst",
            "1000",
        ]);
        args.extend_from_slice(extra);
        let mut cmd = agent_command(&args);
        cmd.env("POD_IDENTITY_AGENT_HANDOVER_DIR", handover_dir);
        spawn(cmd)
    }
}

/// A JSON log line with this message, waited for.
pub async fn logged(agent: &Spawned, message: &str) -> serde_json::Value {
    agent
        .stderr
        .find(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            (v["message"] == message).then_some(v)
        })
        .await
}

/// How long a pod's request may take before it counts as failed (nobody accepting leaves it
/// in the listen backlog, unanswered).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// Requests on fresh connections, round-robin over `tokens`, until stopped; counts outcomes.
pub struct Load {
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Vec<String>>>,
}

impl Load {
    pub fn start(addr: SocketAddr, tokens: Arc<Vec<String>>, workers: usize) -> Load {
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
                        let asked = tokio::time::timeout(
                            REQUEST_TIMEOUT,
                            get_result(addr, "/v1/credentials", &[("authorization", t)]),
                        )
                        .await
                        .unwrap_or_else(|_| Err("no answer in time".into()));
                        match asked {
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

    pub async fn stop(self) -> (u64, u64, Vec<String>) {
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
