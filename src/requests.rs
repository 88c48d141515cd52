//! Requests into the supervisor loop, from signals, the control socket and the metrics
//! endpoint. Callers send a [`Control`] and, where they care, await its reply. The answers are
//! the wire types of [`crate::protocol`] (the control socket's public schema).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::{mpsc, oneshot};

pub use crate::protocol::Scale;
use crate::protocol::{ReloadOutcome, ScaleError, Snapshot, UpgradeDone};

/// Someone waiting for a roll-out: its final answer, and progress lines on the way.
#[derive(Debug, Default)]
pub struct Waiter {
    pub reply: Option<oneshot::Sender<ReloadOutcome>>,
    pub progress: Option<mpsc::UnboundedSender<String>>,
}

#[derive(Debug)]
pub enum Control {
    /// Rolling reload; the reply comes when the roll-out that includes this request is over.
    Reload(Waiter),
    /// Change the worker count. With `wait`, the reply comes once every wanted worker is ready
    /// and every removed one is gone (or a new one failed to start); otherwise at once.
    Scale {
        scale: Scale,
        wait: bool,
        reply: Option<oneshot::Sender<Result<usize, ScaleError>>>,
    },
    Status {
        reply: oneshot::Sender<Snapshot>,
    },
    /// Graceful stop; a second one kills what is left at once.
    Stop,
    /// A child exited (`SIGCHLD`) and herdsman is a reaper: reap the orphans (see `reaper`).
    ReapOrphans,
    /// An orchestrator's probe (`GET /ready`): answered at once with whether every slot has a
    /// ready worker and no stop is in progress.
    Probe {
        reply: oneshot::Sender<bool>,
    },
    /// In-place upgrade from `binary` (default: the path herdsman was started from). The
    /// reply comes only if it fails: on success the new image answers on `conn`.
    Upgrade {
        binary: Option<std::path::PathBuf>,
        reply: Option<oneshot::Sender<Result<UpgradeDone, crate::handoff::UpgradeError>>>,
        conn: Option<std::os::fd::OwnedFd>,
    },
    /// A file under a `--watch` path changed (see `watch`): a debounced reload follows.
    Changed(Changed),
}

/// A file below a watched path changed: the first change of a burst (the watcher sends no
/// other until the loop has taken this one, with [`Changed::take`]).
#[derive(Debug)]
pub struct Changed {
    path: PathBuf,
    sent: Arc<AtomicBool>,
}

impl Changed {
    /// A change of `path`; `sent` is the watcher's flag, cleared by [`Changed::take`].
    pub(crate) fn new(path: PathBuf, sent: Arc<AtomicBool>) -> Changed {
        Changed { path, sent }
    }

    /// Lets the watcher send the next change (call before reading the clock), and says which
    /// path changed.
    pub fn take(self) -> PathBuf {
        self.sent.store(false, Ordering::SeqCst);
        self.path
    }

    /// A change of `path`, for tests of the loop.
    #[cfg(test)]
    pub fn for_test(path: &str) -> Changed {
        Changed { path: PathBuf::from(path), sent: Arc::new(AtomicBool::new(true)) }
    }
}
