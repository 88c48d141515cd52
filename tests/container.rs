//! herdsman as a container's entrypoint (issue 25): PID 1 of a PID namespace (or a subreaper
//! when it is not) reaps the orphans workers leave behind without taking a worker's exit
//! status, and the metrics address answers an orchestrator's `GET /ready` and `GET /live`.

// Test helpers fail the test by panicking, on purpose.
#![allow(clippy::unwrap_used)]

mod support;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::*;

/// `(pid, state, ppid)` of every process whose parent is `parent`.
fn children_of(parent: i32) -> Vec<(i32, char, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else { continue };
        let Some(close) = stat.rfind(')') else { continue };
        let comm = stat[stat.find('(').unwrap() + 1..close].to_string();
        let mut rest = stat[close + 1..].split_ascii_whitespace();
        let state = rest.next().and_then(|s| s.chars().next()).unwrap_or('?');
        if rest.next().and_then(|p| p.parse::<i32>().ok()) == Some(parent) {
            out.push((pid, state, comm));
        }
    }
    out
}

fn zombies_of(parent: i32) -> Vec<(i32, char, String)> {
    children_of(parent).into_iter().filter(|c| c.1 == 'Z').collect()
}

fn reload(control: &Path) {
    let out = Command::new(BIN).arg("reload").arg(control).output().unwrap();
    assert!(out.status.success(), "reload: {}", String::from_utf8_lossy(&out.stderr));
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// `sh -c 'sleep 1000 & exec python3 worker.py'`: every worker leaves an orphan when it ends
/// (herdsman kills the worker's process group, so the orphan dies too: a zombie for its
/// reaper).
fn orphaning_worker() -> Vec<String> {
    let script = format!("sleep 1000 & exec python3 {}", worker_py());
    vec!["--".into(), "sh".into(), "-c".into(), script]
}

/// Issue 25: as PID 1 of a PID namespace, herdsman left three `<defunct>` processes per reload
/// of a worker that leaves a background process. Now: no zombie after 20 reloads, and a
/// worker's own exit status still reaches `status --json`.
#[test]
fn as_pid_1_no_zombie_is_left_after_20_reloads_and_worker_exit_statuses_stay_right() {
    // Root, and a kernel/sandbox that lets us make a PID namespace (not fakeroot, not a
    // container without CAP_SYS_ADMIN).
    let can_unshare = is_root()
        && have("unshare")
        && Command::new("unshare")
            .args(["--pid", "--fork", "--mount-proc", "true"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    if !can_unshare {
        return skip(
            "as_pid_1",
            "needs root and `unshare --pid --fork --mount-proc` (util-linux) to work here",
        );
    }
    let dir = TempDir::new("pid1");
    let crash = dir.path("crash-");
    let run = Run::new(&dir, 2)
        .arg("--ready")
        .arg("notify")
        .worker_env("TW_NOTIFY", "1")
        .worker_env("TW_CRASH_FILE", crash.to_str().unwrap());
    let mut args: Vec<String> =
        // No `--` before BIN: the test support finds `--control` in argv before the first `--`.
        ["--pid", "--fork", "--mount-proc", "--kill-child", BIN].iter().map(|s| s.to_string()).collect();
    args.extend(run.args);
    args.extend(orphaning_worker());
    let mut child = Command::new("unshare")
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env_remove("NOTIFY_SOCKET")
        .env_remove("INVOCATION_ID")
        .spawn()
        .unwrap();
    let stderr = capture(child.stderr.take().unwrap(), true);
    let stdout = capture(child.stdout.take().unwrap(), false);
    let h = Herdsman { child: Some(child), stderr, stdout, addr: run.addr };
    let control = dir.path("control.sock");
    let unshare = h.pid();
    // herdsman: unshare's only child, PID 1 inside.
    let pid1 = wait_for(Duration::from_secs(30), "herdsman under unshare", || {
        children_of(unshare).first().map(|c| c.0)
    });
    h.wait_started();
    let st = h.status().unwrap();
    assert_eq!(st["pid"], 1, "herdsman is PID 1 in its namespace: {st}");
    for generation in 2..=21 {
        reload(&control);
        h.wait_generation(generation);
    }
    // Every orphan died with its worker's group and was reaped: none is left a zombie.
    wait_for(Duration::from_secs(30), "no zombie child of herdsman", || {
        zombies_of(pid1).is_empty().then_some(())
    });
    // A worker's own exit status still reaches the loop (never reaped by the sweep).
    std::fs::write(dir.path("crash-0"), "").unwrap();
    let st = wait_for(Duration::from_secs(60), "worker 0's exit status in status --json", || {
        let st = h.status()?;
        let e = in_slot(&st, 0)?["last_error"].as_str()?.to_string();
        e.contains("exited with status 4").then_some(st)
    });
    let _ = std::fs::remove_file(dir.path("crash-0"));
    assert!(in_slot(&st, 1).unwrap()["last_error"].is_null(), "{st}");
    wait_for(Duration::from_secs(30), "no zombie after the crash", || {
        zombies_of(pid1).is_empty().then_some(())
    });
}

/// Not PID 1 (a standalone run, not under systemd): herdsman makes itself a child subreaper,
/// so a worker's double-forked background process is re-parented to herdsman, not to the
/// system's init, and reaped when it ends.
#[test]
fn standalone_herdsman_is_a_subreaper_and_reaps_what_workers_orphan() {
    let dir = TempDir::new("subreaper");
    // `(sleep 1000 &)`: orphaned at once (its subshell exits), in the worker's group.
    let script = format!("(sleep 1000 &); exec python3 {}", worker_py());
    let mut run = Run::new(&dir, 2).arg("--ready").arg("notify").worker_env("TW_NOTIFY", "1");
    run.args.extend(["--".into(), "sh".into(), "-c".into(), script]);
    let h = run.start_without_invocation_id();
    h.wait_started();
    let me = h.pid();
    // The orphaned sleeps came to herdsman.
    wait_for(Duration::from_secs(30), "the workers' orphaned sleeps re-parented to herdsman", || {
        (children_of(me).iter().filter(|c| c.2 == "sleep").count() == 2).then_some(())
    });
    let control = dir.path("control.sock");
    for generation in 2..=4 {
        reload(&control);
        h.wait_generation(generation);
    }
    wait_for(Duration::from_secs(30), "no zombie child of herdsman", || {
        zombies_of(me).is_empty().then_some(())
    });
    // The new workers' sleeps only: the old ones died with their workers and were reaped.
    wait_for(Duration::from_secs(30), "two sleeps left", || {
        (children_of(me).iter().filter(|c| c.2 == "sleep").count() == 2).then_some(())
    });
}

trait StartClean {
    fn start_without_invocation_id(self) -> Herdsman;
}

impl StartClean for Run {
    /// Starts herdsman without `INVOCATION_ID` (the test may itself run under systemd, where
    /// herdsman rightly does not become a subreaper).
    fn start_without_invocation_id(self) -> Herdsman {
        let mut cmd = Command::new(BIN);
        cmd.args(&self.args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        cmd.env_remove("NOTIFY_SOCKET").env_remove("LISTEN_FDS").env_remove("LISTEN_PID");
        cmd.env_remove("INVOCATION_ID");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let stderr = capture(child.stderr.take().unwrap(), true);
        let stdout = capture(child.stdout.take().unwrap(), false);
        Herdsman { child: Some(child), stderr, stdout, addr: self.addr }
    }
}

/// `GET path` on the metrics unix socket: the status code and body.
fn probe(sock: &Path, path: &str) -> Option<(u16, String)> {
    let mut s = UnixStream::connect(sock).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).ok()?;
    let mut all = String::new();
    s.read_to_string(&mut all).ok()?;
    let code = all.split(' ').nth(1)?.parse().ok()?;
    let body = all.split_once("\r\n\r\n")?.1.to_string();
    Some((code, body))
}

/// `/ready` is 503 while a worker is not ready yet and 200 once every slot has a ready worker;
/// during a stop (a worker that takes its time to drain) it is 503 again while `/live` stays
/// 200; herdsman then exits 0.
#[test]
fn ready_turns_200_during_start_and_503_during_a_stop_while_live_stays_200() {
    let dir = TempDir::new("probes");
    let metrics = dir.path("metrics.sock");
    let gate = dir.path("gate-");
    let mut h = Run::new(&dir, 2)
        .arg("--ready")
        .arg("notify")
        .arg("--metrics")
        .arg(&format!("unix:{}", metrics.display()))
        .arg("--stop-timeout")
        .arg("10m")
        .worker_env("TW_NOTIFY", "1")
        .worker_env("TW_READY_GATE", gate.to_str().unwrap())
        .worker_env("TW_IGNORE_TERM", "1")
        .start();
    // Start: the gates are closed, no worker is ready.
    let (code, body) = wait_for(Duration::from_secs(60), "a /ready answer", || probe(&metrics, "/ready"));
    assert_eq!((code, body.as_str()), (503, "not ready\n"));
    assert_eq!(probe(&metrics, "/live").unwrap(), (200, "live\n".to_string()));
    std::fs::write(dir.path("gate-0"), "").unwrap();
    wait_for(Duration::from_secs(60), "worker 0 ready", || {
        (in_slot(&h.status()?, 0)?["state"] == "ready").then_some(())
    });
    assert_eq!(probe(&metrics, "/ready").unwrap().0, 503, "one slot of two is not ready");
    std::fs::write(dir.path("gate-1"), "").unwrap();
    wait_for(Duration::from_secs(60), "/ready 200", || (probe(&metrics, "/ready")?.0 == 200).then_some(()));
    // Stop: the workers ignore SIGTERM (a slow drain); herdsman waits for them.
    h.signal(libc::SIGTERM);
    wait_for(Duration::from_secs(60), "/ready 503 during the stop", || {
        (probe(&metrics, "/ready")?.0 == 503).then_some(())
    });
    assert_eq!(probe(&metrics, "/live").unwrap().0, 200, "the loop still answers during the stop");
    assert!(h.child.as_mut().unwrap().try_wait().unwrap().is_none(), "still draining");
    // A second stop request kills what is left at once: a clean stop all the same, exit 0.
    h.signal(libc::SIGTERM);
    let status = h.wait_exit(Duration::from_secs(60));
    assert_eq!(status.code(), Some(0), "{}", h.stderr());
}

/// examples/container: the Deployment parses, probes `/ready` and `/live` on the port the
/// image's ENTRYPOINT serves `--metrics` on, and gives the pod at least the preStop pause plus
/// herdsman's `--stop-timeout` to stop (no container engine runs here: this is the check).
#[test]
fn the_container_example_agrees_with_itself() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/container");
    let has_yaml =
        Command::new(SYSTEM_PYTHON).args(["-c", "import yaml"]).status().is_ok_and(|s| s.success());
    if !has_yaml {
        return skip(
            "the_container_example_agrees_with_itself",
            "needs python3-yaml (apt-get install python3-yaml)",
        );
    }
    let script = r#"
import json, sys, yaml
d = yaml.safe_load(open(sys.argv[1]))
pod = d["spec"]["template"]["spec"]
c = pod["containers"][0]
ports = {p["name"]: p["containerPort"] for p in c["ports"]}
print(json.dumps({
    "kind": d["kind"],
    "grace": pod["terminationGracePeriodSeconds"],
    "pre_stop": c["lifecycle"]["preStop"]["exec"]["command"],
    "ready": [c["readinessProbe"]["httpGet"]["path"], ports[c["readinessProbe"]["httpGet"]["port"]]],
    "live": [c["livenessProbe"]["httpGet"]["path"], ports[c["livenessProbe"]["httpGet"]["port"]]],
}))
"#;
    let out =
        Command::new(SYSTEM_PYTHON).args(["-c", script]).arg(dir.join("deployment.yaml")).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let d: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(d["kind"], "Deployment");
    let containerfile = std::fs::read_to_string(dir.join("Containerfile")).unwrap();
    let entry = containerfile.lines().find(|l| l.starts_with("ENTRYPOINT")).expect("an ENTRYPOINT");
    let entry: Vec<String> = serde_json::from_str(entry.trim_start_matches("ENTRYPOINT").trim()).unwrap();
    let after = |flag: &str| entry.iter().position(|a| a == flag).map(|i| entry[i + 1].clone()).unwrap();
    assert_eq!(entry[..2], ["herdsman", "run"]);
    let metrics_port: u64 = after("--metrics").rsplit(':').next().unwrap().parse().unwrap();
    assert_eq!(d["ready"], serde_json::json!(["/ready", metrics_port]));
    assert_eq!(d["live"], serde_json::json!(["/live", metrics_port]));
    let stop = after("--stop-timeout");
    let stop_s: u64 = stop.trim_end_matches('s').parse().unwrap();
    let pause: u64 = d["pre_stop"][1].as_str().unwrap().parse().unwrap();
    assert_eq!(d["pre_stop"][0], "sleep");
    assert!(
        d["grace"].as_u64().unwrap() > pause + stop_s,
        "grace period {} <= preStop {pause} + stop {stop}",
        d["grace"]
    );
}
