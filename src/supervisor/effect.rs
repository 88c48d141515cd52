//! What a part decided should happen outside it. The roll-out and health parts return
//! effects instead of signalling workers or talking to clients; `Supervisor::apply` carries
//! them out in order, through the host, the notifier and the metrics. The in-process tests
//! see them as what the fake host recorded.

use std::time::Duration;

use crate::control::protocol::ReloadOutcome;
use crate::worker::Failure;

/// A reload client the core waits to answer; its channels stay in the driver's table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub(super) struct WaiterId(pub u64);

#[derive(Debug)]
pub(super) enum Effect {
    /// `new` takes over `slot` and the worker it replaces is retired (the one hand-over, for
    /// a roll-out's new worker and a health replacement alike). With `kill_old` the replaced
    /// worker is hung: it is SIGKILLed first.
    Promote { slot: usize, new: i32, kill_old: bool },
    /// SIGKILL `pid`'s process group now (failed or hung); `failure` says why, for its report.
    Kill { pid: i32, failure: Option<Failure> },
    /// Stop `pid` gracefully: drain, stop signal, kill timer.
    Retire(i32),
    /// Start a replacement for the unhealthy `old` in its slot, `failure` saying why; it
    /// takes over once ready ([`Effect::Promote`]). `hard`: `old` is hung (SIGKILL it then).
    Replace { old: i32, failure: Failure, hard: bool },
    /// Tell the service manager.
    Notify(String),
    /// Give reload clients their final answer.
    Answer { waiters: Vec<WaiterId>, outcome: ReloadOutcome },
    /// Tell reload clients how it goes (one line).
    Progress { waiters: Vec<WaiterId>, line: String },
    /// Count a reload that ended (`took`: how long its roll-out ran) for the metrics.
    Reloaded { ok: bool, took: Option<Duration> },
}
