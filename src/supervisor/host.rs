//! What the supervisor's state machine does to the world, behind one trait: start a worker,
//! watch it, signal it, reap it, sample its memory, read the clock.
//!
//! [`RealHost`] does it for real (fork/exec through [`Launcher`], pidfds, `/proc`).
//! The in-process test tier (`supervisor/tests.rs`) runs the same loop logic on a fake host
//! that forks nothing: it hands out made-up pids, records every effect (spawn, signal, reap)
//! and owns a clock the test moves by hand. Exits and notify messages are then fed to the
//! supervisor as the events they would have been.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Instant;

use nix::sys::signal::Signal;
use nix::sys::wait::{Id, WaitPidFlag, waitid};
use tokio::sync::mpsc;

use super::Event;
use crate::spawn::{Launched, Launcher, SpawnError, Spec};
use crate::worker::Worker;

pub(crate) trait Host {
    /// The loop's clock: every deadline is computed from it.
    fn now(&self) -> Instant;
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
    /// Reports the worker's exit as an [`Event::Exited`] once it happens.
    fn watch(
        &mut self,
        pid: i32,
        pidfd: Arc<OwnedFd>,
        output_done: mpsc::Receiver<()>,
        events: &mpsc::UnboundedSender<Event>,
    );
    /// Sends `sig` to the worker and, with `group`, to its whole process group.
    fn signal(&mut self, w: &Worker, sig: Signal, group: bool);
    /// Sends `message` (a JSON string) on the worker's IPC channel; an error when it has
    /// none or the worker closed it.
    fn message(&mut self, w: &Worker, message: &str) -> std::io::Result<()>;
    /// Reaps an exited worker (after its exit event).
    fn reap(&mut self, w: &Worker);
    /// Resident memory of each worker's process group, in bytes.
    fn memory(&mut self, pids: &[i32]) -> HashMap<i32, u64>;
}

/// The host of a real supervisor.
pub(crate) struct RealHost;

impl Host for RealHost {
    fn now(&self) -> Instant {
        Instant::now()
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
    ) {
        super::exits::watch_exit(pid, pidfd, output_done, events.clone());
    }

    fn signal(&mut self, w: &Worker, sig: Signal, group: bool) {
        w.signal(sig, group);
    }

    fn message(&mut self, w: &Worker, message: &str) -> std::io::Result<()> {
        match &w.channel {
            Some(c) => crate::ipc::send(c, message),
            None => Err(std::io::Error::new(std::io::ErrorKind::NotConnected, "it has no IPC channel")),
        }
    }

    fn reap(&mut self, w: &Worker) {
        if let Err(e) = waitid(Id::PIDFd(w.pidfd.as_fd()), WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG) {
            tracing::debug!("reaping worker {}: {e}", w.pid);
        }
    }

    fn memory(&mut self, pids: &[i32]) -> HashMap<i32, u64> {
        crate::procstat::scan_groups(pids).into_iter().map(|(pid, u)| (pid, u.rss_bytes)).collect()
    }
}
