//! The world the loop acts on: the host (processes and the clock), the launcher, the listening
//! sockets and their steering, the workers' notify socket, the metrics records, and the
//! channel on which exits come back.
//!
//! The parts decide; the driver carries their decisions out through this part. It keeps
//! what must stay consistent with the processes: a worker's steered sockets are reserved
//! before its launch and bound to its pid after, released when it is gone.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use nix::sys::signal::Signal;
use tokio::sync::mpsc;

use super::Event;
use super::host::Host;
use crate::config::StopSignal;
use crate::listeners::Listeners;
use crate::notify::WorkerNotify;
use crate::spawn::{Launcher, SpawnError, Spec};
use crate::steer::Steering;
use crate::worker::Worker;

pub(super) struct Outside {
    /// Everything the loop does to processes and the clock it reads (see `host`).
    pub host: Box<dyn Host>,
    pub launcher: Launcher,
    pub listeners: Listeners,
    /// Per-worker sockets and the routing program, with `--balance steer|sticky`.
    pub steering: Option<Steering>,
    /// Copies of the shared listening sockets (for their accept-queue length in `status`).
    pub shared_sockets: Vec<std::os::fd::OwnedFd>,
    /// The addresses served, for the log and `status`.
    pub sockets: Vec<String>,
    /// What herdsman tells its own service manager goes out here (`Manager` decides).
    pub notifier: crate::notify::Notifier,
    /// The workers' notify socket (also read by the loop itself).
    pub notify: Arc<WorkerNotify>,
    /// Where the loop records what happens, for the metrics endpoint.
    pub metrics: crate::metrics::Metrics,
    /// Where exits (and the upgrade check) are reported to the loop.
    pub events: mpsc::UnboundedSender<Event>,
    /// Started without a socket (no `--listen`, not socket-activated) but with bind
    /// interception: the address is learned from the first worker's own bind (see `intercept`).
    learner: Option<Arc<crate::intercept::Learner>>,
    /// The addresses learned that way, for `status` (`learned_sockets`).
    pub learned: Vec<String>,
    /// The bind filters' table of the shared sockets (see `watch_binds`), built once.
    shared_table: Option<Arc<crate::intercept::Sockets>>,
    /// Every live worker's descriptors, by pid: the one table of per-worker resources (the
    /// core's `Worker` is plain data). An upgrade hands these over by name (see `fd_table`).
    pub fds: HashMap<i32, WorkerFds>,
}

/// One worker's resources, owned by the driver.
#[derive(Debug)]
pub(crate) struct WorkerFds {
    pub pidfd: Arc<OwnedFd>,
    /// What it printed last (shared with its output readers), for failure reports.
    pub tail: crate::output::Tail,
    /// The read ends of its stdout and stderr pipes (shared with their readers).
    pub pipes: [Arc<OwnedFd>; 2],
    /// The supervisor's end of its Node IPC channel (see `ipc`), to send PM2's `shutdown`;
    /// `None` for other programs.
    pub channel: Option<Arc<OwnedFd>>,
    /// Its bind filter's notification descriptor (see `intercept`); `None` without
    /// interception.
    pub bind_notify: Option<Arc<OwnedFd>>,
    /// Re-adopted after a supervisor restart (`Worker::readopted`): not our child, so PID 1
    /// reaps it the moment it exits and its pid (its pgid) may be reused at once; no group
    /// signal by pgid once its pidfd is readable (see [`super::host::group_signal_allowed`]).
    pub readopted: bool,
}

impl Outside {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        host: Box<dyn Host>,
        notifier: crate::notify::Notifier,
        launcher: Launcher,
        listeners: Listeners,
        steering: Option<Steering>,
        notify: Arc<WorkerNotify>,
        metrics: crate::metrics::Metrics,
        events: mpsc::UnboundedSender<Event>,
    ) -> anyhow::Result<Outside> {
        let sockets = match &steering {
            Some(st) => st.addrs(),
            None => listeners.addrs(),
        };
        let shared_sockets = if steering.is_none() {
            listeners.copies()?.into_iter().map(|(_, _, fd)| fd).collect()
        } else {
            Vec::new()
        };
        let learner = (listeners.is_empty() && steering.is_none() && launcher.intercepts_binds())
            .then(|| Arc::new(crate::intercept::Learner::default()));
        Ok(Outside {
            learner,
            learned: listeners.learned_addrs(),
            shared_table: None,
            fds: HashMap::new(),
            notifier,
            host,
            launcher,
            listeners,
            steering,
            shared_sockets,
            sockets,
            notify,
            metrics,
            events,
        })
    }

    /// Starts a worker of `spec` for slot `id` (on its own steered sockets, if steered),
    /// watches it for its exit and keeps its descriptors; returns its pid.
    pub fn launch(&mut self, id: usize, spec: &Spec) -> Result<i32, SpawnError> {
        let metrics_socket = self.metrics.socket_for(id, spec.user.as_ref().map(|u| (u.uid, u.gid)));
        let (l, fds) = match &mut self.steering {
            None => (
                self.host.launch(&self.launcher, spec, id, None, metrics_socket.as_deref())?,
                self.listeners.raw_fds(),
            ),
            Some(st) => {
                let picked = st.reserve(id)?;
                let fds = st.fds(&picked);
                match self.host.launch(&self.launcher, spec, id, Some(&fds), metrics_socket.as_deref()) {
                    Ok(l) => {
                        st.bind(&picked, l.pid);
                        (l, fds)
                    }
                    Err(e) => {
                        st.unreserve(&picked);
                        return Err(e);
                    }
                }
            }
        };
        self.metrics.launched(l.pid, id, metrics_socket);
        let pidfd = Arc::new(l.pidfd);
        self.host.watch(l.pid, pidfd.clone(), l.output_done, &self.events, false);
        let channel = l.channel.map(Arc::new);
        if let Some(c) = &channel {
            listen_to(l.pid, c.clone(), &self.events);
        }
        let bind_notify = l.bind_notify.map(Arc::new);
        if let Some(n) = &bind_notify {
            self.watch_binds(l.pid, n.clone(), &fds, spec.user.as_ref().map(|u| (u.uid, u.gid)));
        }
        self.fds.insert(
            l.pid,
            WorkerFds { pidfd, tail: l.tail, pipes: l.pipes, channel, bind_notify, readopted: false },
        );
        Ok(l.pid)
    }

    /// Answers `pid`'s trapped `bind()`/`listen()` calls with `fds` (its sockets) and reports
    /// what it saw to the loop (see `intercept`).
    /// `owner`: the worker's user and group (`--user`), as which its `/proc` entries are read.
    pub fn watch_binds(
        &mut self,
        pid: i32,
        listener: Arc<std::os::fd::OwnedFd>,
        fds: &[std::os::fd::RawFd],
        owner: Option<(u32, u32)>,
    ) {
        let sockets = if self.steering.is_some() {
            Arc::new(crate::intercept::Sockets::of(fds, None))
        } else {
            // Shared sockets: one table (one copy of each socket) for every worker.
            let learner = if fds.is_empty() { self.learner.clone() } else { None };
            self.shared_table
                .get_or_insert_with(|| Arc::new(crate::intercept::Sockets::of(fds, learner)))
                .clone()
        };
        let events = self.events.clone();
        crate::intercept::watch(listener, sockets, owner, move |seen| {
            let _ = events.send(Event::Intercepted { pid, seen });
        });
    }

    /// Sends `sig` to worker `pid` (with `group`, to its process group too).
    pub fn signal(&mut self, pid: i32, sig: Signal, group: bool) {
        match self.fds.get(&pid) {
            Some(fds) => self.host.signal(pid, fds, sig, group),
            None => tracing::debug!("signal {sig} to {pid}: it is gone"),
        }
    }

    /// Asks `w` to stop: its stop signal, or PM2's `shutdown` message over its IPC channel
    /// (`--stop-signal message`). A worker whose channel is closed (it disconnected) gets
    /// SIGTERM instead, with one line saying so.
    pub fn ask_to_stop(&mut self, w: &Worker) {
        let sig = match w.spec.stop_signal {
            StopSignal::Signal(sig) => sig,
            StopSignal::Message => match self.message(w.pid, crate::ipc::SHUTDOWN) {
                Ok(()) => return,
                Err(e) => {
                    w.span().in_scope(|| tracing::warn!("worker {} (pid {}): cannot send the shutdown message ({e}): sending SIGTERM instead", w.slot, w.pid));
                    Signal::SIGTERM
                }
            },
        };
        self.signal(w.pid, sig, false);
    }

    fn message(&mut self, pid: i32, message: &str) -> std::io::Result<()> {
        match self.fds.get(&pid) {
            Some(fds) => self.host.message(pid, fds, message),
            None => Err(std::io::Error::new(std::io::ErrorKind::NotConnected, "it is gone")),
        }
    }

    /// Keeps the socket herdsman bound for a worker's own bind when it had none: every later
    /// worker gets it at fd 3 (`LISTEN_FDS=1`), `status` shows it, upgrades carry it.
    pub fn adopt_learned(&mut self, l: crate::listeners::Listener) {
        let addr = l.addr.clone();
        let name = crate::listeners::LEARNED;
        let copy = l.copy();
        match self.listeners.learned(l) {
            Ok(raw) => {
                self.launcher.add_socket(raw, name);
                self.sockets.push(addr.clone());
                self.shared_sockets.extend(copy.ok());
                tracing::info!(
                    "serving {addr}, the address the first worker bound (no --listen): every worker gets this socket"
                );
                self.learned.push(addr);
                // Later workers get it at fd 3 and their own table.
                self.shared_table = None;
            }
            Err(e) => tracing::error!("cannot keep the learned socket {addr}: {e}"),
        }
    }

    /// The sockets worker `pid` was given (its steered members, else the shared ones).
    pub fn fds_of(&self, pid: i32) -> Vec<std::os::fd::RawFd> {
        match &self.steering {
            Some(st) => st.fds_of(pid),
            None => self.listeners.raw_fds(),
        }
    }

    /// Lets new connections reach `pid` (or stops them), with steered sockets.
    pub fn steer_receiving(&mut self, pid: i32, receiving: bool) {
        if let Some(st) = &mut self.steering {
            if let Err(e) = st.set_receiving(pid, receiving) {
                tracing::error!("steering: {e}");
            }
        }
    }

    /// Whether `pid` receives new connections on its steered sockets.
    pub fn is_receiving(&self, pid: i32) -> bool {
        self.steering.as_ref().is_some_and(|st| st.is_receiving(pid))
    }

    /// Connections waiting in `pid`'s own accept queue (steered sockets only).
    pub fn queued(&self, pid: i32) -> u32 {
        self.steering.as_ref().map_or(0, |st| st.queued(pid))
    }

    /// Whether `pid`'s sockets hold the connections parked for the next start.
    pub fn holds_parking(&self, pid: i32) -> bool {
        self.steering.as_ref().is_some_and(|st| st.holds_parking(pid))
    }

    /// Frees an exited worker's steered sockets and hands back its descriptors (to reap it
    /// and read its last output).
    pub fn release(&mut self, pid: i32) -> Option<WorkerFds> {
        if let Some(st) = &mut self.steering {
            if let Err(e) = st.release(pid) {
                tracing::error!("steering: {e}");
            }
        }
        self.fds.remove(&pid)
    }

    /// The wanted number of workers; sticky steering hashes clients over that many slots.
    pub fn set_slots(&mut self, n: usize) {
        if let Some(st) = &mut self.steering {
            if let Err(e) = st.set_slots(n) {
                tracing::error!("steering: {e}");
            }
        }
    }
}

/// Reads a Node worker's IPC channel until it closes; what the worker says becomes an
/// [`Event::Channel`]. Also started for the workers a new image takes over in an upgrade.
pub(super) fn listen_to(pid: i32, channel: Arc<std::os::fd::OwnedFd>, events: &mpsc::UnboundedSender<Event>) {
    let events = events.clone();
    tokio::spawn(crate::ipc::read(channel, move |msg| {
        let _ = events.send(Event::Channel { pid, msg });
    }));
}
