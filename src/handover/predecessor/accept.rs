//! The predecessor's listening thread: who is let in, and the name file kept.
//!
//! Contract: the thread polls the socket, a waker (so stopping ends it at once) and the
//! [`Lobby`] of peers that have not proved anything yet. It accepts whenever a connection is
//! queued (a peer of another user is closed before a byte is read; the rest wait in the lobby),
//! serves at most [`MAX_PEERS`] proven peers at once, each in a thread of its own (more wait
//! for a place), and accepts and serves nobody once the handover is lost (a successor queues
//! for this agent's next offer). While serving, it looks at the name file every [`LOOK_EVERY`]
//! and names this agent's socket again if the file is gone, names nobody listening, or names
//! it with another secret. When it stops, it ends every peer's connection and joins their
//! threads; the lobby's connections are closed.

use super::lobby::{Admitted, Lobby, MAX_WAITING};
use super::peer::serve_peer;
use super::{Phase, Shared, MAX_PEERS};
use crate::handover::rendezvous;
use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often the listening thread looks at the name file.
const LOOK_EVERY: Duration = Duration::from_secs(1);
/// How often it looks for a free place, when [`MAX_PEERS`] proven peers are being served.
const PLACE_FREE_EVERY: Duration = Duration::from_millis(50);

/// What [`poll`] found ready.
struct Ready {
    /// A connection may be waiting to be accepted.
    incoming: bool,
    /// Which of the lobby's connections have something to read (or have closed).
    lobby: Vec<bool>,
}

/// Wait up to `timeout` for `woken`, a connection on `listener` (when `accept`), or bytes from a
/// peer in the lobby.
fn poll(
    listener: &UnixListener,
    woken: &UnixStream,
    accept: bool,
    lobby: &Lobby,
    timeout: Duration,
) -> Ready {
    let watch = |fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // A listener not accepting is left out: its queue stays where a successor waits.
    let listening = if accept { listener.as_raw_fd() } else { -1 };
    let mut fds: Vec<libc::pollfd> = [woken.as_raw_fd(), listening]
        .into_iter()
        .chain(lobby.fds())
        .map(watch)
        .collect();
    let n = libc::nfds_t::try_from(fds.len()).unwrap_or(2);
    // Rounded up: a wait of less than a millisecond is not a busy loop of zero waits.
    let ms = libc::c_int::try_from(timeout.as_micros().div_ceil(1000)).unwrap_or(libc::c_int::MAX);
    // SAFETY: `n` valid pollfds (a negative fd is ignored), for descriptors kept open by the
    // caller and the lobby.
    let ready = unsafe { libc::poll(fds.as_mut_ptr(), n, ms) };
    if ready <= 0 {
        return Ready {
            incoming: false,
            lobby: Vec::new(),
        };
    }
    Ready {
        incoming: fds[1].revents != 0,
        lobby: fds[2..].iter().map(|f| f.revents != 0).collect(),
    }
}

pub(super) fn accept_loop(shared: &Arc<Shared>, listener: &UnixListener, woken: &UnixStream) {
    let mut threads: Vec<JoinHandle<()>> = Vec::new();
    let mut lobby = Lobby::default();
    // Proven peers waiting for a place (a handover needs one; more than one is a race).
    let mut proven: VecDeque<Admitted> = VecDeque::new();
    let mut next_peer = 0u64;
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
        // Once lost, nobody is accepted or served until this agent serves again: a successor
        // queues for the next listener on this socket, instead of being told this one handed
        // over. Proven peers beyond MAX_PEERS wait for a place (each peer is held to deadlines).
        let lost = shared.phase() == Phase::Lost;
        while threads.len() < MAX_PEERS && !lost {
            let Some(peer) = proven.pop_front() else {
                break;
            };
            if let Some(t) = spawn_peer(shared, peer) {
                threads.push(t);
            }
        }
        let mut wait = if proven.is_empty() {
            LOOK_EVERY
        } else {
            PLACE_FREE_EVERY
        };
        if let Some(until) = lobby.next_deadline() {
            wait = wait.min(until.saturating_duration_since(Instant::now()));
        }
        let ready = poll(listener, woken, !lost, &lobby, wait);
        if shared.stopping.load(Ordering::Relaxed) {
            break;
        }
        // The lobby first: a proof that arrived must not be evicted by a newcomer.
        proven.extend(lobby.read(shared, &ready.lobby));
        if ready.incoming {
            match listener.accept() {
                Ok((stream, _)) => {
                    next_peer += 1;
                    if let Some(stream) = of_this_user(shared, stream) {
                        proven.extend(lobby.admit(shared, stream, next_peer));
                    }
                }
                Err(e) => cannot_accept(shared, &e),
            }
        }
        if proven.len() > MAX_WAITING {
            // Only peers with the secret are here: the agent's own successors, racing.
            for _ in proven.drain(MAX_WAITING..) {
                shared.count("failed");
            }
            tracing::warn!(
                "more agents proved they may take over than wait for a place; \
                closed the latest"
            );
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

/// `stream` if its peer runs as this user; anyone in this namespace can connect to an abstract
/// name, and only this user is heard.
fn of_this_user(shared: &Shared, stream: UnixStream) -> Option<UnixStream> {
    match rendezvous::check_peer(&stream) {
        Ok(()) => Some(stream),
        Err(e) => {
            shared.count("stranger");
            if shared.stranger_log.due().is_some() {
                tracing::warn!(error = %e,
                    "closed a connection to the handover socket from another user");
            }
            None
        }
    }
}

/// An accept that failed: a peer that went while queued is nothing; anything else (out of
/// descriptors) is said at a pace, and the listener left alone for a moment rather than polled
/// again at once while it stays readable.
fn cannot_accept(shared: &Shared, e: &std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, Interrupted, WouldBlock};
    if matches!(e.kind(), WouldBlock | Interrupted | ConnectionAborted) {
        return;
    }
    if let Some(suppressed) = shared.accept_log.due() {
        tracing::warn!(error = %e, suppressed, "cannot accept on the handover socket");
    }
    std::thread::sleep(PLACE_FREE_EVERY);
}

/// Serve a proven peer in a thread of its own.
fn spawn_peer(shared: &Arc<Shared>, peer: Admitted) -> Option<JoinHandle<()>> {
    let Admitted { id, stream, hello } = peer;
    let handle = stream.try_clone().ok()?;
    shared
        .peers
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push((id, handle));
    let s = shared.clone();
    let spawned = std::thread::Builder::new()
        .name("handover-peer".into())
        .spawn(move || {
            // The cache's time is tokio's: in this runtime's context, a paused clock included.
            let _rt = s.runtime.enter();
            serve_peer(&s, stream, hello);
            s.peers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|(i, _)| *i != id);
        });
    match spawned {
        Ok(t) => Some(t),
        Err(e) => {
            shared
                .peers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|(i, _)| *i != id);
            shared.count("failed");
            tracing::warn!(error = %e, "cannot serve a handover peer");
            None
        }
    }
}

/// Name this agent's socket again if the name file is gone, unreadable, names a socket nobody
/// listens on, or names this one with a secret that is not its own (a file restored from
/// elsewhere: every successor would fail to prove it read it, and bind fresh).
fn keep_named(shared: &Shared) {
    let named = rendezvous::read_name(&shared.settings.dir);
    let fine = match &named {
        Ok(Some(named)) if named.name == shared.name => named.secret.is(&shared.secret),
        Ok(Some(named)) => rendezvous::listening(&named.name),
        _ => false,
    };
    if fine {
        return;
    }
    match shared.name_again() {
        Ok(()) => tracing::info!(
            "named this agent's handover socket again (the name file was missing, named an \
            agent that is gone, or named this one with another secret)"
        ),
        Err(e) => {
            if let Some(suppressed) = shared.name_log.due() {
                tracing::warn!(error = %e, suppressed,
                    "cannot name this agent's handover socket; trying again every second \
                    (until then the next agent binds fresh)");
            }
        }
    }
}
