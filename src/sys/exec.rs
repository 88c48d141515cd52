//! [`ExecPlan`]: everything a worker's `execve` needs, built (and allocated) before `fork()`,
//! and [`ExecPlan::spawn`], the parent's side of the fork. What the child does between `fork`
//! and `execve` is in `child.rs`, and nothing else is.
//!
//! The fd plan is simple by construction: every listening socket is kept at a number
//! `>= 3 + n` in the supervisor (see `listeners`), so `dup2(src, 3 + i)` can never clobber
//! another source ([`ExecPlan::new`] refuses a plan where one could). Standard streams are
//! placed first. Everything from `3 + n` up is marked close-on-exec with `close_range`, so a
//! worker gets exactly stdio and the sockets.

use std::ffi::{CString, c_char, c_int};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use super::fd::{dup_cloexec_from, pipe_cloexec};

/// Room for `NAME=` (names up to 31 bytes) plus the longest pid and a NUL.
pub(super) const PID_SLOT_LEN: usize = 32 + 20 + 1;

/// Which step in the child failed (the index the child reports to the parent with the errno).
pub(super) mod stage {
    pub const FDS: u32 = 0;
    pub const CHDIR: u32 = 1;
    pub const EXEC: u32 = 2;
    pub const SETGROUPS: u32 = 3;
    pub const SETGID: u32 = 4;
    pub const SETUID: u32 = 5;
    pub const SECCOMP: u32 = 6;
}

/// What each [`stage`] is called in the spawn error.
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
    pub(super) path: CString,
    pub(super) cwd: Option<CString>,
    _argv: Vec<CString>,
    pub(super) argv: Vec<*const c_char>,
    _env: Vec<CString>,
    /// `NAME=` buffers whose pid digits are written after fork, with the prefix length.
    pid_slots: Vec<(Box<[u8; PID_SLOT_LEN]>, usize)>,
    pub(super) envp: Vec<*const c_char>,
    pub(super) stdio: [RawFd; 3],
    pub(super) fds: Vec<RawFd>,
    /// Where the child's close-one-by-one fallback stops (the soft fd limit, at most 65536).
    pub(super) max_fd: c_int,
    /// `(uid, gid, supplementary groups)` to switch to in the child, resolved before fork.
    pub(super) creds: Option<(libc::uid_t, libc::gid_t, Vec<libc::gid_t>)>,
    /// The fd limit to give the worker back when herdsman raised its own (see
    /// `raise_fd_limit`): workers start with the limits herdsman was started with.
    pub(super) child_nofile: Option<libc::rlimit>,
    /// The bind interception filter to install just before exec (see [`BindFilter`]).
    pub(super) bind_filter: Option<BindFilter>,
    /// The worker outlives the supervisor (no `PR_SET_PDEATHSIG`): under systemd, where a
    /// restarted supervisor re-adopts it from the fd store (see `fdstore`).
    pub(super) outlive_parent: bool,
}

/// The filter a worker installs just before exec, and where it sends the notification fd
/// (see `intercept` for the why and the policy).
#[derive(Debug)]
pub(super) struct BindFilter {
    pub(super) prog: Vec<libc::sock_filter>,
    /// The worker's end of the socketpair, kept above the target range of the fd plan.
    pub(super) channel: OwnedFd,
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
        let (max_fd, child_nofile) = super::process::worker_nofile();
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
            outlive_parent: false,
        })
    }

    /// The worker keeps running when the supervisor dies (no parent-death signal).
    pub fn outliving_parent(mut self) -> Self {
        self.outlive_parent = true;
        self
    }

    /// Makes the child switch to `uid`, primary group `gid` and supplementary `groups`
    /// (`setgroups`, `setgid`, `setuid`, in that order) before exec. A failure of any of them
    /// fails the spawn, naming the step.
    pub fn with_credentials(mut self, uid: u32, gid: u32, groups: &[u32]) -> Self {
        self.creds = Some((uid, gid, groups.to_vec()));
        self
    }

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

    /// Forks and execs the worker. Returns its pid once `execve` succeeded; a failure in the
    /// child (bad directory, exec error) comes back as an error naming the step.
    pub fn spawn(&mut self) -> io::Result<i32> {
        let first_free = 3 + self.fds.len() as c_int;
        let (err_r, err_w_low) = pipe_cloexec()?;
        // The error pipe must survive the dup2 calls in the child: keep it above the target
        // range. It is close-on-exec, so a successful execve closes it: end of file here.
        let err_w = dup_cloexec_from(&err_w_low, first_free)?;
        drop(err_w_low);
        let parent = std::process::id() as libc::pid_t;
        // Where each pid goes, computed (and allocated) before the fork.
        let pid_slots: Vec<*mut u8> = self.pid_slots.iter_mut().map(|(b, n)| b[*n..].as_mut_ptr()).collect();
        // SAFETY: fork has no memory-safety preconditions. In the child we only call
        // async-signal-safe functions on data prepared before the fork (see `child.rs`).
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        if pid == 0 {
            // SAFETY: we are the freshly forked child; `child` never returns. Each slot
            // points `n` bytes into a `PID_SLOT_LEN`-byte buffer with `n <= 32`, so 21 bytes
            // of room are left.
            unsafe { self.child(err_w.as_raw_fd(), &pid_slots, parent, first_free) }
        }
        drop(err_w);
        let mut report = [0u8; 8];
        let mut got = 0;
        while got < report.len() {
            match nix::unistd::read(err_r.as_raw_fd(), &mut report[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
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
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn every_stage_has_a_name() {
        use stage::*;
        for s in [FDS, CHDIR, EXEC, SETGROUPS, SETGID, SETUID, SECCOMP] {
            assert!(STAGES.get(s as usize).is_some(), "stage {s}");
        }
        assert_eq!(STAGES[SECCOMP as usize], "installing the bind filter (seccomp)");
    }
}
