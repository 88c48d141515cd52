//! Test support: run the real `herdsman` binary with the purpose-built Python worker, wait
//! with deadlines (never fixed sleeps), talk HTTP over unix or TCP sockets, drive load, and
//! capture sd_notify messages. Every process started here is killed on drop.
#![allow(dead_code)]
// Test helpers fail the test by panicking, on purpose.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_herdsman");

pub fn worker_py() -> String {
    format!("{}/tests/support/worker.py", env!("CARGO_MANIFEST_DIR"))
}

/// An interpreter every user can run (a pyenv shim under /root is not executable by nobody):
/// for workers that run as another user.
pub const SYSTEM_PYTHON: &str = "/usr/bin/python3";

/// Says on the terminal that `test` is skipped and why (how to install what it needs). The
/// test harness captures `eprintln!` of passing tests; this goes straight to stderr.
pub fn skip(test: &str, why: &str) {
    let _ = writeln!(std::io::stderr(), "SKIP {test}: {why}");
}

/// A test that cannot run here because it needs root or a tool that CI installs (a build
/// dependency): where `CI` is set it fails (CI runs the suite as root with every such tool, so
/// a skip there would hide a test that no longer runs); elsewhere it says SKIP and why, and
/// the caller returns. Environment-dependent skips that CI may legitimately hit use [`skip`].
pub fn needs(test: &str, why: &str) {
    assert!(std::env::var_os("CI").is_none(), "{test}: {why}; CI is set, where this test must run");
    skip(test, why);
}

/// Whether `program --version` runs here (an optional runtime a test needs).
pub fn have(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// How long workers may take to start before a test gives up: a deadline, not a wait (the
/// tests go on as soon as they are up), generous because the suite also runs inside
/// `dpkg-buildpackage` on busy builders, where starting a few Python workers took over 20 s.
pub const STARTUP: Duration = Duration::from_secs(120);

/// Polls `cond` until it returns `Some` or the deadline passes (then panics with `what`).
pub fn wait_for<T>(timeout: Duration, what: &str, mut cond: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = cond() {
            return v;
        }
        assert!(Instant::now() < end, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        Self::under(&std::env::temp_dir(), tag)
    }
    /// For workers that run as another user (`--user nobody`): a directory that user can enter
    /// (0755, under /tmp whatever TMPDIR says) holding a world-readable copy of the test worker
    /// (`worker_py()` of this dir). The checkout may be in a 0700 directory (root's home, a
    /// `mktemp -d` build directory) that nobody cannot enter, so such a worker must neither run
    /// files from it nor start in it: run herdsman with `Run::cwd(&dir.0)` (its workers start in
    /// herdsman's directory).
    pub fn shared(tag: &str) -> Self {
        use std::os::unix::fs::PermissionsExt;
        let dir = Self::under(std::path::Path::new("/tmp"), tag);
        std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).unwrap();
        let worker = dir.path("worker.py");
        std::fs::copy(worker_py(), &worker).unwrap();
        std::fs::set_permissions(&worker, std::fs::Permissions::from_mode(0o644)).unwrap();
        dir
    }
    fn under(parent: &std::path::Path, tag: &str) -> Self {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let p = parent.join(format!("herdsman-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    /// The copy of the test worker in a `TempDir::shared` directory.
    pub fn worker_py(&self) -> String {
        self.path("worker.py").display().to_string()
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Leaves what a killed supervisor leaves at `path`: a socket file nobody listens on. Bound
/// but never listening, so a `connect()` is refused whoever still holds the descriptor: with
/// a listener that is dropped instead (`drop(UnixListener::bind(..))`), another test thread's
/// fork that copied it (CLOEXEC only closes it at that child's exec) keeps it listening, and a
/// connect in that window succeeds.
pub fn stale_socket(path: &std::path::Path) {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, bind, socket};
    use std::os::fd::AsRawFd;
    let fd = socket(AddressFamily::Unix, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).unwrap();
    bind(fd.as_raw_fd(), &UnixAddr::new(path).unwrap()).unwrap();
}

/// Where to reach the app.
#[derive(Clone, Debug)]
pub enum Addr {
    Unix(PathBuf),
    Tcp(String),
}

impl Addr {
    pub fn listen_arg(&self) -> String {
        match self {
            Addr::Unix(p) => format!("unix:{}", p.display()),
            Addr::Tcp(a) => a.clone(),
        }
    }
    fn connect(&self) -> std::io::Result<Box<dyn Conn>> {
        Ok(match self {
            Addr::Unix(p) => Box::new(UnixStream::connect(p)?),
            Addr::Tcp(a) => Box::new(std::net::TcpStream::connect(a)?),
        })
    }
}

trait Conn: Read + Write + Send {
    fn set_timeout(&self, d: Duration);
}
impl Conn for UnixStream {
    fn set_timeout(&self, d: Duration) {
        let _ = self.set_read_timeout(Some(d));
        let _ = self.set_write_timeout(Some(d));
    }
}
impl Conn for std::net::TcpStream {
    fn set_timeout(&self, d: Duration) {
        let _ = self.set_read_timeout(Some(d));
        let _ = self.set_write_timeout(Some(d));
    }
}

/// A running `herdsman run`, its output captured. Killed (with its workers) on drop.
pub struct Herdsman {
    pub child: Option<Child>,
    pub stderr: Arc<Mutex<String>>,
    pub stdout: Arc<Mutex<String>>,
    pub addr: Addr,
}

pub struct Run {
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub addr: Addr,
    /// herdsman's working directory (its workers start there); the test's own when `None`.
    pub cwd: Option<PathBuf>,
}

impl Run {
    /// `herdsman run --listen unix:DIR/app.sock -w N [extra] -- python3 worker.py`
    pub fn new(dir: &TempDir, workers: usize) -> Self {
        let addr = Addr::Unix(dir.path("app.sock"));
        Run {
            args: vec![
                "run".into(),
                "--name".into(),
                "t".into(),
                "-w".into(),
                workers.to_string(),
                "--listen".into(),
                addr.listen_arg(),
                "--control".into(),
                dir.path("control.sock").display().to_string(),
            ],
            env: Vec::new(),
            addr,
            cwd: None,
        }
    }
    pub fn arg(mut self, a: &str) -> Self {
        self.args.push(a.to_string());
        self
    }
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.to_string(), v.to_string()));
        self
    }
    /// Starts herdsman (and so its workers) in `dir`.
    pub fn cwd(mut self, dir: &std::path::Path) -> Self {
        self.cwd = Some(dir.to_path_buf());
        self
    }
    /// Passes `-e K=V` to the workers.
    pub fn worker_env(self, k: &str, v: &str) -> Self {
        self.arg("-e").arg(&format!("{k}={v}"))
    }
    pub fn start(self) -> Herdsman {
        let mut args = self.args;
        if !args.iter().any(|a| a == "--") {
            args.extend(["--".to_string(), "python3".to_string(), worker_py()]);
        }
        Herdsman::spawn_in(&args, &self.env, self.addr, self.cwd.as_deref())
    }
}

impl Herdsman {
    pub fn spawn(args: &[String], env: &[(String, String)], addr: Addr) -> Herdsman {
        Self::spawn_in(args, env, addr, None)
    }
    /// `spawn` with herdsman's working directory (`None`: the test's own).
    pub fn spawn_in(
        args: &[String],
        env: &[(String, String)],
        addr: Addr,
        cwd: Option<&std::path::Path>,
    ) -> Herdsman {
        let mut cmd = Command::new(BIN);
        if let Some(dir) = cwd {
            cmd.current_dir(dir);
        }
        cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        cmd.env_remove("NOTIFY_SOCKET").env_remove("LISTEN_FDS").env_remove("LISTEN_PID");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn herdsman");
        let stderr = capture(child.stderr.take().unwrap(), true);
        let stdout = capture(child.stdout.take().unwrap(), false);
        Herdsman { child: Some(child), stderr, stdout, addr }
    }

    /// The `--control` socket it was started with, if any.
    pub fn control(&self) -> Option<PathBuf> {
        arg_after(&cmdline(self.child.as_ref()?.id())?, &["--control"]).map(PathBuf::from)
    }

    /// `herdsman COMMAND TARGET ARGS` against this supervisor: TARGET is its `--control`
    /// socket, or else its `--name` resolved in its own environment (the default socket).
    fn ask(&self, command: &str, args: &[&str]) -> Option<std::process::Output> {
        let mut cmd = Command::new(BIN);
        cmd.arg(command);
        match self.control() {
            Some(control) => {
                cmd.arg(control);
            }
            None => {
                let pid = self.child.as_ref()?.id();
                let name = arg_after(&cmdline(pid)?, &["--name", "-n"])?;
                cmd.arg(name);
                let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
                for kv in environ.split(|b| *b == 0).map(String::from_utf8_lossy) {
                    if let Some((k, v)) = kv.split_once('=') {
                        if k == "XDG_RUNTIME_DIR" || k == "RUNTIME_DIRECTORY" {
                            cmd.env(k, v);
                        }
                    }
                }
            }
        }
        let out = cmd.args(args).output().ok()?;
        out.status.success().then_some(out)
    }

    /// `status --json`, or None while the supervisor does not answer (yet).
    pub fn status(&self) -> Option<Value> {
        serde_json::from_slice(&self.ask("status", &["--json"])?.stdout).ok()
    }

    /// `herdsman metrics` (always collected, with or without `--metrics`): every sample, or
    /// None while the supervisor does not answer (yet).
    pub fn metrics(&self) -> Option<Vec<Sample>> {
        Some(parse_metrics(&String::from_utf8_lossy(&self.ask("metrics", &[])?.stdout)))
    }

    /// Waits until sample `name` with exactly `labels` has `value`.
    pub fn wait_metric(&self, name: &str, labels: &[(&str, &str)], value: f64) -> Vec<Sample> {
        wait_for(Duration::from_secs(60), &format!("{name}{labels:?} = {value}"), || {
            let samples = self.metrics()?;
            (sample(&samples, name, labels) == Some(value)).then_some(samples)
        })
    }

    /// Waits until the supervisor reports generation `generation` with every slot ready and
    /// nothing starting or stopping (a roll-out to it is over).
    pub fn wait_generation(&self, generation: u64) -> Value {
        wait_for(Duration::from_secs(60), &format!("generation {generation}, all ready"), || {
            let st = self.status()?;
            let workers = st["workers"].as_array()?;
            let settled = workers.iter().all(|w| w["state"] == "ready" && w["generation"] == generation);
            (st["generation"] == generation && st["ready"] == st["desired"] && settled).then_some(st)
        })
    }

    /// Waits until the last reload is recorded as `result` ("ok" or "failed").
    pub fn wait_last_reload(&self, result: &str) -> Value {
        wait_for(Duration::from_secs(60), &format!("last reload {result}"), || {
            let st = self.status()?;
            (st["last_reload"]["result"] == result).then_some(st)
        })
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY-free: libc::kill via nix.
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid()),
            nix::sys::signal::Signal::try_from(sig).unwrap(),
        )
        .unwrap();
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    /// Waits until every slot has settled: its first worker became ready, or failed and
    /// waits in back-off (what `READY=1` to the service manager waits for). Read from
    /// `status --json`.
    pub fn wait_started(&self) {
        wait_for(STARTUP, "every slot ready or in back-off", || {
            let st = self.status()?;
            let workers = st["workers"].as_array()?;
            let desired = st["desired"].as_u64()? as usize;
            let settled = workers.iter().filter(|w| w["state"] == "ready" || w["state"] == "backoff").count();
            (settled >= desired).then_some(())
        });
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let child = self.child.as_mut().unwrap();
        wait_for(timeout, "herdsman to exit", || child.try_wait().unwrap())
    }

    /// Stops the supervisor (SIGTERM) and waits for it to exit and for the end of its output,
    /// so that `stderr()` is its whole log: for the few checks on wording that is itself the
    /// contract (a hint to the user), including that some wording is *not* there.
    pub fn stop(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        let status = self.wait_exit(Duration::from_secs(30));
        // The capture threads hold the other references; each drops its own at end of file.
        wait_for(Duration::from_secs(30), "the end of herdsman's output", || {
            (Arc::strong_count(&self.stderr) == 1 && Arc::strong_count(&self.stdout) == 1).then_some(())
        });
        status
    }

    pub fn get(&self) -> Value {
        get(&self.addr).unwrap_or_else(|e| panic!("GET failed: {e}\nherdsman log:\n{}", self.stderr()))
    }

    /// Distinct workers seen in up to `tries` requests, until `n` distinct pids answered.
    pub fn distinct_workers(&self, n: usize) -> Vec<Value> {
        let mut seen: Vec<Value> = Vec::new();
        wait_for(STARTUP, &format!("{n} distinct workers answering"), || {
            let v = self.get();
            if !seen.iter().any(|s| s["pid"] == v["pid"]) {
                seen.push(v);
            }
            (seen.len() >= n).then(|| seen.clone())
        })
    }
}

impl Drop for Herdsman {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if child.try_wait().ok().flatten().is_none() {
                let pid = nix::unistd::Pid::from_raw(child.id() as i32);
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
                let end = Instant::now() + Duration::from_secs(5);
                while Instant::now() < end && child.try_wait().ok().flatten().is_none() {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
                let end = Instant::now() + Duration::from_secs(3);
                while Instant::now() < end && child.try_wait().ok().flatten().is_none() {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// Collects a child's output in the background (echoed to our stderr with HERDSMAN_TEST_ECHO).
pub fn capture(r: impl Read + Send + 'static, echo: bool) -> Arc<Mutex<String>> {
    let buf = Arc::new(Mutex::new(String::new()));
    let b = buf.clone();
    std::thread::spawn(move || {
        let mut r = BufReader::new(r);
        let mut line = String::new();
        while r.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
            if echo && std::env::var_os("HERDSMAN_TEST_ECHO").is_some() {
                eprint!("{line}");
            }
            b.lock().unwrap().push_str(&line);
            line.clear();
        }
    });
    buf
}

/// A process's argv, from /proc.
fn cmdline(pid: u32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(raw.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect())
}

/// The value after the first of `flags` in `args` (before any `--`).
fn arg_after(args: &[String], flags: &[&str]) -> Option<String> {
    let end = args.iter().position(|a| a == "--").unwrap_or(args.len());
    let i = args[..end].iter().position(|a| flags.contains(&a.as_str()))?;
    args.get(i + 1).cloned()
}

/// The worker in slot `id` of a `status --json` answer that is not on its way out (the
/// serving one, or the empty slot's entry).
pub fn in_slot(st: &Value, id: u64) -> Option<&Value> {
    st["workers"]
        .as_array()?
        .iter()
        .find(|w| w["id"] == id && w["state"] != "stopping" && w["state"] != "draining")
}

/// One sample of a Prometheus text page.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// Parses Prometheus text (0.0.4): comments skipped, label values unescaped.
pub fn parse_metrics(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let (name, mut rest) = match line.find(['{', ' ']) {
            Some(i) => line.split_at(i),
            None => continue,
        };
        let mut labels = Vec::new();
        if let Some(r) = rest.strip_prefix('{') {
            rest = r;
            while let Some((key, r)) = rest.split_once("=\"") {
                let mut value = String::new();
                let mut chars = r.char_indices();
                let mut end = r.len();
                while let Some((i, c)) = chars.next() {
                    match c {
                        '\\' => match chars.next() {
                            Some((_, 'n')) => value.push('\n'),
                            Some((_, c)) => value.push(c),
                            None => {}
                        },
                        '"' => {
                            end = i + 1;
                            break;
                        }
                        c => value.push(c),
                    }
                }
                labels.push((key.trim_start_matches(',').to_string(), value));
                rest = &r[end..];
                if let Some(r) = rest.strip_prefix('}') {
                    rest = r;
                    break;
                }
            }
        }
        let Some(value) = rest.split_whitespace().next().and_then(|v| v.parse().ok()) else { continue };
        out.push(Sample { name: name.to_string(), labels, value });
    }
    out
}

/// The value of sample `name` with exactly these labels.
pub fn sample(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| {
            s.name == name
                && s.labels.len() == labels.len()
                && labels.iter().all(|(k, v)| s.labels.iter().any(|(sk, sv)| sk == k && sv == v))
        })
        .map(|s| s.value)
}

/// The test worker's life events (`TW_EVENTS`), in the order written; empty before the first.
pub fn worker_events(path: &std::path::Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    // A line being appended right now may be incomplete: only whole lines count.
    text.split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("TW_EVENTS line {l:?}: {e}")))
        .collect()
}

/// A capability set of process `pid` ("self" for the test): `field` is `CapEff`, `CapBnd`, ...
#[allow(dead_code)]
pub fn capabilities(pid: &str, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let hex = status.lines().find_map(|l| l.strip_prefix(field)?.strip_prefix(':')).unwrap().trim();
    u64::from_str_radix(hex, 16).unwrap()
}

/// What `--balance steer` routes by here (the supervisor inherits the test's credentials):
/// "round-robin" where this process may load eBPF (CAP_BPF or CAP_SYS_ADMIN effective), else
/// "hash".
#[allow(dead_code)]
pub fn expected_steer_routing() -> &'static str {
    let eff = capabilities("self", "CapEff");
    if eff & (1 << 39 | 1 << 21) != 0 { "round-robin" } else { "hash" }
}
/// `herdsman status --json` from the supervisor at `control`, if it answers now.
pub fn try_status(control: &std::path::Path) -> Option<Value> {
    let out = Command::new(BIN).arg("status").arg(control).arg("--json").output().ok()?;
    out.status.success().then(|| serde_json::from_slice(&out.stdout).ok()).flatten()
}

/// An app serving metrics on `127.0.0.1:0` whose workers say `READY=1`, started and ready:
/// the metrics tests' common start (`extra` adds to the command line).
pub struct MetricsApp {
    pub h: Herdsman,
    pub control: PathBuf,
    /// The metrics endpoint's address, read back from `status --json`.
    pub addr: String,
    pub _dir: TempDir,
}

impl MetricsApp {
    pub fn start(tag: &str, workers: usize, extra: impl FnOnce(Run) -> Run) -> MetricsApp {
        let dir = TempDir::new(tag);
        let control = dir.path("control.sock");
        let run = Run::new(&dir, workers)
            .arg("--metrics")
            .arg("127.0.0.1:0")
            .arg("--ready")
            .arg("notify")
            .arg("--min-ready")
            .arg("100ms")
            .worker_env("TW_NOTIFY", "1");
        let h = extra(run).start();
        let s = wait_for(STARTUP, &format!("{workers} ready worker(s)"), || {
            try_status(&control).filter(|s| s["ready"] == workers as u64)
        });
        let addr = s["metrics"].as_str().expect("status --json shows the metrics address").to_string();
        MetricsApp { h, control, addr, _dir: dir }
    }
}

/// `herdsman status CONTROL --json`, which must succeed.
pub fn status_json(control: impl AsRef<std::ffi::OsStr>) -> Value {
    let out = Command::new(BIN).arg("status").arg(control).arg("--json").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// One HTTP request on a fresh connection.
pub fn get(addr: &Addr) -> Result<Value, String> {
    let mut c = addr.connect().map_err(|e| format!("connect: {e}"))?;
    c.set_timeout(Duration::from_secs(10));
    request(&mut *c, "/", true).map(|(v, _)| v)
}

/// Sends one GET and reads the response. Returns the JSON body and whether the server will
/// keep the connection open.
fn request(c: &mut dyn Conn, path: &str, close: bool) -> Result<(Value, bool), String> {
    let hdr = if close { "Connection: close\r\n" } else { "" };
    c.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\n{hdr}\r\n").as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match c.read(&mut byte) {
            Ok(0) => {
                return Err(if head.is_empty() {
                    "closed before response".into()
                } else {
                    "truncated headers".into()
                });
            }
            Ok(_) => head.push(byte[0]),
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    let head = String::from_utf8_lossy(&head).to_string();
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("bad status: {}", head.lines().next().unwrap_or("")));
    }
    let lower = head.to_ascii_lowercase();
    let len: usize = lower
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or("no content-length")?;
    let keep = !lower.contains("connection: close");
    let mut body = vec![0u8; len];
    c.read_exact(&mut body).map_err(|e| format!("body: {e}"))?;
    let v = serde_json::from_slice(&body).map_err(|e| format!("json: {e}"))?;
    Ok((v, keep))
}

/// Outcome of a load run.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub ok: usize,
    pub failed: Vec<String>,
    /// Requests on a reused keep-alive connection that the server had closed before any byte
    /// of a response: retried once on a new connection, as HTTP clients do for idempotent
    /// requests. Counted, not failures (unless the retry fails).
    pub retried: usize,
    /// (seconds since start, generation) of every answer, in order per thread.
    pub answers: Vec<(f64, i64)>,
}

impl LoadReport {
    /// One machine-readable line for docs/guarantees.md (collected by tests/guarantees.sh).
    pub fn guarantee(&self, fault: &str, injected: &str, outcome: &str) {
        eprintln!(
            "GUARANTEE|{fault}|{injected}|{}|{}|{}|{outcome}",
            self.ok + self.failed.len(),
            self.failed.len(),
            self.retried
        );
    }
}

/// Continuous load from `threads` clients until stopped.
pub struct Load {
    stop: Arc<AtomicBool>,
    handles: Vec<std::thread::JoinHandle<LoadReport>>,
}

impl Load {
    pub fn start(addr: &Addr, threads: usize, keep_alive: bool) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let t0 = Instant::now();
        let handles = (0..threads)
            .map(|_| {
                let addr = addr.clone();
                let stop = stop.clone();
                std::thread::spawn(move || client(&addr, keep_alive, &stop, t0))
            })
            .collect();
        Load { stop, handles }
    }

    pub fn finish(self) -> LoadReport {
        self.stop.store(true, Ordering::SeqCst);
        let mut total = LoadReport::default();
        for h in self.handles {
            let r = h.join().unwrap();
            total.ok += r.ok;
            total.retried += r.retried;
            total.failed.extend(r.failed);
            total.answers.extend(r.answers);
        }
        total
    }
}

fn client(addr: &Addr, keep_alive: bool, stop: &AtomicBool, t0: Instant) -> LoadReport {
    let mut rep = LoadReport::default();
    let mut conn: Option<Box<dyn Conn>> = None;
    let deadline = Instant::now() + Duration::from_secs(120);
    while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
        let reused = conn.is_some();
        let attempt = |conn: &mut Option<Box<dyn Conn>>| -> Result<Value, String> {
            if conn.is_none() {
                let c = addr.connect().map_err(|e| format!("connect: {e}"))?;
                c.set_timeout(Duration::from_secs(10));
                *conn = Some(c);
            }
            let c = conn.as_mut().unwrap();
            let r = request(&mut **c, "/", !keep_alive);
            match r {
                Ok((v, keep)) => {
                    if !keep || !keep_alive {
                        *conn = None;
                    }
                    Ok(v)
                }
                Err(e) => {
                    *conn = None;
                    Err(e)
                }
            }
        };
        let mut result = attempt(&mut conn);
        if let Err(e) = &result {
            // A reused keep-alive connection the server closed meanwhile: no byte of a
            // response arrived, so the request was not processed; retry it once.
            let stale =
                e == "closed before response" || e.starts_with("write:") || e.contains("reset by peer");
            if reused && stale {
                rep.retried += 1;
                result = attempt(&mut conn);
            }
        }
        match result {
            Ok(v) => {
                rep.ok += 1;
                rep.answers.push((t0.elapsed().as_secs_f64(), v["generation"].as_i64().unwrap_or(-1)));
            }
            Err(e) => rep.failed.push(e),
        }
    }
    rep
}

/// A datagram socket standing in for systemd's `NOTIFY_SOCKET`.
pub struct NotifySink {
    pub path: PathBuf,
    sock: UnixDatagram,
    pub messages: Vec<String>,
}

impl NotifySink {
    pub fn new(dir: &TempDir) -> Self {
        let path = dir.path("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        NotifySink { path, sock, messages: Vec::new() }
    }

    /// Collects whatever is still queued (after the sender is gone).
    pub fn drain(&mut self) {
        let mut buf = vec![0u8; 8192];
        while let Ok(n) = self.sock.recv(&mut buf) {
            self.messages.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }

    /// Collects datagrams until one contains `needle`.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) {
        let end = Instant::now() + timeout;
        let mut buf = vec![0u8; 8192];
        loop {
            if self.messages.iter().any(|m| m.contains(needle)) {
                return;
            }
            assert!(Instant::now() < end, "no notify message with {needle:?}; got {:?}", self.messages);
            if let Ok(n) = self.sock.recv(&mut buf) {
                self.messages.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
    }
}

/// Live processes whose process group is `pgid` (a worker and whatever it started).
pub fn processes_in_group(pgid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            // pid (comm) state ppid pgrp ...; comm may contain spaces, so split after ')'.
            let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else { continue };
            let fields: Vec<&str> = rest.split_whitespace().collect();
            if fields.first() != Some(&"Z") && fields.get(2).and_then(|g| g.parse::<i32>().ok()) == Some(pgid)
            {
                out.push(pid);
            }
        }
    }
    out
}

/// Copies the shipped units into `units` (next to the drop-ins a test rendered there for app
/// `web`) and checks `herdsman@web.{socket,service}` with `systemd-analyze verify`, which
/// must print nothing (it warns with exit 0).
pub fn verify_units(units: &std::path::Path) {
    let repo = env!("CARGO_MANIFEST_DIR");
    let service = std::fs::read_to_string(format!("{repo}/units/herdsman@.service")).unwrap();
    std::fs::write(units.join("herdsman@.service"), service.replace("/usr/bin/herdsman", BIN)).unwrap();
    std::fs::copy(format!("{repo}/units/herdsman@.socket"), units.join("herdsman@.socket")).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(units.join("herdsman@web.socket"))
        .arg(units.join("herdsman@web.service"))
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.trim().is_empty(), "systemd-analyze verify: {text}");
}
