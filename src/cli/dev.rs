//! The local mode's flags: `dev` (and its `token` and `explain-access`) and `emulate-eks-auth`,
//! with the emulator's own flags they share.
//!
//! Contract: these commands never touch a node; `dev`'s agent takes `server`'s settings
//! ([`crate::cli::ServerArgs::defaults`]), so only the emulator's and dev's own flags live here.

use super::parse::{duration_between, DAY, SECOND};
use super::LogArgs;
use crate::defaults::*;
use crate::emulator::state::state_dir;
use crate::emulator::{AssociationsFrom, ClusterConfig, CredentialsFrom, EmulatorConfig};
use clap::{Args, Subcommand, ValueEnum};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Where emulated credentials come from (`--credential-source`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EmulatedCredentials {
    /// Well-formed, unique credentials; no AWS account.
    Fake,
    /// A real sts:AssumeRole of the association's role with your own AWS credentials.
    Sts,
}

#[derive(Debug, Clone, Args)]
pub struct EmulatorArgs {
    /// Keeps the issuer key and minted tokens [default: ~/.cache/pod-identity-agent].
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// YAML association table; without it every service account maps to
    /// arn:aws:iam::000000000000:role/<namespace>-<serviceAccount>.
    #[arg(long, conflicts_with = "from_cluster")]
    pub associations: Option<PathBuf>,
    /// Import the association table from this real EKS cluster (uses your AWS credentials).
    #[arg(long)]
    pub from_cluster: Option<String>,
    /// Where credentials come from.
    #[arg(long, value_enum, default_value = DEFAULT_CREDENTIAL_SOURCE)]
    pub credential_source: EmulatedCredentials,
    /// The emulated cluster's name (the agent sends it; tokens must be for it).
    #[arg(long, default_value = DEFAULT_CLUSTER)]
    pub cluster_name: String,
    /// The cluster's authentication mode; a new cluster's is API_AND_CONFIG_MAP. Changing it is
    /// one-way, as on EKS (CONFIG_MAP -> API_AND_CONFIG_MAP -> API).
    #[arg(long, value_parser = ["CONFIG_MAP", "API_AND_CONFIG_MAP", "API"])]
    pub authentication_mode: Option<String>,
    /// The IAM principal that created the cluster (its bootstrap admin) [default: dev's own
    /// role, arn:aws:iam::000000000000:role/default-default]. Used when the cluster is new.
    #[arg(long, default_value = DEFAULT_CREATOR, hide_default_value = true)]
    pub cluster_creator: String,
    /// The aws-auth ConfigMap (YAML, as `kubectl get configmap aws-auth -n kube-system -o
    /// yaml` prints it); re-read at every authentication.
    #[arg(long)]
    pub aws_auth: Option<PathBuf>,
}

impl EmulatorArgs {
    pub fn config(&self) -> Result<EmulatorConfig, String> {
        Ok(EmulatorConfig {
            state_dir: state_dir(self.state_dir.as_deref())?,
            associations: match (&self.associations, &self.from_cluster) {
                (Some(path), _) => AssociationsFrom::File(path.clone()),
                (None, Some(cluster)) => AssociationsFrom::Cluster(cluster.clone()),
                (None, None) => AssociationsFrom::Default,
            },
            credentials: match self.credential_source {
                EmulatedCredentials::Fake => CredentialsFrom::Fake,
                EmulatedCredentials::Sts => CredentialsFrom::Sts,
            },
            cluster: ClusterConfig {
                name: self.cluster_name.clone(),
                authentication_mode: self.authentication_mode.clone(),
                creator: self.cluster_creator.clone(),
            },
            aws_auth: self.aws_auth.clone(),
        })
    }
}

#[derive(Debug, Clone, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct DevArgs {
    #[command(subcommand)]
    pub command: Option<DevCommand>,
    /// Port of the credential listener on 127.0.0.1 (0 picks a free one).
    #[arg(long, default_value_t = DEFAULT_DEV_PORT)]
    pub port: u16,
    /// Also write an AWS config file with an IRSA profile (`pod-identity-dev-irsa`) and a
    /// profile chained from it to another account's role (`pod-identity-dev-cross`).
    #[arg(long)]
    pub aws_config: Option<PathBuf>,
    /// The role the chained profile assumes.
    #[arg(long, default_value = DEFAULT_CROSS_ACCOUNT_ROLE)]
    pub cross_account_role: String,
    #[command(flatten)]
    pub emulator: EmulatorArgs,
    #[command(flatten)]
    pub log: LogArgs,
}

#[derive(Debug, Clone, Subcommand)]
pub enum DevCommand {
    /// Mint a projected-service-account-shaped token signed by the emulator's issuer.
    Token(TokenArgs),
    /// Who an IAM principal is in the emulated cluster (username, groups, from which mapping,
    /// under which mode) and what it may do, or why it is refused. Exits 1 when refused.
    ExplainAccess(ExplainArgs),
}

#[derive(Debug, Clone, Args)]
pub struct ExplainArgs {
    /// An IAM role or user ARN, or an assumed-role session ARN.
    pub principal_arn: String,
    /// The session name templates see ({{SessionName}}) when the ARN is not a session's.
    #[arg(long, default_value = DEFAULT_EXPLAIN_SESSION_NAME)]
    pub session_name: String,
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    #[arg(long, default_value = DEFAULT_CLUSTER)]
    pub cluster_name: String,
    /// The aws-auth ConfigMap to read, as `dev --aws-auth`.
    #[arg(long)]
    pub aws_auth: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct TokenArgs {
    #[arg(long, short = 'n')]
    pub namespace: String,
    #[arg(long, short = 's')]
    pub service_account: String,
    /// Pod name claim [default: <service-account>-<random>].
    #[arg(long)]
    pub pod: Option<String>,
    /// Lifetime of the token.
    #[arg(long, default_value = shown!(DEFAULT_TOKEN_TTL),
          value_parser = duration_between(SECOND, DAY * 366))]
    pub ttl: Duration,
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// File to write (no trailing newline); `-` for stdout [default: <state-dir>/tokens/<ns>_<sa>.jwt,
    /// or <ns>_<sa>.<audience>.jwt for another audience].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The audience: pods.eks.amazonaws.com (Pod Identity) or sts.amazonaws.com (IRSA).
    #[arg(long, default_value = DEFAULT_TOKEN_AUDIENCE)]
    pub audience: String,
}

impl TokenArgs {
    pub fn state_dir(&self) -> Result<PathBuf, String> {
        state_dir(self.state_dir.as_deref())
    }
}

#[derive(Debug, Clone, Args)]
pub struct EmulateArgs {
    /// Address to listen on.
    #[arg(long, default_value_t = DEFAULT_EMULATOR_LISTEN)]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub emulator: EmulatorArgs,
    #[command(flatten)]
    pub log: LogArgs,
}
