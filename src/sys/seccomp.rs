//! Bind interception, the supervisor's side (see `intercept` for the why and the policy): the
//! seccomp user notifications a worker's filter sends (receive, answer, install a descriptor
//! in the worker), what socket a worker's descriptor is, and reading a worker's `/proc` files
//! as its own user. The filter itself is installed in the worker's child (`child.rs`).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

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
/// restores them. `setfsuid`/`setfsgid` change only the calling thread (glibc's and musl's
/// wrappers are the bare system calls, without the set*id broadcast to every thread), and
/// the capabilities that leave with a non-zero fsuid (`CAP_CHOWN`, `CAP_DAC_OVERRIDE`, ...)
/// come back with the old one. For `/proc/PID/fd/N` of a worker of another user: its `fd`
/// directory is `0500` and the worker's own, and the shipped unit gives herdsman no
/// `CAP_DAC_READ_SEARCH`. Needs `CAP_SETUID`/`CAP_SETGID` (else nothing changes).
/// The ids are put back by a guard, so they are restored even if `f` unwinds (the event
/// loop's thread must never go on with a worker's filesystem ids).
pub fn with_fs_ids<T>(uid: u32, gid: u32, f: impl FnOnce() -> T) -> T {
    use nix::unistd::{Gid, Uid, setfsgid, setfsuid};
    struct Restore {
        uid: Uid,
        gid: Gid,
    }
    impl Drop for Restore {
        fn drop(&mut self) {
            // The uid first: it restores the capabilities the group change may need.
            setfsuid(self.uid);
            setfsgid(self.gid);
        }
    }
    // Each returns the previous id.
    let gid = setfsgid(Gid::from_raw(gid));
    let uid = setfsuid(Uid::from_raw(uid));
    let _restore = Restore { uid, gid };
    f()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `(fsuid, fsgid)` of a task, from `/proc/<task>/status` (the fourth id on each line).
    fn fs_ids(task: &str) -> (u32, u32) {
        let status = std::fs::read_to_string(format!("/proc/{task}/status")).unwrap();
        let fourth = |key: &str| -> u32 {
            let line = status.lines().find(|l| l.starts_with(key)).unwrap();
            line.split_whitespace().nth(4).unwrap().parse().unwrap()
        };
        (fourth("Uid:"), fourth("Gid:"))
    }

    #[test]
    fn filesystem_ids_change_for_the_calling_thread_only_and_come_back() {
        if !nix::unistd::geteuid().is_root() {
            assert!(std::env::var_os("CI").is_none(), "changing the filesystem ids needs root under CI");
            eprintln!("SKIP: changing the filesystem ids needs root");
            return;
        }
        let before = fs_ids("thread-self");
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let other = std::thread::spawn(move || {
            tid_tx.send(nix::unistd::gettid().as_raw()).unwrap();
            let _ = done_rx.recv();
        });
        let tid = tid_rx.recv().unwrap();
        let (inside, other_inside) =
            with_fs_ids(65534, 65534, || (fs_ids("thread-self"), fs_ids(&format!("self/task/{tid}"))));
        drop(done_tx);
        other.join().unwrap();
        assert_eq!(inside, (65534, 65534));
        assert_eq!(other_inside, before, "another thread's filesystem ids changed too");
        assert_eq!(fs_ids("thread-self"), before, "not restored");
    }
}
