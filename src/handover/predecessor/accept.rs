//! The predecessor's listening thread: who is let in, and the name file kept.
//!
//! Contract: the thread polls the socket and a waker (so stopping ends it at once), serves at
//! most [`MAX_PEERS`] peers at once, each in a thread of its own, and accepts nobody once the
//! handover is lost (a successor queues for this agent's next offer). A peer of another user
//! is closed before a byte is read. While serving, it looks at the name file every
//! [`LOOK_EVERY`] and names this agent's socket again if the file is gone or names nobody
//! listening. When it stops, it ends every peer's connection and joins their threads.

use super::peer::serve_peer;
use super::{Phase, Shared, MAX_PEERS};
use crate::handover::rendezvous;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often the listening thread looks at the name file.
const LOOK_EVERY: Duration = Duration::from_secs(1);
/// How often it looks for a free place, when [`MAX_PEERS`] are being served.
const PLACE_FREE_EVERY: Duration = Duration::from_millis(50);

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

pub(super) fn accept_loop(shared: &Arc<Shared>, listener: &UnixListener, woken: &UnixStream) {
    let mut threads: Vec<JoinHandle<()>> = Vec::new();
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
        next_peer += 1;
        if let Some(t) = admit(shared, stream, next_peer) {
            threads.push(t);
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

/// Serve `stream` as peer `id` in a thread of its own, if it runs as this user.
fn admit(shared: &Arc<Shared>, stream: UnixStream, id: u64) -> Option<JoinHandle<()>> {
    // Anyone in this namespace can connect to an abstract name: only this user is heard.
    if let Err(e) = rendezvous::check_peer(&stream) {
        shared.count("stranger");
        if shared.stranger_log.due().is_some() {
            tracing::warn!(error = %e,
                "closed a connection to the handover socket from another user");
        }
        return None;
    }
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
            serve_peer(&s, stream);
            s.peers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|(i, _)| *i != id);
        });
    match spawned {
        Ok(t) => Some(t),
        Err(e) => {
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
            "named this agent's handover socket again \
            (the name file was missing, or named an agent that is gone)"
        ),
        Err(e) => tracing::warn!(error = %e,
            "cannot name this agent's handover socket; the next agent will bind fresh"),
    }
}
