//! herdsman replacing its own image (the in-place upgrade, see `upgrade`): on the way out,
//! inheritable duplicates, the state memfd, the candidate binary opened once without
//! following links and executed by descriptor; on the way in, [`HandedOver`], which owns what
//! the previous image passed.

use std::collections::{HashMap, HashSet};
use std::ffi::{CString, c_int};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::fcntl::{FcntlArg, FdFlag, fcntl};

/// A duplicate of `fd` at the lowest free number `>= min` that is *not* close-on-exec: handed
/// to the next image of herdsman across `execve`. Only the descriptor is new; the open file
/// description and its flags are shared, never changed.
pub fn dup_inheritable(fd: BorrowedFd<'_>, min: c_int) -> io::Result<OwnedFd> {
    super::fd::dup_at_least(fd.as_raw_fd(), min, false)
}

/// An anonymous memory file that survives `execve` (no `MFD_CLOEXEC`): the upgrade state.
pub fn inheritable_memfd(name: &str) -> io::Result<OwnedFd> {
    let name = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    nix::sys::memfd::memfd_create(&name, nix::sys::memfd::MemFdCreateFlag::empty()).map_err(io::Error::from)
}

/// Opens `name` (one path component, or `/`) relative to `dir` as an `O_PATH` descriptor,
/// close-on-exec, without following a symbolic link: a link is opened as itself (its
/// `fstat` says so) and never resolved. The candidate binary is opened once, checked, and
/// that descriptor executed ([`execve_fd`]).
pub fn open_path_nofollow(dir: Option<BorrowedFd<'_>>, name: &std::path::Path) -> io::Result<OwnedFd> {
    use nix::fcntl::OFlag;
    let flags = OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let raw = nix::fcntl::openat(dir.map(|d| d.as_raw_fd()), name, flags, nix::sys::stat::Mode::empty())?;
    // SAFETY: openat just returned this new descriptor; nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Replaces this process's image with the file open at `fd` (`execveat(fd, "", ...,
/// AT_EMPTY_PATH)`): the file that was checked is the one that runs, whatever happens to its
/// path meanwhile. Same pid, same children, same descriptors unless close-on-exec. Returns
/// only on failure.
pub fn execve_fd(fd: BorrowedFd<'_>, argv: &[String], env: &[String]) -> io::Error {
    let c = |s: &str| CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte"));
    let prepared = (|| -> io::Result<(Vec<CString>, Vec<CString>)> {
        let argv = argv.iter().map(|a| c(a)).collect::<io::Result<Vec<_>>>()?;
        let env = env.iter().map(|e| c(e)).collect::<io::Result<Vec<_>>>()?;
        Ok((argv, env))
    })();
    match prepared {
        Ok((argv, env)) => {
            let flags = nix::fcntl::AtFlags::AT_EMPTY_PATH;
            match nix::unistd::execveat(Some(fd.as_raw_fd()), c"", &argv, &env, flags) {
                Ok(never) => match never {},
                Err(e) => io::Error::from(e),
            }
        }
        Err(e) => e,
    }
}

/// Descriptors the previous image of herdsman handed over across `execve`, each taken (owned)
/// at most once.
#[derive(Debug)]
pub struct HandedOver {
    fds: HashMap<RawFd, OwnedFd>,
}

impl HandedOver {
    /// Takes ownership of `list`: every number must be open and listed once; each becomes
    /// close-on-exec again (workers and helpers must not inherit them). Fails, owning nothing,
    /// if one is not.
    pub fn adopt(list: &[RawFd]) -> io::Result<HandedOver> {
        let mut seen = HashSet::new();
        for &fd in list {
            if fd < 3 || !seen.insert(fd) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("fd {fd} listed twice or reserved"),
                ));
            }
            if fcntl(fd, FcntlArg::F_GETFD).is_err() {
                return Err(io::Error::new(io::ErrorKind::InvalidData, format!("fd {fd} is not open")));
            }
        }
        let mut fds = HashMap::new();
        for &fd in list {
            // SAFETY: open (checked above), listed once (checked above), and handed to this
            // process image by its previous one for its exclusive use: nothing else owns it.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            fcntl(owned.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
            fds.insert(fd, owned);
        }
        Ok(HandedOver { fds })
    }

    /// Descriptors already owned, by the key a state refers to them by (an upgrade's fds
    /// taken by name; see `upgrade::keyed`).
    pub fn from_owned(fds: HashMap<RawFd, OwnedFd>) -> HandedOver {
        HandedOver { fds }
    }

    /// The descriptor handed over as number `fd`.
    pub fn take(&mut self, fd: RawFd) -> io::Result<OwnedFd> {
        self.fds.remove(&fd).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("fd {fd} was not handed over (or taken twice)"),
            )
        })
    }

    /// How many were never taken (closed on drop).
    pub fn left(&self) -> usize {
        self.fds.len()
    }
}
