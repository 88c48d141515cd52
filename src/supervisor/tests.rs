//! The in-process tier: the supervisor's state machine driven by hand, with no process forked.
//!
//! A [`Fake`] host hands out made-up pids, records every effect (spawn, signal, reap) and owns
//! the clock; the test feeds the events a real loop would get (a worker's `READY=1`, its exit,
//! a request, time passing) and checks the supervisor's state (`status`), its effects and what
//! it told the service manager (a real datagram socket standing in for `NOTIFY_SOCKET`). The
//! real-process tests in `tests/` stay the truth for the fork/exec side; these pin down the
//! decisions: coalescing, abort on failure, back-off, scaling and stopping during a roll-out,
//! and the notify sequence.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::os::fd::{OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;
use tokio::sync::{mpsc, oneshot};

use super::host::Host;
use super::{Event, Supervisor, World};
use crate::control::protocol::{ReloadOutcome, Scale, ScaleError, Snapshot, WorkerState};
use crate::listeners::Listeners;
use crate::notify::{Message, Notifier};
use crate::requests::{Control, Waiter};
use crate::spawn::{Launched, Launcher, SpawnError, Spec};
use crate::worker::Worker;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Effect {
    Spawn { pid: i32, slot: usize, generation: u64 },
    Signal { pid: i32, sig: Signal },
    Reap { pid: i32 },
}

#[derive(Clone)]
struct Fake {
    clock: Rc<Cell<Instant>>,
    next_pid: Rc<Cell<i32>>,
    log: Rc<RefCell<Vec<Effect>>>,
}

fn devnull() -> OwnedFd {
    OwnedFd::from(std::fs::File::open("/dev/null").unwrap())
}

impl Host for Fake {
    fn now(&self) -> Instant {
        self.clock.get()
    }

    fn launch(
        &mut self,
        _: &Launcher,
        spec: &Spec,
        slot: usize,
        _: Option<&[RawFd]>,
        _: Option<&str>,
    ) -> Result<Launched, SpawnError> {
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
        })
    }

    fn watch(&mut self, _: i32, _: Arc<OwnedFd>, _: mpsc::Receiver<()>, _: &mpsc::UnboundedSender<Event>) {}

    fn signal(&mut self, w: &Worker, sig: Signal, _group: bool) {
        self.log.borrow_mut().push(Effect::Signal { pid: w.pid, sig });
    }

    fn reap(&mut self, w: &Worker) {
        self.log.borrow_mut().push(Effect::Reap { pid: w.pid });
    }

    fn memory(&mut self, _: &[i32]) -> HashMap<i32, u64> {
        HashMap::new()
    }
}

/// A supervisor on a fake host, and what it told the "service manager".
struct Sim {
    sup: Supervisor,
    host: Fake,
    manager: UnixDatagram,
    told: Vec<String>,
    _events: mpsc::UnboundedReceiver<Event>,
    _dir: std::path::PathBuf,
}

/// `extra`: more TOML lines (e.g. `min_ready = "0s"`).
fn sim(workers: usize, extra: &str) -> Sim {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("herdsman-core-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("app.toml");
    std::fs::write(
        &file,
        format!(
            "name = \"core\"\ncommand = [\"sh\", \"-c\", \"true\"]\nworkers = {workers}\nlisten = [\"127.0.0.1:1\"]\nready = \"notify\"\n{extra}\n"
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
        output: crate::output::Output::standalone(),
        reload_source: None,
        watchdog: None,
        notify_dir: None,
        steering: None,
        metrics: crate::metrics::Metrics::disabled(),
        carry: None,
        notify: None,
        resume: None,
    };
    let host = Fake {
        clock: Rc::new(Cell::new(Instant::now())),
        next_pid: Rc::new(Cell::new(1000)),
        log: Default::default(),
    };
    let (sup, events) = Supervisor::new(settings, world, Box::new(host.clone())).unwrap();
    let mut s = Sim { sup, host, manager, told: Vec::new(), _events: events, _dir: dir };
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
        self.sup.on_notify(Message { pid, assignments: vec![("READY".into(), "1".into())] });
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

    /// Everything sent to the service manager so far, one datagram each.
    fn told(&mut self) -> &[String] {
        let mut buf = [0u8; 4096];
        while let Ok(n) = self.manager.recv(&mut buf) {
            self.told.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        &self.told
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
                    self.advance(self.sup.settings.min_ready);
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
    s.advance(s.sup.settings.min_ready - Duration::from_millis(1));
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
    s.advance(s.sup.settings.backoff.reset_after);
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
    assert!(s.sup.stopping && s.sup.pool.workers.is_empty(), "the loop would end now");
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
