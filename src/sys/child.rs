//! Every line that runs in a forked child, between `fork()` and `execve()` (or `_exit`), in
//! the order it runs. Nothing else is in this file (but one constant and a unit test).
//!
//! herdsman is multi-threaded, so after `fork()` the child is a copy in which only the forking
//! thread exists: a lock another thread held (malloc's, stdio's, tracing's) stays held forever.
//! The child may therefore only make async-signal-safe calls (POSIX.1-2017 2.4.3, signal-safety(7);
//! raw system calls are) on memory prepared before the fork or on its own stack: no allocation,
//! no locks, no logging, no `std::io`, no nix wrapper (some allocate, e.g. for paths). Every
//! failure is reported to the parent as `(stage, errno)` over a close-on-exec pipe ([`fail`]).
//!
//! Two children: a worker's ([`ExecPlan::child`], forked by [`ExecPlan::spawn`]) and the short
//! one that probes the bind filter once at start ([`probe_bind_filter_child`], forked by
//! `probe::probe_bind_filter`).

use std::ffi::{c_int, c_uint};
use std::os::fd::{AsRawFd, RawFd};

use super::caps::{CAP_BPF, CAP_PERFMON, CAP_SETPCAP};
use super::exec::{BindFilter, ExecPlan, stage};

/// `close_range` flag: mark instead of close (Linux 5.11).
pub(super) const CLOSE_RANGE_CLOEXEC: c_uint = 1 << 2;

impl ExecPlan {
    /// Runs in the forked child: places the fds, drops privileges, resets signals, installs
    /// the bind filter, writes its pid into the environment and execs. Never returns.
    ///
    /// # Safety
    /// Call only in a child just forked from this process, with `pid_slots` pointing into
    /// this plan's pid buffers with at least 21 bytes of room each, and `err_w` the write end
    /// of the error pipe, at or above `first_free`.
    pub(super) unsafe fn child(
        &self,
        err_w: RawFd,
        pid_slots: &[*mut u8],
        parent: libc::pid_t,
        first_free: c_int,
    ) -> ! {
        // 1. Standard streams at 0, 1, 2, then the sockets at 3, 4, ... `dup2` to a different
        // number yields a descriptor without FD_CLOEXEC, so exactly these survive exec. No
        // source is in the target range (`ExecPlan::new` checked), so none is overwritten.
        // SAFETY: dup2 takes integers and touches only the descriptor table; it is
        // async-signal-safe. So is `fail` (write and _exit), which the steps below use too.
        unsafe {
            for (target, &src) in self.stdio.iter().enumerate() {
                if libc::dup2(src, target as c_int) < 0 {
                    fail(err_w, stage::FDS);
                }
            }
            for (i, &src) in self.fds.iter().enumerate() {
                if libc::dup2(src, 3 + i as c_int) < 0 {
                    fail(err_w, stage::FDS);
                }
            }
        }
        // 2. Everything above the sockets becomes close-on-exec (the error pipe already is):
        // what the supervisor holds never leaks into a worker. Before Linux 5.11, close them
        // one by one up to the fd limit, sparing the error pipe and the filter's channel.
        // SAFETY: close_range (a raw system call) and close take integers; both are
        // async-signal-safe. Closing descriptors nothing in this child uses cannot break it.
        unsafe {
            if libc::syscall(libc::SYS_close_range, first_free as c_uint, c_uint::MAX, CLOSE_RANGE_CLOEXEC)
                != 0
            {
                let channel = self.bind_filter.as_ref().map(|f| f.channel.as_raw_fd());
                for fd in first_free..self.max_fd {
                    if fd != err_w && Some(fd) != channel {
                        libc::close(fd);
                    }
                }
            }
        }
        // 3. Own process group: terminal signals go to the supervisor only, and the worker's
        // own children can be killed with it (`kill_and_reap_unwatched` relies on this).
        // SAFETY: setpgid takes integers; async-signal-safe.
        unsafe { libc::setpgid(0, 0) };
        // 4. CAP_BPF (and CAP_SETPCAP, which dropping it needs; CAP_PERFMON too) are the
        // supervisor's, to load the steering program: out of the worker's bounding set while
        // still privileged, so a worker running as root never has them. Fails harmlessly
        // (EPERM) where the supervisor has no CAP_SETPCAP: it has neither under the unit then,
        // or gave all three up once its program was attached.
        // SAFETY: prctl with integer arguments is a raw system call; async-signal-safe.
        unsafe {
            libc::prctl(libc::PR_CAPBSET_DROP, CAP_BPF as libc::c_ulong, 0, 0, 0);
            libc::prctl(libc::PR_CAPBSET_DROP, CAP_PERFMON as libc::c_ulong, 0, 0, 0);
            libc::prctl(libc::PR_CAPBSET_DROP, CAP_SETPCAP as libc::c_ulong, 0, 0, 0);
        }
        // 5. Drop to the worker user before PR_SET_PDEATHSIG: changing the effective uid or
        // gid clears the parent-death signal. These are the raw system calls std's
        // `Command::uid/gid/groups` also make after fork (glibc resets its thread list in the
        // child, so its set*id broadcast has only this thread to visit). The order: groups
        // first (needs root), then the gid (needs root), the uid last (after it, nothing else
        // could be changed).
        if let Some((uid, gid, groups)) = &self.creds {
            // SAFETY: `groups` was allocated before the fork and is only read, for its
            // length; setgroups, setgid and setuid are async-signal-safe.
            unsafe {
                if libc::setgroups(groups.len(), groups.as_ptr()) != 0 {
                    fail(err_w, stage::SETGROUPS);
                }
                if libc::setgid(*gid) != 0 {
                    fail(err_w, stage::SETGID);
                }
                if libc::setuid(*uid) != 0 {
                    fail(err_w, stage::SETUID);
                }
            }
        }
        // 6. The soft fd limit herdsman was started with (it raised its own): programs that
        // use select() break on descriptors above 1023. Best effort, like systemd's own.
        if let Some(rl) = &self.child_nofile {
            // SAFETY: setrlimit reads one struct the plan owns; async-signal-safe.
            unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, rl) };
        }
        // 7. Die with the supervisor; if it already died (the fork raced its exit), the
        // parent-death signal will never come: leave now. Not when the worker is to outlive
        // it (under systemd: re-adopted from the fd store after a supervisor crash).
        if !self.outlive_parent {
            // SAFETY: prctl, getppid and _exit take integers; all async-signal-safe.
            unsafe {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0);
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
            }
        }
        // 8. A clean signal state: nothing blocked, every disposition the default (the
        // supervisor's handlers and ignored signals are not the worker's).
        // SAFETY: `set` is on this stack; sigemptyset, sigprocmask and signal (restoring
        // SIG_DFL, no handler) are async-signal-safe.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
            for sig in 1..32 {
                if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                    libc::signal(sig, libc::SIG_DFL);
                }
            }
        }
        // 9. The working directory.
        if let Some(cwd) = &self.cwd {
            // SAFETY: `cwd` is a NUL-terminated string built before the fork; chdir is
            // async-signal-safe.
            unsafe {
                if libc::chdir(cwd.as_ptr()) != 0 {
                    fail(err_w, stage::CHDIR);
                }
            }
        }
        // 10. Last, after the privilege drop (NO_NEW_PRIVS lets an unprivileged process
        // install it): every later system call, execve included, is allowed by it.
        if let Some(f) = &self.bind_filter {
            // SAFETY: we are the forked child, about to exec; `install_bind_filter` makes
            // only async-signal-safe calls (see there).
            unsafe {
                if install_bind_filter(f) != 0 {
                    fail(err_w, stage::SECCOMP);
                }
            }
        }
        // 11. `LISTEN_PID=` and friends get this process's pid, written into the slots the
        // plan reserved in `envp`; then exec. The error pipe is close-on-exec: a successful
        // execve closes it, which the parent reads as success.
        // SAFETY: getpid is async-signal-safe; each slot has 21 bytes of room (the caller's
        // promise) and `write_pid` only stores bytes; `path`, `argv` and `envp` are
        // NUL-terminated strings and null-terminated arrays built before the fork, and execve
        // is async-signal-safe.
        unsafe {
            let me = libc::getpid();
            for &slot in pid_slots {
                write_pid(slot, me);
            }
            libc::execve(self.path.as_ptr(), self.argv.as_ptr(), self.envp.as_ptr());
            fail(err_w, stage::EXEC)
        }
    }
}

/// Installs the filter and sends its listener to the supervisor. Async-signal-safe: only
/// system calls on memory prepared before fork and the stack. 0, or -1 with errno set.
///
/// # Safety
/// Call only in the forked child, before exec.
unsafe fn install_bind_filter(f: &BindFilter) -> c_int {
    // SAFETY: prctl/seccomp/close take plain values and pointers to live memory (the filter's
    // instructions, allocated before the fork); the kernel copies the program. errno is this
    // thread's. All async-signal-safe.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return -1;
        }
        let Some(nfd) = seccomp_new_listener(&f.prog) else { return -1 };
        let r = send_fd(f.channel.as_raw_fd(), nfd);
        let errno = *libc::__errno_location();
        libc::close(nfd);
        *libc::__errno_location() = errno;
        r
    }
}

/// `seccomp(SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_NEW_LISTENER, prog)`: the listener fd.
/// Async-signal-safe. `prog` has at most `u16::MAX` instructions (checked by the callers).
///
/// # Safety
/// Installs a filter on the calling thread for good: only in a child about to exec (or exit).
unsafe fn seccomp_new_listener(prog: &[libc::sock_filter]) -> Option<c_int> {
    let fprog = libc::sock_fprog { len: prog.len() as u16, filter: prog.as_ptr().cast_mut() };
    // SAFETY: `fprog` points at `prog`, valid for `len` instructions during the call.
    let nfd = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            libc::SECCOMP_FILTER_FLAG_NEW_LISTENER,
            &fprog as *const libc::sock_fprog,
        )
    };
    if nfd < 0 { None } else { Some(nfd as c_int) }
}

/// Sends `fd` over the unix socket `sock` (`SCM_RIGHTS`, one data byte; the supervisor takes
/// it with `recv_fd`). Async-signal-safe: the message and its control buffer live on the
/// stack. 0, or -1 with errno set.
///
/// # Safety
/// `sock` and `fd` must be open descriptors.
unsafe fn send_fd(sock: c_int, fd: c_int) -> c_int {
    let mut byte = [b'F'];
    let mut iov = libc::iovec { iov_base: byte.as_mut_ptr().cast(), iov_len: 1 };
    // CMSG_SPACE(sizeof(int)) is 24 on 64-bit and 16 on 32-bit; u64s keep it aligned.
    let mut control = [0u64; 4];
    // SAFETY: a zeroed msghdr is valid; every pointer set below points at a live stack buffer
    // of the stated length; the CMSG_* helpers only compute addresses inside `control`.
    // sendmsg is async-signal-safe.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(std::mem::size_of::<c_int>() as u32) as _;
        let c = libc::CMSG_FIRSTHDR(&msg);
        if c.is_null() {
            *libc::__errno_location() = libc::EINVAL;
            return -1;
        }
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<c_int>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<c_int>(), fd);
        loop {
            if libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) >= 0 {
                return 0;
            }
            if *libc::__errno_location() != libc::EINTR {
                return -1;
            }
        }
    }
}

/// Writes `pid` as decimal digits plus NUL at `dst` (room for 21 bytes). Async-signal-safe:
/// stores into memory only.
///
/// # Safety
/// `dst` must be valid for 21 bytes of writes.
unsafe fn write_pid(dst: *mut u8, pid: libc::pid_t) {
    let mut digits = [0u8; 20];
    let mut n = pid as u64;
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..len {
        // SAFETY: i < len <= 20, within the caller's 21-byte buffer.
        unsafe { *dst.add(i) = digits[len - 1 - i] };
    }
    // SAFETY: len <= 20, so the NUL lands in the 21st byte at most.
    unsafe { *dst.add(len) = 0 };
}

/// Reports the failed stage and errno to the parent and exits. Async-signal-safe.
///
/// # Safety
/// Call only in a forked child (it `_exit`s without running any destructor).
unsafe fn fail(err_w: RawFd, stage: u32) -> ! {
    // SAFETY: the errno location, write and _exit are async-signal-safe; buffers are on the
    // stack.
    unsafe {
        let errno = *libc::__errno_location();
        let mut buf = [0u8; 8];
        buf[..4].copy_from_slice(&stage.to_ne_bytes());
        buf[4..].copy_from_slice(&errno.to_ne_bytes());
        libc::write(err_w, buf.as_ptr().cast(), buf.len());
        libc::_exit(127)
    }
}

/// The bind filter probe's child: what a worker will do, `PR_SET_NO_NEW_PRIVS`, `seccomp()`
/// with `prog` and `SECCOMP_FILTER_FLAG_NEW_LISTENER`, then `SECCOMP_IOCTL_NOTIF_ADDFD` for a
/// notification that does not exist (`ENOENT` where the call exists, Linux 5.9). Writes
/// `(step, errno)` to `w` (step 0: all worked; 1, 2, 3: which failed) and exits.
///
/// # Safety
/// Call only in a child just forked from this process; `prog` has at most `u16::MAX`
/// instructions.
pub(super) unsafe fn probe_bind_filter_child(prog: &[libc::sock_filter], w: RawFd) -> ! {
    let report = |step: u32, errno: c_int| -> ! {
        let mut buf = [0u8; 8];
        buf[..4].copy_from_slice(&step.to_ne_bytes());
        buf[4..].copy_from_slice(&errno.to_ne_bytes());
        // SAFETY: write from a stack buffer and _exit: async-signal-safe.
        unsafe {
            libc::write(w, buf.as_ptr().cast(), buf.len());
            libc::_exit(0)
        }
    };
    // SAFETY: prctl, seccomp and ioctl with integers and pointers to `prog` (copied by fork)
    // or to stack structs; all async-signal-safe; errno is this thread's.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            report(1, *libc::__errno_location());
        }
        let Some(nfd) = seccomp_new_listener(prog) else { report(2, *libc::__errno_location()) };
        let mut addfd: libc::seccomp_notif_addfd = std::mem::zeroed();
        addfd.id = 0;
        addfd.flags = libc::SECCOMP_ADDFD_FLAG_SETFD as u32;
        addfd.srcfd = nfd as u32;
        addfd.newfd = nfd as u32;
        let r = libc::ioctl(nfd, libc::SECCOMP_IOCTL_NOTIF_ADDFD, &addfd as *const _);
        let errno = *libc::__errno_location();
        if r == 0 || errno == libc::ENOENT {
            report(0, 0);
        }
        report(3, errno)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_digits_are_written_in_place() {
        let mut buf = [b'x'; 21];
        // SAFETY: buf has 21 bytes.
        unsafe { write_pid(buf.as_mut_ptr(), 4_194_304) };
        assert_eq!(&buf[..8], b"4194304\0");
        // SAFETY: buf has 21 bytes.
        unsafe { write_pid(buf.as_mut_ptr(), 7) };
        assert_eq!(&buf[..2], b"7\0");
    }
}
