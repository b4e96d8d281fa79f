//! The command line: the reference agent's commands, flags, names and defaults, turned into
//! typed settings.
//!
//! Contract: everything the EKS add-on and its Helm chart pass today parses: flags as separate
//! words (`--port 80`) or joined (`--port=80`), booleans as `--rotate-credentials`,
//! `--rotate-credentials true` or `--rotate-credentials=true`, durations in Go's notation
//! (`3h`, `1h30m`, `3h0m0s`, `500ms`). The first `-b` replaces the default bind hosts. A value
//! that does not parse, or is out of its range, is refused by clap with exit code 2 and a
//! one-line reason, never clamped. Every default is a const of [`crate::defaults`].
//!
//! Rooms: this file holds the command list, the small commands' flags (`init`, `diagnose`) and
//! logging's; [`server`](ServerArgs) the agent's flags and how they become
//! [`AgentSettings`](crate::agent::AgentSettings), with its groups `identity` (verification,
//! node binding, Kubernetes) and `abuse` (budgets and bounds); `dev` the local mode's; `parse`
//! the value parsers they share.

use crate::defaults::*;
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Duration;

/// A default duration of [`crate::defaults`] as clap shows and parses it (`5s`, `3h`): clap
/// wants a `&'static str`, made once.
macro_rules! shown {
    ($d:expr) => {{
        static TEXT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        TEXT.get_or_init(|| crate::defaults::go_notation($d))
            .as_str()
    }};
}

mod abuse;
#[cfg(feature = "emulator")]
mod dev;
mod identity;
mod parse;
mod server;

pub use crate::defaults::DEFAULT_BIND_HOSTS;
pub use abuse::AbuseArgs;
#[cfg(feature = "emulator")]
pub use dev::{
    DevArgs, DevCommand, EmulateArgs, EmulatedCredentials, EmulatorArgs, ExplainArgs, TokenArgs,
};
pub use identity::{IdentityArgs, Verification};
pub use parse::{
    duration_between, parse_bind_host, parse_dir_or_off, parse_duration, parse_rate,
    parse_taint_key, parse_url,
};
pub use server::{HandoverArgs, ServerArgs};

use parse::{MINUTE, MS};

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

/// `server`'s flags as parsed from `args` (after `server`), for the tests of each flag group.
#[cfg(test)]
fn server_args(args: &[&str]) -> Result<ServerArgs, clap::Error> {
    let mut full = vec!["pod-identity-agent", "server"];
    full.extend_from_slice(args);
    match Cli::try_parse_from(full)?.command {
        Command::Server(s) => Ok(*s),
        other => panic!("parsed {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
