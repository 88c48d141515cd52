//! Events into the supervisor loop: worker exits, notify messages from workers, timers.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use super::exits::{describe_exit, failure_report, stop_signal_hint};
use super::{DRAIN_GRACE, Event, Supervisor, human};
use crate::backoff;
use crate::config::ReadyMode;
use crate::notify::Message;
use crate::worker::{Failure, FailureKind, Role, State};

impl Supervisor {
    pub(super) fn on_event(&mut self, ev: Event) {
        let (pid, status) = match ev {
            Event::Exited { pid, status } => (pid, status),
            Event::UpgradeChecked(r) => return self.on_upgrade_checked(r),
        };
        let Some(w) = self.workers.remove(&pid) else { return };
        if let Some(st) = &mut self.steering {
            if let Err(e) = st.release(pid) {
                tracing::error!(app = %self.app, "steering: {e}");
            }
        }
        // Whatever the worker left in its process group was killed before this event was
        // sent; now the zombie is reaped and the pid is free (nothing signals it any more).
        self.host.reap(&w);
        let how = describe_exit(status);
        self.metrics.exited(
            pid,
            w.slot,
            crate::metrics::Reason::of(w.failure.as_ref().map(|f| f.kind), status),
        );
        let now = self.host.now();
        let ran = now.duration_since(w.started);
        // A worker the roll-out started (already promoted or not) failed: the roll-out aborts.
        let owned = self.rollout.as_ref().is_some_and(|r| r.owns(pid));
        match (w.role, w.state) {
            (Role::Retired, _) => match stop_signal_hint(&w, status) {
                Some(hint) => {
                    tracing::warn!(app = %self.app, worker_id = w.slot, worker_pid = pid, worker_generation = w.spec.generation, "worker {} (pid {pid}) {how}: {hint}", w.slot);
                }
                None => {
                    tracing::info!(app = %self.app, worker_id = w.slot, worker_pid = pid, worker_generation = w.spec.generation, "worker {} (pid {pid}) {how}", w.slot);
                }
            },
            (Role::Replacement, _) => {
                let reason = w
                    .failure
                    .as_ref()
                    .map_or_else(|| format!("{how} before it was ready"), Failure::to_string);
                self.replacement_failed(pid, &failure_report(&w, &reason));
            }
            (Role::Candidate, state) => {
                let reason = match (&w.failure, state) {
                    (Some(f), _) => f.to_string(),
                    (None, State::Ready { since }) => format!(
                        "{how} {} after it was ready, within min_ready ({})",
                        human(now.duration_since(since)),
                        human(self.settings.min_ready)
                    ),
                    (None, _) => format!("{how} before it was ready"),
                };
                let report = failure_report(&w, &reason);
                tracing::error!(app = %self.app, worker_id = w.slot, worker_pid = pid, worker_generation = w.spec.generation, "{report}");
                self.fail_rollout(report);
            }
            (Role::Active, state) => {
                let Some(slot) = self.slots.get_mut(&w.slot) else { return };
                if slot.active == Some(pid) {
                    slot.active = None;
                }
                let healthy = matches!(state, State::Ready { since } if now.duration_since(since) >= self.settings.backoff.reset_after);
                slot.restarts += 1;
                self.metrics.restarted(w.slot);
                slot.settled = true;
                // A crash after a good run restarts at once (like PM2) and starts a new back-off
                // sequence; repeated quick failures back off: initial, doubling, capped.
                let (delay, streak) = if healthy {
                    slot.failures = 0;
                    (Duration::ZERO, "after a good run".to_string())
                } else {
                    slot.failures += 1;
                    let d = backoff::delay(&self.settings.backoff, slot.failures);
                    (d, format!("failure {} in a row", slot.failures))
                };
                slot.restart_at = Some(now + delay);
                let reason = match (&w.failure, state) {
                    (Some(f), _) => f.to_string(),
                    (None, State::Starting { .. }) => format!("{how} before it was ready"),
                    (None, _) => format!("{how} after {}", human(ran)),
                };
                let report = failure_report(&w, &reason);
                slot.last_error = Some(reason);
                tracing::warn!(
                    app = %self.app, worker_id = w.slot, worker_pid = pid, worker_generation = w.spec.generation,
                    "{report}; restarting in {} ({streak})", human(delay)
                );
                if owned {
                    self.fail_rollout(report);
                }
            }
        }
    }

    pub(super) fn on_notify(&mut self, msg: Message) {
        let pid = if self.workers.contains_key(&msg.pid) {
            msg.pid
        } else {
            // A child of the worker (e.g. `npm start` → node) speaks for its process group.
            match nix::unistd::getpgid(Some(Pid::from_raw(msg.pid))) {
                Ok(pg) if self.workers.contains_key(&pg.as_raw()) => pg.as_raw(),
                _ => {
                    tracing::debug!("notify message from unknown pid {} ignored", msg.pid);
                    return;
                }
            }
        };
        let now = self.host.now();
        let Some(w) = self.workers.get_mut(&pid) else { return };
        let mut became_ready = false;
        for (key, value) in msg.assignments {
            match key.as_str() {
                "READY"
                    if value == "1"
                        && matches!(w.state, State::Starting { .. })
                        && w.spec.ready == ReadyMode::Notify =>
                {
                    w.state = State::Ready { since: now };
                    became_ready = true;
                }

                "WATCHDOG" if value == "1" => w.last_ping = now,
                _ => {}
            }
        }
        if became_ready {
            self.on_ready(pid);
        }
    }

    pub(super) fn on_ready(&mut self, pid: i32) {
        self.steer_receiving(pid, true);
        let Some(w) = self.workers.get(&pid) else { return };
        let took = w.started.elapsed();
        self.metrics.ready(took);
        tracing::info!(app = %self.app, worker_id = w.slot, worker_pid = pid, worker_generation = w.spec.generation, "worker {} ready (pid {pid}, {:.2} s)", w.slot, took.as_secs_f64());
        if let Some(slot) = self.slots.get_mut(&w.slot) {
            slot.settled = true;
        }
    }

    pub(super) fn on_timers(&mut self, now: Instant) {
        let mut became_ready = Vec::new();
        let mut timed_out = Vec::new();
        for (pid, w) in self.workers.iter_mut() {
            match w.state {
                State::Starting { deadline } => {
                    if let ReadyMode::Alive(d) = w.spec.ready {
                        if now >= w.started + d {
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
                    let queued = self.steering.as_ref().map_or(0, |st| st.queued(*pid));
                    let out_of_time = now >= since + w.spec.stop_timeout;
                    // While stopping, nothing receives and new connections are parked on
                    // member 0 for the next start: its worker need not (and could not) empty it.
                    let parked =
                        self.stopping && self.steering.as_ref().is_some_and(|st| st.holds_parking(*pid));
                    if now >= since + DRAIN_GRACE && (queued == 0 || out_of_time || parked) {
                        if queued > 0 && !parked {
                            tracing::warn!(app = %self.app, worker_id = w.slot, worker_pid = *pid, "worker {} (pid {pid}) left {queued} connection(s) unaccepted within {}", w.slot, human(w.spec.stop_timeout));
                        }
                        w.state = State::Stopping { kill_at: now + w.spec.stop_timeout };
                        self.host.signal(w, w.spec.stop_signal, false);
                    }
                }
                State::Stopping { kill_at } if now >= kill_at => {
                    tracing::warn!(app = %self.app, worker_id = w.slot, worker_pid = *pid, "worker {} (pid {pid}) did not stop within {}: SIGKILL", w.slot, human(w.spec.stop_timeout));
                    self.host.signal(w, Signal::SIGKILL, true);
                    w.state = State::Killed;
                }
                _ => {}
            }
        }
        for pid in became_ready {
            self.on_ready(pid);
        }
        for pid in timed_out {
            if let Some(w) = self.workers.get(&pid) {
                let why = format!("not ready within {} (ready timeout)", human(w.spec.ready_timeout));
                self.kill_now(pid, Some(Failure::new(FailureKind::ReadyTimeout, why)));
            }
        }
        self.check_health(now);
        if let Some((every, last)) = self.watchdog {
            if now >= last + every {
                self.notifier.send("WATCHDOG=1");
                self.watchdog = Some((every, now));
            }
        }
    }
}
