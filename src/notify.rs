//! Both directions of the sd_notify protocol.
//!
//! * [`Notifier`] tells *our* service manager about the supervisor (`READY=1`, `RELOADING=1`,
//!   `STATUS=`, ...). Written by hand rather than with the `sd-notify` crate because that crate
//!   reads `NOTIFY_SOCKET` from the process environment at each call; here `main` reads it
//!   once and injects it, so tests can point it at their own socket and workers never see it.
//! * [`WorkerNotify`] is the socket *workers* notify: our own datagram socket in herdsman's
//!   runtime directory, given to them as `NOTIFY_SOCKET` (a path, as systemd gives). Senders
//!   are identified by `SCM_CREDENTIALS` (the kernel-checked pid), as systemd does, so a
//!   worker can only speak for itself (or its own process group).

use std::io::{self, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram as StdDatagram};
use std::time::Duration;

use nix::sys::socket::{self, ControlMessageOwned, MsgFlags, sockopt};
use tokio::io::Interest;
use tokio::net::UnixDatagram;

/// Largest notify datagram we accept (systemd's limit is similar).
const MAX_DATAGRAM: usize = 4096;

/// Sends state changes to the service manager; a no-op without `NOTIFY_SOCKET`.
///
/// When the manager's socket is full, messages wait: *state* messages (`READY=1`,
/// `RELOADING=1`, `STOPPING=1`, ...) in order and never dropped, while only the newest
/// pending `STATUS=` is kept (status chatter can never push out a state change). Periodic
/// messages are coalesced too: one pending `WATCHDOG=1`, the newest `EXTEND_TIMEOUT_USEC=`.
#[derive(Debug)]
pub struct Notifier {
    target: Option<(StdDatagram, SocketAddr)>,
    /// The same address for `sendmsg` (a message that carries a descriptor, see
    /// [`Notifier::send_with_fd`]).
    nix_addr: Option<socket::UnixAddr>,
    pending: std::cell::RefCell<Pending>,
}

#[derive(Debug, Default)]
struct Pending {
    /// State messages the manager's socket had no room for, oldest first, each with the
    /// descriptor it carries (a copy: `FDSTORE=1`, see `fdstore`).
    state: std::collections::VecDeque<(String, Option<OwnedFd>)>,
    /// The newest `STATUS=` not sent yet (already sanitized).
    status: Option<String>,
}

/// Longest `STATUS=` text sent (systemd shows one line; datagrams are small).
const MAX_STATUS: usize = 1024;

impl Notifier {
    /// `socket` is the value of `NOTIFY_SOCKET` (a path, or `@name` for the abstract namespace).
    pub fn new(socket: Option<&str>) -> io::Result<Self> {
        let Some(path) = socket.filter(|s| !s.is_empty()) else {
            return Ok(Notifier::disabled());
        };
        let (addr, nix_addr) = match path.strip_prefix('@') {
            Some(name) => (
                SocketAddr::from_abstract_name(name.as_bytes())?,
                socket::UnixAddr::new_abstract(name.as_bytes()).map_err(io::Error::from)?,
            ),
            None => (SocketAddr::from_pathname(path)?, socket::UnixAddr::new(path).map_err(io::Error::from)?),
        };
        // Non-blocking: a service manager that does not read must never stall the event loop.
        let sock = StdDatagram::unbound()?;
        sock.set_nonblocking(true)?;
        Ok(Notifier { target: Some((sock, addr)), nix_addr: Some(nix_addr), pending: Default::default() })
    }

    pub fn disabled() -> Self {
        Notifier { target: None, nix_addr: None, pending: Default::default() }
    }

    /// Whether there is a service manager to notify (`NOTIFY_SOCKET` was set).
    pub fn is_enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Sends a state message (no `STATUS=`) with `fd` attached (`SCM_RIGHTS`): the fd store's
    /// `FDSTORE=1` (see `fdstore`, which builds the message). Like every state message it is
    /// never dropped nor reordered: when it must wait, a close-on-exec copy of `fd` waits with
    /// it (the error is that copy failing). A no-op without a service manager.
    pub fn send_with_fd(&self, msg: &str, fd: BorrowedFd<'_>) -> io::Result<()> {
        if self.target.is_none() {
            return Ok(());
        }
        let mut p = self.pending.borrow_mut();
        if p.state.is_empty() {
            if let Sent::Yes = self.try_send_fd(msg, Some(fd)) {
                return Ok(());
            }
        }
        p.state.push_back((msg.to_string(), Some(fd.try_clone_to_owned()?)));
        drop(p);
        self.flush();
        Ok(())
    }

    /// Sends newline-separated `KEY=VALUE` assignments, in order. A `STATUS=` assignment runs
    /// to the end of the message (so it must come last): whatever follows it, newlines
    /// included, is status text, and control characters in it are replaced, so text from a
    /// config file or a worker can never inject `STOPPING=1`. When the manager's socket is
    /// full, the message waits (see [`Notifier`]) and [`Notifier::flush`] retries.
    pub fn send(&self, msg: &str) {
        if self.target.is_none() {
            return;
        }
        let (state, status) = split_status(msg);
        let mut p = self.pending.borrow_mut();
        if p.state.is_empty() && p.status.is_none() {
            // Nothing waits: send the message as one datagram, as given (sanitized).
            let whole = match (&state, &status) {
                (Some(st), Some(text)) => format!("{st}\nSTATUS={text}"),
                (Some(st), None) => st.clone(),
                (None, Some(text)) => format!("STATUS={text}"),
                (None, None) => return,
            };
            match self.try_send(&whole) {
                Sent::Yes => return,
                Sent::Full => {}
            }
        }
        if let Some(st) = state {
            p.push_state(st);
        }
        if status.is_some() {
            p.status = status;
        }
        drop(p);
        self.flush();
    }

    /// Whether messages wait for room in the manager's socket.
    pub fn has_backlog(&self) -> bool {
        let p = self.pending.borrow();
        !p.state.is_empty() || p.status.is_some()
    }

    /// Sends what waits (state messages in order, then the newest status); true if
    /// something is still waiting.
    pub fn flush(&self) -> bool {
        if self.target.is_none() {
            return false;
        }
        let mut p = self.pending.borrow_mut();
        while let Some((msg, fd)) = p.state.front() {
            let sent = match fd {
                Some(fd) => self.try_send_fd(msg, Some(fd.as_fd())),
                None => self.try_send(msg),
            };
            match sent {
                Sent::Full => return true,
                Sent::Yes => p.state.pop_front(),
            };
        }
        if let Some(text) = &p.status {
            match self.try_send(&format!("STATUS={text}")) {
                Sent::Full => return true,
                Sent::Yes => p.status = None,
            }
        }
        false
    }

    /// One datagram; errors other than a full socket are logged and count as sent (retrying
    /// would not help).
    fn try_send(&self, msg: &str) -> Sent {
        let Some((sock, addr)) = &self.target else { return Sent::Yes };
        match sock.send_to_addr(msg.as_bytes(), addr) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Sent::Full,
            Err(e) => {
                tracing::debug!("sd_notify failed: {e}");
                Sent::Yes
            }
            Ok(_) => Sent::Yes,
        }
    }

    /// One datagram carrying `fd`, as [`Notifier::try_send`].
    fn try_send_fd(&self, msg: &str, fd: Option<BorrowedFd<'_>>) -> Sent {
        let (Some((sock, _)), Some(addr)) = (&self.target, &self.nix_addr) else { return Sent::Yes };
        let raw = fd.map(|f| [f.as_raw_fd()]);
        let cmsg: Vec<socket::ControlMessage<'_>> =
            raw.as_ref().map(|r| vec![socket::ControlMessage::ScmRights(r)]).unwrap_or_default();
        let iov = [io::IoSlice::new(msg.as_bytes())];
        match socket::sendmsg(sock.as_raw_fd(), &iov, &cmsg, MsgFlags::MSG_DONTWAIT, Some(addr)) {
            Err(nix::errno::Errno::EAGAIN) => Sent::Full,
            Err(e) => {
                tracing::warn!("sd_notify with a descriptor failed ({:?}): {e}", msg.replace('\n', " "));
                Sent::Yes
            }
            Ok(_) => Sent::Yes,
        }
    }
}

enum Sent {
    Yes,
    Full,
}

impl Pending {
    fn push_state(&mut self, msg: String) {
        if msg == "WATCHDOG=1" && self.state.iter().any(|(m, _)| m == "WATCHDOG=1") {
            return;
        }
        let is_extend = |m: &str| m.starts_with("EXTEND_TIMEOUT_USEC=") && !m.contains('\n');
        if is_extend(&msg) {
            self.state.retain(|(m, _)| !is_extend(m));
        }
        self.state.push_back((msg, None));
    }
}

/// Splits a message into its state assignments (before a `STATUS=` line) and its status
/// text (everything after `STATUS=`, sanitized).
fn split_status(msg: &str) -> (Option<String>, Option<String>) {
    let at = if msg.starts_with("STATUS=") { Some(0) } else { msg.find("\nSTATUS=").map(|i| i + 1) };
    let (state, status) = match at {
        Some(i) => (&msg[..i], Some(sanitize_status(&msg[i + "STATUS=".len()..]))),
        None => (msg, None),
    };
    let state = state.trim_end_matches('\n');
    ((!state.is_empty()).then(|| state.to_string()), status)
}

/// Replaces control characters (newlines included) with spaces and caps the length, so the
/// text is one `STATUS=` value and nothing else.
pub fn sanitize_status(text: &str) -> String {
    let mut out: String = text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    if out.len() > MAX_STATUS {
        let cut = (0..=MAX_STATUS).rev().find(|i| out.is_char_boundary(*i)).unwrap_or(0);
        out.truncate(cut);
    }
    out
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
    // Bounded like every configured duration, so no deadline computed from it can overflow.
    Some(Duration::from_micros(usec / 2).min(crate::config::values::MAX_DURATION))
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
    /// The socket file (its device and inode, to remove only our own) and the directory we
    /// created for it, removed on drop.
    file: Option<(std::path::PathBuf, (u64, u64))>,
    made_dir: Option<std::path::PathBuf>,
}

const SOCKET_PREFIX: &str = "notify-";
const SOCKET_SUFFIX: &str = ".sock";

impl WorkerNotify {
    /// Binds the workers' socket: `DIR/notify-PID.sock` in `dir` (herdsman's runtime
    /// directory, chosen by `main`), else an abstract one (`@herdsman/...`), which some clients
    /// (Ruby's `sd_notify`) cannot reach.
    pub fn bind(dir: Option<&std::path::Path>) -> io::Result<Self> {
        match dir {
            // A directory we cannot use must not stop the app from starting: abstract, as before.
            Some(dir) => Self::bind_in(dir).or_else(|e| {
                tracing::warn!("{e}; workers get an abstract notify socket");
                Self::bind_abstract()
            }),
            None => Self::bind_abstract(),
        }
    }

    /// A filesystem socket, like the `NOTIFY_SOCKET` systemd hands out, so a plain
    /// `connect()`+`send()` works (Ruby's `Addrinfo.unix`, Sidekiq, Puma). Permissions: the
    /// socket is 0666 and the directory gets search (x) permission for group and others but
    /// not read, so workers running as another user can reach the socket without listing the
    /// directory. That is safe because a datagram only counts when its kernel-checked sender
    /// (`SCM_CREDENTIALS`) is one of our workers (or in a worker's process group); anyone
    /// else's is read and dropped. Why not 0660 with the workers' group, or 0600: the socket
    /// must stay reachable by workers of every `user` a reload may switch between (old and new
    /// ones send at once), by workers' children (`systemd-notify --ready`) and by a worker
    /// that drops privileges itself (`gosu`, `setpriv`, an app calling `setuid`), as
    /// systemd's own `/run/systemd/notify` (0777) is. The pid in the name keeps supervisors that
    /// share a directory apart; sockets left by killed supervisors (nobody answers on them)
    /// are removed, ours included when our pid was reused. A path longer than a socket
    /// address allows falls back to an abstract socket.
    pub fn bind_in(dir: &std::path::Path) -> io::Result<Self> {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let path = dir.join(format!("{SOCKET_PREFIX}{}{SOCKET_SUFFIX}", std::process::id()));
        if path.as_os_str().len() >= 108 {
            tracing::warn!(
                "{} is too long for a socket address; workers get an abstract notify socket",
                path.display()
            );
            return Self::bind_abstract();
        }
        let mut made_dir = None;
        let mut attempts = 0;
        let std_sock = loop {
            attempts += 1;
            if !dir.exists() {
                use std::os::unix::fs::DirBuilderExt;
                std::fs::DirBuilder::new().recursive(true).mode(0o711).create(dir)?;
                made_dir = Some(dir.to_path_buf());
            }
            if let Ok(meta) = std::fs::metadata(dir) {
                let mode = meta.permissions().mode() & 0o7777;
                if mode & 0o011 != 0o011 {
                    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o011));
                }
            }
            remove_stale(dir);
            match StdDatagram::bind(&path) {
                Ok(s) => break s,
                // Another supervisor removed the (empty) directory meanwhile: make it again.
                Err(e) if e.kind() == io::ErrorKind::NotFound && attempts < 5 => continue,
                Err(e) if e.kind() == io::ErrorKind::AddrInUse && attempts < 5 && is_stale(&path) => {
                    let _ = std::fs::remove_file(&path);
                }
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("cannot create the workers' notify socket {}: {e}", path.display()),
                    ));
                }
            }
        };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))?;
        let meta = std::fs::symlink_metadata(&path)?;
        socket::setsockopt(&std_sock, sockopt::PassCred, &true).map_err(io::Error::from)?;
        std_sock.set_nonblocking(true)?;
        Ok(WorkerNotify {
            sock: UnixDatagram::from_std(std_sock)?,
            address: path.display().to_string(),
            file: Some((path, (meta.dev(), meta.ino()))),
            made_dir,
        })
    }

    /// An abstract socket unique to this supervisor (nothing on disk). Abstract sockets follow
    /// the network namespace, which workers share with us.
    fn bind_abstract() -> io::Result<Self> {
        // Unique per socket even when two are bound in the same microsecond (tests do).
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("herdsman/{}/notify/{:x}-{seq}", std::process::id(), monotonic_usec());
        let addr = SocketAddr::from_abstract_name(name.as_bytes())?;
        let std_sock = StdDatagram::bind_addr(&addr)?;
        socket::setsockopt(&std_sock, sockopt::PassCred, &true).map_err(io::Error::from)?;
        std_sock.set_nonblocking(true)?;
        Ok(WorkerNotify {
            sock: UnixDatagram::from_std(std_sock)?,
            address: format!("@{name}"),
            file: None,
            made_dir: None,
        })
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

/// The workers' notify socket in an upgrade's state.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct NotifyState {
    pub fd: std::os::fd::RawFd,
    pub address: String,
    pub file: Option<(std::path::PathBuf, (u64, u64))>,
    pub made_dir: Option<std::path::PathBuf>,
}

impl WorkerNotify {
    /// For an in-place upgrade (workers keep their `NOTIFY_SOCKET`).
    pub fn export(&self, ex: &mut crate::handoff::Exporter) -> io::Result<NotifyState> {
        Ok(NotifyState {
            fd: ex.fd(&self.sock)?,
            address: self.address.clone(),
            file: self.file.clone(),
            made_dir: self.made_dir.clone(),
        })
    }

    /// The socket a previous image handed over. Must run inside the event loop's runtime.
    pub fn adopt(st: NotifyState, fds: &mut crate::sys::HandedOver) -> io::Result<WorkerNotify> {
        let std_sock = StdDatagram::from(fds.take(st.fd)?);
        std_sock.set_nonblocking(true)?;
        Ok(WorkerNotify {
            sock: UnixDatagram::from_std(std_sock)?,
            address: st.address,
            file: st.file,
            made_dir: st.made_dir,
        })
    }
}

impl Drop for WorkerNotify {
    fn drop(&mut self) {
        use std::os::unix::fs::MetadataExt;
        if let Some((path, id)) = &self.file {
            // Only our own socket: never a file someone put there after us.
            if std::fs::symlink_metadata(path).is_ok_and(|m| (m.dev(), m.ino()) == *id) {
                let _ = std::fs::remove_file(path);
            }
        }
        if let Some(dir) = &self.made_dir {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// A socket file nobody answers on (its supervisor was killed).
fn is_stale(path: &std::path::Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    let is_socket = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket());
    is_socket
        && StdDatagram::unbound()
            .and_then(|s| s.connect(path))
            .is_err_and(|e| e.kind() == io::ErrorKind::ConnectionRefused)
}

/// Removes the notify sockets of killed supervisors from `dir`.
fn remove_stale(dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(SOCKET_PREFIX) && name.ends_with(SOCKET_SUFFIX) && is_stale(&e.path()) {
            let _ = std::fs::remove_file(e.path());
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
        let huge = watchdog_interval(Some("18446744073709551615"), None, 7).unwrap();
        assert!(std::time::Instant::now().checked_add(huge).is_some());
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

    fn sink(tag: &str) -> (std::path::PathBuf, StdDatagram) {
        let dir = std::env::temp_dir().join(format!("herdsman-notify-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let rx = StdDatagram::bind(dir.join("sock")).unwrap();
        rx.set_nonblocking(true).unwrap();
        (dir, rx)
    }

    fn received(rx: &StdDatagram) -> Vec<String> {
        let mut buf = [0u8; 4096];
        let mut out = Vec::new();
        while let Ok(n) = rx.recv(&mut buf) {
            out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        out
    }

    #[test]
    fn status_text_cannot_inject_state_messages() {
        let (dir, rx) = sink("inject");
        let n = Notifier::new(dir.join("sock").to_str()).unwrap();
        n.send("STATUS=reload failed: bad\nSTOPPING=1\rREADY=1\u{0}x");
        n.send("STOPPING=1\nSTATUS=stopping\n");
        let got = received(&rx);
        assert_eq!(
            got,
            vec!["STATUS=reload failed: bad STOPPING=1 READY=1 x", "STOPPING=1\nSTATUS=stopping "]
        );
        let keys: Vec<String> = parse(got[0].as_bytes()).into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, vec!["STATUS"], "only one assignment: {got:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_full_socket_coalesces_status_and_never_drops_state_messages() {
        let (dir, rx) = sink("full");
        socket::setsockopt(&rx, sockopt::RcvBuf, &1024).unwrap();
        let n = Notifier::new(dir.join("sock").to_str()).unwrap();
        let mut i = 0;
        while !n.has_backlog() {
            assert!(i < 100_000, "the socket never filled up");
            n.send(&format!("STATUS=filler {i}"));
            i += 1;
        }
        n.send("READY=1");
        for j in 0..500 {
            n.send(&format!("STATUS=chatter {j}"));
        }
        n.send("STOPPING=1\nSTATUS=stopping");
        for _ in 0..50 {
            n.send("WATCHDOG=1");
        }
        n.send("STATUS=newest");
        let mut got = Vec::new();
        loop {
            let more = received(&rx);
            let waiting = n.flush();
            if more.is_empty() && !waiting {
                got.extend(received(&rx));
                break;
            }
            got.extend(more);
        }
        let pos = |m: &str| got.iter().position(|g| g == m);
        let (ready, stopping) = (pos("READY=1"), pos("STOPPING=1"));
        assert!(ready.is_some() && stopping.is_some(), "state messages lost: {got:?}");
        assert!(ready < stopping, "state messages reordered: {got:?}");
        assert_eq!(got.iter().filter(|g| *g == "WATCHDOG=1").count(), 1, "{got:?}");
        assert_eq!(got.last().map(String::as_str), Some("STATUS=newest"));
        assert!(!got.iter().any(|g| g.starts_with("STATUS=chatter")), "stale status kept: {got:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn the_worker_socket_is_a_path_that_replaces_stale_ones_and_is_removed_on_drop() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("herdsman-wn-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let ours = dir.join(format!("notify-{}.sock", std::process::id()));
        drop(StdDatagram::bind(&ours).unwrap()); // left by a killed supervisor with our pid
        drop(StdDatagram::bind(dir.join("notify-1.sock")).unwrap()); // another killed one
        let live = dir.join("notify-2.sock");
        let _other = StdDatagram::bind(&live).unwrap(); // a running supervisor
        let n = WorkerNotify::bind_in(&dir).unwrap();
        assert_eq!(n.address, ours.display().to_string());
        assert!(!dir.join("notify-1.sock").exists() && live.exists());
        let mode = std::fs::metadata(&ours).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o666);
        assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o011, 0o011);
        let tx = StdDatagram::unbound().unwrap();
        tx.connect(&ours).unwrap();
        tx.send(b"READY=1").unwrap();
        let msg = n.recv().await;
        assert_eq!(msg.pid, std::process::id() as i32);
        assert_eq!(msg.assignments, vec![("READY".to_string(), "1".to_string())]);
        drop(n);
        assert!(!ours.exists(), "removed on drop");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn assignments_are_split_per_line() {
        let got = parse(b"READY=1\nSTATUS=warming up\ngarbage\n");
        assert_eq!(got, vec![("READY".into(), "1".into()), ("STATUS".into(), "warming up".into())]);
    }
}
