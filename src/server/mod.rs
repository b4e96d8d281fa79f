//! The `server` command: credential listeners, the probe and metrics listeners, shutdown.
//!
//! Contract: [`Server::start`] binds everything it was asked to (see [`listener`] for what a
//! bind failure means), starts serving, and returns the addresses actually bound, so callers
//! (the binary, tests, benchmarks) can use port 0. Everything it starts (listeners, their
//! connections, the cache's scheduler and exchanges, the verifier's fetches, the Events task, the memory task,
//! the re-reading of the node's addresses) is owned by the returned [`RunningServer`]. It builds
//! the agent's one Kubernetes API client ([`crate::kube`]) when `kube` is set: key fetches and
//! Events use it, and [`RunningServer::kube`] hands it to the startup taint, so the agent has
//! one connection pool, one token cache and one "refuses the agent" warning.
//! [`RunningServer::shutdown`] stops accepting on every listener at once, stops refreshing and
//! fetching keys, and lets in-flight requests and exchanges finish within the grace period.
//! Past it, it ends the exchanges still running (the requests waiting on them answer
//! `503 ShuttingDown`), then closes the connections still open. It returns when every task it
//! started has ended.

pub mod admin;
pub mod handler;
pub mod limits;
pub mod listener;
mod memory;
pub mod response;

use crate::admission::{Admission, AdmissionSettings};
use crate::cache::{CacheSettings, CredentialCache};
use crate::client::{Clients, NODE_ADDRESSES_EVERY};
use crate::eks_auth::CredentialSource;
use crate::kube::KubeClient;
use crate::metrics::Metrics;
use crate::request::AllowedHosts;
use crate::verify::keys::Stored;
use crate::verify::{VerificationSettings, Verifier};
use admin::{Admin, Port};
use handler::CredentialHandler;
use limits::{ConnectionLimiter, ConnectionLimits, Crowding};
use listener::{BindError, Bound, Connections, Role, Sockets};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Everything the server needs, already parsed and typed.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub bind_hosts: Vec<IpAddr>,
    pub port: u16,
    /// `None` disables the listener (tests that do not need it).
    pub probe_addr: Option<SocketAddr>,
    pub metrics_addr: Option<SocketAddr>,
    pub cache: CacheSettings,
    /// Clock leeway for token `exp`/`nbf`: request validation and the cache both use this one.
    pub leeway: Duration,
    /// How long in-flight requests may take to finish after a shutdown signal.
    pub shutdown_grace: Duration,
    /// Who may start a new exchange (per-client and node budgets).
    pub admission: AdmissionSettings,
    /// Local verification of tokens against the cluster's keys; `None`: off.
    pub verification: Option<VerificationSettings>,
    /// `--node-name`: verified tokens of pods on other nodes are refused.
    pub node_name: Option<String>,
    /// `--client-ipv6-prefix`: IPv6 sources within one such prefix are one client.
    pub client_ipv6_prefix: u8,
    /// Bounds on the credential listeners' connections.
    pub connections: ConnectionLimits,
    /// `--events`: refusals reported as Kubernetes Events; `None`: off.
    pub events: Option<crate::kube::events::EventSettings>,
    /// The API server, when something asks it (api-server key fetches, Events, the startup
    /// taint): the one client the server builds from it serves them all.
    pub kube: Option<crate::kube::KubeSettings>,
}

/// The probes have a pool of their own, so neither a flood on the credential listeners nor a
/// busy scraper starves the kubelet's probes; a full pool closes its oldest idle connection,
/// whoever's (the kubelet is one of the host's processes, all one client), and every probe
/// answer closes its connection, so none can be held open between requests.
const PROBE_CONNECTIONS: ConnectionLimits = ConnectionLimits {
    max_connections: 64,
    max_per_client: 64,
    header_timeout: Duration::from_secs(3),
};
/// The metrics listener's pool (reachable from pods with the metrics overlay): small, and no
/// one client may hold most of it.
const METRICS_CONNECTIONS: ConnectionLimits = ConnectionLimits {
    max_connections: 64,
    max_per_client: 8,
    header_timeout: Duration::from_secs(3),
};

/// What a predecessor handed over before this server binds: its listening sockets (or, with
/// none, whether to wait for its ports) and its verification keys. Its cache entries follow
/// into [`Prepared::cache`], before [`Prepared::serve`].
#[derive(Default)]
pub struct Preload {
    pub sockets: Sockets,
    pub keys: Option<Stored>,
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
    metrics: Arc<Metrics>,
    creds: Vec<Bound>,
    probe: Option<Bound>,
    metrics_listener: Option<Bound>,
    skipped: Vec<SocketAddr>,
    handler: Arc<CredentialHandler>,
    clients: Arc<Clients>,
    limits: ConnectionLimits,
    stop: CancellationToken,
    connections: Connections,
    shutdown_grace: Duration,
    held: Vec<(Role, SocketAddr, OwnedFd)>,
}

/// A started server. Dropping it without [`shutdown`](RunningServer::shutdown) leaves its tasks
/// running on the runtime until the runtime ends.
pub struct RunningServer {
    /// Where credentials are served; the actual ports when 0 was asked for.
    pub credential_addrs: Vec<SocketAddr>,
    /// IPv6 credential addresses that could not be bound (a node without IPv6).
    pub skipped: Vec<SocketAddr>,
    pub probe_addr: Option<SocketAddr>,
    pub metrics_addr: Option<SocketAddr>,
    /// The cache, for tests and for shutdown to stop and drain.
    pub cache: CredentialCache,
    /// The verifier, when verification is on: its keys go to a successor.
    pub verifier: Option<Arc<Verifier>>,
    /// The agent's one Kubernetes API client (key fetches, Events; the startup taint's too).
    pub kube: Option<Arc<KubeClient>>,
    pub metrics: Arc<Metrics>,
    /// Cancelled to stop accepting on every listener (and the background tasks).
    stop: CancellationToken,
    /// The listener tasks, every connection they accepted, and the background tasks.
    connections: Connections,
    shutdown_grace: Duration,
    /// A descriptor of every listening socket, by role, for a handover: owned, so the sockets
    /// stay open for as long as this agent may hand them over, whatever its listeners do.
    pub sockets: Arc<Vec<(Role, SocketAddr, OwnedFd)>>,
}

/// After the grace period, how long requests whose exchange was ended get to send their 503.
const FLUSH: Duration = Duration::from_millis(100);

pub struct Server;

impl Server {
    pub async fn start(
        settings: &ServerSettings,
        source: Arc<dyn CredentialSource>,
        metrics: Arc<Metrics>,
    ) -> Result<RunningServer, BindError> {
        Ok(
            Server::prepare(settings, source, metrics, Preload::default())
                .await?
                .serve(),
        )
    }

    /// Bind (on the sockets in `preload` where it has them) and build everything, but accept
    /// nothing yet: see [`Prepared`].
    pub async fn prepare(
        settings: &ServerSettings,
        source: Arc<dyn CredentialSource>,
        metrics: Arc<Metrics>,
        preload: Preload,
    ) -> Result<Prepared, BindError> {
        let Preload { mut sockets, keys } = preload;
        let (creds, skipped) =
            listener::bind_credential_listeners(&settings.bind_hosts, settings.port, &mut sockets)
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
        let kube = kube_client(settings, &metrics);
        let verifier = start_verifier(settings, &metrics, kube.as_ref(), keys, &connections, &stop);
        let events = match (&settings.events, &kube) {
            (Some(e), Some(client)) => Some(crate::kube::events::Events::start(
                e,
                client.clone(),
                verifier.clone(),
                Some(metrics.events.clone()),
                connections.tracker(),
                stop.clone(),
            )),
            _ => None,
        };
        let bound_ips: Vec<IpAddr> = creds.iter().map(|b| b.addr.ip()).collect();
        let clients = Arc::new(Clients::new(&bound_ips, settings.client_ipv6_prefix));
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
        let handler = Arc::new(CredentialHandler {
            cache: cache.clone(),
            hosts: AllowedHosts::new(&bound_ips),
            leeway: settings.leeway,
            admission,
            metrics: metrics.clone(),
            refusal_lines: crate::audit::Pacer::default(),
            delivery_lines: crate::audit::Pacer::default(),
            deliveries: handler::deliveries(),
            events,
        });
        Ok(Prepared {
            cache,
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

/// The agent's one Kubernetes API client, if the API server is configured; one that cannot be
/// built (a CA that cannot be read) is logged, and what needs it is off: pods are still served.
fn kube_client(settings: &ServerSettings, metrics: &Metrics) -> Option<Arc<KubeClient>> {
    let k = settings.kube.as_ref()?;
    match KubeClient::new(k.clone(), Some(metrics.kube_requests.clone())) {
        Ok(client) => Some(Arc::new(client)),
        Err(e) => {
            tracing::error!(error = %e, "cannot reach the Kubernetes API server: api-server token verification, Events and the startup taint are off");
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
    connections: &Connections,
    stop: &CancellationToken,
) -> Option<Arc<Verifier>> {
    let v = settings.verification.as_ref()?;
    // A source that cannot even be built (no service-account token or CA mounted) is the
    // operator's to fix, loudly; pods are served meanwhile, as without verification.
    let source = match v.keys.source(kube) {
        Ok(source) => source,
        Err(e) => {
            tracing::error!(error = %e, "token verification is configured but cannot run; tokens go to EKS Auth unverified");
            return None;
        }
    };
    tracing::info!(source = %source.describe(), "tokens are verified locally before any exchange");
    let counted = (metrics.verifications.clone(), metrics.key_fetches.clone());
    let verifier = Verifier::new(
        source,
        v.verify.clone(),
        keys,
        Some(counted),
        connections.tracker().clone(),
        stop.clone(),
    );
    verifier.start();
    Some(verifier)
}

impl Prepared {
    /// Start accepting on every listener, and the server's background tasks.
    pub fn serve(self) -> RunningServer {
        let Prepared {
            cache,
            verifier,
            kube,
            credential_addrs,
            metrics,
            creds,
            probe,
            metrics_listener,
            skipped,
            handler,
            clients,
            limits,
            stop,
            connections,
            shutdown_grace,
            held,
        } = self;
        let tasks = connections.tracker().clone();
        let refused = metrics
            .rejected_locally
            .with_label_values(&["connection_limit"]);
        let credential_limiter = ConnectionLimiter::with_clients(
            limits,
            Crowding::Heaviest,
            clients.clone(),
            Some(refused),
        );
        let admin = Arc::new(Admin {
            connections: connections.clone(),
            listeners: creds
                .iter()
                .map(|b| (b.addr, b.accepting.clone()))
                .collect(),
            skipped: skipped.clone(),
            cache: cache.clone(),
            verifier: verifier.clone(),
            metrics: metrics.clone(),
        });
        for bound in creds {
            tracing::info!(addr = %bound.addr, "serving credentials");
            let h = handler.clone();
            tasks.spawn(listener::serve(
                bound,
                move |req, peer| {
                    let h = h.clone();
                    async move { h.handle(req, peer).await }
                },
                stop.clone(),
                connections.clone(),
                credential_limiter.clone(),
            ));
        }
        let spawn_admin = |bound: Option<Bound>, port: Port, limits, crowding| {
            bound.map(|bound| {
                let addr = bound.addr;
                tracing::info!(%addr, "serving {}", port.serves());
                let a = admin.clone();
                tasks.spawn(listener::serve(
                    bound,
                    move |req, _peer| {
                        let a = a.clone();
                        async move { a.handle(port, req).await }
                    },
                    stop.clone(),
                    connections.clone(),
                    ConnectionLimiter::with_clients(limits, crowding, clients.clone(), None),
                ));
                addr
            })
        };
        let probe_addr = spawn_admin(probe, Port::Probes, PROBE_CONNECTIONS, Crowding::Oldest);
        let metrics_addr = spawn_admin(
            metrics_listener,
            Port::Metrics,
            METRICS_CONNECTIONS,
            Crowding::Heaviest,
        );
        spawn_background(&tasks, &stop, clients);
        RunningServer {
            credential_addrs,
            skipped,
            probe_addr,
            metrics_addr,
            cache,
            verifier,
            kube,
            metrics,
            stop,
            connections,
            shutdown_grace,
            sockets: Arc::new(held),
        }
    }
}

/// Giving freed memory back, and re-reading the node's addresses (they change with ENIs and
/// DHCP), until `stop`.
fn spawn_background(tasks: &TaskTracker, stop: &CancellationToken, clients: Arc<Clients>) {
    let stopped = stop.clone();
    tasks.spawn(async move {
        tokio::select! {
            _ = memory::run() => {}
            _ = stopped.cancelled() => {}
        }
    });
    let stopped = stop.clone();
    tasks.spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(NODE_ADDRESSES_EVERY) => {}
                _ = stopped.cancelled() => return,
            }
            let c = clients.clone();
            let _ = tokio::task::spawn_blocking(move || c.read_node_addresses()).await;
        }
    });
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

impl RunningServer {
    /// Stop accepting, refreshing and fetching keys, and wait (within the grace period) for the
    /// requests in flight: what an agent does once a successor serves on its sockets. The
    /// returned function can be called from anywhere; [`RunningServer::shutdown`] still ends
    /// the server after it.
    pub fn retirer(
        &self,
    ) -> impl Fn() -> futures_util::future::BoxFuture<'static, ()> + Send + Sync {
        let (stop, cache, connections, grace) = (
            self.stop.clone(),
            self.cache.clone(),
            self.connections.clone(),
            self.shutdown_grace,
        );
        move || {
            let (stop, cache, connections) = (stop.clone(), cache.clone(), connections.clone());
            Box::pin(async move {
                stop.cancel();
                cache.stop_refreshing();
                let _ = tokio::time::timeout(grace, async {
                    connections.wait().await;
                    cache.finish_exchanges().await;
                })
                .await;
            })
        }
    }

    /// Serve again after [`RunningServer::retirer`] retired this server, because the successor
    /// it retired for failed or went: a new server on the listening sockets this one still holds
    /// (the same sockets, so connections queued meanwhile are accepted), with this one's keys,
    /// entries and remembered refusals. This one is shut down in a task whose handle is returned
    /// (what its retirement left in flight may still take up to its grace).
    pub async fn resume(
        self,
        settings: &ServerSettings,
        source: Arc<dyn CredentialSource>,
        metrics: Arc<Metrics>,
    ) -> Result<(RunningServer, tokio::task::JoinHandle<()>), BindError> {
        let mut inherited = Vec::with_capacity(self.sockets.len());
        for (role, addr, fd) in self.sockets.iter() {
            let dup = fd.try_clone().map_err(|source| BindError::Bind {
                addr: *addr,
                source,
            })?;
            inherited.push((*role, *addr, std::net::TcpListener::from(dup)));
        }
        let preload = Preload {
            sockets: Sockets {
                inherited,
                wait_for_ports: true,
            },
            keys: self.verifier.as_ref().and_then(|v| v.snapshot()),
        };
        let prepared = Server::prepare(settings, source, metrics, preload).await?;
        let imported = prepared.cache.import(self.cache.export_iter(0).0);
        prepared.cache.remember(self.cache.refusals());
        let running = prepared.serve();
        tracing::info!(
            entries = imported.installed,
            "serving again, with this agent's cache"
        );
        Ok((running, tokio::spawn(self.shutdown())))
    }

    /// Stop accepting everywhere and stop refreshing; drain within the grace period; then close
    /// what is left. Returns when every task the server started has ended.
    pub async fn shutdown(self) {
        self.stop.cancel();
        self.cache.stop_refreshing();
        let drained = tokio::time::timeout(self.shutdown_grace, async {
            self.connections.wait().await;
            self.cache.finish_exchanges().await;
        })
        .await;
        if drained.is_err() {
            // Requests waiting on an exchange get a 503 they can retry elsewhere, not a reset.
            self.cache.abort_exchanges();
            self.cache.finish_exchanges().await;
            let _ = tokio::time::timeout(FLUSH, self.connections.wait()).await;
            let open = self.connections.open();
            self.connections.close();
            self.connections.wait().await;
            tracing::warn!(
                connections = open,
                grace_s = self.shutdown_grace.as_secs_f64(),
                "shutdown grace period over: ended the exchanges under way (their requests got 503 ShuttingDown) and closed the connections still open"
            );
        }
    }
}
