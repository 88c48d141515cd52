//! Descriptor plumbing: close-on-exec pipes and duplicates, the sockets systemd passes
//! (`LISTEN_FDS`), a descriptor sent over a unix socket, the standard streams, and registering
//! a descriptor with the event loop. `nix` makes the calls; what is left here is taking
//! ownership of a descriptor a call just returned.

use std::ffi::c_int;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::fcntl::{FcntlArg, fcntl};

/// A pipe whose both ends are close-on-exec.
pub fn pipe_cloexec() -> io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)
}

/// `fcntl(fd, F_DUPFD_CLOEXEC or F_DUPFD, min)`: a new descriptor for the same open file
/// description, at the lowest free number `>= min`, owned. Only the descriptor is new: the
/// open file description (and its O_NONBLOCK flag) is shared, never changed.
pub(super) fn dup_at_least(fd: RawFd, min: c_int, cloexec: bool) -> io::Result<OwnedFd> {
    let arg = if cloexec { FcntlArg::F_DUPFD_CLOEXEC(min) } else { FcntlArg::F_DUPFD(min) };
    let raw = fcntl(fd, arg)?;
    // SAFETY: fcntl just returned this new descriptor; nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Duplicates `fd` to the lowest free number `>= min`, close-on-exec. Only the descriptor is
/// new: the open file description (and its O_NONBLOCK flag) is shared, never changed.
pub fn dup_cloexec_from(fd: &OwnedFd, min: c_int) -> io::Result<OwnedFd> {
    dup_at_least(fd.as_raw_fd(), min, true)
}

/// Duplicates the open descriptor number `fd` (a socket the caller holds, known by its number)
/// to the lowest free number `>= min`, close-on-exec: moves a socket out of the way of a
/// worker's target range for one spawn (see `spawn::crowded`). Only the descriptor is new; the
/// open file description and its flags are shared, never changed.
pub fn dup_number_cloexec_from(fd: RawFd, min: c_int) -> io::Result<OwnedFd> {
    dup_at_least(fd, min, true)
}

/// A close-on-exec copy of `fd` (above the standard streams), which the caller keeps open.
pub fn dup_raw_cloexec(fd: RawFd) -> io::Result<OwnedFd> {
    dup_at_least(fd, 3, true)
}

/// Takes ownership of the `n` descriptors the service manager passed at fd 3.. (`LISTEN_FDS`:
/// the socket unit's sockets and, with `FileDescriptorStoreMax=`, herdsman's own stored fds),
/// after checking that each is open, and makes each close-on-exec (passed fds are not, and
/// must not reach workers). Succeeds at most once per process (a second call would own the
/// same numbers twice): `Err(fd, why)` names the first unusable one.
pub fn adopt_listen_fds(n: usize) -> Result<Vec<OwnedFd>, (RawFd, io::Error)> {
    static TAKEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let first = 3 as RawFd;
    let fds: Vec<RawFd> = (0..n).map(|i| first + i as RawFd).collect();
    for &fd in &fds {
        fcntl(fd, FcntlArg::F_GETFD).map_err(|e| (fd, io::Error::from(e)))?;
    }
    if TAKEN.swap(true, std::sync::atomic::Ordering::SeqCst) {
        return Err((first, io::Error::other("the inherited descriptors were already taken")));
    }
    // SAFETY: every fd is open (F_GETFD succeeded), was handed to this process by the service
    // manager for its exclusive use, and TAKEN makes sure the numbers are owned only once.
    let owned: Vec<OwnedFd> = fds.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }).collect();
    for fd in &owned {
        fcntl(fd.as_raw_fd(), FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC))
            .map_err(|e| (fd.as_raw_fd(), io::Error::from(e)))?;
    }
    Ok(owned)
}

/// Whether `fd` is a socket (the socket unit's fds must be).
pub fn is_socket(fd: &OwnedFd) -> io::Result<bool> {
    let st = nix::sys::stat::fstat(fd.as_raw_fd())?;
    Ok(st.st_mode & libc::S_IFMT == libc::S_IFSOCK)
}

/// Receives one datagram without waiting, with the descriptors it carries (close-on-exec,
/// owned): a stand-in service manager's side of the fd store (`fdstore`), for tests.
#[cfg(test)]
pub fn recv_with_fds(sock: &std::os::unix::net::UnixDatagram) -> io::Result<(String, Vec<OwnedFd>)> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    let mut buf = vec![0u8; 4096];
    let mut iov = [io::IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([RawFd; 16]);
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut got = Vec::new();
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            for fd in fds {
                // SAFETY: the kernel just installed this descriptor for us (SCM_RIGHTS).
                got.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    let len = msg.bytes;
    Ok((String::from_utf8_lossy(&buf[..len]).into_owned(), got))
}

/// Receives one descriptor a worker's child sent (`send_fd` in `child.rs`: the bind filter's
/// listener), without waiting: it must be queued.
pub fn recv_fd(channel: &OwnedFd) -> io::Result<OwnedFd> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    let mut byte = [0u8; 1];
    let mut iov = [io::IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg = recvmsg::<()>(
        channel.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut got = None;
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            for fd in fds {
                // SAFETY: the kernel just installed this descriptor for us (SCM_RIGHTS); we
                // own it (extra ones are closed by dropping them).
                let own = unsafe { OwnedFd::from_raw_fd(fd) };
                got.get_or_insert(own);
            }
        }
    }
    got.ok_or_else(|| io::Error::other("no descriptor was sent"))
}

/// Makes sure 0, 1 and 2 are open (on /dev/null if not), so no socket or pipe we open later
/// lands there and gets confused with a standard stream.
pub fn ensure_stdio_open() {
    use nix::fcntl::OFlag;
    for fd in 0..3 {
        if fcntl(fd, FcntlArg::F_GETFD).is_err() {
            // The new descriptor is the lowest free one, i.e. `fd`, and deliberately stays
            // open (not close-on-exec) for the life of the process: nothing owns it.
            let _ = nix::fcntl::open(c"/dev/null", OFlag::O_RDWR, nix::sys::stat::Mode::empty());
        }
    }
}

/// Registers a descriptor with the event loop, to await readability: a pidfd (the process
/// exited) or a worker's output pipe (shared with the worker's entry, for upgrades).
pub fn watch_readable(
    fd: std::sync::Arc<OwnedFd>,
) -> io::Result<tokio::io::unix::AsyncFd<std::sync::Arc<OwnedFd>>> {
    // SAFETY: the AsyncFd owns an Arc of the OwnedFd, so the descriptor stays open and refers
    // to the same file for the AsyncFd's whole lifetime; Arc<OwnedFd>::as_raw_fd is stable.
    // Each descriptor is registered once (one pidfd watcher, one reader per pipe).
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
}
