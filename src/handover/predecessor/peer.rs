//! One peer of the predecessor, from its proven `Hello` to the end of the link to it: the steps
//! of [`crate::handover`] on this side, and what each ending means for this agent.
//!
//! Contract: [`prove`] decides whether a `Hello` proves its sender read this agent's name file
//! (the lobby asks it before a peer gets a thread); only a proven peer is served here. A peer
//! that has not said `Taken` gets the keys and the listening sockets, never a
//! token or credential (`abandoned`). The first to commit moves the phase from serving to
//! committed; any other is refused. A failure before `Retiring` leaves this agent serving and
//! free to hand over again; a failure after it retired, or a successor that goes after taking
//! over, makes it serve again ([`super::Predecessor::lost`]) unless it is stopping.

use super::{Phase, Shared};
use crate::cache::{CredentialCache, Exported};
use crate::handover::auth::Nonce;
use crate::handover::convert::{entry_to_wire, hash_to_wire, refusal_to_wire};
use crate::handover::wire::{Channel, Msg, WireListener, MIN_PROTOCOL, PROTOCOL};
use crate::handover::{HandoverError, CHUNK};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::time::Instant;

/// Where one peer's handover ended.
enum Ended {
    /// Handed over: the connection stays open as the link to the successor.
    Completed(usize, Channel),
    /// The peer never committed (`Taken`): it got the keys and the listening sockets, no token
    /// or credential.
    Abandoned(HandoverError),
    /// Failed before this agent retired: it still serves.
    Failed(HandoverError),
    /// Failed after this agent retired: it accepts nothing until it serves again.
    FailedRetired(HandoverError),
}

/// One peer, from its proven `Hello` to the end of the link to it.
pub(super) fn serve_peer(shared: &Shared, stream: UnixStream, hello: Proven) {
    let started = Instant::now();
    match hand_over(shared, stream, hello) {
        Ended::Completed(sent, mut link) => {
            shared.set_phase(Phase::HandedOver);
            let _ = shared.handed_tx.send(true);
            shared.count("completed");
            shared
                .metrics
                .handover_entries
                .with_label_values(&["sent"])
                .inc_by(sent as u64);
            shared
                .metrics
                .handover_seconds
                .with_label_values(&["predecessor"])
                .set(started.elapsed().as_secs_f64());
            tracing::info!(
                entries = sent,
                "handed over to the next agent; idle until terminated, or until it goes"
            );
            link.wait_closed();
            if !shared.stopping.load(Ordering::Relaxed) {
                shared.count("resumed");
                tracing::warn!(
                    "the agent that took over is gone; \
                    serving again on the sockets this one still holds"
                );
                shared.lost();
            }
        }
        Ended::Abandoned(e) => {
            shared.count("abandoned");
            tracing::warn!(error = %e, "a peer on the handover socket never took over; \
                it got the keys and the listening sockets, no token or credential");
        }
        Ended::Failed(e) => {
            shared.count("failed");
            tracing::warn!(error = %e, "a handover to a new agent failed; still serving");
        }
        Ended::FailedRetired(e) => {
            shared.count("failed");
            if !shared.stopping.load(Ordering::Relaxed) {
                shared.count("resumed");
                tracing::error!(error = %e, "the new agent failed after this one retired; \
                    serving again on the sockets this one still holds");
                shared.lost();
            }
        }
    }
}

fn send_chunks(
    channel: &mut Channel,
    entries: impl Iterator<Item = Exported>,
) -> Result<usize, HandoverError> {
    let mut entries = entries.map(entry_to_wire).peekable();
    let mut sent = 0;
    while entries.peek().is_some() {
        let chunk: Vec<_> = entries.by_ref().take(CHUNK).collect();
        sent += chunk.len();
        channel.send(&Msg::Entries { entries: chunk })?;
    }
    Ok(sent)
}

/// A `Hello` whose proof was checked: the peer read this agent's name file.
pub(super) struct Proven {
    nonce: Nonce,
    protocol: u32,
    min_protocol: u32,
}

/// Step 1: whether `msg` is a `Hello` whose proof holds. `Err(None)`: a proof that does not
/// hold; `Err(Some(_))`: another message.
pub(super) fn prove(msg: Msg, shared: &Shared) -> Result<Proven, Option<HandoverError>> {
    match msg {
        Msg::Hello {
            protocol,
            min_protocol,
            nonce,
            proof,
            ..
        } => Nonce::from_hex(&nonce)
            .filter(|n| shared.secret.check_successor(n, &shared.name, &proof))
            .map(|nonce| Proven {
                nonce,
                protocol,
                min_protocol,
            })
            .ok_or(None),
        other => Err(Some(HandoverError::Unexpected(other.name()))),
    }
}

/// Step 2: a peer that proved it read the name file gets the keys and sockets.
fn offer_sockets(
    channel: &mut Channel,
    shared: &Shared,
    hello: Proven,
) -> Result<(), HandoverError> {
    let Proven {
        nonce,
        protocol,
        min_protocol,
    } = hello;
    let agreed = protocol.min(PROTOCOL);
    if agreed < MIN_PROTOCOL.max(min_protocol) {
        let reason = format!(
            "no protocol in common (this agent speaks {MIN_PROTOCOL} to {PROTOCOL}, \
            the peer {min_protocol} to {protocol})"
        );
        let _ = channel.send(&Msg::Refused {
            reason: reason.clone(),
        });
        return Err(HandoverError::Refused(reason));
    }
    if shared.phase() != Phase::Serving {
        let reason = "this agent handed over already, or is handing over".to_owned();
        let _ = channel.send(&Msg::Refused {
            reason: reason.clone(),
        });
        return Err(HandoverError::Refused(reason));
    }
    let grace_ms = u64::try_from(shared.settings.grace.as_millis()).unwrap_or(u64::MAX);
    channel.send(&Msg::Welcome {
        protocol: agreed,
        grace_ms,
        proof: shared.secret.predecessor_proof(&nonce, &shared.name),
    })?;
    let offer = &shared.offer;
    if let Some(keys) = offer.verifier.as_ref().and_then(|v| v.snapshot()) {
        channel.send(&Msg::Keys { keys })?;
    }
    let (listeners, fds): (Vec<WireListener>, Vec<RawFd>) = offer
        .listeners
        .iter()
        .map(|(role, addr, fd)| {
            (
                WireListener {
                    role: *role,
                    addr: *addr,
                },
                fd.as_raw_fd(),
            )
        })
        .unzip();
    channel.send_with_fds(&Msg::Listeners { listeners }, &fds)?;
    Ok(())
}

/// The predecessor's side of one handover, blocking.
fn hand_over(shared: &Shared, stream: UnixStream, hello: Proven) -> Ended {
    let settings = &shared.settings;
    let offer = &shared.offer;
    let mut channel = match Channel::new(stream, settings.timeout) {
        Ok(c) => c,
        Err(e) => return Ended::Failed(e.into()),
    };
    // The offer within one step; and the successor builds its server on the sockets before it
    // commits, which may take a while.
    channel.set_deadline(settings.timeout);
    if let Err(e) = offer_sockets(&mut channel, shared, hello) {
        return Ended::Failed(e);
    }
    shared.count("started");
    channel.set_timeout(settings.timeout * 6);
    channel.set_deadline(settings.timeout * 6);
    match channel.recv() {
        Ok((Msg::Taken, _)) => {}
        Ok((other, _)) => return Ended::Abandoned(HandoverError::Unexpected(other.name())),
        Err(e) => return Ended::Abandoned(e.into()),
    }
    if !shared.advance(Phase::Serving, Phase::Committed) {
        let _ = channel.send(&Msg::Refused {
            reason: "another agent took over first".into(),
        });
        return Ended::Abandoned(HandoverError::Refused(
            "another agent took over first".into(),
        ));
    }
    // The successor gives the snapshot four steps.
    channel.set_timeout(settings.timeout);
    channel.set_deadline(settings.timeout * 4);
    let (snapshot, newest) = offer.cache.export_iter(0);
    let before_retiring = send_chunks(&mut channel, snapshot)
        .and_then(|n| Ok(channel.send(&Msg::Retiring).map(|()| n)?));
    let sent = match before_retiring {
        Ok(n) => n,
        Err(e) => {
            // Not retired: still serving, and free to hand over to another.
            shared.set_phase(Phase::Serving);
            return Ended::Failed(e);
        }
    };
    // Both serve on the same sockets now; stop here, finish what is in flight.
    shared.runtime.block_on((offer.retire)());
    channel.set_deadline(settings.timeout * 2);
    match send_rest(&mut channel, &offer.cache, newest) {
        Ok(n) => Ended::Completed(sent + n, channel),
        Err(e) => Ended::FailedRetired(e),
    }
}

/// Step 5: what was exchanged since the snapshot at `newest`, the evictions, the refusals and
/// `Done`; how many entries were sent.
fn send_rest(
    channel: &mut Channel,
    cache: &CredentialCache,
    newest: u64,
) -> Result<usize, HandoverError> {
    let (delta, _) = cache.export_iter(newest);
    let sent = send_chunks(channel, delta)?;
    let evicted = cache.evicted_since(newest);
    channel.send(&Msg::Evicted {
        tokens: evicted.iter().map(hash_to_wire).collect(),
    })?;
    let refusals = cache.refusals();
    channel.send(&Msg::Refusals {
        refusals: refusals
            .iter()
            .map(|(h, r, left)| refusal_to_wire(h, r, *left))
            .collect(),
    })?;
    channel.send(&Msg::Done)?;
    Ok(sent)
}
