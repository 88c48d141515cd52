//! `--watch`, end to end: a real supervisor with real inotify and real Python workers; file
//! changes become one rolling reload per burst, ignored paths none, and changes during a
//! roll-out one reload after it. Asserted on `status --json` (`watch.reloads`,
//! `watch.trigger`, `generation`), after waiting (with a deadline) until the roll-out is over
//! and the watcher has nothing pending, never on log wording or on how fast the machine is.

// Test helpers fail the test by panicking, on purpose.
#![allow(clippy::unwrap_used)]

mod support;

use std::process::Command;
use std::time::Duration;

use support::*;

const LONG: Duration = Duration::from_secs(120);

/// A supervisor of one notify-ready worker watching `dir/src` (created), with `extra` flags.
fn start(dir: &TempDir, extra: &[&str], worker_env: &[(&str, &str)]) -> Herdsman {
    std::fs::create_dir_all(dir.path("src")).unwrap();
    std::fs::write(dir.path("src/app.js"), "v1").unwrap();
    let mut run = Run::new(dir, 1)
        .arg("--ready")
        .arg("notify")
        .arg("--min-ready")
        .arg("0s")
        .arg("--watch")
        .arg(&dir.path("src").display().to_string())
        .worker_env("TW_NOTIFY", "1");
    for a in extra {
        run = run.arg(a);
    }
    for (k, v) in worker_env {
        run = run.worker_env(k, v);
    }
    let h = run.start();
    h.wait_started();
    h
}

/// Waits until the roll-outs are over (every worker ready on `generation`) and the watcher
/// has no change waiting for its reload; returns the status then.
fn wait_settled(h: &Herdsman, generation: u64) -> Value {
    wait_for(LONG, &format!("generation {generation} settled and nothing pending"), || {
        let st = h.status()?;
        let workers = st["workers"].as_array()?;
        let settled = workers.iter().all(|w| w["state"] == "ready" && w["generation"] == generation);
        let idle = st["watch"]["pending"] == false && st["status"].as_str()?.contains(" ready · generation");
        (st["generation"] == generation && settled && idle && st["ready"] == st["desired"]).then_some(st)
    })
}

#[test]
fn a_burst_of_50_file_writes_is_exactly_one_rolling_reload() {
    let dir = TempDir::new("watch-burst");
    let h = start(&dir, &[], &[]);
    let st = h.status().unwrap();
    assert_eq!((st["generation"].as_u64(), st["watch"]["reloads"].as_u64()), (Some(1), Some(0)));
    // The burst is written while the supervisor is stopped, so that its pace (a loaded machine
    // may pause this thread) cannot split it: the kernel queues every event, and the watcher
    // reads them in one go once the supervisor runs again.
    h.signal(libc::SIGSTOP);
    for i in 0..50 {
        std::fs::write(dir.path(&format!("src/f{i}.js")), format!("{i}")).unwrap();
    }
    h.signal(libc::SIGCONT);
    wait_for(LONG, "a reload for the burst", || {
        (h.status()?["watch"]["reloads"].as_u64()? >= 1).then_some(())
    });
    let st = wait_settled(&h, 2);
    assert_eq!(st["watch"]["reloads"], 1, "{st}");
    assert_eq!(st["watch"]["trigger"], dir.path("src/f0.js").display().to_string(), "{st}");
    assert_eq!(st["last_reload"]["result"], "ok", "{st}");
    assert_eq!(st["watch"]["paths"], serde_json::json!([dir.path("src").display().to_string()]));
}

#[test]
fn writes_to_ignored_paths_do_not_reload() {
    let dir = TempDir::new("watch-ignore");
    std::fs::create_dir_all(dir.path("src/node_modules/dep")).unwrap();
    std::fs::create_dir_all(dir.path("src/.git")).unwrap();
    let h = start(&dir, &["--watch-ignore", "*.tmp", "--watch-ignore", "build"], &[]);
    // Ignored by default (.git, node_modules, swap files, logs) and by --watch-ignore.
    for ignored in [
        "src/node_modules/dep/index.js",
        "src/.git/index",
        "src/.app.js.swp",
        "src/app.js~",
        "src/server.log",
        "src/x.tmp",
    ] {
        std::fs::write(dir.path(ignored), "x").unwrap();
    }
    std::fs::create_dir_all(dir.path("src/build/assets")).unwrap();
    std::fs::write(dir.path("src/build/assets/bundle.js"), "x").unwrap();
    // Then one change that counts: the kernel reports the changes in order, so the reload's
    // trigger is the first change that counted.
    std::fs::write(dir.path("src/app.js"), "v2").unwrap();
    wait_for(LONG, "the reload for app.js", || {
        (h.status()?["watch"]["reloads"].as_u64()? >= 1).then_some(())
    });
    let st = wait_settled(&h, 2);
    assert_eq!(st["watch"]["trigger"], dir.path("src/app.js").display().to_string(), "{st}");
    assert_eq!(st["watch"]["reloads"], 1, "{st}");
}

#[test]
fn changes_during_a_rollout_make_one_reload_after_it() {
    let dir = TempDir::new("watch-rollout");
    let gate = dir.path("gate");
    std::fs::write(dir.path("gate0"), "").unwrap();
    // A long ready timeout: the held roll-out must not fail on its own on a slow machine.
    let h = start(&dir, &["--ready-timeout", "10m"], &[("TW_READY_GATE", &gate.display().to_string())]);
    // A roll-out that cannot end until the test opens the gate: its new worker waits for it.
    std::fs::remove_file(dir.path("gate0")).unwrap();
    let control = h.control().unwrap();
    let out = Command::new(BIN).args(["reload", control.to_str().unwrap(), "--no-wait"]).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    wait_for(LONG, "the roll-out's new worker", || {
        let st = h.status()?;
        st["workers"].as_array()?.iter().any(|w| w["state"] == "starting (new)").then_some(())
    });
    for i in 0..10 {
        std::fs::write(dir.path(&format!("src/during{i}.js")), "x").unwrap();
    }
    let st = wait_for(LONG, "the changes seen, waiting for the roll-out", || {
        let st = h.status()?;
        (st["watch"]["pending"] == true).then_some(st)
    });
    assert_eq!(st["watch"]["reloads"], 0, "a reload started during the roll-out: {st}");
    std::fs::write(dir.path("gate0"), "").unwrap();
    let st = wait_settled(&h, 3);
    assert_eq!(st["watch"]["reloads"], 1, "{st}");
    assert_eq!(st["watch"]["trigger"], dir.path("src/during0.js").display().to_string(), "{st}");
    assert_eq!(st["last_reload"]["result"], "ok", "{st}");
}

#[test]
fn a_watch_path_that_does_not_exist_is_one_line_and_exit_78() {
    let dir = TempDir::new("watch-missing");
    let missing = dir.path("nope");
    let out = Command::new(BIN)
        .args(["run", "--listen", "127.0.0.1:0", "--watch"])
        .arg(&missing)
        .args(["--", "python3", &worker_py()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains(&format!("--watch: {} does not exist", missing.display())), "{stderr}");
    let config = dir.path("app.toml");
    std::fs::write(&config, format!("command = [\"true\"]\nwatch = [{:?}]\n", missing.display().to_string()))
        .unwrap();
    let out = Command::new(BIN).arg("check-config").arg(&config).output().unwrap();
    assert_eq!(out.status.code(), Some(78), "{out:?}");
}
