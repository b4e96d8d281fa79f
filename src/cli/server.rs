//! `server`'s flags, the reference agent's and ours, and how they become the settings the agent
//! runs with ([`ServerArgs::agent_settings`]).
//!
//! Contract: a flag not given takes its [`crate::defaults`] const, so the parsed settings equal
//! the settings types' `Default` impls (a test holds them so); `dev` builds its agent from
//! [`ServerArgs::defaults`], overriding only what local mode must differ in.
//! The flag groups are `identity` ([`IdentityArgs`]), `abuse` ([`AbuseArgs`]), handover
//! ([`HandoverArgs`], honoured on Linux) and logging.

use super::parse::{
    duration_between, parse_bind_host, parse_dir_or_off, DAY, HOUR, MINUTE, MS, SECOND,
};
use super::{AbuseArgs, IdentityArgs, LogArgs};
use crate::cache::policy::RefreshPolicy;
use crate::cache::CacheSettings;
use crate::defaults::*;
use crate::eks_auth::ExchangeSettings;
use crate::server::ServerSettings;
use clap::builder::BoolishValueParser;
use clap::{ArgAction, Args, FromArgMatches};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

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

impl ServerArgs {
    /// `server`'s flags as if only `--cluster-name` were given (and the environment variables
    /// `server` reads): what `dev` starts from, so its agent is `server`'s.
    pub fn defaults(cluster_name: &str) -> Result<ServerArgs, String> {
        let command = ServerArgs::augment_args(clap::Command::new("server"));
        let matches = command
            .try_get_matches_from(["server", &format!("--cluster-name={cluster_name}")])
            .map_err(|e| e.to_string())?;
        ServerArgs::from_arg_matches(&matches).map_err(|e| e.to_string())
    }

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
    use crate::admission::AdmissionSettings;
    use crate::cache::NegativeSettings;
    use crate::cli::{server_args as server, Verbosity};
    use crate::server::limits::ConnectionLimits;

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
}
