//! Who may have which role: the emulator's Pod Identity associations, and the trust it applies
//! to IRSA and to role chaining.
//!
//! Contract: from a YAML file
//! ```yaml
//! associations:                 # Pod Identity (EKS Auth)
//!   - namespace: default
//!     serviceAccount: app
//!     roleArn: arn:aws:iam::111122223333:role/app
//!     targetRoleArn: arn:aws:iam::444455556666:role/cross   # optional
//!     disableSessionTags: false                             # optional
//! irsa:                         # AssumeRoleWithWebIdentity: which service accounts, which roles
//!   - namespace: default
//!     serviceAccount: app       # or "*" for every one in the namespace
//!     roleArn: arn:aws:iam::111122223333:role/app
//!     audience: sts.amazonaws.com                           # optional, this is the default
//! roles:                        # AssumeRole: which principals a role trusts
//!   - roleArn: arn:aws:iam::444455556666:role/cross
//!     trustedBy: [arn:aws:iam::111122223333:role/app]       # roles, or arn:aws:iam::<account>:root
//!     externalId: shared-secret                             # optional: required from callers
//!     maxSessionDuration: 3600                              # optional, seconds, 3600 by default
//! ```
//! an unknown field, a malformed ARN, a bad audience, external id or duration is an error naming
//! the entry. Without a file every service account maps to
//! `arn:aws:iam::000000000000:role/<namespace>-<serviceAccount>`. A file, or the lack of one,
//! without an `irsa` (or `roles`) section trusts every web identity token of this issuer (or
//! every principal the emulator issued credentials to); with the section, only what it lists.
//! Lookups with no match return `None` (EKS Auth's `ResourceNotFoundException`, STS's
//! `AccessDenied`).

use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Association {
    pub namespace: String,
    pub service_account: String,
    pub role_arn: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_role_arn: Option<String>,
    #[serde(default)]
    pub disable_session_tags: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub association_id: Option<String>,
}

/// An IRSA grant: a service account may assume a role with its web identity token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IrsaGrant {
    pub namespace: String,
    pub service_account: String,
    pub role_arn: String,
    #[serde(default = "default_audience")]
    pub audience: String,
}

fn default_audience() -> String {
    STS_AUDIENCE.to_owned()
}

/// The audience IRSA tokens carry by default.
pub const STS_AUDIENCE: &str = "sts.amazonaws.com";
/// A role's default (and, for chained sessions, the largest) session length.
pub const DEFAULT_MAX_SESSION: u32 = 3600;

/// What a role trusts for `sts:AssumeRole`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RoleTrust {
    pub role_arn: String,
    pub trusted_by: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_session_duration: Option<u32>,
}

/// The trust STS applies; `None` for a section means "trust everything of that kind".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trust {
    pub irsa: Option<Vec<IrsaGrant>>,
    pub roles: Option<Vec<RoleTrust>>,
}

impl Trust {
    /// The grant that lets `namespace/service_account` assume `role_arn`, if any (a made-up one
    /// with the default audience when there is no `irsa` section).
    pub fn irsa_grant(
        &self,
        namespace: &str,
        service_account: &str,
        role_arn: &str,
    ) -> Option<IrsaGrant> {
        match &self.irsa {
            None => Some(IrsaGrant {
                namespace: namespace.to_owned(),
                service_account: service_account.to_owned(),
                role_arn: role_arn.to_owned(),
                audience: default_audience(),
            }),
            Some(list) => list
                .iter()
                .find(|g| {
                    g.namespace == namespace
                        && (g.service_account == "*" || g.service_account == service_account)
                        && g.role_arn == role_arn
                })
                .cloned(),
        }
    }

    /// Whether the role `caller_role` (in `caller_account`) may assume `role_arn`, and what
    /// else that takes (its external id and session limit); `None` if it may not.
    pub fn role_trust(
        &self,
        caller_role: &str,
        caller_account: &str,
        role_arn: &str,
    ) -> Option<RoleTrust> {
        let Some(list) = &self.roles else {
            return Some(RoleTrust {
                role_arn: role_arn.to_owned(),
                trusted_by: vec![caller_role.to_owned()],
                external_id: None,
                max_session_duration: None,
            });
        };
        let root = format!("arn:aws:iam::{caller_account}:root");
        list.iter()
            .find(|t| {
                t.role_arn == role_arn
                    && t.trusted_by.iter().any(|p| *p == caller_role || *p == root)
            })
            .cloned()
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    associations: Vec<Association>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    irsa: Option<Vec<IrsaGrant>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    roles: Option<Vec<RoleTrust>>,
}

/// `[\w+=,.@:/-]`, 2 to 1224 characters: what STS accepts as an external id.
pub fn valid_external_id(id: &str) -> bool {
    (2..=1224).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_+=,.@:/-".contains(c))
}

#[derive(Debug, Clone)]
pub enum Associations {
    Table(Vec<Association>),
    /// Every service account gets a role named after it in account 000000000000.
    Default,
}

impl Association {
    /// `a-` and 17 characters, stable for a namespace and service account, as EKS shapes ids.
    pub fn id(&self) -> String {
        self.association_id.clone().unwrap_or_else(|| {
            use sha2::{Digest, Sha256};
            let digest = Sha256::digest(format!("{}/{}", self.namespace, self.service_account));
            let chars: String = digest
                .iter()
                .map(|b| char::from(b'a' + b % 26))
                .take(17)
                .collect();
            format!("a-{chars}")
        })
    }
}

/// `arn:aws:iam::111122223333:role/name` → (`111122223333`, `name`).
pub fn role_parts(arn: &str) -> Option<(&str, &str)> {
    let mut f = arn.splitn(6, ':');
    let (Some("arn"), Some(_partition), Some("iam"), Some(""), Some(account), Some(resource)) =
        (f.next(), f.next(), f.next(), f.next(), f.next(), f.next())
    else {
        return None;
    };
    let name = resource.strip_prefix("role/")?.rsplit('/').next()?;
    (account.len() == 12 && account.bytes().all(|b| b.is_ascii_digit()) && !name.is_empty())
        .then_some((account, name))
}

impl Associations {
    pub fn from_yaml(text: &str) -> Result<Associations, String> {
        Associations::with_trust(text).map(|(a, _)| a)
    }

    /// The associations and the trust tables of a file.
    pub fn with_trust(text: &str) -> Result<(Associations, Trust), String> {
        let file: File = serde_norway::from_str(text).map_err(|e| format!("associations: {e}"))?;
        let role = |arn: &str, what: String| {
            role_parts(arn)
                .map(|_| ())
                .ok_or_else(|| format!("{what}: {arn:?} is not an IAM role ARN"))
        };
        for (i, a) in file.associations.iter().enumerate() {
            for arn in std::iter::once(&a.role_arn).chain(a.target_role_arn.iter()) {
                role(
                    arn,
                    format!("associations[{i}] ({}/{})", a.namespace, a.service_account),
                )?;
            }
        }
        for (i, g) in file.irsa.iter().flatten().enumerate() {
            let what = format!("irsa[{i}] ({}/{})", g.namespace, g.service_account);
            role(&g.role_arn, what.clone())?;
            if g.audience.is_empty() || g.namespace.is_empty() || g.service_account.is_empty() {
                return Err(format!(
                    "{what}: namespace, serviceAccount and audience must not be empty"
                ));
            }
        }
        for (i, t) in file.roles.iter().flatten().enumerate() {
            let what = format!("roles[{i}] ({})", t.role_arn);
            role(&t.role_arn, what.clone())?;
            if t.trusted_by.is_empty() {
                return Err(format!("{what}: trustedBy lists no principal"));
            }
            for p in &t.trusted_by {
                let root = p
                    .strip_prefix("arn:aws:iam::")
                    .and_then(|r| r.strip_suffix(":root"));
                let is_root =
                    root.is_some_and(|a| a.len() == 12 && a.bytes().all(|b| b.is_ascii_digit()));
                if !is_root && role_parts(p).is_none() {
                    return Err(format!("{what}: trustedBy {p:?} is neither a role ARN nor arn:aws:iam::<account>:root"));
                }
            }
            if let Some(id) = &t.external_id {
                if !valid_external_id(id) {
                    return Err(format!(
                        "{what}: externalId must be 2-1224 characters of [\\w+=,.@:/-]"
                    ));
                }
            }
            if let Some(d) = t.max_session_duration {
                if !(900..=43_200).contains(&d) {
                    return Err(format!(
                        "{what}: maxSessionDuration must be 900-43200 seconds"
                    ));
                }
            }
        }
        Ok((
            Associations::Table(file.associations),
            Trust {
                irsa: file.irsa,
                roles: file.roles,
            },
        ))
    }

    /// The associations and trust tables of the file at `path`.
    pub fn load(path: &Path) -> Result<(Associations, Trust), String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Associations::with_trust(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn lookup(&self, namespace: &str, service_account: &str) -> Option<Association> {
        match self {
            Associations::Table(list) => list
                .iter()
                .find(|a| a.namespace == namespace && a.service_account == service_account)
                .cloned(),
            Associations::Default => Some(Association {
                namespace: namespace.to_owned(),
                service_account: service_account.to_owned(),
                role_arn: format!("arn:aws:iam::000000000000:role/{namespace}-{service_account}"),
                target_role_arn: None,
                disable_session_tags: false,
                association_id: None,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_format() {
        let a = Associations::from_yaml(
            "associations:\n  - namespace: default\n    serviceAccount: app\n    roleArn: arn:aws:iam::111122223333:role/app\n    targetRoleArn: arn:aws:iam::444455556666:role/x\n    disableSessionTags: true\n",
        )
        .expect("parses");
        let found = a.lookup("default", "app").expect("found");
        assert_eq!(
            found.target_role_arn.as_deref(),
            Some("arn:aws:iam::444455556666:role/x")
        );
        assert!(found.disable_session_tags);
        assert!(a.lookup("default", "other").is_none());
        assert!(found.id().starts_with("a-") && found.id().len() == 19);
    }

    #[test]
    fn refuses_unknown_fields_and_bad_arns() {
        assert!(Associations::from_yaml("associations:\n  - namespace: a\n    serviceAccount: b\n    roleArn: arn:aws:iam::111122223333:role/r\n    rolearn: x\n").is_err());
        let e = Associations::from_yaml(
            "associations:\n  - namespace: a\n    serviceAccount: b\n    roleArn: not-an-arn\n",
        )
        .expect_err("bad arn");
        assert!(e.contains("a/b"), "{e}");
    }

    #[test]
    fn trust_tables_parse_and_decide() {
        let (_, trust) = Associations::with_trust(
            "irsa:\n  - namespace: default\n    serviceAccount: app\n    roleArn: arn:aws:iam::111122223333:role/app\n\
             roles:\n  - roleArn: arn:aws:iam::444455556666:role/cross\n    trustedBy: [arn:aws:iam::111122223333:role/app]\n    externalId: shared-1\n\
             \x20 - roleArn: arn:aws:iam::444455556666:role/open\n    trustedBy: [arn:aws:iam::111122223333:root]\n",
        )
        .expect("parses");
        let grant = trust
            .irsa_grant("default", "app", "arn:aws:iam::111122223333:role/app")
            .expect("granted");
        assert_eq!(grant.audience, STS_AUDIENCE);
        assert!(trust
            .irsa_grant("default", "other", "arn:aws:iam::111122223333:role/app")
            .is_none());
        let t = trust
            .role_trust(
                "arn:aws:iam::111122223333:role/app",
                "111122223333",
                "arn:aws:iam::444455556666:role/cross",
            )
            .expect("trusted");
        assert_eq!(t.external_id.as_deref(), Some("shared-1"));
        assert!(trust
            .role_trust(
                "arn:aws:iam::111122223333:role/other",
                "111122223333",
                "arn:aws:iam::444455556666:role/cross"
            )
            .is_none());
        // The account root trusts every role of the account.
        assert!(trust
            .role_trust(
                "arn:aws:iam::111122223333:role/other",
                "111122223333",
                "arn:aws:iam::444455556666:role/open"
            )
            .is_some());
        // Without the sections, everything is trusted.
        let open = Trust::default();
        assert!(open
            .irsa_grant("a", "b", "arn:aws:iam::000000000000:role/x")
            .is_some());
        assert!(open
            .role_trust("r", "000000000000", "arn:aws:iam::000000000000:role/x")
            .is_some());
    }

    #[test]
    fn bad_trust_tables_are_clear_errors() {
        for (yaml, says) in [
            ("irsa:\n  - namespace: a\n    serviceAccount: b\n    roleArn: nope\n", "irsa[0] (a/b)"),
            ("roles:\n  - roleArn: arn:aws:iam::444455556666:role/x\n    trustedBy: []\n", "trustedBy lists no principal"),
            ("roles:\n  - roleArn: arn:aws:iam::444455556666:role/x\n    trustedBy: [somebody]\n", "neither a role ARN"),
            ("roles:\n  - roleArn: arn:aws:iam::444455556666:role/x\n    trustedBy: [arn:aws:iam::111122223333:root]\n    externalId: x\n", "externalId"),
            ("roles:\n  - roleArn: arn:aws:iam::444455556666:role/x\n    trustedBy: [arn:aws:iam::111122223333:root]\n    maxSessionDuration: 60\n", "maxSessionDuration"),
            ("irsa:\n  - namespace: a\n    serviceAccount: b\n    roleArn: arn:aws:iam::111122223333:role/r\n    audiences: x\n", "unknown field"),
        ] {
            let e = Associations::with_trust(yaml).expect_err(yaml);
            assert!(e.contains(says), "{e}");
        }
    }

    #[test]
    fn default_maps_every_service_account() {
        let a = Associations::Default.lookup("team", "api").expect("always");
        assert_eq!(a.role_arn, "arn:aws:iam::000000000000:role/team-api");
        assert_eq!(role_parts(&a.role_arn), Some(("000000000000", "team-api")));
        assert_eq!(
            role_parts("arn:aws:iam::111122223333:role/path/to/name"),
            Some(("111122223333", "name"))
        );
    }
}
