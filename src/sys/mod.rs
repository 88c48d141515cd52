//! The only module with `unsafe`: fork/exec of a worker, pidfds, descriptors, and the system
//! calls no safe crate wraps (seccomp notifications, `bpf(2)`, capabilities).
//!
//! Why by hand: a worker must see `LISTEN_PID` equal to its *own* pid, which is only known after
//! `fork()`. `std::process::Command` cannot change the environment after forking, and allocating
//! or calling `setenv` between fork and exec is not async-signal-safe in a threaded process. So
//! [`ExecPlan`] builds `argv`, `envp` (with a fixed-size `LISTEN_PID=` slot), the fd layout and
//! the working directory *before* forking, and the child only does async-signal-safe system
//! calls: `dup2`, `close_range`, `setpgid`, `setgroups`/`setgid`/`setuid` (with `--user`, on
//! numbers resolved before fork), `setrlimit`, `prctl` (also dropping `CAP_BPF` from the
//! bounding set), `sigprocmask`, `signal`, `chdir`, the bind filter's `seccomp` and `sendmsg`,
//! writing digits into memory it already owns, and `execve`. No allocation, no locks, no
//! logging.
//!
//! The rules:
//! - `unsafe` is allowed here only (`unsafe_code = "deny"` in `Cargo.toml`, allowed by the
//!   attribute below for this module and its files); every block has a `// SAFETY:` comment.
//! - Every line that runs after `fork()` in a child is in `child.rs`, in the order it runs,
//!   and nowhere else; it calls libc directly, never a wrapper that might allocate.
//! - Elsewhere, where `nix` wraps a call safely, it is used (pipes, `fcntl`, `memfd_create`,
//!   rlimits, `kill`/`waitpid`, `setfsuid`, `openat`, `execveat`, `recvmsg`); what is left by
//!   hand is what nix 0.29 lacks (pidfds, `close_range`, seccomp, `bpf`, `capget`/`capset`,
//!   `PR_CAPBSET_DROP`, `TCP_INFO`, `getxattr`, the reuseport attach options) and taking
//!   ownership of a descriptor a call just returned.
//! - Callers use the flat paths re-exported here (`sys::ExecPlan`, `sys::pidfd_open`); the
//!   files are private.
//!
//! The files:
//! - `exec.rs`: [`ExecPlan`], built before fork, and the parent's side of [`ExecPlan::spawn`].
//! - `child.rs`: what the forked children run, between `fork` and `execve`/`_exit`.
//! - `fd.rs`: pipes, duplicates, `LISTEN_FDS`, [`recv_fd`], stdio, [`watch_readable`].
//! - `process.rs`: pidfds, [`kill_and_reap_unwatched`], the fd limit, `malloc_trim`, and
//!   [`release_idle_pages`] (code that ran once out of the resident set).
//! - `probe.rs`: what the kernel offers, checked at start ([`check_kernel`],
//!   [`probe_bind_filter`]).
//! - `seccomp.rs`: the supervisor's side of bind interception (notifications, [`with_fs_ids`]).
//! - `bpf.rs`: steering (`SO_ATTACH_REUSEPORT_*`, `bpf(2)`, [`tcp_listen_queue`]).
//! - `caps.rs`: giving up the steering capabilities.
//! - `reexec.rs`: herdsman replacing its own image (in-place upgrade) and [`HandedOver`].

#![allow(unsafe_code)]

mod bpf;
mod caps;
mod child;
mod exec;
mod fd;
mod probe;
mod process;
mod reexec;
mod seccomp;

pub use bpf::{
    BpfInsn, BpfMap, EbpfInsn, attach_reuseport_cbpf, attach_reuseport_ebpf, bpf_load_reuseport_prog,
    tcp_listen_queue,
};
#[cfg(test)]
pub use caps::lower_capabilities;
pub use caps::{CapsDropped, drop_steering_capabilities, lower_steering_capabilities};
pub use exec::{ExecPlan, PlanError};
#[cfg(test)]
pub use fd::recv_with_fds;
pub use fd::{
    adopt_listen_fds, dup_cloexec_from, dup_number_cloexec_from, dup_raw_cloexec, ensure_stdio_open,
    is_socket, pipe_cloexec, recv_fd, watch_readable,
};
pub use probe::{FilterRefused, check_kernel, probe_bind_filter};
pub use process::{
    kill_and_reap_unwatched, pidfd_open, pidfd_signal, raise_fd_limit, release_free_memory,
    release_idle_pages, set_worker_fd_limit, worker_fd_limit,
};
pub use reexec::{HandedOver, dup_inheritable, execve_fd, inheritable_memfd, open_path_nofollow};
pub use seccomp::{notif_addfd, notif_id_valid, notif_recv, notif_respond, socket_protocol, with_fs_ids};
