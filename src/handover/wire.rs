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
use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

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
const MAX_FDS: usize = 32;

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

pub use crate::server::listener::Role;

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

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the peer closed the connection")]
    Closed,
    #[error("frame of {0} bytes is larger than allowed")]
    TooLarge(usize),
    #[error("frame is not a handover message: {0}")]
    Malformed(String),
    #[error("{0} descriptors came with a frame that names {1}")]
    Descriptors(usize, usize),
    #[error("the peer did not answer in time")]
    Timeout,
}

/// One end of a handover connection (blocking; run it off the async runtime).
pub struct Channel {
    stream: UnixStream,
    /// How long one read or write may wait.
    step: Duration,
    /// When everything on this channel must be done by, if ever.
    deadline: Option<Instant>,
    /// The largest frame [`Channel::recv`] reads.
    max_frame: usize,
}

fn io_err(e: nix::Error) -> std::io::Error {
    std::io::Error::from_raw_os_error(e as i32)
}

fn timed_out(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

impl Channel {
    /// A channel on `stream` whose reads and writes each wait at most `step`, with no deadline,
    /// reading frames of at most [`MAX_UNCOMMITTED_FRAME`].
    pub fn new(stream: UnixStream, step: Duration) -> std::io::Result<Channel> {
        stream.set_nonblocking(false)?;
        Ok(Channel {
            stream,
            step,
            deadline: None,
            max_frame: MAX_UNCOMMITTED_FRAME,
        })
    }

    pub fn set_timeout(&mut self, step: Duration) {
        self.step = step;
    }

    /// Everything from now on must be done within `within` (replacing any earlier deadline).
    pub fn set_deadline(&mut self, within: Duration) {
        self.deadline = Some(Instant::now() + within);
    }

    /// Read frames of up to `max` bytes (at most [`MAX_FRAME`]).
    pub fn set_max_frame(&mut self, max: usize) {
        self.max_frame = max.min(MAX_FRAME);
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// The peer's user id (`SO_PEERCRED`, as it was when it connected).
    pub fn peer_uid(&self) -> std::io::Result<u32> {
        super::rendezvous::peer_uid(&self.stream)
    }

    /// Set the socket's timeouts for the next system call: the step, or what is left of the
    /// deadline if that is shorter; past the deadline, [`WireError::Timeout`].
    fn arm(&self) -> Result<(), WireError> {
        let mut wait = self.step;
        if let Some(deadline) = self.deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(WireError::Timeout);
            }
            wait = wait.min(left);
        }
        // A zero timeout would mean "wait forever".
        let wait = Some(wait.max(Duration::from_millis(1)));
        self.stream.set_read_timeout(wait)?;
        self.stream.set_write_timeout(wait)?;
        Ok(())
    }

    fn read_full(&mut self, mut buf: &mut [u8]) -> Result<(), WireError> {
        while !buf.is_empty() {
            self.arm()?;
            match self.stream.read(buf) {
                Ok(0) => return Err(WireError::Closed),
                Ok(n) => buf = &mut buf[n..],
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if timed_out(&e) => return Err(WireError::Timeout),
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    fn write_full(&mut self, mut buf: &[u8]) -> Result<(), WireError> {
        while !buf.is_empty() {
            self.arm()?;
            match self.stream.write(buf) {
                Ok(0) => return Err(WireError::Closed),
                Ok(n) => buf = &buf[n..],
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if timed_out(&e) => return Err(WireError::Timeout),
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    fn frame(msg: &Msg) -> Result<Vec<u8>, WireError> {
        let json = serde_json::to_vec(msg).map_err(|e| WireError::Malformed(e.to_string()))?;
        if json.len() > MAX_FRAME {
            return Err(WireError::TooLarge(json.len()));
        }
        let mut frame = Vec::with_capacity(4 + json.len());
        frame.extend_from_slice(&(json.len() as u32).to_be_bytes());
        frame.extend_from_slice(&json);
        Ok(frame)
    }

    pub fn send(&mut self, msg: &Msg) -> Result<(), WireError> {
        let frame = Self::frame(msg)?;
        self.write_full(&frame)
    }

    /// Send `msg` with `fds` attached to its first bytes.
    pub fn send_with_fds(&mut self, msg: &Msg, fds: &[RawFd]) -> Result<(), WireError> {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};
        let frame = Self::frame(msg)?;
        let cmsg = [ControlMessage::ScmRights(fds)];
        let sent = loop {
            self.arm()?;
            match sendmsg::<UnixAddr>(
                self.stream.as_raw_fd(),
                &[IoSlice::new(&frame)],
                &cmsg,
                MsgFlags::empty(),
                None,
            ) {
                Ok(n) => break n,
                Err(nix::Error::EINTR) => continue,
                Err(nix::Error::EAGAIN) => return Err(WireError::Timeout),
                Err(e) => return Err(io_err(e).into()),
            }
        };
        self.write_full(&frame[sent..])
    }

    /// The next message and the descriptors that came with it.
    pub fn recv(&mut self) -> Result<(Msg, Vec<OwnedFd>), WireError> {
        use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixAddr};
        let mut len = [0u8; 4];
        let mut fds = Vec::new();
        let mut cmsg_space = nix::cmsg_space!([RawFd; MAX_FDS]);
        let got = loop {
            self.arm()?;
            let mut iov = [IoSliceMut::new(&mut len)];
            match recvmsg::<UnixAddr>(
                self.stream.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg_space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(msg) => {
                    for c in msg.cmsgs().map_err(io_err)? {
                        if let ControlMessageOwned::ScmRights(raw) = c {
                            // SAFETY: the kernel just created these descriptors for this
                            // process; nothing else owns them.
                            fds.extend(
                                raw.into_iter()
                                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                            );
                        }
                    }
                    break msg.bytes;
                }
                Err(nix::Error::EINTR) => continue,
                Err(nix::Error::EAGAIN) => return Err(WireError::Timeout),
                Err(e) => return Err(io_err(e).into()),
            }
        };
        if got == 0 {
            return Err(WireError::Closed);
        }
        self.read_full(&mut len[got..])?;
        let n = u32::from_be_bytes(len) as usize;
        if n > self.max_frame {
            return Err(WireError::TooLarge(n));
        }
        let mut body = vec![0u8; n];
        self.read_full(&mut body)?;
        let msg: Msg =
            serde_json::from_slice(&body).map_err(|e| WireError::Malformed(e.to_string()))?;
        let named = match &msg {
            Msg::Listeners { listeners } => listeners.len(),
            _ => 0,
        };
        if fds.len() != named {
            return Err(WireError::Descriptors(fds.len(), named));
        }
        Ok((msg, fds))
    }

    /// Block until the peer closes its end or sends anything (no timeout, no deadline): how a
    /// predecessor that handed over learns that its successor is gone. Returns at once if this
    /// end is shut down.
    pub fn wait_closed(&mut self) {
        let _ = self.stream.set_read_timeout(None);
        let mut byte = [0u8; 1];
        loop {
            match self.stream.read(&mut byte) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                _ => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
