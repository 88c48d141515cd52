//! Rolling reload: generation g → g+1, slot by slot.
//!
//! For each slot (in batches of `reload_batch`): start a candidate of the new generation, wait
//! until it is ready, then make it the slot's active worker and send the stop signal to the old
//! one, which drains on its own timer while the roll-out moves on. An old worker is never
//! stopped before its replacement is ready. A candidate that fails to start aborts the
//! roll-out: it is killed and every remaining old worker keeps serving. There is no fallback
//! to a hard restart. Requests that arrive during a roll-out are coalesced into one more
//! roll-out afterwards, so the final state always runs the newest code.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use super::control::{LastReload, Waiter};
use super::{ReloadOutcome, Supervisor};
use crate::notify::monotonic_usec;
use crate::spawn::Spec;
use crate::worker::{Role, State};

pub(super) struct Rollout {
    pub spec: Arc<Spec>,
    /// Slots still to replace, in order.
    pending: VecDeque<usize>,
    /// Slots whose candidate is starting: (slot, candidate pid).
    in_flight: Vec<(usize, i32)>,
    pub total: usize,
    pub done: usize,
    started: Instant,
    waiters: Vec<Waiter>,
}

impl Rollout {
    pub fn candidate_for(&self, slot: usize) -> Option<i32> {
        self.in_flight.iter().find(|(s, _)| *s == slot).map(|(_, pid)| *pid)
    }

    /// The slot was scaled away.
    pub fn forget_slot(&mut self, slot: usize) {
        if self.pending.iter().any(|s| *s == slot) || self.candidate_for(slot).is_some() {
            self.total = self.total.saturating_sub(1);
        }
        self.pending.retain(|s| *s != slot);
        self.in_flight.retain(|(s, _)| *s != slot);
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Supervisor {
    pub(super) fn request_reload(&mut self, reply: Waiter) {
        if self.stopping {
            let outcome = ReloadOutcome {
                ok: false,
                generation: self.spec.generation,
                message: "the supervisor is stopping".into(),
            };
            self.answer(vec![reply], outcome);
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
        if let Some(source) = &self.reload_source {
            match source() {
                Ok(new) => self.apply_settings(new),
                Err(problems) => {
                    let msg = format!("invalid configuration, nothing changed: {}", problems.0.join("; "));
                    tracing::error!(app = %self.app, "reload failed: {msg}");
                    self.record_reload(false, Some(msg.clone()));
                    self.answer(
                        waiters,
                        ReloadOutcome { ok: false, generation: self.spec.generation, message: msg },
                    );
                    return;
                }
            }
        }
        self.generation += 1;
        let spec = Arc::new(Spec::new(&self.settings, self.generation));
        let pending: VecDeque<usize> = self.slots.keys().copied().filter(|id| *id < self.desired).collect();
        tracing::info!(app = %self.app, generation = self.generation, "reload: rolling {} worker(s) to generation {}", pending.len(), self.generation);
        self.notifier.send(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()));
        for w in &waiters {
            if let Some(tx) = &w.progress {
                let _ =
                    tx.send(format!("rolling {} worker(s) to generation {}", pending.len(), self.generation));
            }
        }
        self.rollout = Some(Rollout {
            spec,
            total: pending.len(),
            pending,
            in_flight: Vec::new(),
            done: 0,
            started: Instant::now(),
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
            self.desired = new.workers.get();
        }
        let name = self.settings.name.clone();
        self.settings = crate::config::Settings { name, ..new };
    }

    pub(super) fn drive_rollout(&mut self) {
        if self.rollout.is_none() {
            if let Some(waiters) = self.queued.take() {
                self.start_rollout(waiters);
            }
        }
        let Some(mut r) = self.rollout.take() else { return };
        // Promote candidates that became ready; retire the workers they replace.
        let mut still = Vec::new();
        for (slot_id, pid) in std::mem::take(&mut r.in_flight) {
            let ready = self.workers.get(&pid).is_some_and(|w| w.is_ready());
            if !ready {
                still.push((slot_id, pid));
                continue;
            }
            let old = self.slots.get_mut(&slot_id).and_then(|slot| {
                slot.spec = r.spec.clone();
                slot.failures = 0;
                slot.restart_at = None;
                slot.active.replace(pid)
            });
            if let Some(w) = self.workers.get_mut(&pid) {
                w.role = Role::Active;
            }
            if let Some(old) = old {
                self.retire(old);
            }
            r.done += 1;
            let took = self.workers.get(&pid).map(|w| w.started.elapsed().as_secs_f64()).unwrap_or(0.0);
            let line = format!("worker {}/{} ready (pid {pid}, {took:.2} s)", r.done, r.total);
            tracing::info!(app = %self.app, worker_id = slot_id, worker_pid = pid, worker_generation = r.spec.generation, "reload: {line}");
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
            let Some(slot_id) = r.pending.pop_front() else { break };
            if !self.slots.contains_key(&slot_id) {
                continue;
            }
            let spec = r.spec.clone();
            match self.launch(slot_id, &spec, Role::Candidate) {
                Ok(pid) => {
                    r.in_flight.push((slot_id, pid));
                    let extend =
                        spec.ready_timeout + spec.stop_timeout.min(std::time::Duration::from_secs(30));
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
            self.spec = r.spec.clone();
            let msg = format!(
                "reload complete: {} worker(s) on generation {} in {:.2} s",
                r.done,
                r.spec.generation,
                r.started.elapsed().as_secs_f64()
            );
            tracing::info!(app = %self.app, generation = r.spec.generation, "{msg}");
            self.record_reload(true, None);
            self.notifier.send("READY=1");
            let outcome = ReloadOutcome { ok: true, generation: r.spec.generation, message: msg };
            self.answer(r.waiters, outcome);
        } else {
            self.rollout = Some(r);
        }
    }

    /// Aborts the roll-out in progress: its candidates are killed, old workers keep serving.
    pub(super) fn fail_rollout(&mut self, reason: String) {
        let Some(r) = self.rollout.take() else { return };
        for (_, pid) in &r.in_flight {
            if let Some(w) = self.workers.get_mut(pid) {
                w.role = Role::Retired;
                w.state = State::Stopping { kill_at: Instant::now() + std::time::Duration::from_secs(3600) };
                let _ = killpg(Pid::from_raw(*pid), Signal::SIGKILL);
            }
        }
        let msg = format!(
            "reload to generation {} failed after {}/{} worker(s): {reason}; the other workers keep running the previous code",
            r.spec.generation, r.done, r.total
        );
        tracing::error!(app = %self.app, generation = r.spec.generation, "{msg}");
        self.record_reload(false, Some(reason));
        // The reload is over (RELOADING=1 → READY=1), unless it ends because we are stopping:
        // systemd already has STOPPING=1.
        if !self.stopping {
            self.notifier.send("READY=1");
        }
        let outcome = ReloadOutcome { ok: false, generation: r.spec.generation, message: msg };
        self.answer(r.waiters, outcome);
    }

    fn record_reload(&mut self, ok: bool, error: Option<String>) {
        self.last_reload =
            Some(LastReload { result: if ok { "ok" } else { "failed" }.to_string(), at: unix_now(), error });
    }
}
