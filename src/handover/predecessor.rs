//! The predecessor's side of a handover (steps in [`super`]): a thread that listens on the
//! handover socket for as long as the agent serves, and hands over to the first successor that
//! proves itself and commits.

use super::convert::{entry_to_wire, hash_to_wire, refusal_to_wire};
use super::proof::{self, Issued};
use super::wire::{Channel, Msg, WireListener, MIN_PROTOCOL, PROTOCOL};
use super::{check_peer, prepare_dir, HandoverError, HandoverSettings, CHUNK};
use crate::cache::CredentialCache;
use crate::metrics::Metrics;
use crate::server::listener::Role;
use crate::verify::Verifier;
use futures_util::future::BoxFuture;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

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

/// Where one handover ended.
enum Ended {
    Completed(usize),
    /// The peer never committed (`Taken`): it got no token, credential or socket.
    Abandoned(HandoverError),
    /// Failed before this agent retired: it still serves.
    Failed(HandoverError),
    /// Failed after this agent retired: it no longer accepts, so it must go.
    FailedRetired(HandoverError),
}

/// The predecessor side: listens for a successor for as long as this agent runs.
pub struct Predecessor {
    handed_over: watch::Receiver<bool>,
    failed: watch::Receiver<bool>,
    /// Set before the listener is shut down, so the thread ends instead of retrying.
    stopping: Arc<AtomicBool>,
    /// Shared with the thread, so its descriptor stays this listener's until both are done.
    listener: Arc<UnixListener>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn count(metrics: &Metrics, outcome: &str) {
    metrics
        .handover
        .with_label_values(&["predecessor", outcome])
        .inc();
}

impl Predecessor {
    /// Listen on the handover socket (replacing a stale or predecessor's one).
    pub fn listen(
        settings: &HandoverSettings,
        offer: Offer,
        metrics: Arc<Metrics>,
    ) -> Result<Predecessor, HandoverError> {
        prepare_dir(&settings.dir)?;
        let path = settings.socket();
        let _ = std::fs::remove_file(&path);
        let listener = Arc::new(UnixListener::bind(&path)?);
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        }
        let (handed_tx, handed_over) = watch::channel(false);
        let (failed_tx, failed) = watch::channel(false);
        let stopping = Arc::new(AtomicBool::new(false));
        let accepting = listener.clone();
        let settings = settings.clone();
        let runtime = tokio::runtime::Handle::current();
        let stop = stopping.clone();
        let thread = std::thread::Builder::new()
            .name("handover".into())
            .spawn(move || {
                for conn in accepting.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let Ok(stream) = conn else { continue };
                    if *handed_tx.borrow() {
                        refuse(stream, &settings, "this agent already handed over");
                        continue;
                    }
                    match hand_over(stream, &settings, &offer, &runtime, &metrics) {
                        Ended::Completed(sent) => {
                            tracing::info!(entries = sent, "handed over to the next agent; idle until terminated");
                            let _ = handed_tx.send(true);
                        }
                        Ended::Abandoned(e) => {
                            count(&metrics, "abandoned");
                            tracing::warn!(error = %e, "a peer on the handover socket never took over; it got no token, credential or socket");
                        }
                        Ended::Failed(e) => {
                            count(&metrics, "failed");
                            tracing::warn!(error = %e, "a handover to a new agent failed; still serving");
                        }
                        Ended::FailedRetired(e) => {
                            count(&metrics, "failed");
                            tracing::error!(error = %e, "the new agent failed after this one retired; exiting so that an agent binds fresh");
                            let _ = failed_tx.send(true);
                            return;
                        }
                    }
                }
            })?;
        Ok(Predecessor {
            handed_over,
            failed,
            stopping,
            listener,
            thread: Some(thread),
        })
    }

    pub fn handed_over(&self) -> bool {
        *self.handed_over.borrow()
    }

    /// Resolves if a handover failed after this agent retired: it serves nothing any more.
    pub async fn failed(&self) {
        let mut rx = self.failed.clone();
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

    /// Stop listening and join the thread (a handover under way finishes first).
    pub async fn stop(mut self) {
        self.stopping.store(true, Ordering::Relaxed);
        // SAFETY: shutdown on a descriptor this value keeps open (the `Arc` above); it only
        // makes the thread's blocked accept return.
        unsafe {
            libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR);
        }
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

fn refuse(stream: UnixStream, settings: &HandoverSettings, reason: &str) {
    if let Ok(mut c) = Channel::new(stream, settings.timeout) {
        let _ = c.recv();
        let _ = c.send(&Msg::Refused {
            reason: reason.to_owned(),
        });
    }
}

/// Steps 1 and 2: the peer proves its namespace and gets the keys and sockets.
fn offer_sockets(
    channel: &mut Channel,
    settings: &HandoverSettings,
    offer: &Offer,
) -> Result<(), HandoverError> {
    check_peer(channel)?;
    let challenge = match channel.recv()? {
        (
            Msg::Hello {
                protocol,
                min_protocol,
                challenge,
                ..
            },
            _,
        ) => {
            let agreed = protocol.min(PROTOCOL);
            if agreed < MIN_PROTOCOL.max(min_protocol) {
                let reason = format!("no protocol in common (this agent speaks {MIN_PROTOCOL} to {PROTOCOL}, the peer {min_protocol} to {protocol})");
                let _ = channel.send(&Msg::Refused {
                    reason: reason.clone(),
                });
                return Err(HandoverError::Refused(reason));
            }
            challenge.ok_or(HandoverError::OtherNamespace)?
        }
        (other, _) => return Err(HandoverError::Unexpected(other.name())),
    };
    proof::answer(&challenge, settings.timeout)?;
    let ours = Issued::new()?;
    channel.send(&Msg::Prove {
        protocol: PROTOCOL,
        challenge: ours.challenge(),
    })?;
    ours.check(settings.timeout)?;
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

fn send_chunks(
    channel: &mut Channel,
    entries: Vec<crate::cache::Exported>,
) -> Result<(), HandoverError> {
    let mut entries = entries.into_iter().map(entry_to_wire).peekable();
    while entries.peek().is_some() {
        let chunk = entries.by_ref().take(CHUNK).collect();
        channel.send(&Msg::Entries { entries: chunk })?;
    }
    Ok(())
}

/// The predecessor's side of one handover, blocking.
fn hand_over(
    stream: UnixStream,
    settings: &HandoverSettings,
    offer: &Offer,
    runtime: &tokio::runtime::Handle,
    metrics: &Metrics,
) -> Ended {
    let started = Instant::now();
    let mut channel = match Channel::new(stream, settings.timeout) {
        Ok(c) => c,
        Err(e) => return Ended::Failed(e.into()),
    };
    if let Err(e) = offer_sockets(&mut channel, settings, offer) {
        return Ended::Failed(e);
    }
    count(metrics, "started");
    // The successor builds its server on the sockets, then commits. It may take a while.
    let taken = channel
        .set_timeout(settings.timeout * 5)
        .map_err(HandoverError::from)
        .and_then(|()| Ok(channel.recv()?));
    match taken {
        Ok((Msg::Taken, _)) => {}
        Ok((other, _)) => return Ended::Abandoned(HandoverError::Unexpected(other.name())),
        Err(e) => return Ended::Abandoned(e),
    }
    let (snapshot, newest) = offer.cache.export(0);
    let mut sent = snapshot.len();
    let before_retiring = channel
        .set_timeout(settings.timeout)
        .map_err(HandoverError::from)
        .and_then(|()| send_chunks(&mut channel, snapshot))
        .and_then(|()| Ok(channel.send(&Msg::Retiring)?));
    if let Err(e) = before_retiring {
        return Ended::Failed(e);
    }
    // Both serve on the same sockets now; stop here, finish what is in flight.
    runtime.block_on((offer.retire)());
    let after = (|| -> Result<(), HandoverError> {
        let (delta, _) = offer.cache.export(newest);
        sent += delta.len();
        send_chunks(&mut channel, delta)?;
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
    count(metrics, "completed");
    metrics
        .handover_entries
        .with_label_values(&["sent"])
        .inc_by(sent as u64);
    metrics
        .handover_seconds
        .with_label_values(&["predecessor"])
        .set(started.elapsed().as_secs_f64());
    Ended::Completed(sent)
}
