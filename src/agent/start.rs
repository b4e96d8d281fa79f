//! How an agent starts: it takes over from a predecessor, or binds fresh.
//!
//! Contract: with handover on, [`start`] asks a predecessor for its offer
//! ([`crate::handover::take_over`]); an offer is declined (and the ports waited for) when an
//! address this agent serves and was not handed is held by another socket. The server is built
//! on the sockets taken (binding the rest, retrying while they are held), the predecessor's cache
//! is taken while nothing is accepted, and then the server serves and the rest of the cache
//! follows; what does not arrive costs exchanges, not availability. Without handover, or on
//! other systems, it binds fresh.

use super::offer::Handover;
use super::{AgentSettings, Stopped};
use crate::eks_auth::EksAuthClient;
use crate::metrics::Metrics;
use crate::server::{Preload, RunningServer, Server};
use std::sync::Arc;

/// The connection to the agent this one took over from, kept while this one runs.
#[cfg(target_os = "linux")]
pub(super) type Link = Option<crate::handover::Link>;
#[cfg(not(target_os = "linux"))]
pub(super) type Link = ();

/// Take over from a predecessor or bind fresh, serve, and offer this agent to a successor.
pub(super) async fn start(
    settings: &AgentSettings,
    source: Arc<EksAuthClient>,
    metrics: Arc<Metrics>,
) -> Result<(RunningServer, Handover, Link), Stopped> {
    let server = &settings.server;
    let start = |e: crate::server::bind::BindError| Stopped::Start(e.to_string());
    #[cfg(target_os = "linux")]
    if let Some(h) = &settings.handover {
        let mut preload = Preload::default();
        let offered = match offered(h, &metrics).await {
            Some(mut o) => {
                preload.sockets.inherited = std::mem::take(&mut o.listeners);
                preload.keys = o.keys.take();
                Some(o)
            }
            None => None,
        };
        // Whatever was not handed over is bound fresh, retrying while it is held.
        preload.sockets.wait_for_ports = Some(crate::server::bind::port_wait(
            h.wait,
            server.shutdown_grace,
        ));
        let prepared = Server::prepare(server, source, metrics.clone(), preload)
            .await
            .map_err(start)?;
        let taking = match offered {
            Some(o) => match o.take(&prepared.cache, h).await {
                Ok(t) => Some(t),
                Err(e) => {
                    // The sockets are ours: serve with what arrived; the rest is exchanged again.
                    tracing::warn!(error = %e, "the running agent's cache did not all arrive");
                    None
                }
            },
            None => None,
        };
        let running = prepared.serve();
        let mut link = None;
        if let Some(t) = taking {
            // Failures past this point cost exchanges, not availability; finish logs them.
            if let Ok((_, l)) = t.finish(&running.cache, &metrics, h).await {
                link = Some(l);
            }
        }
        let handover = Handover::offer(settings, &running, metrics, None);
        return Ok((running, handover, link));
    }
    let running = Server::start(server, source, metrics)
        .await
        .map_err(start)?;
    #[cfg(target_os = "linux")]
    return Ok((running, Handover::Off, None));
    #[cfg(not(target_os = "linux"))]
    Ok((running, Handover::Off, ()))
}

/// A predecessor's offer, if one runs here and offers sockets this agent can take over; what
/// else was found is logged.
#[cfg(target_os = "linux")]
async fn offered(
    h: &crate::handover::HandoverSettings,
    metrics: &Metrics,
) -> Option<crate::handover::Offered> {
    use crate::handover::{take_over, Takeover};
    let o = match take_over(h, metrics).await {
        Takeover::Offered(o) => o,
        Takeover::Alone(why) => {
            tracing::info!(
                reason = why,
                "no running agent to take over from; binding fresh"
            );
            return None;
        }
        Takeover::Older => {
            tracing::warn!(
                "an older agent (handover protocol 1) holds the addresses and is never handed \
                anything: binding them once it lets go; its cache is not carried over"
            );
            return None;
        }
        Takeover::Failed(e) => {
            tracing::warn!(error = %e, "the running agent did not hand over; \
                binding fresh once it lets go of its addresses");
            return None;
        }
    };
    for why in &o.dropped {
        tracing::warn!(socket = %why, "not taking over a socket of the running agent; \
            binding this agent's own address instead");
    }
    // What this agent serves and was not handed over is bound now, beside the predecessor. If
    // something holds such an address (an old address of the predecessor's that overlaps), it
    // would be free only once the predecessor stops, which it does only after this agent took
    // over: decline, and wait for the ports instead.
    let missing = uncovered(&h.expected, &o.listeners);
    for addr in missing.iter().map(|(_, a)| *a) {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                let reason = format!("{addr}, which this agent serves, is held by another socket");
                tracing::warn!(
                    reason,
                    "not taking over from the running agent; \
                    binding fresh once it lets go of its addresses"
                );
                o.refuse(reason).await;
                return None;
            }
            // Not this agent's to decide here: the server's own bind says (an IPv6 address
            // on a node without IPv6 is skipped there).
            Err(_) => {}
        }
    }
    tracing::info!(
        listeners = o.listeners.len(),
        keys = o.keys.is_some(),
        "a running agent offers its sockets"
    );
    Some(o)
}

/// The addresses this agent serves that no handed-over socket covers (port 0: any port).
#[cfg(target_os = "linux")]
fn uncovered(
    expected: &crate::handover::Expected,
    have: &[(
        crate::server::bind::Role,
        std::net::SocketAddr,
        std::net::TcpListener,
    )],
) -> Vec<(crate::server::bind::Role, std::net::SocketAddr)> {
    use crate::server::bind::Role;
    let wanted = expected
        .credentials
        .iter()
        .map(|a| (Role::Credentials, *a))
        .chain(expected.probe.map(|a| (Role::Probe, a)))
        .chain(expected.metrics.map(|a| (Role::Metrics, a)));
    wanted
        .filter(|(role, want)| {
            !have.iter().any(|(r, a, _)| {
                r == role && a.ip() == want.ip() && (want.port() == 0 || a.port() == want.port())
            })
        })
        .collect()
}
