//! The `aws-auth` ConfigMap, as the EKS control plane's IAM authenticator reads it, and the
//! username templates that access entries and `aws-auth` share.
//!
//! Contract: [`AwsAuth::from_yaml`] reads the ConfigMap a cluster has (`kind: ConfigMap`,
//! `metadata.name: aws-auth`, `data.mapRoles`, `data.mapUsers`, `data.mapAccounts`, each a YAML
//! string). As aws-iam-authenticator does (`pkg/mapper/configmap`): member names match
//! case-insensitively (`rolearn`, `roleARN`), ARNs are compared lowercased with the caller's
//! canonical ARN, so a role ARN with a path never matches (the authenticator drops paths), empty
//! or `""` sections are skipped, and an account in `mapAccounts` maps any of its principals to
//! its canonical ARN with no groups. A section that does not parse is an error naming it.
//! [`render`] fills `{{AccountID}}`, `{{SessionName}}` (`@` → `-`), `{{SessionNameRaw}}`,
//! `{{AccessKeyID}}` and `{{EC2PrivateDNSName}}` (`pkg/server/server.go`, `renderTemplate`); the
//! last needs an instance-id session name (`i-` and 8 or 17 characters) and, having no EC2 to
//! ask, the emulator derives `ip-10-x-y-z.<region>.compute.internal` (`ec2.internal` in
//! us-east-1) from the instance id.

use super::authenticator::Caller;
use serde_norway::Value;
use sha2::{Digest, Sha256};
use std::path::Path;

/// One `mapRoles` or `mapUsers` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    pub arn: String,
    pub username: String,
    pub groups: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AwsAuth {
    pub roles: Vec<Mapping>,
    pub users: Vec<Mapping>,
    pub accounts: Vec<String>,
}

/// Where a match came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
// The ConfigMap's own keys (`mapRoles`, `mapUsers`, `mapAccounts`), as users read them.
#[allow(clippy::enum_variant_names)]
pub enum Section {
    MapRoles,
    MapUsers,
    MapAccounts,
}

impl Section {
    pub fn name(self) -> &'static str {
        match self {
            Section::MapRoles => "mapRoles",
            Section::MapUsers => "mapUsers",
            Section::MapAccounts => "mapAccounts",
        }
    }
}

fn skippable(text: &str) -> bool {
    matches!(text.trim(), "" | "``" | "\"\"")
}

/// A value's member `name`, whatever its case.
fn member<'v>(v: &'v Value, name: &str) -> Option<&'v Value> {
    v.as_mapping()?
        .iter()
        .find(|(k, _)| k.as_str().is_some_and(|k| k.eq_ignore_ascii_case(name)))
        .map(|(_, v)| v)
}

fn mappings(text: &str, arn_key: &str, section: &str) -> Result<Vec<Mapping>, String> {
    if skippable(text) {
        return Ok(Vec::new());
    }
    let list: Value =
        serde_norway::from_str(text).map_err(|e| format!("aws-auth {section}: {e}"))?;
    let items = list
        .as_sequence()
        .ok_or_else(|| format!("aws-auth {section}: not a list"))?;
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let text = |k: &str| {
                member(item, k)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned()
            };
            let arn = text(arn_key);
            if arn.is_empty() {
                return Err(format!("aws-auth {section}[{i}]: no {arn_key}"));
            }
            let groups = member(item, "groups")
                .and_then(Value::as_sequence)
                .map(|g| {
                    g.iter()
                        .filter_map(|v| v.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            Ok(Mapping {
                arn,
                username: text("username"),
                groups,
            })
        })
        .collect()
}

impl AwsAuth {
    pub fn from_yaml(text: &str) -> Result<AwsAuth, String> {
        let doc: Value = serde_norway::from_str(text).map_err(|e| format!("aws-auth: {e}"))?;
        if member(&doc, "kind").and_then(Value::as_str) != Some("ConfigMap") {
            return Err("aws-auth: not a ConfigMap (kind: ConfigMap)".into());
        }
        let data = member(&doc, "data");
        let section = |name: &str| {
            data.and_then(|d| member(d, name))
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        let accounts_text = section("mapAccounts");
        let accounts = if skippable(&accounts_text) {
            Vec::new()
        } else {
            let v: Value = serde_norway::from_str(&accounts_text)
                .map_err(|e| format!("aws-auth mapAccounts: {e}"))?;
            v.as_sequence()
                .map(|s| {
                    s.iter()
                        .filter_map(|a| {
                            a.as_str()
                                .map(str::to_owned)
                                .or_else(|| a.as_u64().map(|n| format!("{n:012}")))
                        })
                        .collect()
                })
                .unwrap_or_default()
        };
        Ok(AwsAuth {
            roles: mappings(&section("mapRoles"), "rolearn", "mapRoles")?,
            users: mappings(&section("mapUsers"), "userarn", "mapUsers")?,
            accounts,
        })
    }

    pub fn load(path: &Path) -> Result<AwsAuth, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        AwsAuth::from_yaml(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The mapping for `caller`, and which section it came from.
    pub fn lookup(&self, caller: &Caller) -> Option<(Mapping, Section)> {
        let arn = caller.canonical_arn.to_ascii_lowercase();
        let find = |list: &[Mapping]| {
            list.iter()
                .find(|m| m.arn.to_ascii_lowercase() == arn)
                .cloned()
        };
        if let Some(m) = find(&self.roles) {
            return Some((m, Section::MapRoles));
        }
        if let Some(m) = find(&self.users) {
            return Some((m, Section::MapUsers));
        }
        self.accounts.contains(&caller.account).then(|| {
            (
                Mapping {
                    arn: caller.canonical_arn.clone(),
                    username: caller.canonical_arn.clone(),
                    groups: Vec::new(),
                },
                Section::MapAccounts,
            )
        })
    }
}

/// `i-` and 8 or 17 word characters, as the authenticator's `instanceIDPattern`.
fn instance_id(session: &str) -> bool {
    session.strip_prefix("i-").is_some_and(|rest| {
        (rest.len() == 8 || rest.len() == 17)
            && rest.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    })
}

/// The private DNS name the emulator gives an instance (it has no EC2 to ask).
pub fn private_dns_name(instance: &str, region: &str) -> String {
    let d = Sha256::digest(instance.as_bytes());
    let domain = if region == "us-east-1" {
        "ec2.internal".to_owned()
    } else {
        format!("{region}.compute.internal")
    };
    format!("ip-10-{}-{}-{}.{domain}", d[0], d[1], d[2].max(1))
}

/// A username or group template filled for `caller`.
pub fn render(template: &str, caller: &Caller, region: &str) -> Result<String, String> {
    let mut out = template.to_owned();
    if out.contains("{{EC2PrivateDNSName}}") {
        if !instance_id(&caller.session_name) {
            return Err(format!(
                "{{{{EC2PrivateDNSName}}}} needs a session name that is an EC2 instance id (i-…), not {:?}",
                caller.session_name
            ));
        }
        out = out.replace(
            "{{EC2PrivateDNSName}}",
            &private_dns_name(&caller.session_name, region),
        );
    }
    Ok(out
        .replace("{{AccountID}}", &caller.account)
        .replace("{{SessionName}}", &caller.session_name.replace('@', "-"))
        .replace("{{SessionNameRaw}}", &caller.session_name)
        .replace("{{AccessKeyID}}", &caller.access_key_id))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG_MAP: &str = r#"apiVersion: v1
kind: ConfigMap
metadata:
  name: aws-auth
  namespace: kube-system
data:
  mapRoles: |
    - rolearn: arn:aws:iam::111122223333:role/Developers
      username: dev:{{SessionName}}:{{AccountID}}
      groups: [developers]
    - roleARN: arn:aws:iam::111122223333:role/team/pathed
      username: never
    - rolearn: arn:aws:iam::111122223333:role/nodes
      username: system:node:{{EC2PrivateDNSName}}
      groups: [system:bootstrappers, system:nodes]
  mapUsers: |
    - userarn: arn:aws:iam::111122223333:user/alice
      username: alice
      groups: [system:masters]
  mapAccounts: |
    - "444455556666"
"#;

    fn caller(arn: &str, session: &str) -> Caller {
        let canonical = crate::emulator::authenticator::canonicalize(arn).expect("canonical");
        Caller {
            arn: arn.into(),
            account: arn.split(':').nth(4).unwrap_or_default().into(),
            canonical_arn: canonical,
            user_id: "AROAEXAMPLE".into(),
            session_name: session.into(),
            access_key_id: "ASIAEXAMPLE".into(),
        }
    }

    #[test]
    fn maps_roles_users_and_accounts_as_the_authenticator_does() {
        let a = AwsAuth::from_yaml(CONFIG_MAP).expect("parses");
        let dev = caller(
            "arn:aws:sts::111122223333:assumed-role/Developers/jane@example.com",
            "jane@example.com",
        );
        let (m, s) = a.lookup(&dev).expect("mapped");
        assert_eq!(s, Section::MapRoles);
        assert_eq!(
            render(&m.username, &dev, "us-east-1").expect("render"),
            "dev:jane-example.com:111122223333"
        );
        assert_eq!(
            render("{{SessionNameRaw}}", &dev, "us-east-1").expect("raw"),
            "jane@example.com"
        );
        let pathed = caller("arn:aws:sts::111122223333:assumed-role/pathed/s", "s");
        assert!(
            a.lookup(&pathed).is_none(),
            "a path in aws-auth never matches"
        );
        let node = caller(
            "arn:aws:sts::111122223333:assumed-role/nodes/i-0123456789abcdef0",
            "i-0123456789abcdef0",
        );
        let (m, _) = a.lookup(&node).expect("node");
        let name = render(&m.username, &node, "us-west-2").expect("dns");
        assert!(
            name.starts_with("system:node:ip-10-") && name.ends_with(".us-west-2.compute.internal"),
            "{name}"
        );
        let not_instance = caller(
            "arn:aws:sts::111122223333:assumed-role/nodes/laptop",
            "laptop",
        );
        assert!(render(&m.username, &not_instance, "us-east-1").is_err());
        let other = caller("arn:aws:sts::444455556666:assumed-role/any/s", "s");
        let (m, s) = a.lookup(&other).expect("account");
        assert_eq!(
            (s, m.username.as_str()),
            (Section::MapAccounts, "arn:aws:iam::444455556666:role/any")
        );
        assert!(a
            .lookup(&caller("arn:aws:sts::999999999999:assumed-role/x/s", "s"))
            .is_none());
    }

    #[test]
    fn bad_config_maps_are_errors_naming_the_section() {
        assert!(AwsAuth::from_yaml("kind: Secret\n").is_err());
        let e = AwsAuth::from_yaml("kind: ConfigMap\ndata:\n  mapRoles: \"- username: x\"\n")
            .expect_err("no arn");
        assert!(e.contains("mapRoles[0]"), "{e}");
        let empty =
            AwsAuth::from_yaml("kind: ConfigMap\ndata:\n  mapRoles: \"\"\n").expect("empty");
        assert!(empty.roles.is_empty());
    }
}
