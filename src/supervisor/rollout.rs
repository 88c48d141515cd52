//! Rolling reload: generation g → g+1, slot by slot, and its safety net.
//!
//! For each slot (in batches of `reload_batch`): start a candidate of the new generation, wait
//! until it is ready *and has stayed ready for `min_ready`*, then make it the slot's active
//! worker and send the stop signal to the old one, which drains on its own timer while the
//! roll-out moves on. An old worker is never stopped before its replacement is ready.
//!
//! Until the roll-out ends, any failure of a worker it started — a candidate that exits, misses
//! its ready timeout or its watchdog, or a worker it already promoted that exits — aborts it:
//! pending candidates are killed, no further old worker is stopped, the reload fails with the
//! reason, and (with `on_failure = "rollback"`, the default) the slots already moved are rolled
//! back to the spec they ran before, by a second roll-out that is readiness-gated like the
//! first. A failed rollback stops there: never a loop, never a hard restart. Requests that
//! arrive during a roll-out are coalesced into one more roll-out afterwards.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::{ReloadOutcome, Supervisor};
use crate::config::OnFailure;
use crate::control::protocol::LastReload;
use crate::notify::monotonic_usec;
use crate::requests::Waiter;
use crate::spawn::Spec;
use crate::worker::{Role, State};

/// Why a roll-out runs.
pub(super) enum Purpose {
    /// A reload to a new generation.
    Reload,
    /// Undoing an aborted reload; `failure` is that reload's report.
    Rollback { failure: String },
}

pub(super) struct Rollout {
    /// The spec the roll-out moves to (for a rollback: the generation it returns to).
    pub spec: Arc<Spec>,
    pub purpose: Purpose,
    /// Slots still to replace, in order, with the spec each moves to.
    pending: VecDeque<(usize, Arc<Spec>)>,
    /// Slots whose candidate is starting or holding: (slot, candidate pid).
    in_flight: Vec<(usize, i32)>,
    /// Slots this roll-out moved, with the worker that took over and the spec it replaced.
    moved: Vec<(usize, i32, Arc<Spec>)>,
    min_ready: Duration,
    pub total: usize,
    pub done: usize,
    started: Instant,
    waiters: Vec<Waiter>,
}

impl Rollout {
    pub fn candidate_for(&self, slot: usize) -> Option<i32> {
        self.in_flight.iter().find(|(s, _)| *s == slot).map(|(_, pid)| *pid)
    }

    /// Whether `pid` was started by this roll-out (a candidate, or a worker it promoted).
    pub fn owns(&self, pid: i32) -> bool {
        self.in_flight.iter().any(|(_, p)| *p == pid) || self.moved.iter().any(|(_, p, _)| *p == pid)
    }

    /// When the candidate `pid`, ready since `since`, has held long enough.
    pub fn hold_until(&self, since: Instant) -> Instant {
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
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Supervisor {
    pub(super) fn request_reload(&mut self, reply: Waiter) {
        if self.stopping {
            let outcome = ReloadOutcome::new(false, self.spec.generation, "the supervisor is stopping");
            self.answer(vec![reply], outcome);
        } else if self.upgrading() {
            tracing::info!(app = %self.app, "reload requested during an upgrade: it waits for the upgrade");
            if let Some(tx) = &reply.progress {
                let _ = tx.send("an in-place upgrade is in progress: this reload waits for it".to_string());
            }
            self.deferred.push(reply);
        } else if self.rollout.is_some() {
            tracing::info!(app = %self.app, "reload requested during a roll-out: queued (coalesced)");
            if let Some(tx) = &reply.progress {
                let _ = tx.send("a roll-out is in progress: this reload runs right after it".to_string());
            }
            self.queued.get_or_insert_with(Vec::new).push(reply);
        } else {
            self.start_rollout(vec![reply]);
        }
    }

    fn start_rollout(&mut self, waiters: Vec<Waiter>) {
        let refuse = |sup: &mut Self, waiters, msg: String| {
            tracing::error!(app = %sup.app, "reload failed: {msg}");
            sup.metrics.reloaded(false, None);
            sup.record_reload(false, Some(msg.clone()));
            let outcome = ReloadOutcome::new(false, sup.spec.generation, msg);
            sup.answer(waiters, outcome);
        };
        let settings = match &self.reload_source {
            Some(source) => match source() {
                Ok(new) => new,
                Err(problems) => {
                    let msg = format!("invalid configuration, nothing changed: {}", problems.0.join("; "));
                    return refuse(self, waiters, msg);
                }
            },
            None => self.settings.clone(),
        };
        // Pin the new generation before anything changes: a release that cannot be resolved
        // (a dangling `current` link, a missing program) fails the reload and changes nothing.
        let spec = match self.launcher.pin(&settings, self.generation + 1) {
            Ok(spec) => Arc::new(spec),
            Err(e) => {
                return refuse(
                    self,
                    waiters,
                    format!("cannot resolve the new release, nothing changed: {e}"),
                );
            }
        };
        if self.reload_source.is_some() {
            self.apply_settings(settings);
        }
        self.generation += 1;
        let pending: VecDeque<(usize, Arc<Spec>)> =
            self.slots.keys().copied().filter(|id| *id < self.desired).map(|id| (id, spec.clone())).collect();
        tracing::info!(app = %self.app, generation = self.generation, cwd = %spec.cwd.display(), "reload: rolling {} worker(s) to generation {} ({})", pending.len(), self.generation, spec.cwd.display());
        self.notifier.send(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()));
        let line = format!("rolling {} worker(s) to generation {}", pending.len(), self.generation);
        for w in &waiters {
            if let Some(tx) = &w.progress {
                let _ = tx.send(line.clone());
            }
        }
        self.rollout = Some(Rollout {
            spec,
            purpose: Purpose::Reload,
            total: pending.len(),
            pending,
            in_flight: Vec::new(),
            moved: Vec::new(),
            min_ready: self.settings.min_ready,
            done: 0,
            started: self.host.now(),
            waiters,
        });
    }

    /// Takes in a re-read configuration. Sockets and the name cannot change while running.
    fn apply_settings(&mut self, new: crate::config::Settings) {
        if new.listen != self.settings.listen && !new.listen.is_empty() {
            tracing::warn!(app = %self.app, "listen addresses changed in the config: sockets are kept; restart the app to change them");
        }
        if new.name != self.settings.name {
            tracing::warn!(app = %self.app, "the app name cannot change while running; keeping {:?}", self.settings.name);
        }
        // The file's worker count wins only when the file changed it since it was last read;
        // otherwise a runtime scale is kept.
        if new.file_workers != self.settings.file_workers && new.file_workers.is_some() {
            tracing::info!(app = %self.app, "config file changed workers to {}", new.workers);
            self.set_desired(new.workers.get());
        }
        if new.balance != self.settings.balance {
            tracing::warn!(app = %self.app, "balance changed in the config: the sockets are kept as they are ({}); restart the app to change it", self.settings.balance);
        }
        let (name, balance) = (self.settings.name.clone(), self.settings.balance);
        self.settings = crate::config::Settings { name, balance, ..new };
    }

    pub(super) fn drive_rollout(&mut self) {
        if self.rollout.is_none() {
            if let Some(waiters) = self.queued.take() {
                self.start_rollout(waiters);
            }
        }
        let Some(mut r) = self.rollout.take() else { return };
        let now = self.host.now();
        // Promote candidates that have been ready for min_ready; retire the workers they replace.
        let mut still = Vec::new();
        for (slot_id, pid) in std::mem::take(&mut r.in_flight) {
            let held = match self.workers.get(&pid).map(|w| w.state) {
                Some(State::Ready { since }) => now >= r.hold_until(since),
                _ => false,
            };
            if !held {
                still.push((slot_id, pid));
                continue;
            }
            let Some(spec) = self.workers.get(&pid).map(|w| w.spec.clone()) else { continue };
            let Some(slot) = self.slots.get_mut(&slot_id) else { continue };
            let previous = std::mem::replace(&mut slot.spec, spec.clone());
            slot.failures = 0;
            slot.restart_at = None;
            self.promote(slot_id, pid);
            r.moved.push((slot_id, pid, previous));
            r.done += 1;
            let took =
                self.workers.get(&pid).map(|w| now.duration_since(w.started).as_secs_f64()).unwrap_or(0.0);
            let line = format!("worker {}/{} ready (pid {pid}, {took:.2} s)", r.done, r.total);
            tracing::info!(app = %self.app, worker_id = slot_id, worker_pid = pid, worker_generation = spec.generation, "{}: {line}", if r.is_rollback() { "rollback" } else { "reload" });
            for w in &r.waiters {
                if let Some(tx) = &w.progress {
                    let _ = tx.send(line.clone());
                }
            }
        }
        r.in_flight = still;
        // Start the next batch.
        let batch = self.settings.reload_batch.get();
        while r.in_flight.len() < batch {
            let Some((slot_id, spec)) = r.pending.pop_front() else { break };
            if !self.slots.contains_key(&slot_id) {
                continue;
            }
            match self.launch(slot_id, &spec, Role::Candidate) {
                Ok(pid) => {
                    r.in_flight.push((slot_id, pid));
                    let extend = spec
                        .ready_timeout
                        .saturating_add(r.min_ready)
                        .saturating_add(spec.stop_timeout.min(Duration::from_secs(30)));
                    self.notifier.send(&format!("EXTEND_TIMEOUT_USEC={}", extend.as_micros()));
                }
                Err(e) => {
                    self.rollout = Some(r);
                    self.fail_rollout(format!("worker {slot_id} could not start: {e}"));
                    return;
                }
            }
        }
        if r.in_flight.is_empty() && r.pending.is_empty() {
            self.finish_rollout(r);
        } else {
            self.rollout = Some(r);
        }
    }

    /// Every slot of the roll-out moved: the reload (or its rollback) is over.
    fn finish_rollout(&mut self, r: Rollout) {
        let took = r.started.elapsed().as_secs_f64();
        let outcome = match r.purpose {
            Purpose::Reload => {
                self.spec = r.spec.clone();
                let msg = format!(
                    "reload complete: {} worker(s) on generation {} in {took:.2} s",
                    r.done, r.spec.generation
                );
                tracing::info!(app = %self.app, generation = r.spec.generation, "{msg}");
                self.record_reload(true, None);
                self.metrics.reloaded(true, Some(r.started.elapsed()));
                ReloadOutcome::new(true, r.spec.generation, msg)
            }
            Purpose::Rollback { failure } => {
                let msg = format!(
                    "{failure}; rolled back {} worker(s) to generation {} in {took:.2} s",
                    r.done, r.spec.generation
                );
                tracing::warn!(app = %self.app, generation = r.spec.generation, "{msg}");
                self.set_rollback("ok");
                ReloadOutcome::new(false, r.spec.generation, msg)
            }
        };
        self.notifier.send("READY=1");
        self.answer(r.waiters, outcome);
    }

    /// Aborts the roll-out in progress: its candidates are killed, no further old worker is
    /// stopped, and — for a reload with `on_failure = "rollback"` — the slots it moved start
    /// rolling back.
    pub(super) fn fail_rollout(&mut self, reason: String) {
        let Some(mut r) = self.rollout.take() else { return };
        for (_, pid) in &r.in_flight {
            self.kill_now(*pid, None);
            if let Some(w) = self.workers.get_mut(pid) {
                w.role = Role::Retired;
            }
        }
        let msg = match &r.purpose {
            Purpose::Reload => {
                self.record_reload(false, Some(reason.clone()));
                self.metrics.reloaded(false, Some(r.started.elapsed()));
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
        tracing::error!(app = %self.app, generation = r.spec.generation, "{msg}");
        let msg = match (&r.purpose, r.moved.is_empty()) {
            (Purpose::Rollback { .. }, _) => msg,
            (Purpose::Reload, true) => format!("{msg}; every worker keeps running the previous code"),
            (Purpose::Reload, false) if self.settings.on_failure == OnFailure::Rollback && !self.stopping => {
                match self.start_rollback(&mut r, msg) {
                    Ok(()) => return,
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
        if !self.stopping {
            self.notifier.send("READY=1");
        }
        let outcome = ReloadOutcome::new(false, r.spec.generation, msg);
        self.answer(std::mem::take(&mut r.waiters), outcome);
    }

    /// Rolls the slots `failed` moved back to what each ran before. Slots whose new worker is
    /// gone restart from the old spec as usual; the ones still running the new spec get a
    /// readiness-gated roll-out. `Err` carries the final message when nothing is left to roll.
    fn start_rollback(&mut self, failed: &mut Rollout, msg: String) -> Result<(), String> {
        let mut pending = VecDeque::new();
        let mut restarting = 0;
        for (slot_id, _, previous) in &failed.moved {
            let Some(slot) = self.slots.get_mut(slot_id) else { continue };
            slot.spec = previous.clone();
            let running_new = slot
                .active
                .and_then(|pid| self.workers.get(&pid))
                .is_some_and(|w| w.is_ready() && Arc::ptr_eq(&w.spec, &failed.spec));
            if running_new {
                pending.push_back((*slot_id, previous.clone()));
            } else {
                restarting += 1;
            }
        }
        let back_to = failed.moved.first().map(|(_, _, p)| p.clone()).unwrap_or_else(|| self.spec.clone());
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
        tracing::warn!(app = %self.app, generation = back_to.generation, "reload failed: {line}");
        for w in &failed.waiters {
            if let Some(tx) = &w.progress {
                let _ = tx.send(line.clone());
            }
        }
        self.set_rollback("running");
        self.rollout = Some(Rollout {
            spec: back_to,
            purpose: Purpose::Rollback { failure },
            total: pending.len(),
            pending,
            in_flight: Vec::new(),
            moved: Vec::new(),
            min_ready: failed.min_ready,
            done: 0,
            started: self.host.now(),
            waiters: std::mem::take(&mut failed.waiters),
        });
        Ok(())
    }

    fn record_reload(&mut self, ok: bool, error: Option<String>) {
        self.last_reload = Some(LastReload {
            result: if ok { "ok" } else { "failed" }.to_string(),
            at: unix_now(),
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
