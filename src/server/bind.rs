//! Binding the agent's listening sockets, or taking over those a predecessor handed over.
//!
//! Contract: [`bind_credential_listeners`] binds one listener per bind host. An IPv6 host that
//! cannot be bound (a node without IPv6) is reported and skipped; an IPv4 host that cannot be
//! bound, or no listener at all, is an error. [`Sockets`] supplies sockets a predecessor handed
//! over, or, when asked to wait, retries a port another socket holds (saying so every
//! [`BIND_WARN_EVERY`]) for at most [`port_wait`] (five minutes, or longer with longer
//! `--handover-wait` and `--shutdown-grace`): a predecessor that did not hand over
//! lets go within its own termination grace, so a port still held after that is held by
//! something else, and the agent fails to start (exit 2, the kubelet restarts it, and the pod's
//! restarts show it) rather than look alive while it serves nothing.

use crate::util::LogEvery;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

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
    /// Retry a port in use until it is free, for at most this long ([`port_wait`]), instead of
    /// failing at once (`None`).
    pub wait_for_ports: Option<Duration>,
}

/// How often a bind waiting for a predecessor's port is retried, and how often it says so.
const BIND_RETRY: Duration = Duration::from_millis(100);
const BIND_WARN_EVERY: Duration = Duration::from_secs(5);

/// How long a port may stay held before the agent gives up, at the least. A predecessor that
/// did not hand over is stopped by its DaemonSet once this agent's probes pass (until then they
/// reach the predecessor, on the same host ports), and lets go within its termination grace
/// (30 s in the manifests, longer than `--handover-wait` plus `--shutdown-grace`). Five
/// minutes covers that with room, and bounds the time a squatter on the ports (one that also
/// answers the probes) can keep this agent looking alive while it serves nothing. An EKS add-on
/// still installed holds the ports until a person deletes it: the agent then exits and is
/// restarted by the kubelet, with its back-off (the README says to delete the add-on first).
pub const PORT_WAIT_LIMIT: Duration = Duration::from_secs(300);

/// How long to wait for a held port: [`PORT_WAIT_LIMIT`], or longer when this agent's own flags
/// (which the DaemonSet gives its predecessor too) let a predecessor wait for its successor and
/// drain for longer.
pub fn port_wait(handover_wait: Duration, shutdown_grace: Duration) -> Duration {
    PORT_WAIT_LIMIT.max(handover_wait + shutdown_grace + Duration::from_secs(60))
}

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
        let Some(limit) = self.wait_for_ports else {
            return bind(addr).await;
        };
        let warn = LogEvery::new(BIND_WARN_EVERY);
        // Said first once the wait has lasted a period, not at the first try.
        let _ = warn.due();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match bind(addr).await {
                Err(BindError::Bind { source, .. })
                    if source.kind() == io::ErrorKind::AddrInUse =>
                {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(BindError::StillHeld {
                            addr,
                            waited: limit,
                        });
                    }
                    if warn.due().is_some() {
                        tracing::warn!(%addr,
                            "waiting for the previous agent to let go of the address");
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
    #[error(
        "{addr} is still held by another socket after waiting {}s for a previous agent to let \
        go of it: something else listens there (`ss -ltnp` on the node says what)",
        waited.as_secs()
    )]
    StillHeld { addr: SocketAddr, waited: Duration },
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
                tracing::warn!(%addr, error = %source,
                    "IPv6 credential listener not available; serving the others");
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

#[cfg(test)]
mod tests {
    use super::*;

    fn waiting() -> Sockets {
        Sockets {
            inherited: Vec::new(),
            wait_for_ports: Some(PORT_WAIT_LIMIT),
        }
    }

    /// Something other than a predecessor holds the port for good: the wait ends at the limit
    /// with an error that names the address (the agent exits 2), not a wait for ever while the
    /// squatter answers the kubelet's probes.
    #[tokio::test(start_paused = true)]
    async fn a_port_held_past_the_limit_is_an_error_not_a_wait_for_ever() {
        let held = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = held.local_addr().expect("addr");
        let started = tokio::time::Instant::now();
        let mut sockets = waiting();
        let bound = tokio::time::timeout(2 * PORT_WAIT_LIMIT, sockets.bind(Role::Probe, addr));
        match bound.await.expect("the wait for a held port ends") {
            Err(BindError::StillHeld { addr: a, waited }) => {
                assert_eq!((a, waited), (addr, PORT_WAIT_LIMIT));
            }
            Err(e) => panic!("expected StillHeld, got {e}"),
            Ok(_) => panic!("bound {addr} while another socket held it"),
        }
        assert!(started.elapsed() >= PORT_WAIT_LIMIT);
        drop(held);
    }

    /// A predecessor that lets go within the limit: its port is bound as soon as it is free.
    #[tokio::test(start_paused = true)]
    async fn a_port_let_go_of_within_the_limit_is_bound() {
        let held = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = held.local_addr().expect("addr");
        let let_go = PORT_WAIT_LIMIT - Duration::from_secs(10);
        tokio::spawn(async move {
            tokio::time::sleep(let_go).await;
            drop(held);
        });
        let started = tokio::time::Instant::now();
        let bound = match waiting().bind(Role::Probe, addr).await {
            Ok(b) => b,
            Err(e) => panic!("the port was let go of within the limit: {e}"),
        };
        assert_eq!(bound.addr, addr);
        let waited = started.elapsed();
        assert!(
            waited >= let_go && waited < let_go + Duration::from_secs(1),
            "{waited:?}"
        );
    }

    #[test]
    fn a_predecessor_given_longer_to_drain_is_waited_for_longer() {
        assert_eq!(port_wait(secs(5), secs(5)), PORT_WAIT_LIMIT);
        assert_eq!(port_wait(secs(600), secs(3600)), secs(600 + 3600 + 60));
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }
}
