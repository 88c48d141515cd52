//! One worker process as the supervisor sees it: which slot it serves, which generation it
//! runs, and where it is in its life (starting → ready → stopping → gone).
//!
//! Plain data (`serde`): its descriptors (pidfd, output pipes, IPC channel, bind filter) are
//! the driver's, in one table keyed by pid (`supervisor::outside::WorkerFds`).

use crate::mono::Mono;
use std::sync::Arc;

use crate::spawn::Spec;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum State {
    /// Started, not ready yet. Fails if not ready by `deadline`.
    Starting {
        deadline: Mono,
    },
    Ready {
        since: Mono,
    },
    /// A steered worker that no longer receives new connections, accepting what is queued
    /// on its own socket; the stop signal follows.
    Draining {
        since: Mono,
    },
    /// Stop signal sent; SIGKILL at `kill_at`.
    Stopping {
        kill_at: Mono,
    },
    /// SIGKILLed (failed, hung, or out of stop time): its exit event is on the way.
    Killed,
}

/// Why the worker exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Role {
    /// Serves its slot (or is starting to, outside a roll-out).
    Active,
    /// A roll-out's replacement for the slot's active worker; promoted once ready.
    Candidate,
    /// Started to replace an unhealthy active worker (watchdog, memory); promoted once ready.
    Replacement,
    /// Replaced, scaled away or stopping: its exit is expected.
    Retired,
}

/// Why the supervisor gave up on a worker: what (for metrics and decisions) and the words
/// (for reports).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Failure {
    pub kind: FailureKind,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum FailureKind {
    /// No `WATCHDOG=1` in time.
    Watchdog,
    /// Its memory stayed above `max_memory`.
    Memory,
    /// Not ready within `ready_timeout`.
    ReadyTimeout,
}

impl Failure {
    pub fn new(kind: FailureKind, message: String) -> Failure {
        Failure { kind, message }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Worker {
    pub pid: i32,
    pub slot: usize,
    #[serde(with = "crate::specs::shared")]
    pub spec: Arc<Spec>,
    pub state: State,
    pub role: Role,
    pub started: Mono,
    /// It has a Node IPC channel (see `ipc`; the descriptor is the driver's).
    pub has_channel: bool,
    /// Its binds are intercepted (see `intercept`; the descriptor is the driver's).
    pub intercepted: bool,
    /// It bound one of herdsman's sockets itself (through the bind filter).
    pub bound: bool,
    /// When it first did (this image's clock; for `--ready listen|auto`).
    pub bound_at: Option<Mono>,
    /// It was told (once) that it binds a port herdsman does not serve.
    pub warned_foreign: bool,
    /// Trapped calls of its that could not be inspected (`intercept::Seen::Failed`): the
    /// first is logged, then only the count (at 10, 100, 1000, … and at its exit), so a
    /// worker looping on failing binds cannot flood the journal.
    pub intercept_failures: u64,
    /// Set when the supervisor gave up on it (e.g. not ready in time), for the report.
    pub failure: Option<Failure>,

    /// Last `WATCHDOG=1` (or its start).
    pub last_ping: Mono,
    /// Memory samples in a row above the limit.
    pub memory_strikes: u32,
    /// A previous supervisor started it and crashed; this one re-adopted it from systemd's fd
    /// store (see `fdstore`). It is not this supervisor's child: its exit status is unknown.
    #[serde(default)]
    pub readopted: bool,
}

/// The span of worker `pid` of `slot` running `generation`: events in it carry `worker_id`,
/// `worker_pid` and `worker_generation` (the journal's `WORKER_ID`, …; JSON's `worker`, `pid`,
/// `generation`) without repeating them.
pub fn span(slot: usize, pid: i32, generation: u64) -> tracing::Span {
    tracing::info_span!("worker", worker_id = slot, worker_pid = pid, worker_generation = generation)
}

impl Worker {
    /// This worker's span (see [`span`]).
    pub fn span(&self) -> tracing::Span {
        span(self.slot, self.pid, self.spec.generation)
    }

    /// When a starting worker becomes ready by the clock: `alive:` after its start, and with
    /// `listen`/`auto`, [`LISTEN_SKIPPED`] after its bind if it never calls `listen()`
    /// (`auto` without a bind: `alive:1s`). `None`: only a message makes it ready.
    ///
    /// [`LISTEN_SKIPPED`]: crate::config::values::LISTEN_SKIPPED
    pub fn ready_by_clock(&self) -> Option<Mono> {
        use crate::config::{ReadyMode, values::LISTEN_SKIPPED};
        match (self.spec.ready, self.bound_at) {
            (ReadyMode::Alive(d), _) => Some(self.started + d),
            (ReadyMode::Notify, _) | (ReadyMode::Listen, None) => None,
            (ReadyMode::Listen | ReadyMode::Auto, Some(at)) => Some(at + LISTEN_SKIPPED),
            (ReadyMode::Auto, None) => Some(self.started + LISTEN_SKIPPED),
        }
    }

    pub fn is_ready(&self) -> bool {
        matches!(self.state, State::Ready { .. })
    }

    /// How `status` shows it (without its role: see `supervisor::status`).
    pub fn state_name(&self) -> crate::protocol::WorkerState {
        use crate::protocol::WorkerState as W;
        match self.state {
            State::Starting { .. } => W::Starting,
            State::Ready { .. } => W::Ready,
            State::Draining { .. } => W::Draining,
            State::Stopping { .. } | State::Killed => W::Stopping,
        }
    }
}
