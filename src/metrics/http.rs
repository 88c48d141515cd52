//! The `GET /metrics` endpoint (`--metrics ADDR`) and the little HTTP/1.1 both sides need.
//!
//! Why no HTTP crate: herdsman answers exactly one request per connection (`GET /metrics`,
//! `Connection: close`) and reads exactly one answer from each worker; hyper (or axum on
//! top of it) would be most of the binary and of its dependency tree for that. The request
//! head parser and the response body reader here are pure functions over bytes, bounded,
//! and fuzzed in `tests/fuzz.rs`.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Semaphore, mpsc};

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
/// Scrapes rendered at the same time; more wait their turn.
const CONCURRENT: usize = 4;

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
    let limit = Arc::new(Semaphore::new(CONCURRENT));
    match bound {
        Bound::Tcp(l, _) => {
            let l = tokio::net::TcpListener::from_std(l.try_clone()?)?;
            tokio::spawn(async move {
                loop {
                    match l.accept().await {
                        Ok((s, _)) => {
                            let _ = s.set_nodelay(true);
                            connection(s, metrics.clone(), controls.clone(), limit.clone());
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
                    match l.accept().await {
                        Ok((s, _)) => connection(s, metrics.clone(), controls.clone(), limit.clone()),
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

fn connection<S>(mut s: S, metrics: Metrics, controls: mpsc::Sender<Control>, limit: Arc<Semaphore>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static + AsRawFd,
{
    tokio::spawn(async move {
        // The head, and the page after it (written as is, not copied behind the head).
        let (answer, page) = match tokio::time::timeout(REQUEST_TIMEOUT, read_head(&mut s)).await {
            Err(_) => (response(408, "text/plain", b"request timeout\n"), String::new()),
            Ok(Err(_)) => return,
            Ok(Ok(head)) => match parse_request(&head) {
                Err(code) => (response(code, "text/plain", reason(code).as_bytes()), String::new()),
                Ok(req) => {
                    let format = Format::from_accept(req.accept.as_deref());
                    let _permit = limit.acquire().await;
                    match metrics.collect(&controls, format).await {
                        Ok(page) => {
                            let page = if req.head { String::new() } else { page };
                            (head_of(200, format.content_type(), page.len()), page)
                        }
                        Err(e) => (response(503, "text/plain", format!("{e}\n").as_bytes()), String::new()),
                    }
                }
            },
        };
        let _ = tokio::time::timeout(WRITE_TIMEOUT, async {
            if s.write_all(&answer).await.is_ok() {
                let _ = s.write_all(page.as_bytes()).await;
            }
            let _ = s.shutdown().await;
        })
        .await;
    });
}

async fn read_head<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::new();
    let mut buf = [0u8; 2048];
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            return Ok(head);
        }
        head.extend_from_slice(&buf[..n]);
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            return Ok(head);
        }
        if head.len() > MAX_HEAD {
            return Ok(head);
        }
    }
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
}

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
    let path = target.split('?').next().unwrap_or("");
    if path != "/metrics" && path != "/" {
        return Err(404);
    }
    match method {
        "GET" => Ok(Request { head: false, accept }),
        "HEAD" => Ok(Request { head: true, accept }),
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
        assert_eq!(r, Ok(Request { head: false, accept: Some("application/openmetrics-text".into()) }));
        assert_eq!(parse_request(b"GET /other HTTP/1.1\r\n\r\n"), Err(404));
        assert_eq!(parse_request(b"POST /metrics HTTP/1.1\r\n\r\n"), Err(405));
        assert_eq!(parse_request(b"garbage\r\n\r\n"), Err(400));
        assert!(parse_request(b"HEAD /metrics?x=1 HTTP/1.0\r\n\r\n").unwrap().head);
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
