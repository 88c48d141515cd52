//! PM2 compatibility for Node apps: `NODE_APP_INSTANCE`, the IPC channel (`process.send('ready')`
//! as readiness, PM2's `'shutdown'` message as the stop request). Real `node` processes.

// Test helpers fail the test by panicking, on purpose.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeSet;

use support::*;

/// True (after one visible SKIP line) when `node` is not installed: a newcomer's `cargo test`
/// skips these tests; the package build and CI have it (`nodejs <!nocheck>` in Build-Depends).
fn no_node(test: &str) -> bool {
    let ok = have("node");
    if !ok {
        support::skip(test, "needs node (apt install nodejs)");
    }
    !ok
}

#[test]
fn every_worker_gets_node_app_instance_equal_to_its_slot_and_a_non_node_worker_no_channel() {
    if no_node("every_worker_gets_node_app_instance_equal_to_its_slot_and_a_non_node_worker_no_channel") {
        return;
    }
    let dir = TempDir::new("instance");
    let h = Run::new(&dir, 3).start();
    h.wait_started();
    let seen = h.distinct_workers(3);
    let ids: BTreeSet<i64> = seen.iter().map(|v| v["worker_id"].as_i64().unwrap()).collect();
    assert_eq!(ids, BTreeSet::from([0, 1, 2]));
    for v in &seen {
        assert_eq!(v["env"]["NODE_APP_INSTANCE"], v["worker_id"].to_string(), "{v}");
        // Not Node: no channel, no stray descriptor.
        assert!(v["env"].get("NODE_CHANNEL_FD").is_none(), "{v}");
        assert!(v["env"].get("NODE_CHANNEL_SERIALIZATION_MODE").is_none(), "{v}");
        assert_eq!(v["open_fds"], serde_json::json!([0, 1, 2, 3]), "stray fds: {v}");
    }
}

fn app_js() -> String {
    format!("{}/tests/support/app.js", env!("CARGO_MANIFEST_DIR"))
}

/// `herdsman run ... [extra] -- node app.js` (`extra`: herdsman's flags, `-e` included).
fn node_app(dir: &TempDir, workers: usize, extra: &[&str]) -> Run {
    let mut run = Run::new(dir, workers);
    for a in extra {
        run = run.arg(a);
    }
    run.arg("--").arg("node").arg(&app_js())
}

/// What each app wrote at its exit (`APP_EXIT_MARK`): `"<told> <code>"` by pid.
fn exit_marks(dir: &TempDir) -> Vec<(String, String)> {
    let mut marks: Vec<(String, String)> = std::fs::read_dir(&dir.0)
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let pid = name.strip_prefix("exit.")?.to_string();
            Some((pid, std::fs::read_to_string(e.path()).ok()?))
        })
        .collect();
    marks.sort();
    marks
}

#[test]
fn process_send_ready_makes_node_workers_ready_under_ready_notify_and_through_a_reload() {
    if no_node("process_send_ready_makes_node_workers_ready_under_ready_notify_and_through_a_reload") {
        return;
    }
    let dir = TempDir::new("node-ready");
    let h = node_app(&dir, 2, &["--ready", "notify"]).start();
    // No READY=1 is ever sent: only `process.send('ready')` can make them ready.
    h.wait_generation(1);
    let seen = h.distinct_workers(2);
    for v in &seen {
        assert_eq!(v["instance"], v["worker_id"].to_string(), "NODE_APP_INSTANCE is the slot: {v}");
        assert_eq!(v["listen_fds"], "1", "{v}");
        assert_eq!(v["channel_fd"], "4", "the channel comes after the one socket: {v}");
        assert_eq!(v["connected"], true, "{v}");
    }
    h.signal(libc::SIGHUP);
    let st = h.wait_generation(2);
    assert_eq!(st["last_reload"]["result"], "ok", "{st}");
    let seen = h.distinct_workers(2);
    assert!(seen.iter().all(|v| v["generation"] == 2), "{seen:?}");
}

#[test]
fn a_node_app_that_never_says_ready_is_not_ready_under_ready_notify() {
    if no_node("a_node_app_that_never_says_ready_is_not_ready_under_ready_notify") {
        return;
    }
    let dir = TempDir::new("node-silent");
    let h =
        node_app(&dir, 1, &["--ready", "notify", "--ready-timeout", "1h", "-e", "APP_NO_READY=1"]).start();
    // It serves (so it has started and listens), yet it never told herdsman it is ready.
    let v = wait_for(std::time::Duration::from_secs(60), "the app answering", || get(&h.addr).ok());
    assert_eq!(v["connected"], true, "{v}");
    let st = h.status().unwrap();
    assert_eq!(st["workers"][0]["state"], "starting", "{st}");
}

#[test]
fn stop_signal_message_sends_pm2s_shutdown_and_the_app_exits_0_on_reload_and_stop() {
    if no_node("stop_signal_message_sends_pm2s_shutdown_and_the_app_exits_0_on_reload_and_stop") {
        return;
    }
    let dir = TempDir::new("node-shutdown");
    let mark = dir.path("exit");
    let env = format!("APP_EXIT_MARK={}", mark.display());
    let mut h = node_app(&dir, 1, &["--ready", "notify", "--stop-signal", "message", "-e", &env]).start();
    h.wait_generation(1);
    let first = h.get()["pid"].to_string();
    // A reload stops the old worker with the message: it closes its server and exits 0.
    h.signal(libc::SIGHUP);
    h.wait_generation(2);
    let m = h.wait_metric("herdsman_worker_exits_total", &[("worker", "0"), ("reason", "exit")], 1.0);
    assert_eq!(
        sample(&m, "herdsman_worker_exits_total", &[("worker", "0"), ("reason", "signal")]),
        Some(0.0)
    );
    assert_eq!(exit_marks(&dir), vec![(first, "shutdown 0".to_string())]);
    let second = h.get()["pid"].to_string();
    // So does stopping the supervisor.
    assert!(h.stop().success());
    let marks = exit_marks(&dir);
    assert_eq!(
        marks.iter().find(|(p, _)| *p == second).map(|(_, m)| m.as_str()),
        Some("shutdown 0"),
        "{marks:?}"
    );
}

#[test]
fn node_workers_keep_their_ipc_channel_across_an_in_place_upgrade() {
    if no_node("node_workers_keep_their_ipc_channel_across_an_in_place_upgrade") {
        return;
    }
    let dir = TempDir::new("node-upgrade");
    let mark = dir.path("exit");
    let env = format!("APP_EXIT_MARK={}", mark.display());
    let h = node_app(&dir, 2, &["--ready", "notify", "--stop-signal", "message", "-e", &env]).start();
    let before = h.wait_generation(1);
    let pids = |st: &Value| -> BTreeSet<String> {
        st["workers"].as_array().unwrap().iter().map(|w| w["pid"].to_string()).collect()
    };
    let copy = dir.path("herdsman-new");
    std::fs::copy(BIN, &copy).unwrap();
    let control = h.control().unwrap();
    let out = std::process::Command::new(BIN)
        .args(["upgrade", control.to_str().unwrap(), "--binary", copy.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let after = h.status().unwrap();
    assert_eq!(after["upgrades"], 1, "{after}");
    assert_eq!(pids(&after), pids(&before), "the same workers");
    // The new image stops the workers it took over with the message, on their own channels:
    // each closes its server and exits 0 (a lost channel would mean SIGTERM, and death by it).
    h.signal(libc::SIGHUP);
    h.wait_generation(2);
    for slot in ["0", "1"] {
        let m = h.wait_metric("herdsman_worker_exits_total", &[("worker", slot), ("reason", "exit")], 1.0);
        let killed = sample(&m, "herdsman_worker_exits_total", &[("worker", slot), ("reason", "signal")]);
        assert_eq!(killed, Some(0.0), "worker {slot}");
    }
    let told: Vec<(String, String)> =
        pids(&before).into_iter().map(|p| (p, "shutdown 0".to_string())).collect();
    assert_eq!(exit_marks(&dir), told);
}

#[test]
fn a_node_app_that_closed_its_channel_is_stopped_with_sigterm_instead_of_the_message() {
    if no_node("a_node_app_that_closed_its_channel_is_stopped_with_sigterm_instead_of_the_message") {
        return;
    }
    let dir = TempDir::new("node-disconnect");
    // No stop timeout to fall back on: only the SIGTERM instead of the message stops it.
    let mut h = node_app(
        &dir,
        1,
        &["--ready", "notify", "--stop-signal", "message", "--stop-timeout", "1h", "-e", "APP_DISCONNECT=1"],
    )
    .start();
    h.wait_generation(1);
    wait_for(std::time::Duration::from_secs(60), "the app to close its channel", || {
        (h.get()["connected"] == false).then_some(())
    });
    h.signal(libc::SIGHUP);
    h.wait_generation(2);
    // Killed by the SIGTERM (Node has no handler for it), the supervisor unharmed (no SIGPIPE).
    h.wait_metric("herdsman_worker_exits_total", &[("worker", "0"), ("reason", "signal")], 1.0);
    assert!(h.status().is_some());
    assert!(h.stop().success());
}
