//! The composition root of the `server` command: everything the agent runs is started, owned
//! and stopped here.
//!
//! Contract: [`run`] builds the SDK configuration (the node's credentials and region), then, if a
//! predecessor runs here, takes over its sockets, keys and cache ([`crate::handover`]) or else
//! binds fresh (waiting while something holds its ports); it serves ([`crate::server`]), offers
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
        r = start(&settings, source.clone(), metrics.clone()) => r?,
        _ = &mut shutdown => return Ok(()),
    };
    let (mut running, mut handover, link) = started;
    tracing::info!(cluster = %settings.exchange.cluster_name, version = env!("CARGO_PKG_VERSION"), "ready");
    // The server's Kubernetes client: the agent has one (without one, the CLI or the server
    // said why the taint stays). Its addresses stay this agent's if it serves again after a
    // failed successor: the same sockets.
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
    let mut retired = Vec::new();
    loop {
        let lost = tokio::select! {
            _ = &mut shutdown => false,
            _ = handover.lost() => true,
        };
        if !lost {
            break;
        }
        // The successor this agent retired for failed or went: nobody else may be accepting.
        // The handover socket stays open and named, for the offer below.
        let named = handover.stop_keeping_socket().await;
        let resumed = running
            .resume(&settings.server, source.clone(), metrics.clone())
            .await;
        let (again, old) = match resumed {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "cannot serve again on the sockets this agent holds; exiting so that an agent binds fresh");
                if let Some(taint) = taint {
                    taint.stop().await;
                }
                return Err(Stopped::HandedOverAndLost);
            }
        };
        running = again;
        retired.push(old);
        handover = Handover::offer(&settings, &running, metrics.clone(), named);
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

/// The connection to the agent this one took over from, kept while this one runs.
#[cfg(target_os = "linux")]
type Link = Option<crate::handover::Link>;
#[cfg(not(target_os = "linux"))]
type Link = ();

/// Take over from a predecessor or bind fresh, serve, and offer this agent to a successor.
async fn start(
    settings: &AgentSettings,
    source: Arc<EksAuthClient>,
    metrics: Arc<Metrics>,
) -> Result<(RunningServer, Handover, Link), Stopped> {
    let server = &settings.server;
    let start = |e: crate::server::listener::BindError| Stopped::Start(e.to_string());
    #[cfg(target_os = "linux")]
    if let Some(h) = &settings.handover {
        let mut preload = Preload::default();
        let offered = match offered(h, &metrics).await {
            Some(mut o) => {
                preload.sockets.inherited = std::mem::take(&mut o.listeners);
                preload.keys = o.keys.take();
                Some(o)
            }
            None => None,
        };
        // Whatever was not handed over is bound fresh, retrying while it is held.
        preload.sockets.wait_for_ports = true;
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
        let mut link = None;
        if let Some(t) = taking {
            // Failures past this point cost exchanges, not availability; finish logs them.
            if let Ok((_, l)) = t.finish(&running.cache, &metrics, h).await {
                link = Some(l);
            }
        }
        let handover = Handover::offer(settings, &running, metrics, None);
        return Ok((running, handover, link));
    }
    let running = Server::start(server, source, metrics)
        .await
        .map_err(start)?;
    #[cfg(target_os = "linux")]
    return Ok((running, Handover::Off, None));
    #[cfg(not(target_os = "linux"))]
    Ok((running, Handover::Off, ()))
}

/// A predecessor's offer, if one runs here and offers sockets this agent can take over; what
/// else was found is logged.
#[cfg(target_os = "linux")]
async fn offered(
    h: &crate::handover::HandoverSettings,
    metrics: &Metrics,
) -> Option<crate::handover::Offered> {
    use crate::handover::{take_over, Takeover};
    let o = match take_over(h, metrics).await {
        Takeover::Offered(o) => o,
        Takeover::Alone(why) => {
            tracing::info!(
                reason = why,
                "no running agent to take over from; binding fresh"
            );
            return None;
        }
        Takeover::Older => {
            tracing::warn!("an older agent (handover protocol 1) holds the addresses and is never handed anything: binding them once it lets go; its cache is not carried over");
            return None;
        }
        Takeover::Failed(e) => {
            tracing::warn!(error = %e, "the running agent did not hand over; binding fresh once it lets go of its addresses");
            return None;
        }
    };
    for why in &o.dropped {
        tracing::warn!(socket = %why, "not taking over a socket of the running agent; binding this agent's own address instead");
    }
    // What this agent serves and was not handed over is bound now, beside the predecessor. If
    // something holds such an address (an old address of the predecessor's that overlaps), it
    // would be free only once the predecessor stops, which it does only after this agent took
    // over: decline, and wait for the ports instead.
    let missing = uncovered(&h.expected, &o.listeners);
    for addr in missing.iter().map(|(_, a)| *a) {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                let reason = format!("{addr}, which this agent serves, is held by another socket");
                tracing::warn!(reason, "not taking over from the running agent; binding fresh once it lets go of its addresses");
                o.refuse(reason).await;
                return None;
            }
            // Not this agent's to decide here: the server's own bind says (an IPv6 address
            // on a node without IPv6 is skipped there).
            Err(_) => {}
        }
    }
    tracing::info!(
        listeners = o.listeners.len(),
        keys = o.keys.is_some(),
        "a running agent offers its sockets"
    );
    Some(o)
}

/// The addresses this agent serves that no handed-over socket covers (port 0: any port).
#[cfg(target_os = "linux")]
fn uncovered(
    expected: &crate::handover::Expected,
    have: &[(
        crate::server::listener::Role,
        std::net::SocketAddr,
        std::net::TcpListener,
    )],
) -> Vec<(crate::server::listener::Role, std::net::SocketAddr)> {
    use crate::server::listener::Role;
    let wanted = expected
        .credentials
        .iter()
        .map(|a| (Role::Credentials, *a))
        .chain(expected.probe.map(|a| (Role::Probe, a)))
        .chain(expected.metrics.map(|a| (Role::Metrics, a)));
    wanted
        .filter(|(role, want)| {
            !have.iter().any(|(r, a, _)| {
                r == role && a.ip() == want.ip() && (want.port() == 0 || a.port() == want.port())
            })
        })
        .collect()
}

/// The socket an agent that serves again offers itself on (see [`Handover::stop_keeping_socket`]).
#[cfg(target_os = "linux")]
type Named = Option<crate::handover::rendezvous::Published>;
#[cfg(not(target_os = "linux"))]
type Named = ();

/// This agent's side as a predecessor, when handover is on.
enum Handover {
    Off,
    #[cfg(target_os = "linux")]
    On(crate::handover::Predecessor, std::time::Duration),
}

impl Handover {
    /// Offer this agent to a successor, when handover is on (on `named`, if given).
    fn offer(
        settings: &AgentSettings,
        running: &RunningServer,
        metrics: Arc<Metrics>,
        named: Named,
    ) -> Handover {
        #[cfg(target_os = "linux")]
        if let Some(h) = &settings.handover {
            let offer = crate::handover::Offer {
                cache: running.cache.clone(),
                listeners: running.sockets.clone(),
                verifier: running.verifier.clone(),
                retire: Arc::new(running.retirer()),
            };
            return match crate::handover::Predecessor::listen(h, offer, metrics, named) {
                Ok(p) => Handover::On(p, h.wait),
                Err(e) => {
                    tracing::warn!(error = %e, "handover unavailable: the next agent will bind fresh after this one stops");
                    Handover::Off
                }
            };
        }
        let _ = (settings, running, metrics, named);
        Handover::Off
    }

    /// Stop, keeping the handover socket open and named for the next [`Handover::offer`] of an
    /// agent that serves again.
    async fn stop_keeping_socket(self) -> Named {
        match self {
            #[cfg(target_os = "linux")]
            Handover::On(p, _) => p.stop_keeping_socket().await,
            #[cfg(target_os = "linux")]
            Handover::Off => None,
            #[cfg(not(target_os = "linux"))]
            Handover::Off => (),
        }
    }

    async fn lost(&self) {
        match self {
            #[cfg(target_os = "linux")]
            Handover::On(p, _) => p.lost().await,
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
