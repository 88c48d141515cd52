//! Process lifetime: herdsman never signals a pid it has released.

mod support;

use std::process::Command;

use support::*;

/// Regression test (issue 11, "PID reuse race"): a worker's group used to be SIGKILLed up to
/// 250 ms *after* the worker was reaped, so a process that got the recycled pid as a group
/// leader was killed by root. Reproduced in a pid namespace with the pid forced
/// (`tests/support/pid_reuse.py`).
#[test]
fn a_recycled_pid_is_never_signalled_after_its_worker_exits() {
    if !nix::unistd::geteuid().is_root() {
        return needs(
            "a_recycled_pid_is_never_signalled_after_its_worker_exits",
            "needs root (a pid namespace and ns_last_pid)",
        );
    }
    let dir = TempDir::new("pidreuse");
    let harness = format!("{}/tests/support/pid_reuse.py", env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "/usr/bin/python3", &harness, BIN])
        .arg(&dir.0)
        .output()
        .expect("unshare (util-linux)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let log = std::fs::read_to_string(dir.path("herdsman.log")).unwrap_or_default();
    match out.status.code() {
        Some(0) => {}
        Some(77) => eprintln!("SKIP: {text}"),
        _ => panic!("{text}\nherdsman log:\n{log}"),
    }
}
