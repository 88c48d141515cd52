//! Wire format of the control socket: one JSON object per line, each carrying the protocol
//! version `v`. The client sends one [`Request`]; the server answers with zero or more
//! `progress` replies and then exactly one final reply.
//!
//! ```text
//! → {"v":1,"op":"reload","wait":true}
//! ← {"v":1,"type":"progress","message":"worker 1/4 ready (pid 4412, 0.31 s)"}
//! ← {"v":1,"type":"reload","ok":true,"generation":3,"message":"reload complete: ..."}
//! ```

use serde::{Deserialize, Serialize};

pub const VERSION: u32 = 1;
/// Longest request line accepted.
pub const MAX_REQUEST: usize = 64 * 1024;

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

impl ReloadOutcome {
    /// A final answer (`retry` false: the client does not send the reload again).
    pub fn new(ok: bool, generation: u64, message: impl Into<String>) -> ReloadOutcome {
        ReloadOutcome { ok, generation, message: message.into(), retry: false }
    }
}

/// One worker in a [`Snapshot`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerInfo {
    pub id: usize,
    pub pid: Option<i32>,
    pub generation: u64,
    pub state: WorkerState,
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
    /// The slot's failures in a row (failed starts, workers that ended before a good run);
    /// 0 again after a good run. Back-off grows with it.
    #[serde(default)]
    pub failures: u32,
    /// Why the slot's last worker failed to start or ended unexpectedly; `null` if none did.
    #[serde(default)]
    pub last_error: Option<String>,
    /// `backoff` only: milliseconds until the slot is started again.
    #[serde(default)]
    pub restart_in_ms: Option<u64>,
    pub uptime_s: f64,
    /// CPU use since the previous status request (or since start), filled by the control server.
    pub cpu_percent: f64,
    /// Resident memory, filled by the control server.
    pub rss_bytes: u64,
    /// Started by a previous supervisor that crashed, re-adopted by this one through systemd's
    /// fd store (its exit status, when it ends, is unknown: PID 1 reaps it).
    #[serde(default)]
    pub readopted: bool,
}

/// The supervisor's state at one instant.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Snapshot {
    pub name: String,
    pub pid: u32,
    pub sockets: Vec<String>,
    /// The addresses among `sockets` herdsman learned from a worker's own bind (started
    /// without `--listen`, see `--bind-intercept`); empty otherwise.
    #[serde(default)]
    pub learned_sockets: Vec<String>,
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
    /// How steered connections are spread over the receiving workers: "round-robin" (eBPF),
    /// "hash" (classic BPF) or "client-address" (`sticky`); `null` for `shared`.
    #[serde(default)]
    pub routing: Option<String>,
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
    /// `--watch`: what is watched and what it did; `null` without `--watch`.
    #[serde(default)]
    pub watch: Option<WatchInfo>,
}

/// `--watch`'s part of the status.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WatchInfo {
    /// The watched paths (absolute).
    pub paths: Vec<String>,
    /// Changes were seen and their reload has not started yet (it waits for the files to be
    /// quiet, or for the roll-out in progress to end).
    pub pending: bool,
    /// Reloads started because files changed, since the supervisor started.
    pub reloads: u64,
    /// The change that started the last of them (the first of its burst).
    pub trigger: Option<String>,
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

/// Where a worker (or an empty slot) is, as `status --json` spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WorkerState {
    #[serde(rename = "starting")]
    Starting,
    /// A roll-out's new worker, not ready yet.
    #[serde(rename = "starting (new)")]
    StartingNew,
    /// A health replacement (watchdog, memory), not ready yet.
    #[serde(rename = "starting (replacement)")]
    StartingReplacement,
    /// A roll-out's new worker that is ready and waits out `min_ready`.
    #[serde(rename = "holding")]
    Holding,
    #[serde(rename = "ready")]
    Ready,
    /// Steered: no longer receives, accepting what is queued on its own socket.
    #[serde(rename = "draining")]
    Draining,
    #[serde(rename = "stopping")]
    Stopping,
    /// An empty slot waiting out its restart back-off.
    #[serde(rename = "backoff")]
    Backoff,
    /// An empty slot about to be filled.
    #[serde(rename = "waiting")]
    Waiting,
}

impl WorkerState {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Starting => "starting",
            WorkerState::StartingNew => "starting (new)",
            WorkerState::StartingReplacement => "starting (replacement)",
            WorkerState::Holding => "holding",
            WorkerState::Ready => "ready",
            WorkerState::Draining => "draining",
            WorkerState::Stopping => "stopping",
            WorkerState::Backoff => "backoff",
            WorkerState::Waiting => "waiting",
        }
    }
}

impl std::fmt::Display for WorkerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for WorkerState {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    Status,
    Reload {
        #[serde(default = "yes")]
        wait: bool,
    },
    /// `workers` is `N`, `+N` or `-N`.
    Scale {
        workers: String,
        #[serde(default = "yes")]
        wait: bool,
    },
    /// The metrics page (Prometheus text 0.0.4), as `GET /metrics` serves it.
    Metrics,
    /// Re-execute the supervisor in place from `binary` (default: the path it was started
    /// from); answered by the new image.
    Upgrade {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        binary: Option<std::path::PathBuf>,
    },
    /// Recent worker lines (`herdsman logs`): the last `lines` (of worker `worker`, read at
    /// or after `since_us`, µs since the epoch) as `log` replies, then a `logs` reply; with
    /// `follow`, new lines as they come until the client hangs up (never a final reply).
    /// Under journald the answer is one `journal` reply: read the journal instead.
    Logs {
        #[serde(default = "default_lines")]
        lines: usize,
        #[serde(default)]
        follow: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        worker: Option<usize>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        since_us: Option<u64>,
    },
}

fn default_lines() -> usize {
    crate::logs::DEFAULT_LINES
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub v: u32,
    #[serde(flatten)]
    pub op: Op,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply {
    Progress {
        message: String,
    },
    Status {
        status: Box<Snapshot>,
    },
    Reload(ReloadOutcome),
    Scale {
        workers: usize,
    },
    Metrics {
        text: String,
    },
    Upgrade(UpgradeDone),
    /// One worker line (an answer to `logs`).
    Log(crate::logs::Record),
    /// Lines dropped for this follower because it read slower than the workers wrote.
    LogsDropped {
        dropped: u64,
    },
    /// The end of a `logs` answer without `follow`: how many `log` replies came before.
    Logs {
        lines: usize,
    },
    /// `logs` under journald: the worker lines are in the journal of `unit` (`null`: not
    /// in a service; match the supervisor's `pid`), with `HERDSMAN_APP=app`.
    Journal {
        unit: Option<String>,
        app: String,
        pid: u32,
    },
    /// `kind` says what went wrong for programs (the client's exit code comes from it);
    /// `message` says it for people.
    Error {
        #[serde(default)]
        kind: ErrorKind,
        message: String,
    },
}

/// What kind of error an `error` reply reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request was carried out and failed (a roll-out, a metrics scrape, ...).
    #[default]
    Failed,
    /// Malformed, oversized, slow or of an unknown protocol version.
    BadRequest,
    /// The peer may not use this socket (`SO_PEERCRED`).
    PermissionDenied,
    /// Too many control connections at once: try again.
    Busy,
    /// The supervisor is stopping.
    ShuttingDown,
    /// `scale` could not be carried out (see [`ScaleError`]).
    Scale,
    /// `upgrade` was refused, or its `execve` failed; nothing changed.
    UpgradeRefused,
    /// `upgrade` was refused because its binary could have been written by someone other than
    /// root (or herdsman's own user): see `crate::upgrade::Candidate`. Nothing ran.
    Untrusted,
}

impl Reply {
    pub fn error(kind: ErrorKind, message: impl Into<String>) -> Reply {
        Reply::Error { kind, message: message.into() }
    }
}

/// Why a `scale` request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScaleError {
    #[error("cannot scale to 0 workers (now {now}); stop the app instead")]
    Zero { now: usize },
    #[error("cannot scale: {}", crate::config::values::too_many_workers(*.want))]
    TooMany { want: usize },
    #[error("worker {slot} failed to start: {why}")]
    StartFailed { slot: usize, why: String },
    #[error("the supervisor is stopping")]
    Stopping,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope {
    pub v: u32,
    #[serde(flatten)]
    pub reply: Reply,
}

impl Reply {
    pub fn line(self) -> String {
        let mut s = serde_json::to_string(&Envelope { v: VERSION, reply: self }).unwrap_or_else(|_| {
            r#"{"v":1,"type":"error","kind":"failed","message":"internal: unencodable reply"}"#.into()
        });
        s.push('\n');
        s
    }
}

/// Parses one request line, with a message fit to send back when it is bad.
pub fn parse_request(line: &[u8]) -> Result<Request, String> {
    let req: Request = serde_json::from_slice(line).map_err(|e| format!("malformed request: {e}"))?;
    if req.v != VERSION {
        return Err(format!("unsupported protocol version {} (this herdsman speaks {VERSION})", req.v));
    }
    Ok(req)
}

/// `N`, `+N`, `-N` → a scale operation.
/// How to change the number of workers (`workers` in a `scale` request: `N`, `+N`, `-N`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    To(usize),
    Add(usize),
    Remove(usize),
}

pub fn parse_scale(s: &str) -> Result<Scale, String> {
    let t = s.trim();
    let num = |x: &str| {
        x.parse::<usize>()
            .map_err(|_| format!("invalid worker count {s:?}; use N, +N or -N (e.g. 4, +2, -1)"))
    };
    if let Some(n) = t.strip_prefix('+') {
        Ok(Scale::Add(num(n)?))
    } else if let Some(n) = t.strip_prefix('-') {
        Ok(Scale::Remove(num(n)?))
    } else {
        // Checked here too, so `herdsman scale 100000` fails before asking the supervisor.
        let n = num(t)?;
        if n > crate::config::values::MAX_WORKERS {
            return Err(crate::config::values::too_many_workers(n));
        }
        Ok(Scale::To(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_bad_ones_are_explained() {
        let r = parse_request(br#"{"v":1,"op":"reload"}"#).unwrap();
        assert_eq!(r.op, Op::Reload { wait: true });
        let r = parse_request(br#"{"v":1,"op":"scale","workers":"+2","wait":false}"#).unwrap();
        assert_eq!(r.op, Op::Scale { workers: "+2".into(), wait: false });
        assert!(parse_request(b"garbage").unwrap_err().starts_with("malformed request"));
        assert!(parse_request(br#"{"v":9,"op":"status"}"#).unwrap_err().contains("version 9"));
        assert!(parse_request(br#"{"v":1,"op":"explode"}"#).is_err());
        assert_eq!(parse_request(br#"{"v":1,"op":"metrics"}"#).unwrap().op, Op::Metrics);
        let logs =
            Op::Logs { lines: crate::logs::DEFAULT_LINES, follow: false, worker: None, since_us: None };
        assert_eq!(parse_request(br#"{"v":1,"op":"logs"}"#).unwrap().op, logs);
    }

    #[test]
    fn scale_forms() {
        assert_eq!(parse_scale("4").unwrap(), Scale::To(4));
        assert_eq!(parse_scale("+2").unwrap(), Scale::Add(2));
        assert_eq!(parse_scale("-1").unwrap(), Scale::Remove(1));
        assert!(parse_scale("lots").is_err());
        assert!(parse_scale("5000").unwrap_err().contains("limit of 4096"));
    }

    #[test]
    fn replies_are_single_lines_with_the_version() {
        let line = Reply::Progress { message: "a\nb".into() }.line();
        assert_eq!(line.matches('\n').count(), 1);
        assert!(line.starts_with(r#"{"v":1,"type":"progress""#));
    }
}
