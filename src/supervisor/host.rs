//! What the supervisor's state machine does to the world, behind one trait: start a worker,
//! watch it, signal it, reap it, sample its memory, read the clock.
//!
//! [`RealHost`] does it for real (fork/exec through [`Launcher`], pidfds, `/proc`).
//! The in-process test tier (`supervisor/tests.rs`) runs the same loop logic on a fake host
//! that forks nothing: it hands out made-up pids, records every effect (spawn, signal, reap)
//! and owns a clock the test moves by hand. Exits and notify messages are then fed to the
//! supervisor as the events they would have been.

use crate::mono::Mono;
use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::sync::Arc;

use nix::sys::signal::Signal;
use nix::sys::wait::{Id, WaitPidFlag, waitid};
use tokio::sync::mpsc;

use super::Event;
use super::outside::WorkerFds;
use crate::spawn::{Launched, Launcher, SpawnError, Spec};

pub(crate) trait Host {
    /// The loop's clock: every deadline is computed from it.
    fn now(&self) -> Mono;
    /// The wall clock, in seconds since the epoch (for `last_reload.at`).
    fn unix_now(&self) -> u64;
    /// Starts a worker of `spec` in `slot`; `fds`: its own steered sockets (else the shared
    /// ones); `metrics`: its `HERDSMAN_METRICS_SOCKET`.
    fn launch(
        &mut self,
        launcher: &Launcher,
        spec: &Spec,
        slot: usize,
        fds: Option<&[RawFd]>,
        metrics: Option<&str>,
    ) -> Result<Launched, SpawnError>;
    /// Reports the worker's exit as an [`Event::Exited`] once it happens. `readopted`: not
    /// our child (`Worker::readopted`), what is left of its group is found through the cgroup,
    /// never by pgid (see `supervisor::exits`).
    fn watch(
        &mut self,
        pid: i32,
        pidfd: Arc<OwnedFd>,
        output_done: mpsc::Receiver<()>,
        events: &mpsc::UnboundedSender<Event>,
        readopted: bool,
    );
    /// Sends `sig` to the worker `pid` (through its pidfd in `fds`) and, with `group`, to its
    /// whole process group.
    fn signal(&mut self, pid: i32, fds: &WorkerFds, sig: Signal, group: bool);
    /// Sends `message` (a JSON string) on the worker's IPC channel; an error when it has
    /// none or the worker closed it.
    fn message(&mut self, pid: i32, fds: &WorkerFds, message: &str) -> std::io::Result<()>;
    /// Reaps an exited worker (after its exit event).
    fn reap(&mut self, pid: i32, fds: &WorkerFds);
    /// Resident memory of each worker's process group, in bytes.
    fn memory(&mut self, pids: &[i32]) -> HashMap<i32, u64>;
}

/// Whether the worker's process group may be signalled by pgid now. Always for our own
/// children (unreaped until their exit event, so the pgid cannot be reused). A re-adopted
/// worker (after a supervisor restart) is reaped by PID 1 the moment it exits, after which its
/// pid, and so its pgid, can name a foreign group at once: only while its pidfd is not
/// readable (checked right before the signal; what is left of its group after its exit is
/// killed by `supervisor::exits`, through the cgroup).
pub(crate) fn group_signal_allowed(fds: &WorkerFds) -> bool {
    !fds.readopted || !super::exits::pidfd_exited(fds.pidfd.as_fd())
}

/// The host of a real supervisor.
pub(crate) struct RealHost;

impl Host for RealHost {
    fn now(&self) -> Mono {
        Mono::now()
    }

    fn unix_now(&self) -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
    }

    fn launch(
        &mut self,
        launcher: &Launcher,
        spec: &Spec,
        slot: usize,
        fds: Option<&[RawFd]>,
        metrics: Option<&str>,
    ) -> Result<Launched, SpawnError> {
        match fds {
            Some(fds) => launcher.launch_with(spec, slot, fds, metrics),
            None => launcher.launch(spec, slot, metrics),
        }
    }

    fn watch(
        &mut self,
        pid: i32,
        pidfd: Arc<OwnedFd>,
        output_done: mpsc::Receiver<()>,
        events: &mpsc::UnboundedSender<Event>,
        readopted: bool,
    ) {
        super::exits::watch_exit(pid, pidfd, output_done, events.clone(), readopted);
    }

    /// The only way the supervisor signals a worker. The leader is signalled through its
    /// pidfd; the group by pgid, which is safe because a worker stays in the supervisor's
    /// table only until it is reaped, and the supervisor reaps it only after its exit event
    /// (see `supervisor::exits`): until then its pid, and so its pgid, cannot be reused.
    /// A re-adopted worker is not our child: see [`group_signal_allowed`].
    fn signal(&mut self, pid: i32, fds: &WorkerFds, sig: Signal, group: bool) {
        if let Err(e) = crate::sys::pidfd_signal(&fds.pidfd, sig as i32) {
            tracing::debug!("signal {sig} to {pid}: {e}");
        }
        if group && group_signal_allowed(fds) {
            let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), sig);
        }
    }

    fn message(&mut self, _pid: i32, fds: &WorkerFds, message: &str) -> std::io::Result<()> {
        match &fds.channel {
            Some(c) => crate::ipc::send(c, message),
            None => Err(std::io::Error::new(std::io::ErrorKind::NotConnected, "it has no IPC channel")),
        }
    }

    fn reap(&mut self, pid: i32, fds: &WorkerFds) {
        if let Err(e) = waitid(Id::PIDFd(fds.pidfd.as_fd()), WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG) {
            tracing::debug!("reaping worker {pid}: {e}");
        }
    }

    fn memory(&mut self, pids: &[i32]) -> HashMap<i32, u64> {
        crate::procstat::scan_groups(pids).into_iter().map(|(pid, u)| (pid, u.rss_bytes)).collect()
    }
}
