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
//! Why no `prometheus-client`: its text encoder writes OpenMetrics only (a counter's family
//! line is `x`, not the `x_total` the 0.0.4 format wants, and it always ends with `# EOF`),
//! and its registry does not expose metric values to an encoder of our own (its maintainers
//! say as much in prometheus/client_rust#46). herdsman must speak 0.0.4 by default *and*
//! merge worker families into the same page, so it keeps its few series itself
//! ([`model`]) and writes both formats from the same data; a dozen families do not need a
//! registry.
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

use std::cell::OnceCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::sys::wait::WaitStatus;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

use crate::protocol::{Snapshot, WorkerState};
use crate::requests::Control;
use model::{Family, Format, Histogram, Kind};

/// How long one worker's page may take.
pub const WORKER_TIMEOUT: Duration = Duration::from_secs(2);
/// The largest worker page accepted.
pub const WORKER_MAX_BYTES: usize = 4 << 20;
/// The most samples (series) a worker page may have: a 4 MiB page of `a 1` lines is a million
/// series, which rendered with their `worker` label made a 37 MB page of two workers' 8 MiB.
pub const WORKER_MAX_SERIES: usize = 20_000;
/// The most metric families a worker page may have.
pub const WORKER_MAX_FAMILIES: usize = 2_000;
/// The workers' part of a page is at most this large, rendered: pages that would make it
/// larger are skipped (and counted), in the order they arrive.
pub const WORKERS_MAX_RENDERED: usize = 16 << 20;
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
pub enum Reason {
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
    pub fn of(failure: Option<crate::worker::FailureKind>, status: WaitStatus) -> Reason {
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
    pub fn new(dir: Option<PathBuf>, sockets: Vec<(String, OwnedFd)>) -> Metrics {
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
    pub fn disabled() -> Metrics {
        Metrics::new(None, Vec::new())
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.0.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The HTTP endpoint's address (for `status`), once it is serving.
    pub fn address(&self) -> Option<String> {
        self.0.address.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(crate) fn set_address(&self, a: String) {
        *self.0.address.lock().unwrap_or_else(|p| p.into_inner()) = Some(a);
    }

    /// The `HERDSMAN_METRICS_SOCKET` for a new worker in `slot` running as `user` (`None`:
    /// as herdsman); `None` when there is no usable directory.
    pub fn socket_for(&self, slot: usize, user: Option<(u32, u32)>) -> Option<String> {
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
    pub fn launched(&self, pid: i32, slot: usize, socket: Option<String>) {
        let mut s = self.state();
        s.slots.insert(slot);
        if let Some(p) = socket {
            s.sockets.insert(pid, (slot, PathBuf::from(p)));
        }
    }

    /// A worker exited: count it, remove its socket file.
    pub fn exited(&self, pid: i32, slot: usize, reason: Reason) {
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
    pub fn restarted(&self, slot: usize) {
        *self.state().restarts.entry(slot).or_default() += 1;
    }

    /// A reload ended; `took` is the roll-out's duration (`None`: refused before starting).
    pub fn reloaded(&self, ok: bool, took: Option<Duration>) {
        let mut s = self.state();
        s.reloads[usize::from(!ok)] += 1;
        if let Some(t) = took {
            s.reload_seconds.observe(t.as_secs_f64());
        }
    }

    /// A worker became ready `took` after it was spawned.
    pub fn ready(&self, took: Duration) {
        self.state().start_seconds.observe(took.as_secs_f64());
    }

    /// The page: herdsman's families, then the workers'. Asks the loop for a snapshot
    /// through `controls`; everything else happens outside the loop.
    pub async fn collect(&self, controls: &mpsc::Sender<Control>, format: Format) -> Result<String, String> {
        let (tx, rx) = oneshot::channel();
        controls.send(Control::Status { reply: tx }).await.map_err(|_| "the supervisor is shutting down")?;
        let snap = match tokio::time::timeout(SNAPSHOT_TIMEOUT, rx).await {
            Ok(Ok(s)) => s,
            Ok(Err(_)) => return Err("the supervisor is shutting down".into()),
            Err(_) => return Err("the supervisor did not answer within 5 s".into()),
        };
        let targets: Vec<(usize, PathBuf)> = {
            let s = self.state();
            snap.workers
                .iter()
                .filter(|w| w.state == "ready")
                .filter_map(|w| s.sockets.get(&w.pid?).cloned())
                .collect()
        };
        let started = Instant::now();
        // Everything but the socket I/O happens in one blocking task started now: it samples
        // /proc and the listen queues while the pages are on their way, parses each page as
        // it comes in, and merges and renders once the last one is in.
        let (pages_tx, pages_rx) = std::sync::mpsc::channel();
        let me = self.clone();
        let n = targets.len();
        let work = tokio::task::spawn_blocking(move || me.build(&snap, n, pages_rx, format, started));
        let mut buffers = self.buffers(n);
        let mut set = tokio::task::JoinSet::new();
        let euid = self.0.euid;
        for (slot, path) in targets {
            let buf = buffers.pop().unwrap_or_default();
            set.spawn(async move {
                match tokio::time::timeout(WORKER_TIMEOUT, fetch(&path, euid, buf)).await {
                    Ok(Ok(page)) => (slot, Ok(page)),
                    Ok(Err(e)) => (slot, Err(e.to_string())),
                    Err(_) => (slot, Err(Fetch::Timeout.to_string())),
                }
            });
        }
        while let Some(r) = set.join_next().await {
            if let Ok((slot, page)) = r {
                // Never blocks (unbounded); fails only if the task is gone, which the
                // `await` below reports.
                let _ = pages_tx.send(Fetched::Page(slot, page));
            }
        }
        let fetched = started.elapsed();
        let _ = pages_tx.send(Fetched::Done);
        let (page, t) = work.await.map_err(|e| format!("rendering failed: {e}"))?;
        tracing::debug!(
            "metrics scrape: workers' pages in {:.1} ms (parsed as they came in {:.1} ms), /proc and queues in {:.1} ms, merged and rendered in {:.1} ms; page of {} bytes in {:.1} ms",
            fetched.as_secs_f64() * 1e3,
            t.parsing.as_secs_f64() * 1e3,
            t.sampling.as_secs_f64() * 1e3,
            t.rendering.as_secs_f64() * 1e3,
            page.len(),
            started.elapsed().as_secs_f64() * 1e3
        );
        Ok(page)
    }

    /// The scrape's work on its blocking thread: samples, then parses the pages `rx` brings
    /// (`n` at most) until [`Fetched::Done`], then renders. Without `Done` (the scrape was
    /// dropped) nothing is rendered or counted.
    fn build(
        &self,
        snap: &Snapshot,
        n: usize,
        rx: std::sync::mpsc::Receiver<Fetched>,
        format: Format,
        started: Instant,
    ) -> (String, Timings) {
        // One /proc scan for every worker's whole process group (pre-fork servers' children
        // count with their worker).
        let pids: Vec<i32> = snap.workers.iter().filter_map(|w| w.pid).collect();
        let sampled = Sampled {
            usage: crate::procstat::scan_groups(&pids),
            queues: if self.0.sockets.is_empty() { Default::default() } else { queue::listening() },
        };
        let mut t = Timings { sampling: started.elapsed(), ..Timings::default() };
        // The pages stay where they are received while their families borrow them.
        let cells: Vec<OnceCell<Page>> = (0..n).map(|_| OnceCell::new()).collect();
        let page = {
            let mut cells = cells.iter();
            let mut parsed =
                Parsed { pages: Vec::with_capacity(n), failed: Vec::new(), body_bytes: 0, rendered_bound: 0 };
            let mut done = false;
            for m in &rx {
                let (slot, page) = match m {
                    Fetched::Done => {
                        done = true;
                        break;
                    }
                    Fetched::Page(slot, page) => (slot, page),
                };
                let t0 = Instant::now();
                let families = page.and_then(|p| {
                    // A page that cannot fit is dropped unparsed (its body alone is a lower
                    // bound of what it renders to).
                    if p.body().len() > WORKERS_MAX_RENDERED - parsed.rendered_bound {
                        return Err(Fetch::OverBudget.to_string());
                    }
                    let p = cells.next().ok_or("more pages than workers")?.get_or_init(|| p);
                    let f = parse::parse_capped(p.body(), WORKER_MAX_FAMILIES, WORKER_MAX_SERIES)
                        .map_err(|e| e.to_string())?;
                    let bound = rendered_bound(p.body().len(), &f);
                    if bound > WORKERS_MAX_RENDERED - parsed.rendered_bound {
                        return Err(Fetch::OverBudget.to_string());
                    }
                    parsed.rendered_bound += bound;
                    parsed.body_bytes += p.body().len();
                    Ok(f)
                });
                t.parsing += t0.elapsed();
                match families {
                    Ok(f) => parsed.pages.push((slot, f)),
                    Err(e) => {
                        tracing::debug!("worker {slot} metrics skipped: {e}");
                        parsed.failed.push(slot);
                    }
                }
            }
            if !done {
                return (String::new(), t);
            }
            let t0 = Instant::now();
            let page = self.render(snap, parsed, sampled, format);
            t.rendering = t0.elapsed();
            page
        };
        let mut read = 0;
        self.recycle(
            cells.into_iter().filter_map(OnceCell::into_inner).inspect(|p| read += p.buf.capacity()),
        );
        if read >= BIG {
            crate::sys::release_free_memory();
        }
        (page, t)
    }

    fn render(&self, snap: &Snapshot, parsed: Parsed<'_>, sampled: Sampled, format: Format) -> String {
        let Parsed { pages: mut parsed, failed, body_bytes, .. } = parsed;
        let Sampled { usage, queues } = sampled;
        parsed.sort_by_key(|(slot, _)| *slot);
        // CPU and memory by slot, summed over the slot's processes (during a roll-out, its
        // old and new worker).
        let mut rss: BTreeMap<usize, u64> = BTreeMap::new();
        let mut ticks_now: Vec<(i32, usize, u64)> = Vec::new();
        for w in &snap.workers {
            if let Some(u) = w.pid.and_then(|pid| usage.get(&pid).map(|u| (pid, u))) {
                let (pid, u) = u;
                if u.processes == 0 {
                    continue;
                }
                *rss.entry(w.id).or_default() += u.rss_bytes;
                ticks_now.push((pid, w.id, u.ticks));
            }
        }
        let mut s = self.state();
        for slot in failed {
            *s.scrape_errors.entry(slot).or_default() += 1;
        }
        for (pid, slot, t) in &ticks_now {
            s.cpu_seen.insert(*pid, (*slot, *t));
        }
        let live: BTreeSet<i32> = snap.workers.iter().filter_map(|w| w.pid).collect();
        let gone: Vec<i32> = s.cpu_seen.keys().filter(|p| !live.contains(p)).copied().collect();
        for pid in gone {
            if let Some((slot, t)) = s.cpu_seen.remove(&pid) {
                *s.cpu_gone.entry(slot).or_default() += t;
            }
        }
        s.slots.extend(snap.workers.iter().map(|w| w.id));
        let slots: BTreeSet<usize> = s.slots.iter().copied().chain(0..snap.desired).collect();
        let ids: Vec<String> = slots.iter().map(|i| i.to_string()).collect();
        let own = self.own_families(&s, snap, &slots, &ids, &rss, &queues);
        drop(s);
        // (herdsman's names all start with `parse::RESERVED_PREFIX`: no worker's can.)
        let workers = parse::merge(parsed, format);
        // Workers' samples come out about as long as they came in, plus `,worker="ID"`.
        let samples: usize =
            workers.iter().flat_map(|f| std::iter::once(f).chain(&f.merged)).map(|f| f.samples.len()).sum();
        let mut out = String::with_capacity(16384 + body_bytes + samples * 16);
        model::render(&own, format, &mut out);
        model::render(&workers, format, &mut out);
        model::finish(format, &mut out);
        out
    }

    /// Up to `n` pooled read buffers (empty).
    fn buffers(&self, n: usize) -> Vec<Vec<u8>> {
        let mut pool = self.0.buffers.lock().unwrap_or_else(|p| p.into_inner());
        let keep = pool.len().saturating_sub(n);
        pool.split_off(keep)
    }

    /// Keeps the pages' buffers for the next scrape, within [`POOL_BYTES`].
    fn recycle(&self, pages: impl Iterator<Item = Page>) {
        let mut pool = self.0.buffers.lock().unwrap_or_else(|p| p.into_inner());
        let mut pooled: usize = pool.iter().map(Vec::capacity).sum();
        for mut buf in pages.map(|p| p.buf) {
            if buf.capacity() <= POOLED_MAX && pooled + buf.capacity() <= POOL_BYTES {
                pooled += buf.capacity();
                buf.clear();
                pool.push(buf);
            }
        }
    }

    /// herdsman's families: `slots` are every slot known, `ids` their labels.
    fn own_families<'a>(
        &'a self,
        s: &State,
        snap: &Snapshot,
        slots: &BTreeSet<usize>,
        ids: &'a [String],
        rss: &BTreeMap<usize, u64>,
        queues: &queue::Queues,
    ) -> Vec<Family<'a>> {
        let mut out = Vec::new();

        let mut f = Family::new("herdsman_build_info", Kind::Gauge, "herdsman's version (always 1).");
        f.push(&[("version", env!("CARGO_PKG_VERSION"))], 1.0);
        out.push(f);
        let mut f =
            Family::new("herdsman_generation", Kind::Gauge, "The generation new workers run (as in status).");
        f.push(&[], snap.generation as f64);
        out.push(f);
        let mut f = Family::new("herdsman_workers", Kind::Gauge, "Worker processes by state.");
        for state in ["starting", "ready", "draining"] {
            let n = snap
                .workers
                .iter()
                .filter(|w| w.pid.is_some() && gauge_state(w.state) == Some(state))
                .count();
            f.push(&[("state", state)], n as f64);
        }
        out.push(f);
        let mut f = Family::new("herdsman_desired_workers", Kind::Gauge, "The wanted number of workers.");
        f.push(&[], snap.desired as f64);
        out.push(f);

        let mut f = Family::new(
            "herdsman_worker_restarts",
            Kind::Counter,
            "Workers started in a slot after its worker exited unexpectedly.",
        );
        for (slot, id) in slots.iter().zip(ids) {
            f.push(&[("worker", id)], s.restarts.get(slot).copied().unwrap_or(0) as f64);
        }
        out.push(f);
        let mut f = Family::new("herdsman_worker_exits", Kind::Counter, "Worker exits by slot and reason.");
        for (slot, id) in slots.iter().zip(ids) {
            for r in Reason::ALL {
                let n = s.exits.get(&(*slot, r)).copied().unwrap_or(0);
                f.push(&[("worker", id), ("reason", r.label())], n as f64);
            }
        }
        out.push(f);
        let mut f = Family::new("herdsman_reloads", Kind::Counter, "Rolling reloads by result.");
        f.push(&[("result", "ok")], s.reloads[0] as f64);
        f.push(&[("result", "failed")], s.reloads[1] as f64);
        out.push(f);
        out.push(
            s.reload_seconds.family("herdsman_reload_duration_seconds", "Roll-out durations, start to end."),
        );
        out.push(
            s.start_seconds.family("herdsman_worker_start_seconds", "Worker start times, spawn to ready."),
        );

        let mut f = Family::new(
            "herdsman_worker_resident_memory_bytes",
            Kind::Gauge,
            "Resident memory of the slot's worker process(es).",
        );
        for (slot, id) in slots.iter().zip(ids) {
            f.push(&[("worker", id)], rss.get(slot).copied().unwrap_or(0) as f64);
        }
        out.push(f);
        let tps = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100) as f64;
        let mut f = Family::new(
            "herdsman_worker_cpu_seconds",
            Kind::Counter,
            "CPU time (user + system) used by the slot's worker processes.",
        );
        for (slot, id) in slots.iter().zip(ids) {
            let live: u64 = s.cpu_seen.values().filter(|(sl, _)| sl == slot).map(|(_, t)| t).sum();
            let total = live + s.cpu_gone.get(slot).copied().unwrap_or(0);
            f.push(&[("worker", id)], total as f64 / tps);
        }
        out.push(f);
        let mut f = Family::new(
            "herdsman_worker_scrape_errors",
            Kind::Counter,
            "Worker metrics pages skipped: no answer in time, too large, or not Prometheus text.",
        );
        for (slot, id) in slots.iter().zip(ids) {
            f.push(&[("worker", id)], s.scrape_errors.get(slot).copied().unwrap_or(0) as f64);
        }
        out.push(f);

        let mut len = Family::new(
            "herdsman_listen_queue_length",
            Kind::Gauge,
            "Connections waiting to be accepted on a listening socket.",
        );
        let mut limit =
            Family::new("herdsman_listen_queue_limit", Kind::Gauge, "A listening socket's backlog.");
        // Several sockets can share an address (steered sockets under systemd: a socket unit
        // with several `ListenStream=` lines for it): one series per address, summed.
        let mut by_name: Vec<(&str, f64, f64)> = Vec::new();
        for (name, fd) in &self.0.sockets {
            if let Some((l, m)) = queue::inode(fd).and_then(|i| queues.get(&i)) {
                match by_name.iter_mut().find(|(n, _, _)| n == name) {
                    Some(e) => {
                        e.1 += *l as f64;
                        e.2 += *m as f64;
                    }
                    None => by_name.push((name, *l as f64, *m as f64)),
                }
            }
        }
        for (name, l, m) in by_name {
            len.push(&[("socket", name)], l);
            limit.push(&[("socket", name)], m);
        }
        out.push(len);
        out.push(limit);
        out
    }
}

impl Metrics {
    /// herdsman is exiting (its workers are gone): removes their socket files and the
    /// `metrics-uUID/` directories (see `remove_stale`). Also done when the last handle goes.
    pub fn remove_files(&self) {
        remove_files(self.0.dir.as_deref(), &mut self.state().sockets);
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let s = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        remove_files(self.dir.as_deref(), &mut s.sockets);
    }
}

/// See [`Metrics::remove_files`].
fn remove_files(dir: Option<&Path>, sockets: &mut HashMap<i32, (usize, PathBuf)>) {
    for (_, (_, path)) in sockets.drain() {
        let _ = std::fs::remove_file(path);
    }
    if let Some(d) = dir {
        remove_stale(d, true);
    }
}

/// Creates `d` (herdsman's, group `gid`, 0770) for workers of another user.
fn user_dir(d: &Path, gid: u32) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    match std::fs::DirBuilder::new().mode(0o770).create(d) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let m = std::fs::symlink_metadata(d)?;
    if !m.is_dir() {
        return Err(std::io::Error::other("not a directory"));
    }
    if m.uid() != nix::unistd::geteuid().as_raw() {
        return Err(std::io::Error::other(format!("owned by uid {}, not herdsman", m.uid())));
    }
    if m.gid() != gid {
        std::os::unix::fs::lchown(d, None, Some(gid))?;
    }
    if m.permissions().mode() & 0o7777 != 0o770 {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o770))?;
    }
    Ok(())
}

/// Removes worker sockets left by supervisors that are gone (ours too, if our pid was
/// reused) from herdsman's runtime directory `dir`, and everything but live supervisors'
/// sockets from each `metrics-uUID/` in it. Nothing is followed: a worker may put anything in
/// its `metrics-uUID/`, and a symbolic link there (to `.`, to a root-only directory) must
/// neither be walked into nor have what it points to removed. Only `dir` and one level of
/// real directories named `metrics-u<digits>` that herdsman owns are read; entries are told
/// apart by `DirEntry::file_type` (never follows) and removing one removes only the name.
/// `exiting`: herdsman is about to exit, so the `metrics-uUID/` directories go too (when
/// nothing of another supervisor sharing `dir` is left in them).
fn remove_stale(dir: &Path, exiting: bool) {
    use std::os::unix::fs::MetadataExt;
    let euid = nix::unistd::geteuid().as_raw();
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let (Ok(ty), Some(name)) = (e.file_type(), e.file_name().to_str().map(str::to_owned)) else {
            continue;
        };
        if ty.is_dir() {
            // (`DirEntry::metadata` does not follow links either.)
            if user_dir_uid(&name).is_some() && e.metadata().is_ok_and(|m| m.uid() == euid) {
                remove_stale_in(&e.path());
                if exiting {
                    let _ = std::fs::remove_dir(e.path());
                }
            }
            continue;
        }
        use std::os::unix::fs::FileTypeExt;
        // (Only worker sockets: the control socket and the notify sockets live here too.)
        if ty.is_socket() && name.ends_with(".sock") && stale(&name) == Some(true) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// In a `metrics-uUID/`: removes every entry but directories and live supervisors' sockets.
fn remove_stale_in(dir: &Path) {
    use std::os::unix::fs::FileTypeExt;
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let Ok(ty) = e.file_type() else { continue };
        let name = e.file_name();
        let live =
            ty.is_socket() && name.to_str().is_some_and(|n| n.ends_with(".sock") && stale(n) == Some(false));
        if !ty.is_dir() && !live {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Whether the worker socket name `metrics-PID-...` is not (any more) a live supervisor's:
/// its supervisor is gone, or it is ours from an earlier life of our pid (or herdsman is
/// exiting). `None`: not a worker socket's name.
fn stale(name: &str) -> Option<bool> {
    let pid: i32 = name.strip_prefix("metrics-")?.split('-').next()?.parse().ok()?;
    Some(
        pid <= 0
            || pid == std::process::id() as i32
            || matches!(
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
                Err(nix::errno::Errno::ESRCH)
            ),
    )
}

#[derive(Debug, thiserror::Error)]
enum Fetch {
    #[error("no answer within {WORKER_TIMEOUT:?}")]
    Timeout,
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("page larger than {WORKER_MAX_BYTES} bytes")]
    TooLarge,
    #[error("bad HTTP answer: {0}")]
    Http(&'static str),
    #[error("the workers' part of the page would exceed {WORKERS_MAX_RENDERED} bytes")]
    OverBudget,
}

/// `GET /metrics` over the worker's unix socket; the body of a 200 answer.
/// `buf`: an empty buffer to read into (a pooled one, or new).
/// `euid`: herdsman's (see [`connect`]).
async fn fetch(path: &Path, euid: u32, mut buf: Vec<u8>) -> Result<Page, Fetch> {
    let mut s = connect(path, euid).await?;
    s.write_all(
        b"GET /metrics HTTP/1.1\r\nHost: herdsman\r\nAccept: text/plain;version=0.0.4\r\nConnection: close\r\n\r\n",
    )
    .await?;
    // Read straight into the page's buffer (one read for a page that fits), doubling it
    // as needed.
    buf.reserve(FIRST_READ);
    let mut end = http::ResponseEnd::default();
    loop {
        if buf.capacity() - buf.len() < FIRST_READ / 2 {
            buf.reserve(buf.capacity());
        }
        let n = s.read_buf(&mut buf).await?;
        if n == 0 {
            break;
        }
        if buf.len() > WORKER_MAX_BYTES + 16 * 1024 {
            return Err(Fetch::TooLarge);
        }
        if let Some(done) = end.feed(&buf) {
            buf.truncate(done);
            break;
        }
    }
    let page = match http::body(&buf).map_err(Fetch::Http)? {
        http::Body::At(body) => Page { buf, body },
        http::Body::Dechunked(data) => Page { body: 0..data.len(), buf: data },
    };
    if page.body.len() > WORKER_MAX_BYTES {
        return Err(Fetch::TooLarge);
    }
    Ok(page)
}

/// What the loop hands the scrape's blocking task: a worker's page (or why there is none),
/// then `Done` once every fetch has ended.
enum Fetched {
    Page(usize, Result<Page, String>),
    Done,
}

/// What a scrape samples besides the pages: usage by process group leader, listen queues.
struct Sampled {
    usage: HashMap<i32, crate::procstat::Usage>,
    queues: queue::Queues,
}

/// The pages parsed so far: families by slot, the slots whose page was skipped, and the
/// accepted pages' size (to size the output).
struct Parsed<'a> {
    pages: Vec<(usize, Vec<Family<'a>>)>,
    failed: Vec<usize>,
    body_bytes: usize,
    /// What the accepted pages render to at most (see [`rendered_bound`]).
    rendered_bound: usize,
}

/// At most what a worker page of `body` bytes parsed into `families` renders to: no sample
/// line grows by more than [`SAMPLE_GROWTH`] (`_total`, braces, `exported_`, `,worker="ID"`; timestamps and
/// spaces go, label escapes come out as they went in), a HELP text at most doubles (an
/// OpenMetrics `\"`), and a family may get HELP and TYPE lines its page did not have.
fn rendered_bound(body: usize, families: &[Family<'_>]) -> usize {
    families.iter().fold(body, |b, f| {
        b.saturating_add(f.samples.len().saturating_mul(SAMPLE_GROWTH))
            .saturating_add(f.help.len())
            .saturating_add(2 * f.name.len() + 48)
    })
}

/// See [`rendered_bound`].
const SAMPLE_GROWTH: usize = 48;

/// Where a scrape's blocking task spent its time (for the debug log): sampling is measured
/// from the scrape's start.
#[derive(Default)]
struct Timings {
    sampling: Duration,
    parsing: Duration,
    rendering: Duration,
}

/// The first read's size: most pages (and their HTTP head) fit.
const FIRST_READ: usize = 16 * 1024;
/// Read buffers up to this size are kept for the next scrape, up to [`POOL_BYTES`] in all: a
/// new buffer for each of 64 pages per scrape costs more in page faults (the freed memory
/// goes back to the kernel between scrapes) than parsing them does.
const POOLED_MAX: usize = 64 * 1024;
const POOL_BYTES: usize = 2 << 20;

/// A worker's answer and where its body is in it.
struct Page {
    buf: Vec<u8>,
    body: std::ops::Range<usize>,
}

impl Page {
    fn body(&self) -> &[u8] {
        &self.buf[self.body.clone()]
    }
}

/// The uid a worker's socket must belong to: [`Metrics::socket_for`] puts the sockets of a
/// worker running as another user in `metrics-uUID/`, the others next to it (herdsman's).
fn socket_owner(path: &Path, euid: u32) -> u32 {
    let dir = path.parent().and_then(Path::file_name).and_then(|n| n.to_str());
    dir.and_then(user_dir_uid).unwrap_or(euid)
}

/// `metrics-uUID` → UID.
fn user_dir_uid(name: &str) -> Option<u32> {
    let digits = name.strip_prefix("metrics-u")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Opens a worker's metrics socket file (`O_PATH`) without following anything a worker could
/// have put in its way: herdsman's runtime directory is opened as configured, then
/// `metrics-uUID/` (writable by the worker's group) and the socket name without following a
/// symbolic link (each relative to the directory opened before it: through
/// `/proc/self/fd/N/`, what `openat` does). The directory must be herdsman's, the socket a
/// socket owned by the worker's uid: a link or hard link to another socket (a root-only
/// one, say) is refused, never connected to as root.
fn open_socket(path: &Path, euid: u32) -> std::io::Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
    let bad = |what: &str| std::io::Error::other(format!("{}: {what}", path.display()));
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(bad("not a socket path"));
    };
    let open = |p: &Path, flags: i32| {
        std::fs::OpenOptions::new().read(true).custom_flags(flags | libc::O_NOFOLLOW).open(p)
    };
    let within = |d: &std::fs::File, name: &std::ffi::OsStr| {
        let mut p = PathBuf::from(format!("/proc/self/fd/{}", d.as_raw_fd()));
        p.push(name);
        p
    };
    let owner = socket_owner(path, euid);
    let dir = match (dir.parent(), dir.file_name()) {
        (Some(base), Some(sub)) if owner != euid => {
            let base = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECTORY).open(base)?;
            let d = open(&within(&base, sub), libc::O_DIRECTORY)
                .map_err(|e| bad(&format!("its directory is not a directory ({e})")))?;
            let m = d.metadata()?;
            if m.uid() != euid || m.mode() & 0o002 != 0 {
                return Err(bad("its directory is not herdsman's"));
            }
            d
        }
        _ => std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECTORY).open(dir)?,
    };
    let sock = open(&within(&dir, name), libc::O_PATH).map_err(|e| match e.raw_os_error() {
        Some(libc::ELOOP) => bad("a symbolic link, not the worker's socket"),
        _ => e,
    })?;
    let m = sock.metadata()?;
    if !m.file_type().is_socket() {
        return Err(bad("not a socket"));
    }
    if m.uid() != owner {
        return Err(bad(&format!("owned by uid {}, not the worker's {owner}", m.uid())));
    }
    Ok(sock)
}

/// Connects to a worker's metrics socket, opened by [`open_socket`], through
/// `/proc/self/fd/N` (the very file checked). A worker of another user may have made its
/// socket 0750 (a UMask): herdsman keeps CAP_CHOWN for this, takes that file for the
/// connect (`fchownat` on the descriptor) and gives it back.
async fn connect(path: &Path, euid: u32) -> std::io::Result<tokio::net::UnixStream> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;
    let sock = open_socket(path, euid)?;
    let at = format!("/proc/self/fd/{}", sock.as_raw_fd());
    match tokio::net::UnixStream::connect(&at).await {
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            let owner = sock.metadata()?.uid();
            let chown = |uid: u32| {
                nix::unistd::fchownat(
                    Some(sock.as_raw_fd()),
                    "",
                    Some(nix::unistd::Uid::from_raw(uid)),
                    None,
                    nix::fcntl::AtFlags::AT_EMPTY_PATH,
                )
                .map_err(std::io::Error::from)
            };
            chown(euid)?;
            let s = tokio::net::UnixStream::connect(&at).await;
            chown(owner)?;
            s
        }
        r => r,
    }
}

#[cfg(test)]
mod limit_tests {
    use super::*;

    /// The budget of the workers' part of a page holds only if [`rendered_bound`] is one:
    /// pages that grow the most when rendered stay within it, in both formats.
    #[test]
    fn the_rendered_bound_is_an_upper_bound() {
        let pages: [&[u8]; 5] = [
            b"# TYPE c counter\nc 1\nc 2\nc 3\n",
            b"# TYPE e counter\ne{worker=\"\"} 1\ne{worker=\"\"} 2\n",
            b"a 1\nb 1\nc 1\nd{x=\"1\"} 2 1700000000000\n",
            b"# HELP h \"\"\"\"\"\"\"\" \\x \\x\n# TYPE h gauge\nh{ a = \"\\\"\" , worker=\"w\" } 1e300\n",
            b"# TYPE s summary\ns{quantile=\"0.5\"} 1\ns_sum 2\ns_count 3\n# TYPE k histogram\nk_bucket{le=\"+Inf\"} 1\nk_sum 1\nk_count 1\n",
        ];
        for format in [Format::Text, Format::OpenMetrics] {
            let parsed: Vec<(usize, Vec<Family<'_>>)> =
                pages.iter().map(|p| (usize::MAX, parse::parse(p).unwrap())).collect();
            let bound: usize = pages.iter().zip(&parsed).map(|(p, (_, f))| rendered_bound(p.len(), f)).sum();
            let merged = parse::merge(parsed, format);
            let mut out = String::new();
            model::render(&merged, format, &mut out);
            assert!(out.len() <= bound, "{} > {bound}:\n{out}", out.len());
        }
    }

    #[test]
    fn pages_over_the_series_or_family_cap_are_rejected() {
        let many = "x 1\n".repeat(11);
        assert!(parse::parse_capped(many.as_bytes(), 5, 10).is_err());
        assert!(parse::parse_capped(many.as_bytes(), 5, 11).is_ok());
        let families: String = (0..6).map(|i| format!("f{i} 1\n")).collect();
        assert!(parse::parse_capped(families.as_bytes(), 5, 100).is_err());
        assert!(parse::parse_capped(families.as_bytes(), 6, 100).is_ok());
    }
}
