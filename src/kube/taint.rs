//! The node's startup taint: removed once this agent serves, never added back.
//!
//! New nodes race the agent: pods scheduled before it listens fail their first credential
//! fetch. A node created with a taint only this agent removes (Karpenter's `startupTaints`, a
//! managed node group's taints) keeps pods that do not tolerate it off the node until then.
//!
//! Contract: [`StartupTaint::spawn`] starts one task per agent start (a successor's after a
//! handover included: the handover is finished before it is spawned) that first waits until
//! the agent serves: `/readyz` answers 200 (every credential listener accepting and answering a
//! connection, the refresh scheduler running; without a probe listener, a connection to every
//! credential address) and the verification keys are loaded or known to be unavailable. Then it
//! removes every taint with the configured key from this node: `GET /api/v1/nodes/{name}`, and
//! if the key is there a JSON patch whose `test` of `/spec/taints` (the list as read) makes a
//! concurrent change to the taints fail (409 or 422), after which the node is read again. A
//! node without the key is not patched. Every failure is retried with backoff and jitter (the
//! client's own attempts for 5xx, 429 and an unreachable server, then this task's rounds, from
//! one second doubling up to `max_backoff`, five minutes by default) until it succeeds or the
//! agent stops: a 403 (RBAC or the admission policy not in place yet at install), a node not
//! found, any other answer. The first failure of a kind is logged at warn (the client logs a 403
//! once more, for every caller); later ones at debug. After that it re-checks the node every
//! `recheck` (five minutes, jittered): one GET, and a patch only if the taint is back (a managed
//! node group applies its taints to existing nodes when they change). It only ever removes the
//! taint, never adds it. Each outcome is counted in `pod_identity_startup_taint_total{result}`
//! (`removed`, `absent`; `forbidden`, `not_found`, `failed`, `conflict` and `retried` per round
//! along the way; a re-check counts only a removal). The task touches nothing serving needs, so
//! an API server that hangs or refuses delays no credential; [`StartupTaint::stop`] ends it
//! within [`STOP_BOUND`].

use super::{KubeClient, KubeError};
use crate::verify::{KeysState, Verifier};
use bytes::Bytes;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The taint key the manifests put on new nodes and the agent removes, in the project's own
/// domain (`--node-startup-taint` with no value).
pub const DEFAULT_KEY: &str = "pod-identity.agent/not-ready";
/// Backoff between rounds after a failure, doubling from one second up to this by default.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// How often the node is checked again once the taint is gone, by default (jittered).
pub const RECHECK: Duration = Duration::from_secs(300);
/// Conflicts in a row after which the task backs off as after a failure.
const CONFLICTS_IN_A_ROW: u32 = 5;
/// How often readiness is checked while waiting to serve.
const POLL: Duration = Duration::from_millis(100);
/// How long stopping waits for the task; past it, the task is aborted.
pub const STOP_BOUND: Duration = Duration::from_secs(1);

/// `--node-startup-taint`, with this node.
#[derive(Debug, Clone)]
pub struct TaintSettings {
    /// `--node-name`.
    pub node: String,
    /// The taint key to remove.
    pub key: String,
    /// The longest wait between rounds after failures.
    pub max_backoff: Duration,
    /// How often the node is checked again after the taint went.
    pub recheck: Duration,
}

impl TaintSettings {
    /// `key` on `node`, with the default backoff and re-check.
    pub fn new(node: String, key: String) -> TaintSettings {
        TaintSettings {
            node,
            key,
            max_backoff: MAX_BACKOFF,
            recheck: RECHECK,
        }
    }
}

/// What says the agent serves.
pub struct Serving {
    /// The probe listener (`/readyz`), when there is one.
    pub probe: Option<SocketAddr>,
    /// The credential listeners.
    pub credentials: Vec<SocketAddr>,
    /// The verifier, when verification is on.
    pub verifier: Option<Arc<Verifier>>,
}

/// How one removal ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Removal {
    /// The taint was there and is gone.
    Removed,
    /// The node had no such taint: nothing was patched.
    Absent,
    /// The node's name is not one Kubernetes gives (nothing to retry).
    BadName(String),
}

impl Removal {
    fn label(&self) -> &'static str {
        match self {
            Removal::Removed => "removed",
            Removal::Absent => "absent",
            Removal::BadName(_) => "failed",
        }
    }
}

/// The running task.
pub struct StartupTaint {
    task: tokio::task::JoinHandle<()>,
    stop: CancellationToken,
}

impl StartupTaint {
    /// Start the task (see the module contract), calling the API server through `client` (the
    /// agent's one client).
    pub fn spawn(
        settings: &TaintSettings,
        serving: Serving,
        results: Option<prometheus::IntCounterVec>,
        client: Arc<KubeClient>,
    ) -> StartupTaint {
        let stop = CancellationToken::new();
        let (settings, stopped) = (settings.clone(), stop.clone());
        let task = tokio::spawn(async move {
            tokio::select! {
                _ = until_serving(&serving) => {}
                _ = stopped.cancelled() => return,
            }
            let count = |label: &str| {
                if let Some(c) = &results {
                    c.with_label_values(&[label]).inc();
                }
            };
            tokio::select! {
                _ = keep_removed(&client, &settings, &count) => {}
                _ = stopped.cancelled() => {}
            }
        });
        StartupTaint { task, stop }
    }

    /// End the task: at once if it is waiting, within [`STOP_BOUND`] otherwise.
    pub async fn stop(self) {
        self.stop.cancel();
        let mut task = self.task;
        if tokio::time::timeout(STOP_BOUND, &mut task).await.is_err() {
            task.abort();
        }
    }
}

/// Remove the taint, then check again every `recheck` (see the module contract).
async fn keep_removed(client: &KubeClient, s: &TaintSettings, count: &impl Fn(&str)) {
    let (node, key) = (&s.node, &s.key);
    let removal = remove(client, s, count).await;
    count(removal.label());
    match &removal {
        Removal::Removed => {
            tracing::info!(node = %node, taint = %key, "removed the node's startup taint: pods may now be scheduled here")
        }
        Removal::Absent => {
            tracing::info!(node = %node, taint = %key, "the node has no startup taint to remove")
        }
        Removal::BadName(why) => {
            tracing::warn!(node = %node, taint = %key, error = %why, "cannot remove the node's startup taint");
            return;
        }
    }
    loop {
        tokio::time::sleep(s.recheck.mul_f64(0.8 + fastrand::f64() * 0.4)).await;
        if remove(client, s, count).await == Removal::Removed {
            count("removed");
            tracing::info!(node = %node, taint = %key, "removed the node's startup taint again: it was put back after this agent removed it (a node group's taints?)");
        }
    }
}

/// Wait until the agent serves (see the module contract).
async fn until_serving(s: &Serving) {
    loop {
        let keys = s
            .verifier
            .as_ref()
            .is_none_or(|v| v.state() != KeysState::Pending);
        if keys && answers(s).await {
            return;
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn answers(s: &Serving) -> bool {
    match s.probe {
        Some(probe) => readyz(probe).await,
        None => {
            for addr in &s.credentials {
                let connect = tokio::net::TcpStream::connect(*addr);
                if !matches!(tokio::time::timeout(POLL * 5, connect).await, Ok(Ok(_))) {
                    return false;
                }
            }
            !s.credentials.is_empty()
        }
    }
}

/// Whether `/readyz` on the probe listener answers 200, as the kubelet asks it.
async fn readyz(probe: SocketAddr) -> bool {
    use http_body_util::Empty;
    let ask = async {
        let stream = tokio::net::TcpStream::connect(probe).await.ok()?;
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .ok()?;
        tokio::spawn(conn);
        let req = hyper::Request::get("/readyz")
            .header(hyper::header::HOST, probe.to_string())
            .body(Empty::<Bytes>::new())
            .ok()?;
        let res = send.send_request(req).await.ok()?;
        Some(res.status() == hyper::StatusCode::OK)
    };
    matches!(tokio::time::timeout(POLL * 10, ask).await, Ok(Some(true)))
}

/// Remove every taint with the key from the node (see the module contract), retrying every
/// failure; `count` is told of each conflict (`conflict`), each failed round (`forbidden`,
/// `not_found`, `failed`) and each round retried after a failure (`retried`).
pub async fn remove(client: &KubeClient, s: &TaintSettings, count: &impl Fn(&str)) -> Removal {
    let node = s.node.as_str();
    if !super::is_dns_subdomain(node) {
        return Removal::BadName(format!("{node:?} is not a node name"));
    }
    let path = format!("/api/v1/nodes/{node}");
    let mut backoff = Duration::from_secs(1).min(s.max_backoff);
    let mut conflicts = 0;
    let mut warned: Vec<&'static str> = Vec::new();
    loop {
        let (label, failed) = match round(client, &path, &s.key).await {
            Round::Done(removal) => return removal,
            Round::Conflict => {
                count("conflict");
                conflicts += 1;
                if conflicts < CONFLICTS_IN_A_ROW {
                    // Someone else changed the taints between our read and our patch: read again.
                    tokio::time::sleep(Duration::from_millis(fastrand::u64(10..100))).await;
                    continue;
                }
                (
                    "failed",
                    "the node's taints kept changing under the patch".to_owned(),
                )
            }
            Round::Failed(e) => (failure_label(&e), e.to_string()),
        };
        conflicts = 0;
        count(label);
        count("retried");
        let retry_in_s = backoff.as_secs();
        if warned.contains(&label) {
            tracing::debug!(node, error = %failed, retry_in_s, "cannot remove the node's startup taint yet; retrying");
        } else {
            warned.push(label);
            let why = match label {
                "forbidden" => "the API server forbids the agent to get or patch its node (grant nodes get and patch; the admission policy must allow its own node); the startup taint stays until it may, retrying",
                "not_found" => "no node has this --node-name; the startup taint stays, retrying",
                _ => "cannot remove the node's startup taint yet; retrying",
            };
            tracing::warn!(node, taint = %s.key, error = %failed, retry_in_s, "{why}");
        }
        tokio::time::sleep(backoff.mul_f64(0.5 + fastrand::f64() * 0.5)).await;
        backoff = (backoff * 2).min(s.max_backoff);
    }
}

/// How a failed round is counted.
fn failure_label(e: &KubeError) -> &'static str {
    match e {
        KubeError::Forbidden(_) => "forbidden",
        KubeError::Status(404) => "not_found",
        _ => "failed",
    }
}

enum Round {
    Done(Removal),
    Conflict,
    Failed(KubeError),
}

/// One read and, if needed, one patch.
async fn round(client: &KubeClient, path: &str, key: &str) -> Round {
    let settle = |e: KubeError| match e {
        KubeError::Status(409 | 422) => Round::Conflict,
        e => Round::Failed(e),
    };
    let node = match client.get(path).await {
        Ok(body) => body,
        Err(e) => return settle(e),
    };
    let patch = match patch_removing(&node, key) {
        Ok(Some(patch)) => patch,
        Ok(None) => return Round::Done(Removal::Absent),
        // Not a Node (a proxy's page?): retried like any failure.
        Err(why) => return Round::Failed(KubeError::Unreachable(why)),
    };
    match client
        .patch(path, "application/json-patch+json", patch)
        .await
    {
        Ok(_) => Round::Done(Removal::Removed),
        Err(e) => settle(e),
    }
}

/// The JSON patch that removes every taint with `key` from `node` (a Node object as JSON),
/// guarded by a `test` of the taints as read; `None` if the node has no such taint.
pub fn patch_removing(node: &[u8], key: &str) -> Result<Option<Bytes>, String> {
    let node: Value =
        serde_json::from_slice(node).map_err(|e| format!("the answer is not a Node: {e}"))?;
    if node["kind"] != "Node" {
        return Err("the answer is not a Node".into());
    }
    let taints = match &node["spec"]["taints"] {
        Value::Null => return Ok(None),
        Value::Array(t) => t,
        _ => return Err("the node's spec.taints is not a list".into()),
    };
    let kept: Vec<&Value> = taints.iter().filter(|t| t["key"] != key).collect();
    if kept.len() == taints.len() {
        return Ok(None);
    }
    let patch = json!([
        {"op": "test", "path": "/spec/taints", "value": taints},
        {"op": "replace", "path": "/spec/taints", "value": kept},
    ]);
    serde_json::to_vec(&patch)
        .map(|v| Some(Bytes::from(v)))
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(taints: Value) -> Vec<u8> {
        serde_json::to_vec(
            &json!({"kind": "Node", "metadata": {"name": "n"}, "spec": {"taints": taints}}),
        )
        .expect("json")
    }

    #[test]
    fn the_patch_removes_only_the_key_and_tests_what_was_read() {
        let taints = json!([
            {"key": "other/one", "effect": "NoSchedule"},
            {"key": DEFAULT_KEY, "effect": "NoSchedule"},
            {"key": DEFAULT_KEY, "effect": "NoExecute"},
        ]);
        let patch = patch_removing(&node(taints.clone()), DEFAULT_KEY)
            .expect("parses")
            .expect("a patch");
        let patch: Value = serde_json::from_slice(&patch).expect("json");
        assert_eq!(
            patch[0],
            json!({"op": "test", "path": "/spec/taints", "value": taints})
        );
        assert_eq!(
            patch[1],
            json!({"op": "replace", "path": "/spec/taints", "value": [{"key": "other/one", "effect": "NoSchedule"}]})
        );
    }

    #[test]
    fn a_node_without_the_taint_is_not_patched() {
        assert_eq!(
            patch_removing(&node(json!([{"key": "x/y"}])), DEFAULT_KEY),
            Ok(None)
        );
        let untainted = br#"{"kind":"Node","metadata":{"name":"n"},"spec":{}}"#;
        assert_eq!(patch_removing(untainted, DEFAULT_KEY), Ok(None));
        assert!(patch_removing(b"<html>", DEFAULT_KEY).is_err());
        assert!(patch_removing(br#"{"kind":"Status"}"#, DEFAULT_KEY).is_err());
        assert!(patch_removing(br#"{"kind":"Node","spec":{"taints":"x"}}"#, DEFAULT_KEY).is_err());
    }
}
