//! In-place upgrade: the supervisor re-executes itself (same pid) from a new binary and the
//! new image takes over every worker, socket and record without touching any of them.
//!
//! Theory of operation.
//! 1. `herdsman upgrade` (or `SIGUSR2`) asks the loop. The loop waits until nothing is in
//!    flight that the state does not describe (a roll-out, queued reloads, a health
//!    replacement, `scale` waiters); reloads asked for meanwhile are answered "retry after the
//!    upgrade" just before the exec, and the client resends them to the new image.
//!    Only root asks (or herdsman's own uid, when herdsman is not root: the control server
//!    refuses anyone else), and only for a binary nobody else could have written: it is
//!    opened once and checked on its descriptor ([`Candidate`]); that descriptor is what the
//!    check and the exec run.
//! 2. **Check**: the new binary runs as `herdsman upgrade-check` with the *current state* on its
//!    stdin (without descriptors, its secrets [`redacted`], no environment) and must answer one JSON line with its version and
//!    [`STATE_FORMAT`] within [`CHECK_TIMEOUT`]. Missing, not executable, crashing, hanging,
//!    unparsable or incompatible: refused with one line, nothing changed.
//! 3. **Exec**: every descriptor the state names is duplicated *without* close-on-exec (the
//!    originals stay close-on-exec; nothing about the sockets changes), the state goes into an
//!    inheritable memfd named by `HERDSMAN_UPGRADE_STATE`, and the loop calls `execveat` on the
//!    checked binary's descriptor with the original argv and environment. If `execve` fails, the duplicates and the memfd are closed
//!    and the old image carries on; the client gets the error.
//! 4. **Resume**: `main` sees `HERDSMAN_UPGRADE_STATE`, reads the whole state, adopts every listed
//!    descriptor at once ([`crate::sys::HandedOver`]: all open and listed once, or none taken),
//!    rebuilds the components from it, and only then starts the loop, which answers the
//!    upgrade client on its handed-over connection. The state is one JSON document validated by
//!    the same binary's check beforehand, so the new image either has all of it or exits
//!    (never half).
//!
//! What carries over: pid, workers (pids, slots, generations, pinned specs, restart counts,
//! back-off, timers), sockets (shared or steered, with their routing program), output pipes,
//! Node workers' IPC channels (see `ipc`), the workers' notify socket, the control socket, the metrics endpoint and counters, the last
//! reload, the worker fd limit. Timers are carried as `CLOCK_MONOTONIC` instants, which
//! `execve` does not reset.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::config::Layer;
pub use crate::env::STATE_VAR;
pub use crate::handoff::{Exporter, UpgradeError, valid_fd_name};

/// The layout of [`Handover`]; a new binary takes over only a state of a format it reads.
/// 2: the flags as a `config::Layer` (its environment a table), `file_workers` a worker count.
/// 3: the supervisor's core serialized as it is (`supervisor::Core`) and the descriptors in a
/// table by name ([`Handover::fds`]). Format 2 is still read (`supervisor::v2`).
pub const STATE_FORMAT: u32 = 3;
/// The previous format, still read: what the previous release writes.
pub const STATE_FORMAT_V2: u32 = 2;
/// How long the new binary's check may take (`HERDSMAN_UPGRADE_CHECK_TIMEOUT` overrides it).
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(5);
/// The hidden subcommand a candidate binary runs for the check.
pub const CHECK_COMMAND: &str = "upgrade-check";

/// herdsman's own version.
pub fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

/// Everything the new image needs, in one document: the supervisor's core as it is, the
/// driver's state beside it, and the descriptors as a table by name.
#[derive(Debug, Serialize, Deserialize)]
pub struct Handover {
    pub format: u32,
    /// The version of the image that wrote this.
    pub from_version: String,
    /// The path the next upgrade re-executes by default.
    pub binary: PathBuf,
    /// In-place upgrades since the service started, this one included.
    pub upgrades: u64,
    /// `CLOCK_MONOTONIC` (ns) just before `execve`, to measure the take-over.
    pub exec_at_ns: i64,
    /// What `herdsman run` was started with, for reloads that re-read the config.
    pub config: Option<PathBuf>,
    /// Its flags' layer (the settings given on the command line).
    pub overrides: Layer,
    /// The argv to re-execute with next time.
    pub argv: Vec<String>,
    /// The workers' soft fd limit (see `sys::raise_fd_limit`).
    pub worker_fd_limit: u64,
    /// The control socket (its descriptor: `control` in [`Handover::fds`]).
    pub control: ControlState,
    /// The metrics endpoint (its descriptor: `metrics-http`).
    pub metrics_http: Option<HttpState>,
    pub metrics: crate::metrics::carry::MetricsState,
    pub listeners: crate::listeners::ListenersState,
    pub steering: Option<crate::steer::SteeringState>,
    pub notify: crate::notify::NotifyState,
    /// The supervisor's core: plain data, serialized as it is.
    pub core: crate::supervisor::Core,
    /// Each live worker's last output lines, by pid (for failure reports).
    pub tails: BTreeMap<i32, Vec<String>>,
    /// Every descriptor, by name (see [`fd_name`]): across `execve` the value is the
    /// descriptor's number; the listening sockets', steering's and the notify socket's states
    /// refer to theirs by that value, which is then only a key (see [`keyed`]).
    pub fds: BTreeMap<String, RawFd>,
}

/// The names of a worker's descriptors in [`Handover::fds`]: `pidfd-<slot>-<generation>-<pid>`,
/// `out-…`, `err-…`, `ipc-…` (Node IPC channel), `bind-…` (bind filter).
pub fn fd_name(kind: &str, slot: usize, generation: u64, pid: i32) -> String {
    format!("{kind}-{slot}-{generation}-{pid}")
}

/// The fixed names in [`Handover::fds`].
pub const FD_CONTROL: &str = "control";
pub const FD_METRICS_HTTP: &str = "metrics-http";
pub const FD_REPLY: &str = "reply";

/// The descriptors the listening sockets', steering's and the notify socket's states refer to
/// by key (every name in `table` but the supervisor's own), taken out of `fds` (by name) into
/// a [`crate::sys::HandedOver`] keyed as those states expect.
pub fn keyed(
    table: &BTreeMap<String, RawFd>,
    fds: &mut BTreeMap<String, OwnedFd>,
    prefixes: &[&str],
) -> std::io::Result<crate::sys::HandedOver> {
    let mut by_key = std::collections::HashMap::new();
    for (name, key) in table {
        if !prefixes.iter().any(|p| name.starts_with(p)) {
            continue;
        }
        let fd = fds.remove(name).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, format!("descriptor {name} missing"))
        })?;
        by_key.insert(*key, fd);
    }
    Ok(crate::sys::HandedOver::from_owned(by_key))
}

/// The name prefixes [`keyed`] hands to the listeners, steering and the notify socket.
pub const KEYED_PREFIXES: &[&str] = &["listener-", "steer-", "notify-", "legacy-"];

/// The control socket.
#[derive(Debug, Serialize, Deserialize)]
pub struct ControlState {
    pub path: PathBuf,
    pub made_dir: Option<PathBuf>,
    pub uid: u32,
    pub group: Option<u32>,
}

/// The metrics endpoint.
#[derive(Debug, Serialize, Deserialize)]
pub struct HttpState {
    /// `Some(path)` for a unix socket, `None` for TCP.
    pub unix: Option<PathBuf>,
    pub address: String,
}

/// What the supervisor loop keeps for a future upgrade (from `main`).
#[derive(Debug)]
pub struct Carry {
    pub binary: PathBuf,
    pub config: Option<PathBuf>,
    pub overrides: Layer,
    pub argv: Vec<String>,
    /// The environment to re-execute with (herdsman's own, without [`STATE_VAR`]).
    pub env: Vec<(String, String)>,
    pub control: (OwnedFd, PathBuf, Option<PathBuf>, u32, Option<u32>),
    pub metrics_http: Option<(OwnedFd, Option<PathBuf>, String)>,
    /// How long the candidate's check may take.
    pub check_timeout: Duration,
}

pub fn monotonic_ns() -> i64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() * 1_000_000_000 + t.tv_nsec())
        .unwrap_or(0)
}

/// What the candidate binary answered.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckReport {
    pub version: String,
    pub state_format: u32,
}

/// The binary an upgrade runs, opened once (`O_PATH`, no symlink followed anywhere on its
/// path) and checked on that descriptor; the check and the `execve` both run *this*
/// descriptor, so nothing can be swapped in between.
///
/// Trusted means nobody but root (and herdsman's own user, when herdsman is not root) could
/// have written it: the file and every directory above it are owned by root or by herdsman's
/// user, and none is writable by group or others, except a directory with the sticky bit
/// (`/tmp`), where nobody else can rename or remove an entry they do not own (and the entry's
/// own owner is checked next). A symbolic link anywhere on the path is refused rather than
/// resolved (give the real path: `readlink -f`), as is `..`. The file must be an ELF
/// executable: a script's interpreter would be opened by its path, unchecked.
#[derive(Debug)]
pub struct Candidate {
    pub fd: OwnedFd,
    pub path: PathBuf,
}

impl Candidate {
    /// Opens and checks `path` for an upgrade of a herdsman running as `euid`.
    pub fn open(path: &std::path::Path, euid: u32) -> Result<Candidate, UpgradeError> {
        use std::path::Component;
        let shown = path.display().to_string();
        let untrusted = |why: String| UpgradeError::Untrusted { path: shown.clone(), why };
        if !path.is_absolute() {
            return Err(untrusted("the path is not absolute; give the full path".into()));
        }
        let owners = if euid == 0 { "root".to_string() } else { format!("root or uid {euid}") };
        let owned = |uid: u32| uid == 0 || uid == euid;
        let names: Vec<&std::ffi::OsStr> = path
            .components()
            .filter_map(|c| match c {
                Component::Normal(n) => Some(Ok(n)),
                Component::ParentDir => Some(Err(())),
                _ => None,
            })
            .collect::<Result<_, _>>()
            .map_err(|_| untrusted("the path contains `..`; give the real path (readlink -f)".into()))?;
        let io = |e: std::io::Error| UpgradeError::Prepare(format!("opening {shown}: {e}"));
        let mut at = std::path::PathBuf::from("/");
        let mut dir = crate::sys::open_path_nofollow(None, std::path::Path::new("/")).map_err(io)?;
        let Some((last, parents)) = names.split_last() else {
            return Err(UpgradeError::NotExecutable(shown));
        };
        for name in std::iter::once(None).chain(parents.iter().map(Some)) {
            if let Some(name) = name {
                at.push(name);
                dir = match crate::sys::open_path_nofollow(Some(dir.as_fd()), std::path::Path::new(name)) {
                    Ok(d) => d,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        return Err(UpgradeError::Missing(shown));
                    }
                    Err(e) => return Err(io(e)),
                };
            }
            let st = nix::sys::stat::fstat(dir.as_raw_fd()).map_err(|e| io(e.into()))?;
            let kind = st.st_mode & libc::S_IFMT;
            if kind == libc::S_IFLNK {
                return Err(untrusted(format!(
                    "{} is a symbolic link; give the real path (readlink -f)",
                    at.display()
                )));
            }
            if kind != libc::S_IFDIR {
                return Err(UpgradeError::Missing(shown));
            }
            if !owned(st.st_uid) {
                return Err(untrusted(format!(
                    "directory {} is owned by uid {}, not {owners}; install the binary where only {owners} can write",
                    at.display(),
                    st.st_uid
                )));
            }
            if st.st_mode & 0o022 != 0 && st.st_mode & libc::S_ISVTX == 0 {
                return Err(untrusted(format!(
                    "directory {} is writable by {}; install the binary where only {owners} can write",
                    at.display(),
                    if st.st_mode & 0o002 != 0 { "everyone" } else { "its group" }
                )));
            }
        }
        let fd = match crate::sys::open_path_nofollow(Some(dir.as_fd()), std::path::Path::new(last)) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(UpgradeError::Missing(shown)),
            Err(e) => return Err(io(e)),
        };
        let st = nix::sys::stat::fstat(fd.as_raw_fd()).map_err(|e| io(e.into()))?;
        let kind = st.st_mode & libc::S_IFMT;
        if kind == libc::S_IFLNK {
            return Err(untrusted("it is a symbolic link; give the real path (readlink -f)".into()));
        }
        if kind != libc::S_IFREG || st.st_mode & 0o111 == 0 {
            return Err(UpgradeError::NotExecutable(shown));
        }
        if !owned(st.st_uid) {
            return Err(untrusted(format!(
                "it is owned by uid {}, not {owners}; install it as {owners} (the package installs /usr/bin/herdsman)",
                st.st_uid
            )));
        }
        if st.st_mode & 0o022 != 0 {
            return Err(untrusted(format!(
                "it is writable by {}; chmod go-w it",
                if st.st_mode & 0o002 != 0 { "everyone" } else { "its group" }
            )));
        }
        // Read through the descriptor itself (not the path): the file checked above.
        let mut magic = [0u8; 4];
        let read = std::fs::File::open(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic));
        if read.is_err() || magic != *b"\x7fELF" {
            return Err(untrusted(
                "it is not an ELF executable (a script's interpreter would run unchecked); give an installed herdsman".into(),
            ));
        }
        Ok(Candidate { fd, path: path.to_path_buf() })
    }
}

/// The state the candidate's check reads: the whole document (the check proves the new
/// binary parses all of it), with every value that may be a secret replaced: the workers'
/// environment (config `env`, `-e`) and herdsman's own argv. The check needs none of them.
pub fn redacted(mut state: Handover) -> Handover {
    const HIDDEN: &str = "(redacted)";
    state.core.redact(HIDDEN);
    for kv in &mut state.overrides.env {
        let key = kv.split_once('=').map(|(k, _)| k.to_string()).unwrap_or_default();
        *kv = format!("{key}={HIDDEN}");
    }
    state.argv = state.argv.iter().take(1).cloned().collect();
    state
}

/// Runs the candidate's check with `state` on its stdin. Bounded by [`CHECK_TIMEOUT`]; never
/// blocks the loop (the child runs on a helper thread).
pub async fn check(
    path: PathBuf,
    fd: OwnedFd,
    state: Vec<u8>,
    timeout: Duration,
) -> Result<CheckReport, UpgradeError> {
    tokio::task::spawn_blocking(move || check_blocking(&path, &fd, &state, timeout))
        .await
        .unwrap_or_else(|e| Err(UpgradeError::Prepare(format!("the check thread failed: {e}"))))
}

fn check_blocking(
    path: &std::path::Path,
    fd: &OwnedFd,
    state: &[u8],
    timeout: Duration,
) -> Result<CheckReport, UpgradeError> {
    use std::io::{Read, Write};
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};
    let shown = path.display().to_string();
    // The checked file itself, through its descriptor (open in the child until its execve,
    // which resolves this name to that file): never its path again.
    // Waited for here (try_wait below): never reaped by the orphan sweep (see `reaper`).
    let (mut child, _waited) = crate::reaper::spawn_waited(
        Command::new(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .arg0(path)
            .arg(CHECK_COMMAND)
            // Nothing of herdsman's environment (ours names a descriptor of this image, and it
            // may hold secrets): only a standard PATH.
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0),
    )
    .map_err(|e| UpgradeError::CheckFailed {
        path: shown.clone(),
        how: format!("cannot run it: {e}"),
        detail: String::new(),
    })?;
    let mut stdin = child.stdin.take();
    let state = state.to_vec();
    // Feed the state from its own thread: a check that never reads must not block us.
    let feeder = std::thread::spawn(move || {
        if let Some(s) = stdin.as_mut() {
            let _ = s.write_all(&state);
        }
    });
    let mut out = child.stdout.take();
    let mut err = child.stderr.take();
    let reader = std::thread::spawn(move || {
        let mut o = Vec::new();
        let mut e = Vec::new();
        if let Some(s) = out.as_mut() {
            let _ = s.take(64 * 1024).read_to_end(&mut o);
        }
        if let Some(s) = err.as_mut() {
            let _ = s.take(64 * 1024).read_to_end(&mut e);
        }
        (o, e)
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            _ => {
                // The whole group: a script's children would keep the pipes open.
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(child.id() as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
                let _ = child.kill();
                let _ = child.wait();
                return Err(UpgradeError::CheckTimeout {
                    path: shown,
                    within: humantime::format_duration(timeout).to_string(),
                });
            }
        }
    };
    // Whatever the check left behind in its group goes too (it holds the output pipes).
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    let _ = feeder.join();
    let (stdout, stderr) = reader.join().unwrap_or_default();
    let first_err = String::from_utf8_lossy(&stderr)
        .lines()
        .find(|l| !l.trim().is_empty())
        .map(|l| format!(": {}", l.trim()))
        .unwrap_or_default();
    if !status.success() {
        let how = match status.code() {
            Some(c) => format!("exit status {c}"),
            None => "killed by a signal".to_string(),
        };
        return Err(UpgradeError::CheckFailed { path: shown, how, detail: first_err });
    }
    let line = String::from_utf8_lossy(&stdout);
    let report: CheckReport =
        serde_json::from_str(line.lines().next().unwrap_or("")).map_err(|_| UpgradeError::CheckFailed {
            path: shown.clone(),
            how: "no state-format report on its output".to_string(),
            detail: first_err,
        })?;
    if report.state_format != STATE_FORMAT {
        return Err(UpgradeError::Incompatible {
            path: shown,
            version: report.version,
            theirs: report.state_format,
            ours: STATE_FORMAT,
        });
    }
    Ok(report)
}

/// `herdsman upgrade-check`: reads a state from stdin and says whether this binary can take it
/// over (exit 0 and one JSON line) or not (a line on stderr, exit 78).
pub fn check_command(input: &mut impl std::io::Read) -> Result<CheckReport, String> {
    let mut buf = Vec::new();
    input.read_to_end(&mut buf).map_err(|e| format!("cannot read the state: {e}"))?;
    let (format, _state) = parse_with_format(&buf)?;
    Ok(CheckReport { version: version().to_string(), state_format: format })
}

/// Parses a state, refusing formats this binary does not read; a format-2 state (the previous
/// release's) is converted (see `supervisor::v2`).
pub fn parse(bytes: &[u8]) -> Result<Handover, String> {
    parse_with_format(bytes).map(|(_, h)| h)
}

/// [`parse`], with the format the state was written in.
pub fn parse_with_format(bytes: &[u8]) -> Result<(u32, Handover), String> {
    #[derive(Deserialize)]
    struct Head {
        format: u32,
    }
    let head: Head = serde_json::from_slice(bytes).map_err(|e| format!("unreadable upgrade state: {e}"))?;
    match head.format {
        STATE_FORMAT => serde_json::from_slice(bytes)
            .map(|h| (STATE_FORMAT, h))
            .map_err(|e| format!("unreadable upgrade state: {e}")),
        STATE_FORMAT_V2 => crate::supervisor::v2::convert(bytes).map(|h| (STATE_FORMAT_V2, h)),
        other => Err(format!(
            "upgrade state format {other} is not {STATE_FORMAT} (or {STATE_FORMAT_V2}), the ones this herdsman reads"
        )),
    }
}

/// Writes `state` into an inheritable memfd and re-executes `binary`. Returns only if
/// `execve` failed (then every duplicate is closed again by the drop of `exporter`).
pub fn exec(binary: &Candidate, state: &Handover, exporter: Exporter, carry: &Carry) -> UpgradeError {
    use std::io::{Seek, Write};
    let json = match serde_json::to_vec(state) {
        Ok(j) => j,
        Err(e) => return UpgradeError::Prepare(format!("cannot encode the state: {e}")),
    };
    let memfd = match crate::sys::inheritable_memfd("herdsman-upgrade") {
        Ok(m) => m,
        Err(e) => return UpgradeError::Prepare(format!("memfd_create: {e}")),
    };
    let mut file = std::fs::File::from(memfd);
    if let Err(e) = file.write_all(&json).and_then(|_| file.rewind()) {
        return UpgradeError::Prepare(format!("writing the state: {e}"));
    }
    let mut env: Vec<String> =
        carry.env.iter().filter(|(k, _)| k != STATE_VAR).map(|(k, v)| format!("{k}={v}")).collect();
    env.push(format!("{STATE_VAR}={}", file.as_raw_fd()));
    let path = binary.path.display().to_string();
    let err = crate::sys::execve_fd(binary.fd.as_fd(), &carry.argv, &env);
    drop(exporter);
    drop(file);
    UpgradeError::Exec { path, err: err.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_of_another_format_is_refused_by_name_before_it_is_read() {
        let err = parse(br#"{"format": 99}"#).unwrap_err();
        assert!(err.contains("format 99"), "{err}");
        assert!(parse(b"not json").unwrap_err().starts_with("unreadable upgrade state"));
        let err = parse(format!(r#"{{"format": {STATE_FORMAT}}}"#).as_bytes()).unwrap_err();
        assert!(err.contains("missing field"), "{err}");
    }
}
