//! The predecessor's side of a handover (steps in [`super`]): a thread that listens on this
//! agent's abstract socket for as long as the agent serves, holds the peers that have proved
//! nothing yet without a thread each, and starts a thread for each peer that proved it read the
//! name file, so that no one peer holds up another; the first to commit gets the cache.
//!
//! Contract: a peer of another user is closed at accept, before a byte is read (counted
//! `stranger`). Every other peer waits in a lobby, with no thread of its own, for at most one
//! handover timeout and in a frame of at most [`wire::MAX_UNCOMMITTED_FRAME`] bytes, until its
//! `Hello` proves it read this agent's name file ([`super::auth`]); one whose proof does not
//! hold, or that goes, stalls or sends anything else, is closed before it is sent a byte
//! (counted `unauthenticated`, logged at a pace: anyone root in the namespace can do it, as
//! often as it likes, and holds up no successor). At most [`MAX_PEERS`] proven peers are served
//! at once (more wait for a place), each bounded by deadlines (`Taken` within six handover
//! timeouts). After handing over, the thread keeps the connection to its successor open: when
//! the successor goes (it stopped, crashed or gave up on the last entries), or the handover
//! fails after this agent retired, [`Predecessor::lost`] resolves so that the agent serves
//! again on the sockets it still holds; until then nobody is accepted, and the socket stays
//! open and named ([`Predecessor::stop_keeping_socket`]) for the agent's next offer. While
//! serving, the thread checks every second that the name file names a live socket, and names
//! its own if not (a successor that failed and left its name, a deleted file), or with its own
//! secret if the file names it with another.
//!
//! The rooms: `accept` (the listening thread: who is let in, and the name file kept), `lobby`
//! (peers that have proved nothing yet), `peer` (one proven peer's handover, steps 1 to 5, and
//! where it ended).
//!
//! [`wire::MAX_UNCOMMITTED_FRAME`]: super::wire::MAX_UNCOMMITTED_FRAME

mod accept;
mod lobby;
mod peer;

use super::auth::Secret;
use super::rendezvous::{self, Published};
use super::{prepare_dir, HandoverError, HandoverSettings};
use crate::cache::CredentialCache;
use crate::metrics::Metrics;
use crate::server::bind::Role;
use crate::util::LogEvery;
use crate::verify::Verifier;
use futures_util::future::BoxFuture;
use std::io::Write;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// Proven peers served at once; a handover needs one.
const MAX_PEERS: usize = 4;
/// At most one log line per this long about peers of another user.
const STRANGER_LOG_EVERY: Duration = Duration::from_secs(10);

/// What the predecessor side needs of the running server.
#[derive(Clone)]
pub struct Offer {
    pub cache: CredentialCache,
    /// Every listening socket the server holds, owned for as long as this offer lives.
    pub listeners: Arc<Vec<(Role, SocketAddr, OwnedFd)>>,
    /// The verifier, whose keys go to the successor.
    pub verifier: Option<Arc<Verifier>>,
    /// Stops accepting and refreshing, and waits for requests in flight (within the grace).
    pub retire: Arc<dyn Fn() -> BoxFuture<'static, ()> + Send + Sync>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    Serving,
    /// A successor said `Taken`: no other may.
    Committed,
    HandedOver,
    /// The successor failed or went after this agent retired: it must serve again.
    Lost,
}

/// What the listening thread and the peer threads share.
pub(super) struct Shared {
    pub(super) settings: HandoverSettings,
    pub(super) offer: Offer,
    pub(super) metrics: Arc<Metrics>,
    pub(super) runtime: tokio::runtime::Handle,
    pub(super) name: String,
    /// Written beside the name; a peer that cannot prove it read it gets nothing.
    pub(super) secret: Secret,
    phase: Mutex<Phase>,
    pub(super) handed_tx: watch::Sender<bool>,
    lost_tx: watch::Sender<bool>,
    /// Set before everything is shut down, so the threads end instead of carrying on.
    pub(super) stopping: AtomicBool,
    /// A handle on each peer's connection, so stopping can end them.
    pub(super) peers: Mutex<Vec<(u64, UnixStream)>>,
    /// Says at most every [`STRANGER_LOG_EVERY`] that a peer of another user was closed.
    pub(super) stranger_log: LogEvery,
    /// The same for peers that could not prove they read the name file: anyone root in this
    /// namespace can make one.
    pub(super) unauthenticated_log: LogEvery,
    /// The same for accepts that fail (out of descriptors).
    pub(super) accept_log: LogEvery,
    /// The same for a name file that cannot be written, tried every second.
    pub(super) name_log: LogEvery,
}

impl Shared {
    pub(super) fn phase(&self) -> Phase {
        *self.phase.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn set_phase(&self, phase: Phase) {
        *self.phase.lock().unwrap_or_else(|p| p.into_inner()) = phase;
    }

    /// Move from `from` to `to`; whether this call did.
    pub(super) fn advance(&self, from: Phase, to: Phase) -> bool {
        let mut p = self.phase.lock().unwrap_or_else(|p| p.into_inner());
        if *p != from {
            return false;
        }
        *p = to;
        true
    }

    pub(super) fn count(&self, outcome: &str) {
        self.metrics
            .handover
            .with_label_values(&["predecessor", outcome])
            .inc();
    }

    /// Write this agent's socket name to the name file, replacing whatever it names (the
    /// directory made first, if it went).
    pub(super) fn name_again(&self) -> Result<(), HandoverError> {
        prepare_dir(&self.settings.dir)?;
        Ok(rendezvous::write_name(
            &self.settings.dir,
            &self.name,
            &self.secret,
        )?)
    }

    /// A peer closed before it proved it read the name file (`why`: how it ended, if not with
    /// a proof that does not hold). Anyone root in the namespace can do this as often as they
    /// like: counted apart from failed handovers, and logged at a pace.
    pub(super) fn unproven(&self, why: Option<HandoverError>) {
        self.count("unauthenticated");
        if let Some(suppressed) = self.unauthenticated_log.due() {
            // Whatever it sent may be quoted in the error: its text, kept short.
            let error = why.map(|e| crate::util::cut(e.to_string(), super::UNPROVEN_TEXT));
            tracing::warn!(
                suppressed,
                error,
                "closed a connection to the handover socket that could not prove it read this \
                agent's name file; it was sent nothing"
            );
        }
    }

    pub(super) fn lost(&self) {
        self.set_phase(Phase::Lost);
        let _ = self.lost_tx.send(true);
    }
}

/// The predecessor side: listens for a successor for as long as this agent runs.
pub struct Predecessor {
    shared: Arc<Shared>,
    handed_over: watch::Receiver<bool>,
    lost: watch::Receiver<bool>,
    /// Shared with the thread, so its descriptor stays this listener's until both are done.
    listener: Arc<UnixListener>,
    /// A byte written here wakes the thread's poll (to stop).
    waker: UnixStream,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Predecessor {
    /// Listen on `named` (what [`Predecessor::stop_keeping_socket`] returned), or else on a
    /// fresh abstract socket, named in the handover directory now.
    pub fn listen(
        settings: &HandoverSettings,
        offer: Offer,
        metrics: Arc<Metrics>,
        named: Option<Published>,
    ) -> Result<Predecessor, HandoverError> {
        let published = match named {
            Some(p) => p,
            None => {
                let p = Published::listen()?;
                // Not for life: the listening thread names the socket again every second
                // until the file is there (a directory not there yet, a full disk).
                if let Err(e) =
                    prepare_dir(&settings.dir).and_then(|()| Ok(p.publish(&settings.dir)?))
                {
                    tracing::warn!(error = %e, "cannot name this agent's handover socket yet; \
                        trying again every second (until then the next agent binds fresh)");
                }
                p
            }
        };
        published.listener.set_nonblocking(true)?;
        let Published {
            listener,
            name,
            secret,
        } = published;
        let listener = Arc::new(listener);
        let (waker, woken) = UnixStream::pair()?;
        woken.set_nonblocking(true)?;
        let (handed_tx, handed_over) = watch::channel(false);
        let (lost_tx, lost) = watch::channel(false);
        let shared = Arc::new(Shared {
            settings: settings.clone(),
            offer,
            metrics,
            runtime: tokio::runtime::Handle::current(),
            name,
            secret,
            phase: Mutex::new(Phase::Serving),
            handed_tx,
            lost_tx,
            stopping: AtomicBool::new(false),
            peers: Mutex::default(),
            stranger_log: LogEvery::new(STRANGER_LOG_EVERY),
            unauthenticated_log: LogEvery::new(STRANGER_LOG_EVERY),
            accept_log: LogEvery::new(STRANGER_LOG_EVERY),
            name_log: LogEvery::new(STRANGER_LOG_EVERY),
        });
        let (s, l) = (shared.clone(), listener.clone());
        let thread = std::thread::Builder::new()
            .name("handover".into())
            .spawn(move || accept::accept_loop(&s, &l, &woken))?;
        Ok(Predecessor {
            shared,
            handed_over,
            lost,
            listener,
            waker,
            thread: Some(thread),
        })
    }

    pub fn handed_over(&self) -> bool {
        *self.handed_over.borrow()
    }

    /// Resolves when this agent retired and no successor serves for it any more (a handover
    /// that failed after it retired, or a successor that went since): it must serve again.
    pub async fn lost(&self) {
        let mut rx = self.lost.clone();
        let _ = rx.wait_for(|f| *f).await;
    }

    /// After SIGTERM: wait up to `wait` for a successor to take over (serving meanwhile).
    pub async fn wait_for_successor(&mut self, wait: Duration) -> bool {
        if self.handed_over() {
            return true;
        }
        tracing::info!(
            wait_s = wait.as_secs_f64(),
            "terminating: serving a little longer in case a new agent takes over"
        );
        let mut rx = self.handed_over.clone();
        let waited = tokio::time::timeout(wait, async { rx.wait_for(|h| *h).await.is_ok() }).await;
        waited.unwrap_or(false)
    }

    /// Stop listening, end every peer's connection and join the threads.
    pub async fn stop(self) {
        drop(self.halt().await);
    }

    /// [`Predecessor::stop`], but keep the socket open and name it again at once (the name
    /// file names the successor that went, if it took over), for the next
    /// [`Predecessor::listen`] of an agent that serves again ([`Predecessor::lost`]): a successor
    /// that connects meanwhile waits in its queue, instead of finding a name that is gone and
    /// waiting for the ports this agent holds. `None` if the thread could not be joined.
    pub async fn stop_keeping_socket(self) -> Option<Published> {
        if let Err(e) = self.shared.name_again() {
            tracing::warn!(error = %e, "cannot name this agent's handover socket again yet");
        }
        self.halt().await
    }

    /// End the threads; the socket, if they could be joined.
    async fn halt(mut self) -> Option<Published> {
        self.shared.stopping.store(true, Ordering::Relaxed);
        let _ = (&self.waker).write_all(&[1]);
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        let listener = Arc::try_unwrap(self.listener).ok()?;
        Some(Published {
            listener,
            name: self.shared.name.clone(),
            secret: self.shared.secret.clone(),
        })
    }
}
