//! The successor's side of a handover (steps in [`super`]): find a predecessor, prove each
//! other's network namespace, receive and check its sockets, then take over its cache.

use super::convert::{entry_from_wire, hash_from_wire, refusal_from_wire};
use super::proof::{self, Issued};
use super::sockets;
use super::wire::{Channel, Msg, MIN_PROTOCOL, PROTOCOL};
use super::{check_peer, prepare_dir, HandoverError, HandoverSettings};
use crate::cache::{CredentialCache, Imported};
use crate::metrics::Metrics;
use crate::server::listener::Role;
use crate::verify::keys::Stored;
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Instant, SystemTime};

/// What a successor found when it looked for a predecessor.
pub enum Takeover {
    /// No agent runs here (first start, or after a crash: a stale socket was removed).
    Alone,
    /// A predecessor offered its sockets (checked) and keys; take its cache with
    /// [`Offered::take`] once a server is built on them.
    Offered(Offered),
    /// An agent is there but the handover failed: bind fresh, waiting while it holds the ports.
    Failed(HandoverError),
}

/// A predecessor's offer: its sockets and keys, before this agent committed to taking over.
pub struct Offered {
    channel: Channel,
    /// The predecessor's listening sockets, by what they are for.
    pub listeners: Vec<(Role, SocketAddr, std::net::TcpListener)>,
    /// The predecessor's verification keys, so this agent verifies at once.
    pub keys: Option<Stored>,
    started: Instant,
}

/// A handover between the snapshot and the end.
pub struct Taking {
    channel: Channel,
    /// Bytes of cache still accepted.
    room: usize,
    /// What the snapshot installed.
    pub snapshot: Imported,
    started: Instant,
}

fn count(metrics: &Metrics, outcome: &str) {
    metrics
        .handover
        .with_label_values(&["successor", outcome])
        .inc();
}

/// Look for a predecessor and take its offer.
pub async fn take_over(settings: &HandoverSettings, metrics: &Metrics) -> Takeover {
    let path = settings.socket();
    if !path.exists() {
        return Takeover::Alone;
    }
    // A socket in a directory someone else controls could be anyone's: do not talk to it, and
    // do not take ports over from it either (bind fresh, waiting while they are held).
    if let Err(e) = prepare_dir(&settings.dir) {
        return Takeover::Failed(e);
    }
    count(metrics, "started");
    let owned = settings.clone();
    let blocking = tokio::task::spawn_blocking(move || receive(&path, &owned));
    // The blocking side has its own socket timeouts; this bounds the whole of it.
    let result = match tokio::time::timeout(settings.timeout * 4, blocking).await {
        Ok(Ok(r)) => r,
        Ok(Err(join)) => Err(HandoverError::Io(std::io::Error::other(join.to_string()))),
        Err(_) => Err(HandoverError::Timeout),
    };
    match result {
        Ok(Some(offered)) => Takeover::Offered(offered),
        Ok(None) => Takeover::Alone,
        Err(e) => {
            count(metrics, "failed");
            Takeover::Failed(e)
        }
    }
}

/// Steps 1 and 2, blocking: `None` if the socket is stale.
fn receive(path: &Path, settings: &HandoverSettings) -> Result<Option<Offered>, HandoverError> {
    let started = Instant::now();
    let stream = match UnixStream::connect(path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
            ) =>
        {
            // Nobody listens: the agent that made it is gone.
            let _ = std::fs::remove_file(path);
            return Ok(None);
        }
        Err(e) => return Err(e.into()),
    };
    let mut channel = Channel::new(stream, settings.timeout)?;
    check_peer(&channel)?;
    let ours = Issued::new()?;
    channel.send(&Msg::Hello {
        protocol: PROTOCOL,
        min_protocol: MIN_PROTOCOL,
        version: env!("CARGO_PKG_VERSION").to_owned(),
        pid: std::process::id(),
        challenge: Some(ours.challenge()),
    })?;
    match channel.recv()? {
        // The predecessor answered our challenge before it sent its own.
        (Msg::Prove { challenge, .. }, _) => {
            ours.check(settings.timeout)?;
            proof::answer(&challenge, settings.timeout)?;
        }
        (Msg::Refused { reason }, _) => return Err(HandoverError::Refused(reason)),
        (other, _) => return Err(HandoverError::Unexpected(other.name())),
    }
    let mut keys = None;
    loop {
        match channel.recv()? {
            (Msg::Keys { keys: k }, _) => keys = Some(k),
            (Msg::Listeners { listeners }, fds) => {
                let mut checked = Vec::with_capacity(fds.len());
                for (l, fd) in listeners.into_iter().zip(fds) {
                    if let Err(why) = sockets::check(l.role, l.addr, &fd, &settings.expected) {
                        let reason = format!("{:?} {}: {why}", l.role, l.addr);
                        let _ = channel.send(&Msg::Refused {
                            reason: reason.clone(),
                        });
                        return Err(HandoverError::BadSocket(reason));
                    }
                    checked.push((l.role, l.addr, std::net::TcpListener::from(fd)));
                }
                return Ok(Some(Offered {
                    channel,
                    listeners: checked,
                    keys,
                    started,
                }));
            }
            (Msg::Refused { reason }, _) => return Err(HandoverError::Refused(reason)),
            (other, _) => return Err(HandoverError::Unexpected(other.name())),
        }
    }
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
            ..
        } = self;
        let cache = cache.clone();
        let room = settings.byte_cap();
        let deadline = settings.timeout * 4;
        // The predecessor refreshes until it retires, and finishes those under way within its
        // grace: none of ours before that.
        let settle = SystemTime::now() + deadline + settings.grace;
        let blocking = tokio::task::spawn_blocking(move || -> Result<Taking, HandoverError> {
            channel.send(&Msg::Taken)?;
            let mut taking = Taking {
                channel,
                room,
                snapshot: Imported::default(),
                started,
            };
            let until = Instant::now() + deadline;
            loop {
                if Instant::now() > until {
                    return Err(HandoverError::Timeout);
                }
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
    /// until `Done`; then log and count the handover. Returns the entries installed in all.
    pub async fn finish(
        self,
        cache: &CredentialCache,
        metrics: &Metrics,
        settings: &HandoverSettings,
    ) -> Result<Imported, HandoverError> {
        let Taking {
            mut channel,
            mut room,
            snapshot,
            started,
        } = self;
        // The predecessor sends the rest after its requests in flight finish.
        let patience = settings.timeout + settings.grace;
        let owned = cache.clone();
        let rest = tokio::task::spawn_blocking(move || -> Result<Imported, HandoverError> {
            channel.set_timeout(patience)?;
            let mut imported = Imported::default();
            loop {
                let (msg, _) = channel.recv()?;
                if import(msg, &owned, &mut room, &mut imported, SystemTime::now())? {
                    return Ok(imported);
                }
            }
        })
        .await
        .map_err(|e| HandoverError::Io(std::io::Error::other(e.to_string())))?;
        let mut total = snapshot;
        let (outcome, result) = match rest {
            Ok(more) => {
                total.add(more);
                ("completed", Ok(total))
            }
            // The sockets are ours already: a lost delta costs exchanges, not availability.
            Err(e) => {
                tracing::warn!(error = %e, "the predecessor's last entries did not arrive; those tokens will be exchanged again");
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
