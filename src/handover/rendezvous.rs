//! Where a successor finds its predecessor: an abstract Unix socket, named in a file in the
//! handover directory.
//!
//! Contract: [`Published::listen`] binds the abstract name `pod-identity-agent/handover/` plus
//! 32 lowercase hex digits (128 random bits from the system's generator, fresh at every listen,
//! so nobody can bind it first) with a fresh [`Secret`], and [`Published::publish`] writes the
//! name and the secret to `<dir>/agent.name` with [`crate::files::write_private`] (0600, never
//! through a planted file or link): the two ends of a handover prove to each other that they
//! read that file ([`super::auth`]).
//!
//! Abstract names exist per network namespace: only a process in this agent's namespace can
//! connect to the name, and only one there can bind a name a successor connects to, whatever
//! files it can reach. [`read_name`] accepts only this user's own regular file holding exactly
//! such a name and a secret (a planted FIFO or link is refused, without waiting on it; a file
//! of an agent of protocol 3, a name alone, is refused: such an agent cannot prove anything).
//! [`connect`] reaches a name without ever blocking on a full queue, and [`check_peer`] refuses
//! a peer of another user (`SO_PEERCRED`): any process in the namespace can connect to an
//! abstract name, so that check is what keeps unprivileged ones out. [`listening`] tells
//! whether a name is bound and listening in this namespace, from `/proc`, without connecting
//! to it. [`legacy`] tells whether an agent of protocol 1 (a pathname `agent.sock`, which any
//! namespace with the directory reaches) still listens, without sending it anything, and
//! removes only such a socket that refuses connections. Nothing here removes a name file: a
//! running agent replaces one that names no listening socket, so a live peer's name is never
//! dropped.

use super::auth::Secret;
use super::HandoverError;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

/// The file that names the running agent's socket.
pub const NAME_FILE: &str = "agent.name";
/// Where agents of protocol 1 listened.
pub const LEGACY_SOCKET: &str = "agent.sock";
const PREFIX: &str = "pod-identity-agent/handover/";
/// Random hex digits after the prefix.
const RANDOM_HEX: usize = 32;
/// How often [`connect`] tries again while a socket's queue is full.
const FULL_QUEUE_RETRY: Duration = Duration::from_millis(20);

fn random_name() -> std::io::Result<String> {
    let mut bytes = [0u8; RANDOM_HEX / 2];
    aws_lc_rs::rand::fill(&mut bytes)
        .map_err(|_| std::io::Error::other("the system's random generator failed"))?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("{PREFIX}{hex}"))
}

/// Whether `name` is one [`Published::listen`] could have made: nothing else is connected to.
pub fn valid(name: &str) -> bool {
    name.strip_prefix(PREFIX).is_some_and(|hex| {
        hex.len() == RANDOM_HEX
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// This agent's abstract socket, waiting for a successor.
pub struct Published {
    pub listener: UnixListener,
    pub name: String,
    /// What a successor must prove it read, beside the name.
    pub secret: Secret,
}

impl Published {
    /// Bind a fresh random abstract name (another, should one be taken), with a fresh secret.
    pub fn listen() -> std::io::Result<Published> {
        let mut last = None;
        for _ in 0..4 {
            let name = random_name()?;
            match UnixListener::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes())?) {
                Ok(listener) => {
                    let secret = Secret::generate()?;
                    return Ok(Published {
                        listener,
                        name,
                        secret,
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| std::io::Error::other("no abstract name was free")))
    }

    /// Name this socket in `dir`, replacing whatever named another.
    pub fn publish(&self, dir: &Path) -> std::io::Result<()> {
        write_name(dir, &self.name, &self.secret)
    }
}

/// Write `name` and `secret` to the name file in `dir`: a line each.
pub fn write_name(dir: &Path, name: &str, secret: &Secret) -> std::io::Result<()> {
    let contents = format!("{name}\n{}\n", secret.to_hex());
    crate::files::write_private(&dir.join(NAME_FILE), contents.as_bytes())
}

/// What a name file says: where the running agent listens, and the secret it shares with
/// whoever may take over from it.
#[derive(Debug, Clone)]
#[cfg_attr(test, derive(PartialEq, Eq))]
pub struct Named {
    pub name: String,
    pub secret: Secret,
}

/// The name and secret in `dir`, if there is a name file; an error if it is not this user's
/// regular file or does not hold exactly a name this protocol makes and a secret.
pub fn read_name(dir: &Path) -> Result<Option<Named>, String> {
    let Some(bytes) = crate::files::read_private(&dir.join(NAME_FILE), 256)? else {
        return Ok(None);
    };
    let text = String::from_utf8(bytes).map_err(|_| "not text".to_owned())?;
    let mut lines = text.split('\n');
    let (name, secret, rest) = (lines.next(), lines.next(), lines.collect::<Vec<_>>());
    let name = name.filter(|n| valid(n)).ok_or_else(|| {
        format!(
            "does not hold a handover socket name ({} bytes)",
            text.len()
        )
    })?;
    let secret = secret
        .and_then(Secret::from_hex)
        .filter(|_| rest == [""])
        .ok_or_else(|| {
            "holds no handover secret after the name (an agent of protocol 3 or older wrote it, or it was planted)".to_owned()
        })?;
    Ok(Some(Named {
        name: name.to_owned(),
        secret,
    }))
}

fn io_err(e: nix::Error) -> std::io::Error {
    std::io::Error::from_raw_os_error(e as i32)
}

/// Connect to the abstract socket `name` in this network namespace, trying for up to `within`
/// while its queue is full. A blocking connect would wait for as long as that lasts: a listener
/// that never accepts (anyone in the namespace can bind one, and a planted name can name it)
/// would hold the caller, and the runtime that waits for it at exit, forever.
pub fn connect(name: &str, within: Duration) -> std::io::Result<UnixStream> {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    use std::os::fd::AsRawFd;
    let addr = UnixAddr::new_abstract(name.as_bytes()).map_err(io_err)?;
    let until = Instant::now() + within;
    loop {
        let fd = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(io_err)?;
        match connect(fd.as_raw_fd(), &addr) {
            Ok(()) => {
                let stream = UnixStream::from(fd);
                stream.set_nonblocking(false)?;
                return Ok(stream);
            }
            Err(nix::Error::EAGAIN) if Instant::now() < until => {
                std::thread::sleep(FULL_QUEUE_RETRY)
            }
            Err(nix::Error::EINTR) => {}
            Err(e) => return Err(io_err(e)),
        }
    }
}

/// The peer's user id (`SO_PEERCRED`: as it was when it connected).
pub fn peer_uid(stream: &UnixStream) -> std::io::Result<u32> {
    nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)
        .map(|c| c.uid())
        .map_err(|e| std::io::Error::from_raw_os_error(e as i32))
}

/// Refuse a peer that does not run as this agent's user.
pub fn check_peer(stream: &UnixStream) -> Result<(), HandoverError> {
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let peer = peer_uid(stream)?;
    if peer != me {
        return Err(HandoverError::Stranger(peer));
    }
    Ok(())
}

/// Whether the abstract socket `name` is bound and listening in this thread's network
/// namespace (`/proc/thread-self/net/unix`: `__SO_ACCEPTCON`, path `@name`).
pub fn listening(name: &str) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/thread-self/net/unix") else {
        return false;
    };
    let path = format!("@{name}");
    table.lines().skip(1).any(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        cols.len() >= 8 && cols[7] == path && cols[3] == "00010000"
    })
}

/// What listens at `<dir>/agent.sock`, where agents of protocol 1 listened.
#[derive(Debug, PartialEq, Eq)]
pub enum Legacy {
    None,
    /// A socket file nobody listens on (its agent is gone): removed.
    Stale,
    /// Something accepts connections there: an older agent, which holds the ports.
    Live,
}

/// Look at `<dir>/agent.sock` without sending anything to whatever listens there (a
/// non-blocking connect, closed at once), and remove it if it is a socket that refuses
/// connections; anything else there (a link, a file) is not an agent's and is left alone.
pub fn legacy(dir: &Path) -> Legacy {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    use std::os::unix::fs::FileTypeExt;
    let path = dir.join(LEGACY_SOCKET);
    match std::fs::symlink_metadata(&path) {
        Ok(meta) if meta.file_type().is_socket() => {}
        _ => return Legacy::None,
    }
    let Ok(addr) = UnixAddr::new(&path) else {
        return Legacy::None;
    };
    let Ok(fd) = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    ) else {
        return Legacy::None;
    };
    use std::os::fd::AsRawFd;
    match connect(fd.as_raw_fd(), &addr) {
        // Connected, or its backlog is full: something listens.
        Ok(()) | Err(nix::Error::EAGAIN) => Legacy::Live,
        Err(nix::Error::ECONNREFUSED) => {
            let _ = std::fs::remove_file(&path);
            Legacy::Stale
        }
        // Not ours to judge (no permission, say): not an agent this one can reach.
        Err(_) => Legacy::None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_random_valid_and_strictly_read() {
        let a = Published::listen().expect("listen");
        let b = Published::listen().expect("listen");
        assert!(valid(&a.name) && valid(&b.name));
        assert_ne!(a.name, b.name);
        assert!(listening(&a.name));
        let dir = tempfile::tempdir().expect("dir");
        assert_eq!(read_name(dir.path()), Ok(None));
        a.publish(dir.path()).expect("publish");
        let named = Named {
            name: a.name.clone(),
            secret: a.secret.clone(),
        };
        assert_eq!(read_name(dir.path()), Ok(Some(named)));
        assert_ne!(a.secret, b.secret, "a fresh secret at every listen");
        let file = dir.path().join(NAME_FILE);
        let secret = a.secret.to_hex();
        for bad in [
            // Protocol 3's file: a name alone.
            a.name.clone(),
            format!("{}\n", a.name),
            format!("{}\n{}", a.name, secret),
            format!("{}\n{}\n\n", a.name, secret),
            format!("{}\n{}\n", a.name, &secret[1..]),
            format!("{}\n{}\n", a.name, secret.to_uppercase()),
            format!("{}\n{}\n", a.name.to_uppercase(), secret),
            format!("{PREFIX}{}", "0".repeat(31)),
            format!("{PREFIX}{}", "g".repeat(32)),
            format!("other/{}", "0".repeat(32)),
            format!("\0{}", &a.name[1..]),
        ] {
            std::fs::write(&file, &bad).expect("write");
            assert!(read_name(dir.path()).is_err(), "{bad:?}");
        }
        // A stream to it reaches this process, as this user.
        let s = connect(&a.name, Duration::ZERO).expect("connect");
        assert!(check_peer(&s).is_ok());
        let (_accepted, _) = a.listener.accept().expect("accept");
        drop(a);
        assert!(connect(&b.name, Duration::ZERO).is_ok());
        let gone = b.name.clone();
        drop(b);
        assert!(!listening(&gone));
        assert!(connect(&gone, Duration::ZERO).is_err());
    }

    /// `f`'s result, if it comes within two seconds; else the test fails (the thread is left).
    fn at_once<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(f()));
        rx.recv_timeout(Duration::from_secs(2))
            .expect("blocked instead of answering")
    }

    #[test]
    fn a_planted_fifo_or_a_full_queue_is_an_error_at_once_never_a_wait() {
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join(NAME_FILE);
        let path = std::ffi::CString::new(file.as_os_str().as_encoded_bytes()).expect("path");
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
        let d = dir.path().to_owned();
        assert!(at_once(move || read_name(&d)).is_err());
        // A listener that never accepts, its queue filled.
        let stuck = Published::listen().expect("listen");
        let mut queued = Vec::new();
        loop {
            match connect(&stuck.name, Duration::ZERO) {
                Ok(s) => queued.push(s),
                Err(e) => {
                    assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock, "{e}");
                    break;
                }
            }
            assert!(queued.len() < 100_000, "the queue never filled");
        }
        let started = Instant::now();
        let name = stuck.name.clone();
        let tried = at_once(move || connect(&name, Duration::from_millis(200)));
        assert!(tried.is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock));
        assert!(started.elapsed() >= Duration::from_millis(200));
        // Room again: it connects.
        drop(stuck.listener.accept().expect("accept"));
        assert!(connect(&stuck.name, Duration::from_millis(200)).is_ok());
    }

    #[test]
    fn an_older_agents_socket_is_seen_without_a_word_and_a_stale_one_removed() {
        let dir = tempfile::tempdir().expect("dir");
        assert_eq!(legacy(dir.path()), Legacy::None);
        let path = dir.path().join(LEGACY_SOCKET);
        let live = UnixListener::bind(&path).expect("bind");
        assert_eq!(legacy(dir.path()), Legacy::Live);
        live.set_nonblocking(true).expect("nonblocking");
        let (mut s, _) = live.accept().expect("the probe connected");
        use std::io::Read;
        let mut buf = Vec::new();
        s.set_nonblocking(false).expect("blocking");
        s.read_to_end(&mut buf).expect("read");
        assert!(buf.is_empty(), "nothing was sent to it");
        drop(live);
        assert_eq!(legacy(dir.path()), Legacy::Stale);
        assert!(!path.exists());
        // What is not a socket is nobody's agent, and stays.
        std::fs::write(&path, "not a socket").expect("write");
        assert_eq!(legacy(dir.path()), Legacy::None);
        assert!(path.exists());
        std::fs::remove_file(&path).expect("remove");
        let elsewhere = dir.path().join("elsewhere.sock");
        let _bound = UnixListener::bind(&elsewhere).expect("bind");
        std::os::unix::fs::symlink(&elsewhere, &path).expect("link");
        assert_eq!(legacy(dir.path()), Legacy::None);
        assert!(path.exists() && elsewhere.exists());
    }
}
