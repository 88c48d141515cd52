//! `herdsman logs TARGET [-f] [-n N] [--worker ID] [--since TIME] [--json]`: asks the
//! supervisor (the control socket's `logs` request), which streams its ring or says which
//! journal to read; an app installed with `init` whose supervisor is not running is read
//! from the journal directly.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, SystemTime};

use crate::control::client;
use crate::control::paths;
use crate::exit;
use crate::exit::Failure;
use crate::logs::journal::{self, Target};
use crate::logs::{Query, Record, unix_us};
use crate::protocol::{Op, Reply};

/// Where `init` writes an app's config (`/etc/herdsman/NAME.toml`): its presence says the app
/// is installed as `herdsman@NAME.service`.
const INIT_CONFIG_DIR: &str = "/etc/herdsman";

/// What `herdsman logs` was asked.
#[derive(Debug, Clone)]
pub(crate) struct Args {
    pub target: Option<String>,
    pub follow: bool,
    pub lines: usize,
    pub worker: Option<usize>,
    pub since: Option<String>,
    pub json: bool,
}

/// `--since TIME` as µs since the epoch: a duration ago (`10m`, `2h 30m`), `@UNIX_SECONDS`,
/// or an RFC 3339 time in UTC (`2026-12-07T05:00:00Z`, `2026-12-07 05:00:00`).
pub(crate) fn since(s: &str, now: SystemTime) -> Result<u64, String> {
    let t = s.trim();
    if let Ok(d) = humantime::parse_duration(t) {
        return Ok(unix_us(now).saturating_sub(d.as_micros() as u64));
    }
    if let Some(secs) = t.strip_prefix('@') {
        if let Ok(x) = secs.parse::<f64>() {
            if x.is_finite() && x >= 0.0 {
                return Ok((x * 1e6) as u64);
            }
        }
    }
    if let Ok(at) = humantime::parse_rfc3339_weak(t) {
        return Ok(unix_us(at));
    }
    Err(format!(
        "--since {s:?}: use a duration ago (10m, 2h), an RFC 3339 time in UTC (2026-12-07T05:00:00Z) or @UNIX_SECONDS"
    ))
}

/// Prints one line on stdout; `false` once stdout is gone (`herdsman logs -f | head`).
fn print(r: &Record, json: bool) -> bool {
    let mut line = if json { serde_json::to_string(r).unwrap_or_default() } else { r.text() };
    line.push('\n');
    let mut out = std::io::stdout().lock();
    out.write_all(line.as_bytes()).and_then(|()| out.flush()).is_ok()
}

/// Runs `herdsman logs`.
pub(crate) fn logs(a: &Args, env: &paths::Env) -> Result<(), Failure> {
    let since_us = a
        .since
        .as_deref()
        .map(|s| since(s, SystemTime::now()))
        .transpose()
        .map_err(|message| Failure::new(exit::USAGE, message))?;
    let query = Query { lines: a.lines, worker: a.worker, since_us };
    // An installed app is read from its journal even when its supervisor is not running.
    let installed = a
        .target
        .as_deref()
        .filter(|t| !t.contains('/') && Path::new(INIT_CONFIG_DIR).join(format!("{t}.toml")).exists())
        .map(|name| Target {
            unit: Some(format!("herdsman@{name}.service")),
            app: name.to_string(),
            pid: None,
        });
    let path = match (paths::resolve(a.target.as_deref(), env), &installed) {
        (Ok(p), _) => p,
        (Err(_), Some(t)) => return journal::read(t, &query, a.follow, |r| print(r, a.json)),
        (Err(message), None) => return Err(Failure::new(exit::UNAVAILABLE, message)),
    };
    let op = Op::Logs { lines: a.lines, follow: a.follow, worker: a.worker, since_us };
    let timeout = if a.follow { crate::config::values::MAX_DURATION } else { Duration::from_secs(60) };
    let mut stdout_gone = false;
    let mut received = false;
    let answer = client::call_with(&path, op, timeout, |reply| match reply {
        Reply::Log(r) => {
            received = true;
            stdout_gone = !print(r, a.json);
            !stdout_gone
        }
        Reply::LogsDropped { dropped } => {
            crate::errln!("herdsman: {dropped} line(s) dropped: this reader fell behind the workers' output");
            true
        }
        _ => false,
    });
    match answer {
        Ok(Reply::Journal { unit, app, pid }) => {
            journal::read(&Target { unit, app, pid: Some(pid) }, &query, a.follow, |r| print(r, a.json))
        }
        Ok(_) if stdout_gone => Ok(()),
        Ok(Reply::Logs { .. }) => Ok(()),
        Ok(other) => Err(Failure::new(exit::FAILURE, format!("unexpected answer: {other:?}"))),
        // The supervisor went away: an installed app's lines are still in its journal.
        Err(f) if f.code == exit::UNAVAILABLE && !received => match &installed {
            Some(t) => journal::read(t, &query, a.follow, |r| print(r, a.json)),
            None => Err(f),
        },
        Err(f) if f.code == exit::UNAVAILABLE && a.follow && received => {
            Err(Failure::new(exit::UNAVAILABLE, "the supervisor closed the connection (it stopped)"))
        }
        Err(f) => Err(f),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_durations_ago_unix_seconds_and_utc_times() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert_eq!(since("10m", now).unwrap(), (1_000_000 - 600) * 1_000_000);
        assert_eq!(since("@12.5", now).unwrap(), 12_500_000);
        assert_eq!(since("1970-01-02T00:00:00Z", now).unwrap(), 86_400_000_000);
        assert_eq!(since("1970-01-02 00:00:00", now).unwrap(), 86_400_000_000);
        assert!(since("yesterday-ish", now).unwrap_err().contains("--since"));
    }
}
