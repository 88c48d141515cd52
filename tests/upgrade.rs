//! In-place upgrade (`herdsman upgrade`, `SIGUSR2`): the supervisor re-executes itself under
//! the same pid and the new image takes over every worker, socket and record. Real
//! supervisor, real Python workers, real load; state read from `status --json`,
//! `/proc/PID/exe` and the metrics page. Every wait has a deadline; no fixed sleeps.

// Test helpers fail the test by panicking, on purpose.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use support::*;

const LONG: Duration = Duration::from_secs(60);

fn cli(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn status(control: &Path) -> Value {
    status_json(control)
}

/// (slot, pid, generation, restarts) of every worker.
fn workers(st: &Value) -> Vec<(u64, i64, u64, u64)> {
    st["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            (
                w["id"].as_u64().unwrap(),
                w["pid"].as_i64().unwrap_or(-1),
                w["generation"].as_u64().unwrap(),
                w["restarts"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn exe(pid: i32) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/exe")).unwrap()
}

/// A scratch directory only root can write (whatever the umask): an upgrade accepts only
/// binaries nobody else could have written.
fn root_dir(tag: &str) -> TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new(tag);
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

fn chmod(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A copy of the herdsman binary (the "new version" an upgrade installs).
fn copy_of_herdsman(dir: &TempDir, name: &str) -> PathBuf {
    let p = dir.path(name);
    std::fs::copy(BIN, &p).unwrap();
    chmod(&p, 0o755);
    p
}

/// A candidate binary whose behaviour a test writes: a copy of the system shell (an ELF file
/// owned by root), so `CANDIDATE upgrade-check` runs the script `upgrade-check` and the exec
/// `CANDIDATE run ...` the script `run`, both in herdsman's working directory (the test's
/// directory: start herdsman with `.cwd(&dir.0)`). A script itself is refused as a candidate
/// (its interpreter would run unchecked).
fn shell_candidate(dir: &TempDir, name: &str) -> PathBuf {
    let p = dir.path(name);
    std::fs::copy(std::fs::canonicalize("/bin/sh").unwrap(), &p).unwrap();
    chmod(&p, 0o755);
    p
}

/// What a [`shell_candidate`] does when run as `CANDIDATE what` (`upgrade-check` or `run`).
fn behave(dir: &TempDir, what: &str, body: &str) {
    std::fs::write(dir.path(what), format!("{body}\n")).unwrap();
}

fn script(dir: &TempDir, name: &str, body: &str) -> PathBuf {
    let p = dir.path(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    chmod(&p, 0o755);
    p
}

/// Waits until exactly `n` workers run and all are ready (nothing starting or stopping).
fn ready(control: &Path, n: u64) -> Value {
    wait_for(LONG, &format!("{n} ready workers"), || {
        let out = cli(&["status", control.to_str().unwrap(), "--json"]);
        let st: Value = serde_json::from_slice(&out.stdout).ok()?;
        let ws = st["workers"].as_array()?;
        let settled = ws.len() as u64 == n && ws.iter().all(|w| w["state"] == "ready");
        (st["ready"] == n && st["desired"] == n && settled).then_some(st)
    })
}

fn upgrade(control: &Path, binary: &Path) -> Output {
    cli(&["upgrade", control.to_str().unwrap(), "--binary", binary.to_str().unwrap()])
}

#[test]
fn an_upgrade_under_load_keeps_the_pid_every_worker_and_every_request_and_the_new_image_supervises() {
    let dir = root_dir("upgrade-load");
    let control = dir.path("control.sock");
    let h = Run::new(&dir, 3).worker_env("TW_NOTIFY", "1").arg("--ready").arg("notify").start();
    ready(&control, 3);
    // A crash before the upgrade: its restart count and metrics must carry over.
    let first = status(&control);
    let before = crash_slot_0(&control, &first);
    let copy = copy_of_herdsman(&dir, "herdsman-new");
    let fresh = Load::start(&h.addr, 2, false);
    let keep = Load::start(&h.addr, 2, true);
    // Some traffic before and after.
    wait_for(LONG, "requests flowing", || (h.get()["pid"].as_i64().is_some()).then_some(()));
    let out = upgrade(&control, &copy);
    assert!(out.status.success(), "upgrade failed: {}\n{}", String::from_utf8_lossy(&out.stderr), h.stderr());
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains(env!("CARGO_PKG_VERSION")), "no version in {said:?}");
    for _ in 0..50 {
        h.get();
    }
    let (fresh, keep) = (fresh.finish(), keep.finish());
    assert!(
        fresh.failed.is_empty(),
        "new-connection load failed: {:?}",
        &fresh.failed[..fresh.failed.len().min(5)]
    );
    assert!(keep.failed.is_empty(), "keep-alive load failed: {:?}", &keep.failed[..keep.failed.len().min(5)]);
    assert!(fresh.ok > 0 && keep.ok > 0);

    let after = status(&control);
    assert_eq!(after["pid"], before["pid"]);
    assert_eq!(after["pid"].as_i64().unwrap(), h.pid() as i64);
    assert_eq!(workers(&after), workers(&before), "workers changed");
    assert_eq!(after["upgrades"], 1);
    assert_eq!(after["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(after["generation"], before["generation"]);
    assert_eq!(exe(h.pid()), copy);
    let table = String::from_utf8_lossy(&cli(&["status", control.to_str().unwrap()]).stdout).into_owned();
    let head = table.lines().next().unwrap_or_default();
    assert!(
        head.contains(&format!("herdsman {}", env!("CARGO_PKG_VERSION"))) && head.ends_with("upgrades 1"),
        "{table}"
    );
    let page = cli(&["metrics", control.to_str().unwrap()]);
    let page = String::from_utf8_lossy(&page.stdout);
    assert!(page.contains("herdsman_worker_restarts_total{worker=\"0\"} 1"), "restart counter lost:\n{page}");

    // The new image supervises: reload, crash recovery, scale, stop.
    let r = cli(&["reload", control.to_str().unwrap()]);
    assert!(r.status.success(), "reload after upgrade: {}", String::from_utf8_lossy(&r.stderr));
    let st = ready(&control, 3);
    assert_eq!(st["generation"], 2);
    let victim = workers(&st)[1].1;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim as i32), nix::sys::signal::Signal::SIGKILL)
        .unwrap();
    wait_for(LONG, "slot 1 restarted by the new image", || {
        let w = workers(&status(&control));
        (w.len() == 3 && w[1].1 != victim && w[1].1 > 0 && w[1].3 == 1).then_some(())
    });
    let s = cli(&["scale", control.to_str().unwrap(), "4"]);
    assert!(s.status.success(), "scale after upgrade: {}", String::from_utf8_lossy(&s.stderr));
    ready(&control, 4);
    let mut h = h;
    h.signal(libc::SIGTERM);
    assert!(h.wait_exit(LONG).success(), "stop after upgrade: {}", h.stderr());
    assert!(!control.exists(), "control socket left behind");
}

#[test]
fn refused_binaries_change_nothing_missing_not_executable_failing_or_hanging() {
    let dir = root_dir("upgrade-refuse");
    let control = dir.path("control.sock");
    let h = Run::new(&dir, 2).env("HERDSMAN_UPGRADE_CHECK_TIMEOUT", "1s").cwd(&dir.0).start();
    let before = ready(&control, 2);
    let plain = dir.path("plain");
    std::fs::write(&plain, "not a program").unwrap();
    let candidate = shell_candidate(&dir, "candidate");
    for (bin, check, why) in [
        (dir.path("missing"), "", "does not exist"),
        (plain, "", "not an executable"),
        (candidate.clone(), "echo 'broken build' >&2; exit 1", "(exit status 1): broken build"),
        (candidate.clone(), "exec sleep 600", "did not answer"),
        (candidate.clone(), "exit 0", "no state-format report"),
    ] {
        behave(&dir, "upgrade-check", check);
        let out = upgrade(&control, &bin);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{}: {err}", bin.display());
        assert!(err.contains(why), "{}: expected {why:?} in {err:?}", bin.display());
        assert_eq!(err.trim().lines().count(), 1, "not one line: {err:?}");
        let st = status(&control);
        assert_eq!(workers(&st), workers(&before));
        assert_eq!(st["upgrades"], 0);
        assert_eq!(st["upgrading"], false);
        assert_eq!(exe(h.pid()), PathBuf::from(BIN).canonicalize().unwrap());
    }
    // The supervisor still works: a reload goes through.
    let r = cli(&["reload", control.to_str().unwrap()]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
}

#[test]
fn an_upgrade_during_a_roll_out_waits_for_it_and_a_reload_during_an_upgrade_waits_for_the_upgrade() {
    let dir = root_dir("upgrade-order");
    let control = dir.path("control.sock");
    let gate = dir.path("gate-");
    let open = |id: usize| std::fs::write(format!("{}{id}", gate.display()), "").unwrap();
    let close = |id: usize| {
        let _ = std::fs::remove_file(format!("{}{id}", gate.display()));
    };
    open(0);
    open(1);
    let _h = Run::new(&dir, 2)
        .env("HERDSMAN_UPGRADE_CHECK_TIMEOUT", "5m")
        .worker_env("TW_READY_GATE", gate.to_str().unwrap())
        .cwd(&dir.0)
        .start();
    ready(&control, 2);
    close(0);
    close(1);
    // A roll-out whose new workers wait at the gate.
    let reload =
        Command::new(BIN).args(["reload", control.to_str().unwrap()]).stdout(Stdio::piped()).spawn().unwrap();
    wait_for(LONG, "the roll-out to start", || {
        status(&control)["workers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["state"] == "starting (new)")
            .then_some(())
    });
    let copy = copy_of_herdsman(&dir, "herdsman-new");
    let up = Command::new(BIN)
        .args(["upgrade", control.to_str().unwrap(), "--binary", copy.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(LONG, "the upgrade to be pending", || (status(&control)["upgrading"] == true).then_some(()));
    assert_eq!(status(&control)["upgrades"], 0, "upgraded during a roll-out");
    open(0);
    open(1);
    let r = reload.wait_with_output().unwrap();
    assert!(r.status.success(), "reload: {}", String::from_utf8_lossy(&r.stdout));
    let u = up.wait_with_output().unwrap();
    assert!(u.status.success(), "upgrade: {}", String::from_utf8_lossy(&u.stderr));
    let st = ready(&control, 2);
    assert_eq!((st["generation"].as_u64(), st["upgrades"].as_u64()), (Some(2), Some(1)));

    // Now the other way round: the check of this upgrade waits at a gate, a reload comes in.
    let check_gate = dir.path("check-gate");
    let slow = shell_candidate(&dir, "herdsman-slow-check");
    behave(
        &dir,
        "upgrade-check",
        &format!(
            "while [ ! -e {g} ]; do sleep 0.02; done\nexec {bin} upgrade-check",
            g = check_gate.display(),
            bin = copy.display()
        ),
    );
    behave(&dir, "run", &format!("exec {} run \"$@\"", copy.display()));
    let up = Command::new(BIN)
        .args(["upgrade", control.to_str().unwrap(), "--binary", slow.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(LONG, "the second upgrade to be pending", || {
        (status(&control)["upgrading"] == true).then_some(())
    });
    let mut reload =
        Command::new(BIN).args(["reload", control.to_str().unwrap()]).stdout(Stdio::piped()).spawn().unwrap();
    let lines = capture(reload.stdout.take().unwrap(), false);
    wait_for(LONG, "the reload to wait for the upgrade", || {
        lines.lock().unwrap().contains("in-place upgrade is in progress").then_some(())
    });
    assert_eq!(status(&control)["generation"], 2, "the reload did not wait");
    std::fs::write(&check_gate, "").unwrap();
    let u = up.wait_with_output().unwrap();
    assert!(u.status.success(), "upgrade: {}", String::from_utf8_lossy(&u.stderr));
    let r = wait_for(LONG, "the reload to finish", || reload.try_wait().unwrap());
    assert!(r.success(), "reload after the upgrade: {}", lines.lock().unwrap());
    let st = ready(&control, 2);
    assert_eq!((st["generation"].as_u64(), st["upgrades"].as_u64()), (Some(3), Some(2)));
}

#[test]
fn two_upgrades_in_a_row_the_second_by_sigusr2_from_the_path_herdsman_was_started_from() {
    // SIGUSR2 re-executes the path herdsman was started from: the build directory, which root
    // trusts only when nobody else could have written it (see `upgrade::Candidate`).
    if let Some(why) = untrusted(Path::new(BIN)) {
        skip(
            "two_upgrades_in_a_row_the_second_by_sigusr2_from_the_path_herdsman_was_started_from",
            &format!(
                "the build's herdsman is not a binary root may upgrade to ({why}); build in a root-owned checkout"
            ),
        );
        return;
    }
    let dir = root_dir("upgrade-twice");
    let control = dir.path("control.sock");
    let h = Run::new(&dir, 2).start();
    let before = ready(&control, 2);
    let copy = copy_of_herdsman(&dir, "herdsman-new");
    let out = upgrade(&control, &copy);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(exe(h.pid()), copy);
    h.signal(libc::SIGUSR2);
    let st = wait_for(LONG, "the second upgrade", || {
        let out = cli(&["status", control.to_str().unwrap(), "--json"]);
        let st: Value = serde_json::from_slice(&out.stdout).ok()?;
        (st["upgrades"] == 2).then_some(st)
    });
    assert_eq!(workers(&st), workers(&before));
    assert_eq!(st["pid"], before["pid"]);
    assert_eq!(exe(h.pid()), PathBuf::from(BIN).canonicalize().unwrap());
}

#[test]
fn a_steered_app_keeps_its_routing_across_an_upgrade() {
    let dir = root_dir("upgrade-steer");
    let control = dir.path("control.sock");
    let mut run = Run::new(&dir, 3).arg("--balance").arg("steer");
    // Steering needs TCP: port 0, the real port read back from status.
    let i = run.args.iter().position(|a| a == "--listen").unwrap();
    run.args[i + 1] = "127.0.0.1:0".into();
    let mut h = run.start();
    let before = ready(&control, 3);
    h.addr = Addr::Tcp(before["sockets"][0].as_str().unwrap().to_string());
    assert!(before["workers"].as_array().unwrap().iter().all(|w| w["receiving"] == true));
    let load = Load::start(&h.addr, 3, false);
    wait_for(LONG, "requests flowing", || h.get()["pid"].as_i64().map(|_| ()));
    let pid = before["pid"].as_i64().unwrap() as i32;
    let programs = bpf_program_ids(pid);
    let copy = copy_of_herdsman(&dir, "herdsman-new");
    let out = upgrade(&control, &copy);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for _ in 0..50 {
        h.get();
    }
    let r = cli(&["reload", control.to_str().unwrap()]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let rep = load.finish();
    assert!(rep.failed.is_empty(), "{:?}", &rep.failed[..rep.failed.len().min(5)]);
    let st = ready(&control, 3);
    assert_eq!(st["generation"], 2);
    assert!(st["workers"].as_array().unwrap().iter().all(|w| w["receiving"] == true));
    assert_eq!(st["balance"], "steer");
    assert_eq!(before["routing"], expected_steer_routing());
    assert_eq!(st["routing"], before["routing"], "the new image keeps the same router");
    // The router (program and maps) is handed over, not loaded again: the supervisor gave up
    // CAP_BPF once it was attached, so the new image could not load one.
    if before["routing"] == "round-robin" {
        assert_eq!(programs.len(), 1, "{programs:?}");
        assert_eq!(bpf_program_ids(pid), programs, "the same eBPF program after the upgrade");
    }
}

/// The ids of the eBPF programs process `pid` holds a descriptor of (from fdinfo).
fn bpf_program_ids(pid: i32) -> Vec<String> {
    let mut ids: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy() == "anon_inode:bpf-prog"))
        .filter_map(|e| {
            let info =
                std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", e.file_name().to_string_lossy()));
            info.ok()?.lines().find_map(|l| l.strip_prefix("prog_id:").map(|v| v.trim().to_string()))
        })
        .collect();
    ids.sort();
    ids
}

fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
}

/// Where each of the process's descriptors points (`socket:[…]`, `/memfd:NAME (deleted)`, …).
fn fd_targets(pid: i32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|p| p.to_string_lossy().into_owned())
        .collect()
}

fn http_metrics(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(LONG)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut page = String::new();
    s.read_to_string(&mut page).unwrap();
    page
}

#[test]
fn a_failed_execve_leaves_the_old_image_serving_with_nothing_leaked_and_the_metrics_endpoint_survives_an_upgrade()
 {
    let dir = root_dir("upgrade-execfail");
    let control = dir.path("control.sock");
    let h = Run::new(&dir, 2).arg("--metrics").arg("127.0.0.1:0").cwd(&dir.0).start();
    let before = ready(&control, 2);
    let metrics = before["metrics"].as_str().unwrap().to_string();
    let fds = open_fds(h.pid());
    assert!(http_metrics(&metrics).contains("herdsman_workers"));
    // Passes its check, then makes itself unexecutable: the execve that follows fails.
    let vanishing = shell_candidate(&dir, "vanishing");
    behave(
        &dir,
        "upgrade-check",
        &format!(
            "cat >/dev/null; chmod -x {}; echo '{{\"version\":\"9.9.9\",\"state_format\":{}}}'; exit 0",
            vanishing.display(),
            herdsman::testing::STATE_FORMAT
        ),
    );
    let out = upgrade(&control, &vanishing);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("execve"), "{err}");
    let st = status(&control);
    assert_eq!(workers(&st), workers(&before));
    assert_eq!(st["upgrades"], 0);
    assert_eq!(exe(h.pid()), PathBuf::from(BIN).canonicalize().unwrap());
    // A connection just served (a scrape, a status) may still be closing, at the baseline
    // too: poll (bounded) until no more are open than then. A failed hand-over that leaked
    // would leave its memfd and a duplicate of every exported descriptor (listeners,
    // pidfds, pipes, notify, control, metrics: more than one).
    let settled = |want: usize| {
        let end = std::time::Instant::now() + LONG;
        loop {
            let now = open_fds(h.pid());
            if now <= want || std::time::Instant::now() > end {
                return now;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    assert!(settled(fds) <= fds, "descriptors leaked by the failed hand-over");
    assert!(!fd_targets(h.pid()).iter().any(|t| t.starts_with("/memfd:")), "state memfd leaked");
    // The same supervisor upgrades fine afterwards, endpoint and all.
    let copy = copy_of_herdsman(&dir, "herdsman-new");
    let out = upgrade(&control, &copy);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let st = status(&control);
    assert_eq!(st["metrics"].as_str(), Some(metrics.as_str()));
    assert!(http_metrics(&metrics).contains("herdsman_workers"), "metrics endpoint lost");
    assert!(settled(fds) <= fds, "descriptors leaked by the hand-over");
    assert!(!fd_targets(h.pid()).iter().any(|t| t.starts_with("/memfd:")), "state memfd leaked");
}

fn needs_root(test: &str) -> bool {
    let root = nix::unistd::geteuid().is_root();
    if !root {
        needs(test, "needs root (to own files as another user and to become nobody)");
    }
    root
}

fn nobody() -> (u32, u32) {
    let u = nix::unistd::User::from_name("nobody").unwrap().expect("user nobody");
    (u.uid.as_raw(), u.gid.as_raw())
}

fn chown(p: &Path, uid: u32) {
    nix::unistd::chown(p, Some(nix::unistd::Uid::from_raw(uid)), None).unwrap();
}

/// issue 22 §1: an upgrade ran any binary a caller named, as root. Now a binary anyone but
/// root could have written (owned by another user, writable by others, under a directory
/// another user owns or can write, reached through a symlink or `..`) or a script is
/// refused (kind `untrusted`, exit 77) and never runs; the same shell, trusted, does run.
#[test]
fn a_binary_someone_other_than_root_could_have_written_is_refused_and_never_runs() {
    if !needs_root("a_binary_someone_other_than_root_could_have_written_is_refused_and_never_runs") {
        return;
    }
    let (nobody, _) = nobody();
    let dir = root_dir("upgrade-untrusted");
    let control = dir.path("control.sock");
    let ran = dir.path("ran");
    let h = Run::new(&dir, 1).cwd(&dir.0).start();
    let before = ready(&control, 1);
    behave(&dir, "upgrade-check", &format!("touch {}; exit 1", ran.display()));
    let theirs = shell_candidate(&dir, "theirs");
    chown(&theirs, nobody);
    let group_writable = shell_candidate(&dir, "group-writable");
    chmod(&group_writable, 0o775);
    let world_writable = shell_candidate(&dir, "world-writable");
    chmod(&world_writable, 0o757);
    let their_dir = dir.path("their-dir");
    std::fs::create_dir(&their_dir).unwrap();
    chown(&their_dir, nobody);
    chmod(&their_dir, 0o755);
    let in_their_dir = their_dir.join("herdsman");
    std::fs::copy(dir.path("theirs"), &in_their_dir).unwrap();
    chown(&in_their_dir, 0);
    chmod(&in_their_dir, 0o755);
    let open_dir = dir.path("open-dir");
    std::fs::create_dir(&open_dir).unwrap();
    chmod(&open_dir, 0o777);
    let in_open_dir = open_dir.join("herdsman");
    std::fs::copy(dir.path("theirs"), &in_open_dir).unwrap();
    chown(&in_open_dir, 0);
    chmod(&in_open_dir, 0o755);
    let trusted = shell_candidate(&dir, "trusted");
    let link = dir.path("link");
    std::os::unix::fs::symlink(&trusted, &link).unwrap();
    let link_dir = dir.path("link-dir");
    std::os::unix::fs::symlink(&dir.0, &link_dir).unwrap();
    let sh_script = script(&dir, "script", &format!("touch {}; exit 1", ran.display()));
    for (bin, why) in [
        (theirs, format!("is owned by uid {nobody}, not root")),
        (group_writable, "writable by its group".to_string()),
        (world_writable, "writable by everyone".to_string()),
        (in_their_dir, format!("directory {} is owned by uid {nobody}", their_dir.display())),
        (in_open_dir, format!("directory {} is writable by everyone", open_dir.display())),
        (link, "symbolic link".to_string()),
        (link_dir.join("trusted"), format!("{} is a symbolic link", link_dir.display())),
        (dir.path("their-dir/../trusted"), "`..`".to_string()),
        (sh_script, "not an ELF executable".to_string()),
    ] {
        let out = upgrade(&control, &bin);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(77), "{}: {err}", bin.display());
        assert!(err.contains(&why), "{}: expected {why:?} in {err:?}", bin.display());
        assert_eq!(err.trim().lines().count(), 1, "not one line: {err:?}");
        assert!(!ran.exists(), "{} ran", bin.display());
        let st = status(&control);
        assert_eq!((st["upgrades"].as_u64(), st["pid"].as_i64()), (Some(0), before["pid"].as_i64()));
        assert_eq!(exe(h.pid()), PathBuf::from(BIN).canonicalize().unwrap());
    }
    // The same shell, owned by root in a directory only root writes, is run (its check fails).
    let out = upgrade(&control, &trusted);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(ran.exists(), "the trusted candidate's check did not run: the refusals above prove nothing");
}

/// issue 22 §1: the take-over check got the state with the workers' environment (the config's
/// `env` secrets) and herdsman's own environment. Now it gets neither.
#[test]
fn the_take_over_check_never_sees_the_workers_secrets_or_herdsmans_environment() {
    let dir = root_dir("upgrade-secrets");
    let control = dir.path("control.sock");
    let _h = Run::new(&dir, 1)
        .worker_env("APP_SECRET", "s3cr3t-of-the-app")
        .env("HERDSMAN_TEST_SECRET", "s3cr3t-of-the-service")
        .cwd(&dir.0)
        .start();
    ready(&control, 1);
    let (state, env) = (dir.path("state-seen"), dir.path("env-seen"));
    behave(&dir, "upgrade-check", &format!("cat >{}; env >{}; exit 1", state.display(), env.display()));
    let candidate = shell_candidate(&dir, "candidate");
    let out = upgrade(&control, &candidate);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let state = std::fs::read_to_string(&state).unwrap();
    let env = std::fs::read_to_string(&env).unwrap();
    assert!(state.contains("APP_SECRET"), "the check did not get the state: {state}");
    assert!(!state.contains("s3cr3t-of-the-app"), "the check saw the app's secret: {state}");
    assert!(!env.contains("s3cr3t"), "the check saw herdsman's environment: {env}");
    assert!(!env.contains(herdsman::testing::STATE_VAR), "{env}");
}

/// issue 22 §1: a `control_group` member ran `herdsman upgrade --binary ./evil.sh` and got a
/// root shell. Now only root may upgrade: the member is refused (exit 77), whatever the
/// binary, and its binary never runs; root's upgrade goes through.
#[test]
fn a_control_group_member_cannot_upgrade_and_its_binary_never_runs() {
    if !needs_root("a_control_group_member_cannot_upgrade_and_its_binary_never_runs") {
        return;
    }
    let (uid, gid) = nobody();
    let group = nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid)).unwrap().unwrap().name;
    let dir = root_dir("upgrade-member");
    let control = dir.path("control.sock");
    let config = dir.path("app.toml");
    std::fs::write(&config, format!("control_group = \"{group}\"\n")).unwrap();
    let h = Run::new(&dir, 1).arg("-c").arg(config.to_str().unwrap()).start();
    let before = ready(&control, 1);
    // What the member runs, where it can reach it (the checkout may be in a 0700 directory).
    let client = copy_of_herdsman(&dir, "herdsman-client");
    let mine = dir.path("mine");
    std::fs::create_dir(&mine).unwrap();
    chown(&mine, uid);
    let ran = dir.path("ran");
    let evil = mine.join("evil.sh");
    std::fs::write(&evil, format!("#!/bin/sh\ntouch {}\nexit 1\n", ran.display())).unwrap();
    chmod(&evil, 0o755);
    chown(&evil, uid);
    let copy = copy_of_herdsman(&dir, "herdsman-new");
    let as_member = |args: &[&str]| {
        Command::new("setpriv")
            .args(["--reuid", &uid.to_string(), "--regid", &gid.to_string(), "--clear-groups"])
            .arg(&client)
            .args(args)
            .output()
            .unwrap()
    };
    let out = as_member(&["status", control.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "the member may not even ask for status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for bin in [&evil, &copy] {
        let out = as_member(&["upgrade", control.to_str().unwrap(), "--binary", bin.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(77), "{}: {err}", bin.display());
        assert!(err.contains("only root may upgrade"), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "not one line: {err:?}");
        assert!(!ran.exists(), "the member's binary ran");
        let st = status(&control);
        assert_eq!(st["upgrades"], 0);
        assert_eq!(workers(&st), workers(&before));
    }
    let out = upgrade(&control, &copy);
    assert!(out.status.success(), "root's upgrade: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(exe(h.pid()), copy);
    assert_eq!(status(&control)["upgrades"], 1);
}

/// Why root would refuse to re-execute `path` in place (a link, or a part someone other than
/// root could write), as `herdsman upgrade` checks it; `None` when it would run it.
fn untrusted(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    for part in path.ancestors() {
        let Ok(m) = std::fs::symlink_metadata(part) else {
            return Some(format!("{} cannot be read", part.display()));
        };
        if m.file_type().is_symlink() {
            return Some(format!("{} is a symbolic link", part.display()));
        }
        let sticky_dir = m.is_dir() && m.mode() & 0o1000 != 0;
        if m.uid() != 0 || (m.mode() & 0o022 != 0 && !sticky_dir) {
            return Some(format!(
                "{} is owned by uid {} with mode {:o}",
                part.display(),
                m.uid(),
                m.mode() & 0o7777
            ));
        }
    }
    None
}

/// The previous release's binary (built from b6cbf91, state format 2), from
/// `HERDSMAN_PREVIOUS_BIN`. Without it the test is skipped with a note, except in CI (`CI`
/// set), where it must run.
fn previous_release(test: &str) -> Option<PathBuf> {
    match std::env::var_os("HERDSMAN_PREVIOUS_BIN") {
        Some(p) => Some(PathBuf::from(p)),
        None if std::env::var_os("CI").is_some() => {
            panic!(
                "{test}: set HERDSMAN_PREVIOUS_BIN to a herdsman built from the previous release (see .ci/run)"
            )
        }
        None => {
            skip(
                test,
                "HERDSMAN_PREVIOUS_BIN is not set (a herdsman built from the previous release, b6cbf91)",
            );
            None
        }
    }
}

/// issue 24: the state format changed (3: the core serialized as it is, descriptors by name);
/// an upgrade from the previous release, which writes format 2, must keep every worker.
#[test]
fn an_upgrade_from_the_previous_release_keeps_every_worker_and_the_new_image_supervises() {
    upgrade_from_previous_release(
        "an_upgrade_from_the_previous_release_keeps_every_worker_and_the_new_image_supervises",
        false,
    );
}

/// The same with steered sockets: the previous release's steering state (its sockets and
/// routing program, by number in format 2) is taken over too.
#[test]
fn an_upgrade_from_the_previous_release_keeps_a_steered_apps_workers_and_routing() {
    upgrade_from_previous_release(
        "an_upgrade_from_the_previous_release_keeps_a_steered_apps_workers_and_routing",
        true,
    );
}

fn upgrade_from_previous_release(test: &str, steered: bool) {
    let Some(previous) = previous_release(test) else { return };
    let dir = root_dir("upgrade-previous");
    let control = dir.path("control.sock");
    // Run in place (a fresh copy could meet ETXTBSY: another test thread forking while it is
    // open for writing).
    let old = previous.canonicalize().unwrap();
    let mut run = Run::new(&dir, 3).worker_env("TW_NOTIFY", "1").arg("--ready").arg("notify");
    if steered {
        run = run.arg("--balance").arg("steer");
        // Steering needs TCP: port 0, the real port read back from status.
        let i = run.args.iter().position(|a| a == "--listen").unwrap();
        run.args[i + 1] = "127.0.0.1:0".into();
    }
    let mut args = run.args;
    args.extend(["--".to_string(), "python3".to_string(), worker_py()]);
    let mut cmd = Command::new(&old);
    cmd.args(&args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.env_remove("NOTIFY_SOCKET").env_remove("LISTEN_FDS").env_remove("LISTEN_PID");
    let mut child = cmd.spawn().expect("spawn the previous herdsman");
    let stderr = capture(child.stderr.take().unwrap(), true);
    let stdout = capture(child.stdout.take().unwrap(), false);
    let mut h = Herdsman { child: Some(child), stderr, stdout, addr: run.addr };
    let first = ready(&control, 3);
    if steered {
        h.addr = Addr::Tcp(first["sockets"][0].as_str().unwrap().to_string());
    }
    // A restart before the upgrade: its count must carry over too.
    let before = crash_slot_0(&control, &first);
    assert_eq!(exe(h.pid()), old);
    let copy = copy_of_herdsman(&dir, "herdsman-new");
    let out = upgrade(&control, &copy);
    assert!(out.status.success(), "upgrade failed: {}\n{}", String::from_utf8_lossy(&out.stderr), h.stderr());
    let after = status(&control);
    assert_eq!(exe(h.pid()), copy);
    assert_eq!(after["pid"], before["pid"]);
    assert_eq!(workers(&after), workers(&before), "workers changed: {}", h.stderr());
    assert_eq!(after["upgrades"], 1);
    assert_eq!(after["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(after["generation"], before["generation"]);
    assert_eq!(after["routing"], before["routing"]);
    for _ in 0..20 {
        assert!(h.get()["pid"].as_i64().is_some());
    }
    // The new image supervises the workers it took over: a crash, a reload, a stop.
    let victim = workers(&after)[1].1;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim as i32), nix::sys::signal::Signal::SIGKILL)
        .unwrap();
    wait_for(LONG, "slot 1 restarted by the new image", || {
        let w = workers(&status(&control));
        (w.len() == 3 && w[1].1 != victim && w[1].1 > 0 && w[1].3 == 1).then_some(())
    });
    let r = cli(&["reload", control.to_str().unwrap()]);
    assert!(r.status.success(), "reload after upgrade: {}", String::from_utf8_lossy(&r.stderr));
    let st = ready(&control, 3);
    assert_eq!(st["generation"], 2);
    if steered {
        assert!(st["workers"].as_array().unwrap().iter().all(|w| w["receiving"] == true), "{st}");
    }
    h.signal(libc::SIGTERM);
    assert!(h.wait_exit(LONG).success(), "stop after upgrade: {}", h.stderr());
    assert!(!control.exists(), "control socket left behind");
}

/// SIGKILLs slot 0's worker (of 3) and waits until it restarted and all 3 are ready again; returns
/// that status.
fn crash_slot_0(control: &Path, first: &Value) -> Value {
    let victim = workers(first)[0].1;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim as i32), nix::sys::signal::Signal::SIGKILL)
        .unwrap();
    wait_for(LONG, "slot 0 restarted", || {
        let st = status(control);
        let w = workers(&st);
        (w.len() == 3 && w[0].3 == 1 && w[0].1 != victim && st["ready"] == 3).then_some(st)
    })
}
