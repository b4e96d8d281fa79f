//! The rendered DaemonSet as the kubelet reads it: `kubectl kustomize` output split into YAML
//! documents, and a container's environment and arguments resolved the way the kubelet resolves
//! them (`value`, `configMapKeyRef` from the rendered ConfigMap, `fieldRef` from the downward API,
//! `$(VAR)` in args). A source the kubelet would need and this does not know fails loudly, so a
//! test never runs a container with a variable silently missing. [`typed`] reads any object
//! (a manifest, a body the agent sends the API server) into its `k8s-openapi` type, refusing a
//! field the type does not know.

use k8s_openapi::api::core::v1::Container;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

/// Every key of `original` must survive a trip through the typed model: a key the types do not
/// know is dropped on the way back, and that is an unknown field.
pub fn assert_known(original: &Value, back: &Value, path: &str) {
    match (original, back) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                let next = format!("{path}.{k}");
                let Some(w) = b.get(k) else {
                    panic!("unknown field {next}")
                };
                assert_known(v, w, &next);
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            assert_eq!(a.len(), b.len(), "{path}");
            for (i, (v, w)) in a.iter().zip(b).enumerate() {
                assert_known(v, w, &format!("{path}[{i}]"));
            }
        }
        _ => {}
    }
}

pub fn typed<T: DeserializeOwned + Serialize>(doc: &Value, what: &str) -> T {
    let t: T = serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_known(doc, &serde_json::to_value(&t).expect("serialize"), what);
    t
}

/// The non-empty YAML documents of a multi-document stream.
pub fn docs(text: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).expect("YAML document"))
        .filter(|v| !v.is_null())
        .collect()
}

/// `kubectl kustomize <variant>` (a directory of this repository), or `None` (after a message)
/// without kubectl; under PIA_REQUIRE_KUBECTL=1 (CI) that is a failure instead.
pub fn kustomize(variant: &str) -> Option<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(variant);
    match std::process::Command::new("kubectl")
        .arg("kustomize")
        .arg(&dir)
        .output()
    {
        Ok(out) => {
            assert!(
                out.status.success(),
                "kubectl kustomize {variant}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            Some(String::from_utf8_lossy(&out.stdout).into_owned())
        }
        Err(_) => {
            assert!(
                std::env::var("PIA_REQUIRE_KUBECTL").as_deref() != Ok("1"),
                "kubectl is required (PIA_REQUIRE_KUBECTL=1)"
            );
            eprintln!("SKIPPED: kubectl not installed; kustomize renders not checked");
            None
        }
    }
}

/// What the downward API tells a container about its pod and node (`fieldRef`).
pub struct Downward {
    pub node_name: String,
    pub host_ip: String,
    pub pod_name: String,
    pub pod_namespace: String,
}

impl Downward {
    fn field(&self, path: &str) -> Option<&str> {
        Some(match path {
            "spec.nodeName" => &self.node_name,
            "status.hostIP" | "status.podIP" => &self.host_ip, // hostNetwork: the pod's IP is the node's
            "metadata.name" => &self.pod_name,
            "metadata.namespace" => &self.pod_namespace,
            _ => return None,
        })
    }
}

/// The container's environment in order, every `valueFrom` resolved; earlier variables expand in
/// later values, as the kubelet does.
pub fn env(
    c: &Container,
    config: &BTreeMap<String, String>,
    downward: &Downward,
) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for e in c.env.iter().flatten() {
        let value = if let Some(v) = &e.value {
            expand(v, &out)
        } else if let Some(from) = &e.value_from {
            if let Some(key) = &from.config_map_key_ref {
                config.get(&key.key).cloned().unwrap_or_else(|| {
                    panic!(
                        "{}: env {} names ConfigMap key {}, which the render lacks",
                        c.name, e.name, key.key
                    )
                })
            } else if let Some(field) = &from.field_ref {
                downward
                    .field(&field.field_path)
                    .unwrap_or_else(|| {
                        panic!(
                            "{}: env {}: no test value for fieldRef {}",
                            c.name, e.name, field.field_path
                        )
                    })
                    .to_owned()
            } else {
                panic!(
                    "{}: env {}: a valueFrom source tests/support/manifest.rs does not resolve",
                    c.name, e.name
                )
            }
        } else {
            String::new()
        };
        out.retain(|(k, _)| k != &e.name);
        out.push((e.name.clone(), value));
    }
    out
}

/// `$(VAR)` replaced by a defined variable's value, `$$` by `$`; a reference to an undefined
/// variable stays as written (the kubelet's rule).
pub fn expand(text: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some((name, tail)) = after.strip_prefix('(').and_then(|a| a.split_once(')')) {
            match env.iter().rev().find(|(k, _)| k == name) {
                Some((_, v)) => out.push_str(v),
                None => out.push_str(&format!("$({name})")),
            }
            rest = tail;
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// The container's arguments with `$(VAR)` expanded from its resolved environment.
pub fn args(c: &Container, env: &[(String, String)]) -> Vec<String> {
    c.args.iter().flatten().map(|a| expand(a, env)).collect()
}
