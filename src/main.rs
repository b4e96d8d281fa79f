//! The `pod-identity-agent` binary: parse the command line, set up logging, run the command.
//! Any failure to start is one line on stderr and exit code 2, never a panic.
//!
//! Platforms: the agent is for Linux nodes. What is Linux-only is gated in the library, as
//! `lib.rs` gates `handover` and `files`, and nothing here names it, so the commands are the
//! same everywhere: elsewhere `server` runs without handover (it says so at start) and `init`,
//! which sets up a Linux link over netlink, refuses with exit 2 (`netlink::init`).

use clap::Parser;
use pod_identity_agent::cli::{Cli, Command, InitArgs, LogFormat, ServerArgs};
use pod_identity_agent::{agent, logging};
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Version => {
            println!("pod-identity-agent {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::Server(args) => run(|| server(*args)),
        Command::Init(args) => run(|| init(args)),
        #[cfg(feature = "emulator")]
        Command::Dev(pod_identity_agent::cli::DevArgs {
            command: Some(pod_identity_agent::cli::DevCommand::ExplainAccess(args)),
            ..
        }) => match pod_identity_agent::dev::run_explain(args) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::from(1),
            Err(e) => {
                eprintln!("pod-identity-agent: {e}");
                ExitCode::from(2)
            }
        },
        #[cfg(feature = "emulator")]
        Command::Dev(args) => run(|| async {
            pod_identity_agent::dev::run_dev(args)
                .await
                .map_err(|e| (2, e))
        }),
        #[cfg(feature = "emulator")]
        Command::EmulateEksAuth(args) => run(|| async {
            pod_identity_agent::dev::run_emulate(args)
                .await
                .map_err(|e| (2, e))
        }),
        // Its exit code is its verdict (1: a problem found), not a start-up failure.
        Command::Diagnose(args) => match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt.block_on(pod_identity_agent::diagnose::run(args)),
            Err(e) => {
                eprintln!("pod-identity-agent: cannot start the runtime: {e}");
                ExitCode::from(2)
            }
        },
    }
}

/// How a command ended: an exit code and, for a failure, one line saying why.
type Ended = Result<(), (u8, String)>;

fn run<F, Fut>(f: F) -> ExitCode
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Ended>,
{
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pod-identity-agent: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let failed = runtime.block_on(f()).err();
    if let Some((_, e)) = &failed {
        tracing::error!(error = %e, "stopped");
    }
    // The log's queue is written out before the last line, so they come out in order.
    logging::finish();
    match failed {
        None => ExitCode::SUCCESS,
        Some((code, e)) => {
            eprintln!("pod-identity-agent: {e}");
            ExitCode::from(code)
        }
    }
}

async fn server(args: ServerArgs) -> Ended {
    logging::init(&args.log, LogFormat::Json);
    // Every pod's token and credentials will be in this process's memory.
    if !pod_identity_agent::util::no_core_dumps() {
        tracing::warn!("cannot mark the process not dumpable: a crash could write tokens and credentials to a core file");
    }
    // Every connection is a descriptor: the bound on connections must be reachable.
    match pod_identity_agent::server::limits::raise_fd_limit() {
        Ok((before, after)) => {
            let needed = u64::from(args.abuse.max_connections) + 256;
            if after < needed {
                tracing::warn!(open_files = after, max_connections = args.abuse.max_connections,
                    "the open-files limit is below --max-connections; accept will fail before the bound is reached");
            } else if before != after {
                tracing::debug!(before, after, "raised the open-files limit");
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-files limit"),
    }
    #[cfg(not(target_os = "linux"))]
    if !args.handover.handover_dir.as_os_str().is_empty() {
        tracing::warn!("handover needs Linux (SCM_RIGHTS and SO_PEERCRED): this agent neither takes over nor hands over");
    }
    let settings = args.agent_settings().map_err(|e| (2, e))?;
    agent::run(settings, pod_identity_agent::signal::shutdown())
        .await
        .map_err(|e| match e {
            agent::Stopped::Start(why) => (2, why),
            lost @ agent::Stopped::HandedOverAndLost => (1, lost.to_string()),
        })
}

async fn init(args: InitArgs) -> Ended {
    use pod_identity_agent::netlink::{self, InitSettings, Ipv6State};
    logging::init(&args.log, LogFormat::Json);
    let settings = InitSettings {
        link_name: args.link_name.clone(),
        ipv4: args.ipv4,
        ipv6: (!args.no_ipv6).then_some(args.ipv6),
        link_kind: args.link_kind.clone(),
    };
    let report = netlink::init(&settings)
        .await
        .map_err(|e| (2, e.to_string()))?;
    match &report.ipv6 {
        Ipv6State::Configured => {}
        Ipv6State::Disabled => tracing::info!("IPv6 not requested"),
        Ipv6State::Skipped(why) => {
            tracing::warn!(address = %args.ipv6, reason = %why, "IPv6 unavailable on this node; IPv4 is set up")
        }
    }
    tracing::info!(link = %args.link_name, index = report.link_index, kind = %report.link_kind,
        created = report.created, ipv4 = %args.ipv4, ipv6 = ?report.ipv6, "link ready");
    Ok(())
}
