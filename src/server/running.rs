//! A server that serves: retired for a successor, served again, shut down.
//!
//! Contract: [`RunningServer::retirer`] stops accepting, refreshing and fetching keys and waits
//! (within the grace period) for what is in flight: what an agent does once a successor
//! serves on its sockets. [`RunningServer::resume`] serves again after that, on the same
//! sockets, with the same Kubernetes client, verifier, entries and remembered refusals.
//! [`RunningServer::shutdown`] is the module contract of [`super`]: stop, drain within the
//! grace, then end what is left.

use super::assemble::Kept;
use super::bind::{BindError, Role, Sockets};
use super::listener::Connections;
use super::{Preload, Server, ServerSettings};
use crate::cache::CredentialCache;
use crate::eks_auth::CredentialSource;
use crate::kube::KubeClient;
use crate::metrics::Metrics;
use crate::verify::Verifier;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

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
    pub(super) stop: CancellationToken,
    /// The listener tasks, every connection they accepted, and the background tasks.
    pub(super) connections: Connections,
    pub(super) shutdown_grace: Duration,
    /// A descriptor of every listening socket, by role, for a handover: owned, so the sockets
    /// stay open for as long as this agent may hand them over, whatever its listeners do.
    pub sockets: Arc<Vec<(Role, SocketAddr, OwnedFd)>>,
}

/// After the grace period, how long requests whose exchange was ended get to send their 503.
const FLUSH: Duration = Duration::from_millis(100);

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
    /// (the same sockets, so connections queued meanwhile are accepted), with this one's
    /// Kubernetes client and verifier (its keys; its fetches start again on the new server),
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
                // Every socket is this agent's own; an address it did not hold (a changed
                // flag cannot happen here) would wait as at a start.
                wait_for_ports: Some(super::bind::PORT_WAIT_LIMIT),
            },
            keys: None,
            kept: Some(Kept {
                kube: self.kube.clone(),
                verifier: self.verifier.clone(),
            }),
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
                "shutdown grace period over: ended the exchanges under way \
                (their requests got 503 ShuttingDown) and closed the connections still open"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::limits::ConnectionLimits;
    use super::*;
    use crate::admission::AdmissionSettings;
    use crate::cache::CacheSettings;
    use crate::eks_auth::{ExchangeError, FetchFuture};
    use crate::kube::KubeSettings;
    use crate::token::Token;
    use crate::verify::{KeysFrom, VerificationSettings, VerifySettings};

    /// EKS Auth that is never reached: these tests make no exchange.
    struct Unreachable;

    impl CredentialSource for Unreachable {
        fn fetch(&self, _: &Token) -> FetchFuture {
            Box::pin(async { Err(ExchangeError::Unavailable("not in this test".into())) })
        }
    }

    /// A server with the API server and an issuer configured, both on a loopback port where
    /// nothing listens: the client and the verifier are built, their calls fail.
    fn settings() -> ServerSettings {
        let nowhere = "http://127.0.0.1:9".to_owned();
        ServerSettings {
            bind_hosts: vec!["127.0.0.1".parse().expect("ip")],
            port: 0,
            probe_addr: None,
            metrics_addr: None,
            cache: CacheSettings::default(),
            leeway: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(1),
            admission: AdmissionSettings::default(),
            verification: Some(VerificationSettings {
                keys: KeysFrom::Issuer {
                    discovery_url: format!("{nowhere}/.well-known/openid-configuration"),
                    issuer: nowhere.clone(),
                },
                verify: VerifySettings::default(),
            }),
            node_name: None,
            client_ipv6_prefix: 128,
            connections: ConnectionLimits::default(),
            events: None,
            kube: Some(KubeSettings {
                server: nowhere,
                token_file: "/nonexistent/token".into(),
                ca_file: None,
                timeout: Duration::from_millis(200),
                attempts: 1,
            }),
        }
    }

    #[tokio::test]
    async fn a_server_that_serves_again_keeps_the_agents_kube_client_and_verifier() {
        let metrics = Arc::new(Metrics::new().expect("metrics"));
        let settings = settings();
        let first = Server::start(&settings, Arc::new(Unreachable), metrics.clone())
            .await
            .expect("starts");
        let (kube, verifier) = (
            first.kube.clone().expect("a kube client"),
            first.verifier.clone().expect("a verifier"),
        );
        let addr = first.credential_addrs[0];
        (first.retirer())().await;
        let (again, old) = first
            .resume(&settings, Arc::new(Unreachable), metrics)
            .await
            .expect("serves again");
        assert_eq!(again.credential_addrs, vec![addr], "the same socket");
        assert!(Arc::ptr_eq(again.kube.as_ref().expect("kube"), &kube));
        assert!(Arc::ptr_eq(
            again.verifier.as_ref().expect("verifier"),
            &verifier
        ));
        again.shutdown().await;
        tokio::time::timeout(Duration::from_secs(5), old)
            .await
            .expect("the old server ends")
            .expect("no panic");
    }
}
