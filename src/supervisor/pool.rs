//! The pool: the slots (stable worker ids, `0..desired`), the workers serving them, how many
//! slots are wanted and what a new slot runs.
//!
//! The pool knows the workers' bookkeeping — which worker is a slot's active one, how many
//! times in a row a slot failed and when it may start again (back-off), whether the pool has
//! converged for `scale --wait` — and nothing of processes: starting and signalling workers is
//! the driver's (`Supervisor::launch`, `Supervisor::retire`).

use super::clock::Mono;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use crate::backoff;
use crate::config::BackoffPolicy;
use crate::control::protocol::ScaleError;
use crate::requests::Scale;
use crate::spawn::Spec;
use crate::worker::{Role, State, Worker};

/// A steered worker that stopped receiving keeps running at least this long before its stop
/// signal, for handshakes that were already routed to it (see `steer`).
pub(super) const DRAIN_GRACE: Duration = Duration::from_millis(250);
/// How often a draining worker's accept queue is checked.
const DRAIN_POLL: Duration = Duration::from_millis(20);

/// A slot: one stable worker id.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(super) struct Slot {
    /// The worker serving (or starting to serve) this slot.
    pub active: Option<i32>,
    /// What the slot runs when (re)started.
    #[serde(with = "super::specs::shared")]
    pub spec: Arc<Spec>,
    /// Failures in a row, for back-off.
    pub failures: u32,
    pub restarts: u32,
    /// Back-off: do not start before this.
    pub restart_at: Option<Mono>,
    /// Became ready or failed at least once (for the first `READY=1`).
    pub settled: bool,
    pub last_error: Option<String>,
}

impl Slot {
    fn new(spec: Arc<Spec>) -> Slot {
        Slot {
            active: None,
            spec,
            failures: 0,
            restarts: 0,
            restart_at: None,
            settled: false,
            last_error: None,
        }
    }
}

/// The slots and the workers, with the wanted size.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(super) struct Pool {
    /// What new slots and restarts without a slot spec run.
    #[serde(with = "super::specs::shared")]
    spec: Arc<Spec>,
    /// The newest generation number handed out.
    generation: u64,
    desired: usize,
    slots: BTreeMap<usize, Slot>,
    workers: HashMap<i32, Worker>,
}

/// How a slot's active worker ended, for its restart.
pub(super) struct Restart {
    pub delay: Duration,
    /// "after a good run", "failure 3 in a row".
    pub streak: String,
}

impl Pool {
    pub fn new(spec: Arc<Spec>, desired: usize) -> Pool {
        Pool { generation: spec.generation, spec, desired, slots: BTreeMap::new(), workers: HashMap::new() }
    }

    /// A pool taken over from a state written by an older image (see `supervisor::v2`).
    pub fn restored(
        spec: Arc<Spec>,
        generation: u64,
        desired: usize,
        slots: BTreeMap<usize, Slot>,
        workers: HashMap<i32, Worker>,
    ) -> Pool {
        Pool { spec, generation, desired, slots, workers }
    }

    /// What new slots run: the generation the pool is on.
    pub fn spec(&self) -> &Arc<Spec> {
        &self.spec
    }

    /// A reload's generation became the pool's.
    pub fn set_spec(&mut self, spec: Arc<Spec>) {
        self.spec = spec;
    }

    /// The newest generation number handed out.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Hands out the next generation number (a reload pinned its release).
    pub fn next_generation(&mut self) -> u64 {
        self.generation += 1;
        self.generation
    }

    /// The wanted number of slots.
    pub fn desired(&self) -> usize {
        self.desired
    }

    pub fn set_desired(&mut self, n: usize) {
        self.desired = n;
    }

    pub fn slots(&self) -> &BTreeMap<usize, Slot> {
        &self.slots
    }

    pub fn slot(&self, id: usize) -> Option<&Slot> {
        self.slots.get(&id)
    }

    pub fn slot_mut(&mut self, id: usize) -> Option<&mut Slot> {
        self.slots.get_mut(&id)
    }

    /// The live workers, by pid.
    pub fn workers(&self) -> &HashMap<i32, Worker> {
        &self.workers
    }

    pub fn worker(&self, pid: i32) -> Option<&Worker> {
        self.workers.get(&pid)
    }

    pub fn worker_mut(&mut self, pid: i32) -> Option<&mut Worker> {
        self.workers.get_mut(&pid)
    }

    pub fn workers_mut(&mut self) -> impl Iterator<Item = &mut Worker> {
        self.workers.values_mut()
    }

    /// A worker just started.
    pub fn insert_worker(&mut self, w: Worker) {
        self.workers.insert(w.pid, w);
    }

    /// A worker exited: it leaves the pool.
    pub fn remove_worker(&mut self, pid: i32) -> Option<Worker> {
        self.workers.remove(&pid)
    }

    /// Every spec the pool refers to.
    pub fn specs(&self) -> impl Iterator<Item = &Arc<Spec>> {
        std::iter::once(&self.spec)
            .chain(self.slots.values().map(|s| &s.spec))
            .chain(self.workers.values().map(|w| &w.spec))
    }

    /// Visits every spec the pool refers to.
    pub fn for_each_spec(&mut self, f: &mut dyn FnMut(&mut Arc<Spec>)) {
        f(&mut self.spec);
        self.slots.values_mut().for_each(|s| f(&mut s.spec));
        self.workers.values_mut().for_each(|w| f(&mut w.spec));
    }

    /// The worker count `scale` asks for, if it can be had.
    pub fn target(&self, scale: Scale) -> Result<usize, ScaleError> {
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
        Ok(want)
    }

    /// Creates the wanted slots that are missing, running `spec`.
    pub fn add_missing_slots(&mut self, spec: &Arc<Spec>) {
        for id in 0..self.desired {
            self.slots.entry(id).or_insert_with(|| Slot::new(spec.clone()));
        }
    }

    /// Drops the slots beyond the wanted size; returns each with its workers that are not
    /// retired yet (to retire).
    pub fn remove_extra_slots(&mut self) -> Vec<(usize, Vec<i32>)> {
        let extra: Vec<usize> = self.slots.range(self.desired..).map(|(id, _)| *id).collect();
        extra
            .into_iter()
            .map(|id| {
                self.slots.remove(&id);
                let pids = self
                    .workers
                    .values()
                    .filter(|w| w.slot == id && w.role != Role::Retired)
                    .map(|w| w.pid)
                    .collect();
                (id, pids)
            })
            .collect()
    }

    /// Empty slots whose back-off is over, in order.
    pub fn slots_to_start(&self, now: Mono) -> Vec<usize> {
        self.slots
            .iter()
            .filter(|(_, s)| s.active.is_none() && s.restart_at.is_none_or(|t| t <= now))
            .map(|(id, _)| *id)
            .collect()
    }

    /// `pid` started in slot `id` as its active worker.
    pub fn started(&mut self, id: usize, pid: i32) {
        if let Some(slot) = self.slots.get_mut(&id) {
            slot.active = Some(pid);
            slot.restart_at = None;
        }
    }

    /// A worker for slot `id` could not be started: the slot backs off. Returns the delay.
    pub fn start_failed(&mut self, id: usize, now: Mono, policy: &BackoffPolicy, error: String) -> Duration {
        let Some(slot) = self.slots.get_mut(&id) else { return Duration::ZERO };
        slot.failures += 1;
        slot.settled = true;
        let delay = backoff::delay(policy, slot.failures);
        slot.restart_at = Some(now + delay);
        slot.last_error = Some(error);
        delay
    }

    /// The active worker `pid` of slot `id` ended (`healthy`: after a good run); the slot
    /// restarts after its back-off: at once after a good run (like PM2), which also starts a
    /// new back-off sequence; after repeated quick failures initial, doubling, capped. `None`
    /// if the slot is gone.
    pub fn active_exited(
        &mut self,
        id: usize,
        pid: i32,
        healthy: bool,
        now: Mono,
        policy: &BackoffPolicy,
    ) -> Option<Restart> {
        let slot = self.slots.get_mut(&id)?;
        if slot.active == Some(pid) {
            slot.active = None;
        }
        slot.restarts += 1;
        slot.settled = true;
        let (delay, streak) = if healthy {
            slot.failures = 0;
            (Duration::ZERO, "after a good run".to_string())
        } else {
            slot.failures += 1;
            (backoff::delay(policy, slot.failures), format!("failure {} in a row", slot.failures))
        };
        slot.restart_at = Some(now + delay);
        Some(Restart { delay, streak })
    }

    /// Records why slot `id`'s last worker failed (for `scale --wait` and `status`).
    pub fn set_last_error(&mut self, id: usize, error: String) {
        if let Some(slot) = self.slots.get_mut(&id) {
            slot.last_error = Some(error);
        }
    }

    /// Slot `id` runs `spec` from now on, with a clean failure record (a roll-out moved it);
    /// returns what it ran before.
    pub fn move_slot(&mut self, id: usize, spec: Arc<Spec>) -> Option<Arc<Spec>> {
        let slot = self.slots.get_mut(&id)?;
        slot.failures = 0;
        slot.restart_at = None;
        Some(std::mem::replace(&mut slot.spec, spec))
    }

    /// Makes `new` the active worker of slot `id`: the pool's half of the one slot hand-over
    /// (see `Supervisor::promote`). Returns the worker it replaces, to retire.
    pub fn promote(&mut self, id: usize, new: i32) -> Option<i32> {
        let old = self.slots.get_mut(&id)?.active.replace(new);
        if let Some(w) = self.workers.get_mut(&new) {
            w.role = Role::Active;
        }
        old.filter(|o| *o != new)
    }

    /// `pid` no longer serves its slot (it is being retired).
    pub fn unassign(&mut self, pid: i32) {
        let Some(w) = self.workers.get(&pid) else { return };
        if let Some(slot) = self.slots.get_mut(&w.slot) {
            if slot.active == Some(pid) {
                slot.active = None;
            }
        }
    }

    /// The active workers that are ready.
    pub fn ready_count(&self) -> usize {
        self.slots
            .values()
            .filter_map(|s| s.active)
            .filter(|pid| self.workers.get(pid).is_some_and(Worker::is_ready))
            .count()
    }

    /// Whether every wanted slot has a ready active worker (`GET /ready`); never with none
    /// wanted (nothing would serve).
    pub fn all_ready(&self) -> bool {
        self.desired > 0
            && (0..self.desired).all(|id| {
                let active = self.slots.get(&id).and_then(|s| s.active);
                active.and_then(|pid| self.workers.get(&pid)).is_some_and(Worker::is_ready)
            })
    }

    /// Whether every slot was ready or failed at least once (for the first `READY=1`).
    pub fn settled(&self) -> bool {
        self.slots.values().all(|s| s.settled)
    }

    /// When each worker's or slot's timer runs out: ready timeouts, `alive:` delays, stop
    /// timeouts, drains, back-offs.
    pub fn deadlines(&self, now: Mono) -> impl Iterator<Item = Mono> + '_ {
        let workers = self.workers.values().filter_map(move |w| match w.state {
            State::Starting { deadline } => Some(w.ready_by_clock().map_or(deadline, |at| deadline.min(at))),
            State::Stopping { kill_at } => Some(kill_at),
            // Past the grace, poll the accept queue until it is empty.
            State::Draining { since } => Some((since + DRAIN_GRACE).max(now + DRAIN_POLL)),
            State::Ready { .. } | State::Killed => None,
        });
        workers.chain(self.slots.values().filter_map(|s| s.restart_at))
    }

    /// What `scale --wait` clients hear now, if anything: the size once every slot runs a
    /// ready worker and removed slots are gone, or an error as soon as a slot fails to start.
    pub fn scale_result(&self) -> Option<Result<usize, ScaleError>> {
        let failed = self
            .slots
            .iter()
            .find(|(id, s)| **id < self.desired && s.active.is_none() && s.restart_at.is_some());
        if let Some((id, slot)) = failed {
            let why = slot.last_error.clone().unwrap_or_else(|| "failed to start".to_string());
            return Some(Err(ScaleError::StartFailed { slot: *id, why }));
        }
        let removed_gone = self.workers.values().all(|w| w.slot < self.desired);
        (removed_gone && self.slots.len() == self.desired && self.ready_count() == self.desired)
            .then_some(Ok(self.desired))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ReadyMode;
    use nix::sys::signal::Signal;

    fn spec() -> Arc<Spec> {
        Arc::new(Spec {
            generation: 1,
            command: vec!["true".into()],
            program: "/bin/true".into(),
            env: Vec::new(),
            cwd: "/".into(),
            ready: ReadyMode::Notify,
            ready_timeout: Duration::from_secs(60),
            stop_signal: crate::config::StopSignal::Signal(Signal::SIGTERM),
            stop_timeout: Duration::from_secs(30),
            watchdog: None,
            max_memory: None,
            user: None,
        })
    }

    fn pool(n: usize) -> Pool {
        let spec = spec();
        let mut pool = Pool::new(spec.clone(), n);
        pool.add_missing_slots(&spec);
        pool
    }

    #[test]
    fn scale_counts_from_the_wanted_size_and_refuses_zero_and_too_many() {
        let pool = pool(3);
        assert_eq!(pool.target(Scale::Add(2)), Ok(5));
        assert_eq!(pool.target(Scale::Remove(1)), Ok(2));
        assert_eq!(pool.target(Scale::To(7)), Ok(7));
        assert_eq!(pool.target(Scale::Remove(5)), Err(ScaleError::Zero { now: 3 }));
        let want = crate::config::values::MAX_WORKERS + 1;
        assert_eq!(pool.target(Scale::To(want)), Err(ScaleError::TooMany { want }));
    }

    #[test]
    fn a_slot_that_cannot_start_backs_off_doubling_and_scale_wait_hears_why() {
        let mut pool = pool(1);
        let (now, policy) = (Mono::now(), BackoffPolicy::DEFAULT);
        assert_eq!(pool.slots_to_start(now), [0]);
        assert_eq!(pool.start_failed(0, now, &policy, "boom".into()), Duration::from_millis(100));
        assert_eq!(pool.start_failed(0, now, &policy, "boom".into()), Duration::from_millis(200));
        assert!(pool.slots_to_start(now).is_empty(), "started within its back-off");
        assert_eq!(pool.slots_to_start(now + Duration::from_millis(200)), [0]);
        assert_eq!(pool.scale_result(), Some(Err(ScaleError::StartFailed { slot: 0, why: "boom".into() })));
        assert!(pool.settled(), "a failed slot counts as settled for the first READY=1");
    }

    #[test]
    fn an_active_worker_that_ran_well_restarts_at_once_and_starts_a_new_streak() {
        let mut pool = pool(1);
        let (now, policy) = (Mono::now(), BackoffPolicy::DEFAULT);
        let mut streaks = Vec::new();
        for (pid, healthy) in [(10, false), (11, false), (12, true), (13, false)] {
            pool.started(0, pid);
            let r = pool.active_exited(0, pid, healthy, now, &policy).expect("the slot exists");
            assert_eq!(pool.slots[&0].active, None);
            streaks.push((r.delay.as_millis(), r.streak));
        }
        let expected = [
            (100, "failure 1 in a row"),
            (200, "failure 2 in a row"),
            (0, "after a good run"),
            (100, "failure 1 in a row"),
        ];
        assert_eq!(streaks, expected.map(|(d, s)| (d, s.to_string())));
        assert_eq!(pool.slots[&0].restarts, 4);
    }

    #[test]
    fn a_promotion_names_the_worker_it_replaces_and_scaling_down_drops_the_extra_slots() {
        let mut pool = pool(3);
        pool.started(0, 10);
        assert_eq!(pool.promote(0, 11), Some(10));
        assert_eq!(pool.promote(0, 11), None, "a worker does not replace itself");
        assert_eq!(pool.slots[&0].active, Some(11));
        pool.desired = 1;
        let dropped: Vec<usize> = pool.remove_extra_slots().into_iter().map(|(id, _)| id).collect();
        assert_eq!(dropped, [1, 2]);
        assert_eq!(pool.slots.keys().copied().collect::<Vec<_>>(), [0]);
    }
}
