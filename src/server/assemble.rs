//! Binding and building a server, accepting nothing yet.
//!
//! Contract: [`Server::prepare`] binds every listener (on the sockets a predecessor handed over
//! where it has them, see [`Preload`]), keeps an owned duplicate of each for a handover, and
//! builds the parts a request crosses: the Kubernetes client and the verifier (or keeps a
//! resumed server's), the Events task, admission, the cache and the handler. Nothing is
//! accepted until [`Prepared::serve`], so a handover can fill the cache first. A Kubernetes
//! client or a verifier that cannot be built is logged and left off: pods are still served.

use super::bind::{self, BindError, Bound, Role, Sockets};
use super::handler::{self, CredentialHandler};
use super::limits::ConnectionLimits;
use super::listener::Connections;
use super::{Server, ServerSettings};
use crate::admission::Admission;
use crate::cache::CredentialCache;
use crate::client::Clients;
use crate::eks_auth::CredentialSource;
use crate::kube::events::Events;
use crate::kube::KubeClient;
use crate::metrics::Metrics;
use crate::request::AllowedHosts;
use crate::verify::keys::Stored;
use crate::verify::Verifier;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// What a predecessor handed over before this server binds: its listening sockets (or, with
/// none, whether to wait for its ports) and its verification keys. Its cache entries follow
/// into [`Prepared::cache`], before [`Prepared::serve`].
#[derive(Default)]
pub struct Preload {
    pub sockets: Sockets,
    pub keys: Option<Stored>,
    /// A server that serves again: the agent's Kubernetes client and verifier, kept instead of
    /// built again (`keys` is then unused).
    pub(super) kept: Option<Kept>,
}

/// What a server that serves again keeps of the one before it: one per agent.
pub(super) struct Kept {
    pub(super) kube: Option<Arc<KubeClient>>,
    pub(super) verifier: Option<Arc<Verifier>>,
}

/// A server bound and built but not accepting yet: its cache can be filled first (a handover),
/// so the first request it accepts finds the predecessor's entries.
pub struct Prepared {
    pub cache: CredentialCache,
    pub verifier: Option<Arc<Verifier>>,
    /// The agent's one Kubernetes API client, when configured and buildable.
    pub kube: Option<Arc<KubeClient>>,
    /// Where credentials will be served; the actual ports when 0 was asked for.
    pub credential_addrs: Vec<SocketAddr>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) creds: Vec<Bound>,
    pub(super) probe: Option<Bound>,
    pub(super) metrics_listener: Option<Bound>,
    pub(super) skipped: Vec<SocketAddr>,
    pub(super) handler: Arc<CredentialHandler>,
    pub(super) clients: Arc<Clients>,
    pub(super) limits: ConnectionLimits,
    pub(super) stop: CancellationToken,
    pub(super) connections: Connections,
    pub(super) shutdown_grace: Duration,
    pub(super) held: Vec<(Role, SocketAddr, OwnedFd)>,
}

impl Server {
    /// Bind (on the sockets in `preload` where it has them) and build everything, but accept
    /// nothing yet: see [`Prepared`].
    pub async fn prepare(
        settings: &ServerSettings,
        source: Arc<dyn CredentialSource>,
        metrics: Arc<Metrics>,
        preload: Preload,
    ) -> Result<Prepared, BindError> {
        let Preload {
            mut sockets,
            keys,
            kept,
        } = preload;
        let (creds, skipped) =
            bind::bind_credential_listeners(&settings.bind_hosts, settings.port, &mut sockets)
                .await?;
        let probe = match settings.probe_addr {
            Some(a) => Some(sockets.bind(Role::Probe, a).await?),
            None => None,
        };
        let metrics_listener = match settings.metrics_addr {
            Some(a) => Some(sockets.bind(Role::Metrics, a).await?),
            None => None,
        };
        let held = hold(
            &creds,
            [(Role::Probe, &probe), (Role::Metrics, &metrics_listener)],
        )?;
        let stop = CancellationToken::new();
        let connections = Connections::default();
        let tasks = connections.tracker();
        let (kube, verifier) = match kept {
            Some(Kept { kube, verifier }) => {
                if let Some(v) = &verifier {
                    v.start(tasks, &stop);
                }
                (kube, verifier)
            }
            None => {
                let kube = kube_client(settings, &metrics);
                let v = start_verifier(settings, &metrics, kube.as_ref(), keys, tasks, &stop);
                (kube, v)
            }
        };
        let events = match (&settings.events, &kube) {
            (Some(e), Some(client)) => Some(Events::start(
                e,
                client.clone(),
                verifier.clone(),
                Some(metrics.events.clone()),
                tasks,
                stop.clone(),
            )),
            _ => None,
        };
        let bound_ips: Vec<IpAddr> = creds.iter().map(|b| b.addr.ip()).collect();
        let clients = Arc::new(Clients::new(&bound_ips, settings.client_ipv6_prefix));
        let handler = build_handler(
            settings, source, &metrics, &clients, &bound_ips, &verifier, events,
        );
        Ok(Prepared {
            cache: handler.cache.clone(),
            verifier,
            kube,
            credential_addrs: creds.iter().map(|b| b.addr).collect(),
            metrics,
            creds,
            probe,
            metrics_listener,
            skipped: skipped.into_iter().map(|(a, _)| a).collect(),
            handler,
            clients,
            limits: settings.connections,
            stop,
            connections,
            shutdown_grace: settings.shutdown_grace,
            held,
        })
    }
}

/// Admission, the cache and the handler a credential request goes through.
fn build_handler(
    settings: &ServerSettings,
    source: Arc<dyn CredentialSource>,
    metrics: &Arc<Metrics>,
    clients: &Arc<Clients>,
    bound_ips: &[IpAddr],
    verifier: &Option<Arc<Verifier>>,
    events: Option<Events>,
) -> Arc<CredentialHandler> {
    let admission = Arc::new(Admission::new(
        settings.admission,
        clients.clone(),
        verifier.clone(),
        settings.node_name.clone(),
    ));
    let cache = CredentialCache::new(
        source,
        admission.clone(),
        &settings.cache,
        settings.leeway,
        metrics.clone(),
    );
    if let Some(events) = &events {
        let events = events.clone();
        cache.on_node_refused(Arc::new(move |e| events.node_refused(e)));
    }
    Arc::new(CredentialHandler {
        cache,
        hosts: AllowedHosts::new(bound_ips),
        leeway: settings.leeway,
        admission,
        metrics: metrics.clone(),
        refusal_lines: crate::audit::Pacer::default(),
        delivery_lines: crate::audit::Pacer::default(),
        deliveries: handler::deliveries(),
        events,
    })
}

/// The agent's one Kubernetes API client, if the API server is configured; one that cannot be
/// built (a CA that cannot be read) is logged, and what needs it is off: pods are still served.
fn kube_client(settings: &ServerSettings, metrics: &Metrics) -> Option<Arc<KubeClient>> {
    let k = settings.kube.as_ref()?;
    match KubeClient::new(k.clone(), Some(metrics.kube_requests.clone())) {
        Ok(client) => Some(Arc::new(client)),
        Err(e) => {
            tracing::error!(error = %e, "cannot reach the Kubernetes API server: \
                api-server token verification, Events and the startup taint are off");
            None
        }
    }
}

/// Local verification, when configured and buildable; its fetches run on the server's tracker.
fn start_verifier(
    settings: &ServerSettings,
    metrics: &Arc<Metrics>,
    kube: Option<&Arc<KubeClient>>,
    keys: Option<Stored>,
    tasks: &TaskTracker,
    stop: &CancellationToken,
) -> Option<Arc<Verifier>> {
    let v = settings.verification.as_ref()?;
    // A source that cannot even be built (no service-account token or CA mounted) is the
    // operator's to fix, loudly; pods are served meanwhile, as without verification.
    let source = match v.keys.source(kube) {
        Ok(source) => source,
        Err(e) => {
            tracing::error!(error = %e, "token verification is configured but cannot run; \
                tokens go to EKS Auth unverified");
            return None;
        }
    };
    tracing::info!(source = %source.describe(), "tokens are verified locally before any exchange");
    let counted = (metrics.verifications.clone(), metrics.key_fetches.clone());
    let verifier = Verifier::new(source, v.verify.clone(), keys, Some(counted));
    verifier.start(tasks, stop);
    Some(verifier)
}

/// An owned duplicate of every listening socket, for a handover.
fn hold(
    creds: &[Bound],
    admin: [(Role, &Option<Bound>); 2],
) -> Result<Vec<(Role, SocketAddr, OwnedFd)>, BindError> {
    let dup = |b: &Bound| {
        b.listener
            .as_fd()
            .try_clone_to_owned()
            .map_err(|source| BindError::Bind {
                addr: b.addr,
                source,
            })
    };
    let mut held = Vec::new();
    for b in creds {
        held.push((Role::Credentials, b.addr, dup(b)?));
    }
    for (role, b) in admin {
        if let Some(b) = b {
            held.push((role, b.addr, dup(b)?));
        }
    }
    Ok(held)
}
