//! Upgrades and restarts without a gap: a starting agent takes its predecessor's listening
//! sockets and cached credentials over a Unix socket, instead of binding fresh after it is gone.
//!
//! Contract. Every agent, once serving, listens on `<dir>/agent.sock` (`--handover-dir`,
//! default `/run/pod-identity-agent`; the directory is made mode 0700 and must belong to this
//! user, and a peer must run as this user too, checked with `SO_PEERCRED`). A starting agent
//! that finds a live socket there (a *successor*) takes over from the agent behind it (its
//! *predecessor*), in this order ([`wire`] has the frames, protocol [`wire::PROTOCOL`]):
//! 1. successor → `Hello` (the protocols it speaks, and a challenge); the predecessor answers
//!    the challenge ([`proof`]: only a process in the same network namespace can), then sends
//!    `Prove` with its own challenge, which the successor answers. Nothing is sent to a peer that
//!    has not proved it shares the namespace; a predecessor with no protocol in common, or one
//!    that already handed over, answers `Refused`;
//! 2. predecessor → its verification keys (`Keys`) and its listening sockets (`Listeners`,
//!    passed with `SCM_RIGHTS`: the same sockets, one accept queue). The successor checks every
//!    descriptor ([`sockets`]: listening TCP, bound where the message says and where it would
//!    bind itself, in its namespace) or refuses the whole handover;
//! 3. the successor builds its server on those sockets, not accepting yet, and says `Taken`;
//! 4. only now the predecessor sends its cache (`Entries`, in chunks: tokens, credentials,
//!    refresh plans, backoff state, the pod of a verified token; in memory only, never on disk),
//!    then `Retiring`, and retires: it stops accepting and refreshing and lets its requests in
//!    flight finish (within its shutdown grace). The successor imports each chunk as it arrives,
//!    within its own capacity and a byte cap, and starts accepting at `Retiring`;
//! 5. the predecessor sends what it exchanged meanwhile (`Entries`), the tokens it evicted for
//!    their own fault since the snapshot (`Evicted`), the refusals it remembers (`Refusals`) and
//!    `Done`, then idles until it is terminated. The successor listens on the socket path.
//!
//! A peer that says `Hello` and never `Taken` gets no token, no credentials and no socket
//! (counted as `abandoned`). A predecessor whose successor fails after it retired exits at once
//! (its owned descriptors close, pods see refused connections, which SDKs retry, instead of a
//! silent queue) so that the kubelet restarts an agent that binds fresh.
//!
//! Anything else falls back to binding fresh. No socket file, or a stale one (connection
//! refused): the predecessor is gone, bind as on a first start. A predecessor that does not
//! answer within the handover timeout, refuses, breaks off, or offers descriptors that fail the
//! checks: bind fresh, retrying while its ports are still held (with a warning), so the node never
//! ends up with no listener. An agent that receives SIGTERM before anyone took over keeps serving
//! for up to `--handover-wait`, in case its successor is on its way.
//!
//! Trust boundary: a process that is root (this agent's user), in the host's network namespace,
//! and can reach the handover directory can take over credential serving, and so read every
//! pod's token and credentials; root on the node can do that anyway (ptrace, `/proc/<pid>/mem`).
//! Root in another network namespace (a root container with the directory mounted) cannot.

mod convert;
pub mod predecessor;
mod proof;
pub mod sockets;
pub mod successor;
pub mod wire;

pub use predecessor::{Offer, Predecessor};
pub use sockets::Expected;
pub use successor::{take_over, Offered, Takeover};

use std::path::{Path, PathBuf};
use std::time::Duration;
use wire::{Channel, WireError};

/// The socket's name in the handover directory.
pub const SOCKET: &str = "agent.sock";
/// Entries per `Entries` frame (about 3 KB each).
const CHUNK: usize = 1000;
/// Bytes of tokens and bodies a successor accepts per entry it can hold (a 16 KiB token at most,
/// a body of about 2 KiB), so a predecessor, or something posing as one, cannot make it hold
/// more than its own capacity's worth.
const BYTES_PER_ENTRY: usize = 20 * 1024;

#[derive(Debug, Clone)]
pub struct HandoverSettings {
    /// `--handover-dir`.
    pub dir: PathBuf,
    /// How long each step may take before the other side is given up on.
    pub timeout: Duration,
    /// `--handover-wait`: after SIGTERM, how long to keep serving for a successor to take over.
    pub wait: Duration,
    /// The predecessor's shutdown grace: how long its requests in flight may take before the
    /// delta is sent; the successor waits that long for it.
    pub grace: Duration,
    /// The sockets this agent would bind: a successor accepts no other.
    pub expected: Expected,
    /// This agent's cache capacity (`--max-cache-size`): what a successor accepts at most.
    pub max_entries: u64,
}

impl HandoverSettings {
    pub fn socket(&self) -> PathBuf {
        self.dir.join(SOCKET)
    }

    /// The most bytes of cache a successor accepts.
    fn byte_cap(&self) -> usize {
        usize::try_from(self.max_entries)
            .unwrap_or(usize::MAX)
            .saturating_mul(BYTES_PER_ENTRY)
            .saturating_add(1 << 20)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("{0}")]
    Wire(#[from] WireError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the predecessor refused: {0}")]
    Refused(String),
    #[error("the peer runs as user {0}, not this agent's")]
    Stranger(u32),
    #[error("the peer did not prove it shares this agent's network namespace")]
    OtherNamespace,
    #[error("unexpected {0} message")]
    Unexpected(&'static str),
    #[error("handover directory {0}: {1}")]
    Directory(PathBuf, String),
    #[error("the predecessor offered an unusable socket: {0}")]
    BadSocket(String),
    #[error("the predecessor sent more than this agent holds ({0} bytes)")]
    TooMuch(usize),
    #[error("the predecessor did not answer in time")]
    Timeout,
}

/// Make the directory if needed; refuse one that others could write to or that another user
/// owns (a socket there could be anyone's).
pub fn prepare_dir(dir: &Path) -> Result<(), HandoverError> {
    crate::files::private_dir(dir).map_err(|e| HandoverError::Directory(dir.to_owned(), e))
}

fn check_peer(channel: &Channel) -> Result<(), HandoverError> {
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let peer = channel.peer_uid()?;
    if peer != me {
        return Err(HandoverError::Stranger(peer));
    }
    Ok(())
}
