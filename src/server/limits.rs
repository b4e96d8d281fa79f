//! Bounds on connections, so one client can exhaust neither the agent's memory nor its file
//! descriptors.
//!
//! Contract: a [`ConnectionLimiter`] hands out a [`Slot`] per accepted connection, held until the
//! connection ends. [`ConnectionLimiter::global_slot`] waits for one of `max_connections` before
//! the listener accepts at all (as mini-redis does), so beyond it clients wait in the kernel's
//! backlog instead of costing memory. [`ConnectionLimiter::client_slot`] admits at most
//! `max_per_client` open connections from one source IP (IPv4-mapped IPv6 counted as IPv4); a
//! connection over that is answered at once with a short `429` and closed. Each connection costs
//! up to 32 KiB of header buffer, so the defaults (2048 in all, 128 per client) bound the worst
//! case to about 64 MiB, a quarter of the DaemonSet's memory limit. [`raise_fd_limit`] lifts the
//! soft `RLIMIT_NOFILE` to the hard limit at start.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// `--max-connections`: open connections on a listener group at once.
    pub max_connections: usize,
    /// `--max-connections-per-client`.
    pub max_per_client: usize,
    /// `--header-timeout`: a request's headers must arrive within this.
    pub header_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_connections: 2048,
            max_per_client: 128,
            header_timeout: Duration::from_secs(3),
        }
    }
}

/// Open connections per client.
type PerClient = Arc<Mutex<HashMap<IpAddr, usize>>>;

/// Counts connections, in all and per client, for one group of listeners.
pub struct ConnectionLimiter {
    limits: ConnectionLimits,
    global: Arc<Semaphore>,
    per_client: PerClient,
    /// Connections refused for their client's share (`rejected_locally{reason=connection_limit}`).
    refused: Option<prometheus::IntCounter>,
    /// When a refusal was last logged: at most one warning per [`WARN_EVERY`].
    warned_at: Mutex<Option<std::time::Instant>>,
}

/// At most one warning about refused connections this often.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// A connection's claim on the limits; released when dropped.
pub struct Slot {
    _global: OwnedSemaphorePermit,
    client: Option<(IpAddr, PerClient)>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some((ip, map)) = self.client.take() {
            let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(n) = map.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&ip);
                }
            }
        }
    }
}

/// A global slot taken before `accept`, waiting for its client's share.
pub struct Pending(OwnedSemaphorePermit);

impl ConnectionLimiter {
    pub fn new(
        limits: ConnectionLimits,
        refused: Option<prometheus::IntCounter>,
    ) -> Arc<ConnectionLimiter> {
        Arc::new(ConnectionLimiter {
            limits,
            global: Arc::new(Semaphore::new(
                limits.max_connections.clamp(1, Semaphore::MAX_PERMITS),
            )),
            per_client: Arc::default(),
            refused,
            warned_at: Mutex::new(None),
        })
    }

    /// Count, and now and then log, a connection refused for its client's share.
    pub fn refused(&self, client: IpAddr) {
        if let Some(c) = &self.refused {
            c.inc();
        }
        let mut at = self.warned_at.lock().unwrap_or_else(|p| p.into_inner());
        if at.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
            *at = Some(std::time::Instant::now());
            tracing::warn!(client = %client.to_canonical(), open = self.open_from(client),
                max_per_client = self.limits.max_per_client,
                "refused a connection: this client holds its share of connections");
        }
    }

    pub fn limits(&self) -> ConnectionLimits {
        self.limits
    }

    /// Wait until a connection may be accepted.
    pub async fn global_slot(&self) -> Option<Pending> {
        self.global.clone().acquire_owned().await.ok().map(Pending)
    }

    /// The accepted connection's slot, or `None` if its client already holds its share.
    pub fn client_slot(&self, pending: Pending, client: IpAddr) -> Option<Slot> {
        let ip = client.to_canonical();
        let mut map = self.per_client.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= self.limits.max_per_client {
            return None;
        }
        *n += 1;
        Some(Slot {
            _global: pending.0,
            client: Some((ip, self.per_client.clone())),
        })
    }

    /// Open connections from `client` now.
    pub fn open_from(&self, client: IpAddr) -> usize {
        let map = self.per_client.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&client.to_canonical()).copied().unwrap_or(0)
    }
}

const TOO_MANY_BODY: &str = r#"{"code":"TooManyConnections","message":"this address holds too many open connections to the agent; close some and retry"}"#;

/// The answer to a connection over its client's share: written without waiting, then closed.
pub fn too_many_connections() -> String {
    format!(
        "HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\nretry-after: 1\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n{TOO_MANY_BODY}",
        TOO_MANY_BODY.len()
    )
}

/// Raise the soft open-files limit to the hard one; returns (before, after).
#[cfg(unix)]
pub fn raise_fd_limit() -> std::io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed to them.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let before = lim.rlim_cur;
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok((before, lim.rlim_cur))
    }
}

#[cfg(not(unix))]
pub fn raise_fd_limit() -> std::io::Result<(u64, u64)> {
    Ok((0, 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_canned_answer_is_well_formed() {
        let text = too_many_connections();
        let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .and_then(|n| n.trim().parse().ok())
            .expect("length");
        assert_eq!(body.len(), len, "{body:?}");
        let v: serde_json::Value = serde_json::from_str(body).expect("json");
        assert_eq!(v["code"], "TooManyConnections");
    }

    #[tokio::test]
    async fn per_client_share_and_release() {
        let l = ConnectionLimiter::new(
            ConnectionLimits {
                max_connections: 10,
                max_per_client: 2,
                header_timeout: Duration::from_secs(1),
            },
            None,
        );
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().expect("ip");
        let s1 = l
            .client_slot(l.global_slot().await.expect("g"), a)
            .expect("1");
        let _s2 = l
            .client_slot(l.global_slot().await.expect("g"), mapped)
            .expect("2");
        assert!(l
            .client_slot(l.global_slot().await.expect("g"), a)
            .is_none());
        assert_eq!(l.open_from(a), 2);
        drop(s1);
        assert_eq!(l.open_from(a), 1);
        assert!(l
            .client_slot(l.global_slot().await.expect("g"), a)
            .is_some());
    }
}
