//! Parsers for the value types shared by the command line and the config file: durations,
//! signals, worker counts, listen addresses and readiness modes.
//!
//! Each parser returns a message that says what was wrong and what is allowed; the caller
//! prefixes it with the key or flag, so every problem names where it came from.

use std::net::{SocketAddr, ToSocketAddrs};
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

use nix::sys::signal::Signal;

/// How a worker proves it is ready to serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ReadyMode {
    /// The worker sends `READY=1` to `NOTIFY_SOCKET`.
    Notify,
    /// The worker is ready once it has stayed alive this long.
    Alive(Duration),
}

impl std::fmt::Display for ReadyMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadyMode::Notify => f.write_str("notify"),
            ReadyMode::Alive(d) => write!(f, "alive:{}", humantime::format_duration(*d)),
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
    too_many_workers_text(&n.to_string())
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

pub fn duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s.trim())
        .map_err(|e| format!("invalid duration {s:?} ({e}); use a number with a unit, e.g. 500ms, 2s, 1m"))?;
    if d > MAX_DURATION {
        return Err(format!("duration {s:?} is too long; the maximum is 1y (365.25 days), e.g. 30s or 10m"));
    }
    Ok(d)
}

pub fn signal(s: &str) -> Result<Signal, String> {
    let upper = s.trim().to_ascii_uppercase();
    let name = if upper.starts_with("SIG") { upper } else { format!("SIG{upper}") };
    name.parse::<Signal>().ok().filter(|sig| !matches!(sig, Signal::SIGKILL | Signal::SIGSTOP)).ok_or_else(
        || format!("unknown or unusable signal {s:?}; use a name like SIGTERM, TERM, SIGINT or SIGQUIT"),
    )
}

pub fn workers(s: &str) -> Result<WorkerCount, String> {
    let t = s.trim();
    let bad = || {
        format!(
            "invalid worker count {s:?}; use a number N > 0, 0/\"auto\"/\"max\" for one per CPU, or -K for CPUs minus K"
        )
    };
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
            _ => return Err(too_many_workers_text(t)),
        }
    }
    t.parse::<usize>()
        .map_err(|_| bad())
        .map(|n| NonZeroUsize::new(n).map_or(WorkerCount::CpusMinus(0), WorkerCount::Fixed))
}

fn too_many_workers_text(n: &str) -> String {
    format!("{n} workers is more than the limit of {MAX_WORKERS}; use at most {MAX_WORKERS}")
}

pub fn workers_int(n: i64) -> Result<WorkerCount, String> {
    workers(&n.to_string())
}

pub fn listen(s: &str) -> Result<ListenAddr, String> {
    let t = s.trim();
    if let Some(path) = t.strip_prefix("unix:") {
        if path.is_empty() || !path.starts_with('/') {
            return Err(format!(
                "invalid unix socket address {s:?}; use an absolute path: unix:/run/app.sock"
            ));
        }
        return Ok(ListenAddr::Unix(PathBuf::from(path)));
    }
    if let Ok(addr) = t.parse::<SocketAddr>() {
        return Ok(ListenAddr::Tcp(addr));
    }
    let hint = "use HOST:PORT (127.0.0.1:8080), :PORT (all addresses), [V6]:PORT ([::1]:8080) or unix:/path";
    // `:8080` and `*:8080` (PM2, Go, Node style): all addresses.
    if let Some(port) = t.strip_prefix(':').or_else(|| t.strip_prefix("*:")) {
        return port
            .parse::<u16>()
            .map(ListenAddr::AnyAddress)
            .map_err(|_| format!("invalid port in listen address {s:?}; use a port 0-65535, e.g. :8080"));
    }
    if !t.contains(':') {
        return Err(format!("invalid listen address {s:?} (no port); {hint}"));
    }
    match t.to_socket_addrs() {
        Ok(mut addrs) => addrs
            .next()
            .map(ListenAddr::Tcp)
            .ok_or_else(|| format!("listen address {s:?} resolves to nothing; {hint}")),
        Err(e) => Err(format!("invalid listen address {s:?} ({e}); {hint}")),
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

pub fn balance(s: &str) -> Result<Balance, String> {
    match s.trim() {
        "shared" => Ok(Balance::Shared),
        "steer" => Ok(Balance::Steer),
        "sticky" => Ok(Balance::Sticky),
        _ => Err(format!("invalid balance mode {s:?}; use \"shared\", \"steer\" or \"sticky\"")),
    }
}

/// The `--metrics` / `metrics` address: the same forms as `--listen`.
pub fn metrics_addr(s: &str) -> Result<ListenAddr, String> {
    listen(s).map_err(|_| {
        format!(
            "invalid metrics address {s:?}; use HOST:PORT (127.0.0.1:9464), [V6]:PORT ([::1]:9464) or unix:/path (unix:/run/app-metrics.sock)"
        )
    })
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

pub fn on_failure(s: &str) -> Result<OnFailure, String> {
    match s.trim() {
        "rollback" => Ok(OnFailure::Rollback),
        "keep" => Ok(OnFailure::Keep),
        _ => Err(format!("invalid value {s:?}; use \"rollback\" or \"keep\"")),
    }
}

pub fn ready(s: &str) -> Result<ReadyMode, String> {
    let t = s.trim();
    if t == "notify" {
        return Ok(ReadyMode::Notify);
    }
    if t == "alive" {
        return Ok(ReadyMode::Alive(Duration::from_secs(1)));
    }
    if let Some(d) = t.strip_prefix("alive:") {
        return duration(d).map(ReadyMode::Alive);
    }
    Err(format!("invalid readiness mode {s:?}; use \"notify\" or \"alive:DURATION\" (e.g. alive:1s)"))
}

/// The largest memory size accepted: 1024T (1 PiB), far above any real machine.
pub const MAX_SIZE: u64 = 1 << 50;

/// A memory size: `512M`, `1G`, `300MB`, `1.5GiB`, `1048576` (bytes). K/M/G/T are powers of
/// 1024, as in PM2's `max_memory_restart`.
pub fn size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let bad = || format!("invalid memory size {s:?}; use a number with K, M, G or T (e.g. 512M, 1.5G)");
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
        return Err(format!("memory size {s:?} is too large; the maximum is 1024T"));
    }
    let bytes = bytes as u64;
    if bytes == 0 { Err(format!("memory size {s:?} must be greater than 0")) } else { Ok(bytes) }
}

/// `KEY=VALUE` from `--env`.
pub fn env_pair(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if env_key_ok(k) => env_entry(k, v).map(|()| (k.to_string(), v.to_string())),
        _ => Err(format!("invalid environment entry {s:?}; use KEY=VALUE with a non-empty KEY without '='")),
    }
}

/// Variables herdsman sets for every worker (besides any `HERDSMAN_*`). A config that set
/// them too would put duplicates in the environment, and glibc and Python take the first one,
/// which would silently break socket activation or notification.
pub const RESERVED_ENV: &[&str] =
    &["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"];

pub fn env_key_reserved(k: &str) -> bool {
    RESERVED_ENV.contains(&k) || k.starts_with("HERDSMAN_")
}

/// Checks one worker environment entry whose key is well-formed: not a reserved key, no NUL
/// byte in the value (a program could not receive it).
pub fn env_entry(k: &str, v: &str) -> Result<(), String> {
    if env_key_reserved(k) {
        return Err(format!(
            "{k:?} is set by herdsman for every worker and cannot be set here; remove it (reserved: {}, HERDSMAN_*)",
            RESERVED_ENV.join(", ")
        ));
    }
    if v.contains('\0') {
        return Err(format!(
            "the value of {k:?} contains a NUL byte, which no program can receive; remove it"
        ));
    }
    Ok(())
}

pub fn env_key_ok(k: &str) -> bool {
    !k.is_empty() && !k.contains('=') && !k.contains('\0')
}

/// App names end up in paths and systemd instance names.
pub fn name(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !s.starts_with('.');
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!(
            "invalid app name {s:?}; use 1-64 letters, digits, '-', '_' or '.' (not starting with '.')"
        ))
    }
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
            let err = workers(over).unwrap_err();
            assert!(err.contains("limit of 4096"), "{over}: {err}");
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
            assert!(e.contains("invalid port") && e.contains(":8080"), "{bad}: {e}");
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
            let e = duration(huge).unwrap_err();
            assert!(e.contains("maximum"), "{huge}: {e}");
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
        ] {
            let e = env_pair(&format!("{key}=1")).unwrap_err();
            assert!(e.contains(key), "{e}");
        }
        assert!(env_pair("A=x\0y").unwrap_err().contains("NUL"));
        assert_eq!(env_pair("LISTEN=1").unwrap(), ("LISTEN".to_string(), "1".to_string()));
        assert_eq!(env_pair("herdsman_x=1").unwrap().0, "herdsman_x");
    }

    #[test]
    fn ready_modes() {
        assert_eq!(ready("notify").unwrap(), ReadyMode::Notify);
        assert_eq!(ready("alive:2s").unwrap(), ReadyMode::Alive(Duration::from_secs(2)));
        assert!(ready("when-ready").is_err());
    }
}

/// Serde for a signal as its name (`"SIGTERM"`), for the in-place upgrade's state.
pub mod signal_name {
    use nix::sys::signal::Signal;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(s: &Signal, ser: S) -> Result<S::Ok, S::Error> {
        ser.serialize_str(s.as_str())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(de: D) -> Result<Signal, D::Error> {
        let name = String::deserialize(de)?;
        name.parse().map_err(|_| serde::de::Error::custom(format!("unknown signal {name:?}")))
    }
}
