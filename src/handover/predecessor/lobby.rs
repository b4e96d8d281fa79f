//! Peers that have proved nothing yet: held by the listening thread, without a thread of their
//! own, until their `Hello` shows they read this agent's name file.
//!
//! Contract: [`Lobby::admit`] holds a connection of this user (non-blocking) for at most one
//! handover timeout from its accept, and at most [`MAX_WAITING`] at once (a newcomer past that
//! closes the one that has waited longest). [`Lobby::read`] reads what each has sent, never past
//! its one frame (at most [`MAX_UNCOMMITTED_FRAME`] bytes), and hands back those whose `Hello`
//! proves it ([`super::peer::prove`]). Every other ending (a proof that does not hold, another
//! message, a frame too large, a close, the deadline) closes the connection before a byte is
//! sent, counted `unauthenticated` and logged at a pace ([`Shared::unproven`]).
//!
//! Why: a thread and one of [`super::MAX_PEERS`] places go only to a peer that proved it read
//! the name file, so no number of silent, slow or chattering connections from anyone root in
//! the namespace holds up a successor. A successor writes its `Hello` as soon as it connects, so
//! it is usually whole by the time it is accepted and is proven at once.

use super::peer::{prove, Proven};
use super::Shared;
use crate::handover::wire::{Msg, WireError, MAX_UNCOMMITTED_FRAME};
use crate::handover::HandoverError;
use std::io::Read;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Instant;

/// Connections waiting to prove themselves at once; each costs a descriptor and at most one
/// frame's bytes.
pub(super) const MAX_WAITING: usize = 64;

/// A peer whose `Hello` proved it read the name file, with its connection.
pub(super) struct Admitted {
    pub(super) id: u64,
    pub(super) stream: UnixStream,
    pub(super) hello: Proven,
}

struct Waiting {
    id: u64,
    stream: UnixStream,
    /// Accepted at plus one handover timeout.
    until: Instant,
    /// The frame so far: its 4-byte length, then its body.
    got: Vec<u8>,
}

impl Waiting {
    /// Read what has arrived, never past the frame: `None` while more is to come.
    fn read(&mut self) -> Option<Result<Msg, HandoverError>> {
        let mut buf = [0u8; 1024];
        loop {
            let want = match self.got.get(..4) {
                None => 4,
                Some(len) => {
                    let n = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
                    if n > MAX_UNCOMMITTED_FRAME {
                        return Some(Err(WireError::TooLarge(n).into()));
                    }
                    4 + n
                }
            };
            // Once the length is known, `want` is at least 4: an empty frame is parsed (and
            // refused) like any other.
            if self.got.len() == want {
                let msg = serde_json::from_slice(&self.got[4..])
                    .map_err(|e| WireError::Malformed(e.to_string()).into());
                return Some(msg);
            }
            let room = (want - self.got.len()).min(buf.len());
            match self.stream.read(&mut buf[..room]) {
                Ok(0) => return Some(Err(WireError::Closed.into())),
                Ok(k) => self.got.extend_from_slice(&buf[..k]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return None,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Some(Err(e.into())),
            }
        }
    }
}

/// A peer's frame, read whole: admitted if it proves the peer read the name file, else closed
/// and counted.
fn end(
    shared: &Shared,
    w: Waiting,
    frame: Result<Msg, Option<HandoverError>>,
    admitted: &mut Vec<Admitted>,
) {
    match frame.and_then(|msg| prove(msg, shared)) {
        Ok(hello) => admitted.push(Admitted {
            id: w.id,
            stream: w.stream,
            hello,
        }),
        Err(why) => shared.unproven(why),
    }
}

#[derive(Default)]
pub(super) struct Lobby {
    waiting: Vec<Waiting>,
}

impl Lobby {
    /// Hold `stream` (peer `id`, of this user) until it proves itself; read at once, since a
    /// successor's `Hello` is usually there already. Call [`Lobby::read`] first: a full lobby
    /// closes the peer that has waited longest, which must not be one whose proof has arrived.
    pub(super) fn admit(&mut self, shared: &Shared, stream: UnixStream, id: u64) -> Vec<Admitted> {
        if let Err(e) = stream.set_nonblocking(true) {
            shared.unproven(Some(e.into()));
            return Vec::new();
        }
        let mut w = Waiting {
            id,
            stream,
            until: Instant::now() + shared.settings.timeout,
            got: Vec::new(),
        };
        let Some(ended) = w.read() else {
            if self.waiting.len() >= MAX_WAITING {
                // The one that has waited longest had the most time to speak.
                self.waiting.remove(0);
                shared.unproven(Some(HandoverError::Timeout));
            }
            self.waiting.push(w);
            return Vec::new();
        };
        let mut admitted = Vec::new();
        end(shared, w, ended.map_err(Some), &mut admitted);
        admitted
    }

    /// Read the waiting connections `ready` names (in the order of [`Lobby::fds`] when polled;
    /// others are not read, which costs a peer that trickles bytes one read of its own), and
    /// close those past their deadline; the ones that proved themselves, in the order they came.
    pub(super) fn read(&mut self, shared: &Shared, ready: &[bool]) -> Vec<Admitted> {
        let now = Instant::now();
        let mut admitted = Vec::new();
        let waiting = std::mem::take(&mut self.waiting);
        for (i, mut w) in waiting.into_iter().enumerate() {
            let read = if ready.get(i).copied().unwrap_or(false) {
                w.read()
            } else {
                None
            };
            match read {
                Some(ended) => end(shared, w, ended.map_err(Some), &mut admitted),
                None if now >= w.until => shared.unproven(Some(HandoverError::Timeout)),
                None => self.waiting.push(w),
            }
        }
        admitted
    }

    /// The descriptors to wait on, in the order [`Lobby::read`] takes their readiness.
    pub(super) fn fds(&self) -> impl Iterator<Item = RawFd> + '_ {
        self.waiting.iter().map(|w| w.stream.as_raw_fd())
    }

    /// When the first wait ends.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.waiting.iter().map(|w| w.until).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn waiting() -> (Waiting, UnixStream) {
        let (ours, theirs) = UnixStream::pair().expect("pair");
        ours.set_nonblocking(true).expect("nonblocking");
        let w = Waiting {
            id: 1,
            stream: ours,
            until: Instant::now(),
            got: Vec::new(),
        };
        (w, theirs)
    }

    #[test]
    fn a_frame_is_read_as_it_comes_and_never_past_its_end() {
        let (mut w, mut peer) = waiting();
        assert!(w.read().is_none(), "nothing sent yet");
        let body = br#"{"type":"taken"}"#;
        peer.write_all(&(body.len() as u32).to_be_bytes()[..3])
            .expect("part of the length");
        assert!(w.read().is_none());
        peer.write_all(&(body.len() as u32).to_be_bytes()[3..])
            .and_then(|()| peer.write_all(&body[..5]))
            .expect("the rest of the length, part of the body");
        assert!(w.read().is_none());
        // The rest, and bytes of a next frame that are not this one's to read.
        peer.write_all(&body[5..])
            .and_then(|()| peer.write_all(b"more"))
            .expect("the rest");
        assert!(matches!(w.read(), Some(Ok(Msg::Taken))));
        let mut left = [0u8; 8];
        let n = w.stream.read(&mut left).expect("left unread");
        assert_eq!(&left[..n], b"more");
    }

    #[test]
    fn a_frame_too_large_a_close_or_junk_ends_the_wait() {
        let (mut w, mut peer) = waiting();
        let too_large = (MAX_UNCOMMITTED_FRAME as u32 + 1).to_be_bytes();
        peer.write_all(&too_large).expect("length");
        let e = w.read().and_then(Result::err).expect("an error");
        assert!(e.to_string().contains("larger than allowed"), "{e}");

        let (mut w, peer) = waiting();
        drop(peer);
        let e = w.read().and_then(Result::err).expect("an error");
        assert!(e.to_string().contains("closed"), "{e}");

        let (mut w, mut peer) = waiting();
        peer.write_all(&[0, 0, 0, 2, b'{', b'{']).expect("junk");
        let e = w.read().and_then(Result::err).expect("an error");
        assert!(e.to_string().contains("not a handover message"), "{e}");

        let (mut w, mut peer) = waiting();
        peer.write_all(&[0, 0, 0, 0]).expect("an empty frame");
        assert!(
            matches!(w.read(), Some(Err(_))),
            "an empty frame is no message"
        );
    }
}
