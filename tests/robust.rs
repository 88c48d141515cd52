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

#[test]
fn a_stalled_journal_never_freezes_the_supervisor_and_dropped_lines_are_counted() {
    let dir = TempDir::new("stalljournal");
    let jpath = dir.path("journal.sock");
    // A journal that does not read (yet): its queue fills at once, as a stalled journald's.
    let journal = std::os::unix::net::UnixDatagram::bind(&jpath).unwrap();
    let _h = Run::new(&dir, 2)
        .env("HERDSMAN_JOURNAL_SOCKET", jpath.to_str().unwrap())
        .worker_env("TW_BURST_LINES", "20000")
        .start();
    let control = dir.path("control.sock");
    // The loop keeps working (workers become ready) and answers the control socket (the
    // client gives up after 10 s, so a frozen loop fails here) while lines are dropped.
    let s = wait_for(LONG, "status with log_dropped > 0 and 2 ready workers", || {
        try_status(&control).filter(|s| s["ready"] == 2 && s["log_dropped"].as_u64() > Some(0))
    });
    for _ in 0..3 {
        let again = try_status(&control).expect("status answers while the journal is stalled");
        assert!(again["log_dropped"].as_u64() >= s["log_dropped"].as_u64(), "{again}");
    }
    // Once the journal reads again, one entry reports how many lines were lost.
    journal.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let mut buf = vec![0u8; 65536];
    let reported = wait_for(LONG, "the dropped-lines entry", || {
        let n = journal.recv(&mut buf).ok()?;
        let d = String::from_utf8_lossy(&buf[..n]).into_owned();
        d.lines().find_map(|l| l.strip_prefix("HERDSMAN_LOG_DROPPED=")).map(|v| v.parse::<u64>().unwrap())
    });
    assert!(reported > 0);
}

#[test]
fn with_stdout_and_stderr_a_closed_pipe_the_supervisor_keeps_supervising() {
    let dir = TempDir::new("closedpipe");
    let (r, w) = nix::unistd::pipe().unwrap();
    drop(r); // every write to w fails with EPIPE
    let run = Run::new(&dir, 1).worker_env("TW_BURST_LINES", "100");
    let mut args = run.args.clone();
    args.extend(["--".to_string(), "python3".to_string(), worker_py()]);
    let child = Command::new(BIN)
        .args(&args)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .stdin(Stdio::null())
        .stdout(Stdio::from(w.try_clone().unwrap()))
        .stderr(Stdio::from(w))
        .spawn()
        .unwrap();
    let mut h = Herdsman {
        child: Some(child),
        stderr: Default::default(),
        stdout: Default::default(),
        addr: run.addr.clone(),
    };
    let control = dir.path("control.sock");
    let s = wait_ready(&control, 1);
    let pid = s["workers"][0]["pid"].as_i64().unwrap() as i32;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
    // The crash is logged (to the closed pipe) and the worker replaced: still supervising.
    let s = wait_for(LONG, "a replacement worker, ready", || {
        try_status(&control).filter(|s| {
            s["ready"] == 1
                && s["workers"][0]["pid"].as_i64() != Some(pid as i64)
                && s["workers"][0]["restarts"].as_u64() >= Some(1)
        })
    });
    assert!(h.child.as_mut().unwrap().try_wait().unwrap().is_none(), "herdsman died: {s}");
    h.get();
}
