//! HTTP/1.1 load client that records every request: start time, latency, outcome.
//!
//! Closed loop: `threads` connections each send one request after the other, either on a
//! keep-alive connection or on a new connection per request (`Connection: close`). A request
//! on a *reused* keep-alive connection that the server closed before any byte of a response
//! (the unavoidable HTTP/1.1 race with a draining server) is retried once on a new
//! connection, as HTTP clients do for idempotent requests; such a request is recorded as
//! `OkRetried` (or as a failure when the retry fails too), so both views can be reported.
//!
//! [`Opts`]: another path (e.g. the CPU-bound `/work?ms=2`), loopback source addresses to bind
//! the clients to (client i uses `sources[i % len]`, so a sticky-by-address server sees several
//! clients), and recording which worker (pid in the answer) served each request.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::FromRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Outcome {
    Ok = 0,
    /// OK after one retry on a new connection (the reused connection was closed by the server).
    OkRetried = 1,
    /// The server answered, but not 200 (e.g. 503 while warming up).
    Status = 2,
    Connect = 3,
    /// Connection closed or reset without a (complete) response.
    Closed = 4,
    Timeout = 5,
    Other = 6,
}

impl Outcome {
    pub fn failed(self) -> bool {
        !matches!(self, Outcome::Ok | Outcome::OkRetried)
    }
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::OkRetried => "ok after retry",
            Outcome::Status => "non-200",
            Outcome::Connect => "connect error",
            Outcome::Closed => "closed/reset",
            Outcome::Timeout => "timeout",
            Outcome::Other => "other error",
        }
    }
}

/// One request: start (µs since the load started), latency (µs), outcome, and the pid of the
/// worker that answered (0 unless [`Opts::pids`]).
#[derive(Clone, Copy, Debug)]
pub struct Rec {
    pub t_us: u64,
    pub lat_us: u32,
    pub outcome: Outcome,
    pub pid: i32,
}

/// What the clients send and record beyond the defaults (`GET /`, unbound, no pid).
#[derive(Clone, Debug, Default)]
pub struct Opts {
    /// Request path; empty = `/`.
    pub path: String,
    /// Source addresses (127.0.0.0/8) to bind client i to: `sources[i % len]`; empty = the
    /// kernel's choice (127.0.0.1).
    pub sources: Vec<Ipv4Addr>,
    /// Parse the answering worker's pid from the body (`... pid 1234`).
    pub pids: bool,
}

pub struct Load {
    stop: Arc<AtomicBool>,
    handles: Vec<std::thread::JoinHandle<Vec<Rec>>>,
    pub t0: Instant,
}

impl Load {
    /// Starts `threads` clients; they stop at `finish` or after `limit` at the latest.
    pub fn start(addr: &str, threads: usize, keep_alive: bool, limit: Duration) -> Load {
        Load::start_with(addr, threads, keep_alive, limit, &Opts::default())
    }

    /// Like [`Load::start`], with [`Opts`].
    pub fn start_with(addr: &str, threads: usize, keep_alive: bool, limit: Duration, opts: &Opts) -> Load {
        let addr: SocketAddr = addr.parse().expect("address");
        let stop = Arc::new(AtomicBool::new(false));
        let t0 = Instant::now();
        let path = if opts.path.is_empty() { "/".to_string() } else { opts.path.clone() };
        let handles = (0..threads)
            .map(|i| {
                let stop = stop.clone();
                let c = Client {
                    addr,
                    source: (!opts.sources.is_empty()).then(|| opts.sources[i % opts.sources.len()]),
                    req_ka: format!("GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n").into_bytes(),
                    req_close: format!("GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
                        .into_bytes(),
                    pids: opts.pids,
                };
                std::thread::spawn(move || client(&c, keep_alive, &stop, t0, limit))
            })
            .collect();
        Load { stop, handles, t0 }
    }

    /// Seconds since the load started.
    pub fn now(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }

    pub fn finish(self) -> Vec<Rec> {
        self.stop.store(true, Ordering::SeqCst);
        let mut all = Vec::new();
        for h in self.handles {
            all.extend(h.join().unwrap_or_default());
        }
        all.sort_by_key(|r| r.t_us);
        all
    }
}

struct Conn {
    s: TcpStream,
    buf: Vec<u8>,
}

enum Err {
    Connect,
    /// Closed or reset before any byte of the response arrived (retryable on a reused conn).
    Stale,
    Closed,
    Timeout,
    Other,
}

fn classify(e: &std::io::Error, got_any: bool) -> Err {
    use std::io::ErrorKind::*;
    match e.kind() {
        WouldBlock | TimedOut => Err::Timeout,
        ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof => {
            if got_any {
                Err::Closed
            } else {
                Err::Stale
            }
        }
        _ => Err::Other,
    }
}

const TIMEOUT: Duration = Duration::from_secs(10);

/// One client thread's fixed parameters.
struct Client {
    addr: SocketAddr,
    source: Option<Ipv4Addr>,
    req_ka: Vec<u8>,
    req_close: Vec<u8>,
    pids: bool,
}

/// A blocking IPv4 connect from `src` (port chosen at connect time, `IP_BIND_ADDRESS_NO_PORT`).
fn connect_from(addr: SocketAddr, src: Ipv4Addr) -> std::io::Result<TcpStream> {
    let SocketAddr::V4(dst) = addr else {
        return Err(std::io::Error::other("source binding is IPv4 only"));
    };
    let sin = |ip: Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(ip).to_be() },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // Owns the fd from here on (closed on every error path).
        let s = TcpStream::from_raw_fd(fd);
        let one: libc::c_int = 1;
        libc::setsockopt(
            fd,
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            &one as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        let local = sin(src, 0);
        if libc::bind(fd, &local as *const libc::sockaddr_in as *const libc::sockaddr, len) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let remote = sin(*dst.ip(), dst.port());
        if libc::connect(fd, &remote as *const libc::sockaddr_in as *const libc::sockaddr, len) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(s)
    }
}

fn connect(addr: SocketAddr, source: Option<Ipv4Addr>) -> Result<Conn, Err> {
    let s = match source {
        None => TcpStream::connect_timeout(&addr, TIMEOUT),
        Some(src) => connect_from(addr, src),
    }
    .map_err(|_| Err::Connect)?;
    s.set_nodelay(true).ok();
    s.set_read_timeout(Some(TIMEOUT)).ok();
    s.set_write_timeout(Some(TIMEOUT)).ok();
    Ok(Conn { s, buf: Vec::with_capacity(1024) })
}

/// Sends one request and reads the whole response.
/// Ok((status, server keeps the connection, pid in the body if `pids`, else 0)).
fn exchange(c: &mut Conn, req: &[u8], pids: bool) -> Result<(u16, bool, i32), Err> {
    c.s.write_all(req).map_err(|e| classify(&e, false))?;
    c.buf.clear();
    let mut chunk = [0u8; 2048];
    let head_end = loop {
        if let Some(i) = find(&c.buf, b"\r\n\r\n") {
            break i + 4;
        }
        match c.s.read(&mut chunk) {
            Ok(0) => return Err(if c.buf.is_empty() { Err::Stale } else { Err::Closed }),
            Ok(n) => c.buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(classify(&e, !c.buf.is_empty())),
        }
    };
    let head = String::from_utf8_lossy(&c.buf[..head_end]).to_ascii_lowercase();
    let status: u16 = head.get(9..12).and_then(|s| s.parse().ok()).ok_or(Err::Other)?;
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or(Err::Other)?;
    let keep = !head.contains("connection: close");
    while c.buf.len() < head_end + len {
        match c.s.read(&mut chunk) {
            Ok(0) => return Err(Err::Closed),
            Ok(n) => c.buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(classify(&e, true)),
        }
    }
    let pid = if pids {
        let body = String::from_utf8_lossy(&c.buf[head_end..head_end + len]);
        crate::util::answer_pid(&body).unwrap_or(0)
    } else {
        0
    };
    Ok((status, keep, pid))
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

fn client(cl: &Client, keep_alive: bool, stop: &AtomicBool, t0: Instant, limit: Duration) -> Vec<Rec> {
    let req: &[u8] = if keep_alive { &cl.req_ka } else { &cl.req_close };
    let mut recs = Vec::with_capacity(1 << 16);
    let mut conn: Option<Conn> = None;
    while !stop.load(Ordering::Relaxed) && t0.elapsed() < limit {
        let start = Instant::now();
        let t_us = start.duration_since(t0).as_micros() as u64;
        let mut retried = false;
        let mut pid = 0;
        let outcome = loop {
            let reused = conn.is_some();
            if conn.is_none() {
                match connect(cl.addr, cl.source) {
                    Ok(c) => conn = Some(c),
                    Err(_) => break Outcome::Connect,
                }
            }
            let c = conn.as_mut().unwrap();
            match exchange(c, req, cl.pids) {
                Ok((status, keep, p)) => {
                    pid = p;
                    if !keep || !keep_alive {
                        conn = None;
                    }
                    break if status != 200 {
                        Outcome::Status
                    } else if retried {
                        Outcome::OkRetried
                    } else {
                        Outcome::Ok
                    };
                }
                Err(e) => {
                    conn = None;
                    match e {
                        Err::Stale if reused && !retried => {
                            retried = true;
                            continue;
                        }
                        Err::Stale | Err::Closed => break Outcome::Closed,
                        Err::Connect => break Outcome::Connect,
                        Err::Timeout => break Outcome::Timeout,
                        Err::Other => break Outcome::Other,
                    }
                }
            }
        };
        let lat_us = start.elapsed().as_micros().min(u32::MAX as u128) as u32;
        recs.push(Rec { t_us, lat_us, outcome, pid });
        if outcome == Outcome::Connect {
            // Don't spin on a refused port.
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    recs
}
