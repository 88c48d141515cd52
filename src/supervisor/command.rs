//! The one way out of the core: what it decided should happen outside it.
//!
//! Every part (the roll-out, health, the manager, the timers, exits and notify messages)
//! returns `Command`s instead of signalling workers, writing metrics or talking to clients;
//! `Supervisor::apply` is the only code that carries them out, in order, through the host,
//! the steering, the notifier and the metrics. What the core needs to know from outside comes
//! back as an input: a spawn's pid (or error), a memory sample, a draining worker's
//! accept-queue length. The in-process tests see the commands as what the fake host recorded.

use std::time::Duration;

use nix::sys::signal::Signal;

use crate::control::protocol::ReloadOutcome;
use crate::worker::Failure;

/// A reload client the core waits to answer; its channels stay in the driver's table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub(super) struct WaiterId(pub u64);

#[derive(Debug)]
pub(super) enum Command {
    /// `new` takes over `slot` and the worker it replaces is retired (the one hand-over, for
    /// a roll-out's new worker and a health replacement alike). With `kill_old` the replaced
    /// worker is hung: it is SIGKILLed first.
    Promote { slot: usize, new: i32, kill_old: bool },
    /// SIGKILL `pid`'s process group now (failed or hung); `failure` says why, for its report.
    Kill { pid: i32, failure: Option<Failure> },
    /// Stop `pid` gracefully: drain, stop signal, kill timer.
    Retire(i32),
    /// Start a replacement for the unhealthy `old` in its slot, `failure` saying why; it
    /// takes over once ready ([`Command::Promote`]). `hard`: `old` is hung (SIGKILL it then).
    Replace { old: i32, failure: Failure, hard: bool },
    /// Send `sig` to `pid` (with `group`, to its process group too). The core already
    /// recorded the state this leads to.
    Signal { pid: i32, sig: Signal, group: bool },
    /// Ask `pid` to stop: its stop signal, or PM2's `shutdown` message (`--stop-signal
    /// message`). The core already armed its kill timer.
    AskToStop(i32),
    /// Let new connections reach `pid` (steered sockets), or stop them.
    Receiving { pid: i32, on: bool },
    /// Sample the workers' memory; the driver feeds the sample back
    /// (`Supervisor::memory_sampled`).
    SampleMemory,
    /// Tell the service manager.
    Notify(String),
    /// Give reload clients their final answer.
    Answer { waiters: Vec<WaiterId>, outcome: ReloadOutcome },
    /// Tell reload clients how it goes (one line).
    Progress { waiters: Vec<WaiterId>, line: String },
    /// Count a reload that ended (`took`: how long its roll-out ran) for the metrics.
    Reloaded { ok: bool, took: Option<Duration> },
    /// Count a restart of `slot`'s active worker, for the metrics.
    RestartMetric { slot: usize },
    /// Count a worker that became ready `took` after its start, for the metrics.
    ReadyMetric { took: Duration },
}
