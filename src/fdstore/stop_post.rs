//! `herdsman stop-post UNIT`: the unit's `ExecStopPost=` helper. Under `KillMode=process`
//! systemd kills only the main process, so whatever herdsman left in the cgroup (a worker that
//! ignored its stop signal past `TimeoutStopSec=`, its children) is this helper's to kill —
//! unless an automatic restart follows, whose herdsman re-adopts the workers through the fd
//! store.
//!
//! It runs after the supervisor is gone and needs none of its state: only what systemd tells
//! an `ExecStopPost=` command (`SERVICE_RESULT`, `EXIT_CODE`, `EXIT_STATUS`; 252 sets no
//! `$UNIT_NAME`, hence the `%n` argument) and the unit's settings and queued job
//! (`systemctl show -p Job -p Restart -p RestartPreventExitStatus UNIT`). Measured on systemd
//! 252: after a crash the result is `signal`/`core-dump`/`exit-code`/`watchdog`/`oom-kill`
//! and no job is queued; after `systemctl stop`/`restart` a job is (also when the stop timed
//! out: `timeout`). Without `SERVICE_RESULT` or `INVOCATION_ID` it was not started by
//! systemd as `ExecStopPost=`, and refuses (a usage error) without killing anything.
//!
//! The decision ([`decide`]) follows systemd's own (`service_shall_restart`): kill unless
//! systemd restarts the service.
//!
//! | job queued | exit status or signal in `RestartPreventExitStatus=` | `Restart=` | keep when `SERVICE_RESULT` is |
//! |---|---|---|---|
//! | yes (stop, restart) | any | any | never: **kill** |
//! | no | yes | any | never: **kill** |
//! | no | no | `no` | never |
//! | no | no | `always` | anything but `skip-condition`, `start-limit-hit` |
//! | no | no | `on-success` | `success` |
//! | no | no | `on-failure` | anything but `success`, `skip-condition`, `start-limit-hit` |
//! | no | no | `on-abnormal` | `signal`, `core-dump`, `timeout`, `watchdog`, `oom-kill`, and other failures but `exit-code` |
//! | no | no | `on-watchdog` | `watchdog` |
//! | no | no | `on-abort` | `signal`, `core-dump` |
//! | no | no | unknown | never |
//!
//! (`signal` is an unclean signal: systemd counts SIGHUP, SIGINT, SIGTERM and SIGPIPE as a
//! clean exit, `success`. `exit-code` is a non-zero exit.)
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
    /// `$EXIT_CODE`: `exited`, `killed` or `dumped`.
    pub exit_code: Option<&'a str>,
    /// `$EXIT_STATUS` (a number for `EXIT_CODE=exited`, a signal name otherwise).
    pub exit_status: Option<&'a str>,
    /// A job (stop, restart, start) is queued for the unit.
    pub job_queued: bool,
    /// The unit's `Restart=` (`None`: unknown).
    pub restart: Option<&'a str>,
    /// The unit's `RestartPreventExitStatus=` (numbers and signal names, space-separated).
    pub prevent: Option<&'a str>,
}

/// Kill what is left, or keep it for the restarted supervisor; with the reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Kill(&'static str),
    Keep(&'static str),
}

/// Whether the main process's exit is listed in `RestartPreventExitStatus=` (`prevent`):
/// its status when it exited, its signal's name (`KILL` or `SIGKILL`) when it was killed.
fn prevented(exit_code: Option<&str>, exit_status: Option<&str>, prevent: Option<&str>) -> bool {
    let (Some(status), Some(prevent)) = (exit_status.map(str::trim), prevent) else { return false };
    let bare = |s: &str| s.trim_start_matches("SIG").to_ascii_uppercase();
    match exit_code.map(str::trim) {
        Some("exited") => {
            let Ok(n) = status.parse::<i32>() else { return false };
            prevent.split_whitespace().any(|p| p.parse::<i32>().is_ok_and(|p| p == n))
        }
        // Numbers in the list are exit statuses; signals are listed by name.
        Some("killed" | "dumped") => prevent.split_whitespace().any(|p| bare(p) == bare(status)),
        _ => false,
    }
}

/// Whether systemd restarts a service whose `Restart=` is `restart` after `result`
/// (`SERVICE_RESULT`): systemd's `service_shall_restart`, the module doc's table.
fn restarts(restart: Option<&str>, result: &str) -> bool {
    let never = matches!(result, "skip-condition" | "start-limit-hit");
    match restart.map(str::trim) {
        Some("always") => !never,
        Some("on-success") => result == "success",
        Some("on-failure") => !never && result != "success",
        Some("on-abnormal") => !never && !matches!(result, "success" | "exit-code"),
        Some("on-watchdog") => result == "watchdog",
        Some("on-abort") => matches!(result, "signal" | "core-dump"),
        // `no`, or a value this helper does not know: a leak is worse than a cold restart.
        _ => false,
    }
}

/// The decision table of the module doc.
pub fn decide(f: &Facts<'_>) -> Verdict {
    if f.job_queued {
        return Verdict::Kill("a stop or restart job is queued");
    }
    let Some(result) = f.service_result.map(str::trim).filter(|r| !r.is_empty()) else {
        return Verdict::Kill("no SERVICE_RESULT: not run as ExecStopPost=");
    };
    if prevented(f.exit_code, f.exit_status, f.prevent) {
        return Verdict::Kill("an exit that RestartPreventExitStatus= excludes from restarting");
    }
    if restarts(f.restart, result) {
        Verdict::Keep("systemd restarts the service: the next herdsman re-adopts them")
    } else {
        Verdict::Kill("no restart follows (Restart= and the service's result)")
    }
}

/// Why the helper failed.
#[derive(Debug, thiserror::Error)]
pub enum StopPostError {
    #[error(
        "stop-post: this process is in cgroup {cgroup:?}, not {unit:?}'s; it only runs as the unit's ExecStopPost=/usr/bin/herdsman stop-post %n"
    )]
    NotTheUnit { unit: String, cgroup: String },
    #[error(
        "stop-post: ${var} is not set: not run by systemd as ExecStopPost=; it only runs as the unit's ExecStopPost=/usr/bin/herdsman stop-post %n"
    )]
    NotExecStopPost { var: &'static str },
    #[error("stop-post: cannot find this process's cgroup: {0}")]
    Cgroup(std::io::Error),
    #[error("stop-post: {left} process(es) still in {unit} after SIGKILL: {pids}")]
    Left { unit: String, left: usize, pids: String },
}

impl StopPostError {
    /// The exit code: a misuse is a usage error, the rest a failure.
    pub fn code(&self) -> i32 {
        match self {
            StopPostError::NotTheUnit { .. } | StopPostError::NotExecStopPost { .. } => crate::exit::USAGE,
            _ => crate::exit::FAILURE,
        }
    }
}

/// What `systemctl show -p Job -p Restart -p RestartPreventExitStatus` says.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Shown {
    /// A job is queued for the unit.
    pub job: bool,
    /// `Restart=`.
    pub restart: Option<String>,
    /// `RestartPreventExitStatus=`.
    pub prevent: Option<String>,
}

/// Parses `systemctl show -p Job -p Restart -p RestartPreventExitStatus` output.
pub fn parse_show(text: &str) -> Shown {
    let mut shown = Shown::default();
    for line in text.lines() {
        match line.split_once('=') {
            Some(("Job", v)) => shown.job = !v.trim().is_empty(),
            Some(("Restart", v)) => shown.restart = Some(v.trim().to_string()),
            Some(("RestartPreventExitStatus", v)) => shown.prevent = Some(v.trim().to_string()),
            _ => {}
        }
    }
    shown
}

/// Runs the helper for `unit` with systemd's variables (`var`): one line on what it did.
pub fn run(unit: &str, var: impl Fn(&str) -> Option<String>) -> Result<String, StopPostError> {
    for v in ["SERVICE_RESULT", "INVOCATION_ID"] {
        if var(v).is_none_or(|s| s.trim().is_empty()) {
            return Err(StopPostError::NotExecStopPost { var: v });
        }
    }
    let cg = Cgroup::own().map_err(StopPostError::Cgroup)?;
    if cg.leaf() != unit {
        return Err(StopPostError::NotTheUnit { unit: unit.to_string(), cgroup: cg.path });
    }
    let shown = std::process::Command::new("systemctl")
        .args(["show", "-p", "Job", "-p", "Restart", "-p", "RestartPreventExitStatus", "--", unit])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .output();
    let shown = match shown {
        Ok(out) if out.status.success() => parse_show(&String::from_utf8_lossy(&out.stdout)),
        // Cannot ask: kill, as after a stop (a leak is worse than one cold restart).
        Ok(out) => {
            crate::errln!(
                "herdsman: stop-post: systemctl show {unit} failed ({}); killing what is left",
                out.status
            );
            Shown { job: true, ..Shown::default() }
        }
        Err(e) => {
            crate::errln!("herdsman: stop-post: cannot run systemctl ({e}); killing what is left");
            Shown { job: true, ..Shown::default() }
        }
    };
    let (result, code, status) = (var("SERVICE_RESULT"), var("EXIT_CODE"), var("EXIT_STATUS"));
    let facts = Facts {
        service_result: result.as_deref(),
        exit_code: code.as_deref(),
        exit_status: status.as_deref(),
        job_queued: shown.job,
        restart: shown.restart.as_deref(),
        prevent: shown.prevent.as_deref(),
    };
    let why = format!(
        "SERVICE_RESULT={} EXIT_CODE={} EXIT_STATUS={} Restart={} job {}",
        result.as_deref().unwrap_or("-"),
        code.as_deref().unwrap_or("-"),
        status.as_deref().unwrap_or("-"),
        shown.restart.as_deref().unwrap_or("-"),
        if shown.job { "queued" } else { "none" }
    );
    match decide(&facts) {
        Verdict::Keep(reason) => {
            let n = cg.procs().map(|p| p.len().saturating_sub(1)).unwrap_or(0);
            Ok(format!("stop-post: {unit}: kept {n} process(es) ({why}): {reason}"))
        }
        Verdict::Kill(reason) => {
            let swept = cgroup::sweep(&cg, &|_| BTreeSet::new(), Duration::from_secs(5))
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

    /// Kills (`true`) or keeps, after `result` with `Restart=restart`, no job queued, the
    /// shipped unit's `RestartPreventExitStatus=78 71`; `exit` is `EXIT_CODE`/`EXIT_STATUS`.
    fn kills(restart: &str, result: &str, exit: (&str, &str)) -> bool {
        let f = Facts {
            service_result: Some(result),
            exit_code: Some(exit.0),
            exit_status: Some(exit.1),
            job_queued: false,
            restart: Some(restart),
            prevent: Some("71 78"),
        };
        matches!(decide(&f), Verdict::Kill(_))
    }

    const KILLED: (&str, &str) = ("killed", "KILL");
    const DUMPED: (&str, &str) = ("dumped", "ABRT");
    const EXIT_1: (&str, &str) = ("exited", "1");
    const EXIT_0: (&str, &str) = ("exited", "0");

    #[test]
    fn the_decision_table() {
        // (SERVICE_RESULT, exit) and the Restart= values that restart after it (systemd's
        // table in systemd.service(5)); every other value kills.
        let all =
            ["no", "always", "on-success", "on-failure", "on-abnormal", "on-watchdog", "on-abort", "bogus"];
        let rows: [(&str, (&str, &str), &[&str]); 10] = [
            ("success", EXIT_0, &["always", "on-success"]),
            ("exit-code", EXIT_1, &["always", "on-failure"]),
            ("signal", KILLED, &["always", "on-failure", "on-abnormal", "on-abort"]),
            ("core-dump", DUMPED, &["always", "on-failure", "on-abnormal", "on-abort"]),
            ("timeout", KILLED, &["always", "on-failure", "on-abnormal"]),
            ("watchdog", KILLED, &["always", "on-failure", "on-abnormal", "on-watchdog"]),
            ("oom-kill", KILLED, &["always", "on-failure", "on-abnormal"]),
            ("resources", EXIT_1, &["always", "on-failure", "on-abnormal"]),
            ("start-limit-hit", EXIT_1, &[]),
            ("skip-condition", EXIT_0, &[]),
        ];
        for (result, exit, restarting) in rows {
            for restart in all {
                assert_eq!(
                    kills(restart, result, exit),
                    !restarting.contains(&restart),
                    "Restart={restart} after {result} {exit:?}"
                );
            }
        }
        // RestartPreventExitStatus= wins over every Restart= (exit statuses and signals).
        for restart in all {
            assert!(kills(restart, "exit-code", ("exited", "78")), "78 with Restart={restart}");
            assert!(kills(restart, "exit-code", ("exited", "71")));
        }
        let f = |prevent| Facts {
            service_result: Some("signal"),
            exit_code: Some("killed"),
            exit_status: Some("TERM"),
            job_queued: false,
            restart: Some("always"),
            prevent: Some(prevent),
        };
        assert!(matches!(decide(&f("SIGTERM")), Verdict::Kill(_)));
        assert!(matches!(decide(&f("TERM 1")), Verdict::Kill(_)));
        assert!(matches!(decide(&f("15")), Verdict::Keep(_)), "15 is an exit status, not SIGTERM");
        assert!(matches!(decide(&f("")), Verdict::Keep(_)));
        // A queued job (stop, restart; a stop that timed out) always kills.
        for r in ["success", "timeout", "signal", "exit-code", "core-dump", "watchdog", "oom-kill"] {
            let f = Facts { job_queued: true, ..f("") };
            assert!(matches!(decide(&Facts { service_result: Some(r), ..f }), Verdict::Kill(_)), "{r}");
        }
        // Not run by systemd; systemctl show said nothing about Restart=.
        assert!(matches!(decide(&Facts { service_result: None, ..f("") }), Verdict::Kill(_)));
        assert!(matches!(decide(&Facts { service_result: Some(" "), ..f("") }), Verdict::Kill(_)));
        assert!(matches!(decide(&Facts { restart: None, ..f("") }), Verdict::Kill(_)), "Restart= unknown");
    }

    #[test]
    fn systemctl_show_output() {
        let shown = parse_show("Restart=on-failure\nJob=1251\nRestartPreventExitStatus=71 78 SIGKILL\n");
        assert_eq!(
            shown,
            Shown {
                job: true,
                restart: Some("on-failure".to_string()),
                prevent: Some("71 78 SIGKILL".to_string())
            }
        );
        assert!(!parse_show("Job=\nRestart=no\nRestartPreventExitStatus=\n").job);
        assert_eq!(parse_show(""), Shown::default());
    }

    #[test]
    fn it_refuses_unless_run_by_systemd_as_exec_stop_post() {
        let only = |k: &'static str| move |v: &str| (v == k).then(|| "x".to_string());
        for (var, e) in [
            ("SERVICE_RESULT", run("x.service", only("INVOCATION_ID"))),
            ("INVOCATION_ID", run("x.service", only("SERVICE_RESULT"))),
        ] {
            let e = e.unwrap_err();
            assert!(matches!(e, StopPostError::NotExecStopPost { var: v } if v == var), "{e}");
            assert_eq!(e.code(), crate::exit::USAGE);
            assert!(!e.to_string().contains('\n'));
        }
    }

    #[test]
    fn it_refuses_to_run_outside_the_units_cgroup() {
        let e = run("surely-not-this.service", |_| Some("signal".into())).unwrap_err();
        assert!(matches!(e, StopPostError::NotTheUnit { .. } | StopPostError::Cgroup(_)), "{e}");
        assert_ne!(e.code(), crate::exit::OK);
    }
}
