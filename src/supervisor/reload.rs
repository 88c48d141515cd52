//! The driver's side of a reload: where a request goes (refused while stopping, deferred
//! behind an upgrade, queued behind a roll-out, or started), pinning the new generation,
//! taking in re-read settings, and stepping the roll-out: it asks [`Rollouts`] what to do,
//! starts the candidates it asks for and applies the effects it returns.
//!
//! [`Rollouts`]: super::rollout::Rollouts

use std::sync::Arc;

use super::clock::Mono;
use super::command::Command;
use super::command::WaiterId;
use super::rollout::ReloadFailure;
use super::{Core, ReloadOutcome, Supervisor, answer};
use crate::requests::Waiter;
use crate::worker::Role;

impl Supervisor {
    pub(super) fn request_reload(&mut self, reply: Waiter) {
        if self.core.stopping {
            let outcome =
                ReloadOutcome::new(false, self.core.pool.spec().generation, "the supervisor is stopping");
            answer(vec![reply], outcome);
        } else if self.upgrades.upgrading() {
            tracing::info!("reload requested during an upgrade: it waits for the upgrade");
            self.upgrades.defer(reply);
        } else if self.core.rollouts.current.is_some() {
            let id = self.waiters.add(reply);
            let effects = self.core.rollouts.queue(id);
            self.apply(effects);
        } else {
            let id = self.waiters.add(reply);
            self.start_rollout(vec![id]);
        }
    }

    /// The settings a reload moves to: re-read, or the ones in use.
    fn load_settings(&self) -> Result<crate::config::Settings, ReloadFailure> {
        match &self.reload_source {
            Some(source) => source().map_err(|problems| ReloadFailure::InvalidConfig(problems.0.join("; "))),
            None => Ok(self.core.settings.clone()),
        }
    }

    fn start_rollout(&mut self, waiters: Vec<WaiterId>) {
        let generation = self.core.pool.spec().generation;
        let settings = match self.load_settings() {
            Ok(s) => s,
            Err(msg) => {
                let unix = self.unix_now();
                let effects = self.core.rollouts.refuse(waiters, msg, generation, unix);
                return self.apply(effects);
            }
        };
        // Pin the new generation before anything changes: a release that cannot be resolved
        // (a dangling `current` link, a missing program) fails the reload and changes nothing.
        let spec = match self.outside.launcher.pin(&settings, self.core.pool.generation() + 1) {
            Ok(spec) => Arc::new(spec),
            Err(e) => {
                let msg = ReloadFailure::Unresolvable(e.to_string());
                let unix = self.unix_now();
                let effects = self.core.rollouts.refuse(waiters, msg, generation, unix);
                return self.apply(effects);
            }
        };
        if self.reload_source.is_some() {
            self.apply_settings(settings);
        }
        self.core.pool.next_generation();
        let slots: Vec<usize> =
            self.core.pool.slots().keys().copied().filter(|id| *id < self.core.pool.desired()).collect();
        let now = self.now();
        let effects = self.core.rollouts.begin(spec, slots, self.core.settings.min_ready, now, waiters);
        self.apply(effects);
    }

    /// Takes in a re-read configuration. Sockets and the name cannot change while running.
    fn apply_settings(&mut self, new: crate::config::Settings) {
        if new.listen != self.core.settings.listen && !new.listen.is_empty() {
            tracing::warn!(
                "listen addresses changed in the config: sockets are kept; restart the app to change them"
            );
        }
        if new.name != self.core.settings.name {
            tracing::warn!("the app name cannot change while running; keeping {:?}", self.core.settings.name);
        }
        // The file's worker count wins only when the file changed it since it was last read;
        // otherwise a runtime scale is kept.
        if new.file_workers != self.core.settings.file_workers && new.file_workers.is_some() {
            tracing::info!("config file changed workers to {}", new.workers);
            self.set_desired(new.workers.get());
        }
        if new.balance != self.core.settings.balance {
            tracing::warn!(
                "balance changed in the config: the sockets are kept as they are ({}); restart the app to change it",
                self.core.settings.balance
            );
        }
        if (&new.watch, &new.watch_ignore) != (&self.core.settings.watch, &self.core.settings.watch_ignore) {
            tracing::warn!(
                "watch or watch_ignore changed in the config: the watched paths are kept; restart the app to change them"
            );
        }
        let (name, balance) = (self.core.settings.name.clone(), self.core.settings.balance);
        let (watch, watch_ignore) =
            (self.core.settings.watch.clone(), self.core.settings.watch_ignore.clone());
        self.core.settings = crate::config::Settings { name, balance, watch, watch_ignore, ..new };
    }

    /// One step of the roll-out (after every event): start the queued one if none runs,
    /// promote the candidates that held, start the next batch, finish.
    pub(super) fn drive_rollout(&mut self) {
        if let Some(waiters) = self.core.rollouts.take_queued() {
            self.start_rollout(waiters);
        }
        if self.core.rollouts.current.is_none() {
            return;
        }
        let now = self.now();
        let effects = self.core.rollouts.promote_held(&mut self.core.pool, now);
        self.apply(effects);
        let batch = self.core.settings.reload_batch.get();
        let surge = self.core.settings.reload_surge.map_or(usize::MAX, std::num::NonZeroUsize::get);
        while let Some((slot, spec)) = self.core.rollouts.next_candidate(&self.core.pool, batch, surge) {
            match self.launch(slot, &spec, Role::Candidate) {
                Ok(pid) => {
                    let effects = self.core.rollouts.candidate_started(slot, pid, &spec);
                    self.apply(effects);
                }
                Err(e) => {
                    let why = ReloadFailure::CannotStart { slot, error: e.to_string() };
                    return self.fail_rollout(why);
                }
            }
        }
        let unix = self.unix_now();
        let effects = self.core.rollouts.finish_if_done(&mut self.core.pool, now, unix);
        self.apply(effects);
    }

    /// Aborts the roll-out in progress (see [`super::rollout::Rollouts::fail`]).
    pub(super) fn fail_rollout(&mut self, reason: ReloadFailure) {
        let (now, unix) = (self.now(), self.unix_now());
        let commands = self.core.fail_rollout(reason, now, unix);
        self.apply(commands);
    }
}

impl Core {
    /// Aborts the roll-out in progress (see [`super::rollout::Rollouts::fail`]).
    pub(super) fn fail_rollout(&mut self, reason: ReloadFailure, now: Mono, unix: u64) -> Vec<Command> {
        self.rollouts.fail(reason, &mut self.pool, self.settings.on_failure, self.stopping, now, unix)
    }
}
