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

use std::os::fd::OwnedFd;

use nix::sys::socket::{self, SockType};

use crate::config::BindIntercept;
use crate::sys;

/// `AUDIT_ARCH_X86_64` (linux/audit.h).
const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
/// x86_64 system call numbers.
pub(super) const NR_BIND: u32 = 49;
pub(super) const NR_LISTEN: u32 = 50;
/// x32 system calls have this bit set; they are allowed through like other architectures.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;
/// The longest sockaddr we read (`sockaddr_storage`).
pub(super) const MAX_SOCKADDR: usize = 128;

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

mod answer;
mod inspect;
#[cfg(test)]
mod tests;

pub use answer::{Learner, Seen, Sockets, watch};
