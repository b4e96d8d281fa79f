//! The EKS API for identity, as the emulator answers it (rest-json, signing name `eks`): access
//! entries, access policies, the cluster's authentication mode, Pod Identity associations.
//!
//! Contract: every request must be SigV4-signed, checked for real ([`Sessions::signed_by`]) with
//! credentials this emulator issued (unsigned `MissingAuthenticationTokenException`, unknown key
//! or token `UnrecognizedClientException`, expired `ExpiredTokenException`, bad signature
//! `InvalidSignatureException`, all 403); any issued principal may call any operation (there is
//! no IAM policy here). Paths and methods are botocore's `eks` 2017-11-01 model's; a cluster
//! other than this one is `ResourceNotFoundException` "No cluster found for name: X.". Answers
//! are rendered from `proto-fixtures/eks/identity/` ([`recorded`](super::recorded)); changes go
//! through [`Store::change`], so they are on disk before they are answered.

use super::associations::Associations;
use super::cluster::{api_error, AccessEntry, ApiError, Cluster, Store};
use super::recorded;
use super::sessions::{Sessions, Unsigned};
use super::sigv4::{self, Mismatch};
use super::wire::WireResponse;
use super::{entries, pod_associations as pia};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use std::time::SystemTime;

/// What the EKS API needs of the emulator.
pub struct EksApi<'a> {
    pub sessions: &'a Sessions,
    pub store: &'a Store,
    pub file: &'a Associations,
}

/// Whether `path` is one of this API's (so the emulator routes it here).
pub fn serves(path: &str) -> bool {
    path == "/access-policies" || path.starts_with("/clusters/")
}

fn decode(segment: &str) -> String {
    form_urlencoded::parse(format!("x={}", segment.replace('+', "%2B")).as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

fn body<T: DeserializeOwned>(raw: &[u8]) -> Result<T, ApiError> {
    let raw = if raw.is_empty() {
        b"{}".as_slice()
    } else {
        raw
    };
    serde_json::from_slice(raw).map_err(|e| {
        api_error(
            "InvalidParameterException",
            format!("the request body is not valid: {e}"),
        )
    })
}

fn unsigned(u: Unsigned) -> ApiError {
    match u {
        Unsigned::Missing => api_error(
            "MissingAuthenticationTokenException",
            "Missing Authentication Token",
        ),
        Unsigned::Unknown => api_error(
            "UnrecognizedClientException",
            "The security token included in the request is invalid.",
        ),
        Unsigned::Expired => api_error(
            "ExpiredTokenException",
            "The security token included in the request is expired",
        ),
        Unsigned::WrongService => api_error(
            "InvalidSignatureException",
            "Credential should be scoped to correct service: 'eks'.",
        ),
        Unsigned::Mismatch(Mismatch::Signature) => {
            api_error("InvalidSignatureException", super::sts::SIGNATURE_MISMATCH)
        }
        Unsigned::Malformed(m) | Unsigned::Mismatch(m) => {
            api_error("InvalidSignatureException", m.to_string())
        }
    }
}

fn query_param(query: &str, name: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// The operation's recording name and its answer.
type Answer = Result<(&'static str, Value), ApiError>;

impl EksApi<'_> {
    pub fn handle(&self, req: &sigv4::Request<'_>, request_id: &str) -> WireResponse {
        let result = self
            .sessions
            .signed_by(req, "eks", SystemTime::now())
            .map_err(unsigned)
            .and_then(|_| self.route(req));
        match result {
            Ok((name, value)) => recorded::render(&format!("eks/{name}"), &value, request_id),
            Err(e) => {
                tracing::info!(code = e.code, message = %e.message, request_id, "emulated EKS API refused a request");
                recorded::eks_error(e.code, &e.message, request_id)
            }
        }
    }

    fn route(&self, req: &sigv4::Request<'_>) -> Answer {
        let segments: Vec<String> = req
            .path
            .trim_start_matches('/')
            .split('/')
            .map(decode)
            .collect();
        let s: Vec<&str> = segments.iter().map(String::as_str).collect();
        let not_found = || {
            api_error(
                "NotFoundException",
                format!("no operation at {} {}", req.method, req.path),
            )
        };
        if s == ["access-policies"] && req.method == "GET" {
            let list: Vec<Value> = super::access::catalogue()
                .iter()
                .map(|p| json!({"name": p.name, "arn": p.arn}))
                .collect();
            return Ok(("list-access-policies", json!({ "accessPolicies": list })));
        }
        let ["clusters", name, rest @ ..] = s.as_slice() else {
            return Err(not_found());
        };
        let cluster = self.store.snapshot();
        if *name != cluster.name {
            return Err(api_error(
                "ResourceNotFoundException",
                format!("No cluster found for name: {name}."),
            ));
        }
        match rest {
            [] | ["update-config"] | ["updates", _] => self.cluster_ops(req, rest, &cluster),
            ["access-entries", ..] => self.entry_ops(req, &rest[1..], &cluster),
            ["pod-identity-associations", ..] => self.association_ops(req, &rest[1..], &cluster),
            _ => Err(not_found()),
        }
        .map_err(|e| {
            if e.code == "NotFoundException" {
                not_found()
            } else {
                e
            }
        })
    }

    fn cluster_ops(&self, req: &sigv4::Request<'_>, rest: &[&str], c: &Cluster) -> Answer {
        match (req.method, rest) {
            ("GET", []) => Ok(("describe-cluster", describe_cluster(c))),
            ("POST", ["update-config"]) => {
                let v: Value = body(req.body)?;
                let mode = v["accessConfig"]["authenticationMode"]
                    .as_str()
                    .ok_or_else(|| {
                        api_error(
                            "InvalidParameterException",
                            "The emulator changes only accessConfig.authenticationMode",
                        )
                    })?;
                let update = self.store.change(|c| c.update_mode(mode))?;
                Ok(("update-cluster-config", json!({ "update": update })))
            }
            ("GET", ["updates", id]) => c
                .updates
                .iter()
                .find(|u| u.id == *id)
                .map(|u| ("describe-update", json!({ "update": u })))
                .ok_or_else(|| {
                    api_error(
                        "ResourceNotFoundException",
                        format!("No update found for ID: {id}."),
                    )
                }),
            _ => Err(api_error("NotFoundException", "")),
        }
    }

    fn entry_ops(&self, req: &sigv4::Request<'_>, rest: &[&str], c: &Cluster) -> Answer {
        let entry = |e: AccessEntry| json!({ "accessEntry": e });
        match (req.method, rest) {
            ("POST", []) => {
                let r = body(req.body)?;
                Ok((
                    "create-access-entry",
                    entry(self.store.change(|c| entries::create(c, r))?),
                ))
            }
            ("GET", []) => {
                let policy = query_param(req.query, "associatedPolicyArn");
                let list = entries::list(c, policy.as_deref())?;
                Ok(("list-access-entries", json!({ "accessEntries": list })))
            }
            ("GET", [p]) => Ok(("describe-access-entry", entry(entries::describe(c, p)?))),
            ("POST", [p]) => {
                let r = body(req.body)?;
                Ok((
                    "update-access-entry",
                    entry(self.store.change(|c| entries::update(c, p, r))?),
                ))
            }
            ("DELETE", [p]) => {
                self.store.change(|c| entries::delete(c, p))?;
                Ok(("delete-access-entry", json!({})))
            }
            ("POST", [p, "access-policies"]) => {
                let r = body(req.body)?;
                let a = self.store.change(|c| entries::associate(c, p, r))?;
                Ok((
                    "associate-access-policy",
                    json!({"clusterName": c.name, "principalArn": p, "associatedAccessPolicy": a}),
                ))
            }
            ("GET", [p, "access-policies"]) => {
                let list = entries::associated(c, p)?;
                Ok((
                    "list-associated-access-policies",
                    json!({"clusterName": c.name, "principalArn": p, "associatedAccessPolicies": list}),
                ))
            }
            ("DELETE", [p, "access-policies", policy]) => {
                self.store.change(|c| entries::disassociate(c, p, policy))?;
                Ok(("disassociate-access-policy", json!({})))
            }
            _ => Err(api_error("NotFoundException", "")),
        }
    }

    fn association_ops(&self, req: &sigv4::Request<'_>, rest: &[&str], c: &Cluster) -> Answer {
        let file = self.file;
        let one = |v: Value| json!({ "association": v });
        match (req.method, rest) {
            ("POST", []) => {
                let r = body(req.body)?;
                Ok((
                    "create-pod-identity-association",
                    one(self.store.change(|c| pia::create(c, file, r))?),
                ))
            }
            ("GET", []) => {
                let (ns, sa) = (
                    query_param(req.query, "namespace"),
                    query_param(req.query, "serviceAccount"),
                );
                let list = pia::list(c, file, ns.as_deref(), sa.as_deref());
                Ok((
                    "list-pod-identity-associations",
                    json!({ "associations": list }),
                ))
            }
            ("GET", [id]) => Ok((
                "describe-pod-identity-association",
                one(pia::describe(c, file, id)?),
            )),
            ("POST", [id]) => {
                let r = body(req.body)?;
                Ok((
                    "update-pod-identity-association",
                    one(self.store.change(|c| pia::update(c, file, id, r))?),
                ))
            }
            ("DELETE", [id]) => Ok((
                "delete-pod-identity-association",
                one(self.store.change(|c| pia::delete(c, file, id))?),
            )),
            _ => Err(api_error("NotFoundException", "")),
        }
    }
}

/// `DescribeCluster`, with what the emulator has of a cluster.
pub fn describe_cluster(c: &Cluster) -> Value {
    json!({"cluster": {
        "name": c.name,
        "arn": c.arn,
        "createdAt": c.created_at,
        "version": "1.32",
        "status": "ACTIVE",
        "identity": {"oidc": {"issuer": super::issuer::Issuer::ISSUER}},
        "accessConfig": {
            "bootstrapClusterCreatorAdminPermissions": c.bootstrap_cluster_creator_admin_permissions,
            "authenticationMode": c.authentication_mode,
        },
        "tags": {},
    }})
}
