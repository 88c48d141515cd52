//! Fault injection: what happens on herdsman's worst days. Each test injects one fault and
//! checks that nothing is lost and the supervisor lives. The figures go to docs/guarantees.md.

mod support;

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::*;

const LONG: Duration = Duration::from_secs(40);

#[test]
fn a_crash_loop_from_start_shows_in_status_and_a_fixed_reload_recovers() {
    let dir = TempDir::new("crash-from-start");
    let broken = dir.path("broken");
    std::fs::write(&broken, "").unwrap();
    let sink = NotifySink::new(&dir);
    let mut sink = sink;
    let h = Run::new(&dir, 2)
        .arg("--ready")
        .arg("notify")
        .worker_env("TW_NOTIFY", "1")
        .worker_env("TW_BREAK_FILE", broken.to_str().unwrap())
        .env("NOTIFY_SOCKET", sink.path.to_str().unwrap())
        .start();
    // systemd still gets READY=1 (so its start timeout and start limit never trip) and a
    // STATUS= that says what is wrong.
    sink.wait_for("READY=1", LONG);
    sink.wait_for("restarting in", LONG);
    // Both slots keep failing: three restarts each (every one a failure in a row).
    wait_for(LONG, "3 restarts of each slot", || {
        let st = h.status()?;
        [0, 1]
            .iter()
            .all(|id| in_slot(&st, *id).and_then(|w| w["restarts"].as_u64()) >= Some(3))
            .then_some(())
    });
    // A slot shows `backoff` while it waits (polled: under load a status request can land
    // just after a restart, when both slots are `starting` again).
    wait_for(LONG, "a slot in backoff after 2+ restarts", || {
        let v = status_json(dir.path("control.sock"));
        assert_eq!(v["ready"], 0, "{v}");
        v["workers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["state"] == "backoff" && w["restarts"].as_u64() >= Some(2))
            .then_some(())
    });
    // The code is fixed; a reload brings every slot up without waiting for the back-off.
    std::fs::remove_file(&broken).unwrap();
    let out =
        Command::new(BIN).args(["reload", dir.path("control.sock").to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v = status_json(dir.path("control.sock"));
    assert_eq!(v["ready"], 2, "{v}");
}

#[test]
fn a_worker_ignoring_the_stop_signal_is_killed_at_the_stop_timeout_on_reload() {
    let dir = TempDir::new("ignore-term-reload");
    let h = Run::new(&dir, 1)
        .arg("--stop-timeout")
        .arg("700ms")
        .arg("--ready")
        .arg("alive:200ms")
        .worker_env("TW_IGNORE_TERM", "1")
        .start();
    h.wait_started();
    let old = h.get()["pid"].as_i64().unwrap() as i32;
    h.signal(libc::SIGHUP);
    h.wait_generation(2);
    // It ignores SIGTERM: what ended it is the SIGKILL at the stop timeout.
    h.wait_metric("herdsman_worker_exits_total", &[("worker", "0"), ("reason", "signal")], 1.0);
    wait_for(LONG, "the old worker to be gone", || processes_in_group(old).is_empty().then_some(()));
    assert!(h.status().unwrap()["workers"].as_array().unwrap().iter().all(|w| w["pid"] != old));
}

#[test]
fn a_reload_storm_is_coalesced_every_client_gets_the_truth_and_no_request_fails() {
    let dir = TempDir::new("storm");
    let sock = dir.path("control.sock").display().to_string();
    let version = dir.path("version");
    std::fs::write(&version, "v1").unwrap();
    let h = Run::new(&dir, 3)
        .arg("--ready")
        .arg("notify")
        .worker_env("TW_NOTIFY", "1")
        .worker_env("TW_READY_DELAY_MS", "150")
        .worker_env("TW_VERSION_FILE", version.to_str().unwrap())
        .start();
    h.wait_started();
    let load = Load::start(&h.addr, 3, true);
    std::fs::write(&version, "v2").unwrap();
    let clients: Vec<_> = (0..6)
        .map(|_| {
            Command::new(BIN)
                .args(["reload", &sock])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for _ in 0..10 {
        h.signal(libc::SIGHUP);
    }
    for c in clients {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    // Wait for any roll-out the SIGHUPs queued, then check the end state.
    wait_for(LONG, "the storm to settle", || {
        let v = status_json(dir.path("control.sock"));
        let w = v["workers"].as_array().unwrap();
        (w.len() == 3 && w.iter().all(|w| w["state"] == "ready" && w["generation"] == v["generation"]))
            .then_some(())
    });
    let report = load.finish();
    report.guarantee(
        "reload storm (keep-alive)",
        "6 concurrent `herdsman reload` + 10 SIGHUPs",
        "coalesced, every client exit 0, newest code everywhere",
    );
    assert!(report.failed.is_empty(), "{:?}", &report.failed[..report.failed.len().min(5)]);
    let m = h.metrics().unwrap();
    let completed = sample(&m, "herdsman_reloads_total", &[("result", "ok")]).unwrap_or_default();
    assert!(
        (1.0..=3.0).contains(&completed),
        "16 requests must coalesce into a few roll-outs, got {completed}"
    );
    assert_eq!(sample(&m, "herdsman_reloads_total", &[("result", "failed")]), Some(0.0));
    let versions: BTreeSet<String> =
        h.distinct_workers(3).iter().map(|v| v["version"].as_str().unwrap().to_string()).collect();
    assert_eq!(versions, BTreeSet::from(["v2".to_string()]), "the final state runs the newest code");
}

#[test]
fn sigterm_during_a_roll_out_stops_old_and_new_workers_alike() {
    let dir = TempDir::new("term-during-reload");
    let mut sink = NotifySink::new(&dir);
    let mut h = Run::new(&dir, 3)
        .arg("--ready")
        .arg("notify")
        .worker_env("TW_NOTIFY", "1")
        .worker_env("TW_READY_DELAY_MS", "400")
        .env("NOTIFY_SOCKET", sink.path.to_str().unwrap())
        .start();
    h.wait_started();
    let pids: Vec<i32> = h.distinct_workers(3).iter().map(|v| v["pid"].as_i64().unwrap() as i32).collect();
    h.signal(libc::SIGHUP);
    // The first new worker is starting.
    let new_pid = wait_for(LONG, "a generation-2 worker", || {
        let st = h.status()?;
        st["workers"].as_array()?.iter().find(|w| w["generation"] == 2)?["pid"].as_i64()
    }) as i32;
    h.signal(libc::SIGTERM);
    assert_eq!(h.wait_exit(LONG).code(), Some(0));
    // The aborted roll-out must not tell systemd READY=1 after STOPPING=1.
    sink.drain();
    let after_stop: Vec<&String> = sink.messages.iter().skip_while(|m| !m.contains("STOPPING=1")).collect();
    assert!(!after_stop.is_empty(), "STOPPING=1 sent: {:?}", sink.messages);
    assert!(!after_stop.iter().any(|m| m.contains("READY=1")), "READY=1 after STOPPING=1: {after_stop:?}");
    for p in pids.iter().chain([&new_pid]) {
        assert!(processes_in_group(*p).is_empty(), "worker {p} left behind");
    }
}

/// How many descriptors a child of this process inherits besides stdio: those open without
/// close-on-exec (packaging/build-deb.sh's lock was one, and failed the test below).
fn inherited_fds() -> usize {
    use nix::fcntl::{FcntlArg, FdFlag, fcntl};
    let fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    fds.into_iter()
        .filter(|&fd| fd > 2)
        .filter(|&fd| {
            fcntl(fd, FcntlArg::F_GETFD)
                .is_ok_and(|f| !FdFlag::from_bits_truncate(f).contains(FdFlag::FD_CLOEXEC))
        })
        .count()
}

#[test]
fn spawn_failures_from_exhausted_file_descriptors_are_survived() {
    let dir = TempDir::new("emfile");
    let mut run = Run::new(&dir, 2);
    // Run herdsman itself with few file descriptors, then ask for more workers than fit (each
    // costs the supervisor 4: its pidfd, two output pipes and its bind filter's listener, and a
    // few more while it starts). Descriptors it inherits (a build tool's lock, say) count
    // against its limit: add them.
    let nofile = 32 + inherited_fds();
    let mut args = vec![format!("--nofile={nofile}:{nofile}"), BIN.to_string()];
    args.append(&mut run.args);
    args.extend(["--".into(), "python3".into(), worker_py()]);
    run.args = args;
    let h = {
        let mut cmd = Command::new("prlimit");
        cmd.args(&run.args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let stderr = capture(child.stderr.take().unwrap(), true);
        let stdout = capture(child.stdout.take().unwrap(), false);
        Herdsman { child: Some(child), stderr, stdout, addr: run.addr.clone() }
    };
    h.wait_started();
    let sock = dir.path("control.sock").display().to_string();
    let out = Command::new(BIN).args(["scale", &sock, "12", "--timeout", "20s"]).output().unwrap();
    assert!(!out.status.success(), "scaling past the fd limit cannot fully succeed");
    let err = String::from_utf8_lossy(&out.stderr);
    // The client's one-line error naming the cause is the contract: text.
    assert!(err.contains("Too many open files"), "a clear reason: {err}");
    // The supervisor lives, still serves, and recovers when asked for less.
    let out = Command::new(BIN).args(["scale", &sock, "2"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(h.distinct_workers(2).len(), 2);
}

#[test]
fn a_reload_to_a_missing_command_fails_clearly_and_the_app_serves_on() {
    let dir = TempDir::new("missing-cmd");
    let sock = dir.path("app.sock");
    let cfg = dir.path("app.toml");
    let write = |cmd: &str| {
        let text = format!(
            "command = [{cmd:?}, {w:?}]\nlisten = [\"unix:{s}\"]\nworkers = 2\nready = \"alive:200ms\"\n",
            w = worker_py(),
            s = sock.display()
        );
        std::fs::write(&cfg, text).unwrap();
    };
    write("python3");
    let control = dir.path("control.sock").display().to_string();
    let args = ["run".into(), "-c".into(), cfg.display().to_string(), "--control".into(), control.clone()];
    let h = Herdsman::spawn(&args, &[], Addr::Unix(sock.clone()));
    h.wait_started();
    write("python3-does-not-exist");
    let out = Command::new(BIN).args(["reload", &control]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    // The client's error naming the missing command is the contract: text.
    assert!(err.contains("command not found: python3-does-not-exist"), "{err}");
    assert_eq!(h.distinct_workers(2).len(), 2);
}

#[test]
fn a_worker_that_closes_its_socket_does_not_take_the_socket_away_from_the_others() {
    let dir = TempDir::new("close-fd3");
    // Worker 0 closes fd 3 and idles; worker 1 serves. The socket lives on in herdsman and
    // worker 1, so nothing is refused or lost.
    let script = format!(
        "if [ \"$HERDSMAN_WORKER_ID\" = 0 ]; then exec 3<&-; exec sleep 1000; fi; exec python3 {}",
        worker_py()
    );
    let h = Run::new(&dir, 2)
        .arg("--ready")
        .arg("alive:300ms")
        .arg("--")
        .arg("sh")
        .arg("-c")
        .arg(&script)
        .start();
    h.wait_started();
    let load = Load::start(&h.addr, 2, false);
    wait_for(LONG, "a few hundred answers", || (h.get()["worker_id"] == 1).then_some(()));
    for _ in 0..50 {
        assert_eq!(h.get()["worker_id"], 1);
    }
    let report = load.finish();
    assert!(report.failed.is_empty(), "{:?}", &report.failed[..report.failed.len().min(5)]);
    assert!(report.ok > 50);
}
