//! Events into the supervisor loop: worker exits, notify messages from workers, timers.
//!
//! Each comes in through the driver ([`Supervisor`]), which turns it into an input for the
//! core (resolving what only it can: a notify sender's process group, a draining worker's
//! accept queue, an exited worker's descriptors and last output), and the core's half
//! ([`Core`]) decides, returning [`Command`]s the driver applies.

use std::collections::HashMap;

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use super::command::Command;
use super::exits::{describe_exit, failure_detail, failure_report, stop_signal_hint};
use super::pool::DRAIN_GRACE;
use super::rollout::ReloadFailure;
use super::{Core, Event, Supervisor, human};
use crate::config::ReadyMode;
use crate::mono::Mono;
use crate::notify::Message;
use crate::worker::{Failure, FailureKind, Role, State};

/// A draining worker's accept queue, as the driver sees it: connections still queued, and
/// whether its sockets hold the connections parked for the next start.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Drain {
    pub queued: u32,
    pub parked: bool,
}

impl Supervisor {
    pub(super) fn on_event(&mut self, ev: Event) {
        let (pid, status) = match ev {
            Event::Exited { pid, status } => (pid, status),
            Event::UpgradeChecked(r) => return self.on_upgrade_checked(r),
            Event::Channel { pid, msg } => return self.on_channel(pid, msg),
            Event::Intercepted { pid, seen } => return self.on_intercepted(pid, seen),
        };
        let Some(w) = self.core.pool.remove_worker(pid) else { return };
        let fds = self.outside.release(pid);
        if w.intercept_failures > 1 && !is_power_of_ten(w.intercept_failures) {
            w.span().in_scope(|| tracing::warn!("worker {} (pid {pid}): {} bind interception failures in all; only the first was logged in full", w.slot, w.intercept_failures));
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
        self.outside.metrics.exited(
            pid,
            w.slot,
            crate::metrics::Reason::of(w.failure.as_ref().map(|f| f.kind), status),
        );
        let (now, unix) = (self.now(), self.unix_now());
        let commands = self.core.on_exit(w, status, &tail, now, unix);
        self.apply(commands);
    }

    pub(super) fn on_notify(&mut self, msg: Message) {
        let pid = if self.core.pool.workers().contains_key(&msg.pid) {
            msg.pid
        } else {
            // A child of the worker (e.g. `npm start` → node) speaks for its process group.
            match nix::unistd::getpgid(Some(Pid::from_raw(msg.pid))) {
                Ok(pg) if self.core.pool.workers().contains_key(&pg.as_raw()) => pg.as_raw(),
                _ => {
                    tracing::debug!("notify message from unknown pid {} ignored", msg.pid);
                    return;
                }
            }
        };
        let now = self.now();
        let commands = self.core.on_notify(pid, &msg.assignments, now);
        self.apply(commands);
    }

    /// A Node worker's IPC message: `process.send('ready')` counts exactly like `READY=1`.
    pub(super) fn on_channel(&mut self, pid: i32, msg: crate::ipc::Incoming) {
        let now = self.now();
        let commands = match msg {
            crate::ipc::Incoming::Ready => self.core.notified_ready(pid, now),
        };
        self.apply(commands);
    }

    /// Time passed: the driver reads each draining worker's accept queue, the core decides.
    pub(super) fn on_timers(&mut self, now: Mono) {
        let stopping = self.core.stopping;
        let drains: HashMap<i32, Drain> = self
            .core
            .pool
            .workers()
            .values()
            .filter(|w| matches!(w.state, State::Draining { .. }))
            .map(|w| {
                let queued = self.outside.queued(w.pid);
                // While stopping, nothing receives and new connections are parked on member
                // 0 for the next start: its worker need not (and could not) empty it.
                (w.pid, Drain { queued, parked: stopping && self.outside.holds_parking(w.pid) })
            })
            .collect();
        let commands = self.core.on_timers(now, &drains);
        self.apply(commands);
    }

    /// The memory sample [`Command::SampleMemory`] asked for.
    pub(super) fn sample_memory(&mut self) {
        let pids: Vec<i32> = self.core.pool.workers().keys().copied().collect();
        let rss = self.outside.host.memory(&pids);
        let commands = self.core.health.check_memory(&mut self.core.pool, &rss);
        self.apply(commands);
    }
}

impl Core {
    /// Worker `w` exited (`tail`: its last output lines, read by the driver): its slot
    /// restarts, or the roll-out or health replacement it belonged to fails.
    pub(super) fn on_exit(
        &mut self,
        w: crate::worker::Worker,
        status: nix::sys::wait::WaitStatus,
        tail: &[String],
        now: Mono,
        unix: u64,
    ) -> Vec<Command> {
        let pid = w.pid;
        // A re-adopted worker is not our child: PID 1 reaped it, its status is lost.
        let how = if w.readopted { super::readopt::UNKNOWN_EXIT.to_string() } else { describe_exit(status) };
        let mut out = Vec::new();
        let ran = now.duration_since(w.started);
        // A worker the roll-out started (already promoted or not) failed: the roll-out aborts.
        let owned = self.rollouts.owns(pid);
        match (w.role, w.state) {
            (Role::Retired, _) => match stop_signal_hint(&w, status) {
                Some(hint) => {
                    w.span().in_scope(|| tracing::warn!("worker {} (pid {pid}) {how}: {hint}", w.slot));
                }
                None => {
                    w.span().in_scope(|| tracing::info!("worker {} (pid {pid}) {how}", w.slot));
                }
            },
            (Role::Replacement, _) => {
                let reason = w
                    .failure
                    .as_ref()
                    .map_or_else(|| format!("{how} before it was ready"), Failure::to_string);
                out.extend(self.health.replacement_failed(pid, &failure_report(&w, tail, &reason)));
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
                let report = failure_report(&w, tail, &reason);
                w.span().in_scope(|| tracing::error!("{report}"));
                out.extend(self.fail_rollout(ReloadFailure::Worker(report), now, unix));
            }
            (Role::Active, state) => {
                let healthy = matches!(state, State::Ready { since } if now.duration_since(since) >= self.settings.backoff.reset_after);
                let Some(restart) =
                    self.pool.active_exited(w.slot, pid, healthy, now, &self.settings.backoff)
                else {
                    return out;
                };
                out.push(Command::RestartMetric { slot: w.slot });
                let reason = match (&w.failure, state) {
                    (Some(f), _) => f.to_string(),
                    (None, State::Starting { .. }) => format!("{how} before it was ready"),
                    (None, _) => format!("{how} after {}", human(ran)),
                };
                let report = failure_report(&w, tail, &reason);
                self.pool.set_last_error(w.slot, failure_detail(&w, tail, &reason));
                w.span().in_scope(|| {
                    tracing::warn!("{report}; restarting in {} ({})", human(restart.delay), restart.streak)
                });
                if owned {
                    out.extend(self.fail_rollout(ReloadFailure::Worker(report), now, unix));
                }
            }
        }
        out
    }

    /// A notify message from worker `pid` (already resolved to the worker).
    pub(super) fn on_notify(
        &mut self,
        pid: i32,
        assignments: &[(String, String)],
        now: Mono,
    ) -> Vec<Command> {
        let mut out = Vec::new();
        for (key, value) in assignments {
            match key.as_str() {
                "READY" if value == "1" => out.extend(self.notified_ready(pid, now)),
                "WATCHDOG" if value == "1" => {
                    if let Some(w) = self.pool.worker_mut(pid) {
                        w.last_ping = now;
                    }
                }
                _ => {}
            }
        }
        out
    }

    /// The worker said it is ready (`READY=1`, or `'ready'` on its IPC channel): under
    /// `--ready notify`, a starting worker becomes ready.
    pub(super) fn notified_ready(&mut self, pid: i32, now: Mono) -> Vec<Command> {
        let Some(w) = self.pool.worker_mut(pid) else { return Vec::new() };
        if matches!(w.state, State::Starting { .. }) && w.spec.ready == ReadyMode::Notify {
            w.state = State::Ready { since: now };
            return self.on_ready(pid, now);
        }
        Vec::new()
    }

    /// `pid` just became ready: it receives connections, it counts.
    pub(super) fn on_ready(&mut self, pid: i32, now: Mono) -> Vec<Command> {
        let Some(w) = self.pool.worker(pid) else { return vec![Command::Receiving { pid, on: true }] };
        let took = now.duration_since(w.started);
        w.span()
            .in_scope(|| tracing::info!("worker {} ready (pid {pid}, {:.2} s)", w.slot, took.as_secs_f64()));
        if let Some(slot) = self.pool.slot_mut(w.slot) {
            slot.settled = true;
        }
        vec![Command::Receiving { pid, on: true }, Command::ReadyMetric { took }]
    }

    /// The timers at `now`: ready by the clock, ready timeouts, drains (`drains`: their
    /// accept queues, from the driver), kill timers, watchdogs, the memory sample, the
    /// manager's watchdog.
    pub(super) fn on_timers(&mut self, now: Mono, drains: &HashMap<i32, Drain>) -> Vec<Command> {
        let mut out = Vec::new();
        let mut became_ready = Vec::new();
        let mut timed_out = Vec::new();
        for w in self.pool.workers_mut() {
            let pid = &w.pid;
            match w.state {
                State::Starting { deadline } => {
                    if let Some(at) = w.ready_by_clock() {
                        if now >= at {
                            if w.bound_at.is_some() {
                                w.span().in_scope(|| tracing::info!("worker {} (pid {pid}) bound herdsman's socket but did not call listen() (it already listens: gunicorn checks SO_ACCEPTCONN): ready {} after its bind", w.slot, human(crate::config::values::LISTEN_SKIPPED)));
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
                    let Drain { queued, parked } = drains.get(pid).copied().unwrap_or_default();
                    let out_of_time = now >= since + w.spec.stop_timeout;
                    if now >= since + DRAIN_GRACE && (queued == 0 || out_of_time || parked) {
                        if queued > 0 && !parked {
                            w.span().in_scope(|| {
                                tracing::warn!(
                                    "worker {} (pid {pid}) left {queued} connection(s) unaccepted within {}",
                                    w.slot,
                                    human(w.spec.stop_timeout)
                                )
                            });
                        }
                        w.state = State::Stopping { kill_at: now + w.spec.stop_timeout };
                        out.push(Command::AskToStop(*pid));
                    }
                }
                State::Stopping { kill_at } if now >= kill_at => {
                    w.span().in_scope(|| {
                        tracing::warn!(
                            "worker {} (pid {pid}) did not stop within {}: SIGKILL",
                            w.slot,
                            human(w.spec.stop_timeout)
                        )
                    });
                    w.state = State::Killed;
                    out.push(Command::Signal { pid: *pid, sig: Signal::SIGKILL, group: true });
                }
                _ => {}
            }
        }
        for pid in became_ready {
            out.extend(self.on_ready(pid, now));
        }
        for pid in timed_out {
            if let Some(w) = self.pool.worker(pid) {
                let why = format!("not ready within {} (ready timeout)", human(w.spec.ready_timeout));
                out.push(Command::Kill { pid, failure: Some(Failure::new(FailureKind::ReadyTimeout, why)) });
            }
        }
        // Watchdogs, then (when due) memory: what [`super::health::Health`] decides.
        let rollouts = &self.rollouts;
        out.extend(self.health.check_watchdogs(&self.pool, now, |pid| rollouts.owns(pid)));
        if self.health.memory_due(now) {
            out.push(Command::SampleMemory);
        }
        if let Some(msg) = self.manager.ping_if_due(now) {
            out.push(Command::Notify(msg.to_string()));
        }
        out
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
        let now = self.now();
        let Some(w) = self.core.pool.worker_mut(pid) else { return };
        let (slot, generation) = (w.slot, w.spec.generation);
        match seen {
            Seen::Bound { asked, served, .. } => {
                if !w.bound {
                    let how = if asked == served {
                        String::new()
                    } else {
                        format!(" (it asked for {asked}; herdsman serves {served})")
                    };
                    crate::worker::span(slot, pid, generation).in_scope(|| {
                        tracing::info!(
                            "worker {slot} (pid {pid}) bound herdsman's socket {served} itself{how}"
                        )
                    });
                }
                w.bound = true;
                w.bound_at.get_or_insert(now);
            }
            Seen::Listened => {
                let listen = matches!(w.spec.ready, ReadyMode::Listen | ReadyMode::Auto);
                if listen && matches!(w.state, State::Starting { .. }) {
                    w.state = State::Ready { since: now };
                    let commands = self.core.on_ready(pid, now);
                    self.apply(commands);
                }
            }
            Seen::Foreign { asked } if !w.warned_foreign => {
                w.warned_foreign = true;
                let ours = self.outside.sockets.join(", ");
                crate::worker::span(slot, pid, generation).in_scope(|| tracing::warn!("worker {slot} (pid {pid}) listens on {asked}, not on herdsman's {ours}; set --listen to the app's port or the app's port to herdsman's"));
            }
            Seen::Foreign { .. } => {}
            Seen::Failed(why) => {
                w.intercept_failures += 1;
                let n = w.intercept_failures;
                if n == 1 {
                    crate::worker::span(slot, pid, generation)
                        .in_scope(|| tracing::warn!("worker {slot} (pid {pid}): bind interception: {why}"));
                } else if is_power_of_ten(n) {
                    crate::worker::span(slot, pid, generation).in_scope(|| tracing::warn!("worker {slot} (pid {pid}): {n} bind interception failures so far (the latest: {why}); only the first is logged in full"));
                }
            }
        }
    }
}
