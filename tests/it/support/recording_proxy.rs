//! A pass-through HTTP proxy on loopback that keeps a copy of every request body, to show what
//! a client really sent (the STS session tags) to a server that does not report it (moto), and
//! of every answer body.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

/// Requests and answers seen, as (request body, answer body).
pub type Seen = Arc<Mutex<Vec<(String, String)>>>;

pub async fn start(upstream: SocketAddr) -> (SocketAddr, Seen) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen: Seen = Arc::default();
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let log = log.clone();
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let sent = String::from_utf8_lossy(&body).into_owned();
                            let up = tokio::net::TcpStream::connect(upstream)
                                .await
                                .expect("upstream");
                            let (mut sender, conn) =
                                hyper::client::conn::http1::handshake(TokioIo::new(up))
                                    .await
                                    .expect("handshake");
                            tokio::spawn(conn);
                            let res = sender
                                .send_request(hyper::Request::from_parts(parts, Full::new(body)))
                                .await
                                .expect("upstream answer");
                            let (parts, body) = res.into_parts();
                            let body: Bytes = body
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            log.lock()
                                .expect("lock")
                                .push((sent, String::from_utf8_lossy(&body).into_owned()));
                            Ok::<_, std::convert::Infallible>(hyper::Response::from_parts(
                                parts,
                                Full::new(body),
                            ))
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, seen)
}
