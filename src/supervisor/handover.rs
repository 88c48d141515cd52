//! The loop's side of an in-place upgrade (see `crate::upgrade` for the whole protocol): when
//! an upgrade may start, the check, the exec, and the supervisor's part of the state.
//!
//! The part: [`Upgrades`] holds the upgrade asked for, the reloads deferred behind it, the
//! count of upgrades so far and what an upgrade carries that the loop does not own. Writing
//! the state and taking it over reads every other part (that is what a handover is), so
//! those stay on `Supervisor`.

use super::clock::Mono;
use std::collections::{BTreeMap, HashMap};
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;

use super::pool::Slot;
use super::{Event, Supervisor};
use crate::control::protocol::{ReloadOutcome, UpgradeDone};
use crate::requests::Waiter;
use crate::spawn::Spec;
use crate::sys::HandedOver;
use crate::upgrade::{
    self, Candidate, Carry, Clock, Exporter, Handover, SlotState, SupervisorState, UpgradeError, WorkerPhase,
    WorkerRecord,
};
use crate::worker::Worker;

/// How long the loop lets its tasks write the last answers before `execve`.
const FLUSH: Duration = Duration::from_millis(50);

/// The upgrade part.
pub(super) struct Upgrades {
    /// An in-place upgrade that was asked for and has not ended.
    pending: Option<Pending>,
    /// Reloads asked for during an upgrade.
    deferred: Vec<Waiter>,
    /// In-place upgrades since the service started.
    pub count: u64,
    /// What an upgrade carries over that the loop does not own (`None`: upgrades are refused).
    carry: Option<Carry>,
}

impl Upgrades {
    pub fn new(carry: Option<Carry>) -> Upgrades {
        Upgrades { pending: None, deferred: Vec::new(), count: 0, carry }
    }

    /// Whether an upgrade was asked for and has not ended (a reload then waits for it).
    pub fn upgrading(&self) -> bool {
        self.pending.is_some()
    }

    /// A reload asked for during an upgrade: it waits for the upgrade's end.
    pub fn defer(&mut self, waiter: Waiter) {
        if let Some(tx) = &waiter.progress {
            let _ = tx.send("an in-place upgrade is in progress: this reload waits for it".to_string());
        }
        self.deferred.push(waiter);
    }

    /// When the loop must wake for the upgrade.
    pub fn deadline(&self) -> Option<Mono> {
        match &self.pending.as_ref()?.phase {
            Phase::Checked { exec_at, .. } => Some(*exec_at),
            _ => None,
        }
    }
}

/// An upgrade that was asked for and has not ended.
struct Pending {
    /// The binary, opened and checked once: the check and the exec run this descriptor.
    binary: Candidate,
    reply: Option<oneshot::Sender<Result<UpgradeDone, UpgradeError>>>,
    /// The client's connection, for the new image to answer on.
    conn: Option<std::os::fd::OwnedFd>,
    phase: Phase,
}

enum Phase {
    /// Waiting until nothing is in flight that the state does not describe.
    Waiting,
    Checking,
    /// Checked; the exec follows once the loop's tasks had `FLUSH` to write.
    Checked {
        report: upgrade::CheckReport,
        exec_at: Mono,
    },
}

/// The supervisor's part, rebuilt by the new image: ready to run (see `supervisor::run`).
pub struct Resumed {
    pub(super) state: SupervisorState,
    pub(super) fds: HashMap<RawFd, std::os::fd::OwnedFd>,
    /// The upgrade client to answer, with what to tell it.
    pub(super) reply: Option<(std::os::fd::OwnedFd, UpgradeDone)>,
    pub(super) upgrades: u64,
}

impl Resumed {
    /// Takes the supervisor's descriptors (pidfds, output pipes, IPC channels) out of `fds`.
    pub fn take(
        state: SupervisorState,
        fds: &mut HandedOver,
        reply: Option<(std::os::fd::OwnedFd, UpgradeDone)>,
        upgrades: u64,
    ) -> std::io::Result<Resumed> {
        let mut own = HashMap::new();
        for w in &state.workers {
            for fd in [w.pidfd, w.stdout, w.stderr].into_iter().chain(w.channel).chain(w.bind_notify) {
                own.insert(fd, fds.take(fd)?);
            }
        }
        Ok(Resumed { state, fds: own, reply, upgrades })
    }
}

impl Supervisor {
    /// `herdsman upgrade` / `SIGUSR2`.
    pub(super) fn request_upgrade(
        &mut self,
        binary: Option<PathBuf>,
        reply: Option<oneshot::Sender<Result<UpgradeDone, UpgradeError>>>,
        conn: Option<std::os::fd::OwnedFd>,
    ) {
        let refuse = |reply: Option<oneshot::Sender<_>>, e: UpgradeError| {
            if let Some(tx) = reply {
                let _ = tx.send(Err(e));
            }
        };
        if self.stopping {
            return refuse(reply, UpgradeError::Stopping);
        }
        if self.upgrades.upgrading() {
            return refuse(reply, UpgradeError::Busy);
        }
        let Some(carry) = &self.upgrades.carry else {
            let e = UpgradeError::Prepare("this supervisor was not started by `herdsman run`".into());
            return refuse(reply, e);
        };
        let binary = binary.unwrap_or_else(|| carry.binary.clone());
        tracing::info!(app = %self.app, "upgrade requested: re-executing from {}", binary.display());
        let binary = match Candidate::open(&binary, nix::unistd::geteuid().as_raw()) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(app = %self.app, "upgrade refused: {e}");
                return refuse(reply, e);
            }
        };
        self.upgrades.pending = Some(Pending { binary, reply, conn, phase: Phase::Waiting });
    }

    /// Moves a pending upgrade on: check when the loop is quiet, exec once checked.
    pub(super) fn drive_upgrade(&mut self) {
        let Some(up) = &self.upgrades.pending else { return };
        if self.stopping {
            return self.end_upgrade(Err(UpgradeError::Stopping));
        }
        let quiet = self.rollouts.idle() && self.health.idle() && self.scale_waiters.is_empty();
        match &up.phase {
            Phase::Waiting if quiet => {
                let binary = up.binary.path.clone();
                let fd = match up.binary.fd.try_clone() {
                    Ok(fd) => fd,
                    Err(e) => return self.end_upgrade(Err(UpgradeError::Prepare(e.to_string()))),
                };
                let timeout =
                    self.upgrades.carry.as_ref().map_or(upgrade::CHECK_TIMEOUT, |c| c.check_timeout);
                let state = self.handover(&mut Exporter::new(true, self.fd_floor()), None).and_then(|h| {
                    serde_json::to_vec(&upgrade::redacted(h))
                        .map_err(|e| UpgradeError::Prepare(e.to_string()))
                });
                match state {
                    Ok(bytes) => {
                        let events = self.outside.events.clone();
                        tokio::spawn(async move {
                            let r = upgrade::check(binary, fd, bytes, timeout).await;
                            let _ = events.send(Event::UpgradeChecked(r));
                        });
                        if let Some(up) = &mut self.upgrades.pending {
                            up.phase = Phase::Checking;
                        }
                    }
                    Err(e) => self.end_upgrade(Err(e)),
                }
            }
            Phase::Checked { exec_at, .. } if quiet && self.now() >= *exec_at => self.exec_upgrade(),
            _ => {}
        }
    }

    pub(super) fn on_upgrade_checked(&mut self, r: Result<upgrade::CheckReport, UpgradeError>) {
        let Some(up) = &mut self.upgrades.pending else { return };
        match r {
            Ok(report) => {
                tracing::info!(app = %self.app, "{} (herdsman {}) passed its take-over check", up.binary.path.display(), report.version);
                // Reloads that waited for the upgrade go to the new image: tell their clients.
                let waiters = std::mem::take(&mut self.upgrades.deferred);
                let outcome = ReloadOutcome {
                    ok: false,
                    generation: self.pool.spec.generation,
                    message: format!(
                        "the supervisor is being upgraded in place to herdsman {}: send the reload again",
                        report.version
                    ),
                    retry: true,
                };
                super::answer(waiters, outcome);
                let exec_at = self.now() + FLUSH;
                if let Some(up) = &mut self.upgrades.pending {
                    up.phase = Phase::Checked { report, exec_at };
                }
            }
            Err(e) => self.end_upgrade(Err(e)),
        }
    }

    /// Ends a pending upgrade that will not happen: the client hears why, waiting reloads run.
    fn end_upgrade(&mut self, r: Result<UpgradeDone, UpgradeError>) {
        let Some(up) = self.upgrades.pending.take() else { return };
        if let Err(e) = &r {
            tracing::error!(app = %self.app, "upgrade refused: {e}");
        }
        if let Some(tx) = up.reply {
            let _ = tx.send(r);
        }
        for w in std::mem::take(&mut self.upgrades.deferred) {
            self.request_reload(w);
        }
    }

    fn exec_upgrade(&mut self) {
        let Some(up) = &mut self.upgrades.pending else { return };
        let binary = up.binary.fd.try_clone().map(|fd| Candidate { fd, path: up.binary.path.clone() });
        let conn = up.conn.take();
        let version = match &up.phase {
            Phase::Checked { report, .. } => report.version.clone(),
            _ => return,
        };
        let binary = match binary {
            Ok(b) => b,
            Err(e) => return self.end_upgrade(Err(UpgradeError::Prepare(e.to_string()))),
        };
        let mut exporter = Exporter::new(false, self.fd_floor());
        let state = match self.handover(&mut exporter, conn.as_ref()) {
            Ok(s) => s,
            Err(e) => return self.end_upgrade(Err(e)),
        };
        tracing::info!(app = %self.app, "upgrading in place: herdsman {} → {version} ({}), {} worker(s) kept", upgrade::version(), binary.path.display(), self.pool.workers.len());
        self.outside.notifier.send(&format!("STATUS=upgrading in place to herdsman {version}"));
        self.outside.notifier.flush();
        // The last lines must not die with this image.
        self.outside.launcher.output().flush(Duration::from_millis(500));
        crate::logging::flush(Duration::from_millis(500));
        let Some(carry) = &self.upgrades.carry else { return };
        let err = upgrade::exec(&binary, &state, exporter, carry);
        // Still here: execve failed, the duplicates are closed again.
        self.manager.forget_status();
        self.end_upgrade(Err(err));
    }

    fn fd_floor(&self) -> RawFd {
        self.outside.listeners.floor()
    }

    /// The whole state, with `ex` deciding the descriptor numbers.
    fn handover(
        &self,
        ex: &mut Exporter,
        conn: Option<&std::os::fd::OwnedFd>,
    ) -> Result<Handover, UpgradeError> {
        let prep = |e: std::io::Error| UpgradeError::Prepare(e.to_string());
        let carry =
            self.upgrades.carry.as_ref().ok_or_else(|| UpgradeError::Prepare("nothing to carry".into()))?;
        let clock = Clock::now();
        let control = upgrade::ControlState {
            fd: ex.fd(&carry.control.0).map_err(prep)?,
            path: carry.control.1.clone(),
            made_dir: carry.control.2.clone(),
            uid: carry.control.3,
            group: carry.control.4,
        };
        let metrics_http = match &carry.metrics_http {
            Some((fd, unix, address)) => Some(upgrade::HttpState {
                fd: ex.fd(fd).map_err(prep)?,
                unix: unix.clone(),
                address: address.clone(),
            }),
            None => None,
        };
        let listeners = self.outside.listeners.export(ex).map_err(prep)?;
        let steering = self.outside.steering.as_ref().map(|s| s.export(ex)).transpose().map_err(prep)?;
        let notify = self.outside.notify.export(ex).map_err(prep)?;
        let supervisor = self.export(ex, &clock).map_err(prep)?;
        let reply = conn.map(|c| ex.fd(c)).transpose().map_err(prep)?;
        Ok(Handover {
            format: upgrade::STATE_FORMAT,
            from_version: upgrade::version().to_string(),
            // The next upgrade defaults to the same path (the installed one).
            binary: carry.binary.clone(),
            upgrades: self.upgrades.count + 1,
            exec_at_ns: upgrade::monotonic_ns(),
            config: carry.config.clone(),
            overrides: carry.overrides.clone(),
            argv: carry.argv.clone(),
            worker_fd_limit: crate::sys::worker_fd_limit(),
            control,
            metrics_http,
            metrics: self.outside.metrics.export(),
            listeners,
            steering,
            notify,
            supervisor,
            reply,
            fds: ex.numbers(),
        })
    }

    fn export(&self, ex: &mut Exporter, clock: &Clock) -> std::io::Result<SupervisorState> {
        let mut specs: Vec<Arc<Spec>> = Vec::new();
        let mut index = |s: &Arc<Spec>| match specs.iter().position(|x| Arc::ptr_eq(x, s)) {
            Some(i) => i,
            None => {
                specs.push(s.clone());
                specs.len() - 1
            }
        };
        let spec = index(&self.pool.spec);
        let slots = self
            .pool
            .slots
            .iter()
            .map(|(id, s)| SlotState {
                id: *id,
                active: s.active,
                spec: index(&s.spec),
                failures: s.failures,
                restarts: s.restarts,
                restart_at_ns: s.restart_at.map(|t| clock.to_ns(t)),
                settled: s.settled,
                last_error: s.last_error.clone(),
            })
            .collect();
        let mut workers = Vec::new();
        for w in self.pool.workers.values() {
            let Some(f) = self.outside.fds.get(&w.pid) else { continue };
            workers.push(WorkerRecord {
                pid: w.pid,
                slot: w.slot,
                spec: index(&w.spec),
                state: WorkerPhase::of(w.state, clock),
                role: w.role,
                started_ns: clock.to_ns(w.started),
                pidfd: ex.fd(&*f.pidfd)?,
                stdout: ex.fd(&*f.pipes[0])?,
                stderr: ex.fd(&*f.pipes[1])?,
                channel: f.channel.as_deref().map(|c| ex.fd(c)).transpose()?,
                bind_notify: f.bind_notify.as_ref().map(|n| ex.fd(&**n)).transpose()?,
                bound: w.bound,
                tail: f.tail.lines(),
                failure: w.failure.clone(),
                last_ping_ns: clock.to_ns(w.last_ping),
                memory_strikes: w.memory_strikes,
            });
        }
        let specs = specs.iter().map(|s| Spec::clone(s)).collect();
        Ok(SupervisorState {
            settings: self.settings.clone(),
            specs,
            spec,
            generation: self.pool.generation,
            desired: self.pool.desired,
            slots,
            workers,
            last_reload: self.rollouts.last_reload.clone(),
            watchdog_timeouts: 0,
            sent_ready: self.manager.sent_ready,
            next_memory_check_ns: self.health.next_memory_check.map(|t| clock.to_ns(t)),
        })
    }

    /// Puts the taken-over state in place (the supervisor was built empty from the same
    /// settings) and starts watching every worker again.
    pub(super) fn resume(&mut self, r: Resumed) -> std::io::Result<()> {
        let Resumed { state, mut fds, reply, upgrades } = r;
        let clock = Clock::now();
        let specs: Vec<Arc<Spec>> = state.specs.into_iter().map(Arc::new).collect();
        let spec_at = |i: usize| {
            specs.get(i).cloned().ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::InvalidData, format!("spec {i} missing"))
            })
        };
        self.pool.spec = spec_at(state.spec)?;
        self.pool.generation = state.generation;
        self.pool.desired = state.desired;
        self.rollouts.last_reload = state.last_reload;
        self.manager.sent_ready = state.sent_ready;
        self.health.next_memory_check = state.next_memory_check_ns.map(|n| clock.instant(n));
        self.upgrades.count = upgrades;
        let mut slots = BTreeMap::new();
        for s in state.slots {
            slots.insert(
                s.id,
                Slot {
                    active: s.active,
                    spec: spec_at(s.spec)?,
                    failures: s.failures,
                    restarts: s.restarts,
                    restart_at: s.restart_at_ns.map(|n| clock.instant(n)),
                    settled: s.settled,
                    last_error: s.last_error,
                },
            );
        }
        self.pool.slots = slots;
        let mut take = |fd: RawFd| {
            fds.remove(&fd).ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::InvalidData, format!("fd {fd} missing"))
            })
        };
        for w in state.workers {
            let pidfd = Arc::new(take(w.pidfd)?);
            let pipes = [Arc::new(take(w.stdout)?), Arc::new(take(w.stderr)?)];
            let channel = w.channel.map(&mut take).transpose()?.map(Arc::new);
            let spec = spec_at(w.spec)?;
            let bind_notify = w.bind_notify.map(&mut take).transpose()?.map(Arc::new);
            if let Some(n) = &bind_notify {
                let fds = self.outside.fds_of(w.pid);
                let owner = spec.user.as_ref().map(|u| (u.uid, u.gid));
                self.outside.watch_binds(w.pid, n.clone(), &fds, owner);
            }
            let tail = crate::output::Tail::from_lines(w.tail);
            let output_done =
                self.outside.launcher.capture(w.slot, w.pid, spec.generation, pipes.clone(), &tail);
            super::exits::watch_exit(w.pid, pidfd.clone(), output_done, self.outside.events.clone());
            if let Some(c) = &channel {
                super::outside::listen_to(w.pid, c.clone(), &self.outside.events);
            }
            self.outside.fds.insert(
                w.pid,
                super::outside::WorkerFds {
                    pidfd,
                    tail,
                    pipes,
                    channel: channel.clone(),
                    bind_notify: bind_notify.clone(),
                },
            );
            self.pool.workers.insert(
                w.pid,
                Worker {
                    pid: w.pid,
                    slot: w.slot,
                    spec,
                    state: w.state.state(&clock),
                    role: w.role,
                    started: clock.instant(w.started_ns),
                    has_channel: channel.is_some(),
                    intercepted: bind_notify.is_some(),
                    bound: w.bound,
                    bound_at: None,
                    warned_foreign: false,
                    intercept_failures: 0,
                    failure: w.failure,
                    last_ping: clock.instant(w.last_ping_ns),
                    memory_strikes: w.memory_strikes,
                },
            );
        }
        // The manager's watchdog: ping at once (the exec took a moment of it).
        let now = self.now();
        self.manager.ping_soon(now);
        if let Some((conn, done)) = reply {
            use std::io::Write;
            let took = done.took_ms;
            let mut s = std::os::unix::net::UnixStream::from(conn);
            let _ = s.set_nonblocking(false);
            let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
            let _ = s.write_all(crate::control::protocol::Reply::Upgrade(done).line().as_bytes());
            tracing::info!(app = %self.app, "upgraded in place to herdsman {} in {took:.1} ms: {} worker(s) kept", upgrade::version(), self.pool.workers.len());
        }
        Ok(())
    }
}
