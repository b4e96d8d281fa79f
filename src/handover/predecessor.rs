//! The predecessor's side of a handover (steps in [`super`]): a thread that listens on this
//! agent's abstract socket for as long as the agent serves, and a thread for each peer of this
//! user that connects, so that no one peer holds up another; the first to commit gets the cache.
//!
//! Contract: a peer of another user is closed at accept, before a byte is read (counted
//! `stranger`); a peer whose `Hello` does not prove it read this agent's name file
//! ([`super::auth`]) is closed before it is sent a byte (counted `unauthenticated`); at most [`MAX_PEERS`] peers are served at once (more wait in the socket's queue
//! until one is done); each peer is bounded by deadlines (its `Hello` within one handover
//! timeout, in frames of at most [`wire::MAX_UNCOMMITTED_FRAME`] bytes; `Taken` within six).
//! After handing over, the thread keeps the connection to its successor open: when the
//! successor goes (it stopped, crashed or gave up on the last entries), or the handover fails
//! after this agent retired, [`Predecessor::lost`] resolves so that the agent serves again on
//! the sockets it still holds; until then nobody is accepted, and the socket stays open and
//! named ([`Predecessor::stop_keeping_socket`]) for the agent's next offer. While serving, the
//! thread checks every second that the name file names a live socket, and names its own if not
//! (a successor that failed and left its name, a deleted file).
//!
//! [`wire::MAX_UNCOMMITTED_FRAME`]: super::wire::MAX_UNCOMMITTED_FRAME

use super::convert::{entry_to_wire, hash_to_wire, refusal_to_wire};
use super::auth::{Nonce, Secret};
use super::rendezvous::{self, Published};
use super::wire::{Channel, Msg, WireListener, MIN_PROTOCOL, PROTOCOL};
use super::{prepare_dir, HandoverError, HandoverSettings, CHUNK};
use crate::cache::{CredentialCache, Exported};
use crate::metrics::Metrics;
use crate::server::listener::Role;
use crate::verify::Verifier;
use futures_util::future::BoxFuture;
use std::io::Write;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Peers served at once; a handover needs one.
const MAX_PEERS: usize = 4;
/// How often the listening thread looks at the name file.
const LOOK_EVERY: Duration = Duration::from_secs(1);
/// How often it looks for a free place, when [`MAX_PEERS`] are being served.
const PLACE_FREE_EVERY: Duration = Duration::from_millis(50);
/// At most one log line per this long about peers of another user, and about peers that could
/// not prove they read the name file.
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

/// Where one peer's handover ended.
enum Ended {
    /// Handed over: the connection stays open as the link to the successor.
    Completed(usize, Channel),
    /// The peer never committed (`Taken`): it got the keys and the listening sockets, no token
    /// or credential.
    Abandoned(HandoverError),
    /// Failed before this agent retired: it still serves.
    Failed(HandoverError),
    /// The peer's `Hello` did not prove it read the name file: it was sent nothing.
    Unauthenticated,
    /// Failed after this agent retired: it accepts nothing until it serves again.
    FailedRetired(HandoverError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Serving,
    /// A successor said `Taken`: no other may.
    Committed,
    HandedOver,
    /// The successor failed or went after this agent retired: it must serve again.
    Lost,
}

/// What the listening thread and the peer threads share.
struct Shared {
    settings: HandoverSettings,
    offer: Offer,
    metrics: Arc<Metrics>,
    runtime: tokio::runtime::Handle,
    name: String,
    /// Written beside the name; a peer that cannot prove it read it gets nothing.
    secret: Secret,
    /// Paces the warning about such peers: anyone root in this namespace can make one.
    unauthenticated_logged: crate::util::LogEvery,
    phase: Mutex<Phase>,
    handed_tx: watch::Sender<bool>,
    lost_tx: watch::Sender<bool>,
    /// Set before everything is shut down, so the threads end instead of carrying on.
    stopping: AtomicBool,
    /// A handle on each peer's connection, so stopping can end them.
    peers: Mutex<Vec<(u64, UnixStream)>>,
}

impl Shared {
    fn phase(&self) -> Phase {
        *self.phase.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_phase(&self, phase: Phase) {
        *self.phase.lock().unwrap_or_else(|p| p.into_inner()) = phase;
    }

    /// Move from `from` to `to`; whether this call did.
    fn advance(&self, from: Phase, to: Phase) -> bool {
        let mut p = self.phase.lock().unwrap_or_else(|p| p.into_inner());
        if *p != from {
            return false;
        }
        *p = to;
        true
    }

    fn count(&self, outcome: &str) {
        self.metrics
            .handover
            .with_label_values(&["predecessor", outcome])
            .inc();
    }

    /// Write this agent's socket name to the name file, replacing whatever it names.
    fn name_again(&self) -> std::io::Result<()> {
        rendezvous::write_name(&self.settings.dir, &self.name, &self.secret)
    }

    fn lost(&self) {
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
                prepare_dir(&settings.dir)?;
                let p = Published::listen()?;
                p.publish(&settings.dir)?;
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
            unauthenticated_logged: crate::util::LogEvery::new(STRANGER_LOG_EVERY),
            phase: Mutex::new(Phase::Serving),
            handed_tx,
            lost_tx,
            stopping: AtomicBool::new(false),
            peers: Mutex::default(),
        });
        let (s, l) = (shared.clone(), listener.clone());
        let thread = std::thread::Builder::new()
            .name("handover".into())
            .spawn(move || accept_loop(&s, &l, &woken))?;
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

/// Wait up to `timeout` for a connection on `listener` (or, with `accept` false, for nothing
/// but `woken`); whether a connection may be there.
fn readable(listener: &UnixListener, woken: &UnixStream, accept: bool, timeout: Duration) -> bool {
    let mut fds = [
        libc::pollfd {
            fd: woken.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let n: libc::nfds_t = if accept { 2 } else { 1 };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: `n` valid pollfds, for descriptors kept open by the caller.
    let ready = unsafe { libc::poll(fds.as_mut_ptr(), n, ms) };
    ready > 0 && fds[1].revents != 0
}

fn accept_loop(shared: &Arc<Shared>, listener: &UnixListener, woken: &UnixStream) {
    let mut threads: Vec<std::thread::JoinHandle<()>> = Vec::new();
    let mut next_peer = 0u64;
    let mut stranger_logged: Option<Instant> = None;
    let mut looked = Instant::now();
    while !shared.stopping.load(Ordering::Relaxed) {
        threads.retain(|t| !t.is_finished());
        // Also between connections, however many arrive.
        if looked.elapsed() >= LOOK_EVERY {
            looked = Instant::now();
            if shared.phase() == Phase::Serving {
                keep_named(shared);
            }
        }
        // Once lost, nobody is accepted until this agent serves again: a successor queues for
        // the next listener on this socket, instead of being told this one handed over. With
        // every peer's place taken, a newcomer queues until one is free (each peer is held to
        // deadlines), instead of being turned away.
        let full = threads.len() >= MAX_PEERS;
        let accepting = !full && shared.phase() != Phase::Lost;
        let wait = if full { PLACE_FREE_EVERY } else { LOOK_EVERY };
        if !readable(listener, woken, accepting, wait) || shared.stopping.load(Ordering::Relaxed) {
            continue;
        }
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(_) => continue,
        };
        // Anyone in this namespace can connect to an abstract name: only this user is heard.
        if let Err(e) = rendezvous::check_peer(&stream) {
            shared.count("stranger");
            if stranger_logged.is_none_or(|t| t.elapsed() >= STRANGER_LOG_EVERY) {
                stranger_logged = Some(Instant::now());
                tracing::warn!(error = %e, "closed a connection to the handover socket from another user");
            }
            continue;
        }
        let Ok(handle) = stream.try_clone() else {
            continue;
        };
        next_peer += 1;
        let id = next_peer;
        shared
            .peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((id, handle));
        let s = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("handover-peer".into())
            .spawn(move || {
                serve_peer(&s, stream);
                s.peers
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .retain(|(i, _)| *i != id);
            });
        match spawned {
            Ok(t) => threads.push(t),
            Err(e) => tracing::warn!(error = %e, "cannot serve a handover peer"),
        }
    }
    for (_, peer) in shared
        .peers
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
    {
        let _ = peer.shutdown(std::net::Shutdown::Both);
    }
    for t in threads {
        let _ = t.join();
    }
}

/// Name this agent's socket again if the name file is gone, unreadable, or names a socket
/// nobody listens on.
fn keep_named(shared: &Shared) {
    let named = rendezvous::read_name(&shared.settings.dir);
    let fine = match &named {
        Ok(Some(named)) => named.name == shared.name || rendezvous::listening(&named.name),
        _ => false,
    };
    if fine {
        return;
    }
    match shared.name_again() {
        Ok(()) => tracing::info!("named this agent's handover socket again (the name file was missing, or named an agent that is gone)"),
        Err(e) => tracing::warn!(error = %e, "cannot name this agent's handover socket; the next agent will bind fresh"),
    }
}

/// One peer, from its `Hello` to the end of the link to it.
fn serve_peer(shared: &Shared, stream: UnixStream) {
    let started = Instant::now();
    match hand_over(shared, stream) {
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
                tracing::warn!("the agent that took over is gone; serving again on the sockets this one still holds");
                shared.lost();
            }
        }
        Ended::Abandoned(e) => {
            shared.count("abandoned");
            tracing::warn!(error = %e, "a peer on the handover socket never took over; it got the keys and the listening sockets, no token or credential");
        }
        Ended::Unauthenticated => {
            shared.count("unauthenticated");
            if let Some(suppressed) = shared.unauthenticated_logged.due() {
                tracing::warn!(
                    suppressed,
                    "closed a connection to the handover socket that could not prove it read this agent's name file; it was sent nothing"
                );
            }
        }
        Ended::Failed(e) => {
            shared.count("failed");
            tracing::warn!(error = %e, "a handover to a new agent failed; still serving");
        }
        Ended::FailedRetired(e) => {
            shared.count("failed");
            if !shared.stopping.load(Ordering::Relaxed) {
                shared.count("resumed");
                tracing::error!(error = %e, "the new agent failed after this one retired; serving again on the sockets this one still holds");
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

/// Steps 1 and 2: the peer says `Hello` and gets the keys and sockets.
fn offer_sockets(channel: &mut Channel, shared: &Shared) -> Result<(), HandoverError> {
    let (nonce, agreed) = match channel.recv()? {
        (
            Msg::Hello {
                protocol,
                min_protocol,
                nonce,
                proof,
                ..
            },
            _,
        ) => {
            // Before anything is sent, a refusal included: a peer that did not read the name
            // file learns nothing here, not even the protocols this agent speaks.
            let nonce = Nonce::from_hex(&nonce)
                .filter(|n| shared.secret.check_successor(n, &shared.name, &proof))
                .ok_or(HandoverError::Unauthenticated)?;
            let agreed = protocol.min(PROTOCOL);
            if agreed < MIN_PROTOCOL.max(min_protocol) {
                let reason = format!("no protocol in common (this agent speaks {MIN_PROTOCOL} to {PROTOCOL}, the peer {min_protocol} to {protocol})");
                let _ = channel.send(&Msg::Refused {
                    reason: reason.clone(),
                });
                return Err(HandoverError::Refused(reason));
            }
            (nonce, agreed)
        }
        (other, _) => return Err(HandoverError::Unexpected(other.name())),
    };
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
fn hand_over(shared: &Shared, stream: UnixStream) -> Ended {
    let settings = &shared.settings;
    let offer = &shared.offer;
    let mut channel = match Channel::new(stream, settings.timeout) {
        Ok(c) => c,
        Err(e) => return Ended::Failed(e.into()),
    };
    // Its hello within one step; and the successor builds its server on the sockets before it
    // commits, which may take a while.
    channel.set_deadline(settings.timeout);
    match offer_sockets(&mut channel, shared) {
        Ok(()) => {}
        Err(HandoverError::Unauthenticated) => return Ended::Unauthenticated,
        Err(e) => return Ended::Failed(e),
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
    let mut sent = match before_retiring {
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
    let after = (|| -> Result<(), HandoverError> {
        let (delta, _) = offer.cache.export_iter(newest);
        sent += send_chunks(&mut channel, delta)?;
        let evicted = offer.cache.evicted_since(newest);
        channel.send(&Msg::Evicted {
            tokens: evicted.iter().map(hash_to_wire).collect(),
        })?;
        let refusals = offer.cache.refusals();
        channel.send(&Msg::Refusals {
            refusals: refusals
                .iter()
                .map(|(h, r, left)| refusal_to_wire(h, r, *left))
                .collect(),
        })?;
        Ok(channel.send(&Msg::Done)?)
    })();
    if let Err(e) = after {
        return Ended::FailedRetired(e);
    }
    Ended::Completed(sent, channel)
}
