//! The `GET /metrics` endpoint (`--metrics ADDR`) and the little HTTP/1.1 both sides need.
//! The same address answers an orchestrator's probes, `GET /ready` and `GET /live` (see
//! [`probe`]): a Kubernetes readiness/liveness probe needs no other port.
//!
//! Why no HTTP crate: herdsman answers exactly one request per connection (`GET /metrics`,
//! `Connection: close`) and reads exactly one answer from each worker; hyper (or axum on
//! top of it) would be most of the binary and of its dependency tree for that. The request
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

/// Longest request head accepted.
pub const MAX_HEAD: usize = 8 * 1024;
/// A client must send its request within this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// A client must take the page within this.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// A client that takes none of its answer for this long is dropped (and with it its share
/// of the page).
const STALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections open at once. When full, a new connection evicts the oldest one that has not
/// sent its request yet; while every one has, new ones wait in the listen queue.
pub const MAX_CONNECTIONS: usize = 256;
/// One deadline on waiting for the page and building it; `503` after it.
pub const SCRAPE_DEADLINE: Duration = Duration::from_secs(10);
/// Requests that come within this of a page's build get that page (one page per scrape
/// interval, whatever the number of scrapers).
pub const FRESH: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error(
        "cannot bind the metrics address {addr}: {err}; choose another --metrics address or stop whatever uses it"
    )]
    Bind { addr: String, err: std::io::Error },
}

/// A bound metrics endpoint, not serving yet.
pub enum Bound {
    Tcp(std::net::TcpListener, String),
    Unix(std::os::unix::net::UnixListener, std::path::PathBuf),
}

impl Bound {
    pub fn address(&self) -> String {
        match self {
            Bound::Tcp(_, a) => a.clone(),
            Bound::Unix(_, p) => format!("unix:{}", p.display()),
        }
    }
}

impl Bound {
    /// A copy of the listening socket, to hand over in an in-place upgrade.
    pub fn carry(&self) -> std::io::Result<(std::os::fd::OwnedFd, Option<std::path::PathBuf>, String)> {
        Ok(match self {
            Bound::Tcp(l, a) => (l.try_clone()?.into(), None, a.clone()),
            Bound::Unix(l, p) => (l.try_clone()?.into(), Some(p.clone()), self.address()),
        })
    }

    /// The endpoint a previous image handed over.
    pub fn adopt(
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
pub fn bind(addr: &ListenAddr) -> Result<Bound, BindError> {
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
pub fn serve(bound: &Bound, metrics: Metrics, controls: mpsc::Sender<Control>) -> std::io::Result<()> {
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
pub async fn probe(p: Probe, controls: &mpsc::Sender<Control>) -> (u16, &'static str) {
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

/// Whether `b` has the empty line that ends a request head.
fn head_ends(b: &[u8]) -> bool {
    b.windows(4).any(|w| w == b"\r\n\r\n") || b.windows(2).any(|w| w == b"\n\n")
}

fn reason(code: u16) -> &'static str {
    match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

/// A response's head, for a body of `len` bytes.
fn head_of(code: u16, ctype: &str, len: usize) -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.1 {code} {}\r\nContent-Type: {ctype}\r\nContent-Length: {len}\r\nConnection: close\r\n",
        reason(code),
    );
    if code == 405 {
        r.push_str("Allow: GET, HEAD\r\n");
    }
    r.push_str("\r\n");
    r.into_bytes()
}

fn response(code: u16, ctype: &str, body: &[u8]) -> Vec<u8> {
    let mut out = head_of(code, ctype, body.len());
    out.extend_from_slice(body);
    out
}

/// A request the endpoint answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub head: bool,
    pub accept: Option<String>,
    /// `GET /ready` or `GET /live` (an orchestrator's probe); `None`: the metrics page.
    pub probe: Option<Probe>,
}

/// The orchestrator probes served next to the metrics page (see [`probe`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// `200` when every slot has a ready worker and no stop is in progress, else `503`.
    Ready,
    /// `200` when the supervisor loop answered within [`LIVE_DEADLINE`], else `503`.
    Live,
}

/// `GET /live` fails when the supervisor loop has not answered within this (a wedged loop).
pub const LIVE_DEADLINE: Duration = Duration::from_secs(2);

/// Parses a request head: `GET /metrics` (or `HEAD`, or `/`), else the status code to answer.
pub fn parse_request(head: &[u8]) -> Result<Request, u16> {
    if head.len() > MAX_HEAD {
        return Err(431);
    }
    let text = std::str::from_utf8(head).map_err(|_| 400u16)?;
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let first = lines.next().ok_or(400u16)?;
    let mut parts = first.split(' ');
    let (method, target, version) = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(m), Some(t), Some(v), None) => (m, t, v),
        _ => return Err(400),
    };
    if !version.starts_with("HTTP/1.") {
        return Err(400);
    }
    let mut accept = None;
    for l in lines {
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':').ok_or(400u16)?;
        if k.trim().eq_ignore_ascii_case("accept") {
            accept = Some(v.trim().to_string());
        }
    }
    let probe = match target.split('?').next().unwrap_or("") {
        "/metrics" | "/" => None,
        "/ready" => Some(Probe::Ready),
        "/live" => Some(Probe::Live),
        _ => return Err(404),
    };
    match method {
        "GET" => Ok(Request { head: false, accept, probe }),
        "HEAD" => Ok(Request { head: true, accept, probe }),
        _ => Err(405),
    }
}

/// The length of a complete response in `buf` when it says how long it is (Content-Length,
/// or a finished chunked body); `None`: read on (until the server closes).
pub fn complete_response(buf: &[u8]) -> Option<usize> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = std::str::from_utf8(&buf[..end]).ok()?;
    for l in head.split("\r\n") {
        if let Some((k, v)) = l.split_once(':') {
            if k.trim().eq_ignore_ascii_case("content-length") {
                let n: usize = v.trim().parse().ok()?;
                return (buf.len() >= end + n).then_some(end + n);
            }
        }
    }
    if chunked(head) { dechunk(&buf[end..]).map(|(_, used)| end + used) } else { None }
}

/// Where a response being read ends, found as its bytes come in: each byte is looked at a
/// bounded number of times however the answer is split into reads (a worker dripping its
/// page a few bytes at a time once made every read rescan, and copy, all that came before).
#[derive(Debug, Default)]
pub struct ResponseEnd {
    state: EndState,
    /// Bytes already looked at for the line or head end being searched.
    scanned: usize,
}

#[derive(Debug, Default)]
enum EndState {
    /// Looking for the end of the head.
    #[default]
    Head,
    /// Ends at this length.
    Length(usize),
    /// Until the server closes.
    Close,
    /// A chunk-size line starts at `at`.
    ChunkSize { at: usize },
    /// The line after the last chunk starts at `at`.
    Trailer { at: usize },
}

impl ResponseEnd {
    /// `buf`: everything read so far (the same buffer, grown). The length of the complete
    /// response once it is there, as [`complete_response`] would say.
    pub fn feed(&mut self, buf: &[u8]) -> Option<usize> {
        let scanned = &mut self.scanned;
        loop {
            match self.state {
                EndState::Head => {
                    let from = scanned.saturating_sub(3);
                    let Some(p) = find(buf.get(from..)?, b"\r\n\r\n") else {
                        *scanned = buf.len();
                        return None;
                    };
                    let end = from + p + 4;
                    // A head that cannot be read ends only when the server closes (and is then
                    // refused whole): never scanned again on each read.
                    self.state = EndState::Close;
                    *scanned = end;
                    let head = std::str::from_utf8(&buf[..end]).ok()?;
                    for l in head.split("\r\n") {
                        if let Some((k, v)) = l.split_once(':') {
                            if k.trim().eq_ignore_ascii_case("content-length") {
                                self.state = EndState::Length(end.checked_add(v.trim().parse().ok()?)?);
                                break;
                            }
                        }
                    }
                    if matches!(self.state, EndState::Close) && chunked(head) {
                        self.state = EndState::ChunkSize { at: end };
                    }
                    *scanned = end;
                }
                EndState::Length(n) => return (buf.len() >= n).then_some(n),
                EndState::Close => return None,
                EndState::ChunkSize { at } | EndState::Trailer { at } => {
                    let from = scanned.saturating_sub(1).max(at);
                    let Some(p) = find(buf.get(from..)?, b"\r\n") else {
                        *scanned = buf.len();
                        return None;
                    };
                    let eol = from + p;
                    if let EndState::Trailer { .. } = self.state {
                        return Some(eol + 2);
                    }
                    // A size line that cannot be read: as with a bad head, wait for the close.
                    self.state = EndState::Close;
                    let size_text = std::str::from_utf8(&buf[at..eol]).ok()?;
                    let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
                    if size == 0 {
                        self.state = EndState::Trailer { at: eol + 2 };
                        *scanned = eol + 2;
                        continue;
                    }
                    // The chunk's data and its CRLF: the next size line starts after them.
                    let next = (eol + 2).checked_add(size)?.checked_add(2)?;
                    self.state = EndState::ChunkSize { at: next };
                    *scanned = next;
                    if buf.len() < next {
                        return None;
                    }
                }
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn chunked(head: &str) -> bool {
    head.split("\r\n").any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("transfer-encoding") && v.to_ascii_lowercase().contains("chunked")
        })
    })
}

/// A chunked body → (the data, bytes used), once the last chunk is there.
fn dechunk(mut b: &[u8]) -> Option<(Vec<u8>, usize)> {
    let total = b.len();
    let mut out = Vec::new();
    loop {
        let eol = b.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&b[..eol]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        b = &b[eol + 2..];
        if size == 0 {
            // Trailers end with an empty line.
            let end = b.windows(2).position(|w| w == b"\r\n")?;
            let rest = &b[end + 2..];
            return Some((out, total - rest.len()));
        }
        if b.len() < size.checked_add(2)? {
            return None;
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

/// Where the body of a `200` response is: in the response, or (chunked) reassembled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    At(std::ops::Range<usize>),
    Dechunked(Vec<u8>),
}

/// The body of a `200` response (whole, as read until the server closed), without copying
/// it unless it was chunked.
pub fn body(buf: &[u8]) -> Result<Body, &'static str> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n").ok_or("no end of headers")? + 4;
    let head = std::str::from_utf8(&buf[..end]).map_err(|_| "headers are not text")?;
    let status = head.split("\r\n").next().unwrap_or("");
    let mut p = status.split(' ');
    match (p.next(), p.next()) {
        (Some(v), Some("200")) if v.starts_with("HTTP/1.") => {}
        (Some(v), Some(_)) if v.starts_with("HTTP/1.") => return Err("status is not 200"),
        _ => return Err("not an HTTP response"),
    }
    if chunked(head) {
        return dechunk(&buf[end..]).map(|(d, _)| Body::Dechunked(d)).ok_or("truncated chunked body");
    }
    for l in head.split("\r\n") {
        if let Some((k, v)) = l.split_once(':') {
            if k.trim().eq_ignore_ascii_case("content-length") {
                let n: usize = v.trim().parse().map_err(|_| "bad Content-Length")?;
                let stop = end.checked_add(n).filter(|s| *s <= buf.len());
                return stop.map(|s| Body::At(end..s)).ok_or("body shorter than Content-Length");
            }
        }
    }
    Ok(Body::At(end..buf.len()))
}

/// The body of a `200` response (whole, as read until the server closed), copied.
pub fn response_body(buf: &[u8]) -> Result<Vec<u8>, &'static str> {
    Ok(match body(buf)? {
        Body::At(r) => buf[r].to_vec(),
        Body::Dechunked(d) => d,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests() {
        let r = parse_request(
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: application/openmetrics-text\r\n\r\n",
        );
        assert_eq!(
            r,
            Ok(Request { head: false, accept: Some("application/openmetrics-text".into()), probe: None })
        );
        assert_eq!(parse_request(b"GET /ready HTTP/1.1\r\n\r\n").unwrap().probe, Some(Probe::Ready));
        assert_eq!(parse_request(b"HEAD /live?x HTTP/1.0\r\n\r\n").unwrap().probe, Some(Probe::Live));
        assert_eq!(parse_request(b"GET /other HTTP/1.1\r\n\r\n"), Err(404));
        assert_eq!(parse_request(b"POST /metrics HTTP/1.1\r\n\r\n"), Err(405));
        assert_eq!(parse_request(b"garbage\r\n\r\n"), Err(400));
        assert!(parse_request(b"HEAD /metrics?x=1 HTTP/1.0\r\n\r\n").unwrap().head);
    }

    /// Issue 22 item 5: a scrape whose page cannot be built (here: the supervisor's queue is
    /// full and never drained) is answered `503` at the deadline, not held forever.
    #[test]
    fn a_scrape_that_cannot_get_its_page_is_answered_503_at_the_deadline() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let p = std::env::temp_dir().join(format!("herdsman-deadline-{}.sock", std::process::id()));
        let addr = ListenAddr::Unix(p.clone());
        let bound = bind(&addr).unwrap();
        let (tx, _rx) = mpsc::channel(1);
        // The queue is full: the scrape's snapshot request can never be sent.
        tx.try_send(Control::Status { reply: tokio::sync::oneshot::channel().0 }).unwrap();
        let answer = rt.block_on(async {
            serve(&bound, Metrics::disabled(), tx).unwrap();
            let mut c = tokio::net::UnixStream::connect(&p).await.unwrap();
            c.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").await.unwrap();
            let mut all = Vec::new();
            let read = c.read_to_end(&mut all);
            tokio::time::timeout(Duration::from_secs(60), read).await.map(|_| all)
        });
        let answer = String::from_utf8_lossy(&answer.expect("an answer, not a wait without end")).to_string();
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    }

    /// A head or chunk-size line that is not text ends the search: later reads are not
    /// scanned again from the start (each re-validated up to 4 MiB on the loop before).
    #[test]
    fn a_head_or_chunk_size_that_is_not_text_is_looked_at_once() {
        let cases: [&[u8]; 2] = [
            b"HTTP/1.1 200 OK\r\nX: \xff\r\n\r\nbody",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\xff\r\nabc",
        ];
        for whole in cases {
            let mut end = ResponseEnd::default();
            assert_eq!(end.feed(whole), None);
            assert!(matches!(end.state, EndState::Close), "{}", String::from_utf8_lossy(whole));
            let mut more = whole.to_vec();
            more.extend_from_slice(&[b'x'; 64]);
            assert_eq!(end.feed(&more), None);
            assert_eq!(complete_response(&more), None);
        }
    }

    #[test]
    fn the_end_of_a_response_fed_a_byte_at_a_time_is_where_the_whole_says() {
        let cases: [&[u8]; 5] = [
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcEXTRA",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\nafter",
            b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nall of it",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc",
            b"no head at all\r\n",
        ];
        for whole in cases {
            for step in [1, 2, 3, 5, whole.len()] {
                let mut end = ResponseEnd::default();
                let mut got = None;
                let mut at = 0;
                while got.is_none() && at < whole.len() {
                    at = (at + step).min(whole.len());
                    got = end.feed(&whole[..at]);
                }
                // Fed as it came, the end is found as soon as the bytes are there.
                assert_eq!(got, complete_response(whole), "{} by {step}", String::from_utf8_lossy(whole));
                if let Some(n) = got {
                    assert_eq!(complete_response(&whole[..n]), Some(n));
                }
            }
        }
    }

    #[test]
    fn responses_with_length_chunks_or_close() {
        let a = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcEXTRA";
        assert_eq!(complete_response(a), Some(a.len() - 5));
        assert_eq!(response_body(a).unwrap(), b"abc");
        let c = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        assert_eq!(complete_response(c), Some(c.len()));
        assert_eq!(response_body(c).unwrap(), b"abcde");
        let h = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nall of it";
        assert_eq!(complete_response(h), None);
        assert_eq!(response_body(h).unwrap(), b"all of it");
        assert!(response_body(b"HTTP/1.1 500 Oops\r\n\r\n").is_err());
        assert!(response_body(b"nonsense").is_err());
    }
}
