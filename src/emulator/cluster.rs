//! The emulated cluster's identity state: its authentication mode, who created it, its access
//! entries (with their associated access policies) and the Pod Identity associations made
//! through the EKS API; kept in the state directory so it survives a restart of `dev`.
//!
//! Contract: [`Store::open`] reads `eks-cluster-<name>.json` from the state directory, or makes
//! a new cluster there: the given authentication mode (EKS's `CreateCluster` refuses `CONFIG_MAP`
//! without bootstrapping the creator, so the creator is always bootstrapped) and, in the `API`
//! modes, an access entry for the creator with `AmazonEKSClusterAdminPolicy` at cluster scope,
//! as EKS makes one. [`Store::change`] applies a change to a copy, writes it (owner-only,
//! atomically), then makes it current, so a failed write changes nothing. Mode changes are
//! one-way, one step at a time (`CONFIG_MAP` → `API_AND_CONFIG_MAP` → `API`); anything else is
//! EKS's `InvalidParameterException` "Unsupported authentication mode update from X to Y".
//! Leaving `CONFIG_MAP` gives the creator an access entry, as EKS does for clusters whose
//! creator was bootstrapped. Errors are [`ApiError`]s: an EKS error code and its message.

use super::access::{Scope, CLUSTER_ADMIN_POLICY};
use super::associations::Association;
use super::issuer::write_private;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

pub const MODES: [&str; 3] = ["CONFIG_MAP", "API_AND_CONFIG_MAP", "API"];

/// An EKS API error: its code (`x-amzn-errortype`) and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub code: &'static str,
    pub message: String,
}

pub fn api_error(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError {
        code,
        message: message.into(),
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AssociatedPolicy {
    pub policy_arn: String,
    pub access_scope: Scope,
    pub associated_at: f64,
    pub modified_at: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AccessEntry {
    pub cluster_name: String,
    pub principal_arn: String,
    pub kubernetes_groups: Vec<String>,
    pub access_entry_arn: String,
    pub created_at: f64,
    pub modified_at: f64,
    pub tags: BTreeMap<String, String>,
    pub username: String,
    #[serde(rename = "type")]
    pub entry_type: String,
    /// Not part of EKS's `AccessEntry` shape (the recording drops it); kept with the entry.
    #[serde(default)]
    pub access_policies: Vec<AssociatedPolicy>,
}

/// A Pod Identity association made through the EKS API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApiAssociation {
    pub association: Association,
    pub created_at: f64,
    pub modified_at: f64,
    pub tags: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Update {
    pub id: String,
    pub status: String,
    #[serde(rename = "type")]
    pub update_type: String,
    pub params: Vec<BTreeMap<String, String>>,
    pub created_at: f64,
    pub errors: Vec<serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Cluster {
    pub name: String,
    pub arn: String,
    pub region: String,
    pub account: String,
    pub created_at: f64,
    pub authentication_mode: String,
    pub bootstrap_cluster_creator_admin_permissions: bool,
    /// The IAM principal that created the cluster.
    pub creator: String,
    pub access_entries: Vec<AccessEntry>,
    pub pod_identity_associations: Vec<ApiAssociation>,
    pub updates: Vec<Update>,
}

pub fn now_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as f64)
        .unwrap_or_default()
}

/// What a new cluster is made from.
#[derive(Debug, Clone)]
pub struct Seed {
    pub name: String,
    pub region: String,
    pub account: String,
    pub mode: String,
    pub creator: String,
}

impl Cluster {
    pub fn new(seed: &Seed) -> Result<Cluster, String> {
        if !MODES.contains(&seed.mode.as_str()) {
            return Err(format!(
                "authentication mode {:?} is not one of {MODES:?}",
                seed.mode
            ));
        }
        super::access::principal_kind(&seed.creator)
            .map_err(|e| format!("cluster creator: {e}"))?;
        let mut c = Cluster {
            name: seed.name.clone(),
            arn: format!(
                "arn:aws:eks:{}:{}:cluster/{}",
                seed.region, seed.account, seed.name
            ),
            region: seed.region.clone(),
            account: seed.account.clone(),
            created_at: now_secs(),
            authentication_mode: seed.mode.clone(),
            bootstrap_cluster_creator_admin_permissions: true,
            creator: seed.creator.clone(),
            access_entries: Vec::new(),
            pod_identity_associations: Vec::new(),
            updates: Vec::new(),
        };
        if c.uses_access_entries() {
            c.bootstrap_creator();
        }
        Ok(c)
    }

    pub fn uses_access_entries(&self) -> bool {
        self.authentication_mode != "CONFIG_MAP"
    }

    pub fn uses_config_map(&self) -> bool {
        self.authentication_mode != "API"
    }

    /// Access entries exist only in the `API` modes.
    pub fn require_access_entries(&self) -> Result<(), ApiError> {
        if self.uses_access_entries() {
            Ok(())
        } else {
            Err(api_error(
                "InvalidRequestException",
                "The cluster's authentication mode must be set to one of [API, API_AND_CONFIG_MAP] to perform this operation.",
            ))
        }
    }

    pub fn entry(&self, principal_arn: &str) -> Option<&AccessEntry> {
        self.access_entries
            .iter()
            .find(|e| e.principal_arn == principal_arn)
    }

    pub fn entry_arn(&self, principal_arn: &str) -> String {
        let (kind, account, name) = match super::associations::role_parts(principal_arn) {
            Some((account, name)) => ("role", account.to_owned(), name.to_owned()),
            None => {
                let rest = principal_arn
                    .strip_prefix("arn:aws:iam::")
                    .unwrap_or_default();
                let (account, name) = rest.split_once(":user/").unwrap_or(("", rest));
                ("user", account.to_owned(), name.to_owned())
            }
        };
        format!(
            "arn:aws:eks:{}:{}:access-entry/{}/{kind}/{account}/{name}/{}",
            self.region,
            self.account,
            self.name,
            super::issuer::uuid_like()
        )
    }

    /// EKS's access entry for the creator: cluster admin at cluster scope.
    fn bootstrap_creator(&mut self) {
        if !self.bootstrap_cluster_creator_admin_permissions || self.entry(&self.creator).is_some()
        {
            return;
        }
        let now = now_secs();
        let arn = self.entry_arn(&self.creator);
        self.access_entries.push(AccessEntry {
            cluster_name: self.name.clone(),
            principal_arn: self.creator.clone(),
            kubernetes_groups: Vec::new(),
            access_entry_arn: arn,
            created_at: now,
            modified_at: now,
            tags: BTreeMap::new(),
            username: super::access::default_username(&self.creator),
            entry_type: "STANDARD".into(),
            access_policies: vec![AssociatedPolicy {
                policy_arn: CLUSTER_ADMIN_POLICY.into(),
                access_scope: Scope::cluster(),
                associated_at: now,
                modified_at: now,
            }],
        });
    }

    /// `UpdateClusterConfig` with an `accessConfig.authenticationMode`.
    pub fn update_mode(&mut self, to: &str) -> Result<Update, ApiError> {
        let from = self.authentication_mode.clone();
        let next = match from.as_str() {
            "CONFIG_MAP" => "API_AND_CONFIG_MAP",
            "API_AND_CONFIG_MAP" => "API",
            _ => "",
        };
        if !MODES.contains(&to) {
            return Err(api_error(
                "InvalidParameterException",
                format!("Value '{to}' at 'accessConfig.authenticationMode' failed to satisfy constraint: Member must satisfy enum value set: [API, API_AND_CONFIG_MAP, CONFIG_MAP]"),
            ));
        }
        // One-way, one step (EKS user guide, "Change authentication mode"; the error text as
        // EKS returns it, e.g. pulumi/pulumi-eks#1493, aws/aws-cdk#31032).
        if to != next {
            return Err(api_error(
                "InvalidParameterException",
                format!("Unsupported authentication mode update from {from} to {to}"),
            ));
        }
        self.authentication_mode = to.to_owned();
        if from == "CONFIG_MAP" {
            self.bootstrap_creator();
        }
        let mut param = BTreeMap::new();
        param.insert("type".to_owned(), "AuthenticationMode".to_owned());
        param.insert("value".to_owned(), to.to_owned());
        let update = Update {
            id: super::issuer::uuid_like(),
            status: "Successful".into(),
            update_type: "AccessConfigUpdate".into(),
            params: vec![param],
            created_at: now_secs(),
            errors: Vec::new(),
        };
        self.updates.push(update.clone());
        Ok(update)
    }
}

/// The cluster and where it is kept.
pub struct Store {
    path: Option<PathBuf>,
    cluster: Mutex<Cluster>,
}

/// `eks-cluster-<name>.json` in `dir`.
pub fn state_file(dir: &Path, name: &str) -> PathBuf {
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    dir.join(format!("eks-cluster-{safe}.json"))
}

impl Store {
    /// A cluster kept in memory only.
    pub fn in_memory(cluster: Cluster) -> Store {
        Store {
            path: None,
            cluster: Mutex::new(cluster),
        }
    }

    /// The cluster kept in `dir`, or a new one made from `seed` (and written).
    pub fn open(dir: &Path, seed: &Seed) -> Result<Store, String> {
        let path = state_file(dir, &seed.name);
        let cluster = match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str::<Cluster>(&text).map_err(|e| {
                format!("{} is not the emulator's cluster state ({e}); move it away to start a new cluster", path.display())
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let c = Cluster::new(seed)?;
                save(&path, &c)?;
                c
            }
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        Ok(Store {
            path: Some(path),
            cluster: Mutex::new(cluster),
        })
    }

    /// A copy of the current state.
    pub fn snapshot(&self) -> Cluster {
        self.cluster
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Apply `f` to a copy; keep (and write) the copy only if `f` succeeds.
    pub fn change<T>(
        &self,
        f: impl FnOnce(&mut Cluster) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let mut guard = self.cluster.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = guard.clone();
        let out = f(&mut next)?;
        if let Some(path) = &self.path {
            save(path, &next).map_err(|e| api_error("ServerException", e))?;
        }
        *guard = next;
        Ok(out)
    }
}

fn save(path: &Path, cluster: &Cluster) -> Result<(), String> {
    let text = serde_json::to_string_pretty(cluster).map_err(|e| e.to_string())?;
    write_private(path, &text).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed(mode: &str) -> Seed {
        Seed {
            name: "dev".into(),
            region: "us-east-1".into(),
            account: "000000000000".into(),
            mode: mode.into(),
            creator: "arn:aws:iam::000000000000:role/admin".into(),
        }
    }

    #[test]
    fn modes_change_one_way_one_step_with_eks_errors() {
        let mut c = Cluster::new(&seed("CONFIG_MAP")).expect("new");
        assert!(
            c.access_entries.is_empty(),
            "the creator is implicit under CONFIG_MAP"
        );
        let e = c.update_mode("API").expect_err("two steps");
        assert_eq!(e.code, "InvalidParameterException");
        assert_eq!(
            e.message,
            "Unsupported authentication mode update from CONFIG_MAP to API"
        );
        c.update_mode("API_AND_CONFIG_MAP").expect("one step");
        assert_eq!(
            c.access_entries.len(),
            1,
            "leaving CONFIG_MAP bootstraps the creator"
        );
        assert_eq!(
            c.access_entries[0].access_policies[0].policy_arn,
            CLUSTER_ADMIN_POLICY
        );
        for back in ["CONFIG_MAP", "API_AND_CONFIG_MAP"] {
            assert!(c.update_mode(back).is_err(), "{back}");
        }
        c.update_mode("API").expect("second step");
        let e = c.update_mode("API_AND_CONFIG_MAP").expect_err("back");
        assert_eq!(
            e.message,
            "Unsupported authentication mode update from API to API_AND_CONFIG_MAP"
        );
        assert_eq!(
            c.update_mode("API").expect_err("same").code,
            "InvalidParameterException"
        );
    }

    #[test]
    fn the_store_survives_a_reopen_and_a_failed_change_changes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), &seed("API_AND_CONFIG_MAP")).expect("open");
        assert_eq!(store.snapshot().access_entries.len(), 1);
        store.change(|c| c.update_mode("API")).expect("change");
        let failed: Result<(), ApiError> = store.change(|c| {
            c.access_entries.clear();
            Err(api_error("InvalidRequestException", "no"))
        });
        assert!(failed.is_err());
        let again = Store::open(dir.path(), &seed("CONFIG_MAP")).expect("reopen");
        let c = again.snapshot();
        assert_eq!(
            c.authentication_mode, "API",
            "the kept state wins over the seed"
        );
        assert_eq!(c.access_entries.len(), 1);
        std::fs::write(state_file(dir.path(), "dev"), "{").expect("write");
        assert!(
            Store::open(dir.path(), &seed("API")).is_err(),
            "corrupt state is an error"
        );
    }
}
