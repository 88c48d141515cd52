//! The HTTP/1.1 both sides of the endpoint need, as pure functions over bytes (bounded, and
//! fuzzed in `tests/fuzz.rs`): the request head herdsman is sent, the response head and body
//! it writes, and the answer it reads from a worker (length-delimited, chunked or to the
//! end of the connection).

use std::time::Duration;

use super::MAX_HEAD;

/// Whether `b` has the empty line that ends a request head.
pub(super) fn head_ends(b: &[u8]) -> bool {
    b.windows(4).any(|w| w == b"\r\n\r\n") || b.windows(2).any(|w| w == b"\n\n")
}

pub(super) fn reason(code: u16) -> &'static str {
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
pub(super) fn head_of(code: u16, ctype: &str, len: usize) -> Vec<u8> {
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

pub(super) fn response(code: u16, ctype: &str, body: &[u8]) -> Vec<u8> {
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
    pub(super) state: EndState,
    /// Bytes already looked at for the line or head end being searched.
    scanned: usize,
}

#[derive(Debug, Default)]
pub(super) enum EndState {
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
