//! Learning that a worker exited: the pidfd watcher task and the words for what happened.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use nix::sys::signal::{Signal, killpg};
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid};
use nix::unistd::Pid;
use tokio::sync::mpsc;

use super::{Event, OUTPUT_GRACE};
use crate::sys;
use crate::worker::Worker;

/// Waits for a worker to exit (pidfd readable), learns how *without reaping it*, kills what
/// is left of its process group, waits briefly for the end of its output so the report has
/// its last lines, then tells the loop, which reaps it (`Host::reap`).
///
/// Killing the group before the reap is what makes it safe: while the leader is an unreaped
/// zombie its pid cannot be handed out again, so the pgid still names the worker's group and
/// never an unrelated one.
///
/// A `readopted` worker (after a supervisor restart) is not our child: PID 1 reaps it at once,
/// and once reaped its pid may be a new group leader's (another service's main process), so
/// its pgid is never signalled; its group's leftovers are found in this unit's cgroup instead
/// ([`kill_group_members`]).
pub(super) fn watch_exit(
    pid: i32,
    pidfd: Arc<OwnedFd>,
    mut output_done: mpsc::Receiver<()>,
    events: mpsc::UnboundedSender<Event>,
    readopted: bool,
) {
    tokio::spawn(async move {
        let peek = |fd: &OwnedFd| {
            waitid(Id::PIDFd(fd.as_fd()), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT | WaitPidFlag::WNOHANG)
        };
        let status = match sys::watch_readable(pidfd.clone()) {
            Ok(afd) => loop {
                match afd.readable().await {
                    Ok(mut guard) => {
                        guard.clear_ready();
                        match peek(&pidfd) {
                            Ok(WaitStatus::StillAlive) => continue,
                            Ok(s) => break s,
                            // Re-adopted after a supervisor restart: not our child, PID 1
                            // reaps it; the status is unknown (`Worker::readopted`).
                            Err(nix::errno::Errno::ECHILD) => {
                                break WaitStatus::Exited(Pid::from_raw(pid), -1);
                            }
                            Err(e) => {
                                tracing::error!("waitid(pidfd of {pid}): {e}");
                                break WaitStatus::Exited(Pid::from_raw(pid), -1);
                            }
                        }
                    }
                    Err(e) => {
                        tracing::error!("waiting for worker {pid}: {e}");
                        break WaitStatus::Exited(Pid::from_raw(pid), -1);
                    }
                }
            },
            Err(e) => {
                tracing::error!("watching worker {pid}: {e}");
                waitid(Id::PIDFd(pidfd.as_fd()), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT)
                    .unwrap_or(WaitStatus::Exited(Pid::from_raw(pid), -1))
            }
        };
        if readopted {
            // Reaped by PID 1 already, maybe: its pgid may name a foreign group by now.
            match kill_group_members(pid) {
                Ok(0) => {}
                Ok(n) => tracing::debug!("killed {n} process(es) left in the group of worker {pid}"),
                Err(e) => tracing::debug!("not killing what worker {pid} left in its group: {e}"),
            }
        } else {
            // Whatever the worker left in its group goes with it (the leader is still unreaped).
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        }
        let _ = tokio::time::timeout(OUTPUT_GRACE, output_done.recv()).await;
        let _ = events.send(Event::Exited { pid, status });
    });
}

/// Whether the process behind `pidfd` has exited (its pidfd is readable: exited, or already
/// reaped), without waiting. An error counts as exited (no group signal by pgid then).
pub(crate) fn pidfd_exited(pidfd: BorrowedFd<'_>) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut fds = [PollFd::new(pidfd, PollFlags::POLLIN)];
    poll(&mut fds, PollTimeout::ZERO).map_or(true, |n| n > 0)
}

/// SIGKILLs, through pidfds, the processes of this unit's cgroup whose process group is
/// `pgid` (what a re-adopted worker left behind), never by pgid: each one's pidfd is opened
/// first, then its pgid read and its membership checked again while the pidfd shows it alive
/// (so the pid still names that very process). Returns how many were killed; an error when
/// the cgroup cannot be read (standalone: the leftovers stay).
pub(crate) fn kill_group_members(pgid: i32) -> std::io::Result<usize> {
    let cg = crate::fdstore::cgroup::Cgroup::own()?;
    let me = std::process::id() as i32;
    let mut killed = 0;
    for pid in cg.procs()? {
        if pid == me || pid == pgid {
            continue;
        }
        let Ok(fd) = sys::pidfd_open(pid) else { continue };
        if nix::unistd::getpgid(Some(Pid::from_raw(pid))) != Ok(Pid::from_raw(pgid)) {
            continue;
        }
        // Still alive (so `pid` was not reused under the getpgid) and still ours.
        if pidfd_exited(fd.as_fd()) || !cg.procs()?.contains(&pid) {
            continue;
        }
        if sys::pidfd_signal(&fd, Signal::SIGKILL as i32).is_ok() {
            killed += 1;
        }
    }
    Ok(killed)
}

pub(super) fn describe_exit(status: WaitStatus) -> String {
    match status {
        WaitStatus::Exited(_, code) => format!("exited with status {code}"),
        WaitStatus::Signaled(_, sig, core) => {
            format!("was killed by {}{}", sig.as_str(), if core { " (core dumped)" } else { "" })
        }
        other => format!("ended ({other:?})"),
    }
}

pub(super) fn failure_report(w: &Worker, tail: &[String], reason: &str) -> String {
    format!(
        "worker {} (pid {}, generation {}) {}",
        w.slot,
        w.pid,
        w.spec.generation,
        failure_detail(w, tail, reason)
    )
}

/// `reason`, then the worker's last output lines and a hint when they name a known mistake:
/// what `status` shows as the slot's `last_error`. `tail`: its last output lines.
pub(super) fn failure_detail(w: &Worker, tail: &[String], reason: &str) -> String {
    let mut report = reason.to_string();
    if !tail.is_empty() {
        report.push_str("; last output: ");
        report.push_str(&tail.join(" ⏎ "));
    }
    let intercepted = w.intercepted;
    if tail
        .iter()
        .any(|l| l.contains("EADDRINUSE") || l.to_ascii_lowercase().contains("address already in use"))
    {
        report.push_str("; the app binds its own port: serve on the inherited socket at fd 3 instead (see docs/servers.md)");
        report.push_str(if intercepted {
            ", or make it bind the port herdsman serves (bind interception then gives it herdsman's socket), or set --listen to the app's port"
        } else {
            ", or turn bind interception on (--bind-intercept)"
        });
    } else if !intercepted && reason == "exited with status 0 before it was ready" {
        // Express 5 hands EADDRINUSE to its listen callback: the app just ends, silently.
        report.push_str("; if the app binds its own port, its bind may have failed with EADDRINUSE unreported (Express 5 does this): turn bind interception on (--bind-intercept; see docs/servers.md) or serve on the inherited socket at fd 3");
    }
    report
}

/// A worker that died of the very stop signal herdsman sent it had no handler for it: it was
/// cut off mid-request instead of draining. Says what to do about it.
pub(super) fn stop_signal_hint(w: &Worker, status: WaitStatus) -> Option<String> {
    let WaitStatus::Signaled(_, sig, _) = status else { return None };
    // With `message` no signal was sent (the SIGTERM fallback for a closed channel says so).
    let crate::config::StopSignal::Signal(stop) = w.spec.stop_signal else { return None };
    if sig != stop || sig == nix::sys::signal::Signal::SIGKILL {
        return None;
    }
    let name = sig.as_str();
    // A Node worker (it has PM2's channel) may be written for PM2's shutdown message instead.
    let message =
        if w.has_channel { ", or --stop-signal message if it handles PM2's 'shutdown' message" } else { "" };
    Some(if sig == nix::sys::signal::Signal::SIGTERM {
        format!(
            "the stop signal it was sent: unless it drained first and re-raised it (as Puma does), it has no {name} handler and in-flight requests were cut off: make it drain on {name}, or pass --stop-signal SIGINT if it handles SIGINT (PM2's stop signal){message}"
        )
    } else {
        format!(
            "the stop signal it was sent: unless it drained first and re-raised it, it has no {name} handler and in-flight requests were cut off: make it drain on {name}, or pass the signal it handles with --stop-signal"
        )
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::CommandExt;
    use std::process::{Child, Command};
    use std::time::{Duration, Instant};

    fn sleeper(group: i32) -> Child {
        Command::new("sleep").arg("60").process_group(group).spawn().unwrap()
    }

    fn ended(c: &mut Child) -> bool {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if c.try_wait().unwrap().is_some() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    /// What a re-adopted worker leaves in its group is killed through the cgroup, by pidfd:
    /// only the members of that group, never the leader's pid itself nor another group.
    #[test]
    fn a_re_adopted_workers_group_members_are_killed_through_the_cgroup_and_no_one_else() {
        let mut leader = sleeper(0);
        let pgid = leader.id() as i32;
        let mut member = sleeper(pgid);
        let mut foreign = sleeper(0);
        match super::kill_group_members(pgid) {
            Ok(n) => {
                assert_eq!(n, 1);
                assert!(ended(&mut member));
                assert!(leader.try_wait().unwrap().is_none());
                assert!(foreign.try_wait().unwrap().is_none());
            }
            // No cgroup to list (standalone): nothing is killed.
            Err(e) => {
                eprintln!("no cgroup here ({e}): nothing killed");
                assert!(member.try_wait().unwrap().is_none());
            }
        }
        for c in [&mut leader, &mut member, &mut foreign] {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
