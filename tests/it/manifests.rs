//! The Kubernetes manifests in `daemonset/`: every file and every kustomize render parses into
//! the `k8s-openapi` types with no unknown field; container args parse with the binary's own
//! parser; probes, ports, capabilities and the hybrid variants match what the agent does. The
//! admission policy that narrows the agent's `nodes patch` to removing its own node's startup
//! taint is checked in every render that grants it, and its CEL is evaluated (cel-python) against
//! changes it must allow and refuse.
//!
//! Renders need `kubectl` (kustomize is built in); without it they are skipped with a message,
//! unless PIA_REQUIRE_KUBECTL=1 (CI), where that fails.

use crate::support;
use crate::support::manifest::{self, docs, kustomize, typed, Downward};
use clap::Parser;
use k8s_openapi::api::admissionregistration::v1::{
    ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding, ValidatingAdmissionPolicySpec,
};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Container, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use pod_identity_agent::cli::{Cli, Command};
use pod_identity_agent::kube::taint::DEFAULT_KEY;
use pod_identity_agent::kube::PERMISSIONS;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

const VARIANTS: &[&str] = &[
    "daemonset",
    "daemonset/overlays/metrics",
    "daemonset/overlays/hybrid",
    "daemonset/overlays/hybrid-bottlerocket",
];

#[derive(Default)]
struct Rendered {
    daemonsets: Vec<DaemonSet>,
    config: BTreeMap<String, String>,
    services: Vec<Service>,
    service_monitors: Vec<Value>,
    prometheus_rules: Vec<Value>,
    dashboards: Vec<ConfigMap>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
    policies: Vec<ValidatingAdmissionPolicy>,
    policy_bindings: Vec<ValidatingAdmissionPolicyBinding>,
}

fn check(docs: Vec<Value>, source: &str) -> Rendered {
    let mut r = Rendered::default();
    for doc in docs {
        let kind = doc["kind"].as_str().unwrap_or_default().to_owned();
        let what = format!("{source}: {kind} {}", doc["metadata"]["name"]);
        match kind.as_str() {
            "DaemonSet" => r.daemonsets.push(typed(&doc, &what)),
            "ServiceAccount" => r.service_accounts.push(typed(&doc, &what)),
            "ClusterRole" => r.cluster_roles.push(typed(&doc, &what)),
            "ClusterRoleBinding" => r.bindings.push(typed(&doc, &what)),
            "ValidatingAdmissionPolicy" => {
                assert_eq!(
                    doc["apiVersion"], "admissionregistration.k8s.io/v1",
                    "{what}"
                );
                r.policies.push(typed(&doc, &what));
            }
            "ValidatingAdmissionPolicyBinding" => {
                assert_eq!(
                    doc["apiVersion"], "admissionregistration.k8s.io/v1",
                    "{what}"
                );
                r.policy_bindings.push(typed(&doc, &what));
            }
            "ConfigMap" => {
                let map = typed::<ConfigMap>(&doc, &what);
                let labels = map.metadata.labels.clone().unwrap_or_default();
                if labels.contains_key("grafana_dashboard") {
                    r.dashboards.push(map);
                } else {
                    r.config.extend(map.data.unwrap_or_default());
                }
            }
            "PrometheusRule" => {
                assert_eq!(doc["apiVersion"], "monitoring.coreos.com/v1", "{what}");
                r.prometheus_rules.push(doc);
            }
            "Service" => r.services.push(typed(&doc, &what)),
            "ServiceMonitor" => {
                assert_eq!(doc["apiVersion"], "monitoring.coreos.com/v1", "{what}");
                r.service_monitors.push(doc);
            }
            other => panic!("{what}: unexpected kind {other}"),
        }
    }
    r
}

fn manifest_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
        let p = entry.path();
        if p.is_dir() {
            manifest_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "yaml")
            && p.file_name().is_some_and(|n| n != "kustomization.yaml")
        {
            out.push(p);
        }
    }
}

#[test]
fn every_manifest_file_is_valid() {
    let mut files = Vec::new();
    manifest_files(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("daemonset"),
        &mut files,
    );
    assert!(files.len() >= 4, "{files:?}");
    for f in files {
        check(
            docs(&std::fs::read_to_string(&f).expect("read")),
            &f.display().to_string(),
        );
    }
}

fn render(variant: &str) -> Option<Rendered> {
    kustomize(variant).map(|text| check(docs(&text), variant))
}

/// The node's IP and name as the downward API would give them, for `$(HOST_IP)`, `$(NODE_NAME)`.
const NODE_IP: &str = "10.0.12.34";
const NODE_NAME: &str = "ip-10-0-12-34.us-west-2.compute.internal";

fn parse_args(c: &Container, config: &BTreeMap<String, String>) -> Command {
    let downward = Downward {
        node_name: NODE_NAME.into(),
        host_ip: NODE_IP.into(),
        pod_name: "pod-identity-agent-x1".into(),
        pod_namespace: "kube-system".into(),
    };
    let mut argv = vec!["pod-identity-agent".to_owned()];
    argv.extend(manifest::args(c, &manifest::env(c, config, &downward)));
    Cli::try_parse_from(&argv)
        .unwrap_or_else(|e| panic!("{}: {argv:?} does not parse: {e}", c.name))
        .command
}

fn caps(c: &Container) -> (Vec<String>, Vec<String>) {
    let caps = c
        .security_context
        .as_ref()
        .and_then(|s| s.capabilities.clone())
        .unwrap_or_default();
    (caps.add.unwrap_or_default(), caps.drop.unwrap_or_default())
}

/// The agent's API access: exactly the two key paths and the resource verbs the agent uses
/// (`kube::PERMISSIONS`: its Node for the startup taint, Events), read with a projected token
/// mounted where the agent reads it, in the agent's container only.
fn api_access(
    r: &Rendered,
    pod: &k8s_openapi::api::core::v1::PodSpec,
    main: &Container,
    args: &pod_identity_agent::cli::ServerArgs,
    variant: &str,
) {
    assert_eq!(r.cluster_roles.len(), 1, "{variant}");
    let rules = r.cluster_roles[0].rules.clone().unwrap_or_default();
    assert_eq!(rules.len(), 1 + PERMISSIONS.len(), "{variant}");
    assert_eq!(
        rules[0].non_resource_urls.clone().unwrap_or_default(),
        vec!["/.well-known/openid-configuration", "/openid/v1/jwks"]
    );
    assert_eq!(rules[0].verbs, vec!["get"]);
    assert!(rules[0].resources.is_none() && rules[0].api_groups.is_none());
    // Every other rule is one of the agent's, with exactly its verbs: nothing more, none missing.
    for (rule, p) in rules[1..].iter().zip(PERMISSIONS) {
        assert_eq!(
            rule.api_groups.as_deref(),
            Some(&[p.api_group.to_owned()][..]),
            "{variant}"
        );
        assert_eq!(
            rule.resources.as_deref(),
            Some(&[p.resource.to_owned()][..]),
            "{variant}"
        );
        assert_eq!(rule.verbs, p.verbs, "{variant}: {}", p.resource);
        assert!(rule.resource_names.is_none() && rule.non_resource_urls.is_none());
    }
    let binding = &r.bindings[0];
    let role_name = r.cluster_roles[0].metadata.name.clone().unwrap_or_default();
    assert_eq!(binding.role_ref.name, role_name, "{variant}");
    let subject = &binding.subjects.as_ref().expect("subjects")[0];
    assert_eq!(
        (subject.kind.as_str(), subject.namespace.as_deref()),
        ("ServiceAccount", Some("kube-system"))
    );
    assert_eq!(
        Some(&subject.name),
        pod.service_account_name.as_ref(),
        "{variant}"
    );
    let projected = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "kube-api-access")
        .and_then(|v| v.projected.clone())
        .expect("projected token volume");
    let sources = projected.sources.unwrap_or_default();
    let token = sources
        .iter()
        .find_map(|s| s.service_account_token.clone())
        .expect("a service-account token");
    assert!(token.expiration_seconds.is_some_and(|s| s <= 3600));
    let mount = main
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == "kube-api-access")
        .expect("mounted");
    assert_eq!(mount.read_only, Some(true));
    let dir = std::path::Path::new(&mount.mount_path);
    assert_eq!(dir.join(&token.path), args.identity.kube_token_file);
    assert_eq!(dir.join("ca.crt"), args.identity.kube_ca_file);
    for init in pod.init_containers.iter().flatten() {
        assert!(
            init.volume_mounts
                .iter()
                .flatten()
                .all(|m| m.name != "kube-api-access"),
            "{variant}: init has no API access"
        );
    }
}

/// Every render that grants `nodes patch` narrows it with the admission policy: bound (Deny) to
/// this render's service account, asking the token's node name and comparing the node with what
/// it was, for the taint key the DaemonSet removes.
fn node_policy(r: &Rendered, args: &pod_identity_agent::cli::ServerArgs, variant: &str) {
    let grants_patch = r
        .cluster_roles
        .iter()
        .flat_map(|role| role.rules.clone().unwrap_or_default())
        .any(|rule| {
            rule.resources
                .as_ref()
                .is_some_and(|r| r.iter().any(|r| r == "nodes"))
                && rule.verbs.iter().any(|v| v == "patch" || v == "*")
        });
    if !grants_patch {
        return;
    }
    assert_eq!(
        (r.policies.len(), r.policy_bindings.len()),
        (1, 1),
        "{variant}: nodes patch without the admission policy"
    );
    let policy = &r.policies[0];
    let name = policy.metadata.name.clone().unwrap_or_default();
    let binding = r.policy_bindings[0].spec.as_ref().expect("binding spec");
    assert_eq!(
        binding.policy_name.as_deref(),
        Some(name.as_str()),
        "{variant}"
    );
    assert_eq!(
        binding.validation_actions.as_deref(),
        Some(&["Deny".to_owned()][..]),
        "{variant}"
    );
    assert!(
        binding.param_ref.is_none() && binding.match_resources.is_none(),
        "{variant}"
    );
    let spec = policy.spec.as_ref().expect("policy spec");
    assert_eq!(spec.failure_policy.as_deref(), Some("Fail"), "{variant}");
    let rules = spec
        .match_constraints
        .as_ref()
        .and_then(|m| m.resource_rules.clone())
        .unwrap_or_default();
    assert_eq!(rules.len(), 1, "{variant}");
    assert_eq!(
        rules[0].resources.as_deref(),
        Some(&["nodes".to_owned()][..])
    );
    assert_eq!(
        rules[0].operations.as_deref(),
        Some(&["UPDATE".to_owned()][..])
    );
    let text = serde_json::to_string(spec).expect("json");
    for needed in [
        "authentication.kubernetes.io/node-name",
        "object.metadata.name",
        "oldObject.spec.taints",
        "oldObject.metadata.labels",
    ] {
        assert!(
            text.contains(needed),
            "{variant}: the policy does not check {needed}"
        );
    }
    let key = args.identity.node_startup_taint.as_deref().expect("taint");
    assert!(
        text.contains(&format!("o.key == '{key}'")),
        "{variant}: the policy allows removing another key than {key}"
    );
    // It applies to this render's service account (and not to the kubelet).
    let sa = &r.service_accounts[0].metadata;
    let user = format!(
        "system:serviceaccount:{}:{}",
        sa.namespace.as_deref().unwrap_or_default(),
        sa.name.as_deref().unwrap_or_default()
    );
    let node = node_object("n", &[taint(key)], &[]);
    let cases = [
        (request(&user, Some("n")), node.clone(), node.clone()),
        (request("system:node:n", Some("n")), node.clone(), node),
    ];
    if let Some(results) = evaluate(spec, &cases) {
        assert!(results[0].0, "{variant}: the policy does not select {user}");
        assert!(!results[1].0, "{variant}: the policy selects the kubelet");
    }
}

/// A Node as the API server holds it: `taints`, and `labels` besides the usual ones.
fn node_object(name: &str, taints: &[Value], labels: &[(&str, &str)]) -> Value {
    let mut all = serde_json::json!({"kubernetes.io/hostname": name});
    for (k, v) in labels {
        all[*k] = (*v).into();
    }
    let mut node = serde_json::json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": all, "annotations": {"node.alpha.kubernetes.io/ttl": "0"}},
        "spec": {"providerID": format!("aws:///us-west-2a/i-{name}"), "podCIDR": "10.0.0.0/24"},
    });
    if !taints.is_empty() {
        node["spec"]["taints"] = Value::Array(taints.to_vec());
    }
    node
}

fn taint(key: &str) -> Value {
    serde_json::json!({"key": key, "effect": "NoSchedule"})
}

/// An admission request's `request` as CEL sees it: the user and, for a pod-bound token, the
/// node it was issued for.
fn request(user: &str, node: Option<&str>) -> Value {
    let extra = match node {
        Some(n) => serde_json::json!({"authentication.kubernetes.io/node-name": [n],
            "authentication.kubernetes.io/pod-name": ["pod-identity-agent-x1"]}),
        None => serde_json::json!({}),
    };
    serde_json::json!({"operation": "UPDATE", "userInfo": {"username": user, "extra": extra}})
}

/// The policy evaluated for each (request, old node, new node): whether it applies, and the
/// messages of the validations that refuse. `None` (after a message) without cel-python, a
/// failure under PIA_REQUIRE_SDKS=1 (CI).
fn evaluate(
    spec: &ValidatingAdmissionPolicySpec,
    cases: &[(Value, Value, Value)],
) -> Option<Vec<(bool, Vec<String>)>> {
    use std::io::Write;
    let python = support::python::python_with(&["celpy"])?;
    let input = serde_json::json!({
        "policy": spec,
        "cases": cases.iter().map(|(request, old, new)| serde_json::json!({
            "request": request, "oldObject": old, "object": new,
        })).collect::<Vec<_>>(),
    });
    let mut child = std::process::Command::new(python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/admission_policy.py"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.to_string().as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let results: Vec<Value> = serde_json::from_slice(&out.stdout).expect("JSON");
    Some(
        results
            .iter()
            .map(|r| {
                let denied = r["denied"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|m| m.as_str().map(str::to_owned))
                    .collect();
                (r["matched"] == true, denied)
            })
            .collect(),
    )
}

/// The policy as shipped, evaluated as the API server evaluates it: the agent may remove its
/// startup taint from the node its token was issued for, and nothing else: not on another
/// node, not without the node name, not another taint, not adding one, not a label, not a
/// cordon. Other users are left to RBAC.
#[test]
fn the_node_policy_allows_only_removing_the_startup_taint_of_its_own_node() {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("daemonset/base/node-policy.yaml");
    let r = check(
        docs(&std::fs::read_to_string(&file).expect("read")),
        "node-policy.yaml",
    );
    let spec = r.policies[0].spec.clone().expect("spec");
    let agent = "system:serviceaccount:kube-system:pod-identity-agent";
    let (ours, dedicated) = (
        taint(DEFAULT_KEY),
        serde_json::json!({"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}),
    );
    let execute = serde_json::json!({"key": DEFAULT_KEY, "effect": "NoExecute"});
    let tainted = node_object(
        "n1",
        &[ours.clone(), dedicated.clone(), execute.clone()],
        &[],
    );
    let removed = node_object("n1", std::slice::from_ref(&dedicated), &[]);
    let mut cordoned = removed.clone();
    cordoned["spec"]["unschedulable"] = true.into();
    let mut cidr = removed.clone();
    cidr["spec"]["podCIDR"] = "10.9.9.0/24".into();
    let other = |n: &Value| {
        let mut n = n.clone();
        n["metadata"]["name"] = "n2".into();
        n
    };
    let me = request(agent, Some("n1"));
    // What, whether the policy applies, whether it allows, and (request, old node, new node).
    type Case<'a> = (&'a str, bool, bool, (Value, Value, Value));
    let cases: Vec<Case> = vec![
        (
            "remove the startup taint",
            true,
            true,
            (me.clone(), tainted.clone(), removed.clone()),
        ),
        (
            "hybrid's account",
            true,
            true,
            (
                request(&format!("{agent}-hybrid"), Some("n1")),
                tainted.clone(),
                removed.clone(),
            ),
        ),
        (
            "nothing changed",
            true,
            true,
            (me.clone(), removed.clone(), removed.clone()),
        ),
        (
            "another node",
            true,
            false,
            (me.clone(), other(&tainted), other(&removed)),
        ),
        (
            "no node name",
            true,
            false,
            (request(agent, None), tainted.clone(), removed.clone()),
        ),
        (
            "remove another taint",
            true,
            false,
            (
                me.clone(),
                tainted.clone(),
                node_object("n1", &[ours.clone(), execute.clone()], &[]),
            ),
        ),
        (
            "add a taint",
            true,
            false,
            (me.clone(), removed.clone(), tainted.clone()),
        ),
        (
            "change a taint",
            true,
            false,
            (
                me.clone(),
                node_object("n1", std::slice::from_ref(&dedicated), &[]),
                node_object(
                    "n1",
                    &[
                        serde_json::json!({"key": "dedicated", "value": "none", "effect": "NoSchedule"}),
                    ],
                    &[],
                ),
            ),
        ),
        (
            "relabel",
            true,
            false,
            (
                me.clone(),
                tainted.clone(),
                node_object("n1", std::slice::from_ref(&dedicated), &[("team", "x")]),
            ),
        ),
        (
            "cordon",
            true,
            false,
            (me.clone(), removed.clone(), cordoned),
        ),
        ("pod CIDR", true, false, (me.clone(), removed.clone(), cidr)),
        (
            "the kubelet",
            false,
            true,
            (
                request("system:node:n1", Some("n1")),
                removed.clone(),
                tainted.clone(),
            ),
        ),
    ];
    let inputs: Vec<_> = cases.iter().map(|c| c.3.clone()).collect();
    let Some(results) = evaluate(&spec, &inputs) else {
        return;
    };
    for ((what, applies, allowed, _), (matched, denied)) in cases.iter().zip(&results) {
        assert_eq!(matched, applies, "{what}: applies");
        assert_eq!(denied.is_empty(), *allowed, "{what}: {denied:?}");
    }
}

#[test]
fn renders_are_valid_and_match_the_agent() {
    for variant in VARIANTS {
        let Some(r) = render(variant) else { return };
        assert_eq!(r.daemonsets.len(), 1, "{variant}");
        assert!(
            r.service_accounts
                .iter()
                .all(|sa| sa.automount_service_account_token == Some(false)),
            "{variant}"
        );
        assert!(
            r.config.contains_key("AWS_REGION") && r.config.contains_key("CLUSTER_NAME"),
            "{variant}"
        );
        let ds = &r.daemonsets[0];
        let spec = ds.spec.as_ref().expect("spec");
        let strategy = spec.update_strategy.as_ref().expect("strategy");
        assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
        // Surge: the new agent starts beside the old one and takes over its sockets.
        let rolling = strategy.rolling_update.as_ref().expect("rollingUpdate");
        assert_eq!(
            serde_json::to_value(&rolling.max_surge).expect("json"),
            "10%",
            "{variant}"
        );
        assert_eq!(
            serde_json::to_value(&rolling.max_unavailable).expect("json"),
            0,
            "{variant}"
        );
        let pod = spec.template.spec.as_ref().expect("pod spec");
        assert_eq!(pod.host_network, Some(true));
        assert_eq!(pod.automount_service_account_token, Some(false));
        assert_eq!(
            pod.priority_class_name.as_deref(),
            Some("system-node-critical")
        );
        assert!(pod
            .tolerations
            .iter()
            .flatten()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()));
        let selector = spec.selector.match_labels.clone().unwrap_or_default();
        let labels = spec
            .template
            .metadata
            .as_ref()
            .and_then(|m| m.labels.clone())
            .unwrap_or_default();
        assert!(
            selector.iter().all(|(k, v)| labels.get(k) == Some(v)),
            "{variant}: selector must match the template"
        );

        // init: NET_ADMIN only, not privileged, and `init` parses.
        let init = &pod.init_containers.as_ref().expect("init containers")[0];
        assert!(
            matches!(parse_args(init, &r.config), Command::Init(_)),
            "{variant}"
        );
        assert_eq!(caps(init), (vec!["NET_ADMIN".into()], vec!["ALL".into()]));
        for c in [init, &pod.containers[0]] {
            let seccomp = c
                .security_context
                .as_ref()
                .and_then(|s| s.seccomp_profile.as_ref())
                .map(|p| p.type_.clone());
            assert_eq!(
                seccomp.as_deref(),
                Some("RuntimeDefault"),
                "{variant}: {}",
                c.name
            );
        }
        assert_ne!(
            init.security_context.as_ref().and_then(|s| s.privileged),
            Some(true)
        );

        // server: NET_BIND_SERVICE only, read-only root, args parse, probes and ports agree.
        let main = &pod.containers[0];
        let Command::Server(args) = parse_args(main, &r.config) else {
            panic!("{variant}: not a server")
        };
        assert_eq!(args.cluster_name, r.config["CLUSTER_NAME"]);
        // Identity: tokens verified against the API server's keys, redeemed on their own node.
        assert_eq!(
            args.identity.token_verification,
            pod_identity_agent::cli::Verification::ApiServer,
            "{variant}"
        );
        assert_eq!(
            args.identity.node_name.as_deref(),
            Some(NODE_NAME),
            "{variant}"
        );
        api_access(&r, pod, main, &args, variant);
        node_policy(&r, &args, variant);
        // The node's startup taint: the agent removes the one it tolerates by name, and reports
        // refusals as Events (both off outside the manifests).
        let taint = args.identity.node_startup_taint.as_deref();
        assert_eq!(taint, Some(DEFAULT_KEY), "{variant}");
        assert!(
            pod.tolerations
                .iter()
                .flatten()
                .any(|t| t.key.as_deref() == taint
                    && t.operator.as_deref() == Some("Exists")
                    && t.effect.as_deref() == Some("NoSchedule")),
            "{variant}: the agent tolerates the taint it removes"
        );
        assert!(args.identity.events, "{variant}");
        // The node name the downward API gives is one the agent can patch and name.
        args.agent_settings().expect("settings");
        assert_eq!(
            caps(main),
            (vec!["NET_BIND_SERVICE".into()], vec!["ALL".into()])
        );
        let sc = main.security_context.as_ref().expect("securityContext");
        assert_eq!(
            (sc.read_only_root_filesystem, sc.allow_privilege_escalation),
            (Some(true), Some(false))
        );
        assert!(
            main.env.iter().flatten().any(|e| e.name == "AWS_REGION"),
            "{variant}: AWS_REGION"
        );
        for (probe, path) in [
            (&main.liveness_probe, "/healthz"),
            (&main.readiness_probe, "/readyz"),
        ] {
            let get = probe
                .as_ref()
                .and_then(|p| p.http_get.as_ref())
                .expect("httpGet probe");
            assert_eq!(get.path.as_deref(), Some(path));
            assert_eq!(
                serde_json::to_value(&get.port).expect("port"),
                serde_json::json!(args.probe_port),
                "{variant} {path}"
            );
            assert_eq!(
                get.host.as_deref(),
                Some("localhost"),
                "the probe listener binds 127.0.0.1"
            );
        }
        // hostNetwork: declared ports would be host ports and keep a second agent pod (an
        // upgrade's surge) off the node; the agent binds its own addresses.
        assert!(
            main.ports.as_ref().is_none_or(Vec::is_empty),
            "{variant}: no declared ports"
        );
        // The handover directory is on the host, where the agent looks for it.
        let handover = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == "handover")
            .and_then(|v| v.host_path.as_ref())
            .expect("handover hostPath");
        assert_eq!(handover.path, "/run/pod-identity-agent");
        assert_eq!(handover.type_.as_deref(), Some("DirectoryOrCreate"));
        let mount = main
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == "handover")
            .expect("handover mount");
        assert_eq!(
            std::path::Path::new(&mount.mount_path),
            args.handover.handover_dir.as_path(),
            "{variant}"
        );
        assert_ne!(mount.read_only, Some(true));
        // Metrics on loopback, except where the metrics overlay moves them to the node's IP.
        let metrics_ip = if *variant == "daemonset/overlays/metrics" {
            NODE_IP
        } else {
            "127.0.0.1"
        };
        assert_eq!(args.metrics_address.to_string(), metrics_ip, "{variant}");
        let res = main.resources.as_ref().expect("resources");
        assert!(res
            .requests
            .as_ref()
            .is_some_and(|r| r.contains_key("memory") && r.contains_key("cpu")));
        assert!(res
            .limits
            .as_ref()
            .is_some_and(|l| l.contains_key("memory")));

        let affinity = serde_json::to_value(&pod.affinity)
            .expect("affinity")
            .to_string();
        if variant.contains("hybrid") {
            assert!(args.rotate_credentials, "{variant}");
            assert!(
                affinity.contains(r#""operator":"In","values":["hybrid"]"#),
                "{variant}: {affinity}"
            );
            let host_path = if variant.ends_with("bottlerocket") {
                "/var/eks-hybrid/.aws"
            } else {
                "/eks-hybrid/.aws"
            };
            let vol = pod
                .volumes
                .iter()
                .flatten()
                .find(|v| v.name == "node-credentials")
                .expect("volume");
            assert_eq!(
                vol.host_path.as_ref().map(|h| h.path.as_str()),
                Some(host_path)
            );
            let mount = main
                .volume_mounts
                .iter()
                .flatten()
                .find(|m| m.name == "node-credentials")
                .expect("mount");
            assert_eq!(mount.read_only, Some(true));
            let file = main
                .env
                .iter()
                .flatten()
                .find(|e| e.name == "AWS_SHARED_CREDENTIALS_FILE")
                .and_then(|e| e.value.clone());
            assert!(
                file.is_some_and(|f| f.starts_with(&mount.mount_path)),
                "{variant}: credentials file inside the mount"
            );
            // Reading one read-only directory needs no SELinux type of its own, Bottlerocket
            // included: no spc_t.
            assert!(sc.se_linux_options.is_none(), "{variant}");
        } else {
            assert!(!args.rotate_credentials);
            assert!(
                affinity.contains(r#""operator":"NotIn""#) && affinity.contains("hybrid"),
                "{variant}: {affinity}"
            );
        }

        if *variant == "daemonset/overlays/metrics" {
            let svc = &r.services[0];
            let svc_spec = svc.spec.as_ref().expect("service spec");
            let port = &svc_spec.ports.as_ref().expect("ports")[0];
            assert_eq!(port.port, i32::from(args.metrics_port));
            assert_eq!(
                serde_json::to_value(&port.target_port).expect("tp"),
                serde_json::json!(args.metrics_port)
            );
            let svc_selector = svc_spec.selector.clone().unwrap_or_default();
            assert!(
                svc_selector.iter().all(|(k, v)| labels.get(k) == Some(v)),
                "the Service selects the agent's pods"
            );
            let sm = &r.service_monitors[0];
            let svc_labels = svc.metadata.labels.clone().unwrap_or_default();
            for (k, v) in sm["spec"]["selector"]["matchLabels"]
                .as_object()
                .expect("matchLabels")
            {
                assert_eq!(
                    svc_labels.get(k).map(String::as_str),
                    v.as_str(),
                    "ServiceMonitor selects the Service"
                );
            }
            assert_eq!(
                sm["spec"]["endpoints"][0]["port"],
                port.name.clone().unwrap_or_default().as_str()
            );
            assert_eq!(sm["spec"]["endpoints"][0]["path"], "/metrics");
            // The rules select what the ServiceMonitor scrapes: its `job` is the Service's name.
            let job = format!("job=\"{}\"", svc.metadata.name.clone().unwrap_or_default());
            assert_eq!(r.prometheus_rules.len(), 1, "{variant}");
            let rules = r.prometheus_rules[0]["spec"]["groups"]
                .as_array()
                .expect("groups")
                .iter()
                .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default());
            for rule in rules {
                let expr = rule["expr"].as_str().unwrap_or_default();
                assert!(
                    expr.contains(&job) || expr.contains("pod_identity:"),
                    "every rule reads this Service's series or a recording rule: {expr}"
                );
            }
            assert_eq!(r.dashboards.len(), 1, "{variant}");
            let data = r.dashboards[0].data.clone().unwrap_or_default();
            let dashboard: Value =
                serde_json::from_str(data.get("pod-identity-agent.json").expect("dashboard file"))
                    .expect("dashboard JSON");
            assert_eq!(dashboard["uid"], "pod-identity-agent");
        }
    }
}
