//! Proof that a handover peer shares this agent's network namespace.
//!
//! Contract: [`Issued::new`] binds a Unix socket with a random *abstract* name (abstract names
//! exist per network namespace, not on a filesystem) and a random nonce; the peer is sent both
//! and must [`answer`]: connect to that name and write the nonce. [`Issued::check`] waits (up to
//! a timeout) for the nonce. A process in another network namespace cannot reach the name, so it
//! cannot answer, whatever the filesystem, user or PID namespace it shares. (The `SO_PEERCRED`
//! PID of a peer in another pod is 0, so `/proc/<pid>/ns/net` cannot be compared there.)

use super::wire::Challenge;
use super::HandoverError;
use std::io::{Read, Write};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::time::{Duration, Instant};

/// A challenge this agent issued and waits for the answer to.
pub struct Issued {
    listener: UnixListener,
    challenge: Challenge,
}

fn random_hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", fastrand::u8(..)))
        .collect()
}

impl Issued {
    pub fn new() -> std::io::Result<Issued> {
        let name = format!("pod-identity-agent/handover/{}", random_hex(16));
        let listener = UnixListener::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes())?)?;
        listener.set_nonblocking(true)?;
        Ok(Issued {
            listener,
            challenge: Challenge {
                name,
                nonce: random_hex(32),
            },
        })
    }

    pub fn challenge(&self) -> Challenge {
        self.challenge.clone()
    }

    /// Wait up to `timeout` for a connection that writes the nonce.
    pub fn check(self, timeout: Duration) -> Result<(), HandoverError> {
        let deadline = Instant::now() + timeout;
        let mut stream = loop {
            match self.listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return Err(HandoverError::OtherNamespace);
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(e.into()),
            }
        };
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(
            deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(10)),
        ))?;
        let mut got = vec![0u8; self.challenge.nonce.len()];
        stream
            .read_exact(&mut got)
            .map_err(|_| HandoverError::OtherNamespace)?;
        if got != self.challenge.nonce.as_bytes() {
            return Err(HandoverError::OtherNamespace);
        }
        Ok(())
    }
}

/// Answer a peer's challenge: reachable only from its network namespace.
pub fn answer(challenge: &Challenge, timeout: Duration) -> Result<(), HandoverError> {
    let addr = SocketAddr::from_abstract_name(challenge.name.as_bytes())?;
    let mut s = UnixStream::connect_addr(&addr).map_err(|_| HandoverError::OtherNamespace)?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(challenge.nonce.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_from_this_namespace_passes_a_wrong_or_missing_one_does_not() {
        let issued = Issued::new().expect("issue");
        let c = issued.challenge();
        let t = std::thread::spawn(move || answer(&c, Duration::from_secs(1)));
        assert!(issued.check(Duration::from_secs(2)).is_ok());
        assert!(t.join().expect("thread").is_ok());

        let issued = Issued::new().expect("issue");
        let mut wrong = issued.challenge();
        wrong.nonce = "0".repeat(wrong.nonce.len());
        std::thread::spawn(move || answer(&wrong, Duration::from_secs(1)));
        assert!(matches!(
            issued.check(Duration::from_secs(1)),
            Err(HandoverError::OtherNamespace)
        ));

        let issued = Issued::new().expect("issue");
        assert!(matches!(
            issued.check(Duration::from_millis(50)),
            Err(HandoverError::OtherNamespace)
        ));
        let nobody = Challenge {
            name: "pod-identity-agent/handover/nobody".into(),
            nonce: "x".into(),
        };
        assert!(answer(&nobody, Duration::from_millis(50)).is_err());
    }
}
