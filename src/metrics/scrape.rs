//! A scrape ([`Metrics::collect`]): the snapshot from the loop, every ready worker's page
//! fetched over its socket (bounded in time and size, buffers pooled), `/proc` and the listen
//! queues sampled meanwhile, then the pages parsed, merged and rendered on one blocking thread.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

use super::sockets::connect;
use super::*;

impl Metrics {
    /// The page: herdsman's families, then the workers'. Asks the loop for a snapshot
    /// through `controls`; everything else happens outside the loop.
    pub(crate) async fn collect(
        &self,
        controls: &mpsc::Sender<Control>,
        format: Format,
    ) -> Result<String, String> {
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
pub(super) fn rendered_bound(body: usize, families: &[Family<'_>]) -> usize {
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
