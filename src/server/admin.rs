//! The probe and metrics endpoints, decided in-process.
//!
//! Contract: `/healthz` answers 200 when the runtime schedules work (the answer itself is the
//! proof) and the refresh scheduler runs; a scheduler that gave up after repeated panics makes
//! it 503, so the kubelet restarts the agent. `/readyz` answers 200 only when every credential
//! listener that bound is accepting (its accept loop runs and a TCP connection to it succeeds,
//! made directly by the agent, never through `HTTP_PROXY`) and the scheduler runs; its JSON body
//! names each listener, the IPv6 hosts skipped at start and the scheduler's state.
//! `/metrics` is the Prometheus text exposition, on the metrics port only (as the reference
//! agent serves it): the probe port answers the two probes, each on a connection of its own
//! (`Connection: close`), so what a scrape costs stays within the metrics pool's bounds and no
//! process holds probe connections open. The metrics port answers the probes too.

use super::listener::Connections;
use super::response::json_response;
use crate::cache::CredentialCache;
use crate::metrics::Metrics;
use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use serde::Serialize;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

const HEALTHY: &[u8] = br#"{"status":"ok"}"#;
const SCHEDULER_STOPPED: &[u8] = br#"{"status":"refresh scheduler stopped after repeated panics"}"#;
const METRICS_ELSEWHERE: &[u8] = b"{\"code\":\"NotFound\",\
    \"message\":\"metrics are served on the metrics port (--metrics-port)\"}";
const NOT_HERE: &[u8] = b"{\"code\":\"NotFound\",\
    \"message\":\"this port serves /healthz and /readyz, and /metrics on the metrics port\"}";

/// What the probes look at.
pub struct Admin {
    /// Each credential listener and whether its accept loop runs.
    pub listeners: Vec<(SocketAddr, Arc<AtomicBool>)>,
    /// IPv6 credential addresses that could not be bound at start, reported by `/readyz`.
    pub skipped: Vec<SocketAddr>,
    /// For the entry count in `/metrics` and the scheduler's health.
    pub cache: CredentialCache,
    /// For the open-connection count in `/metrics`.
    pub connections: Connections,
    /// For the age of the verification keys in `/metrics`.
    pub verifier: Option<Arc<crate::verify::Verifier>>,
    pub metrics: Arc<Metrics>,
}

#[derive(Serialize)]
struct ListenerState {
    address: String,
    accepting: bool,
}

#[derive(Serialize)]
struct Readiness {
    ready: bool,
    listeners: Vec<ListenerState>,
    unavailable: Vec<String>,
    refresh_scheduler: &'static str,
}

/// Which admin port a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    Probes,
    Metrics,
}

impl Port {
    pub fn serves(self) -> &'static str {
        match self {
            Port::Probes => "probes",
            Port::Metrics => "metrics",
        }
    }
}

impl Admin {
    pub async fn handle<B>(&self, port: Port, req: Request<B>) -> Response<Full<Bytes>> {
        let mut res = self.answer(port, req.uri().path()).await;
        if port == Port::Probes {
            res.headers_mut()
                .insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
        }
        res
    }

    async fn answer(&self, port: Port, path: &str) -> Response<Full<Bytes>> {
        let fixed = |status, body: &'static [u8]| json_response(status, Bytes::from_static(body));
        match path {
            "/healthz" if self.cache.scheduler_running() => fixed(StatusCode::OK, HEALTHY),
            "/healthz" => fixed(StatusCode::SERVICE_UNAVAILABLE, SCHEDULER_STOPPED),
            "/readyz" => self.readyz().await,
            "/metrics" if port == Port::Metrics => self.metrics().await,
            "/metrics" => fixed(StatusCode::NOT_FOUND, METRICS_ELSEWHERE),
            _ => fixed(StatusCode::NOT_FOUND, NOT_HERE),
        }
    }

    /// The exposition, its gauges set first. The cache counts apply pending housekeeping and
    /// rendering walks every family: work off the runtime's workers, so a scrape never holds up
    /// a request.
    async fn metrics(&self) -> Response<Full<Bytes>> {
        // The flags and the scheduler, not a TCP connect: a scrape must stay cheap.
        let ready = self.cache.scheduler_running()
            && !self.listeners.is_empty()
            && self
                .listeners
                .iter()
                .all(|(_, a)| a.load(Ordering::Relaxed));
        let m = self.metrics.clone();
        m.ready.set(i64::from(ready));
        m.open_connections.set(self.connections.open() as i64);
        if let Some(age) = self.verifier.as_ref().and_then(|v| v.keys_age()) {
            m.keys_age.set(age.as_secs_f64());
        }
        let cache = self.cache.clone();
        let rendered = tokio::task::spawn_blocking(move || {
            m.cache_entries.set(cache.len() as i64);
            m.negative_entries.set(cache.remembered() as i64);
            m.node_refused_tokens
                .set(cache.node_refused_tokens() as i64);
            m.sync_log_lines_dropped(crate::logging::dropped_lines());
            m.render()
        })
        .await
        .unwrap_or_default();
        let mut res = Response::new(Full::new(Bytes::from(rendered)));
        res.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        res
    }

    async fn readyz(&self) -> Response<Full<Bytes>> {
        let mut listeners = Vec::with_capacity(self.listeners.len());
        for (addr, accepting) in &self.listeners {
            let ok = accepting.load(Ordering::Relaxed) && connects(*addr).await;
            listeners.push(ListenerState {
                address: addr.to_string(),
                accepting: ok,
            });
        }
        let scheduler = self.cache.scheduler_running();
        let ready = scheduler && !listeners.is_empty() && listeners.iter().all(|l| l.accepting);
        let body = Readiness {
            ready,
            listeners,
            unavailable: self.skipped.iter().map(ToString::to_string).collect(),
            refresh_scheduler: if scheduler { "running" } else { "stopped" },
        };
        let status = if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        json_response(
            status,
            serde_json::to_vec(&body)
                .map(Bytes::from)
                .unwrap_or_default(),
        )
    }
}

async fn connects(addr: SocketAddr) -> bool {
    // A listener on an unspecified address is reached through loopback.
    let target = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port())
        }
        _ => addr,
    };
    matches!(
        tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(target)).await,
        Ok(Ok(_))
    )
}
