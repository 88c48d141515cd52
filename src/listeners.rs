//! The listening sockets: inherited from systemd (`LISTEN_FDS`) or bound from `--listen`.
//!
//! The supervisor never accepts on them, never changes their file status flags (`O_NONBLOCK` is
//! shared with every worker and with systemd's copy; the one exception: bind interception
//! sets it, never clears it, when an app that binds the port itself made its own socket
//! non-blocking, see `intercept`) and never calls `shutdown()` on them. It
//! only keeps a descriptor to hand to each new worker at fd 3, 4, ... To make that placement
//! collision-free, [`Listeners`] keeps its own copies at numbers `>= 3 + n` (see `sys`).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

use nix::sys::socket::{self, AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage, sockopt};

use crate::config::ListenAddr;
use crate::sys;

/// The `LISTEN_FDNAMES` entry of a socket learned from a worker's own bind (see `intercept`).
pub const LEARNED: &str = "learned";

/// Like systemd's default `Backlog=` on Debian 12.
const BACKLOG: i32 = 4096;

/// The socket-activation variables as read by `main`.
#[derive(Debug, Clone, Default)]
pub struct Activation {
    pub listen_fds: Option<String>,
    pub listen_pid: Option<String>,
    pub listen_fdnames: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("LISTEN_FDS={0:?} is not a positive number of sockets; fix the socket unit or unset LISTEN_FDS")]
    BadCount(String),
    #[error("LISTEN_FDS: fd {fd} is unusable ({err}); check the socket unit's ListenStream= settings")]
    BadFd { fd: RawFd, err: io::Error },
    #[error(
        "no socket to serve: not socket-activated, no --listen address and no bind interception (--bind-intercept, which learns the app's own address); add --listen 127.0.0.1:8080 (or `listen = [...]` in the config)"
    )]
    Nothing,
    #[error(
        "no socket to serve: LISTEN_FDS is set but LISTEN_PID={0:?} is not this process, and there is no --listen address; fix the service's environment or add --listen"
    )]
    NotOurs(String),
    #[error("cannot bind {addr}: {err}; choose another --listen address or stop whatever uses it")]
    Bind { addr: String, err: io::Error },
}

impl ListenError {
    /// Bind failures are run-time problems; the rest are configuration mistakes.
    pub fn is_config(&self) -> bool {
        !matches!(self, ListenError::Bind { .. })
    }
}

/// One listening socket.
#[derive(Debug)]
pub struct Listener {
    fd: OwnedFd,
    /// `LISTEN_FDNAMES` entry.
    pub name: String,
    /// Human description (the local address).
    pub addr: String,
    /// A unix socket file we created and remove at exit.
    owned_path: Option<PathBuf>,
}

impl Listener {
    /// A close-on-exec copy of the socket (the same socket, a new descriptor).
    pub fn copy(&self) -> io::Result<OwnedFd> {
        sys::dup_raw_cloexec(self.fd.as_raw_fd())
    }
}

/// All listening sockets, in fd order.
#[derive(Debug)]
pub struct Listeners {
    list: Vec<Listener>,
    /// The descriptors herdsman had put in systemd's fd store, passed back with the sockets
    /// (`LISTEN_FDS`) and told apart by name (`fdstore::split`), until
    /// [`Listeners::take_stored`].
    stored: std::collections::BTreeMap<String, OwnedFd>,
}

impl Listeners {
    /// Uses the activation fds when they are meant for `our_pid`, else binds `addrs`.
    /// With `reuseport`, sockets herdsman binds get `SO_REUSEPORT` (steered balancing).
    pub fn open(
        act: &Activation,
        our_pid: u32,
        addrs: &[ListenAddr],
        reuseport: bool,
    ) -> Result<Self, ListenError> {
        let ours = act.listen_pid.as_deref().map(str::trim) == Some(our_pid.to_string().as_str());
        let mut stored = Default::default();
        let mut list = match (&act.listen_fds, ours) {
            (Some(count), true) => {
                let (listeners, from_store) = inherit(count, act.listen_fdnames.as_deref())?;
                stored = from_store;
                // Only stored descriptors (no socket unit): bind, as without LISTEN_FDS.
                if !listeners.is_empty() || addrs.is_empty() {
                    if !addrs.is_empty() {
                        tracing::info!("socket-activated: ignoring --listen/listen addresses");
                    }
                    let mut l = Self::relocated(listeners)?;
                    l.stored = stored;
                    return Ok(l);
                }
                Vec::new()
            }
            (Some(_), false) => {
                if addrs.is_empty() {
                    return Err(ListenError::NotOurs(act.listen_pid.clone().unwrap_or_default()));
                }
                tracing::warn!(
                    "LISTEN_FDS is set but LISTEN_PID is not this process; ignoring the inherited fds"
                );
                Vec::new()
            }
            _ => Vec::new(),
        };
        if addrs.is_empty() {
            return Err(ListenError::Nothing);
        }
        for (i, addr) in addrs.iter().enumerate() {
            list.push(bind(addr, i, reuseport)?);
        }
        let mut l = Self::relocated(list)?;
        l.stored = stored;
        Ok(l)
    }

    /// The descriptors systemd's fd store passed back (see `fdstore`), by the name herdsman
    /// stored them under; empty after [`Listeners::take_stored`], on a fresh start, and
    /// standalone. Each is close-on-exec and above the workers' fd range.
    pub fn stored(&self) -> &std::collections::BTreeMap<String, OwnedFd> {
        &self.stored
    }

    /// [`Listeners::stored`], taken out.
    pub fn take_stored(&mut self) -> std::collections::BTreeMap<String, OwnedFd> {
        std::mem::take(&mut self.stored)
    }

    /// Moves every fd to a number >= 3 + n, so workers' `dup2` to 3.. never collides.
    fn relocated(list: Vec<Listener>) -> Result<Self, ListenError> {
        let floor = 3 + list.len() as i32;
        let list = list
            .into_iter()
            .map(|l| {
                let fd = sys::dup_cloexec_from(&l.fd, floor)
                    .map_err(|err| ListenError::BadFd { fd: l.fd.as_raw_fd(), err })?;
                Ok(Listener { fd, ..l })
            })
            .collect::<Result<Vec<_>, ListenError>>()?;
        Ok(Listeners { list, stored: Default::default() })
    }

    /// No socket at all: for the supervisor's in-process tests, whose workers are made up,
    /// and for a start without `--listen` whose address is learned from the first worker's
    /// own bind (see [`Listeners::learned`]).
    pub fn none() -> Listeners {
        Listeners { list: Vec::new(), stored: Default::default() }
    }

    /// Binds `addr`, the address a worker bound itself when herdsman had no socket (see
    /// `intercept`): as `--listen` would (`[::]`/`0.0.0.0` as given; `[::]` dual-stack, as the
    /// apps that bind it ask for).
    pub fn bind_learned(addr: std::net::SocketAddr, index: usize) -> Result<Listener, ListenError> {
        let listen = if addr.ip().is_unspecified() && addr.is_ipv6() {
            ListenAddr::AnyAddress(addr.port())
        } else {
            ListenAddr::Tcp(addr)
        };
        bind(&listen, index, false)
    }

    /// Adds a learned socket ([`Listeners::bind_learned`]), above the workers' new fd range:
    /// its descriptor, for the launcher.
    /// Its `LISTEN_FDNAMES` entry is [`LEARNED`] (which also marks it for `status` after an
    /// in-place upgrade).
    pub fn learned(&mut self, l: Listener) -> io::Result<RawFd> {
        let fd = sys::dup_cloexec_from(&l.fd, self.floor() + 1)?;
        let raw = fd.as_raw_fd();
        self.list.push(Listener { fd, name: LEARNED.to_string(), ..l });
        Ok(raw)
    }

    /// The addresses learned from a worker's own bind ([`Listeners::learned`]).
    pub fn learned_addrs(&self) -> Vec<String> {
        self.list.iter().filter(|l| l.name == LEARNED).map(|l| l.addr.clone()).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn raw_fds(&self) -> Vec<RawFd> {
        self.list.iter().map(|l| l.fd.as_raw_fd()).collect()
    }

    pub fn names(&self) -> String {
        self.list.iter().map(|l| l.name.as_str()).collect::<Vec<_>>().join(":")
    }

    pub fn addrs(&self) -> Vec<String> {
        self.list.iter().map(|l| l.addr.clone()).collect()
    }

    /// Close-on-exec copies of every socket (the same sockets, new descriptors above the
    /// workers' fd range; nothing about the sockets changes), with their address and name:
    /// for [`crate::steer::Steering`], for the metrics' listen queues and for `status`.
    pub fn copies(&self) -> io::Result<Vec<(String, String, OwnedFd)>> {
        self.list
            .iter()
            .map(|l| Ok((l.addr.clone(), l.name.clone(), sys::dup_cloexec_from(&l.fd, self.floor())?)))
            .collect()
    }

    /// The lowest fd number herdsman's own descriptors may use (above the workers' range).
    pub fn floor(&self) -> RawFd {
        3 + self.list.len() as RawFd
    }

    /// For an in-place upgrade: every socket, with the number it will have in the new image.
    pub fn export(&self, ex: &mut crate::handoff::Exporter) -> io::Result<ListenersState> {
        let list = self
            .list
            .iter()
            .map(|l| {
                Ok(ListenerState {
                    fd: ex.fd(&l.fd)?,
                    name: l.name.clone(),
                    addr: l.addr.clone(),
                    owned_path: l.owned_path.clone(),
                })
            })
            .collect::<io::Result<Vec<_>>>()?;
        Ok(ListenersState { list })
    }

    /// The sockets a previous image handed over (already above the workers' range: the
    /// previous image duplicated them there).
    pub fn adopt(st: ListenersState, fds: &mut sys::HandedOver) -> io::Result<Listeners> {
        let list = st
            .list
            .into_iter()
            .map(|l| {
                Ok(Listener { fd: fds.take(l.fd)?, name: l.name, addr: l.addr, owned_path: l.owned_path })
            })
            .collect::<io::Result<Vec<_>>>()?;
        let listeners = Listeners { list, stored: Default::default() };
        if let Some(low) = listeners.list.iter().find(|l| l.fd.as_raw_fd() < listeners.floor()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("socket fd {} is below the workers' range", low.fd.as_raw_fd()),
            ));
        }
        Ok(listeners)
    }
}

/// The listening sockets in an upgrade's state.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct ListenersState {
    pub list: Vec<ListenerState>,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct ListenerState {
    pub fd: RawFd,
    pub name: String,
    pub addr: String,
    pub owned_path: Option<PathBuf>,
}

impl Drop for Listeners {
    fn drop(&mut self) {
        for l in &self.list {
            if let Some(p) = &l.owned_path {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

/// Descriptors from systemd's fd store, by name.
type Stored = std::collections::BTreeMap<String, OwnedFd>;

/// Takes every passed descriptor, sorts them by name into the socket unit's (returned as
/// listeners, each checked to be a socket) and herdsman's own stored ones (moved above the
/// listeners' range, `3 + listeners`, where workers' fds go).
fn inherit(count: &str, names: Option<&str>) -> Result<(Vec<Listener>, Stored), ListenError> {
    let n: usize = count
        .trim()
        .parse()
        .ok()
        .filter(|n| (1..=crate::config::values::MAX_WORKERS * 16).contains(n))
        .ok_or_else(|| ListenError::BadCount(count.to_string()))?;
    let fds = sys::adopt_listen_fds(n).map_err(|(fd, err)| ListenError::BadFd { fd, err })?;
    let passed = crate::fdstore::split(names, fds);
    let mut listeners = Vec::with_capacity(passed.listeners.len());
    for (name, fd) in passed.listeners {
        match sys::is_socket(&fd) {
            Ok(true) => listeners.push(Listener { addr: describe(&fd), fd, name, owned_path: None }),
            Ok(false) => {
                let err = io::Error::new(io::ErrorKind::InvalidInput, format!("{name:?} is not a socket"));
                return Err(ListenError::BadFd { fd: fd.as_raw_fd(), err });
            }
            Err(err) => return Err(ListenError::BadFd { fd: fd.as_raw_fd(), err }),
        }
    }
    let floor = 3 + listeners.len() as RawFd;
    let mut stored = Stored::new();
    for (name, fd) in passed.stored {
        let moved = sys::dup_cloexec_from(&fd, floor)
            .map_err(|err| ListenError::BadFd { fd: fd.as_raw_fd(), err })?;
        stored.insert(name, moved);
    }
    Ok((listeners, stored))
}

fn bind(addr: &ListenAddr, index: usize, reuseport: bool) -> Result<Listener, ListenError> {
    let fail = |err: io::Error| ListenError::Bind { addr: addr.to_string(), err };
    let errno = |e: nix::Error| fail(io::Error::from(e));
    let (family, sockaddr, owned_path): (AddressFamily, Box<dyn socket::SockaddrLike>, Option<PathBuf>) =
        match addr {
            ListenAddr::AnyAddress(port) => return bind_any(*port, index, reuseport).map_err(fail),
            ListenAddr::Tcp(sa) => {
                let fam = if sa.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
                (fam, Box::new(SockaddrStorage::from(*sa)), None)
            }
            ListenAddr::Unix(path) => {
                remove_stale_socket(path);
                let ua = socket::UnixAddr::new(path.as_path()).map_err(errno)?;
                (AddressFamily::Unix, Box::new(ua), Some(path.clone()))
            }
        };
    let fd = socket::socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).map_err(errno)?;
    if family != AddressFamily::Unix {
        socket::setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(errno)?;
        if reuseport {
            socket::setsockopt(&fd, sockopt::ReusePort, &true).map_err(errno)?;
        }
    }
    socket::bind(fd.as_raw_fd(), sockaddr.as_ref()).map_err(errno)?;
    let backlog = Backlog::new(BACKLOG).unwrap_or(Backlog::MAXCONN);
    socket::listen(&fd, backlog).map_err(errno)?;
    Ok(Listener { addr: describe(&fd), fd, name: format!("listen-{index}"), owned_path })
}

/// `:PORT`: `[::]:PORT` with `IPV6_V6ONLY` off (IPv4 clients arrive as `::ffff:a.b.c.d`),
/// like systemd's `ListenStream=PORT`; `0.0.0.0:PORT` where the kernel has no IPv6.
fn bind_any(port: u16, index: usize, reuseport: bool) -> io::Result<Listener> {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
    let tcp = |family: AddressFamily, sa: SocketAddr| -> nix::Result<OwnedFd> {
        let fd = socket::socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
        socket::setsockopt(&fd, sockopt::ReuseAddr, &true)?;
        if reuseport {
            socket::setsockopt(&fd, sockopt::ReusePort, &true)?;
        }
        if family == AddressFamily::Inet6 {
            socket::setsockopt(&fd, sockopt::Ipv6V6Only, &false)?;
        }
        socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(sa))?;
        Ok(fd)
    };
    let fd = match tcp(AddressFamily::Inet6, SocketAddr::from((Ipv6Addr::UNSPECIFIED, port))) {
        Ok(fd) => fd,
        // No IPv6 in this kernel (ipv6.disable=1) or on any interface: IPv4 only.
        Err(nix::Error::EAFNOSUPPORT | nix::Error::EADDRNOTAVAIL) => {
            tcp(AddressFamily::Inet, SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))?
        }
        Err(e) => return Err(e.into()),
    };
    socket::listen(&fd, Backlog::new(BACKLOG).unwrap_or(Backlog::MAXCONN))?;
    Ok(Listener { addr: describe(&fd), fd, name: format!("listen-{index}"), owned_path: None })
}

/// A socket file left behind by a previous run that nobody listens on any more is removed;
/// a live one is left alone so bind fails with "address in use".
fn remove_stale_socket(path: &std::path::Path) {
    use std::os::unix::fs::FileTypeExt;
    let is_socket = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket());
    if is_socket && std::os::unix::net::UnixStream::connect(path).is_err() {
        let _ = std::fs::remove_file(path);
    }
}

fn describe(fd: &OwnedFd) -> String {
    match socket::getsockname::<SockaddrStorage>(fd.as_raw_fd()) {
        Ok(sa) => match sa.as_unix_addr() {
            Some(u) => match u.path() {
                Some(p) => format!("unix:{}", p.display()),
                None => format!("unix:{u}"),
            },
            None => sa.to_string(),
        },
        Err(_) => "?".to_string(),
    }
}
