//! What an emulator is built from: the state directory, where associations and credentials
//! come from, the emulated cluster (name; mode and creator when new) and the `aws-auth` file.

use super::cluster;
use std::path::PathBuf;

/// Where the association table comes from.
#[derive(Debug, Clone)]
pub enum AssociationsFrom {
    /// Every service account maps to a role named after it.
    Default,
    File(PathBuf),
    /// A real cluster's table, read with the caller's AWS credentials.
    Cluster(String),
}

/// Where emulated credentials come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialsFrom {
    Fake,
    Sts,
}

/// Everything an emulator is built from.
#[derive(Debug, Clone)]
pub struct EmulatorConfig {
    pub state_dir: PathBuf,
    pub associations: AssociationsFrom,
    pub credentials: CredentialsFrom,
    /// The emulated cluster: its name, and its authentication mode and creator when new.
    pub cluster: ClusterConfig,
    /// The `aws-auth` ConfigMap, re-read at every authentication (as the authenticator
    /// watches the real one).
    pub aws_auth: Option<PathBuf>,
}

/// The emulated cluster's name, and what a new one is made with.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub name: String,
    /// Applied at start, as `UpdateClusterConfig` would (one-way); a new cluster's mode when
    /// `None` is `API_AND_CONFIG_MAP`.
    pub authentication_mode: Option<String>,
    pub creator: String,
}

/// The cluster name `dev` and the emulator use by default.
pub const DEFAULT_CLUSTER: &str = "dev";
/// The principal that created the emulated cluster by default: `dev`'s own role, so the
/// developer who pastes `dev`'s exports is the cluster's bootstrap admin.
pub const DEFAULT_CREATOR: &str = "arn:aws:iam::000000000000:role/default-default";
pub const DEFAULT_MODE: &str = "API_AND_CONFIG_MAP";

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            name: DEFAULT_CLUSTER.into(),
            authentication_mode: None,
            creator: DEFAULT_CREATOR.into(),
        }
    }
}

/// What a new cluster is made from.
pub(super) fn seed(c: &ClusterConfig, region: &str, account: &str) -> cluster::Seed {
    cluster::Seed {
        name: c.name.clone(),
        region: region.to_owned(),
        account: account.to_owned(),
        mode: c
            .authentication_mode
            .clone()
            .unwrap_or_else(|| DEFAULT_MODE.to_owned()),
        creator: c.creator.clone(),
    }
}
