//! Rolling reload: generation g → g+1, slot by slot, and its safety net.
//!
//! For each slot: start a candidate of the new generation, wait until it is ready *and has
//! stayed ready for `min_ready`*, then make it the slot's active worker and send the stop
//! signal to the old one, which drains on its own timer while the roll-out moves on. An old
//! worker is never stopped before its own replacement held `min_ready`.
//!
//! The first slot is a canary: a reload's first candidate (the first `reload_batch`) starts,
//! gets ready and holds `min_ready` alone, and takes over its slot before any other slot
//! starts. After it the slots overlap: the next slot's candidate starts as soon as the previous
//! one is *ready*, while it holds, not once it held. `reload_batch` candidates may be starting
//! at a time (one that holds does not count); `reload_surge`, when set, caps the candidates in
//! flight (starting or holding), i.e. the extra workers (and their memory) beside the old ones
//! — `reload_surge = 1` is strictly one slot after the other. N workers that get ready in `r`
//! then roll in about (r + `min_ready`) + (N−1)·r + `min_ready`, not N·(r + `min_ready`).
//! A version that dies before it is ready costs one start; one that dies within about
//! 2·`min_ready` of getting ready is caught while the canary is watched (alone, then while the
//! others hold) and rolled back; one that dies later than that, once every slot moved, is not
//! (measured in the module's choice: overlapping from the first slot let a build dying 1.5 s
//! after `listen()` through with the default 1 s; the canary catches it). A rollback, going
//! back to the version that served, has no canary.
//!
//! Until the roll-out ends, any failure of a worker it started — a candidate that exits, misses
//! its ready timeout or its watchdog, or a worker it already promoted that exits — aborts it:
//! candidates still starting are killed and those holding drain (they serve already), no
//! further old worker is stopped, the reload fails with the reason, and (with `on_failure =
//! "rollback"`, the default) the slots already moved are rolled back to the spec they ran
//! before, by a second roll-out that is readiness-gated like the first. A failed rollback stops there: never a loop, never a hard restart. Requests that
//! arrive during a roll-out are coalesced into one more roll-out afterwards.
//!
//! The part: [`Rollouts`] holds the roll-out in progress, the reloads queued behind it and the
//! last reload's result. Its decisions (promote a candidate that held, abort, finish) come
//! back as [`Command`]s for the driver (`Supervisor::drive_rollout`), which also starts the
//! candidates it asks for.

use crate::mono::Mono;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use super::command::{Command, WaiterId};
use super::pool::Pool;
use crate::config::OnFailure;
use crate::control::protocol::{LastReload, ReloadOutcome};
use crate::spawn::Spec;
use crate::worker::{Role, State, Worker};

/// `last_reload.error` of a roll-out the supervisor's own crash interrupted.
pub(super) const INTERRUPTED: &str = "the reload was interrupted by a supervisor restart (herdsman crashed or was killed mid roll-out); the workers it had moved are rolled back";

/// Why a reload failed (or could not start). Its `Display` is the wording clients and
/// `last_reload.error` have always shown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum ReloadFailure {
    /// The supervisor began to stop.
    Stopping,
    /// A worker the roll-out started failed; the report says how (see `exits::failure_report`).
    Worker(String),
    /// A new worker could not be started at all.
    CannotStart { slot: usize, error: String },
    /// The re-read configuration is invalid (its problems, `; `-separated).
    InvalidConfig(String),
    /// The new release could not be resolved (a dangling `current` link, a missing program).
    Unresolvable(String),
    /// The supervisor crashed (or was killed) mid roll-out and was restarted: the restarted
    /// one re-adopted the workers and ends the roll-out on one version (see `readopt`).
    Interrupted,
}

impl std::fmt::Display for ReloadFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReloadFailure::Stopping => f.write_str("the supervisor is stopping"),
            ReloadFailure::Worker(report) => f.write_str(report),
            ReloadFailure::CannotStart { slot, error } => write!(f, "worker {slot} could not start: {error}"),
            ReloadFailure::InvalidConfig(problems) => {
                write!(f, "invalid configuration, nothing changed: {problems}")
            }
            ReloadFailure::Unresolvable(e) => {
                write!(f, "cannot resolve the new release, nothing changed: {e}")
            }
            ReloadFailure::Interrupted => f.write_str(INTERRUPTED),
        }
    }
}

/// Why a roll-out runs.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(super) enum Purpose {
    /// A reload to a new generation.
    Reload,
    /// Undoing an aborted reload; `failure` is that reload's report.
    Rollback { failure: String },
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(super) struct Rollout {
    /// The spec the roll-out moves to (for a rollback: the generation it returns to).
    #[serde(with = "crate::specs::shared")]
    pub spec: Arc<Spec>,
    pub purpose: Purpose,
    /// Slots still to replace, in order, with the spec each moves to.
    #[serde(with = "crate::specs::slots")]
    pending: VecDeque<(usize, Arc<Spec>)>,
    /// Slots whose candidate is starting or holding: (slot, candidate pid).
    in_flight: Vec<(usize, i32)>,
    /// Slots this roll-out moved, with the worker that took over and the spec it replaced.
    #[serde(with = "crate::specs::moved")]
    moved: Vec<(usize, i32, Arc<Spec>)>,
    min_ready: Duration,
    pub total: usize,
    pub done: usize,
    started: Mono,
    /// The reload clients to answer (their channels are the driver's).
    waiters: Vec<WaiterId>,
}

impl Rollout {
    fn new(
        spec: Arc<Spec>,
        purpose: Purpose,
        pending: VecDeque<(usize, Arc<Spec>)>,
        min_ready: Duration,
        now: Mono,
        waiters: Vec<WaiterId>,
    ) -> Rollout {
        Rollout {
            spec,
            purpose,
            total: pending.len(),
            pending,
            in_flight: Vec::new(),
            moved: Vec::new(),
            min_ready,
            done: 0,
            started: now,
            waiters,
        }
    }

    pub fn candidate_for(&self, slot: usize) -> Option<i32> {
        self.in_flight.iter().find(|(s, _)| *s == slot).map(|(_, pid)| *pid)
    }

    /// Whether `pid` was started by this roll-out (a candidate, or a worker it promoted).
    pub fn owns(&self, pid: i32) -> bool {
        self.in_flight.iter().any(|(_, p)| *p == pid) || self.moved.iter().any(|(_, p, _)| *p == pid)
    }

    /// When the candidate `pid`, ready since `since`, has held long enough.
    pub fn hold_until(&self, since: Mono) -> Mono {
        since.checked_add(self.min_ready).unwrap_or(since)
    }

    /// The candidates starting or holding (ready, waiting out `min_ready`).
    pub fn candidates(&self) -> impl Iterator<Item = i32> + '_ {
        self.in_flight.iter().map(|(_, pid)| *pid)
    }

    pub fn is_rollback(&self) -> bool {
        matches!(self.purpose, Purpose::Rollback { .. })
    }

    /// The slot was scaled away.
    pub fn forget_slot(&mut self, slot: usize) {
        if self.pending.iter().any(|(s, _)| *s == slot) || self.candidate_for(slot).is_some() {
            self.total = self.total.saturating_sub(1);
        }
        self.pending.retain(|(s, _)| *s != slot);
        self.in_flight.retain(|(s, _)| *s != slot);
        self.moved.retain(|(s, _, _)| *s != slot);
    }

    /// A progress line for its clients.
    fn progress(&self, line: &str) -> Command {
        Command::Progress { waiters: self.waiters.clone(), line: line.to_string() }
    }

    fn verb(&self) -> &'static str {
        if self.is_rollback() { "rollback" } else { "reload" }
    }
}

/// The roll-out part: the one in progress, the reloads waiting for it, the last result.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(super) struct Rollouts {
    /// The roll-out in progress.
    pub current: Option<Rollout>,
    /// Reload requests that arrived during a roll-out: they get one more roll-out afterwards.
    queued: Option<Vec<WaiterId>>,
    pub last_reload: Option<LastReload>,
}

impl Rollouts {
    pub fn new() -> Rollouts {
        Rollouts { current: None, queued: None, last_reload: None }
    }

    /// Every spec the roll-out refers to.
    pub fn specs(&self) -> impl Iterator<Item = &Arc<Spec>> {
        self.current.iter().flat_map(|r| {
            std::iter::once(&r.spec)
                .chain(r.pending.iter().map(|(_, s)| s))
                .chain(r.moved.iter().map(|(_, _, s)| s))
        })
    }

    /// Visits every spec the roll-out refers to.
    pub fn for_each_spec(&mut self, f: &mut dyn FnMut(&mut Arc<Spec>)) {
        let Some(r) = &mut self.current else { return };
        f(&mut r.spec);
        r.pending.iter_mut().for_each(|(_, s)| f(s));
        r.moved.iter_mut().for_each(|(_, _, s)| f(s));
    }

    /// Whether `pid` was started by the roll-out in progress.
    pub fn owns(&self, pid: i32) -> bool {
        self.current.as_ref().is_some_and(|r| r.owns(pid))
    }

    /// Whether a candidate is starting or holding for `slot`.
    pub fn has_candidate(&self, slot: usize) -> bool {
        self.current.as_ref().is_some_and(|r| r.candidate_for(slot).is_some())
    }

    /// Whether nothing runs or waits to run.
    pub fn idle(&self) -> bool {
        self.current.is_none() && self.queued.is_none()
    }

    /// A reload asked for while a roll-out runs: it joins the one more roll-out that follows.
    pub fn queue(&mut self, waiter: WaiterId) -> Vec<Command> {
        tracing::info!("reload requested during a roll-out: queued (coalesced)");
        self.queued.get_or_insert_with(Vec::new).push(waiter);
        let line = "a roll-out is in progress: this reload runs right after it".to_string();
        vec![Command::Progress { waiters: vec![waiter], line }]
    }

    /// The queued reloads, once no roll-out runs.
    pub fn take_queued(&mut self) -> Option<Vec<WaiterId>> {
        if self.current.is_some() { None } else { self.queued.take() }
    }

    /// The supervisor stops: queued reloads are answered, they will not run.
    pub fn drop_queued(&mut self, generation: u64) -> Vec<Command> {
        let Some(waiters) = self.queued.take() else { return Vec::new() };
        let outcome = ReloadOutcome::new(false, generation, "the supervisor is stopping");
        vec![Command::Answer { waiters, outcome }]
    }

    /// A reload that cannot start (`why`): nothing changed.
    pub fn refuse(
        &mut self,
        waiters: Vec<WaiterId>,
        why: ReloadFailure,
        generation: u64,
        unix: u64,
    ) -> Vec<Command> {
        let msg = why.to_string();
        tracing::error!("reload failed: {msg}");
        self.record(false, Some(msg.clone()), unix);
        let outcome = ReloadOutcome::new(false, generation, msg);
        vec![Command::Reloaded { ok: false, took: None }, Command::Answer { waiters, outcome }]
    }

    /// Starts rolling `slots` to `spec` (a reload that was pinned already).
    pub fn begin(
        &mut self,
        spec: Arc<Spec>,
        slots: Vec<usize>,
        min_ready: Duration,
        now: Mono,
        waiters: Vec<WaiterId>,
    ) -> Vec<Command> {
        let g = spec.generation;
        let pending: VecDeque<(usize, Arc<Spec>)> = slots.into_iter().map(|id| (id, spec.clone())).collect();
        tracing::info!(generation = g, cwd = %spec.cwd.display(), "reload: rolling {} worker(s) to generation {g} ({})", pending.len(), spec.cwd.display());
        let r = Rollout::new(spec, Purpose::Reload, pending, min_ready, now, waiters);
        let progress = r.progress(&format!("rolling {} worker(s) to generation {g}", r.total));
        self.current = Some(r);
        // `now` is CLOCK_MONOTONIC, what systemd wants here.
        vec![progress, Command::Notify(format!("RELOADING=1\nMONOTONIC_USEC={}", now.as_micros()))]
    }

    /// Promotes the candidates that have been ready for `min_ready`: each takes over its slot
    /// and the worker it replaces is stopped.
    pub fn promote_held(&mut self, pool: &mut Pool, now: Mono) -> Vec<Command> {
        let Some(r) = &mut self.current else { return Vec::new() };
        let mut effects = Vec::new();
        let mut still = Vec::new();
        for (slot, pid) in std::mem::take(&mut r.in_flight) {
            let held = match pool.worker(pid).map(|w| w.state) {
                Some(State::Ready { since }) => now >= r.hold_until(since),
                _ => false,
            };
            if !held {
                still.push((slot, pid));
                continue;
            }
            let Some(spec) = pool.worker(pid).map(|w| w.spec.clone()) else { continue };
            let Some(previous) = pool.move_slot(slot, spec.clone()) else { continue };
            r.moved.push((slot, pid, previous));
            r.done += 1;
            let took = pool.worker(pid).map(|w| now.duration_since(w.started).as_secs_f64()).unwrap_or(0.0);
            let line = format!("worker {}/{} ready (pid {pid}, {took:.2} s)", r.done, r.total);
            crate::worker::span(slot, pid, spec.generation)
                .in_scope(|| tracing::info!("{}: {line}", r.verb()));
            effects.push(r.progress(&line));
            effects.push(Command::Promote { slot, new: pid, kill_old: false });
        }
        r.in_flight = still;
        effects
    }

    /// The next slot to start a candidate for, while fewer than `batch` candidates are
    /// starting (not ready yet) and fewer than `surge` are in flight (starting or holding). A
    /// candidate that is ready and holds `min_ready` does not hold the next one back: the next
    /// slot's candidate starts while it holds (see the module doc).
    pub fn next_candidate(&mut self, pool: &Pool, batch: usize, surge: usize) -> Option<(usize, Arc<Spec>)> {
        let r = self.current.as_mut()?;
        let starting = |r: &Rollout| {
            r.in_flight.iter().filter(|(_, pid)| !pool.worker(*pid).is_some_and(Worker::is_ready)).count()
        };
        // The canary: before a reload moved its first slot, only its first batch runs.
        let surge = if r.done == 0 && !r.is_rollback() { surge.min(batch) } else { surge };
        while starting(r) < batch && r.in_flight.len() < surge {
            let (slot, spec) = r.pending.pop_front()?;
            if pool.slots().contains_key(&slot) {
                return Some((slot, spec));
            }
        }
        None
    }

    /// The candidate `pid` for `slot` started: systemd's reload timeout is extended by the
    /// longest this step can take.
    pub fn candidate_started(&mut self, slot: usize, pid: i32, spec: &Spec) -> Vec<Command> {
        let Some(r) = &mut self.current else { return Vec::new() };
        r.in_flight.push((slot, pid));
        let extend = spec
            .ready_timeout
            .saturating_add(r.min_ready)
            .saturating_add(spec.stop_timeout.min(Duration::from_secs(30)));
        vec![Command::Notify(format!("EXTEND_TIMEOUT_USEC={}", extend.as_micros()))]
    }

    /// Ends the roll-out once every slot moved: the reload (or its rollback) is over. A
    /// reload's generation becomes the pool's.
    pub fn finish_if_done(&mut self, pool: &mut Pool, now: Mono, unix: u64) -> Vec<Command> {
        if !self.current.as_ref().is_some_and(|r| r.in_flight.is_empty() && r.pending.is_empty()) {
            return Vec::new();
        }
        let Some(r) = self.current.take() else { return Vec::new() };
        let ran = now.saturating_duration_since(r.started);
        let took = ran.as_secs_f64();
        let mut effects = Vec::new();
        let outcome = match r.purpose {
            Purpose::Reload => {
                pool.set_spec(r.spec.clone());
                let msg = format!(
                    "reload complete: {} worker(s) on generation {} in {took:.2} s",
                    r.done, r.spec.generation
                );
                tracing::info!(generation = r.spec.generation, "{msg}");
                self.record(true, None, unix);
                effects.push(Command::Reloaded { ok: true, took: Some(ran) });
                ReloadOutcome::new(true, r.spec.generation, msg)
            }
            Purpose::Rollback { failure } => {
                let msg = format!(
                    "{failure}; rolled back {} worker(s) to generation {} in {took:.2} s",
                    r.done, r.spec.generation
                );
                tracing::warn!(generation = r.spec.generation, "{msg}");
                self.set_rollback("ok");
                ReloadOutcome::new(false, r.spec.generation, msg)
            }
        };
        effects.push(Command::Notify("READY=1".to_string()));
        effects.push(Command::Answer { waiters: r.waiters, outcome });
        effects
    }

    /// Aborts the roll-out in progress: its candidates are stopped (drained if they hold,
    /// killed if they are still starting), no further old worker is stopped, and — for a reload with `on_failure = "rollback"`, unless `stopping` — the
    /// slots it moved start rolling back.
    pub fn fail(
        &mut self,
        reason: ReloadFailure,
        pool: &mut Pool,
        on_failure: OnFailure,
        stopping: bool,
        now: Mono,
        unix: u64,
    ) -> Vec<Command> {
        let Some(mut r) = self.current.take() else { return Vec::new() };
        let mut effects = Vec::new();
        for (_, pid) in &r.in_flight {
            let Some(w) = pool.worker_mut(*pid) else { continue };
            w.role = Role::Retired;
            // One that is ready (holding) serves already: it drains like any retired worker.
            // One still starting is killed.
            if w.is_ready() {
                effects.push(Command::Retire(*pid));
            } else {
                effects.push(Command::Kill { pid: *pid, failure: None });
            }
        }
        let msg = match &r.purpose {
            Purpose::Reload => {
                self.record(false, Some(reason.to_string()), unix);
                effects.push(Command::Reloaded {
                    ok: false,
                    took: Some(now.saturating_duration_since(r.started)),
                });
                format!(
                    "reload to generation {} failed after {}/{} worker(s): {reason}",
                    r.spec.generation, r.done, r.total
                )
            }
            Purpose::Rollback { failure } => {
                self.set_rollback("failed");
                format!(
                    "{failure}; the rollback to generation {} failed too after {}/{} worker(s): {reason}; stopping there",
                    r.spec.generation, r.done, r.total
                )
            }
        };
        tracing::error!(generation = r.spec.generation, "{msg}");
        let msg = match (&r.purpose, r.moved.is_empty()) {
            (Purpose::Rollback { .. }, _) => msg,
            (Purpose::Reload, true) => format!("{msg}; every worker keeps running the previous code"),
            (Purpose::Reload, false) if on_failure == OnFailure::Rollback && !stopping => {
                match self.start_rollback(&mut r, msg, pool, now, &mut effects) {
                    Ok(()) => return effects,
                    Err(msg) => msg,
                }
            }
            (Purpose::Reload, false) => format!(
                "{msg}; {} worker(s) stay on generation {} (on_failure = keep)",
                r.moved.len(),
                r.spec.generation
            ),
        };
        // The reload is over (RELOADING=1 → READY=1), unless it ends because we are stopping:
        // systemd already has STOPPING=1.
        if !stopping {
            effects.push(Command::Notify("READY=1".to_string()));
        }
        let outcome = ReloadOutcome::new(false, r.spec.generation, msg);
        effects.push(Command::Answer { waiters: std::mem::take(&mut r.waiters), outcome });
        effects
    }

    /// Rolls the slots `failed` moved back to what each ran before. Slots whose new worker is
    /// gone restart from the old spec as usual; the ones still running the new spec get a
    /// readiness-gated roll-out. `Err` carries the final message when nothing is left to roll.
    fn start_rollback(
        &mut self,
        failed: &mut Rollout,
        msg: String,
        pool: &mut Pool,
        now: Mono,
        effects: &mut Vec<Command>,
    ) -> Result<(), String> {
        let mut pending = VecDeque::new();
        let mut restarting = 0;
        for (slot_id, _, previous) in &failed.moved {
            let Some(slot) = pool.slot_mut(*slot_id) else { continue };
            slot.spec = previous.clone();
            let running_new = slot
                .active
                .and_then(|pid| pool.worker(pid))
                .is_some_and(|w| w.is_ready() && Arc::ptr_eq(&w.spec, &failed.spec));
            if running_new {
                pending.push_back((*slot_id, previous.clone()));
            } else {
                restarting += 1;
            }
        }
        let back_to = failed.moved.first().map(|(_, _, p)| p.clone()).unwrap_or_else(|| pool.spec().clone());
        let failure = if restarting > 0 {
            format!("{msg}; {restarting} worker(s) restart on generation {}", back_to.generation)
        } else {
            msg
        };
        if pending.is_empty() {
            self.set_rollback("ok");
            return Err(failure);
        }
        let line = format!("rolling {} worker(s) back to generation {}", pending.len(), back_to.generation);
        tracing::warn!(generation = back_to.generation, "reload failed: {line}");
        effects.push(failed.progress(&line));
        self.set_rollback("running");
        let waiters = std::mem::take(&mut failed.waiters);
        self.current = Some(Rollout::new(
            back_to,
            Purpose::Rollback { failure },
            pending,
            failed.min_ready,
            now,
            waiters,
        ));
        Ok(())
    }

    /// When candidates holding for `min_ready` have held long enough.
    pub fn deadlines<'a>(&'a self, pool: &'a Pool) -> impl Iterator<Item = Mono> + 'a {
        self.current.iter().flat_map(move |r| {
            r.candidates().filter_map(move |pid| match pool.worker(pid).map(|w: &Worker| w.state) {
                Some(State::Ready { since }) => Some(r.hold_until(since)),
                _ => None,
            })
        })
    }

    /// `unix`: the wall-clock time (seconds), given by the driver like `now`.
    fn record(&mut self, ok: bool, error: Option<String>, unix: u64) {
        self.last_reload = Some(LastReload {
            result: if ok { "ok" } else { "failed" }.to_string(),
            at: unix,
            error,
            rollback: None,
        });
    }

    fn set_rollback(&mut self, state: &str) {
        if let Some(lr) = &mut self.last_reload {
            lr.rollback = Some(state.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ReloadFailure;

    /// `last_reload.error` and the clients' messages keep the wording they had as strings.
    #[test]
    fn a_reload_failure_reads_as_it_always_did() {
        let cases = [
            (ReloadFailure::Stopping, "the supervisor is stopping"),
            (
                ReloadFailure::Worker("worker 0 (pid 7, generation 2) exited".into()),
                "worker 0 (pid 7, generation 2) exited",
            ),
            (
                ReloadFailure::CannotStart { slot: 1, error: "no such file".into() },
                "worker 1 could not start: no such file",
            ),
            (ReloadFailure::InvalidConfig("a; b".into()), "invalid configuration, nothing changed: a; b"),
            (
                ReloadFailure::Unresolvable("gone".into()),
                "cannot resolve the new release, nothing changed: gone",
            ),
        ];
        for (failure, words) in cases {
            assert_eq!(failure.to_string(), words);
        }
    }
}
