//! Resource limits and kernel facilities (issue 11 §2 items 4 and 5): a worker that cannot be
//! watched is killed, not left serving; a kernel without pidfds is refused at start; control
//! connections, worker counts and file descriptors are bounded, and running out of
//! descriptors never stops crash recovery.
// Test-only `unsafe`: `pre_exec` installs a seccomp filter in the child (see below).
#![allow(unsafe_code)]
// Test helpers fail the test by panicking, on purpose.
#![allow(clippy::unwrap_used)]

mod support;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::*;

const LONG: Duration = Duration::from_secs(30);

/// `herdsman status --json CONTROL`, or None while it cannot answer.
fn try_status(control: &Path) -> Option<Value> {
    let out = Command::new(BIN).arg("status").arg(control).arg("--json").output().ok()?;
    out.status.success().then(|| serde_json::from_slice(&out.stdout).ok()).flatten()
}

fn spawn_cmd(mut cmd: Command, addr: Addr) -> Herdsman {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.env_remove("NOTIFY_SOCKET").env_remove("LISTEN_FDS").env_remove("LISTEN_PID");
    let mut child = cmd.spawn().expect("spawn herdsman");
    let stderr = capture(child.stderr.take().unwrap(), true);
    let stdout = capture(child.stdout.take().unwrap(), false);
    Herdsman { child: Some(child), stderr, stdout, addr }
}

/// Makes `pidfd_open` fail with `errno` in the process `cmd` starts (and everything it
/// starts), by a seccomp filter installed just before exec. With `allow_self`, a
/// `pidfd_open` of the process's own pid still works (herdsman's start-up check), so only
/// the pidfds of its children fail: exactly "pidfd_open failed after the fork".
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
fn fail_pidfd_open(cmd: &mut Command, errno: i32, allow_self: bool) {
    #[cfg(target_arch = "x86_64")]
    const ARCH: u32 = 0xC000_003E; // AUDIT_ARCH_X86_64
    #[cfg(target_arch = "aarch64")]
    const ARCH: u32 = 0xC000_00B7; // AUDIT_ARCH_AARCH64
    // Classic BPF opcodes (linux/bpf_common.h): BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K,
    // BPF_RET|BPF_K.
    const LD_W_ABS: u16 = 0x20;
    const JEQ_K: u16 = 0x15;
    const RET_K: u16 = 0x06;
    let ins = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    // seccomp_data: nr at 0, arch at 4, args[0] (low half on little-endian) at 16.
    let filter: [libc::sock_filter; 8] = [
        ins(LD_W_ABS, 0, 0, 4),
        ins(JEQ_K, 0, 5, ARCH),
        ins(LD_W_ABS, 0, 0, 0),
        ins(JEQ_K, 0, 3, libc::SYS_pidfd_open as u32),
        ins(LD_W_ABS, 0, 0, 16),
        ins(JEQ_K, 1, 0, 0), // k: our own pid, filled in after fork
        ins(RET_K, 0, 0, libc::SECCOMP_RET_ERRNO | (errno as u32 & 0xffff)),
        ins(RET_K, 0, 0, libc::SECCOMP_RET_ALLOW),
    ];
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe system
    // calls (getpid, prctl) on a stack copy of the filter; nothing is allocated.
    unsafe {
        cmd.pre_exec(move || {
            let mut f = filter;
            f[5].k = if allow_self { libc::getpid() as u32 } else { 0 };
            let prog = libc::sock_fprog { len: f.len() as u16, filter: f.as_mut_ptr() };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &prog as *const _) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Live (not zombie) processes whose environment contains `marker`.
fn processes_with_env(marker: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else { continue };
        if env.split(|b| *b == 0).any(|kv| kv == marker.as_bytes()) {
            out.push(pid);
        }
    }
    out
}

/// Zombie children of `parent`: exited but never reaped.
fn zombie_children(parent: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        let Some((_, rest)) = stat.rsplit_once(')') else { continue };
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.first() == Some(&"Z") && f.get(1).and_then(|p| p.parse::<i32>().ok()) == Some(parent) {
            out.push(pid);
        }
    }
    out
}

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[test]
fn a_worker_whose_pidfd_cannot_be_opened_is_killed_and_reaped_not_left_unsupervised() {
    let dir = TempDir::new("pidfd-fail");
    let marker = format!("LIMITS_TEST_MARK=pidfd-{}-{}", std::process::id(), dir.0.display());
    // `sleep` never writes, so a leaked worker would not die of a closed output pipe either:
    // before the fix, every attempt left one running for good.
    let run = Run::new(&dir, 2).arg("--ready").arg("alive:100ms").arg("-e").arg(&marker);
    let mut cmd = Command::new(BIN);
    cmd.args(&run.args).args(["--", "sleep", "1000"]);
    fail_pidfd_open(&mut cmd, libc::EMFILE, true);
    let h = spawn_cmd(cmd, run.addr.clone());
    let control = dir.path("control.sock");
    let st = wait_for(LONG, "both slots in back-off in status", || {
        try_status(&control).filter(|s| {
            let w = s["workers"].as_array().cloned().unwrap_or_default();
            w.len() == 2 && w.iter().all(|w| w["state"] == "backoff" && w["pid"].is_null())
        })
    });
    assert_eq!(st["ready"], 0, "{st}");
    // It keeps retrying (failures in a row grow) and says why in each slot's `last_error`.
    wait_for(LONG, "three failed starts per slot, each naming EMFILE", || {
        try_status(&control).filter(|s| {
            let w = s["workers"].as_array().cloned().unwrap_or_default();
            w.len() == 2
                && w.iter().all(|w| {
                    w["failures"].as_u64().unwrap_or(0) >= 3
                        && w["last_error"].as_str().unwrap_or("").contains("pidfd_open: Too many open files")
                })
        })
    });
    // No worker lives on unsupervised, and none is left a zombie.
    wait_for(LONG, "no process carrying the test's marker", || {
        processes_with_env(&marker).is_empty().then_some(())
    });
    wait_for(LONG, "no unreaped worker", || zombie_children(h.pid()).is_empty().then_some(()));
    let mut h = h;
    h.signal(libc::SIGTERM);
    assert_eq!(h.wait_exit(LONG).code(), Some(0), "{}", h.stderr());
}

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[test]
fn a_kernel_without_pidfd_open_is_refused_at_start_with_one_line_and_exit_71() {
    let dir = TempDir::new("no-pidfd");
    let run = Run::new(&dir, 1);
    let mut cmd = Command::new(BIN);
    cmd.args(&run.args).args(["--", "sleep", "1000"]);
    cmd.env_remove("NOTIFY_SOCKET").env_remove("LISTEN_FDS").env_remove("LISTEN_PID");
    fail_pidfd_open(&mut cmd, libc::ENOSYS, false);
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(71), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.contains("no pidfd_open") && err.contains("Linux 5.3"), "{err}");
    assert!(!dir.path("control.sock").exists(), "nothing was set up");
    // Blocked by a sandbox rather than missing: said so.
    let mut cmd = Command::new(BIN);
    cmd.args(&run.args).args(["--", "sleep", "1000"]);
    fail_pidfd_open(&mut cmd, libc::EPERM, false);
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(71), "{err}");
    assert!(err.contains("seccomp"), "{err}");
}

/// issue 22 §2: with every control slot held by idle connections a new client got "busy". Now
/// the oldest idle connection is evicted (told "busy", closed) to make room: status answers.
#[test]
fn idle_control_connections_are_evicted_oldest_first_and_status_still_answers() {
    let dir = TempDir::new("busy");
    let h = Run::new(&dir, 1).start();
    h.wait_started();
    let control = dir.path("control.sock");
    let since = std::time::Instant::now();
    // MAX_CLIENTS idle clients (connected, sending nothing) hold every slot...
    let idle: Vec<UnixStream> = (0..herdsman::testing::MAX_CLIENTS)
        .map(|_| UnixStream::connect(&control).expect("connect"))
        .collect();
    // ...and a status still answers.
    let out = Command::new(BIN).arg("status").arg(&control).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The oldest idle connection made room: told "busy" and closed (unless its own request
    // timeout, 5 s, came first on a very slow machine).
    let mut first = idle.into_iter().next().unwrap();
    let mut reply = String::new();
    first.set_read_timeout(Some(LONG)).unwrap();
    first.read_to_string(&mut reply).unwrap();
    if since.elapsed() < Duration::from_secs(4) {
        assert!(reply.contains(r#""kind":"busy""#), "{reply}");
    } else {
        assert!(reply.contains(r#""kind":"busy""#) || reply.contains("request timed out"), "{reply}");
    }
}

/// One worker of an app whose `control_group` is `nobody`'s primary group (so `nobody` is a
/// member), started in a 0755 directory `nobody` can reach: (dir, control socket, herdsman,
/// nobody).
fn member_app(tag: &str) -> (TempDir, std::path::PathBuf, Herdsman, nix::unistd::User) {
    let nobody = nix::unistd::User::from_name("nobody").unwrap().expect("user nobody");
    let group = nix::unistd::Group::from_gid(nobody.gid).unwrap().unwrap().name;
    let dir = TempDir::new(tag);
    std::fs::set_permissions(&dir.0, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let control = dir.path("control.sock");
    let config = dir.path("app.toml");
    std::fs::write(&config, format!("control_group = \"{group}\"\n")).unwrap();
    let h = Run::new(&dir, 1).arg("-c").arg(config.to_str().unwrap()).start();
    h.wait_started();
    (dir, control, h, nobody)
}

/// Holds up to `n` idle connections to `control` as `uid:gid` (a process of its own, which
/// raises its descriptor limit as far as it may): prints how many it opened, then waits for
/// its stdin to close.
fn idle_holder(control: &Path, uid: u32, gid: u32, n: usize) -> (std::process::Child, usize) {
    const HOLD: &str = r#"
import resource, socket, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
try:
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
except (ValueError, OSError):
    pass
n = min(int(sys.argv[2]), resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 16)
held = []
for _ in range(n):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sys.argv[1])
    held.append(s)
print(len(held), flush=True)
sys.stdin.read()
"#;
    let mut child = Command::new("setpriv")
        .args(["--reuid", &uid.to_string(), "--regid", &gid.to_string(), "--clear-groups"])
        .args(["/usr/bin/python3", "-c", HOLD, control.to_str().unwrap(), &n.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = capture(child.stdout.take().unwrap(), false);
    let opened = wait_for(Duration::from_secs(120), "the idle connections to be open", || {
        if let Ok(Some(st)) = child.try_wait() {
            panic!("the connection holder exited: {st}");
        }
        out.lock().unwrap().trim().parse::<usize>().ok()
    });
    (child, opened)
}

/// issue 22 §2: a `control_group` member holding 64 idle connections made root's
/// `systemctl reload` fail with "busy" (the slot was taken before `SO_PEERCRED` was checked).
/// Now with 2000 idle connections from a member and 2000 from a stranger, root's status and
/// reload both work. (How long status took is printed, not asserted: see the report.)
#[test]
fn thousands_of_idle_connections_from_a_member_and_a_stranger_do_not_stop_roots_status_or_reload() {
    if !nix::unistd::geteuid().is_root() {
        return support::needs(
            "thousands_of_idle_connections_from_a_member_and_a_stranger_do_not_stop_roots_status_or_reload",
            "needs root to become other users",
        );
    }
    let (_dir, control, _h, nobody) = member_app("idle-members");
    let (uid, gid) = (nobody.uid.as_raw(), nobody.gid.as_raw());
    // The stranger must get as far as SO_PEERCRED: open the file itself up.
    std::fs::set_permissions(&control, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
    let (member, m) = idle_holder(&control, uid, gid, 2000);
    let (stranger, s) = idle_holder(&control, 54321, 54321, 2000);
    eprintln!("idle connections opened: {m} by a member (uid {uid}), {s} by a stranger (uid 54321)");
    let started = std::time::Instant::now();
    let out = Command::new(BIN).arg("status").arg(&control).arg("--json").output().unwrap();
    let took = started.elapsed();
    assert!(out.status.success(), "root's status: {}", String::from_utf8_lossy(&out.stderr));
    eprintln!("root's status answered in {:.1} ms", took.as_secs_f64() * 1e3);
    let started = std::time::Instant::now();
    let out = Command::new(BIN).arg("reload").arg(&control).output().unwrap();
    assert!(out.status.success(), "root's reload: {}", String::from_utf8_lossy(&out.stderr));
    eprintln!("root's reload took {:.1} ms", started.elapsed().as_secs_f64() * 1e3);
    assert_eq!(try_status(&control).unwrap()["generation"], 2);
    for mut c in [member, stranger] {
        drop(c.stdin.take());
        let _ = c.wait();
    }
}

/// issue 22 §2: idle non-root connections are dropped sooner than root's (2 s, not 5 s).
#[test]
fn an_idle_connection_from_a_member_is_dropped_after_2_s() {
    if !nix::unistd::geteuid().is_root() {
        return support::needs(
            "an_idle_connection_from_a_member_is_dropped_after_2_s",
            "needs root to become nobody",
        );
    }
    let (_dir, control, _h, nobody) = member_app("idle-member");
    const IDLE: &str = "import socket, sys\ns = socket.socket(socket.AF_UNIX)\ns.settimeout(60)\ns.connect(sys.argv[1])\nprint(s.recv(4096).decode())";
    let out = Command::new("setpriv")
        .args(["--reuid", &nobody.uid.to_string(), "--regid", &nobody.gid.to_string(), "--clear-groups"])
        .args(["/usr/bin/python3", "-c", IDLE, control.to_str().unwrap()])
        .output()
        .unwrap();
    let reply = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{reply} {}", String::from_utf8_lossy(&out.stderr));
    assert!(reply.contains("request timed out: send one JSON line within 2s"), "{reply}");
}

#[test]
fn a_worker_count_over_the_limit_is_a_config_error_naming_the_limit() {
    let dir = TempDir::new("max-workers");
    let cfg = dir.path("app.toml");
    std::fs::write(&cfg, "command = [\"sleep\", \"1000\"]\nworkers = 1000000\n").unwrap();
    let out = Command::new(BIN).arg("check-config").arg(&cfg).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(err.contains("`workers`") && err.contains("limit of 4096"), "{err}");
    // The same limit for -w and for `scale` (checked by the client before asking).
    let out = Command::new(BIN).args(["run", "-w", "5000", "--", "sleep", "1"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(err.contains("--workers") && err.contains("limit of 4096"), "{err}");
    let out = Command::new(BIN).args(["scale", "/nonexistent.sock", "5000"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("limit of 4096"), "{err}");
}

#[test]
fn scale_and_sigttin_stop_at_the_same_worker_limit() {
    let dir = TempDir::new("scale-limit");
    let control = dir.path("control.sock");
    // Ask the supervisor directly (the client would refuse first): the server enforces it too.
    let h = Run::new(&dir, 1).start();
    h.wait_started();
    let mut s = UnixStream::connect(&control).unwrap();
    s.write_all(b"{\"v\":1,\"op\":\"scale\",\"workers\":\"+5000\",\"wait\":false}\n").unwrap();
    let mut reply = String::new();
    s.set_read_timeout(Some(LONG)).unwrap();
    s.read_to_string(&mut reply).unwrap();
    assert!(reply.contains("limit of 4096"), "{reply}");
    assert_eq!(try_status(&control).unwrap()["desired"], 1);
}

#[test]
fn workers_that_could_not_start_for_lack_of_fds_start_once_fds_are_available_again() {
    let dir = TempDir::new("emfile-recover");
    let control = dir.path("control.sock");
    let h = Run::new(&dir, 1).arg("--ready").arg("alive:100ms").start();
    h.wait_started();
    let pid = h.pid().to_string();
    let open = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
    // Room for one more worker's start (7 descriptors at its peak, 3 kept), not for two.
    let set_soft = |soft: String| {
        let out =
            Command::new("prlimit").args(["--pid", &pid, &format!("--nofile={soft}:")]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    set_soft((open + 8).to_string());
    let out = Command::new(BIN).arg("scale").arg(&control).args(["6", "--no-wait"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let st = wait_for(LONG, "slots in back-off for lack of fds", || {
        try_status(&control).filter(|s| {
            let w = s["workers"].as_array().cloned().unwrap_or_default();
            w.len() == 6 && w.iter().filter(|w| w["state"] == "backoff").count() >= 3
        })
    });
    assert!(st["ready"].as_u64().unwrap() < 6, "{st}");
    // Each slot that could not start says why in its `last_error`.
    wait_for(LONG, "three slots in back-off naming EMFILE", || {
        try_status(&control).filter(|s| {
            let w = s["workers"].as_array().cloned().unwrap_or_default();
            w.iter()
                .filter(|w| {
                    w["state"] == "backoff"
                        && w["failures"].as_u64().unwrap_or(0) >= 1
                        && w["last_error"].as_str().unwrap_or("").contains("Too many open files")
                })
                .count()
                >= 3
        })
    });
    // The supervisor serves on, and once descriptors are available again (the operator
    // raised the limit) every slot fills.
    assert!(!h.distinct_workers(1).is_empty());
    set_soft("1024".to_string());
    wait_for(Duration::from_secs(60), "6/6 ready after the fd limit was raised", || {
        try_status(&control).filter(|s| s["ready"] == 6)
    });
    assert_eq!(h.distinct_workers(6).len(), 6);
}

#[test]
fn herdsman_raises_its_own_fd_limit_but_workers_get_the_original_one() {
    let dir = TempDir::new("nofile");
    let out = dir.path("limit");
    let run = Run::new(&dir, 1).arg("--ready").arg("alive:100ms");
    let script = format!(
        "ulimit -Sn > {0}.tmp; ulimit -Hn >> {0}.tmp; mv {0}.tmp {0}; exec sleep 1000",
        out.display()
    );
    let mut cmd = Command::new("prlimit");
    cmd.arg("--nofile=512:4096").arg(BIN).args(&run.args).args(["--", "sh", "-c", &script]);
    let h = spawn_cmd(cmd, run.addr.clone());
    let limits = wait_for(LONG, "the worker to report its fd limits", || std::fs::read_to_string(&out).ok());
    assert_eq!(limits.split_whitespace().collect::<Vec<_>>(), ["512", "4096"], "worker limits");
    let own = std::fs::read_to_string(format!("/proc/{}/limits", h.pid())).unwrap();
    let line = own.lines().find(|l| l.starts_with("Max open files")).unwrap().to_string();
    assert_eq!(line.split_whitespace().nth(3), Some("4096"), "herdsman's soft limit: {line}");
}
