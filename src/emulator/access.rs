//! Access entries and access policies as EKS defines them: the entry types and what each fixes,
//! the access policy catalogue and its rules, scopes, and whether a policy allows a request.
//!
//! Contract: the data come from the recordings `proto-fixtures/eks/access-entry-types.json` and
//! `proto-fixtures/eks/access-policies.json` (embedded), so the rules exist once. [`EntryType`]
//! gives a type's fixed username and groups (nodes: `system:node:{{EC2PrivateDNSName}}` or
//! `system:node:{{SessionName}}` and `system:nodes`…) and whether a username, groups or policies
//! may be given; [`default_username`] is EKS's for `STANDARD` entries (an IAM user's ARN, or
//! `arn:aws:sts::<account>:assumed-role/<role name, path removed>/{{SessionName}}`).
//! [`Scope::covers`] says whether a namespace (or a cluster-wide request, `None`) is inside a
//! scope: `cluster` covers all; `namespace` covers the listed names, where a trailing `*` is a
//! prefix, as EKS allows. [`Policy::allows`] evaluates its rules as RBAC does (`*` matches all;
//! a subresource is `resource/sub`); policies recorded without rules are [`Verdict::NotModelled`].

use super::associations::role_parts;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::sync::OnceLock;

const TYPES: &str = include_str!("../../proto-fixtures/eks/access-entry-types.json");
const POLICIES: &str = include_str!("../../proto-fixtures/eks/access-policies.json");

/// One access entry type and what EKS fixes for it.
#[derive(Debug, Clone, Deserialize)]
pub struct EntryType {
    #[serde(rename = "type")]
    pub name: String,
    /// Fixed username (nodes); `None` for `STANDARD`.
    pub username: Option<String>,
    pub groups: Option<Vec<String>>,
    /// Whether a username and groups may be given.
    pub customizable: bool,
    /// Whether access policies may be associated.
    pub policies: bool,
    /// `role`, `user`: which principals it takes.
    pub principals: Vec<String>,
}

#[derive(Deserialize)]
struct TypesFile {
    types: Vec<EntryType>,
}

fn types() -> &'static [EntryType] {
    static T: OnceLock<Vec<EntryType>> = OnceLock::new();
    T.get_or_init(|| {
        serde_json::from_str::<TypesFile>(TYPES)
            .map(|f| f.types)
            .unwrap_or_default()
    })
}

impl EntryType {
    pub fn named(name: &str) -> Option<&'static EntryType> {
        types().iter().find(|t| t.name == name)
    }

    pub fn names() -> Vec<&'static str> {
        types().iter().map(|t| t.name.as_str()).collect()
    }
}

/// An RBAC-style rule of an access policy.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    #[serde(default)]
    pub api_groups: Vec<String>,
    #[serde(default)]
    pub resources: Vec<String>,
    #[serde(default)]
    pub non_resource_urls: Vec<String>,
    pub verbs: Vec<String>,
}

/// An access policy of the catalogue.
#[derive(Debug, Clone, Deserialize)]
pub struct Policy {
    pub name: String,
    pub arn: String,
    /// The Kubernetes user-facing role it is like (`view`, `edit`, `admin`, `cluster-admin`).
    #[serde(default)]
    pub like: Option<String>,
    pub rules: Option<Vec<Rule>>,
}

#[derive(Deserialize)]
struct PoliciesFile {
    policies: Vec<Policy>,
}

/// Every access policy `ListAccessPolicies` returns, in order.
pub fn catalogue() -> &'static [Policy] {
    static P: OnceLock<Vec<Policy>> = OnceLock::new();
    P.get_or_init(|| {
        serde_json::from_str::<PoliciesFile>(POLICIES)
            .map(|f| f.policies)
            .unwrap_or_default()
    })
}

pub fn policy(arn: &str) -> Option<&'static Policy> {
    catalogue().iter().find(|p| p.arn == arn)
}

pub const CLUSTER_ADMIN_POLICY: &str =
    "arn:aws:eks::aws:cluster-access-policy/AmazonEKSClusterAdminPolicy";

/// What a request asks, as a `SubjectAccessReview` puts it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attributes {
    /// `None`: a cluster-wide request (a cluster-scoped resource, or all namespaces).
    pub namespace: Option<String>,
    pub verb: String,
    pub group: String,
    pub resource: String,
    pub subresource: String,
    /// Set for a non-resource request (`/healthz`, `/api`); then resource fields are unused.
    pub path: Option<String>,
}

/// What one policy says about a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allows,
    DoesNotAllow,
    /// The policy is listed but its rules are not recorded here.
    NotModelled,
}

fn matches(list: &[String], value: &str) -> bool {
    list.iter().any(|v| v == "*" || v == value)
}

fn path_matches(list: &[String], path: &str) -> bool {
    list.iter().any(|p| match p.strip_suffix('*') {
        Some(prefix) => path.starts_with(prefix),
        None => p == path,
    })
}

impl Rule {
    fn allows(&self, a: &Attributes) -> bool {
        if !matches(&self.verbs, &a.verb) {
            return false;
        }
        if let Some(path) = &a.path {
            return path_matches(&self.non_resource_urls, path);
        }
        let resource = if a.subresource.is_empty() {
            a.resource.clone()
        } else {
            format!("{}/{}", a.resource, a.subresource)
        };
        matches(&self.api_groups, &a.group) && matches(&self.resources, &resource)
    }
}

impl Policy {
    pub fn allows(&self, a: &Attributes) -> Verdict {
        match &self.rules {
            None => Verdict::NotModelled,
            Some(rules) if rules.iter().any(|r| r.allows(a)) => Verdict::Allows,
            Some(_) => Verdict::DoesNotAllow,
        }
    }
}

/// An association's scope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scope {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub namespaces: Vec<String>,
}

impl Scope {
    pub fn cluster() -> Scope {
        Scope {
            kind: "cluster".into(),
            namespaces: Vec::new(),
        }
    }

    /// `cluster` with no namespaces, or `namespace` with 1 or more valid names (or prefixes
    /// ending in `*`); the message is EKS's reason otherwise.
    pub fn validate(&self) -> Result<(), String> {
        match self.kind.as_str() {
            "cluster" if self.namespaces.is_empty() => Ok(()),
            "cluster" => Err("namespaces can't be specified with the cluster access scope type".into()),
            "namespace" if self.namespaces.is_empty() => {
                Err("namespaces must be specified with the namespace access scope type".into())
            }
            "namespace" => match self.namespaces.iter().find(|n| !valid_namespace_pattern(n)) {
                Some(bad) => Err(format!("namespace {bad:?} is not a valid namespace name")),
                None => Ok(()),
            },
            other => Err(format!(
                "Value '{other}' at 'accessScope.type' failed to satisfy constraint: Member must satisfy enum value set: [cluster, namespace]"
            )),
        }
    }

    pub fn covers(&self, namespace: Option<&str>) -> bool {
        match (self.kind.as_str(), namespace) {
            ("cluster", _) => true,
            (_, None) => false,
            (_, Some(ns)) => self.namespaces.iter().any(|n| match n.strip_suffix('*') {
                Some(prefix) => ns.starts_with(prefix),
                None => n == ns,
            }),
        }
    }

    pub fn describe(&self) -> String {
        if self.kind == "cluster" {
            "cluster scope".into()
        } else {
            format!("namespace scope [{}]", self.namespaces.join(", "))
        }
    }
}

/// A DNS-1123 label, optionally ending in `*`.
fn valid_namespace_pattern(n: &str) -> bool {
    let name = n.strip_suffix('*').unwrap_or(n);
    (n.ends_with('*') || !name.is_empty())
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
}

/// The kind of IAM principal an ARN names, for access entries: `role`, `user`, or why not.
pub fn principal_kind(arn: &str) -> Result<&'static str, String> {
    if arn.contains(":assumed-role/") {
        return Err("The principalArn can't be an STS session (assumed-role) ARN: access entries take the role's IAM ARN".into());
    }
    if role_parts(arn).is_some() {
        return Ok("role");
    }
    let user = arn
        .strip_prefix("arn:aws:iam::")
        .and_then(|r| r.split_once(":user/"))
        .filter(|(account, name)| {
            account.len() == 12 && account.bytes().all(|b| b.is_ascii_digit()) && !name.is_empty()
        });
    if user.is_some() {
        return Ok("user");
    }
    Err(format!(
        "The principalArn {arn} is not a valid IAM role or user ARN"
    ))
}

/// EKS's username for a `STANDARD` entry when none is given.
pub fn default_username(principal_arn: &str) -> String {
    match role_parts(principal_arn) {
        Some((account, name)) => {
            format!("arn:aws:sts::{account}:assumed-role/{name}/{{{{SessionName}}}}")
        }
        None => principal_arn.to_owned(),
    }
}

/// A username EKS accepts: not one of the reserved prefixes.
pub fn check_username(username: &str) -> Result<(), String> {
    const RESERVED: [&str; 5] = ["system:", "eks:", "aws:", "amazon:", "iam:"];
    if RESERVED.iter().any(|p| username.starts_with(p)) {
        return Err("The username can't start with system:, eks:, aws:, amazon:, or iam:.".into());
    }
    if username.is_empty() {
        return Err("username must not be empty".into());
    }
    Ok(())
}

/// The recorded catalogue as JSON, for tests comparing against it.
pub fn catalogue_json() -> Value {
    serde_json::from_str(POLICIES).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(ns: Option<&str>, resource: &str, verb: &str) -> Attributes {
        Attributes {
            namespace: ns.map(str::to_owned),
            verb: verb.into(),
            resource: resource.into(),
            ..Attributes::default()
        }
    }

    #[test]
    fn the_recordings_load_and_the_four_policies_are_modelled() {
        assert_eq!(
            EntryType::names(),
            [
                "STANDARD",
                "EC2_LINUX",
                "EC2_WINDOWS",
                "FARGATE_LINUX",
                "HYBRID_LINUX"
            ]
        );
        assert_eq!(
            EntryType::named("EC2_LINUX")
                .and_then(|t| t.username.clone())
                .as_deref(),
            Some("system:node:{{EC2PrivateDNSName}}")
        );
        for name in ["ClusterAdmin", "Admin", "Edit", "View"] {
            let arn = format!("arn:aws:eks::aws:cluster-access-policy/AmazonEKS{name}Policy");
            assert!(
                policy(&arn).and_then(|p| p.rules.as_ref()).is_some(),
                "{arn}"
            );
        }
        assert!(catalogue().len() > 10);
    }

    #[test]
    fn policies_decide_as_the_user_facing_roles_do() {
        let view =
            policy("arn:aws:eks::aws:cluster-access-policy/AmazonEKSViewPolicy").expect("view");
        let edit =
            policy("arn:aws:eks::aws:cluster-access-policy/AmazonEKSEditPolicy").expect("edit");
        let admin = policy(CLUSTER_ADMIN_POLICY).expect("cluster admin");
        assert_eq!(view.allows(&get(Some("a"), "pods", "get")), Verdict::Allows);
        assert_eq!(
            view.allows(&get(Some("a"), "pods", "delete")),
            Verdict::DoesNotAllow
        );
        assert_eq!(
            view.allows(&get(Some("a"), "secrets", "get")),
            Verdict::DoesNotAllow
        );
        assert_eq!(
            edit.allows(&get(Some("a"), "secrets", "get")),
            Verdict::Allows
        );
        assert_eq!(
            edit.allows(&get(Some("a"), "pods", "delete")),
            Verdict::Allows
        );
        let mut log = get(Some("a"), "pods", "get");
        log.subresource = "log".into();
        assert_eq!(view.allows(&log), Verdict::Allows);
        let mut deploy = get(Some("a"), "deployments", "list");
        deploy.group = "apps".into();
        assert_eq!(view.allows(&deploy), Verdict::Allows);
        assert_eq!(admin.allows(&get(None, "nodes", "delete")), Verdict::Allows);
        let hybrid =
            policy("arn:aws:eks::aws:cluster-access-policy/AmazonEKSHybridPolicy").expect("listed");
        assert_eq!(
            hybrid.allows(&get(Some("a"), "pods", "get")),
            Verdict::NotModelled
        );
    }

    #[test]
    fn scopes_cover_their_namespaces_and_prefixes() {
        let ns = Scope {
            kind: "namespace".into(),
            namespaces: vec!["team-a".into(), "dev-*".into()],
        };
        assert!(ns.validate().is_ok());
        assert!(ns.covers(Some("team-a")) && ns.covers(Some("dev-1")));
        assert!(!ns.covers(Some("team-b")) && !ns.covers(None));
        assert!(Scope::cluster().covers(None));
        for bad in [
            Scope {
                kind: "namespace".into(),
                namespaces: vec![],
            },
            Scope {
                kind: "cluster".into(),
                namespaces: vec!["a".into()],
            },
            Scope {
                kind: "namespace".into(),
                namespaces: vec!["Bad_Name".into()],
            },
            Scope {
                kind: "global".into(),
                namespaces: vec![],
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn principals_and_usernames_follow_eks() {
        assert_eq!(
            principal_kind("arn:aws:iam::111122223333:role/a/b"),
            Ok("role")
        );
        assert_eq!(
            principal_kind("arn:aws:iam::111122223333:user/bob"),
            Ok("user")
        );
        assert!(principal_kind("arn:aws:sts::111122223333:assumed-role/a/s").is_err());
        assert!(principal_kind("nope").is_err());
        assert_eq!(
            default_username("arn:aws:iam::111122223333:role/team/dev"),
            "arn:aws:sts::111122223333:assumed-role/dev/{{SessionName}}"
        );
        assert_eq!(
            default_username("arn:aws:iam::111122223333:user/bob"),
            "arn:aws:iam::111122223333:user/bob"
        );
        assert!(check_username("system:masters").is_err());
        assert!(check_username("alice").is_ok());
    }
}
