//! The core's side of starting workers: which slots to fill, and what a start's result means.
//!
//! Starting a process is the driver's (`Supervisor::launch`); the core says what to start and
//! is given the result straight back: the pid (the worker joins the pool) or the error (the
//! slot backs off, a hung worker's replacement gives up).

use std::sync::Arc;

use super::command::Command;
use super::{Core, human};
use crate::mono::Mono;
use crate::spawn::{SpawnError, Spec};
use crate::worker::{Failure, Role, State, Worker};

impl Core {
    /// Creates the wanted slots, drops the extra ones (their workers retire: the commands)
    /// and names the empty slots to start now (after their back-off, unless a roll-out
    /// candidate is coming), each with the spec it runs.
    pub(super) fn slots_to_fill(&mut self, now: Mono) -> (Vec<Command>, Vec<(usize, Arc<Spec>)>) {
        let spec = self
            .rollouts
            .current
            .as_ref()
            .map(|r| r.spec.clone())
            .unwrap_or_else(|| self.pool.spec().clone());
        self.pool.add_missing_slots(&spec);
        let mut out = Vec::new();
        for (id, pids) in self.pool.remove_extra_slots() {
            out.extend(pids.into_iter().map(Command::Retire));
            if let Some(r) = &mut self.rollouts.current {
                r.forget_slot(id);
            }
        }
        let start = self
            .pool
            .slots_to_start(now)
            .into_iter()
            .filter(|id| !self.rollouts.has_candidate(*id))
            .filter_map(|id| self.pool.slot(id).map(|s| (id, s.spec.clone())))
            .collect();
        (out, start)
    }

    /// Worker `pid` started for `slot` running `spec` as `role` (`has_channel`,
    /// `intercepted`: the descriptors the driver keeps for it).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn started(
        &mut self,
        slot: usize,
        spec: &Arc<Spec>,
        role: Role,
        pid: i32,
        has_channel: bool,
        intercepted: bool,
        now: Mono,
    ) {
        if spec.max_memory.is_some() {
            self.health.watch_memory(now);
        }
        self.pool.insert_worker(Worker {
            pid,
            slot,
            spec: spec.clone(),
            state: State::Starting { deadline: now + spec.ready_timeout },
            role,
            started: now,
            has_channel,
            intercepted,
            bound: false,
            bound_at: None,
            warned_foreign: false,
            intercept_failures: 0,
            failure: None,
            last_ping: now,
            memory_strikes: 0,
            readopted: false,
        });
        crate::worker::span(slot, pid, spec.generation)
            .in_scope(|| tracing::info!("worker {slot} started (pid {pid}, generation {})", spec.generation));
    }

    /// Slot `id`'s new active worker `pid` started.
    pub(super) fn slot_started(&mut self, id: usize, pid: i32) {
        self.pool.started(id, pid);
    }

    /// Slot `id`'s worker could not be started: the slot backs off.
    pub(super) fn slot_start_failed(&mut self, id: usize, e: &SpawnError, now: Mono) {
        let delay = self.pool.start_failed(id, now, &self.settings.backoff, e.to_string());
        tracing::error!(worker_id = id, "worker {id}: {e}; retrying in {}", human(delay));
    }

    /// The unhealthy `old` is to be replaced (`failure` says why): the slot and spec to start
    /// its replacement with, if it is still there.
    pub(super) fn replace(&mut self, old: i32, failure: Failure) -> Option<(usize, Arc<Spec>)> {
        let w = self.pool.worker_mut(old)?;
        let (slot, spec) = (w.slot, w.spec.clone());
        crate::worker::span(slot, old, spec.generation)
            .in_scope(|| tracing::warn!("worker {slot} (pid {old}) {failure}: starting a replacement"));
        w.failure = Some(failure);
        Some((slot, spec))
    }

    /// The replacement for `old` could not be started: a hung `old` (`hard`) serves nobody
    /// and is killed.
    pub(super) fn replacement_start_failed(
        &mut self,
        old: i32,
        slot: usize,
        hard: bool,
        e: &SpawnError,
    ) -> Vec<Command> {
        tracing::error!(worker_id = slot, "replacement for worker {slot} failed: {e}");
        if hard { self.kill(old, None) } else { Vec::new() }
    }
}
