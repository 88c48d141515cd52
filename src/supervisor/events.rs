//! Events into the supervisor loop: worker exits, notify messages from workers, timers.

use super::clock::Mono;

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use super::exits::{describe_exit, failure_detail, failure_report, stop_signal_hint};
use super::pool::DRAIN_GRACE;
use super::{Event, Supervisor, human};
use crate::config::ReadyMode;
use crate::notify::Message;
use crate::worker::{Failure, FailureKind, Role, State};

impl Supervisor {
    pub(super) fn on_event(&mut self, ev: Event) {
        let (pid, status) = match ev {
            Event::Exited { pid, status } => (pid, status),
            Event::UpgradeChecked(r) => return self.on_upgrade_checked(r),
            Event::Channel { pid, msg } => return self.on_channel(pid, msg),
            Event::Intercepted { pid, seen } => return self.on_intercepted(pid, seen),
        };
        let Some(w) = self.core.pool.workers.remove(&pid) else { return };
        let fds = self.outside.release(pid);
        if w.intercept_failures > 1 && !is_power_of_ten(w.intercept_failures) {
            tracing::warn!(app = %self.core.app, worker_id = w.slot, worker_pid = pid, "worker {} (pid {pid}): {} bind interception failures in all; only the first was logged in full", w.slot, w.intercept_failures);
        }
        // Whatever the worker left in its process group was killed before this event was
        // sent; now the zombie is reaped and the pid is free (nothing signals it any more).
        let tail = match &fds {
            Some(f) => {
                self.outside.host.reap(pid, f);
                f.tail.lines()
            }
            None => Vec::new(),
        };
        let how = describe_exit(status);
        self.outside.metrics.exited(
            pid,
            w.slot,
            crate::metrics::Reason::of(w.failure.as_ref().map(|f| f.kind), status),
        );
        let now = self.now();
        let ran = now.duration_since(w.started);
        // A worker the roll-out started (already promoted or not) failed: the roll-out aborts.
        let owned = self.core.rollouts.owns(pid);
        match (w.role, w.state) {
            (Role::Retired, _) => match stop_signal_hint(&w, status) {
                Some(hint) => {
                    tracing::warn!(app = %self.core.app, worker_id = w.slot, worker_pid = pid, worker_generation = w.spec.generation, "worker {} (pid {pid}) {how}: {hint}", w.slot);
                }
                None => {
                    tracing::info!(app = %self.core.app, worker_id = w.slot, worker_pid = pid, worker_generation = w.spec.generation, "worker {} (pid {pid}) {how}", w.slot);
                }
            },
            (Role::Replacement, _) => {
                let reason = w
                    .failure
                    .as_ref()
                    .map_or_else(|| format!("{how} before it was ready"), Failure::to_string);
                let effects = self.core.health.replacement_failed(pid, &failure_report(&w, &tail, &reason));
                self.apply(effects);
            }
            (Role::Candidate, state) => {
                let reason = match (&w.failure, state) {
                    (Some(f), _) => f.to_string(),
                    (None, State::Ready { since }) => format!(
                        "{how} {} after it was ready, within min_ready ({})",
                        human(now.duration_since(since)),
                        human(self.core.settings.min_ready)
                    ),
                    (None, _) => format!("{how} before it was ready"),
                };
                let report = failure_report(&w, &tail, &reason);
                tracing::error!(app = %self.core.app, worker_id = w.slot, worker_pid = pid, worker_generation = w.spec.generation, "{report}");
                self.fail_rollout(report);
            }
            (Role::Active, state) => {
                let healthy = matches!(state, State::Ready { since } if now.duration_since(since) >= self.core.settings.backoff.reset_after);
                let Some(restart) =
                    self.core.pool.active_exited(w.slot, pid, healthy, now, &self.core.settings.backoff)
                else {
                    return;
                };
                self.outside.metrics.restarted(w.slot);
                let reason = match (&w.failure, state) {
                    (Some(f), _) => f.to_string(),
                    (None, State::Starting { .. }) => format!("{how} before it was ready"),
                    (None, _) => format!("{how} after {}", human(ran)),
                };
                let report = failure_report(&w, &tail, &reason);
                self.core.pool.set_last_error(w.slot, failure_detail(&w, &tail, &reason));
                tracing::warn!(
                    app = %self.core.app, worker_id = w.slot, worker_pid = pid, worker_generation = w.spec.generation,
                    "{report}; restarting in {} ({})", human(restart.delay), restart.streak
                );
                if owned {
                    self.fail_rollout(report);
                }
            }
        }
    }

    pub(super) fn on_notify(&mut self, msg: Message) {
        let pid = if self.core.pool.workers.contains_key(&msg.pid) {
            msg.pid
        } else {
            // A child of the worker (e.g. `npm start` → node) speaks for its process group.
            match nix::unistd::getpgid(Some(Pid::from_raw(msg.pid))) {
                Ok(pg) if self.core.pool.workers.contains_key(&pg.as_raw()) => pg.as_raw(),
                _ => {
                    tracing::debug!("notify message from unknown pid {} ignored", msg.pid);
                    return;
                }
            }
        };
        let now = self.now();
        for (key, value) in msg.assignments {
            match key.as_str() {
                "READY" if value == "1" => self.notified_ready(pid),
                "WATCHDOG" if value == "1" => {
                    if let Some(w) = self.core.pool.workers.get_mut(&pid) {
                        w.last_ping = now;
                    }
                }
                _ => {}
            }
        }
    }

    /// A Node worker's IPC message: `process.send('ready')` counts exactly like `READY=1`.
    pub(super) fn on_channel(&mut self, pid: i32, msg: crate::ipc::Incoming) {
        match msg {
            crate::ipc::Incoming::Ready => self.notified_ready(pid),
        }
    }

    /// The worker said it is ready (`READY=1`, or `'ready'` on its IPC channel): under
    /// `--ready notify`, a starting worker becomes ready.
    fn notified_ready(&mut self, pid: i32) {
        let now = self.now();
        let Some(w) = self.core.pool.workers.get_mut(&pid) else { return };
        if matches!(w.state, State::Starting { .. }) && w.spec.ready == ReadyMode::Notify {
            w.state = State::Ready { since: now };
            self.on_ready(pid);
        }
    }

    pub(super) fn on_ready(&mut self, pid: i32) {
        self.outside.steer_receiving(pid, true);
        let now = self.now();
        let Some(w) = self.core.pool.workers.get(&pid) else { return };
        let took = now.duration_since(w.started);
        self.outside.metrics.ready(took);
        tracing::info!(app = %self.core.app, worker_id = w.slot, worker_pid = pid, worker_generation = w.spec.generation, "worker {} ready (pid {pid}, {:.2} s)", w.slot, took.as_secs_f64());
        if let Some(slot) = self.core.pool.slots.get_mut(&w.slot) {
            slot.settled = true;
        }
    }

    pub(super) fn on_timers(&mut self, now: Mono) {
        let mut became_ready = Vec::new();
        let mut timed_out = Vec::new();
        let outside = &mut self.outside;
        for (pid, w) in self.core.pool.workers.iter_mut() {
            match w.state {
                State::Starting { deadline } => {
                    if let Some(at) = w.ready_by_clock() {
                        if now >= at {
                            if w.bound_at.is_some() {
                                tracing::info!(app = %self.core.app, worker_id = w.slot, worker_pid = *pid, "worker {} (pid {pid}) bound herdsman's socket but did not call listen() (it already listens: gunicorn checks SO_ACCEPTCONN): ready {} after its bind", w.slot, human(crate::config::values::LISTEN_SKIPPED));
                            }
                            w.state = State::Ready { since: now };
                            became_ready.push(*pid);
                            continue;
                        }
                    }
                    if now >= deadline {
                        timed_out.push(*pid);
                    }
                }
                State::Draining { since } => {
                    let queued = outside.queued(*pid);
                    let out_of_time = now >= since + w.spec.stop_timeout;
                    // While stopping, nothing receives and new connections are parked on
                    // member 0 for the next start: its worker need not (and could not) empty it.
                    let parked = self.core.stopping && outside.holds_parking(*pid);
                    if now >= since + DRAIN_GRACE && (queued == 0 || out_of_time || parked) {
                        if queued > 0 && !parked {
                            tracing::warn!(app = %self.core.app, worker_id = w.slot, worker_pid = *pid, "worker {} (pid {pid}) left {queued} connection(s) unaccepted within {}", w.slot, human(w.spec.stop_timeout));
                        }
                        w.state = State::Stopping { kill_at: now + w.spec.stop_timeout };
                        outside.ask_to_stop(w);
                    }
                }
                State::Stopping { kill_at } if now >= kill_at => {
                    tracing::warn!(app = %self.core.app, worker_id = w.slot, worker_pid = *pid, "worker {} (pid {pid}) did not stop within {}: SIGKILL", w.slot, human(w.spec.stop_timeout));
                    w.state = State::Killed;
                    outside.signal(*pid, Signal::SIGKILL, true);
                }
                _ => {}
            }
        }
        for pid in became_ready {
            self.on_ready(pid);
        }
        for pid in timed_out {
            if let Some(w) = self.core.pool.workers.get(&pid) {
                let why = format!("not ready within {} (ready timeout)", human(w.spec.ready_timeout));
                self.kill_now(pid, Some(Failure::new(FailureKind::ReadyTimeout, why)));
            }
        }
        self.check_health(now);
        if let Some(msg) = self.core.manager.ping_if_due(now) {
            self.outside.notifier.send(msg);
        }
    }

    /// Watchdogs, then (when due) memory: what [`super::health::Health`] decides is applied.
    fn check_health(&mut self, now: Mono) {
        let rollouts = &self.core.rollouts;
        let effects = self.core.health.check_watchdogs(&self.core.pool, now, |pid| rollouts.owns(pid));
        self.apply(effects);
        if self.core.health.memory_due(now) {
            let pids: Vec<i32> = self.core.pool.workers.keys().copied().collect();
            let rss = self.outside.host.memory(&pids);
            let effects = self.core.health.check_memory(&mut self.core.pool, &rss);
            self.apply(effects);
        }
    }
}

/// 10, 100, 1000, …: when a throttled count is logged again.
fn is_power_of_ten(mut n: u64) -> bool {
    if n < 10 {
        return false;
    }
    while n % 10 == 0 {
        n /= 10;
    }
    n == 1
}

impl Supervisor {
    /// What a worker's bind filter saw (see `intercept`).
    pub(super) fn on_intercepted(&mut self, pid: i32, seen: crate::intercept::Seen) {
        use crate::intercept::Seen;
        // The socket herdsman bound for the first worker's own bind is the app's, not that
        // worker's: it is kept even when the worker died before this event (the next worker
        // gets it at fd 3, `status` shows it).
        let seen = match seen {
            Seen::Bound { asked, served, learned: Some(l) } => {
                self.outside.adopt_learned(l);
                Seen::Bound { asked, served, learned: None }
            }
            other => other,
        };
        let Some(w) = self.core.pool.workers.get_mut(&pid) else { return };
        let (slot, generation) = (w.slot, w.spec.generation);
        match seen {
            Seen::Bound { asked, served, .. } => {
                if !w.bound {
                    let how = if asked == served {
                        String::new()
                    } else {
                        format!(" (it asked for {asked}; herdsman serves {served})")
                    };
                    tracing::info!(app = %self.core.app, worker_id = slot, worker_pid = pid, worker_generation = generation, "worker {slot} (pid {pid}) bound herdsman's socket {served} itself{how}");
                }
                w.bound = true;
                w.bound_at.get_or_insert(self.outside.host.now());
            }
            Seen::Listened => {
                let listen = matches!(w.spec.ready, ReadyMode::Listen | ReadyMode::Auto);
                if listen && matches!(w.state, State::Starting { .. }) {
                    w.state = State::Ready { since: self.outside.host.now() };
                    self.on_ready(pid);
                }
            }
            Seen::Foreign { asked } if !w.warned_foreign => {
                w.warned_foreign = true;
                let ours = self.outside.sockets.join(", ");
                tracing::warn!(app = %self.core.app, worker_id = slot, worker_pid = pid, worker_generation = generation, "worker {slot} (pid {pid}) listens on {asked}, not on herdsman's {ours}; set --listen to the app's port or the app's port to herdsman's");
            }
            Seen::Foreign { .. } => {}
            Seen::Failed(why) => {
                w.intercept_failures += 1;
                let n = w.intercept_failures;
                if n == 1 {
                    tracing::warn!(app = %self.core.app, worker_id = slot, worker_pid = pid, "worker {slot} (pid {pid}): bind interception: {why}");
                } else if is_power_of_ten(n) {
                    tracing::warn!(app = %self.core.app, worker_id = slot, worker_pid = pid, "worker {slot} (pid {pid}): {n} bind interception failures so far (the latest: {why}); only the first is logged in full");
                }
            }
        }
    }
}
