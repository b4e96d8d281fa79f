//! The `pod-identity-agent` binary: parse the command line, set up logging, run the command.
//! Any failure to start is one line on stderr and exit code 2, never a panic.

use clap::Parser;
use pod_identity_agent::cli::{Cli, Command, InitArgs, ServerArgs};
use pod_identity_agent::eks_auth::EksAuthClient;
use pod_identity_agent::handover::{self, Takeover};
use pod_identity_agent::logging;
use pod_identity_agent::metrics::Metrics;
use pod_identity_agent::server::listener::Sockets;
use pod_identity_agent::server::Server;
use std::process::ExitCode;
use std::sync::Arc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Version => {
            println!("pod-identity-agent {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::Server(args) => run(|| server(args)),
        Command::Init(args) => run(|| init(args)),
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
        Command::Dev(args) => run(|| pod_identity_agent::dev::run_dev(args)),
        Command::EmulateEksAuth(args) => run(|| pod_identity_agent::dev::run_emulate(args)),
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

fn run<F, Fut>(f: F) -> ExitCode
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
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
    match runtime.block_on(f()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            eprintln!("pod-identity-agent: {e}");
            ExitCode::from(2)
        }
    }
}

async fn server(args: ServerArgs) -> Result<(), String> {
    logging::init(&args.log, pod_identity_agent::cli::LogFormat::Json);
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
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
    if args.rotate_credentials {
        // Hybrid nodes: the node's keys are rewritten in the shared credentials file; ask the
        // file on every exchange instead of caching what it said.
        let file = pod_identity_agent::node_credentials::SharedFileCredentials::from_env();
        tracing::info!(file = %file.path().display(), "--rotate-credentials: node credentials re-read from the shared credentials file");
        loader = loader
            .credentials_provider(file)
            .identity_cache(aws_config::identity::IdentityCache::no_cache());
    }
    if let Some(region) = &args.region {
        loader = loader.region(aws_config::Region::new(region.clone()));
    }
    let sdk = loader.load().await;
    if sdk.region().is_none() {
        return Err("no AWS region: set AWS_REGION (the DaemonSet does) or pass --region".into());
    }
    let source = Arc::new(EksAuthClient::new(&sdk, &args.exchange_settings()));
    let metrics = Arc::new(Metrics::new().map_err(|e| format!("cannot register metrics: {e}"))?);
    let settings = args.server_settings();
    let handover = args.handover_settings();

    // A running agent here hands over its sockets and cache; else bind as on a first start.
    let mut sockets = Sockets::default();
    let mut entries = Vec::new();
    let mut successor = None;
    if let Some(h) = &handover {
        match handover::take_over(h, &metrics).await {
            Takeover::Alone => {}
            Takeover::Inherited(mut s) => {
                tracing::info!(
                    entries = s.entries.len(),
                    listeners = s.listeners.len(),
                    "a running agent handed over its sockets and cache"
                );
                sockets.inherited = std::mem::take(&mut s.listeners);
                entries = std::mem::take(&mut s.entries);
                successor = Some(s);
            }
            Takeover::Failed(e) => {
                tracing::warn!(error = %e, "the running agent did not hand over; binding fresh once it lets go of its addresses");
                sockets.wait_for_ports = true;
            }
        }
    }
    let start = Server::start_with(&settings, source, metrics.clone(), sockets, entries);
    let running = tokio::select! {
        r = start => r.map_err(|e| e.to_string())?,
        _ = pod_identity_agent::signal::shutdown() => return Ok(()),
    };
    if let (Some(s), Some(h)) = (successor, &handover) {
        // Failures past this point cost exchanges, not availability; finish logs them.
        let _ = s
            .finish(running.preloaded, &running.cache, &metrics, h)
            .await;
    }
    let mut predecessor = match &handover {
        Some(h) => {
            let offer = handover::Offer {
                cache: running.cache.clone(),
                listeners: running.sockets.clone(),
                retire: Arc::new(running.retirer()),
            };
            match handover::Predecessor::listen(h, offer, metrics.clone()) {
                Ok(p) => Some(p),
                Err(e) => {
                    tracing::warn!(error = %e, "handover unavailable: the next agent will bind fresh after this one stops");
                    None
                }
            }
        }
        None => None,
    };
    tracing::info!(cluster = %args.cluster_name, version = env!("CARGO_PKG_VERSION"), "ready");
    pod_identity_agent::signal::shutdown().await;
    if let (Some(p), Some(h)) = (predecessor.as_mut(), &handover) {
        if p.wait_for_successor(h.wait).await {
            tracing::info!("stopping after handing over");
            running.shutdown().await;
            return Ok(());
        }
    }
    tracing::info!("shutting down: no new connections, finishing requests in flight");
    running.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

async fn init(args: InitArgs) -> Result<(), String> {
    use pod_identity_agent::netlink::{self, InitSettings, Ipv6State};
    logging::init(&args.log, pod_identity_agent::cli::LogFormat::Json);
    let settings = InitSettings {
        link_name: args.link_name.clone(),
        ipv4: args.ipv4,
        ipv6: (!args.no_ipv6).then_some(args.ipv6),
        link_kind: args.link_kind.clone(),
    };
    let report = netlink::init(&settings).await.map_err(|e| e.to_string())?;
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
