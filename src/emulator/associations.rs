//! Which role a service account gets: the emulator's Pod Identity association table.
//!
//! Contract: from a YAML file
//! ```yaml
//! associations:
//!   - namespace: default
//!     serviceAccount: app
//!     roleArn: arn:aws:iam::111122223333:role/app
//!     targetRoleArn: arn:aws:iam::444455556666:role/cross   # optional
//!     disableSessionTags: false                             # optional
//! ```
//! an unknown field or a malformed ARN is an error naming the entry. Without a file every
//! service account maps to `arn:aws:iam::000000000000:role/<namespace>-<serviceAccount>`.
//! Lookups with no match return `None` (EKS Auth's `ResourceNotFoundException`).

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

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    associations: Vec<Association>,
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
        let file: File = serde_norway::from_str(text).map_err(|e| format!("associations: {e}"))?;
        for (i, a) in file.associations.iter().enumerate() {
            for arn in std::iter::once(&a.role_arn).chain(a.target_role_arn.iter()) {
                if role_parts(arn).is_none() {
                    return Err(format!(
                        "associations[{i}] ({}/{}): {arn:?} is not an IAM role ARN",
                        a.namespace, a.service_account
                    ));
                }
            }
        }
        Ok(Associations::Table(file.associations))
    }

    pub fn from_yaml_file(path: &Path) -> Result<Associations, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Associations::from_yaml(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn to_yaml(list: &[Association]) -> String {
        serde_norway::to_string(&File {
            associations: list.to_vec(),
        })
        .unwrap_or_default()
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
