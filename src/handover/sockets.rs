//! What a successor accepts as its predecessor's listening sockets.
//!
//! Contract: [`check`] passes a received descriptor only if it is a listening TCP socket
//! (`SO_DOMAIN` IPv4 or IPv6, `SO_TYPE` stream, `SO_ACCEPTCONN`), bound (`getsockname`) to
//! exactly the address the message claims, that address is one this agent is configured to serve
//! in that role, and it belongs to this agent's network namespace: by `SO_NETNS_COOKIE` where the
//! kernel has it (5.14+), else by finding its inode among the listening sockets of
//! `/proc/thread-self/net/tcp` and `tcp6` (which list this namespace's only); a namespace that
//! cannot be told fails the check. Anything else (a UDP or Unix socket, a file, a listener on
//! another address or in another namespace) is refused: the successor closes it and binds that
//! address itself.

use crate::server::bind::Role;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};

/// The asm-generic socket option numbers (x86-64, arm64).
const SO_ACCEPTCONN: libc::c_int = 30;
const SO_DOMAIN: libc::c_int = 39;
const SO_NETNS_COOKIE: libc::c_int = 71;

/// What this agent would bind, by role (port 0: any port of that address).
#[derive(Debug, Clone, Default)]
pub struct Expected {
    pub credentials: Vec<SocketAddr>,
    pub probe: Option<SocketAddr>,
    pub metrics: Option<SocketAddr>,
}

impl Expected {
    fn allows(&self, role: Role, addr: SocketAddr) -> bool {
        let fits = |want: &SocketAddr| {
            want.ip().to_canonical() == addr.ip().to_canonical()
                && (want.port() == 0 || want.port() == addr.port())
        };
        match role {
            Role::Credentials => self.credentials.iter().any(fits),
            Role::Probe => self.probe.as_ref().is_some_and(fits),
            Role::Metrics => self.metrics.as_ref().is_some_and(fits),
        }
    }
}

fn int_option(fd: &OwnedFd, level: libc::c_int, name: libc::c_int) -> std::io::Result<u64> {
    let mut value: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `value`, which is that large.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&mut value as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // Options are ints (4 bytes) except the cookie (8).
    Ok(if len == 4 { value & 0xffff_ffff } else { value })
}

/// How to tell whether a socket is in this agent's network namespace, worked out once per
/// handover.
pub enum Namespace {
    /// This namespace's cookie.
    Cookie(u64),
    /// Inodes of the TCP sockets listening in this namespace (kernels without cookies).
    Listening(HashSet<u64>),
    /// Neither works here: no socket passes.
    Unknown(String),
}

impl Namespace {
    pub fn here() -> Namespace {
        let cookie = std::net::UdpSocket::bind("127.0.0.1:0")
            .map(OwnedFd::from)
            .and_then(|fd| int_option(&fd, libc::SOL_SOCKET, SO_NETNS_COOKIE));
        match cookie {
            Ok(c) => Namespace::Cookie(c),
            Err(_) => match listening_inodes() {
                Ok(inodes) => Namespace::Listening(inodes),
                Err(e) => Namespace::Unknown(e.to_string()),
            },
        }
    }

    fn holds(&self, fd: &OwnedFd) -> Result<bool, String> {
        match self {
            Namespace::Cookie(ours) => int_option(fd, libc::SOL_SOCKET, SO_NETNS_COOKIE)
                .map(|theirs| theirs == *ours)
                .map_err(|e| e.to_string()),
            Namespace::Listening(inodes) => Ok(inodes.contains(&inode(fd)?)),
            Namespace::Unknown(why) => Err(format!("cannot tell its network namespace: {why}")),
        }
    }
}

fn inode(fd: &OwnedFd) -> Result<u64, String> {
    // SAFETY: an all-zero `stat` is valid, and fstat fills it for an open descriptor.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid `stat` to write to; the descriptor is open for the call.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    Ok(st.st_ino)
}

/// Inodes of the TCP sockets in state `LISTEN` (`0A`) in this thread's network namespace.
fn listening_inodes() -> std::io::Result<HashSet<u64>> {
    let mut inodes = HashSet::new();
    for table in ["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"] {
        let text = match std::fs::read_to_string(table) {
            Ok(t) => t,
            // No IPv6 in this kernel: its table is missing, not empty.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && table.ends_with('6') => continue,
            Err(e) => return Err(e),
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() > 9 && cols[3] == "0A" {
                if let Ok(inode) = cols[9].parse() {
                    inodes.insert(inode);
                }
            }
        }
    }
    Ok(inodes)
}

/// Whether `fd` is a listening socket at `claimed`, in `namespace`, that this agent would serve
/// in `role`.
pub fn check(
    role: Role,
    claimed: SocketAddr,
    fd: &OwnedFd,
    expected: &Expected,
    namespace: &Namespace,
) -> Result<(), String> {
    let domain =
        int_option(fd, libc::SOL_SOCKET, SO_DOMAIN).map_err(|e| format!("not a socket ({e})"))?;
    if domain != libc::AF_INET as u64 && domain != libc::AF_INET6 as u64 {
        return Err(format!("not an IP socket (domain {domain})"));
    }
    let kind = int_option(fd, libc::SOL_SOCKET, libc::SO_TYPE).map_err(|e| e.to_string())?;
    if kind != libc::SOCK_STREAM as u64 {
        return Err(format!("not a stream socket (type {kind})"));
    }
    if int_option(fd, libc::SOL_SOCKET, SO_ACCEPTCONN).map_err(|e| e.to_string())? != 1 {
        return Err("not listening".into());
    }
    let bound: SocketAddr = std::net::TcpListener::from(fd.try_clone().map_err(|e| e.to_string())?)
        .local_addr()
        .map_err(|e| e.to_string())?;
    if bound != claimed {
        return Err(format!("bound to {bound}, not {claimed} as claimed"));
    }
    if !expected.allows(role, bound) {
        return Err(format!(
            "{bound} is not an address this agent serves as {role:?}"
        ));
    }
    if !namespace.holds(fd)? {
        return Err(format!("{bound} is in another network namespace"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn here() -> Namespace {
        Namespace::here()
    }

    fn expected(addr: SocketAddr) -> Expected {
        Expected {
            credentials: vec![addr],
            ..Expected::default()
        }
    }

    #[test]
    fn only_the_listening_socket_we_would_bind_passes() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let fd = OwnedFd::from(l.try_clone().expect("dup"));
        assert_eq!(
            check(Role::Credentials, addr, &fd, &expected(addr), &here()),
            Ok(())
        );
        // Claimed as something else, or in another role, or at an address we do not serve.
        let other: SocketAddr = "127.0.0.9:80".parse().expect("addr");
        assert!(check(Role::Credentials, other, &fd, &expected(other), &here()).is_err());
        assert!(check(Role::Metrics, addr, &fd, &expected(addr), &here()).is_err());
        assert!(check(Role::Credentials, addr, &fd, &expected(other), &here()).is_err());
        // A UDP socket, a connected stream, a file.
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
        let uaddr = udp.local_addr().expect("addr");
        assert!(check(
            Role::Credentials,
            uaddr,
            &OwnedFd::from(udp),
            &expected(uaddr),
            &here()
        )
        .is_err());
        let stream = std::net::TcpStream::connect(addr).expect("connect");
        let saddr = stream.local_addr().expect("addr");
        assert!(check(
            Role::Credentials,
            saddr,
            &OwnedFd::from(stream),
            &expected(saddr),
            &here()
        )
        .is_err());
        let file = std::fs::File::open("/dev/null").expect("file");
        assert!(check(
            Role::Credentials,
            addr,
            &OwnedFd::from(file),
            &expected(addr),
            &here()
        )
        .is_err());
    }

    #[test]
    fn a_listener_in_another_namespace_fails_both_ways_of_telling() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let ours = OwnedFd::from(l);
        let by_table = Namespace::Listening(listening_inodes().expect("/proc"));
        assert_eq!(by_table.holds(&ours), Ok(true));
        assert_eq!(
            check(Role::Credentials, addr, &ours, &expected(addr), &by_table),
            Ok(())
        );
        assert!(Namespace::Unknown("no /proc".into()).holds(&ours).is_err());
        // A listener made in a network namespace of its own (needs root; skipped without).
        let theirs = std::thread::spawn(|| {
            // SAFETY: unshare(CLONE_NEWNET) moves only this thread to a new namespace.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return None;
            }
            let l = std::net::TcpListener::bind("0.0.0.0:0").ok()?;
            Some((l.local_addr().ok()?, OwnedFd::from(l)))
        })
        .join()
        .expect("thread");
        let Some((addr, theirs)) = theirs else {
            eprintln!("SKIPPED: cannot make a network namespace here (needs root)");
            return;
        };
        assert_eq!(by_table.holds(&theirs), Ok(false));
        let err = check(Role::Credentials, addr, &theirs, &expected(addr), &by_table);
        assert!(err.is_err_and(|e| e.contains("another network namespace")));
        if let Namespace::Cookie(_) = here() {
            assert_eq!(here().holds(&theirs), Ok(false));
        }
    }
}
