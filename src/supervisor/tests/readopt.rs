//! Re-adoption after a supervisor crash (issue 26), in-process: the core written to the state
//! memfd, restored into a fresh driver with what the fd store passed back (stand-ins, by
//! name), through `readopt::prepare` and `Resumed::readopting` as `app::readopt` does.

use std::collections::BTreeMap;

use super::*;
use crate::supervisor::Core;
use crate::supervisor::handover::Resumed;
use crate::supervisor::readopt;

impl Sim {
    /// The supervisor systemd restarts after this one crashed: its core through JSON, its
    /// workers' descriptors from the store, except those of `lost` (dead while herdsman was
    /// down: systemd dropped them).
    fn crashed(&mut self, lost: &[i32]) -> Sim {
        self.crashed_after(lost, Duration::ZERO)
    }

    /// [`Sim::crashed`], restarted `down` later (the clock the stored state was written by
    /// went on meanwhile).
    fn crashed_after(&mut self, lost: &[i32], down: Duration) -> Sim {
        let bytes = serde_json::to_vec(&self.sup.core).unwrap();
        let mut core: Core = serde_json::from_slice(&bytes).unwrap();
        let mut fds: BTreeMap<String, OwnedFd> = self
            .sup
            .fd_table()
            .into_iter()
            .filter(|(name, _)| {
                !lost.iter().any(|p| name.starts_with("pidfd-") && name.ends_with(&format!("-{p}")))
            })
            .map(|(name, _)| (name, devnull()))
            .collect();
        // The stand-in pidfds name no process: those left in the store are the live ones.
        let ro = readopt::prepare_with(&mut core, &mut fds, |_, _| true);
        assert_eq!(ro.lost(), lost.len());
        let resumed = Resumed::take(core, BTreeMap::new(), &mut fds, None, 0).unwrap().readopting(ro);
        assert!(fds.is_empty(), "descriptors nobody took: {:?}", fds.keys().collect::<Vec<_>>());
        let dir = self._dir.with_extension("crashed");
        std::fs::create_dir_all(&dir).unwrap();
        let (now, next_pid) = (self.host.clock.get() + down, self.host.next_pid.get());
        sim_with(self.sup.core.settings.clone(), dir, Some(resumed), now, next_pid)
    }

    /// Everything sent to the manager, the notifier's backlog included (the test's socket
    /// holds only a few datagrams at a time).
    fn told_all(&mut self) -> Vec<String> {
        while self.sup.outside.notifier.flush() {
            self.told();
        }
        self.told().to_vec()
    }

    /// Lets the clock run (the slot's back-off) until a worker is started.
    fn until_spawned(&mut self) {
        for _ in 0..600 {
            if !self.spawned().is_empty() {
                return;
            }
            self.advance(Duration::from_millis(100));
        }
        panic!("nothing started: {:?}", self.status().workers);
    }
}

#[tokio::test]
async fn a_worker_that_died_while_herdsman_was_down_is_replaced_with_status_unknown_and_ready_waits_for_it() {
    let mut s = sim(2, "");
    s.all_ready();
    assert!(s.told().iter().any(|m| m == "READY=1"));
    let old: Vec<i32> = s.spawned().iter().map(|p| p.0).collect();
    let mut r = s.crashed(&[old[1]]);
    // Slot 0 is re-adopted as it was; slot 1 starts a new worker.
    let st = r.status();
    let w0 = st.workers.iter().find(|w| w.id == 0).unwrap();
    assert_eq!((w0.pid, w0.readopted), (Some(old[0]), true));
    let w1 = st.workers.iter().find(|w| w.id == 1).unwrap();
    assert!(!w1.readopted);
    assert_ne!(w1.pid, Some(old[1]));
    let error = w1.last_error.clone().unwrap_or_default();
    assert!(error.contains("status unknown"), "last_error: {error}");
    assert_eq!(w1.restarts, 1);
    r.until_spawned();
    let new = r.spawned();
    assert_eq!(new.len(), 1, "{new:?}");
    // systemd waits for the new main process's READY=1: only once slot 1 is ready again.
    assert!(!r.told().iter().any(|m| m == "READY=1"), "READY=1 before the pool is whole: {:?}", r.told());
    r.ready(new[0].0);
    assert!(r.told().iter().any(|m| m == "READY=1"), "{:?}", r.told());
}

#[tokio::test]
async fn a_re_adopted_worker_that_exits_is_reported_with_status_unknown_and_restarted() {
    let mut s = sim(2, "");
    s.all_ready();
    let old: Vec<i32> = s.spawned().iter().map(|p| p.0).collect();
    let mut r = s.crashed(&[]);
    assert!(r.status().workers.iter().all(|w| w.readopted));
    assert!(r.spawned().is_empty(), "the restored supervisor started workers: {:?}", r.spawned());
    // Its pidfd turns readable; waitid says ECHILD (PID 1 reaped it): exit status -1.
    r.exit(old[0], -1);
    let w0 = r.status().workers.into_iter().find(|w| w.id == 0).unwrap();
    assert!(w0.last_error.unwrap_or_default().contains("status unknown"));
    r.until_spawned();
    assert_eq!(r.spawned().len(), 1);
}

#[tokio::test]
async fn a_reload_interrupted_by_a_crash_is_rolled_back_and_last_reload_says_so() {
    let mut s = sim(2, "");
    s.all_ready();
    // Slot 0 moved to generation 2; slot 1's new worker is starting when herdsman dies.
    let (_reload, _, _, candidate) = s.reload_past_the_canary();
    let mut r = s.crashed(&[]);
    // The candidate is killed, slot 0 rolls back to generation 1.
    assert!(r.signalled(candidate).contains(&Signal::SIGKILL), "{:?}", r.effects());
    let last = r.status().last_reload.unwrap();
    assert_eq!(last.result, "failed");
    assert!(
        last.error.as_deref().unwrap_or_default().contains("interrupted by a supervisor restart"),
        "{last:?}"
    );
    r.exit(candidate, -1);
    r.finish_rollout();
    let serving = r.serving();
    assert_eq!(serving.len(), 2, "{serving:?}");
    assert!(serving.iter().all(|(_, _, g)| *g == 1), "not on one version: {serving:?}");
    assert_eq!(r.status().last_reload.unwrap().rollback.as_deref(), Some("ok"));
}

/// A re-adopted worker is reaped by PID 1 the moment it exits: its pid, and so its process
/// group id, may be a foreign group leader's by then. Its group is never signalled by pgid
/// once its pidfd is readable (every fake pidfd is), nor after its exit.
#[tokio::test]
async fn a_re_adopted_worker_is_never_signalled_by_pgid_once_it_exited() {
    let mut s = sim(2, "watchdog = \"2s\"");
    s.all_ready();
    let old: Vec<i32> = s.spawned().iter().map(|p| p.0).collect();
    let mut r = s.crashed(&[]);
    for pid in &old {
        assert_eq!(r.host.watched.borrow().get(pid), Some(&false), "worker {pid}: leftovers killed by pgid");
    }
    // The watchdog runs out for both (no pings): each is replaced, then SIGKILLed, but not
    // its group.
    r.advance(Duration::from_secs(3));
    r.all_ready();
    for pid in &old {
        assert!(r.signalled(*pid).contains(&Signal::SIGKILL), "{:?}", r.effects());
    }
    assert!(r.host.groups.borrow().iter().all(|(p, _)| !old.contains(p)), "{:?}", r.host.groups.borrow());
    // The workers this process started are its children: their groups are killed as always.
    let new: Vec<i32> = r.spawned().iter().map(|p| p.0).collect();
    assert_eq!(new.len(), 2);
    for pid in &new {
        assert_eq!(r.host.watched.borrow().get(pid), Some(&true));
    }
}

/// The state is written at most once a second and the down time passes on every stored clock:
/// a healthy re-adopted worker is not replaced for a watchdog the restart made it miss, nor a
/// starting one failed for a ready deadline that ran out while nobody read its READY=1.
#[tokio::test]
async fn re_adopted_workers_get_their_watchdog_and_ready_deadline_back_after_the_down_time() {
    let mut s = sim(2, "watchdog = \"2s\"\nready_timeout = \"3s\"");
    // Worker 0 ready, worker 1 still starting.
    let old: Vec<i32> = s.spawned().iter().map(|p| p.0).collect();
    s.ready(old[0]);
    s.advance(Duration::from_millis(1500));
    let mut r = s.crashed_after(&[], Duration::from_secs(2));
    // The loop's first turn, its timers checked.
    r.advance(Duration::ZERO);
    assert!(r.spawned().is_empty(), "replaced on the first turn: {:?}", r.effects());
    for pid in &old {
        assert!(r.signalled(*pid).is_empty(), "worker {pid}: {:?}", r.effects());
    }
    // Within the grace both are heard from: nothing is replaced.
    r.ping(old[0]);
    r.ready(old[1]);
    r.advance(Duration::from_millis(1500));
    r.ping(old[0]);
    r.ping(old[1]);
    r.advance(Duration::from_millis(1500));
    assert!(r.spawned().is_empty(), "{:?}", r.effects());
    assert!(r.told().iter().any(|m| m == "READY=1"), "{:?}", r.told());
}

/// A pidfd whose process was reaped (by PID 1) names no pid: that worker is lost, not
/// re-adopted, and not in the set the cgroup's sweep keeps; nor is an exited, unreaped one.
#[tokio::test]
async fn prepare_counts_a_reaped_or_exited_worker_as_lost() {
    use std::os::fd::AsFd;
    let spawn = || std::process::Command::new("sleep").arg("30").spawn().unwrap();
    // Alive: its own pidfd, and only under its own pid.
    let mut child = spawn();
    let pid = child.id() as i32;
    let fd = crate::sys::pidfd_open(pid).unwrap();
    assert!(readopt::pidfd_alive(fd.as_fd(), pid));
    assert!(!readopt::pidfd_alive(fd.as_fd(), pid + 1));
    // Exited, not reaped yet: its pidfd is readable.
    child.kill().unwrap();
    let mut pfd = [nix::poll::PollFd::new(fd.as_fd(), nix::poll::PollFlags::POLLIN)];
    nix::poll::poll(&mut pfd, nix::poll::PollTimeout::from(60_000u16)).unwrap();
    assert!(!readopt::pidfd_alive(fd.as_fd(), pid));
    // Reaped: the pidfd names no pid any more.
    child.wait().unwrap();
    assert!(!readopt::pidfd_alive(fd.as_fd(), pid));
    // In `prepare`: a stored worker whose pidfd is that reaped one is lost.
    let mut s = sim(1, "");
    s.all_ready();
    let mut core: Core = serde_json::from_slice(&serde_json::to_vec(&s.sup.core).unwrap()).unwrap();
    let mut fds: BTreeMap<String, OwnedFd> = s
        .sup
        .fd_table()
        .into_iter()
        .map(|(name, _)| {
            let fd = if name.starts_with("pidfd-") { fd.try_clone().unwrap() } else { devnull() };
            (name, fd)
        })
        .collect();
    let ro = readopt::prepare(&mut core, &mut fds);
    assert_eq!(ro.lost(), 1);
    assert!(ro.live().is_empty(), "{:?}", ro.live());
}

/// Under systemd the driver keeps its fd table and state in the fd store: what the manager is
/// sent as workers start and exit, and the state it can be restarted from.
#[tokio::test]
async fn the_store_gets_each_workers_descriptors_at_start_loses_them_at_exit_and_holds_the_current_state() {
    let dir = std::env::temp_dir().join(format!("herdsman-store-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("app.toml");
    std::fs::write(
        &file,
        "name = \"core\"\ncommand = [\"sh\", \"-c\", \"true\"]\nworkers = 2\nready = \"notify\"\n",
    )
    .unwrap();
    let settings =
        crate::config::load(Some(&file), &Default::default(), std::num::NonZeroUsize::MIN).unwrap();
    let mut s = sim_in(settings, dir, None, Mono::now(), 1000, |world| {
        world.store = Some(crate::supervisor::Store::create().unwrap());
        world.carry = Some(crate::upgrade::Carry {
            binary: "/usr/bin/herdsman".into(),
            config: None,
            overrides: Default::default(),
            argv: Vec::new(),
            env: Vec::new(),
            control: (devnull(), "/run/herdsman/core/control.sock".into(), None, 0, None),
            metrics_http: None,
            check_timeout: Duration::from_secs(5),
        });
    });
    s.all_ready();
    let pids: Vec<i32> = s.spawned().iter().map(|p| p.0).collect();
    let told = s.told_all();
    let stored = |name: &str| told.contains(&format!("FDSTORE=1\nFDNAME=herdsman.{name}\nFDPOLL=0"));
    for name in ["state-a", "state-b", "control", "notify-0"] {
        assert!(stored(name), "{name} not stored: {told:?}");
    }
    for (slot, pid) in pids.iter().enumerate() {
        for kind in ["pidfd", "out", "err"] {
            let name = crate::supervisor::document::fd_name(kind, slot, 1, *pid);
            assert!(stored(&name), "{name} not stored: {told:?}");
        }
    }
    // The state the store holds is the upgrade's document, with both workers.
    let read_state = |s: &Sim| {
        let store = s.sup.store.as_ref().unwrap();
        let mut fds: BTreeMap<String, OwnedFd> = store
            .state_fds()
            .into_iter()
            .map(|(n, fd)| (n.to_string(), fd.try_clone_to_owned().unwrap()))
            .collect();
        let (_, payload) = crate::fdstore::state::StateFile::take(&mut fds).unwrap();
        crate::supervisor::document::parse(&payload.unwrap()).unwrap()
    };
    let state = read_state(&s);
    assert_eq!(state.core.workers(), 2);
    assert!(state.fds.contains_key(&crate::supervisor::document::fd_name("pidfd", 0, 1, pids[0])));
    // A watchdog ping changes nothing a restart depends on: written within a second, not at once.
    s.advance(Duration::from_secs(2));
    let seq = s.sup.store.as_ref().unwrap().sequence();
    s.ping(pids[1]);
    assert_eq!(s.sup.store.as_ref().unwrap().sequence(), seq, "the state was rewritten for a ping");
    let due = s.sup.store_deadline().expect("a wake-up to write the ping");
    s.advance(due.duration_since(s.host.clock.get()));
    assert_eq!(s.sup.store.as_ref().unwrap().sequence(), seq + 1);
    assert!(s.sup.store_deadline().is_none());
    // Worker 0 exits: its names leave the store once the exit is handled, the state follows.
    s.exit(pids[0], 1);
    let told = s.told_all();
    for kind in ["pidfd", "out", "err"] {
        let name = crate::supervisor::document::fd_name(kind, 0, 1, pids[0]);
        assert!(
            told.contains(&format!("FDSTOREREMOVE=1\nFDNAME=herdsman.{name}")),
            "{name} not removed: {told:?}"
        );
    }
    let state = read_state(&s);
    assert_eq!(state.core.workers(), 1);
    assert!(!state.fds.contains_key(&crate::supervisor::document::fd_name("pidfd", 0, 1, pids[0])));
}
