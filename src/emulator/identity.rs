//! Who an authenticated IAM principal is inside the cluster, and what it may do: the mapping
//! by authentication mode, and the decisions of its access policies.
//!
//! Contract: [`resolve`] maps a [`Caller`] as the EKS control plane does:
//! - under `API` and `API_AND_CONFIG_MAP`, an access entry for the principal comes first (a role
//!   entry matches the role whatever its path: EKS matches entries by the role itself), its
//!   username and groups rendered ([`render`]), its access policies attached;
//! - under `CONFIG_MAP`, the cluster creator is the bootstrap admin (`kubernetes-admin`,
//!   `system:masters`), as EKS maps it outside `aws-auth`;
//! - under `CONFIG_MAP` and `API_AND_CONFIG_MAP`, then `aws-auth` (`mapRoles`, `mapUsers`,
//!   `mapAccounts`);
//! - otherwise a refusal that says which mappings were read and why none matched.
//!
//! The user's uid and extra are aws-iam-authenticator's (`aws-iam-authenticator:<account>:<id>`;
//! `arn`, `canonicalArn`, `sessionName`, `accessKeyId`). [`authorize`] answers a request from
//! the identity alone: `system:masters` may do anything; otherwise an associated access policy
//! whose scope covers the namespace and whose rules allow the request; anything else is not
//! allowed here, and the reason says that the identity's own groups are for the cluster's RBAC,
//! which the emulator does not run.

use super::access::{self, Attributes, Verdict};
use super::authenticator::Caller;
use super::aws_auth::{render, AwsAuth, Section};
use super::cluster::{AssociatedPolicy, Cluster};
use std::collections::BTreeMap;

/// Which mapping named the principal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    AccessEntry(String),
    AwsAuth(Section),
    /// The cluster creator under `CONFIG_MAP`.
    Creator,
}

impl Source {
    pub fn describe(&self) -> String {
        match self {
            Source::AccessEntry(arn) => format!("access entry {arn}"),
            Source::AwsAuth(s) => format!("aws-auth {}", s.name()),
            Source::Creator => "the cluster creator's bootstrap admin mapping".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    pub username: String,
    pub uid: String,
    pub groups: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
    pub source: Source,
    pub mode: String,
    pub policies: Vec<AssociatedPolicy>,
}

/// A decision on one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub reason: String,
}

/// Whether two IAM principal ARNs name the same principal (roles: same account and name).
fn same_principal(entry: &str, canonical: &str) -> bool {
    match (
        super::associations::role_parts(entry),
        super::associations::role_parts(canonical),
    ) {
        (Some(a), Some(b)) => a == b,
        _ => entry == canonical,
    }
}

fn identity(
    caller: &Caller,
    username: String,
    groups: Vec<String>,
    source: Source,
    cluster: &Cluster,
) -> Identity {
    let mut extra = BTreeMap::new();
    extra.insert("accessKeyId".to_owned(), vec![caller.access_key_id.clone()]);
    extra.insert("arn".to_owned(), vec![caller.arn.clone()]);
    extra.insert(
        "canonicalArn".to_owned(),
        vec![caller.canonical_arn.clone()],
    );
    extra.insert("sessionName".to_owned(), vec![caller.session_name.clone()]);
    Identity {
        username,
        uid: format!(
            "aws-iam-authenticator:{}:{}",
            caller.account, caller.user_id
        ),
        groups,
        extra,
        source,
        mode: cluster.authentication_mode.clone(),
        policies: Vec::new(),
    }
}

fn render_all(list: &[String], caller: &Caller, region: &str) -> Result<Vec<String>, String> {
    list.iter().map(|g| render(g, caller, region)).collect()
}

/// Who `caller` is in `cluster`, with `aws_auth` the ConfigMap as read (or why it could not be).
pub fn resolve(
    cluster: &Cluster,
    aws_auth: &Result<AwsAuth, String>,
    caller: &Caller,
) -> Result<Identity, String> {
    let region = cluster.region.as_str();
    if cluster.uses_access_entries() {
        let entry = cluster
            .access_entries
            .iter()
            .find(|e| same_principal(&e.principal_arn, &caller.canonical_arn));
        if let Some(e) = entry {
            let username = render(&e.username, caller, region)?;
            let groups = render_all(&e.kubernetes_groups, caller, region)?;
            let mut id = identity(
                caller,
                username,
                groups,
                Source::AccessEntry(e.principal_arn.clone()),
                cluster,
            );
            id.policies = e.access_policies.clone();
            return Ok(id);
        }
    }
    if !cluster.uses_access_entries() && same_principal(&cluster.creator, &caller.canonical_arn) {
        let groups = vec!["system:masters".to_owned()];
        return Ok(identity(
            caller,
            "kubernetes-admin".into(),
            groups,
            Source::Creator,
            cluster,
        ));
    }
    if cluster.uses_config_map() {
        if let Ok(Some((m, section))) = aws_auth.as_ref().map(|a| a.lookup(caller)) {
            let username = render(&m.username, caller, region)?;
            let groups = render_all(&m.groups, caller, region)?;
            return Ok(identity(
                caller,
                username,
                groups,
                Source::AwsAuth(section),
                cluster,
            ));
        }
    }
    Err(refusal(cluster, aws_auth, caller))
}

fn refusal(cluster: &Cluster, aws_auth: &Result<AwsAuth, String>, caller: &Caller) -> String {
    let who = &caller.canonical_arn;
    let mode = &cluster.authentication_mode;
    let config_map = match aws_auth {
        Err(e) => format!("aws-auth could not be read ({e})"),
        Ok(a) => {
            let pathed = a.roles.iter().any(|m| {
                m.arn.contains(":role/")
                    && m.arn.matches('/').count() > 1
                    && same_principal(&m.arn, who)
            });
            if pathed {
                "aws-auth has this role only with a path, which never matches (the authenticator drops role paths)".into()
            } else {
                "aws-auth does not map it".into()
            }
        }
    };
    match mode.as_str() {
        "API" => format!("{who} is not mapped: no access entry names it (authentication mode API: aws-auth is not read)"),
        "CONFIG_MAP" => format!("{who} is not mapped: {config_map} (authentication mode CONFIG_MAP: access entries are not read)"),
        _ => format!("{who} is not mapped: no access entry names it and {config_map} (authentication mode API_AND_CONFIG_MAP)"),
    }
}

/// Whether `id` may do `a`, from its groups and access policies alone.
pub fn authorize(id: &Identity, a: &Attributes) -> Decision {
    if id.groups.iter().any(|g| g == "system:masters") {
        return Decision {
            allowed: true,
            reason: "group system:masters".into(),
        };
    }
    let mut not_modelled = Vec::new();
    for p in &id.policies {
        if !p.access_scope.covers(a.namespace.as_deref()) {
            continue;
        }
        let Some(policy) = access::policy(&p.policy_arn) else {
            continue;
        };
        match policy.allows(a) {
            Verdict::Allows => {
                return Decision {
                    allowed: true,
                    reason: format!(
                        "EKS access policy {}, {}",
                        policy.name,
                        p.access_scope.describe()
                    ),
                }
            }
            Verdict::NotModelled => not_modelled.push(policy.name.clone()),
            Verdict::DoesNotAllow => {}
        }
    }
    let mut reason = if id.policies.is_empty() {
        "no access policy is associated".to_owned()
    } else {
        "no associated access policy allows this".to_owned()
    };
    if !not_modelled.is_empty() {
        reason.push_str(&format!(
            "; {} not modelled by the emulator",
            not_modelled.join(", ")
        ));
    }
    let groups: Vec<&str> = id
        .groups
        .iter()
        .map(String::as_str)
        .filter(|g| *g != "system:authenticated")
        .collect();
    if !groups.is_empty() {
        reason.push_str(&format!(
            "; groups [{}] are decided by the cluster's RBAC, which the emulator does not run",
            groups.join(", ")
        ));
    }
    Decision {
        allowed: false,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emulator::cluster::Seed;
    use crate::emulator::entries::{self, Associate, CreateEntry};

    const AWS_AUTH: &str = "kind: ConfigMap\ndata:\n  mapRoles: |\n    - rolearn: arn:aws:iam::111122223333:role/legacy\n      username: legacy:{{SessionName}}\n      groups: [legacy-devs]\n    - rolearn: arn:aws:iam::111122223333:role/both\n      username: from-aws-auth\n";

    fn caller(role: &str) -> Caller {
        Caller {
            arn: format!("arn:aws:sts::111122223333:assumed-role/{role}/s1"),
            canonical_arn: format!("arn:aws:iam::111122223333:role/{role}"),
            account: "111122223333".into(),
            user_id: "AROAEXAMPLE".into(),
            session_name: "s1".into(),
            access_key_id: "ASIAEXAMPLE".into(),
        }
    }

    fn cluster(mode: &str) -> Cluster {
        let mut c = Cluster::new(&Seed {
            name: "dev".into(),
            region: "us-east-1".into(),
            account: "111122223333".into(),
            mode: "API_AND_CONFIG_MAP".into(),
            creator: "arn:aws:iam::111122223333:role/creator".into(),
        })
        .expect("cluster");
        let both = "arn:aws:iam::111122223333:role/both";
        entries::create(
            &mut c,
            CreateEntry {
                principal_arn: both.into(),
                kubernetes_groups: Some(vec!["g".into()]),
                ..CreateEntry::default()
            },
        )
        .expect("entry");
        entries::associate(
            &mut c,
            both,
            Associate {
                policy_arn: "arn:aws:eks::aws:cluster-access-policy/AmazonEKSViewPolicy".into(),
                access_scope: Some(access::Scope {
                    kind: "namespace".into(),
                    namespaces: vec!["team-a".into()],
                }),
            },
        )
        .expect("policy");
        if mode == "API" {
            c.update_mode("API").expect("api");
        }
        c.authentication_mode = mode.into();
        c
    }

    #[test]
    fn each_mode_reads_its_mappings_and_the_access_entry_wins() {
        let auth = AwsAuth::from_yaml(AWS_AUTH);
        for (mode, legacy_ok) in [
            ("CONFIG_MAP", true),
            ("API_AND_CONFIG_MAP", true),
            ("API", false),
        ] {
            let c = cluster(mode);
            let got = resolve(&c, &auth, &caller("legacy"));
            assert_eq!(got.is_ok(), legacy_ok, "{mode}: {got:?}");
            if let Ok(id) = got {
                assert_eq!(
                    (id.username.as_str(), id.source),
                    ("legacy:s1", Source::AwsAuth(Section::MapRoles))
                );
            } else if let Err(why) = got {
                assert!(why.contains("authentication mode API"), "{why}");
            }
        }
        let id = resolve(&cluster("API_AND_CONFIG_MAP"), &auth, &caller("both")).expect("both");
        assert_eq!(
            id.username,
            "arn:aws:sts::111122223333:assumed-role/both/s1"
        );
        assert!(matches!(id.source, Source::AccessEntry(_)));
        let creator = resolve(&cluster("CONFIG_MAP"), &auth, &caller("creator")).expect("creator");
        assert_eq!(
            (creator.username.as_str(), creator.groups.clone()),
            ("kubernetes-admin", vec!["system:masters".to_owned()])
        );
        assert!(resolve(&cluster("API_AND_CONFIG_MAP"), &auth, &caller("stranger")).is_err());
    }

    #[test]
    fn policies_decide_within_their_scope() {
        let id = resolve(&cluster("API"), &Ok(AwsAuth::default()), &caller("both")).expect("id");
        let ask = |ns: Option<&str>, verb: &str| Attributes {
            namespace: ns.map(str::to_owned),
            verb: verb.into(),
            resource: "pods".into(),
            ..Attributes::default()
        };
        assert!(authorize(&id, &ask(Some("team-a"), "get")).allowed);
        let no = authorize(&id, &ask(Some("team-a"), "delete"));
        assert!(!no.allowed && no.reason.contains("groups [g]"), "{no:?}");
        assert!(!authorize(&id, &ask(Some("team-b"), "get")).allowed);
        assert!(!authorize(&id, &ask(None, "list")).allowed);
    }
}
