//! The loop's half of `--watch` (the watcher thread is `crate::watch`): the changes of a burst
//! become one rolling reload once the files have been quiet for [`QUIET`], or [`MAX_WAIT`]
//! after the burst's first change if they never are (something that writes all the time must
//! not postpone every reload). The reload takes the same path as `herdsman reload` (the
//! configuration re-read, the release pinned, readiness-gated, failures recorded in
//! `last_reload`), and only when no roll-out runs or waits: changes during a roll-out (or an
//! in-place upgrade) make one reload after it, however many there were.

use super::clock::Mono;
use std::path::PathBuf;
use std::time::Duration;

use super::Supervisor;
use crate::control::protocol::WatchInfo;
use crate::requests::Waiter;

/// How long the files must be quiet before the reload.
pub const QUIET: Duration = Duration::from_millis(500);
/// The longest a burst's first change waits for its reload (while no roll-out runs).
pub const MAX_WAIT: Duration = Duration::from_secs(5);

/// Changes not reloaded for yet, and what the watcher did.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub(super) struct Watching {
    burst: Option<Burst>,
    /// Reloads started because files changed.
    reloads: u64,
    /// The first change of the burst behind the last of those reloads.
    trigger: Option<PathBuf>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Burst {
    first: Mono,
    last: Mono,
    /// The burst's first change.
    path: PathBuf,
}

impl Watching {
    pub fn changed(&mut self, path: PathBuf, now: Mono) {
        match &mut self.burst {
            Some(b) => b.last = now,
            None => self.burst = Some(Burst { first: now, last: now, path }),
        }
    }

    /// When the burst's reload is due (once no roll-out runs).
    pub fn deadline(&self) -> Option<Mono> {
        self.burst.as_ref().map(|b| (b.last + QUIET).min(b.first + MAX_WAIT))
    }

    /// The burst whose reload is due at `now`, counted as reloaded for.
    fn due(&mut self, now: Mono) -> Option<Burst> {
        if self.deadline().is_none_or(|d| now < d) {
            return None;
        }
        let burst = self.burst.take()?;
        self.reloads += 1;
        self.trigger = Some(burst.path.clone());
        Some(burst)
    }

    pub fn info(&self, paths: &[PathBuf]) -> WatchInfo {
        WatchInfo {
            paths: paths.iter().map(|p| p.display().to_string()).collect(),
            pending: self.burst.is_some(),
            reloads: self.reloads,
            trigger: self.trigger.as_ref().map(|p| p.display().to_string()),
        }
    }
}

impl Supervisor {
    /// Whether the watcher may start a reload now: no roll-out runs or waits, no upgrade.
    fn watch_may_reload(&self) -> bool {
        !self.core.stopping && self.core.rollouts.idle() && !self.upgrades.upgrading()
    }

    /// The burst's deadline, while a reload could start then.
    pub(super) fn watch_deadline(&self) -> Option<Mono> {
        self.watch_may_reload().then(|| self.core.watching.deadline()).flatten()
    }

    /// Starts the burst's reload when it is due (after every event).
    pub(super) fn drive_watch(&mut self) {
        if !self.watch_may_reload() {
            return;
        }
        let now = self.now();
        let Some(burst) = self.core.watching.due(now) else { return };
        let waited = now.saturating_duration_since(burst.first);
        if now.saturating_duration_since(burst.last) < QUIET {
            tracing::info!(
                "--watch: files kept changing for {} (first: {}): reloading anyway; if something writes there all the time, --watch-ignore it",
                super::human(waited),
                burst.path.display()
            );
        } else {
            tracing::info!("--watch: {} changed: reloading", burst.path.display());
        }
        self.request_reload(Waiter::default());
        self.drive_rollout();
    }
}
