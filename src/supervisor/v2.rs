//! Reading the previous release's upgrade state (format 2), read-only.
//!
//! Format 2 mirrored the supervisor's types with their instants as `CLOCK_MONOTONIC`
//! nanoseconds and its descriptors as numbers inside the records. [`convert`] turns such a
//! document into the current one (format 3: the [`Core`] and a table of descriptors by name),
//! so the one take-over path (`app::resume`) serves both. The types below are the old
//! format's, kept only to read it: nothing writes them.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;

use super::document::{self, ControlState, Handover, HttpState, fd_name};
use super::pool::{Pool, Slot};
use super::{Core, Health, Manager, Rollouts};
use crate::config::Layer;
use crate::mono::Mono;
use crate::spawn::Spec;
use crate::upgrade;
use crate::worker::{State, Worker};

/// The whole format-2 document.
#[derive(Debug, Deserialize)]
struct HandoverV2 {
    from_version: String,
    binary: PathBuf,
    upgrades: u64,
    exec_at_ns: i64,
    config: Option<PathBuf>,
    overrides: Layer,
    argv: Vec<String>,
    worker_fd_limit: u64,
    control: ControlV2,
    metrics_http: Option<HttpV2>,
    metrics: crate::metrics::carry::MetricsState,
    listeners: crate::listeners::ListenersState,
    steering: Option<crate::steer::SteeringState>,
    notify: crate::notify::NotifyState,
    supervisor: SupervisorState,
    reply: Option<RawFd>,
    fds: Vec<RawFd>,
}

#[derive(Debug, Deserialize)]
struct ControlV2 {
    fd: RawFd,
    path: PathBuf,
    made_dir: Option<PathBuf>,
    uid: u32,
    group: Option<u32>,
}

#[derive(Debug, Deserialize)]
struct HttpV2 {
    fd: RawFd,
    unix: Option<PathBuf>,
    address: String,
}

/// The supervisor's part of a format-2 state.
#[derive(Debug, Deserialize)]
struct SupervisorState {
    settings: crate::config::Settings,
    /// Every spec in use, each once; slots and workers refer to them by index.
    specs: Vec<Spec>,
    spec: usize,
    generation: u64,
    desired: usize,
    slots: Vec<SlotState>,
    workers: Vec<WorkerRecord>,
    last_reload: Option<crate::control::protocol::LastReload>,
    sent_ready: bool,
    next_memory_check_ns: Option<i64>,
}

#[derive(Debug, Deserialize)]
struct SlotState {
    id: usize,
    active: Option<i32>,
    spec: usize,
    failures: u32,
    restarts: u32,
    restart_at_ns: Option<i64>,
    settled: bool,
    last_error: Option<String>,
}

#[derive(Debug, Deserialize)]
struct WorkerRecord {
    pid: i32,
    slot: usize,
    spec: usize,
    state: WorkerPhase,
    role: crate::worker::Role,
    started_ns: i64,
    pidfd: RawFd,
    stdout: RawFd,
    stderr: RawFd,
    #[serde(default)]
    channel: Option<RawFd>,
    #[serde(default)]
    bind_notify: Option<RawFd>,
    #[serde(default)]
    bound: bool,
    tail: Vec<String>,
    failure: Option<crate::worker::Failure>,
    last_ping_ns: i64,
    memory_strikes: u32,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
enum WorkerPhase {
    Starting { deadline_ns: i64 },
    Ready { since_ns: i64 },
    Draining { since_ns: i64 },
    Stopping { kill_at_ns: i64 },
    Killed,
}

fn mono(ns: i64) -> Mono {
    Mono::from_nanos(u64::try_from(ns).unwrap_or(0))
}

impl WorkerPhase {
    fn state(self) -> State {
        match self {
            WorkerPhase::Starting { deadline_ns } => State::Starting { deadline: mono(deadline_ns) },
            WorkerPhase::Ready { since_ns } => State::Ready { since: mono(since_ns) },
            WorkerPhase::Draining { since_ns } => State::Draining { since: mono(since_ns) },
            WorkerPhase::Stopping { kill_at_ns } => State::Stopping { kill_at: mono(kill_at_ns) },
            WorkerPhase::Killed => State::Killed,
        }
    }
}

/// Reads a format-2 document as the current [`Handover`]: the core rebuilt from the mirror
/// records, every descriptor named (the workers' as `pidfd-…`, `out-…`, …; the sockets'
/// `legacy-<n>`, keyed by the number their states carry).
pub fn convert(bytes: &[u8]) -> Result<Handover, String> {
    let old: HandoverV2 =
        serde_json::from_slice(bytes).map_err(|e| format!("unreadable upgrade state (format 2): {e}"))?;
    let bad = |what: String| format!("unreadable upgrade state (format 2): {what}");
    let sup = old.supervisor;
    let specs: Vec<Arc<Spec>> = sup.specs.into_iter().map(Arc::new).collect();
    let spec_at = |i: usize| specs.get(i).cloned().ok_or_else(|| bad(format!("spec {i} missing")));
    let mut fds: BTreeMap<String, RawFd> = BTreeMap::new();
    let mut tails = BTreeMap::new();
    let mut slots = BTreeMap::new();
    for s in sup.slots {
        let slot = Slot {
            active: s.active,
            spec: spec_at(s.spec)?,
            failures: s.failures,
            restarts: s.restarts,
            restart_at: s.restart_at_ns.map(mono),
            settled: s.settled,
            last_error: s.last_error,
        };
        slots.insert(s.id, slot);
    }
    let mut workers = HashMap::new();
    for w in sup.workers {
        let spec = spec_at(w.spec)?;
        let name = |kind: &str| fd_name(kind, w.slot, spec.generation, w.pid);
        fds.insert(name("pidfd"), w.pidfd);
        fds.insert(name("out"), w.stdout);
        fds.insert(name("err"), w.stderr);
        if let Some(c) = w.channel {
            fds.insert(name("ipc"), c);
        }
        if let Some(b) = w.bind_notify {
            fds.insert(name("bind"), b);
        }
        tails.insert(w.pid, w.tail);
        let worker = Worker {
            pid: w.pid,
            slot: w.slot,
            spec,
            state: w.state.state(),
            role: w.role,
            started: mono(w.started_ns),
            has_channel: w.channel.is_some(),
            intercepted: w.bind_notify.is_some(),
            bound: w.bound,
            bound_at: None,
            warned_foreign: false,
            intercept_failures: 0,
            failure: w.failure,
            last_ping: mono(w.last_ping_ns),
            memory_strikes: w.memory_strikes,
            readopted: false,
        };
        workers.insert(w.pid, worker);
    }
    let pool = Pool::restored(spec_at(sup.spec)?, sup.generation, sup.desired, slots, workers);
    let app: Arc<str> = Arc::from(sup.settings.name.as_str());
    let mut rollouts = Rollouts::new();
    rollouts.last_reload = sup.last_reload;
    let mut health = Health::new();
    health.next_memory_check = sup.next_memory_check_ns.map(mono);
    let core = Core {
        _specs: crate::specs::Table,
        settings: sup.settings,
        app,
        stopping: false,
        pool,
        rollouts,
        health,
        // The watchdog interval is this image's (`WATCHDOG_USEC`): set on resume.
        manager: Manager::taken_over(sup.sent_ready),
        watching: Default::default(),
    };
    fds.insert(document::FD_CONTROL.to_string(), old.control.fd);
    if let Some(h) = &old.metrics_http {
        fds.insert(document::FD_METRICS_HTTP.to_string(), h.fd);
    }
    if let Some(r) = old.reply {
        fds.insert(document::FD_REPLY.to_string(), r);
    }
    // The rest (listening and steered sockets, the routing program, the notify socket) stay
    // keyed by the numbers their states carry.
    let named: std::collections::HashSet<RawFd> = fds.values().copied().collect();
    for n in old.fds.iter().filter(|n| !named.contains(n)) {
        fds.insert(format!("legacy-{n}"), *n);
    }
    Ok(Handover {
        format: upgrade::STATE_FORMAT_V2,
        from_version: old.from_version,
        binary: old.binary,
        upgrades: old.upgrades,
        exec_at_ns: old.exec_at_ns,
        config: old.config,
        overrides: old.overrides,
        argv: old.argv,
        worker_fd_limit: old.worker_fd_limit,
        control: ControlState {
            path: old.control.path,
            made_dir: old.control.made_dir,
            uid: old.control.uid,
            group: old.control.group,
        },
        metrics_http: old.metrics_http.map(|h| HttpState { unix: h.unix, address: h.address }),
        metrics: old.metrics,
        listeners: old.listeners,
        steering: old.steering,
        notify: old.notify,
        core,
        tails,
        fds,
    })
}
