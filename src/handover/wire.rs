//! The handover protocol on the wire: length-prefixed JSON frames on a Unix stream socket, with
//! listening sockets passed as `SCM_RIGHTS` on the frame that lists them.
//!
//! Contract: a frame is a 4-byte big-endian length and that many bytes of JSON, one [`Msg`].
//! A channel reads frames of at most [`MAX_UNCOMMITTED_FRAME`] bytes until told otherwise (the
//! predecessor never reads more from a successor; a successor allows more from the predecessor it
//! authenticated), so a peer cannot make the agent allocate more by claiming a long frame.
//! File descriptors ride on the first bytes of the frame that names them, in the order it names
//! them. Every read and write is bounded by the channel's step timeout and by its deadline, if it
//! has one, checked between system calls: a peer that stops talking, or trickles a byte at a time,
//! is cut off when the deadline passes, never a hang. An oversized or unparseable frame, or
//! descriptors with a frame that does not name them, is an error. Frames carry tokens and
//! credentials: nothing here implements `Debug` for them or logs them, and they exist only in
//! memory and in the socket's kernel buffers, never on disk.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

/// The newest protocol this build speaks, and the oldest. Peers agree on the newest both
/// speak; with none in common the handover is refused and the successor binds fresh. Version 4
/// adds the proofs of [`super::auth`]: version 3 trusted any peer of this user in this network
/// namespace, which every root hostNetwork container is, so a version-3 agent is neither handed
/// anything nor taken over from (the first upgrade from it binds fresh). Version 3 ran over an
/// abstract Unix socket, which only this network namespace reaches (see
/// [`super::rendezvous`]), instead of version 2's pathname socket and namespace proofs; version
/// 1 agents sent secrets to any peer and are never handed anything.
pub const PROTOCOL: u32 = 4;
pub const MIN_PROTOCOL: u32 = 4;
/// Frames larger than this are refused: entries travel in chunks well below it.
pub const MAX_FRAME: usize = 64 * 1024 * 1024;
/// What a channel reads per frame until it is told it may read more: a `Hello`, `Taken` or
/// `Refused` is a few hundred bytes.
pub const MAX_UNCOMMITTED_FRAME: usize = 4 * 1024;
/// What an imported entry costs beyond its token and body bytes (its structure, plan and key),
/// counted against the successor's byte cap.
pub const ENTRY_OVERHEAD: usize = 256;
/// Descriptors accepted with one frame.
pub(super) const MAX_FDS: usize = 32;

/// One message of the protocol. See [`super`] for the order they come in.
#[derive(Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Msg {
    /// Successor → predecessor: who is asking, and the protocols it speaks.
    Hello {
        protocol: u32,
        #[serde(default = "one")]
        min_protocol: u32,
        version: String,
        pid: u32,
        /// Protocol 4: a fresh challenge (hex), and the proof that the successor read the
        /// predecessor's name file ([`super::auth`]). Empty from an older agent: refused.
        #[serde(default)]
        nonce: String,
        #[serde(default)]
        proof: String,
    },
    /// Either way: no handover, and why.
    Refused { reason: String },
    /// Predecessor → successor: the protocol agreed, and the predecessor's shutdown grace: after
    /// `Retiring` it sends the rest once its requests in flight finish, within that long.
    /// Protocol 4: `proof` shows the predecessor read the same name file, for this `Hello`.
    Welcome {
        protocol: u32,
        grace_ms: u64,
        #[serde(default)]
        proof: String,
    },
    /// Predecessor → successor: the cluster's verification keys it holds.
    Keys { keys: crate::verify::keys::Stored },
    /// Predecessor → successor: its listening sockets, descriptors attached in this order.
    Listeners { listeners: Vec<WireListener> },
    /// Successor → predecessor: it takes over (its server is ready on the sockets); send the
    /// cache.
    Taken,
    /// Predecessor → successor: cache entries, in chunks (the snapshot, then the delta).
    Entries { entries: Vec<WireEntry> },
    /// Predecessor → successor: the snapshot is complete; the predecessor retires now.
    Retiring,
    /// Predecessor → successor: tokens it evicted for their own fault since the snapshot.
    Evicted { tokens: Vec<String> },
    /// Predecessor → successor: refusals it remembers.
    Refusals { refusals: Vec<WireRefusal> },
    /// Predecessor → successor: nothing more.
    Done,
}

fn one() -> u32 {
    1
}

impl Msg {
    pub fn name(&self) -> &'static str {
        match self {
            Msg::Hello { .. } => "hello",
            Msg::Refused { .. } => "refused",
            Msg::Welcome { .. } => "welcome",
            Msg::Keys { .. } => "keys",
            Msg::Listeners { .. } => "listeners",
            Msg::Taken => "taken",
            Msg::Entries { .. } => "entries",
            Msg::Retiring => "retiring",
            Msg::Evicted { .. } => "evicted",
            Msg::Refusals { .. } => "refusals",
            Msg::Done => "done",
        }
    }

    /// Roughly how many bytes of cache it carries, for the successor's cap.
    pub fn weight(&self) -> usize {
        match self {
            // Each entry costs its parsed form too, however small its strings: a frame of empty
            // entries must not weigh nothing.
            Msg::Entries { entries } => entries
                .iter()
                .map(|e| e.token.len() + e.body.len() + ENTRY_OVERHEAD)
                .sum(),
            Msg::Refusals { refusals } => refusals.iter().map(|r| r.message.len() + 128).sum(),
            Msg::Evicted { tokens } => tokens.len() * 64,
            _ => 0,
        }
    }
}

pub use crate::server::bind::Role;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireListener {
    pub role: Role,
    pub addr: SocketAddr,
}

/// A cache entry in transit. Holds a token and credentials: deliberately no `Debug`. Fields a
/// peer of another version may not send have defaults (the plan is checked against the
/// credentials on arrival and made afresh if it does not fit).
#[derive(Serialize, Deserialize)]
pub struct WireEntry {
    /// The pod's token, as it sent it.
    pub token: String,
    /// The credentials body, exactly as served.
    pub body: String,
    #[serde(default)]
    pub refresh_at_ms: u64,
    #[serde(default)]
    pub hard_at_ms: u64,
    #[serde(default)]
    pub serve_queued_until_ms: u64,
    #[serde(default)]
    pub valid_until_ms: u64,
    /// 0 unused, 1 used, 2 dormant.
    #[serde(default)]
    pub demand: u8,
    #[serde(default)]
    pub failures: u32,
    #[serde(default)]
    pub retry_after_ms: u64,
    /// The pod (hex of its key) when the token was verified; absent from older agents.
    #[serde(default)]
    pub pod: Option<String>,
}

/// A remembered refusal in transit: whose (a token hash, hex), what, and how long it is left.
#[derive(Serialize, Deserialize)]
pub struct WireRefusal {
    pub token: String,
    /// `upstream` (EKS Auth's), `unverified` or `other_node`.
    pub kind: String,
    #[serde(default)]
    pub status: u16,
    #[serde(default)]
    pub code: String,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub request_id: Option<String>,
    pub left_ms: u64,
}

pub use super::channel::{Channel, WireError};

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;
    use std::time::{Duration, Instant};

    fn pair() -> (Channel, Channel) {
        let (a, b) = UnixStream::pair().expect("pair");
        let t = Duration::from_secs(2);
        (
            Channel::new(a, t).expect("a"),
            Channel::new(b, t).expect("b"),
        )
    }

    #[test]
    fn frames_and_descriptors_arrive_together() {
        let (mut a, mut b) = pair();
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        a.send(&Msg::Hello {
            protocol: PROTOCOL,
            min_protocol: MIN_PROTOCOL,
            version: "x".into(),
            pid: 1,
            nonce: String::new(),
            proof: String::new(),
        })
        .expect("send");
        a.send_with_fds(
            &Msg::Listeners {
                listeners: vec![WireListener {
                    role: Role::Credentials,
                    addr,
                }],
            },
            &[l.as_raw_fd()],
        )
        .expect("send fds");
        let (hello, fds) = b.recv().expect("hello");
        assert!(
            matches!(
                hello,
                Msg::Hello {
                    protocol: PROTOCOL,
                    ..
                }
            ) && fds.is_empty()
        );
        let (listeners, mut fds) = b.recv().expect("listeners");
        assert!(matches!(listeners, Msg::Listeners { .. }));
        assert_eq!(fds.len(), 1);
        // The descriptor is the same listening socket: a connection to it is accepted there.
        let received = std::net::TcpListener::from(fds.remove(0));
        assert_eq!(received.local_addr().expect("addr"), addr);
        let _client = std::net::TcpStream::connect(addr).expect("connect");
        drop(l);
        received.accept().expect("accepted on the passed socket");
        assert_eq!(a.peer_uid().ok(), b.peer_uid().ok());
    }

    #[test]
    fn bad_frames_are_errors_not_hangs() {
        let (mut a, mut b) = pair();
        a.stream.write_all(&u32::MAX.to_be_bytes()).expect("write");
        assert!(matches!(b.recv(), Err(WireError::TooLarge(_))));
        let (mut a, mut b) = pair();
        a.stream.write_all(&5u32.to_be_bytes()).expect("write");
        a.stream.write_all(b"nope!").expect("write");
        assert!(matches!(b.recv(), Err(WireError::Malformed(_))));
        let (a, mut b) = pair();
        drop(a);
        assert!(matches!(b.recv(), Err(WireError::Closed)));
        // A silent peer: the read times out.
        let (a, b) = UnixStream::pair().expect("pair");
        let mut b = Channel::new(b, Duration::from_millis(100)).expect("b");
        assert!(matches!(b.recv(), Err(WireError::Timeout)));
        drop(a);
        // Descriptors with a frame that does not name them.
        let (mut a, mut b) = pair();
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        a.send_with_fds(&Msg::Taken, &[l.as_raw_fd()])
            .expect("send");
        assert!(matches!(b.recv(), Err(WireError::Descriptors(1, 0))));
    }

    #[test]
    fn frames_are_capped_until_the_channel_allows_more() {
        let big = MAX_UNCOMMITTED_FRAME + 1;
        let (mut a, mut b) = pair();
        a.stream
            .write_all(&(big as u32).to_be_bytes())
            .expect("write");
        assert!(matches!(b.recv(), Err(WireError::TooLarge(n)) if n == big));
        let (mut a, mut b) = pair();
        b.set_max_frame(MAX_FRAME);
        let entries = Msg::Refused {
            reason: "x".repeat(big),
        };
        a.send(&entries).expect("send");
        assert!(matches!(b.recv(), Ok((Msg::Refused { .. }, _))));
    }

    #[test]
    fn a_trickling_peer_is_cut_off_at_the_deadline() {
        let (a, b) = UnixStream::pair().expect("pair");
        let mut b = Channel::new(b, Duration::from_millis(300)).expect("b");
        b.set_deadline(Duration::from_millis(500));
        // A frame's length, then one byte of it every 100 ms: every read succeeds within the
        // step timeout.
        let trickle = std::thread::spawn(move || {
            let mut a = a;
            a.write_all(&100u32.to_be_bytes()).expect("length");
            for _ in 0..30 {
                if a.write_all(b"\x00").is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let started = Instant::now();
        assert!(matches!(b.recv(), Err(WireError::Timeout)));
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(450) && took < Duration::from_millis(1500),
            "{took:?}"
        );
        drop(b);
        trickle.join().expect("trickle");
    }
}
