//! The composition root of the `server` command: everything the agent runs is started, owned
//! and stopped here.
//!
//! Contract: [`run`] builds the SDK configuration (the node's credentials and region), then, if a
//! predecessor runs here, takes over its sockets, keys and cache ([`crate::handover`]) or else
//! binds fresh; it serves ([`crate::server`]), offers its own sockets and cache to a successor,
//! and runs until `shutdown` resolves. Then it waits up to `--handover-wait` for a successor if
//! none took over yet, stops the handover listener (its thread joined), and shuts the server down
//! within its grace period. It returns [`Stopped::Start`] if it could not start (exit 2), and
//! [`Stopped::HandedOverAndLost`] if a successor failed after this agent retired (exit 1: this
//! agent no longer serves, and the kubelet should start one that binds fresh).
//!
//! Once it serves (sockets bound or taken over, the handover finished), it starts the removal
//! of the node's startup taint ([`crate::kube::taint`], `--node-startup-taint`), which waits for
//! readiness and the verification keys by itself; shutdown stops that task within a bound.

use crate::eks_auth::{EksAuthClient, ExchangeSettings};
use crate::kube::taint::{Serving, StartupTaint, TaintSettings};
use crate::metrics::Metrics;
use crate::server::{Preload, RunningServer, Server, ServerSettings};
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
    #[error("a new agent failed after this one retired; this one no longer serves")]
    HandedOverAndLost,
}

/// The node's credentials and region, as the EKS Auth client signs with them.
async fn sdk_config(settings: &AgentSettings) -> Result<aws_config::SdkConfig, Stopped> {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
    if settings.rotate_credentials {
        // Hybrid nodes: the node's keys are rewritten in the shared credentials file; ask the
        // file on every exchange instead of caching what it said.
        let file = crate::node_credentials::SharedFileCredentials::from_env();
        tracing::info!(file = %file.path().display(), "--rotate-credentials: node credentials re-read from the shared credentials file");
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
            tracing::warn!(dir = %dir.display(), error = %e, "cannot use the state directory; nothing is kept across restarts");
        }
    }
    let sdk = sdk_config(&settings).await?;
    let source = Arc::new(EksAuthClient::new(&sdk, &settings.exchange));
    let metrics = Arc::new(
        Metrics::new().map_err(|e| Stopped::Start(format!("cannot register metrics: {e}")))?,
    );
    tokio::pin!(shutdown);
    let started = tokio::select! {
        r = start(&settings, source, metrics.clone()) => r?,
        _ = &mut shutdown => return Ok(()),
    };
    let (running, mut handover) = started;
    tracing::info!(cluster = %settings.exchange.cluster_name, version = env!("CARGO_PKG_VERSION"), "ready");
    // The server's Kubernetes client: the agent has one (without one, the CLI or the server
    // said why the taint stays).
    let taint = settings
        .startup_taint
        .as_ref()
        .zip(running.kube.clone())
        .map(|(t, kube)| {
            let serving = Serving {
                probe: running.probe_addr,
                credentials: running.credential_addrs.clone(),
                verifier: running.verifier.clone(),
            };
            StartupTaint::spawn(t, serving, Some(metrics.startup_taint.clone()), kube)
        });
    let lost = tokio::select! {
        _ = &mut shutdown => false,
        _ = handover.failed() => true,
    };
    if let Some(taint) = taint {
        taint.stop().await;
    }
    if lost {
        handover.stop().await;
        running.shutdown().await;
        return Err(Stopped::HandedOverAndLost);
    }
    if handover.wait_for_successor().await {
        tracing::info!("stopping after handing over");
    } else {
        tracing::info!("shutting down: no new connections, finishing requests in flight");
    }
    handover.stop().await;
    running.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

/// Take over from a predecessor or bind fresh, serve, and offer this agent to a successor.
async fn start(
    settings: &AgentSettings,
    source: Arc<EksAuthClient>,
    metrics: Arc<Metrics>,
) -> Result<(RunningServer, Handover), Stopped> {
    let server = &settings.server;
    let start = |e: crate::server::listener::BindError| Stopped::Start(e.to_string());
    #[cfg(target_os = "linux")]
    if let Some(h) = &settings.handover {
        use crate::handover::{take_over, Takeover};
        let mut preload = Preload::default();
        let offered = match take_over(h, &metrics).await {
            Takeover::Alone => None,
            Takeover::Offered(mut o) => {
                tracing::info!(
                    listeners = o.listeners.len(),
                    keys = o.keys.is_some(),
                    "a running agent offers its sockets"
                );
                preload.sockets.inherited = std::mem::take(&mut o.listeners);
                preload.keys = o.keys.take();
                Some(o)
            }
            Takeover::Failed(e) => {
                tracing::warn!(error = %e, "the running agent did not hand over; binding fresh once it lets go of its addresses");
                preload.sockets.wait_for_ports = true;
                None
            }
        };
        let prepared = Server::prepare(server, source, metrics.clone(), preload)
            .await
            .map_err(start)?;
        let taking = match offered {
            Some(o) => match o.take(&prepared.cache, h).await {
                Ok(t) => Some(t),
                Err(e) => {
                    // The sockets are ours: serve with what arrived; the rest is exchanged again.
                    tracing::warn!(error = %e, "the running agent's cache did not all arrive");
                    None
                }
            },
            None => None,
        };
        let running = prepared.serve();
        if let Some(t) = taking {
            // Failures past this point cost exchanges, not availability; finish logs them.
            let _ = t.finish(&running.cache, &metrics, h).await;
        }
        let handover = Handover::offer(h, &running, metrics);
        return Ok((running, handover));
    }
    let running = Server::start(server, source, metrics)
        .await
        .map_err(start)?;
    Ok((running, Handover::Off))
}

/// This agent's side as a predecessor, when handover is on.
enum Handover {
    Off,
    #[cfg(target_os = "linux")]
    On(crate::handover::Predecessor, std::time::Duration),
}

impl Handover {
    #[cfg(target_os = "linux")]
    fn offer(
        settings: &crate::handover::HandoverSettings,
        running: &RunningServer,
        metrics: Arc<Metrics>,
    ) -> Handover {
        let offer = crate::handover::Offer {
            cache: running.cache.clone(),
            listeners: running.sockets.clone(),
            verifier: running.verifier.clone(),
            retire: Arc::new(running.retirer()),
        };
        match crate::handover::Predecessor::listen(settings, offer, metrics) {
            Ok(p) => Handover::On(p, settings.wait),
            Err(e) => {
                tracing::warn!(error = %e, "handover unavailable: the next agent will bind fresh after this one stops");
                Handover::Off
            }
        }
    }

    async fn failed(&self) {
        match self {
            #[cfg(target_os = "linux")]
            Handover::On(p, _) => p.failed().await,
            Handover::Off => std::future::pending().await,
        }
    }

    async fn wait_for_successor(&mut self) -> bool {
        match self {
            #[cfg(target_os = "linux")]
            Handover::On(p, wait) => p.wait_for_successor(*wait).await,
            Handover::Off => false,
        }
    }

    async fn stop(self) {
        match self {
            #[cfg(target_os = "linux")]
            Handover::On(p, _) => p.stop().await,
            Handover::Off => {}
        }
    }
}
