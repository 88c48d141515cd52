//! Requests into the supervisor loop (from signals, and later the control socket) and the
//! answers it gives. Callers send a [`Control`] and, where they care, await its reply.

use serde::Serialize;
use tokio::sync::oneshot;

/// How to change the number of workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    To(usize),
    Add(usize),
    Remove(usize),
}

#[derive(Debug)]
pub enum Control {
    /// Rolling reload; the reply comes when the roll-out that includes this request is over.
    Reload {
        reply: Option<oneshot::Sender<ReloadOutcome>>,
    },
    Scale {
        scale: Scale,
        reply: Option<oneshot::Sender<Result<usize, String>>>,
    },
    Status {
        reply: oneshot::Sender<Snapshot>,
    },
    /// Graceful stop; a second one kills what is left at once.
    Stop,
}

/// The result of one roll-out, as reported to every client that asked for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReloadOutcome {
    pub ok: bool,
    pub generation: u64,
    pub message: String,
}

/// One worker in a [`Snapshot`].
#[derive(Debug, Clone, Serialize)]
pub struct WorkerInfo {
    pub id: usize,
    pub pid: Option<i32>,
    pub generation: u64,
    pub state: String,
    pub restarts: u32,
    pub uptime_s: f64,
}

/// The supervisor's state at one instant.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub name: String,
    pub pid: u32,
    pub sockets: Vec<String>,
    pub generation: u64,
    pub desired: usize,
    pub ready: usize,
    pub status: String,
    pub workers: Vec<WorkerInfo>,
    pub last_reload: Option<LastReload>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LastReload {
    pub result: String,
    /// Unix time in seconds.
    pub at: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}
