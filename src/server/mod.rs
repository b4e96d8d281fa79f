//! The `server` command: credential listeners, the probe and metrics listeners, shutdown.
//!
//! Contract: [`Server::start`] binds everything it was asked to (see [`listener`] for what a
//! bind failure means), starts serving, and returns the addresses actually bound, so callers
//! (the binary, tests, benchmarks) can use port 0. [`RunningServer::shutdown`] stops accepting
//! on every listener at once, lets in-flight requests finish within the grace period, and
//! returns when everything has stopped.

pub mod admin;
pub mod handler;
pub mod listener;
mod trim;

use crate::cache::{CacheSettings, CredentialCache};
use crate::eks_auth::CredentialSource;
use crate::metrics::Metrics;
use crate::request::AllowedHosts;
use admin::Admin;
use handler::CredentialHandler;
use listener::{BindError, Bound};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Everything the server needs, already parsed and typed.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub bind_hosts: Vec<IpAddr>,
    pub port: u16,
    /// `None` disables the listener (tests that do not need it).
    pub probe_addr: Option<SocketAddr>,
    pub metrics_addr: Option<SocketAddr>,
    pub cache: CacheSettings,
    /// Clock leeway for token `exp`/`nbf`.
    pub leeway: Duration,
    /// How long in-flight requests may take to finish after a shutdown signal.
    pub shutdown_grace: Duration,
}

pub struct RunningServer {
    pub credential_addrs: Vec<SocketAddr>,
    pub skipped: Vec<SocketAddr>,
    pub probe_addr: Option<SocketAddr>,
    pub metrics_addr: Option<SocketAddr>,
    pub cache: CredentialCache,
    pub metrics: Arc<Metrics>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

pub struct Server;

impl Server {
    pub async fn start(
        settings: &ServerSettings,
        source: Arc<dyn CredentialSource>,
        metrics: Arc<Metrics>,
    ) -> Result<RunningServer, BindError> {
        let (creds, skipped) =
            listener::bind_credential_listeners(&settings.bind_hosts, settings.port).await?;
        let probe = match settings.probe_addr {
            Some(a) => Some(listener::bind(a).await?),
            None => None,
        };
        let metrics_l = match settings.metrics_addr {
            Some(a) => Some(listener::bind(a).await?),
            None => None,
        };
        let cache = CredentialCache::new(source, &settings.cache, metrics.clone());
        let bound_ips: Vec<IpAddr> = creds.iter().map(|b| b.addr.ip()).collect();
        let handler = Arc::new(CredentialHandler {
            cache: cache.clone(),
            hosts: AllowedHosts::new(&bound_ips),
            leeway: settings.leeway,
            metrics: metrics.clone(),
        });
        let admin = Arc::new(Admin {
            listeners: creds
                .iter()
                .map(|b| (b.addr, b.accepting.clone()))
                .collect(),
            skipped: skipped.iter().map(|(a, _)| *a).collect(),
            cache: cache.clone(),
            metrics: metrics.clone(),
        });
        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        let credential_addrs: Vec<SocketAddr> = creds.iter().map(|b| b.addr).collect();
        for bound in creds {
            tracing::info!(addr = %bound.addr, "serving credentials");
            let h = handler.clone();
            tasks.spawn(listener::serve(
                bound,
                move |req| {
                    let h = h.clone();
                    async move { h.handle(req).await }
                },
                stop_rx.clone(),
                settings.shutdown_grace,
            ));
        }
        let mut spawn_admin = |bound: Option<Bound>, what: &'static str| {
            bound.map(|bound| {
                let addr = bound.addr;
                tracing::info!(%addr, "serving {what}");
                let a = admin.clone();
                tasks.spawn(listener::serve(
                    bound,
                    move |req| {
                        let a = a.clone();
                        async move { a.handle(req).await }
                    },
                    stop_rx.clone(),
                    settings.shutdown_grace,
                ));
                addr
            })
        };
        let probe_addr = spawn_admin(probe, "probes");
        let metrics_addr = spawn_admin(metrics_l, "metrics");
        tasks.spawn(async move {
            let mut stop = stop_rx;
            tokio::select! {
                _ = trim::run() => {}
                _ = listener::stopped(&mut stop) => {}
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
            tasks,
        })
    }
}

impl RunningServer {
    /// Stop accepting everywhere, drain, and wait for every listener task.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        while self.tasks.join_next().await.is_some() {}
    }
}
