//! Worker lines from the journal, for `herdsman logs` under systemd.
//!
//! Why `journalctl -o json` in a child process rather than reading the journal files
//! ourselves (the `systemd` crate, over `libsystemd.so`): journalctl is on every machine that
//! runs the unit; it knows every journal file version, compression (zstd, lz4, xz), rotation,
//! namespaces and `-f`'s inotify dance, and it applies the journal's access rules (the
//! `systemd-journal`/`adm` groups) with its own hints when a user may not read. A library
//! would add a C dependency (and `unsafe` outside `sys`) and tie the binary to one
//! libsystemd's symbols, for nothing this path needs: `logs` is an interactive command, and
//! one `fork` per call is free. Its JSON is stable (`journalctl(1)`, `--output=json`).
//!
//! Which entries: those of the unit (`_SYSTEMD_UNIT=herdsman@NAME.service`; the
//! supervisor's `_PID` when it is not in a unit) with `HERDSMAN_APP=NAME`, the field every
//! worker line has and herdsman's own events do not; `--worker N` adds `WORKER_ID=N`,
//! `--since` becomes `--since=@UNIX_SECONDS`.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use serde_json::Value;

use super::Stream;
use super::{Query, Record, rfc3339};
use crate::exit::{self, Failure};

/// Whose journal entries to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub unit: Option<String>,
    pub app: String,
    /// The supervisor's pid: matched instead of the unit when it is not in one.
    pub pid: Option<u32>,
}

/// The fields `logs` needs (`--output-fields`: the rest of each entry stays in the journal).
const FIELDS: &str = "MESSAGE,WORKER_ID,WORKER_PID,WORKER_GENERATION,HERDSMAN_APP,HERDSMAN_STREAM";

/// journalctl's arguments for `q` (and `-f`).
pub fn args(t: &Target, q: &Query, follow: bool) -> Vec<String> {
    let mut a: Vec<String> =
        vec!["--no-pager".into(), "-o".into(), "json".into(), format!("--output-fields={FIELDS}")];
    a.push(format!("--lines={}", q.lines));
    if let Some(us) = q.since_us {
        a.push(format!("--since=@{}", us / 1_000_000));
    }
    if follow {
        a.push("--follow".into());
    }
    match (&t.unit, t.pid) {
        (Some(unit), _) => a.push(format!("_SYSTEMD_UNIT={unit}")),
        (None, Some(pid)) => a.push(format!("_PID={pid}")),
        (None, None) => {}
    }
    a.push(format!("HERDSMAN_APP={}", t.app));
    if let Some(w) = q.worker {
        a.push(format!("WORKER_ID={w}"));
    }
    a
}

/// A field as text: journalctl writes a string, an array of bytes (not UTF-8, or with control
/// characters), or an array of those when the field repeats (the first is taken).
fn text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Array(items) if items.iter().all(Value::is_u64) => {
            let bytes: Vec<u8> = items.iter().filter_map(|b| b.as_u64()).map(|b| b as u8).collect();
            Some(String::from_utf8_lossy(&bytes).into_owned())
        }
        Value::Array(items) => items.first().and_then(text),
        _ => None,
    }
}

/// One entry of `journalctl -o json` as a [`Record`] (`None`: not a worker line).
pub fn record(entry: &Value) -> Option<Record> {
    let field = |k: &str| entry.get(k).and_then(text);
    let us: u64 = field("__REALTIME_TIMESTAMP")?.parse().ok()?;
    let stream = match field("HERDSMAN_STREAM").as_deref() {
        Some("stderr") => Stream::Stderr,
        _ => Stream::Stdout,
    };
    Some(Record {
        ts: rfc3339(us),
        app: field("HERDSMAN_APP")?,
        worker: field("WORKER_ID")?.parse().ok()?,
        pid: field("WORKER_PID").and_then(|p| p.parse().ok()).unwrap_or(0),
        generation: field("WORKER_GENERATION").and_then(|g| g.parse().ok()).unwrap_or(0),
        stream,
        // A message journald did not store (over its size limit) is `null`.
        line: field("MESSAGE").unwrap_or_default(),
    })
}

/// Runs journalctl and hands each worker line to `emit` until the end (or, with `follow`,
/// until `emit` returns `false` or journalctl ends). journalctl's own messages (no access to
/// the journal, ...) go to our stderr as they are.
pub fn read(
    t: &Target,
    q: &Query,
    follow: bool,
    mut emit: impl FnMut(&Record) -> bool,
) -> Result<(), Failure> {
    let mut child = Command::new("journalctl")
        .args(args(t, q, follow))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| {
            Failure::new(
                exit::UNAVAILABLE,
                format!(
                "cannot run journalctl to read the journal of {} ({e}); read it with `journalctl -u herdsman@{}` where it is installed",
                t.unit.as_deref().unwrap_or("the supervisor"),
                    t.app
                ),
            )
        })?;
    let mut stopped = false;
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            let Ok(entry) = serde_json::from_str::<Value>(&line) else { continue };
            if let Some(r) = record(&entry) {
                if !emit(&r) {
                    stopped = true;
                    break;
                }
            }
        }
    }
    if stopped {
        let _ = child.kill();
    }
    let status = child.wait().map_err(|e| Failure::new(exit::FAILURE, format!("journalctl: {e}")))?;
    if !stopped && !status.success() {
        return Err(Failure::new(exit::FAILURE, format!("journalctl failed ({status})")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unit_app_worker_and_since_become_journal_matches() {
        let t = Target { unit: Some("herdsman@web.service".into()), app: "web".into(), pid: Some(9) };
        let q = Query { lines: 15, worker: Some(2), since_us: Some(1_700_000_000_500_000) };
        let a = args(&t, &q, true);
        for want in [
            "--lines=15",
            "--since=@1700000000",
            "--follow",
            "_SYSTEMD_UNIT=herdsman@web.service",
            "HERDSMAN_APP=web",
            "WORKER_ID=2",
        ] {
            assert!(a.iter().any(|x| x == want), "{want} not in {a:?}");
        }
        assert!(!a.iter().any(|x| x.starts_with("_PID=")));
        let t = Target { unit: None, ..t };
        let a = args(&t, &Query { lines: 1, worker: None, since_us: None }, false);
        assert!(a.iter().any(|x| x == "_PID=9"));
        assert!(!a.iter().any(|x| x.starts_with("WORKER_ID") || x == "--follow"));
    }

    #[test]
    fn journal_entries_become_records_and_other_entries_are_skipped() {
        let e = serde_json::json!({
            "__REALTIME_TIMESTAMP": "1500000", "MESSAGE": [104, 105, 255], "WORKER_ID": "2",
            "WORKER_PID": "77", "WORKER_GENERATION": "3", "HERDSMAN_APP": "web",
            "HERDSMAN_STREAM": "stderr"
        });
        let r = record(&e).unwrap();
        assert_eq!((r.worker, r.pid, r.generation, r.stream), (2, 77, 3, Stream::Stderr));
        assert_eq!(r.line, "hi\u{fffd}");
        assert_eq!(r.ts, "1970-01-01T00:00:01.500000Z");
        let event = serde_json::json!({"__REALTIME_TIMESTAMP": "1", "MESSAGE": "reload complete"});
        assert!(record(&event).is_none());
    }
}
