//! Binding listeners and serving HTTP/1.1 connections on them until shutdown.
//!
//! Contract: [`bind_credential_listeners`] binds one listener per bind host. An IPv6 host that
//! cannot be bound (a node without IPv6) is reported and skipped; an IPv4 host that cannot be
//! bound, or no listener at all, is an error. [`Sockets`] supplies sockets a predecessor handed
//! over, or waits for a port it still holds. [`serve`] accepts connections until `stop` is
//! cancelled, then stops accepting at once and returns; the connections it accepted finish in
//! their own tasks: from then on every answer ends its connection (`Connection: close`), and a
//! connection with no request under way gets a second for its next one (the first on one
//! accepted a moment ago, or the next on a kept-alive one: its client may be sending it as the
//! server stops), rather than being closed as idle and losing it. [`Connections::close`] ends every
//! connection at once (shutdown does that when the grace period is over). Every connection runs
//! as a task on the shared tracker, so shutdown can wait for them. Connections are HTTP/1.1
//! with keep-alive, a bounded header size and a header read timeout, and are admitted within
//! the bounds of a [`ConnectionLimiter`], which may close an idle one (never one whose request
//! is being answered, its response included) to make room for another client.

use super::limits::{Conn, ConnectionLimiter, Pace};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
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

/// What a listening socket is for: a successor agent matches handed-over sockets by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Credentials,
    Probe,
    Metrics,
}

/// A listener that bound, and whether its accept loop still runs (for `/readyz`).
pub struct Bound {
    pub listener: TcpListener,
    pub addr: SocketAddr,
    pub accepting: Arc<AtomicBool>,
}

/// Where listening sockets come from: those a predecessor handed over, else fresh binds, which
/// wait while a predecessor that did not hand over still holds the port.
#[derive(Default)]
pub struct Sockets {
    /// Handed-over listening sockets, by role and address.
    pub inherited: Vec<(Role, SocketAddr, std::net::TcpListener)>,
    /// Retry a port in use until it is free, instead of failing at once.
    pub wait_for_ports: bool,
}

/// How often a bind waiting for a predecessor's port is retried, and how often it says so.
const BIND_RETRY: Duration = Duration::from_millis(100);
const BIND_WARN_EVERY: Duration = Duration::from_secs(5);

impl Sockets {
    /// The handed-over socket for `role` at `addr` (port 0 matches any port on that IP), or a
    /// fresh bind.
    pub async fn bind(&mut self, role: Role, addr: SocketAddr) -> Result<Bound, BindError> {
        let found = self.inherited.iter().position(|(r, a, _)| {
            *r == role && a.ip() == addr.ip() && (addr.port() == 0 || a.port() == addr.port())
        });
        if let Some(at) = found {
            let (_, _, std_listener) = self.inherited.remove(at);
            let listener = std_listener
                .set_nonblocking(true)
                .and_then(|()| TcpListener::from_std(std_listener))
                .map_err(|source| BindError::Bind { addr, source })?;
            return Bound::from_listener(listener, addr);
        }
        if !self.wait_for_ports {
            return bind(addr).await;
        }
        let mut warned = std::time::Instant::now();
        loop {
            match bind(addr).await {
                Err(BindError::Bind { source, .. })
                    if source.kind() == io::ErrorKind::AddrInUse =>
                {
                    if warned.elapsed() >= BIND_WARN_EVERY {
                        warned = std::time::Instant::now();
                        tracing::warn!(%addr, "waiting for the previous agent to let go of the address");
                    }
                    tokio::time::sleep(BIND_RETRY).await;
                }
                other => return other,
            }
        }
    }
}

impl Bound {
    fn from_listener(listener: TcpListener, asked: SocketAddr) -> Result<Bound, BindError> {
        let addr = listener.local_addr().map_err(|source| BindError::Bind {
            addr: asked,
            source,
        })?;
        Ok(Bound {
            listener,
            addr,
            accepting: Arc::new(AtomicBool::new(false)),
        })
    }
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
    Bound::from_listener(listener, addr)
}

/// Bind every host; return the bound listeners and the IPv6 hosts that were skipped.
pub async fn bind_credential_listeners(
    hosts: &[IpAddr],
    port: u16,
    sockets: &mut Sockets,
) -> Result<(Vec<Bound>, Vec<(SocketAddr, io::Error)>), BindError> {
    let mut bound = Vec::new();
    let mut skipped = Vec::new();
    for ip in hosts {
        let addr = SocketAddr::new(*ip, port);
        match sockets.bind(Role::Credentials, addr).await {
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
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limiter.limits().header_timeout)
        .max_buf_size(MAX_BUF)
        .keep_alive(true);
    bound.accepting.store(true, Ordering::Relaxed);
    loop {
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
        let slot = match limiter.admit(peer.ip()) {
            Ok(slot) => slot,
            Err(why) => {
                // Best effort and never waiting: the answer fits in an empty socket buffer.
                let _ = stream.try_write(super::limits::refusal(why).as_bytes());
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let state = slot.conn().clone();
        let stopping = Arc::new(stop.clone());
        let svc = service_fn(move |mut req: Request<Incoming>| {
            // Busy from the request until its response body is written: never closed to make
            // room (but for a refusal's pace, see `Pace`).
            state.set_busy(true);
            req.extensions_mut().insert(Pace::of(&state));
            let guard = Busy(state.clone());
            let fut = handler(req, peer);
            let stopping = stopping.clone();
            async move {
                let mut response = fut.await;
                if stopping.is_cancelled() {
                    // The client's next request goes to a new connection: after a handover,
                    // the successor's.
                    response.headers_mut().insert(
                        hyper::header::CONNECTION,
                        hyper::header::HeaderValue::from_static("close"),
                    );
                }
                Ok::<_, Infallible>(response.map(|body| Tracked { body, _busy: guard }))
            }
        });
        let conn = http.serve_connection(TokioIo::new(stream), svc);
        let (stop, close) = (stop.clone(), conns.close.clone());
        conns.open.fetch_add(1, Ordering::Relaxed);
        let open = OpenGuard(conns.open.clone());
        conns.tracker.spawn(async move {
            let _open = open;
            tokio::select! {
                _ = drain(conn, stop, close) => {}
                // The limiter closed it to make room for another client.
                _ = slot.conn().evicted() => {}
            }
            drop(slot);
        });
    }
    bound.accepting.store(false, Ordering::Relaxed);
    // The connections go on in their own tasks; shutdown waits for them on the tracker.
    drop(bound.listener);
}

/// Clears a connection's busy mark when dropped: when the response body has been written.
struct Busy(Arc<Conn>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.set_busy(false);
    }
}

/// A response body that keeps its connection marked busy until hyper is done with it.
struct Tracked {
    body: Full<Bytes>,
    _busy: Busy,
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// How long, once the server stops, a connection with no request under way gets for its next
/// one: the first on a connection accepted a moment ago, or the next on a kept-alive one. Its
/// client may be sending it right now (it connected, or reused its connection, just before the
/// listener stopped or was handed over); closing the connection as idle would lose that request.
const NEXT_REQUEST_WAIT: Duration = Duration::from_secs(1);

/// Serve one connection. Once `stop` is cancelled, its next answer ends it ([`serve`] adds
/// `Connection: close`); if none comes within [`NEXT_REQUEST_WAIT`], keep-alive is turned off,
/// which closes it at once if idle, or after the request it is on. `close` ends it at once.
async fn drain<C>(conn: C, stop: CancellationToken, close: CancellationToken)
where
    C: Future + GracefulConnection,
{
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        // Dropping the connection future closes its socket.
        _ = close.cancelled() => return,
        _ = stop.cancelled() => {}
    }
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = close.cancelled() => return,
        _ = tokio::time::sleep(NEXT_REQUEST_WAIT) => {}
    }
    conn.as_mut().shut_down_gracefully();
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = close.cancelled() => {}
    }
}

/// A connection that can be told to finish gracefully.
trait GracefulConnection {
    fn shut_down_gracefully(self: std::pin::Pin<&mut Self>);
}

impl<I, S> GracefulConnection for hyper::server::conn::http1::Connection<I, S>
where
    S: hyper::service::HttpService<Incoming>,
    S::ResBody: hyper::body::Body + 'static,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
{
    fn shut_down_gracefully(self: std::pin::Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}
