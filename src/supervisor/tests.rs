//! The in-process tier: the supervisor's state machine driven by hand, with no process forked.
//!
//! A [`Fake`] host hands out made-up pids, records every effect (spawn, signal, reap) and owns
//! the clock; the test feeds the events a real loop would get (a worker's `READY=1`, its exit,
//! a request, time passing) and checks the supervisor's state (`status`), its effects and what
//! it told the service manager (a real datagram socket standing in for `NOTIFY_SOCKET`). The
//! real-process tests in `tests/` stay the truth for the fork/exec side; these pin down the
//! decisions: coalescing, abort on failure, back-off, scaling and stopping during a roll-out,
//! and the notify sequence.

use super::clock::Mono;
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

    fn watch(&mut self, _: i32, _: Arc<OwnedFd>, _: mpsc::Receiver<()>, _: &mpsc::UnboundedSender<Event>) {}

    fn signal(&mut self, pid: i32, _: &WorkerFds, sig: Signal, _group: bool) {
        self.log.borrow_mut().push(Effect::Signal { pid, sig });
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
    let name = format!("herdsman-core-test/{}/{n}", std::process::id());
    let manager = UnixDatagram::bind_addr(
        &<std::os::unix::net::SocketAddr as std::os::linux::net::SocketAddrExt>::from_abstract_name(
            name.as_bytes(),
        )
        .unwrap(),
    )
    .unwrap();
    manager.set_nonblocking(true).unwrap();
    let world = World {
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
        resume: None,
        bind_intercept: false,
    };
    let host = Fake {
        clock: Rc::new(Cell::new(Mono::now())),
        next_pid: Rc::new(Cell::new(1000)),
        log: Default::default(),
        rss: Default::default(),
        broken: Default::default(),
        stops: Default::default(),
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

#[tokio::test]
async fn ready_is_told_once_every_slot_is_ready() {
    let mut s = sim(2, "");
    let pids = s.spawned();
    assert_eq!(pids.len(), 2);
    s.ready(pids[0].0);
    assert!(!s.told().iter().any(|m| m == "READY=1"), "READY=1 before every slot was ready");
    s.ready(pids[1].0);
    assert_eq!(s.told().iter().filter(|m| *m == "READY=1").count(), 1);
    assert_eq!(s.status().ready, 2);
}

#[tokio::test]
async fn a_reload_never_stops_an_old_worker_before_its_replacement_held_min_ready() {
    let mut s = sim(2, "");
    s.all_ready();
    let old: Vec<i32> = s.serving().iter().map(|w| w.1).collect();
    let mut rx = s.reload();
    let new = *s.spawned().last().unwrap();
    assert_eq!(new.1, 2, "one new worker of generation 2 (reload_batch = 1)");
    assert_eq!(s.spawned().len(), 3);
    s.ready(new.0);
    s.advance(s.sup.core.settings.min_ready - Duration::from_millis(1));
    assert!(old.iter().all(|p| s.signalled(*p).is_empty()), "an old worker was stopped within min_ready");
    s.advance(Duration::from_millis(1));
    let stopped: Vec<i32> = old.iter().copied().filter(|p| s.signalled(*p) == [Signal::SIGTERM]).collect();
    assert_eq!(stopped.len(), 1, "exactly one old worker stopped once its replacement held");
    s.finish_rollout();
    let outcome = answer(&mut rx).expect("the reload was answered");
    assert!(outcome.ok && outcome.generation == 2, "{outcome:?}");
    assert!(s.serving().iter().all(|w| w.2 == 2));
    assert!(old.iter().all(|p| s.effects().contains(&Effect::Reap { pid: *p })));
}

#[tokio::test]
async fn the_first_slot_is_a_canary_then_the_next_slots_new_worker_starts_while_the_previous_one_holds_min_ready_and_no_old_worker_stops_before_its_own_replacement_held()
 {
    let mut s = sim(4, "");
    s.all_ready();
    let old = s.of_generation(1);
    let mut rx = s.reload();
    let min_ready = s.sup.core.settings.min_ready;
    let half = min_ready / 2;
    assert_eq!(s.of_generation(2).len(), 1, "one new worker starting at a time (reload_batch = 1)");
    // The canary: slot 0's new worker is ready and holds alone.
    s.ready(s.of_generation(2)[0]);
    assert_eq!(s.of_generation(2).len(), 1, "nothing else starts while the canary holds");
    s.advance(min_ready - Duration::from_millis(1));
    assert!(
        old.iter().all(|p| s.signalled(*p).is_empty()),
        "an old worker stopped within the canary's min_ready"
    );
    s.advance(Duration::from_millis(1));
    assert_eq!(s.signalled(old[0]), [Signal::SIGTERM], "the canary held: slot 0's old worker drains");
    assert_eq!(s.of_generation(2).len(), 2, "slot 1's new worker starts once the canary moved");
    // Slot 1's new worker is ready: slot 2's starts at once, while slot 1's holds.
    s.ready(s.of_generation(2)[1]);
    assert_eq!(
        s.of_generation(2).len(),
        3,
        "the next slot's new worker waits for the previous one's min_ready"
    );
    assert!(s.signalled(old[1]).is_empty(), "slot 1's old worker stopped before its replacement held");
    s.advance(half);
    s.ready(s.of_generation(2)[2]);
    assert_eq!(s.of_generation(2).len(), 4);
    assert!(old[1..].iter().all(|p| s.signalled(*p).is_empty()), "an old worker stopped within min_ready");
    // Slot 1's new worker held: only slot 1's old worker is stopped.
    s.advance(half);
    let stopped: Vec<i32> = old.iter().copied().filter(|p| !s.signalled(*p).is_empty()).collect();
    assert_eq!(stopped, [old[0], old[1]]);
    s.finish_rollout();
    assert!(answer(&mut rx).is_some_and(|o| o.ok && o.generation == 2));
    assert!(s.serving().iter().all(|w| w.2 == 2), "{:?}", s.serving());
    assert_eq!(s.stopped_early(&old), Vec::<i32>::new());
    assert!(old.iter().all(|p| s.signalled(*p) == [Signal::SIGTERM]), "every old worker drained once");
}

#[tokio::test]
async fn a_new_worker_that_fails_while_holding_ends_the_ones_started_meanwhile_and_no_old_worker_of_theirs_is_stopped()
 {
    // `on_failure = "keep"`: the canary's slot stays moved, the rest must be untouched.
    let mut s = sim(3, "on_failure = \"keep\"");
    s.all_ready();
    let old = s.of_generation(1);
    let mut rx = s.reload();
    s.ready(s.of_generation(2)[0]);
    s.advance(s.sup.core.settings.min_ready);
    assert_eq!(s.signalled(old[0]), [Signal::SIGTERM], "the canary moved");
    s.exit(old[0], 0);
    s.ready(s.of_generation(2)[1]);
    let new = s.of_generation(2);
    assert_eq!(new.len(), 3, "slot 2's new worker started while slot 1's holds");
    // Slot 1's new worker dies within min_ready (slot 2's starts).
    s.exit(new[1], 1);
    let outcome = answer(&mut rx).expect("answered at once");
    assert!(!outcome.ok && outcome.message.contains("within min_ready"), "{outcome:?}");
    assert_eq!(s.signalled(new[2]), [Signal::SIGKILL], "the starting new worker is killed");
    assert!(old[1..].iter().all(|p| s.signalled(*p).is_empty()), "an old worker was stopped");
    s.exit(new[2], -1);
    s.advance(Duration::from_secs(5));
    let serving: Vec<i32> = s.serving().iter().map(|w| w.1).collect();
    assert_eq!(serving[0], new[0], "kept: the canary serves slot 0");
    assert_eq!(&serving[1..], &old[1..]);
    assert_eq!(s.of_generation(2).len(), 3, "nothing more of the new generation starts");
    assert_eq!(s.status().last_reload.map(|l| l.result), Some("failed".to_string()));
}

#[tokio::test]
async fn a_canary_that_fails_while_holding_alone_fails_the_reload_with_every_old_worker_untouched() {
    let mut s = sim(3, "");
    s.all_ready();
    let old = s.of_generation(1);
    let mut rx = s.reload();
    let canary = s.of_generation(2)[0];
    s.ready(canary);
    s.advance(s.sup.core.settings.min_ready / 2);
    assert_eq!(s.of_generation(2).len(), 1, "nothing else started while the canary holds");
    s.exit(canary, 1);
    let outcome = answer(&mut rx).expect("answered at once");
    assert!(
        !outcome.ok && outcome.message.contains("every worker keeps running the previous code"),
        "{outcome:?}"
    );
    assert!(old.iter().all(|p| s.signalled(*p).is_empty()), "an old worker was stopped");
    s.advance(Duration::from_secs(5));
    assert_eq!(s.serving().iter().map(|w| w.1).collect::<Vec<_>>(), old);
}

#[tokio::test]
async fn a_failure_after_overlapping_slots_moved_rolls_back_and_the_app_ends_on_one_generation() {
    let mut s = sim(4, "");
    s.all_ready();
    let old = s.of_generation(1);
    let mut rx = s.reload();
    // The canary moves slot 0; its old worker drains and exits.
    s.ready(s.of_generation(2)[0]);
    s.advance(s.sup.core.settings.min_ready);
    assert_eq!(s.signalled(old[0]), [Signal::SIGTERM]);
    s.exit(old[0], 0);
    s.ready(s.of_generation(2)[1]);
    s.ready(s.of_generation(2)[2]);
    let new = s.of_generation(2);
    assert_eq!(new.len(), 4);
    // Slot 1's new worker dies while holding; slot 2's holds, slot 3's starts.
    s.exit(new[1], 1);
    assert!(answer(&mut rx).is_none(), "answered before the rollback ran");
    assert_eq!(s.signalled(new[2]), [Signal::SIGTERM], "holding: drains");
    assert_eq!(s.signalled(new[3]), [Signal::SIGKILL], "starting: killed");
    s.exit(new[2], -1);
    s.exit(new[3], -1);
    s.finish_rollout();
    let outcome = answer(&mut rx).expect("answered after the rollback");
    assert!(
        !outcome.ok && outcome.message.contains("rolled back 1 worker(s) to generation 1"),
        "{outcome:?}"
    );
    let serving = s.serving();
    assert_eq!(serving.len(), 4, "{serving:?}");
    assert!(serving.iter().all(|w| w.2 == 1), "the app ends on one generation: {serving:?}");
    assert_eq!(&serving[1..].iter().map(|w| w.1).collect::<Vec<_>>(), &old[1..], "slots 1-3 never moved");
    assert_eq!(s.stopped_early(&old), Vec::<i32>::new());
    assert_eq!(
        s.stopped_early(&new[..1]),
        Vec::<i32>::new(),
        "the rolled-back worker held its replacement too"
    );
    let last = s.status().last_reload.expect("a last reload");
    assert_eq!((last.result.as_str(), last.rollback.as_deref()), ("failed", Some("ok")));
}

#[tokio::test]
async fn a_new_version_that_dies_before_it_is_ready_starts_one_new_worker_only() {
    let mut s = sim(4, "");
    s.all_ready();
    let mut rx = s.reload();
    s.exit(s.of_generation(2)[0], 3);
    assert!(answer(&mut rx).is_some_and(|o| !o.ok));
    s.advance(Duration::from_secs(5));
    assert_eq!(s.of_generation(2).len(), 1, "a crash-looping version costs one start, not one per slot");
}

#[tokio::test]
async fn reload_surge_caps_the_new_workers_running_at_once() {
    for surge in [1usize, 2] {
        let mut s = sim(4, &format!("reload_surge = {surge}"));
        s.all_ready();
        let old = s.of_generation(1);
        let mut rx = s.reload();
        // The canary first, alone.
        s.ready(s.of_generation(2)[0]);
        s.advance(s.sup.core.settings.min_ready);
        for i in 1..=surge {
            s.ready(s.of_generation(2)[i]);
        }
        assert_eq!(s.of_generation(2).len(), 1 + surge, "reload_surge = {surge}: more new workers at once");
        s.advance(s.sup.core.settings.min_ready);
        assert_eq!(
            s.of_generation(2).len(),
            (2 + surge).min(4),
            "reload_surge = {surge}: the next starts once one moved"
        );
        s.finish_rollout();
        assert!(answer(&mut rx).is_some_and(|o| o.ok));
        assert_eq!(s.stopped_early(&old), Vec::<i32>::new());
    }
}

/// A small deterministic generator for [`the_safety_rule_holds_on_any_schedule`].
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 33) % n as u64) as usize
    }
}

#[tokio::test]
async fn the_safety_rule_holds_on_any_schedule() {
    // Many schedules of readiness, time, old workers exiting and new workers failing (before
    // or while holding, or after they took over): no worker is ever told to stop before a
    // later worker of its slot held min_ready, and every reload ends with one generation.
    for seed in 0..200u64 {
        let mut g = Lcg(seed);
        let workers = 1 + g.below(5);
        let batch = 1 + g.below(2);
        let mut s = sim(workers, &format!("reload_batch = {batch}"));
        s.all_ready();
        let mut rx = s.reload();
        let mut outcome = None;
        // Workers that served as their slot's active worker (the rule is about them: a new
        // worker that never took over may be stopped when the roll-out aborts).
        let mut active = std::collections::BTreeSet::new();
        for _ in 0..400 {
            let st = s.status();
            active.extend(st.workers.iter().filter(|w| w.state == WorkerState::Ready).filter_map(|w| w.pid));
            outcome = outcome.or_else(|| answer(&mut rx));
            if outcome.is_some() {
                break;
            }
            let pick = |states: &[WorkerState], g: &mut Lcg| {
                let c: Vec<i32> =
                    st.workers.iter().filter(|w| states.contains(&w.state)).filter_map(|w| w.pid).collect();
                (!c.is_empty()).then(|| c[g.below(c.len())])
            };
            match g.below(10) {
                0..=3 => match pick(&[WorkerState::StartingNew], &mut g) {
                    Some(pid) => s.ready(pid),
                    None => s.advance(Duration::from_millis(100 * (1 + g.below(10)) as u64)),
                },
                4..=6 => s.advance(Duration::from_millis(100 * (1 + g.below(10)) as u64)),
                7 => {
                    if let Some(pid) = pick(&[WorkerState::Stopping], &mut g) {
                        s.exit(pid, 0);
                    }
                }
                8 if g.below(3) == 0 => {
                    let new = s.of_generation(2);
                    let alive: Vec<i32> =
                        new.into_iter().filter(|p| st.workers.iter().any(|w| w.pid == Some(*p))).collect();
                    if !alive.is_empty() {
                        s.exit(alive[g.below(alive.len())], 1);
                    }
                }
                _ => {}
            }
        }
        s.finish_rollout();
        let outcome = outcome.or_else(|| answer(&mut rx)).unwrap_or_else(|| panic!("seed {seed}: no answer"));
        let active: Vec<i32> = active.into_iter().collect();
        assert_eq!(s.stopped_early(&active), Vec::<i32>::new(), "seed {seed}");
        // Slots whose worker failed outside a roll-out restart after their back-off.
        s.advance(Duration::from_secs(31));
        s.all_ready_now();
        let generations: std::collections::BTreeSet<u64> = s.serving().iter().map(|w| w.2).collect();
        assert_eq!(generations.len(), 1, "seed {seed}: {outcome:?} ended on {:?}", s.serving());
        let want = if outcome.ok { 2 } else { 1 };
        assert!(
            generations.contains(&want) || !outcome.ok,
            "seed {seed}: {outcome:?} ended on {generations:?}"
        );
        assert_eq!(s.serving().len(), workers, "seed {seed}");
    }
}

#[tokio::test]
async fn a_roll_out_tells_the_manager_reloading_with_its_monotonic_time_then_ready() {
    let mut s = sim(1, "");
    s.all_ready();
    let before = s.told().len();
    let _rx = s.reload();
    s.finish_rollout();
    let told: Vec<String> = s.told()[before..].to_vec();
    let reloading = told.iter().position(|m| m.contains("RELOADING=1")).expect("RELOADING=1");
    assert!(told[reloading].contains("MONOTONIC_USEC="), "{told:?}");
    let ready = told.iter().rposition(|m| m == "READY=1").expect("READY=1 after the roll-out");
    assert!(ready > reloading, "{told:?}");
}

#[tokio::test]
async fn reloads_asked_for_during_a_roll_out_coalesce_into_one_more_roll_out() {
    let mut s = sim(2, "");
    s.all_ready();
    let mut first = s.reload();
    let mut second = s.reload();
    let mut third = s.reload();
    let mut got_first = None;
    s.rollout_until(|_| {
        got_first = answer(&mut first);
        got_first.is_some()
    });
    assert_eq!(got_first.map(|o| (o.ok, o.generation)), Some((true, 2)));
    assert!(answer(&mut second).is_none(), "the queued reloads wait for their own roll-out");
    s.finish_rollout();
    assert_eq!(answer(&mut second).map(|o| (o.ok, o.generation)), Some((true, 3)));
    assert_eq!(answer(&mut third).map(|o| (o.ok, o.generation)), Some((true, 3)));
    let generations: Vec<u64> = s.spawned().iter().map(|p| p.1).collect();
    assert_eq!(generations, [1, 1, 2, 2, 3, 3], "exactly one more roll-out for both queued reloads");
}

#[tokio::test]
async fn a_new_worker_that_fails_aborts_the_roll_out_and_no_old_worker_is_stopped() {
    let mut s = sim(3, "");
    s.all_ready();
    let old: Vec<i32> = s.serving().iter().map(|w| w.1).collect();
    let mut rx = s.reload();
    let new = s.spawned().last().unwrap().0;
    s.ready(new);
    // It dies while holding (a late crash, within min_ready).
    s.exit(new, 1);
    let outcome = answer(&mut rx).expect("answered at once");
    assert!(!outcome.ok, "{outcome:?}");
    assert!(outcome.message.contains("within min_ready"), "{}", outcome.message);
    assert!(old.iter().all(|p| s.signalled(*p).is_empty()), "an old worker was stopped");
    assert_eq!(s.serving().iter().map(|w| w.1).collect::<Vec<_>>(), old);
    assert_eq!(s.status().last_reload.map(|l| l.result), Some("failed".to_string()));
}

#[tokio::test]
async fn back_off_doubles_per_quick_failure_and_resets_after_a_good_run() {
    let mut s = sim(1, "");
    let mut pid = s.spawned()[0].0;
    for expected in [100u64, 200, 400] {
        s.exit(pid, 3);
        let spawns = s.spawned().len();
        s.advance(Duration::from_millis(expected - 1));
        assert_eq!(s.spawned().len(), spawns, "restarted before its {expected} ms back-off");
        s.advance(Duration::from_millis(1));
        assert_eq!(s.spawned().len(), spawns + 1, "not restarted after its {expected} ms back-off");
        pid = s.spawned().last().unwrap().0;
    }
    // A good run (ready for reset_after) forgives: the next crash restarts at once.
    s.ready(pid);
    s.advance(s.sup.core.settings.backoff.reset_after);
    let spawns = s.spawned().len();
    s.exit(pid, 3);
    assert_eq!(s.spawned().len(), spawns + 1, "a crash after a good run waits for nothing");
    assert_eq!(s.status().workers[0].restarts, 4);
}

#[tokio::test]
async fn scaling_up_during_a_roll_out_starts_the_new_slots_on_the_new_generation() {
    let mut s = sim(2, "");
    s.all_ready();
    let mut rx = s.reload();
    let (tx, mut scaled) = oneshot::channel::<Result<usize, ScaleError>>();
    s.sup.on_control(Control::Scale { scale: Scale::To(3), wait: false, reply: Some(tx) });
    s.settle();
    assert_eq!(scaled.try_recv().ok(), Some(Ok(3)));
    assert_eq!(s.spawned().iter().filter(|p| p.1 == 1).count(), 2, "no new slot on the old generation");
    s.finish_rollout();
    assert!(answer(&mut rx).is_some_and(|o| o.ok));
    let serving = s.serving();
    assert_eq!(serving.len(), 3, "{serving:?}");
    assert!(serving.iter().all(|w| w.2 == 2), "{serving:?}");
}

#[tokio::test]
async fn a_stop_during_a_roll_out_fails_the_reload_stops_old_and_new_workers_and_never_says_ready_again() {
    let mut s = sim(2, "");
    s.all_ready();
    let old: Vec<i32> = s.serving().iter().map(|w| w.1).collect();
    let mut rx = s.reload();
    let new = s.spawned().last().unwrap().0;
    let before = s.told().len();
    s.sup.on_control(Control::Stop);
    s.settle();
    let outcome = answer(&mut rx).expect("answered");
    assert!(!outcome.ok);
    for pid in &old {
        assert_eq!(s.signalled(*pid), [Signal::SIGTERM], "old worker {pid} drains");
    }
    // The roll-out's pending new worker served nothing yet: killed, not drained.
    assert_eq!(s.signalled(new), [Signal::SIGKILL]);
    let told: Vec<String> = s.told()[before..].to_vec();
    assert!(told.iter().any(|m| m.starts_with("STOPPING=1")), "{told:?}");
    assert!(!told.iter().any(|m| m == "READY=1"), "READY=1 after STOPPING=1: {told:?}");
    for (pid, _) in s.spawned() {
        s.exit(pid, 0);
    }
    assert!(s.sup.core.stopping && s.sup.core.pool.workers.is_empty(), "the loop would end now");
}

#[tokio::test]
async fn a_worker_not_ready_in_time_is_killed_and_its_slot_backs_off() {
    let mut s = sim(1, "ready_timeout = \"2s\"");
    let pid = s.spawned()[0].0;
    s.advance(Duration::from_secs(2));
    assert_eq!(s.signalled(pid), [Signal::SIGKILL]);
    s.exit(pid, -1);
    assert_eq!(s.status().workers[0].state, WorkerState::Backoff);
    assert!(s.status().status.contains("restarting in"), "{}", s.status().status);
}

#[tokio::test]
async fn a_hung_worker_is_replaced_first_and_killed_once_its_replacement_is_ready() {
    let mut s = sim(1, "watchdog = \"1s\"");
    s.all_ready();
    let old = s.spawned()[0].0;
    s.advance(Duration::from_secs(2));
    let spawned = s.spawned();
    assert_eq!(spawned.len(), 2, "a replacement started");
    let new = spawned[1].0;
    assert!(s.signalled(old).is_empty(), "the hung worker was stopped before its replacement was ready");
    s.ready(new);
    assert_eq!(s.signalled(old).first(), Some(&Signal::SIGKILL));
    assert_eq!(s.serving().iter().map(|w| w.1).collect::<Vec<_>>(), [new]);
    s.exit(old, -1);
    assert_eq!(s.status().workers[0].restarts, 1);
}

#[tokio::test]
async fn scaling_down_retires_the_highest_slots_and_answers_once_they_are_gone() {
    let mut s = sim(3, "");
    s.all_ready();
    let top = s.serving().iter().find(|w| w.0 == 2).unwrap().1;
    let (tx, mut rx) = oneshot::channel::<Result<usize, ScaleError>>();
    s.sup.on_control(Control::Scale { scale: Scale::Remove(1), wait: true, reply: Some(tx) });
    s.settle();
    assert_eq!(s.signalled(top), [Signal::SIGTERM]);
    assert!(rx.try_recv().is_err(), "answered before the removed worker was gone");
    s.exit(top, 0);
    assert_eq!(rx.try_recv().ok(), Some(Ok(2)));
    let (tx, mut rx) = oneshot::channel::<Result<usize, ScaleError>>();
    s.sup.on_control(Control::Scale { scale: Scale::To(0), wait: true, reply: Some(tx) });
    assert_eq!(rx.try_recv().ok(), Some(Err(ScaleError::Zero { now: 2 })));
}

/// A reload of two slots whose second new worker fails after the first took over.
fn abort_after_one_moved(s: &mut Sim) -> (Vec<i32>, oneshot::Receiver<ReloadOutcome>) {
    s.all_ready();
    let old: Vec<i32> = s.serving().iter().map(|w| w.1).collect();
    let rx = s.reload();
    let first = s.spawned().last().unwrap().0;
    s.ready(first);
    s.advance(s.sup.core.settings.min_ready);
    assert_eq!(s.signalled(old[0]), [Signal::SIGTERM], "slot 0 moved");
    s.exit(old[0], 0);
    let second = s.spawned().last().unwrap().0;
    assert_ne!(second, first, "the second new worker started");
    s.exit(second, 1);
    (old, rx)
}

#[tokio::test]
async fn an_aborted_reload_rolls_the_moved_slots_back_through_a_readiness_gated_roll_out() {
    let mut s = sim(2, "");
    let (old, mut rx) = abort_after_one_moved(&mut s);
    assert!(answer(&mut rx).is_none(), "answered before the rollback ran");
    let back = *s.spawned().last().unwrap();
    assert_eq!(back.1, 1, "the rollback starts a worker of the old generation");
    assert!(s.signalled(old[1]).is_empty(), "the slot that never moved is left alone");
    s.finish_rollout();
    let outcome = answer(&mut rx).expect("answered after the rollback");
    assert!(!outcome.ok && outcome.generation == 1, "{outcome:?}");
    assert!(outcome.message.contains("rolled back 1 worker(s) to generation 1"), "{}", outcome.message);
    let last = s.status().last_reload.expect("a last reload");
    assert_eq!((last.result.as_str(), last.rollback.as_deref()), ("failed", Some("ok")));
    assert!(s.serving().iter().all(|w| w.2 == 1), "{:?}", s.serving());
    assert_eq!(s.serving().len(), 2);
}

#[tokio::test]
async fn with_on_failure_keep_an_aborted_reload_leaves_the_moved_slots_on_the_new_generation() {
    let mut s = sim(2, "on_failure = \"keep\"");
    let (_, mut rx) = abort_after_one_moved(&mut s);
    let outcome = answer(&mut rx).expect("answered at once");
    assert!(outcome.message.contains("on_failure = keep"), "{}", outcome.message);
    let spawns = s.spawned().len();
    s.advance(Duration::from_secs(5));
    assert_eq!(s.spawned().len(), spawns, "nothing more starts");
    let generations: Vec<u64> = s.serving().iter().map(|w| w.2).collect();
    assert_eq!(generations, [2, 1]);
}

#[tokio::test]
async fn a_promoted_worker_that_dies_during_the_roll_out_aborts_it_and_its_slot_restarts_on_the_old_generation()
 {
    let mut s = sim(2, "");
    s.all_ready();
    let mut rx = s.reload();
    let first = s.spawned().last().unwrap().0;
    s.ready(first);
    s.advance(s.sup.core.settings.min_ready);
    let second = s.spawned().last().unwrap().0;
    s.exit(first, 1);
    let outcome = answer(&mut rx).expect("answered at once");
    assert!(!outcome.ok);
    assert!(outcome.message.contains("1 worker(s) restart on generation 1"), "{}", outcome.message);
    assert_eq!(s.signalled(second), [Signal::SIGKILL], "the pending new worker is killed");
    s.advance(Duration::from_millis(100));
    let restarted = *s.spawned().last().unwrap();
    assert_eq!(restarted.1, 1, "slot 0 restarts on the old generation");
    assert_eq!(s.status().last_reload.and_then(|l| l.rollback), Some("ok".to_string()));
}

#[tokio::test]
async fn a_hung_new_worker_is_killed_and_aborts_the_roll_out() {
    let mut s = sim(1, "watchdog = \"1s\"\nmin_ready = \"5s\"");
    s.all_ready();
    let old = s.spawned()[0].0;
    let mut rx = s.reload();
    let new = s.spawned().last().unwrap().0;
    s.ready(new);
    s.advance(Duration::from_millis(500));
    s.ping(old);
    s.advance(Duration::from_millis(600));
    assert_eq!(s.signalled(new), [Signal::SIGKILL], "the hung new worker is killed, not replaced");
    assert_eq!(s.spawned().len(), 2, "no replacement for a roll-out's worker");
    s.exit(new, -1);
    let outcome = answer(&mut rx).expect("the reload failed");
    assert!(!outcome.ok && outcome.message.contains("watchdog"), "{outcome:?}");
    assert!(s.signalled(old).is_empty(), "the old worker keeps serving");
}

#[tokio::test]
async fn a_worker_over_its_memory_limit_twice_in_a_row_is_replaced_then_stopped_gracefully() {
    let mut s = sim(1, "max_memory = \"100M\"");
    s.all_ready();
    let old = s.spawned()[0].0;
    s.host.rss.borrow_mut().insert(old, 200 << 20);
    s.advance(super::health::MEMORY_CHECK);
    assert_eq!(s.spawned().len(), 1, "replaced after one sample above the limit");
    s.advance(super::health::MEMORY_CHECK);
    assert_eq!(s.spawned().len(), 2, "a replacement started after the second");
    let new = s.spawned()[1].0;
    assert!(s.signalled(old).is_empty(), "stopped before its replacement was ready");
    s.ready(new);
    assert_eq!(s.signalled(old), [Signal::SIGTERM], "drains with the stop signal");
    assert_eq!(s.serving().iter().map(|w| w.1).collect::<Vec<_>>(), [new]);
}

#[tokio::test]
async fn a_replacement_that_dies_before_it_is_ready_gets_the_hung_worker_killed() {
    let mut s = sim(1, "watchdog = \"1s\"");
    s.all_ready();
    let old = s.spawned()[0].0;
    s.advance(Duration::from_secs(2));
    let new = s.spawned()[1].0;
    s.exit(new, 1);
    assert_eq!(s.signalled(old), [Signal::SIGKILL]);
    s.exit(old, -1);
    assert_eq!(s.status().workers[0].state, WorkerState::Backoff);
}

#[tokio::test]
async fn a_slot_that_cannot_start_backs_off_and_scale_wait_hears_why() {
    let mut s = sim(1, "");
    s.all_ready();
    s.host.broken.set(true);
    let mut rx = s.scale(Scale::To(2), true);
    match rx.try_recv() {
        Ok(Err(ScaleError::StartFailed { slot: 1, why })) => assert!(why.contains("/fake/app"), "{why}"),
        other => panic!("{other:?}"),
    }
    let st = s.status();
    assert_eq!(st.workers.iter().find(|w| w.id == 1).map(|w| w.state), Some(WorkerState::Backoff));
    s.host.broken.set(false);
    let spawns = s.spawned().len();
    s.advance(Duration::from_millis(100));
    assert_eq!(s.spawned().len(), spawns + 1, "it starts again after its back-off");
}

#[tokio::test]
async fn a_reload_batch_starts_that_many_new_workers_at_once_and_extends_the_managers_timeout_for_each() {
    let mut s = sim(4, "reload_batch = 2");
    s.all_ready();
    let before = s.told().len();
    let mut rx = s.reload();
    assert_eq!(s.spawned().iter().filter(|p| p.1 == 2).count(), 2);
    let extends = s.told()[before..].iter().filter(|m| m.starts_with("EXTEND_TIMEOUT_USEC=")).count();
    assert_eq!(extends, 2, "{:?}", &s.told()[before..]);
    s.finish_rollout();
    assert!(answer(&mut rx).is_some_and(|o| o.ok));
    assert_eq!(s.serving().iter().filter(|w| w.2 == 2).count(), 4);
}

#[tokio::test]
async fn a_reload_asked_for_while_stopping_is_refused() {
    let mut s = sim(1, "");
    s.all_ready();
    s.stop();
    let mut rx = s.reload();
    let outcome = answer(&mut rx).expect("answered at once");
    assert!(!outcome.ok && outcome.message.contains("stopping"), "{outcome:?}");
    assert_eq!(s.spawned().len(), 1, "nothing started");
}

#[tokio::test]
async fn a_second_stop_kills_the_remaining_workers_at_once() {
    let mut s = sim(1, "");
    s.all_ready();
    let pid = s.spawned()[0].0;
    s.stop();
    assert_eq!(s.signalled(pid), [Signal::SIGTERM]);
    s.stop();
    assert_eq!(s.signalled(pid), [Signal::SIGTERM, Signal::SIGKILL]);
}

#[tokio::test]
async fn a_node_workers_ready_message_counts_exactly_like_ready_1() {
    let mut s = sim(2, "");
    let pids = s.spawned();
    for (pid, _) in &pids {
        s.sup.on_event(Event::Channel { pid: *pid, msg: crate::ipc::Incoming::Ready });
        s.settle();
    }
    assert_eq!(s.status().ready, 2);
    assert_eq!(s.told().iter().filter(|m| *m == "READY=1").count(), 1);
}

#[tokio::test]
async fn stop_signal_message_sends_the_shutdown_message_instead_of_a_signal_then_sigkill_after_the_stop_timeout()
 {
    let mut s = sim_of(true, 1, "stop_signal = \"message\"\nstop_timeout = \"5s\"");
    s.all_ready();
    let pid = s.spawned()[0].0;
    s.sup.on_control(Control::Stop);
    s.settle();
    let messages: Vec<Effect> =
        s.effects().into_iter().filter(|e| matches!(e, Effect::Message { .. })).collect();
    assert_eq!(messages, vec![Effect::Message { pid, text: "shutdown".into() }]);
    assert_eq!(s.signalled(pid), [], "no signal with the message");
    s.advance(Duration::from_secs(5));
    assert_eq!(s.signalled(pid), [Signal::SIGKILL], "SIGKILL after the stop timeout, as with signals");
}

/// A sim with `--watch` on (the watcher thread is not started: the test sends the changes).
fn watching(workers: usize) -> Sim {
    let mut s = sim(workers, &format!("watch = [{:?}]", std::env::temp_dir().display().to_string()));
    s.all_ready();
    s
}

impl Sim {
    fn change(&mut self, path: &str) {
        self.sup.on_control(Control::Changed(crate::watch::Changed::for_test(path)));
        self.settle();
    }

    /// The highest generation spawned so far.
    fn last_generation(&self) -> u64 {
        self.spawned().iter().map(|(_, g)| *g).max().unwrap_or(0)
    }
}

#[tokio::test]
async fn a_burst_of_file_changes_is_one_reload_once_the_files_are_quiet() {
    use super::watch::QUIET;
    let mut s = watching(2);
    for i in 0..50 {
        s.change(&format!("/app/f{i}.js"));
        s.advance(Duration::from_millis(9));
    }
    assert_eq!(s.last_generation(), 1, "a reload began during the burst");
    assert!(s.status().watch.unwrap().pending);
    s.advance(QUIET - Duration::from_millis(10));
    assert_eq!(s.last_generation(), 1, "a reload began before the files were quiet for {QUIET:?}");
    s.advance(Duration::from_millis(1));
    assert_eq!(s.last_generation(), 2, "no reload once the files were quiet");
    s.finish_rollout();
    s.advance(Duration::from_secs(60));
    let st = s.status();
    let w = st.watch.unwrap();
    assert_eq!((w.reloads, w.pending, w.trigger.as_deref()), (1, false, Some("/app/f0.js")));
    assert_eq!((st.generation, s.last_generation()), (2, 2));
    assert_eq!(st.last_reload.unwrap().result, "ok");
}

#[tokio::test]
async fn changes_during_a_rollout_make_one_reload_after_it_and_do_not_interrupt_it() {
    let mut s = watching(2);
    let mut rx = s.reload();
    // The roll-out's first new worker is starting; changes keep coming for longer than the
    // quiet period and the longest wait.
    for i in 0..30 {
        s.change(&format!("/app/during{i}.js"));
        s.advance(Duration::from_millis(300));
    }
    assert_eq!(s.last_generation(), 2, "a reload began (or was queued and began) during the roll-out");
    assert!(s.serving().iter().any(|w| w.2 == 1), "the roll-out in progress was cut short");
    s.rollout_until(|s| s.last_generation() == 3);
    assert_eq!(answer(&mut rx).map(|o| o.ok), Some(true), "the roll-out in progress did not complete");
    assert_eq!(s.status().generation, 2);
    s.finish_rollout();
    s.advance(Duration::from_secs(60));
    let st = s.status();
    assert_eq!((st.generation, s.last_generation()), (3, 3), "one follow-up reload, not more");
    let w = st.watch.unwrap();
    assert_eq!((w.reloads, w.pending, w.trigger.as_deref()), (1, false, Some("/app/during0.js")));
}

#[tokio::test]
async fn files_that_never_stop_changing_reload_after_the_longest_wait() {
    use super::watch::MAX_WAIT;
    let mut s = watching(1);
    let step = Duration::from_millis(100);
    let mut waited = Duration::ZERO;
    while s.last_generation() == 1 {
        s.change("/app/busy.js");
        s.advance(step);
        waited += step;
        assert!(waited <= MAX_WAIT, "no reload within {MAX_WAIT:?} of the first change");
    }
    assert_eq!(waited, MAX_WAIT);
}

#[tokio::test]
async fn a_failed_watch_reload_is_reported_and_not_retried_until_the_next_change() {
    let mut s = watching(1);
    s.host.broken.set(true);
    s.change("/app/broken.js");
    s.advance(Duration::from_secs(1));
    let st = s.status();
    assert_eq!(st.last_reload.as_ref().map(|r| r.result.as_str()), Some("failed"), "{:?}", st.last_reload);
    assert_eq!(st.watch.as_ref().map(|w| (w.reloads, w.pending)), Some((1, false)));
    s.advance(Duration::from_secs(60));
    assert_eq!(s.status().watch.unwrap().reloads, 1, "the failed reload was retried without a change");
    s.host.broken.set(false);
    s.change("/app/fixed.js");
    s.advance(Duration::from_secs(1));
    s.finish_rollout();
    let st = s.status();
    assert_eq!((st.generation, st.last_reload.unwrap().result.as_str()), (3, "ok"));
}

/// Review finding: the socket herdsman bound for the first worker's own bind (no `--listen`)
/// was dropped when that worker died before its `Bound` event reached the loop; the address
/// must survive (`status` shows it) and the next worker must get it (at fd 3).
#[tokio::test]
async fn a_learned_socket_survives_the_worker_that_bound_it_dying_first() {
    let mut s = sim(1, "");
    let first = s.spawned()[0].0;
    s.exit(first, 1);
    let l = crate::listeners::Listeners::bind_learned("127.0.0.1:0".parse().unwrap(), 0).unwrap();
    let addr = l.addr.clone();
    let served: std::net::SocketAddr = addr.parse().unwrap();
    let seen = crate::intercept::Seen::Bound { asked: served, served, learned: Some(l) };
    s.sup.on_event(Event::Intercepted { pid: first, seen });
    s.settle();
    assert_eq!(s.status().learned_sockets, vec![addr.clone()]);
    s.advance(Duration::from_secs(60)); // past the restart back-off
    let next = s.spawned().last().unwrap().0;
    assert_ne!(next, first);
    let given: Vec<String> = s
        .sup
        .outside
        .fds_of(next)
        .iter()
        .filter_map(|&fd| {
            let a = nix::sys::socket::getsockname::<nix::sys::socket::SockaddrIn>(fd).ok()?;
            Some(a.to_string())
        })
        .collect();
    assert!(given.contains(&addr), "the next worker's sockets {given:?} lack the learned {addr}");
}

/// Counts the events logged at WARN or above by worker `pid` (those with `worker_pid = pid`).
struct WarnCount {
    pid: i64,
    count: Arc<std::sync::atomic::AtomicUsize>,
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for WarnCount {
    fn on_event(&self, ev: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct Pid(Option<i64>);
        impl tracing::field::Visit for Pid {
            fn record_i64(&mut self, f: &tracing::field::Field, v: i64) {
                if f.name() == "worker_pid" {
                    self.0 = Some(v);
                }
            }
            fn record_debug(&mut self, _: &tracing::field::Field, _: &dyn std::fmt::Debug) {}
        }
        let mut pid = Pid(None);
        ev.record(&mut pid);
        if *ev.metadata().level() <= tracing::Level::WARN && pid.0 == Some(self.pid) {
            self.count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

/// Review finding: a worker looping on binds that cannot be inspected logged one line per
/// bind; now the first, then a count at 10, 100, 1000 (and its total at its exit).
#[tokio::test]
async fn a_worker_looping_on_failing_binds_does_not_flood_the_log() {
    use tracing_subscriber::layer::SubscriberExt;
    let mut s = sim(1, "");
    let pid = s.spawned()[0].0;
    let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let subscriber =
        tracing_subscriber::registry().with(WarnCount { pid: i64::from(pid), count: count.clone() });
    tracing::subscriber::with_default(subscriber, || {
        for _ in 0..1500 {
            let seen = crate::intercept::Seen::Failed("cannot read the worker's memory (EPERM)".into());
            s.sup.on_event(Event::Intercepted { pid, seen });
        }
        assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 4, "the first, then at 10, 100, 1000");
        s.exit(pid, 1);
    });
    assert_eq!(
        count.load(std::sync::atomic::Ordering::SeqCst),
        6,
        "and the total at its exit (beside the exit's own line)"
    );
}
