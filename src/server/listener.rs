//! Binding listeners and serving HTTP/1.1 connections on them until shutdown.
//!
//! Contract: [`bind_credential_listeners`] binds one listener per bind host. An IPv6 host that
//! cannot be bound (a node without IPv6) is reported and skipped; an IPv4 host that cannot be
//! bound, or no listener at all, is an error. [`serve`] accepts connections until `stop` is
//! cancelled, then stops accepting at once and lets the connections it accepted finish their
//! requests (keep-alive is turned off for them). It returns when the last of them has ended:
//! by itself, or because [`Connections::close`] was called, which ends every connection at once
//! (shutdown does that when the grace period is over). Every connection runs as a task on the
//! shared tracker, so shutdown can wait for them. Connections are HTTP/1.1 with keep-alive, a
//! bounded header size and a header read timeout, and are admitted within the bounds of a
//! [`ConnectionLimiter`], so a slow or hostile client cannot hold memory or a task forever.

use super::limits::ConnectionLimiter;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Tokens are at most 16 KiB; this leaves room for the other headers and no more.
const MAX_BUF: usize = 32 * 1024;

/// A listener that bound, and whether its accept loop still runs (for `/readyz`).
pub struct Bound {
    pub listener: TcpListener,
    pub addr: SocketAddr,
    pub accepting: Arc<AtomicBool>,
}

/// Why the agent cannot serve credentials.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("no credential listener could be bound (tried {0})")]
    NoneBound(String),
    #[error("{0}")]
    Setup(String),
}

pub async fn bind(addr: SocketAddr) -> Result<Bound, BindError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| BindError::Bind { addr, source })?;
    let addr = listener
        .local_addr()
        .map_err(|source| BindError::Bind { addr, source })?;
    Ok(Bound {
        listener,
        addr,
        accepting: Arc::new(AtomicBool::new(false)),
    })
}

/// Bind every host; return the bound listeners and the IPv6 hosts that were skipped.
pub async fn bind_credential_listeners(
    hosts: &[IpAddr],
    port: u16,
) -> Result<(Vec<Bound>, Vec<(SocketAddr, io::Error)>), BindError> {
    let mut bound = Vec::new();
    let mut skipped = Vec::new();
    for ip in hosts {
        let addr = SocketAddr::new(*ip, port);
        match bind(addr).await {
            Ok(b) => bound.push(b),
            Err(BindError::Bind { addr, source })
                if addr.is_ipv6() && source.kind() != io::ErrorKind::AddrInUse =>
            {
                tracing::warn!(%addr, error = %source, "IPv6 credential listener not available; serving the others");
                skipped.push((addr, source));
            }
            Err(e) => return Err(e),
        }
    }
    if bound.is_empty() {
        let tried: Vec<String> = hosts
            .iter()
            .map(|ip| SocketAddr::new(*ip, port).to_string())
            .collect();
        return Err(BindError::NoneBound(tried.join(", ")));
    }
    Ok((bound, skipped))
}

/// The connections of one server, across its listeners.
#[derive(Clone, Default)]
pub struct Connections {
    /// Every connection task, so shutdown can wait for them.
    tracker: TaskTracker,
    /// Cancelled to end every connection at once.
    close: CancellationToken,
    /// Connections open now (for the log line that says how many were cut off).
    open: Arc<AtomicUsize>,
}

impl Connections {
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// End every connection now, whatever it is doing.
    pub fn close(&self) {
        self.close.cancel();
    }

    /// Wait until every connection task (and anything else spawned on the tracker) has ended.
    pub async fn wait(&self) {
        self.tracker.close();
        self.tracker.wait().await;
    }

    pub fn tracker(&self) -> &TaskTracker {
        &self.tracker
    }
}

/// Decrements the open-connection count when the connection's task ends, however it ends.
struct OpenGuard(Arc<AtomicUsize>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serve `bound` with `handler` (given each request and its client's address) until `stop` is
/// cancelled, within `limiter`'s bounds; return once its connections ended.
pub async fn serve<H, F>(
    bound: Bound,
    handler: H,
    stop: CancellationToken,
    conns: Connections,
    limiter: Arc<ConnectionLimiter>,
) where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limiter.limits().header_timeout)
        .max_buf_size(MAX_BUF)
        .keep_alive(true);
    bound.accepting.store(true, Ordering::Relaxed);
    loop {
        // A slot first: at the limit, new clients wait in the kernel's backlog.
        let pending = tokio::select! {
            slot = limiter.global_slot() => match slot {
                Some(slot) => slot,
                None => break,
            },
            _ = stop.cancelled() => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = bound.listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning, keep serving.
                    tracing::warn!(addr = %bound.addr, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => break,
        };
        let Some(slot) = limiter.client_slot(pending, peer.ip()) else {
            limiter.refused(peer.ip());
            // Best effort and never waiting: the answer fits in an empty socket buffer.
            let _ = stream.try_write(super::limits::too_many_connections().as_bytes());
            continue;
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let svc = service_fn(move |req| {
            let fut = handler(req, peer);
            async move { Ok::<_, Infallible>(fut.await) }
        });
        let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), svc));
        let close = conns.close.clone();
        conns.open.fetch_add(1, Ordering::Relaxed);
        let open = OpenGuard(conns.open.clone());
        conns.tracker.spawn(async move {
            let _open = open;
            let _slot = slot;
            tokio::select! {
                _ = conn => {}
                // Dropping the connection future closes its socket.
                _ = close.cancelled() => {}
            }
        });
    }
    bound.accepting.store(false, Ordering::Relaxed);
    drop(bound.listener);
    // Ends when every connection watched here has ended, by itself or by `Connections::close`.
    graceful.shutdown().await;
}
