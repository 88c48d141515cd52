//! Bind interception (`--bind-intercept`, issue 23): unchanged servers that bind herdsman's
//! port themselves run as N workers on herdsman's one socket; every other bind proceeds.
#![allow(clippy::unwrap_used)]

mod support;

use std::io::{Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::time::Duration;

use support::*;

/// The seed's Node app, verbatim but for the port.
fn node_app(dir: &TempDir, port: u16) -> String {
    let path = dir.path("app.js");
    std::fs::write(
        &path,
        format!("require('http').createServer((q,s)=>s.end('hi '+process.pid)).listen({port})\n"),
    )
    .unwrap();
    path.display().to_string()
}

/// A port nobody listens on right now (bound to port 0, read, closed).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `herdsman run --listen 127.0.0.1:PORT -w N [extra] -- command`.
fn run(dir: &TempDir, port: u16, workers: usize, extra: &[&str], command: &[&str]) -> Herdsman {
    let mut args: Vec<String> = ["run", "--name", "t", "-w", &workers.to_string()].map(String::from).to_vec();
    args.extend(["--listen".to_string(), format!("127.0.0.1:{port}")]);
    args.extend(["--control".to_string(), dir.path("control.sock").display().to_string()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    args.push("--".into());
    args.extend(command.iter().map(|s| s.to_string()));
    Herdsman::spawn(&args, &[], Addr::Tcp(format!("127.0.0.1:{port}")))
}

/// One HTTP/1.0 request on a fresh connection: the body, or why not.
fn http_body(port: u16) -> Result<String, String> {
    let mut c = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"GET / HTTP/1.0\r\nHost: t\r\n\r\n").map_err(|e| format!("write: {e}"))?;
    let mut text = String::new();
    c.read_to_string(&mut text).map_err(|e| format!("read: {e}"))?;
    if !text.starts_with("HTTP/1.") || !text.contains(" 200 ") {
        return Err(format!("bad response: {:?}", text.lines().next()));
    }
    Ok(text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
}

/// The inodes of the sockets process `pid` holds.
fn socket_inodes(pid: i64) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return Vec::new() };
    dir.flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|l| l.to_str()?.strip_prefix("socket:[")?.strip_suffix(']').map(String::from))
        .collect()
}

/// The inode of herdsman's listening socket on `port` (from `/proc/net/tcp{,6}`, state 0A).
fn listener_inode(port: u16) -> Option<String> {
    let mut table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    table.push_str(&std::fs::read_to_string("/proc/net/tcp6").unwrap_or_default());
    table.lines().filter(|l| !l.trim_start().starts_with("sl")).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let local_port = u16::from_str_radix(f.get(1)?.rsplit(':').next()?, 16).ok()?;
        (local_port == port && f.get(3) == Some(&"0A")).then(|| f.get(9).map(|s| s.to_string()))?
    })
}

/// Waits until `n` workers are ready and each holds herdsman's listening socket at a number
/// of its own choosing (the app's own bind got it): returns their pids.
fn wait_workers_on_herdsmans_socket(h: &Herdsman, port: u16, n: usize) -> Vec<i64> {
    wait_workers_holding(h, port, n, 2)
}

/// Waits until `n` workers are ready and each holds herdsman's socket at least `copies` times.
fn wait_workers_holding(h: &Herdsman, port: u16, n: usize, copies: usize) -> Vec<i64> {
    wait_for(Duration::from_secs(60), "every worker ready on herdsman's socket", || {
        let inode = listener_inode(port)?;
        let st = h.status()?;
        let pids: Vec<i64> = st["workers"]
            .as_array()?
            .iter()
            .filter(|w| w["state"] == "ready")
            .filter_map(|w| w["pid"].as_i64())
            .collect();
        let on_ours =
            pids.iter().filter(|p| socket_inodes(**p).iter().filter(|i| **i == inode).count() >= copies);
        (pids.len() == n && on_ours.count() == n).then_some(pids)
    })
}

#[test]
fn the_seeds_unchanged_node_app_serves_from_two_workers_on_herdsmans_socket() {
    if !have("node") {
        eprintln!("skipped: node is not installed");
        return;
    }
    let dir = TempDir::new("intercept-node");
    let port = free_port();
    let app = node_app(&dir, port);
    let h = run(&dir, port, 2, &[], &["node", &app]);
    let pids = wait_workers_on_herdsmans_socket(&h, port, 2);
    let mut answered = std::collections::BTreeSet::new();
    wait_for(Duration::from_secs(60), "both workers answering", || {
        let body = http_body(port).unwrap_or_else(|e| panic!("{e}\nherdsman log:\n{}", h.stderr()));
        let pid: i64 = body.strip_prefix("hi ")?.trim().parse().ok()?;
        answered.insert(pid);
        (answered.len() == 2).then_some(())
    });
    assert_eq!(answered.into_iter().collect::<Vec<_>>(), {
        let mut p = pids.clone();
        p.sort();
        p
    });
    let st = h.status().unwrap();
    for w in st["workers"].as_array().unwrap() {
        assert_eq!(w["restarts"], 0, "no EADDRINUSE crash: {w}");
        assert_eq!(w["last_error"], Value::Null, "{w}");
    }
}

#[test]
fn python_http_server_binding_the_port_itself_gets_herdsmans_socket() {
    let dir = TempDir::new("intercept-python");
    let port = free_port();
    let p = port.to_string();
    let h = run(&dir, port, 2, &[], &["python3", "-m", "http.server", &p, "--bind", "127.0.0.1"]);
    wait_workers_on_herdsmans_socket(&h, port, 2);
    wait_for(Duration::from_secs(30), "python's http.server answering", || http_body(port).ok());
}

/// A worker that binds UDP on herdsman's port and TCP on another: both binds are its own.
const OTHER_BINDS: &str = r#"
import os, socket, sys
port, other = int(sys.argv[1]), int(sys.argv[2])
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind(("127.0.0.1", port))
t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind(("127.0.0.1", other))
t.listen(8)
while True:
    data, peer = u.recvfrom(100)
    u.sendto(b"udp " + str(os.getpid()).encode(), peer)
"#;

#[test]
fn binds_of_another_port_and_of_udp_on_herdsmans_port_proceed_unchanged() {
    let dir = TempDir::new("intercept-other");
    let port = free_port();
    let other = free_port();
    let script = dir.path("binds.py");
    std::fs::write(&script, OTHER_BINDS).unwrap();
    let h = run(
        &dir,
        port,
        1,
        &[],
        &["python3", script.to_str().unwrap(), &port.to_string(), &other.to_string()],
    );
    let pid = wait_for(Duration::from_secs(60), "the worker ready", || {
        let st = h.status()?;
        let w = st["workers"].as_array()?.first()?.clone();
        (w["state"] == "ready").then(|| w["pid"].as_i64())?
    });
    // UDP on herdsman's port: the app's own socket, answering from the app.
    let u = UdpSocket::bind("127.0.0.1:0").unwrap();
    u.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let reply = wait_for(Duration::from_secs(30), "a UDP answer from the worker", || {
        u.send_to(b"ping", ("127.0.0.1", port)).ok()?;
        let mut buf = [0u8; 100];
        let (n, _) = u.recv_from(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    });
    assert_eq!(reply, format!("udp {pid}"));
    // TCP on another port: the app really listens there, on a socket that is not herdsman's.
    TcpStream::connect(("127.0.0.1", other)).unwrap_or_else(|e| panic!("the app's own port {other}: {e}"));
    let ours = listener_inode(port).unwrap();
    let theirs = wait_for(Duration::from_secs(10), "the app's own listener", || listener_inode(other));
    assert_ne!(ours, theirs);
    assert!(socket_inodes(pid).contains(&theirs));
    assert_eq!(h.status().unwrap()["workers"][0]["restarts"], 0);
}

#[test]
fn with_bind_intercept_off_the_unchanged_node_app_fails_with_address_in_use() {
    if !have("node") {
        eprintln!("skipped: node is not installed");
        return;
    }
    let dir = TempDir::new("intercept-off");
    let port = free_port();
    let app = node_app(&dir, port);
    let h = run(&dir, port, 1, &["--bind-intercept", "off"], &["node", &app]);
    let st = wait_for(Duration::from_secs(60), "the slot to record a failure", || {
        let st = h.status()?;
        let w = st["workers"].as_array()?.first()?.clone();
        (w["failures"].as_u64()? >= 1).then_some(w)
    });
    assert!(st["last_error"].is_string(), "{st}");
}

/// Runs `herdsman` under a seccomp filter that refuses `seccomp()` with EPERM, like systemd's
/// `SystemCallFilter=@system-service` (python's ctypes installs it, then execs).
const REFUSE_SECCOMP: &str = r#"
import ctypes, os, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
def stmt(code, k): return struct.pack("HBBI", code, 0, 0, k)
def jump(code, k, jt, jf): return struct.pack("HBBI", code, jt, jf, k)
prog = b"".join([
    stmt(0x20, 0),                   # ld nr
    jump(0x15, 317, 0, 1),           # jeq seccomp
    stmt(0x06, 0x00050000 | 1),      # ret ERRNO(EPERM)
    stmt(0x06, 0x7fff0000),          # ret ALLOW
])
buf = ctypes.create_string_buffer(prog)
class Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
fprog = Fprog(len(prog) // 8, ctypes.addressof(buf))
assert libc.prctl(38, 1, 0, 0, 0) == 0                           # PR_SET_NO_NEW_PRIVS
assert libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) == 0, ctypes.get_errno()  # SECCOMP_MODE_FILTER
os.execv(sys.argv[1], sys.argv[1:])
"#;

#[test]
fn bind_intercept_on_fails_the_start_when_a_sandbox_refuses_seccomp() {
    if std::env::consts::ARCH != "x86_64" {
        return;
    }
    let dir = TempDir::new("intercept-refused");
    let wrapper = dir.path("refuse.py");
    std::fs::write(&wrapper, REFUSE_SECCOMP).unwrap();
    let port = free_port();
    let out = std::process::Command::new("python3")
        .arg(&wrapper)
        .arg(BIN)
        .args(["run", "--name", "t", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--control", dir.path("control.sock").to_str().unwrap(), "--bind-intercept", "on"])
        .args(["--", "sleep", "1000"])
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(71), "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| l.contains("seccomp")).collect();
    assert_eq!(lines.len(), 1, "one line naming the cause: {stderr}");
    assert!(lines[0].contains("SystemCallFilter"), "and the fix: {stderr}");

    // auto: starts without interception (with one warning), and its workers run.
    let mut child = std::process::Command::new("python3")
        .arg(&wrapper)
        .arg(BIN)
        .args(["run", "--name", "t", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--control", dir.path("control.sock").to_str().unwrap(), "--", "sleep", "1000"])
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let control = dir.path("control.sock");
    wait_for(Duration::from_secs(60), "the auto start with a ready worker", || {
        let out = std::process::Command::new(BIN).arg("status").arg(&control).arg("--json").output().ok()?;
        let st: Value = serde_json::from_slice(&out.stdout).ok()?;
        (st["ready"] == 1).then_some(())
    });
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = child.wait();
}

/// A worker that binds herdsman's port itself only once `go` exists, and writes the outcome.
const BIND_LATER: &str = r#"
import os, socket, sys, time
port, go, result = int(sys.argv[1]), sys.argv[2], sys.argv[3]
while not os.path.exists(go):
    time.sleep(0.02)
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
try:
    s.bind(("127.0.0.1", port))
    s.listen(16)
    r = "ok"
except OSError as e:
    r = "errno %d" % e.errno
with open(result + ".tmp", "w") as f:
    f.write(r)
os.rename(result + ".tmp", result)
while True:
    time.sleep(1000)
"#;

#[test]
fn a_worker_that_binds_after_an_in_place_upgrade_still_gets_herdsmans_socket() {
    let dir = TempDir::new("intercept-upgrade");
    let port = free_port();
    let script = dir.path("later.py");
    std::fs::write(&script, BIND_LATER).unwrap();
    let (go, result) = (dir.path("go"), dir.path("result"));
    let h = run(
        &dir,
        port,
        1,
        &[],
        &[
            "python3",
            script.to_str().unwrap(),
            &port.to_string(),
            go.to_str().unwrap(),
            result.to_str().unwrap(),
        ],
    );
    let control = dir.path("control.sock");
    let pid = wait_for(Duration::from_secs(60), "the worker ready", || {
        let st = h.status()?;
        let w = st["workers"].as_array()?.first()?.clone();
        (w["state"] == "ready").then(|| w["pid"].as_i64())?
    });
    let copy = dir.path("herdsman-new");
    std::fs::copy(BIN, &copy).unwrap();
    let out = std::process::Command::new(BIN)
        .args(["upgrade", control.to_str().unwrap(), "--binary", copy.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "upgrade: {}\n{}", String::from_utf8_lossy(&out.stderr), h.stderr());
    assert_eq!(h.status().unwrap()["upgrades"], 1);
    std::fs::write(&go, "").unwrap();
    let r = wait_for(Duration::from_secs(60), "the worker's bind outcome", || {
        std::fs::read_to_string(&result).ok()
    });
    assert_eq!(r, "ok", "errno 38 is ENOSYS: the new image lost the bind filter's descriptor");
    let inode = listener_inode(port).unwrap();
    assert!(
        socket_inodes(pid).iter().filter(|i| **i == inode).count() >= 2,
        "the worker holds herdsman's socket twice"
    );
    assert_eq!(h.status().unwrap()["workers"][0]["pid"], pid);
}

#[test]
fn without_listen_the_first_workers_own_address_is_learned_and_shared_by_every_worker() {
    if !have("node") {
        eprintln!("skipped: node is not installed");
        return;
    }
    let dir = TempDir::new("intercept-learn");
    let port = free_port();
    let app = node_app(&dir, port);
    let control = dir.path("control.sock").display().to_string();
    let args: Vec<String> = ["run", "--name", "t", "-w", "3", "--control", &control, "--", "node", &app]
        .map(String::from)
        .to_vec();
    let h = Herdsman::spawn(&args, &[], Addr::Tcp(format!("127.0.0.1:{port}")));
    // Node's listen(PORT) binds [::]:PORT; herdsman binds that itself and hands it on.
    let st = wait_for(Duration::from_secs(60), "the learned address in status", || {
        let st = h.status()?;
        (st["learned_sockets"].as_array()?.len() == 1).then_some(st)
    });
    assert_eq!(st["learned_sockets"], st["sockets"], "{st}");
    assert!(st["learned_sockets"][0].as_str().unwrap().ends_with(&format!(":{port}")), "{st}");
    // The first workers started before it was learned: they hold it where their bind put it.
    let pids = wait_workers_holding(&h, port, 3, 1);
    let mut answered = std::collections::BTreeSet::new();
    wait_for(Duration::from_secs(60), "every worker answering", || {
        let body = http_body(port).unwrap_or_else(|e| panic!("{e}\nherdsman log:\n{}", h.stderr()));
        answered.insert(body.strip_prefix("hi ")?.trim().parse::<i64>().ok()?);
        (answered.len() == 3).then_some(())
    });
    assert_eq!(answered.len(), pids.len());
    // A worker started after the address was learned gets it at fd 3 (LISTEN_FDS=1) too.
    let victim = pids[0];
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim as i32), nix::sys::signal::Signal::SIGKILL)
        .unwrap();
    // Its replacement gets it at fd 3 and at its own bind's number.
    let new = wait_for(Duration::from_secs(60), "the replacement", || {
        let pids = wait_workers_holding(&h, port, 3, 1);
        pids.into_iter().find(|p| !answered.contains(p))
    });
    let inode = listener_inode(port).unwrap();
    wait_for(Duration::from_secs(60), "the replacement holding it twice", || {
        (socket_inodes(new).iter().filter(|i| **i == inode).count() >= 2).then_some(())
    });
    let env = std::fs::read(format!("/proc/{new}/environ")).unwrap();
    assert!(env.split(|b| *b == 0).any(|kv| kv == b"LISTEN_FDS=1"), "the replacement was given the socket");
    assert!(env.split(|b| *b == 0).any(|kv| kv == b"LISTEN_FDNAMES=learned"), "named for what it is");
    // An in-place upgrade keeps the learned socket, and says so.
    let copy = dir.path("herdsman-new");
    std::fs::copy(BIN, &copy).unwrap();
    let out = std::process::Command::new(BIN)
        .args(["upgrade", &control, "--binary", copy.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "upgrade: {}", String::from_utf8_lossy(&out.stderr));
    let after = h.status().unwrap();
    assert_eq!(after["upgrades"], 1);
    assert_eq!(after["learned_sockets"], st["learned_sockets"], "{after}");
}

/// A worker that calls listen() on herdsman's socket at fd 3 only once `go` exists, never
/// binding anything itself; then serves nothing (readiness is all that is tested).
const LISTEN_LATER: &str = r#"
import os, socket, sys, time
go = sys.argv[1]
while not os.path.exists(go):
    time.sleep(0.02)
s = socket.socket(fileno=3)
s.listen(16)
while True:
    time.sleep(1000)
"#;

/// A worker that binds herdsman's port itself and never calls listen(), as gunicorn does
/// on a socket that already listens.
const BIND_NO_LISTEN: &str = r#"
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.bind(("127.0.0.1", int(sys.argv[1])))
while True:
    time.sleep(1000)
"#;

fn first_worker(h: &Herdsman) -> Option<Value> {
    h.status()?["workers"].as_array()?.first().cloned()
}

#[test]
fn ready_listen_waits_for_the_workers_listen_on_herdsmans_socket() {
    let dir = TempDir::new("intercept-ready-listen");
    let port = free_port();
    let script = dir.path("listen.py");
    std::fs::write(&script, LISTEN_LATER).unwrap();
    let go = dir.path("go");
    let h = run(
        &dir,
        port,
        1,
        &["--ready", "listen"],
        &["python3", script.to_str().unwrap(), go.to_str().unwrap()],
    );
    // Starting, and it stays so while it has not called listen(): wait until it runs python
    // (its first status), then well past any alive: delay, checking every status.
    let w =
        wait_for(Duration::from_secs(60), "the worker", || first_worker(&h).filter(|w| w["pid"].is_i64()));
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(2) {
        assert_eq!(first_worker(&h).unwrap()["state"], "starting", "ready before listen(): {w}");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::fs::write(&go, "").unwrap();
    wait_for(Duration::from_secs(60), "ready after listen()", || {
        (first_worker(&h)?["state"] == "ready").then_some(())
    });
}

#[test]
fn ready_listen_takes_a_worker_that_binds_but_skips_listen_one_second_after_its_bind() {
    let dir = TempDir::new("intercept-ready-skip");
    let port = free_port();
    let script = dir.path("bind.py");
    std::fs::write(&script, BIND_NO_LISTEN).unwrap();
    let h =
        run(&dir, port, 1, &["--ready", "listen"], &["python3", script.to_str().unwrap(), &port.to_string()]);
    let w = wait_for(Duration::from_secs(60), "ready without listen()", || {
        first_worker(&h).filter(|w| w["state"] == "ready")
    });
    let inode = listener_inode(port).unwrap();
    assert!(socket_inodes(w["pid"].as_i64().unwrap()).iter().filter(|i| **i == inode).count() >= 2);
}

#[test]
fn workers_of_another_user_get_herdsmans_socket() {
    if !nix::unistd::geteuid().is_root() {
        return needs(
            "workers_of_another_user_get_herdsmans_socket",
            "needs root (to run workers as nobody)",
        );
    }
    if !have("node") {
        return skip("workers_of_another_user_get_herdsmans_socket", "needs node (apt install nodejs)");
    }
    let dir = TempDir::new("intercept-user");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    let port = free_port();
    let app = node_app(&dir, port);
    std::fs::set_permissions(&app, std::fs::Permissions::from_mode(0o644)).unwrap();
    let h = run(&dir, port, 2, &["--user", "nobody", "--cwd", dir.0.to_str().unwrap()], &["node", &app]);
    let pids = wait_workers_on_herdsmans_socket(&h, port, 2);
    let mut answered = std::collections::BTreeSet::new();
    wait_for(Duration::from_secs(60), "both workers answering", || {
        let body = http_body(port).unwrap_or_else(|e| panic!("{e}\nherdsman log:\n{}", h.stderr()));
        answered.insert(body.strip_prefix("hi ")?.trim().parse::<i64>().ok()?);
        (answered.len() == 2).then_some(())
    });
    for pid in pids {
        let uid = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        assert!(uid.lines().any(|l| l.starts_with("Uid:") && !l.contains("\t0\t")), "runs as nobody");
    }
}

#[test]
fn steered_workers_each_get_their_own_member_socket_for_their_own_bind() {
    if !have("node") {
        eprintln!("skipped: node is not installed");
        return;
    }
    let dir = TempDir::new("intercept-steer");
    let port = free_port();
    let app = node_app(&dir, port);
    let h = run(&dir, port, 2, &["--balance", "steer"], &["node", &app]);
    // Each worker holds its own member (at fd 3 and where its bind put it), not the other's.
    let held = wait_for(Duration::from_secs(60), "each worker on its own member socket", || {
        let st = h.status()?;
        let ws = st["workers"].as_array()?;
        let mut held = Vec::new();
        for w in ws.iter().filter(|w| w["state"] == "ready") {
            let inodes = socket_inodes(w["pid"].as_i64()?);
            let twice = inodes.iter().find(|i| inodes.iter().filter(|j| j == i).count() >= 2)?.clone();
            held.push(twice);
        }
        (held.len() == 2).then_some(held)
    });
    assert_ne!(held[0], held[1], "two workers on one member socket");
    let mut answered = std::collections::BTreeSet::new();
    wait_for(Duration::from_secs(60), "both workers answering", || {
        let body = http_body(port).unwrap_or_else(|e| panic!("{e}\nherdsman log:\n{}", h.stderr()));
        answered.insert(body.strip_prefix("hi ")?.trim().parse::<i64>().ok()?);
        (answered.len() == 2).then_some(())
    });
}

#[test]
fn a_worker_that_exits_0_before_ready_without_interception_gets_the_swallowed_eaddrinuse_hint() {
    // Express 5 hands EADDRINUSE to its listen callback: the app ends with status 0, silently.
    let dir = TempDir::new("intercept-express-hint");
    let port = free_port();
    let h = run(&dir, port, 1, &["--bind-intercept", "off"], &["sh", "-c", "exit 0"]);
    let err = wait_for(Duration::from_secs(60), "the slot's last error", || {
        first_worker(&h)?["last_error"].as_str().map(String::from)
    });
    assert!(
        err.contains("exited with status 0 before it was ready") && err.contains("--bind-intercept"),
        "{err}"
    );
}

/// A Go server with the standard library only: `http.ListenAndServe(":PORT")`, which binds
/// `[::]:PORT` with raw system calls (no libc: LD_PRELOAD could never reach it).
const GO_SERVER: &str = r#"package main

import (
	"fmt"
	"net/http"
	"os"
)

func main() {
	http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) { fmt.Fprintf(w, "hi %d", os.Getpid()) })
	if err := http.ListenAndServe(":"+os.Args[1], nil); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
"#;

#[test]
fn a_static_go_binary_serves_from_two_workers_on_herdsmans_socket() {
    if std::process::Command::new("go").arg("version").output().is_err() {
        eprintln!("skipped: go is not installed");
        return;
    }
    let dir = TempDir::new("intercept-go");
    std::fs::write(dir.path("main.go"), GO_SERVER).unwrap();
    let bin = dir.path("server");
    let out = std::process::Command::new("go")
        .args(["build", "-o", bin.to_str().unwrap(), "main.go"])
        .current_dir(&dir.0)
        .env("CGO_ENABLED", "0")
        .env("GOCACHE", dir.path("gocache"))
        .env("HOME", &dir.0)
        .output()
        .unwrap();
    assert!(out.status.success(), "go build: {}", String::from_utf8_lossy(&out.stderr));
    let port = free_port();
    let h = run(&dir, port, 2, &[], &[bin.to_str().unwrap(), &port.to_string()]);
    wait_workers_on_herdsmans_socket(&h, port, 2);
    let mut answered = std::collections::BTreeSet::new();
    wait_for(Duration::from_secs(60), "both workers answering", || {
        let body = http_body(port).unwrap_or_else(|e| panic!("{e}\nherdsman log:\n{}", h.stderr()));
        answered.insert(body.strip_prefix("hi ")?.trim().parse::<i64>().ok()?);
        (answered.len() == 2).then_some(())
    });
}

#[test]
fn a_worker_of_another_user_gets_no_privileged_port_through_the_learned_address() {
    if !nix::unistd::geteuid().is_root() {
        return needs(
            "a_worker_of_another_user_gets_no_privileged_port_through_the_learned_address",
            "needs root (to run workers as nobody)",
        );
    }
    let dir = TempDir::new("intercept-privileged");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    // A port below 1024 that nothing here listens on (the supervisor could bind it as root).
    let port = (600..1000).find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok()).unwrap();
    let script = format!(
        "import socket, time\ns = socket.socket()\ns.bind(('127.0.0.1', {port}))\ns.listen()\ntime.sleep(3600)\n"
    );
    let control = dir.path("control.sock").display().to_string();
    let args: Vec<String> = [
        "run",
        "--name",
        "t",
        "-w",
        "1",
        "--control",
        &control,
        "--user",
        "nobody",
        "--cwd",
        dir.0.to_str().unwrap(),
        "--",
        SYSTEM_PYTHON,
        "-c",
        &script,
    ]
    .map(String::from)
    .to_vec();
    let h = Herdsman::spawn(&args, &[], Addr::Tcp(format!("127.0.0.1:{port}")));
    // Its own bind fails as it would without herdsman (EACCES): the slot fails and backs off.
    let st = wait_for(Duration::from_secs(60), "the worker's failed start", || {
        let st = h.status()?;
        (in_slot(&st, 0)?["failures"].as_u64()? >= 1).then_some(st)
    });
    assert_eq!(st["learned_sockets"].as_array().map(Vec::len), Some(0), "{st}");
    assert!(std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(), "herdsman bound {port}: {st}");
}

/// A 32-bit worker program: the bind filter traps x86_64 system calls only, so with
/// `--bind-intercept on` the start fails (71, the exit code of every other reason it cannot
/// work) with one line naming the program and the fix, before any worker starts.
#[test]
fn bind_intercept_on_fails_the_start_for_a_32_bit_worker_program() {
    if std::env::consts::ARCH != "x86_64" {
        return;
    }
    let dir = TempDir::new("intercept-i386");
    // An i386 ELF header (ELFCLASS32, EM_386): what `gcc -m32` would write.
    let mut h = vec![0x7f, b'E', b'L', b'F', 1, 1, 1, 0];
    h.resize(52, 0);
    h[16..18].copy_from_slice(&2u16.to_le_bytes());
    h[18..20].copy_from_slice(&3u16.to_le_bytes());
    let program = dir.path("server32");
    std::fs::write(&program, h).unwrap();
    std::fs::set_permissions(&program, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let port = free_port();
    let mut child = std::process::Command::new(BIN)
        .args(["run", "--name", "t", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--control", dir.path("control.sock").to_str().unwrap(), "--bind-intercept", "on"])
        .arg("--")
        .arg(&program)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.path("stderr")).unwrap())
        .spawn()
        .unwrap();
    // Bounded: a supervisor that starts anyway would crash-loop its worker for ever.
    let waited = std::time::Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if waited.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stderr = std::fs::read_to_string(dir.path("stderr")).unwrap();
    assert_eq!(status.and_then(|s| s.code()), Some(71), "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| l.contains("32-bit")).collect();
    assert_eq!(lines.len(), 1, "one line naming the cause: {stderr}");
    assert!(lines[0].contains("server32") && lines[0].contains("--bind-intercept=off"), "{stderr}");
}

/// A FUSE file system (the kernel protocol over `/dev/fuse`, no libfuse) with one file,
/// `page`, whose reads are never answered: a hung FUSE or NFS mount. The first READ's task
/// id is written to `MARKER`.
const HUNG_FUSE: &str = r#"
import ctypes, os, struct, sys
# A FUSE file system with one file, /page, whose reads are never answered (a hung mount).
# argv: mountpoint, marker (written with "PID" of the first READ's task)
mnt, marker = sys.argv[1], sys.argv[2]
libc = ctypes.CDLL(None, use_errno=True)
fd = os.open("/dev/fuse", os.O_RDWR)
opts = "fd=%d,rootmode=40000,user_id=0,group_id=0" % fd
if libc.mount(b"hang", mnt.encode(), b"fuse", 6, opts.encode()) != 0:  # MS_NOSUID|MS_NODEV
    sys.exit("mount: errno %d" % ctypes.get_errno())
def attr(ino, mode, size):
    return struct.pack("QQQQQQIIIIIIIIII", ino, size, 8, 0, 0, 0, 0, 0, 0, mode, 1, 0, 0, 0, 4096, 0)
def reply(unique, err=0, body=b""):
    os.write(fd, struct.pack("IiQ", 16 + len(body), -err, unique) + body)
with open(marker + ".mounted", "w"):
    pass
while True:
    try:
        req = os.read(fd, 1 << 20)
    except OSError:
        break
    ln, op, unique, node = struct.unpack_from("IIQQ", req)
    pid = struct.unpack_from("I", req, 32)[0]
    arg = req[40:]
    if op == 26:  # INIT
        major, minor = struct.unpack_from("II", arg)
        reply(unique, 0, struct.pack("IIIIHHIIHHII", 7, 31, 0, 0, 16, 16, 4096, 1, 1, 0, 0, 0) + b"\0" * 24)
    elif op == 1:  # LOOKUP
        name = arg.split(b"\0")[0]
        if node == 1 and name == b"page":
            reply(unique, 0, struct.pack("QQQQII", 2, 0, 0, 0, 0, 0) + attr(2, 0o100644, 4096))
        else:
            reply(unique, 2)
    elif op == 3:  # GETATTR
        a = attr(1, 0o40755, 0) if node == 1 else attr(2, 0o100644, 4096)
        reply(unique, 0, struct.pack("QII", 0, 0, 0) + a)
    elif op == 14:  # OPEN
        reply(unique, 0, struct.pack("QII", 1, 0, 0))
    elif op == 15:  # READ: never answered
        if not os.path.exists(marker):
            with open(marker + ".tmp", "w") as f:
                f.write(str(pid))
            os.rename(marker + ".tmp", marker)
    elif op in (2, 42, 36):  # FORGET, BATCH_FORGET, INTERRUPT: no reply
        pass
    elif op in (18, 25):  # RELEASE, FLUSH
        reply(unique)
    else:
        reply(unique, 38)  # ENOSYS
"#;

/// A worker whose bind() sockaddr lies on a page of that file (mapped, never touched).
const BIND_ON_HUNG_PAGE: &str = r#"
import ctypes, mmap, socket, sys
f = open(sys.argv[1], "rb")
m = mmap.mmap(f.fileno(), 4096, access=mmap.ACCESS_COPY)
addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
ctypes.CDLL(None, use_errno=True).bind(s.fileno(), ctypes.c_void_p(addr), 16)
"#;

/// Stops the FUSE server (its pending reads then fail) and detaches the mount.
struct Mounted {
    server: std::process::Child,
    at: std::path::PathBuf,
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.at).status();
    }
}

/// `herdsman status --json` in a child, waited for at most `secs`: whether it answered.
fn status_answers_within(h: &Herdsman, secs: u64) -> bool {
    let mut c = std::process::Command::new(BIN)
        .arg("status")
        .arg(h.control().unwrap())
        .arg("--json")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    loop {
        if let Some(st) = c.try_wait().unwrap() {
            return st.success();
        }
        if started.elapsed() > Duration::from_secs(secs) {
            let _ = c.kill();
            let _ = c.wait();
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Review finding: the supervisor read a trapped bind()'s sockaddr from /proc/TID/mem on its
/// event loop; a page that never comes (a file on a hung FUSE/NFS mount) froze the whole
/// supervisor. The read now runs on a thread of its own with a deadline: while it hangs, the
/// supervisor keeps answering.
#[test]
fn a_bind_address_on_a_hung_file_system_page_does_not_freeze_the_supervisor() {
    let test = "a_bind_address_on_a_hung_file_system_page_does_not_freeze_the_supervisor";
    if !nix::unistd::geteuid().is_root() {
        return needs(test, "needs root (to mount a FUSE file system)");
    }
    if !std::path::Path::new("/dev/fuse").exists() {
        return skip(test, "needs /dev/fuse");
    }
    let dir = TempDir::new("intercept-hung-page");
    let at = dir.path("mnt");
    std::fs::create_dir(&at).unwrap();
    std::fs::write(dir.path("fuse.py"), HUNG_FUSE).unwrap();
    std::fs::write(dir.path("worker.py"), BIND_ON_HUNG_PAGE).unwrap();
    let marker = dir.path("read-by");
    let server = std::process::Command::new("python3")
        .arg(dir.path("fuse.py"))
        .arg(&at)
        .arg(&marker)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut mounted = Mounted { server, at: at.clone() };
    let mounted_flag = format!("{}.mounted", marker.display());
    let up = wait_for(Duration::from_secs(30), "the FUSE mount", || {
        if std::path::Path::new(&mounted_flag).exists() {
            return Some(true);
        }
        mounted.server.try_wait().ok()?.map(|_| false)
    });
    if !up {
        let mut why = String::new();
        let _ = mounted.server.stderr.take().map(|mut e| e.read_to_string(&mut why));
        assert!(why.starts_with("mount: errno"), "the FUSE server failed: {why}");
        eprintln!("skipped: cannot mount a FUSE file system here: {why}");
        return;
    }
    let port = free_port();
    let page = at.join("page");
    let h = run(
        &dir,
        port,
        1,
        &["--bind-intercept", "on"],
        &["python3", dir.path("worker.py").to_str().unwrap(), page.to_str().unwrap()],
    );
    // Dropped before `h`: the FUSE server's end first, so the hung read fails and the
    // supervisor (whose reading thread waits uninterruptibly) can be reaped.
    let mounted = mounted;
    // The supervisor's read of the worker's memory is the one waiting for the page.
    let reader: i32 = wait_for(Duration::from_secs(60), "a read of the hung page", || {
        std::fs::read_to_string(&marker).ok()?.trim().parse().ok()
    });
    let tgid = std::fs::read_to_string(format!("/proc/{reader}/status"))
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Tgid:")).map(|t| t.trim().to_string()));
    assert_eq!(tgid, Some(h.pid().to_string()), "the hung read is the supervisor's (task {reader})");
    // While that read hangs, the supervisor answers.
    let answered = status_answers_within(&h, 20);
    let log = h.stderr.lock().unwrap().clone();
    assert!(answered, "the supervisor froze on the hung page: {log}");
    drop(mounted);
    drop(h);
}
