//! Requests into the supervisor loop (from signals, and later the control socket) and the
//! answers it gives. Callers send a [`Control`] and, where they care, await its reply.

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

/// How to change the number of workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    To(usize),
    Add(usize),
    Remove(usize),
}

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
        reply: Option<oneshot::Sender<Result<usize, String>>>,
    },
    Status {
        reply: oneshot::Sender<Snapshot>,
    },
    /// Graceful stop; a second one kills what is left at once.
    Stop,
    /// In-place upgrade from `binary` (default: the path herdsman was started from). The
    /// reply comes only if it fails: on success the new image answers on `conn`.
    Upgrade {
        binary: Option<std::path::PathBuf>,
        reply: Option<oneshot::Sender<Result<UpgradeDone, String>>>,
        conn: Option<std::os::fd::OwnedFd>,
    },
}

/// The answer to `herdsman upgrade`, written by the new image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpgradeDone {
    /// The version now running.
    pub version: String,
    pub from_version: String,
    pub pid: u32,
    /// In-place upgrades since the service started.
    pub upgrades: u64,
    /// From just before `execve` to the new image serving its control socket.
    pub took_ms: f64,
    /// Workers taken over.
    pub workers: usize,
}

/// The result of one roll-out, as reported to every client that asked for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadOutcome {
    pub ok: bool,
    pub generation: u64,
    pub message: String,
    /// The supervisor was upgraded in place before this reload could start: send it again
    /// (the client does, to the new image).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub retry: bool,
}

/// One worker in a [`Snapshot`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerInfo {
    pub id: usize,
    pub pid: Option<i32>,
    pub generation: u64,
    pub state: String,
    /// The working directory this worker's generation was pinned to (symlinks resolved).
    #[serde(default)]
    pub cwd: String,
    /// Whether new connections can reach it (steered: its own socket is in the routing
    /// program; shared: it holds the shared socket and is not stopping).
    #[serde(default)]
    pub receiving: bool,
    /// Connections waiting in its socket's accept queue (shared: the shared queue's).
    #[serde(default)]
    pub accept_queue: u32,
    pub restarts: u32,
    pub uptime_s: f64,
    /// CPU use since the previous status request (or since start), filled by the control server.
    pub cpu_percent: f64,
    /// Resident memory, filled by the control server.
    pub rss_bytes: u64,
}

/// The supervisor's state at one instant.
#[derive(Debug, Clone, Serialize, Deserialize)]
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
    /// Log lines dropped because the journal (or stderr) was not accepting them, since start.
    #[serde(default)]
    pub log_dropped: u64,
    /// The metrics endpoint's address (`--metrics`), `null` when off.
    #[serde(default)]
    pub metrics: Option<String>,
    /// How connections reach workers: "shared", "steer" or "sticky".
    #[serde(default = "shared")]
    pub balance: String,
    /// The running supervisor's version.
    #[serde(default)]
    pub version: String,
    /// In-place upgrades (`herdsman upgrade`) since the service started.
    #[serde(default)]
    pub upgrades: u64,
    /// An in-place upgrade was asked for and has not ended (it waits for a roll-out, or its
    /// check is running).
    #[serde(default)]
    pub upgrading: bool,
}

fn shared() -> String {
    "shared".to_string()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LastReload {
    pub result: String,
    /// Unix time in seconds.
    pub at: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// After a failed reload with `on_failure = "rollback"`: "running", "ok" or "failed".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback: Option<String>,
}
