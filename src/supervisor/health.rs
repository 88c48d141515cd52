//! Per-worker health: the watchdog (`WATCHDOG=1` pings) and the memory limit.
//!
//! An unhealthy worker is *replaced*, not just killed: a new worker starts in its slot first,
//! and only once it is ready is the old one stopped (a hung worker gets SIGKILL, a worker
//! over its memory limit the normal stop signal so it drains). Memory is sampled from
//! `/proc/PID/stat` every [`MEMORY_CHECK`] (a few microseconds per worker), and a worker is
//! replaced only when it stays above the limit for [`MEMORY_STRIKES`] samples in a row.

use std::time::{Duration, Instant};

use super::Supervisor;
use crate::worker::{Failure, FailureKind, Role, State};

pub const MEMORY_CHECK: Duration = Duration::from_secs(5);
const MEMORY_STRIKES: u32 = 2;

/// A replacement in flight: the new worker's old counterpart.
#[derive(Debug, Clone)]
pub struct Replacement {
    pub old: i32,
    /// The old worker is hung: SIGKILL instead of the stop signal.
    pub hard: bool,
}

impl Supervisor {
    /// When the watchdog of a ready worker runs out.
    pub(super) fn watchdog_deadline(&self, pid: i32) -> Option<Instant> {
        let w = self.workers.get(&pid)?;
        let every = w.spec.watchdog?;
        match (w.role, w.state) {
            (Role::Active | Role::Candidate, State::Ready { since }) if !self.is_being_replaced(pid) => {
                Some(w.last_ping.max(since) + every)
            }
            _ => None,
        }
    }

    fn is_being_replaced(&self, old: i32) -> bool {
        self.replacing.values().any(|r| r.old == old)
    }

    /// Checks watchdogs and (when due) memory; starts replacements.
    pub(super) fn check_health(&mut self, now: Instant) {
        let hung: Vec<i32> = self
            .workers
            .keys()
            .copied()
            .filter(|pid| self.watchdog_deadline(*pid).is_some_and(|d| now >= d))
            .collect();
        for pid in hung {
            let every = self.workers[&pid].spec.watchdog.unwrap_or_default();
            let reason = Failure::new(
                FailureKind::Watchdog,
                format!("watchdog: no WATCHDOG=1 for {}", super::human(every)),
            );
            self.watchdog_timeouts += 1;
            if self.rollout.as_ref().is_some_and(|r| r.owns(pid)) {
                // A worker the roll-out started is hung: kill it; its exit aborts the roll-out.
                self.kill_now(pid, Some(reason));
            } else {
                self.replace_worker(pid, reason, true);
            }
        }
        if self.next_memory_check.is_some_and(|t| now >= t) {
            self.next_memory_check = Some(now + MEMORY_CHECK);
            let mut over = Vec::new();
            let pids: Vec<i32> = self.workers.keys().copied().collect();
            let groups = self.host.memory(&pids);
            for (pid, w) in self.workers.iter_mut() {
                let Some(limit) = w.spec.max_memory else { continue };
                if w.role != Role::Active || !w.is_ready() {
                    continue;
                }
                let rss = groups.get(pid).copied().unwrap_or(0);
                w.memory_strikes = if rss > limit { w.memory_strikes + 1 } else { 0 };
                if w.memory_strikes >= MEMORY_STRIKES {
                    w.memory_strikes = 0;
                    over.push((*pid, rss, limit));
                }
            }
            for (pid, rss, limit) in over {
                if !self.is_being_replaced(pid) {
                    let reason = Failure::new(
                        FailureKind::Memory,
                        format!("memory {} MiB above the limit of {} MiB", rss >> 20, limit >> 20),
                    );
                    self.replace_worker(pid, reason, false);
                }
            }
        }
    }

    /// Starts a replacement for `old` in its slot; the old worker goes once it is ready.
    fn replace_worker(&mut self, old: i32, reason: Failure, hard: bool) {
        let Some(w) = self.workers.get(&old) else { return };
        let (slot, spec) = (w.slot, w.spec.clone());
        tracing::warn!(
            app = %self.app, worker_id = slot, worker_pid = old, worker_generation = spec.generation,
            "worker {slot} (pid {old}) {reason}: starting a replacement"
        );
        if let Some(w) = self.workers.get_mut(&old) {
            w.failure = Some(reason.clone());
        }
        match self.launch(slot, &spec, Role::Replacement) {
            Ok(new) => {
                self.replacing.insert(new, Replacement { old, hard });
            }
            Err(e) => {
                tracing::error!(app = %self.app, worker_id = slot, "replacement for worker {slot} failed: {e}");
                if hard {
                    self.kill_now(old, None);
                }
            }
        }
    }

    /// Swaps in replacements that became ready.
    pub(super) fn promote_replacements(&mut self) {
        let ready: Vec<(i32, Replacement)> = self
            .replacing
            .iter()
            .filter(|(new, _)| self.workers.get(new).is_some_and(|w| w.is_ready()))
            .map(|(n, r)| (*n, r.clone()))
            .collect();
        for (new, r) in ready {
            self.replacing.remove(&new);
            let Some(slot_id) = self.workers.get(&new).map(|w| w.slot) else { continue };
            let current = self.slots.get(&slot_id).and_then(|s| s.active);
            if current != Some(r.old) {
                // The slot moved on meanwhile (roll-out, restart): this replacement is stale.
                self.retire(new);
                continue;
            }
            if let Some(slot) = self.slots.get_mut(&slot_id) {
                slot.restarts += 1;
            }
            tracing::info!(app = %self.app, worker_id = slot_id, worker_pid = new, "worker {slot_id} replaced (pid {} → {new})", r.old);
            if r.hard {
                self.kill_now(r.old, None);
            }
            self.promote(slot_id, new);
        }
    }

    /// A replacement died before it was ready.
    pub(super) fn replacement_failed(&mut self, new: i32, report: &str) {
        if let Some(r) = self.replacing.remove(&new) {
            tracing::error!(app = %self.app, "replacement failed: {report}");
            if r.hard {
                // The old worker is hung and serves nobody: kill it; its slot restarts with back-off.
                self.kill_now(r.old, None);
            }
        }
    }
}
