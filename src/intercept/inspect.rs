//! Reading a trapped call's arguments out of the worker, as the worker's own user: its
//! sockaddr from `/proc/TID/mem` (on a thread of its own, with a deadline) and its socket's
//! inode, flags and type from `/proc/TID/fd*`.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::RawFd;

use nix::sys::socket::SockaddrStorage;

use crate::sys;

pub(super) fn to_std(a: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        return Some(SocketAddr::from((v4.ip(), v4.port())));
    }
    a.as_sockaddr_in6().map(|v6| SocketAddr::from((v6.ip(), v6.port())))
}

/// A sockaddr as the app passed it: `None` for anything but IPv4 and IPv6.
pub(super) fn parse_sockaddr(b: &[u8]) -> Option<SocketAddr> {
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

/// How long reading a trapped `bind()`'s sockaddr may take before the call goes on
/// unchanged. The read faults the page in, and a page of a file on a hung FUSE or NFS mount
/// never comes: without a deadline, the supervisor's loop would wait with it.
pub const MEMORY_READ_DEADLINE: std::time::Duration = std::time::Duration::from_secs(2);

/// What reading a sockaddr gave.
#[derive(Debug)]
pub(super) enum Read {
    Done(std::io::Result<Vec<u8>>),
    TimedOut,
}

/// Opens `/proc/TID/mem` as the worker's own user (the ptrace access check happens at the
/// open, with the filesystem ids: see `watch`). Opening touches no page of its memory.
pub(super) fn as_mem(owner: Option<(u32, u32)>, tid: i32) -> std::io::Result<std::fs::File> {
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
pub(super) async fn read_sockaddr(
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
pub(super) fn socket_inode(tid: i32, fd: RawFd) -> Option<u64> {
    let link = std::fs::read_link(format!("/proc/{tid}/fd/{fd}")).ok()?;
    let s = link.to_str()?;
    s.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
}

/// The file status and descriptor flags of `fd` in task `tid` (`/proc/TID/fdinfo/N`, octal
/// `flags:`, `O_CLOEXEC` included).
pub(super) fn fd_flags(tid: i32, fd: RawFd) -> Option<i32> {
    let info = std::fs::read_to_string(format!("/proc/{tid}/fdinfo/{fd}")).ok()?;
    let line = info.lines().find_map(|l| l.strip_prefix("flags:"))?;
    i32::from_str_radix(line.trim(), 8).ok()
}

/// Whether `fd` in task `tid` is a TCP socket (its `system.sockprotoname`: "TCP", "TCPv6",
/// "MPTCP"; UDP, unix and raw sockets are not).
pub(super) fn is_stream(tid: i32, fd: RawFd) -> std::io::Result<bool> {
    let path = std::path::PathBuf::from(format!("/proc/{tid}/fd/{fd}"));
    sys::socket_protocol(&path).map(|p| p.starts_with("TCP") || p.starts_with("MPTCP"))
}
