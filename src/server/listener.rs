//! Serving HTTP/1.1 connections on bound listeners ([`super::bind`]) until shutdown.
//!
//! Contract: [`serve`] admits each accepted connection within the bounds of a [`ConnectionLimiter`]
//! (a refused one gets the limiter's canned answer, `429` or `503`, and is closed), and serves it
//! in a task of its own on the shared tracker, so shutdown can wait for them. Connections are
//! HTTP/1.1 with a bounded header size and a header read timeout, kept alive between requests while
//! the server serves. The limiter may close an idle one to make room for another client, never one
//! whose request is being answered (its response included).
//!
//! When `stop` is cancelled, [`serve`] stops accepting at once and returns; its connections
//! finish in their own tasks, and keep-alive ends: every answer from then on carries
//! `Connection: close`, and a connection with no request under way gets
//! [`NEXT_REQUEST_WAIT`] for its next one (the first on one accepted a moment ago, or the next
//! on a kept-alive one: its client may be sending it as the server stops) before it is closed.
//! [`Connections::close`] ends every connection at once (shutdown does that when the grace
//! period is over).

use super::bind::Bound;
use super::limits::{Conn, ConnectionLimiter, Pace, Slot};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Tokens are at most 16 KiB; this leaves room for the other headers and no more.
const MAX_BUF: usize = 32 * 1024;

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

    /// Run `conn` in a task of its own until it ends, drains after `stop`, is closed, or its
    /// `slot` is taken back to make room; counted open meanwhile.
    fn spawn<C>(&self, conn: C, slot: Slot, stop: CancellationToken)
    where
        C: Future + GracefulConnection + Send + 'static,
    {
        let close = self.close.clone();
        self.open.fetch_add(1, Ordering::Relaxed);
        let open = OpenGuard(self.open.clone());
        self.tracker.spawn(async move {
            let _open = open;
            tokio::select! {
                _ = drain(conn, stop, close) => {}
                // The limiter closed it to make room for another client.
                _ = slot.conn().evicted() => {}
            }
            drop(slot);
        });
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
        conns.spawn(conn, slot, stop.clone());
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
/// `Connection: close`); if none comes within [`NEXT_REQUEST_WAIT`], it is shut down
/// gracefully (hyper stops keeping it alive), which closes it at once if idle, or after the
/// request it is on. `close` ends it at once.
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

#[cfg(test)]
mod tests {
    use super::super::bind::bind;
    use super::super::limits::ConnectionLimits;
    use super::*;
    use std::sync::atomic::AtomicBool;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// A listener on loopback answering `200 <client address>`, or never when the path is
    /// `/hang`, within `limits`.
    struct Serving {
        addr: SocketAddr,
        accepting: Arc<AtomicBool>,
        stop: CancellationToken,
        conns: Connections,
        task: tokio::task::JoinHandle<()>,
    }

    async fn start(max_connections: usize, max_per_client: usize) -> Serving {
        let bound = bind("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind");
        let (addr, accepting) = (bound.addr, bound.accepting.clone());
        let limits = ConnectionLimits {
            max_connections,
            max_per_client,
            header_timeout: Duration::from_secs(5),
        };
        let (stop, conns) = (CancellationToken::new(), Connections::default());
        let task = tokio::spawn(serve(
            bound,
            |req: Request<Incoming>, peer: SocketAddr| async move {
                if req.uri().path() == "/hang" {
                    std::future::pending::<()>().await;
                }
                Response::new(Full::new(Bytes::from(peer.ip().to_string())))
            },
            stop.clone(),
            conns.clone(),
            ConnectionLimiter::new(limits, None),
        ));
        // The accept loop marks itself accepting once it runs.
        while !accepting.load(Ordering::Relaxed) {
            tokio::task::yield_now().await;
        }
        Serving {
            addr,
            accepting,
            stop,
            conns,
            task,
        }
    }

    /// Send a request for `path` and read one response: its head and body.
    async fn get(conn: &mut TcpStream, path: &str) -> (String, String) {
        let request = format!("GET {path} HTTP/1.1\r\nhost: agent\r\n\r\n");
        conn.write_all(request.as_bytes()).await.expect("write");
        read_response(conn).await.expect("a response")
    }

    async fn read_response(conn: &mut TcpStream) -> Option<(String, String)> {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                if buf.len() >= end + 4 + length {
                    let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + length]);
                    return Some((head, body.into_owned()));
                }
            }
            let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut chunk))
                .await
                .expect("an answer within 5 s")
                .ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Whether the server closes `conn` within `within`.
    async fn closed(conn: &mut TcpStream, within: Duration) -> bool {
        let mut byte = [0u8; 1];
        matches!(
            tokio::time::timeout(within, conn.read(&mut byte)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }

    #[tokio::test]
    async fn serves_requests_on_a_kept_alive_connection_with_the_clients_address() {
        let s = start(8, 8).await;
        let mut conn = TcpStream::connect(s.addr).await.expect("connect");
        for _ in 0..3 {
            let (head, body) = get(&mut conn, "/").await;
            assert!(head.starts_with("http/1.1 200"), "{head}");
            assert!(!head.contains("connection: close"), "kept alive: {head}");
            assert_eq!(body, "127.0.0.1");
        }
        assert_eq!(s.conns.open(), 1);
        s.stop.cancel();
    }

    #[tokio::test]
    async fn a_connection_past_the_clients_share_is_answered_429_and_closed() {
        let s = start(1, 1).await;
        let mut first = TcpStream::connect(s.addr).await.expect("connect");
        let _ = get(&mut first, "/").await;
        let mut second = TcpStream::connect(s.addr).await.expect("connect");
        let (head, body) = read_response(&mut second).await.expect("a refusal");
        assert!(head.starts_with("http/1.1 429"), "{head}");
        assert!(head.contains("connection: close"), "{head}");
        assert!(body.contains("TooManyConnections"), "{body}");
        assert!(closed(&mut second, Duration::from_secs(5)).await);
        // The first is untouched.
        assert_eq!(get(&mut first, "/").await.1, "127.0.0.1");
        s.stop.cancel();
    }

    #[tokio::test]
    async fn at_stop_it_stops_accepting_and_its_connections_drain() {
        let s = start(8, 8).await;
        let mut talking = TcpStream::connect(s.addr).await.expect("connect");
        let _ = get(&mut talking, "/").await;
        let mut silent = TcpStream::connect(s.addr).await.expect("connect");
        let _ = get(&mut silent, "/").await;
        s.stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), s.task)
            .await
            .expect("serve returns at once")
            .expect("no panic");
        assert!(!s.accepting.load(Ordering::Relaxed));
        assert!(
            TcpStream::connect(s.addr).await.is_err(),
            "no longer listening"
        );
        // A request sent just after the stop is still answered, and ends its connection.
        let (head, _) = get(&mut talking, "/").await;
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(head.contains("connection: close"), "{head}");
        assert!(closed(&mut talking, Duration::from_secs(1)).await);
        // One with nothing to say is closed once its grace for a next request is over.
        assert!(
            !closed(&mut silent, NEXT_REQUEST_WAIT / 2).await,
            "closed too soon"
        );
        assert!(closed(&mut silent, NEXT_REQUEST_WAIT * 2).await);
        tokio::time::timeout(Duration::from_secs(5), s.conns.wait())
            .await
            .expect("every connection task ended");
        assert_eq!(s.conns.open(), 0);
    }

    #[tokio::test]
    async fn close_ends_a_connection_whose_request_never_finishes() {
        let s = start(8, 8).await;
        let mut conn = TcpStream::connect(s.addr).await.expect("connect");
        conn.write_all(b"GET /hang HTTP/1.1\r\nhost: agent\r\n\r\n")
            .await
            .expect("write");
        assert!(
            !closed(&mut conn, Duration::from_millis(300)).await,
            "busy before stop"
        );
        s.stop.cancel();
        assert!(
            !closed(&mut conn, NEXT_REQUEST_WAIT * 2).await,
            "a busy one waits"
        );
        s.conns.close();
        assert!(closed(&mut conn, Duration::from_secs(5)).await);
        tokio::time::timeout(Duration::from_secs(5), s.conns.wait())
            .await
            .expect("every connection task ended");
        assert_eq!(s.conns.open(), 0);
    }
}
