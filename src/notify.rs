//! Both directions of the sd_notify protocol.
//!
//! * [`Notifier`] tells *our* service manager about the supervisor (`READY=1`, `RELOADING=1`,
//!   `STATUS=`, ...). Written by hand rather than with the `sd-notify` crate because that crate
//!   reads `NOTIFY_SOCKET` from the process environment at each call; here `main` reads it
//!   once and injects it, so tests can point it at their own socket and workers never see it.
//! * [`WorkerNotify`] is the socket *workers* notify: our own datagram socket, given to them as
//!   `NOTIFY_SOCKET`. Senders are identified by `SCM_CREDENTIALS` (the kernel-checked pid), as
//!   systemd does, so a worker can only speak for itself (or its own process group).

use std::io::{self, IoSliceMut};
use std::os::fd::AsRawFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram as StdDatagram};
use std::time::Duration;

use nix::sys::socket::{self, ControlMessageOwned, MsgFlags, sockopt};
use tokio::io::Interest;
use tokio::net::UnixDatagram;

/// Largest notify datagram we accept (systemd's limit is similar).
const MAX_DATAGRAM: usize = 4096;

/// Sends state changes to the service manager; a no-op without `NOTIFY_SOCKET`.
#[derive(Debug)]
pub struct Notifier {
    target: Option<(StdDatagram, SocketAddr)>,
    /// Messages the manager's socket had no room for, oldest first (bounded).
    backlog: std::cell::RefCell<std::collections::VecDeque<String>>,
}

/// At most this many unsent messages are kept; the oldest are dropped first.
const BACKLOG: usize = 64;

impl Notifier {
    /// `socket` is the value of `NOTIFY_SOCKET` (a path, or `@name` for the abstract namespace).
    pub fn new(socket: Option<&str>) -> io::Result<Self> {
        let Some(path) = socket.filter(|s| !s.is_empty()) else {
            return Ok(Notifier::disabled());
        };
        let addr = match path.strip_prefix('@') {
            Some(name) => SocketAddr::from_abstract_name(name.as_bytes())?,
            None => SocketAddr::from_pathname(path)?,
        };
        // Non-blocking: a service manager that does not read must never stall the event loop.
        let sock = StdDatagram::unbound()?;
        sock.set_nonblocking(true)?;
        Ok(Notifier { target: Some((sock, addr)), backlog: Default::default() })
    }

    pub fn disabled() -> Self {
        Notifier { target: None, backlog: Default::default() }
    }

    /// Sends newline-separated `KEY=VALUE` assignments, in order. When the manager's socket
    /// is full, the message waits in a small backlog that [`Notifier::flush`] retries.
    pub fn send(&self, msg: &str) {
        if self.target.is_none() {
            return;
        }
        let mut q = self.backlog.borrow_mut();
        q.push_back(msg.to_string());
        if q.len() > BACKLOG {
            q.pop_front();
        }
        drop(q);
        self.flush();
    }

    /// Whether messages wait for room in the manager's socket.
    pub fn has_backlog(&self) -> bool {
        !self.backlog.borrow().is_empty()
    }

    /// Sends what the backlog holds; true if something is still waiting.
    pub fn flush(&self) -> bool {
        let Some((sock, addr)) = &self.target else { return false };
        let mut q = self.backlog.borrow_mut();
        while let Some(msg) = q.front() {
            match sock.send_to_addr(msg.as_bytes(), addr) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) => tracing::debug!("sd_notify failed: {e}"),
                Ok(_) => {}
            }
            q.pop_front();
        }
        false
    }
}

/// `RELOADING=1` must carry the time the reload began (systemd 253+).
pub fn monotonic_usec() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|ts| ts.tv_sec() as u64 * 1_000_000 + ts.tv_nsec() as u64 / 1000)
        .unwrap_or(0)
}

/// How often to send `WATCHDOG=1`: half the interval systemd expects, when it is meant for us.
pub fn watchdog_interval(usec: Option<&str>, pid: Option<&str>, our_pid: u32) -> Option<Duration> {
    if pid.is_some_and(|p| p.trim() != our_pid.to_string()) {
        return None;
    }
    let usec: u64 = usec?.trim().parse().ok().filter(|u| *u > 0)?;
    Some(Duration::from_micros(usec / 2))
}

/// One datagram from a worker.
#[derive(Debug)]
pub struct Message {
    pub pid: i32,
    pub assignments: Vec<(String, String)>,
}

/// The notify socket workers talk to.
pub struct WorkerNotify {
    sock: UnixDatagram,
    /// The `NOTIFY_SOCKET` value for workers.
    pub address: String,
}

impl WorkerNotify {
    /// Binds an abstract socket unique to this supervisor: nothing on disk to clean up, and no
    /// directory to create or protect. (Abstract sockets follow the network namespace, which
    /// workers share with us.)
    pub fn bind() -> io::Result<Self> {
        let name = format!("herdsman/{}/notify/{:x}", std::process::id(), monotonic_usec());
        let addr = SocketAddr::from_abstract_name(name.as_bytes())?;
        let std_sock = StdDatagram::bind_addr(&addr)?;
        socket::setsockopt(&std_sock, sockopt::PassCred, &true).map_err(io::Error::from)?;
        std_sock.set_nonblocking(true)?;
        Ok(WorkerNotify { sock: UnixDatagram::from_std(std_sock)?, address: format!("@{name}") })
    }

    /// Waits for the next well-formed datagram; malformed ones are skipped.
    pub async fn recv(&self) -> Message {
        loop {
            let got = self
                .sock
                .async_io(Interest::READABLE, || {
                    let mut buf = [0u8; MAX_DATAGRAM];
                    let mut cmsg = nix::cmsg_space!(libc::ucred);
                    let mut iov = [IoSliceMut::new(&mut buf)];
                    let msg = socket::recvmsg::<()>(
                        self.sock.as_raw_fd(),
                        &mut iov,
                        Some(&mut cmsg),
                        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
                    )
                    .map_err(io::Error::from)?;
                    let pid = msg.cmsgs().ok().into_iter().flatten().find_map(|c| match c {
                        ControlMessageOwned::ScmCredentials(cred) => Some(cred.pid()),
                        _ => None,
                    });
                    let len = msg.bytes;
                    Ok((pid, buf[..len].to_vec()))
                })
                .await;
            match got {
                Ok((Some(pid), bytes)) => return Message { pid, assignments: parse(&bytes) },
                Ok((None, _)) => tracing::debug!("notify datagram without credentials ignored"),
                Err(e) => tracing::debug!("notify socket: {e}"),
            }
        }
    }
}

fn parse(bytes: &[u8]) -> Vec<(String, String)> {
    String::from_utf8_lossy(bytes)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_only_when_meant_for_us() {
        assert_eq!(watchdog_interval(Some("2000000"), None, 7), Some(Duration::from_secs(1)));
        assert_eq!(watchdog_interval(Some("2000000"), Some("7"), 7), Some(Duration::from_secs(1)));
        assert_eq!(watchdog_interval(Some("2000000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval(Some("zero"), None, 7), None);
    }

    #[test]
    fn a_manager_that_does_not_read_never_blocks_and_nothing_is_reordered() {
        let dir = std::env::temp_dir().join(format!("herdsman-notify-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("sock");
        let _ = std::fs::remove_file(&path);
        let rx = StdDatagram::bind(&path).unwrap();
        let n = Notifier::new(path.to_str()).unwrap();
        for i in 0..200 {
            n.send(&format!("STATUS={i}"));
        }
        assert!(n.flush(), "the socket is full, messages wait");
        let mut buf = [0u8; 64];
        let first = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..first], b"STATUS=0");
        while rx.recv(&mut buf).is_ok() && n.flush() {}
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn assignments_are_split_per_line() {
        let got = parse(b"READY=1\nSTATUS=warming up\ngarbage\n");
        assert_eq!(got, vec![("READY".into(), "1".into()), ("STATUS".into(), "warming up".into())]);
    }
}
