//! systemd's file descriptor store: what lets a restarted supervisor find its workers again
//! after a crash (issue 26), and the clean-up that the unit's `KillMode=process` then needs.
//!
//! # Protocol
//! * **Store**: one datagram per descriptor to `$NOTIFY_SOCKET`, `FDSTORE=1\nFDNAME=<name>`
//!   (plus `FDPOLL=0` where asked) with the descriptor attached as `SCM_RIGHTS`
//!   ([`store`]). One descriptor per message keeps the name unambiguous.
//! * **Remove**: `FDSTOREREMOVE=1\nFDNAME=<name>` ([`remove`]), once a worker's exit is
//!   handled (its pipes drained).
//! * **Take back**: a (re)started herdsman gets every stored descriptor in `LISTEN_FDS`, named
//!   in `LISTEN_FDNAMES`, next to the socket unit's listening sockets, **in no particular
//!   order** (observed `t.socket:out-100:pidfd-100:out-99:pidfd-99`). [`split`] sorts them by
//!   name: the names herdsman stored carry the [`PREFIX`] (added by [`store`], stripped here),
//!   so the descriptors the driver stored as `pidfd-0-3-1234` come back under that key in a
//!   `BTreeMap`, ready for the same restore an in-place upgrade uses; every other name is the
//!   socket unit's and stays with `listeners`. A name without the prefix is never taken for a
//!   stored one, and a `FileDescriptorName=` starting with `herdsman.` is reserved.
//! * **State**: [`state::StateFile`], two memfds (`state-a`, `state-b`, stored once with
//!   `FDPOLL=0`) rewritten in turn with the serialized core, so a crash in the middle of a
//!   write always leaves the previous state readable and never a torn one that parses.
//! * **Clean-up**: [`cgroup`] lists the processes of herdsman's own cgroup and kills every one
//!   the caller cannot account for (at start, under systemd only), and [`stop_post`] is the
//!   unit's `ExecStopPost=` helper (`herdsman stop-post %n`) that kills what is left after a
//!   stop unless an automatic restart follows.
//!
//! # systemd 252 facts this relies on (measured: `docs/systemd.md`, the notes of issue 26)
//! * `KillMode=process` leaves the workers running when the main process dies; `mixed` and
//!   `control-group` SIGKILL them. So the unit's stop no longer cleans the cgroup by itself:
//!   a stop's own SIGKILL (after `TimeoutStopSec=`) reaches the main process only, hence
//!   [`stop_post`].
//! * The store survives a crash restart and `systemctl restart` (a job is queued); it is
//!   flushed when the unit stops for good. It needs `FileDescriptorStoreMax=` > 0 and a
//!   sender `NotifyAccess=` allows (`main`: herdsman itself); over the limit, fds are refused
//!   (systemd logs it).
//! * systemd polls stored fds and drops them on `POLLHUP`/`POLLERR`: a dead worker's pidfd
//!   (kernel >= 6.9) and its pipe once no writer is left, unless stored with `FDPOLL=0`. On
//!   older kernels a dead worker's pidfd only turns readable and stays: the restarted
//!   supervisor sees it readable at once and must remove it. Handle both.
//! * Names: up to 255 characters, printable ASCII, no `:` ([`validate`]).
//! * `systemctl stop` while the unit waits in `auto-restart` (the `RestartSec=` gap) runs no
//!   `ExecStopPost=` and flushes the store: the workers are left until the next start, whose
//!   sweep kills them (a short `RestartSec=` keeps the window small).
//!
//! # What cannot be recovered
//! * Exit statuses of workers that died while, or before, herdsman was down: PID 1 reaped
//!   them. A re-adopted worker's exit is seen through its pidfd, its status is "unknown".
//! * Output the old supervisor had read but not forwarded (journal or log file).
//! * A worker writing more than a pipe buffer (64 KiB) while herdsman is down blocks in
//!   `write()` until the new supervisor drains the pipe.
//! * Per-worker notify-socket state not in the stored core (a worker that had not sent
//!   `READY=1` must be judged again).
//!
//! Standalone (`herdsman run` outside systemd) nothing is stored and nothing is swept:
//! `PR_SET_PDEATHSIG` takes the workers down with the supervisor, as before.

pub mod cgroup;
pub mod state;
pub mod stop_post;

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};

use crate::notify::Notifier;

#[cfg(test)]
use crate::handoff::MAX_FD_NAME as MAX_NAME;
pub use crate::handoff::STORE_PREFIX as PREFIX;

/// Why a descriptor could not be stored or removed. The caller logs it; nothing panics.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("fd store name {name:?} is invalid: {why}")]
    BadName { name: String, why: &'static str },
    #[error("no service manager to store {name:?} with (NOTIFY_SOCKET is not set)")]
    NoManager { name: String },
    #[error("cannot keep a copy of {name:?} for the fd store while its socket is full: {err}")]
    Copy { name: String, err: io::Error },
}

/// Checks a name as the driver gives it (without [`PREFIX`]): the upgrade's naming rule
/// (`handoff::fd_name_problem`), which leaves room for the prefix.
pub fn validate(name: &str) -> Result<(), StoreError> {
    match crate::handoff::fd_name_problem(name) {
        Some(why) => Err(StoreError::BadName { name: name.to_string(), why }),
        None => Ok(()),
    }
}

/// The `FDSTORE=1` message for `name` (validated, prefixed).
pub fn store_message(name: &str, poll: bool) -> Result<String, StoreError> {
    validate(name)?;
    let mut msg = format!("FDSTORE=1\nFDNAME={PREFIX}{name}");
    if !poll {
        // systemd would drop the fd on POLLHUP (a pipe whose writer died): keep it, so the
        // restarted supervisor can drain a dead worker's last output (and remove it itself).
        msg.push_str("\nFDPOLL=0");
    }
    Ok(msg)
}

/// The `FDSTOREREMOVE=1` message for `name` (validated, prefixed).
pub fn remove_message(name: &str) -> Result<String, StoreError> {
    validate(name)?;
    Ok(format!("FDSTOREREMOVE=1\nFDNAME={PREFIX}{name}"))
}

/// Stores `fd` under `name` (the driver's fd-table name, e.g. `pidfd-0-3-1234`). `poll: false`
/// sends `FDPOLL=0` (systemd keeps the fd even after `POLLHUP`: pipes whose last output must
/// be drained, the state memfds). Through the supervisor's [`Notifier`], so it is ordered with
/// `READY=1` and never dropped when systemd's socket is full (a copy of `fd` waits).
pub fn store(notifier: &Notifier, name: &str, fd: BorrowedFd<'_>, poll: bool) -> Result<(), StoreError> {
    let msg = store_message(name, poll)?;
    if !notifier.is_enabled() {
        return Err(StoreError::NoManager { name: name.to_string() });
    }
    notifier.send_with_fd(&msg, fd).map_err(|err| StoreError::Copy { name: name.to_string(), err })
}

/// Removes what was stored under `name` (a no-op for systemd if nothing was).
pub fn remove(notifier: &Notifier, name: &str) -> Result<(), StoreError> {
    let msg = remove_message(name)?;
    if !notifier.is_enabled() {
        return Err(StoreError::NoManager { name: name.to_string() });
    }
    notifier.send(&msg);
    Ok(())
}

/// The descriptors passed in `LISTEN_FDS`, sorted by name.
#[derive(Debug, Default)]
pub struct Passed {
    /// The socket unit's, with their `LISTEN_FDNAMES` entry, in the order they came.
    pub listeners: Vec<(String, OwnedFd)>,
    /// The ones herdsman stored, keyed by the name it stored them under (without [`PREFIX`]).
    pub stored: BTreeMap<String, OwnedFd>,
}

/// Splits the passed descriptors (fd 3, 4, ... with `names` from `LISTEN_FDNAMES`, matched by
/// position) by name: prefixed names are herdsman's stored fds, everything else the socket
/// unit's. A missing name is `unknown` (a listener). Two stored fds under one name (which
/// systemd does not allow) keep the first; the other is closed.
pub fn split(names: Option<&str>, fds: Vec<OwnedFd>) -> Passed {
    let names: Vec<&str> = names.map(|s| s.split(':').collect()).unwrap_or_default();
    let mut passed = Passed::default();
    for (i, fd) in fds.into_iter().enumerate() {
        let name = names.get(i).copied().filter(|s| !s.is_empty()).unwrap_or("unknown");
        match name.strip_prefix(PREFIX).filter(|n| !n.is_empty()) {
            Some(ours) => {
                if passed.stored.contains_key(ours) {
                    tracing::warn!("the fd store passed {name:?} twice; closing the second");
                    continue;
                }
                passed.stored.insert(ours.to_string(), fd);
            }
            None => passed.listeners.push((name.to_string(), fd)),
        }
    }
    passed
}

/// Whether this process is a systemd unit's own process, exec'd by the service manager
/// (`INVOCATION_ID` set and `SYSTEMD_EXEC_PID` our pid, systemd 248+): then its cgroup is the
/// unit's, and [`sweep_at_start`] may clean it. Not when herdsman is a child of something
/// else in the unit (a shell script), nor standalone, nor in tests.
pub fn is_unit_main(invocation_id: Option<&str>, exec_pid: Option<&str>, our_pid: u32) -> bool {
    invocation_id.is_some_and(|i| !i.trim().is_empty())
        && exec_pid.and_then(|p| p.trim().parse::<u32>().ok()) == Some(our_pid)
}

/// Whether the fd store is in use: the unit asks for it (`HERDSMAN_FD_STORE=1`, which the
/// shipped unit sets along with `KillMode=process` and `ExecStopPost=herdsman stop-post`) and
/// herdsman is the unit's main process ([`is_unit_main`]). Only then does herdsman sweep its
/// cgroup at start and spawn workers without `PR_SET_PDEATHSIG`: any other service that runs
/// herdsman keeps the standalone behaviour.
pub fn in_use(
    fd_store: Option<&str>,
    invocation_id: Option<&str>,
    exec_pid: Option<&str>,
    our_pid: u32,
) -> bool {
    fd_store.map(str::trim) == Some("1") && is_unit_main(invocation_id, exec_pid, our_pid)
}

/// At start, with the fd store in use only ([`in_use`]): SIGKILLs every process of the unit's
/// cgroup except herdsman and what `keep` returns (the re-adopted workers and their families,
/// recomputed on every pass of the sweep): the workers of a run stopped during the restart
/// gap, or anything the fd store lost track of. Bounded (5 s); logs what
/// it did and never fails the start.
pub fn sweep_at_start(keep: &cgroup::Keep<'_>) -> Option<cgroup::Swept> {
    let cg = match cgroup::Cgroup::own() {
        Ok(cg) => cg,
        Err(e) => {
            tracing::warn!("cannot find this service's cgroup to clean it up: {e}");
            return None;
        }
    };
    match cgroup::sweep(&cg, keep, std::time::Duration::from_secs(5)) {
        Ok(swept) => {
            if !swept.killed.is_empty() {
                tracing::warn!(
                    "killed {} process(es) left in {} by a previous run: {:?}",
                    swept.killed.len(),
                    cg.path,
                    swept.killed
                );
            }
            if !swept.left.is_empty() {
                tracing::warn!(
                    "{} process(es) still in {} after SIGKILL: {:?}",
                    swept.left.len(),
                    cg.path,
                    swept.left
                );
            }
            Some(swept)
        }
        Err(e) => {
            tracing::warn!("cannot clean up {}: {e}", cg.path);
            None
        }
    }
}

/// The pid a pidfd refers to (`Pid:` in `/proc/self/fdinfo/N`): `None` if it is not a pidfd
/// or the process was reaped (`-1`). Never trust a pid from a name without its pidfd.
pub fn pidfd_pid(fd: BorrowedFd<'_>) -> Option<i32> {
    use std::os::fd::AsRawFd;
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).ok()?;
    parse_fdinfo_pid(&info)
}

fn parse_fdinfo_pid(info: &str) -> Option<i32> {
    let pid: i32 = info.lines().find_map(|l| l.strip_prefix("Pid:"))?.trim().parse().ok()?;
    (pid > 0).then_some(pid)
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixDatagram;

    use super::*;

    #[test]
    fn names_are_checked_as_systemd_does_prefix_included() {
        assert!(validate("pidfd-0-3-1234").is_ok());
        assert!(validate(&"x".repeat(MAX_NAME - PREFIX.len())).is_ok());
        for bad in
            ["", "a:b", "tab\there", "new\nline", "caf\u{e9}", &"x".repeat(MAX_NAME - PREFIX.len() + 1)]
        {
            let e = validate(bad).unwrap_err();
            assert!(e.to_string().starts_with("fd store name "), "{e}");
        }
        assert_eq!(store_message("out-1-2-3", true).unwrap(), "FDSTORE=1\nFDNAME=herdsman.out-1-2-3");
        assert_eq!(store_message("state-a", false).unwrap(), "FDSTORE=1\nFDNAME=herdsman.state-a\nFDPOLL=0");
        assert_eq!(remove_message("out-1-2-3").unwrap(), "FDSTOREREMOVE=1\nFDNAME=herdsman.out-1-2-3");
        assert!(store_message("a\nFDSTOREREMOVE=1", true).is_err(), "no injection through a name");
    }

    fn pipe() -> OwnedFd {
        crate::sys::pipe_cloexec().unwrap().0
    }

    #[test]
    fn passed_fds_are_split_by_name_never_by_order() {
        let fds = (0..5).map(|_| pipe()).collect::<Vec<_>>();
        let raws: Vec<i32> = fds.iter().map(std::os::fd::AsRawFd::as_raw_fd).collect();
        let names = "herdsman.out-1-2-100:herdsman@web.socket:herdsman.pidfd-1-2-100:http:herdsman.state-a";
        let p = split(Some(names), fds);
        let listeners: Vec<(&str, i32)> =
            p.listeners.iter().map(|(n, f)| (n.as_str(), std::os::fd::AsRawFd::as_raw_fd(f))).collect();
        assert_eq!(listeners, vec![("herdsman@web.socket", raws[1]), ("http", raws[3])]);
        let stored: Vec<(&str, i32)> =
            p.stored.iter().map(|(n, f)| (n.as_str(), std::os::fd::AsRawFd::as_raw_fd(f))).collect();
        assert_eq!(stored, vec![("out-1-2-100", raws[0]), ("pidfd-1-2-100", raws[2]), ("state-a", raws[4])]);
    }

    #[test]
    fn missing_empty_or_duplicate_names() {
        let p = split(None, vec![pipe(), pipe()]);
        assert_eq!(p.listeners.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["unknown", "unknown"]);
        let p = split(Some("::herdsman.:herdsman.x:herdsman.x"), (0..5).map(|_| pipe()).collect());
        assert_eq!(
            p.listeners.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
            ["unknown", "unknown", "herdsman."]
        );
        assert_eq!(p.stored.keys().collect::<Vec<_>>(), ["x"]);
    }

    #[test]
    fn only_the_units_own_main_process_sweeps() {
        assert!(is_unit_main(Some("0123abcd"), Some("42"), 42));
        assert!(!is_unit_main(Some("0123abcd"), Some("41"), 42), "a child of the unit's process");
        assert!(!is_unit_main(None, Some("42"), 42), "not a unit");
        assert!(!is_unit_main(Some(""), Some("42"), 42));
        assert!(!is_unit_main(Some("0123abcd"), None, 42), "systemd before 248");
    }

    #[test]
    fn the_fd_store_is_used_only_when_the_unit_asks_for_it() {
        let unit = (Some("0123abcd"), Some("42"));
        assert!(in_use(Some("1"), unit.0, unit.1, 42));
        assert!(!in_use(None, unit.0, unit.1, 42), "a unit that does not ask (not the shipped one)");
        assert!(!in_use(Some("0"), unit.0, unit.1, 42));
        assert!(!in_use(Some(""), unit.0, unit.1, 42));
        assert!(!in_use(Some("1"), None, Some("42"), 42), "standalone, the variable inherited");
        assert!(!in_use(Some("1"), unit.0, Some("41"), 42), "a child of the unit's process");
    }

    #[test]
    fn fdinfo_pid() {
        assert_eq!(
            parse_fdinfo_pid("pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1\nPid:\t4242\n"),
            Some(4242)
        );
        assert_eq!(parse_fdinfo_pid("Pid:\t-1\n"), None);
        assert_eq!(parse_fdinfo_pid("pos:\t0\n"), None);
        let me = crate::sys::pidfd_open(std::process::id() as i32).unwrap();
        assert_eq!(pidfd_pid(me.as_fd()), Some(std::process::id() as i32));
        assert_eq!(pidfd_pid(pipe().as_fd()), None);
    }

    #[test]
    fn a_full_manager_socket_keeps_the_fd_and_the_order() {
        use nix::sys::socket::{setsockopt, sockopt};
        let dir = crate::scratch::Scratch::new("fdstore-full");
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        rx.set_nonblocking(true).unwrap();
        setsockopt(&rx, sockopt::RcvBuf, &1024).unwrap();
        let n = Notifier::new(path.to_str()).unwrap();
        let mut i = 0;
        while !n.has_backlog() {
            assert!(i < 100_000, "the socket never filled up");
            n.send(&format!("EXTEND_TIMEOUT_USEC={i}\nX-FILLER={i}"));
            i += 1;
        }
        let (r, w) = crate::sys::pipe_cloexec().unwrap();
        store(&n, "out-0-1-7", r.as_fd(), true).unwrap();
        drop(r); // the waiting message holds its own copy
        n.send("READY=1");
        let mut got = Vec::new();
        loop {
            let mut more = false;
            while let Ok((msg, fds)) = crate::sys::recv_with_fds(&rx) {
                got.push((msg, fds));
                more = true;
            }
            let waiting = n.flush();
            if !more && !waiting {
                break;
            }
        }
        let at = |m: &str| got.iter().position(|(g, _)| g == m);
        let (stored, ready) = (at("FDSTORE=1\nFDNAME=herdsman.out-0-1-7"), at("READY=1"));
        assert!(stored.is_some() && ready.is_some() && stored < ready, "order kept: {stored:?} {ready:?}");
        let fds = &got[stored.unwrap()].1;
        assert_eq!(fds.len(), 1);
        // It is the pipe: writing to the other end makes it readable.
        use std::io::{Read, Write};
        std::fs::File::from(w).write_all(b"x").unwrap();
        let mut one = [0u8; 1];
        std::fs::File::from(fds[0].try_clone().unwrap()).read_exact(&mut one).unwrap();
        assert_eq!(&one, b"x");
    }

    #[test]
    fn a_stored_fd_arrives_with_its_name_and_the_same_file() {
        use std::io::{Read, Write};
        let dir = crate::scratch::Scratch::new("fdstore-send");
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::new(path.to_str()).unwrap();
        let (r, w) = crate::sys::pipe_cloexec().unwrap();
        store(&n, "out-0-1-42", r.as_fd(), false).unwrap();
        remove(&n, "out-0-1-42").unwrap();
        let (msg, mut fds) = crate::sys::recv_with_fds(&rx).unwrap();
        assert_eq!(msg, "FDSTORE=1\nFDNAME=herdsman.out-0-1-42\nFDPOLL=0");
        assert_eq!(fds.len(), 1, "one fd per message");
        let mut wf = std::fs::File::from(w);
        wf.write_all(b"hi").unwrap();
        drop(wf);
        let mut s = String::new();
        std::fs::File::from(fds.remove(0)).read_to_string(&mut s).unwrap();
        assert_eq!(s, "hi", "the received fd is the pipe's read end");
        let mut buf = [0u8; 128];
        let k = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..k], b"FDSTOREREMOVE=1\nFDNAME=herdsman.out-0-1-42");
        let off = Notifier::disabled();
        assert!(matches!(store(&off, "x", r.as_fd(), true), Err(StoreError::NoManager { .. })));
        assert!(matches!(remove(&n, "a:b"), Err(StoreError::BadName { .. })));
    }
}
