//! The core's side of ending a worker: stopping the supervisor, killing a worker, retiring one
//! (drain, stop signal, kill timer) and the one slot hand-over (promotion). Each records the
//! new state and returns what the driver must do about it.

use nix::sys::signal::Signal;

use super::Core;
use super::clock::Mono;
use super::command::Command;
use super::rollout::ReloadFailure;
use crate::worker::{Failure, Role, State};

impl Core {
    /// A stop request: the first tells systemd, fails the roll-out, answers the queued
    /// reloads and retires every worker; a second makes every kill timer run out now.
    pub(super) fn stop(&mut self, now: Mono, unix: u64) -> Vec<Command> {
        if self.stopping {
            tracing::warn!("second stop request: killing the remaining workers now");
            for w in self.pool.workers_mut().filter(|w| w.state != State::Killed) {
                w.state = State::Stopping { kill_at: now };
            }
            return Vec::new();
        }
        let how = match self.settings.stop_signal {
            crate::config::StopSignal::Signal(sig) => sig.as_str(),
            crate::config::StopSignal::Message => "the shutdown message",
        };
        tracing::info!("stopping: sending {how} to {} worker(s)", self.pool.workers().len());
        self.stopping = true;
        let mut out = vec![Command::Notify("STOPPING=1\nSTATUS=stopping".to_string())];
        out.extend(self.fail_rollout(ReloadFailure::Stopping, now, unix));
        out.extend(self.rollouts.drop_queued(self.pool.spec().generation));
        out.extend(self.pool.workers().keys().map(|pid| Command::Retire(*pid)));
        out
    }

    /// SIGKILLs `pid`'s process group at once (a failed or hung worker); its exit event
    /// follows. `failure` says why, for the report.
    pub(super) fn kill(&mut self, pid: i32, failure: Option<Failure>) -> Vec<Command> {
        let mut out = vec![Command::Receiving { pid, on: false }];
        let Some(w) = self.pool.worker_mut(pid) else { return out };
        if failure.is_some() {
            w.failure = failure;
        }
        w.state = State::Killed;
        out.push(Command::Signal { pid, sig: Signal::SIGKILL, group: true });
        out
    }

    /// Sends the stop signal (once) and arms the kill timer. A steered worker that was
    /// `receiving` first stops receiving and drains its own accept queue (see `steer`); the
    /// stop signal follows from the timers.
    pub(super) fn retire(&mut self, pid: i32, receiving: bool, now: Mono) -> Vec<Command> {
        let mut out = vec![Command::Receiving { pid, on: false }];
        let Some(w) = self.pool.worker_mut(pid) else { return out };
        w.role = Role::Retired;
        if matches!(w.state, State::Stopping { .. } | State::Killed | State::Draining { .. }) {
            return out;
        }
        if receiving {
            w.state = State::Draining { since: now };
        } else {
            w.state = State::Stopping { kill_at: now + w.spec.stop_timeout };
            out.push(Command::AskToStop(pid));
        }
        self.pool.unassign(pid);
        out
    }

    /// Makes `new` the active worker of `slot` and retires the one it replaces (SIGKILLed
    /// first with `kill_old`: it is hung): the one path by which a roll-out's new worker and
    /// a health replacement (watchdog, memory) take over a slot.
    pub(super) fn promote(&mut self, slot: usize, new: i32, kill_old: bool) -> Vec<Command> {
        let mut out = Vec::new();
        let current = self.pool.slot(slot).and_then(|s| s.active);
        if kill_old {
            if let Some(old) = current.filter(|o| *o != new) {
                out.extend(self.kill(old, None));
            }
        }
        if let Some(old) = self.pool.promote(slot, new) {
            out.push(Command::Retire(old));
        }
        out
    }
}
