//! `server`'s identity flags: who a client is (local token verification against the cluster's
//! keys, node binding) and the Kubernetes API the agent talks to (Events, the startup taint).
//!
//! Contract: verification never stops a start (`auto` falls back to off, `api-server` outside a
//! cluster logs an error and is off), while a feature that names or patches the node refuses to
//! start without a valid `--node-name`. The API server is configured only when something the
//! flags turn on asks it.

use super::parse::{parse_dir_or_off, parse_taint_key, parse_url};
use crate::defaults::*;
use crate::kube::events::EventSettings;
use crate::kube::taint::{TaintSettings, DEFAULT_KEY as DEFAULT_TAINT_KEY};
use crate::kube::KubeSettings;
use crate::verify::{KeysFrom, VerificationSettings, VerifySettings, KEYS_FILE};
use clap::builder::BoolishValueParser;
use clap::{ArgAction, Args, ValueEnum};
use std::path::PathBuf;

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

#[cfg(test)]
mod tests {
    use crate::cli::server_args as server;

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
