//! The command line: the reference agent's commands, flags, names and defaults, turned into
//! typed settings.
//!
//! Contract: everything the EKS add-on and its Helm chart pass today parses: flags as separate
//! words (`--port 80`) or joined (`--port=80`), booleans as `--rotate-credentials`,
//! `--rotate-credentials true` or `--rotate-credentials=true`, durations in Go's notation
//! (`3h`, `1h30m`, `3h0m0s`, `500ms`). The first `-b` replaces the default bind hosts. A value
//! that does not parse is refused by clap with exit code 2 and a one-line reason.

use crate::admission::AdmissionSettings;
use crate::cache::policy::RefreshPolicy;
use crate::cache::{CacheSettings, NegativeSettings};
use crate::defaults::*;
use crate::eks_auth::ExchangeSettings;
#[cfg(feature = "emulator")]
use crate::emulator::state::state_dir;
#[cfg(feature = "emulator")]
use crate::emulator::{AssociationsFrom, ClusterConfig, CredentialsFrom, EmulatorConfig};
use crate::kube::events::EventSettings;
use crate::kube::taint::{TaintSettings, DEFAULT_KEY as DEFAULT_TAINT_KEY};
use crate::kube::KubeSettings;
use crate::server::limits::ConnectionLimits;
use crate::server::ServerSettings;
use crate::verify::{KeysFrom, VerificationSettings, VerifySettings, KEYS_FILE};
use clap::builder::BoolishValueParser;
use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

pub use crate::defaults::DEFAULT_BIND_HOSTS;

/// A default duration of [`crate::defaults`] as clap shows and parses it (`5s`, `3h`): clap
/// wants a `&'static str`, made once.
macro_rules! shown {
    ($d:expr) => {{
        static TEXT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        TEXT.get_or_init(|| crate::defaults::go_notation($d))
            .as_str()
    }};
}

#[derive(Debug, Parser)]
#[command(
    name = "pod-identity-agent",
    version,
    about = "Node-local credential agent for EKS Pod Identity"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve credentials to pods (what the DaemonSet runs).
    Server(Box<ServerArgs>),
    /// Host setup (the init container): the credential addresses on a link of their own.
    #[command(alias = "initialize")]
    Init(InitArgs),
    /// Run Pod Identity on this machine: the agent on 127.0.0.1 backed by a local EKS Auth
    /// emulator, no AWS account needed. Prints the environment any AWS SDK needs.
    #[cfg(feature = "emulator")]
    Dev(DevArgs),
    /// Run the EKS Auth emulator alone, for any agent or EKS Auth client to use.
    #[cfg(feature = "emulator")]
    EmulateEksAuth(EmulateArgs),
    /// Check, from inside a pod (or a shell with its environment), why it does or does not get
    /// Pod Identity credentials: environment, token file, the agent's answer, the role. Exits 1
    /// on a problem.
    Diagnose(DiagnoseArgs),
    /// Print the version.
    Version,
}

#[derive(Debug, Clone, Args)]
pub struct DiagnoseArgs {
    /// Do not ask STS which role the credentials belong to (for pods with no route to STS).
    #[arg(long)]
    pub no_sts: bool,
    /// How long to wait for the agent, and for STS.
    #[arg(long, default_value = shown!(DEFAULT_DIAGNOSE_TIMEOUT),
          value_parser = duration_between(MS * 100, MINUTE * 10))]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct InitArgs {
    /// Name of the link that holds the addresses.
    #[arg(long, default_value = DEFAULT_LINK_NAME)]
    pub link_name: String,
    /// Link kind [default: dummy, falling back to ifb on kernels without dummy].
    #[arg(long)]
    pub link_kind: Option<String>,
    /// IPv4 credential address.
    #[arg(long, default_value_t = POD_IDENTITY_IPV4)]
    pub ipv4: Ipv4Addr,
    /// IPv6 credential address.
    #[arg(long, default_value_t = POD_IDENTITY_IPV6)]
    pub ipv6: Ipv6Addr,
    /// Skip IPv6 altogether.
    #[arg(long)]
    pub no_ipv6: bool,
    #[command(flatten)]
    pub log: LogArgs,
}

#[cfg(feature = "emulator")]
/// Where emulated credentials come from (`--credential-source`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EmulatedCredentials {
    /// Well-formed, unique credentials; no AWS account.
    Fake,
    /// A real sts:AssumeRole of the association's role with your own AWS credentials.
    Sts,
}

#[cfg(feature = "emulator")]
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

#[cfg(feature = "emulator")]
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

#[cfg(feature = "emulator")]
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

#[cfg(feature = "emulator")]
#[derive(Debug, Clone, Subcommand)]
pub enum DevCommand {
    /// Mint a projected-service-account-shaped token signed by the emulator's issuer.
    Token(TokenArgs),
    /// Who an IAM principal is in the emulated cluster (username, groups, from which mapping,
    /// under which mode) and what it may do, or why it is refused. Exits 1 when refused.
    ExplainAccess(ExplainArgs),
}

#[cfg(feature = "emulator")]
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

#[cfg(feature = "emulator")]
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

#[cfg(feature = "emulator")]
impl TokenArgs {
    pub fn state_dir(&self) -> Result<PathBuf, String> {
        state_dir(self.state_dir.as_deref())
    }
}

#[cfg(feature = "emulator")]
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Json,
    Text,
}

/// logrus's level names, as the reference agent accepts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Verbosity {
    Trace,
    Debug,
    Info,
    #[value(alias = "warning")]
    Warn,
    #[value(alias = "fatal", alias = "panic")]
    Error,
}

#[derive(Debug, Clone, Args)]
pub struct LogArgs {
    /// Log level: trace, debug, info, warn, error.
    #[arg(short = 'v', long, value_enum, default_value = DEFAULT_VERBOSITY)]
    pub verbosity: Verbosity,
    /// Log line format [default: json for server, text for dev and emulate-eks-auth].
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
    /// Do not write the audit trail (one `info` line per EKS Auth exchange and per refusal,
    /// target pod_identity_agent::audit), which is on at every verbosity otherwise.
    #[arg(long)]
    pub no_audit_log: bool,
}

#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// Name of the EKS cluster (sent to EKS Auth with every exchange).
    #[arg(short = 'c', long)]
    pub cluster_name: String,
    /// Port of the credential listeners.
    #[arg(short = 'p', long, default_value_t = DEFAULT_PORT)]
    pub port: u16,
    /// Address to serve credentials on; repeat for several. The first one replaces the
    /// defaults, 169.254.170.23 and [fd00:ec2::23].
    #[arg(short = 'b', long = "bind-hosts", value_parser = parse_bind_host, action = ArgAction::Append)]
    pub bind_hosts: Vec<IpAddr>,
    /// Port of /healthz and /readyz, on 127.0.0.1.
    #[arg(long, default_value_t = DEFAULT_PROBE_PORT)]
    pub probe_port: u16,
    /// Address of the metrics listener.
    #[arg(long, default_value_t = DEFAULT_METRICS_ADDRESS, value_parser = parse_bind_host)]
    pub metrics_address: IpAddr,
    /// Port of the metrics listener (/metrics).
    #[arg(long, default_value_t = DEFAULT_METRICS_PORT)]
    pub metrics_port: u16,
    /// Renew cached credentials after at most this long, even if they would last longer.
    #[arg(long, default_value = shown!(DEFAULT_MAX_CREDENTIAL_RETENTION),
          value_parser = duration_between(SECOND, DAY * 7))]
    pub max_credential_retention_before_renewal: Duration,
    /// Most tokens (pods) whose credentials are cached; least recently used go first.
    #[arg(long, default_value_t = DEFAULT_MAX_CACHE_SIZE, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_cache_size: u64,
    /// Refresh-ahead exchanges per second with EKS Auth, across all pods.
    #[arg(long, default_value_t = DEFAULT_MAX_SERVICE_QPS, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_service_qps: u32,
    /// Re-read the node's credentials from the shared credentials file (hybrid nodes).
    #[arg(long, num_args = 0..=1, default_value_t = DEFAULT_ROTATE_CREDENTIALS,
          default_missing_value = "true", value_parser = BoolishValueParser::new(),
          action = ArgAction::Set)]
    pub rotate_credentials: bool,
    /// EKS Auth endpoint URL (also AWS_ENDPOINT_URL_EKS_AUTH); plain http is allowed.
    #[arg(long)]
    pub endpoint: Option<String>,
    /// AWS region of the cluster; defaults to the SDK's chain (AWS_REGION, profile, IMDS).
    #[arg(long)]
    pub region: Option<String>,
    /// Overall deadline of one EKS Auth exchange, retries included.
    #[arg(long, default_value = shown!(DEFAULT_EKS_AUTH_TIMEOUT),
          value_parser = duration_between(MS * 100, MINUTE * 10))]
    pub eks_auth_timeout: Duration,
    /// Clock leeway applied to token exp and nbf.
    #[arg(long, default_value = shown!(DEFAULT_TOKEN_LEEWAY),
          value_parser = duration_between(Duration::ZERO, HOUR))]
    pub token_leeway: Duration,
    /// How long in-flight requests may take to finish after SIGTERM.
    #[arg(long, default_value = shown!(DEFAULT_SHUTDOWN_GRACE),
          value_parser = duration_between(Duration::ZERO, HOUR))]
    pub shutdown_grace: Duration,
    /// Where the agent keeps what it learns across restarts (the cluster's verification keys),
    /// made mode 0700; empty keeps nothing.
    #[arg(long, env = "POD_IDENTITY_AGENT_STATE_DIR", default_value = DEFAULT_STATE_DIR,
          value_parser = parse_dir_or_off)]
    pub state_dir: PathBuf,
    #[command(flatten)]
    pub identity: IdentityArgs,
    #[command(flatten)]
    pub abuse: AbuseArgs,
    #[command(flatten)]
    pub handover: HandoverArgs,
    #[command(flatten)]
    pub log: LogArgs,
}

/// Where tokens are verified against: the API server's keys or an issuer's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Verification {
    /// The issuer with --token-issuer; else the API server when running in a cluster (its
    /// service-account token and CA are mounted); else off.
    Auto,
    /// The API server's /openid/v1/jwks, with the agent's service-account token.
    ApiServer,
    /// The discovery document of --token-issuer.
    Issuer,
    /// No local verification: every token goes to EKS Auth as the reference agent sends it.
    Off,
}

/// Who a client is: token verification against the cluster's keys, node binding.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Identity")]
pub struct IdentityArgs {
    /// Verify tokens locally against the cluster's keys before any exchange.
    #[arg(long, value_enum, default_value = DEFAULT_TOKEN_VERIFICATION)]
    pub token_verification: Verification,
    /// The OIDC issuer tokens carry (an EKS cluster's, e.g.
    /// https://oidc.eks.us-west-2.amazonaws.com/id/EXAMPLE), whose discovery document gives its
    /// keys; https only (plain http to loopback, for tests).
    #[arg(long, value_parser = parse_url)]
    pub token_issuer: Option<String>,
    /// Where the issuer's discovery document is
    /// [default: <token-issuer>/.well-known/openid-configuration].
    #[arg(long, requires = "token_issuer", value_parser = parse_url)]
    pub token_issuer_discovery_url: Option<String>,
    /// The Kubernetes API server [default: in-cluster, https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT].
    #[arg(long, value_parser = parse_url)]
    pub kube_api_server: Option<String>,
    /// The agent's service-account token for the API server.
    #[arg(long, default_value = DEFAULT_KUBE_TOKEN_FILE)]
    pub kube_token_file: PathBuf,
    /// The CA bundle of the API server's certificate; empty: the system's roots.
    #[arg(long, default_value = DEFAULT_KUBE_CA_FILE,
          value_parser = parse_dir_or_off)]
    pub kube_ca_file: PathBuf,
    /// This node's name (the downward API's spec.nodeName): verified tokens of pods on other
    /// nodes are refused, so a token stolen on one node cannot be redeemed on another.
    #[arg(long)]
    pub node_name: Option<String>,
    /// IPv6 sources within one prefix of this length are one client (budgets, connections);
    /// 128 counts each address apart.
    #[arg(long, default_value_t = DEFAULT_CLIENT_IPV6_PREFIX,
          value_parser = clap::value_parser!(u8).range(0..=128))]
    pub client_ipv6_prefix: u8,
    /// Remove this taint from the node (--node-name) once the agent serves, so pods are not
    /// scheduled on a new node before it can give them credentials; never added back. Without a
    /// value: pod-identity.agent/not-ready. Off unless given.
    #[arg(long, value_name = "KEY", num_args = 0..=1, default_missing_value = DEFAULT_TAINT_KEY,
          requires = "node_name", value_parser = parse_taint_key)]
    pub node_startup_taint: Option<String>,
    /// Report refused pods (no association, an expired or invalid token, the role's trust
    /// policy) as Events on the pod, and refused node credentials on the Node (needs
    /// --node-name; pod Events need token verification).
    #[arg(long, num_args = 0..=1, default_value_t = DEFAULT_EVENTS, default_missing_value = "true",
          value_parser = BoolishValueParser::new(), action = ArgAction::Set)]
    pub events: bool,
}

impl IdentityArgs {
    /// The verification the flags ask for, with keys kept in `state_dir` (if any).
    pub fn verification(
        &self,
        state_dir: &std::path::Path,
    ) -> Result<Option<VerificationSettings>, String> {
        let issuer = || {
            let issuer = self
                .token_issuer
                .as_deref()
                .ok_or("--token-verification issuer needs --token-issuer")?;
            let issuer = issuer.trim_end_matches('/').to_owned();
            Ok::<_, String>(KeysFrom::Issuer {
                discovery_url: self
                    .token_issuer_discovery_url
                    .clone()
                    .unwrap_or_else(|| format!("{issuer}/.well-known/openid-configuration")),
                issuer,
            })
        };
        let keys = match self.token_verification {
            Verification::Off => return Ok(None),
            Verification::Issuer => issuer()?,
            Verification::ApiServer => match self.kube() {
                Some(_) => KeysFrom::ApiServer,
                None => {
                    // Never a reason not to serve: the node's pods would get nothing at all.
                    tracing::error!("--token-verification api-server: not running in a cluster (no KUBERNETES_SERVICE_HOST) and no --kube-api-server; tokens go to EKS Auth unverified");
                    return Ok(None);
                }
            },
            Verification::Auto if self.token_issuer.is_some() => issuer()?,
            Verification::Auto => match self.kube() {
                // Only when the pod's credentials are actually there: auto never fails a start.
                Some(k)
                    if k.token_file.is_file() && k.ca_file.as_ref().is_none_or(|c| c.is_file()) =>
                {
                    KeysFrom::ApiServer
                }
                _ => return Ok(None),
            },
        };
        let state_file = (!state_dir.as_os_str().is_empty()).then(|| state_dir.join(KEYS_FILE));
        Ok(Some(VerificationSettings {
            keys,
            verify: VerifySettings {
                state_file,
                ..VerifySettings::default()
            },
        }))
    }

    /// This node's name, checked, when a feature that patches or names the node is on.
    fn node_for(&self, flag: &str) -> Result<String, String> {
        let node = self.node_name.as_deref().unwrap_or_default();
        if node.is_empty() {
            return Err(format!(
                "{flag} needs --node-name (the downward API's spec.nodeName)"
            ));
        }
        if !crate::kube::is_dns_subdomain(node) {
            return Err(format!(
                "--node-name {node:?} is not a Kubernetes node name"
            ));
        }
        Ok(node.to_owned())
    }

    /// `--node-startup-taint`, if given (it runs only with an API server: [`Self::kube_for`]).
    pub fn startup_taint(&self) -> Result<Option<TaintSettings>, String> {
        let Some(key) = &self.node_startup_taint else {
            return Ok(None);
        };
        let node = self.node_for("--node-startup-taint")?;
        Ok(Some(TaintSettings::new(node, key.clone())))
    }

    /// `--events`, if on (they are sent only with an API server: [`Self::kube_for`]).
    pub fn events(&self) -> Result<Option<EventSettings>, String> {
        if !self.events {
            return Ok(None);
        }
        let node = self.node_for("--events")?;
        Ok(Some(EventSettings::new(node)))
    }

    /// The API server, if something the flags turn on asks it (`verification` from the keys,
    /// Events, the startup taint); each of those without one is logged, and off.
    pub fn kube_for(&self, verification: Option<&VerificationSettings>) -> Option<KubeSettings> {
        let keys = verification.is_some_and(|v| matches!(v.keys, KeysFrom::ApiServer));
        if !keys && !self.events && self.node_startup_taint.is_none() {
            return None;
        }
        let kube = self.kube();
        if kube.is_none() {
            // Never a reason not to serve; but the operator must know what is off.
            if let Some(key) = &self.node_startup_taint {
                tracing::error!(taint = %key, "--node-startup-taint: not running in a cluster (no KUBERNETES_SERVICE_HOST) and no --kube-api-server; the taint stays on the node");
            }
            if self.events {
                tracing::error!("--events: not running in a cluster (no KUBERNETES_SERVICE_HOST) and no --kube-api-server; no Events are sent");
            }
        }
        kube
    }

    /// The API server's settings: the overrides, else in-cluster.
    fn kube(&self) -> Option<KubeSettings> {
        let mut k = match &self.kube_api_server {
            Some(server) => KubeSettings::new(server.clone()),
            None => KubeSettings::in_cluster()?,
        };
        k.token_file = self.kube_token_file.clone();
        k.ca_file = (!self.kube_ca_file.as_os_str().is_empty()).then(|| self.kube_ca_file.clone());
        Some(k)
    }
}

/// Upgrades without a gap: taking over a running agent's sockets and cache.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Handover")]
pub struct HandoverArgs {
    /// Directory of the handover socket, shared by successive agents on a node (made mode
    /// 0700); empty turns handover off.
    #[arg(long, env = "POD_IDENTITY_AGENT_HANDOVER_DIR", default_value = DEFAULT_HANDOVER_DIR,
          value_parser = parse_dir_or_off)]
    pub handover_dir: PathBuf,
    /// After SIGTERM, how long to keep serving while waiting for a new agent to take over.
    #[arg(long, default_value = shown!(DEFAULT_HANDOVER_WAIT),
          value_parser = duration_between(Duration::ZERO, MINUTE * 10))]
    pub handover_wait: Duration,
    /// How long each step of a handover may take before the other agent is given up on.
    #[arg(long, default_value = shown!(DEFAULT_HANDOVER_TIMEOUT),
          value_parser = duration_between(MS * 10, MINUTE * 10))]
    pub handover_timeout: Duration,
}

/// What one pod may cost the node: remembered refusals, exchange budgets, connection bounds and
/// local token verification.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Abuse resistance")]
pub struct AbuseArgs {
    /// Remember EKS Auth's refusal of a token (invalid, expired, no association) this long;
    /// 0s turns remembering off. Refusals of the node's own credentials: at most 5s.
    #[arg(long, default_value = shown!(DEFAULT_NEGATIVE_CACHE_TTL),
          value_parser = duration_between(Duration::ZERO, DAY))]
    pub negative_cache_ttl: Duration,
    /// Most refusals remembered at once (separate from --max-cache-size).
    #[arg(long, default_value_t = DEFAULT_NEGATIVE_CACHE_SIZE, value_parser = clap::value_parser!(u64).range(1..))]
    pub negative_cache_size: u64,
    /// New exchanges per second one client (a verified pod; else a source address, the host's
    /// counted as one) may start, sustained. Cache hits are never limited.
    #[arg(long, default_value_t = DEFAULT_CLIENT_EXCHANGE_QPS, value_parser = parse_rate)]
    pub client_exchange_qps: f64,
    /// New exchanges one client may start at once before --client-exchange-qps applies.
    #[arg(long, default_value_t = DEFAULT_CLIENT_EXCHANGE_BURST, value_parser = clap::value_parser!(u32).range(1..))]
    pub client_exchange_burst: u32,
    /// Exchanges one client may have under way at once.
    #[arg(long, default_value_t = DEFAULT_CLIENT_MAX_CONCURRENT_EXCHANGES,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub client_max_concurrent_exchanges: u32,
    /// New exchanges per second for the whole node, sustained (refreshes are separate:
    /// --max-service-qps).
    #[arg(long, default_value_t = DEFAULT_EXCHANGE_QPS, value_parser = parse_rate)]
    pub exchange_qps: f64,
    /// New exchanges the node may start at once (a reboot's first requests).
    #[arg(long, default_value_t = DEFAULT_EXCHANGE_BURST, value_parser = clap::value_parser!(u32).range(1..))]
    pub exchange_burst: u32,
    /// New exchanges the node may have under way at once.
    #[arg(long, default_value_t = DEFAULT_MAX_CONCURRENT_EXCHANGES,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_exchanges: u32,
    /// How long a request may wait for the node's exchange budget before a 503.
    #[arg(long, default_value = shown!(DEFAULT_MAX_EXCHANGE_WAIT),
          value_parser = duration_between(Duration::ZERO, MINUTE))]
    pub max_exchange_wait: Duration,
    /// Open connections at once on the credential listeners; beyond it clients wait.
    #[arg(long, default_value_t = DEFAULT_MAX_CONNECTIONS, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// Open connections one client (a source address; the host's counted as one) may hold once
    /// the pool is three-quarters full; beyond it they are refused (429).
    #[arg(long, default_value_t = DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections_per_client: u32,
    /// A request's headers must arrive within this.
    #[arg(long, default_value = shown!(DEFAULT_HEADER_TIMEOUT),
          value_parser = duration_between(MS * 100, MINUTE * 10))]
    pub header_timeout: Duration,
}

impl AbuseArgs {
    pub fn admission(&self) -> AdmissionSettings {
        AdmissionSettings {
            client_qps: self.client_exchange_qps,
            client_burst: self.client_exchange_burst,
            client_concurrency: self.client_max_concurrent_exchanges as usize,
            node_qps: self.exchange_qps,
            node_burst: self.exchange_burst,
            node_concurrency: self.max_concurrent_exchanges as usize,
            node_wait: self.max_exchange_wait,
            ..AdmissionSettings::default()
        }
    }

    pub fn connections(&self) -> ConnectionLimits {
        ConnectionLimits {
            max_connections: self.max_connections as usize,
            max_per_client: self.max_connections_per_client as usize,
            header_timeout: self.header_timeout,
        }
    }

    pub fn negative(&self) -> NegativeSettings {
        NegativeSettings {
            ttl: self.negative_cache_ttl,
            max_entries: self.negative_cache_size,
        }
    }
}

/// A directory, or nothing (the feature is off).
pub fn parse_dir_or_off(s: &str) -> Result<PathBuf, String> {
    Ok(PathBuf::from(s.trim()))
}

/// A positive rate per second.
pub fn parse_rate(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 => Ok(r),
        _ => Err(format!("{s:?} is not a positive number per second")),
    }
}

/// An https URL (plain http only to a loopback address).
pub fn parse_url(s: &str) -> Result<String, String> {
    crate::https::check_url(s).map(|_| s.trim().to_owned())
}

/// A taint key: a Kubernetes qualified name.
pub fn parse_taint_key(s: &str) -> Result<String, String> {
    let key = s.trim();
    if crate::kube::is_qualified_name(key) {
        Ok(key.to_owned())
    } else {
        Err(format!(
            "{s:?} is not a taint key (an optional DNS prefix and '/', then up to 63 letters, digits, '-', '_' or '.')"
        ))
    }
}

/// A bind host: an IP literal, bracketed IPv6 included, or `localhost`.
pub fn parse_bind_host(s: &str) -> Result<IpAddr, String> {
    let t = s.trim().trim_start_matches('[').trim_end_matches(']');
    if t.eq_ignore_ascii_case("localhost") {
        return Ok(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    t.parse().map_err(|_| format!("{s:?} is not an IP address"))
}

/// Go duration notation (`3h`, `1h30m`, `3h0m0s`, `250ms`), which humantime reads.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("{s:?} is not a duration like 3h or 90s: {e}"))
}

const MS: Duration = Duration::from_millis(1);
const SECOND: Duration = Duration::from_secs(1);
const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86_400);

/// A duration within `[min, max]`: a value outside is refused where it is parsed (exit 2), never
/// clamped, and nothing downstream can overflow adding or multiplying it.
pub fn duration_between(
    min: Duration,
    max: Duration,
) -> impl Fn(&str) -> Result<Duration, String> + Clone + Send + Sync + 'static {
    move |s| {
        let d = parse_duration(s)?;
        if d < min || d > max {
            return Err(format!(
                "{s:?} is outside {} to {}",
                humantime::format_duration(min),
                humantime::format_duration(max)
            ));
        }
        Ok(d)
    }
}

impl ServerArgs {
    pub fn bind_hosts(&self) -> Vec<IpAddr> {
        if self.bind_hosts.is_empty() {
            DEFAULT_BIND_HOSTS.to_vec()
        } else {
            self.bind_hosts.clone()
        }
    }

    pub fn server_settings(&self) -> Result<ServerSettings, String> {
        let verification = self.identity.verification(&self.state_dir)?;
        Ok(ServerSettings {
            bind_hosts: self.bind_hosts(),
            port: self.port,
            probe_addr: Some(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), self.probe_port)),
            metrics_addr: Some(SocketAddr::new(self.metrics_address, self.metrics_port)),
            cache: CacheSettings {
                max_entries: self.max_cache_size,
                policy: RefreshPolicy {
                    max_retention: self.max_credential_retention_before_renewal,
                },
                refresh_qps: f64::from(self.max_service_qps),
                refresh_concurrency: DEFAULT_REFRESH_CONCURRENCY,
                negative: self.abuse.negative(),
            },
            leeway: self.token_leeway,
            shutdown_grace: self.shutdown_grace,
            admission: self.abuse.admission(),
            kube: self.identity.kube_for(verification.as_ref()),
            verification,
            node_name: self.identity.node_name.clone().filter(|n| !n.is_empty()),
            client_ipv6_prefix: self.identity.client_ipv6_prefix,
            connections: self.abuse.connections(),
            events: self.identity.events()?,
        })
    }

    /// Everything `server` runs with.
    pub fn agent_settings(&self) -> Result<crate::agent::AgentSettings, String> {
        Ok(crate::agent::AgentSettings {
            server: self.server_settings()?,
            exchange: self.exchange_settings(),
            #[cfg(target_os = "linux")]
            handover: self.handover_settings(),
            state_dir: (!self.state_dir.as_os_str().is_empty()).then(|| self.state_dir.clone()),
            region: self.region.clone(),
            rotate_credentials: self.rotate_credentials,
            startup_taint: self.identity.startup_taint()?,
        })
    }

    /// `None` when handover is off (`--handover-dir ""`).
    #[cfg(target_os = "linux")]
    pub fn handover_settings(&self) -> Option<crate::handover::HandoverSettings> {
        let h = &self.handover;
        (!h.handover_dir.as_os_str().is_empty()).then(|| crate::handover::HandoverSettings {
            dir: h.handover_dir.clone(),
            timeout: h.handover_timeout,
            wait: h.handover_wait,
            grace: self.shutdown_grace,
            expected: crate::handover::Expected {
                credentials: self
                    .bind_hosts()
                    .into_iter()
                    .map(|ip| SocketAddr::new(ip, self.port))
                    .collect(),
                probe: Some(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), self.probe_port)),
                metrics: Some(SocketAddr::new(self.metrics_address, self.metrics_port)),
            },
            max_entries: self.max_cache_size,
        })
    }

    pub fn exchange_settings(&self) -> ExchangeSettings {
        let mut s = ExchangeSettings::new(&self.cluster_name);
        s.endpoint = self.endpoint.clone();
        s.overall_timeout = self.eks_auth_timeout;
        s.attempt_timeout = s.attempt_timeout.min(self.eks_auth_timeout);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(args: &[&str]) -> Result<ServerArgs, clap::Error> {
        let mut full = vec!["pod-identity-agent", "server"];
        full.extend_from_slice(args);
        match Cli::try_parse_from(full)?.command {
            Command::Server(s) => Ok(*s),
            other => panic!("parsed {other:?}"),
        }
    }

    #[test]
    fn defaults_match_the_reference_agent() {
        let s = server(&["-c", "my-cluster"]).expect("parses");
        assert_eq!(s.port, 80);
        assert_eq!(s.bind_hosts(), DEFAULT_BIND_HOSTS.to_vec());
        assert_eq!((s.probe_port, s.metrics_port), (2703, 2705));
        assert_eq!(s.metrics_address, IpAddr::from([0, 0, 0, 0]));
        assert_eq!(
            s.max_credential_retention_before_renewal,
            Duration::from_secs(3 * 3600)
        );
        assert_eq!((s.max_cache_size, s.max_service_qps), (2000, 3));
        assert!(!s.rotate_credentials);
        assert_eq!(s.log.verbosity, Verbosity::Info);
        // Ours: documented in the README's flag table.
        let settings = s.server_settings().expect("settings");
        assert_eq!(settings.cache.negative.ttl, Duration::from_secs(60));
        assert_eq!(settings.cache.negative.max_entries, 10_000);
        let a = settings.admission;
        assert_eq!(
            (a.client_qps, a.client_burst, a.client_concurrency),
            (1.0, 10, 4)
        );
        assert_eq!(
            (a.node_qps, a.node_burst, a.node_concurrency),
            (50.0, 200, 64)
        );
        assert_eq!(a.node_wait, Duration::from_secs(2));
        assert!(
            settings.verification.is_none(),
            "verification is off outside a cluster"
        );
        let c = settings.connections;
        assert_eq!((c.max_connections, c.max_per_client), (2048, 128));
        assert_eq!(c.header_timeout, Duration::from_secs(3));
    }

    /// One home for every default: what clap parses when no flag is given is what the settings
    /// types' `Default` impls hold (library callers, benches and tests start from those).
    #[test]
    fn parsed_defaults_are_the_default_impls() {
        let s = server(&["-c", "c"]).expect("parses");
        let settings = s.server_settings().expect("settings");
        let same = |parsed: &dyn std::fmt::Debug, default: &dyn std::fmt::Debug| {
            assert_eq!(format!("{parsed:?}"), format!("{default:?}"));
        };
        same(&settings.cache, &CacheSettings::default());
        same(&settings.cache.negative, &NegativeSettings::default());
        same(&settings.admission, &AdmissionSettings::default());
        same(&settings.connections, &ConnectionLimits::default());
        same(&s.exchange_settings(), &ExchangeSettings::new("c"));
        assert_eq!(settings.leeway, DEFAULT_TOKEN_LEEWAY);
        assert_eq!(settings.shutdown_grace, DEFAULT_SHUTDOWN_GRACE);
        assert_eq!(settings.client_ipv6_prefix, DEFAULT_CLIENT_IPV6_PREFIX);
        let h = &s.handover;
        assert_eq!(
            (h.handover_wait, h.handover_timeout),
            (DEFAULT_HANDOVER_WAIT, DEFAULT_HANDOVER_TIMEOUT)
        );
    }

    #[test]
    fn accepts_the_forms_the_add_on_passes() {
        let s = server(&[
            "--cluster-name",
            "c",
            "--port",
            "8080",
            "--rotate-credentials",
            "true",
            "-b",
            "[fd00:ec2::23]",
            "--max-credential-retention-before-renewal",
            "1h30m0s",
            "-v",
            "warning",
        ])
        .expect("parses");
        assert!(s.rotate_credentials);
        assert_eq!(s.bind_hosts(), vec![DEFAULT_BIND_HOSTS[1]]);
        assert_eq!(
            s.max_credential_retention_before_renewal,
            Duration::from_secs(5400)
        );
        assert_eq!(s.log.verbosity, Verbosity::Warn);
        assert!(
            server(&["-c", "c", "--rotate-credentials"])
                .expect("bare bool")
                .rotate_credentials
        );
        assert!(
            server(&["-c", "c", "--rotate-credentials=true"])
                .expect("joined bool")
                .rotate_credentials
        );
        assert!(
            !server(&["-c", "c", "--rotate-credentials", "false"])
                .expect("false")
                .rotate_credentials
        );
        let two = server(&["-c", "c", "-b", "127.0.0.1", "-b", "::1"]).expect("two hosts");
        assert_eq!(two.bind_hosts().len(), 2);
    }

    #[test]
    fn absurd_lifetimes_elsewhere_are_refused_too() {
        for bad in [
            vec![
                "dev",
                "token",
                "-n",
                "a",
                "-s",
                "b",
                "--ttl",
                "99999999999h",
            ],
            vec!["dev", "token", "-n", "a", "-s", "b", "--ttl", "0s"],
            vec!["diagnose", "--timeout", "0s"],
        ] {
            let mut argv = vec!["pod-identity-agent"];
            argv.extend(bad.iter().copied());
            let err = Cli::try_parse_from(argv).expect_err("refused");
            assert_eq!(err.exit_code(), 2, "{bad:?}");
        }
    }

    #[test]
    fn refuses_bad_values_with_usage_errors() {
        for bad in [
            vec![],
            vec!["-c", "c", "--port", "http"],
            vec!["-c", "c", "-b", "example.com"],
            vec![
                "-c",
                "c",
                "--max-credential-retention-before-renewal",
                "soon",
            ],
            vec!["-c", "c", "--max-service-qps", "0"],
            vec!["-c", "c", "--client-exchange-qps", "0"],
            vec!["-c", "c", "--client-exchange-qps", "NaN"],
            vec!["-c", "c", "--token-issuer", "oidc.example"],
            vec!["-c", "c", "--token-issuer", "http://oidc.example/id/x"],
            vec!["-c", "c", "--client-ipv6-prefix", "129"],
            vec!["-c", "c", "--token-issuer-discovery-url", "http://x/y"],
            vec!["-c", "c", "--max-connections", "0"],
            // Durations that would break something downstream are refused here, not clamped.
            vec!["-c", "c", "--handover-timeout", "0s"],
            vec!["-c", "c", "--header-timeout", "0s"],
            vec!["-c", "c", "--handover-timeout", "100000000h"],
            vec!["-c", "c", "--shutdown-grace", "18446744073709551615s"],
            vec!["-c", "c", "--max-credential-retention-before-renewal", "0s"],
            // The startup taint patches this node: it needs its name, and a real taint key.
            vec!["-c", "c", "--node-startup-taint"],
            vec!["-c", "c", "--events", "sometimes"],
        ] {
            let err = server(&bad).expect_err("must fail");
            assert_eq!(err.exit_code(), 2, "{bad:?}");
        }
    }

    /// The startup taint and Events: off unless asked for (the manifests ask), the taint's key
    /// ours by default, and each refused at start without a node name it can use.
    #[test]
    fn kubernetes_features_are_off_unless_asked_for() {
        let kube = [
            "--kube-api-server",
            "http://127.0.0.1:1",
            "--kube-ca-file",
            "",
        ];
        let plain =
            server(&[&["-c", "c", "--node-name", "n"][..], &kube].concat()).expect("parses");
        assert_eq!(plain.identity.node_startup_taint, None);
        assert!(!plain.identity.events);
        let settings = plain.agent_settings().expect("settings");
        assert!(settings.startup_taint.is_none() && settings.server.events.is_none());

        let on = server(
            &[
                &[
                    "-c",
                    "c",
                    "--node-name",
                    "n",
                    "--node-startup-taint",
                    "--events",
                ][..],
                &kube,
            ]
            .concat(),
        )
        .expect("parses");
        let settings = on.agent_settings().expect("settings");
        let taint = settings.startup_taint.expect("taint on");
        assert_eq!(
            (taint.key.as_str(), taint.node.as_str()),
            (crate::kube::taint::DEFAULT_KEY, "n")
        );
        assert_eq!(settings.server.events.expect("events on").node, "n");
        let custom = server(
            &[
                &[
                    "-c",
                    "c",
                    "--node-name",
                    "n",
                    "--node-startup-taint",
                    "example.com/agent-ready",
                ][..],
                &kube,
            ]
            .concat(),
        )
        .expect("parses");
        assert_eq!(
            custom.identity.node_startup_taint.as_deref(),
            Some("example.com/agent-ready")
        );
        for key in ["Bad Key", "a/b/c", "-x"] {
            let err = server(&["-c", "c", "--node-name", "n", "--node-startup-taint", key])
                .expect_err("not a taint key");
            assert_eq!(err.exit_code(), 2, "{key}");
        }
        // A node name the API server would not have is refused at start (exit 2), not patched.
        for bad in [
            vec!["-c", "c", "--events"],
            vec!["-c", "c", "--events", "--node-name", ""],
            vec![
                "-c",
                "c",
                "--node-name",
                "Not/A/Node",
                "--node-startup-taint",
            ],
        ] {
            let args = server(&[&bad[..], &kube].concat()).expect("parses");
            assert!(args.agent_settings().is_err(), "{bad:?}");
        }
    }
}
