//! The in-process tier: the supervisor's state machine driven by hand, with no process forked.
//!
//! A [`Fake`] host hands out made-up pids, records every effect (spawn, signal, reap) and owns
//! the clock; the test feeds the events a real loop would get (a worker's `READY=1`, its exit,
//! a request, time passing) and checks the supervisor's state (`status`), its effects and what
//! it told the service manager (a real datagram socket standing in for `NOTIFY_SOCKET`). The
//! real-process tests in `tests/` stay the truth for the fork/exec side; these pin down the
//! decisions: coalescing, abort on failure, back-off, scaling and stopping during a roll-out,
//! and the notify sequence.

use crate::mono::Mono;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::os::fd::{OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;
use tokio::sync::{mpsc, oneshot};

use super::host::Host;
use super::outside::WorkerFds;
use super::{Event, Supervisor, World};
use crate::control::protocol::{ReloadOutcome, Scale, ScaleError, Snapshot, WorkerState};
use crate::listeners::Listeners;
use crate::notify::{Message, Notifier};
use crate::requests::{Control, Waiter};
use crate::spawn::{Launched, Launcher, SpawnError, Spec};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Effect {
    Spawn { pid: i32, slot: usize, generation: u64 },
    Signal { pid: i32, sig: Signal },
    Message { pid: i32, text: String },
    Reap { pid: i32 },
}

#[derive(Clone)]
struct Fake {
    clock: Rc<Cell<Mono>>,
    next_pid: Rc<Cell<i32>>,
    log: Rc<RefCell<Vec<Effect>>>,
    /// What `memory` reports, by pid (0 for the others).
    rss: Rc<RefCell<HashMap<i32, u64>>>,
    /// While set, every launch fails.
    broken: Rc<Cell<bool>>,
    /// When each stop signal or message was sent: (pid, clock); SIGKILL is left out.
    stops: Rc<RefCell<Vec<(i32, Mono)>>>,
    /// Signals a real host would send to a worker's process group by pgid: (pgid, signal).
    /// Every fake pidfd is readable (it is `/dev/null`): a re-adopted worker's gets none.
    groups: Rc<RefCell<Vec<(i32, Signal)>>>,
    /// Each watched worker, and whether its leftovers would be killed by pgid after its exit
    /// (a real host's `watch_exit`): never for a re-adopted one.
    watched: Rc<RefCell<HashMap<i32, bool>>>,
}

fn devnull() -> OwnedFd {
    OwnedFd::from(std::fs::File::open("/dev/null").unwrap())
}

impl Host for Fake {
    fn now(&self) -> Mono {
        self.clock.get()
    }

    fn unix_now(&self) -> u64 {
        1_700_000_000 + self.clock.get().as_nanos() / 1_000_000_000
    }

    fn launch(
        &mut self,
        _: &Launcher,
        spec: &Spec,
        slot: usize,
        _: Option<&[RawFd]>,
        _: Option<&str>,
    ) -> Result<Launched, SpawnError> {
        if self.broken.get() {
            return Err(SpawnError::Gone { path: "/fake/app".into(), generation: spec.generation });
        }
        let pid = self.next_pid.get();
        self.next_pid.set(pid + 1);
        self.log.borrow_mut().push(Effect::Spawn { pid, slot, generation: spec.generation });
        let (_done, output_done) = mpsc::channel(1);
        Ok(Launched {
            pid,
            pidfd: devnull(),
            tail: Default::default(),
            pipes: [Arc::new(devnull()), Arc::new(devnull())],
            output_done,
            channel: None,
            bind_notify: None,
        })
    }

    fn watch(
        &mut self,
        pid: i32,
        _: Arc<OwnedFd>,
        _: mpsc::Receiver<()>,
        _: &mpsc::UnboundedSender<Event>,
        readopted: bool,
    ) {
        self.watched.borrow_mut().insert(pid, !readopted);
    }

    fn signal(&mut self, pid: i32, fds: &WorkerFds, sig: Signal, group: bool) {
        self.log.borrow_mut().push(Effect::Signal { pid, sig });
        if group && super::host::group_signal_allowed(fds) {
            self.groups.borrow_mut().push((pid, sig));
        }
        // SIGKILL is no request to stop (a failed candidate, a hung worker after its stop).
        if sig != Signal::SIGKILL {
            self.stops.borrow_mut().push((pid, self.clock.get()));
        }
    }

    fn message(&mut self, pid: i32, _: &WorkerFds, message: &str) -> std::io::Result<()> {
        self.log.borrow_mut().push(Effect::Message { pid, text: message.to_string() });
        self.stops.borrow_mut().push((pid, self.clock.get()));
        Ok(())
    }

    fn reap(&mut self, pid: i32, _: &WorkerFds) {
        self.log.borrow_mut().push(Effect::Reap { pid });
    }

    fn memory(&mut self, _: &[i32]) -> HashMap<i32, u64> {
        self.rss.borrow().clone()
    }
}

/// A supervisor on a fake host, and what it told the "service manager".
struct Sim {
    sup: Supervisor,
    host: Fake,
    manager: UnixDatagram,
    told: Vec<String>,
    /// When each worker was made ready (by [`Sim::ready`]).
    readied: HashMap<i32, Mono>,
    _events: mpsc::UnboundedReceiver<Event>,
    _dir: std::path::PathBuf,
}

/// `extra`: more TOML lines (e.g. `min_ready = "0s"`).
fn sim(workers: usize, extra: &str) -> Sim {
    sim_of(false, workers, extra)
}

/// With `node`: the program is an executable file named `node` (so its workers would get an
/// IPC channel; the fake host starts nothing).
fn sim_of(node: bool, workers: usize, extra: &str) -> Sim {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("herdsman-core-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let command = if node {
        use std::os::unix::fs::PermissionsExt;
        let program = dir.join("node");
        std::fs::write(&program, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
        format!("[{:?}, \"app.js\"]", program.display().to_string())
    } else {
        "[\"sh\", \"-c\", \"true\"]".to_string()
    };
    let file = dir.join("app.toml");
    std::fs::write(
        &file,
        format!(
            "name = \"core\"\ncommand = {command}\nworkers = {workers}\nlisten = [\"127.0.0.1:1\"]\nready = \"notify\"\n{extra}\n"
        ),
    )
    .unwrap();
    let settings =
        crate::config::load(Some(&file), &Default::default(), std::num::NonZeroUsize::MIN).unwrap();
    sim_with(settings, dir, None, Mono::now(), 1000)
}

/// A supervisor on a fresh fake host whose clock reads `now` and whose next pid is
/// `next_pid`; with `resume`, it takes that state over (as a new image does after an upgrade).
fn sim_with(
    settings: crate::config::Settings,
    dir: std::path::PathBuf,
    resume: Option<super::handover::Resumed>,
    now: Mono,
    next_pid: i32,
) -> Sim {
    sim_in(settings, dir, resume, now, next_pid, |_| {})
}

/// [`sim_with`], with `world` changed by `change` first.
fn sim_in(
    settings: crate::config::Settings,
    dir: std::path::PathBuf,
    resume: Option<super::handover::Resumed>,
    now: Mono,
    next_pid: i32,
    change: impl FnOnce(&mut World),
) -> Sim {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let name = format!("herdsman-core-test/{}/m{n}", std::process::id());
    let manager = UnixDatagram::bind_addr(
        &<std::os::unix::net::SocketAddr as std::os::linux::net::SocketAddrExt>::from_abstract_name(
            name.as_bytes(),
        )
        .unwrap(),
    )
    .unwrap();
    manager.set_nonblocking(true).unwrap();
    let mut world = World {
        listeners: Listeners::none(),
        notifier: Notifier::new(Some(&format!("@{name}"))).unwrap(),
        base_env: vec![("PATH".into(), "/usr/bin:/bin".into())],
        output: crate::output::Output::standalone(false, crate::logs::Ring::default()),
        reload_source: None,
        watchdog: None,
        notify_dir: None,
        steering: None,
        metrics: crate::metrics::Metrics::disabled(),
        carry: None,
        notify: None,
        resume,
        bind_intercept: false,
        store: None,
    };
    change(&mut world);
    let host = Fake {
        clock: Rc::new(Cell::new(now)),
        next_pid: Rc::new(Cell::new(next_pid)),
        log: Default::default(),
        rss: Default::default(),
        broken: Default::default(),
        stops: Default::default(),
        groups: Default::default(),
        watched: Default::default(),
    };
    let (sup, events) = Supervisor::new(settings, world, Box::new(host.clone())).unwrap();
    let mut s =
        Sim { sup, host, manager, told: Vec::new(), readied: HashMap::new(), _events: events, _dir: dir };
    s.sup.reconcile();
    s
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self._dir);
    }
}

impl Sim {
    /// What the loop does after every event.
    fn settle(&mut self) {
        let now = self.host.clock.get();
        self.sup.on_timers(now);
        self.sup.reconcile();
    }

    fn advance(&mut self, d: Duration) {
        self.host.clock.set(self.host.clock.get() + d);
        self.settle();
    }

    fn ready(&mut self, pid: i32) {
        self.readied.entry(pid).or_insert(self.host.clock.get());
        self.sup.on_notify(Message { pid, assignments: vec![("READY".into(), "1".into())] });
        self.settle();
    }

    fn ping(&mut self, pid: i32) {
        self.sup.on_notify(Message { pid, assignments: vec![("WATCHDOG".into(), "1".into())] });
        self.settle();
    }

    fn exit(&mut self, pid: i32, code: i32) {
        self.sup.on_event(Event::Exited { pid, status: WaitStatus::Exited(Pid::from_raw(pid), code) });
        self.settle();
    }

    /// Starts a reload and moves it to its second slot: the canary took over slot 0 (its old
    /// worker exited), slot 1's new worker is starting. Returns the reload's answer, the old
    /// workers' pids (by slot), the canary and slot 1's new worker.
    fn reload_past_the_canary(&mut self) -> (oneshot::Receiver<ReloadOutcome>, Vec<i32>, i32, i32) {
        let old: Vec<i32> = self.spawned().iter().map(|p| p.0).collect();
        let reload = self.reload();
        let canary = self.of_generation(2)[0];
        self.ready(canary);
        self.advance(self.sup.core.settings.min_ready);
        self.exit(old[0], 0);
        let candidate = *self.of_generation(2).last().expect("slot 1's new worker");
        assert_ne!(candidate, canary);
        (reload, old, canary, candidate)
    }

    fn reload(&mut self) -> oneshot::Receiver<ReloadOutcome> {
        let (tx, rx) = oneshot::channel();
        self.sup.on_control(Control::Reload(Waiter { reply: Some(tx), progress: None }));
        self.settle();
        rx
    }

    fn stop(&mut self) {
        self.sup.on_control(Control::Stop);
        self.settle();
    }

    fn scale(&mut self, scale: Scale, wait: bool) -> oneshot::Receiver<Result<usize, ScaleError>> {
        let (tx, rx) = oneshot::channel();
        self.sup.on_control(Control::Scale { scale, wait, reply: Some(tx) });
        self.settle();
        rx
    }

    fn status(&self) -> Snapshot {
        self.sup.snapshot()
    }

    fn effects(&self) -> Vec<Effect> {
        self.host.log.borrow().clone()
    }

    /// Pids spawned so far, with their generation, in order.
    fn spawned(&self) -> Vec<(i32, u64)> {
        self.effects()
            .iter()
            .filter_map(|e| match e {
                Effect::Spawn { pid, generation, .. } => Some((*pid, *generation)),
                _ => None,
            })
            .collect()
    }

    fn signalled(&self, pid: i32) -> Vec<Signal> {
        self.effects()
            .iter()
            .filter_map(|e| match e {
                Effect::Signal { pid: p, sig } if *p == pid => Some(*sig),
                _ => None,
            })
            .collect()
    }

    /// Pids of the workers that run now (not stopping), by slot.
    fn serving(&self) -> Vec<(usize, i32, u64)> {
        self.status()
            .workers
            .iter()
            .filter(|w| w.state != WorkerState::Stopping)
            .filter_map(|w| Some((w.id, w.pid?, w.generation)))
            .collect()
    }

    /// Those of `pids` that were told to stop (signal or message) before a later worker of
    /// their slot had been ready for `min_ready`: the roll-out's safety rule says there are
    /// none.
    fn stopped_early(&self, pids: &[i32]) -> Vec<i32> {
        let spawns: Vec<(i32, usize, u64)> = self
            .effects()
            .iter()
            .filter_map(|e| match e {
                Effect::Spawn { pid, slot, generation } => Some((*pid, *slot, *generation)),
                _ => None,
            })
            .collect();
        let min_ready = self.sup.core.settings.min_ready;
        let stops = self.host.stops.borrow();
        let mut early = Vec::new();
        for (pid, at) in stops.iter() {
            if !pids.contains(pid) {
                continue;
            }
            let Some((_, slot, _)) = spawns.iter().find(|(p, _, _)| p == pid) else { continue };
            // Pids are handed out in order: a later worker has a higher one.
            let held = spawns.iter().any(|(p, s, _)| {
                s == slot && p > pid && self.readied.get(p).is_some_and(|r| *r + min_ready <= *at)
            });
            if !held {
                early.push(*pid);
            }
        }
        early
    }

    /// The pids of generation `g` spawned so far.
    fn of_generation(&self, g: u64) -> Vec<i32> {
        self.spawned().iter().filter(|p| p.1 == g).map(|p| p.0).collect()
    }

    /// Everything sent to the service manager so far, one datagram each.
    fn told(&mut self) -> &[String] {
        let mut buf = [0u8; 4096];
        while let Ok(n) = self.manager.recv(&mut buf) {
            self.told.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        &self.told
    }

    /// Makes every worker that is starting now ready.
    fn all_ready_now(&mut self) {
        let starting: Vec<i32> = self
            .status()
            .workers
            .iter()
            .filter(|w| matches!(w.state, WorkerState::Starting | WorkerState::StartingNew))
            .filter_map(|w| w.pid)
            .collect();
        for pid in starting {
            self.ready(pid);
        }
    }

    /// Starts every slot's first worker and makes it ready.
    fn all_ready(&mut self) {
        for (pid, _) in self.spawned() {
            self.ready(pid);
        }
    }

    /// Carries a roll-out through: each new worker gets ready, holds `min_ready`, and each
    /// old one exits once told to stop. Returns when no worker is starting or stopping.
    fn finish_rollout(&mut self) {
        self.rollout_until(|_| false);
    }

    /// Like [`Sim::finish_rollout`], stopping early once `done` says so.
    fn rollout_until(&mut self, mut done: impl FnMut(&mut Sim) -> bool) {
        for _ in 0..100 {
            if done(self) {
                return;
            }
            let st = self.status();
            let mut moved = false;
            for w in &st.workers {
                let Some(pid) = w.pid else { continue };
                if w.state == WorkerState::StartingNew {
                    self.ready(pid);
                    moved = true;
                } else if w.state == WorkerState::Stopping {
                    self.exit(pid, 0);
                    moved = true;
                }
            }
            if !moved {
                if st.workers.iter().any(|w| w.state == WorkerState::Holding) {
                    self.advance(self.sup.core.settings.min_ready);
                } else {
                    return;
                }
            }
        }
        panic!("the roll-out did not finish: {:?}", self.status().workers);
    }
}

fn answer(rx: &mut oneshot::Receiver<ReloadOutcome>) -> Option<ReloadOutcome> {
    rx.try_recv().ok()
}

mod lifecycle;
mod readopt;
mod restore;
mod rollout;
mod watch;
