//! `explain-access`: who an IAM principal is in the emulated cluster and what it may do, without
//! kubectl or a token.
//!
//! Contract: [`explain`] takes a principal ARN (a role, user, or an assumed-role session ARN,
//! whose session name is then used) and the cluster's state as kept in the state directory, maps
//! it exactly as the authenticator does ([`identity::resolve`]) and prints: the principal and
//! session, the cluster's mode, which mapping named it, the username and groups, each associated
//! access policy with its scope, and a small matrix of decisions ([`identity::authorize`]) in
//! the namespaces its scopes name; or why it is refused. It returns whether it was mapped.

use super::access::{self, Attributes};
use super::authenticator::{canonicalize, Caller};
use super::aws_auth::AwsAuth;
use super::cluster::Cluster;
use super::identity::{authorize, resolve, Identity};
use std::fmt::Write;

/// The caller an ARN stands for, without a token to say more.
pub fn caller_for(arn: &str, session_name: &str) -> Result<Caller, String> {
    let canonical = canonicalize(arn)?;
    let session = if arn.contains(":assumed-role/") {
        arn.rsplit('/').next().unwrap_or(session_name).to_owned()
    } else {
        session_name.to_owned()
    };
    let account = canonical.split(':').nth(4).unwrap_or_default().to_owned();
    let sts_arn = match super::associations::role_parts(&canonical) {
        Some((a, name)) => format!("arn:aws:sts::{a}:assumed-role/{name}/{session}"),
        None => canonical.clone(),
    };
    Ok(Caller {
        arn: sts_arn,
        canonical_arn: canonical,
        account,
        user_id: "(known only from a token)".into(),
        session_name: session,
        access_key_id: String::new(),
    })
}

const CHECKS: [(&str, &str, &str); 6] = [
    ("get", "", "pods"),
    ("delete", "", "pods"),
    ("get", "", "secrets"),
    ("create", "apps", "deployments"),
    ("create", "rbac.authorization.k8s.io", "rolebindings"),
    ("delete", "", "nodes"),
];

fn matrix(out: &mut String, id: &Identity) {
    let mut namespaces: Vec<String> = id
        .policies
        .iter()
        .flat_map(|p| p.access_scope.namespaces.clone())
        .filter(|n| !n.ends_with('*'))
        .collect();
    namespaces.push("default".into());
    namespaces.dedup();
    let _ = writeln!(
        out,
        "decisions (from access policies and system:masters only):"
    );
    for ns in &namespaces {
        for (verb, group, resource) in CHECKS {
            let cluster_wide = resource == "nodes";
            if cluster_wide && ns != &namespaces[0] {
                continue;
            }
            let a = Attributes {
                namespace: (!cluster_wide).then(|| ns.clone()),
                verb: verb.into(),
                group: group.into(),
                resource: resource.into(),
                ..Attributes::default()
            };
            let d = authorize(id, &a);
            let what = if group.is_empty() {
                resource.to_owned()
            } else {
                format!("{resource}.{group}")
            };
            let place = if cluster_wide {
                "(cluster)".to_owned()
            } else {
                format!("-n {ns}")
            };
            let _ = writeln!(
                out,
                "  {:<3} {verb} {what} {place}: {}",
                if d.allowed { "yes" } else { "no" },
                d.reason
            );
        }
    }
}

/// The explanation, and whether the principal is mapped at all.
pub fn explain(
    cluster: &Cluster,
    aws_auth: &Result<AwsAuth, String>,
    arn: &str,
    session_name: &str,
) -> (bool, String) {
    let mut out = String::new();
    let caller = match caller_for(arn, session_name) {
        Ok(c) => c,
        Err(e) => return (false, format!("refused: {e}\n")),
    };
    let _ = writeln!(
        out,
        "principal:  {} (session {})",
        caller.canonical_arn, caller.session_name
    );
    let _ = writeln!(
        out,
        "cluster:    {}, authentication mode {}",
        cluster.name, cluster.authentication_mode
    );
    let id = match resolve(cluster, aws_auth, &caller) {
        Ok(id) => id,
        Err(why) => {
            let _ = writeln!(out, "refused:    {why}");
            return (false, out);
        }
    };
    let _ = writeln!(out, "mapped by:  {}", id.source.describe());
    let _ = writeln!(out, "username:   {}", id.username);
    let _ = writeln!(
        out,
        "groups:     [{}] (and system:authenticated)",
        id.groups.join(", ")
    );
    if id.policies.is_empty() {
        let _ = writeln!(out, "policies:   none");
    }
    for p in &id.policies {
        let like = access::policy(&p.policy_arn)
            .and_then(|pol| pol.like.clone())
            .map(|l| format!(" (like the Kubernetes {l} role)"))
            .unwrap_or_else(|| " (rules not modelled by the emulator)".into());
        let name = p.policy_arn.rsplit('/').next().unwrap_or_default();
        let _ = writeln!(
            out,
            "policy:     {name}{like}, {}",
            p.access_scope.describe()
        );
    }
    matrix(&mut out, &id);
    (true, out)
}
