//! What the supervisor says about itself: the one-line `STATUS=` for systemd and the
//! [`Snapshot`] for clients.

use super::{Supervisor, human};
use crate::control::protocol::{Snapshot, WorkerInfo, WorkerState};
use crate::worker::{Role, State};

impl Supervisor {
    /// E.g. `4/4 ready · generation 3`, `reloading 2/4 · generation 3→4`.
    pub(super) fn status_line(&self) -> String {
        if self.stopping {
            return format!("stopping ({} worker(s) left)", self.workers.len());
        }
        let mut s =
            format!("{}/{} ready · generation {}", self.ready_count(), self.desired, self.spec.generation);
        if let Some(r) = &self.rollout {
            s = if r.is_rollback() {
                format!("rolling back {}/{} · generation {}", r.done, r.total, r.spec.generation)
            } else {
                format!(
                    "reloading {}/{} · generation {}→{}",
                    r.done, r.total, self.spec.generation, r.spec.generation
                )
            };
        }
        let now = self.host.now();
        for (id, slot) in &self.slots {
            if let (None, Some(at)) = (slot.active, slot.restart_at) {
                let wait = at.saturating_duration_since(now);
                s.push_str(&format!(
                    " · worker {id} restarting in {} ({} failures)",
                    human(wait),
                    slot.failures
                ));
            }
        }
        if self.upgrading() {
            s.push_str(if self.rollout.is_some() {
                " · upgrade waiting for the roll-out"
            } else {
                " · upgrading in place"
            });
        }
        if let Some(lr) = &self.last_reload {
            if let (Some(err), None) = (&lr.error, &self.rollout) {
                s.push_str(&format!(" · reload failed: {err}"));
            }
        }
        s
    }

    pub(super) fn snapshot(&self) -> Snapshot {
        let now = self.host.now();
        let shared_queue: u32 =
            self.shared_sockets.iter().map(|fd| crate::sys::tcp_listen_queue(fd).map_or(0, |q| q.0)).sum();
        let mut workers: Vec<WorkerInfo> = self
            .workers
            .values()
            .map(|w| WorkerInfo {
                id: w.slot,
                pid: Some(w.pid),
                generation: w.spec.generation,
                state: match w.role {
                    Role::Candidate if w.is_ready() => WorkerState::Holding,
                    Role::Candidate => WorkerState::StartingNew,
                    Role::Replacement if !w.is_ready() => WorkerState::StartingReplacement,
                    _ => w.state_name(),
                },
                cwd: w.spec.cwd.display().to_string(),
                receiving: match &self.steering {
                    Some(st) => st.is_receiving(w.pid),
                    None => matches!(w.state, State::Starting { .. } | State::Ready { .. }),
                },
                accept_queue: match &self.steering {
                    Some(st) => st.queued(w.pid),
                    None => shared_queue,
                },
                restarts: self.slots.get(&w.slot).map_or(0, |s| s.restarts),
                uptime_s: now.duration_since(w.started).as_secs_f64(),
                cpu_percent: 0.0,
                rss_bytes: 0,
            })
            .collect();
        for (id, slot) in &self.slots {
            if slot.active.is_none() && !workers.iter().any(|w| w.id == *id && w.state != "stopping") {
                workers.push(WorkerInfo {
                    id: *id,
                    pid: None,
                    generation: slot.spec.generation,
                    state: if slot.restart_at.is_some() {
                        WorkerState::Backoff
                    } else {
                        WorkerState::Waiting
                    },
                    cwd: slot.spec.cwd.display().to_string(),
                    receiving: false,
                    accept_queue: 0,
                    restarts: slot.restarts,
                    uptime_s: 0.0,
                    cpu_percent: 0.0,
                    rss_bytes: 0,
                });
            }
        }
        workers.sort_by_key(|w| (w.id, w.pid));
        Snapshot {
            name: self.settings.name.clone(),
            pid: std::process::id(),
            sockets: self.sockets.clone(),
            generation: self.spec.generation,
            desired: self.desired,
            ready: self.ready_count(),
            status: self.status_line(),
            workers,
            last_reload: self.last_reload.clone(),
            log_dropped: crate::logging::dropped(),
            balance: self.settings.balance.to_string(),
            metrics: self.metrics.address(),
            version: crate::upgrade::version().to_string(),
            upgrades: self.upgrades,
            upgrading: self.upgrading(),
        }
    }
}
