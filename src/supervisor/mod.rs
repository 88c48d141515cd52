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
//!
//! ## Core and driver
//!
//! The **core** ([`Core`]) is plain data, `serde`-derived: the settings, [`pool`] (slots,
//! workers as data, wanted size, back-off), [`rollout`] (the roll-out, the reloads queued
//! behind it, the last result), [`health`] (watchdog and memory replacements), [`manager`]
//! (what systemd is told) and [`watch`] (`--watch`'s debounce). It holds no descriptor, no
//! channel, and reads no clock: time comes in as a [`Mono`] (`CLOCK_MONOTONIC` ns, which
//! survives `execve`) with every input, the wall clock (`last_reload.at`) as unix seconds
//! where it is needed. Reload and scale clients are ids ([`command::WaiterId`]) whose channels
//! stay in the driver's table.
//!
//! The **driver** ([`Supervisor`]) owns every resource: [`outside`] (the host, the launcher,
//! the sockets and steering, the workers' notify socket, the notifier, the metrics, and
//! [`outside::WorkerFds`], the one table of per-worker descriptors: pidfd, output pipes and
//! tail, IPC channel, bind filter), the reload source, the waiters, the upgrade in flight.
//! It turns kernel events into inputs and is the only code that acts on the world:
//!
//! ```text
//! event ──► driver resolves what only it can see ──► Core::on_…(input, now[, unix]) ──► Vec<Command>
//!   exit:    releases the worker's fds, reaps, reads its tail       Core::on_exit
//!   notify:  maps a child pid to its worker (process group)         Core::on_notify / notified_ready
//!   timer:   reads draining workers' accept queues (Drain)          Core::on_timers
//!   memory:  Command::SampleMemory ──► host.memory ──► Health::check_memory ──► Commands
//! Vec<Command> ──► Supervisor::apply (the only executor): Signal, AskToStop, Kill, Retire,
//!   Promote, Replace, Receiving, Notify, Answer, Progress, Reloaded/ReadyMetric/RestartMetric
//! ```
//!
//! Starting a worker is the one call whose result the core waits for: the driver launches
//! (`Supervisor::launch`) and gives the pid, or the error, straight back to the part that
//! asked (`Pool::started` / `start_failed`, `Rollouts::candidate_started` / `fail_rollout`,
//! `Health::replacing`). An in-place upgrade writes the core as it is plus the driver's
//! descriptors by name ([`handover`]); [`v2`] reads the previous release's format.

mod command;
pub mod document;
mod events;
mod exits;
mod fdstore;
pub mod handover;
mod health;
mod host;
mod manager;
mod outside;
mod pool;
pub mod readopt;
mod reload;
mod retire;
mod rollout;
mod spawned;
mod status;
#[cfg(test)]
mod tests;
pub(crate) mod v2;
mod watch;

use std::sync::Arc;
use std::time::Duration;

use nix::sys::wait::WaitStatus;
use tokio::sync::mpsc;

use crate::config::{Problems, Settings};
use crate::control::protocol::{ReloadOutcome, ScaleError};
use crate::listeners::Listeners;
pub use crate::mono::Mono;
use crate::notify::{Notifier, WorkerNotify};
use crate::output::Output;
use crate::requests::{Control, Scale, Waiter};
use crate::spawn::{Launcher, Spec};
use crate::steer::Steering;
use crate::worker::{Failure, Role};
use command::Command;
pub use fdstore::Store;
use handover::Upgrades;
use health::Health;
use manager::Manager;
use outside::Outside;
use pool::Pool;
use rollout::Rollouts;

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
    /// Workers install the bind interception filter (`--bind-intercept`, resolved: see
    /// `intercept::resolve`).
    pub bind_intercept: bool,
    /// Under systemd: what is kept in its fd store so that a restarted herdsman re-adopts the
    /// workers (see `fdstore`); workers then outlive herdsman. `None`: standalone.
    pub store: Option<Store>,
}

enum Event {
    Exited {
        pid: i32,
        status: WaitStatus,
    },
    /// A Node worker said something on its IPC channel.
    Channel {
        pid: i32,
        msg: crate::ipc::Incoming,
    },
    /// What a worker's bind filter saw (see `intercept`).
    Intercepted {
        pid: i32,
        seen: crate::intercept::Seen,
    },
    UpgradeChecked(Result<crate::upgrade::CheckReport, crate::upgrade::UpgradeError>),
}

/// The core: every decision's state, plain data (`serde`: an in-place upgrade writes it as
/// it is), no descriptor, no channel, no clock of its own.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Core {
    /// Every spec in use, once; read before everything that refers to one (see [`specs`]).
    #[serde(rename = "specs")]
    _specs: crate::specs::Table,
    settings: Settings,
    app: Arc<str>,
    /// Set once a stop began; the loop ends when no worker is left.
    stopping: bool,
    pool: Pool,
    rollouts: Rollouts,
    health: Health,
    manager: Manager,
    watching: watch::Watching,
}

impl serde::Serialize for Core {
    /// The fields in their order, the spec table first (what `Deserialize` reads them in).
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        struct Specs<'a>(&'a Core);
        impl serde::Serialize for Specs<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let core = self.0;
                crate::specs::Table::write(
                    core.pool.specs().chain(core.rollouts.specs()).cloned().collect(),
                    s,
                )
            }
        }
        let mut st = s.serialize_struct("Core", 9)?;
        st.serialize_field("specs", &Specs(self))?;
        st.serialize_field("settings", &self.settings)?;
        st.serialize_field("app", &self.app)?;
        st.serialize_field("stopping", &self.stopping)?;
        st.serialize_field("pool", &self.pool)?;
        st.serialize_field("rollouts", &self.rollouts)?;
        st.serialize_field("health", &self.health)?;
        st.serialize_field("manager", &self.manager)?;
        st.serialize_field("watching", &self.watching)?;
        st.end()
    }
}

impl Core {
    /// The settings in use.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// How many workers it knows.
    pub fn workers(&self) -> usize {
        self.pool.workers().len()
    }

    /// Replaces every value that may be a secret (the workers' environment) with `hidden`.
    pub(crate) fn redact(&mut self, hidden: &str) {
        for (_, v) in &mut self.settings.env {
            *v = hidden.to_string();
        }
        self.for_each_spec(&mut |spec| {
            for (_, v) in &mut Arc::make_mut(spec).env {
                *v = hidden.to_string();
            }
        });
    }

    fn for_each_spec(&mut self, f: &mut dyn FnMut(&mut Arc<Spec>)) {
        self.pool.for_each_spec(f);
        self.rollouts.for_each_spec(f);
    }
}

/// The driver: the core, and the resources and channels it decides about.
pub struct Supervisor {
    core: Core,
    upgrades: Upgrades,
    outside: Outside,
    /// Re-reads the configuration for a reload (`None`: reload the settings in use).
    reload_source: Option<ReloadSource>,
    /// The reload clients the core refers to by id.
    waiters: Waiters,
    /// `scale --wait` clients: answered once the pool has converged.
    scale_waiters: Vec<tokio::sync::oneshot::Sender<Result<usize, ScaleError>>>,
    /// systemd's fd store (see `fdstore`); `None` standalone.
    store: Option<Store>,
}

/// The driver's table of reload clients (their reply and progress channels), by the id the
/// core holds.
#[derive(Default)]
struct Waiters {
    next: u64,
    by_id: std::collections::HashMap<command::WaiterId, Waiter>,
}

impl Waiters {
    fn add(&mut self, w: Waiter) -> command::WaiterId {
        self.next += 1;
        let id = command::WaiterId(self.next);
        self.by_id.insert(id, w);
        id
    }

    fn progress(&self, ids: &[command::WaiterId], line: &str) {
        for tx in ids.iter().filter_map(|id| self.by_id.get(id)).filter_map(|w| w.progress.as_ref()) {
            let _ = tx.send(line.to_string());
        }
    }

    /// The clients `ids`, taken out of the table (to be answered).
    fn take(&mut self, ids: &[command::WaiterId]) -> Vec<Waiter> {
        ids.iter().filter_map(|id| self.by_id.remove(id)).collect()
    }
}

/// Runs the supervisor until a stop request has been carried out.
///
/// Everything it logs is inside one span, `loop` (`app`); what concerns one worker inside its
/// own (`worker`: `worker_id`, `worker_pid`, `worker_generation`; see `worker::span`).
pub async fn run(settings: Settings, world: World, controls: mpsc::Receiver<Control>) -> anyhow::Result<()> {
    use tracing::Instrument;
    let span = tracing::info_span!("loop", app = %settings.name);
    async move {
        let (sup, events) = Supervisor::new(settings, world, Box::new(host::RealHost))?;
        sup.drive(events, controls).await
    }
    .instrument(span)
    .await
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
        let mut launcher = Launcher::new(
            app.clone(),
            world.base_env,
            world.listeners.raw_fds(),
            fdnames,
            notify.address.clone(),
            world.output,
        )?;
        if world.bind_intercept {
            launcher.intercept_binds();
        }
        if world.store.is_some() {
            launcher.outlive_supervisor();
        }
        let (events, event_rx) = mpsc::unbounded_channel();
        let spec = Arc::new(launcher.pin(&settings, 1).map_err(|e| anyhow::anyhow!("{e}"))?);
        let now = host.now();
        let outside = Outside::new(
            host,
            world.notifier,
            launcher,
            world.listeners,
            world.steering,
            notify,
            world.metrics,
            events,
        )?;
        let core = Core {
            _specs: crate::specs::Table,
            pool: Pool::new(spec, settings.workers.get()),
            rollouts: Rollouts::new(),
            health: Health::new(),
            manager: Manager::new(world.watchdog, now),
            watching: Default::default(),
            settings,
            app,
            stopping: false,
        };
        let mut sup = Supervisor {
            core,
            reload_source: world.reload_source,
            waiters: Waiters::default(),
            scale_waiters: Vec::new(),
            upgrades: Upgrades::new(world.carry),
            outside,
            store: world.store,
        };
        if let Some(r) = world.resume {
            sup.resume(r, world.watchdog)?;
        } else {
            let sockets = sup.outside.sockets.join(", ");
            tracing::info!(
                workers = sup.core.pool.desired(),
                sockets = %sockets,
                "starting {} worker(s) of {:?} on {}",
                sup.core.pool.desired(),
                sup.core.settings.command.join(" "),
                sockets
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
        let notify = self.outside.notify.clone();
        let mut controls_open = true;
        loop {
            self.reconcile();
            if self.core.stopping && self.core.pool.workers().is_empty() {
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
            let now = self.now();
            self.on_timers(now);
        }
        tracing::info!("all workers stopped");
        self.clear_store();
        // Their metrics socket files and directories go now, before the notify socket's
        // directory (when the loop ends), so the runtime directory is left as it was found.
        self.outside.metrics.remove_files();
        Ok(())
    }
}

async fn sleep_until(at: Option<Mono>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.to_tokio()).await,
        None => std::future::pending().await,
    }
}

/// Gives reload clients their final answer.
fn answer(waiters: Vec<Waiter>, outcome: ReloadOutcome) {
    for tx in waiters.into_iter().filter_map(|w| w.reply) {
        let _ = tx.send(outcome.clone());
    }
}

impl Supervisor {
    /// The loop's clock.
    fn now(&self) -> Mono {
        self.outside.host.now()
    }

    /// The wall clock (seconds since the epoch), read by the host like [`Supervisor::now`].
    fn unix_now(&self) -> u64 {
        self.outside.host.unix_now()
    }

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
            Control::ReapOrphans => self.reap_orphans(),
            Control::Probe { reply } => {
                let _ = reply.send(!self.core.stopping && self.core.pool.all_ready());
            }
            Control::Upgrade { binary, reply, conn } => self.request_upgrade(binary, reply, conn),
            Control::Changed(changed) => {
                // Before the clock is read: a change after this one is sent again.
                let path = changed.take();
                let now = self.now();
                self.core.watching.changed(path, now);
            }
        }
    }

    /// Reaps every orphan that was re-parented to herdsman, never a worker (see `reaper`).
    fn reap_orphans(&mut self) {
        let workers = &self.core.pool.workers();
        for (pid, status) in crate::reaper::sweep(|pid| workers.contains_key(&pid)).unwrap_or_default() {
            tracing::debug!("reaped orphan {pid}: it {}", exits::describe_exit(status));
        }
    }

    fn scale(&mut self, scale: Scale) -> Result<usize, ScaleError> {
        let want = self.core.pool.target(scale)?;
        if want != self.core.pool.desired() {
            tracing::info!("scaling from {} to {want} worker(s)", self.core.pool.desired());
        }
        self.set_desired(want);
        Ok(want)
    }

    /// The wanted number of workers; sticky steering hashes clients over that many slots.
    fn set_desired(&mut self, n: usize) {
        self.core.pool.set_desired(n);
        self.outside.set_slots(n);
    }

    fn stop(&mut self) {
        let (now, unix) = (self.now(), self.unix_now());
        let commands = self.core.stop(now, unix);
        self.apply(commands);
    }

    /// Carries out what a part decided, in order.
    fn apply(&mut self, effects: Vec<Command>) {
        for e in effects {
            match e {
                Command::Promote { slot, new, kill_old } => self.promote(slot, new, kill_old),
                Command::Kill { pid, failure } => self.kill_now(pid, failure),
                Command::Retire(pid) => self.retire(pid),
                Command::Replace { old, failure, hard } => self.replace(old, failure, hard),
                Command::Notify(msg) => self.outside.notifier.send(&msg),
                Command::Answer { waiters, outcome } => answer(self.waiters.take(&waiters), outcome),
                Command::Progress { waiters, line } => self.waiters.progress(&waiters, &line),
                Command::Reloaded { ok, took } => self.outside.metrics.reloaded(ok, took),
                Command::ReadyMetric { took } => self.outside.metrics.ready(took),
                Command::RestartMetric { slot } => self.outside.metrics.restarted(slot),
                Command::Signal { pid, sig, group } => self.outside.signal(pid, sig, group),
                Command::AskToStop(pid) => {
                    if let Some(w) = self.core.pool.worker(pid) {
                        self.outside.ask_to_stop(w);
                    }
                }
                Command::Receiving { pid, on } => self.outside.steer_receiving(pid, on),
                Command::SampleMemory => self.sample_memory(),
            }
        }
    }

    /// SIGKILLs `pid`'s process group at once (see [`Core::kill`]).
    fn kill_now(&mut self, pid: i32, failure: Option<Failure>) {
        let commands = self.core.kill(pid, failure);
        self.apply(commands);
    }

    /// Stops `pid` gracefully (see [`Core::retire`]); whether it receives new connections
    /// (steered sockets) is the driver's to say.
    fn retire(&mut self, pid: i32) {
        let now = self.now();
        let receiving = self.outside.is_receiving(pid);
        let commands = self.core.retire(pid, receiving, now);
        self.apply(commands);
    }

    /// Makes `new` the active worker of `slot` (see [`Core::promote`]).
    fn promote(&mut self, slot: usize, new: i32, kill_old: bool) {
        let commands = self.core.promote(slot, new, kill_old);
        self.apply(commands);
    }

    /// Starts a replacement for the unhealthy `old` in its slot; it takes over once ready.
    fn replace(&mut self, old: i32, failure: Failure, hard: bool) {
        let Some((slot, spec)) = self.core.replace(old, failure) else { return };
        match self.launch(slot, &spec, Role::Replacement) {
            Ok(new) => self.core.health.replacing(new, old, hard),
            Err(e) => {
                let commands = self.core.replacement_start_failed(old, slot, hard, &e);
                self.apply(commands);
            }
        }
    }

    fn next_deadline(&self) -> Option<Mono> {
        let now = self.now();
        self.core
            .pool
            .deadlines(now)
            .chain(self.core.health.deadlines(&self.core.pool))
            .chain(self.core.rollouts.deadlines(&self.core.pool))
            .chain(self.core.manager.deadlines(now, self.outside.notifier.has_backlog()))
            .chain(self.upgrades.deadline())
            .chain(self.watch_deadline())
            .chain(self.store_deadline())
            .min()
    }

    /// Answers the `scale --wait` clients with `result`.
    fn answer_scale(&mut self, result: Result<usize, ScaleError>) {
        for tx in self.scale_waiters.drain(..) {
            let _ = tx.send(result.clone());
        }
    }

    /// Moves the world toward the wanted state. Called after every event.
    fn reconcile(&mut self) {
        let now = self.now();
        // Retry notifications the manager had no room for (next_deadline wakes us for it).
        self.outside.notifier.flush();
        if !self.core.stopping {
            self.reconcile_slots(now);
            self.drive_rollout();
            self.drive_watch();
            let effects = self.core.health.promote_ready(&mut self.core.pool);
            self.apply(effects);
            if !self.scale_waiters.is_empty() {
                if let Some(result) = self.core.pool.scale_result() {
                    self.answer_scale(result);
                }
            }
            self.drive_upgrade();
        } else {
            self.drive_upgrade();
            self.answer_scale(Err(ScaleError::Stopping));
        }
        if self.core.manager.ready_once(self.core.pool.settled(), self.core.stopping) {
            self.outside.notifier.send("READY=1");
            tracing::info!("started: {}", self.status_line());
        }
        let status = self.status_line();
        if let Some(msg) = self.core.manager.status(status) {
            self.outside.notifier.send(&msg);
        }
        self.sync_store();
    }

    /// Fills the empty slots (what to start is the core's; starting is the driver's).
    fn reconcile_slots(&mut self, now: Mono) {
        let (commands, start) = self.core.slots_to_fill(now);
        self.apply(commands);
        for (id, spec) in start {
            match self.launch(id, &spec, Role::Active) {
                Ok(pid) => self.core.slot_started(id, pid),
                Err(e) => self.core.slot_start_failed(id, &e, now),
            }
        }
    }

    /// Starts a worker for slot `id` running `spec`, keeps its descriptors and gives the pid
    /// to the core (the one call whose result the core waits for).
    fn launch(&mut self, id: usize, spec: &Arc<Spec>, role: Role) -> Result<i32, crate::spawn::SpawnError> {
        let pid = self.outside.launch(id, spec)?;
        let (has_channel, intercepted) = self
            .outside
            .fds
            .get(&pid)
            .map_or((false, false), |f| (f.channel.is_some(), f.bind_notify.is_some()));
        let now = self.now();
        self.core.started(id, spec, role, pid, has_channel, intercepted, now);
        Ok(pid)
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
