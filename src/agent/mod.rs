//! The composition root of the `server` command: everything the agent runs is started, owned
//! and stopped here.
//!
//! Contract: [`run`] builds the SDK configuration (the node's credentials and region), then, if a
//! predecessor runs here, takes over its sockets, keys and cache ([`crate::handover`]) or else
//! binds fresh (waiting while something holds its ports, at most
//! [`crate::server::bind::port_wait`]); it serves ([`crate::server`]), offers
//! its own sockets and cache to a successor, and runs until `shutdown` resolves. If it retired
//! for a successor that then failed or went, it serves again on the sockets it still holds, with
//! its cache, and offers itself anew. At `shutdown` it first lets go of its link to its own
//! predecessor (which serves again at once if it is still there), waits up to `--handover-wait`
//! for a successor if none took over yet, stops the handover listener (its threads joined), and
//! shuts the server down within its grace period. It returns [`Stopped::Start`] if it could not
//! start (exit 2), and [`Stopped::HandedOverAndLost`] if it could not serve again after its
//! successor failed (exit 1, so that the kubelet starts one that binds fresh).
//!
//! Once it serves (sockets bound or taken over, the handover finished), it starts the removal
//! of the node's startup taint ([`crate::kube::taint`], `--node-startup-taint`), which waits for
//! readiness and the verification keys by itself; it runs across a return to serving after a
//! failed successor, and shutdown stops it within a bound.
//!
//! The rooms: `start` (take over or bind fresh), `offer` (this agent as a predecessor).

mod offer;
mod start;

use crate::eks_auth::{EksAuthClient, ExchangeSettings};
use crate::kube::taint::{Serving, StartupTaint, TaintSettings};
use crate::metrics::Metrics;
use crate::server::{RunningServer, ServerSettings};
use offer::Handover;
use start::start;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

/// Everything `server` runs with, parsed and typed.
#[derive(Debug, Clone)]
pub struct AgentSettings {
    pub server: ServerSettings,
    pub exchange: ExchangeSettings,
    /// `None`: handover off.
    #[cfg(target_os = "linux")]
    pub handover: Option<crate::handover::HandoverSettings>,
    /// `None`: nothing kept across restarts.
    pub state_dir: Option<PathBuf>,
    /// `--region`, else the SDK's chain.
    pub region: Option<String>,
    /// `--rotate-credentials`: the node's keys re-read from the shared credentials file.
    pub rotate_credentials: bool,
    /// `--node-startup-taint`: removed from the node once this agent serves; `None`: off.
    pub startup_taint: Option<TaintSettings>,
}

/// Why [`run`] returned early.
#[derive(Debug, thiserror::Error)]
pub enum Stopped {
    #[error("{0}")]
    Start(String),
    #[error("a new agent failed after this one retired, and this one cannot serve again")]
    HandedOverAndLost,
}

/// The node's credentials and region, as the EKS Auth client signs with them.
async fn sdk_config(settings: &AgentSettings) -> Result<aws_config::SdkConfig, Stopped> {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
    if settings.rotate_credentials {
        // Hybrid nodes: the node's keys are rewritten in the shared credentials file; ask the
        // file on every exchange instead of caching what it said.
        let file = crate::node_credentials::SharedFileCredentials::from_env();
        tracing::info!(file = %file.path().display(),
            "--rotate-credentials: node credentials re-read from the shared credentials file");
        loader = loader
            .credentials_provider(file)
            .identity_cache(aws_config::identity::IdentityCache::no_cache());
    }
    if let Some(region) = &settings.region {
        loader = loader.region(aws_config::Region::new(region.clone()));
    }
    let sdk = loader.load().await;
    if sdk.region().is_none() {
        return Err(Stopped::Start(
            "no AWS region: set AWS_REGION (the DaemonSet does) or pass --region".into(),
        ));
    }
    Ok(sdk)
}

/// Run the agent until `shutdown` resolves (see the module contract).
pub async fn run(
    settings: AgentSettings,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Stopped> {
    if let Some(dir) = &settings.state_dir {
        if let Err(e) = crate::files::private_dir(dir) {
            tracing::warn!(dir = %dir.display(), error = %e,
                "cannot use the state directory; nothing is kept across restarts");
        }
    }
    let sdk = sdk_config(&settings).await?;
    let source = Arc::new(EksAuthClient::new(&sdk, &settings.exchange));
    let metrics = Arc::new(
        Metrics::new().map_err(|e| Stopped::Start(format!("cannot register metrics: {e}")))?,
    );
    tokio::pin!(shutdown);
    let started = tokio::select! {
        r = start(&settings, source.clone(), metrics.clone()) => r?,
        _ = &mut shutdown => return Ok(()),
    };
    let (mut running, mut handover, link) = started;
    tracing::info!(cluster = %settings.exchange.cluster_name,
        version = env!("CARGO_PKG_VERSION"), "ready");
    let taint = startup_taint(&settings, &running, &metrics);
    let mut retired = Vec::new();
    loop {
        let lost = tokio::select! {
            _ = &mut shutdown => false,
            _ = handover.lost() => true,
        };
        if !lost {
            break;
        }
        match serve_again(&settings, running, handover, &source, &metrics).await {
            Some((again, offered, old)) => {
                (running, handover) = (again, offered);
                // An agent whose successors keep failing serves again many times: keep only
                // the old servers' shutdowns still running.
                retired.retain(|h: &tokio::task::JoinHandle<()>| !h.is_finished());
                retired.push(old);
            }
            None => {
                if let Some(taint) = taint {
                    taint.stop().await;
                }
                return Err(Stopped::HandedOverAndLost);
            }
        }
    }
    if let Some(taint) = taint {
        taint.stop().await;
    }
    // A predecessor still there serves again at once, while this agent drains.
    drop(link);
    if handover.wait_for_successor().await {
        tracing::info!("stopping after handing over");
    } else {
        tracing::info!("shutting down: no new connections, finishing requests in flight");
    }
    handover.stop().await;
    running.shutdown().await;
    for old in retired {
        let _ = old.await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// The removal of the node's startup taint, when asked for and the agent has its Kubernetes
/// client (without one, the CLI or the server said why the taint stays). The client and the
/// verifier are the agent's (a server that serves again keeps them), and so are the addresses:
/// the same sockets.
fn startup_taint(
    settings: &AgentSettings,
    running: &RunningServer,
    metrics: &Metrics,
) -> Option<StartupTaint> {
    let (t, kube) = settings.startup_taint.as_ref().zip(running.kube.clone())?;
    let serving = Serving {
        probe: running.probe_addr,
        credentials: running.credential_addrs.clone(),
        verifier: running.verifier.clone(),
    };
    Some(StartupTaint::spawn(
        t,
        serving,
        Some(metrics.startup_taint.clone()),
        kube,
    ))
}

/// The successor this agent retired for failed or went, so nobody else may be accepting: serve
/// again on the sockets this agent holds and offer it anew on the handover socket, kept open
/// and named meanwhile. The new server, its offer, and the old server's shutdown; `None` if it
/// cannot serve again.
async fn serve_again(
    settings: &AgentSettings,
    running: RunningServer,
    handover: Handover,
    source: &Arc<EksAuthClient>,
    metrics: &Arc<Metrics>,
) -> Option<(RunningServer, Handover, tokio::task::JoinHandle<()>)> {
    let named = handover.stop_keeping_socket().await;
    let resumed = running
        .resume(&settings.server, source.clone(), metrics.clone())
        .await;
    match resumed {
        Ok((again, old)) => {
            let handover = Handover::offer(settings, &again, metrics.clone(), named);
            Some((again, handover, old))
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot serve again on the sockets this agent holds; \
                exiting so that an agent binds fresh");
            None
        }
    }
}
