//! Parsers for the value types shared by the command line and the config file: durations,
//! signals, worker counts, listen addresses and readiness modes.
//!
//! Each parser fails with a [`ValueError`] that says what was wrong and what is allowed; the
//! caller adds the key or flag (a [`Problem`](super::Problem)), so every problem names where it
//! came from.

use std::net::{SocketAddr, ToSocketAddrs};
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

use nix::sys::signal::Signal;

/// Why a value cannot be used. Each message quotes the value and names what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    #[error("invalid duration {input:?} ({reason}); use a number with a unit, e.g. 500ms, 2s, 1m")]
    Duration { input: String, reason: String },
    #[error("duration {0:?} is too long; the maximum is 1y (365.25 days), e.g. 30s or 10m")]
    DurationTooLong(String),
    #[error(
        "unknown or unusable signal {0:?}; use a name like SIGTERM, TERM, SIGINT or SIGQUIT, or `message` (PM2's shutdown message, for Node apps)"
    )]
    Signal(String),
    #[error(
        "invalid worker count {0:?}; use a number N > 0, 0/\"auto\"/\"max\" for one per CPU, or -K for CPUs minus K"
    )]
    WorkerCount(String),
    #[error("{0} workers is more than the limit of {MAX_WORKERS}; use at most {MAX_WORKERS}")]
    TooManyWorkers(String),
    #[error("invalid value {0:?}; use a whole number greater than 0")]
    NotPositive(String),
    #[error("invalid unix socket address {0:?}; use an absolute path: unix:/run/app.sock")]
    UnixPath(String),
    #[error("invalid port in listen address {0:?}; use a port 0-65535, e.g. :8080")]
    Port(String),
    #[error("invalid listen address {0:?} (no port); {LISTEN_FORMS}")]
    NoPort(String),
    #[error("listen address {0:?} resolves to nothing; {LISTEN_FORMS}")]
    Unresolved(String),
    #[error("invalid listen address {input:?} ({reason}); {LISTEN_FORMS}")]
    Listen { input: String, reason: String },
    #[error(
        "invalid metrics address {0:?}; use HOST:PORT (127.0.0.1:9464), [V6]:PORT ([::1]:9464) or unix:/path (unix:/run/app-metrics.sock)"
    )]
    Metrics(String),
    #[error("invalid balance mode {0:?}; use \"shared\", \"steer\" or \"sticky\"")]
    Balance(String),
    #[error("invalid bind interception mode {0:?}; use \"auto\", \"on\" or \"off\"")]
    BindIntercept(String),
    #[error("invalid value {0:?}; use \"rollback\" or \"keep\"")]
    OnFailure(String),
    #[error("invalid log format {0:?}; use \"text\" or \"json\" (one JSON object per line)")]
    LogFormat(String),
    #[error(
        "invalid readiness mode {0:?}; use \"auto\", \"listen\", \"notify\" or \"alive:DURATION\" (e.g. alive:1s)"
    )]
    Ready(String),
    #[error("invalid memory size {0:?}; use a number with K, M, G or T (e.g. 512M, 1.5G)")]
    Size(String),
    #[error("memory size {0:?} is too large; the maximum is 1024T")]
    SizeTooLarge(String),
    #[error("memory size {0:?} must be greater than 0")]
    SizeZero(String),
    #[error("invalid environment entry {0:?}; use KEY=VALUE with a non-empty KEY without '='")]
    EnvEntry(String),
    #[error(
        "{0:?} is set by herdsman for every worker and cannot be set here; remove it (reserved: {reserved}, HERDSMAN_*)",
        reserved = RESERVED_ENV.join(", ")
    )]
    EnvReserved(String),
    #[error("the value of {0:?} contains a NUL byte, which no program can receive; remove it")]
    EnvNul(String),
    #[error("invalid app name {0:?}; use 1-64 letters, digits, '-', '_' or '.' (not starting with '.')")]
    Name(String),
}

/// The forms `--listen` accepts, for its messages.
const LISTEN_FORMS: &str =
    "use HOST:PORT (127.0.0.1:8080), :PORT (all addresses), [V6]:PORT ([::1]:8080) or unix:/path";

/// How a worker proves it is ready to serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ReadyMode {
    /// The worker sends `READY=1` to `NOTIFY_SOCKET`.
    Notify,
    /// The worker is ready once it has stayed alive this long.
    Alive(Duration),
    /// The worker is ready when it calls `listen()` on one of herdsman's sockets (through
    /// the bind filter, see `intercept`), or [`LISTEN_SKIPPED`] after it bound herdsman's
    /// socket without calling `listen()` (gunicorn skips it on a listening socket).
    Listen,
    /// `Listen` for a worker that binds herdsman's address itself, `alive:1s` for one that
    /// does not (bound or not by then).
    Auto,
}

/// How long after binding herdsman's socket a worker that never calls `listen()` is ready.
pub const LISTEN_SKIPPED: Duration = Duration::from_secs(1);

impl std::fmt::Display for ReadyMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadyMode::Notify => f.write_str("notify"),
            ReadyMode::Alive(d) => write!(f, "alive:{}", humantime::format_duration(*d)),
            ReadyMode::Listen => f.write_str("listen"),
            ReadyMode::Auto => f.write_str("auto"),
        }
    }
}

/// A socket to bind when not socket-activated.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    /// `:PORT`: every address of both families where the system has IPv6 (`[::]:PORT` with
    /// `IPV6_V6ONLY` off), else `0.0.0.0:PORT`; `ListenStream=PORT` in a socket unit.
    AnyAddress(u16),
    Unix(PathBuf),
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "{a}"),
            ListenAddr::AnyAddress(port) => write!(f, ":{port}"),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// The requested number of workers, before the CPU count is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum WorkerCount {
    Fixed(NonZeroUsize),
    /// Number of CPUs minus this many (at least 1).
    CpusMinus(usize),
}

/// The most workers one app may have, wherever the number comes from (`workers`, `-w`,
/// `herdsman scale`, SIGTTIN). Each costs the supervisor three file descriptors (twice that
/// during a roll-out), which the fd limit must cover (the unit's `LimitNOFILE=`).
pub const MAX_WORKERS: usize = 4096;

/// The error for a worker count above [`MAX_WORKERS`].
pub fn too_many_workers(n: usize) -> String {
    ValueError::TooManyWorkers(n.to_string()).to_string()
}

/// As written in a config file: `4`, `auto`, `-2` (what [`workers`] reads back).
impl std::fmt::Display for WorkerCount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WorkerCount::Fixed(n) => write!(f, "{n}"),
            WorkerCount::CpusMinus(0) => f.write_str("auto"),
            WorkerCount::CpusMinus(k) => write!(f, "-{k}"),
        }
    }
}

impl WorkerCount {
    /// The count on a machine with `cpus` CPUs (one per CPU is capped at [`MAX_WORKERS`] too).
    pub fn resolve(self, cpus: NonZeroUsize) -> NonZeroUsize {
        match self {
            WorkerCount::Fixed(n) => n,
            WorkerCount::CpusMinus(k) => {
                NonZeroUsize::new(cpus.get().saturating_sub(k).min(MAX_WORKERS)).unwrap_or(NonZeroUsize::MIN)
            }
        }
    }
}

/// The longest duration any setting or flag accepts: 1 year (humantime's `1y`, 365.25 days).
/// Anything longer is a typo, and the bound keeps every `Instant + Duration` far from overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(31_557_600);

pub fn duration(s: &str) -> Result<Duration, ValueError> {
    let d = humantime::parse_duration(s.trim())
        .map_err(|e| ValueError::Duration { input: s.to_string(), reason: e.to_string() })?;
    if d > MAX_DURATION {
        return Err(ValueError::DurationTooLong(s.to_string()));
    }
    Ok(d)
}

pub fn signal(s: &str) -> Result<Signal, ValueError> {
    let upper = s.trim().to_ascii_uppercase();
    let name = if upper.starts_with("SIG") { upper } else { format!("SIG{upper}") };
    name.parse::<Signal>()
        .ok()
        .filter(|sig| !matches!(sig, Signal::SIGKILL | Signal::SIGSTOP))
        .ok_or_else(|| ValueError::Signal(s.to_string()))
}

/// How a worker is asked to stop: a signal, or PM2's `'shutdown'` message over a Node
/// worker's IPC channel (`message`, see `ipc`). Written as the signal's name or `message`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopSignal {
    Signal(Signal),
    Message,
}

impl std::fmt::Display for StopSignal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StopSignal::Signal(s) => f.write_str(s.as_str()),
            StopSignal::Message => f.write_str("message"),
        }
    }
}

pub fn stop_signal(s: &str) -> Result<StopSignal, ValueError> {
    if s.trim().eq_ignore_ascii_case("message") {
        return Ok(StopSignal::Message);
    }
    signal(s).map(StopSignal::Signal)
}

/// As its name (`"SIGTERM"`, `"message"`), which is also how earlier versions wrote a plain
/// signal into an in-place upgrade's state.
impl serde::Serialize for StopSignal {
    fn serialize<S: serde::Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        ser.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for StopSignal {
    fn deserialize<D: serde::Deserializer<'de>>(de: D) -> Result<StopSignal, D::Error> {
        let name = String::deserialize(de)?;
        if name == "message" {
            return Ok(StopSignal::Message);
        }
        name.parse()
            .map(StopSignal::Signal)
            .map_err(|_| serde::de::Error::custom(format!("unknown stop signal {name:?}")))
    }
}

pub fn workers(s: &str) -> Result<WorkerCount, ValueError> {
    let t = s.trim();
    let bad = || ValueError::WorkerCount(s.to_string());
    match t {
        "auto" | "max" | "0" => return Ok(WorkerCount::CpusMinus(0)),
        _ => {}
    }
    if let Some(k) = t.strip_prefix('-') {
        return k.parse::<usize>().map(WorkerCount::CpusMinus).map_err(|_| bad());
    }
    // Digits only: anything bigger than usize is over the limit too, not "invalid".
    if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        match t.parse::<usize>() {
            Ok(n) if n <= MAX_WORKERS => {}
            _ => return Err(ValueError::TooManyWorkers(t.to_string())),
        }
    }
    t.parse::<usize>()
        .map_err(|_| bad())
        .map(|n| NonZeroUsize::new(n).map_or(WorkerCount::CpusMinus(0), WorkerCount::Fixed))
}

/// A positive whole number (`reload_batch`, `reload_surge`).
pub fn positive(s: &str) -> Result<NonZeroUsize, ValueError> {
    s.trim().parse::<NonZeroUsize>().map_err(|_| ValueError::NotPositive(s.to_string()))
}

pub fn listen(s: &str) -> Result<ListenAddr, ValueError> {
    let t = s.trim();
    if let Some(path) = t.strip_prefix("unix:") {
        if path.is_empty() || !path.starts_with('/') {
            return Err(ValueError::UnixPath(s.to_string()));
        }
        return Ok(ListenAddr::Unix(PathBuf::from(path)));
    }
    if let Ok(addr) = t.parse::<SocketAddr>() {
        return Ok(ListenAddr::Tcp(addr));
    }
    // `:8080` and `*:8080` (PM2, Go, Node style): all addresses.
    if let Some(port) = t.strip_prefix(':').or_else(|| t.strip_prefix("*:")) {
        return port.parse::<u16>().map(ListenAddr::AnyAddress).map_err(|_| ValueError::Port(s.to_string()));
    }
    if !t.contains(':') {
        return Err(ValueError::NoPort(s.to_string()));
    }
    match t.to_socket_addrs() {
        Ok(mut addrs) => {
            addrs.next().map(ListenAddr::Tcp).ok_or_else(|| ValueError::Unresolved(s.to_string()))
        }
        Err(e) => Err(ValueError::Listen { input: s.to_string(), reason: e.to_string() }),
    }
}

/// How new connections reach workers (`--balance`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Balance {
    /// One listening socket per address shared by every worker; the kernel wakes an acceptor.
    Shared,
    /// A socket per worker in one `SO_REUSEPORT` group; only ready, non-draining workers
    /// receive, chosen by the client's source port.
    Steer,
    /// Like `Steer`, but chosen by the client's address, so a client keeps its slot.
    Sticky,
}

impl std::fmt::Display for Balance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Balance::Shared => "shared",
            Balance::Steer => "steer",
            Balance::Sticky => "sticky",
        })
    }
}

pub fn balance(s: &str) -> Result<Balance, ValueError> {
    match s.trim() {
        "shared" => Ok(Balance::Shared),
        "steer" => Ok(Balance::Steer),
        "sticky" => Ok(Balance::Sticky),
        _ => Err(ValueError::Balance(s.to_string())),
    }
}

/// Whether workers' own `bind()` of herdsman's port gets herdsman's socket
/// (`--bind-intercept`, see `intercept`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BindIntercept {
    /// On where the kernel and the sandbox allow it (probed once at start), else off with a
    /// log line.
    #[default]
    Auto,
    /// On; the start fails when it cannot work.
    On,
    /// Off: a worker's own bind() of herdsman's port fails with `EADDRINUSE`.
    Off,
}

impl std::fmt::Display for BindIntercept {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BindIntercept::Auto => "auto",
            BindIntercept::On => "on",
            BindIntercept::Off => "off",
        })
    }
}

pub fn bind_intercept(s: &str) -> Result<BindIntercept, ValueError> {
    match s.trim() {
        "auto" => Ok(BindIntercept::Auto),
        "on" => Ok(BindIntercept::On),
        "off" => Ok(BindIntercept::Off),
        _ => Err(ValueError::BindIntercept(s.to_string())),
    }
}

/// The `--metrics` / `metrics` address: the same forms as `--listen`.
pub fn metrics_addr(s: &str) -> Result<ListenAddr, ValueError> {
    listen(s).map_err(|_| ValueError::Metrics(s.to_string()))
}

/// What to do with the slots a failed roll-out already moved to the new generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum OnFailure {
    /// Roll them back to the previous generation (a normal, readiness-gated roll-out).
    Rollback,
    /// Leave them on the new generation.
    Keep,
}

impl std::fmt::Display for OnFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            OnFailure::Rollback => "rollback",
            OnFailure::Keep => "keep",
        })
    }
}

/// How standalone output is written (`--log-format`, `log_format`); no effect under journald.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum LogFormat {
    /// `ID|APP | line` for worker lines, tracing's text for herdsman's events.
    #[default]
    Text,
    /// One JSON object per line (see `crate::logs::Record` and `crate::logging`).
    Json,
}

impl std::fmt::Display for LogFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        })
    }
}

pub fn log_format(s: &str) -> Result<LogFormat, ValueError> {
    match s.trim() {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        _ => Err(ValueError::LogFormat(s.to_string())),
    }
}

pub fn on_failure(s: &str) -> Result<OnFailure, ValueError> {
    match s.trim() {
        "rollback" => Ok(OnFailure::Rollback),
        "keep" => Ok(OnFailure::Keep),
        _ => Err(ValueError::OnFailure(s.to_string())),
    }
}

pub fn ready(s: &str) -> Result<ReadyMode, ValueError> {
    let t = s.trim();
    if t == "notify" {
        return Ok(ReadyMode::Notify);
    }
    if t == "alive" {
        return Ok(ReadyMode::Alive(Duration::from_secs(1)));
    }
    if t == "listen" {
        return Ok(ReadyMode::Listen);
    }
    if t == "auto" {
        return Ok(ReadyMode::Auto);
    }
    if let Some(d) = t.strip_prefix("alive:") {
        return duration(d).map(ReadyMode::Alive);
    }
    Err(ValueError::Ready(s.to_string()))
}

/// The largest memory size accepted: 1024T (1 PiB), far above any real machine.
pub const MAX_SIZE: u64 = 1 << 50;

/// A memory size: `512M`, `1G`, `300MB`, `1.5GiB`, `1048576` (bytes). K/M/G/T are powers of
/// 1024, as in PM2's `max_memory_restart`.
pub fn size(s: &str) -> Result<u64, ValueError> {
    let t = s.trim();
    let bad = || ValueError::Size(s.to_string());
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| bad())?;
    let mult: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        "T" | "TB" | "TIB" => 1 << 40,
        _ => return Err(bad()),
    };
    let bytes = n * mult as f64;
    if !bytes.is_finite() || bytes > MAX_SIZE as f64 {
        return Err(ValueError::SizeTooLarge(s.to_string()));
    }
    let bytes = bytes as u64;
    if bytes == 0 { Err(ValueError::SizeZero(s.to_string())) } else { Ok(bytes) }
}

/// A size as [`size`] reads it back: in K when it is whole kibibytes, else in bytes.
pub fn size_text(bytes: u64) -> String {
    if bytes % 1024 == 0 { format!("{}K", bytes >> 10) } else { bytes.to_string() }
}

/// `KEY=VALUE` from `--env` (and each entry of the file's `env` table).
pub fn env_pair(s: &str) -> Result<(String, String), ValueError> {
    match s.split_once('=') {
        Some((k, v)) if env_key_ok(k) => env_entry(k, v).map(|()| (k.to_string(), v.to_string())),
        _ => Err(ValueError::EnvEntry(s.to_string())),
    }
}

/// Variables herdsman sets for every worker (besides any `HERDSMAN_*`). A config that set
/// them too would put duplicates in the environment, and glibc and Python take the first one,
/// which would silently break socket activation or notification. `NODE_APP_INSTANCE` is PM2's
/// name for the worker id; `NODE_CHANNEL_*` name a Node worker's IPC channel (see `ipc`).
pub const RESERVED_ENV: &[&str] = &[
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "NODE_APP_INSTANCE",
    "NODE_CHANNEL_FD",
    "NODE_CHANNEL_SERIALIZATION_MODE",
];

pub fn env_key_reserved(k: &str) -> bool {
    RESERVED_ENV.contains(&k) || k.starts_with("HERDSMAN_")
}

/// Checks one worker environment entry whose key is well-formed: not a reserved key, no NUL
/// byte in the value (a program could not receive it).
pub fn env_entry(k: &str, v: &str) -> Result<(), ValueError> {
    if env_key_reserved(k) {
        return Err(ValueError::EnvReserved(k.to_string()));
    }
    if v.contains('\0') {
        return Err(ValueError::EnvNul(k.to_string()));
    }
    Ok(())
}

pub fn env_key_ok(k: &str) -> bool {
    !k.is_empty() && !k.contains('=') && !k.contains('\0')
}

/// App names end up in paths and systemd instance names.
pub fn name(s: &str) -> Result<String, ValueError> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !s.starts_with('.');
    if ok { Ok(s.to_string()) } else { Err(ValueError::Name(s.to_string())) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(v: usize) -> NonZeroUsize {
        NonZeroUsize::new(v).unwrap()
    }

    #[test]
    fn worker_counts_follow_the_cpu_rules() {
        let cpus = n(8);
        assert_eq!(workers("4").unwrap().resolve(cpus), n(4));
        for all in ["0", "auto", "max"] {
            assert_eq!(workers(all).unwrap().resolve(cpus), n(8));
        }
        assert_eq!(workers("-3").unwrap().resolve(cpus), n(5));
        assert_eq!(workers("-20").unwrap().resolve(cpus), n(1));
        assert!(workers("lots").is_err());
        assert_eq!(workers("4096").unwrap().resolve(cpus), n(MAX_WORKERS));
        for over in ["4097", "1000000", "99999999999999999999999"] {
            assert_eq!(workers(over), Err(ValueError::TooManyWorkers(over.to_string())));
        }
        assert_eq!(workers("max").unwrap().resolve(n(100_000)), n(MAX_WORKERS));
        assert!(workers("-x").is_err());
    }

    #[test]
    fn durations_and_signals_are_human() {
        assert_eq!(duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(duration("1m").unwrap(), Duration::from_secs(60));
        assert!(duration("soon").is_err());
        assert_eq!(signal("term").unwrap(), Signal::SIGTERM);
        assert_eq!(signal("SIGINT").unwrap(), Signal::SIGINT);
        assert!(signal("KILL").is_err());
        assert!(signal("SIGNOPE").is_err());
    }

    #[test]
    fn listen_addresses_cover_v4_v6_and_unix() {
        assert_eq!(listen("127.0.0.1:80").unwrap().to_string(), "127.0.0.1:80");
        assert_eq!(listen("[::1]:80").unwrap().to_string(), "[::1]:80");
        assert_eq!(listen("unix:/run/a.sock").unwrap(), ListenAddr::Unix("/run/a.sock".into()));
        assert!(listen("unix:rel.sock").is_err());
        assert!(listen("8080").is_err());
        // PM2/Go/Node style "all addresses".
        assert_eq!(listen(":8080").unwrap(), ListenAddr::AnyAddress(8080));
        assert_eq!(listen("*:0").unwrap(), ListenAddr::AnyAddress(0));
        assert_eq!(listen(":8080").unwrap().to_string(), ":8080");
        for bad in [":", ":http", ":65536", ":-1"] {
            let e = listen(bad).unwrap_err();
            assert_eq!(e, ValueError::Port(bad.to_string()));
            assert!(e.to_string().contains(":8080"), "the fix shows the form: {e}");
        }
    }

    #[test]
    fn memory_sizes() {
        assert_eq!(size("512M").unwrap(), 512 << 20);
        assert_eq!(size("1.5G").unwrap(), 3 << 29);
        assert_eq!(size("100").unwrap(), 100);
        assert!(size("lots").is_err());
        assert!(size("0M").is_err());
    }

    #[test]
    fn durations_and_sizes_are_bounded() {
        assert_eq!(duration("1y").unwrap(), MAX_DURATION);
        for huge in ["18446744073709551615s", "366d", "2y", "100000000000h"] {
            assert_eq!(duration(huge), Err(ValueError::DurationTooLong(huge.to_string())));
        }
        assert!(ready("alive:18446744073709551615s").is_err());
        assert_eq!(size("1024T").unwrap(), MAX_SIZE);
        for huge in ["1025T", "99999999999999999999999999999999999999G", "18446744073709551615"] {
            assert!(size(huge).is_err(), "{huge}");
        }
    }

    #[test]
    fn env_flags_may_not_set_what_herdsman_sets_nor_carry_nul() {
        for key in [
            "LISTEN_FDS",
            "LISTEN_PID",
            "LISTEN_FDNAMES",
            "NOTIFY_SOCKET",
            "WATCHDOG_USEC",
            "WATCHDOG_PID",
            "HERDSMAN_WORKER_ID",
            "NODE_APP_INSTANCE",
            "NODE_CHANNEL_FD",
        ] {
            assert_eq!(env_pair(&format!("{key}=1")), Err(ValueError::EnvReserved(key.to_string())));
        }
        assert_eq!(env_pair("A=x\0y"), Err(ValueError::EnvNul("A".to_string())));
        assert_eq!(env_pair("LISTEN=1").unwrap(), ("LISTEN".to_string(), "1".to_string()));
        assert_eq!(env_pair("herdsman_x=1").unwrap().0, "herdsman_x");
    }

    #[test]
    fn ready_modes() {
        assert_eq!(ready("notify").unwrap(), ReadyMode::Notify);
        assert_eq!(ready("listen").unwrap(), ReadyMode::Listen);
        assert_eq!(ready("auto").unwrap(), ReadyMode::Auto);
        assert_eq!(ready("alive:2s").unwrap(), ReadyMode::Alive(Duration::from_secs(2)));
        assert!(ready("when-ready").is_err());
    }
}
