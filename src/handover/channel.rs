//! One end of a handover connection: the framing and descriptor passing that [`super::wire`]'s
//! contract describes (length-prefixed JSON frames of [`Msg`], `SCM_RIGHTS` on the frame that
//! names the descriptors, every read and write bounded by a step timeout and a deadline).

use super::wire::{Msg, MAX_FDS, MAX_FRAME, MAX_UNCOMMITTED_FRAME};
use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the peer closed the connection")]
    Closed,
    #[error("frame of {0} bytes is larger than allowed")]
    TooLarge(usize),
    #[error("frame is not a handover message: {0}")]
    Malformed(String),
    #[error("{0} descriptors came with a frame that names {1}")]
    Descriptors(usize, usize),
    #[error("the peer did not answer in time")]
    Timeout,
}

/// One end of a handover connection (blocking; run it off the async runtime).
pub struct Channel {
    pub(super) stream: UnixStream,
    /// How long one read or write may wait.
    step: Duration,
    /// When everything on this channel must be done by, if ever.
    deadline: Option<Instant>,
    /// The largest frame [`Channel::recv`] reads.
    max_frame: usize,
}

fn io_err(e: nix::Error) -> std::io::Error {
    std::io::Error::from_raw_os_error(e as i32)
}

fn timed_out(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

impl Channel {
    /// A channel on `stream` whose reads and writes each wait at most `step`, with no deadline,
    /// reading frames of at most [`MAX_UNCOMMITTED_FRAME`].
    pub fn new(stream: UnixStream, step: Duration) -> std::io::Result<Channel> {
        stream.set_nonblocking(false)?;
        Ok(Channel {
            stream,
            step,
            deadline: None,
            max_frame: MAX_UNCOMMITTED_FRAME,
        })
    }

    pub fn set_timeout(&mut self, step: Duration) {
        self.step = step;
    }

    /// Everything from now on must be done within `within` (replacing any earlier deadline).
    pub fn set_deadline(&mut self, within: Duration) {
        self.deadline = Some(Instant::now() + within);
    }

    /// Read frames of up to `max` bytes (at most [`MAX_FRAME`]).
    pub fn set_max_frame(&mut self, max: usize) {
        self.max_frame = max.min(MAX_FRAME);
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// The peer's user id (`SO_PEERCRED`, as it was when it connected).
    pub fn peer_uid(&self) -> std::io::Result<u32> {
        super::rendezvous::peer_uid(&self.stream)
    }

    /// Set the socket's timeouts for the next system call: the step, or what is left of the
    /// deadline if that is shorter; past the deadline, [`WireError::Timeout`].
    fn arm(&self) -> Result<(), WireError> {
        let mut wait = self.step;
        if let Some(deadline) = self.deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(WireError::Timeout);
            }
            wait = wait.min(left);
        }
        // A zero timeout would mean "wait forever".
        let wait = Some(wait.max(Duration::from_millis(1)));
        self.stream.set_read_timeout(wait)?;
        self.stream.set_write_timeout(wait)?;
        Ok(())
    }

    fn read_full(&mut self, mut buf: &mut [u8]) -> Result<(), WireError> {
        while !buf.is_empty() {
            self.arm()?;
            match self.stream.read(buf) {
                Ok(0) => return Err(WireError::Closed),
                Ok(n) => buf = &mut buf[n..],
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if timed_out(&e) => return Err(WireError::Timeout),
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    fn write_full(&mut self, mut buf: &[u8]) -> Result<(), WireError> {
        while !buf.is_empty() {
            self.arm()?;
            match self.stream.write(buf) {
                Ok(0) => return Err(WireError::Closed),
                Ok(n) => buf = &buf[n..],
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if timed_out(&e) => return Err(WireError::Timeout),
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    fn frame(msg: &Msg) -> Result<Vec<u8>, WireError> {
        let json = serde_json::to_vec(msg).map_err(|e| WireError::Malformed(e.to_string()))?;
        if json.len() > MAX_FRAME {
            return Err(WireError::TooLarge(json.len()));
        }
        let mut frame = Vec::with_capacity(4 + json.len());
        frame.extend_from_slice(&(json.len() as u32).to_be_bytes());
        frame.extend_from_slice(&json);
        Ok(frame)
    }

    pub fn send(&mut self, msg: &Msg) -> Result<(), WireError> {
        let frame = Self::frame(msg)?;
        self.write_full(&frame)
    }

    /// Send `msg` with `fds` attached to its first bytes.
    pub fn send_with_fds(&mut self, msg: &Msg, fds: &[RawFd]) -> Result<(), WireError> {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};
        let frame = Self::frame(msg)?;
        let cmsg = [ControlMessage::ScmRights(fds)];
        let sent = loop {
            self.arm()?;
            match sendmsg::<UnixAddr>(
                self.stream.as_raw_fd(),
                &[IoSlice::new(&frame)],
                &cmsg,
                MsgFlags::empty(),
                None,
            ) {
                Ok(n) => break n,
                Err(nix::Error::EINTR) => continue,
                Err(nix::Error::EAGAIN) => return Err(WireError::Timeout),
                Err(e) => return Err(io_err(e).into()),
            }
        };
        self.write_full(&frame[sent..])
    }

    /// The next message and the descriptors that came with it.
    pub fn recv(&mut self) -> Result<(Msg, Vec<OwnedFd>), WireError> {
        use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixAddr};
        let mut len = [0u8; 4];
        let mut fds = Vec::new();
        let mut cmsg_space = nix::cmsg_space!([RawFd; MAX_FDS]);
        let got = loop {
            self.arm()?;
            let mut iov = [IoSliceMut::new(&mut len)];
            match recvmsg::<UnixAddr>(
                self.stream.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg_space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(msg) => {
                    for c in msg.cmsgs().map_err(io_err)? {
                        if let ControlMessageOwned::ScmRights(raw) = c {
                            // SAFETY: the kernel just created these descriptors for this
                            // process; nothing else owns them.
                            fds.extend(
                                raw.into_iter()
                                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                            );
                        }
                    }
                    break msg.bytes;
                }
                Err(nix::Error::EINTR) => continue,
                Err(nix::Error::EAGAIN) => return Err(WireError::Timeout),
                Err(e) => return Err(io_err(e).into()),
            }
        };
        if got == 0 {
            return Err(WireError::Closed);
        }
        self.read_full(&mut len[got..])?;
        let n = u32::from_be_bytes(len) as usize;
        if n > self.max_frame {
            return Err(WireError::TooLarge(n));
        }
        let mut body = vec![0u8; n];
        self.read_full(&mut body)?;
        let msg: Msg =
            serde_json::from_slice(&body).map_err(|e| WireError::Malformed(e.to_string()))?;
        let named = match &msg {
            Msg::Listeners { listeners } => listeners.len(),
            _ => 0,
        };
        if fds.len() != named {
            return Err(WireError::Descriptors(fds.len(), named));
        }
        Ok((msg, fds))
    }

    /// Block until the peer closes its end or sends anything (no timeout, no deadline): how a
    /// predecessor that handed over learns that its successor is gone. Returns at once if this
    /// end is shut down.
    pub fn wait_closed(&mut self) {
        let _ = self.stream.set_read_timeout(None);
        let mut byte = [0u8; 1];
        loop {
            match self.stream.read(&mut byte) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                _ => return,
            }
        }
    }
}
