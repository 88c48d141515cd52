//! Requests into the supervisor loop, from signals, the control socket and the metrics
//! endpoint. Callers send a [`Control`] and, where they care, await its reply. The answers are
//! the wire types of [`crate::control::protocol`] (the control socket's public schema).

use tokio::sync::{mpsc, oneshot};

pub use crate::control::protocol::Scale;
use crate::control::protocol::{ReloadOutcome, ScaleError, Snapshot, UpgradeDone};

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
        reply: Option<oneshot::Sender<Result<UpgradeDone, crate::upgrade::UpgradeError>>>,
        conn: Option<std::os::fd::OwnedFd>,
    },
    /// A file under a `--watch` path changed (see `watch`): a debounced reload follows.
    Changed(crate::watch::Changed),
}
