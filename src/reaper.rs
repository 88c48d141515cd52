//! Reaping orphans: what `herdsman run` does as a container's PID 1 (PM2's `pm2-runtime`,
//! tini's job), or as a child subreaper when it is not PID 1.
//!
//! A worker that leaves a background process (`sh -c 'helper & exec server'`, a double fork)
//! orphans it when it exits; the orphan is re-parented to the nearest *reaper*: PID 1 of the
//! PID namespace, or the closest ancestor that set `PR_SET_CHILD_SUBREAPER`. In a container
//! herdsman is PID 1: without reaping, every such orphan stays a `<defunct>` zombie (a pid
//! and a process-table slot) forever.
//!
//! # Never stealing a worker's exit status
//! Workers are watched through pidfds: a task per worker peeks at the exit with
//! `waitid(P_PIDFD, WNOWAIT)`, and the supervisor loop reaps it later with
//! `waitid(P_PIDFD, WEXITED)` (see `supervisor/exits.rs`). A blanket `waitpid(-1)` here would
//! reap a worker first: its status lost (the loop would see `ECHILD`) and, worse, its pid free
//! for reuse while the loop still signals it. `waitid(P_ALL, WNOWAIT)` only peeks at the first
//! zombie in the kernel's list, which may be a worker waiting for its own reap: orphans behind
//! it would not be seen.
//!
//! So [`sweep`] lists this process's children (`/proc/self/task/*/children`, every thread's,
//! or a scan of `/proc/*/stat` where the kernel lacks that file) and reaps by pid, with
//! `waitid(P_PID, pid, WEXITED|WNOHANG)`, only the children that are neither
//! - a worker: the caller passes the supervisor's worker table. The sweep runs *on the loop*
//!   (a `SIGCHLD` becomes a request to it), the only code that starts and reaps workers; a
//!   worker is in the table from the moment its fork returns until the loop reaps it, so no
//!   worker pid can be seen outside the table; nor
//! - a child that other code waits for itself (today: the candidate binary that an in-place
//!   upgrade checks, started from another thread): [`spawn_waited`] holds a lock from before
//!   its fork until its pid is registered, and [`sweep`] only runs holding that lock (it skips
//!   this round if the lock is busy: the next `SIGCHLD`, at the latest that child's own exit,
//!   sweeps again). So no such pid is ever unknown to a sweep.
//!
//! `/proc` must be this PID namespace's (a container's always is): its pids are what
//! `waitid` takes. Where it is not (`unshare --pid` without `--mount-proc`), nothing is reaped.
//!
//! A zombie's pid cannot be reused until it is reaped, so a pid listed as a child and not
//! known is an orphan, or one that was ours and alive (`WNOHANG` then leaves it alone).
//! Nothing is lost between `SIGCHLD`s: each sweep reaps every zombie present, and an orphan
//! that was already a zombie when re-parented gets its parent a `SIGCHLD` too.
//!
//! # When
//! PID 1 always reaps. When herdsman is not PID 1, [`become_reaper`] makes it a subreaper
//! for a standalone `herdsman run` (a developer's shell, a container whose entrypoint is a
//! shell script that runs herdsman), but not under systemd: there the service manager is the
//! reaper already, and the unit's cgroup accounts for (and, at stop, kills) every process of
//! the app, orphans included.

use std::collections::BTreeSet;
use std::process::{Child, Command};
use std::sync::Mutex;

use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid};
use nix::unistd::Pid;

/// Children that other code waits for itself (see the module doc).
static WAITED: Mutex<BTreeSet<i32>> = Mutex::new(BTreeSet::new());

/// Whether this process reaps orphans, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reaper {
    /// PID 1 of a PID namespace (a container's entrypoint): orphans come to us by definition.
    Pid1,
    /// `PR_SET_CHILD_SUBREAPER` set: orphans of our descendants come to us.
    Subreaper,
    /// Not a reaper (under systemd, or the kernel refused): orphans go to our ancestors.
    Off,
}

/// Makes this process a reaper where it should be one (see the module doc): PID 1 already
/// is; otherwise a subreaper unless `under_systemd`.
pub fn become_reaper(under_systemd: bool) -> Reaper {
    if std::process::id() == 1 {
        if !proc_is_ours() {
            tracing::warn!(
                "PID 1, but /proc belongs to another PID namespace: orphans cannot be reaped; mount a /proc of this namespace (unshare --mount-proc)"
            );
            return Reaper::Off;
        }
        return Reaper::Pid1;
    }
    if under_systemd {
        return Reaper::Off;
    }
    match nix::sys::prctl::set_child_subreaper(true) {
        Ok(()) => Reaper::Subreaper,
        Err(e) => {
            tracing::warn!(
                "cannot become a child subreaper ({e}): orphans of workers go to the system's init"
            );
            Reaper::Off
        }
    }
}

/// Reaps every zombie child that is not a worker (`is_worker`) and not waited for by other
/// code; returns the pids reaped and how each ended. `None` when a [`spawn_waited`] was in
/// progress (sweep again on the next `SIGCHLD`).
pub fn sweep(is_worker: impl Fn(i32) -> bool) -> Option<Vec<(i32, WaitStatus)>> {
    let waited = match WAITED.try_lock() {
        Ok(g) => g,
        Err(std::sync::TryLockError::WouldBlock) => return None,
        Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
    };
    let mut reaped = Vec::new();
    if !proc_is_ours() {
        // Its pids are not ours: a listed pid could name another of our children here.
        return Some(reaped);
    }
    for pid in children() {
        if is_worker(pid) || waited.contains(&pid) {
            continue;
        }
        match waitid(Id::Pid(Pid::from_raw(pid)), WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG) {
            Ok(WaitStatus::StillAlive) | Err(_) => {}
            Ok(status) => reaped.push((pid, status)),
        }
    }
    Some(reaped)
}

/// Spawns `cmd` as a child that the caller waits for itself (`Child::wait`/`try_wait`): a
/// [`sweep`] never reaps it while the returned guard lives. Drop the guard after the wait.
pub fn spawn_waited(cmd: &mut Command) -> std::io::Result<(Child, Waited)> {
    let mut waited = WAITED.lock().unwrap_or_else(|p| p.into_inner());
    let child = cmd.spawn()?;
    let pid = child.id() as i32;
    waited.insert(pid);
    Ok((child, Waited(pid)))
}

/// A child registered by [`spawn_waited`]; unregistered on drop.
#[derive(Debug)]
pub struct Waited(i32);

impl Drop for Waited {
    fn drop(&mut self) {
        WAITED.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.0);
    }
}

/// Whether `/proc` shows this PID namespace (a container mounts its own; `unshare --pid`
/// without `--mount-proc` leaves the parent's, whose pids are not the ones `waitid` takes).
pub fn proc_is_ours() -> bool {
    let me = std::fs::read_link("/proc/self").ok().and_then(|p| p.to_str()?.parse::<u32>().ok());
    me == Some(std::process::id())
}

/// This process's children: every thread's (an orphan is re-parented to any live thread of
/// the reaper), from `/proc/self/task/*/children`; else (a kernel without
/// `CONFIG_PROC_CHILDREN`) the processes whose parent is us, from `/proc/*/stat`.
fn children() -> Vec<i32> {
    let mut out = Vec::new();
    let mut listed = false;
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for t in tasks.flatten() {
            if let Ok(text) = std::fs::read_to_string(t.path().join("children")) {
                listed = true;
                out.extend(text.split_ascii_whitespace().filter_map(|p| p.parse::<i32>().ok()));
            }
        }
    }
    if !listed {
        let me = std::process::id() as i32;
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
            if std::fs::read_to_string(e.path().join("stat")).is_ok_and(|s| parent_of(&s) == Some(me)) {
                out.push(pid);
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// The parent pid in a `/proc/PID/stat` line (after the command name, which may hold spaces
/// and parentheses: everything up to the last `)`).
fn parent_of(stat: &str) -> Option<i32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_ascii_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn proc_shows_our_pid_namespace_here() {
        assert!(proc_is_ours());
    }

    #[test]
    fn parent_of_reads_past_a_command_with_spaces_and_parentheses() {
        assert_eq!(parent_of("42 (a) b) c) Z 7 42 42 0"), Some(7));
        assert_eq!(parent_of("42 (sleep) S 1 42"), Some(1));
        assert_eq!(parent_of("garbage"), None);
    }

    fn zombie(pid: i32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|s| s[s.rfind(')').unwrap() + 1..].split_ascii_whitespace().next() == Some("Z"))
    }

    fn wait_zombie(pid: i32) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !zombie(pid) {
            assert!(Instant::now() < deadline, "{pid} never became a zombie");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_sweep_reaps_strangers_but_never_a_worker_or_a_child_waited_for_elsewhere() {
        // Three children that exit at once: a "worker", one spawned as waited-for, a stranger.
        let mut worker = Command::new("sh").args(["-c", "exit 3"]).spawn().unwrap();
        let (mut waited, guard) = spawn_waited(Command::new("sh").args(["-c", "exit 4"])).unwrap();
        // Reaped by the sweep under test, not by a wait().
        #[allow(clippy::zombie_processes)]
        let stranger = Command::new("sh").args(["-c", "exit 5"]).spawn().unwrap();
        let (w, k, s) = (worker.id() as i32, waited.id() as i32, stranger.id() as i32);
        for p in [w, k, s] {
            wait_zombie(p);
        }
        // Other tests of this binary may have children of their own: only ours are looked at.
        let reaped = sweep(|pid| pid == w || ![w, k, s].contains(&pid)).expect("not busy");
        assert_eq!(reaped.iter().map(|(p, _)| *p).collect::<Vec<_>>(), [s]);
        assert_eq!(reaped[0].1, WaitStatus::Exited(Pid::from_raw(s), 5));
        // Their own waiters still get their statuses.
        assert_eq!(worker.wait().unwrap().code(), Some(3));
        assert_eq!(waited.wait().unwrap().code(), Some(4));
        drop(guard);
        assert!(!WAITED.lock().unwrap().contains(&k));
    }
}
