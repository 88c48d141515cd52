//! `herdsman run` end to end: real supervisor binary, real Python workers, real sockets.

// Test helpers fail the test by panicking, on purpose.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use support::*;

const SIGHUP: i32 = libc::SIGHUP;
const SIGTERM: i32 = libc::SIGTERM;
const SIGTTIN: i32 = libc::SIGTTIN;
const SIGTTOU: i32 = libc::SIGTTOU;
const LONG: Duration = Duration::from_secs(30);

#[test]
fn workers_share_the_socket_and_each_sees_exactly_its_own_fds_and_pid() {
    let dir = TempDir::new("share");
    let h = Run::new(&dir, 3).arg("--ready").arg("notify").worker_env("TW_NOTIFY", "1").start();
    h.wait_started();
    let seen = h.distinct_workers(3);
    let ids: BTreeSet<i64> = seen.iter().map(|v| v["worker_id"].as_i64().unwrap()).collect();
    assert_eq!(ids, BTreeSet::from([0, 1, 2]));
    for v in &seen {
        assert_eq!(v["listen_pid_ok"], true, "{v}");
        assert_eq!(v["open_fds"], serde_json::json!([0, 1, 2, 3]), "stray fds: {v}");
        assert_eq!(v["fd_flags"]["3"], false, "fd 3 must not be close-on-exec: {v}");
        assert_eq!(v["listen_fds"], "1");
        assert_eq!(v["generation"], 1);
        let notify = v["notify_socket"].as_str().unwrap();
        assert!(notify.starts_with('/'), "workers get herdsman's own notify socket (a path): {notify}");
        assert!(v["env"].get("WATCHDOG_USEC").is_none() && v["env"].get("JOURNAL_STREAM").is_none(), "{v}");
    }
}

#[test]
fn systemds_notify_socket_and_watchdog_never_reach_workers() {
    let dir = TempDir::new("scrub");
    let sink = NotifySink::new(&dir);
    let h = Run::new(&dir, 1)
        .env("NOTIFY_SOCKET", sink.path.to_str().unwrap())
        .env("WATCHDOG_USEC", "60000000")
        .env("JOURNAL_STREAM", "8:1234")
        .start();
    h.wait_started();
    let v = h.get();
    assert_ne!(v["notify_socket"].as_str().unwrap(), sink.path.to_str().unwrap());
    assert!(v["env"].get("WATCHDOG_USEC").is_none() && v["env"].get("JOURNAL_STREAM").is_none(), "{v}");
}

#[test]
fn tcp_listen_on_port_zero_and_output_is_prefixed_per_worker() {
    let dir = TempDir::new("tcp");
    let mut run = Run::new(&dir, 2);
    let i = run.args.iter().position(|a| a == "--listen").unwrap();
    run.args[i + 1] = "127.0.0.1:0".into();
    let mut h = run.start();
    h.wait_started();
    let st = h.status().unwrap();
    let port = st["sockets"][0]
        .as_str()
        .and_then(|s| s.strip_prefix("127.0.0.1:"))
        .and_then(|p| p.parse::<u16>().ok())
        .filter(|p| *p != 0)
        .unwrap_or_else(|| panic!("the bound port in status: {st}"));
    h.addr = Addr::Tcp(format!("127.0.0.1:{port}"));
    let seen = h.distinct_workers(2);
    assert_eq!(seen.len(), 2);
    wait_for(LONG, "prefixed worker lines", || {
        let out = h.stdout();
        (out.contains("0|t | worker 0 gen 1") && out.contains("1|t | worker 1 gen 1")).then_some(())
    });
}

#[test]
fn a_killed_worker_is_replaced_in_its_slot() {
    let dir = TempDir::new("kill");
    let h = Run::new(&dir, 2).start();
    h.wait_started();
    let seen = h.distinct_workers(2);
    let victim = &seen[0];
    let (pid, slot) = (victim["pid"].as_i64().unwrap() as i32, victim["worker_id"].clone());
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
    let replacement = wait_for(LONG, "a new worker in the killed worker's slot", || {
        let v = h.get();
        (v["worker_id"] == slot && v["pid"].as_i64() != Some(pid as i64)).then_some(v)
    });
    assert_eq!(replacement["generation"], 1);
    // Counted as an exit by signal and a restart of that slot, and only of that slot.
    let slot = slot.to_string();
    let other = if slot == "0" { "1" } else { "0" };
    let m = h.wait_metric("herdsman_worker_exits_total", &[("worker", &slot), ("reason", "signal")], 1.0);
    assert_eq!(sample(&m, "herdsman_worker_restarts_total", &[("worker", &slot)]), Some(1.0), "{m:?}");
    assert_eq!(sample(&m, "herdsman_worker_restarts_total", &[("worker", other)]), Some(0.0), "{m:?}");
    let st = h.status().unwrap();
    assert_eq!(in_slot(&st, slot.parse().unwrap()).unwrap()["restarts"], 1, "{st}");
}

#[test]
fn a_crash_loop_backs_off_and_the_supervisor_lives() {
    let dir = TempDir::new("crashloop");
    let events = dir.path("events");
    let h = Run::new(&dir, 1)
        .worker_env("TW_FAIL_START", "1")
        .worker_env("TW_EVENTS", events.to_str().unwrap())
        .arg("--ready")
        .arg("alive:300ms")
        .start();
    // Four failures in a row, and the slot waits out its back-off before a fifth start.
    wait_for(LONG, "4 restarts of slot 0, waiting in back-off", || {
        let st = h.status()?;
        let w = in_slot(&st, 0)?;
        (w["state"] == "backoff" && w["restarts"].as_u64()? >= 4).then_some(())
    });
    // Delays double: 100ms, 200ms, 400ms, 800ms. From a worker's own exit to the start of the
    // next one (both clocked by the workers, CLOCK_MONOTONIC) at least the delay passed.
    let ev = wait_for(LONG, "5 starts in the worker's event file", || {
        let ev = worker_events(&events);
        (ev.iter().filter(|e| e["event"] == "start").count() >= 5).then_some(ev)
    });
    let t = |e: &Value| e["t_ns"].as_u64().unwrap();
    let exits: Vec<u64> = ev.iter().filter(|e| e["event"] == "exit").map(t).collect();
    let starts: Vec<u64> = ev.iter().filter(|e| e["event"] == "start").map(t).collect();
    for (i, delay_ms) in [100u64, 200, 400, 800].into_iter().enumerate() {
        let gap_ms = (starts[i + 1] - exits[i]) / 1_000_000;
        assert!(
            gap_ms >= delay_ms,
            "restart {} after {gap_ms}ms, before its {delay_ms}ms back-off: {ev:?}",
            i + 1
        );
    }
    // The slot's `last_error` carries the worker's last output; it waits in back-off with its
    // failures in a row counted and the time to its next start shown.
    let st = h.status().unwrap();
    let w = &st["workers"][0];
    assert!(w["last_error"].as_str().unwrap_or("").contains("last output: worker failing at start"), "{st}");
    assert!(w["failures"].as_u64().unwrap_or(0) >= 4, "{st}");
    if w["state"] == "backoff" {
        assert!(w["restart_in_ms"].as_u64().is_some(), "{st}");
    }
    let mut h = h;
    assert!(h.child.as_mut().unwrap().try_wait().unwrap().is_none(), "supervisor must stay up");
}

fn reload_under_load(keep_alive: bool) {
    let dir = TempDir::new(if keep_alive { "reload-ka" } else { "reload-new" });
    let h = Run::new(&dir, 4)
        .arg("--ready")
        .arg("notify")
        .worker_env("TW_NOTIFY", "1")
        .worker_env("TW_READY_DELAY_MS", "200")
        .start();
    h.wait_started();
    let load = Load::start(&h.addr, 4, keep_alive);
    wait_for(LONG, "some traffic before the reload", || (h.get()["generation"] == 1).then_some(()));
    h.signal(SIGHUP);
    h.wait_generation(2);
    // Traffic keeps flowing after the roll-out; then stop the load.
    let after = wait_for(LONG, "an answer after the reload", || Some(h.get()));
    assert_eq!(after["generation"], 2);
    let report = load.finish();
    let mode = if keep_alive { "keep-alive" } else { "new connection per request" };
    report.guarantee(
        &format!("rolling reload ({mode})"),
        "SIGHUP, 4 workers, 4 client threads",
        "every answer after the roll-out from generation 2",
    );
    assert!(
        report.failed.is_empty(),
        "failed requests during reload: {:?}",
        &report.failed[..report.failed.len().min(5)]
    );
    assert!(report.ok > 20, "too little traffic to prove anything: {}", report.ok);
    // Every answer after the roll-out finished comes from the new generation.
    for _ in 0..20 {
        assert_eq!(h.get()["generation"], 2);
    }
}

#[test]
fn rolling_reload_under_load_loses_no_request_new_connection_each() {
    reload_under_load(false);
}

#[test]
fn rolling_reload_under_load_loses_no_request_keep_alive() {
    reload_under_load(true);
}

#[test]
fn a_broken_new_version_aborts_and_the_old_generation_serves_on() {
    let dir = TempDir::new("broken");
    let broken = dir.path("broken");
    let events = dir.path("events");
    // Readiness by notification: with `alive:D` a slow-starting broken build could pass as
    // ready before it crashes (that is what `--ready notify` is for).
    let h = Run::new(&dir, 3)
        .worker_env("TW_BREAK_FILE", broken.to_str().unwrap())
        .worker_env("TW_EVENTS", events.to_str().unwrap())
        .worker_env("TW_NOTIFY", "1")
        .arg("--ready")
        .arg("notify")
        .start();
    h.wait_started();
    let before: BTreeSet<i64> = h.distinct_workers(3).iter().map(|v| v["pid"].as_i64().unwrap()).collect();
    let load = Load::start(&h.addr, 3, false);
    std::fs::write(&broken, "x").unwrap();
    h.signal(SIGHUP);
    let st = h.wait_last_reload("failed");
    let report = load.finish();
    report.guarantee(
        "broken new version",
        "reload to a build that exits 3 at start",
        "roll-out aborted, old workers serve on",
    );
    assert!(report.failed.is_empty(), "failed requests: {:?}", &report.failed[..report.failed.len().min(5)]);
    // The recorded error names the failing worker, says why and shows its last output.
    let error = st["last_reload"]["error"].as_str().unwrap_or_default();
    let gen2: Vec<Value> = worker_events(&events).into_iter().filter(|e| e["generation"] == 2).collect();
    let failed = gen2.iter().find(|e| e["event"] == "exit").unwrap_or_else(|| panic!("{gen2:?}"));
    assert_eq!(failed["code"], 3, "{gen2:?}");
    assert!(error.contains(&format!("worker 0 (pid {}", failed["pid"])), "names the failing worker: {st}");
    assert!(error.contains("exited with status 3 before it was ready"), "says why: {st}");
    assert!(error.contains("broken build"), "shows its last output: {st}");
    let gen2_starts = gen2.iter().filter(|e| e["event"] == "start").count();
    assert_eq!(gen2_starts, 1, "roll-out must stop at the first failure: {gen2:?}");
    // The old workers are untouched and still serve.
    let after: BTreeSet<i64> = h.distinct_workers(3).iter().map(|v| v["pid"].as_i64().unwrap()).collect();
    assert_eq!(before, after);
    // Fixing the code and reloading recovers.
    std::fs::remove_file(&broken).unwrap();
    h.signal(SIGHUP);
    h.wait_generation(3);
    assert_eq!(h.get()["generation"], 3);
}

#[test]
fn a_candidate_that_never_becomes_ready_times_out_and_aborts() {
    let dir = TempDir::new("never");
    let flag = dir.path("never-ready");
    // Generation 1 notifies; once the flag file exists, new workers never do.
    let script = format!(
        "if [ -e {f} ]; then export TW_NEVER_READY=1; fi; exec python3 {w}",
        f = flag.display(),
        w = worker_py()
    );
    let h = Run::new(&dir, 2)
        .arg("--ready")
        .arg("notify")
        .arg("--ready-timeout")
        .arg("5s")
        .worker_env("TW_NOTIFY", "1")
        .arg("--")
        .arg("sh")
        .arg("-c")
        .arg(&script)
        .start();
    // Both generation-1 workers ready (not one of them in back-off: the timeout leaves room
    // for a slow start on a loaded machine).
    h.wait_generation(1);
    std::fs::write(&flag, "x").unwrap();
    h.signal(SIGHUP);
    let st = h.wait_last_reload("failed");
    let error = st["last_reload"]["error"].as_str().unwrap_or_default();
    assert!(error.contains("not ready within 5.0s (ready timeout)"), "{st}");
    assert_eq!(h.get()["generation"], 1);
}

#[test]
fn reloads_during_a_rollout_are_coalesced_into_one_more() {
    let dir = TempDir::new("coalesce");
    let h = Run::new(&dir, 2)
        .arg("--ready")
        .arg("notify")
        .worker_env("TW_NOTIFY", "1")
        .worker_env("TW_READY_DELAY_MS", "300")
        .start();
    h.wait_started();
    h.signal(SIGHUP);
    wait_for(LONG, "the roll-out to start", || {
        let st = h.status()?;
        st["workers"].as_array()?.iter().any(|w| w["state"] == "starting (new)").then_some(())
    });
    for _ in 0..5 {
        h.signal(SIGHUP);
    }
    // Exactly one extra roll-out for the five requests: generation 3, and no fourth (it would
    // have started at once, so it would show as a new worker or the status line).
    let st = h.wait_generation(3);
    assert!(
        !st["status"].as_str().unwrap_or_default().contains("reloading"),
        "requests must be coalesced: {st}"
    );
    let st = h.status().unwrap();
    assert!(
        st["workers"].as_array().unwrap().iter().all(|w| w["generation"] == 3),
        "requests must be coalesced: {st}"
    );
    let gens: BTreeSet<i64> =
        h.distinct_workers(2).iter().map(|v| v["generation"].as_i64().unwrap()).collect();
    assert_eq!(gens, BTreeSet::from([3]));
}

#[test]
fn sigterm_with_a_worker_ignoring_it_ends_after_the_stop_timeout_with_nothing_left() {
    let dir = TempDir::new("stop");
    let mut h = Run::new(&dir, 2)
        .arg("--stop-timeout")
        .arg("1s")
        .worker_env("TW_IGNORE_TERM", "1")
        .worker_env("TW_CHILD", "1")
        .start();
    h.wait_started();
    let pids: Vec<i32> = h.distinct_workers(2).iter().map(|v| v["pid"].as_i64().unwrap() as i32).collect();
    assert!(pids.iter().all(|p| processes_in_group(*p).len() >= 2), "workers have their sleep child");
    let asked = std::time::Instant::now();
    h.signal(SIGTERM);
    let status = h.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{}", h.stderr());
    // They ignore SIGTERM: only the SIGKILL at the stop timeout ends them (never earlier).
    assert!(
        asked.elapsed() >= Duration::from_secs(1),
        "ended after {:?}, before the stop timeout",
        asked.elapsed()
    );
    for p in pids {
        assert!(processes_in_group(p).is_empty(), "processes of worker {p} left behind");
    }
    assert!(!dir.path("app.sock").exists(), "the unix socket file is removed at exit");
}

#[test]
fn ttin_and_ttou_add_and_remove_a_worker() {
    let dir = TempDir::new("scale");
    let h = Run::new(&dir, 1).start();
    h.wait_started();
    h.signal(SIGTTIN);
    let st = wait_for(LONG, "2 desired, slot 1 ready", || {
        let st = h.status()?;
        (st["desired"] == 2 && in_slot(&st, 1)?["state"] == "ready").then_some(st)
    });
    let added = in_slot(&st, 1).unwrap()["pid"].as_i64().unwrap() as i32;
    let seen = h.distinct_workers(2);
    assert_eq!(seen.len(), 2);
    h.signal(SIGTTOU);
    // Slot 1 is gone from status (not even stopping) and so is its worker.
    wait_for(LONG, "1 desired, slot 1 gone", || {
        let st = h.status()?;
        let ids: Vec<&Value> = st["workers"].as_array()?.iter().map(|w| &w["id"]).collect();
        (st["desired"] == 1 && ids == [&Value::from(0)]).then_some(())
    });
    wait_for(LONG, "the removed worker to be gone", || processes_in_group(added).is_empty().then_some(()));
    assert_eq!(in_slot(&h.status().unwrap(), 0).unwrap()["state"], "ready");
}

#[test]
fn systemd_notify_protocol_ready_reloading_status_stopping() {
    let dir = TempDir::new("notify");
    let mut sink = NotifySink::new(&dir);
    let mut h = Run::new(&dir, 2)
        .env("NOTIFY_SOCKET", sink.path.to_str().unwrap())
        .env("WATCHDOG_USEC", "400000")
        .arg("--ready")
        .arg("alive:200ms")
        .start();
    sink.wait_for("READY=1", LONG);
    sink.wait_for("STATUS=2/2 ready · generation 1", LONG);
    sink.wait_for("WATCHDOG=1", LONG);
    h.signal(SIGHUP);
    sink.wait_for("RELOADING=1", LONG);
    let reloading = sink.messages.iter().find(|m| m.contains("RELOADING=1")).unwrap().clone();
    let usec: u64 = reloading
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .expect("MONOTONIC_USEC with RELOADING=1")
        .parse()
        .unwrap();
    assert!(usec > 0);
    sink.wait_for("EXTEND_TIMEOUT_USEC=", LONG);
    sink.wait_for("STATUS=2/2 ready · generation 2", LONG);
    let after_reload =
        sink.messages.iter().skip_while(|m| !m.contains("RELOADING=1")).filter(|m| *m == "READY=1").count();
    assert_eq!(after_reload, 1, "one READY=1 at the end of the roll-out: {:?}", sink.messages);
    h.signal(SIGTERM);
    sink.wait_for("STOPPING=1", LONG);
    assert_eq!(h.wait_exit(LONG).code(), Some(0));
}

/// Starts `systemd-socket-activate ARGS` (herdsman behind it) and waits for its socket `sock`.
fn socket_activated<S: AsRef<std::ffi::OsStr>>(args: &[S], sock: &std::path::Path) -> Herdsman {
    let child = std::process::Command::new("systemd-socket-activate")
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("systemd-socket-activate (package systemd)");
    let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let h = Herdsman {
        child: Some(child),
        stderr,
        stdout: Default::default(),
        addr: Addr::Unix(sock.to_path_buf()),
    };
    wait_for(LONG, "the socket to exist", || sock.exists().then_some(()));
    h
}

#[test]
fn socket_activation_via_systemd_socket_activate() {
    let dir = TempDir::new("activate");
    let sock = dir.path("act.sock");
    let args: Vec<String> = [
        "-l",
        sock.to_str().unwrap(),
        "--fdname=web",
        "-E",
        "PATH",
        BIN,
        "run",
        "--name",
        "t",
        "-w",
        "2",
        "--control",
        dir.path("control.sock").to_str().unwrap(),
        "--",
        "python3",
        &worker_py(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let h = socket_activated(&args, &sock);
    let seen = h.distinct_workers(2);
    for v in &seen {
        assert_eq!(v["listen_fdnames"], "web", "LISTEN_FDNAMES is passed through: {v}");
        assert_eq!(v["listen_pid_ok"], true);
    }
}

/// issue 26: systemd passes herdsman's own fd store back in LISTEN_FDS next to the socket
/// unit's sockets, in no particular order. A stored (non-socket) fd named `herdsman.*` at
/// fd 3, before the socket, must neither fail the start ("fd 3 is not a socket") nor reach
/// the workers: they get the one socket, named `web`.
#[test]
fn stored_fds_passed_back_with_the_sockets_are_told_apart_by_name() {
    let dir = TempDir::new("activate-stored");
    let sock = dir.path("act.sock");
    let control = dir.path("control.sock");
    let script = format!(
        "exec 4<&3 3</dev/null; LISTEN_FDS=2 LISTEN_FDNAMES=herdsman.state-a:web exec {BIN} run --name t -w 2 --control {} -- python3 {}",
        control.display(),
        worker_py()
    );
    let args = ["-l", sock.to_str().unwrap(), "--fdname=web", "-E", "PATH", "sh", "-c", &script];
    let h = socket_activated(&args, &sock);
    let seen = h.distinct_workers(2);
    for v in &seen {
        assert_eq!(v["listen_fdnames"], "web", "only the socket unit's fd reaches workers: {v}");
        assert_eq!(v["listen_fds"], "1", "{v}");
    }
}

#[test]
fn a_reload_rereads_the_config_and_an_invalid_one_changes_nothing() {
    let dir = TempDir::new("config-reload");
    let sock = dir.path("app.sock");
    let cfg = dir.path("web.toml");
    let write = |workers: &str, tag: &str| {
        let text = format!(
            "command = [\"python3\", {w:?}]\nworkers = {workers}\nlisten = [\"unix:{s}\"]\nready = \"alive:200ms\"\n[env]\nTW_TAG = {tag:?}\n",
            w = worker_py(),
            s = sock.display()
        );
        std::fs::write(&cfg, text).unwrap();
    };
    write("2", "v1");
    let control = dir.path("control.sock").display().to_string();
    let args = ["run".into(), "-c".into(), cfg.to_str().unwrap().into(), "--control".into(), control];
    let h = Herdsman::spawn(&args, &[], Addr::Unix(sock.clone()));
    h.wait_started();
    assert_eq!(h.status().unwrap()["name"], "web", "name defaults to the config file stem");
    assert_eq!(h.get()["tag"], "v1");

    std::fs::write(&cfg, "workers = \"lots\"\n").unwrap();
    h.signal(SIGHUP);
    let st = h.wait_last_reload("failed");
    assert!(
        st["last_reload"]["error"].as_str().unwrap_or_default().contains("invalid configuration"),
        "{st}"
    );
    assert_eq!(h.distinct_workers(2).iter().filter(|v| v["tag"] == "v1" && v["generation"] == 1).count(), 2);

    write("3", "v2");
    h.signal(SIGHUP);
    h.wait_generation(2);
    let seen = h.distinct_workers(3);
    assert!(seen.iter().all(|v| v["tag"] == "v2" && v["generation"] == 2), "{seen:?}");
}

#[test]
fn a_hung_worker_is_replaced_by_the_watchdog_without_failed_requests() {
    let dir = TempDir::new("watchdog");
    // 3 s, not less: the healthy worker must never miss its own pings on a loaded machine (it
    // pings every half interval), or its in-flight requests would fail with it.
    let h = Run::new(&dir, 2)
        .arg("--ready")
        .arg("notify")
        .arg("--watchdog")
        .arg("3s")
        .arg("--stop-timeout")
        .arg("1s")
        .worker_env("TW_NOTIFY", "1")
        .worker_env("TW_WATCHDOG", "1")
        .worker_env("TW_HANG_ONCE_FILE", dir.path("hang-once").to_str().unwrap())
        .worker_env("TW_HANG_AFTER_MS", "1500")
        .worker_env("TW_FAULT_WORKER", "0")
        .start();
    h.wait_started();
    let v = h.get();
    assert_eq!(v["env"]["WATCHDOG_USEC"], "3000000");
    assert_eq!(v["env"]["WATCHDOG_PID"], v["pid"].to_string(), "WATCHDOG_PID is the worker's own pid");
    let slot0 =
        |st: &Value| st["workers"].as_array().unwrap().iter().find(|w| w["id"] == 0).cloned().unwrap();
    let old = slot0(&h.status().unwrap())["pid"].as_i64().unwrap() as i32;
    let load = Load::start(&h.addr, 3, false);
    // Replaced: slot 0 serves from a new pid (its restart counted), the hung one is gone.
    wait_for(LONG, "slot 0 replaced", || {
        let st = h.status()?;
        let w = slot0(&st);
        (w["pid"] != old && w["state"] == "ready" && w["restarts"] == 1).then_some(())
    });
    let report = load.finish();
    report.guarantee(
        "hung worker",
        "worker 0 stops accepting and pinging; --watchdog 3s",
        "replaced, hung one SIGKILLed",
    );
    assert!(report.failed.is_empty(), "{:?}", &report.failed[..report.failed.len().min(5)]);
    wait_for(LONG, "the hung worker to be gone", || processes_in_group(old).is_empty().then_some(()));
    let ids: BTreeSet<i64> = h.distinct_workers(2).iter().map(|v| v["worker_id"].as_i64().unwrap()).collect();
    assert_eq!(ids, BTreeSet::from([0, 1]));
}

#[test]
fn a_worker_over_its_memory_limit_is_replaced_gracefully() {
    let dir = TempDir::new("maxmem");
    let events = dir.path("events");
    let h = Run::new(&dir, 1)
        .arg("--ready")
        .arg("notify")
        .arg("--max-memory")
        .arg("60M")
        .worker_env("TW_NOTIFY", "1")
        .worker_env("TW_ALLOC_ONCE_FILE", dir.path("alloc-once").to_str().unwrap())
        .worker_env("TW_ALLOC_MB", "100")
        .worker_env("TW_EVENTS", events.to_str().unwrap())
        .start();
    h.wait_started();
    let first = h.get()["pid"].as_i64().unwrap();
    // Replaced: a new ready worker in slot 0, counted as a restart, the old one gone for
    // memory (and not as a crash).
    wait_for(LONG, "slot 0 replaced", || {
        let st = h.status()?;
        let w = in_slot(&st, 0)?;
        (w["pid"] != first && w["state"] == "ready" && w["restarts"] == 1).then_some(())
    });
    let m = h.wait_metric("herdsman_worker_exits_total", &[("worker", "0"), ("reason", "memory")], 1.0);
    assert_eq!(
        sample(&m, "herdsman_worker_exits_total", &[("worker", "0"), ("reason", "signal")]),
        Some(0.0)
    );
    // Gracefully: the old worker got the stop signal and drained (it exited 0 by itself).
    let ev = worker_events(&events);
    assert!(ev.iter().any(|e| e["pid"] == first && e["event"] == "exit" && e["code"] == 0), "{ev:?}");
    assert_ne!(h.get()["pid"].as_i64().unwrap(), first);
}

#[test]
fn a_worker_that_ran_well_is_restarted_at_once_after_a_crash() {
    let dir = TempDir::new("healthy-crash");
    // backoff_reset is 10 s by default; use a config to make "ran well" quick to reach, and a
    // back-off of an hour: a restart that comes at all came without one.
    let cfg = dir.path("app.toml");
    let text = "backoff_reset = \"300ms\"\nbackoff_initial = \"1h\"\nbackoff_max = \"1h\"\n";
    std::fs::write(&cfg, text).unwrap();
    let events = dir.path("events");
    let broken = dir.path("broken");
    let h = Run::new(&dir, 1)
        .arg("-c")
        .arg(cfg.to_str().unwrap())
        .arg("--ready")
        .arg("notify")
        .worker_env("TW_NOTIFY", "1")
        .worker_env("TW_BREAK_FILE", broken.to_str().unwrap())
        .worker_env("TW_EVENTS", events.to_str().unwrap())
        .start();
    h.wait_started();
    // Ready for longer than backoff_reset: its uptime grew by 0.4 s since status first showed
    // it ready.
    let ready_at = wait_for(LONG, "the worker ready", || {
        let st = h.status()?;
        let w = in_slot(&st, 0)?;
        (w["state"] == "ready").then(|| w["uptime_s"].as_f64()).flatten()
    });
    let pid = wait_for(LONG, "the worker to have run well (ready > backoff_reset)", || {
        let st = h.status()?;
        let w = in_slot(&st, 0)?;
        (w["uptime_s"].as_f64()? > ready_at + 0.4).then(|| w["pid"].as_i64()).flatten()
    });
    // It crashes after its good run; its replacement fails before it is ready (the broken
    // build exits 3 at start): a quick failure, whatever the machine's load.
    std::fs::write(&broken, "").unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL)
        .unwrap();
    // Restarted at once after the good run, then the quick failure waits out its back-off: in
    // status, two restarts and the slot in `backoff`, empty.
    let st = wait_for(LONG, "slot 0 in back-off after 2 restarts", || {
        let st = h.status()?;
        let w = in_slot(&st, 0)?;
        (w["state"] == "backoff" && w["restarts"] == 2).then_some(st)
    });
    assert!(in_slot(&st, 0).unwrap()["pid"].is_null(), "{st}");
    let ev = worker_events(&events);
    let starts = ev.iter().filter(|e| e["event"] == "start").count();
    assert_eq!(starts, 2, "the first worker and its immediate restart, nothing after the failure: {ev:?}");
    assert!(ev.iter().any(|e| e["event"] == "exit" && e["code"] == 3), "the restart failed: {ev:?}");
}

/// The supervisor's real, effective and saved uid, from /proc.
fn uids_of(pid: i32) -> Vec<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().skip(1).take(3).map(|u| u.parse().unwrap()).collect()
}

fn expected_groups(user: &str, gid: u32) -> serde_json::Value {
    let name = std::ffi::CString::new(user).unwrap();
    let mut groups: Vec<u32> = nix::unistd::getgrouplist(&name, nix::unistd::Gid::from_raw(gid))
        .unwrap()
        .into_iter()
        .map(|g| g.as_raw())
        .collect();
    groups.sort();
    groups.dedup();
    serde_json::json!(groups)
}

#[test]
fn workers_run_as_the_user_flag_names_and_the_supervisor_stays_root() {
    if !nix::unistd::geteuid().is_root() {
        return support::needs(
            "workers_run_as_the_user_flag_names_and_the_supervisor_stays_root",
            "needs root to switch users",
        );
    }
    let nobody = nix::unistd::User::from_name("nobody").unwrap().expect("user nobody");
    let (uid, gid) = (nobody.uid.as_raw(), nobody.gid.as_raw());
    let dir = TempDir::shared("user");
    let h = Run::new(&dir, 2)
        .cwd(&dir.0)
        .arg("--ready")
        .arg("notify")
        .worker_env("TW_NOTIFY", "1")
        .arg("--user")
        .arg("nobody")
        .env("HOME", "/root")
        .env("USER", "root")
        .arg("--")
        .arg(SYSTEM_PYTHON)
        .arg(&dir.worker_py())
        .start();
    h.wait_started();
    for v in h.distinct_workers(2) {
        assert_eq!(v["uids"], serde_json::json!([uid, uid, uid]), "{v}");
        assert_eq!(v["gids"], serde_json::json!([gid, gid, gid]), "{v}");
        assert_eq!(v["groups"], expected_groups("nobody", gid), "{v}");
        assert_eq!(v["env"]["HOME"], nobody.dir.to_str().unwrap(), "{v}");
        assert_eq!(v["env"]["USER"], "nobody", "{v}");
        assert_eq!(v["env"]["LOGNAME"], "nobody", "{v}");
    }
    assert_eq!(uids_of(h.pid()), vec![0, 0, 0], "the supervisor keeps its own credentials");
    // Still able to manage its workers: a reload replaces them, and they are again nobody.
    h.signal(SIGHUP);
    let v = wait_for(LONG, "a generation-2 worker", || Some(h.get()).filter(|v| v["generation"] == 2));
    assert_eq!(v["uids"], serde_json::json!([uid, uid, uid]), "{v}");
}

#[test]
fn config_user_and_group_set_the_workers_primary_group() {
    if !nix::unistd::geteuid().is_root() {
        return support::needs(
            "config_user_and_group_set_the_workers_primary_group",
            "needs root to switch users",
        );
    }
    let nobody = nix::unistd::User::from_name("nobody").unwrap().expect("user nobody");
    let daemon = nix::unistd::Group::from_name("daemon").unwrap().expect("group daemon");
    let (uid, gid) = (nobody.uid.as_raw(), daemon.gid.as_raw());
    let dir = TempDir::shared("group");
    let cfg = dir.path("app.toml");
    std::fs::write(&cfg, "user = \"nobody\"\ngroup = \"daemon\"\n").unwrap();
    let h = Run::new(&dir, 1)
        .cwd(&dir.0)
        .arg("--config")
        .arg(cfg.to_str().unwrap())
        .arg("--")
        .arg(SYSTEM_PYTHON)
        .arg(&dir.worker_py())
        .start();
    h.wait_started();
    let v = h.get();
    assert_eq!(v["uids"], serde_json::json!([uid, uid, uid]), "{v}");
    assert_eq!(v["gids"], serde_json::json!([gid, gid, gid]), "{v}");
    assert_eq!(v["groups"], expected_groups("nobody", gid), "{v}");
}

#[test]
fn a_failed_credential_drop_fails_the_worker_start_and_never_runs_it_as_root() {
    if !nix::unistd::geteuid().is_root() {
        return support::needs(
            "a_failed_credential_drop_fails_the_worker_start_and_never_runs_it_as_root",
            "needs root",
        );
    }
    // herdsman as root but without CAP_SETGID/CAP_SETUID: setgroups fails in the child.
    let dir = TempDir::shared("dropfail");
    let run =
        Run::new(&dir, 1).arg("--user").arg("nobody").arg("--").arg(SYSTEM_PYTHON).arg(&dir.worker_py());
    let mut cmd = std::process::Command::new("setpriv");
    cmd.current_dir(&dir.0);
    cmd.args(["--inh-caps=-setgid,-setuid", "--bounding-set=-setgid,-setuid", BIN]).args(&run.args);
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    cmd.env_remove("NOTIFY_SOCKET").env_remove("LISTEN_FDS").env_remove("LISTEN_PID");
    let mut child = cmd.spawn().unwrap();
    let stderr = capture(child.stderr.take().unwrap(), true);
    let stdout = capture(child.stdout.take().unwrap(), false);
    let h = Herdsman { child: Some(child), stderr, stdout, addr: run.addr };
    // The slot waits in back-off with no process: nothing ever ran as root in its place.
    let st = wait_for(LONG, "the slot in back-off", || {
        let st = h.status()?;
        (st["workers"][0]["state"] == "backoff").then_some(st)
    });
    assert!(st["workers"][0]["pid"].is_null(), "{st}");
    assert_eq!(st["ready"], 0, "{st}");
    // The slot's `last_error` names the failing step and errno; the start is retried
    // (failures in a row count up).
    wait_for(LONG, "two failed starts naming setgroups EPERM", || {
        let st = h.status()?;
        let w = &st["workers"][0];
        (w["failures"].as_u64().unwrap_or(0) >= 2
            && w["last_error"]
                .as_str()
                .unwrap_or("")
                .contains("setting the supplementary groups (setgroups): Operation not permitted"))
        .then_some(())
    });
}

/// KiB of herdsman's own code resident in process `pid` (`Rss` of its executable mappings).
fn resident_code_kib(pid: i32) -> u64 {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    let exe = exe.to_str().unwrap();
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut in_code = false;
    let mut kib = 0;
    for line in smaps.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.first().is_some_and(|a| a.contains('-') && !a.ends_with(':')) && f.len() >= 5 {
            in_code = f[1].contains('x') && f.get(5).is_some_and(|p| p.starts_with(exe));
        } else if in_code && f.first() == Some(&"Rss:") {
            kib += f[1].parse::<u64>().unwrap();
        }
    }
    kib
}

/// Issue 24 (supervisor RSS): the code a roll-out ran leaves the supervisor's resident set once
/// it is quiet again, as the start-up's does (it used to stay mapped for the process's life).
#[test]
fn a_rollouts_code_leaves_the_resident_set_once_the_supervisor_is_quiet() {
    let dir = TempDir::new("rss-settle");
    let h = Run::new(&dir, 2).arg("--ready").arg("notify").worker_env("TW_NOTIFY", "1").start();
    h.wait_started();
    h.signal(SIGHUP);
    // The most code seen resident while the supervisor works (a roll-out, status requests:
    // each request maps its code in again, so a slow reading here still sees a busy set).
    let mut busy = 0;
    h.wait_generation(2);
    for _ in 0..5 {
        h.status().unwrap();
        busy = busy.max(resident_code_kib(h.pid()));
    }
    // Nothing asks anything now: within a quiet second or two (at most one idle check, a
    // minute, when the checks had backed off), the supervisor gives its code pages back
    // (they stay in the page cache).
    wait_for(Duration::from_secs(90), "the roll-out's code released", || {
        let now = resident_code_kib(h.pid());
        (now * 4 < busy * 3).then_some(())
    });
}
