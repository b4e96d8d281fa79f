//! Starting a prepared server: its listeners and its background tasks.
//!
//! Contract: [`Prepared::serve`] starts one accept loop per listener on the server's tracker:
//! the credential listeners answer with the handler within the credential pool's bounds
//! (crowding out the heaviest client's idle connection when full); the probe and metrics
//! listeners answer [`Admin`] within pools of their own, so neither a flood on the credential
//! port nor a busy scraper starves the kubelet's probes. It also starts the memory task and
//! the re-reading of the node's addresses, both until the server's `stop`.

use super::admin::{Admin, Port};
use super::bind::Bound;
use super::handler::CredentialHandler;
use super::limits::{ConnectionLimiter, ConnectionLimits, Crowding};
use super::listener::{self, Connections};
use super::{memory, Prepared, RunningServer};
use crate::client::{Clients, NODE_ADDRESSES_EVERY};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

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
        let refused = metrics
            .rejected_locally
            .with_label_values(&["connection_limit"]);
        let credential_limiter = ConnectionLimiter::with_clients(
            limits,
            Crowding::Heaviest,
            clients.clone(),
            Some(refused),
        );
        let start = Start {
            tasks: &tasks,
            stop: &stop,
            connections: &connections,
            clients: &clients,
        };
        for bound in creds {
            start.credentials(bound, &handler, &credential_limiter);
        }
        let probe_addr = probe
            .map(|b| start.admin(b, &admin, Port::Probes, PROBE_CONNECTIONS, Crowding::Oldest));
        let metrics_addr = metrics_listener.map(|b| {
            start.admin(
                b,
                &admin,
                Port::Metrics,
                METRICS_CONNECTIONS,
                Crowding::Heaviest,
            )
        });
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

/// What every accept loop is started with.
struct Start<'a> {
    tasks: &'a TaskTracker,
    stop: &'a CancellationToken,
    connections: &'a Connections,
    clients: &'a Arc<Clients>,
}

impl Start<'_> {
    fn credentials(
        &self,
        bound: Bound,
        handler: &Arc<CredentialHandler>,
        limiter: &Arc<ConnectionLimiter>,
    ) {
        tracing::info!(addr = %bound.addr, "serving credentials");
        let h = handler.clone();
        self.tasks.spawn(listener::serve(
            bound,
            move |req, peer| {
                let h = h.clone();
                async move { h.handle(req, peer).await }
            },
            self.stop.clone(),
            self.connections.clone(),
            limiter.clone(),
        ));
    }

    fn admin(
        &self,
        bound: Bound,
        admin: &Arc<Admin>,
        port: Port,
        limits: ConnectionLimits,
        crowding: Crowding,
    ) -> SocketAddr {
        let addr = bound.addr;
        tracing::info!(%addr, "serving {}", port.serves());
        let a = admin.clone();
        let limiter = ConnectionLimiter::with_clients(limits, crowding, self.clients.clone(), None);
        self.tasks.spawn(listener::serve(
            bound,
            move |req, _peer| {
                let a = a.clone();
                async move { a.handle(port, req).await }
            },
            self.stop.clone(),
            self.connections.clone(),
            limiter,
        ));
        addr
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
