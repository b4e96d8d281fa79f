//! Upgrades and restarts without a gap: a starting agent takes its predecessor's listening
//! sockets and cached credentials over a Unix socket, instead of binding fresh after it is gone.
//!
//! Contract. Every agent, once serving, listens on an abstract Unix socket with a fresh random name
//! and writes that name, with a fresh secret, to `<dir>/agent.name` ([`rendezvous`];
//! `--handover-dir`, default `/run/pod-identity-agent`, made mode 0700 and required to belong to
//! this user). Abstract names exist per network namespace: the predecessor and its successor can
//! only meet in theirs, and a process elsewhere can be an end of neither side's connection,
//! whatever files it reaches. Both sides require the other to run as this user (`SO_PEERCRED`; the
//! predecessor closes anyone else at accept, before reading a byte) and to prove it read the name
//! file ([`auth`]: the successor in its `Hello`, before it is sent a byte; the predecessor in its
//! `Welcome`, before anything it sends is used). A starting agent that finds a live predecessor
//! there (a *successor*) takes over from it, in this order ([`wire`] has the frames, protocol
//! [`wire::PROTOCOL`]):
//! 1. successor → `Hello` (the protocols it speaks, a nonce and its proof); the predecessor
//!    closes a peer without a valid proof, and answers `Welcome` (the protocol agreed, its
//!    shutdown grace and its own proof), or `Refused` if they have none in common or it handed
//!    over already;
//! 2. predecessor → its verification keys (`Keys`, public) and its listening sockets
//!    (`Listeners`, passed with `SCM_RIGHTS`: the same sockets, one accept queue). The successor
//!    checks every descriptor ([`sockets`]: listening TCP, bound where the message says and
//!    where it would bind itself, in its namespace); one that fails is closed, and the successor
//!    binds that address itself;
//! 3. the successor builds its server on those sockets, not accepting yet, and says `Taken`;
//! 4. only now the predecessor sends its cache (`Entries`, in chunks made as they are sent:
//!    tokens, credentials, refresh plans, backoff state, the pod of a verified token; in memory
//!    only, never on disk), then `Retiring`, and retires: it stops accepting and refreshing and
//!    lets its requests in flight finish (within its shutdown grace). The successor imports each
//!    chunk as it arrives, within its own capacity and a byte cap, and starts accepting at
//!    `Retiring`;
//! 5. the predecessor sends what it exchanged meanwhile (`Entries`), the tokens it evicted for
//!    their own fault since the snapshot (`Evicted`), the refusals it remembers (`Refusals`) and
//!    `Done`; the successor waits for them for its handover timeout plus the longer of the two
//!    shutdown graces. The successor names its own socket.
//!
//! Until it is authenticated and has committed, a peer is held to frames of 4 KiB and to
//! deadlines (its `Hello` within one handover timeout, `Taken` within six); the predecessor
//! serves a few peers at once, so a slow one does not hold up a successor. A peer that proves
//! it read the name file but never says `Taken` gets the public keys and the listening sockets,
//! and no token or credential (counted `abandoned`).
//!
//! The connection stays open after `Done` for as long as the successor runs. A predecessor whose
//! successor fails after it retired, or goes after taking over (it crashed, or stopped first,
//! as when a restarted old agent took over from the new one), serves again on the sockets it
//! still holds, with its cache, instead of idling while nobody accepts, and offers itself
//! again on the same abstract socket, named again at once (a successor that connects meanwhile
//! waits in its queue, instead of being refused or finding a name that is gone); a successor
//! that stops closes the connection before it drains, so its predecessor, if still there,
//! accepts at once.
//! Both serving one accept queue for a while is harmless. An agent that handed over idles
//! otherwise until it is terminated.
//!
//! Anything else binds fresh, retrying while the ports are held (with a warning, for at most
//! [`crate::server::bind::port_wait`]), so the node never ends up with no listener and a start is
//! never refused over a port a predecessor is about to free: no name file, or one that names a
//! socket nobody listens on (the predecessor is gone; a first start), an invalid or planted one, a
//! predecessor that does not answer in time, refuses or breaks off. A live pathname `agent.sock`
//! (an agent of protocol 1) means an older agent holds the ports: it is never sent or asked
//! anything. An agent that receives SIGTERM before anyone took over keeps serving for up to
//! `--handover-wait`, in case its successor is on its way. A serving agent names its socket again
//! if the name file goes missing, names an agent that is gone, or names this one with a secret not
//! its own, and every second until it can if it could not write the file when it began to
//! listen.
//!
//! Trust boundary: only a process that is this agent's user (root) in the host's network
//! namespace **and** has the handover directory mounted can take over credential serving, and
//! so read every pod's token and credentials: that is the agent's own DaemonSet, or root on the
//! node. A root hostNetwork container without the directory (no capabilities needed) can
//! connect to the abstract socket (it is listed in `/proc/net/unix`), or bind the name of an
//! agent that died, and gets nothing: no proof, no byte (counted `unauthenticated`, whether it
//! sends a wrong proof, something else, or nothing; logged at a pace). Root in
//! another network namespace with the directory mounted can delete or replace the name file,
//! which only makes the next start bind fresh, and can be an end of no connection. Another user
//! in the host's namespace is closed at once.

/// The most of a peer's own text (a refusal, or its bytes quoted in an error) a log line carries
/// before the peer proved anything: long enough for any refusal an agent writes.
const UNPROVEN_TEXT: usize = 160;

pub mod auth;
mod channel;
mod convert;
pub(crate) mod predecessor;
pub mod rendezvous;
pub(crate) mod sockets;
pub(crate) mod successor;
pub mod wire;

pub use predecessor::{Offer, Predecessor};
pub use sockets::Expected;
pub use successor::{take_over, Link, Offered, Takeover};

use std::path::{Path, PathBuf};
use std::time::Duration;
use wire::WireError;

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
    /// This agent's shutdown grace: as a predecessor, how long its requests in flight may take
    /// before the delta is sent (it tells the successor, which waits at least that long).
    pub grace: Duration,
    /// The sockets this agent would bind: a successor accepts no other.
    pub expected: Expected,
    /// This agent's cache capacity (`--max-cache-size`): what a successor accepts at most.
    pub max_entries: u64,
}

impl HandoverSettings {
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
    #[error("the peer could not prove it read the handover name file")]
    Unauthenticated,
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
