//! The successor's side of a handover (steps in [`super`]): find the predecessor's abstract
//! socket by the name in the handover directory, receive and check its sockets, then take over
//! its cache, and keep the connection open as long as this agent runs.
//!
//! The rooms: `meet` (finding the predecessor, and the proofs both ways before anything it sends
//! is used); here, what it offers and the taking of its cache.

mod meet;

use meet::{connect, greet};

use super::convert::{entry_from_wire, hash_from_wire, refusal_from_wire};
use super::sockets::{self, Namespace};
use super::wire::{Channel, Msg, WireListener, MAX_FRAME};
use super::{prepare_dir, HandoverError, HandoverSettings};
use crate::cache::{CredentialCache, Imported};
use crate::metrics::Metrics;
use crate::server::bind::Role;
use crate::verify::keys::Stored;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant, SystemTime};

/// The largest frame before `Taken`, from a predecessor that proved it read the name file: the
/// verification keys, a few kilobytes.
const OFFER_FRAME: usize = 1024 * 1024;
/// The most a predecessor's shutdown grace is waited for (`--shutdown-grace`'s own limit).
const MAX_GRACE: Duration = Duration::from_secs(3600);

/// What a successor found when it looked for a predecessor. Whatever it is, an agent that
/// takes nothing over binds fresh, retrying while its ports are held.
pub enum Takeover {
    /// No agent to take over from (a first start, or the one named is gone), and why.
    Alone(&'static str),
    /// An agent of protocol 1 listens on `agent.sock`: it is never handed anything, and holds
    /// the ports until it stops.
    Older,
    /// A predecessor offered its sockets (checked) and keys; take its cache with
    /// [`Offered::take`] once a server is built on them.
    Offered(Offered),
    /// An agent is there but the handover failed.
    Failed(HandoverError),
}

/// A predecessor's offer: its sockets and keys, before this agent committed to taking over.
pub struct Offered {
    channel: Channel,
    /// The predecessor's listening sockets that passed the checks, by what they are for.
    pub listeners: Vec<(Role, SocketAddr, std::net::TcpListener)>,
    /// The sockets it offered that did not (closed here), and why: this agent binds its own.
    pub dropped: Vec<String>,
    /// The predecessor's verification keys, so this agent verifies at once.
    pub keys: Option<Stored>,
    /// The predecessor's shutdown grace: how long its last entries may take after it retires.
    grace: Duration,
    started: Instant,
}

/// A handover between the snapshot and the end.
pub struct Taking {
    channel: Channel,
    /// Bytes of cache still accepted.
    room: usize,
    /// What the snapshot installed.
    pub snapshot: Imported,
    grace: Duration,
    started: Instant,
}

/// The connection to the predecessor, kept for as long as this agent runs: the predecessor
/// serves again when it closes (this agent stopped, or died), if it still runs.
pub struct Link {
    _channel: Channel,
}

fn count(metrics: &Metrics, outcome: &str) {
    metrics
        .handover
        .with_label_values(&["successor", outcome])
        .inc();
}

/// Look for a predecessor and take its offer.
pub async fn take_over(settings: &HandoverSettings, metrics: &Metrics) -> Takeover {
    // A name in a directory someone else controls could be anyone's: do not follow it.
    if let Err(e) = prepare_dir(&settings.dir) {
        return Takeover::Failed(e);
    }
    let owned = settings.clone();
    let blocking = tokio::task::spawn_blocking(move || receive(&owned));
    // The channel's deadline bounds the blocking side; this only backs it up.
    let result = match tokio::time::timeout(settings.timeout * 5, blocking).await {
        Ok(Ok(r)) => r,
        Ok(Err(join)) => Err(HandoverError::Io(std::io::Error::other(join.to_string()))),
        Err(_) => Err(HandoverError::Timeout),
    };
    match result {
        Ok(found) => {
            if let Takeover::Offered(_) = found {
                count(metrics, "started");
            }
            found
        }
        Err(e) => {
            count(metrics, "started");
            count(metrics, "failed");
            Takeover::Failed(e)
        }
    }
}

/// Steps 1 and 2, blocking.
fn receive(settings: &HandoverSettings) -> Result<Takeover, HandoverError> {
    let started = Instant::now();
    let (mut channel, named) = match connect(settings)? {
        Ok(connected) => connected,
        Err(nobody) => return Ok(nobody),
    };
    let grace = greet(&mut channel, &named, settings)?;
    // Larger frames only from the predecessor that proved it is the one named.
    channel.set_max_frame(OFFER_FRAME);
    let mut keys = None;
    loop {
        match channel.recv()? {
            (Msg::Keys { keys: k }, _) => keys = Some(k),
            (Msg::Listeners { listeners }, fds) => {
                let (listeners, dropped) = check_sockets(listeners, fds, settings);
                return Ok(Takeover::Offered(Offered {
                    channel,
                    listeners,
                    dropped,
                    keys,
                    grace,
                    started,
                }));
            }
            (Msg::Refused { reason }, _) => return Err(HandoverError::Refused(reason)),
            (other, _) => return Err(HandoverError::Unexpected(other.name())),
        }
    }
}

/// The offered sockets that pass the checks ([`sockets::check`]), and why the others did not
/// (closed here).
fn check_sockets(
    listeners: Vec<WireListener>,
    fds: Vec<OwnedFd>,
    settings: &HandoverSettings,
) -> (Vec<(Role, SocketAddr, std::net::TcpListener)>, Vec<String>) {
    let namespace = Namespace::here();
    let mut checked = Vec::with_capacity(fds.len());
    let mut dropped = Vec::new();
    for (l, fd) in listeners.into_iter().zip(fds) {
        match sockets::check(l.role, l.addr, &fd, &settings.expected, &namespace) {
            Ok(()) => checked.push((l.role, l.addr, std::net::TcpListener::from(fd))),
            Err(why) => dropped.push(format!("{:?} {}: {why}", l.role, l.addr)),
        }
    }
    (checked, dropped)
}

/// Import what `msg` carries into `cache`, within `room` bytes, refreshing nothing before
/// `settle`; whether it was the end marker.
fn import(
    msg: Msg,
    cache: &CredentialCache,
    room: &mut usize,
    imported: &mut Imported,
    settle: SystemTime,
) -> Result<bool, HandoverError> {
    let weight = msg.weight();
    *room = room
        .checked_sub(weight)
        .ok_or(HandoverError::TooMuch(weight))?;
    match msg {
        Msg::Entries { entries } => imported
            .add(cache.import_refreshing_after(entries.into_iter().map(entry_from_wire), settle)),
        Msg::Evicted { tokens } => {
            let hashes: Vec<_> = tokens.iter().filter_map(|t| hash_from_wire(t)).collect();
            cache.forget(&hashes);
        }
        Msg::Refusals { refusals } => {
            cache.remember(refusals.into_iter().filter_map(refusal_from_wire))
        }
        Msg::Retiring | Msg::Done => return Ok(true),
        other => return Err(HandoverError::Unexpected(other.name())),
    }
    Ok(false)
}

impl Offered {
    /// Turn the offer down (this agent cannot use it): the predecessor is told why and keeps
    /// serving; the sockets received are closed.
    pub async fn refuse(mut self, reason: String) {
        let told = tokio::task::spawn_blocking(move || {
            let _ = self.channel.send(&Msg::Refused { reason });
        });
        let _ = told.await;
    }

    /// Step 3 and 4: say `Taken` (the server on the sockets is built), then import the snapshot
    /// into `cache` chunk by chunk as it arrives, until `Retiring`.
    pub async fn take(
        self,
        cache: &CredentialCache,
        settings: &HandoverSettings,
    ) -> Result<Taking, HandoverError> {
        let Offered {
            mut channel,
            started,
            grace,
            ..
        } = self;
        let cache = cache.clone();
        let room = settings.byte_cap();
        let deadline = settings.timeout * 4;
        // The predecessor refreshes until it retires, and finishes those under way within its
        // grace: none of ours before that.
        let settle = SystemTime::now() + deadline + grace;
        let blocking = tokio::task::spawn_blocking(move || -> Result<Taking, HandoverError> {
            channel.set_max_frame(MAX_FRAME);
            channel.set_deadline(deadline);
            channel.send(&Msg::Taken)?;
            let mut taking = Taking {
                channel,
                room,
                snapshot: Imported::default(),
                grace,
                started,
            };
            loop {
                let (msg, _) = taking.channel.recv()?;
                if import(msg, &cache, &mut taking.room, &mut taking.snapshot, settle)? {
                    return Ok(taking);
                }
            }
        });
        blocking
            .await
            .map_err(|e| HandoverError::Io(std::io::Error::other(e.to_string())))?
    }
}

impl Taking {
    /// Step 5: what the predecessor exchanged meanwhile, its evictions and remembered refusals,
    /// until `Done`; then log and count the handover. Returns the entries installed in all, and
    /// the link to keep; without the link (the last entries did not all arrive), the
    /// predecessor serves again beside this agent.
    pub async fn finish(
        self,
        cache: &CredentialCache,
        metrics: &Metrics,
        settings: &HandoverSettings,
    ) -> Result<(Imported, Link), HandoverError> {
        let Taking {
            mut channel,
            mut room,
            snapshot,
            grace,
            started,
        } = self;
        // The predecessor sends the rest after its requests in flight finish, within its grace.
        let patience = settings.timeout + grace.max(settings.grace);
        let owned = cache.clone();
        let rest =
            tokio::task::spawn_blocking(move || -> Result<(Imported, Link), HandoverError> {
                channel.set_timeout(patience);
                channel.set_deadline(patience);
                let mut imported = Imported::default();
                loop {
                    let (msg, _) = channel.recv()?;
                    if import(msg, &owned, &mut room, &mut imported, SystemTime::now())? {
                        return Ok((imported, Link { _channel: channel }));
                    }
                }
            })
            .await
            .map_err(|e| HandoverError::Io(std::io::Error::other(e.to_string())))?;
        let mut total = snapshot;
        let (outcome, result) = match rest {
            Ok((more, link)) => {
                total.add(more);
                ("completed", Ok((total, link)))
            }
            // The sockets are ours already: a lost delta costs exchanges, not availability.
            Err(e) => {
                tracing::warn!(error = %e, "the predecessor's last entries did not arrive; \
                    those tokens will be exchanged again, and it serves again beside this agent");
                ("completed_without_delta", Err(e))
            }
        };
        count(metrics, outcome);
        metrics
            .handover_entries
            .with_label_values(&["received"])
            .inc_by(total.installed as u64);
        metrics
            .handover_seconds
            .with_label_values(&["successor"])
            .set(started.elapsed().as_secs_f64());
        tracing::info!(
            entries = total.installed,
            kept_ours = total.kept_ours,
            refused = total.refused,
            millis = started.elapsed().as_millis() as u64,
            "took over from the previous agent"
        );
        result
    }
}
