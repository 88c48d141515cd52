//! What the kernel (or a sandbox around herdsman) offers, checked once at start: pidfds and
//! `close_range` ([`check_kernel`]), and the seccomp user notification the bind filter needs
//! ([`probe_bind_filter`]).

use std::ffi::c_uint;
use std::io;
use std::os::fd::AsRawFd;

use super::child::{CLOSE_RANGE_CLOEXEC, probe_bind_filter_child};
use super::fd::pipe_cloexec;
use super::process::{pidfd_open, pidfd_signal};

/// A kernel facility herdsman cannot work without.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(
        "this kernel has no {call} (needs Linux {since} or later): herdsman cannot supervise workers without it; upgrade the kernel"
    )]
    Missing { call: &'static str, since: &'static str },
    #[error(
        "{call} is not permitted here ({err}): a seccomp filter forbids it; allow it (systemd: SystemCallFilter=@system-service includes it)"
    )]
    Blocked { call: &'static str, err: io::Error },
    #[error("cannot check the kernel's {call}: {err}")]
    Failed { call: &'static str, err: io::Error },
}

impl KernelError {
    /// The kernel (or a sandbox) lacks something: restarting cannot help.
    pub fn is_unsupported(&self) -> bool {
        !matches!(self, KernelError::Failed { .. })
    }
}

/// What the kernel offers beyond the must-haves.
#[derive(Debug, Clone, Copy)]
pub struct KernelSupport {
    /// `close_range(..., CLOSE_RANGE_CLOEXEC)` (Linux 5.11); without it a worker's child
    /// closes every descriptor above its sockets one by one (up to the fd limit, at most 65536).
    pub close_range_cloexec: bool,
}

/// Checks, once at start, that the kernel has what supervision needs: `pidfd_open` (Linux 5.3)
/// and `pidfd_send_signal` (5.1), tried on herdsman itself; and whether `close_range` with
/// `CLOSE_RANGE_CLOEXEC` works (else the fallback is used).
pub fn check_kernel() -> Result<KernelSupport, KernelError> {
    let classify = |call: &'static str, since: &'static str, err: io::Error| match err.raw_os_error() {
        Some(libc::ENOSYS) => KernelError::Missing { call, since },
        Some(libc::EPERM | libc::EACCES) => KernelError::Blocked { call, err },
        _ => KernelError::Failed { call, err },
    };
    let me = std::process::id() as i32;
    let pidfd = pidfd_open(me).map_err(|e| classify("pidfd_open", "5.3", e))?;
    // Signal 0: permission and existence check only, nothing is delivered.
    pidfd_signal(&pidfd, 0).map_err(|e| classify("pidfd_send_signal", "5.1", e))?;
    drop(pidfd);
    // An empty range far above any open descriptor: marks nothing, fails only when the call or
    // the flag is unknown (ENOSYS before 5.9, EINVAL before 5.11).
    // SAFETY: plain syscall with integer arguments; no descriptor in the range is open.
    let r =
        unsafe { libc::syscall(libc::SYS_close_range, c_uint::MAX - 1, c_uint::MAX, CLOSE_RANGE_CLOEXEC) };
    Ok(KernelSupport { close_range_cloexec: r == 0 })
}

/// Why the kernel (or a sandbox) cannot run the bind filter, found by [`probe_bind_filter`]:
/// the step that failed and its error.
#[derive(Debug)]
pub struct FilterRefused {
    pub step: &'static str,
    pub err: io::Error,
}

/// Tries, in a short-lived child, what a worker will do: `PR_SET_NO_NEW_PRIVS`, `seccomp()`
/// with `prog` and `SECCOMP_FILTER_FLAG_NEW_LISTENER`, and `SECCOMP_IOCTL_NOTIF_ADDFD` (asked
/// for a notification that does not exist: `ENOENT` where the call exists, Linux 5.9).
pub fn probe_bind_filter(prog: &[libc::sock_filter]) -> Result<(), FilterRefused> {
    const STEPS: [&str; 3] = ["prctl(PR_SET_NO_NEW_PRIVS)", "seccomp()", "SECCOMP_IOCTL_NOTIF_ADDFD"];
    let refused = |step, err| FilterRefused { step, err };
    if u16::try_from(prog.len()).is_err() {
        return Err(refused("seccomp()", io::Error::from_raw_os_error(libc::E2BIG)));
    }
    let (r, w) = pipe_cloexec().map_err(|e| refused("pipe", e))?;
    // SAFETY: fork has no memory-safety preconditions; the child only makes async-signal-safe
    // system calls on stack data and `prog` (copied by fork), then exits (see `child.rs`).
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(refused("fork", io::Error::last_os_error()));
    }
    if pid == 0 {
        // SAFETY: we are the forked child; `prog` fits a u16 (checked above).
        unsafe { probe_bind_filter_child(prog, w.as_raw_fd()) }
    }
    drop(w);
    let mut buf = [0u8; 8];
    let got = nix::unistd::read(r.as_raw_fd(), &mut buf).unwrap_or(0);
    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
    if got != 8 {
        return Err(refused("the probe", io::Error::other("the probe child died")));
    }
    let step = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    let errno = i32::from_ne_bytes([buf[4], buf[5], buf[6], buf[7]]);
    match step {
        0 => Ok(()),
        n => Err(refused(STEPS[(n - 1).min(2)], io::Error::from_raw_os_error(errno))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_here_has_pidfds() {
        // The development and CI kernels are far newer than 5.3 (and 5.11 for close_range).
        let k = check_kernel().unwrap();
        assert!(k.close_range_cloexec);
    }
}
