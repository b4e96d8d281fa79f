//! The Kubernetes discovery documents, from the recordings in `proto-fixtures/kube/discovery/`.
//!
//! Contract: `/api` and `/apis` answer the recorded aggregated discovery
//! (`apidiscovery.k8s.io/v2`) to a client that accepts it, as kubectl 1.32 does; to one that
//! does not, the legacy `APIVersions` and `APIGroupList` derived from the same recording, and
//! `/api/v1`, `/apis/<group>/<version>` the `APIResourceList` (subresources as `pods/log`…).
//! `/version` is recorded. Anything else is `None` (the caller's 404).

use super::recorded::{recording, render};
use super::wire::WireResponse;
use serde_json::{json, Value};

fn recorded_body(name: &str) -> Value {
    recording(&format!("kube/discovery/{name}"))
        .map(|r| r["response"]["body"].clone())
        .unwrap_or_default()
}

fn json_response(body: Value) -> WireResponse {
    WireResponse {
        status: 200,
        headers: vec![("content-type".into(), "application/json".into())],
        body: body.to_string(),
    }
}

/// The recorded group (`""` for core) and version's resources.
fn resources(group: &str, version: &str) -> Option<Value> {
    let doc = recorded_body(if group.is_empty() { "api" } else { "apis" });
    let item = doc["items"]
        .as_array()?
        .iter()
        .find(|i| i["metadata"]["name"].as_str().unwrap_or_default() == group)?;
    let v = item["versions"]
        .as_array()?
        .iter()
        .find(|v| v["version"] == version)?;
    Some(v["resources"].clone())
}

fn resource_list(group: &str, version: &str) -> Option<Value> {
    let mut list = Vec::new();
    for r in resources(group, version)?.as_array()? {
        let kind = r["responseKind"]["kind"].clone();
        let namespaced = r["scope"] == "Namespaced";
        list.push(json!({"name": r["resource"], "singularName": r["singularResource"], "namespaced": namespaced,
            "kind": kind, "verbs": r["verbs"], "shortNames": r["shortNames"], "categories": r["categories"]}));
        for s in r["subresources"].as_array().into_iter().flatten() {
            list.push(json!({"name": format!("{}/{}", r["resource"].as_str().unwrap_or_default(), s["subresource"].as_str().unwrap_or_default()),
                "singularName": "", "namespaced": namespaced, "kind": s["responseKind"]["kind"], "verbs": s["verbs"]}));
        }
    }
    let group_version = if group.is_empty() {
        version.to_owned()
    } else {
        format!("{group}/{version}")
    };
    let mut body = json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": list});
    strip_nulls(&mut body);
    Some(body)
}

fn strip_nulls(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.retain(|_, x| !x.is_null());
            m.values_mut().for_each(strip_nulls);
        }
        Value::Array(a) => a.iter_mut().for_each(strip_nulls),
        _ => {}
    }
}

fn group_list() -> Value {
    let doc = recorded_body("apis");
    let groups: Vec<Value> = doc["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|i| {
            let name = i["metadata"]["name"].as_str().unwrap_or_default();
            let versions: Vec<Value> = i["versions"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|v| {
                    let version = v["version"].as_str().unwrap_or_default();
                    json!({"groupVersion": format!("{name}/{version}"), "version": version})
                })
                .collect();
            json!({"name": name, "versions": versions, "preferredVersion": versions.first()})
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// The discovery answer for `path`, if it is one.
pub fn answer(path: &str, aggregated: bool) -> Option<WireResponse> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match segments.as_slice() {
        ["version"] => Some(render(
            "kube/discovery/version",
            &recorded_body("version"),
            "",
        )),
        ["api"] if aggregated => Some(render("kube/discovery/api", &recorded_body("api"), "")),
        ["apis"] if aggregated => Some(render("kube/discovery/apis", &recorded_body("apis"), "")),
        ["api"] => Some(json_response(
            json!({"kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}]}),
        )),
        ["apis"] => Some(json_response(group_list())),
        ["api", version] => resource_list("", version).map(json_response),
        ["apis", group, version] => resource_list(group, version).map(json_response),
        _ => None,
    }
}
