//! The only module with `unsafe`: fork/exec of a worker, pidfds, and adopting inherited fds.
//!
//! Why by hand: a worker must see `LISTEN_PID` equal to its *own* pid, which is only known after
//! `fork()`. `std::process::Command` cannot change the environment after forking, and allocating
//! or calling `setenv` between fork and exec is not async-signal-safe in a threaded process. So
//! [`ExecPlan`] builds `argv`, `envp` (with a fixed-size `LISTEN_PID=` slot), the fd layout and
//! the working directory *before* forking, and the child only does async-signal-safe system
//! calls: `dup2`, `close_range`, `setpgid`, `setgroups`/`setgid`/`setuid` (with `--user`, on
//! numbers resolved before fork), `setrlimit`, `prctl` (also dropping `CAP_BPF` from the
//! bounding set), `sigprocmask`, `signal`, `chdir`, writing digits
//! into memory it already owns, and `execve`. No allocation, no locks, no logging.
//!
//! The fd plan is simple by construction: every listening socket is kept at a number
//! `>= 3 + n` in the supervisor (see `listeners`), so `dup2(src, 3 + i)` can never clobber
//! another source. Standard streams are placed first. Everything from `3 + n` up is marked
//! close-on-exec with `close_range`, so a worker gets exactly stdio and the sockets.

#![allow(unsafe_code)]

use std::ffi::{CString, c_char, c_int, c_uint};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// `CAP_BPF`, `CAP_PERFMON` (linux/capability.h, Linux 5.8).
const CAP_BPF: c_int = 39;
const CAP_PERFMON: c_int = 38;
/// `CAP_SETPCAP`: dropping from the bounding set needs it.
const CAP_SETPCAP: c_int = 8;
/// `close_range` flag: mark instead of close (Linux 5.11).
const CLOSE_RANGE_CLOEXEC: c_uint = 1 << 2;
/// Room for `NAME=` (names up to 31 bytes) plus the longest pid and a NUL.
const PID_SLOT_LEN: usize = 32 + 20 + 1;

/// Which step in the child failed; reported to the parent with the errno.
const STAGES: &[&str] = &[
    "setting up file descriptors",
    "changing directory",
    "executing the command",
    "setting the supplementary groups (setgroups)",
    "setting the group (setgid)",
    "setting the user (setuid)",
    "installing the bind filter (seccomp)",
];

/// Everything a worker's exec needs, prepared before `fork()`.
#[derive(Debug)]
pub struct ExecPlan {
    path: CString,
    cwd: Option<CString>,
    _argv: Vec<CString>,
    argv: Vec<*const c_char>,
    _env: Vec<CString>,
    /// `NAME=` buffers whose pid digits are written after fork, with the prefix length.
    pid_slots: Vec<(Box<[u8; PID_SLOT_LEN]>, usize)>,
    envp: Vec<*const c_char>,
    stdio: [RawFd; 3],
    fds: Vec<RawFd>,
    max_fd: c_int,
    /// `(uid, gid, supplementary groups)` to switch to in the child, resolved before fork.
    creds: Option<(libc::uid_t, libc::gid_t, Vec<libc::gid_t>)>,
    /// The fd limit to give the worker back when herdsman raised its own (see
    /// [`raise_fd_limit`]): workers start with the limits herdsman was started with.
    child_nofile: Option<libc::rlimit>,
    /// The bind interception filter to install just before exec (see [`BindFilter`]).
    bind_filter: Option<BindFilter>,
}

/// Why a plan could not be built.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("argument or environment entry contains a NUL byte")]
    Nul,
    #[error("internal: fd {fd} is inside the target range 0..{limit}")]
    FdInTargetRange { fd: RawFd, limit: RawFd },
}

impl ExecPlan {
    /// `path` must be the resolved program, `env` entries `KEY=VALUE`, `pid_vars` the
    /// variables set to the worker's own pid after fork (`LISTEN_PID`, `WATCHDOG_PID`),
    /// `stdio` the fds for 0, 1, 2 and `fds` the sockets for 3, 4, ...
    pub fn new(
        path: &str,
        argv: &[String],
        env: &[String],
        pid_vars: &[&str],
        cwd: Option<&std::path::Path>,
        stdio: [RawFd; 3],
        fds: &[RawFd],
    ) -> Result<Self, PlanError> {
        let cstr = |s: &str| CString::new(s).map_err(|_| PlanError::Nul);
        let limit = 3 + fds.len() as RawFd;
        for &fd in stdio.iter().chain(fds) {
            let clash = if stdio.contains(&fd) { fd < 3 } else { fd < limit };
            if clash {
                return Err(PlanError::FdInTargetRange { fd, limit });
            }
        }
        let argv_c = argv.iter().map(|a| cstr(a)).collect::<Result<Vec<_>, _>>()?;
        let env_c = env.iter().map(|e| cstr(e)).collect::<Result<Vec<_>, _>>()?;
        let mut pid_slots = Vec::with_capacity(pid_vars.len());
        for name in pid_vars {
            let prefix = format!("{name}=");
            if prefix.len() > 32 || name.contains('\0') {
                return Err(PlanError::Nul);
            }
            let mut buf = Box::new([0u8; PID_SLOT_LEN]);
            buf[..prefix.len()].copy_from_slice(prefix.as_bytes());
            pid_slots.push((buf, prefix.len()));
        }
        let mut argv_p: Vec<*const c_char> = argv_c.iter().map(|a| a.as_ptr()).collect();
        argv_p.push(std::ptr::null());
        let mut envp: Vec<*const c_char> = env_c.iter().map(|e| e.as_ptr()).collect();
        envp.extend(pid_slots.iter().map(|(b, _)| b.as_ptr().cast::<c_char>()));
        envp.push(std::ptr::null());
        // SAFETY: getrlimit only writes into the struct we pass.
        let (max_fd, child_nofile) = unsafe {
            let mut rl: libc::rlimit = std::mem::zeroed();
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) == 0 {
                let original = WORKER_NOFILE.load(std::sync::atomic::Ordering::Relaxed);
                let restore = (original < rl.rlim_cur)
                    .then_some(libc::rlimit { rlim_cur: original, rlim_max: rl.rlim_max });
                (rl.rlim_cur.min(65536) as c_int, restore)
            } else {
                (1024, None)
            }
        };
        Ok(ExecPlan {
            path: cstr(path)?,
            cwd: cwd
                .map(|c| CString::new(c.as_os_str().as_encoded_bytes()).map_err(|_| PlanError::Nul))
                .transpose()?,
            _argv: argv_c,
            argv: argv_p,
            _env: env_c,
            pid_slots,
            envp,
            stdio,
            fds: fds.to_vec(),
            max_fd,
            creds: None,
            child_nofile,
            bind_filter: None,
        })
    }

    /// Makes the child switch to `uid`, primary group `gid` and supplementary `groups`
    /// (`setgroups`, `setgid`, `setuid`, in that order) before exec. A failure of any of them
    /// fails the spawn, naming the step.
    pub fn with_credentials(mut self, uid: u32, gid: u32, groups: &[u32]) -> Self {
        self.creds = Some((uid, gid, groups.to_vec()));
        self
    }

    /// Forks and execs the worker. Returns its pid once `execve` succeeded; a failure in the
    /// child (bad directory, exec error) comes back as an error naming the step.
    pub fn spawn(&mut self) -> io::Result<i32> {
        let first_free = 3 + self.fds.len() as c_int;
        let (err_r, err_w_low) = pipe_cloexec()?;
        // The error pipe must survive the dup2 calls below: keep it above the target range.
        let err_w = dup_cloexec_from(&err_w_low, first_free)?;
        drop(err_w_low);
        let parent = std::process::id() as libc::pid_t;
        // Where each pid goes, computed (and allocated) before the fork.
        let pid_slots: Vec<*mut u8> = self.pid_slots.iter_mut().map(|(b, n)| b[*n..].as_mut_ptr()).collect();
        // SAFETY: fork has no memory-safety preconditions. In the child we only call
        // async-signal-safe functions on data prepared before the fork (see `child`).
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        if pid == 0 {
            // SAFETY: we are the freshly forked child; `child` never returns.
            unsafe { self.child(err_w.as_raw_fd(), &pid_slots, parent, first_free) }
        }
        drop(err_w);
        let mut report = [0u8; 8];
        let mut got = 0;
        while got < report.len() {
            // SAFETY: reading into a stack buffer within its bounds.
            let n = unsafe {
                libc::read(err_r.as_raw_fd(), report[got..].as_mut_ptr().cast(), report.len() - got)
            };
            if n == 0 {
                break;
            }
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            got += n as usize;
        }
        if got == 0 {
            return Ok(pid);
        }
        // The child failed before or at exec and has exited: reap it.
        let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
        let stage = u32::from_ne_bytes(report[..4].try_into().unwrap_or_default()) as usize;
        let errno = i32::from_ne_bytes(report[4..].try_into().unwrap_or_default());
        let err = io::Error::from_raw_os_error(errno);
        Err(io::Error::new(err.kind(), format!("{}: {err}", STAGES.get(stage).unwrap_or(&"starting"))))
    }

    /// Runs in the forked child. Only async-signal-safe calls, no allocation.
    unsafe fn child(&self, err_w: RawFd, pid_slots: &[*mut u8], parent: libc::pid_t, first_free: c_int) -> ! {
        // SAFETY: every call below is async-signal-safe (POSIX/Linux) and only touches memory
        // this process owns: the plan (copied by fork) and stack buffers.
        unsafe {
            for (target, &src) in self.stdio.iter().enumerate() {
                if libc::dup2(src, target as c_int) < 0 {
                    fail(err_w, 0);
                }
            }
            for (i, &src) in self.fds.iter().enumerate() {
                // dup2 to a different number yields a descriptor without FD_CLOEXEC.
                if libc::dup2(src, 3 + i as c_int) < 0 {
                    fail(err_w, 0);
                }
            }
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
            // Own process group: terminal signals go to the supervisor only, and the worker's
            // own children can be killed with it.
            libc::setpgid(0, 0);
            // CAP_BPF (and CAP_SETPCAP, which dropping it needs; CAP_PERFMON too) are the
            // supervisor's, to load the steering program: out of the worker's bounding set
            // while still privileged, so a worker running as root never has them. Fails
            // harmlessly (EPERM) where the supervisor has no CAP_SETPCAP: it has neither under
            // the unit then, or gave all three up once its program was attached.
            libc::prctl(libc::PR_CAPBSET_DROP, CAP_BPF as libc::c_ulong, 0, 0, 0);
            libc::prctl(libc::PR_CAPBSET_DROP, CAP_PERFMON as libc::c_ulong, 0, 0, 0);
            libc::prctl(libc::PR_CAPBSET_DROP, CAP_SETPCAP as libc::c_ulong, 0, 0, 0);
            // Drop to the worker user before PR_SET_PDEATHSIG: changing the effective uid or
            // gid clears the parent-death signal. These are the raw system calls std's
            // `Command::uid/gid/groups` also make after fork (glibc resets its thread list in
            // the child, so its set*id broadcast has only this thread to visit). The
            // order: groups first (needs root), then the gid
            // (needs root), the uid last (after it, nothing else could be changed).
            if let Some((uid, gid, groups)) = &self.creds {
                if libc::setgroups(groups.len(), groups.as_ptr()) != 0 {
                    fail(err_w, 3);
                }
                if libc::setgid(*gid) != 0 {
                    fail(err_w, 4);
                }
                if libc::setuid(*uid) != 0 {
                    fail(err_w, 5);
                }
            }
            // The soft fd limit herdsman was started with (it raised its own): programs that
            // use select() break on descriptors above 1023. Best effort, like systemd's own.
            if let Some(rl) = &self.child_nofile {
                libc::setrlimit(libc::RLIMIT_NOFILE, rl);
            }
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0);
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
            for sig in 1..32 {
                if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                    libc::signal(sig, libc::SIG_DFL);
                }
            }
            if let Some(cwd) = &self.cwd {
                if libc::chdir(cwd.as_ptr()) != 0 {
                    fail(err_w, 1);
                }
            }
            // Last, after the privilege drop (NO_NEW_PRIVS lets an unprivileged process
            // install it): every later system call, execve included, is allowed by it.
            if let Some(f) = &self.bind_filter {
                if install_bind_filter(f) != 0 {
                    fail(err_w, 6);
                }
            }
            let me = libc::getpid();
            for &slot in pid_slots {
                write_pid(slot, me);
            }
            libc::execve(self.path.as_ptr(), self.argv.as_ptr(), self.envp.as_ptr());
            fail(err_w, 2)
        }
    }
}

/// Writes `pid` as decimal digits plus NUL at `dst` (room for 21 bytes). Async-signal-safe.
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
unsafe fn fail(err_w: RawFd, stage: u32) -> ! {
    // SAFETY: errno location and write/_exit are async-signal-safe; buffers are on the stack.
    unsafe {
        let errno = *libc::__errno_location();
        let mut buf = [0u8; 8];
        buf[..4].copy_from_slice(&stage.to_ne_bytes());
        buf[4..].copy_from_slice(&errno.to_ne_bytes());
        libc::write(err_w, buf.as_ptr().cast(), buf.len());
        libc::_exit(127)
    }
}

/// A pipe whose both ends are close-on-exec.
pub fn pipe_cloexec() -> io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)
}

/// Duplicates `fd` to the lowest free number `>= min`, close-on-exec. Only the descriptor is
/// new: the open file description (and its O_NONBLOCK flag) is shared, never changed.
pub fn dup_cloexec_from(fd: &OwnedFd, min: c_int) -> io::Result<OwnedFd> {
    let raw = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(min))?;
    // SAFETY: fcntl just returned this new descriptor; nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Takes ownership of the `n` sockets the service manager passed at fd 3.. (`LISTEN_FDS`),
/// after checking that each is an open socket. Succeeds at most once per process (a second
/// call would own the same numbers twice): `Err(fd, why)` names the first unusable one.
pub fn adopt_listen_fds(n: usize) -> Result<Vec<OwnedFd>, (RawFd, io::Error)> {
    static TAKEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let first = 3 as RawFd;
    let fds: Vec<RawFd> = (0..n).map(|i| first + i as RawFd).collect();
    for &fd in &fds {
        let st = nix::sys::stat::fstat(fd).map_err(|e| (fd, io::Error::from(e)))?;
        if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
            return Err((
                fd,
                io::Error::new(io::ErrorKind::InvalidInput, format!("fd {fd} is not a socket")),
            ));
        }
    }
    if TAKEN.swap(true, std::sync::atomic::Ordering::SeqCst) {
        return Err((first, io::Error::other("the inherited sockets were already taken")));
    }
    // SAFETY: every fd is open (fstat succeeded), was handed to this process by the service
    // manager for its exclusive use, and TAKEN makes sure the numbers are owned only once.
    Ok(fds.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }).collect())
}

/// A duplicate of `fd` at the lowest free number `>= min` that is *not* close-on-exec: handed
/// to the next image of herdsman across `execve` (in-place upgrade, see `upgrade`). Only the
/// descriptor is new; the open file description and its flags are shared, never changed.
pub fn dup_inheritable(fd: BorrowedFd<'_>, min: c_int) -> io::Result<OwnedFd> {
    let raw = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_DUPFD(min))?;
    // SAFETY: fcntl just returned this new descriptor; nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// An anonymous memory file that survives `execve` (no `MFD_CLOEXEC`): the upgrade state.
pub fn inheritable_memfd(name: &str) -> io::Result<OwnedFd> {
    let name = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    nix::sys::memfd::memfd_create(&name, nix::sys::memfd::MemFdCreateFlag::empty()).map_err(io::Error::from)
}

/// Replaces this process's image (same pid, same children, same descriptors unless
/// close-on-exec). Returns only on failure.
pub fn execve(path: &str, argv: &[String], env: &[String]) -> io::Error {
    let c = |s: &str| CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte"));
    let prepared = (|| -> io::Result<(CString, Vec<CString>, Vec<CString>)> {
        let argv = argv.iter().map(|a| c(a)).collect::<io::Result<Vec<_>>>()?;
        let env = env.iter().map(|e| c(e)).collect::<io::Result<Vec<_>>>()?;
        Ok((c(path)?, argv, env))
    })();
    match prepared {
        Ok((path, argv, env)) => match nix::unistd::execve(&path, &argv, &env) {
            Ok(never) => match never {},
            Err(e) => io::Error::from(e),
        },
        Err(e) => e,
    }
}

/// Descriptors the previous image of herdsman handed over across `execve`, each taken (owned)
/// at most once.
#[derive(Debug)]
pub struct HandedOver {
    fds: std::collections::HashMap<RawFd, OwnedFd>,
}

impl HandedOver {
    /// Takes ownership of `list`: every number must be open and listed once; each becomes
    /// close-on-exec again (workers and helpers must not inherit them). Fails, owning nothing,
    /// if one is not.
    pub fn adopt(list: &[RawFd]) -> io::Result<HandedOver> {
        let mut seen = std::collections::HashSet::new();
        for &fd in list {
            if fd < 3 || !seen.insert(fd) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("fd {fd} listed twice or reserved"),
                ));
            }
            // SAFETY: F_GETFD only queries the descriptor table.
            if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
                return Err(io::Error::new(io::ErrorKind::InvalidData, format!("fd {fd} is not open")));
            }
        }
        let mut fds = std::collections::HashMap::new();
        for &fd in list {
            // SAFETY: open (checked above), listed once (checked above), and handed to this
            // process image by its previous one for its exclusive use: nothing else owns it.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            nix::fcntl::fcntl(
                owned.as_raw_fd(),
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
            )?;
            fds.insert(fd, owned);
        }
        Ok(HandedOver { fds })
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

/// Opens a pidfd for our child `pid`: readable when it exits, and safe to signal (no pid reuse).
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall with integer arguments; the result is a new fd we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Sends `sig` through a pidfd (cannot hit a recycled pid).
pub fn pidfd_signal(pidfd: &OwnedFd, sig: c_int) -> io::Result<()> {
    // SAFETY: plain syscall; a null siginfo is allowed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Kills and reaps a child that is not supervised (yet): SIGKILL to its process group and to
/// itself, then `waitpid`. Only for our own unreaped child — until it is reaped its pid (and
/// so its process group id) cannot be reused, so the signal cannot hit anyone else. Used when
/// a worker was started but cannot be watched (no pidfd).
pub fn kill_and_reap_unwatched(pid: i32) {
    use nix::sys::signal::{Signal, kill, killpg};
    use nix::sys::wait::waitpid;
    let p = nix::unistd::Pid::from_raw(pid);
    // The worker made itself a group leader right after fork (setpgid), before exec.
    let _ = killpg(p, Signal::SIGKILL);
    let _ = kill(p, Signal::SIGKILL);
    while let Err(nix::errno::Errno::EINTR) = waitpid(p, None) {}
}

/// The soft `RLIMIT_NOFILE` herdsman was started with, once [`raise_fd_limit`] raised it
/// (`u64::MAX`: never raised). Workers get it back before exec.
static WORKER_NOFILE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(u64::MAX);

/// The workers' soft fd limit (for the upgrade state): `u64::MAX` when never raised.
pub fn worker_fd_limit() -> u64 {
    WORKER_NOFILE.load(std::sync::atomic::Ordering::Relaxed)
}

/// Restores the workers' soft fd limit after an in-place upgrade (the new image finds the
/// limit already raised, so it cannot learn the original one itself).
pub fn set_worker_fd_limit(v: u64) {
    WORKER_NOFILE.store(v, std::sync::atomic::Ordering::Relaxed);
}

/// Raises the soft fd limit to the hard one: each worker costs the supervisor three
/// descriptors (its pidfd and two output pipes), and the default soft limit (1024) is far
/// below what `MAX_WORKERS` needs. Workers are started with the original soft limit again.
/// Returns `(before, after)`.
pub fn raise_fd_limit() -> io::Result<(u64, u64)> {
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        let mut rl: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) != 0 {
            return Err(io::Error::last_os_error());
        }
        let before = rl.rlim_cur;
        if rl.rlim_cur < rl.rlim_max {
            let raised = libc::rlimit { rlim_cur: rl.rlim_max, rlim_max: rl.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
                return Err(io::Error::last_os_error());
            }
            WORKER_NOFILE.store(before, std::sync::atomic::Ordering::Relaxed);
        }
        Ok((before, rl.rlim_max))
    }
}

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

/// Makes sure 0, 1 and 2 are open (on /dev/null if not), so no socket or pipe we open later
/// lands there and gets confused with a standard stream.
pub fn ensure_stdio_open() {
    for fd in 0..3 {
        // SAFETY: F_GETFD only queries the descriptor table.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            // SAFETY: open of a constant NUL-terminated path; the new fd is the lowest free one,
            // i.e. `fd`, and deliberately stays open for the life of the process.
            unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR) };
        }
    }
}

/// `SO_ATTACH_REUSEPORT_CBPF` (asm-generic/socket.h; not exported by libc for glibc targets).
const SO_ATTACH_REUSEPORT_CBPF: c_int = 51;

/// One classic BPF instruction (`struct sock_filter`).
pub type BpfInsn = libc::sock_filter;

/// Attaches a classic BPF program to `fd`'s `SO_REUSEPORT` group: from now on it picks the
/// group member (by index) for each new connection. Replaces the group's previous program
/// atomically. The kernel copies and checks the program; an invalid one is refused (EINVAL).
pub fn attach_reuseport_cbpf(fd: &OwnedFd, prog: &[BpfInsn]) -> io::Result<()> {
    let len = u16::try_from(prog.len()).map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?;
    let fprog = libc::sock_fprog { len, filter: prog.as_ptr().cast_mut() };
    // SAFETY: `fprog` points at `prog`, which outlives the call; the kernel only reads `len`
    // instructions from it and copies them.
    unsafe { set_socket_option(fd, SO_ATTACH_REUSEPORT_CBPF, &fprog) }
}

/// `setsockopt(fd, SOL_SOCKET, option, value, size_of::<T>())`.
///
/// # Safety
/// `T` must be the type the kernel expects for `option`, and any pointer inside `value` valid
/// for the kernel to read for the duration of the call.
unsafe fn set_socket_option<T>(fd: &OwnedFd, option: c_int, value: &T) -> io::Result<()> {
    // SAFETY: `value` is a live `T` of exactly the length passed; the caller vouches for the
    // type and for what it points at.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// `SO_ATTACH_REUSEPORT_EBPF` (asm-generic/socket.h).
const SO_ATTACH_REUSEPORT_EBPF: c_int = 52;
/// `bpf(2)` commands (linux/bpf.h).
const BPF_MAP_CREATE: c_int = 0;
const BPF_MAP_UPDATE_ELEM: c_int = 2;
const BPF_PROG_LOAD: c_int = 5;
/// `BPF_PROG_TYPE_SK_REUSEPORT` and its attach type `BPF_SK_REUSEPORT_SELECT`.
const BPF_PROG_TYPE_SK_REUSEPORT: u32 = 21;
const BPF_SK_REUSEPORT_SELECT: u32 = 39;

/// One eBPF instruction (`struct bpf_insn`): `regs` is dst in the low nibble, src in the high.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EbpfInsn {
    pub code: u8,
    pub regs: u8,
    pub off: i16,
    pub imm: i32,
}

/// The `BPF_MAP_CREATE` part of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

/// The `BPF_MAP_*_ELEM` part of `union bpf_attr`.
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// The `BPF_PROG_LOAD` part of `union bpf_attr`, up to `expected_attach_type`.
#[repr(C)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// `bpf(cmd, attr, size)`; a new descriptor for the commands that return one.
///
/// # Safety
/// `attr` must be the `union bpf_attr` layout `cmd` expects, and every pointer in it valid
/// for the kernel to read (or write, for a log buffer) for the duration of the call.
unsafe fn bpf<T>(cmd: c_int, attr: &mut T) -> io::Result<c_int> {
    // SAFETY: the caller guarantees `attr`'s layout and pointers; the size is the struct's
    // own, and the kernel requires nothing beyond it to be present (it zero-extends).
    let r = unsafe {
        libc::syscall(libc::SYS_bpf, cmd, (attr as *mut T).cast::<libc::c_void>(), std::mem::size_of::<T>())
    };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(r as c_int) }
}

/// A BPF map with 4-byte keys, and the value size it was created with.
#[derive(Debug)]
pub struct BpfMap {
    fd: OwnedFd,
    value_size: usize,
}

impl BpfMap {
    /// Creates a map (`BPF_MAP_CREATE`); its descriptor is close-on-exec.
    pub fn create(map_type: u32, value_size: u32, max_entries: u32) -> io::Result<BpfMap> {
        let mut attr = MapCreateAttr { map_type, key_size: 4, value_size, max_entries, map_flags: 0 };
        // SAFETY: a plain `BPF_MAP_CREATE` attribute without pointers.
        let fd = unsafe { bpf(BPF_MAP_CREATE, &mut attr)? };
        // SAFETY: the kernel just returned this new descriptor (close-on-exec); we own it.
        Ok(BpfMap { fd: unsafe { OwnedFd::from_raw_fd(fd) }, value_size: value_size as usize })
    }

    /// Sets element `key` (`BPF_MAP_UPDATE_ELEM`, `BPF_ANY`); `value` must be the map's size.
    pub fn update(&self, key: u32, value: &[u8]) -> io::Result<()> {
        if value.len() != self.value_size {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let mut attr = ElemAttr {
            map_fd: self.fd.as_raw_fd() as u32,
            _pad: 0,
            key: (&key as *const u32) as u64,
            value: value.as_ptr() as u64,
            flags: 0,
        };
        // SAFETY: `key` (4 bytes, the map's key size) and `value` (checked above to be the
        // map's value size) outlive the call; the kernel only reads them.
        unsafe { bpf(BPF_MAP_UPDATE_ELEM, &mut attr) }.map(drop)
    }

    /// The descriptor, for a program's map reference.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Loads a `BPF_PROG_TYPE_SK_REUSEPORT` program. On refusal the error carries the first line
/// of the verifier's log that says why.
pub fn bpf_load_reuseport_prog(prog: &[EbpfInsn], license: &std::ffi::CStr) -> io::Result<OwnedFd> {
    let mut log = vec![0u8; 64 * 1024];
    let mut attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_SK_REUSEPORT,
        insn_cnt: u32::try_from(prog.len()).map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?,
        insns: prog.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
        prog_name: *b"herdsman_steer\0\0",
        prog_ifindex: 0,
        expected_attach_type: BPF_SK_REUSEPORT_SELECT,
    };
    // SAFETY: `prog`, `license` outlive the call; no log buffer on the first try.
    match unsafe { bpf(BPF_PROG_LOAD, &mut attr) } {
        // SAFETY: a new descriptor from the kernel (close-on-exec); we own it.
        Ok(fd) => Ok(unsafe { OwnedFd::from_raw_fd(fd) }),
        Err(e) if e.raw_os_error() != Some(libc::EINVAL) && e.raw_os_error() != Some(libc::EACCES) => Err(e),
        Err(first) => {
            // Again with the verifier's log, only to say why.
            attr.log_level = 1;
            attr.log_size = log.len() as u32;
            attr.log_buf = log.as_mut_ptr() as u64;
            // SAFETY: as above; `log` is writable for `log_size` bytes and outlives the call.
            if let Ok(fd) = unsafe { bpf(BPF_PROG_LOAD, &mut attr) } {
                // SAFETY: a new descriptor from the kernel; we own it.
                return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
            }
            let text =
                String::from_utf8_lossy(&log[..log.iter().position(|b| *b == 0).unwrap_or(0)]).into_owned();
            let why = text
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty() && !l.starts_with("processed"))
                .unwrap_or("");
            Err(io::Error::new(first.kind(), format!("{first}: {why}")))
        }
    }
}

/// Attaches an eBPF `SK_REUSEPORT` program to `fd`'s `SO_REUSEPORT` group, replacing the
/// group's previous program (classic or eBPF) atomically.
pub fn attach_reuseport_ebpf(fd: &OwnedFd, prog: &OwnedFd) -> io::Result<()> {
    let pfd: c_int = prog.as_raw_fd();
    // SAFETY: the option's value is one int, the program's descriptor.
    unsafe { set_socket_option(fd, SO_ATTACH_REUSEPORT_EBPF, &pfd) }
}

/// A listening TCP socket's accept queue: (connections waiting to be accepted, backlog), from
/// `TCP_INFO` (`tcpi_unacked` / `tcpi_sacked` mean exactly that for a listener).
pub fn tcp_listen_queue(fd: &OwnedFd) -> io::Result<(u32, u32)> {
    let mut info = std::mem::MaybeUninit::<libc::tcp_info>::zeroed();
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` is a writable buffer of `len` bytes; the kernel writes at most `len`
    // bytes and updates `len`; zeroed memory is a valid `tcp_info` whatever it writes.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: zero-initialised above and (partly) filled by the kernel: every bit pattern is a
    // valid `tcp_info` (plain integers).
    let info = unsafe { info.assume_init() };
    Ok((info.tcpi_unacked, info.tcpi_sacked))
}

// ---- Node IPC channel (issue 23: a Node worker's channel at fd 3 + LISTEN_FDS) ----

/// Duplicates the open descriptor number `fd` (a socket the caller holds, known by its number)
/// to the lowest free number `>= min`, close-on-exec: moves a socket out of the way of a
/// worker's target range for one spawn (see `spawn::crowded`). Only the descriptor is new; the
/// open file description and its flags are shared, never changed.
pub fn dup_number_cloexec_from(fd: RawFd, min: c_int) -> io::Result<OwnedFd> {
    let raw = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(min))?;
    // SAFETY: fcntl just returned this new descriptor; nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

// ---------------------------------------------------------------------------------------------
// Bind interception: the seccomp user-notification filter a worker installs before exec, and
// the supervisor's side of its notifications (see `intercept` for the why and the policy).
// ---------------------------------------------------------------------------------------------

/// The filter a worker installs just before exec, and where it sends the notification fd.
#[derive(Debug)]
pub struct BindFilter {
    prog: Vec<libc::sock_filter>,
    /// The worker's end of the socketpair, kept above the target range of the fd plan.
    channel: OwnedFd,
}

impl ExecPlan {
    /// Makes the child install `prog` with `SECCOMP_FILTER_FLAG_NEW_LISTENER` (after
    /// `PR_SET_NO_NEW_PRIVS`, after the privilege drop) and send the listener over `channel`
    /// (`SCM_RIGHTS`), keeping no copy. A failure fails the spawn, naming the step.
    pub fn with_bind_filter(mut self, prog: Vec<libc::sock_filter>, channel: OwnedFd) -> io::Result<Self> {
        if u16::try_from(prog.len()).is_err() {
            return Err(io::Error::from_raw_os_error(libc::E2BIG));
        }
        let floor = 3 + self.fds.len() as c_int;
        let channel = if channel.as_raw_fd() >= floor { channel } else { dup_cloexec_from(&channel, floor)? };
        self.bind_filter = Some(BindFilter { prog, channel });
        Ok(self)
    }
}

/// Installs the filter and sends its listener to the supervisor. Async-signal-safe: only
/// system calls on memory prepared before fork and the stack. 0, or -1 with errno set.
///
/// # Safety
/// Call only in the forked child, before exec.
unsafe fn install_bind_filter(f: &BindFilter) -> c_int {
    // SAFETY: prctl/seccomp/close take plain values and pointers to live memory (`fprog`
    // points at the plan's instructions, which outlive the call); the kernel copies the program.
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
/// Async-signal-safe.
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

/// Sends `fd` over the unix socket `sock` (`SCM_RIGHTS`, one data byte). Async-signal-safe: the
/// message and its control buffer live on the stack. 0, or -1 with errno set.
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
    let (r, w) = pipe_cloexec().map_err(|e| refused("pipe", e))?;
    // SAFETY: fork has no memory-safety preconditions; the child only makes async-signal-safe
    // system calls on stack data and `prog` (copied by fork), then exits.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(refused("fork", io::Error::last_os_error()));
    }
    if pid == 0 {
        // SAFETY: we are the forked child; only async-signal-safe calls, then _exit.
        unsafe {
            let report = |step: u32, errno: c_int| -> ! {
                let mut buf = [0u8; 8];
                buf[..4].copy_from_slice(&step.to_ne_bytes());
                buf[4..].copy_from_slice(&errno.to_ne_bytes());
                libc::write(w.as_raw_fd(), buf.as_ptr().cast(), buf.len());
                libc::_exit(0)
            };
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

/// One pending notification (`SECCOMP_IOCTL_NOTIF_RECV`). Blocks if none is pending: call it
/// only when the listener polls readable. `ENOENT`: the notifying task went away meanwhile.
pub fn notif_recv(listener: &OwnedFd) -> io::Result<libc::seccomp_notif> {
    // SAFETY: the kernel requires a zeroed struct and writes one `seccomp_notif` into it;
    // every bit pattern is valid for its integer fields.
    unsafe {
        let mut n: libc::seccomp_notif = std::mem::zeroed();
        if libc::ioctl(listener.as_raw_fd(), libc::SECCOMP_IOCTL_NOTIF_RECV, &mut n as *mut _) < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n)
    }
}

/// Answers notification `id`: the system call returns `val` (or fails with `-error`), or with
/// `continue_` runs as if no filter had trapped it.
pub fn notif_respond(listener: &OwnedFd, id: u64, val: i64, error: i32, continue_: bool) -> io::Result<()> {
    let flags = if continue_ { libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32 } else { 0 };
    let resp = libc::seccomp_notif_resp { id, val, error, flags };
    // SAFETY: the kernel reads one `seccomp_notif_resp` from our stack.
    let r = unsafe { libc::ioctl(listener.as_raw_fd(), libc::SECCOMP_IOCTL_NOTIF_SEND, &resp as *const _) };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Whether notification `id` is still pending (its task did not die and its pid was not
/// reused): checked after reading the task's memory.
pub fn notif_id_valid(listener: &OwnedFd, id: u64) -> bool {
    // SAFETY: the kernel reads one u64 from our stack.
    unsafe { libc::ioctl(listener.as_raw_fd(), libc::SECCOMP_IOCTL_NOTIF_ID_VALID, &id as *const u64) == 0 }
}

/// Installs `src` in the notifying task at descriptor number `target`, replacing what was
/// there (`SECCOMP_IOCTL_NOTIF_ADDFD` with `SECCOMP_ADDFD_FLAG_SETFD`; not `_SEND`, so the
/// trapped call's answer stays ours to give).
pub fn notif_addfd(
    listener: &OwnedFd,
    id: u64,
    src: BorrowedFd<'_>,
    target: u32,
    cloexec: bool,
) -> io::Result<()> {
    let addfd = libc::seccomp_notif_addfd {
        id,
        flags: libc::SECCOMP_ADDFD_FLAG_SETFD as u32,
        srcfd: src.as_raw_fd() as u32,
        newfd: target,
        newfd_flags: if cloexec { libc::O_CLOEXEC as u32 } else { 0 },
    };
    // SAFETY: the kernel reads one `seccomp_notif_addfd` from our stack; `src` is open.
    let r = unsafe { libc::ioctl(listener.as_raw_fd(), libc::SECCOMP_IOCTL_NOTIF_ADDFD, &addfd as *const _) };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// The protocol name of the socket `path` leads to (`/proc/PID/fd/N`): the `system.sockprotoname`
/// attribute every socket has ("TCP", "TCPv6", "UDP", "UNIX", ...). Needs ptrace read access
/// to the process, like `readlink` of the same path; `getxattr` is in systemd's
/// `@system-service` set (`pidfd_getfd`, the other way to learn a socket's type, is not).
pub fn socket_protocol(path: &std::path::Path) -> io::Result<String> {
    let path = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut buf = [0u8; 32];
    // SAFETY: both strings are NUL-terminated; the kernel writes at most `buf.len()` bytes.
    let n = unsafe {
        libc::getxattr(path.as_ptr(), c"system.sockprotoname".as_ptr(), buf.as_mut_ptr().cast(), buf.len())
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let got = &buf[..n as usize];
    let name = got.split(|b| *b == 0).next().unwrap_or(got);
    Ok(String::from_utf8_lossy(name).into_owned())
}

/// Runs `f` with the calling thread's filesystem uid and gid set to `uid` and `gid`, then
/// restores them. `setfsuid`/`setfsgid` change only the calling thread (raw system calls, no
/// libc broadcast), and the capabilities that leave with a non-zero fsuid (`CAP_CHOWN`,
/// `CAP_DAC_OVERRIDE`, ...) come back with the old one. For `/proc/PID/fd/N` of a worker of
/// another user: its `fd` directory is `0500` and the worker's own, and the shipped unit gives
/// herdsman no `CAP_DAC_READ_SEARCH`. Needs `CAP_SETUID`/`CAP_SETGID` (else nothing changes).
/// The ids are put back by a guard, so they are restored even if `f` unwinds (the event
/// loop's thread must never go on with a worker's filesystem ids).
pub fn with_fs_ids<T>(uid: u32, gid: u32, f: impl FnOnce() -> T) -> T {
    struct Restore {
        uid: libc::c_long,
        gid: libc::c_long,
    }
    impl Drop for Restore {
        fn drop(&mut self) {
            // SAFETY: plain system calls with integer arguments, putting back the ids they
            // returned (the uid first: it restores the capabilities the group change may need).
            unsafe {
                libc::syscall(libc::SYS_setfsuid, self.uid);
                libc::syscall(libc::SYS_setfsgid, self.gid);
            }
        }
    }
    // SAFETY: plain system calls with integer arguments; each returns the previous id.
    let (gid, uid) =
        unsafe { (libc::syscall(libc::SYS_setfsgid, gid), libc::syscall(libc::SYS_setfsuid, uid)) };
    let _restore = Restore { uid, gid };
    f()
}

/// A close-on-exec copy of `fd` (above the standard streams), which the caller keeps open.
pub fn dup_raw_cloexec(fd: RawFd) -> io::Result<OwnedFd> {
    let raw = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(3))?;
    // SAFETY: fcntl just returned this new descriptor; nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

// ---- Metrics memory (issue 22, item 4): give freed heap memory back after a big scrape ----

/// Returns the heap memory malloc holds free to the system (glibc's `malloc_trim`, every
/// arena, including free pages inside the heap). glibc otherwise keeps it: a freed buffer
/// larger than its mmap threshold raises that threshold, so the next big buffers come from
/// the heap, and a scrape's pages and parse data end up as free heap nobody gives back.
/// A no-op where the C library is not glibc.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks malloc's own arenas under their locks; it takes no
    // pointer from us and is safe to call from any thread at any time outside a fork child.
    unsafe {
        libc::malloc_trim(0);
    }
}

// ---- In-place upgrade: the candidate binary is opened once, checked, and that descriptor
// ---- executed (issue 22, item 1). ----

/// Opens `name` (one path component, or `/`) relative to `dir` as an `O_PATH` descriptor,
/// close-on-exec, without following a symbolic link: a link is opened as itself (its
/// `fstat` says so) and never resolved.
pub fn open_path_nofollow(dir: Option<BorrowedFd<'_>>, name: &std::path::Path) -> io::Result<OwnedFd> {
    use nix::fcntl::OFlag;
    let flags = OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let raw = nix::fcntl::openat(dir.map(|d| d.as_raw_fd()), name, flags, nix::sys::stat::Mode::empty())?;
    // SAFETY: openat just returned this new descriptor; nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Replaces this process's image with the file open at `fd` (`execveat(fd, "", ...,
/// AT_EMPTY_PATH)`): the file that was checked is the one that runs, whatever happens to its
/// path meanwhile. Returns only on failure.
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

// ---- Steering: giving up the capabilities that loading the eBPF router needed (steer-caps) ----

impl BpfMap {
    /// A map handed over by a previous image (its descriptor and value size).
    pub fn adopt(fd: OwnedFd, value_size: usize) -> BpfMap {
        BpfMap { fd, value_size }
    }

    /// The descriptor, to hand it over.
    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }
}

/// What [`drop_steering_capabilities`] did.
#[derive(Debug)]
pub enum CapsDropped {
    /// No eBPF router: nothing was loaded, nothing to give up (see the caller).
    NoRouter,
    /// Neither `CAP_BPF` nor `CAP_PERFMON` was permitted.
    NotHeld,
    /// Gone from every set of the calling thread, bounding set included.
    Dropped,
    /// Kept: without `CAP_BPF` the probe failed with this error (Linux before 6.5 with
    /// `kernel.unprivileged_bpf_disabled` set checks `CAP_BPF` on every `bpf()` call).
    Kept(io::Error),
}

/// `_LINUX_CAPABILITY_VERSION_3`: two 32-bit words per set.
const CAP_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default, PartialEq, Eq)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// The calling thread's capability sets (`capget`).
fn caps_get() -> io::Result<[CapData; 2]> {
    let mut header = CapHeader { version: CAP_VERSION_3, pid: 0 };
    let mut data = [CapData::default(); 2];
    // SAFETY: a version-3 header and room for its two data words; the kernel writes only them.
    let r = unsafe { libc::syscall(libc::SYS_capget, &mut header as *mut CapHeader, data.as_mut_ptr()) };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(data) }
}

/// Sets the calling thread's capability sets (`capset`; only ever lowers them here).
fn caps_set(data: &[CapData; 2]) -> io::Result<()> {
    let mut header = CapHeader { version: CAP_VERSION_3, pid: 0 };
    // SAFETY: a version-3 header and its two data words, which the kernel only reads.
    let r = unsafe { libc::syscall(libc::SYS_capset, &mut header as *mut CapHeader, data.as_ptr()) };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// `data` without capability `cap`: in the effective set only, or in all three.
fn without(mut data: [CapData; 2], cap: c_int, effective_only: bool) -> [CapData; 2] {
    let word = &mut data[cap as usize / 32];
    let keep = !(1u32 << (cap as u32 % 32));
    word.effective &= keep;
    if !effective_only {
        word.permitted &= keep;
        word.inheritable &= keep;
    }
    data
}

fn has(data: &[CapData; 2], cap: c_int) -> bool {
    data[cap as usize / 32].permitted & (1u32 << (cap as u32 % 32)) != 0
}

/// The eBPF router is loaded and attached; `still_works` writes one of its maps harmlessly.
/// Lowers `CAP_BPF` and `CAP_PERFMON` from the effective set and runs `still_works`: if the
/// kernel refuses the write, they come back and the result is [`CapsDropped::Kept`]. Else
/// `CAP_BPF`, `CAP_PERFMON` and then `CAP_SETPCAP` leave the bounding set (so no later
/// `execve`, an in-place upgrade's included, gets them back, and workers inherit a bounding
/// set without them), and the permitted, effective and inheritable sets (which clears them
/// from the ambient set too).
///
/// Capabilities belong to a thread: this changes the calling thread's, and threads it starts
/// later inherit them. A thread started before keeps its own (herdsman's log thread lowers
/// them itself when it starts, [`lower_steering_capabilities`]).
pub fn drop_steering_capabilities(still_works: impl FnOnce() -> io::Result<()>) -> io::Result<CapsDropped> {
    let before = caps_get()?;
    if !has(&before, CAP_BPF) && !has(&before, CAP_PERFMON) {
        return Ok(CapsDropped::NotHeld);
    }
    caps_set(&without(without(before, CAP_BPF, true), CAP_PERFMON, true))?;
    if let Err(e) = still_works() {
        caps_set(&before)?;
        return Ok(CapsDropped::Kept(e));
    }
    lower_steering_capabilities()?;
    Ok(CapsDropped::Dropped)
}

/// Takes `CAP_BPF`, `CAP_PERFMON` and then `CAP_SETPCAP` out of the calling thread's bounding
/// set (so that an `execve` from this thread, even as root, cannot get them back), then out
/// of its permitted, effective and inheritable sets. Also for a thread that never needs them
/// (herdsman's log thread, started before the router is loaded).
pub fn lower_steering_capabilities() -> io::Result<()> {
    for cap in [CAP_BPF, CAP_PERFMON, CAP_SETPCAP] {
        // SAFETY: prctl with integer arguments only. EPERM without CAP_SETPCAP (then the
        // workers' bounding set drop fails the same way and only the other sets change).
        unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
    }
    lower_capabilities(&[CAP_BPF, CAP_PERFMON, CAP_SETPCAP])
}

/// Takes `caps` out of the calling thread's permitted, effective and inheritable sets.
pub fn lower_capabilities(caps: &[c_int]) -> io::Result<()> {
    let before = caps_get()?;
    let mut after = before;
    for &cap in caps {
        after = without(after, cap, false);
    }
    if after == before { Ok(()) } else { caps_set(&after) }
}

/// Receives one descriptor sent with [`send_fd`] (without waiting: it must be queued).
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

    #[test]
    fn the_kernel_here_has_pidfds() {
        // The development and CI kernels are far newer than 5.3 (and 5.11 for close_range).
        let k = check_kernel().unwrap();
        assert!(k.close_range_cloexec);
    }

    #[test]
    fn an_unwatched_child_is_killed_with_its_group_and_reaped() {
        use std::os::unix::process::CommandExt;
        // A group leader with a grandchild in its group, like a worker that forked.
        let child = std::process::Command::new("sh")
            .args(["-c", "sleep 1000 & wait"])
            .process_group(0)
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let in_group = || {
            std::fs::read_dir("/proc")
                .unwrap()
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                .filter(|p| {
                    std::fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|s| {
                        let f: Vec<&str> =
                            s.rsplit_once(')').map(|(_, r)| r).unwrap_or("").split_whitespace().collect();
                        f.get(2) == Some(&pid.to_string().as_str())
                    })
                })
                .count()
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while in_group() < 2 {
            assert!(std::time::Instant::now() < deadline, "the grandchild never started");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        kill_and_reap_unwatched(pid);
        // Reaped: no zombie left, and waitpid has nothing more to give.
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "child {pid} not reaped");
        assert!(nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None).is_err());
        // The grandchild got the SIGKILL too (it is reparented and reaped by init or a
        // subreaper, so poll until it is gone).
        while in_group() > 0 {
            assert!(std::time::Instant::now() < deadline, "the worker's group survived");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        std::mem::forget(child);
    }

    #[test]
    fn plan_rejects_sources_inside_the_target_range() {
        let err =
            ExecPlan::new("/bin/true", &["true".into()], &[], &[], None, [10, 11, 12], &[4, 20]).unwrap_err();
        assert!(matches!(err, PlanError::FdInTargetRange { fd: 4, limit: 5 }));
        let err =
            ExecPlan::new("/bin/true", &["true".into()], &[], &[], None, [1, 11, 12], &[20]).unwrap_err();
        assert!(matches!(err, PlanError::FdInTargetRange { fd: 1, .. }));
        assert!(
            ExecPlan::new("/bin/true", &["true".into()], &[], &[], None, [10, 11, 12], &[20, 21]).is_ok()
        );
    }
}
