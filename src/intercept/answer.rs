//! The supervisor's side of bind interception: the sockets a worker may get ([`Sockets`],
//! [`Target`]), the address learned without `--listen` ([`Learner`]), and [`watch`], which
//! answers each trapped `bind()`/`listen()` (see the parent module for the policy).

use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use nix::sys::socket::{self, SockType, SockaddrStorage, sockopt};

use crate::sys;

use super::inspect::*;
use super::{MAX_SOCKADDR, NR_BIND, NR_LISTEN};

/// One of herdsman's TCP sockets a worker may get in place of its own.
#[derive(Debug)]
pub struct Target {
    pub addr: SocketAddr,
    fd: OwnedFd,
    inode: u64,
}

impl Target {
    /// A TCP listening socket (`None` for anything else).
    fn of(fd: OwnedFd) -> Option<Target> {
        let stream = socket::getsockopt(&fd, sockopt::SockType).is_ok_and(|t| t == SockType::Stream);
        let addr = socket::getsockname::<SockaddrStorage>(fd.as_raw_fd()).ok().and_then(|a| to_std(&a))?;
        let inode = nix::sys::stat::fstat(fd.as_raw_fd()).ok()?.st_ino;
        stream.then_some(Target { addr, fd, inode })
    }
}

/// A worker's TCP sockets (the shared ones, or its steered members), and, when herdsman has
/// none yet (no `--listen`), the [`Learner`] every worker shares.
#[derive(Debug, Default)]
pub struct Sockets {
    list: Vec<Arc<Target>>,
    learner: Option<Arc<Learner>>,
}

impl Sockets {
    /// The TCP listening sockets among `fds` (copies; unix sockets and others are left out).
    pub fn of(fds: &[RawFd], learner: Option<Arc<Learner>>) -> Sockets {
        let list =
            fds.iter().filter_map(|&raw| Target::of(sys::dup_raw_cloexec(raw).ok()?)).map(Arc::new).collect();
        Sockets { list, learner }
    }

    /// The socket a bind of `want` gets: the exact address, else the only one on its port;
    /// with no socket of its own, the one learned from the first worker's bind.
    pub fn find(&self, want: SocketAddr) -> Option<Arc<Target>> {
        if want.port() == 0 {
            return None;
        }
        if let Some(l) = &self.learner {
            return l.get().filter(|t| t.addr.port() == want.port());
        }
        let exact =
            |t: &&Arc<Target>| t.addr.port() == want.port() && canonical(t.addr.ip()) == canonical(want.ip());
        if let Some(t) = self.list.iter().find(exact) {
            return Some(t.clone());
        }
        let mut same_port = self.list.iter().filter(|t| t.addr.port() == want.port());
        match (same_port.next(), same_port.next()) {
            (Some(t), None) => Some(t.clone()),
            // Several on that port (systemd's v4 and v6): the wildcard of the same family.
            (Some(_), Some(_)) => self
                .list
                .iter()
                .find(|t| {
                    t.addr.port() == want.port()
                        && t.addr.is_ipv4() == want.is_ipv4()
                        && t.addr.ip().is_unspecified()
                })
                .cloned(),
            _ => None,
        }
    }

    fn by_inode(&self, inode: u64) -> Option<Arc<Target>> {
        if let Some(l) = &self.learner {
            return l.get().filter(|t| t.inode == inode);
        }
        self.list.iter().find(|t| t.inode == inode).cloned()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.list.is_empty() && self.learner.is_none()
    }
}

/// The address herdsman learns from the first worker that binds a TCP address itself, when it
/// was started without `--listen` (standalone, not socket-activated): herdsman binds that
/// address once, in the supervisor, and every worker gets that socket, as Node's cluster
/// module does. Shared by all workers' bind filters.
#[derive(Debug, Default)]
pub struct Learner {
    learned: std::sync::Mutex<Option<Arc<Target>>>,
}

impl Learner {
    fn get(&self) -> Option<Arc<Target>> {
        self.learned.lock().ok()?.clone()
    }

    /// The learned socket, binding `asked` now if nothing was learned yet (then also the new
    /// listener, for the supervisor to keep and hand to every later worker).
    fn learn(&self, asked: SocketAddr) -> Result<(Arc<Target>, Option<crate::listeners::Listener>), String> {
        let mut learned = self.learned.lock().map_err(|_| "poisoned".to_string())?;
        if let Some(t) = learned.as_ref() {
            return Ok((t.clone(), None));
        }
        let l = crate::listeners::Listeners::bind_learned(asked, 0).map_err(|e| e.to_string())?;
        let fd = l.copy().map_err(|e| e.to_string())?;
        let t = Arc::new(Target::of(fd).ok_or("the learned socket is not a TCP listener")?);
        *learned = Some(t.clone());
        Ok((t, Some(l)))
    }
}

/// Below `net.ipv4.ip_unprivileged_port_start` (1024 where it cannot be read): a port only a
/// process with `CAP_NET_BIND_SERVICE` may bind.
fn privileged(port: u16) -> bool {
    let start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(1024);
    u32::from(port) < start
}

/// `::ffff:a.b.c.d` as `a.b.c.d`.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// What the supervisor learns from a worker's trapped calls.
#[derive(Debug)]
pub enum Seen {
    /// It bound one of herdsman's sockets (`asked`: the address it asked for); `learned`:
    /// herdsman had none and bound this one for it, to keep and hand to every worker.
    Bound { asked: SocketAddr, served: SocketAddr, learned: Option<crate::listeners::Listener> },
    /// It called `listen()` on one of herdsman's sockets.
    Listened,
    /// It bound a TCP address on a port herdsman does not serve.
    Foreign { asked: SocketAddr },
    /// A trapped call could not be inspected (the reason; the call went on unchanged).
    Failed(String),
}

/// Answers `pid`'s trapped calls on the event loop until its last process is gone, telling
/// `report` what it saw.
///
/// `owner`: the workers' user and group (`--user`; `None`: herdsman's own). Everything read
/// about a trapped call (its sockaddr in `/proc/TID/mem`, its descriptor in `/proc/TID/fd`) is
/// read as that user, so the supervisor needs no `CAP_SYS_PTRACE` or `CAP_DAC_READ_SEARCH` for
/// workers of another user (see `sys::with_fs_ids`).
pub fn watch(
    listener: Arc<OwnedFd>,
    sockets: Arc<Sockets>,
    owner: Option<(u32, u32)>,
    report: impl Fn(Seen) + Send + 'static,
) {
    let afd = match sys::watch_readable(listener.clone()) {
        Ok(a) => a,
        Err(e) => {
            report(Seen::Failed(format!("cannot watch the bind filter: {e}")));
            return;
        }
    };
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = afd.readable().await else { return };
            let mut fds = [nix::poll::PollFd::new(listener.as_fd(), nix::poll::PollFlags::POLLIN)];
            let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO);
            let revents = fds[0].revents().unwrap_or(nix::poll::PollFlags::empty());
            if revents.contains(nix::poll::PollFlags::POLLIN) {
                match sys::notif_recv(&listener) {
                    Ok(n) => {
                        // The sockaddr is read off the loop, with a deadline (see `read_sockaddr`).
                        let read = match n.data.nr as u32 {
                            NR_BIND => {
                                let len = (n.data.args[2] as usize).min(MAX_SOCKADDR);
                                let mem = as_mem(owner, n.pid as i32);
                                Some(read_sockaddr(mem, n.data.args[1], len, MEMORY_READ_DEADLINE).await)
                            }
                            _ => None,
                        };
                        let seen = match owner {
                            Some((uid, gid)) => {
                                sys::with_fs_ids(uid, gid, || answer(&listener, &sockets, &n, owner, read))
                            }
                            None => answer(&listener, &sockets, &n, owner, read),
                        };
                        if let Some(seen) = seen {
                            report(seen);
                        }
                    }
                    // The task went away between the wake-up and the read.
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                    Err(e) => {
                        report(Seen::Failed(format!("reading a bind notification: {e}")));
                        return;
                    }
                }
            } else if revents.intersects(nix::poll::PollFlags::POLLHUP | nix::poll::PollFlags::POLLERR) {
                // No process uses the filter any more: the worker and its children are gone.
                return;
            } else {
                guard.clear_ready();
            }
        }
    });
}

/// Answers one notification; what it saw, if anything worth telling. `owner`: the workers'
/// user and group when they are not herdsman's own (see `watch`).
/// `read`: what [`read_sockaddr`] read of a `bind()`'s sockaddr (`None` for other calls).
fn answer(
    listener: &OwnedFd,
    sockets: &Sockets,
    n: &libc::seccomp_notif,
    owner: Option<(u32, u32)>,
    read: Option<Read>,
) -> Option<Seen> {
    let go_on = || {
        let _ = sys::notif_respond(listener, n.id, 0, 0, true);
    };
    let nr = n.data.nr as u32;
    let tid = n.pid as i32;
    let fd = n.data.args[0] as RawFd;
    if nr == NR_LISTEN {
        let ours = socket_inode(tid, fd).and_then(|i| sockets.by_inode(i)).is_some();
        if ours {
            // Already listening with herdsman's backlog: nothing to do, and nothing to change.
            let _ = sys::notif_respond(listener, n.id, 0, 0, false);
            return Some(Seen::Listened);
        }
        go_on();
        return None;
    }
    if nr != NR_BIND {
        go_on();
        return None;
    }
    let buf = match read {
        Some(Read::Done(Ok(b))) => b,
        Some(Read::Done(Err(e))) if matches!(e.raw_os_error(), Some(libc::EPERM | libc::EACCES)) => {
            go_on();
            return Some(Seen::Failed(format!(
                "cannot read the worker's memory ({e}): run herdsman as root or as the workers' user"
            )));
        }
        Some(Read::TimedOut) => {
            go_on();
            return Some(Seen::Failed(format!(
                "reading the bind() address in the worker's memory took over {} s (is it on a hung file system?): the bind went on unchanged",
                MEMORY_READ_DEADLINE.as_secs()
            )));
        }
        // A bad address (EFAULT) or a task that is gone: the kernel answers the call itself.
        Some(Read::Done(Err(_))) | None => {
            go_on();
            return None;
        }
    };
    if !sys::notif_id_valid(listener, n.id) {
        return None;
    }
    let Some(asked) = parse_sockaddr(&buf) else {
        go_on();
        return None;
    };
    if asked.port() == 0 {
        go_on();
        return None;
    }
    match is_stream(tid, fd) {
        Ok(true) => {}
        Ok(false) => {
            go_on();
            return None;
        }
        Err(e) => {
            go_on();
            return Some(Seen::Failed(format!("cannot read the type of the worker's socket (fd {fd}): {e}")));
        }
    }
    let mut learned = None;
    let target = match (sockets.find(asked), &sockets.learner) {
        (Some(t), _) => t,
        // A worker of another user may not get, through the root supervisor, a port it could
        // not bind itself: its own bind fails as it would without herdsman.
        (None, Some(_)) if owner.is_some_and(|(uid, _)| uid != 0) && privileged(asked.port()) => {
            go_on();
            return Some(Seen::Failed(format!(
                "the worker (another user) binds {asked}, a privileged port: herdsman binds it for such a worker only when asked (--listen {asked}, or a socket unit)"
            )));
        }
        (None, Some(l)) if l.get().is_none() => match l.learn(asked) {
            Ok((t, new)) => {
                learned = new;
                t
            }
            Err(e) => {
                // The app gets its own bind's outcome (EADDRINUSE if something else has it).
                go_on();
                return Some(Seen::Failed(format!(
                    "binding {asked} (learned from the worker's own bind): {e}"
                )));
            }
        },
        (None, _) => {
            go_on();
            return Some(Seen::Foreign { asked });
        }
    };
    if socket_inode(tid, fd) != Some(target.inode) {
        let flags = fd_flags(tid, fd).unwrap_or(0);
        let ours = nix::fcntl::fcntl(target.fd.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL).unwrap_or(0);
        if flags & libc::O_NONBLOCK != 0 && ours & libc::O_NONBLOCK == 0 {
            let set = nix::fcntl::OFlag::from_bits_truncate(ours | libc::O_NONBLOCK);
            if nix::fcntl::fcntl(target.fd.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(set)).is_ok() {
                tracing::info!(
                    "made {} non-blocking for every worker, as the app's own socket was (it is never made blocking again)",
                    target.addr
                );
            }
        }
        let cloexec = flags & libc::O_CLOEXEC != 0;
        if let Err(e) = sys::notif_addfd(listener, n.id, target.fd.as_fd(), fd as u32, cloexec) {
            if e.raw_os_error() == Some(libc::ENOENT) {
                return None;
            }
            go_on();
            return Some(Seen::Failed(format!("installing {} at the app's fd {fd}: {e}", target.addr)));
        }
    }
    let _ = sys::notif_respond(listener, n.id, 0, 0, false);
    Some(Seen::Bound { asked, served: target.addr, learned })
}
