//! The `server` command: credential listeners, the probe and metrics listeners, shutdown.
//!
//! Contract: [`Server::start`] binds everything it was asked to (see [`listener`] for what a
//! bind failure means), starts serving, and returns the addresses actually bound, so callers
//! (the binary, tests, benchmarks) can use port 0. Everything it starts (listeners, their
//! connections, the cache's scheduler and exchanges, the memory task) is owned by the returned
//! [`RunningServer`]. [`RunningServer::shutdown`] stops accepting on every listener at once,
//! stops refreshing, and lets in-flight requests and exchanges finish within the grace period.
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
use crate::cache::{CacheSettings, CredentialCache, Exported, Imported};
use crate::eks_auth::CredentialSource;
use crate::issuer::{IssuerSettings, Verifier};
use crate::metrics::Metrics;
use crate::request::AllowedHosts;
use admin::Admin;
use handler::CredentialHandler;
use limits::{ConnectionLimiter, ConnectionLimits};
use listener::{BindError, Bound, Connections, Role, Sockets};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

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
    /// `--token-issuer`: verify tokens locally before any exchange.
    pub token_issuer: Option<IssuerSettings>,
    /// Bounds on the credential listeners' connections.
    pub connections: ConnectionLimits,
}

/// The probe and metrics listeners have their own, small connection pool: a flood on the
/// credential listeners never starves the kubelet's probes or a scrape.
const ADMIN_CONNECTIONS: ConnectionLimits = ConnectionLimits {
    max_connections: 64,
    max_per_client: 64,
    header_timeout: Duration::from_secs(3),
};

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
    pub metrics: Arc<Metrics>,
    /// Cancelled to stop accepting on every listener (and the memory task).
    stop: CancellationToken,
    /// The listener tasks and every connection they accepted.
    connections: Connections,
    shutdown_grace: Duration,
    /// Every listening socket by role, for a handover.
    pub sockets: Vec<(Role, SocketAddr, RawFd)>,
    /// What became of the entries given to [`Server::start_with`].
    pub preloaded: Imported,
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
        Server::start_with(settings, source, metrics, Sockets::default(), Vec::new()).await
    }

    /// [`Server::start`], on the listening sockets in `sockets` where it has them, and with
    /// `entries` in the cache before the first connection is accepted (a handover).
    pub async fn start_with(
        settings: &ServerSettings,
        source: Arc<dyn CredentialSource>,
        metrics: Arc<Metrics>,
        mut sockets: Sockets,
        entries: Vec<Exported>,
    ) -> Result<RunningServer, BindError> {
        let (creds, skipped) =
            listener::bind_credential_listeners(&settings.bind_hosts, settings.port, &mut sockets)
                .await?;
        let probe = match settings.probe_addr {
            Some(a) => Some(sockets.bind(Role::Probe, a).await?),
            None => None,
        };
        let metrics_l = match settings.metrics_addr {
            Some(a) => Some(sockets.bind(Role::Metrics, a).await?),
            None => None,
        };
        // Every listening socket, for a handover to a successor. The descriptors stay open for
        // as long as the listeners serve.
        let mut sockets_held: Vec<(Role, SocketAddr, RawFd)> = creds
            .iter()
            .map(|b| (Role::Credentials, b.addr, b.listener.as_raw_fd()))
            .collect();
        for (role, b) in [(Role::Probe, &probe), (Role::Metrics, &metrics_l)] {
            if let Some(b) = b {
                sockets_held.push((role, b.addr, b.listener.as_raw_fd()));
            }
        }
        let verifier = match &settings.token_issuer {
            Some(issuer) => {
                tracing::info!(issuer = %issuer.issuer, discovery = %issuer.discovery_url,
                    "tokens are verified locally before any exchange");
                Some(Verifier::start(issuer.clone()).map_err(BindError::Setup)?)
            }
            None => None,
        };
        let cache = CredentialCache::new(source, &settings.cache, settings.leeway, metrics.clone());
        let preloaded = cache.import(entries);
        let bound_ips: Vec<IpAddr> = creds.iter().map(|b| b.addr.ip()).collect();
        let handler = Arc::new(CredentialHandler {
            cache: cache.clone(),
            hosts: AllowedHosts::new(&bound_ips),
            leeway: settings.leeway,
            admission: Arc::new(Admission::counted(
                settings.admission,
                verifier,
                Some(metrics.verifications.clone()),
            )),
            metrics: metrics.clone(),
        });
        let credential_limiter = ConnectionLimiter::new(
            settings.connections,
            Some(
                metrics
                    .rejected_locally
                    .with_label_values(&["connection_limit"]),
            ),
        );
        let admin_limiter = ConnectionLimiter::new(ADMIN_CONNECTIONS, None);
        let stop = CancellationToken::new();
        let connections = Connections::default();
        let admin = Arc::new(Admin {
            connections: connections.clone(),
            listeners: creds
                .iter()
                .map(|b| (b.addr, b.accepting.clone()))
                .collect(),
            skipped: skipped.iter().map(|(a, _)| *a).collect(),
            cache: cache.clone(),
            metrics: metrics.clone(),
        });
        let tasks = connections.tracker().clone();
        let credential_addrs: Vec<SocketAddr> = creds.iter().map(|b| b.addr).collect();
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
        let spawn_admin = |bound: Option<Bound>, what: &'static str| {
            bound.map(|bound| {
                let addr = bound.addr;
                tracing::info!(%addr, "serving {what}");
                let a = admin.clone();
                tasks.spawn(listener::serve(
                    bound,
                    move |req, _peer| {
                        let a = a.clone();
                        async move { a.handle(req).await }
                    },
                    stop.clone(),
                    connections.clone(),
                    admin_limiter.clone(),
                ));
                addr
            })
        };
        let probe_addr = spawn_admin(probe, "probes");
        let metrics_addr = spawn_admin(metrics_l, "metrics");
        let stopped = stop.clone();
        tasks.spawn(async move {
            tokio::select! {
                _ = memory::run() => {}
                _ = stopped.cancelled() => {}
            }
        });
        Ok(RunningServer {
            credential_addrs,
            skipped: skipped.into_iter().map(|(a, _)| a).collect(),
            probe_addr,
            metrics_addr,
            cache,
            metrics,
            stop,
            connections,
            shutdown_grace: settings.shutdown_grace,
            sockets: sockets_held,
            preloaded,
        })
    }
}

impl RunningServer {
    /// Stop accepting and refreshing, and wait (within the grace period) for the requests in
    /// flight: what an agent does once a successor serves on its sockets. The returned function
    /// can be called from anywhere; [`RunningServer::shutdown`] still ends the server after it.
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
