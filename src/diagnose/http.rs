//! One GET of the credentials URI, as an SDK's container provider sends it.
//!
//! Contract: a fresh HTTP/1.1 connection, the `Host` the SDK would send (the address, bracketed
//! for IPv6, with the port), the token as `Authorization` exactly as read, and an answer read up
//! to [`MAX_ANSWER`] bytes: whatever answers at that address gets no more room.

use super::environment::Target;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use std::net::{IpAddr, SocketAddr};

/// Answers larger than this are not read (an agent's answer is a few hundred bytes).
const MAX_ANSWER: usize = 64 * 1024;

/// The status and body of the answer, or why there is none.
pub(super) async fn get(target: &Target, token: &str) -> Result<(u16, Bytes), String> {
    let addr: SocketAddr = tokio::net::lookup_host((target.host.as_str(), target.port))
        .await
        .map_err(|e| e.to_string())?
        .next()
        .ok_or("no address")?;
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let host = match addr.ip() {
        IpAddr::V6(ip) => format!("[{ip}]:{}", target.port),
        IpAddr::V4(ip) => format!("{ip}:{}", target.port),
    };
    let req = hyper::Request::get(target.path_and_query.as_str())
        .header(hyper::header::HOST, host)
        .header(hyper::header::AUTHORIZATION, token)
        .header(
            hyper::header::USER_AGENT,
            concat!("pod-identity-agent-diagnose/", env!("CARGO_PKG_VERSION")),
        )
        .body(Empty::<Bytes>::new())
        .map_err(|_| "the token is not a valid header value".to_string())?;
    let res = send.send_request(req).await.map_err(|e| e.to_string())?;
    let status = res.status().as_u16();
    let body = http_body_util::Limited::new(res.into_body(), MAX_ANSWER)
        .collect()
        .await
        .map_err(|e| format!("the answer is not a credentials answer: {e}"))?
        .to_bytes();
    Ok((status, body))
}
