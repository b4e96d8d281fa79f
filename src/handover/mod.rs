//! Upgrades and restarts without a gap: a starting agent takes its predecessor's listening
//! sockets and cached credentials over a Unix socket, instead of binding fresh after it is gone.
//!
//! Contract. Every agent, once serving, listens on `<dir>/agent.sock` (`--handover-dir`,
//! default `/run/pod-identity-agent`; the directory is made mode 0700 and must belong to this
//! user, and a peer must run as this user too, checked with `SO_PEERCRED`). A starting agent
//! that finds a live socket there (a *successor*) takes over from the agent behind it (its
//! *predecessor*), in this order ([`wire`] has the frames):
//! 1. successor → `Hello` (protocol [`wire::PROTOCOL`]); a predecessor speaking another protocol,
//!    or one that already handed over, answers `Refused`;
//! 2. predecessor → its verification keys (`Keys`, if it verifies tokens), its cache entries
//!    (`Entries`, in chunks: tokens, credentials, refresh plans, backoff state and the pod of a
//!    verified token, in memory only, never on disk), then its listening sockets
//!    (`Listeners`, passed with `SCM_RIGHTS`, so no connection is refused or dropped: both
//!    processes hold the same sockets, with one accept queue);
//! 3. the successor installs the entries, starts serving on those sockets, and says `Taken`;
//! 4. the predecessor stops accepting and stops refreshing, lets its requests in flight finish
//!    (within its shutdown grace), sends what it exchanged or renewed meanwhile (`Delta`) and
//!    `Done`, and stays idle until it is terminated. The successor installs the delta and
//!    listens on the socket path itself.
//!
//! Anything else falls back to binding fresh. No socket file, or a stale one (connection
//! refused): the predecessor is gone, bind as on a first start. A predecessor that does not
//! answer within the handover timeout, refuses, or breaks off: bind fresh, retrying while its
//! ports are still held (with a warning), so the node never ends up with no listener. An
//! agent that receives SIGTERM before anyone took over keeps serving for up to
//! `--handover-wait`, in case its successor is on its way (with `hostNetwork` the kubelet's probes
//! of the new pod reach the old agent, so the old pod may be told to stop first).

pub mod wire;

use crate::cache::policy::Plan;
use crate::cache::{Carried, CredentialCache, Demand, Exported, Imported};
use crate::metrics::Metrics;
use crate::token::PodKey;
use crate::util::{from_millis as time, millis};
use crate::verify::keys::Stored;
use crate::verify::Verifier;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use wire::{Channel, Msg, Role, WireEntry, WireError, WireListener, PROTOCOL};

/// The socket's name in the handover directory.
pub const SOCKET: &str = "agent.sock";
/// Entries per `Entries` frame (about 3 KB each).
const CHUNK: usize = 1000;

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
}

impl HandoverSettings {
    pub fn socket(&self) -> PathBuf {
        self.dir.join(SOCKET)
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
    #[error("unexpected {0} message")]
    Unexpected(&'static str),
    #[error("handover directory {0}: {1}")]
    Directory(PathBuf, String),
    #[error("the predecessor did not answer in time")]
    Timeout,
}

fn pod_to_wire(pod: Option<PodKey>) -> Option<String> {
    pod.map(|k| k.0.iter().map(|b| format!("{b:02x}")).collect())
}

fn pod_from_wire(hex: Option<&str>) -> Option<PodKey> {
    let hex = hex?;
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut key = [0u8; 32];
    for (i, b) in key.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(PodKey(key))
}

fn to_wire(x: Exported) -> WireEntry {
    WireEntry {
        token: x.token,
        body: x.body,
        refresh_at_ms: millis(x.plan.refresh_at),
        hard_at_ms: millis(x.plan.hard_at),
        serve_queued_until_ms: millis(x.plan.serve_queued_until),
        valid_until_ms: millis(x.valid_until),
        demand: x.state.demand as u8,
        failures: x.state.failures,
        retry_after_ms: millis(x.state.retry_after),
        pod: pod_to_wire(x.pod),
    }
}

fn from_wire(w: WireEntry) -> Exported {
    Exported {
        pod: pod_from_wire(w.pod.as_deref()),
        token: w.token,
        body: w.body,
        plan: Plan {
            refresh_at: time(w.refresh_at_ms),
            hard_at: time(w.hard_at_ms),
            serve_queued_until: time(w.serve_queued_until_ms),
        },
        valid_until: time(w.valid_until_ms),
        state: Carried {
            demand: Demand::from_wire(w.demand),
            failures: w.failures,
            retry_after: time(w.retry_after_ms),
        },
    }
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

/// What a successor found when it looked for a predecessor.
pub enum Takeover {
    /// No agent runs here (first start, or after a crash: a stale socket was removed).
    Alone,
    /// Sockets and entries were handed over; finish with [`Successor::finish`] once serving.
    Inherited(Successor),
    /// An agent is there but the handover failed: bind fresh, waiting while it holds the ports.
    Failed(HandoverError),
}

/// A successor between receiving its predecessor's sockets and taking over from it.
pub struct Successor {
    channel: Channel,
    /// The predecessor's listening sockets, by what they are for.
    pub listeners: Vec<(Role, SocketAddr, std::net::TcpListener)>,
    /// The predecessor's cache, to install before serving.
    pub entries: Vec<Exported>,
    /// The predecessor's verification keys, so this agent verifies at once.
    pub keys: Option<Stored>,
    started: Instant,
}

/// Look for a predecessor and take its sockets and cache.
pub async fn take_over(settings: &HandoverSettings, metrics: &Metrics) -> Takeover {
    let path = settings.socket();
    if !path.exists() {
        return Takeover::Alone;
    }
    // A socket in a directory someone else controls could be anyone's: do not talk to it, and
    // do not take ports over from it either (bind fresh, waiting while they are held).
    if let Err(e) = prepare_dir(&settings.dir) {
        return Takeover::Failed(e);
    }
    metrics
        .handover
        .with_label_values(&["successor", "started"])
        .inc();
    let timeout = settings.timeout;
    let blocking = tokio::task::spawn_blocking(move || receive(&path, timeout));
    // The blocking side has its own socket timeouts; this bounds a connect that never returns.
    let result = match tokio::time::timeout(timeout * 4, blocking).await {
        Ok(Ok(r)) => r,
        Ok(Err(join)) => Err(HandoverError::Io(std::io::Error::other(join.to_string()))),
        Err(_) => Err(HandoverError::Timeout),
    };
    match result {
        Ok(Some(s)) => Takeover::Inherited(s),
        Ok(None) => Takeover::Alone,
        Err(e) => {
            metrics
                .handover
                .with_label_values(&["successor", "failed"])
                .inc();
            Takeover::Failed(e)
        }
    }
}

/// The successor's first half, blocking: `None` if the socket is stale.
fn receive(path: &Path, timeout: Duration) -> Result<Option<Successor>, HandoverError> {
    let started = Instant::now();
    let stream = match UnixStream::connect(path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
            ) =>
        {
            // Nobody listens: the agent that made it is gone.
            let _ = std::fs::remove_file(path);
            return Ok(None);
        }
        Err(e) => return Err(e.into()),
    };
    let mut channel = Channel::new(stream, timeout)?;
    check_peer(&channel)?;
    channel.send(&Msg::Hello {
        protocol: PROTOCOL,
        version: env!("CARGO_PKG_VERSION").to_owned(),
        pid: std::process::id(),
    })?;
    let mut entries = Vec::new();
    let mut keys = None;
    loop {
        match channel.recv()? {
            (Msg::Keys { keys: k }, _) => keys = Some(k),
            (Msg::Entries { entries: chunk }, _) => {
                entries.extend(chunk.into_iter().map(from_wire))
            }
            (Msg::Listeners { listeners }, fds) => {
                let listeners = listeners
                    .into_iter()
                    .zip(fds)
                    .map(|(l, fd)| (l.role, l.addr, std::net::TcpListener::from(fd)))
                    .collect();
                return Ok(Some(Successor {
                    channel,
                    listeners,
                    entries,
                    keys,
                    started,
                }));
            }
            (Msg::Refused { reason }, _) => return Err(HandoverError::Refused(reason)),
            (other, _) => return Err(HandoverError::Unexpected(other.name())),
        }
    }
}

impl Successor {
    /// Once serving on the sockets (with [`Successor::entries`] installed before the first
    /// accept, which `first` reports): tell the predecessor, and install what it exchanged or
    /// renewed while it finished its requests. Returns the entries installed in all.
    pub async fn finish(
        mut self,
        first: Imported,
        cache: &CredentialCache,
        metrics: &Metrics,
        settings: &HandoverSettings,
    ) -> Result<Imported, HandoverError> {
        // Sockets this agent did not claim: its copies close here; the predecessor closes its own.
        self.listeners.clear();
        let mut total = Imported::default();
        let started = self.started;
        // The predecessor sends the delta after its requests in flight finish.
        let patience = settings.timeout + settings.grace;
        let mut channel = self.channel;
        let delta = tokio::task::spawn_blocking(move || -> Result<Vec<Exported>, HandoverError> {
            channel.set_timeout(patience)?;
            channel.send(&Msg::Taken)?;
            let mut delta = Vec::new();
            loop {
                match channel.recv()? {
                    (Msg::Delta { entries }, _) => delta.extend(entries.into_iter().map(from_wire)),
                    (Msg::Done, _) => return Ok(delta),
                    (other, _) => return Err(HandoverError::Unexpected(other.name())),
                }
            }
        })
        .await
        .map_err(|e| HandoverError::Io(std::io::Error::other(e.to_string())))?;
        total.add(first);
        let (outcome, result) = match delta {
            Ok(delta) => {
                total.add(cache.import(delta));
                ("completed", Ok(total))
            }
            // The sockets are ours already: a lost delta costs exchanges, not availability.
            Err(e) => {
                tracing::warn!(error = %e, "the predecessor's last entries did not arrive; those tokens will be exchanged again");
                ("completed_without_delta", Err(e))
            }
        };
        metrics
            .handover
            .with_label_values(&["successor", outcome])
            .inc();
        metrics
            .handover_entries
            .with_label_values(&["received"])
            .inc_by(total.installed as u64);
        metrics
            .handover_seconds
            .with_label_values(&["successor"])
            .set(started.elapsed().as_secs_f64());
        tracing::info!(
            entries = total.installed,
            kept_ours = total.kept_ours,
            refused = total.refused,
            millis = started.elapsed().as_millis() as u64,
            "took over from the previous agent"
        );
        result
    }
}

/// What the predecessor side needs of the running server.
#[derive(Clone)]
pub struct Offer {
    pub cache: CredentialCache,
    /// Every listening socket the server holds, owned for as long as this offer lives.
    pub listeners: Arc<Vec<(Role, SocketAddr, OwnedFd)>>,
    /// The verifier, whose keys go to the successor.
    pub verifier: Option<Arc<Verifier>>,
    /// Stops accepting and refreshing, and waits for requests in flight (within the grace).
    pub retire: Arc<dyn Fn() -> futures_util::future::BoxFuture<'static, ()> + Send + Sync>,
}

/// The predecessor side: listens for a successor for as long as this agent runs.
pub struct Predecessor {
    handed_over: watch::Receiver<bool>,
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
        let listener = UnixListener::bind(&path)?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        }
        let (tx, rx) = watch::channel(false);
        let settings = settings.clone();
        let runtime = tokio::runtime::Handle::current();
        std::thread::Builder::new()
            .name("handover".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    let Ok(stream) = conn else { continue };
                    if *tx.borrow() {
                        refuse(stream, &settings, "this agent already handed over");
                        continue;
                    }
                    match hand_over(stream, &settings, &offer, &runtime, &metrics) {
                        Ok(sent) => {
                            tracing::info!(entries = sent, "handed over to the next agent; idle until terminated");
                            let _ = tx.send(true);
                        }
                        Err(e) => {
                            metrics
                                .handover
                                .with_label_values(&["predecessor", "failed"])
                                .inc();
                            tracing::warn!(error = %e, "a handover to a new agent failed; still serving");
                        }
                    }
                }
            })?;
        Ok(Predecessor { handed_over: rx })
    }

    pub fn handed_over(&self) -> bool {
        *self.handed_over.borrow()
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
}

fn refuse(stream: UnixStream, settings: &HandoverSettings, reason: &str) {
    if let Ok(mut c) = Channel::new(stream, settings.timeout) {
        let _ = c.recv();
        let _ = c.send(&Msg::Refused {
            reason: reason.to_owned(),
        });
    }
}

/// The predecessor's side of one handover, blocking; returns the entries sent.
fn hand_over(
    stream: UnixStream,
    settings: &HandoverSettings,
    offer: &Offer,
    runtime: &tokio::runtime::Handle,
    metrics: &Metrics,
) -> Result<usize, HandoverError> {
    let started = Instant::now();
    let mut channel = Channel::new(stream, settings.timeout)?;
    check_peer(&channel)?;
    let (version, pid) = match channel.recv()? {
        (
            Msg::Hello {
                protocol,
                version,
                pid,
            },
            _,
        ) if protocol == PROTOCOL => (version, pid),
        (Msg::Hello { protocol, .. }, _) => {
            let reason = format!("protocol {protocol} is not this agent's {PROTOCOL}");
            let _ = channel.send(&Msg::Refused {
                reason: reason.clone(),
            });
            return Err(HandoverError::Refused(reason));
        }
        (other, _) => return Err(HandoverError::Unexpected(other.name())),
    };
    metrics
        .handover
        .with_label_values(&["predecessor", "started"])
        .inc();
    tracing::info!(successor_pid = pid, successor_version = %version, "a new agent is taking over");
    if let Some(keys) = offer.verifier.as_ref().and_then(|v| v.snapshot()) {
        channel.send(&Msg::Keys { keys })?;
    }
    let (snapshot, newest) = offer.cache.export(0);
    let mut sent = snapshot.len();
    let mut snapshot = snapshot.into_iter().map(to_wire).peekable();
    while snapshot.peek().is_some() {
        let chunk: Vec<WireEntry> = snapshot.by_ref().take(CHUNK).collect();
        channel.send(&Msg::Entries { entries: chunk })?;
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
    // The successor starts serving on them, then says so. It may take a while to start.
    channel.set_timeout(settings.timeout * 5)?;
    match channel.recv()? {
        (Msg::Taken, _) => {}
        (other, _) => return Err(HandoverError::Unexpected(other.name())),
    }
    channel.set_timeout(settings.timeout)?;
    // Both serve on the same sockets now; stop here, finish what is in flight.
    runtime.block_on((offer.retire)());
    let (delta, _) = offer.cache.export(newest);
    sent += delta.len();
    let mut delta = delta.into_iter().map(to_wire).peekable();
    while delta.peek().is_some() {
        let chunk: Vec<WireEntry> = delta.by_ref().take(CHUNK).collect();
        channel.send(&Msg::Delta { entries: chunk })?;
    }
    channel.send(&Msg::Done)?;
    metrics
        .handover
        .with_label_values(&["predecessor", "completed"])
        .inc();
    metrics
        .handover_entries
        .with_label_values(&["sent"])
        .inc_by(sent as u64);
    metrics
        .handover_seconds
        .with_label_values(&["predecessor"])
        .set(started.elapsed().as_secs_f64());
    Ok(sent)
}
