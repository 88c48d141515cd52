//! The "limit" launcher (no supervisor at all) and a tiny instantly-ready worker.

// Launching workers by hand (signals, fd 3, waitpid, SO_REUSEPORT) needs libc: each `unsafe` block
// says why it is sound (the crate denies `unsafe_code` elsewhere).
#![allow(unsafe_code)]

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::atomic::{AtomicI32, Ordering};

use crate::util::mono_ns;

static SIGNALLED: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: i32) {
    SIGNALLED.store(sig, Ordering::SeqCst);
}

/// `launch --listen ADDR -w N -- CMD...`: binds ADDR (same options as herdsman: SO_REUSEADDR,
/// backlog 4096), forks N workers with the socket at fd 3 and LISTEN_FDS=1 / LISTEN_PID=their
/// own pid, and waits. SIGTERM/SIGINT are forwarded to the workers; exits when all are gone.
/// With `--reuseport` every worker gets a socket of its own instead, all N in one
/// `SO_REUSEPORT` group with no program attached (the kernel's flow hash picks): per-worker
/// queues without herdsman, the yardstick for what `--balance steer`'s queues cost.
pub fn launch(args: &[String]) -> i32 {
    let mut listen = None;
    let mut n = 1usize;
    let mut reuseport = false;
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--reuseport" => {
                reuseport = true;
                i += 1;
            }
            "--listen" => {
                listen = Some(args[i + 1].clone());
                i += 2;
            }
            "-w" => {
                n = args[i + 1].parse().expect("-w N");
                i += 2;
            }
            "--" => {
                i += 1;
                break;
            }
            a => panic!("launch: unknown argument {a}"),
        }
    }
    let cmd = &args[i..];
    assert!(!cmd.is_empty(), "launch: no command");
    let listen = listen.expect("launch: --listen ADDR");
    // One socket for all (std binds with SO_REUSEADDR; re-listened with herdsman's backlog),
    // or one per worker.
    let fds: Vec<i32> = if reuseport {
        let a: std::net::SocketAddrV4 = listen.parse().expect("--reuseport: an IPv4 HOST:PORT");
        (0..n).map(|_| reuseport_listener(a)).collect()
    } else {
        let fd = TcpListener::bind(&listen).expect("bind").into_raw_fd();
        // SAFETY: `fd` is the listening socket just created (owned by us, leaked on purpose for
        // the workers); listen(2) touches no memory.
        unsafe { libc::listen(fd, 4096) };
        vec![fd; n]
    };
    // SAFETY: `sa` is a zeroed, valid sigaction whose handler only stores into an atomic
    // (async-signal-safe); the old actions are not asked for (null).
    unsafe {
        // No SA_RESTART: waitpid must return EINTR so the signal gets forwarded.
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_signal as extern "C" fn(i32) as libc::sighandler_t;
        libc::sigaction(libc::SIGTERM, &sa, std::ptr::null_mut());
        libc::sigaction(libc::SIGINT, &sa, std::ptr::null_mut());
    }
    let mut pids = Vec::new();
    for (id, &fd) in fds.iter().enumerate() {
        // `sh -c 'LISTEN_PID=$$ exec "$@"'`: $$ is the pid the command keeps after exec.
        let mut c = Command::new("/bin/sh");
        c.arg("-c")
            .arg("LISTEN_PID=$$; export LISTEN_PID; exec \"$@\"")
            .arg("sh")
            .args(cmd)
            .env("LISTEN_FDS", "1")
            .env("LISTEN_FDNAMES", "listen-0")
            .env("HERDSMAN_WORKER_ID", id.to_string())
            .env_remove("NOTIFY_SOCKET");
        // SAFETY: the closure runs between fork and exec and only calls async-signal-safe
        // functions (dup2, fcntl, signal) on integers: no allocation, no lock.
        unsafe {
            c.pre_exec(move || {
                if fd != 3 && libc::dup2(fd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // dup2 clears FD_CLOEXEC, but not when fd is already 3.
                libc::fcntl(3, libc::F_SETFD, 0);
                // Default dispositions for the worker.
                libc::signal(libc::SIGTERM, libc::SIG_DFL);
                libc::signal(libc::SIGINT, libc::SIG_DFL);
                Ok(())
            });
        }
        let child = c.spawn().expect("spawn worker");
        pids.push(child.id() as i32);
        std::mem::forget(child);
    }
    eprintln!("launch: {n} worker(s) on {listen}");
    let mut forwarded = false;
    let mut left = pids.len();
    while left > 0 {
        let sig = SIGNALLED.load(Ordering::SeqCst);
        if sig != 0 && !forwarded {
            for &p in &pids {
                // SAFETY: kill(2) on a child's pid; plain integers, no memory.
                unsafe { libc::kill(p, libc::SIGTERM) };
            }
            forwarded = true;
        }
        let mut status = 0;
        // SAFETY: `status` is a valid, writable int for the call's duration.
        let r = unsafe { libc::waitpid(-1, &mut status, 0) };
        if r > 0 {
            left -= 1;
        } else if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            break;
        }
    }
    0
}

/// `worker`: a tiny HTTP server on the inherited fd 3 that is ready at once. It sends
/// READY=1 to $NOTIFY_SOCKET right away and, when $BENCH_TIMES is set, appends
/// `pid generation main_ns ready_ns` (CLOCK_MONOTONIC) to that file. SIGTERM ends it.
pub fn worker() -> i32 {
    let main_ns = mono_ns();
    // SAFETY: the launcher (or herdsman) hands every worker its listening socket at fd 3,
    // which nothing else in this process owns.
    let l = unsafe { TcpListener::from_raw_fd(3) };
    std::thread::spawn(move || serve(l));
    if let Ok(sock) = std::env::var("NOTIFY_SOCKET") {
        notify(&sock, "READY=1");
    }
    let ready_ns = mono_ns();
    if let Ok(path) = std::env::var("BENCH_TIMES") {
        let line = format!(
            "{} {} {} {}\n",
            std::process::id(),
            std::env::var("HERDSMAN_GENERATION").unwrap_or_default(),
            main_ns,
            ready_ns
        );
        if let Ok(mut f) = std::fs::OpenOptions::new().append(true).create(true).open(path) {
            let _ = f.write_all(line.as_bytes());
        }
    }
    loop {
        std::thread::park();
    }
}

/// `probe FILE`: writes CLOCK_MONOTONIC at main() to FILE and exits (bare exec latency).
pub fn probe(path: &str) -> i32 {
    let t = mono_ns();
    let _ = std::fs::write(path, t.to_string());
    0
}

pub fn notify(sock: &str, msg: &str) {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let addr = match sock.strip_prefix('@') {
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes()),
        None => SocketAddr::from_pathname(sock),
    };
    if let (Ok(addr), Ok(d)) = (addr, UnixDatagram::unbound()) {
        let _ = d.send_to_addr(msg.as_bytes(), &addr);
    }
}

fn serve(l: TcpListener) {
    loop {
        match l.accept() {
            Ok((mut s, _)) => {
                let mut buf = [0u8; 1024];
                let _ = s.set_nonblocking(false);
                let _ = s.read(&mut buf);
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n");
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                // O_NONBLOCK is shared by every process on the socket: wait for readability.
                let mut p = libc::pollfd { fd: l.as_raw_fd(), events: libc::POLLIN, revents: 0 };
                // SAFETY: `p` is one valid pollfd, the count says one.
                unsafe { libc::poll(&mut p, 1, 1000) };
            }
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
        }
    }
}

/// A listening TCP socket on `a` with SO_REUSEADDR and SO_REUSEPORT, backlog 4096.
fn reuseport_listener(a: std::net::SocketAddrV4) -> i32 {
    // SAFETY: every pointer passed is to a local that outlives the call (`one`, `sa`), with
    // its true size; the fd is the one socket(2) just returned.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let one: libc::c_int = 1;
        for opt in [libc::SO_REUSEADDR, libc::SO_REUSEPORT] {
            let p = &one as *const libc::c_int as *const libc::c_void;
            libc::setsockopt(fd, libc::SOL_SOCKET, opt, p, std::mem::size_of::<libc::c_int>() as u32);
        }
        let mut sa: libc::sockaddr_in = std::mem::zeroed();
        sa.sin_family = libc::AF_INET as libc::sa_family_t;
        sa.sin_port = a.port().to_be();
        sa.sin_addr.s_addr = u32::from(*a.ip()).to_be();
        let len = std::mem::size_of::<libc::sockaddr_in>() as u32;
        let r = libc::bind(fd, &sa as *const libc::sockaddr_in as *const libc::sockaddr, len);
        assert!(r == 0, "bind {a}: {}", std::io::Error::last_os_error());
        assert!(libc::listen(fd, 4096) == 0, "listen: {}", std::io::Error::last_os_error());
        fd
    }
}
