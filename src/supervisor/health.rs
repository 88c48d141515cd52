//! Per-worker health: the watchdog (`WATCHDOG=1` pings) and the memory limit.
//!
//! An unhealthy worker is *replaced*, not just killed: a new worker starts in its slot first,
//! and only once it is ready is the old one stopped (a hung worker gets SIGKILL, a worker
//! over its memory limit the normal stop signal so it drains). Memory is sampled from
//! `/proc/PID/stat` every [`MEMORY_CHECK`] (a few microseconds per worker), and a worker is
//! replaced only when it stays above the limit for [`MEMORY_STRIKES`] samples in a row.
//!
//! The part: [`Health`] holds the replacements in flight and the memory clock. It reads the
//! pool and answers with [`Command`]s: replace a worker, kill one, promote a replacement that
//! became ready (the same hand-over a roll-out uses).

use super::clock::Mono;
use std::collections::HashMap;
use std::time::Duration;

use super::command::Command;
use super::pool::Pool;
use crate::worker::{Failure, FailureKind, Role, State, Worker};

pub const MEMORY_CHECK: Duration = Duration::from_secs(5);
const MEMORY_STRIKES: u32 = 2;

/// A replacement in flight: the new worker's old counterpart.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Replacement {
    old: i32,
    /// The old worker is hung: SIGKILL instead of the stop signal.
    hard: bool,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(super) struct Health {
    /// Health replacements in flight, by new worker pid.
    replacing: HashMap<i32, Replacement>,
    /// When memory is sampled next (`None`: no worker has a limit).
    pub next_memory_check: Option<Mono>,
}

impl Health {
    pub fn new() -> Health {
        Health { replacing: HashMap::new(), next_memory_check: None }
    }

    /// Whether no replacement is in flight.
    pub fn idle(&self) -> bool {
        self.replacing.is_empty()
    }

    /// A worker with a memory limit started: sampling begins.
    pub fn watch_memory(&mut self, now: Mono) {
        if self.next_memory_check.is_none() {
            self.next_memory_check = Some(now + MEMORY_CHECK);
        }
    }

    /// When the watchdog of a ready worker runs out.
    pub fn watchdog_deadline(&self, w: &Worker) -> Option<Mono> {
        let every = w.spec.watchdog?;
        match (w.role, w.state) {
            (Role::Active | Role::Candidate, State::Ready { since }) if !self.is_being_replaced(w.pid) => {
                Some(w.last_ping.max(since) + every)
            }
            _ => None,
        }
    }

    /// When the loop must wake for a watchdog or the memory sample.
    pub fn deadlines<'a>(&'a self, pool: &'a Pool) -> impl Iterator<Item = Mono> + 'a {
        pool.workers().values().filter_map(move |w| self.watchdog_deadline(w)).chain(self.next_memory_check)
    }

    fn is_being_replaced(&self, old: i32) -> bool {
        self.replacing.values().any(|r| r.old == old)
    }

    /// Workers whose watchdog ran out: a worker `owned` by the roll-out is killed (its exit
    /// aborts the roll-out), any other is replaced and killed once its replacement is ready.
    pub fn check_watchdogs(&mut self, pool: &Pool, now: Mono, owned: impl Fn(i32) -> bool) -> Vec<Command> {
        let mut hung: Vec<&Worker> =
            pool.workers().values().filter(|w| self.watchdog_deadline(w).is_some_and(|d| now >= d)).collect();
        hung.sort_by_key(|w| w.pid);
        let mut effects = Vec::new();
        for w in hung {
            let every = w.spec.watchdog.unwrap_or_default();
            let failure = Failure::new(
                FailureKind::Watchdog,
                format!("watchdog: no WATCHDOG=1 for {}", super::human(every)),
            );
            effects.push(if owned(w.pid) {
                Command::Kill { pid: w.pid, failure: Some(failure) }
            } else {
                Command::Replace { old: w.pid, failure, hard: true }
            });
        }
        effects
    }

    /// Whether memory is to be sampled now; if so, the next sample is scheduled.
    pub fn memory_due(&mut self, now: Mono) -> bool {
        let due = self.next_memory_check.is_some_and(|t| now >= t);
        if due {
            self.next_memory_check = Some(now + MEMORY_CHECK);
        }
        due
    }

    /// Takes a memory sample (`rss`: bytes by worker): an active worker above its limit for
    /// [`MEMORY_STRIKES`] samples in a row is replaced (and stopped gracefully after).
    pub fn check_memory(&mut self, pool: &mut Pool, rss: &HashMap<i32, u64>) -> Vec<Command> {
        let mut over = Vec::new();
        for w in pool.workers_mut() {
            let pid = &w.pid;
            let Some(limit) = w.spec.max_memory else { continue };
            if w.role != Role::Active || !w.is_ready() {
                continue;
            }
            let rss = rss.get(pid).copied().unwrap_or(0);
            w.memory_strikes = if rss > limit { w.memory_strikes + 1 } else { 0 };
            if w.memory_strikes >= MEMORY_STRIKES {
                w.memory_strikes = 0;
                over.push((*pid, rss, limit));
            }
        }
        over.sort_unstable();
        over.into_iter()
            .filter(|(pid, _, _)| !self.is_being_replaced(*pid))
            .map(|(pid, rss, limit)| {
                let failure = Failure::new(
                    FailureKind::Memory,
                    format!("memory {} MiB above the limit of {} MiB", rss >> 20, limit >> 20),
                );
                Command::Replace { old: pid, failure, hard: false }
            })
            .collect()
    }

    /// The replacement `new` for `old` started.
    pub fn replacing(&mut self, new: i32, old: i32, hard: bool) {
        self.replacing.insert(new, Replacement { old, hard });
    }

    /// Swaps in the replacements that became ready. One whose slot moved on meanwhile (a
    /// roll-out, a restart) is stale and retired instead.
    pub fn promote_ready(&mut self, pool: &mut Pool) -> Vec<Command> {
        let mut ready: Vec<(i32, Replacement)> = self
            .replacing
            .iter()
            .filter(|(new, _)| pool.worker(**new).is_some_and(|w| w.is_ready()))
            .map(|(n, r)| (*n, r.clone()))
            .collect();
        ready.sort_by_key(|(n, _)| *n);
        let mut effects = Vec::new();
        for (new, r) in ready {
            self.replacing.remove(&new);
            let Some(slot_id) = pool.worker(new).map(|w| w.slot) else { continue };
            if pool.slot(slot_id).and_then(|s| s.active) != Some(r.old) {
                effects.push(Command::Retire(new));
                continue;
            }
            if let Some(slot) = pool.slot_mut(slot_id) {
                slot.restarts += 1;
            }
            crate::worker::span(slot_id, new, pool.worker(new).map_or(0, |w| w.spec.generation))
                .in_scope(|| tracing::info!("worker {slot_id} replaced (pid {} → {new})", r.old));
            effects.push(Command::Promote { slot: slot_id, new, kill_old: r.hard });
        }
        effects
    }

    /// The replacement `new` died before it was ready. If the worker it was to replace is
    /// hung it serves nobody: it is killed, and its slot restarts with back-off.
    pub fn replacement_failed(&mut self, new: i32, report: &str) -> Vec<Command> {
        let Some(r) = self.replacing.remove(&new) else { return Vec::new() };
        tracing::error!("replacement failed: {report}");
        if r.hard { vec![Command::Kill { pid: r.old, failure: None }] } else { Vec::new() }
    }
}
