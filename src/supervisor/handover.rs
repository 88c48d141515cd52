//! The loop's side of an in-place upgrade (see `crate::upgrade` for the whole protocol): when
//! an upgrade may start, the check, the exec, and the supervisor's part of the state.
//!
//! The part: [`Upgrades`] holds the upgrade asked for, the reloads deferred behind it, the
//! count of upgrades so far and what an upgrade carries that the loop does not own.
//!
//! The state handed over is the core as it is (`serde` of [`Core`]) and the driver's
//! descriptors in one table by name ([`Supervisor::fd_table`]); the new image takes them back
//! through [`Resumed::take`] and [`Supervisor::resume`], whatever brought the descriptors
//! (`execve` today; systemd's fd store is meant to use the same path).

use std::collections::BTreeMap;
use std::os::fd::{OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;

use super::document::{self, Handover, fd_name};
use super::outside::WorkerFds;
use super::{Core, Event, Supervisor};
use crate::control::protocol::{ReloadOutcome, UpgradeDone};
use crate::mono::Mono;
use crate::requests::Waiter;
use crate::spawn::Spec;
use crate::upgrade::{self, Candidate, Carry, Exporter, UpgradeError};

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
    pub(super) core: Core,
    /// The workers' descriptors, by name (see `document::fd_name`).
    pub(super) fds: BTreeMap<String, OwnedFd>,
    /// Each worker's last output lines, by pid.
    pub(super) tails: BTreeMap<i32, Vec<String>>,
    /// The upgrade client to answer, with what to tell it.
    pub(super) reply: Option<(OwnedFd, UpgradeDone)>,
    pub(super) upgrades: u64,
    /// Taken back from systemd's fd store after a crash, not from an upgrade (see `readopt`).
    pub(super) readopt: Option<super::readopt::Readopt>,
}

impl Resumed {
    /// The restore follows a crash (the state and descriptors came from systemd's fd store):
    /// see [`super::readopt`].
    pub fn readopting(self, readopt: super::readopt::Readopt) -> Resumed {
        Resumed { readopt: Some(readopt), ..self }
    }

    /// The core and the workers' descriptors, taken by name out of `fds` (every descriptor
    /// of the state, wherever it came from). Fails if one is missing.
    pub fn take(
        core: Core,
        tails: BTreeMap<i32, Vec<String>>,
        fds: &mut BTreeMap<String, OwnedFd>,
        reply: Option<(OwnedFd, UpgradeDone)>,
        upgrades: u64,
    ) -> std::io::Result<Resumed> {
        let mut own = BTreeMap::new();
        for w in core.pool.workers().values() {
            let kinds = ["pidfd", "out", "err"]
                .into_iter()
                .chain(w.has_channel.then_some("ipc"))
                .chain(w.intercepted.then_some("bind"));
            for kind in kinds {
                let name = fd_name(kind, w.slot, w.spec.generation, w.pid);
                let fd = fds.remove(&name).ok_or_else(|| {
                    std::io::Error::new(std::io::ErrorKind::InvalidData, format!("descriptor {name} missing"))
                })?;
                own.insert(name, fd);
            }
        }
        Ok(Resumed { core, fds: own, tails, reply, upgrades, readopt: None })
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
        if self.core.stopping {
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
        tracing::info!("upgrade requested: re-executing from {}", binary.display());
        let binary = match Candidate::open(&binary, nix::unistd::geteuid().as_raw()) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("upgrade refused: {e}");
                return refuse(reply, e);
            }
        };
        self.upgrades.pending = Some(Pending { binary, reply, conn, phase: Phase::Waiting });
    }

    /// Moves a pending upgrade on: check when the loop is quiet, exec once checked.
    pub(super) fn drive_upgrade(&mut self) {
        let Some(up) = &self.upgrades.pending else { return };
        if self.core.stopping {
            return self.end_upgrade(Err(UpgradeError::Stopping));
        }
        let quiet = self.core.rollouts.idle() && self.core.health.idle() && self.scale_waiters.is_empty();
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
                    serde_json::to_vec(&document::redacted(h))
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
                tracing::info!(
                    "{} (herdsman {}) passed its take-over check",
                    up.binary.path.display(),
                    report.version
                );
                // Reloads that waited for the upgrade go to the new image: tell their clients.
                let waiters = std::mem::take(&mut self.upgrades.deferred);
                let outcome = ReloadOutcome {
                    ok: false,
                    generation: self.core.pool.spec().generation,
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
            tracing::error!("upgrade refused: {e}");
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
        let state = self.handover(&mut exporter, conn.as_ref()).and_then(|s| {
            serde_json::to_vec(&s).map_err(|e| UpgradeError::Prepare(format!("cannot encode the state: {e}")))
        });
        let state = match state {
            Ok(s) => s,
            Err(e) => return self.end_upgrade(Err(e)),
        };
        tracing::info!(
            "upgrading in place: herdsman {} → {version} ({}), {} worker(s) kept",
            upgrade::version(),
            binary.path.display(),
            self.core.pool.workers().len()
        );
        self.outside.notifier.send(&format!("STATUS=upgrading in place to herdsman {version}"));
        self.outside.notifier.flush();
        // The last lines must not die with this image.
        self.outside.launcher.output().flush(Duration::from_millis(500));
        crate::logging::flush(Duration::from_millis(500));
        let Some(carry) = &self.upgrades.carry else { return };
        let err = upgrade::exec(&binary, &state, exporter, carry);
        // Still here: execve failed, the duplicates are closed again.
        self.core.manager.forget_status();
        self.end_upgrade(Err(err));
    }

    pub(super) fn fd_floor(&self) -> RawFd {
        self.outside.listeners.floor()
    }

    /// The whole state, with `ex` deciding the descriptor numbers.
    pub(super) fn handover(
        &self,
        ex: &mut Exporter,
        conn: Option<&OwnedFd>,
    ) -> Result<Handover, UpgradeError> {
        let prep = |e: std::io::Error| UpgradeError::Prepare(e.to_string());
        let carry =
            self.upgrades.carry.as_ref().ok_or_else(|| UpgradeError::Prepare("nothing to carry".into()))?;
        ex.named(document::FD_CONTROL.to_string(), &carry.control.0).map_err(prep)?;
        let control = document::ControlState {
            path: carry.control.1.clone(),
            made_dir: carry.control.2.clone(),
            uid: carry.control.3,
            group: carry.control.4,
        };
        let metrics_http = match &carry.metrics_http {
            Some((fd, unix, address)) => {
                ex.named(document::FD_METRICS_HTTP.to_string(), fd).map_err(prep)?;
                Some(document::HttpState { unix: unix.clone(), address: address.clone() })
            }
            None => None,
        };
        ex.prefix("listener");
        let listeners = self.outside.listeners.export(ex).map_err(prep)?;
        ex.prefix("steer");
        let steering = self.outside.steering.as_ref().map(|s| s.export(ex)).transpose().map_err(prep)?;
        ex.prefix("notify");
        let notify = self.outside.notify.export(ex).map_err(prep)?;
        for (name, fd) in self.fd_table() {
            ex.named(name, fd).map_err(prep)?;
        }
        // The fd store's state memfds (close-on-exec) carry over under their names.
        if let Some(store) = &self.store {
            for (name, fd) in store.state_fds() {
                ex.named(name.to_string(), &fd).map_err(prep)?;
            }
        }
        if let Some(c) = conn {
            ex.named(document::FD_REPLY.to_string(), c).map_err(prep)?;
        }
        let tails = self.outside.fds.iter().map(|(pid, f)| (*pid, f.tail.lines())).collect();
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
            core: self.core.clone(),
            tails,
            fds: ex.table(),
        })
    }

    /// The workers' descriptors, each with its name (`pidfd-<slot>-<generation>-<pid>`,
    /// `out-…`, `err-…`, `ipc-…`, `bind-…`): what [`Resumed::take`] takes back.
    pub(super) fn fd_table(&self) -> Vec<(String, &OwnedFd)> {
        let mut table = Vec::new();
        for w in self.core.pool.workers().values() {
            let Some(f) = self.outside.fds.get(&w.pid) else { continue };
            let name = |kind: &str| fd_name(kind, w.slot, w.spec.generation, w.pid);
            table.push((name("pidfd"), &*f.pidfd));
            table.push((name("out"), &*f.pipes[0]));
            table.push((name("err"), &*f.pipes[1]));
            if let Some(c) = &f.channel {
                table.push((name("ipc"), &**c));
            }
            if let Some(b) = &f.bind_notify {
                table.push((name("bind"), &**b));
            }
        }
        table
    }

    /// Puts the taken-over core in place (the supervisor was built empty from the same
    /// settings), gives every worker its descriptors back and starts watching it again.
    /// `watchdog`: this image's `WATCHDOG_USEC` interval.
    pub(super) fn resume(&mut self, r: Resumed, watchdog: Option<Duration>) -> std::io::Result<()> {
        let Resumed { mut core, mut fds, tails, reply, upgrades, readopt } = r;
        let now = self.now();
        core.manager.set_watchdog(watchdog, now);
        // The manager's watchdog: ping at once (the exec took a moment of it).
        core.manager.ping_soon(now);
        // The previous image said "upgrading in place" last: the next STATUS= goes out.
        core.manager.forget_status();
        self.core = core;
        self.upgrades.count = upgrades;
        let mut take = |name: String| {
            fds.remove(&name).ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::InvalidData, format!("descriptor {name} missing"))
            })
        };
        let workers: Vec<(i32, usize, Arc<Spec>, bool, bool, bool)> = self
            .core
            .pool
            .workers()
            .values()
            .map(|w| (w.pid, w.slot, w.spec.clone(), w.has_channel, w.intercepted, w.readopted))
            .collect();
        for (pid, slot, spec, has_channel, intercepted, readopted) in workers {
            let name = |kind: &str| fd_name(kind, slot, spec.generation, pid);
            let pidfd = Arc::new(take(name("pidfd"))?);
            let pipes = [Arc::new(take(name("out"))?), Arc::new(take(name("err"))?)];
            let channel = if has_channel { Some(Arc::new(take(name("ipc"))?)) } else { None };
            let bind_notify = if intercepted { Some(Arc::new(take(name("bind"))?)) } else { None };
            if let Some(n) = &bind_notify {
                let fds = self.outside.fds_of(pid);
                let owner = spec.user.as_ref().map(|u| (u.uid, u.gid));
                self.outside.watch_binds(pid, n.clone(), &fds, owner);
            }
            let tail = crate::output::Tail::from_lines(tails.get(&pid).cloned().unwrap_or_default());
            let output_done = self.outside.launcher.capture(slot, pid, spec.generation, pipes.clone(), &tail);
            self.outside.host.watch(pid, pidfd.clone(), output_done, &self.outside.events, readopted);
            if let Some(c) = &channel {
                super::outside::listen_to(pid, c.clone(), &self.outside.events);
            }
            self.outside.fds.insert(pid, WorkerFds { pidfd, tail, pipes, channel, bind_notify, readopted });
        }
        if let Some((conn, done)) = reply {
            use std::io::Write;
            let took = done.took_ms;
            let mut s = std::os::unix::net::UnixStream::from(conn);
            let _ = s.set_nonblocking(false);
            let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
            let _ = s.write_all(crate::control::protocol::Reply::Upgrade(done).line().as_bytes());
            tracing::info!(
                "upgraded in place to herdsman {} in {took:.1} ms: {} worker(s) kept",
                upgrade::version(),
                self.core.pool.workers().len()
            );
        }
        if let Some(ro) = readopt {
            self.readopted(ro);
        }
        Ok(())
    }
}
