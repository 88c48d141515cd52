//! The control plane against a running supervisor: `status`, `list`, `reload`, `scale`, and
//! the socket's defences (permissions, garbage, huge and slow requests).

// Test helpers fail the test by panicking, on purpose.
#![allow(clippy::unwrap_used)]

mod support;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use support::*;

fn cli(args: &[&str]) -> Output {
    Command::new(BIN).args(args).stdin(Stdio::null()).output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn notify_run(dir: &TempDir, workers: usize) -> Run {
    Run::new(dir, workers).arg("--ready").arg("notify").worker_env("TW_NOTIFY", "1")
}

#[test]
fn status_shows_a_table_and_a_stable_json_schema() {
    let dir = TempDir::new("status");
    let sock = dir.path("control.sock").display().to_string();
    let h = notify_run(&dir, 2).start();
    h.wait_started();
    // Status measurements reuse a /proc scan for 200 ms (procstat::SCAN_REUSE): a worker that
    // became ready within that window may still show its size from before its exec (128 KiB,
    // seen when start, table and JSON took under 200 ms inside dpkg-buildpackage; the table
    // too: 573 kB and 0 kB). Wait until every worker's memory was measured after its exec,
    // then read the table and the JSON.
    let v = wait_for(STARTUP, "every worker's memory measured after its exec", || {
        let v = status_json(&sock);
        v["workers"].as_array()?.iter().all(|w| w["rss_bytes"].as_u64().unwrap_or(0) > 1_000_000).then_some(v)
    });
    let out = cli(&["status", &sock]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    assert!(table.starts_with("t · pid "), "{table}");
    assert!(table.contains("2/2 ready · generation 1"), "{table}");
    assert!(table.contains("last reload: never"), "{table}");
    let header = table.lines().nth(2).unwrap();
    for col in ["ID", "PID", "GEN", "STATE", "RESTARTS", "UPTIME", "CPU", "MEM"] {
        assert!(header.contains(col), "{header}");
    }
    let rows: Vec<&str> = table.lines().skip(3).collect();
    assert_eq!(rows.len(), 2, "{table}");
    assert!(rows.iter().all(|r| r.split_whitespace().nth(3) == Some("ready")), "{table}");
    assert!(table.contains(" MB"), "memory in human units: {table}");

    assert_eq!(v["name"], "t");
    assert_eq!((v["generation"].as_u64(), v["desired"].as_u64()), (Some(1), Some(2)));
    assert!(v["last_reload"].is_null());
    for w in v["workers"].as_array().unwrap() {
        for key in ["id", "pid", "generation", "state", "restarts", "uptime_s", "cpu_percent", "rss_bytes"] {
            assert!(w.get(key).is_some(), "missing {key} in {w}");
        }
        assert_eq!(w["state"], "ready");
        assert!(w["rss_bytes"].as_u64().unwrap() > 1_000_000, "{w}");
    }
    let out = cli(&["reload", &sock]);
    assert!(out.status.success());
    let v = status_json(&sock);
    assert_eq!(v["last_reload"]["result"], "ok");
    assert!(v["last_reload"]["at"].as_u64().unwrap() > 1_700_000_000);
}

#[test]
fn reload_waits_for_the_roll_out_prints_progress_and_exits_zero() {
    let dir = TempDir::new("reload-ok");
    let sock = dir.path("control.sock").display().to_string();
    let h = notify_run(&dir, 2).worker_env("TW_READY_DELAY_MS", "300").start();
    h.wait_started();
    let out = cli(&["reload", &sock]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains("worker 1/2 ready (pid"), "{stdout}");
    assert!(stdout.contains("worker 2/2 ready (pid"), "{stdout}");
    assert!(stdout.contains("reload complete: 2 worker(s) on generation 2"), "{stdout}");
    // It returned only when the roll-out was over: every live worker is new and ready.
    let v = status_json(&sock);
    let active: Vec<&Value> =
        v["workers"].as_array().unwrap().iter().filter(|w| w["state"] != "stopping").collect();
    assert_eq!(active.len(), 2, "{v}");
    assert!(active.iter().all(|w| w["generation"] == 2 && w["state"] == "ready"), "{v}");
}

#[test]
fn reload_of_a_broken_version_fails_with_the_reason_and_old_workers_serve_on() {
    let dir = TempDir::new("reload-broken");
    let sock = dir.path("control.sock").display().to_string();
    let broken = dir.path("broken");
    let h = notify_run(&dir, 2).worker_env("TW_BREAK_FILE", broken.to_str().unwrap()).start();
    h.wait_started();
    std::fs::write(&broken, "").unwrap();
    let out = cli(&["reload", &sock]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("reload to generation 2 failed"), "{err}");
    assert!(err.contains("exited with status 3 before it was ready"), "{err}");
    assert!(err.contains("broken build"), "last output lines are shown: {err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert_eq!(h.get()["generation"], 1);
    let v = status_json(&sock);
    assert_eq!(v["last_reload"]["result"], "failed");
    assert!(v["last_reload"]["error"].as_str().unwrap().contains("exited with status 3"));
}

#[test]
fn two_concurrent_reload_clients_both_get_the_truth() {
    let dir = TempDir::new("reload-two");
    let sock = dir.path("control.sock").display().to_string();
    let h = notify_run(&dir, 2).worker_env("TW_READY_DELAY_MS", "300").start();
    h.wait_started();
    let spawn = || {
        Command::new(BIN)
            .args(["reload", &sock])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    for o in [&a, &b] {
        assert_eq!(o.status.code(), Some(0), "{}{}", text(&o.stdout), text(&o.stderr));
        assert!(text(&o.stdout).contains("reload complete"), "{}", text(&o.stdout));
    }
    // Whichever came second waited for a roll-out that started after its request.
    let gens: Vec<u64> = v_gens(&status_json(&sock));
    assert!(gens.iter().all(|g| *g == gens[0]) && gens[0] >= 2, "{gens:?}");
}

fn v_gens(v: &Value) -> Vec<u64> {
    v["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["state"] != "stopping")
        .map(|w| w["generation"].as_u64().unwrap())
        .collect()
}

#[test]
fn scale_up_down_and_absolute_wait_until_done() {
    let dir = TempDir::new("scale-cli");
    let sock = dir.path("control.sock").display().to_string();
    let h = notify_run(&dir, 1).start();
    h.wait_started();
    let ready = |v: &Value| v["workers"].as_array().unwrap().iter().filter(|w| w["state"] == "ready").count();
    for (arg, want) in [("+2", 3usize), ("-1", 2), ("4", 4), ("1", 1)] {
        let out = cli(&["scale", &sock, arg]);
        assert!(out.status.success(), "scale {arg}: {}", text(&out.stderr));
        let v = status_json(&sock);
        assert_eq!(v["desired"].as_u64(), Some(want as u64));
        assert_eq!(ready(&v), want, "scale {arg} returned before it was done: {v}");
        assert_eq!(v["workers"].as_array().unwrap().len(), want, "removed workers are gone: {v}");
        let ids: Vec<u64> =
            v["workers"].as_array().unwrap().iter().map(|w| w["id"].as_u64().unwrap()).collect();
        assert_eq!(ids, (0..want as u64).collect::<Vec<_>>(), "removed slots are the highest ids");
    }
    let out = cli(&["scale", &sock, "0"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("cannot scale to 0"));
    let out = cli(&["scale", &sock, "lots"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn garbage_huge_and_slow_requests_get_errors_and_change_nothing() {
    let dir = TempDir::new("garbage");
    let path = dir.path("control.sock");
    let h = notify_run(&dir, 1).start();
    h.wait_started();
    let ask = |payload: &[u8]| {
        let mut s = UnixStream::connect(&path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = s.write_all(payload);
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    };
    assert!(ask(b"garbage\n").contains("malformed request"));
    assert!(ask(b"{\"v\":2,\"op\":\"status\"}\n").contains("unsupported protocol version 2"));
    assert!(ask(b"{\"v\":1,\"op\":\"scale\",\"workers\":\"x\"}\n").contains("invalid worker count"));
    assert!(ask(&vec![b'x'; 200_000]).contains("request too large"));
    let slow = std::thread::spawn({
        let path = path.clone();
        move || {
            let mut s = UnixStream::connect(&path).unwrap();
            let _ = s.write_all(b"{\"v\":1,");
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            out
        }
    });
    // A slow client does not hold up others.
    let v = status_json(path.to_str().unwrap());
    assert_eq!(v["desired"], 1);
    assert!(slow.join().unwrap().contains("request timed out"));
    assert_eq!(h.get()["generation"], 1);
}

#[test]
fn list_shows_every_running_app() {
    let dir = TempDir::new("list");
    let uniq = std::process::id();
    let (a, b) = (format!("list-a-{uniq}"), format!("list-b-{uniq}"));
    let xdg = dir.0.display().to_string();
    let start = |name: &str, sock: &str| {
        let addr = Addr::Unix(dir.path(sock));
        let args: Vec<String> =
            ["run", "-n", name, "-w", "1", "--listen", &addr.listen_arg(), "--", "python3", &worker_py()]
                .iter()
                .map(|s| s.to_string())
                .collect();
        Herdsman::spawn(&args, &[("XDG_RUNTIME_DIR".into(), xdg.clone())], addr)
    };
    let ha = start(&a, "a.sock");
    let hb = start(&b, "b.sock");
    ha.wait_started();
    hb.wait_started();
    let out = Command::new(BIN).arg("list").env("XDG_RUNTIME_DIR", &xdg).output().unwrap();
    let listing = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(listing.starts_with("NAME"), "{listing}");
    for name in [&a, &b] {
        let line = listing
            .lines()
            .find(|l| l.starts_with(name.as_str()))
            .unwrap_or_else(|| panic!("{name} in {listing}"));
        assert!(line.contains("1/1"), "{line}");
    }
    // With two apps running, a command without TARGET asks which one.
    let out = Command::new(BIN)
        .args(["status"])
        .env("XDG_RUNTIME_DIR", &xdg)
        .env("RUNTIME_DIRECTORY", "")
        .output()
        .unwrap();
    // (Other live apps on the machine would only make the list longer.)
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{err}");
    assert!(err.contains("apps are running") && err.contains(&a) && err.contains(&b), "{err}");
    let out = Command::new(BIN).args(["status", &a]).env("XDG_RUNTIME_DIR", &xdg).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    drop((ha, hb));
}

#[test]
fn an_unprivileged_user_is_refused() {
    if !nix::unistd::geteuid().is_root() {
        return needs("an_unprivileged_user_is_refused", "needs root to create a test user");
    }
    let user = "herdsman-test";
    let _ = Command::new("useradd")
        .args(["--system", "--no-create-home", "--shell", "/usr/sbin/nologin", user])
        .output();
    let uid = nix::unistd::User::from_name(user).unwrap().expect("test user").uid;
    let dir = TempDir::new("perm");
    std::fs::set_permissions(&dir.0, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let path = dir.path("control.sock");
    let h = notify_run(&dir, 1).start();
    h.wait_started();
    let as_user = |args: &[&str]| {
        Command::new("setpriv")
            .args(["--reuid", &uid.to_string(), "--regid", "65534", "--clear-groups", BIN])
            .args(args)
            .output()
            .unwrap()
    };
    // Layer 1: the socket file is 0600.
    let out = as_user(&["status", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(77), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("permission denied"), "{}", text(&out.stderr));
    // Layer 2: even with the file opened up, SO_PEERCRED refuses the stranger.
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
    let out = as_user(&["reload", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(77), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains(&format!("uid {uid} may not control this app")),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(h.get()["generation"], 1, "nothing happened");
}

#[test]
fn control_path_that_is_not_a_socket_is_never_deleted() {
    let dir = TempDir::new("notasock");
    let file = dir.path("precious.txt");
    std::fs::write(&file, "precious").unwrap();
    let link = dir.path("link.sock");
    std::os::unix::fs::symlink(&file, &link).unwrap();
    for path in [&file, &link] {
        let out = cli(&["run", "--listen", "127.0.0.1:0", "--control", path.to_str().unwrap(), "--", "true"]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("exists and is not a socket"), "{err}");
        assert_eq!(std::fs::read_to_string(path).unwrap(), "precious", "{} was touched", path.display());
    }
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
}

#[test]
fn a_stale_control_socket_is_replaced() {
    let dir = TempDir::new("stalesock");
    let path = dir.path("control.sock");
    support::stale_socket(&path);
    assert!(UnixStream::connect(&path).is_err(), "the socket is stale");
    let h = notify_run(&dir, 1).start();
    h.wait_started();
    assert_eq!(status_json(&path)["workers"].as_array().unwrap().len(), 1);
}
