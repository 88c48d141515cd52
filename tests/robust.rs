//! Robustness regressions (issue 11 §2, issue 13 item 1): a stalled journal, closed output
//! pipes, hostile config values and plain `connect()` notify clients must never freeze,
//! panic or lock out the supervisor.

mod support;

use std::os::unix::fs::FileTypeExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::*;

const LONG: Duration = Duration::from_secs(30);

/// `herdsman status --json CONTROL`, or None while it cannot answer yet.
fn try_status(control: &std::path::Path) -> Option<Value> {
    let out = Command::new(BIN).arg("status").arg(control).arg("--json").output().ok()?;
    out.status.success().then(|| serde_json::from_slice(&out.stdout).ok()).flatten()
}

fn wait_ready(control: &std::path::Path, n: u64) -> Value {
    wait_for(LONG, &format!("{n} ready worker(s) in status --json"), || {
        try_status(control).filter(|s| s["ready"] == n)
    })
}

/// A worker that notifies the way Ruby's `sd_notify` does: `connect()` to the path in
/// `NOTIFY_SOCKET`, then `send()` (no `@` handling, no `sendto`).
const PLAIN_NOTIFY_WORKER: &str = r#"
import os, socket, time
path = os.environ["NOTIFY_SOCKET"]
with open(os.environ["OUT"], "w") as f:
    f.write(path)
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.connect(path)
s.send(b"READY=1")
time.sleep(1000)
"#;

#[test]
fn a_worker_using_plain_connect_and_send_on_notify_socket_gets_ready_through() {
    let dir = TempDir::new("plainnotify");
    let out = dir.path("notify-path");
    let mut h = Run::new(&dir, 1)
        .arg("--ready")
        .arg("notify")
        .worker_env("OUT", out.to_str().unwrap())
        .arg("--")
        .arg("python3")
        .arg("-c")
        .arg(PLAIN_NOTIFY_WORKER)
        .start();
    let control = dir.path("control.sock");
    let s = wait_ready(&control, 1);
    assert_eq!(s["workers"][0]["state"], "ready", "{s}");
    let path = std::fs::read_to_string(&out).unwrap();
    assert!(path.starts_with('/'), "a filesystem path: {path}");
    let meta = std::fs::symlink_metadata(&path).unwrap();
    assert!(meta.file_type().is_socket(), "{path}");
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777, 0o666);
    h.signal(libc::SIGTERM);
    assert!(h.wait_exit(LONG).success());
    assert!(!std::path::Path::new(&path).exists(), "the notify socket is removed on exit: {path}");
}

#[test]
fn check_config_rejects_reserved_env_nul_and_overlong_durations_with_exit_78() {
    let dir = TempDir::new("reserved");
    let cases = [
        ("env = { LISTEN_FDS = \"2\" }\n", "LISTEN_FDS"),
        ("env = { HERDSMAN_WORKER_ID = \"2\" }\n", "HERDSMAN_WORKER_ID"),
        ("env = { A = \"x\\u0000y\" }\n", "NUL"),
        ("ready_timeout = \"18446744073709551615s\"\n", "ready_timeout"),
        ("max_memory = \"99999999999T\"\n", "max_memory"),
    ];
    for (line, needle) in cases {
        let file = dir.path("app.toml");
        std::fs::write(&file, format!("command = [\"python3\", \"app.py\"]\n{line}")).unwrap();
        let out = Command::new(BIN).arg("check-config").arg(&file).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{line}: {err}");
        assert_eq!(err.lines().count(), 1, "{line}: one line: {err}");
        assert!(err.contains(needle), "{line}: {err}");
    }
    let out = Command::new(BIN)
        .args(["run", "--listen", "127.0.0.1:0", "-e", "NOTIFY_SOCKET=/x", "--", "true"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("NOTIFY_SOCKET"));
}
