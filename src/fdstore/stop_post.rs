//! `herdsman stop-post UNIT`: the unit's `ExecStopPost=` helper. Under `KillMode=process`
//! systemd kills only the main process, so whatever herdsman left in the cgroup (a worker that
//! ignored its stop signal past `TimeoutStopSec=`, its children) is this helper's to kill —
//! unless an automatic restart follows, whose herdsman re-adopts the workers through the fd
//! store.
//!
//! It runs after the supervisor is gone and needs none of its state: only what systemd tells
//! an `ExecStopPost=` command (`SERVICE_RESULT`, `EXIT_CODE`, `EXIT_STATUS`; 252 sets no
//! `$UNIT_NAME`, hence the `%n` argument) and whether a job is queued for the unit
//! (`systemctl show -p Job -p Restart UNIT`). Measured on systemd 252: after a crash the
//! result is `signal`/`core-dump`/`exit-code`/`watchdog`/`oom-kill` and no job is queued;
//! after `systemctl stop`/`restart` a job is (also when the stop timed out: `timeout`).
//!
//! The decision ([`decide`]):
//!
//! | job queued | `Restart=` | `SERVICE_RESULT` | exit status | verdict |
//! |---|---|---|---|---|
//! | yes (stop, restart) | any | any | any | **kill** |
//! | no | `no` | any | any | **kill** (no restart follows) |
//! | no | other | missing | any | **kill** (not run by systemd as `ExecStopPost=`) |
//! | no | other | `success` | any | **kill** (a clean exit is never restarted by `on-failure`) |
//! | no | other | `exit-code` | 78 or 71 (`RestartPreventExitStatus=`) | **kill** |
//! | no | other | `start-limit-hit`, `skip-condition` | any | **kill** |
//! | no | other | `signal`, `core-dump`, `exit-code`, `watchdog`, `oom-kill`, `timeout`, `protocol`, `resources`, other | other | **keep**: systemd restarts the service |
//!
//! `systemctl restart` **replaces** the workers: the restart job is queued when the helper
//! runs, so it kills what is left (nothing, normally: herdsman's graceful stop already
//! stopped every worker) and the next herdsman starts fresh ones, as before. Re-adoption is
//! for crashes only; the zero-downtime way to new workers is `systemctl reload`.
//!
//! It never kills outside the unit's cgroup: it refuses to run unless its own cgroup is
//! `UNIT`'s (so `herdsman stop-post x.service` typed in a shell kills nothing), and kills
//! through checked pidfds ([`super::cgroup::sweep`]).

use std::collections::BTreeSet;
use std::time::Duration;

use super::cgroup::{self, Cgroup};

/// What systemd told the helper.
#[derive(Debug, Clone, Copy, Default)]
pub struct Facts<'a> {
    /// `$SERVICE_RESULT`.
    pub service_result: Option<&'a str>,
    /// `$EXIT_STATUS` (a number for `EXIT_CODE=exited`, a signal name otherwise).
    pub exit_status: Option<&'a str>,
    /// A job (stop, restart, start) is queued for the unit.
    pub job_queued: bool,
    /// The unit's `Restart=` (`None`: unknown).
    pub restart: Option<&'a str>,
}

/// Kill what is left, or keep it for the restarted supervisor; with the reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Kill(&'static str),
    Keep(&'static str),
}

/// Exit statuses after which `Restart=on-failure` does not restart (the unit's
/// `RestartPreventExitStatus=`).
const NO_RESTART_STATUS: [i32; 2] = [crate::exit::CONFIG, crate::exit::OS];

/// The decision table of the module doc.
pub fn decide(f: &Facts<'_>) -> Verdict {
    if f.job_queued {
        return Verdict::Kill("a stop or restart job is queued");
    }
    if f.restart == Some("no") {
        return Verdict::Kill("Restart=no: no restart follows");
    }
    let status: Option<i32> = f.exit_status.and_then(|s| s.trim().parse().ok());
    match f.service_result.map(str::trim).filter(|r| !r.is_empty()) {
        None => Verdict::Kill("no SERVICE_RESULT: not run as ExecStopPost="),
        Some("success") => Verdict::Kill("the service stopped cleanly: no restart follows"),
        Some("exit-code") if status.is_some_and(|s| NO_RESTART_STATUS.contains(&s)) => {
            Verdict::Kill("an exit status that RestartPreventExitStatus= excludes from restarting")
        }
        Some("start-limit-hit" | "skip-condition") => Verdict::Kill("no restart follows"),
        Some(_) => {
            Verdict::Keep("the service failed and systemd restarts it: the next herdsman re-adopts them")
        }
    }
}

/// Why the helper failed.
#[derive(Debug, thiserror::Error)]
pub enum StopPostError {
    #[error(
        "stop-post: this process is in cgroup {cgroup:?}, not {unit:?}'s; it only runs as the unit's ExecStopPost=/usr/bin/herdsman stop-post %n"
    )]
    NotTheUnit { unit: String, cgroup: String },
    #[error("stop-post: cannot find this process's cgroup: {0}")]
    Cgroup(std::io::Error),
    #[error("stop-post: {left} process(es) still in {unit} after SIGKILL: {pids}")]
    Left { unit: String, left: usize, pids: String },
}

impl StopPostError {
    /// The exit code: a misuse is a usage error, the rest a failure.
    pub fn code(&self) -> i32 {
        match self {
            StopPostError::NotTheUnit { .. } => crate::exit::USAGE,
            _ => crate::exit::FAILURE,
        }
    }
}

/// Parses `systemctl show -p Job -p Restart` output: (a job is queued, `Restart=`).
pub fn parse_show(text: &str) -> (bool, Option<String>) {
    let mut job = false;
    let mut restart = None;
    for line in text.lines() {
        match line.split_once('=') {
            Some(("Job", v)) => job = !v.trim().is_empty(),
            Some(("Restart", v)) => restart = Some(v.trim().to_string()),
            _ => {}
        }
    }
    (job, restart)
}

/// Runs the helper for `unit` with systemd's variables (`var`): one line on what it did.
pub fn run(unit: &str, var: impl Fn(&str) -> Option<String>) -> Result<String, StopPostError> {
    let cg = Cgroup::own().map_err(StopPostError::Cgroup)?;
    if cg.leaf() != unit {
        return Err(StopPostError::NotTheUnit { unit: unit.to_string(), cgroup: cg.path });
    }
    let shown = std::process::Command::new("systemctl")
        .args(["show", "-p", "Job", "-p", "Restart", "--", unit])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .output();
    let (job_queued, restart) = match shown {
        Ok(out) if out.status.success() => parse_show(&String::from_utf8_lossy(&out.stdout)),
        // Cannot ask: kill, as after a stop (a leak is worse than one cold restart).
        Ok(out) => {
            crate::errln!(
                "herdsman: stop-post: systemctl show {unit} failed ({}); killing what is left",
                out.status
            );
            (true, None)
        }
        Err(e) => {
            crate::errln!("herdsman: stop-post: cannot run systemctl ({e}); killing what is left");
            (true, None)
        }
    };
    let (result, status) = (var("SERVICE_RESULT"), var("EXIT_STATUS"));
    let facts = Facts {
        service_result: result.as_deref(),
        exit_status: status.as_deref(),
        job_queued,
        restart: restart.as_deref(),
    };
    let why = format!(
        "SERVICE_RESULT={} EXIT_STATUS={} job {}",
        result.as_deref().unwrap_or("-"),
        status.as_deref().unwrap_or("-"),
        if job_queued { "queued" } else { "none" }
    );
    match decide(&facts) {
        Verdict::Keep(reason) => {
            let n = cg.procs().map(|p| p.len().saturating_sub(1)).unwrap_or(0);
            Ok(format!("stop-post: {unit}: kept {n} process(es) ({why}): {reason}"))
        }
        Verdict::Kill(reason) => {
            let swept = cgroup::sweep(&cg, &BTreeSet::new(), Duration::from_secs(5))
                .map_err(StopPostError::Cgroup)?;
            if !swept.left.is_empty() {
                let pids = swept.left.iter().map(i32::to_string).collect::<Vec<_>>().join(" ");
                return Err(StopPostError::Left { unit: unit.to_string(), left: swept.left.len(), pids });
            }
            Ok(format!(
                "stop-post: {unit}: killed {} process(es) left over ({why}): {reason}",
                swept.killed.len()
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(result: Option<&str>, status: Option<&str>, job: bool, restart: Option<&str>) -> bool {
        matches!(
            decide(&Facts { service_result: result, exit_status: status, job_queued: job, restart }),
            Verdict::Kill(_)
        )
    }

    #[test]
    fn the_decision_table() {
        let on_failure = Some("on-failure");
        // A queued job (stop, restart; a stop that timed out) always kills.
        for r in ["success", "timeout", "signal", "exit-code", "core-dump", "watchdog", "oom-kill"] {
            assert!(verdict(Some(r), None, true, on_failure), "{r} with a job");
        }
        // A crash with no job keeps the workers for the restarted supervisor.
        for r in ["signal", "core-dump", "watchdog", "oom-kill", "timeout", "protocol", "resources"] {
            assert!(!verdict(Some(r), Some("KILL"), false, on_failure), "{r} without a job");
        }
        assert!(!verdict(Some("exit-code"), Some("1"), false, on_failure));
        // Nothing restarts after these.
        assert!(verdict(Some("success"), Some("0"), false, on_failure));
        assert!(verdict(Some("exit-code"), Some("78"), false, on_failure), "bad configuration");
        assert!(verdict(Some("exit-code"), Some("71"), false, on_failure), "kernel lacks pidfds");
        assert!(verdict(Some("start-limit-hit"), None, false, on_failure));
        assert!(verdict(Some("signal"), Some("KILL"), false, Some("no")), "Restart=no");
        assert!(verdict(None, None, false, on_failure), "not run by systemd");
        assert!(verdict(Some(""), None, false, on_failure), "empty result");
        assert!(!verdict(Some("signal"), Some("KILL"), false, None), "Restart= unknown: as on-failure");
    }

    #[test]
    fn systemctl_show_output() {
        assert_eq!(parse_show("Restart=on-failure\nJob=1251\n"), (true, Some("on-failure".to_string())));
        assert_eq!(parse_show("Job=\nRestart=no\n"), (false, Some("no".to_string())));
        assert_eq!(parse_show(""), (false, None));
    }

    #[test]
    fn it_refuses_to_run_outside_the_units_cgroup() {
        let e = run("surely-not-this.service", |_| Some("success".into())).unwrap_err();
        assert!(matches!(e, StopPostError::NotTheUnit { .. } | StopPostError::Cgroup(_)), "{e}");
        assert_ne!(e.code(), crate::exit::OK);
    }
}
