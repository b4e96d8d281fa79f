//! Meeting the predecessor: the agent named in the handover directory, reached without waiting
//! on a full queue, checked to run as this user, and proved to have read the same name file
//! before anything it sends is used (step 1 of [`crate::handover`]).
//!
//! Contract: [`connect`] answers a channel to the agent named, or what was found instead (no
//! name file, a name nobody listens on, an older agent on `agent.sock`); [`greet`] sends this
//! agent's `Hello` with its proof and accepts only a `Welcome` whose proof holds. Until then the
//! peer may be anyone of this user in the namespace (a process at a dead agent's name): frames
//! stay at [`crate::handover::wire::MAX_UNCOMMITTED_FRAME`] (the successor allows more only
//! after the proof), and the little text it can send (a refusal) is kept short.

use super::{Takeover, MAX_GRACE};
use crate::handover::auth::Nonce;
use crate::handover::rendezvous::{self, Legacy, Named};
use crate::handover::wire::{Channel, Msg, MIN_PROTOCOL, PROTOCOL};
use crate::handover::{HandoverError, HandoverSettings, UNPROVEN_TEXT};
use crate::util::cut;
use std::time::Duration;

/// Nobody answers at the name: an older agent, if one listens on `agent.sock`, else nobody.
fn nobody(settings: &HandoverSettings, why: &'static str) -> Takeover {
    match rendezvous::legacy(&settings.dir) {
        Legacy::Live => Takeover::Older,
        Legacy::None | Legacy::Stale => Takeover::Alone(why),
    }
}

/// A channel to the agent named in the handover directory, or what was found instead.
pub(super) fn connect(
    settings: &HandoverSettings,
) -> Result<Result<(Channel, Named), Takeover>, HandoverError> {
    let named = match rendezvous::read_name(&settings.dir) {
        Ok(Some(named)) => named,
        Ok(None) => {
            return Ok(Err(nobody(
                settings,
                "no agent is named in the handover directory",
            )))
        }
        Err(why) => {
            return Err(HandoverError::Directory(
                settings.dir.join(rendezvous::NAME_FILE),
                why,
            ))
        }
    };
    let stream = match rendezvous::connect(&named.name, settings.timeout) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
            ) =>
        {
            return Ok(Err(nobody(
                settings,
                "the agent named in the handover directory is gone",
            )))
        }
        // Its queue stayed full: it does not accept.
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Err(HandoverError::Timeout),
        Err(e) => return Err(e.into()),
    };
    rendezvous::check_peer(&stream)?;
    let mut channel = Channel::new(stream, settings.timeout)?;
    channel.set_deadline(settings.timeout * 4);
    Ok(Ok((channel, named)))
}

/// Step 1: `Hello` with this agent's proof, answered by `Welcome` with the predecessor's; the
/// predecessor's shutdown grace.
pub(super) fn greet(
    channel: &mut Channel,
    named: &Named,
    settings: &HandoverSettings,
) -> Result<Duration, HandoverError> {
    let nonce = Nonce::generate()?;
    channel.send(&Msg::Hello {
        protocol: PROTOCOL,
        min_protocol: MIN_PROTOCOL,
        version: env!("CARGO_PKG_VERSION").to_owned(),
        pid: std::process::id(),
        nonce: nonce.to_hex(),
        proof: named.secret.successor_proof(&nonce, &named.name),
    })?;
    // The predecessor serves a few proven peers at once; others (only agents with the secret)
    // wait for a place, which one that never commits gives up within a handover timeout.
    channel.set_timeout(settings.timeout * 2);
    let welcome = channel.recv()?;
    channel.set_timeout(settings.timeout);
    match welcome {
        // Whoever listens at the name must show it read the same file before anything it
        // sends is used: a process that bound the name of an agent that died is not it.
        (Msg::Welcome { proof, .. }, _)
            if !named.secret.check_predecessor(&nonce, &named.name, &proof) =>
        {
            Err(HandoverError::Unauthenticated)
        }
        (
            Msg::Welcome {
                protocol, grace_ms, ..
            },
            _,
        ) if (MIN_PROTOCOL..=PROTOCOL).contains(&protocol) => {
            Ok(Duration::from_millis(grace_ms).min(MAX_GRACE))
        }
        (Msg::Welcome { protocol, .. }, _) => Err(HandoverError::Refused(format!(
            "the predecessor chose protocol {protocol}, which this agent does not speak"
        ))),
        // Said before the peer proved anything (a genuine predecessor refuses without a proof
        // too): logged, so kept short, since whatever listens at the name wrote it.
        (Msg::Refused { reason }, _) => Err(HandoverError::Refused(cut(reason, UNPROVEN_TEXT))),
        (other, _) => Err(HandoverError::Unexpected(other.name())),
    }
}
