//! Pods as their projected tokens name them: a token signed by an emulator issuer (RS256, a
//! `kid`, the `kubernetes.io` claims kubelet writes), as the cluster's keys would verify it.

use super::now_secs;
use pod_identity_agent::emulator::issuer::Issuer;
use serde_json::json;

/// One pod: who its tokens say it is.
#[derive(Clone)]
pub struct Pod {
    pub namespace: String,
    pub service_account: String,
    pub name: String,
    pub uid: String,
    pub node: Option<String>,
}

impl Pod {
    pub fn new(i: usize) -> Pod {
        Pod {
            namespace: "payments".into(),
            service_account: "api".into(),
            name: format!("api-{i}"),
            uid: format!("00000000-0000-4000-8000-{i:012}"),
            node: Some("node-a".into()),
        }
    }

    /// A token for this pod as kubelet writes it, issued `age` ago and valid for `ttl` from then.
    pub fn token(&self, issuer: &Issuer, age: u64, ttl: u64) -> String {
        let iat = now_secs() - age;
        let mut k = json!({
            "namespace": self.namespace,
            "pod": {"name": self.name, "uid": self.uid},
            "serviceaccount": {"name": self.service_account, "uid": "sa-uid"},
        });
        if let Some(node) = &self.node {
            k["node"] = json!({"name": node, "uid": "node-uid"});
        }
        issuer
            .sign(&json!({
                "aud": ["pods.eks.amazonaws.com"], "iss": Issuer::ISSUER,
                "iat": iat, "nbf": iat, "exp": iat + ttl,
                "jti": format!("{}-{iat}-{}", self.uid, fastrand::u64(..)),
                "sub": format!("system:serviceaccount:{}:{}", self.namespace, self.service_account),
                "kubernetes.io": k,
            }))
            .expect("sign")
    }
}
