//! What the supervisor says about itself: the one-line `STATUS=` for systemd and the
//! [`Snapshot`] for clients.

use super::{Supervisor, human};
use crate::control::protocol::{Snapshot, WorkerInfo, WorkerState};
use crate::worker::{Role, State};

impl Supervisor {
    /// E.g. `4/4 ready · generation 3`, `reloading 2/4 · generation 3→4`.
    pub(super) fn status_line(&self) -> String {
        if self.core.stopping {
            return format!("stopping ({} worker(s) left)", self.core.pool.workers().len());
        }
        let pool = &self.core.pool;
        let mut s = format!(
            "{}/{} ready · generation {}",
            pool.ready_count(),
            pool.desired(),
            pool.spec().generation
        );
        if let Some(r) = &self.core.rollouts.current {
            s = if r.is_rollback() {
                format!("rolling back {}/{} · generation {}", r.done, r.total, r.spec.generation)
            } else {
                format!(
                    "reloading {}/{} · generation {}→{}",
                    r.done,
                    r.total,
                    pool.spec().generation,
                    r.spec.generation
                )
            };
        }
        let now = self.now();
        for (id, slot) in pool.slots() {
            if let (None, Some(at)) = (slot.active, slot.restart_at) {
                let wait = at.saturating_duration_since(now);
                s.push_str(&format!(
                    " · worker {id} restarting in {} ({} failures)",
                    human(wait),
                    slot.failures
                ));
            }
        }
        if self.upgrades.upgrading() {
            s.push_str(if self.core.rollouts.current.is_some() {
                " · upgrade waiting for the roll-out"
            } else {
                " · upgrading in place"
            });
        }
        if let Some(lr) = &self.core.rollouts.last_reload {
            if let (Some(err), None) = (&lr.error, &self.core.rollouts.current) {
                s.push_str(&format!(" · reload failed: {err}"));
            }
        }
        s
    }

    pub(super) fn snapshot(&self) -> Snapshot {
        let now = self.now();
        let (pool, outside) = (&self.core.pool, &self.outside);
        let shared_queue: u32 =
            outside.shared_sockets.iter().map(|fd| crate::sys::tcp_listen_queue(fd).map_or(0, |q| q.0)).sum();
        let mut workers: Vec<WorkerInfo> = pool
            .workers()
            .values()
            .map(|w| (w, pool.slot(w.slot)))
            .map(|(w, slot)| WorkerInfo {
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
                receiving: match &outside.steering {
                    Some(st) => st.is_receiving(w.pid),
                    None => matches!(w.state, State::Starting { .. } | State::Ready { .. }),
                },
                accept_queue: match &outside.steering {
                    Some(st) => st.queued(w.pid),
                    None => shared_queue,
                },
                restarts: slot.map_or(0, |s| s.restarts),
                failures: slot.map_or(0, |s| s.failures),
                last_error: slot.and_then(|s| s.last_error.clone()),
                restart_in_ms: None,
                uptime_s: now.duration_since(w.started).as_secs_f64(),
                cpu_percent: 0.0,
                rss_bytes: 0,
                readopted: w.readopted,
            })
            .collect();
        for (id, slot) in pool.slots() {
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
                    failures: slot.failures,
                    last_error: slot.last_error.clone(),
                    restart_in_ms: slot.restart_at.map(|t| {
                        u64::try_from(t.saturating_duration_since(now).as_millis()).unwrap_or(u64::MAX)
                    }),
                    uptime_s: 0.0,
                    cpu_percent: 0.0,
                    rss_bytes: 0,
                    readopted: false,
                });
            }
        }
        workers.sort_by_key(|w| (w.id, w.pid));
        Snapshot {
            name: self.core.settings.name.clone(),
            pid: std::process::id(),
            sockets: outside.sockets.clone(),
            learned_sockets: outside.learned.clone(),
            generation: pool.spec().generation,
            desired: pool.desired(),
            ready: pool.ready_count(),
            status: self.status_line(),
            workers,
            last_reload: self.core.rollouts.last_reload.clone(),
            log_dropped: crate::logging::dropped(),
            balance: self.core.settings.balance.to_string(),
            routing: outside.steering.as_ref().map(|st| st.routing().to_string()),
            metrics: outside.metrics.address(),
            version: crate::upgrade::version().to_string(),
            upgrades: self.upgrades.count,
            upgrading: self.upgrades.upgrading(),
            watch: (!self.core.settings.watch.is_empty())
                .then(|| self.core.watching.info(&self.core.settings.watch)),
        }
    }
}
