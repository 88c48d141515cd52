//! Roll-out safety, end to end: a reload aborts on any failure of a worker it started (before
//! or after that worker was ready), holds new workers for `--min-ready`, pins every generation
//! to the release it resolved, and rolls moved slots back. Real supervisor, real Python
//! workers in a release layout (`current` → `releases/X`), state read from `status --json`.
//! Every step waits on state with a deadline; nothing here depends on how fast the machine is.

// Test helpers fail the test by panicking, on purpose.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use support::*;

const LONG: Duration = Duration::from_secs(60);

fn cli(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

/// `status --json`, or None while the supervisor is not answering yet.
fn try_status(sock: &str) -> Option<Value> {
    let out = cli(&["status", sock, "--json"]);
    out.status.success().then(|| serde_json::from_slice(&out.stdout).unwrap())
}

/// A release layout: `releases/NAME` directories and a `current` link the test switches.
struct Releases {
    root: PathBuf,
}

impl Releases {
    fn new(dir: &TempDir) -> Self {
        let root = dir.path("app");
        std::fs::create_dir_all(root.join("releases")).unwrap();
        Releases { root }
    }

    /// Creates `releases/NAME` with a VERSION file and the given (empty) marker files.
    fn release(&self, name: &str, files: &[&str]) -> PathBuf {
        let dir = self.root.join("releases").join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("VERSION"), name).unwrap();
        for f in files {
            std::fs::write(dir.join(f), "").unwrap();
        }
        dir
    }

    fn current(&self) -> PathBuf {
        self.root.join("current")
    }

    /// Points `current` at `releases/NAME` atomically, as deploy tools do.
    fn switch(&self, name: &str) {
        let tmp = self.root.join("current.tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(Path::new("releases").join(name), &tmp).unwrap();
        std::fs::rename(&tmp, self.current()).unwrap();
    }
}

/// `herdsman run` with notify readiness, workers in `current`, and the test worker's release
/// knobs: a worker becomes ready once `gate-ID` exists in its release, crashes once `crash-ID`
/// appears there, and crashes 300 ms after READY=1 in a release that has `LATE_CRASH`.
fn release_run(dir: &TempDir, rel: &Releases, workers: usize) -> Run {
    Run::new(dir, workers)
        .arg("--ready")
        .arg("notify")
        .arg("--cwd")
        .arg(rel.current().to_str().unwrap())
        .worker_env("TW_NOTIFY", "1")
        .worker_env("TW_VERSION_FILE", "VERSION")
        .worker_env("TW_READY_GATE", "gate-")
        .worker_env("TW_CRASH_FILE", "crash-")
        .worker_env("TW_LATE_CRASH_FILE", "LATE_CRASH")
        .worker_env("TW_BREAK_FILE", "BROKEN")
        .worker_env("TW_LATE_HANG_FILE", "LATE_HANG")
}

/// The live (not stopping) workers in `status --json`, by slot.
fn live(v: &Value) -> BTreeMap<i64, Vec<Value>> {
    let mut out: BTreeMap<i64, Vec<Value>> = BTreeMap::new();
    for w in v["workers"].as_array().unwrap() {
        if w["pid"].is_i64() && w["state"] != "stopping" {
            out.entry(w["id"].as_i64().unwrap()).or_default().push(w.clone());
        }
    }
    out
}

/// Waits until every one of `n` slots has exactly one live worker, ready, of `generation`, in
/// `cwd`, and nothing else runs; returns the pids by slot.
fn settled(sock: &str, n: usize, generation: u64, cwd: &Path) -> BTreeMap<i64, i64> {
    let cwd = std::fs::canonicalize(cwd).unwrap().display().to_string();
    wait_for(LONG, &format!("{n} ready workers of generation {generation} in {cwd}"), || {
        let v = try_status(sock)?;
        let all = v["workers"].as_array().unwrap();
        let ok = all.len() == n
            && all.iter().all(|w| w["state"] == "ready" && w["generation"] == generation && w["cwd"] == cwd);
        ok.then(|| all.iter().map(|w| (w["id"].as_i64().unwrap(), w["pid"].as_i64().unwrap())).collect())
    })
}

/// Runs `herdsman reload SOCK` in a thread (it returns when the roll-out is over).
fn reload_in_background(sock: &str) -> std::thread::JoinHandle<Output> {
    let sock = sock.to_string();
    std::thread::spawn(move || cli(&["reload", &sock]))
}

#[test]
fn a_new_worker_that_crashes_after_ready_aborts_the_reload_and_untouched_slots_keep_their_workers() {
    let dir = TempDir::new("late-crash");
    let sock = dir.path("control.sock").display().to_string();
    let rel = Releases::new(&dir);
    let a = rel.release("a", &["gate-0", "gate-1", "gate-2"]);
    // Release b: slot 0 becomes ready and crashes 300 ms later; slot 1 would wait forever.
    rel.release("b", &["gate-0", "LATE_CRASH"]);
    rel.switch("a");
    let h = release_run(&dir, &rel, 3).arg("--min-ready").arg("0s").start();
    let before = settled(&sock, 3, 1, &a);
    let load = Load::start(&h.addr, 2, false);

    rel.switch("b");
    let out = cli(&["reload", &sock]);
    assert_ne!(out.status.code(), Some(0), "the reload must fail: {}", String::from_utf8_lossy(&out.stdout));

    // Slot 0 comes back from release a; slots 1 and 2 never lost their worker.
    let after = settled(&sock, 3, 1, &a);
    let report = load.finish();
    assert_eq!((after[&1], after[&2]), (before[&1], before[&2]), "untouched slots keep their workers");
    assert_ne!(after[&0], before[&0], "slot 0 was replaced, then restarted");
    let v = status_json(&sock);
    assert_eq!(v["last_reload"]["result"], "failed", "{v}");
    let error = v["last_reload"]["error"].as_str().unwrap();
    assert!(
        error.contains("worker 0") && error.contains("crashing after ready"),
        "slot and last output: {error}"
    );
    assert!(
        report.failed.is_empty(),
        "{} failed requests: {:?}",
        report.failed.len(),
        &report.failed[..3.min(report.failed.len())]
    );
    assert!(report.ok > 0);
    report.guarantee(
        "new worker crashes 0.3 s after READY=1 (min_ready 0)",
        "reload of 3 workers",
        "reload fails; slots 1-2 keep their pids; slot 0 restarts from its own release",
    );
}

#[test]
fn a_crash_within_min_ready_fails_the_reload_with_every_old_worker_still_serving() {
    let dir = TempDir::new("min-ready");
    let sock = dir.path("control.sock").display().to_string();
    let rel = Releases::new(&dir);
    let a = rel.release("a", &["gate-0", "gate-1"]);
    let b = rel.release("b", &["gate-0", "gate-1"]);
    rel.switch("a");
    // No load here: a worker that dies mid-request loses what it had accepted, whatever the
    // supervisor does; this test is about which workers are left.
    let _h = release_run(&dir, &rel, 2).arg("--min-ready").arg("1h").start();
    let before = settled(&sock, 2, 1, &a);

    rel.switch("b");
    let reload = reload_in_background(&sock);
    // The new worker of slot 0 is ready and held: shown as "holding", its old worker untouched.
    wait_for(LONG, "slot 0's new worker holding", || {
        let v = status_json(&sock);
        let slot0 = live(&v).remove(&0).unwrap_or_default();
        let holding = slot0.iter().any(|w| w["generation"] == 2 && w["state"] == "holding");
        let old = slot0.iter().any(|w| w["pid"] == before[&0] && w["state"] == "ready");
        (holding && old).then_some(())
    });
    std::fs::write(b.join("crash-0"), "").unwrap();
    let out = reload.join().unwrap();
    assert_ne!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(settled(&sock, 2, 1, &a), before, "every old worker still serves, same pids");
    assert_eq!(status_json(&sock)["last_reload"]["result"], "failed");
}

#[test]
fn a_new_worker_that_misses_its_watchdog_aborts_the_reload() {
    let dir = TempDir::new("rollout-watchdog");
    let sock = dir.path("control.sock").display().to_string();
    let rel = Releases::new(&dir);
    let a = rel.release("a", &["gate-0", "gate-1"]);
    rel.release("b", &["gate-0", "gate-1", "LATE_HANG"]);
    rel.switch("a");
    // Slot 0's new worker is the canary: it hangs while it holds, alone. The watchdog is 6 s
    // (pings every 3 s) so the old workers never miss theirs on a loaded machine.
    let _h = release_run(&dir, &rel, 2)
        .arg("--watchdog")
        .arg("6s")
        .arg("--stop-timeout")
        .arg("5s")
        .arg("--min-ready")
        .arg("1h")
        .worker_env("TW_WATCHDOG", "1")
        .start();
    let before = settled(&sock, 2, 1, &a);
    rel.switch("b");
    let out = cli(&["reload", &sock]);
    assert_ne!(out.status.code(), Some(0));
    assert_eq!(settled(&sock, 2, 1, &a), before, "every old worker still serves");
    let v = status_json(&sock);
    assert!(v["last_reload"]["error"].as_str().unwrap().contains("watchdog"), "{v}");
}

#[test]
fn a_broken_release_fails_the_reload_and_old_workers_restart_from_their_own_release() {
    let dir = TempDir::new("pinned");
    let sock = dir.path("control.sock").display().to_string();
    let rel = Releases::new(&dir);
    let a = rel.release("a", &["gate-0", "gate-1"]);
    rel.release("b", &["gate-0", "gate-1", "BROKEN"]);
    let c = rel.release("c", &["gate-0", "gate-1"]);
    rel.switch("a");
    let h = release_run(&dir, &rel, 2).start();
    let before = settled(&sock, 2, 1, &a);

    rel.switch("b");
    let out = cli(&["reload", &sock]);
    assert_ne!(out.status.code(), Some(0));
    assert_eq!(settled(&sock, 2, 1, &a), before);

    // An old worker that dies after the failed deploy comes back from release a, not b.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(before[&0] as i32), nix::sys::signal::Signal::SIGKILL)
        .unwrap();
    let after = wait_for(LONG, "slot 0 restarted", || {
        let p = settled(&sock, 2, 1, &a);
        (p[&0] != before[&0]).then_some(p)
    });
    assert_eq!(after[&1], before[&1]);
    let versions: Vec<Value> = h.distinct_workers(2).iter().map(|v| v["version"].clone()).collect();
    assert_eq!(versions, vec![Value::from("a"), Value::from("a")]);

    // A later deploy of a good release works.
    rel.switch("c");
    let out = cli(&["reload", &sock]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    settled(&sock, 2, 3, &c);
    let versions: Vec<Value> = h.distinct_workers(2).iter().map(|v| v["version"].clone()).collect();
    assert_eq!(versions, vec![Value::from("c"), Value::from("c")]);
}

/// Release b passes readiness everywhere; once slots 0 and 1 were replaced (slot 2 still
/// starting), slot 1's new worker crashes. Returns the supervisor and the reload's output.
fn fail_after_two_slots_moved(
    dir: &TempDir,
    rel: &Releases,
    on_failure: &str,
) -> (Herdsman, Output, PathBuf) {
    fail_after_two_slots_moved_with(dir, rel, on_failure, &[], |_| {})
}

/// [`fail_after_two_slots_moved`] with extra `herdsman run` arguments and a step `before_crash`
/// (given release a's directory) right before slot 1's new worker is made to crash.
fn fail_after_two_slots_moved_with(
    dir: &TempDir,
    rel: &Releases,
    on_failure: &str,
    extra: &[&str],
    before_crash: impl FnOnce(&Path),
) -> (Herdsman, Output, PathBuf) {
    let sock = dir.path("control.sock").display().to_string();
    let a = rel.release("a", &["gate-0", "gate-1", "gate-2"]);
    let b = rel.release("b", &["gate-0", "gate-1"]);
    rel.switch("a");
    let mut run = release_run(dir, rel, 3).arg("--min-ready").arg("0s").arg("--on-failure").arg(on_failure);
    for a in extra {
        run = run.arg(a);
    }
    let h = run.start();
    settled(&sock, 3, 1, &a);
    rel.switch("b");
    let reload = reload_in_background(&sock);
    wait_for(LONG, "slots 0 and 1 on generation 2, slot 2 starting", || {
        let v = status_json(&sock);
        let l = live(&v);
        let on2 = |id: i64| {
            l.get(&id)
                .is_some_and(|ws| ws.len() == 1 && ws[0]["generation"] == 2 && ws[0]["state"] == "ready")
        };
        let starting = l.get(&2).is_some_and(|ws| ws.iter().any(|w| w["state"] == "starting (new)"));
        (on2(0) && on2(1) && starting).then_some(())
    });
    before_crash(&a);
    std::fs::write(b.join("crash-1"), "").unwrap();
    let out = reload.join().unwrap();
    (h, out, b)
}

#[test]
fn an_aborted_reload_rolls_the_moved_slots_back_to_the_previous_generation() {
    let dir = TempDir::new("rollback");
    let sock = dir.path("control.sock").display().to_string();
    let rel = Releases::new(&dir);
    let (h, out, _) = fail_after_two_slots_moved(&dir, &rel, "rollback");
    assert_ne!(out.status.code(), Some(0), "a rolled-back reload still fails");
    let load = Load::start(&h.addr, 2, false);
    settled(&sock, 3, 1, &rel.root.join("releases/a"));
    let v = status_json(&sock);
    assert_eq!(v["generation"], 1, "{v}");
    assert_eq!(v["last_reload"]["result"], "failed");
    assert_eq!(v["last_reload"]["rollback"], "ok");
    let report = load.finish();
    assert!(report.failed.is_empty(), "{:?}", &report.failed[..3.min(report.failed.len())]);
}

#[test]
fn a_rollback_that_fails_itself_is_reported_and_stops_there() {
    let dir = TempDir::new("rollback-fails");
    let sock = dir.path("control.sock").display().to_string();
    let rel = Releases::new(&dir);
    // Release a can no longer start slot 0 (its gate is gone): the rollback's new worker for
    // slot 0 misses its ready timeout.
    let (_h, out, b) =
        fail_after_two_slots_moved_with(&dir, &rel, "rollback", &["--ready-timeout", "5s"], |a| {
            std::fs::remove_file(a.join("gate-0")).unwrap();
        });
    assert_ne!(out.status.code(), Some(0));
    let v = status_json(&sock);
    assert_eq!(v["last_reload"]["result"], "failed", "{v}");
    assert_eq!(v["last_reload"]["rollback"], "failed", "{v}");
    // It stops there: slot 0 keeps its generation-2 worker, no new roll-out starts.
    let b = std::fs::canonicalize(b).unwrap().display().to_string();
    let l = live(&v);
    assert!(l[&0].iter().any(|w| w["generation"] == 2 && w["state"] == "ready" && w["cwd"] == b), "{v}");
    assert!(!v["status"].as_str().unwrap().contains("rolling"), "{v}");
}

#[test]
fn on_failure_keep_leaves_the_moved_slots_on_the_new_generation() {
    let dir = TempDir::new("keep");
    let sock = dir.path("control.sock").display().to_string();
    let rel = Releases::new(&dir);
    let (_h, out, b) = fail_after_two_slots_moved(&dir, &rel, "keep");
    assert_ne!(out.status.code(), Some(0));
    // Slot 1 restarts on generation 2 as usual (once its crash trigger is gone).
    std::fs::remove_file(b.join("crash-1")).unwrap();
    let b = std::fs::canonicalize(b).unwrap().display().to_string();
    wait_for(LONG, "slots 0-1 on generation 2, slot 2 on generation 1", || {
        let v = status_json(&sock);
        let gens: Vec<(i64, String, Value)> = v["workers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|w| w["state"] == "ready")
            .map(|w| {
                (w["generation"].as_i64().unwrap(), w["cwd"].as_str().unwrap().to_string(), w["id"].clone())
            })
            .collect();
        let want_b = gens.iter().filter(|(g, cwd, _)| *g == 2 && *cwd == b).count() == 2;
        let want_a = gens.iter().any(|(g, _, id)| *g == 1 && *id == 2);
        (gens.len() == 3 && want_b && want_a && v["last_reload"]["rollback"].is_null()).then_some(())
    });
}

#[test]
fn a_reloads_first_new_worker_is_a_canary_that_holds_alone_and_its_crash_leaves_every_old_worker_serving() {
    let dir = TempDir::new("canary");
    let sock = dir.path("control.sock").display().to_string();
    let rel = Releases::new(&dir);
    let a = rel.release("a", &["gate-0", "gate-1", "gate-2"]);
    let b = rel.release("b", &["gate-0", "gate-1", "gate-2"]);
    rel.switch("a");
    // No load here: the worker made to crash loses what it had accepted, whatever the
    // supervisor does; this test is about which workers run when.
    let _h = release_run(&dir, &rel, 3).arg("--min-ready").arg("1h").start();
    let before = settled(&sock, 3, 1, &a);

    rel.switch("b");
    let reload = reload_in_background(&sock);
    // The canary (slot 0's new worker) is ready and holds: nothing else has started. (The loop
    // starts the next slot's new worker in the same turn as the readiness it follows, so one
    // snapshot that shows the canary holding shows whether another started.)
    let l = wait_for(LONG, "the canary holding beside slot 0's old worker", || {
        let l = live(&status_json(&sock));
        l.get(&0)
            .is_some_and(|ws| {
                ws.len() == 2 && ws.iter().any(|w| w["generation"] == 2 && w["state"] == "holding")
            })
            .then_some(l)
    });
    for id in [1, 2] {
        assert_eq!(l[&id].len(), 1, "slot {id}'s new worker started while the canary holds: {:?}", l[&id]);
        assert_eq!(l[&id][0]["pid"], before[&id]);
    }
    // The canary dies while it holds: the reload fails with every old worker untouched.
    std::fs::write(b.join("crash-0"), "").unwrap();
    let out = reload.join().unwrap();
    assert_ne!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(settled(&sock, 3, 1, &a), before, "every old worker still serves, same pids");
    let v = status_json(&sock);
    assert_eq!(v["last_reload"]["result"], "failed", "{v}");
    assert!(v["last_reload"]["error"].as_str().unwrap().contains("worker 0"), "{v}");
}
