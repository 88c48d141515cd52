//! The supervisor: one event loop that owns every worker.
//!
//! Theory of operation. The loop is the only code that changes worker state. Everything else
//! becomes an event into it: child exits (a task per worker waits on its pidfd, then for the
//! end of its output, and sends [`Event::Exited`]), notify datagrams from workers, control
//! requests ([`Control`], from signals or clients) and timers (the loop sleeps until the
//! earliest deadline: a ready timeout, an `alive:` delay, a stop timeout, a restart back-off,
//! the systemd watchdog). After each event, [`Supervisor::reconcile`] moves the world toward
//! the wanted state: fill empty slots, retire extra ones, drive the roll-out, tell systemd.
//!
//! Slots are the stable worker ids (0..N-1, `HERDSMAN_WORKER_ID`). A slot has at most one
//! *active* worker and, during a roll-out, one *candidate*; replaced workers are *retired* and
//! drain on their own schedule.

mod events;
mod exits;
pub mod handover;
mod health;
mod host;
mod rollout;
mod status;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;
use tokio::sync::{mpsc, oneshot};

use crate::backoff;
use crate::config::{Problems, ReadyMode, Settings};
use crate::control::protocol::{LastReload, ReloadOutcome, ScaleError};
use crate::listeners::Listeners;
use crate::notify::{Notifier, WorkerNotify};
use crate::output::Output;
use crate::requests::{Control, Scale, Waiter};
use crate::spawn::{Launcher, Spec};
use crate::steer::Steering;
use crate::worker::{Role, State, Worker};
use rollout::Rollout;

/// A steered worker that stopped receiving keeps running at least this long before its stop
/// signal, for handshakes that were already routed to it (see `steer`).
const DRAIN_GRACE: Duration = Duration::from_millis(250);
/// How often a draining worker's accept queue is checked.
const DRAIN_POLL: Duration = Duration::from_millis(20);

/// How long to wait for a dead worker's last output before reporting its exit.
const OUTPUT_GRACE: Duration = Duration::from_millis(250);

/// Re-reads the configuration for a reload.
pub type ReloadSource = Box<dyn Fn() -> Result<Settings, Problems>>;

/// Everything outside the supervisor that it works with, injected so tests and `main` choose.
pub struct World {
    pub listeners: Listeners,
    pub notifier: Notifier,
    /// The environment workers start from (the supervisor's own, as `main` read it).
    pub base_env: Vec<(String, String)>,
    pub output: Output,
    pub reload_source: Option<ReloadSource>,
    /// Send `WATCHDOG=1` this often (from `WATCHDOG_USEC`).
    pub watchdog: Option<Duration>,
    /// Where the workers' notify socket goes (herdsman's runtime directory); abstract without.
    pub notify_dir: Option<std::path::PathBuf>,
    /// Steered sockets (`--balance steer|sticky`); `None` for shared sockets.
    pub steering: Option<Steering>,
    /// Where the loop records what happens, for the metrics endpoint (see `crate::metrics`).
    pub metrics: crate::metrics::Metrics,
    /// What an in-place upgrade carries over that the loop does not own (`None`: upgrades
    /// are refused, e.g. in tests that run the loop in-process).
    pub carry: Option<crate::upgrade::Carry>,
    /// The workers' notify socket taken over in an upgrade (`None`: bind a new one).
    pub notify: Option<WorkerNotify>,
    /// The state a new image takes over after an in-place upgrade.
    pub resume: Option<handover::Resumed>,
}

enum Event {
    Exited { pid: i32, status: WaitStatus },
    UpgradeChecked(Result<crate::upgrade::CheckReport, crate::upgrade::UpgradeError>),
}

/// A slot: one stable worker id.
struct Slot {
    /// The worker serving (or starting to serve) this slot.
    active: Option<i32>,
    /// What the slot runs when (re)started.
    spec: Arc<Spec>,
    /// Failures in a row, for back-off.
    failures: u32,
    restarts: u32,
    /// Back-off: do not start before this.
    restart_at: Option<Instant>,
    /// Became ready or failed at least once (for the first `READY=1`).
    settled: bool,
    last_error: Option<String>,
}

pub struct Supervisor {
    settings: Settings,
    app: Arc<str>,
    /// What new slots and restarts without a slot spec run.
    spec: Arc<Spec>,
    /// The newest generation number handed out.
    generation: u64,
    desired: usize,
    slots: BTreeMap<usize, Slot>,
    workers: HashMap<i32, Worker>,
    rollout: Option<Rollout>,
    /// Reload requests that arrived during a roll-out: they get one more roll-out afterwards.
    queued: Option<Vec<Waiter>>,
    /// Health replacements in flight, by new worker pid.
    replacing: HashMap<i32, health::Replacement>,
    watchdog_timeouts: u64,
    next_memory_check: Option<Instant>,
    /// `scale --wait` clients: answered once the pool has converged.
    scale_waiters: Vec<oneshot::Sender<Result<usize, ScaleError>>>,
    last_reload: Option<LastReload>,
    launcher: Launcher,
    /// Per-worker sockets and the routing program, with `--balance steer|sticky`.
    steering: Option<Steering>,
    /// Copies of the shared listening sockets (for their accept-queue length in `status`).
    shared_sockets: Vec<std::os::fd::OwnedFd>,
    notifier: Notifier,
    reload_source: Option<ReloadSource>,
    watchdog: Option<(Duration, Instant)>,
    sockets: Vec<String>,
    events: mpsc::UnboundedSender<Event>,
    /// Set once a stop began; the loop ends when no worker is left.
    stopping: bool,
    sent_ready: bool,
    last_status: String,
    metrics: crate::metrics::Metrics,
    listeners: Listeners,
    /// The workers' notify socket (also read by the loop itself).
    notify: Arc<WorkerNotify>,
    carry: Option<crate::upgrade::Carry>,
    /// An in-place upgrade that was asked for and has not ended.
    upgrade: Option<handover::Pending>,
    /// Reloads asked for during an upgrade.
    deferred: Vec<Waiter>,
    /// In-place upgrades since the service started.
    upgrades: u64,
    /// Everything the loop does to processes and the clock it reads (see `host`).
    host: Box<dyn host::Host>,
}

/// Runs the supervisor until a stop request has been carried out.
pub async fn run(settings: Settings, world: World, controls: mpsc::Receiver<Control>) -> anyhow::Result<()> {
    let (sup, events) = Supervisor::new(settings, world, Box::new(host::RealHost))?;
    sup.drive(events, controls).await
}

impl Supervisor {
    /// Builds the supervisor (no worker started yet: the first [`Supervisor::reconcile`] does
    /// that) and the receiver of its events.
    fn new(
        settings: Settings,
        world: World,
        host: Box<dyn host::Host>,
    ) -> anyhow::Result<(Supervisor, mpsc::UnboundedReceiver<Event>)> {
        let notify = Arc::new(match world.notify {
            Some(n) => n,
            None => WorkerNotify::bind(world.notify_dir.as_deref())?,
        });
        let app: Arc<str> = Arc::from(settings.name.as_str());
        let fdnames = match &world.steering {
            Some(st) => st.names(),
            None => world.listeners.names(),
        };
        let launcher = Launcher::new(
            app.clone(),
            world.base_env,
            world.listeners.raw_fds(),
            fdnames,
            notify.address.clone(),
            world.output,
        )?;
        let sockets = match &world.steering {
            Some(st) => st.addrs(),
            None => world.listeners.addrs(),
        };
        let (events, event_rx) = mpsc::unbounded_channel();
        let spec = Arc::new(launcher.pin(&settings, 1).map_err(|e| anyhow::anyhow!("{e}"))?);
        let now = host.now();
        let mut sup = Supervisor {
            app,
            desired: settings.workers.get(),
            settings,
            spec,
            generation: 1,
            slots: BTreeMap::new(),
            workers: HashMap::new(),
            rollout: None,
            queued: None,
            scale_waiters: Vec::new(),
            replacing: HashMap::new(),
            watchdog_timeouts: 0,
            next_memory_check: None,
            last_reload: None,
            launcher,
            shared_sockets: if world.steering.is_none() {
                world.listeners.copies()?.into_iter().map(|(_, _, fd)| fd).collect()
            } else {
                Vec::new()
            },
            steering: world.steering,
            notifier: world.notifier,
            reload_source: world.reload_source,
            watchdog: world.watchdog.map(|d| (d, now)),
            sockets,
            events,
            stopping: false,
            sent_ready: false,
            last_status: String::new(),
            metrics: world.metrics,
            listeners: world.listeners,
            notify,
            carry: world.carry,
            upgrade: None,
            deferred: Vec::new(),
            upgrades: 0,
            host,
        };
        if let Some(r) = world.resume {
            sup.resume(r)?;
        } else {
            tracing::info!(
                app = %sup.app,
                workers = sup.desired,
                sockets = %sup.sockets.join(", "),
                "starting {} worker(s) of {:?} on {}",
                sup.desired,
                sup.settings.command.join(" "),
                sup.sockets.join(", ")
            );
        }
        Ok((sup, event_rx))
    }

    /// The driver: waits for the next event (a child exit, a notify datagram, a request, the
    /// earliest deadline), hands it to the state machine and reconciles, until stopped.
    async fn drive(
        mut self,
        mut event_rx: mpsc::UnboundedReceiver<Event>,
        mut controls: mpsc::Receiver<Control>,
    ) -> anyhow::Result<()> {
        let notify = self.notify.clone();
        let mut controls_open = true;
        loop {
            self.reconcile();
            if self.stopping && self.workers.is_empty() {
                break;
            }
            let wake = self.next_deadline();
            tokio::select! {
                Some(ev) = event_rx.recv() => self.on_event(ev),
                msg = notify.recv() => self.on_notify(msg),
                c = controls.recv(), if controls_open => match c {
                    Some(c) => self.on_control(c),
                    None => controls_open = false,
                },
                _ = sleep_until(wake) => {}
            }
            let now = self.host.now();
            self.on_timers(now);
        }
        tracing::info!(app = %self.app, "all workers stopped");
        Ok(())
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

impl Supervisor {
    fn on_control(&mut self, c: Control) {
        match c {
            Control::Reload(waiter) => self.request_reload(waiter),
            Control::Scale { scale, wait, reply } => match (self.scale(scale), reply) {
                (Ok(_), Some(tx)) if wait => self.scale_waiters.push(tx),
                (r, Some(tx)) => {
                    let _ = tx.send(r);
                }
                (_, None) => {}
            },
            Control::Status { reply } => {
                let _ = reply.send(self.snapshot());
            }
            Control::Stop => self.stop(),
            Control::Upgrade { binary, reply, conn } => self.request_upgrade(binary, reply, conn),
        }
    }

    fn scale(&mut self, scale: Scale) -> Result<usize, ScaleError> {
        let want = match scale {
            Scale::To(n) => n,
            Scale::Add(n) => self.desired.saturating_add(n),
            Scale::Remove(n) => self.desired.saturating_sub(n),
        };
        if want == 0 {
            return Err(ScaleError::Zero { now: self.desired });
        }
        if want > crate::config::values::MAX_WORKERS {
            return Err(ScaleError::TooMany { want });
        }
        if want != self.desired {
            tracing::info!(app = %self.app, "scaling from {} to {want} worker(s)", self.desired);
        }
        self.set_desired(want);
        Ok(want)
    }

    /// The wanted number of workers; sticky steering hashes clients over that many slots.
    fn set_desired(&mut self, n: usize) {
        self.desired = n;
        if let Some(st) = &mut self.steering {
            if let Err(e) = st.set_slots(n) {
                tracing::error!(app = %self.app, "steering: {e}");
            }
        }
    }

    fn stop(&mut self) {
        let now = self.host.now();
        if self.stopping {
            tracing::warn!(app = %self.app, "second stop request: killing the remaining workers now");
            for w in self.workers.values_mut().filter(|w| w.state != State::Killed) {
                w.state = State::Stopping { kill_at: now };
            }
            return;
        }
        tracing::info!(app = %self.app, "stopping: sending {} to {} worker(s)", self.settings.stop_signal, self.workers.len());
        self.stopping = true;
        self.notifier.send("STOPPING=1\nSTATUS=stopping");
        self.fail_rollout("the supervisor is stopping".to_string());
        if let Some(waiters) = self.queued.take() {
            let outcome = ReloadOutcome::new(false, self.spec.generation, "the supervisor is stopping");
            self.answer(waiters, outcome);
        }
        let pids: Vec<i32> = self.workers.keys().copied().collect();
        for pid in pids {
            self.retire(pid);
        }
    }

    /// SIGKILLs `pid`'s process group at once (a failed or hung worker); its exit event
    /// follows. `failure` says why, for the report.
    fn kill_now(&mut self, pid: i32, failure: Option<crate::worker::Failure>) {
        self.steer_receiving(pid, false);
        let Some(w) = self.workers.get_mut(&pid) else { return };
        if failure.is_some() {
            w.failure = failure;
        }
        self.host.signal(w, Signal::SIGKILL, true);
        w.state = State::Killed;
    }

    /// Sends the stop signal (once) and arms the kill timer. A steered worker that was
    /// receiving first stops receiving and drains its own accept queue (see `steer`); the
    /// stop signal follows from `on_timers`.
    fn retire(&mut self, pid: i32) {
        let now = self.host.now();
        let was_receiving = self.steering.as_ref().is_some_and(|st| st.is_receiving(pid));
        self.steer_receiving(pid, false);
        let Some(w) = self.workers.get_mut(&pid) else { return };
        w.role = Role::Retired;
        if matches!(w.state, State::Stopping { .. } | State::Killed | State::Draining { .. }) {
            return;
        }
        if was_receiving {
            w.state = State::Draining { since: now };
        } else {
            w.state = State::Stopping { kill_at: now + w.spec.stop_timeout };
            self.host.signal(w, w.spec.stop_signal, false);
        }
        if let Some(slot) = self.slots.get_mut(&w.slot) {
            if slot.active == Some(pid) {
                slot.active = None;
            }
        }
    }

    /// Makes `new` the active worker of `slot_id` and retires the one it replaces: the one
    /// path by which a roll-out's new worker and a health replacement (watchdog, memory) take
    /// over a slot. Returns the replaced pid.
    fn promote(&mut self, slot_id: usize, new: i32) -> Option<i32> {
        let old = self.slots.get_mut(&slot_id)?.active.replace(new);
        if let Some(w) = self.workers.get_mut(&new) {
            w.role = Role::Active;
        }
        if let Some(old) = old.filter(|o| *o != new) {
            self.retire(old);
        }
        old
    }

    /// Lets new connections reach `pid` (or stops them), with steered sockets.
    fn steer_receiving(&mut self, pid: i32, receiving: bool) {
        if let Some(st) = &mut self.steering {
            if let Err(e) = st.set_receiving(pid, receiving) {
                tracing::error!(app = %self.app, "steering: {e}");
            }
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let now = self.host.now();
        let workers = self.workers.values().filter_map(|w| match w.state {
            State::Starting { deadline } => Some(match w.spec.ready {
                ReadyMode::Alive(d) => deadline.min(w.started + d),
                ReadyMode::Notify => deadline,
            }),
            State::Stopping { kill_at } => Some(kill_at),
            // Past the grace, poll the accept queue until it is empty.
            State::Draining { since } => Some((since + DRAIN_GRACE).max(now + DRAIN_POLL)),
            State::Ready { .. } | State::Killed => None,
        });
        let slots = self.slots.values().filter_map(|s| s.restart_at);
        let watchdogs = self.workers.keys().filter_map(|pid| self.watchdog_deadline(*pid));
        let watchdog = self.watchdog.map(|(every, last)| last + every);
        // Roll-out candidates holding for min_ready.
        let holds = self.rollout.iter().flat_map(|r| {
            r.candidates().filter_map(|pid| match self.workers.get(&pid)?.state {
                State::Ready { since } => Some(r.hold_until(since)),
                _ => None,
            })
        });
        // Retry notifications the manager had no room for.
        let notify_retry = self.notifier.has_backlog().then(|| now + Duration::from_millis(50));
        workers
            .chain(slots)
            .chain(watchdogs)
            .chain(watchdog)
            .chain(holds)
            .chain(self.next_memory_check)
            .chain(notify_retry)
            .chain(self.upgrade_deadline())
            .min()
    }

    /// Moves the world toward the wanted state. Called after every event.
    fn reconcile(&mut self) {
        let now = self.host.now();
        // Retry notifications the manager had no room for (next_deadline wakes us for it).
        self.notifier.flush();
        if !self.stopping {
            self.reconcile_slots(now);
            self.drive_rollout();
            self.promote_replacements();
            self.answer_scale_waiters();
            self.drive_upgrade();
        } else {
            self.drive_upgrade();
            for tx in self.scale_waiters.drain(..) {
                let _ = tx.send(Err(ScaleError::Stopping));
            }
        }
        if !self.sent_ready && (self.stopping || self.slots.values().all(|s| s.settled)) {
            self.sent_ready = true;
            if !self.stopping {
                tracing::info!(app = %self.app, "started: {}", self.status_line());
                self.notifier.send("READY=1");
            }
        }
        let status = self.status_line();
        if status != self.last_status {
            self.notifier.send(&format!("STATUS={status}"));
            self.last_status = status;
        }
    }

    fn reconcile_slots(&mut self, now: Instant) {
        for id in 0..self.desired {
            let spec = self.rollout.as_ref().map(|r| r.spec.clone()).unwrap_or_else(|| self.spec.clone());
            self.slots.entry(id).or_insert_with(|| Slot {
                active: None,
                spec,
                failures: 0,
                restarts: 0,
                restart_at: None,
                settled: false,
                last_error: None,
            });
        }
        // Extra slots (scale down): retire their workers, drop the slot once empty.
        let extra: Vec<usize> = self.slots.range(self.desired..).map(|(id, _)| *id).collect();
        for id in extra {
            let pids: Vec<i32> = self
                .workers
                .values()
                .filter(|w| w.slot == id && w.role != Role::Retired)
                .map(|w| w.pid)
                .collect();
            for pid in pids {
                self.retire(pid);
            }
            if let Some(r) = &mut self.rollout {
                r.forget_slot(id);
            }
            self.slots.remove(&id);
        }
        // Empty slots start (after their back-off), unless a roll-out candidate is coming.
        let ids: Vec<usize> = self.slots.keys().copied().collect();
        for id in ids {
            let slot = &self.slots[&id];
            let has_candidate = self.rollout.as_ref().is_some_and(|r| r.candidate_for(id).is_some());
            if slot.active.is_some() || has_candidate || slot.restart_at.is_some_and(|t| t > now) {
                continue;
            }
            let spec = slot.spec.clone();
            match self.launch(id, &spec, Role::Active) {
                Ok(pid) => {
                    let slot = self.slots.get_mut(&id).expect("slot exists");
                    slot.active = Some(pid);
                    slot.restart_at = None;
                }
                Err(e) => {
                    let slot = self.slots.get_mut(&id).expect("slot exists");
                    slot.failures += 1;
                    slot.settled = true;
                    let delay = backoff::delay(&self.settings.backoff, slot.failures);
                    slot.restart_at = Some(now + delay);
                    tracing::error!(app = %self.app, worker_id = id, "worker {id}: {e}; retrying in {}", human(delay));
                    slot.last_error = Some(e.to_string());
                }
            }
        }
    }

    /// Starts a worker for slot `id` running `spec`.
    fn launch(&mut self, id: usize, spec: &Arc<Spec>, role: Role) -> Result<i32, crate::spawn::SpawnError> {
        let metrics_socket = self.metrics.socket_for(id, spec.user.as_ref().map(|u| (u.uid, u.gid)));
        let l = match &mut self.steering {
            None => self.host.launch(&self.launcher, spec, id, None, metrics_socket.as_deref())?,
            Some(st) => {
                let picked = st.reserve(id)?;
                match self.host.launch(
                    &self.launcher,
                    spec,
                    id,
                    Some(&st.fds(&picked)),
                    metrics_socket.as_deref(),
                ) {
                    Ok(l) => {
                        st.bind(&picked, l.pid);
                        l
                    }
                    Err(e) => {
                        st.unreserve(&picked);
                        return Err(e);
                    }
                }
            }
        };
        let pid = l.pid;
        self.metrics.launched(pid, id, metrics_socket);
        let pidfd = Arc::new(l.pidfd);
        self.host.watch(pid, pidfd.clone(), l.output_done, &self.events);
        let now = self.host.now();
        if spec.max_memory.is_some() && self.next_memory_check.is_none() {
            self.next_memory_check = Some(now + health::MEMORY_CHECK);
        }
        self.workers.insert(
            pid,
            Worker {
                pid,
                slot: id,
                spec: spec.clone(),
                state: State::Starting { deadline: now + spec.ready_timeout },
                role,
                started: now,
                pidfd,
                tail: l.tail,
                pipes: l.pipes,
                failure: None,

                last_ping: now,
                memory_strikes: 0,
            },
        );
        tracing::info!(app = %self.app, worker_id = id, worker_pid = pid, worker_generation = spec.generation, "worker {id} started (pid {pid}, generation {})", spec.generation);
        Ok(pid)
    }

    fn answer(&self, waiters: Vec<Waiter>, outcome: ReloadOutcome) {
        for tx in waiters.into_iter().filter_map(|w| w.reply) {
            let _ = tx.send(outcome.clone());
        }
    }

    /// Answers `scale --wait` clients once every slot runs a ready worker and removed slots
    /// are gone, or as soon as a slot fails to start.
    fn answer_scale_waiters(&mut self) {
        if self.scale_waiters.is_empty() {
            return;
        }
        let failed = self
            .slots
            .iter()
            .find(|(id, s)| **id < self.desired && s.active.is_none() && s.restart_at.is_some());
        let result = if let Some((id, slot)) = failed {
            let why = slot.last_error.clone().unwrap_or_else(|| "failed to start".to_string());
            Err(ScaleError::StartFailed { slot: *id, why })
        } else {
            let removed_gone = self.workers.values().all(|w| w.slot < self.desired);
            if !(removed_gone && self.slots.len() == self.desired && self.ready_count() == self.desired) {
                return;
            }
            Ok(self.desired)
        };
        for tx in self.scale_waiters.drain(..) {
            let _ = tx.send(result.clone());
        }
    }

    fn ready_count(&self) -> usize {
        self.slots
            .values()
            .filter_map(|s| s.active)
            .filter(|pid| self.workers.get(pid).is_some_and(Worker::is_ready))
            .count()
    }
}

/// `1.5s`, `2m`, `3h` — short human durations.
pub fn human(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{:.1}s", d.as_secs_f64())
    } else if ms < 3_600_000 {
        format!("{}m", ms / 60_000)
    } else if ms < 86_400_000 {
        format!("{}h", ms / 3_600_000)
    } else {
        format!("{}d", ms / 86_400_000)
    }
}
