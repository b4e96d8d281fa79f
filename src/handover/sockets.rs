//! What a successor accepts as its predecessor's listening sockets.
//!
//! Contract: [`check`] passes a received descriptor only if it is a listening TCP socket
//! (`SO_DOMAIN` IPv4 or IPv6, `SO_TYPE` stream, `SO_ACCEPTCONN`), bound (`getsockname`) to
//! exactly the address the message claims, that address is one this agent is configured to serve
//! in that role, and (where the kernel says, 5.14+) it belongs to this agent's network namespace
//! (`SO_NETNS_COOKIE`). Anything else (a UDP or Unix socket, a file, a listener on another
//! address or in another namespace) refuses the whole handover: the successor binds fresh.

use crate::server::listener::Role;
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

/// This process's network namespace cookie, if the kernel has them.
fn own_cookie() -> Option<u64> {
    let probe = std::net::UdpSocket::bind("127.0.0.1:0").ok()?;
    let fd = OwnedFd::from(probe);
    int_option(&fd, libc::SOL_SOCKET, SO_NETNS_COOKIE).ok()
}

/// Whether `fd` is a listening socket at `claimed` that this agent would serve in `role`.
pub fn check(
    role: Role,
    claimed: SocketAddr,
    fd: &OwnedFd,
    expected: &Expected,
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
    if let (Some(ours), Ok(theirs)) = (
        own_cookie(),
        int_option(fd, libc::SOL_SOCKET, SO_NETNS_COOKIE),
    ) {
        if ours != theirs {
            return Err(format!("{bound} is in another network namespace"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(check(Role::Credentials, addr, &fd, &expected(addr)), Ok(()));
        // Claimed as something else, or in another role, or at an address we do not serve.
        let other: SocketAddr = "127.0.0.9:80".parse().expect("addr");
        assert!(check(Role::Credentials, other, &fd, &expected(other)).is_err());
        assert!(check(Role::Metrics, addr, &fd, &expected(addr)).is_err());
        assert!(check(Role::Credentials, addr, &fd, &expected(other)).is_err());
        // A UDP socket, a connected stream, a file.
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
        let uaddr = udp.local_addr().expect("addr");
        assert!(check(
            Role::Credentials,
            uaddr,
            &OwnedFd::from(udp),
            &expected(uaddr)
        )
        .is_err());
        let stream = std::net::TcpStream::connect(addr).expect("connect");
        let saddr = stream.local_addr().expect("addr");
        assert!(check(
            Role::Credentials,
            saddr,
            &OwnedFd::from(stream),
            &expected(saddr)
        )
        .is_err());
        let file = std::fs::File::open("/dev/null").expect("file");
        assert!(check(
            Role::Credentials,
            addr,
            &OwnedFd::from(file),
            &expected(addr)
        )
        .is_err());
    }
}
