//! The container image, run by a real container engine (podman with runc) the way the rendered
//! DaemonSet runs it, on a (namespaced) node, and upgraded under a real SDK client's load.
//!
//! Everything about how the containers run comes from `kubectl kustomize daemonset/`, not from
//! this file: arguments (`$(VAR)` expanded), environment (`configMapKeyRef` from the rendered
//! ConfigMap, `fieldRef` from test values for the node and pod), volume mounts, the security
//! context (capabilities, read-only root, seccomp, user, no privilege escalation), memory limit,
//! readiness probe and termination grace. A field this file cannot map to podman fails the test
//! by name instead of being dropped. What a node supplies differently is added here, and only
//! this: the image (PIA_IMAGE, as `kustomize edit set image` would), the host directories behind
//! `hostPath` volumes (temporary), the node's network (a namespace this test makes, standing in
//! for `hostNetwork`), the engine's limits (`--ulimit`, within this machine's), and, in place
//! of the node role from instance metadata and the public EKS Auth endpoint, static node keys,
//! `AWS_EC2_METADATA_DISABLED=true` and `AWS_ENDPOINT_URL_EKS_AUTH` pointing at a fake EKS Auth on
//! the node namespace's loopback.
//!
//! Then: `init` as its own container, `server` as another; the image's security is read back
//! from the running process (`/proc/<pid>/status`, mountinfo); boto3 in a pod namespace gets
//! credentials from 169.254.170.23 through the container; a second pod's `init` and `server`
//! start from the same image with the same handover directory and take over while boto3 keeps
//! asking; the first is stopped as the kubelet stops it (`podman stop`, SIGTERM, the manifest's
//! grace). Zero failed requests and no second EKS Auth exchange, or the test fails.
//!
//! Needs root, buildah, podman and runc, kubectl, boto3, and an image: `PIA_IMAGE`, built by
//! `daemonset/build-image.sh` (`.ci/run` builds it and sets PIA_REQUIRE_IMAGE=1, which turns a
//! skip into a failure). Outside CI, without them, it is skipped with a message.

use crate::support;
use crate::support::fake_eks_auth::FakeEksAuth;
use crate::support::manifest::{self, docs, kustomize, Downward};
use crate::support::netns::{fake_for_cluster_in, namespaces, wire_pod, Netns};
use crate::support::process::{spawn, Spawned, NODE_ACCESS_KEY_ID};
use crate::support::python::{in_netns, python_with, script};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Container, PodSpec, Volume};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// What the node's `kube-root-ca.crt` ConfigMap would hold; nothing here checks it.
const PLACEHOLDER_CA: &str =
    "-----BEGIN CERTIFICATE-----\nplaceholder\n-----END CERTIFICATE-----\n";

/// podman's default seccomp profile: the `RuntimeDefault` of this engine (containerd's is the
/// same lineage), named explicitly so the test cannot run unconfined by accident.
const SECCOMP_PROFILE: &str = "/usr/share/containers/seccomp.json";
/// Linux capability numbers of the names the manifests use.
const CAPABILITIES: &[(&str, u32)] = &[
    ("CHOWN", 0),
    ("DAC_OVERRIDE", 1),
    ("FOWNER", 3),
    ("KILL", 5),
    ("SETGID", 6),
    ("SETUID", 7),
    ("NET_BIND_SERVICE", 10),
    ("NET_ADMIN", 12),
    ("NET_RAW", 13),
    ("SYS_ADMIN", 21),
];

fn required() -> bool {
    std::env::var("PIA_REQUIRE_IMAGE").as_deref() == Ok("1")
}

fn skip<T>(why: &str) -> Option<T> {
    assert!(!required(), "{why} (PIA_REQUIRE_IMAGE=1)");
    eprintln!("SKIPPED: {why}");
    None
}

/// The image to run, or `None` (after a message) where this machine cannot run it.
fn image_under_test() -> Option<String> {
    for tool in ["buildah", "podman", "runc"] {
        let found = std::process::Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            return skip(&format!(
                "{tool} not installed (apt-get install buildah podman runc)"
            ));
        }
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return skip("running containers in the test's network namespaces needs root");
    }
    match std::env::var("PIA_IMAGE") {
        Ok(image) if !image.is_empty() => Some(image),
        _ => skip(
            "PIA_IMAGE not set. Build and run: cargo build --release && \
             daemonset/build-image.sh target/release/pod-identity-agent localhost/pod-identity-agent:dev \
             && PIA_IMAGE=localhost/pod-identity-agent:dev cargo test --test it image::",
        ),
    }
}

/// `podman` with the runtime this machine needs (crun fails on its hybrid cgroups).
fn podman() -> tokio::process::Command {
    let mut c = tokio::process::Command::new("podman");
    c.args(["--runtime", "runc"]).stdin(Stdio::null());
    c
}

async fn podman_ok(args: &[&str]) -> String {
    let out = tokio::time::timeout(Duration::from_secs(60), podman().args(args).output())
        .await
        .unwrap_or_else(|_| panic!("podman {args:?} timed out"))
        .expect("run podman");
    assert!(
        out.status.success(),
        "podman {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// `--ulimit` values within this machine's hard limits: podman's defaults exceed them, and
/// raising a hard limit needs CAP_SYS_RESOURCE, which this machine's root lacks. Open files: the
/// hard limit (the agent raises its soft limit to it). Processes: 4096, far above the agent's
/// few threads and below the 32768 podman lowers its own limit to. On a node, the engine's
/// own limits apply.
fn ulimits() -> Vec<String> {
    [
        ("nofile", libc::RLIMIT_NOFILE, 1 << 20),
        ("nproc", libc::RLIMIT_NPROC, 4096),
    ]
    .into_iter()
    .map(|(name, resource, most)| {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one rlimit through a valid pointer.
        let rc = unsafe { libc::getrlimit(resource, &mut limit) };
        assert_eq!(rc, 0, "getrlimit {name}");
        let hard = limit.rlim_max.min(most);
        format!("--ulimit={name}={hard}:{hard}")
    })
    .collect()
}

/// The DaemonSet, ConfigMap and ServiceAccount of `kubectl kustomize daemonset/`.
struct Rendered {
    pod: PodSpec,
    config: BTreeMap<String, String>,
    /// Whether the kubelet mounts the service account's API token into every container: the
    /// pod's `automountServiceAccountToken`, else its ServiceAccount's, else yes.
    automount: bool,
}

fn render() -> Option<Rendered> {
    let text = kustomize("daemonset")?;
    let mut pod = None;
    let mut config = BTreeMap::new();
    let mut sa_automount = None;
    for doc in docs(&text) {
        match doc["kind"].as_str() {
            Some("DaemonSet") => {
                let ds: DaemonSet = serde_json::from_value(doc).expect("DaemonSet");
                pod = ds.spec.and_then(|s| s.template.spec);
            }
            Some("ConfigMap") => {
                let data: BTreeMap<String, String> =
                    serde_json::from_value(doc["data"].clone()).unwrap_or_default();
                config.extend(data);
            }
            Some("ServiceAccount") => sa_automount = doc["automountServiceAccountToken"].as_bool(),
            _ => {}
        }
    }
    let pod: PodSpec = pod.expect("the render has a DaemonSet with a pod template");
    Some(Rendered {
        automount: pod
            .automount_service_account_token
            .or(sa_automount)
            .unwrap_or(true),
        pod,
        config,
    })
}

/// Fields of `value` (an object) this test does not know how to run: a new one fails the test
/// by name, so a manifest change is either mapped to podman below or consciously ignored.
fn only_known(value: &Value, what: &str, known: &[&str]) {
    for key in value.as_object().map(|o| o.keys()).into_iter().flatten() {
        assert!(
            known.contains(&key.as_str()),
            "{what}.{key}: tests/image.rs does not know how to run this; map it to podman there"
        );
    }
}

/// The node: its network namespace, fake EKS Auth, host directories, and what every container
/// on it gets.
struct Node {
    netns: Netns,
    image: String,
    config: BTreeMap<String, String>,
    fake: FakeEksAuth,
    automount: bool,
    /// Behind `hostPath` volumes: one directory per host path, shared by every pod on the node.
    host: tempfile::TempDir,
}

/// One pod of the DaemonSet on the node: its own directory for `emptyDir` and projected volumes.
struct Pod {
    name: String,
    dir: tempfile::TempDir,
}

/// A container podman runs attached (its output is read as it comes), removed on drop: also
/// when the test fails.
struct Running {
    name: String,
    started: Instant,
    process: Spawned,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = std::process::Command::new("podman")
            .args(["rm", "--force", "--time", "0", &self.name])
            .output();
    }
}

impl Running {
    async fn logged(&self, message: &str) -> Instant {
        let needle = format!("\"message\":\"{message}\"");
        self.process
            .stderr
            .find(|l| l.contains(&needle).then_some(()))
            .await;
        Instant::now()
    }

    async fn exit_code(&mut self, within: Duration) -> Option<i32> {
        tokio::time::timeout(within, self.process.child.wait())
            .await
            .unwrap_or_else(|_| panic!("{} did not exit", self.name))
            .expect("wait for podman")
            .code()
    }

    async fn pid(&self) -> u32 {
        podman_ok(&["inspect", "--format", "{{.State.Pid}}", &self.name])
            .await
            .parse()
            .expect("pid")
    }
}

impl Node {
    fn host_dir(&self, path: &str) -> PathBuf {
        self.host.path().join(path.trim_start_matches('/'))
    }

    /// podman's arguments for container `c` of `pod`, from the manifest alone plus the node's
    /// differences (module doc).
    fn run_args(&self, spec: &PodSpec, pod: &Pod, c: &Container, name: &str) -> Vec<String> {
        let spec_json = serde_json::to_value(spec).expect("pod spec");
        only_known(
            &spec_json,
            "spec.template.spec",
            &[
                // How the containers run: mapped below.
                "hostNetwork",
                "initContainers",
                "containers",
                "volumes",
                "terminationGracePeriodSeconds",
                // Scheduling and identity: where and whether, not how, a container runs.
                "serviceAccountName",
                "automountServiceAccountToken",
                "priorityClassName",
                "tolerations",
                "affinity",
                "nodeSelector",
            ],
        );
        assert_eq!(spec.host_network, Some(true), "the test models hostNetwork");
        let mut args: Vec<String> = vec![
            "run".into(),
            "--rm".into(),
            format!("--name={name}"),
            "--pull=never".into(),
            // hostNetwork: the node's network namespace, which this test made.
            format!("--network=ns:/run/netns/{}", self.netns.name),
        ];
        args.extend(ulimits());

        let c_json = serde_json::to_value(c).expect("container");
        only_known(
            &c_json,
            &format!("container {}", c.name),
            &[
                "name",
                "image",
                "imagePullPolicy",
                "command",
                "args",
                "env",
                "resources",
                "securityContext",
                "volumeMounts",
                // Probes: the test polls the readiness probe itself; nothing restarts here.
                "livenessProbe",
                "readinessProbe",
                "startupProbe",
            ],
        );
        args.extend(security(c));
        if self.automount {
            // The kubelet's own projected volume: a token, the namespace and the API server's CA
            // (a placeholder here: no API server runs).
            let dir = pod.dir.path().join("kube-api-access");
            std::fs::create_dir_all(&dir).expect("kube-api-access");
            std::fs::write(dir.join("token"), support::token()).expect("token");
            std::fs::write(dir.join("namespace"), "kube-system").expect("namespace");
            std::fs::copy("/etc/ssl/certs/ca-certificates.crt", dir.join("ca.crt")).expect("ca");
            args.push(format!(
                "--volume={}:/var/run/secrets/kubernetes.io/serviceaccount:ro",
                dir.display()
            ));
        }
        if let Some(memory) = c
            .resources
            .as_ref()
            .and_then(|r| r.limits.as_ref())
            .and_then(|l| l.get("memory"))
        {
            args.push(format!("--memory={}", bytes(&memory.0)));
        }
        for mount in c.volume_mounts.iter().flatten() {
            let volume = spec
                .volumes
                .iter()
                .flatten()
                .find(|v| v.name == mount.name)
                .unwrap_or_else(|| panic!("{}: no volume {}", c.name, mount.name));
            let source = self.volume(volume, pod);
            let ro = if mount.read_only == Some(true) {
                ":ro"
            } else {
                ""
            };
            args.push(format!(
                "--volume={}:{}{ro}",
                source.display(),
                mount.mount_path
            ));
        }
        let downward = Downward {
            node_name: "node-1".into(),
            host_ip: "192.0.2.1".into(),
            pod_name: pod.name.clone(),
            pod_namespace: "kube-system".into(),
        };
        let env = manifest::env(c, &self.config, &downward);
        for (k, v) in &env {
            args.push(format!("--env={k}={v}"));
        }
        // What a node supplies differently (module doc).
        for (k, v) in [
            ("AWS_ENDPOINT_URL_EKS_AUTH", self.fake.endpoint()),
            ("AWS_ACCESS_KEY_ID", NODE_ACCESS_KEY_ID.to_owned()),
            ("AWS_SECRET_ACCESS_KEY", "node-secret-key-value".to_owned()),
            ("AWS_EC2_METADATA_DISABLED", "true".to_owned()),
        ] {
            assert!(
                !env.iter().any(|(name, _)| name == k),
                "{}: the manifest sets {k}, which the test supplies as the node would",
                c.name
            );
            args.push(format!("--env={k}={v}"));
        }
        if let Some(command) = &c.command {
            args.push(format!(
                "--entrypoint={}",
                serde_json::to_string(command).expect("json")
            ));
        }
        args.push(self.image.clone());
        args.extend(manifest::args(c, &env));
        args
    }

    /// The host side of a volume, made as the kubelet makes it.
    fn volume(&self, volume: &Volume, pod: &Pod) -> PathBuf {
        let json = serde_json::to_value(volume).expect("volume");
        only_known(
            &json,
            &format!("volume {}", volume.name),
            &["name", "hostPath", "emptyDir", "projected", "configMap"],
        );
        if let Some(host) = &volume.host_path {
            let dir = self.host_dir(&host.path);
            match host.type_.as_deref() {
                Some("DirectoryOrCreate") | Some("Directory") | None => {
                    std::fs::create_dir_all(&dir).expect("host directory")
                }
                other => panic!("volume {}: hostPath type {other:?}", volume.name),
            }
            return dir;
        }
        let dir = pod.dir.path().join(&volume.name);
        std::fs::create_dir_all(&dir).expect("pod volume");
        let mut files: Vec<(String, String)> = Vec::new();
        if let Some(map) = &volume.config_map {
            files.extend(self.config_files(&map.name, map.items.as_deref()));
        }
        for source in volume
            .projected
            .iter()
            .flat_map(|p| p.sources.iter().flatten())
        {
            let json = serde_json::to_value(source).expect("projection");
            only_known(
                &json,
                &format!("volume {} projection", volume.name),
                &["serviceAccountToken", "configMap"],
            );
            if let Some(token) = &source.service_account_token {
                files.push((token.path.clone(), support::token()));
            }
            if let Some(map) = &source.config_map {
                files.extend(self.config_files(&map.name, map.items.as_deref()));
            }
        }
        for (path, content) in files {
            let file = dir.join(path);
            std::fs::create_dir_all(file.parent().expect("parent")).expect("dir");
            std::fs::write(file, content).expect("volume file");
        }
        dir
    }

    fn config_files(
        &self,
        name: &str,
        items: Option<&[k8s_openapi::api::core::v1::KeyToPath]>,
    ) -> Vec<(String, String)> {
        if name == "kube-root-ca.crt" {
            // Published by Kubernetes in every namespace, not by the manifests: the cluster's CA.
            // No API server runs here, so a placeholder; the agent logs that it cannot verify.
            return vec![("ca.crt".into(), PLACEHOLDER_CA.into())];
        }
        match items {
            Some(items) => items
                .iter()
                .map(|i| (i.path.clone(), self.config[&i.key].clone()))
                .collect(),
            None => self
                .config
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }

    fn start(&self, spec: &PodSpec, pod: &Pod, c: &Container, name: &str) -> Running {
        let args = self.run_args(spec, pod, c, name);
        // What ran, for the log and for anyone repeating it by hand (README).
        let shown: Vec<&str> = args
            .iter()
            .map(|a| match a.split_once("SECRET_ACCESS_KEY=") {
                Some(_) => "--env=AWS_SECRET_ACCESS_KEY=…",
                None => a.as_str(),
            })
            .collect();
        eprintln!("podman --runtime runc {}", shown.join(" "));
        let mut cmd = podman();
        cmd.args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let started = Instant::now();
        Running {
            name: name.to_owned(),
            started,
            process: spawn(cmd),
        }
    }
}

/// A Kubernetes quantity as bytes, for `--memory`.
fn bytes(quantity: &str) -> u64 {
    let split = quantity
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(quantity.len());
    let (n, unit) = quantity.split_at(split);
    let n: u64 = n.parse().expect("quantity");
    let scale: u64 = match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        other => panic!("quantity unit {other}"),
    };
    n * scale
}

/// podman's flags for the container's `securityContext`.
fn security(c: &Container) -> Vec<String> {
    let sc = c
        .security_context
        .as_ref()
        .unwrap_or_else(|| panic!("{}: no securityContext", c.name));
    only_known(
        &serde_json::to_value(sc).expect("securityContext"),
        &format!("container {} securityContext", c.name),
        &[
            "privileged",
            "allowPrivilegeEscalation",
            "readOnlyRootFilesystem",
            "runAsUser",
            "runAsGroup",
            "runAsNonRoot",
            "seccompProfile",
            "capabilities",
        ],
    );
    let mut args = Vec::new();
    if sc.privileged == Some(true) {
        args.push("--privileged".into());
    }
    if sc.allow_privilege_escalation == Some(false) {
        args.push("--security-opt=no-new-privileges".into());
    }
    if sc.read_only_root_filesystem == Some(true) {
        // podman would otherwise mount writable tmpfs on /tmp, /run and /var/tmp; Kubernetes
        // does not.
        args.extend(["--read-only".into(), "--read-only-tmpfs=false".into()]);
    }
    match (sc.run_as_user, sc.run_as_group) {
        (Some(u), Some(g)) => args.push(format!("--user={u}:{g}")),
        (Some(u), None) => args.push(format!("--user={u}")),
        (None, Some(g)) => panic!("{}: runAsGroup {g} without runAsUser", c.name),
        (None, None) => {}
    }
    if sc.run_as_non_root == Some(true) {
        assert!(
            sc.run_as_user.is_some_and(|u| u != 0),
            "{}: runAsNonRoot needs a non-zero runAsUser here",
            c.name
        );
    }
    match sc.seccomp_profile.as_ref().map(|p| p.type_.as_str()) {
        Some("RuntimeDefault") | None => {
            args.push(format!("--security-opt=seccomp={SECCOMP_PROFILE}"))
        }
        Some("Unconfined") => args.push("--security-opt=seccomp=unconfined".into()),
        Some(other) => panic!("{}: seccompProfile {other}", c.name),
    }
    let caps = sc.capabilities.clone().unwrap_or_default();
    for drop in caps.drop.iter().flatten() {
        args.push(format!("--cap-drop={drop}"));
    }
    for add in caps.add.iter().flatten() {
        args.push(format!("--cap-add={add}"));
    }
    args
}

/// The capability set the manifest leaves a container: the added ones when it drops ALL.
fn expected_capabilities(c: &Container) -> u64 {
    let caps = c
        .security_context
        .as_ref()
        .and_then(|s| s.capabilities.clone())
        .unwrap_or_default();
    assert_eq!(
        caps.drop.as_deref(),
        Some(&["ALL".to_owned()][..]),
        "{}: the check below assumes drop: [ALL]",
        c.name
    );
    caps.add
        .iter()
        .flatten()
        .map(|name| {
            let bit = CAPABILITIES
                .iter()
                .find(|(n, _)| n == name)
                .unwrap_or_else(|| panic!("capability {name}: add its number to CAPABILITIES"))
                .1;
            1u64 << bit
        })
        .fold(0, |a, b| a | b)
}

/// What the kernel says about a running process: its capabilities, no-new-privileges, seccomp
/// mode, user, and whether its root is mounted read-only.
fn process_security(pid: u32) -> BTreeMap<String, String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let mut out: BTreeMap<String, String> = status
        .lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(k, _)| {
            [
                "CapEff",
                "CapPrm",
                "CapBnd",
                "CapAmb",
                "NoNewPrivs",
                "Seccomp",
                "Uid",
            ]
            .contains(k)
        })
        .map(|(k, v)| {
            (
                k.to_owned(),
                v.split_whitespace().next().unwrap_or("").to_owned(),
            )
        })
        .collect();
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).expect("mountinfo");
    let root = mountinfo
        .lines()
        .map(|l| l.split(' ').collect::<Vec<_>>())
        .find(|f| f.get(4) == Some(&"/"))
        .and_then(|f| {
            f.get(5)
                .map(|o| o.split(',').next().unwrap_or("").to_owned())
        })
        .unwrap_or_default();
    out.insert("root".into(), root);
    out
}

/// GET `path` on `port` of the node's loopback until 200: when it came. Fails with the
/// container's log if it exits first or nothing answers within `within`.
async fn ready(node: &Netns, c: &mut Running, port: u16, path: &str, within: Duration) -> Instant {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let probe = path.to_owned();
    node.run(move || async move {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(r) = support::get_result(addr, &probe, &[]).await {
                if r.status == 200 {
                    let _ = tx.send(Instant::now());
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    let Running { name, process, .. } = c;
    tokio::select! {
        at = rx => at.unwrap_or_else(|_| panic!(
            "{path} on 127.0.0.1:{port} never answered 200 within {within:?}; {name}: {}",
            process.stderr.joined()
        )),
        status = process.child.wait() => panic!(
            "{name} exited ({status:?}) before {path} answered 200: {}",
            process.stderr.joined()
        ),
    }
}

fn readiness(c: &Container) -> (u16, String) {
    let get = c
        .readiness_probe
        .as_ref()
        .and_then(|p| p.http_get.as_ref())
        .expect("readiness httpGet");
    assert_eq!(
        get.host.as_deref(),
        Some("localhost"),
        "the test polls the node's loopback"
    );
    let port = serde_json::to_value(&get.port)
        .ok()
        .and_then(|p| p.as_u64())
        .and_then(|p| u16::try_from(p).ok())
        .expect("numeric probe port");
    (port, get.path.clone().unwrap_or_else(|| "/".into()))
}

/// Every file under `dir`, relative to `root`, with its size and mode.
fn files(root: &std::path::Path, dir: &std::path::Path, out: &mut Vec<(String, u64, u32)>) {
    use std::os::unix::fs::PermissionsExt;
    for entry in std::fs::read_dir(dir).expect("read image dir").flatten() {
        let meta = entry.path().symlink_metadata().expect("metadata");
        if meta.is_dir() {
            files(root, &entry.path(), out);
        } else {
            let rel = entry
                .path()
                .strip_prefix(root)
                .expect("inside")
                .display()
                .to_string();
            out.push((rel, meta.len(), meta.permissions().mode()));
        }
    }
}

/// The image holds the binary, the shared objects it links, the CA bundle and nsswitch.conf,
/// and nothing else (no shell, no package manager); its user, entrypoint and command are the
/// Dockerfile's runtime stage's. Returns the bytes beside the binary.
async fn check_image(image: &str) -> u64 {
    struct Mounted(String);
    impl Drop for Mounted {
        fn drop(&mut self) {
            let _ = std::process::Command::new("podman")
                .args(["image", "unmount", &self.0])
                .output();
        }
    }
    let root = PathBuf::from(podman_ok(&["image", "mount", image]).await);
    let _mounted = Mounted(image.to_owned());
    let mut found = Vec::new();
    files(&root, &root, &mut found);
    let mut beside = 0;
    for (path, size, mode) in &found {
        match path.as_str() {
            "pod-identity-agent" => assert_eq!(mode & 0o111, 0o111, "{path} {mode:o}"),
            "etc/ssl/certs/ca-certificates.crt" => {
                let pem = std::fs::read_to_string(root.join(path)).expect("CA bundle");
                assert!(pem.contains("BEGIN CERTIFICATE"), "{path}");
            }
            "etc/nsswitch.conf" => {}
            p if p.starts_with("lib") && p.contains(".so") => {}
            other => panic!("{other}: not something the agent needs at run time"),
        }
        if path != "pod-identity-agent" {
            beside += size;
        }
    }
    assert!(
        found
            .iter()
            .any(|(p, ..)| p == "etc/ssl/certs/ca-certificates.crt"),
        "no CA bundle: {found:?}"
    );

    let config: Value = serde_json::from_str(
        &podman_ok(&["image", "inspect", "--format", "{{json .Config}}", image]).await,
    )
    .expect("image config");
    let dockerfile = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Dockerfile"))
        .expect("Dockerfile");
    let runtime = dockerfile.rsplit("\nFROM ").next().expect("a stage");
    for line in runtime.lines() {
        let (field, value) = match line.split_once(' ') {
            Some(("USER", v)) => ("User", Value::from(v)),
            Some(("ENTRYPOINT", v)) => ("Entrypoint", serde_json::from_str(v).expect("JSON form")),
            Some(("CMD", v)) => ("Cmd", serde_json::from_str(v).expect("JSON form")),
            _ => continue,
        };
        assert_eq!(
            config[field], value,
            "{field}: the image differs from the Dockerfile"
        );
    }
    beside
}

/// The boto3 loop in the pod namespace: told to stop by its stop file; killed (by its PID) if
/// the test fails first.
struct Asking {
    child: Option<std::process::Child>,
    stop: PathBuf,
}

impl Asking {
    fn finish(&mut self) -> std::process::Output {
        std::fs::write(&self.stop, "").expect("stop file");
        self.child
            .take()
            .expect("running")
            .wait_with_output()
            .expect("boto3 loop")
    }
}

impl Drop for Asking {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[test]
fn the_image_runs_as_the_daemonset_runs_it_and_upgrades_without_a_gap() {
    let Some(image) = image_under_test() else {
        return;
    };
    let Some(python) = python_with(&["boto3"]) else {
        return skip("boto3 not installed").unwrap_or(());
    };
    let Some(rendered) = render() else {
        return skip("kubectl not installed: the manifests cannot be rendered").unwrap_or(());
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let _in = rt.enter();
    let test_started = Instant::now();

    // The image on its own: the default user, entrypoint and command run (no shell, no base).
    let version = rt.block_on(podman_ok(
        &[
            &["run", "--rm", "--pull=never"][..],
            &ulimits().iter().map(String::as_str).collect::<Vec<_>>(),
            &[&image, "version"],
        ]
        .concat(),
    ));
    assert!(version.contains(env!("CARGO_PKG_VERSION")), "{version}");
    let size: u64 = rt
        .block_on(podman_ok(&[
            "image",
            "inspect",
            "--format",
            "{{.Size}}",
            &image,
        ]))
        .parse()
        .expect("size");
    let runtime_files = rt.block_on(check_image(&image));
    // Everything but the binary is glibc (libc, libm, libgcc_s, the loader) and the CA bundle.
    assert!(
        runtime_files < 4_000_000,
        "{runtime_files} bytes beside the binary"
    );

    let id = std::process::id();
    let (node_name, pod_name) = (format!("pia-img-node-{id}"), format!("pia-img-pod-{id}"));
    let Some(mut spaces) = namespaces(&[&node_name, &pod_name]) else {
        return;
    };
    let (netns, client) = (spaces.remove(0), spaces.remove(0));
    wire_pod(&netns, &client, &format!("i{id}"));
    let cluster = rendered.config["CLUSTER_NAME"].clone();
    let fake = fake_for_cluster_in(&netns, &cluster);
    let node = Node {
        netns,
        image,
        config: rendered.config.clone(),
        fake,
        automount: rendered.automount,
        host: tempfile::tempdir().expect("tempdir"),
    };
    let spec = &rendered.pod;
    let init = &spec.init_containers.as_ref().expect("init containers")[0];
    let server = &spec.containers[0];
    let (probe_port, probe_path) = readiness(server);
    let grace = spec
        .termination_grace_period_seconds
        .unwrap_or(30)
        .to_string();
    let handover = spec
        .volumes
        .iter()
        .flatten()
        .find_map(|v| v.host_path.as_ref())
        .map(|h| node.host_dir(&h.path))
        .expect("the handover hostPath");

    // Pod 1: init, then the agent.
    let pod1 = Pod {
        name: "pod-identity-agent-a".into(),
        dir: tempfile::tempdir().expect("tempdir"),
    };
    let mut init1 = node.start(spec, &pod1, init, &format!("pia-img-{id}-init-a"));
    let code = rt.block_on(init1.exit_code(Duration::from_secs(60)));
    assert_eq!(code, Some(0), "init: {}", init1.process.stderr.joined());
    let init_took = init1.started.elapsed();
    let link = std::process::Command::new("ip")
        .args([
            "-n",
            &node.netns.name,
            "addr",
            "show",
            "dev",
            "pod-id-link0",
        ])
        .output()
        .expect("ip");
    let link = String::from_utf8_lossy(&link.stdout);
    assert!(link.contains("169.254.170.23/32"), "{link}");

    let mut first = node.start(spec, &pod1, server, &format!("pia-img-{id}-server-a"));
    let ready_at = rt.block_on(ready(
        &node.netns,
        &mut first,
        probe_port,
        &probe_path,
        Duration::from_secs(30),
    ));
    let start_to_ready = ready_at - first.started;

    // The container holds exactly what the manifest grants, as the kernel sees it.
    let pid = rt.block_on(first.pid());
    let sec = process_security(pid);
    let caps = format!("{:016x}", expected_capabilities(server));
    for set in ["CapEff", "CapPrm", "CapBnd"] {
        assert_eq!(sec[set], caps, "{set}: {sec:?}");
    }
    assert_eq!(sec["CapAmb"], "0000000000000000", "{sec:?}");
    assert_eq!(sec["NoNewPrivs"], "1", "{sec:?}");
    assert_eq!(sec["Seccomp"], "2", "seccomp filter mode: {sec:?}");
    assert_eq!(
        sec["Uid"],
        server
            .security_context
            .as_ref()
            .and_then(|s| s.run_as_user)
            .expect("runAsUser")
            .to_string()
    );
    assert_eq!(sec["root"], "ro", "read-only root: {sec:?}");
    // The agent names its handover socket on the host side of the hostPath, as it offers
    // itself just after it is ready.
    let named = handover.join("agent.name");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !named.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(named.exists(), "no socket named in the handover directory");

    // A pod's boto3, through the standard chain, from 169.254.170.23 in the pod namespace.
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, support::token()).expect("token");
    let pod_env = vec![
        (
            "AWS_CONTAINER_CREDENTIALS_FULL_URI",
            "http://169.254.170.23/v1/credentials".to_owned(),
        ),
        (
            "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
            token_file.display().to_string(),
        ),
    ];
    let out = in_netns(&client.name, &script(python, "boto3_fetch.py", &pod_env))
        .output()
        .expect("boto3");
    assert!(
        out.status.success(),
        "{}{}\nagent: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        first.process.stderr.joined()
    );
    let got: Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).expect("json");
    assert_eq!(got["method"], "container-role");
    assert_eq!(got["access_key"], "ASIAEXAMPLE0001");
    assert_eq!(node.fake.calls(), 1);
    assert_eq!(
        node.fake.access_key_ids(),
        vec![NODE_ACCESS_KEY_ID.to_owned()],
        "signed with the node's keys"
    );

    // boto3 keeps asking, one HTTP request per ask, while a second pod takes over.
    let stop = dir.path().join("stop");
    let mut loop_env = pod_env.clone();
    loop_env.push(("PIA_STOP_FILE", stop.display().to_string()));
    let mut asking = Asking {
        child: Some(
            in_netns(
                &client.name,
                &script(python, "boto3_fetch_loop.py", &loop_env),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("boto3 loop"),
        ),
        stop,
    };
    std::thread::sleep(Duration::from_millis(700));

    let pod2 = Pod {
        name: "pod-identity-agent-b".into(),
        dir: tempfile::tempdir().expect("tempdir"),
    };
    let mut init2 = node.start(spec, &pod2, init, &format!("pia-img-{id}-init-b"));
    let code = rt.block_on(init2.exit_code(Duration::from_secs(60)));
    assert_eq!(
        code,
        Some(0),
        "init beside a running agent: {}",
        init2.process.stderr.joined()
    );
    let mut second = node.start(spec, &pod2, server, &format!("pia-img-{id}-server-b"));
    let took_over = rt.block_on(second.logged("took over from the previous agent"));
    let start_to_takeover = took_over - second.started;
    std::thread::sleep(Duration::from_millis(300));

    // The kubelet stops the old pod: SIGTERM, then SIGKILL after the grace period.
    let stopped = Instant::now();
    rt.block_on(podman_ok(&["stop", "--time", &grace, &first.name]));
    let code = rt.block_on(first.exit_code(Duration::from_secs(60)));
    let stop_took = stopped.elapsed();
    assert_eq!(code, Some(0), "{}", first.process.stderr.joined());
    std::thread::sleep(Duration::from_millis(1000));
    let after = rt.block_on(ready(
        &node.netns,
        &mut second,
        probe_port,
        &probe_path,
        Duration::from_secs(5),
    ));
    let out = asking.finish();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let counts: Value = serde_json::from_str(stdout.trim()).expect("counts");
    eprintln!(
        "image {size} bytes ({:.1} MB, {runtime_files} beside the binary); init {init_took:?}; server start to ready {start_to_ready:?}; \
         second start to takeover {start_to_takeover:?}; first stopped in {stop_took:?}; \
         boto3 {counts}; test {:?}",
        size as f64 / 1e6,
        test_started.elapsed()
    );
    assert_eq!(
        counts["failed"],
        0,
        "{counts}\nfirst: {}\nsecond: {}",
        first.process.stderr.joined(),
        second.process.stderr.joined()
    );
    assert!(counts["ok"].as_u64().is_some_and(|n| n > 100), "{counts}");
    assert_eq!(
        node.fake.calls(),
        1,
        "the cache came over: no second exchange"
    );
    assert!(after > took_over);
}
