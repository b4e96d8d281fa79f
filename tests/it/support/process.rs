//! Running the `pod-identity-agent` binary from tests, with a hermetic AWS environment, and
//! reading what it prints as it prints it. Self-contained: `benches/load/` includes it too.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;

pub const BIN: &str = env!("CARGO_BIN_EXE_pod-identity-agent");
/// The node's (fake) credentials; the access key id shows up in the fake EKS Auth's records.
pub const NODE_ACCESS_KEY_ID: &str = "AKIANODEEXAMPLE00001";

/// The binary with static node keys, a region, no IMDS and no profiles: nothing leaves loopback.
pub fn agent_command(args: &[&str]) -> Command {
    hermetic(Command::new(BIN), args)
}

/// [`agent_command`] for another build of the agent (benchmarks compare against a baseline).
#[allow(dead_code)] // only `benches/load/` runs another build
pub fn binary_command(bin: &str, args: &[&str]) -> Command {
    hermetic(Command::new(bin), args)
}

/// The binary run inside network namespace `ns` (`ip netns exec` keeps the environment and PID).
pub fn agent_command_in(ns: &str, args: &[&str]) -> Command {
    let mut full = vec!["netns", "exec", ns, BIN];
    full.extend_from_slice(args);
    hermetic(Command::new("ip"), &full)
}

/// `init` (with `extra` flags) inside network namespace `ns`, as the DaemonSet's init container
/// runs it; what it logged. Panics with that log unless it succeeds.
pub async fn init_in(ns: &str, extra: &[&str]) -> String {
    let args: Vec<&str> = std::iter::once("init")
        .chain(extra.iter().copied())
        .collect();
    let out = agent_command_in(ns, &args).output().await.expect("init");
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "init in {ns}: {log}");
    log
}

fn hermetic(mut c: Command, args: &[&str]) -> Command {
    c.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .env("AWS_ACCESS_KEY_ID", NODE_ACCESS_KEY_ID)
        .env("AWS_SECRET_ACCESS_KEY", "node-secret-key-value")
        .env("AWS_REGION", "us-west-2")
        // Agents started by tests never find each other: a handover test names its own dir.
        .env("POD_IDENTITY_AGENT_HANDOVER_DIR", "")
        // Nor keep anything outside the test's own temp dirs.
        .env("POD_IDENTITY_AGENT_STATE_DIR", "")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    c
}

/// Lines of one output stream, collected as they arrive.
#[derive(Clone)]
pub struct Lines {
    lines: Arc<Mutex<Vec<String>>>,
    changed: watch::Receiver<usize>,
}

impl Lines {
    fn collect(stream: impl AsyncRead + Unpin + Send + 'static) -> Lines {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, changed) = watch::channel(0);
        let sink = lines.clone();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stream).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                let n = {
                    let mut l = sink.lock().expect("lock");
                    l.push(line);
                    l.len()
                };
                let _ = tx.send(n);
            }
        });
        Lines { lines, changed }
    }

    pub fn all(&self) -> Vec<String> {
        self.lines.lock().expect("lock").clone()
    }

    pub fn joined(&self) -> String {
        self.all().join("\n")
    }

    /// The first line for which `pick` returns something, waiting up to 10 s.
    pub async fn find<T>(&self, mut pick: impl FnMut(&str) -> Option<T>) -> T {
        let mut changed = self.changed.clone();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(t) = self.all().iter().find_map(|l| pick(l)) {
                return t;
            }
            if tokio::time::timeout_at(deadline, changed.changed())
                .await
                .map(|r| r.is_err())
                .unwrap_or(true)
            {
                if let Some(t) = self.all().iter().find_map(|l| pick(l)) {
                    return t;
                }
                panic!("expected line never came; got:\n{}", self.joined());
            }
        }
    }
}

pub struct Spawned {
    pub child: Child,
    pub stdout: Lines,
    pub stderr: Lines,
}

pub fn spawn(mut cmd: Command) -> Spawned {
    let mut child = cmd.spawn().expect("spawn agent");
    let stdout = Lines::collect(child.stdout.take().expect("stdout"));
    let stderr = Lines::collect(child.stderr.take().expect("stderr"));
    Spawned {
        child,
        stdout,
        stderr,
    }
}

impl Spawned {
    /// The address in the agent's JSON log line `message` ("serving credentials", "serving
    /// probes"), waiting for it.
    pub async fn listening(&self, message: &str) -> std::net::SocketAddr {
        self.stderr
            .find(|l| {
                let v: serde_json::Value = serde_json::from_str(l).ok()?;
                (v["message"] == message)
                    .then(|| v["addr"].as_str()?.parse().ok())
                    .flatten()
            })
            .await
    }

    /// SIGTERM to the process this test started, by its PID.
    pub fn sigterm(&self) {
        let pid = self.child.id().expect("pid").to_string();
        let ok = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill")
            .success();
        assert!(ok);
    }

    /// The value of `export NAME=value` printed on stdout.
    pub async fn export(&self, name: &str) -> String {
        let prefix = format!("export {name}=");
        self.stdout
            .find(|l| l.strip_prefix(prefix.as_str()).map(str::to_owned))
            .await
    }
}

/// `dev` on a kernel-chosen port with its state in `state`, and the two exports it printed
/// (`AWS_CONTAINER_CREDENTIALS_FULL_URI`, `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE`).
pub async fn start_dev(state: &std::path::Path) -> (Spawned, String, String) {
    let state_arg = state.display().to_string();
    let dev = spawn(agent_command(&[
        "dev",
        "--port",
        "0",
        "--state-dir",
        &state_arg,
    ]));
    let uri = dev.export("AWS_CONTAINER_CREDENTIALS_FULL_URI").await;
    let token_file = dev.export("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE").await;
    (dev, uri, token_file)
}

/// `server` for `cluster` on 127.0.0.1 with these credential, probe and metrics ports ("0": the
/// kernel's choice, read back from the logs), before any flags of the caller's own.
pub fn loopback_server<'a>(cluster: &'a str, [port, probe, metrics]: [&'a str; 3]) -> Vec<&'a str> {
    vec![
        "server",
        "-c",
        cluster,
        "-b",
        "127.0.0.1",
        "-p",
        port,
        "--probe-port",
        probe,
        "--metrics-address",
        "127.0.0.1",
        "--metrics-port",
        metrics,
    ]
}
