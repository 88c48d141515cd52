//! Bind interception: an unchanged server that binds herdsman's port itself
//! (`http.createServer(...).listen(8000)`, `python3 -m http.server 8000`, a static Go
//! `ListenAndServe(":8000")`) gets herdsman's listening socket instead of `EADDRINUSE`.
//!
//! How. Every worker installs, just before exec and after the privilege drop, a classic BPF
//! seccomp filter ([`filter`]) that traps only `bind()` and `listen()` with
//! `SECCOMP_RET_USER_NOTIF` (x86_64 only; other architectures, i386 `socketcall` and x32
//! included, are allowed through and get today's `EADDRINUSE`). The worker sends the filter's
//! notification descriptor to the supervisor over a socketpair and keeps no copy; the filter
//! and its descriptor cover every process the worker forks. [`watch`] answers each trapped
//! call on the supervisor's event loop:
//! * `bind()` of a TCP address (IPv4 or IPv6; the sockaddr read from `/proc/TID/mem` as the
//!   worker's own user, see [`watch`], on a thread of its own with a deadline so a page on a
//!   hung mount cannot stall the loop (`read_sockaddr`), then
//!   `SECCOMP_IOCTL_NOTIF_ID_VALID` so a reused pid
//!   cannot mislead us; the socket's protocol from its `system.sockprotoname`) whose port is one
//!   of the worker's sockets (the exact address first, else the only socket on that port), on
//!   a TCP socket: herdsman's socket is installed at the app's own descriptor number
//!   (`SECCOMP_IOCTL_NOTIF_ADDFD` with `SECCOMP_ADDFD_FLAG_SETFD`, keeping the app's
//!   close-on-exec flag), then the call returns 0. Not `SECCOMP_ADDFD_FLAG_SEND`, which would
//!   make `bind()` return the descriptor number. The two steps are not atomic, which is
//!   harmless: a bind restarted after a signal finds herdsman's socket already there and gets 0.
//! * `listen()` on a substituted socket returns 0 without touching the shared backlog.
//! * Everything else (another port, port 0, UDP, unix sockets, a socket we cannot inspect)
//!   continues as if no filter were there (`SECCOMP_USER_NOTIF_FLAG_CONTINUE`).
//!
//! With `--balance steer|sticky` the worker's own sockets are its member sockets, so it gets
//! its own member. This is not a security boundary: the only effect herdsman ever performs
//! is installing a socket the worker already holds at fd 3 — with one exception, the address
//! learned without `--listen`, which the supervisor binds itself. So a worker of another user
//! (`--user`) never gets a privileged port that way (below `ip_unprivileged_port_start`): its
//! bind fails as it would without herdsman, and `--listen` (or a socket unit) is the way to
//! give it one.
//!
//! `O_NONBLOCK` policy. The flag lives on the open file description that every worker, herdsman
//! and systemd share, so nobody may flip it back and forth. herdsman only ever *sets* it, never
//! clears it: when the app's own socket was non-blocking at its bind (Node's libuv and Go
//! create sockets with `SOCK_NONBLOCK` and depend on it: libuv accepts until `EAGAIN`), the
//! shared socket becomes non-blocking for good, with one log line. An app whose socket was
//! blocking (Python's `http.server`) leaves the flag as it is; such apps poll before they
//! accept. What an app does itself to the substituted descriptor is shared too: its
//! `fcntl(F_SETFL)`/`ioctl(FIONBIO)` changes the flag for every worker, and its
//! `shutdown(SHUT_RD)` stops the listener for every holder (as it does with fd 3 today;
//! `--balance steer` confines it to the worker's own member socket).
//!
//! Why by hand. No well-kept crate does seccomp *user notification*: `seccompiler` builds
//! filters but has no notification support, and the `libseccomp` crate binds the C library
//! (one more system dependency for an 8-instruction program and four ioctls). The filter is
//! built here in safe code; the system calls are in `sys`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use nix::sys::socket::{self, SockType, SockaddrStorage, sockopt};

use crate::config::BindIntercept;
use crate::sys;

/// `AUDIT_ARCH_X86_64` (linux/audit.h).
const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
/// x86_64 system call numbers.
const NR_BIND: u32 = 49;
const NR_LISTEN: u32 = 50;
/// x32 system calls have this bit set; they are allowed through like other architectures.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;
/// The longest sockaddr we read (`sockaddr_storage`).
const MAX_SOCKADDR: usize = 128;

/// The filter: on x86_64, `bind` and `listen` notify the supervisor; everything else, and
/// every other architecture, is allowed.
pub fn filter() -> Vec<libc::sock_filter> {
    use libc::{BPF_ABS, BPF_JEQ, BPF_JGE, BPF_JMP, BPF_K, BPF_LD, BPF_RET, BPF_W};
    let stmt = |code: u32, k: u32| libc::sock_filter { code: code as u16, jt: 0, jf: 0, k };
    let jump = |code: u32, k: u32, jt: u8, jf: u8| libc::sock_filter { code: code as u16, jt, jf, k };
    // struct seccomp_data: nr at 0, arch at 4.
    vec![
        stmt(BPF_LD | BPF_W | BPF_ABS, 4),
        jump(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 0, 5),
        stmt(BPF_LD | BPF_W | BPF_ABS, 0),
        jump(BPF_JMP | BPF_JGE | BPF_K, X32_SYSCALL_BIT, 3, 0),
        jump(BPF_JMP | BPF_JEQ | BPF_K, NR_BIND, 3, 0),
        jump(BPF_JMP | BPF_JEQ | BPF_K, NR_LISTEN, 2, 0),
        stmt(BPF_RET | BPF_K, libc::SECCOMP_RET_ALLOW),
        stmt(BPF_RET | BPF_K, libc::SECCOMP_RET_ALLOW),
        stmt(BPF_RET | BPF_K, libc::SECCOMP_RET_USER_NOTIF),
    ]
}

/// Why interception cannot work here, with the fix.
#[derive(Debug, thiserror::Error)]
pub enum Unavailable {
    #[error("bind interception supports x86_64 workers only (this is {0}); use --bind-intercept=off")]
    Arch(&'static str),
    #[error(
        "bind interception: {step} is not permitted ({err}): a seccomp filter around herdsman refuses it; allow it (systemd: add `seccomp` to SystemCallFilter=) or use --bind-intercept=off"
    )]
    Refused { step: &'static str, err: std::io::Error },
    #[error(
        "bind interception: {step} is missing ({err}): it needs Linux 5.9 or newer (SECCOMP_IOCTL_NOTIF_ADDFD), this is Linux {release}; upgrade the kernel or use --bind-intercept=off"
    )]
    Kernel { step: &'static str, err: std::io::Error, release: String },
    #[error(
        "bind interception: the worker program {program} is a {kind} binary, and the bind filter traps x86_64 system calls only (its own bind() would get EADDRINUSE); run a 64-bit build, or use --bind-intercept=off and have the app take its socket from fd 3 (LISTEN_FDS)"
    )]
    Compat { program: String, kind: &'static str },
}

/// What kind of compat binary `program` is (`"32-bit (i386)"`, `"x32"`, `"32-bit"`), from
/// its ELF header (`EI_CLASS`, `e_machine`); `None` for a 64-bit ELF, a script or anything
/// unreadable. A script (`#!`) is judged by its interpreter, one level deep (`#!/usr/bin/env
/// X` is not followed: what env runs is only known at exec).
///
/// Why the ELF header and not the filter's architecture check at run time: the filter sees
/// an i386 `bind()` only once the worker runs, too late to fail the start (`on`) or to say
/// so before the first crash loop (`auto`); the header is known before any worker starts. A
/// 64-bit launcher that execs a 32-bit program is not seen: that worker's bind proceeds and
/// fails as without herdsman (the filter allows every other architecture through).
pub fn compat_kind(program: &std::path::Path) -> Option<&'static str> {
    use std::io::Read;
    let mut head = [0u8; 256];
    let n = std::fs::File::open(program).and_then(|mut f| f.read(&mut head)).ok()?;
    let head = &head[..n];
    if let Some(line) = head.strip_prefix(b"#!") {
        let line = line.split(|&b| b == b'\n').next()?;
        let text = std::str::from_utf8(line).ok()?;
        let interpreter = text.split_whitespace().next()?;
        if interpreter.ends_with("/env") || !interpreter.starts_with('/') {
            return None;
        }
        let target = std::path::Path::new(interpreter);
        // One level: an interpreter that is itself a script is not followed.
        return if std::fs::read(target).is_ok_and(|b| b.starts_with(b"#!")) {
            None
        } else {
            compat_kind(target)
        };
    }
    if head.len() < 20 || &head[..4] != b"\x7fELF" {
        return None;
    }
    const ELFCLASS32: u8 = 1;
    const EM_386: u16 = 3;
    const EM_X86_64: u16 = 62;
    let machine = match head[5] {
        1 => u16::from_le_bytes([head[18], head[19]]),
        _ => u16::from_be_bytes([head[18], head[19]]),
    };
    match (head[4], machine) {
        (ELFCLASS32, EM_386) => Some("32-bit (i386)"),
        (ELFCLASS32, EM_X86_64) => Some("x32"),
        (ELFCLASS32, _) => Some("32-bit"),
        _ => None,
    }
}

/// The worker program as it will be executed: `command[0]` resolved on the workers' `PATH`
/// (`env`, herdsman's environment then the app's) from their directory; `None` when it
/// cannot be found (the spawn says why).
pub fn worker_program(
    command: &[String],
    env: &[(String, String)],
    cwd: Option<&std::path::Path>,
) -> Option<std::path::PathBuf> {
    let first = command.first()?;
    let found = crate::program::resolve(first, env, cwd).ok()?;
    let path = std::path::PathBuf::from(found);
    Some(match cwd {
        Some(dir) if path.is_relative() => dir.join(path),
        _ => path,
    })
}

/// Whether workers get the filter: `on` fails when it cannot work, `auto` logs why not once
/// and goes on without it, `off` never probes. `program`: the worker program (see
/// [`worker_program`]), checked for a 32-bit build.
pub fn resolve(mode: BindIntercept, program: Option<&std::path::Path>) -> Result<bool, Unavailable> {
    resolve_with(mode, program, || sys::probe_bind_filter(&filter()))
}

/// [`resolve`] with the kernel probe injected (tests give it an old kernel's answer).
fn resolve_with(
    mode: BindIntercept,
    program: Option<&std::path::Path>,
    probe: impl FnOnce() -> Result<(), sys::FilterRefused>,
) -> Result<bool, Unavailable> {
    if mode == BindIntercept::Off {
        return Ok(false);
    }
    let compat = program.and_then(|p| Some((p, compat_kind(p)?)));
    let verdict = if !cfg!(target_arch = "x86_64") {
        Err(Unavailable::Arch(std::env::consts::ARCH))
    } else if let Some((p, kind)) = compat {
        Err(Unavailable::Compat { program: p.display().to_string(), kind })
    } else {
        probe().map_err(|r| match r.err.raw_os_error() {
            Some(libc::EPERM | libc::EACCES) => Unavailable::Refused { step: r.step, err: r.err },
            _ => Unavailable::Kernel {
                step: r.step,
                err: r.err,
                release: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                    .map_or_else(|_| "unknown".into(), |r| r.trim().to_string()),
            },
        })
    };
    match (verdict, mode) {
        (Ok(()), _) => Ok(true),
        (Err(e), BindIntercept::On) => Err(e),
        (Err(e), _) => {
            tracing::warn!("{e}; going on without it (--bind-intercept=auto)");
            Ok(false)
        }
    }
}

/// A socketpair for one worker's notification descriptor: (the supervisor's end, the worker's).
pub fn channel() -> std::io::Result<(OwnedFd, OwnedFd)> {
    socket::socketpair(socket::AddressFamily::Unix, SockType::Datagram, None, socket::SockFlag::SOCK_CLOEXEC)
        .map_err(std::io::Error::from)
}

/// The notification descriptor a worker sent before its exec (so it is already queued).
pub fn receive(channel: &OwnedFd) -> std::io::Result<OwnedFd> {
    sys::recv_fd(channel)
}

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

fn to_std(a: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        return Some(SocketAddr::from((v4.ip(), v4.port())));
    }
    a.as_sockaddr_in6().map(|v6| SocketAddr::from((v6.ip(), v6.port())))
}

/// A sockaddr as the app passed it: `None` for anything but IPv4 and IPv6.
fn parse_sockaddr(b: &[u8]) -> Option<SocketAddr> {
    let family = u16::from_ne_bytes([*b.first()?, *b.get(1)?]);
    let port = u16::from_be_bytes([*b.get(2)?, *b.get(3)?]);
    match family as i32 {
        libc::AF_INET if b.len() >= 8 => {
            Some(SocketAddr::new(Ipv4Addr::new(b[4], b[5], b[6], b[7]).into(), port))
        }
        libc::AF_INET6 if b.len() >= 24 => {
            let octets: [u8; 16] = b[8..24].try_into().ok()?;
            Some(SocketAddr::new(Ipv6Addr::from(octets).into(), port))
        }
        _ => None,
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

/// How long reading a trapped `bind()`'s sockaddr may take before the call goes on
/// unchanged. The read faults the page in, and a page of a file on a hung FUSE or NFS mount
/// never comes: without a deadline, the supervisor's loop would wait with it.
pub const MEMORY_READ_DEADLINE: std::time::Duration = std::time::Duration::from_secs(2);

/// What reading a sockaddr gave.
#[derive(Debug)]
enum Read {
    Done(std::io::Result<Vec<u8>>),
    TimedOut,
}

/// Opens `/proc/TID/mem` as the worker's own user (the ptrace access check happens at the
/// open, with the filesystem ids: see `watch`). Opening touches no page of its memory.
fn as_mem(owner: Option<(u32, u32)>, tid: i32) -> std::io::Result<std::fs::File> {
    // Not process_vm_readv: it checks ptrace access with the real ids (root's, which would
    // need CAP_SYS_PTRACE for a worker of another user).
    let open = || std::fs::File::open(format!("/proc/{tid}/mem"));
    match owner {
        Some((uid, gid)) => sys::with_fs_ids(uid, gid, open),
        None => open(),
    }
}

/// Reads `len` bytes at `addr` of an open `/proc/TID/mem` on a thread of its own, so the
/// event loop never waits for a page that does not come; gives up after `deadline` (the
/// thread is left to finish, or to hang, alone: a detached thread, which neither the
/// runtime's shutdown nor herdsman's exit waits for).
async fn read_sockaddr(
    mem: std::io::Result<std::fs::File>,
    addr: u64,
    len: usize,
    deadline: std::time::Duration,
) -> Read {
    let mem = match mem {
        Ok(f) => f,
        Err(e) => return Read::Done(Err(e)),
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new().name("herdsman-bind-read".into()).spawn(move || {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; len];
        let r = mem.read_at(&mut buf, addr).map(|n| {
            buf.truncate(n);
            buf
        });
        let _ = tx.send(r);
    });
    if let Err(e) = spawned {
        return Read::Done(Err(e));
    }
    match tokio::time::timeout(deadline, rx).await {
        Ok(Ok(r)) => Read::Done(r),
        Ok(Err(_)) => Read::Done(Err(std::io::Error::other("the reading thread died"))),
        Err(_) => Read::TimedOut,
    }
}

/// The inode of the socket at `fd` in task `tid` (`/proc/TID/fd/N` reads `socket:[INODE]`).
fn socket_inode(tid: i32, fd: RawFd) -> Option<u64> {
    let link = std::fs::read_link(format!("/proc/{tid}/fd/{fd}")).ok()?;
    let s = link.to_str()?;
    s.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
}

/// The file status and descriptor flags of `fd` in task `tid` (`/proc/TID/fdinfo/N`, octal
/// `flags:`, `O_CLOEXEC` included).
fn fd_flags(tid: i32, fd: RawFd) -> Option<i32> {
    let info = std::fs::read_to_string(format!("/proc/{tid}/fdinfo/{fd}")).ok()?;
    let line = info.lines().find_map(|l| l.strip_prefix("flags:"))?;
    i32::from_str_radix(line.trim(), 8).ok()
}

/// Whether `fd` in task `tid` is a TCP socket (its `system.sockprotoname`: "TCP", "TCPv6",
/// "MPTCP"; UDP, unix and raw sockets are not).
fn is_stream(tid: i32, fd: RawFd) -> std::io::Result<bool> {
    let path = std::path::PathBuf::from(format!("/proc/{tid}/fd/{fd}"));
    sys::socket_protocol(&path).map(|p| p.starts_with("TCP") || p.starts_with("MPTCP"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockaddrs_are_read_as_the_kernel_lays_them_out() {
        let mut v4 = [0u8; 16];
        v4[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        v4[2..4].copy_from_slice(&8000u16.to_be_bytes());
        v4[4..8].copy_from_slice(&[127, 0, 0, 1]);
        assert_eq!(parse_sockaddr(&v4), Some("127.0.0.1:8000".parse().unwrap()));
        let mut v6 = [0u8; 28];
        v6[..2].copy_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
        v6[2..4].copy_from_slice(&8000u16.to_be_bytes());
        assert_eq!(parse_sockaddr(&v6), Some("[::]:8000".parse().unwrap()));
        let mut unix = [0u8; 16];
        unix[..2].copy_from_slice(&(libc::AF_UNIX as u16).to_ne_bytes());
        assert_eq!(parse_sockaddr(&unix), None);
        assert_eq!(parse_sockaddr(&v4[..4]), None);
    }

    #[test]
    fn a_bind_gets_the_exact_address_else_the_only_socket_on_its_port() {
        let l1 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let l2 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (p1, p2) = (l1.local_addr().unwrap().port(), l2.local_addr().unwrap().port());
        let s = Sockets::of(&[l1.as_raw_fd(), l2.as_raw_fd()], None);
        let at = |a: &str| s.find(a.parse().unwrap()).map(|t| t.addr.port());
        assert_eq!(at(&format!("127.0.0.1:{p1}")), Some(p1));
        assert_eq!(at(&format!("0.0.0.0:{p2}")), Some(p2), "any host, by port");
        assert_eq!(at(&format!("[::]:{p2}")), Some(p2), "any family, by port");
        assert_eq!(at("127.0.0.1:0"), None, "port 0 is never substituted");
        let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert_eq!(at(&other.local_addr().unwrap().to_string()), None);
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        assert!(Sockets::of(&[udp.as_raw_fd()], None).is_empty(), "only TCP sockets are offered");
    }

    /// An ELF header: `class` 1 (32-bit) or 2 (64-bit), little-endian, machine `machine`.
    fn elf(dir: &std::path::Path, name: &str, class: u8, machine: u16) -> std::path::PathBuf {
        let mut h = vec![0x7f, b'E', b'L', b'F', class, 1, 1, 0];
        h.resize(64, 0);
        h[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        h[18..20].copy_from_slice(&machine.to_le_bytes());
        let p = dir.join(name);
        std::fs::write(&p, h).unwrap();
        p
    }

    fn scratch(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("herdsman-intercept-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_32_bit_worker_program_is_recognised_by_its_elf_header() {
        let d = scratch("elf");
        assert_eq!(compat_kind(&elf(&d, "i386", 1, 3)), Some("32-bit (i386)"));
        assert_eq!(compat_kind(&elf(&d, "x32", 1, 62)), Some("x32"));
        assert_eq!(compat_kind(&elf(&d, "amd64", 2, 62)), None);
        // A script is judged by its interpreter.
        let i386 = elf(&d, "i386-interp", 1, 3);
        std::fs::write(d.join("script"), format!("#!{} -x\n", i386.display())).unwrap();
        assert_eq!(compat_kind(&d.join("script")), Some("32-bit (i386)"));
        std::fs::write(d.join("env-script"), "#!/usr/bin/env node\n").unwrap();
        assert_eq!(compat_kind(&d.join("env-script")), None);
        assert_eq!(compat_kind(&d.join("missing")), None);
        // This test binary itself is a 64-bit build.
        assert_eq!(compat_kind(&std::env::current_exe().unwrap()), None);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_32_bit_worker_fails_on_and_turns_auto_off() {
        let d = scratch("compat");
        let i386 = elf(&d, "i386", 1, 3);
        let ok = || Ok(());
        let e = resolve_with(BindIntercept::On, Some(&i386), ok).unwrap_err();
        assert!(matches!(e, Unavailable::Compat { kind: "32-bit (i386)", .. }), "{e}");
        let line = e.to_string();
        assert!(!line.contains('\n') && line.contains("--bind-intercept=off"), "{line}");
        assert!(!resolve_with(BindIntercept::Auto, Some(&i386), ok).unwrap());
        assert!(!resolve_with(BindIntercept::Off, Some(&i386), ok).unwrap());
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// A kernel before 5.9 answers `SECCOMP_IOCTL_NOTIF_ADDFD` with `EINVAL` (an unknown
    /// ioctl of the notification fd), one before 5.0 refuses the listener flag the same way.
    #[test]
    fn a_kernel_without_addfd_fails_on_and_turns_auto_off() {
        let old_kernel = || {
            Err(sys::FilterRefused {
                step: "SECCOMP_IOCTL_NOTIF_ADDFD",
                err: std::io::Error::from_raw_os_error(libc::EINVAL),
            })
        };
        if cfg!(target_arch = "x86_64") {
            let e = resolve_with(BindIntercept::On, None, old_kernel).unwrap_err();
            assert!(matches!(e, Unavailable::Kernel { step: "SECCOMP_IOCTL_NOTIF_ADDFD", .. }), "{e}");
            let line = e.to_string();
            assert!(
                !line.contains('\n') && line.contains("5.9") && line.contains("--bind-intercept=off"),
                "{line}"
            );
            assert!(!resolve_with(BindIntercept::Auto, None, old_kernel).unwrap());
            // A sandbox's refusal is told apart from an old kernel.
            let refused = || {
                Err(sys::FilterRefused {
                    step: "seccomp()",
                    err: std::io::Error::from_raw_os_error(libc::EPERM),
                })
            };
            assert!(matches!(
                resolve_with(BindIntercept::On, None, refused),
                Err(Unavailable::Refused { .. })
            ));
            assert!(resolve_with(BindIntercept::On, None, || Ok(())).unwrap());
        }
    }

    #[test]
    fn the_filter_is_accepted_by_this_kernel() {
        // The development and CI kernels are x86_64 and newer than 5.9.
        if cfg!(target_arch = "x86_64") {
            sys::probe_bind_filter(&filter()).unwrap();
        }
    }
}
