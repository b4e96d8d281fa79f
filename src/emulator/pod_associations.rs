//! The EKS API's Pod Identity association operations, so the emulator's associations can be
//! managed with the AWS CLI and take effect at once (EKS Auth reads them on every exchange).
//!
//! Contract: associations made here live in the cluster's state (the state directory); those of
//! `--associations FILE` (or `--from-cluster`) are listed and described too but are the file's:
//! updating or deleting one is `InvalidRequestException` naming the file. One association per
//! service account (`ResourceInUseException`); unknown ids are `ResourceNotFoundException`;
//! role ARNs are checked as IAM role ARNs (`InvalidParameterException`). [`lookup`] is what EKS
//! Auth uses: an association made here first, then the file's (or the default mapping).

use super::associations::{role_parts, Association, Associations};
use super::cluster::{api_error, now_secs, ApiAssociation, ApiError, Cluster};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Create {
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub service_account: String,
    #[serde(default)]
    pub role_arn: String,
    pub target_role_arn: Option<String>,
    pub disable_session_tags: Option<bool>,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Update {
    pub role_arn: Option<String>,
    pub target_role_arn: Option<String>,
    pub disable_session_tags: Option<bool>,
}

fn invalid(m: impl Into<String>) -> ApiError {
    api_error("InvalidParameterException", m)
}

fn check_role(arn: &str, field: &str) -> Result<(), ApiError> {
    role_parts(arn)
        .map(|_| ())
        .ok_or_else(|| invalid(format!("{field} {arn:?} is not a valid IAM role ARN")))
}

fn new_id() -> String {
    format!("a-{}", super::issuer::short_id(17))
}

/// The association EKS Auth uses for `namespace/service_account`.
pub fn lookup(
    c: &Cluster,
    file: &Associations,
    namespace: &str,
    service_account: &str,
) -> Option<Association> {
    c.pod_identity_associations
        .iter()
        .map(|a| &a.association)
        .find(|a| a.namespace == namespace && a.service_account == service_account)
        .cloned()
        .or_else(|| file.lookup(namespace, service_account))
}

fn file_entries(file: &Associations) -> Vec<Association> {
    match file {
        Associations::Table(list) => list.clone(),
        Associations::Default => Vec::new(),
    }
}

/// An association as the EKS API shows it.
pub fn to_json(c: &Cluster, a: &Association, made: Option<&ApiAssociation>) -> Value {
    let id = a.id();
    json!({
        "clusterName": c.name,
        "namespace": a.namespace,
        "serviceAccount": a.service_account,
        "roleArn": a.role_arn,
        "associationArn": format!("arn:aws:eks:{}:{}:podidentityassociation/{}/{id}", c.region, c.account, c.name),
        "associationId": id,
        "tags": made.map(|m| m.tags.clone()).unwrap_or_default(),
        "createdAt": made.map_or(c.created_at, |m| m.created_at),
        "modifiedAt": made.map_or(c.created_at, |m| m.modified_at),
        "disableSessionTags": a.disable_session_tags,
        "targetRoleArn": a.target_role_arn,
    })
}

/// `CreatePodIdentityAssociation`.
pub fn create(c: &mut Cluster, file: &Associations, req: Create) -> Result<Value, ApiError> {
    if req.namespace.is_empty() || req.service_account.is_empty() {
        return Err(invalid("namespace and serviceAccount are required"));
    }
    check_role(&req.role_arn, "roleArn")?;
    if let Some(t) = &req.target_role_arn {
        check_role(t, "targetRoleArn")?;
    }
    let taken = c
        .pod_identity_associations
        .iter()
        .map(|a| a.association.clone())
        .chain(file_entries(file))
        .find(|a| a.namespace == req.namespace && a.service_account == req.service_account);
    if let Some(a) = taken {
        return Err(api_error(
            "ResourceInUseException",
            format!("Association already exists: {}", a.id()),
        ));
    }
    let now = now_secs();
    let made = ApiAssociation {
        association: Association {
            namespace: req.namespace,
            service_account: req.service_account,
            role_arn: req.role_arn,
            target_role_arn: req.target_role_arn,
            disable_session_tags: req.disable_session_tags.unwrap_or(false),
            association_id: Some(new_id()),
        },
        created_at: now,
        modified_at: now,
        tags: req.tags,
    };
    c.pod_identity_associations.push(made.clone());
    Ok(to_json(c, &made.association, Some(&made)))
}

fn not_found(id: &str) -> ApiError {
    api_error(
        "ResourceNotFoundException",
        format!("No Pod Identity Association found with id {id}"),
    )
}

/// `DescribePodIdentityAssociation`.
pub fn describe(c: &Cluster, file: &Associations, id: &str) -> Result<Value, ApiError> {
    if let Some(m) = c
        .pod_identity_associations
        .iter()
        .find(|m| m.association.id() == id)
    {
        return Ok(to_json(c, &m.association, Some(m)));
    }
    file_entries(file)
        .iter()
        .find(|a| a.id() == id)
        .map(|a| to_json(c, a, None))
        .ok_or_else(|| not_found(id))
}

/// `ListPodIdentityAssociations`, filtered as the query asks.
pub fn list(
    c: &Cluster,
    file: &Associations,
    namespace: Option<&str>,
    service_account: Option<&str>,
) -> Vec<Value> {
    c.pod_identity_associations
        .iter()
        .map(|m| to_json(c, &m.association, Some(m)))
        .chain(file_entries(file).iter().map(|a| to_json(c, a, None)))
        .filter(|v| namespace.is_none_or(|n| v["namespace"] == n))
        .filter(|v| service_account.is_none_or(|s| v["serviceAccount"] == s))
        .collect()
}

fn made_here<'c>(
    c: &'c mut Cluster,
    file: &Associations,
    id: &str,
) -> Result<&'c mut ApiAssociation, ApiError> {
    if file_entries(file).iter().any(|a| a.id() == id) {
        return Err(api_error(
            "InvalidRequestException",
            format!("Association {id} comes from the emulator's --associations file (or --from-cluster); change it there"),
        ));
    }
    c.pod_identity_associations
        .iter_mut()
        .find(|m| m.association.id() == id)
        .ok_or_else(|| not_found(id))
}

/// `UpdatePodIdentityAssociation`.
pub fn update(
    c: &mut Cluster,
    file: &Associations,
    id: &str,
    req: Update,
) -> Result<Value, ApiError> {
    if let Some(r) = &req.role_arn {
        check_role(r, "roleArn")?;
    }
    if let Some(t) = req.target_role_arn.as_deref().filter(|t| !t.is_empty()) {
        check_role(t, "targetRoleArn")?;
    }
    let m = made_here(c, file, id)?;
    if let Some(r) = req.role_arn {
        m.association.role_arn = r;
    }
    if let Some(t) = req.target_role_arn {
        // An empty targetRoleArn removes it, as EKS documents.
        m.association.target_role_arn = (!t.is_empty()).then_some(t);
    }
    if let Some(d) = req.disable_session_tags {
        m.association.disable_session_tags = d;
    }
    m.modified_at = now_secs();
    let m = m.clone();
    Ok(to_json(c, &m.association, Some(&m)))
}

/// `DeletePodIdentityAssociation`: the association as it was.
pub fn delete(c: &mut Cluster, file: &Associations, id: &str) -> Result<Value, ApiError> {
    let m = made_here(c, file, id)?.clone();
    c.pod_identity_associations
        .retain(|x| x.association.id() != id);
    Ok(to_json(c, &m.association, Some(&m)))
}
