//! Starting one worker: its environment, its command, its fds, its output pipes.
//!
//! [`Launcher`] holds what every worker shares (the sockets, the base environment, herdsman's
//! notify socket, the output writer) and turns a [`Spec`] plus a slot id into a running
//! process. The unsafe fork/exec itself lives in `sys`.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::config::{ReadyMode, Settings, StopSignal};
use crate::credentials::Credentials;
use crate::output::{Origin, Output, Stream, Tail};
use crate::sys;

use crate::program::{ResolveError, is_executable, resolve};

/// Variables a worker must never inherit from the supervisor's environment: systemd's notify
/// and watchdog settings (a worker sending `STOPPING=1` there would stop the whole service),
/// the supervisor's own socket-activation variables, `JOURNAL_STREAM` (a worker's stdout
/// is our pipe, not the journal), and what herdsman sets per worker (a Node IPC channel named
/// by an inherited `NODE_CHANNEL_FD` would be some other process's descriptor number).
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
    "HERDSMAN_METRICS_SOCKET",
    "NODE_APP_INSTANCE",
    "NODE_CHANNEL_FD",
    "NODE_CHANNEL_SERIALIZATION_MODE",
    crate::env::STATE_VAR,
    crate::env::FD_STORE_VAR,
];

/// Why a worker could not be started. Each message names what was being done and on what.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("{path} (pinned for generation {generation}) is gone or no longer executable")]
    Gone { path: String, generation: u64 },
    #[error("cannot create a pipe: {0}")]
    Pipe(std::io::Error),
    #[error("cannot prepare the command: {0}")]
    Plan(sys::PlanError),
    #[error("cannot start {program}: {err}")]
    Start { program: String, err: std::io::Error },
    /// Without a pidfd nobody could watch, signal or reap it, so it was killed at once.
    #[error("cannot watch the new worker (pidfd_open: {0}), so it was killed")]
    Unwatchable(std::io::Error),
    /// A Node worker's IPC channel (see `ipc`), or moving a socket out of its way.
    #[error("cannot set up the IPC channel of a Node worker: {0}")]
    Channel(std::io::Error),
    /// No steered socket for it (see `steer`).
    #[error("{0}")]
    Steering(#[from] crate::steer::SteerError),
}

/// Why a generation could not be pinned (its directory or program is unusable).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PinError {
    #[error("working directory {dir}: {err}")]
    Cwd { dir: String, err: String },
    #[error("working directory {0} is not a directory")]
    NotADirectory(String),
    #[error("no command to run")]
    NoCommand,
    #[error(transparent)]
    Program(#[from] ResolveError),
    #[error("{dir}: {err}")]
    ProgramDir { dir: String, err: String },
}

/// Follow the worker user (from its passwd entry) when workers run as another user.
const USER_VARS: &[&str] = &["HOME", "USER", "LOGNAME"];

/// What a generation of workers runs. Immutable; shared by all workers of that generation.
///
/// A spec is *pinned* when the generation starts ([`Launcher::pin`]): the working directory is
/// resolved to its real path (symlinks followed) and the program to an absolute path whose
/// directory is real too. Every worker of the generation, crash restarts long after included,
/// runs from there, so a release layout (`/srv/app/current` → `releases/X`, switched by the
/// deploy tool) keeps old workers on their own release.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Spec {
    pub generation: u64,
    /// argv, as configured (`command[0]` is argv[0]).
    pub command: Vec<String>,
    /// The program to execute: absolute, its directory resolved.
    pub program: String,
    pub env: Vec<(String, String)>,
    /// The working directory, resolved to its real path.
    pub cwd: PathBuf,
    pub ready: ReadyMode,
    pub ready_timeout: Duration,
    pub stop_signal: StopSignal,
    pub stop_timeout: Duration,
    /// Workers must send `WATCHDOG=1` at least this often once ready.
    pub watchdog: Option<Duration>,
    /// A worker whose RSS stays above this many bytes is replaced.
    pub max_memory: Option<u64>,
    /// Run workers as this user (`--user`/`--group`); `None`: as the supervisor.
    pub user: Option<Credentials>,
}

impl Spec {
    /// Whether its workers get a Node IPC channel (see `ipc`).
    pub fn node_channel(&self) -> bool {
        crate::ipc::is_node(&self.program)
    }

    /// A spec for `s`, pinned against `path_env` (the `PATH` search) and the current directory.
    pub fn pin(s: &Settings, generation: u64, path_env: &[(String, String)]) -> Result<Self, PinError> {
        let dir = s.cwd.clone().unwrap_or_else(|| PathBuf::from("."));
        let cwd = std::fs::canonicalize(&dir)
            .map_err(|e| PinError::Cwd { dir: dir.display().to_string(), err: e.to_string() })?;
        if !cwd.is_dir() {
            return Err(PinError::NotADirectory(dir.display().to_string()));
        }
        let program = s.command.first().ok_or(PinError::NoCommand)?;
        let found = resolve(program, path_env, Some(&cwd))?;
        let full = if found.starts_with('/') { PathBuf::from(&found) } else { cwd.join(&found) };
        // Resolve the directories, not the file itself: a virtualenv's `bin/python` is a
        // symlink whose own location is what makes it a virtualenv.
        let program = match (full.parent(), full.file_name()) {
            (Some(parent), Some(name)) => {
                std::fs::canonicalize(parent).map(|p| p.join(name)).map_err(|e| PinError::ProgramDir {
                    dir: parent.display().to_string(),
                    err: e.to_string(),
                })?
            }
            _ => full,
        };
        Ok(Spec {
            generation,
            command: s.command.clone(),
            program: program.to_string_lossy().into_owned(),
            env: s.env.clone(),
            cwd,
            ready: s.ready,
            ready_timeout: s.ready_timeout,
            stop_signal: s.stop_signal,
            stop_timeout: s.stop_timeout,
            watchdog: s.watchdog,
            max_memory: s.max_memory,
            user: s.user.clone(),
        })
    }
}

/// A started worker process.
pub struct Launched {
    pub pid: i32,
    pub pidfd: OwnedFd,
    pub tail: Tail,
    /// The output pipes' read ends, shared with their readers (see `Worker::pipes`).
    pub pipes: [Arc<OwnedFd>; 2],
    /// Closed when both output streams reached end of file.
    pub output_done: mpsc::Receiver<()>,
    /// The supervisor's end of a Node worker's IPC channel (see `ipc`).
    pub channel: Option<OwnedFd>,
    /// Its bind filter's notification descriptor (see `intercept`), when interception is on.
    pub bind_notify: Option<OwnedFd>,
}

pub struct Launcher {
    app: Arc<str>,
    base_env: Vec<(String, String)>,
    fds: Vec<std::os::fd::RawFd>,
    fdnames: String,
    notify_socket: String,
    devnull: OwnedFd,
    output: Output,
    /// The bind interception filter every worker installs (see `intercept`); `None`: off.
    bind_filter: Option<Vec<libc::sock_filter>>,
    /// Workers outlive the supervisor (no parent-death signal): under systemd with the fd
    /// store, where a restarted supervisor re-adopts them (see `fdstore`).
    outlive: bool,
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
        Ok(Launcher {
            app,
            base_env,
            fds,
            fdnames,
            notify_socket,
            devnull,
            output,
            bind_filter: None,
            outlive: false,
        })
    }

    /// Workers from now on keep running when the supervisor dies (see `fdstore`).
    pub fn outlive_supervisor(&mut self) {
        self.outlive = true;
    }

    /// Workers from now on install the bind interception filter (see `intercept`).
    pub fn intercept_binds(&mut self) {
        self.bind_filter = Some(crate::intercept::filter());
    }

    /// From now on every worker also gets `fd` (after the others), named `name`: a socket
    /// learned from a worker's own bind (see `intercept`).
    pub fn add_socket(&mut self, fd: RawFd, name: &str) {
        self.fds.push(fd);
        if !self.fdnames.is_empty() {
            self.fdnames.push(':');
        }
        self.fdnames.push_str(name);
    }

    /// Whether workers install the bind interception filter.
    pub fn intercepts_binds(&self) -> bool {
        self.bind_filter.is_some()
    }

    /// Pins generation `generation` of `s` (see [`Spec`]).
    pub fn pin(&self, s: &Settings, generation: u64) -> Result<Spec, PinError> {
        let mut env = self.base_env.clone();
        env.extend(s.env.iter().cloned());
        Spec::pin(s, generation, &env)
    }

    /// The full environment of a worker, without `LISTEN_PID` (filled in after fork).
    fn env(&self, spec: &Spec, worker_id: usize, n_fds: usize) -> Vec<(String, String)> {
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
        env.push(("LISTEN_FDS".into(), n_fds.to_string()));
        env.push(("LISTEN_FDNAMES".into(), self.fdnames.clone()));
        env.push(("NOTIFY_SOCKET".into(), self.notify_socket.clone()));
        env.push(("HERDSMAN_WORKER_ID".into(), worker_id.to_string()));
        // PM2's name for the same number (its cluster mode's instance id).
        env.push(("NODE_APP_INSTANCE".into(), worker_id.to_string()));
        env.push(("HERDSMAN_GENERATION".into(), spec.generation.to_string()));
        env.push(("HERDSMAN_APP".into(), self.app.to_string()));
        if let Some(w) = spec.watchdog {
            env.push(("WATCHDOG_USEC".into(), w.as_micros().to_string()));
        }
        env
    }

    pub fn launch(
        &self,
        spec: &Spec,
        worker_id: usize,
        metrics: Option<&str>,
    ) -> Result<Launched, SpawnError> {
        self.launch_with(spec, worker_id, &self.fds, metrics)
    }

    /// Like [`Launcher::launch`], with `fds` (the worker's own steered sockets) at 3, 4, ...
    pub fn launch_with(
        &self,
        spec: &Spec,
        worker_id: usize,
        fds: &[RawFd],
        metrics: Option<&str>,
    ) -> Result<Launched, SpawnError> {
        let mut env = self.env(spec, worker_id, fds.len());
        env.extend(metrics.map(|m| ("HERDSMAN_METRICS_SOCKET".to_string(), m.to_string())));
        // A Node worker's IPC channel goes right after its sockets (see `place`).
        let channel = spec.node_channel().then(crate::ipc::pair).transpose().map_err(SpawnError::Channel)?;
        if channel.is_some() {
            env.push(("NODE_CHANNEL_FD".into(), (3 + fds.len()).to_string()));
            env.push(("NODE_CHANNEL_SERIALIZATION_MODE".into(), crate::ipc::SERIALIZATION.into()));
        }
        let path = &spec.program;
        if !is_executable(Path::new(path)) {
            return Err(SpawnError::Gone { path: path.clone(), generation: spec.generation });
        }
        let (out_r, out_w) = sys::pipe_cloexec().map_err(SpawnError::Pipe)?;
        let (err_r, err_w) = sys::pipe_cloexec().map_err(SpawnError::Pipe)?;
        let flat: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let stdio = [self.devnull.as_raw_fd(), out_w.as_raw_fd(), err_w.as_raw_fd()];
        let pid_vars: &[&str] =
            if spec.watchdog.is_some() { &["LISTEN_PID", "WATCHDOG_PID"] } else { &["LISTEN_PID"] };
        let placed = place(fds, channel.as_ref().map(|(_, theirs)| theirs)).map_err(SpawnError::Channel)?;
        let mut plan =
            sys::ExecPlan::new(path, &spec.command, &flat, pid_vars, Some(&spec.cwd), stdio, &placed.fds)
                .map_err(SpawnError::Plan)?;
        if let Some(u) = &spec.user {
            plan = plan.with_credentials(u.uid, u.gid, &u.groups);
        }
        if self.outlive {
            plan = plan.outliving_parent();
        }
        // Bind interception: the worker sends its filter's notification fd over this pair.
        let filter_pair = match &self.bind_filter {
            Some(prog) => {
                let (ours, theirs) = crate::intercept::channel().map_err(SpawnError::Pipe)?;
                plan = plan.with_bind_filter(prog.clone(), theirs).map_err(SpawnError::Pipe)?;
                Some(ours)
            }
            None => None,
        };
        let pid = plan.spawn().map_err(|err| SpawnError::Start { program: spec.command[0].clone(), err })?;
        drop(plan);
        drop((out_w, err_w, placed));
        // The worker holds its end now: ours must go, or its exit would never close the channel.
        let channel = channel.map(|(ours, _theirs)| ours);
        // Sent before the exec succeeded, so it is queued by now.
        let bind_notify = match filter_pair.as_ref().map(crate::intercept::receive).transpose() {
            Ok(n) => n,
            Err(e) => {
                sys::kill_and_reap_unwatched(pid);
                return Err(SpawnError::Start { program: spec.command[0].clone(), err: e });
            }
        };
        let pidfd = match sys::pidfd_open(pid) {
            Ok(fd) => fd,
            Err(e) => {
                // Without a pidfd nobody would watch, signal or reap it: it must not live on
                // unsupervised (and serve). It is our unreaped child, so its pid is still ours.
                sys::kill_and_reap_unwatched(pid);
                return Err(SpawnError::Unwatchable(e));
            }
        };
        let pipes = [Arc::new(out_r), Arc::new(err_r)];
        let tail = Tail::default();
        let output_done = self.capture(worker_id, pid, spec.generation, pipes.clone(), &tail);
        Ok(Launched { pid, pidfd, tail, pipes, output_done, channel, bind_notify })
    }

    /// Starts reading a worker's stdout and stderr (`pipes`); the receiver closes at the end
    /// of both. Also used for the workers a new image takes over in an upgrade.
    pub fn capture(
        &self,
        worker_id: usize,
        pid: i32,
        generation: u64,
        pipes: [Arc<OwnedFd>; 2],
        tail: &Tail,
    ) -> mpsc::Receiver<()> {
        let (done_tx, output_done) = mpsc::channel(1);
        let origin = Arc::new(Origin { app: self.app.clone(), worker_id, pid, generation });
        let [out_r, err_r] = pipes;
        self.output.capture(out_r, Stream::Stdout, origin.clone(), tail.clone(), done_tx.clone());
        self.output.capture(err_r, Stream::Stderr, origin, tail.clone(), done_tx);
        output_done
    }

    /// The output writer (to flush it before an upgrade).
    pub fn output(&self) -> &Output {
        &self.output
    }
}

/// A worker's descriptors from 3 up, as the child `dup2`s them: its sockets (`LISTEN_FDS`),
/// then its IPC channel if it has one (so the channel is `3 + LISTEN_FDS`).
struct Placed {
    fds: Vec<RawFd>,
    /// Temporary copies of sources that were in the way (closed after the spawn).
    _moved: Vec<OwnedFd>,
}

/// Which of `sources` (the descriptors for 3, 4, ... in order) lie inside the target range
/// `0..3 + sources.len()`: an earlier `dup2` could overwrite one before it is copied, and one
/// that is its own target would stay close-on-exec (`dup2` onto itself changes nothing). The
/// supervisor keeps its sockets at `3 + LISTEN_FDS` and up, so with a channel the first socket
/// is usually in the way, and the channel's fresh end may be anywhere.
fn crowded(sources: &[RawFd]) -> Vec<usize> {
    let end = 3 + sources.len() as RawFd;
    sources.iter().enumerate().filter(|(_, fd)| **fd < end).map(|(i, _)| i).collect()
}

/// Plans a worker's descriptors: the sockets, then the channel; every source in the way is
/// copied above the target range first (close-on-exec copies, closed with the plan).
fn place(sockets: &[RawFd], channel: Option<&OwnedFd>) -> std::io::Result<Placed> {
    let mut fds = sockets.to_vec();
    fds.extend(channel.map(AsRawFd::as_raw_fd));
    let end = 3 + fds.len() as RawFd;
    let mut moved = Vec::new();
    for i in crowded(&fds) {
        let copy = sys::dup_number_cloexec_from(fds[i], end)?;
        fds[i] = copy.as_raw_fd();
        moved.push(copy);
    }
    Ok(Placed { fds, _moved: moved })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_inside_the_target_range_are_crowded() {
        // One socket at 4 (the supervisor's floor for one socket), no channel: nothing moves.
        assert_eq!(crowded(&[4]), Vec::<usize>::new());
        // With a channel the range grows to 3..5: the socket at 4 is the channel's target, and
        // a channel end that landed on 3 would be overwritten by the socket's dup2.
        assert_eq!(crowded(&[4, 3]), vec![0, 1]);
        assert_eq!(crowded(&[5, 4, 9]), vec![0, 1]);
        assert_eq!(crowded(&[6, 7, 8]), Vec::<usize>::new());
        assert_eq!(crowded(&[7, 8, 20]), Vec::<usize>::new());
    }

    #[test]
    fn the_channel_lands_after_the_sockets_and_nothing_is_left_in_the_way() {
        use std::os::fd::AsRawFd;
        // Real descriptors, wherever the process has room: sockets and a channel end.
        let sockets: Vec<OwnedFd> = (0..2).map(|_| crate::ipc::pair().unwrap().0).collect();
        let (_, theirs) = crate::ipc::pair().unwrap();
        let raw: Vec<RawFd> = sockets.iter().map(AsRawFd::as_raw_fd).collect();
        let placed = place(&raw, Some(&theirs)).unwrap();
        assert_eq!(placed.fds.len(), 3);
        assert!(crowded(&placed.fds).is_empty(), "{:?}", placed.fds);
        // The same sockets, in order: a moved one is a copy of the same socket.
        let inode = |fd: RawFd| nix::sys::stat::fstat(fd).unwrap().st_ino;
        assert_eq!(inode(placed.fds[0]), inode(raw[0]));
        assert_eq!(inode(placed.fds[1]), inode(raw[1]));
        assert_eq!(inode(placed.fds[2]), inode(theirs.as_raw_fd()));
    }

    #[test]
    fn a_spec_is_pinned_to_the_real_directories_but_keeps_the_programs_own_symlink() {
        let root = std::env::temp_dir().join(format!("herdsman-pin-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let release = root.join("releases/1");
        std::fs::create_dir_all(release.join("bin")).unwrap();
        std::os::unix::fs::symlink("releases/1", root.join("current")).unwrap();
        // bin/server is a symlink (like a virtualenv's bin/python): its own path is kept.
        std::os::unix::fs::symlink("/bin/sh", release.join("bin/server")).unwrap();
        let cwd = root.join("current");
        let settings = |command: &str| Settings {
            command: vec![command.to_string()],
            cwd: Some(cwd.clone()),
            ..crate::config::load(
                None,
                &crate::config::Layer { command: vec!["sh".into()], ..Default::default() },
                std::num::NonZeroUsize::MIN,
            )
            .unwrap()
        };
        let env = vec![("PATH".to_string(), "/bin:/usr/bin".to_string())];
        let real = std::fs::canonicalize(&release).unwrap();
        let spec = Spec::pin(&settings("bin/server"), 7, &env).unwrap();
        assert_eq!(spec.cwd, real);
        assert_eq!(spec.program, real.join("bin/server").display().to_string());
        assert_eq!(spec.command, vec!["bin/server".to_string()], "argv[0] stays as written");
        let spec = Spec::pin(&settings(&cwd.join("bin/server").display().to_string()), 7, &env).unwrap();
        assert_eq!(spec.program, real.join("bin/server").display().to_string());
        let spec = Spec::pin(&settings("sh"), 7, &env).unwrap();
        assert!(spec.program.starts_with('/') && spec.program.ends_with("/sh"), "{}", spec.program);
        std::fs::remove_file(root.join("current")).unwrap();
        let err = Spec::pin(&settings("sh"), 8, &env).unwrap_err();
        assert!(matches!(err, PinError::Cwd { .. }), "{err}");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
