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
//!
//! This is the bench's only HTTP client: the single requests of the readiness and recovery
//! probes ([`get`], [`wait_serving`]) go through the same connect / exchange code. (wrk, an
//! external program, measures the data-path throughput.)

// Binding a client socket to a chosen loopback source needs libc: each `unsafe` block
// says why it is sound (the crate denies `unsafe_code` elsewhere).
#![allow(unsafe_code)]

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

/// Runs `threads` clients for `dur`; every request, in order of start.
pub fn run(addr: &str, threads: usize, keep_alive: bool, dur: Duration, opts: &Opts) -> Vec<Rec> {
    let l = Load::start_with(addr, threads, keep_alive, dur + Duration::from_secs(10), opts);
    std::thread::sleep(dur);
    l.finish()
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

    /// Stops the clients and returns every request, in order of start.
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

#[derive(Debug)]
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
    // SAFETY: the fd is the one socket(2) just returned, owned by `s` from then on; every
    // pointer passed is to a local that outlives its call, with its true size.
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

fn connect(addr: SocketAddr, source: Option<Ipv4Addr>, timeout: Duration) -> Result<Conn, Err> {
    let s = match source {
        None => TcpStream::connect_timeout(&addr, timeout),
        Some(src) => connect_from(addr, src),
    }
    .map_err(|_| Err::Connect)?;
    s.set_nodelay(true).ok();
    s.set_read_timeout(Some(timeout)).ok();
    s.set_write_timeout(Some(timeout)).ok();
    Ok(Conn { s, buf: Vec::with_capacity(1024) })
}

/// A complete response: its body is `buf[body]` of the connection.
struct Response {
    status: u16,
    /// The server keeps the connection open (no `Connection: close`).
    keep: bool,
    body: std::ops::Range<usize>,
}

/// Sends one request and reads the whole response (the body by its Content-Length).
fn exchange(c: &mut Conn, req: &[u8]) -> Result<Response, Err> {
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
    Ok(Response { status, keep, body: head_end..head_end + len })
}

/// One GET of `/` on a new connection (`Connection: close`): (status, body).
pub fn get(addr: &str, timeout: Duration) -> Result<(u16, String), String> {
    get_status(addr, "/", timeout)
}

/// GET `path` (new connection): the body of a 200 answer.
pub fn get_path(addr: &str, path: &str, timeout: Duration) -> Result<String, String> {
    match get_status(addr, path, timeout)? {
        (200, body) => Ok(body),
        (status, _) => Err(format!("GET {path}: status {status}")),
    }
}

fn get_status(addr: &str, path: &str, timeout: Duration) -> Result<(u16, String), String> {
    let addr: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let mut c = connect(addr, None, timeout).map_err(|e| format!("{e:?}"))?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n");
    let r = exchange(&mut c, req.as_bytes()).map_err(|e| format!("{e:?}"))?;
    Ok((r.status, String::from_utf8_lossy(&c.buf[r.body]).into_owned()))
}

/// The pid in a node-app answer (`hello from worker 1 pid 1234`).
pub fn answer_pid(body: &str) -> Option<i32> {
    body.split_whitespace().skip_while(|w| *w != "pid").nth(1).and_then(|p| p.parse().ok())
}

/// Waits until `n` distinct pids answered 200 on `addr`.
pub fn wait_serving(addr: &str, n: usize, timeout: Duration) -> bool {
    let mut seen = std::collections::HashSet::new();
    crate::util::wait_until(timeout, 5, || {
        if let Ok((200, body)) = get(addr, Duration::from_secs(2)) {
            if let Some(p) = answer_pid(&body) {
                seen.insert(p);
            }
        }
        (seen.len() >= n).then_some(())
    })
    .is_some()
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
                match connect(cl.addr, cl.source, TIMEOUT) {
                    Ok(c) => conn = Some(c),
                    Err(_) => break Outcome::Connect,
                }
            }
            let c = conn.as_mut().expect("connected just above");
            match exchange(c, req) {
                Ok(Response { status, keep, body }) => {
                    if cl.pids {
                        pid = answer_pid(&String::from_utf8_lossy(&c.buf[body])).unwrap_or(0);
                    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::net::{IpAddr, TcpListener};
    use std::sync::atomic::AtomicUsize;
    use std::sync::Mutex;

    /// How the test server answers.
    #[derive(Clone, Copy, PartialEq)]
    enum Mode {
        Ok,
        /// 503, like the warming app.
        Unavailable,
        /// Closes the connection after each answer without saying so (a draining server).
        CloseSilently,
        /// The head and the body in two writes, 20 ms apart.
        Split,
    }

    struct Server {
        addr: String,
        accepts: Arc<AtomicUsize>,
        peers: Arc<Mutex<Vec<IpAddr>>>,
        paths: Arc<Mutex<Vec<String>>>,
    }

    /// An HTTP/1.1 server on 127.0.0.1 that answers `hello from worker 0 pid 4242`.
    fn serve(mode: Mode) -> Server {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let s = Server {
            addr: l.local_addr().unwrap().to_string(),
            accepts: Arc::new(AtomicUsize::new(0)),
            peers: Arc::new(Mutex::new(Vec::new())),
            paths: Arc::new(Mutex::new(Vec::new())),
        };
        let (accepts, peers, paths) = (s.accepts.clone(), s.peers.clone(), s.paths.clone());
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                accepts.fetch_add(1, Ordering::SeqCst);
                peers.lock().unwrap().push(c.peer_addr().unwrap().ip());
                let paths = paths.clone();
                std::thread::spawn(move || answer(c, mode, &paths));
            }
        });
        s
    }

    fn answer(c: TcpStream, mode: Mode, paths: &Mutex<Vec<String>>) {
        let mut w = c.try_clone().unwrap();
        let mut r = BufReader::new(c);
        loop {
            let mut head = Vec::new();
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 {
                    return;
                }
                if line == "\r\n" {
                    break;
                }
                head.push(line.to_ascii_lowercase());
            }
            paths.lock().unwrap().push(head[0].split_whitespace().nth(1).unwrap_or("").to_string());
            let close = head.iter().any(|l| l.starts_with("connection: close"));
            let body = "hello from worker 0 pid 4242\n";
            let status = if mode == Mode::Unavailable { "503 Service Unavailable" } else { "200 OK" };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\n{}\r\n",
                body.len(),
                if close { "Connection: close\r\n" } else { "" }
            );
            if mode == Mode::Split {
                w.write_all(head.as_bytes()).unwrap();
                std::thread::sleep(Duration::from_millis(20));
                w.write_all(body.as_bytes()).unwrap();
            } else {
                w.write_all(format!("{head}{body}").as_bytes()).unwrap();
            }
            if close || mode == Mode::CloseSilently {
                return;
            }
        }
    }

    fn run_ms(s: &Server, threads: usize, keep_alive: bool, ms: u64, opts: &Opts) -> Vec<Rec> {
        let recs = run(&s.addr, threads, keep_alive, Duration::from_millis(ms), opts);
        assert!(!recs.is_empty(), "no request completed");
        recs
    }

    #[test]
    fn keep_alive_clients_reuse_one_connection_each() {
        let s = serve(Mode::Ok);
        let recs = run_ms(&s, 2, true, 300, &Opts::default());
        assert!(recs.len() > 10, "{} requests", recs.len());
        assert!(recs.iter().all(|r| r.outcome == Outcome::Ok));
        assert_eq!(s.accepts.load(Ordering::SeqCst), 2);
        assert!(recs.windows(2).all(|w| w[0].t_us <= w[1].t_us), "records are in order of start");
    }

    #[test]
    fn without_keep_alive_every_request_has_its_own_connection() {
        let s = serve(Mode::Ok);
        let recs = run_ms(&s, 2, false, 300, &Opts::default());
        assert!(recs.iter().all(|r| r.outcome == Outcome::Ok));
        assert_eq!(s.accepts.load(Ordering::SeqCst), recs.len());
    }

    #[test]
    fn a_kept_connection_closed_before_the_answer_is_retried_once_on_a_new_one() {
        let s = serve(Mode::CloseSilently);
        let recs = run_ms(&s, 1, true, 300, &Opts::default());
        assert!(recs.len() > 2);
        assert_eq!(recs[0].outcome, Outcome::Ok, "the first request is on a new connection");
        assert!(recs[1..].iter().all(|r| r.outcome == Outcome::OkRetried), "{:?}", &recs[..3]);
        assert!(recs.iter().all(|r| !r.outcome.failed()));
    }

    #[test]
    fn a_non_200_answer_and_a_refused_connection_are_failures() {
        let s = serve(Mode::Unavailable);
        let recs = run_ms(&s, 1, true, 100, &Opts::default());
        assert!(recs.iter().all(|r| r.outcome == Outcome::Status && r.outcome.failed()));

        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let recs = run(&format!("127.0.0.1:{port}"), 1, true, Duration::from_millis(50), &Opts::default());
        assert!(!recs.is_empty() && recs.iter().all(|r| r.outcome == Outcome::Connect));
    }

    #[test]
    fn a_response_in_pieces_is_read_whole() {
        let s = serve(Mode::Split);
        let recs = run_ms(&s, 1, true, 150, &Opts::default());
        assert!(recs.iter().all(|r| r.outcome == Outcome::Ok && r.lat_us >= 20_000), "{:?}", recs[0]);
    }

    #[test]
    fn the_path_is_sent_and_the_answering_pid_recorded() {
        let s = serve(Mode::Ok);
        let opts = Opts { path: "/work?ms=1".into(), pids: true, ..Default::default() };
        let recs = run_ms(&s, 1, false, 100, &opts);
        assert!(recs.iter().all(|r| r.pid == 4242));
        assert!(s.paths.lock().unwrap().iter().all(|p| p == "/work?ms=1"));
        // Without `pids`, no pid is parsed.
        assert!(run_ms(&s, 1, false, 50, &Opts::default()).iter().all(|r| r.pid == 0));
    }

    #[test]
    fn clients_are_bound_to_the_source_addresses_in_turn() {
        let s = serve(Mode::Ok);
        let sources = vec![Ipv4Addr::new(127, 0, 0, 2), Ipv4Addr::new(127, 3, 4, 5)];
        let opts = Opts { sources: sources.clone(), ..Default::default() };
        run_ms(&s, 2, false, 100, &opts);
        let peers = s.peers.lock().unwrap();
        for src in &sources {
            assert!(peers.contains(&IpAddr::V4(*src)), "{src} not among {peers:?}");
        }
        assert!(!peers.contains(&IpAddr::V4(Ipv4Addr::LOCALHOST)));
    }

    #[test]
    fn one_get_gives_the_status_and_the_body() {
        let s = serve(Mode::Ok);
        let (status, body) = get(&s.addr, Duration::from_secs(2)).unwrap();
        assert_eq!((status, answer_pid(&body)), (200, Some(4242)));
        assert_eq!(s.paths.lock().unwrap().as_slice(), ["/"]);
        let (status, _) = get(&serve(Mode::Unavailable).addr, Duration::from_secs(2)).unwrap();
        assert_eq!(status, 503);
        assert!(get("127.0.0.1:1", Duration::from_secs(2)).is_err());
    }

    #[test]
    fn serving_means_enough_distinct_pids_answered() {
        let s = serve(Mode::Ok);
        assert!(wait_serving(&s.addr, 1, Duration::from_secs(5)));
        // The test server has one pid only.
        assert!(!wait_serving(&s.addr, 2, Duration::from_millis(200)));
        assert_eq!(answer_pid("hello from worker 3 pid 77\n"), Some(77));
        assert_eq!(answer_pid("warming up\n"), None);
    }
}
