//! The `GET /metrics` endpoint (`--metrics ADDR`); the little HTTP/1.1 both sides need is [`wire`].
//! The same address answers an orchestrator's probes, `GET /ready` and `GET /live` (see
//! [`probe`]): a Kubernetes readiness/liveness probe needs no other port.
//!
//! Why no HTTP crate: herdsman answers exactly one request per connection (`GET /metrics`,
//! `Connection: close`) and reads exactly one answer from each worker; an HTTP crate (hyper,
//! or axum on top of it) would bring its own dependency tree for that. The request
//! head parser and the response body reader here are pure functions over bytes, bounded,
//! and fuzzed in `tests/fuzz.rs`.
//!
//! What a scraper can make herdsman spend is bounded (issue 22): [`MAX_CONNECTIONS`] open
//! connections, idle ones evicted oldest first for new ones; one page built per format at a
//! time and shared for [`FRESH`] by every request; one [`SCRAPE_DEADLINE`] on waiting for it
//! and building it; a client that stops taking its answer is dropped after 5 s.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Mutex, mpsc};
use tokio::task::AbortHandle;

use super::Metrics;
use super::model::Format;
use crate::config::ListenAddr;
use crate::requests::Control;

#[cfg(test)]
mod tests;
pub(crate) mod wire;

pub use wire::{Body, LIVE_DEADLINE, Probe, ResponseEnd, body, parse_request};
use wire::{head_ends, head_of, reason, response};

/// Longest request head accepted.
pub(crate) const MAX_HEAD: usize = 8 * 1024;
/// A client must send its request within this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// A client must take the page within this.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// A client that takes none of its answer for this long is dropped (and with it its share
/// of the page).
const STALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections open at once. When full, a new connection evicts the oldest one that has not
/// sent its request yet; while every one has, new ones wait in the listen queue.
pub(crate) const MAX_CONNECTIONS: usize = 256;
/// One deadline on waiting for the page and building it; `503` after it.
pub(crate) const SCRAPE_DEADLINE: Duration = Duration::from_secs(10);
/// Requests that come within this of a page's build get that page (one page per scrape
/// interval, whatever the number of scrapers).
pub(crate) const FRESH: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub(crate) enum BindError {
    #[error(
        "cannot bind the metrics address {addr}: {err}; choose another --metrics address or stop whatever uses it"
    )]
    Bind { addr: String, err: std::io::Error },
}

/// A bound metrics endpoint, not serving yet.
pub(crate) enum Bound {
    Tcp(std::net::TcpListener, String),
    Unix(std::os::unix::net::UnixListener, std::path::PathBuf),
}

impl Bound {
    pub(crate) fn address(&self) -> String {
        match self {
            Bound::Tcp(_, a) => a.clone(),
            Bound::Unix(_, p) => format!("unix:{}", p.display()),
        }
    }
}

impl Bound {
    /// A copy of the listening socket, to hand over in an in-place upgrade.
    pub(crate) fn carry(
        &self,
    ) -> std::io::Result<(std::os::fd::OwnedFd, Option<std::path::PathBuf>, String)> {
        Ok(match self {
            Bound::Tcp(l, a) => (l.try_clone()?.into(), None, a.clone()),
            Bound::Unix(l, p) => (l.try_clone()?.into(), Some(p.clone()), self.address()),
        })
    }

    /// The endpoint a previous image handed over.
    pub(crate) fn adopt(
        fd: std::os::fd::OwnedFd,
        unix: Option<std::path::PathBuf>,
        address: String,
    ) -> std::io::Result<Bound> {
        Ok(match unix {
            Some(p) => {
                let l = std::os::unix::net::UnixListener::from(fd);
                l.set_nonblocking(true)?;
                Bound::Unix(l, p)
            }
            None => {
                let l = std::net::TcpListener::from(fd);
                l.set_nonblocking(true)?;
                Bound::Tcp(l, address)
            }
        })
    }
}

impl Drop for Bound {
    fn drop(&mut self) {
        if let Bound::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Binds `addr` (before the event loop starts, so a bad one fails the start).
pub(crate) fn bind(addr: &ListenAddr) -> Result<Bound, BindError> {
    let fail = |err| BindError::Bind { addr: addr.to_string(), err };
    match addr {
        ListenAddr::AnyAddress(port) => {
            // Every address: dual-stack [::] where the system has IPv6, else 0.0.0.0.
            let l = std::net::TcpListener::bind(("::", *port))
                .or_else(|_| std::net::TcpListener::bind(("0.0.0.0", *port)))
                .map_err(fail)?;
            l.set_nonblocking(true).map_err(fail)?;
            let a = l.local_addr().map(|a| a.to_string()).unwrap_or_else(|_| format!(":{port}"));
            Ok(Bound::Tcp(l, a))
        }
        ListenAddr::Tcp(sa) => {
            let l = std::net::TcpListener::bind(sa).map_err(fail)?;
            l.set_nonblocking(true).map_err(fail)?;
            let a = l.local_addr().map(|a| a.to_string()).unwrap_or_else(|_| sa.to_string());
            Ok(Bound::Tcp(l, a))
        }
        ListenAddr::Unix(p) => {
            use std::os::unix::fs::FileTypeExt;
            let stale = std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket())
                && std::os::unix::net::UnixStream::connect(p).is_err();
            if stale {
                let _ = std::fs::remove_file(p);
            }
            let l = std::os::unix::net::UnixListener::bind(p).map_err(fail)?;
            l.set_nonblocking(true).map_err(fail)?;
            Ok(Bound::Unix(l, p.clone()))
        }
    }
}

/// Serves `bound` until the runtime ends. Each connection is its own task.
pub(crate) fn serve(bound: &Bound, metrics: Metrics, controls: mpsc::Sender<Control>) -> std::io::Result<()> {
    metrics.set_address(bound.address());
    let shared = Shared {
        metrics,
        controls,
        pages: Arc::new([Arc::new(Mutex::new(None)), Arc::new(Mutex::new(None))]),
        conns: Arc::new(std::sync::Mutex::new(Conns::default())),
        room: Arc::new(tokio::sync::Notify::new()),
    };
    match bound {
        Bound::Tcp(l, _) => {
            let l = tokio::net::TcpListener::from_std(l.try_clone()?)?;
            tokio::spawn(async move {
                loop {
                    shared.room().await;
                    match l.accept().await {
                        Ok((s, _)) => {
                            let _ = s.set_nodelay(true);
                            shared.connection(s);
                        }
                        Err(e) => accept_failed(e).await,
                    }
                }
            });
        }
        Bound::Unix(l, _) => {
            let l = tokio::net::UnixListener::from_std(l.try_clone()?)?;
            tokio::spawn(async move {
                loop {
                    shared.room().await;
                    match l.accept().await {
                        Ok((s, _)) => shared.connection(s),
                        Err(e) => accept_failed(e).await,
                    }
                }
            });
        }
    }
    Ok(())
}

async fn accept_failed(e: std::io::Error) {
    tracing::warn!("metrics endpoint accept: {e}");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// A built page (or why there is none), shared by every request that came while it was
/// built or within [`FRESH`] of it.
type Page = Arc<Built>;

struct Built {
    at: Instant,
    page: Result<String, String>,
}

impl Drop for Built {
    fn drop(&mut self) {
        // Give a big page's memory back to the system now, not at some later allocation.
        if let Ok(p) = &mut self.page {
            if p.capacity() >= crate::metrics::BIG {
                drop(std::mem::take(p));
                crate::sys::release_free_memory();
            }
        }
    }
}

/// The latest page of one format.
type Slot = Arc<Mutex<Option<Page>>>;

/// What the endpoint's connections share.
#[derive(Clone)]
struct Shared {
    metrics: Metrics,
    controls: mpsc::Sender<Control>,
    /// By format: text, OpenMetrics.
    pages: Arc<[Slot; 2]>,
    conns: Arc<std::sync::Mutex<Conns>>,
    /// Told when a connection ends.
    room: Arc<tokio::sync::Notify>,
}

/// The open connections: those still to send their request, oldest first (evictable), and
/// those that did.
#[derive(Default)]
struct Conns {
    next: u64,
    waiting: BTreeMap<u64, AbortHandle>,
    served: HashSet<u64>,
}

impl Conns {
    fn open(&self) -> usize {
        self.waiting.len() + self.served.len()
    }
}

/// A connection's place in [`Conns`], given up when its task ends (or is aborted).
struct Registered {
    id: u64,
    conns: Arc<std::sync::Mutex<Conns>>,
    room: Arc<tokio::sync::Notify>,
}

impl Registered {
    /// The request is in: no longer evictable. `false`: it was evicted meanwhile.
    fn requested(&self) -> bool {
        let mut c = lock(&self.conns);
        if c.waiting.remove(&self.id).is_some() {
            c.served.insert(self.id);
            true
        } else {
            false
        }
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        let mut c = lock(&self.conns);
        c.waiting.remove(&self.id);
        c.served.remove(&self.id);
        drop(c);
        self.room.notify_one();
    }
}

fn lock(m: &std::sync::Mutex<Conns>) -> std::sync::MutexGuard<'_, Conns> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    /// Returns once a new connection can be taken: while every one of [`MAX_CONNECTIONS`]
    /// has sent its request (each ends within [`SCRAPE_DEADLINE`] and the write timeouts),
    /// new ones wait in the listen queue, costing no descriptor.
    async fn room(&self) {
        loop {
            let notified = self.room.notified();
            {
                let c = lock(&self.conns);
                if c.open() < MAX_CONNECTIONS || !c.waiting.is_empty() {
                    return;
                }
            }
            notified.await;
        }
    }

    /// Takes a new connection: within [`MAX_CONNECTIONS`], evicting the oldest that has not
    /// sent its request (closed if every open one has, which [`Shared::room`] makes rare).
    fn connection<S>(&self, s: S)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let mut c = lock(&self.conns);
        if c.open() >= MAX_CONNECTIONS {
            match c.waiting.pop_first() {
                Some((_, oldest)) => {
                    // (Its task ends, and closes its socket, when the runtime next runs it.)
                    drop(c);
                    oldest.abort();
                    c = lock(&self.conns);
                }
                None => {
                    drop(c);
                    tracing::debug!(
                        "metrics endpoint: {MAX_CONNECTIONS} requests in progress; connection closed"
                    );
                    return;
                }
            }
        }
        let id = c.next;
        c.next += 1;
        let me = self.clone();
        let reg = Registered { id, conns: self.conns.clone(), room: self.room.clone() };
        let task = tokio::spawn(async move { me.serve_one(s, reg).await });
        c.waiting.insert(id, task.abort_handle());
    }

    async fn serve_one<S>(self, mut s: S, reg: Registered)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        // The head, and the page after it (written as is, not copied behind the head).
        let (answer, page) = match tokio::time::timeout(REQUEST_TIMEOUT, read_head(&mut s)).await {
            Err(_) => (response(408, "text/plain", b"request timeout\n"), None),
            Ok(Err(_)) => return,
            Ok(Ok(head)) => match parse_request(&head) {
                Err(code) => (response(code, "text/plain", reason(code).as_bytes()), None),
                Ok(req) => {
                    if !reg.requested() {
                        return;
                    }
                    if let Some(p) = req.probe {
                        let (code, body) = probe(p, &self.controls).await;
                        let mut answer = response(code, "text/plain", body.as_bytes());
                        if req.head {
                            answer.truncate(answer.len() - body.len());
                        }
                        let _ = tokio::time::timeout(WRITE_TIMEOUT, async {
                            let _ = write_all(&mut s, &answer).await;
                            let _ = s.shutdown().await;
                        })
                        .await;
                        return;
                    }
                    let format = Format::from_accept(req.accept.as_deref());
                    match tokio::time::timeout(SCRAPE_DEADLINE, self.page(format)).await {
                        Ok(built) => match &built.page {
                            Ok(p) => {
                                let head = head_of(200, format.content_type(), p.len());
                                (head, (!req.head).then_some(built.clone()))
                            }
                            Err(e) => (response(503, "text/plain", format!("{e}\n").as_bytes()), None),
                        },
                        Err(_) => {
                            let e = format!("no page within {} s\n", SCRAPE_DEADLINE.as_secs());
                            (response(503, "text/plain", e.as_bytes()), None)
                        }
                    }
                }
            },
        };
        let _ = tokio::time::timeout(WRITE_TIMEOUT, async {
            if write_all(&mut s, &answer).await.is_ok() {
                if let Some(Ok(p)) = page.as_deref().map(|b| &b.page) {
                    let _ = write_all(&mut s, p.as_bytes()).await;
                }
            }
            let _ = s.shutdown().await;
        })
        .await;
    }

    /// The page in `format`: the one built within [`FRESH`], or a new one. One build at a
    /// time per format; requests that come during it wait for it and share it. The build is
    /// its own task, so it ends (and serves those waiting) even if its requester gives up.
    async fn page(&self, format: Format) -> Page {
        let slot = self.pages[usize::from(format == Format::OpenMetrics)].clone();
        let mut latest = slot.clone().lock_owned().await;
        if let Some(p) = latest.as_ref().filter(|p| p.at.elapsed() < FRESH) {
            return p.clone();
        }
        // The old page goes before the new one is built.
        *latest = None;
        let (metrics, controls) = (self.metrics.clone(), self.controls.clone());
        let build = tokio::spawn(async move {
            let page = metrics.collect(&controls, format).await;
            let built = Arc::new(Built { at: Instant::now(), page });
            *latest = Some(built.clone());
            drop(latest);
            // Not kept past its time: a big page's memory goes once its readers are done.
            let weak = Arc::downgrade(&built);
            tokio::spawn(async move {
                tokio::time::sleep(FRESH).await;
                let mut latest = slot.lock().await;
                if latest.as_ref().is_some_and(|p| std::ptr::eq(Arc::as_ptr(p), weak.as_ptr())) {
                    *latest = None;
                }
            });
            built
        });
        match build.await {
            Ok(p) => p,
            Err(e) => Arc::new(Built { at: Instant::now(), page: Err(format!("rendering failed: {e}")) }),
        }
    }
}

/// Answers a probe: asks the supervisor loop, which answers at once unless it is wedged.
/// `/live` is 200 when it answered within [`LIVE_DEADLINE`]; `/ready` is 200 when it
/// answered in time *and* said every slot has a ready worker and no stop is in progress.
/// Bodies are one short line.
pub(crate) async fn probe(p: Probe, controls: &mpsc::Sender<Control>) -> (u16, &'static str) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let asked = tokio::time::timeout(LIVE_DEADLINE, async {
        controls.send(Control::Probe { reply: tx }).await.ok()?;
        rx.await.ok()
    })
    .await;
    match (p, asked) {
        (_, Err(_) | Ok(None)) => (503, "the supervisor loop did not answer within 2 s\n"),
        (Probe::Live, Ok(Some(_))) => (200, "live\n"),
        (Probe::Ready, Ok(Some(true))) => (200, "ready\n"),
        (Probe::Ready, Ok(Some(false))) => (503, "not ready\n"),
    }
}

/// Writes all of `b`, giving up when the client takes nothing for [`STALL_TIMEOUT`].
async fn write_all<S: tokio::io::AsyncWrite + Unpin>(s: &mut S, mut b: &[u8]) -> std::io::Result<()> {
    while !b.is_empty() {
        let n = tokio::time::timeout(STALL_TIMEOUT, s.write(b))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        b = &b[n..];
    }
    Ok(())
}

async fn read_head<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::new();
    let mut buf = [0u8; 2048];
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            return Ok(head);
        }
        // Only the new bytes (and the three before them) can complete the end of the head.
        let from = head.len().saturating_sub(3);
        head.extend_from_slice(&buf[..n]);
        if head_ends(&head[from..]) {
            return Ok(head);
        }
        if head.len() > MAX_HEAD {
            return Ok(head);
        }
    }
}
