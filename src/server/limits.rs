//! Bounds on connections, so no client can exhaust the agent's memory or descriptors, and none
//! can crowd out the others.
//!
//! Contract: [`ConnectionLimiter::admit`] decides for each accepted connection, by its client as
//! [`Clients`] counts them (every host-local source is one client):
//! - while fewer than [`PRESSURE`] of `max_connections` are open, any client may open more, past
//!   its share `max_per_client` included (a pod with 300 threads starting at once is served), up
//!   to [`MAX_SHARE`] of the pool;
//! - under pressure, a client already holding its share is refused (`429 TooManyConnections`);
//! - when all `max_connections` are open, room is made by closing an idle connection (between
//!   requests, still sending its headers, or waiting out a refusal's pace; never one whose
//!   request is being answered), chosen by the pool's [`Crowding`]: of the client holding the
//!   most, if it holds more than the newcomer would (credentials), or the longest open,
//!   whoever's it is (probes); otherwise the newcomer is refused with
//!   `503 ConnectionsExhausted`, which every SDK retries.
//!
//! Refused connections are answered at once with a short canned response and closed. Each
//! connection costs up to 32 KiB of header buffer, so the defaults (2048 in all) bound the
//! worst case. Refusals are counted and warned about at most once per client per
//! [`WARN_EVERY`]. [`raise_fd_limit`] lifts the soft `RLIMIT_NOFILE` to the hard limit at start.

use crate::client::{ClientKey, Clients};
use crate::codes::ErrorCode;
use crate::util::LogEvery;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Share of `max_connections` above which the per-client share applies.
pub const PRESSURE: f64 = 0.75;
/// The most of `max_connections` one client may hold (unless its share is larger): past it, a
/// few clients keeping every connection busy would leave a newcomer nothing to evict.
pub const MAX_SHARE: f64 = 0.5;

/// How a full pool makes room for a newcomer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Crowding {
    /// Close an idle connection of the client holding the most (the credential listeners).
    Heaviest,
    /// Close the idle connection open longest, whoever's it is: the probes, where every
    /// request is on a connection of its own and the kubelet shares its address with every
    /// process on the host.
    Oldest,
}

/// A connection's states; a connection is closed to make room only from `IDLE`, atomically, so
/// one whose request has just begun is never cut.
const IDLE: u8 = 0;
const BUSY: u8 = 1;
const CLOSING: u8 = 2;
/// At most one warning per client this often.
const WARN_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// `--max-connections`: open connections on a listener group at once.
    pub max_connections: usize,
    /// `--max-connections-per-client`: a client's share under pressure.
    pub max_per_client: usize,
    /// `--header-timeout`: a request's headers must arrive within this.
    pub header_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_connections: crate::defaults::DEFAULT_MAX_CONNECTIONS as usize,
            max_per_client: crate::defaults::DEFAULT_MAX_CONNECTIONS_PER_CLIENT as usize,
            header_timeout: crate::defaults::DEFAULT_HEADER_TIMEOUT,
        }
    }
}

/// One open connection, as the limiter sees it.
pub struct Conn {
    /// `BUSY` while a request is being answered on it (it is not closed to make room),
    /// `CLOSING` once chosen to make room.
    state: AtomicU8,
    /// Cancelled to close it to make room.
    evict: CancellationToken,
}

impl Conn {
    /// Mark whether a request is being answered (a request paced before its refusal counts as
    /// idle: a client looping on refusals must not make its connections unclosable).
    pub fn set_busy(&self, busy: bool) {
        let (from, to) = if busy { (IDLE, BUSY) } else { (BUSY, IDLE) };
        let _ = self
            .state
            .compare_exchange(from, to, Ordering::AcqRel, Ordering::Relaxed);
    }

    /// Close it to make room, if it is idle.
    fn close_if_idle(&self) -> bool {
        let closing = self
            .state
            .compare_exchange(IDLE, CLOSING, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok();
        if closing {
            self.evict.cancel();
        }
        closing
    }

    /// Resolves when the limiter closes this connection to make room.
    pub fn evicted(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.evict.cancelled()
    }
}

/// A request's connection, for waiting out a refusal's pace as idle (carried in the request's
/// extensions; a request without one, in a test, just waits).
#[derive(Clone, Default)]
pub struct Pace(Option<Arc<Conn>>);

impl Pace {
    pub fn of(conn: &Arc<Conn>) -> Pace {
        Pace(Some(conn.clone()))
    }

    /// Wait `d` with the connection idle: the limiter may close it meanwhile to make room, which
    /// ends this request (a refusal the client was going to get anyway).
    pub async fn wait(&self, d: Duration) {
        if let Some(c) = &self.0 {
            c.set_busy(false);
        }
        tokio::time::sleep(d).await;
        if let Some(c) = &self.0 {
            c.set_busy(true);
        }
    }
}

#[derive(Default)]
struct Registry {
    total: usize,
    by_client: HashMap<ClientKey, HashMap<u64, Arc<Conn>>>,
    next_id: u64,
}

impl Registry {
    fn count(&self, key: &ClientKey) -> usize {
        self.by_client.get(key).map_or(0, HashMap::len)
    }

    fn remove(&mut self, key: &ClientKey, id: u64) -> bool {
        let Some(conns) = self.by_client.get_mut(key) else {
            return false;
        };
        let removed = conns.remove(&id).is_some();
        if conns.is_empty() {
            self.by_client.remove(key);
        }
        if removed {
            self.total -= 1;
        }
        removed
    }

    /// Close an idle connection as `crowding` says; `than`: what the newcomer's client would
    /// hold, which the heaviest client must exceed.
    fn make_room(&mut self, crowding: Crowding, than: usize) -> bool {
        let victim = match crowding {
            Crowding::Heaviest => {
                let Some((key, _)) = self
                    .by_client
                    .iter()
                    .map(|(k, c)| (*k, c.len()))
                    .filter(|(_, n)| *n > than)
                    .max_by_key(|(_, n)| *n)
                else {
                    return false;
                };
                self.by_client.get(&key).and_then(|conns| {
                    conns
                        .iter()
                        .find(|(_, c)| c.close_if_idle())
                        .map(|(id, _)| (key, *id))
                })
            }
            Crowding::Oldest => {
                let mut idle: Vec<(u64, ClientKey, &Arc<Conn>)> = self
                    .by_client
                    .iter()
                    .flat_map(|(k, conns)| conns.iter().map(move |(id, c)| (*id, *k, c)))
                    .filter(|(_, _, c)| c.state.load(Ordering::Relaxed) == IDLE)
                    .collect();
                idle.sort_unstable_by_key(|(id, _, _)| *id);
                idle.into_iter()
                    .find(|(_, _, c)| c.close_if_idle())
                    .map(|(id, key, _)| (key, id))
            }
        };
        victim.is_some_and(|(key, id)| self.remove(&key, id))
    }
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Its client holds its share while the pool is under pressure (429).
    OverShare,
    /// The pool is full and no room could be made (503).
    Exhausted,
}

/// Counts connections, in all and per client, for one group of listeners.
pub struct ConnectionLimiter {
    limits: ConnectionLimits,
    crowding: Crowding,
    clients: Arc<Clients>,
    registry: Arc<Mutex<Registry>>,
    /// Connections refused (`rejected_locally{reason=connection_limit}`).
    refused: Option<prometheus::IntCounter>,
    /// Warnings about refused connections, per client.
    warned: moka::sync::Cache<ClientKey, Arc<LogEvery>>,
}

/// A connection's claim on the limits; released when dropped.
pub struct Slot {
    key: ClientKey,
    id: u64,
    conn: Arc<Conn>,
    registry: Arc<Mutex<Registry>>,
}

impl Slot {
    pub fn conn(&self) -> &Arc<Conn> {
        &self.conn
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut r = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        r.remove(&self.key, self.id);
    }
}

impl ConnectionLimiter {
    /// A limiter that tells clients apart as a listener with no addresses of its own would.
    pub fn new(
        limits: ConnectionLimits,
        refused: Option<prometheus::IntCounter>,
    ) -> Arc<ConnectionLimiter> {
        ConnectionLimiter::with_clients(
            limits,
            Crowding::Heaviest,
            Arc::new(Clients::new(&[], 128)),
            refused,
        )
    }

    pub fn with_clients(
        limits: ConnectionLimits,
        crowding: Crowding,
        clients: Arc<Clients>,
        refused: Option<prometheus::IntCounter>,
    ) -> Arc<ConnectionLimiter> {
        Arc::new(ConnectionLimiter {
            limits,
            crowding,
            clients,
            registry: Arc::default(),
            refused,
            warned: moka::sync::Cache::builder()
                .max_capacity(4096)
                .eviction_policy(moka::policy::EvictionPolicy::lru())
                .time_to_idle(WARN_EVERY * 6)
                .build(),
        })
    }

    pub fn limits(&self) -> ConnectionLimits {
        self.limits
    }

    /// Admit a connection from `ip`, or say why not (see the module contract).
    pub fn admit(&self, ip: IpAddr) -> Result<Slot, Refused> {
        let key = self.clients.source(ip);
        // --max-connections refuses 0 where parsed; this guards library callers.
        let max = self.limits.max_connections.max(1);
        let mut r = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        let mine = r.count(&key);
        let share = self.limits.max_per_client;
        let pressure = r.total as f64 >= max as f64 * PRESSURE;
        let most = ((max as f64 * MAX_SHARE) as usize).max(share);
        let decision = if r.total < max {
            if (pressure && mine >= share) || mine >= most {
                Err(Refused::OverShare)
            } else {
                Ok(())
            }
        } else if r.make_room(self.crowding, mine + 1) {
            Ok(())
        } else if mine >= self.limits.max_per_client {
            Err(Refused::OverShare)
        } else {
            Err(Refused::Exhausted)
        };
        if let Err(why) = decision {
            let open = mine;
            drop(r);
            self.note_refused(key, ip, open, why);
            return Err(why);
        }
        r.next_id += 1;
        let id = r.next_id;
        let conn = Arc::new(Conn {
            state: AtomicU8::new(IDLE),
            evict: CancellationToken::new(),
        });
        r.by_client.entry(key).or_default().insert(id, conn.clone());
        r.total += 1;
        Ok(Slot {
            key,
            id,
            conn,
            registry: self.registry.clone(),
        })
    }

    fn note_refused(&self, key: ClientKey, ip: IpAddr, open: usize, why: Refused) {
        if let Some(c) = &self.refused {
            c.inc();
        }
        let warn = self
            .warned
            .get_with(key, || Arc::new(LogEvery::new(WARN_EVERY)));
        if let Some(unlogged) = warn.due() {
            tracing::warn!(client = %key, address = %ip.to_canonical(), open,
                max_per_client = self.limits.max_per_client, reason = ?why, refusals_not_logged = unlogged,
                "refused a connection: the connection pool is under pressure and this client holds its share, or it is full");
        }
    }

    /// Open connections now, in all and from `ip`'s client.
    pub fn open(&self, ip: IpAddr) -> (usize, usize) {
        let key = self.clients.source(ip);
        let r = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        (r.total, r.count(&key))
    }
}

/// The answer to a refused connection: written without waiting, then closed.
pub fn refusal(why: Refused) -> String {
    let (code, message) = match why {
        Refused::OverShare => (
            ErrorCode::TooManyConnections,
            "this client holds too many open connections to the agent; close some and retry",
        ),
        Refused::Exhausted => (
            ErrorCode::ConnectionsExhausted,
            "the agent has no connection to spare right now; retry",
        ),
    };
    let (status, body) = (
        code.status(),
        format!(r#"{{"code":"{code}","message":"{message}"}}"#),
    );
    let reason = status.canonical_reason().unwrap_or_default();
    format!(
        "HTTP/1.1 {} {reason}\r\ncontent-type: application/json\r\nretry-after: 1\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n{body}",
        status.as_str(),
        body.len()
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
    fn the_canned_answers_are_well_formed() {
        // The wire's words, pinned here: clients see them.
        for (why, status, code) in [
            (
                Refused::OverShare,
                "429 Too Many Requests",
                "TooManyConnections",
            ),
            (
                Refused::Exhausted,
                "503 Service Unavailable",
                "ConnectionsExhausted",
            ),
        ] {
            let text = refusal(why);
            assert!(
                text.starts_with(&format!("HTTP/1.1 {status}\r\n")),
                "{text}"
            );
            let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .and_then(|n| n.trim().parse().ok())
                .expect("length");
            assert_eq!(body.len(), len, "{body:?}");
            let v: serde_json::Value = serde_json::from_str(body).expect("json");
            assert_eq!(v["code"], code);
        }
    }

    fn limiter(max: usize, share: usize) -> Arc<ConnectionLimiter> {
        ConnectionLimiter::new(
            ConnectionLimits {
                max_connections: max,
                max_per_client: share,
                header_timeout: Duration::from_secs(1),
            },
            None,
        )
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn the_share_is_soft_until_pressure() {
        let l = limiter(8, 2);
        // Room in the pool: one client may pass its share of 2, up to half the pool.
        let mut held: Vec<Slot> = (0..4)
            .map(|_| l.admit(ip("10.0.0.1")).expect("room"))
            .collect();
        assert_eq!(
            l.admit(ip("10.0.0.1")).err(),
            Some(Refused::OverShare),
            "half the pool at most"
        );
        held.extend((0..2).map(|_| l.admit(ip("10.0.0.4")).expect("room")));
        // Under pressure: over its share, refused; another client below its share, admitted.
        assert_eq!(
            l.admit(ip("::ffff:10.0.0.1")).err(),
            Some(Refused::OverShare)
        );
        held.push(l.admit(ip("10.0.0.2")).expect("a light client"));
        held.push(l.admit(ip("10.0.0.2")).expect("a light client"));
        assert_eq!(l.open(ip("10.0.0.1")), (8, 4));
        // Full: a newcomer gets in by closing an idle connection of the heaviest client.
        held[0].conn().set_busy(true);
        held.push(l.admit(ip("10.0.0.3")).expect("room made"));
        assert_eq!(l.open(ip("10.0.0.1")), (8, 3));
        let evicted = held[..4]
            .iter()
            .filter(|s| s.conn().evict.is_cancelled())
            .count();
        assert_eq!(evicted, 1);
        assert!(
            !held[0].conn().evict.is_cancelled(),
            "a busy connection is never closed"
        );
        // Slots released on drop.
        drop(held);
        assert_eq!(l.open(ip("10.0.0.1")), (0, 0));
    }

    /// Review H2: with every host process one client, the kubelet's probe must still get in
    /// when the pool is full of another host process's connections.
    #[test]
    fn a_probe_pool_makes_room_by_closing_the_oldest_whoever_holds_it() {
        let l = ConnectionLimiter::with_clients(
            ConnectionLimits {
                max_connections: 4,
                max_per_client: 4,
                header_timeout: Duration::from_secs(1),
            },
            Crowding::Oldest,
            Arc::new(Clients::new(&[], 128)),
            None,
        );
        let held: Vec<Slot> = (0..4)
            .map(|i| l.admit(ip(&format!("127.0.0.{}", i + 2))).expect("room"))
            .collect();
        held[0].conn().set_busy(true);
        let kubelet = l.admit(ip("127.0.0.1")).expect("room made");
        assert!(!held[0].conn().evict.is_cancelled(), "busy: kept");
        assert!(
            held[1].conn().evict.is_cancelled(),
            "the oldest idle one closed"
        );
        assert_eq!(l.open(ip("127.0.0.1")), (4, 4));
        drop(kubelet);
    }

    /// Review M4: a connection whose refusal is being paced can be closed; one that has just
    /// turned busy cannot, even if chosen a moment before.
    #[test]
    fn only_idle_connections_close_and_the_choice_is_atomic() {
        let l = limiter(2, 1);
        let a = l.admit(ip("10.0.0.1")).expect("room");
        let b = l.admit(ip("10.0.0.2")).expect("room");
        a.conn().set_busy(true);
        b.conn().set_busy(true);
        assert_eq!(l.admit(ip("10.0.0.3")).err(), Some(Refused::Exhausted));
        // `a` waits out a refusal's pace: idle.
        a.conn().set_busy(false);
        assert!(a.conn().close_if_idle());
        assert!(!a.conn().close_if_idle(), "once");
        a.conn().set_busy(true);
        assert!(!b.conn().close_if_idle(), "busy");
    }

    #[test]
    fn loopback_addresses_are_one_client() {
        let l = limiter(8, 2);
        let _held: Vec<Slot> = (0..4)
            .map(|i| l.admit(ip(&format!("127.0.0.{}", i + 2))).expect("room"))
            .collect();
        assert_eq!(l.admit(ip("127.0.9.9")).err(), Some(Refused::OverShare));
    }
}
