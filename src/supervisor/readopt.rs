//! A supervisor that systemd restarted after a crash takes its workers back (issue 26): the
//! state document from the state memfd, the descriptors from the fd store, through the same
//! restore as an in-place upgrade ([`super::handover`]). What differs from an upgrade is
//! decided here:
//!
//! * before the restore ([`prepare`]), the driver checks each stored worker against what the
//!   store passed back: a worker without its pidfd (or with another process's, or one that
//!   says it exited) died while herdsman was down and is taken out of the core, to be
//!   reported as an exit of unknown status once the loop runs; every other is marked [`Worker::readopted`] (it is not this
//!   process's child: PID 1 reaps it, its exit status will be unknown too);
//! * after it ([`Supervisor::readopted`]): systemd waits for `READY=1` from the new main
//!   process (sent once every slot is ready again, the sweep done and missing slots started),
//!   a roll-out the crash interrupted is aborted and its moved slots rolled back (its
//!   client is gone; `last_reload` says so), and the lost workers' exits go to the core.
//!
//! Deadlines the down time ate: the state document is written at most once a second and the
//! time herdsman was down passes on every stored clock, so a re-adopted worker's `last_ping`
//! becomes at least now (one full watchdog interval of grace: it could not be heard while
//! nobody read the notify socket), and a Starting worker's ready deadline at least
//! [`READY_GRACE`] from now (its `READY=1` may wait, unread, in the stored notify socket).
//! A stop timer (`Stopping`) is left as it was: the worker was told to stop, its time ran.
//!
//! A re-adopted worker is not this process's child: PID 1 reaps it the moment it exits, so its
//! pid, and so its process group id, may be reused at once. Its group is never signalled by
//! pgid once its pidfd is readable (`host::group_signal_allowed`), and what it leaves in its
//! group is killed through the cgroup (`exits::kill_group_members`).

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;

use super::command::Command;
use super::document::fd_name;
use super::rollout::{Purpose, ReloadFailure};
use super::{Core, Supervisor};
use crate::config::OnFailure;
use crate::worker::{Role, Worker};

/// How a re-adopted worker ended, as every exit report says it.
pub(crate) const UNKNOWN_EXIT: &str =
    "exited with status unknown (re-adopted after a supervisor restart: PID 1 reaped it)";

/// The least time a re-adopted Starting worker has left to become ready (see the module doc).
pub(crate) const READY_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// What the driver found out about the stored workers before the restore.
#[derive(Debug, Default)]
pub struct Readopt {
    /// Workers that died while herdsman was down (their pidfd gone from the store).
    lost: Vec<Worker>,
    /// The pids of the workers re-adopted.
    live: BTreeSet<i32>,
}

impl Readopt {
    /// The pids of the re-adopted workers (what a sweep of the cgroup must keep).
    pub fn live(&self) -> &BTreeSet<i32> {
        &self.live
    }

    /// How many workers died while herdsman was down.
    #[cfg(test)]
    pub fn lost(&self) -> usize {
        self.lost.len()
    }
}

impl Core {
    /// Whether the core was stopping (a state written during a stop is not resumed).
    pub fn is_stopping(&self) -> bool {
        self.stopping
    }
}

/// Checks every worker of `core` against the descriptors the store passed back (`fds`, by
/// name) and makes the two agree, so that the upgrade's restore takes them all: a worker whose
/// pidfd is missing, names another process or says it exited (or was reaped) is lost (taken out of the core, its other
/// descriptors closed); a live one whose output pipe is missing gets one at end of file, one
/// whose IPC channel or bind filter descriptor is missing goes on without it.
pub fn prepare(core: &mut Core, fds: &mut BTreeMap<String, OwnedFd>) -> Readopt {
    prepare_with(core, fds, pidfd_alive)
}

/// Whether `pidfd` is the pidfd of the live process `pid`: it names `pid` (a reaped
/// process's names none) and is not readable (an exited one's is). Only such a worker is
/// re-adopted and kept by the cgroup's sweep.
pub fn pidfd_alive(pidfd: BorrowedFd<'_>, pid: i32) -> bool {
    crate::fdstore::pidfd_pid(pidfd) == Some(pid) && !super::exits::pidfd_exited(pidfd)
}

/// [`prepare`], with `alive` saying whether a stored pidfd is that of the live worker `pid`.
pub(crate) fn prepare_with(
    core: &mut Core,
    fds: &mut BTreeMap<String, OwnedFd>,
    alive: impl Fn(BorrowedFd<'_>, i32) -> bool,
) -> Readopt {
    let mut out = Readopt::default();
    let pids: Vec<i32> = core.pool.workers().keys().copied().collect();
    for pid in pids {
        let Some(w) = core.pool.worker_mut(pid) else { continue };
        w.readopted = true;
        let (slot, generation) = (w.slot, w.spec.generation);
        let name = |kind: &str| fd_name(kind, slot, generation, pid);
        // Never trust the pid in a name: the pidfd says which process it is, and whether it
        // still runs (exited or reaped by PID 1: lost, never in the sweep's keep set).
        let alive = fds.get(&name("pidfd")).is_some_and(|fd| alive(fd.as_fd(), pid));
        if !alive {
            for kind in ["pidfd", "out", "err", "ipc", "bind"] {
                fds.remove(&name(kind));
            }
            if let Some(w) = core.pool.remove_worker(pid) {
                tracing::warn!(
                    worker_id = slot,
                    worker_pid = pid,
                    worker_generation = generation,
                    "worker {slot} (pid {pid}) died while herdsman was down (its pidfd is gone from the fd store or says it exited)"
                );
                out.lost.push(w);
            }
            continue;
        }
        for kind in ["out", "err"] {
            if let std::collections::btree_map::Entry::Vacant(e) = fds.entry(name(kind)) {
                tracing::warn!(
                    worker_id = slot,
                    worker_pid = pid,
                    "worker {slot} (pid {pid}): its {kind} pipe is not in the fd store; its output is lost"
                );
                // A pipe at end of file: the output reader ends at once.
                match crate::sys::pipe_cloexec() {
                    Ok((r, _w)) => {
                        e.insert(r);
                    }
                    Err(err) => tracing::warn!("cannot make a pipe: {err}"),
                }
            }
        }
        if w.has_channel && !fds.contains_key(&name("ipc")) {
            w.has_channel = false;
        }
        if w.intercepted && !fds.contains_key(&name("bind")) {
            w.intercepted = false;
        }
        out.live.insert(pid);
    }
    out
}

impl Supervisor {
    /// The restore after a crash is done (the workers watched again): what differs from an
    /// upgrade's resume.
    pub(super) fn readopted(&mut self, ro: Readopt) {
        let (now, unix) = (self.now(), self.unix_now());
        // A new main process: systemd waits for its READY=1, sent once the pool is settled.
        self.core.manager.sent_ready = false;
        // The down time is no worker's fault (see the module doc).
        let pids: Vec<i32> = ro.live.iter().copied().collect();
        for pid in pids {
            let Some(w) = self.core.pool.worker_mut(pid) else { continue };
            w.last_ping = w.last_ping.max(now);
            if let crate::worker::State::Starting { deadline } = &mut w.state {
                *deadline = (*deadline).max(now + READY_GRACE);
            }
        }
        tracing::warn!(
            "restarted after a crash: re-adopted {} worker(s) from the fd store, {} died meanwhile",
            ro.live.len(),
            ro.lost.len()
        );
        let mut commands = Vec::new();
        let interrupted =
            matches!(self.core.rollouts.current.as_ref().map(|r| &r.purpose), Some(Purpose::Reload));
        if interrupted {
            // One version at the end: the moved slots roll back, whatever `on_failure` says.
            tracing::warn!("a reload was in progress when herdsman crashed: rolling it back");
            commands.extend(self.core.rollouts.fail(
                ReloadFailure::Interrupted,
                &mut self.core.pool,
                OnFailure::Rollback,
                self.core.stopping,
                now,
                unix,
            ));
        }
        // Their clients died with the previous process.
        commands.extend(self.core.rollouts.drop_queued(self.core.pool.spec().generation));
        for mut w in ro.lost {
            if interrupted && w.role == Role::Candidate {
                w.role = Role::Retired;
            }
            let status = WaitStatus::Exited(Pid::from_raw(w.pid), -1);
            commands.extend(self.core.on_exit(w, status, &[], now, unix));
        }
        // READY=1 comes from the manager once every slot is ready, not from the abort.
        commands.retain(|c| !matches!(c, Command::Notify(m) if m == "READY=1"));
        self.apply(commands);
        // A slot without a worker is judged again: READY=1 waits for its new one.
        let empty: Vec<usize> =
            self.core.pool.slots().iter().filter(|(_, s)| s.active.is_none()).map(|(id, _)| *id).collect();
        for id in empty {
            if let Some(slot) = self.core.pool.slot_mut(id) {
                slot.settled = false;
            }
        }
    }
}
