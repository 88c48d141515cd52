//! Metrics: herdsman's own (workers, restarts, exits, reloads, memory, CPU, listen queues)
//! and every worker's, merged under a `worker` label, as Prometheus text 0.0.4 or
//! OpenMetrics 1.0.
//!
//! Theory of operation. [`Metrics`] is a cheap handle shared by the supervisor loop, the HTTP
//! endpoint ([`http`]) and the control server. The loop only *records*: one call where a
//! thing happens (a worker exit and its reason, a restart, a reload and its duration, a
//! worker's time to ready, the socket path handed to a new worker); each is a short mutex
//! hold, never I/O. A scrape ([`collect`]) runs in its own task: it asks the loop for a
//! [`Snapshot`] (the same answer `status` gets) and fetches every ready worker's page
//! concurrently over its `HERDSMAN_METRICS_SOCKET` (bounded time and size). Its CPU work is
//! all on one blocking thread started with the fetches: it samples `/proc` and the listen
//! queues while the pages are on their way, parses each page as it arrives (the parsed
//! families borrow the page's text: no copies per sample), and merges and renders once the
//! last fetch has ended. A slow scraper or a hung worker therefore costs the loop nothing but
//! the snapshot (and the fetches' socket I/O, which are tasks on it).
//!
//! Why no `prometheus-client`: a client library's registry and encoders render its own
//! metrics, while herdsman's page is its dozen families *merged* with every worker's page,
//! parsed and relabelled with `worker`, in 0.0.4 by default or OpenMetrics. So it keeps its few
//! series itself ([`model`]) and renders both formats, the workers' families included, from
//! the same data; a dozen families do not need a registry.
//!
//! Worker sockets live in herdsman's runtime directory (that of the default control socket,
//! next to the workers' notify socket): `metrics-HPID-SLOT-SEQ.sock`, unique per worker
//! process. Workers running as another user (`user`) get theirs in `metrics-uUID/` (owned
//! by herdsman, group of the worker user, 0770), since they cannot create files in a
//! directory only herdsman may write. herdsman removes each file when its worker is gone.
//! That directory is writable by the workers, so nothing in it is trusted or followed: see
//! `open_socket` (a scrape) and `remove_stale` (start and exit). And a worker's page can
//! neither break the merged page nor forge herdsman's series: see [`parse::merge`].

pub mod carry;
pub mod http;
pub mod model;
pub mod parse;
pub mod queue;
mod scrape;
mod sockets;
#[cfg(test)]
mod tests;

use sockets::{remove_files, remove_stale, user_dir};

use std::cell::OnceCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use nix::sys::wait::WaitStatus;

use crate::protocol::{Snapshot, WorkerState};
use crate::requests::Control;
use model::{Family, Format, Histogram, Kind};

/// How long one worker's page may take.
pub(crate) const WORKER_TIMEOUT: Duration = Duration::from_secs(2);
/// The largest worker page accepted.
pub(crate) const WORKER_MAX_BYTES: usize = 4 << 20;
/// The most samples (series) a worker page may have: a 4 MiB page of `a 1` lines is a million
/// series, which rendered with their `worker` label made a 37 MB page of two workers' 8 MiB.
pub(crate) const WORKER_MAX_SERIES: usize = 20_000;
/// The most metric families a worker page may have.
pub(crate) const WORKER_MAX_FAMILIES: usize = 2_000;
/// The workers' part of a page is at most this large, rendered: pages that would make it
/// larger are skipped (and counted), in the order they arrive.
pub(crate) const WORKERS_MAX_RENDERED: usize = 16 << 20;
/// A scrape that read or built at least this much gives the freed memory back to the system
/// when it is done (glibc keeps freed heap memory, and raises its mmap threshold after a big
/// buffer is freed, so the next big buffers come from the heap).
pub(crate) const BIG: usize = 1 << 20;
/// How long the loop may take to answer the snapshot request.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(5);

const RELOAD_BUCKETS: &[f64] = &[0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0];
const START_BUCKETS: &[f64] = &[0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

/// Why a worker exited, for `herdsman_worker_exits_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Reason {
    Exit,
    Signal,
    Watchdog,
    Memory,
}

impl Reason {
    const ALL: [Reason; 4] = [Reason::Exit, Reason::Signal, Reason::Watchdog, Reason::Memory];

    fn label(self) -> &'static str {
        match self {
            Reason::Exit => "exit",
            Reason::Signal => "signal",
            Reason::Watchdog => "watchdog",
            Reason::Memory => "memory",
        }
    }

    /// From what the supervisor gave up on it for (`Worker::failure`) and its wait status:
    /// a watchdog or memory replacement counts as such even though it ends by a signal.
    pub(crate) fn of(failure: Option<crate::worker::FailureKind>, status: WaitStatus) -> Reason {
        use crate::worker::FailureKind;
        match failure {
            Some(FailureKind::Watchdog) => Reason::Watchdog,
            Some(FailureKind::Memory) => Reason::Memory,
            _ if matches!(status, WaitStatus::Signaled(..)) => Reason::Signal,
            _ => Reason::Exit,
        }
    }
}

/// The `state` label of `herdsman_workers` for a worker in `s` (`holding` counts as ready,
/// `stopping` with `draining`); `None` for an empty slot.
fn gauge_state(s: WorkerState) -> Option<&'static str> {
    match s {
        WorkerState::Starting | WorkerState::StartingNew | WorkerState::StartingReplacement => {
            Some("starting")
        }
        WorkerState::Ready | WorkerState::Holding => Some("ready"),
        WorkerState::Draining | WorkerState::Stopping => Some("draining"),
        WorkerState::Backoff | WorkerState::Waiting => None,
    }
}

/// What the loop records.
struct State {
    restarts: BTreeMap<usize, u64>,
    exits: BTreeMap<(usize, Reason), u64>,
    reloads: [u64; 2],
    reload_seconds: Histogram,
    start_seconds: Histogram,
    scrape_errors: BTreeMap<usize, u64>,
    /// Live workers' metrics sockets: pid → (slot, path).
    sockets: HashMap<i32, (usize, PathBuf)>,
    /// CPU ticks of a slot's workers that are gone, and the last ticks seen per live pid.
    cpu_gone: BTreeMap<usize, u64>,
    cpu_seen: HashMap<i32, (usize, u64)>,
    slots: BTreeSet<usize>,
}

struct Inner {
    state: Mutex<State>,
    dir: Option<PathBuf>,
    /// The HTTP endpoint's address, once bound.
    address: Mutex<Option<String>>,
    seq: AtomicU64,
    /// The listening sockets (copies) and their label.
    sockets: Vec<(String, OwnedFd)>,
    euid: u32,
    /// Read buffers of earlier scrapes, for the next one's pages (see [`POOL_BYTES`]).
    buffers: Mutex<Vec<Vec<u8>>>,
}

/// The shared handle.
#[derive(Clone)]
pub struct Metrics(Arc<Inner>);

impl Metrics {
    /// `dir`: herdsman's runtime directory (worker sockets go there; `None`: workers get no
    /// `HERDSMAN_METRICS_SOCKET`). `sockets`: copies of the listening sockets, labelled.
    pub(crate) fn new(dir: Option<PathBuf>, sockets: Vec<(String, OwnedFd)>) -> Metrics {
        if let Some(d) = &dir {
            remove_stale(d, false);
        }
        Self::empty(dir, sockets)
    }

    /// Like [`Metrics::new`], without removing anything (the sockets in `dir` belong to live
    /// workers: see `carry`).
    fn empty(dir: Option<PathBuf>, sockets: Vec<(String, OwnedFd)>) -> Metrics {
        Metrics(Arc::new(Inner {
            state: Mutex::new(State {
                restarts: BTreeMap::new(),
                exits: BTreeMap::new(),
                reloads: [0, 0],
                reload_seconds: Histogram::new(RELOAD_BUCKETS),
                start_seconds: Histogram::new(START_BUCKETS),
                scrape_errors: BTreeMap::new(),
                sockets: HashMap::new(),
                cpu_gone: BTreeMap::new(),
                cpu_seen: HashMap::new(),
                slots: BTreeSet::new(),
            }),
            dir,
            address: Mutex::new(None),
            seq: AtomicU64::new(0),
            sockets,
            euid: nix::unistd::geteuid().as_raw(),
            buffers: Mutex::new(Vec::new()),
        }))
    }

    /// A handle with no runtime directory and no sockets (tests).
    #[cfg(test)]
    pub fn disabled() -> Metrics {
        Metrics::new(None, Vec::new())
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.0.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The HTTP endpoint's address (for `status`), once it is serving.
    pub(crate) fn address(&self) -> Option<String> {
        self.0.address.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(crate) fn set_address(&self, a: String) {
        *self.0.address.lock().unwrap_or_else(|p| p.into_inner()) = Some(a);
    }

    /// The `HERDSMAN_METRICS_SOCKET` for a new worker in `slot` running as `user` (`None`:
    /// as herdsman); `None` when there is no usable directory.
    pub(crate) fn socket_for(&self, slot: usize, user: Option<(u32, u32)>) -> Option<String> {
        let base = self.0.dir.as_ref()?;
        let dir = match user {
            Some((uid, gid)) if uid != self.0.euid => {
                let d = base.join(format!("metrics-u{uid}"));
                if let Err(e) = user_dir(&d, gid) {
                    tracing::warn!("cannot prepare {} for worker metrics sockets: {e}", d.display());
                    return None;
                }
                d
            }
            _ => base.clone(),
        };
        let n = self.0.seq.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!("metrics-{}-{slot}-{n}.sock", std::process::id()));
        if path.as_os_str().len() >= 108 {
            tracing::warn!("{} is too long for a socket address; no HERDSMAN_METRICS_SOCKET", path.display());
            return None;
        }
        let _ = std::fs::remove_file(&path);
        Some(path.display().to_string())
    }

    /// A worker started with `socket` (from [`Metrics::socket_for`]).
    pub(crate) fn launched(&self, pid: i32, slot: usize, socket: Option<String>) {
        let mut s = self.state();
        s.slots.insert(slot);
        if let Some(p) = socket {
            s.sockets.insert(pid, (slot, PathBuf::from(p)));
        }
    }

    /// A worker exited: count it, remove its socket file.
    pub(crate) fn exited(&self, pid: i32, slot: usize, reason: Reason) {
        let mut s = self.state();
        *s.exits.entry((slot, reason)).or_default() += 1;
        if let Some((_, path)) = s.sockets.remove(&pid) {
            let _ = std::fs::remove_file(path);
        }
        if let Some((slot, ticks)) = s.cpu_seen.remove(&pid) {
            *s.cpu_gone.entry(slot).or_default() += ticks;
        }
    }

    /// A slot's worker is replaced after an unexpected exit.
    pub(crate) fn restarted(&self, slot: usize) {
        *self.state().restarts.entry(slot).or_default() += 1;
    }

    /// A reload ended; `took` is the roll-out's duration (`None`: refused before starting).
    pub(crate) fn reloaded(&self, ok: bool, took: Option<Duration>) {
        let mut s = self.state();
        s.reloads[usize::from(!ok)] += 1;
        if let Some(t) = took {
            s.reload_seconds.observe(t.as_secs_f64());
        }
    }

    /// A worker became ready `took` after it was spawned.
    pub(crate) fn ready(&self, took: Duration) {
        self.state().start_seconds.observe(took.as_secs_f64());
    }
}

impl Metrics {
    /// herdsman is exiting (its workers are gone): removes their socket files and the
    /// `metrics-uUID/` directories (see `remove_stale`). Also done when the last handle goes.
    pub(crate) fn remove_files(&self) {
        remove_files(self.0.dir.as_deref(), &mut self.state().sockets);
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let s = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        remove_files(self.dir.as_deref(), &mut s.sockets);
    }
}
