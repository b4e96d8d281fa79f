//! The EKS API's access entry and access policy operations, on the cluster's state.
//!
//! Contract: each function takes the request's members (already read from the path and the JSON
//! body) and changes or reads a [`Cluster`], with EKS's validation and errors:
//! - access entries only under the `API` modes (`InvalidRequestException`, EKS's message);
//! - `principalArn` an IAM role or user, never an STS session (`InvalidParameterException`);
//!   node types take roles only, and neither a username nor groups;
//! - a username not starting with `system:`, `eks:`, `aws:`, `amazon:`, `iam:`;
//! - one entry per principal (`ResourceInUseException`); unknown principals and policies not
//!   associated are `ResourceNotFoundException`;
//! - access policies: a known policy ARN, a valid scope, only on types that take policies;
//!   associating an associated policy again replaces its scope, as EKS does.

use super::access::{self, EntryType, Scope};
use super::cluster::{api_error, now_secs, AccessEntry, ApiError, AssociatedPolicy, Cluster};
use serde::Deserialize;
use std::collections::BTreeMap;

const NO_ENTRY: &str = "The specified principalArn could not be found. You can view your available access entries with 'list-access-entries'.";

fn invalid(message: impl Into<String>) -> ApiError {
    api_error("InvalidParameterException", message)
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateEntry {
    #[serde(default)]
    pub principal_arn: String,
    pub kubernetes_groups: Option<Vec<String>>,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    pub username: Option<String>,
    #[serde(rename = "type")]
    pub entry_type: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UpdateEntry {
    pub kubernetes_groups: Option<Vec<String>>,
    pub username: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Associate {
    #[serde(default)]
    pub policy_arn: String,
    pub access_scope: Option<Scope>,
}

fn entry_type(name: Option<&str>) -> Result<&'static EntryType, ApiError> {
    let name = name.unwrap_or("STANDARD");
    EntryType::named(name).ok_or_else(|| {
        invalid(format!(
            "The type {name} is not valid; valid types: {}",
            EntryType::names().join(", ")
        ))
    })
}

/// `CreateAccessEntry`.
pub fn create(c: &mut Cluster, req: CreateEntry) -> Result<AccessEntry, ApiError> {
    c.require_access_entries()?;
    if req.principal_arn.is_empty() {
        return Err(invalid("principalArn is required"));
    }
    let kind = access::principal_kind(&req.principal_arn).map_err(invalid)?;
    let t = entry_type(req.entry_type.as_deref())?;
    if !t.principals.iter().any(|p| p == kind) {
        return Err(invalid(format!(
            "Access entries of type {} take an IAM role ARN",
            t.name
        )));
    }
    if !t.customizable && (req.username.is_some() || req.kubernetes_groups.is_some()) {
        return Err(invalid(format!(
            "A username and kubernetesGroups can't be specified for access entries of type {}",
            t.name
        )));
    }
    if let Some(u) = &req.username {
        access::check_username(u).map_err(invalid)?;
    }
    if c.entry(&req.principal_arn).is_some() {
        return Err(api_error(
            "ResourceInUseException",
            "The specified access entry resource is already in use on this cluster.",
        ));
    }
    let now = now_secs();
    let entry = AccessEntry {
        cluster_name: c.name.clone(),
        principal_arn: req.principal_arn.clone(),
        kubernetes_groups: t
            .groups
            .clone()
            .or(req.kubernetes_groups)
            .unwrap_or_default(),
        access_entry_arn: c.entry_arn(&req.principal_arn),
        created_at: now,
        modified_at: now,
        tags: req.tags,
        username: t
            .username
            .clone()
            .or(req.username)
            .unwrap_or_else(|| access::default_username(&req.principal_arn)),
        entry_type: t.name.clone(),
        access_policies: Vec::new(),
    };
    c.access_entries.push(entry.clone());
    Ok(entry)
}

fn entry_mut<'c>(c: &'c mut Cluster, principal_arn: &str) -> Result<&'c mut AccessEntry, ApiError> {
    c.require_access_entries()?;
    c.access_entries
        .iter_mut()
        .find(|e| e.principal_arn == principal_arn)
        .ok_or_else(|| api_error("ResourceNotFoundException", NO_ENTRY))
}

/// `DescribeAccessEntry`.
pub fn describe(c: &Cluster, principal_arn: &str) -> Result<AccessEntry, ApiError> {
    c.require_access_entries()?;
    c.entry(principal_arn)
        .cloned()
        .ok_or_else(|| api_error("ResourceNotFoundException", NO_ENTRY))
}

/// `ListAccessEntries`, optionally only those with `associated_policy`.
pub fn list(c: &Cluster, associated_policy: Option<&str>) -> Result<Vec<String>, ApiError> {
    c.require_access_entries()?;
    Ok(c.access_entries
        .iter()
        .filter(|e| {
            associated_policy.is_none_or(|p| e.access_policies.iter().any(|a| a.policy_arn == p))
        })
        .map(|e| e.principal_arn.clone())
        .collect())
}

/// `UpdateAccessEntry`.
pub fn update(
    c: &mut Cluster,
    principal_arn: &str,
    req: UpdateEntry,
) -> Result<AccessEntry, ApiError> {
    let entry = entry_mut(c, principal_arn)?;
    let t = entry_type(Some(&entry.entry_type))?;
    if !t.customizable && (req.username.is_some() || req.kubernetes_groups.is_some()) {
        return Err(invalid(format!(
            "A username and kubernetesGroups can't be changed for access entries of type {}",
            t.name
        )));
    }
    if let Some(u) = req.username {
        access::check_username(&u).map_err(invalid)?;
        entry.username = u;
    }
    if let Some(g) = req.kubernetes_groups {
        entry.kubernetes_groups = g;
    }
    entry.modified_at = now_secs();
    Ok(entry.clone())
}

/// `DeleteAccessEntry`.
pub fn delete(c: &mut Cluster, principal_arn: &str) -> Result<(), ApiError> {
    entry_mut(c, principal_arn)?;
    c.access_entries
        .retain(|e| e.principal_arn != principal_arn);
    Ok(())
}

/// `AssociateAccessPolicy`.
pub fn associate(
    c: &mut Cluster,
    principal_arn: &str,
    req: Associate,
) -> Result<AssociatedPolicy, ApiError> {
    let entry = entry_mut(c, principal_arn)?;
    if !entry_type(Some(&entry.entry_type))?.policies {
        return Err(api_error(
            "InvalidRequestException",
            format!(
                "Access policies can't be associated with access entries of type {}",
                entry.entry_type
            ),
        ));
    }
    if access::policy(&req.policy_arn).is_none() {
        return Err(invalid(format!(
            "The policyArn {} is not a valid access policy; see list-access-policies",
            req.policy_arn
        )));
    }
    let scope = req
        .access_scope
        .ok_or_else(|| invalid("accessScope is required"))?;
    scope.validate().map_err(invalid)?;
    let now = now_secs();
    let existing = entry
        .access_policies
        .iter_mut()
        .find(|a| a.policy_arn == req.policy_arn);
    let associated = match existing {
        Some(a) => {
            a.access_scope = scope;
            a.modified_at = now;
            a.clone()
        }
        None => {
            let a = AssociatedPolicy {
                policy_arn: req.policy_arn,
                access_scope: scope,
                associated_at: now,
                modified_at: now,
            };
            entry.access_policies.push(a.clone());
            a
        }
    };
    entry.modified_at = now;
    Ok(associated)
}

/// `DisassociateAccessPolicy`.
pub fn disassociate(
    c: &mut Cluster,
    principal_arn: &str,
    policy_arn: &str,
) -> Result<(), ApiError> {
    let entry = entry_mut(c, principal_arn)?;
    let before = entry.access_policies.len();
    entry.access_policies.retain(|a| a.policy_arn != policy_arn);
    if entry.access_policies.len() == before {
        return Err(api_error(
            "ResourceNotFoundException",
            "The specified policyArn is not associated with the access entry.",
        ));
    }
    Ok(())
}

/// `ListAssociatedAccessPolicies`.
pub fn associated(c: &Cluster, principal_arn: &str) -> Result<Vec<AssociatedPolicy>, ApiError> {
    Ok(describe(c, principal_arn)?.access_policies)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emulator::cluster::Seed;

    fn cluster(mode: &str) -> Cluster {
        Cluster::new(&Seed {
            name: "dev".into(),
            region: "us-east-1".into(),
            account: "111122223333".into(),
            mode: mode.into(),
            creator: "arn:aws:iam::111122223333:role/creator".into(),
        })
        .expect("cluster")
    }

    fn create_req(arn: &str, t: Option<&str>) -> CreateEntry {
        CreateEntry {
            principal_arn: arn.into(),
            entry_type: t.map(str::to_owned),
            ..CreateEntry::default()
        }
    }

    #[test]
    fn entries_follow_eks_rules() {
        let mut cm = cluster("CONFIG_MAP");
        let e = create(
            &mut cm,
            create_req("arn:aws:iam::111122223333:role/a", None),
        )
        .expect_err("mode");
        assert_eq!(e.code, "InvalidRequestException");
        let mut c = cluster("API_AND_CONFIG_MAP");
        let viewer = "arn:aws:iam::111122223333:role/team/viewer";
        let e = create(&mut c, create_req(viewer, None)).expect("create");
        assert_eq!(
            e.username,
            "arn:aws:sts::111122223333:assumed-role/viewer/{{SessionName}}"
        );
        assert_eq!(
            create(&mut c, create_req(viewer, None))
                .expect_err("dup")
                .code,
            "ResourceInUseException"
        );
        let node = create(
            &mut c,
            create_req("arn:aws:iam::111122223333:role/node", Some("EC2_LINUX")),
        )
        .expect("node");
        assert_eq!(node.username, "system:node:{{EC2PrivateDNSName}}");
        assert_eq!(node.kubernetes_groups, ["system:nodes"]);
        let mut bad = create_req("arn:aws:iam::111122223333:role/n2", Some("EC2_LINUX"));
        bad.username = Some("x".into());
        assert_eq!(
            create(&mut c, bad).expect_err("fixed").code,
            "InvalidParameterException"
        );
        let mut reserved = create_req("arn:aws:iam::111122223333:role/r", None);
        reserved.username = Some("system:admin".into());
        assert!(create(&mut c, reserved).is_err());
        assert!(create(
            &mut c,
            create_req("arn:aws:sts::111122223333:assumed-role/a/s", None)
        )
        .is_err());
    }

    #[test]
    fn policies_associate_within_eks_rules() {
        let mut c = cluster("API_AND_CONFIG_MAP");
        let viewer = "arn:aws:iam::111122223333:role/team/viewer";
        create(&mut c, create_req(viewer, None)).expect("create");
        let node_role = "arn:aws:iam::111122223333:role/node";
        let node = create(&mut c, create_req(node_role, Some("EC2_LINUX"))).expect("node");
        let scope = Scope {
            kind: "namespace".into(),
            namespaces: vec!["team-a".into()],
        };
        let view = "arn:aws:eks::aws:cluster-access-policy/AmazonEKSViewPolicy";
        associate(
            &mut c,
            viewer,
            Associate {
                policy_arn: view.into(),
                access_scope: Some(scope),
            },
        )
        .expect("associate");
        associate(
            &mut c,
            viewer,
            Associate {
                policy_arn: view.into(),
                access_scope: Some(Scope::cluster()),
            },
        )
        .expect("again");
        assert_eq!(
            associated(&c, viewer).expect("list")[0].access_scope,
            Scope::cluster()
        );
        assert_eq!(list(&c, Some(view)).expect("list"), [viewer]);
        let e = associate(
            &mut c,
            node.principal_arn.as_str(),
            Associate {
                policy_arn: view.into(),
                access_scope: Some(Scope::cluster()),
            },
        );
        assert_eq!(e.expect_err("node").code, "InvalidRequestException");
        disassociate(&mut c, viewer, view).expect("disassociate");
        assert_eq!(
            disassociate(&mut c, viewer, view).expect_err("twice").code,
            "ResourceNotFoundException"
        );
        delete(&mut c, viewer).expect("delete");
        assert_eq!(
            describe(&c, viewer).expect_err("gone").code,
            "ResourceNotFoundException"
        );
    }
}
