//! The `server` command: credential listeners, the probe and metrics listeners, shutdown.
//!
//! Contract: [`Server::start`] binds everything it was asked to (see [`listener`] for what a
//! bind failure means), starts serving, and returns the addresses actually bound, so callers
//! (the agent, tests, benchmarks) can use port 0. What it starts runs on task trackers the
//! returned [`RunningServer`] waits for at shutdown: the listeners and their connections, the
//! verifier's fetches, the Events task, the memory task and the re-reading of the node's
//! addresses on the server's; the refresh scheduler and the exchanges on the cache's. (The
//! admission queue's dispatcher is the one task of its own: it ends when no request waits.)
//! It builds the agent's one Kubernetes API client ([`crate::kube`]) when `kube` is set: key
//! fetches and Events use it, and [`RunningServer::kube`] hands it to the startup taint, so the
//! agent has one connection pool, one token cache and one "refuses the agent" warning; a server
//! that serves again after a failed successor ([`RunningServer::resume`]) keeps that client and
//! the verifier. [`RunningServer::shutdown`] stops accepting on every listener at once, stops
//! refreshing and fetching keys, and lets in-flight requests and exchanges finish within the
//! grace period. Past it, it ends the exchanges still running (the requests waiting on them
//! answer `503 ShuttingDown`), then closes the connections still open. It returns when every
//! task it started has ended.
//!
//! The rooms: `assemble` (bind and build, accepting nothing yet: [`Prepared`]), `serve` (start
//! the listeners and the background tasks), `running` (retire, serve again, shut down).

pub(crate) mod admin;
mod assemble;
pub mod bind;
pub mod handler;
pub mod limits;
pub mod listener;
mod memory;
pub(crate) mod response;
mod running;
mod serve;

pub use assemble::{Preload, Prepared};
pub use running::RunningServer;

use crate::admission::AdmissionSettings;
use crate::cache::CacheSettings;
use crate::eks_auth::CredentialSource;
use crate::metrics::Metrics;
use crate::verify::VerificationSettings;
use bind::BindError;
use limits::ConnectionLimits;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

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
}
