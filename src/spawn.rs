//! Starting one worker: its environment, its command, its fds, its output pipes.
//!
//! [`Launcher`] holds what every worker shares (the sockets, the base environment, herdsman's
//! notify socket, the output writer) and turns a [`Spec`] plus a slot id into a running
//! process. The unsafe fork/exec itself lives in `sys`.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::sync::mpsc;

use crate::config::{ReadyMode, Settings};
use crate::credentials::Credentials;
use crate::output::{Origin, Output, Stream, Tail};
use crate::sys;

/// Variables a worker must never inherit from the supervisor's environment: systemd's notify
/// and watchdog settings (a worker sending `STOPPING=1` there would stop the whole service),
/// the supervisor's own socket-activation variables, and `JOURNAL_STREAM` (a worker's stdout
/// is our pipe, not the journal).
const SCRUBBED: &[&str] = &[
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "JOURNAL_STREAM",
    "HERDSMAN_WORKER_ID",
    "HERDSMAN_GENERATION",
];

/// Follow the worker user (from its passwd entry) when workers run as another user.
const USER_VARS: &[&str] = &["HOME", "USER", "LOGNAME"];

/// What a generation of workers runs. Immutable; shared by all workers of that generation.
#[derive(Debug)]
pub struct Spec {
    pub generation: u64,
    pub command: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<PathBuf>,
    pub ready: ReadyMode,
    pub ready_timeout: Duration,
    pub stop_signal: Signal,
    pub stop_timeout: Duration,
    /// Workers must send `WATCHDOG=1` at least this often once ready.
    pub watchdog: Option<Duration>,
    /// A worker whose RSS stays above this many bytes is replaced.
    pub max_memory: Option<u64>,
    /// Run workers as this user (`--user`/`--group`); `None`: as the supervisor.
    pub user: Option<Credentials>,
}

impl Spec {
    pub fn new(s: &Settings, generation: u64) -> Self {
        Spec {
            generation,
            command: s.command.clone(),
            env: s.env.clone(),
            cwd: s.cwd.clone(),
            ready: s.ready,
            ready_timeout: s.ready_timeout,
            stop_signal: s.stop_signal,
            stop_timeout: s.stop_timeout,
            watchdog: s.watchdog,
            max_memory: s.max_memory,
            user: s.user.clone(),
        }
    }
}

/// A started worker process.
pub struct Launched {
    pub pid: i32,
    pub pidfd: OwnedFd,
    pub tail: Tail,
    /// Closed when both output streams reached end of file.
    pub output_done: mpsc::Receiver<()>,
}

pub struct Launcher {
    app: Arc<str>,
    base_env: Vec<(String, String)>,
    fds: Vec<std::os::fd::RawFd>,
    fdnames: String,
    notify_socket: String,
    devnull: OwnedFd,
    output: Output,
}

impl Launcher {
    pub fn new(
        app: Arc<str>,
        base_env: Vec<(String, String)>,
        fds: Vec<std::os::fd::RawFd>,
        fdnames: String,
        notify_socket: String,
        output: Output,
    ) -> std::io::Result<Self> {
        let devnull = OwnedFd::from(std::fs::File::open("/dev/null")?);
        Ok(Launcher { app, base_env, fds, fdnames, notify_socket, devnull, output })
    }

    /// The full environment of a worker, without `LISTEN_PID` (filled in after fork).
    fn env(&self, spec: &Spec, worker_id: usize) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = self
            .base_env
            .iter()
            .filter(|(k, _)| !SCRUBBED.contains(&k.as_str()))
            .filter(|(k, _)| !spec.env.iter().any(|(sk, _)| sk == k))
            .filter(|(k, _)| spec.user.is_none() || !USER_VARS.contains(&k.as_str()))
            .cloned()
            .collect();
        if let Some(u) = &spec.user {
            // The worker user's own identity, unless the config sets these explicitly.
            for (k, v) in [("HOME", &u.home), ("USER", &u.user), ("LOGNAME", &u.user)] {
                if !spec.env.iter().any(|(sk, _)| sk == k) {
                    env.push((k.into(), v.clone()));
                }
            }
        }
        env.extend(spec.env.iter().cloned());
        env.push(("LISTEN_FDS".into(), self.fds.len().to_string()));
        env.push(("LISTEN_FDNAMES".into(), self.fdnames.clone()));
        env.push(("NOTIFY_SOCKET".into(), self.notify_socket.clone()));
        env.push(("HERDSMAN_WORKER_ID".into(), worker_id.to_string()));
        env.push(("HERDSMAN_GENERATION".into(), spec.generation.to_string()));
        env.push(("HERDSMAN_APP".into(), self.app.to_string()));
        if let Some(w) = spec.watchdog {
            env.push(("WATCHDOG_USEC".into(), w.as_micros().to_string()));
        }
        env
    }

    pub fn launch(&self, spec: &Spec, worker_id: usize) -> Result<Launched, String> {
        let env = self.env(spec, worker_id);
        let path = resolve(&spec.command[0], &env, spec.cwd.as_deref())?;
        let (out_r, out_w) = sys::pipe_cloexec().map_err(|e| format!("cannot create a pipe: {e}"))?;
        let (err_r, err_w) = sys::pipe_cloexec().map_err(|e| format!("cannot create a pipe: {e}"))?;
        let flat: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let stdio = [self.devnull.as_raw_fd(), out_w.as_raw_fd(), err_w.as_raw_fd()];
        let pid_vars: &[&str] =
            if spec.watchdog.is_some() { &["LISTEN_PID", "WATCHDOG_PID"] } else { &["LISTEN_PID"] };
        let mut plan =
            sys::ExecPlan::new(&path, &spec.command, &flat, pid_vars, spec.cwd.as_deref(), stdio, &self.fds)
                .map_err(|e| format!("cannot prepare the command: {e}"))?;
        if let Some(u) = &spec.user {
            plan = plan.with_credentials(u.uid, u.gid, &u.groups);
        }
        let pid = plan.spawn().map_err(|e| format!("cannot start {}: {e}", spec.command[0]))?;
        drop((out_w, err_w));
        let pidfd = sys::pidfd_open(pid).map_err(|e| format!("pidfd_open({pid}): {e}"))?;
        let tail = Tail::default();
        let (done_tx, output_done) = mpsc::channel(1);
        let origin = Arc::new(Origin { app: self.app.clone(), worker_id, pid, generation: spec.generation });
        self.output.capture(out_r, Stream::Stdout, origin.clone(), tail.clone(), done_tx.clone());
        self.output.capture(err_r, Stream::Stderr, origin, tail.clone(), done_tx);
        Ok(Launched { pid, pidfd, tail, output_done })
    }
}

/// Finds the program like `execvp` would, but before forking (so a typo is a clear error, and
/// the child does no path search).
pub fn resolve(program: &str, env: &[(String, String)], cwd: Option<&Path>) -> Result<String, String> {
    let executable = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        let full = match cwd {
            Some(dir) if !program.starts_with('/') => dir.join(program),
            _ => PathBuf::from(program),
        };
        return if executable(&full) {
            Ok(program.to_string())
        } else if full.exists() {
            Err(format!("{program} is not an executable file; check its permissions (chmod +x)"))
        } else {
            Err(format!("command not found: {program}"))
        };
    }
    let path = env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str())
        .unwrap_or("/usr/local/bin:/usr/bin:/bin");
    path.split(':')
        .filter(|d| d.starts_with('/'))
        .map(|d| Path::new(d).join(program))
        .find(|p| executable(p))
        .map(|p| p.to_string_lossy().into_owned())
        .ok_or_else(|| format!("command not found: {program} (searched PATH={path})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_are_found_on_path_or_rejected_clearly() {
        let env = vec![("PATH".to_string(), "/nonexistent:/bin:/usr/bin".to_string())];
        assert!(resolve("sh", &env, None).unwrap().ends_with("/sh"));
        assert!(resolve("no-such-program-xyz", &env, None).unwrap_err().contains("command not found"));
        let plain = std::env::temp_dir().join(format!("herdsman-not-exec-{}", std::process::id()));
        std::fs::write(&plain, "#!/bin/sh\n").unwrap();
        let err = resolve(plain.to_str().unwrap(), &env, None).unwrap_err();
        std::fs::remove_file(&plain).unwrap();
        assert!(err.contains("not an executable"), "{err}");
    }
}
