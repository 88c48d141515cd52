#!/usr/bin/env python3
"""Purpose-built test worker for herdsman's integration tests (stdlib only).

Serves HTTP/1.1 on the inherited listening socket at fd 3 (systemd
socket-activation style) and answers every request with a JSON description
of the environment it was started with.  Behaviour is tuned by TW_* knobs:

  TW_READY_DELAY_MS=N   sleep N ms before accepting / notifying readiness
  TW_NOTIFY=1           send READY=1 to $NOTIFY_SOCKET once ready
  TW_NOTIFY_STATUS=txt  also send STATUS=txt (separate datagram, before READY=1)
  TW_NEVER_READY=1      never send READY=1 (still serves)
  TW_FAIL_START=1       print "worker failing at start" to stderr, exit 3
  TW_BREAK_FILE=path    if path exists at startup: print
                        "broken build: <path> exists" to stderr, exit 3
  TW_CRASH_AFTER_MS=N   print "crashing now" to stderr, exit 4 after N ms
  TW_IGNORE_TERM=1      ignore SIGTERM and SIGINT
  TW_CHILD=1            spawn a child `sleep 1000` at start
  TW_DETACHED_CHILD=1   spawn a child `sleep 1000` in a new session at start (out of the
                        worker's process group, as a daemonizing child is)
  TW_CHILD_ALLOC_MB=N   spawn a child (same process group) that allocates and touches N MB,
                        prints "child allocated N MB (pid P)" to stderr, then sleeps
  TW_TAG=text           reported as "tag"
  TW_VERSION_FILE=path  contents (stripped) reported as "version"
  TW_WATCHDOG=1         send WATCHDOG=1 every WATCHDOG_USEC/2
  TW_HANG_ONCE_FILE=p   the one process that creates p hangs (no accepts, no pings)
                        TW_HANG_AFTER_MS after start
  TW_ALLOC_ONCE_FILE=p  the one process that creates p allocates TW_ALLOC_MB MB
  TW_FAULT_WORKER=id    the *_ONCE_FILE faults only apply in this slot
  TW_BURST_LINES=N      print N numbered lines ("burst i/N") as fast as possible at start
  TW_WARM_MS=N          accept at once but answer 503 for N ms ("warming up"), then send
                        READY=1 (with TW_NOTIFY) and answer normally
  TW_NAIVE_ACCEPT=1     select() then a *blocking* accept() on the socket (the naive pattern
                        that can hang on a shared socket)
  TW_READY_GATE=prefix  before accepting / READY=1, wait until the file prefix+WORKER_ID
                        exists (relative paths: in the working directory)
  TW_LATE_CRASH_FILE=p  if p exists at startup: send READY=1 (with TW_NOTIFY), accept
                        nothing, print "crashing after ready" and exit 4 TW_LATE_CRASH_MS
                        (default 300) ms later (gunicorn's arbiter with a broken app)
  TW_LATE_HANG_FILE=p   if p exists at startup: hang (no accepts, no watchdog pings)
                        300 ms after READY=1
  TW_CRASH_FILE=prefix  print "crash file found", exit 4 once prefix+WORKER_ID exists
  TW_METRICS=mode       serve HTTP GET /metrics on $HERDSMAN_METRICS_SOCKET: "ok" (a counter
                        tw_requests_total{path="/"}, a gauge tw_worker_pid and a histogram
                        tw_latency_seconds, plus TW_METRICS_SAMPLES extra gauge samples),
                        "garbage" (a 200 whose body is not Prometheus text), "hang"
                        (accept, never answer), "tiny" (4 MiB of one-word counter samples,
                        about a million series), "wide" (~3.8 MB: 15000 series of ~250
                        bytes), "drip" (the "wide" page chunked, then 3000 one-byte chunks
                        sent one by one), "file" (the bytes of TW_METRICS_FILE, read
                        at each request), "private" ("ok" on a socket only its owner may
                        use: mode 0700), "link" (serve nothing: a symbolic link to
                        TW_METRICS_LINK where the socket should be)
  TW_METRICS_ONLY=id    serve that mode only in this slot (others serve "ok")
  TW_EVENTS=path        append one JSON line per life event to path: {"event": "start"} first
                        thing, {"event": "exit", "code": N} when the worker ends by itself
                        (start-up failure, or 0 after draining on the stop signal); each with
                        "pid", "worker_id", "generation" and "t_ns" (CLOCK_MONOTONIC, ns)

Also reported: "uids"/"gids" (real, effective, saved) and "groups" (supplementary),
and HOME/USER/LOGNAME in "env".

GET /slow?ms=N delays the answer by N ms (drain tests).
SIGTERM/SIGINT: stop accepting, close (never shutdown) the listener, finish
in-flight requests (answering with Connection: close), close idle keep-alive
connections within ~100 ms, print "worker <id> drained", exit 0.
"""

import os

# --- Snapshot of inherited fds: must happen before we open anything. -------
# os.listdir opens a directory fd that shows up in its own listing; keep only
# the fds that are still open once the listing is done.
def _startup_fds():
    fds = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            os.fstat(fd)
        except OSError:
            continue
        fds.append(fd)
    return sorted(fds)


OPEN_FDS = _startup_fds()

import errno  # noqa: E402
import fcntl  # noqa: E402
import json  # noqa: E402
import select  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from urllib.parse import parse_qs, urlsplit  # noqa: E402

ENV = os.environ


def _int_env(name, default=0):
    try:
        return int(ENV.get(name, default))
    except ValueError:
        return default


LISTEN_FDS = ENV.get("LISTEN_FDS")
N_FDS = _int_env("LISTEN_FDS", 0)
FD_FLAGS = {}
for _fd in range(3, 3 + N_FDS):
    try:
        FD_FLAGS[str(_fd)] = bool(fcntl.fcntl(_fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)
    except OSError:
        FD_FLAGS[str(_fd)] = None  # not open at all

WORKER_ID = _int_env("HERDSMAN_WORKER_ID", -1)
GENERATION = _int_env("HERDSMAN_GENERATION", -1)


def log(msg):
    print(msg, flush=True)


def elog(msg):
    print(msg, file=sys.stderr, flush=True)


def event(kind, **fields):
    """One line of TW_EVENTS (appends of one short line are atomic)."""
    path = ENV.get("TW_EVENTS")
    if not path:
        return
    rec = {"event": kind, "pid": os.getpid(), "worker_id": WORKER_ID, "generation": GENERATION,
           "t_ns": time.monotonic_ns(), **fields}
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        os.write(fd, (json.dumps(rec) + "\n").encode())
    finally:
        os.close(fd)


event("start")

# --- Start-up failure knobs. -------------------------------------------------
if ENV.get("TW_FAIL_START") == "1":
    elog("worker failing at start")
    event("exit", code=3)
    sys.exit(3)
_break = ENV.get("TW_BREAK_FILE")
if _break and os.path.exists(_break):
    elog(f"broken build: {_break} exists")
    event("exit", code=3)
    sys.exit(3)

VERSION = None
if ENV.get("TW_VERSION_FILE"):
    try:
        with open(ENV["TW_VERSION_FILE"]) as f:
            VERSION = f.read().strip()
    except OSError as e:
        elog(f"cannot read TW_VERSION_FILE: {e}")

ENV_KEYS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM",
            "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES",
            "HERDSMAN_WORKER_ID", "HERDSMAN_GENERATION", "HERDSMAN_METRICS_SOCKET",
            "NODE_APP_INSTANCE", "NODE_CHANNEL_FD", "NODE_CHANNEL_SERIALIZATION_MODE",
            "HOME", "USER", "LOGNAME")

INFO = {
    "pid": os.getpid(),
    "worker_id": WORKER_ID,
    "generation": GENERATION,
    "listen_pid_ok": ENV.get("LISTEN_PID") == str(os.getpid()),
    "listen_fds": LISTEN_FDS,
    "listen_fdnames": ENV.get("LISTEN_FDNAMES"),
    "notify_socket": ENV.get("NOTIFY_SOCKET") or None,
    "open_fds": OPEN_FDS,
    "fd_flags": FD_FLAGS,
    "tag": ENV.get("TW_TAG"),
    "cwd": os.getcwd(),
    "version": VERSION,
    "env": {k: ENV[k] for k in ENV_KEYS if k in ENV},
    # Real, effective and saved ids (all must match after a --user drop) and the groups.
    "uids": list(os.getresuid()),
    "gids": list(os.getresgid()),
    "groups": sorted(os.getgroups()),
}


# --- Signals / drain state. --------------------------------------------------
draining = threading.Event()
warm = threading.Event()  # set at once unless TW_WARM_MS


def _on_stop(signum, frame):
    draining.set()


if ENV.get("TW_IGNORE_TERM") == "1":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
else:
    signal.signal(signal.SIGTERM, _on_stop)
    signal.signal(signal.SIGINT, _on_stop)

START = time.monotonic()

if ENV.get("TW_CHILD") == "1":
    CHILD = subprocess.Popen(["sleep", "1000"])  # same process group

if ENV.get("TW_DETACHED_CHILD") == "1":
    DETACHED = subprocess.Popen(["sleep", "1000"], start_new_session=True)

if ENV.get("TW_CHILD_ALLOC_MB"):
    # Like a pre-fork server's worker process: the memory is in the child, not in us.
    ALLOC_CHILD = subprocess.Popen([sys.executable, "-c", (
        "import os, sys, time\n"
        f"b = bytearray({_int_env('TW_CHILD_ALLOC_MB')} << 20)\n"
        "for i in range(0, len(b), 4096): b[i] = 1\n"
        f"print('child allocated {_int_env('TW_CHILD_ALLOC_MB')} MB (pid %d)' % os.getpid(), file=sys.stderr, flush=True)\n"
        "time.sleep(1000)\n")])

if ENV.get("TW_CRASH_AFTER_MS"):
    def _crash():
        elog("crashing now")
        os._exit(4)
    _t = threading.Timer(_int_env("TW_CRASH_AFTER_MS") / 1000.0, _crash)
    _t.daemon = True
    _t.start()


def notify(msg):
    path = ENV.get("NOTIFY_SOCKET")
    if not path:
        elog("TW_NOTIFY set but NOTIFY_SOCKET missing")
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            s.sendto(msg.encode(), path)
        finally:
            s.close()
    except OSError as e:
        elog(f"notify {msg!r} failed: {e}")


# --- HTTP. ---------------------------------------------------------------------
active = set()
active_lock = threading.Lock()
IDLE_LIMIT = 120.0  # seconds of keep-alive idleness before we hang up anyway
MAX_HEAD = 65536


def respond(conn, status, body, ctype, close):
    head = (f"HTTP/1.1 {status}\r\n"
            f"Content-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\n"
            f"Connection: {'close' if close else 'keep-alive'}\r\n\r\n")
    conn.sendall(head.encode("latin-1") + body)


def handle(conn):
    buf = b""
    idle_since = time.monotonic()
    served = 0  # a new connection always gets an answer to its first request
    conn.settimeout(0.1)
    while True:
        # Read until a complete request head is buffered.
        while b"\r\n\r\n" not in buf:
            if len(buf) > MAX_HEAD:
                return
            if not buf and served and draining.is_set():
                try:  # a request that already arrived is still answered
                    pending = conn.recv(65536, socket.MSG_DONTWAIT)
                except (BlockingIOError, InterruptedError, socket.timeout):
                    pending = None
                except OSError:
                    return
                if not pending:
                    return  # idle keep-alive connection while draining
                buf += pending
                continue
            if not buf and draining.is_set() and time.monotonic() - idle_since > 5.0:
                return  # a new connection that never sends a request
            if not buf and time.monotonic() - idle_since > IDLE_LIMIT:
                return
            try:
                chunk = conn.recv(65536)
            except socket.timeout:
                continue
            if not chunk:
                return
            buf += chunk
        head, buf = buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        try:
            method, target, version = lines[0].split(" ", 2)
        except ValueError:
            return
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        # Read and discard a Content-Length body.
        length = int(headers.get("content-length", "0") or 0)
        while len(buf) < length:
            try:
                chunk = conn.recv(65536)
            except socket.timeout:
                continue
            if not chunk:
                return
            buf += chunk
        buf = buf[length:]

        conn_hdr = headers.get("connection", "").lower()
        if version.upper() == "HTTP/1.0":
            close = "keep-alive" not in conn_hdr
        else:
            close = "close" in conn_hdr

        url = urlsplit(target)
        if url.path == "/slow":
            try:
                ms = int(parse_qs(url.query).get("ms", ["0"])[0])
            except ValueError:
                ms = 0
            time.sleep(ms / 1000.0)

        close = close or draining.is_set()
        if not warm.is_set():
            respond(conn, "503 Service Unavailable", b"warming up", "text/plain", close)
        else:
            body = json.dumps(INFO).encode()
            respond(conn, "200 OK", body, "application/json", close)
        served += 1
        if close:
            return
        idle_since = time.monotonic()


def conn_thread(conn):
    me = threading.current_thread()
    try:
        handle(conn)
    except Exception as e:  # never let one connection kill the worker
        if not isinstance(e, (BrokenPipeError, ConnectionResetError)):
            elog(f"connection error: {e!r}")
    finally:
        try:
            conn.close()
        except OSError:
            pass
        with active_lock:
            active.discard(me)


def spawn(conn):
    t = threading.Thread(target=conn_thread, args=(conn,), daemon=True)
    with active_lock:
        active.add(t)
    t.start()


def accept_one(sock, wait=None):
    """accept() tolerant of a shared O_NONBLOCK flag set by someone else."""
    while True:
        try:
            conn, _ = sock.accept()
            return conn
        except (BlockingIOError, InterruptedError):
            select.select([sock], [], [], 1.0 if wait is None else wait)
            if wait is not None:
                return None
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EINTR, errno.ECONNABORTED):
                continue
            raise


def extra_listener(sock):
    # Additional listening fds (4..) are served by plain daemon threads.
    while not draining.is_set():
        try:
            r, _, _ = select.select([sock], [], [], 0.1)
            if not r or draining.is_set():
                continue
            conn = accept_one(sock, wait=0.1)
            if conn is not None:
                spawn(conn)
        except Exception as e:
            if not draining.is_set():
                elog(f"accept error on fd {sock.fileno()}: {e!r}")
                time.sleep(0.1)


def _once(knob):
    """True for the one process that claims the once-file named by env `knob` (and, when
    TW_FAULT_WORKER is set, only in that slot)."""
    path = ENV.get(knob)
    if not path:
        return False
    if ENV.get("TW_FAULT_WORKER") not in (None, ENV.get("HERDSMAN_WORKER_ID")):
        return False
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


if _int_env("TW_BURST_LINES", 0) > 0:
    _n = _int_env("TW_BURST_LINES", 0)
    sys.stdout.write("".join(f"burst {i}/{_n}\n" for i in range(1, _n + 1)))
    sys.stdout.flush()

hung = threading.Event()
HANG = _once("TW_HANG_ONCE_FILE")
if _once("TW_ALLOC_ONCE_FILE"):
    BALLAST = bytearray(_int_env("TW_ALLOC_MB", 64) << 20)
    for _i in range(0, len(BALLAST), 4096):  # touch every page so it counts in RSS
        BALLAST[_i] = 1
    elog(f"allocated {len(BALLAST) >> 20} MB")


def metrics_page():
    extra = _int_env("TW_METRICS_SAMPLES", 0)
    lines = [
        "# HELP tw_requests_total Requests served.",
        "# TYPE tw_requests_total counter",
        'tw_requests_total{path="/"} 7',
        "# HELP tw_worker_pid The worker's pid.",
        "# TYPE tw_worker_pid gauge",
        f"tw_worker_pid {os.getpid()}",
        "# HELP tw_latency_seconds Latency.",
        "# TYPE tw_latency_seconds histogram",
        'tw_latency_seconds_bucket{le="0.1"} 3',
        'tw_latency_seconds_bucket{le="+Inf"} 4',
        "tw_latency_seconds_sum 0.5",
        "tw_latency_seconds_count 4",
    ]
    if extra:
        lines += ["# HELP tw_extra Extra samples.", "# TYPE tw_extra gauge"]
        lines += [f'tw_extra{{i="{i}"}} {i}' for i in range(extra)]
    return ("\n".join(lines) + "\n").encode()


_BIG = {}


def big_page(mode):
    if mode not in _BIG:
        if mode == "tiny":
            head = b"# TYPE tw_tiny counter\n"
            _BIG[mode] = head + b"tw_tiny 1\n" * (((4 << 20) - len(head)) // 10)
        else:
            pad = "x" * 200
            lines = ["# HELP tw_wide Wide samples.", "# TYPE tw_wide gauge"]
            lines += [f'tw_wide{{i="{i}",pad="{pad}"}} {i}' for i in range(15000)]
            _BIG[mode] = ("\n".join(lines) + "\n").encode()
    return _BIG[mode]


def drip(conn):
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    body = big_page("wide")
    conn.sendall(head + f"{len(body):x}\r\n".encode() + body + b"\r\n")
    for _ in range(3000):
        conn.sendall(b"1\r\n\n\r\n")
        time.sleep(0.0005)
    conn.sendall(b"0\r\n\r\n")
    conn.close()


def metrics_listen(mode):
    """The metrics socket, bound and listening (None: nothing to serve). Called before the
    worker says READY=1, so a scrape after READY=1 always finds it."""
    path = ENV.get("HERDSMAN_METRICS_SOCKET")
    if not path:
        elog("TW_METRICS set but HERDSMAN_METRICS_SOCKET missing")
        return None
    if mode == "link":
        os.symlink(ENV["TW_METRICS_LINK"], path)
        return None
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    srv.bind(path)
    if mode == "private":
        os.chmod(path, 0o700)
    srv.listen(64)
    return srv


def metrics_server(mode, srv):
    while True:
        conn, _ = srv.accept()
        if mode == "hang":
            HELD.append(conn)
            continue
        try:
            conn.settimeout(5)
            req = b""
            while b"\r\n\r\n" not in req:
                got = conn.recv(4096)
                if not got:
                    break
                req += got
            if mode == "drip":
                drip(conn)
                continue
            if mode == "file":
                with open(ENV["TW_METRICS_FILE"], "rb") as f:
                    body = f.read()
            elif mode in ("ok", "private"):
                body = metrics_page()
            elif mode in ("tiny", "wide"):
                body = big_page(mode)
            else:
                body = b"<html>not metrics</html>\n"
            head = f"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            conn.sendall(head.encode() + body)
        except OSError:
            pass
        finally:
            conn.close()


HELD = []
if ENV.get("TW_METRICS"):
    _mode = ENV["TW_METRICS"]
    if ENV.get("TW_METRICS_ONLY") not in (None, str(WORKER_ID)):
        _mode = "ok"
    _srv = metrics_listen(_mode)
    if _srv is not None:
        threading.Thread(target=metrics_server, args=(_mode, _srv), daemon=True).start()


def watchdog_pinger():
    every = _int_env("WATCHDOG_USEC", 0) / 2e6
    while every > 0 and not hung.is_set():
        notify("WATCHDOG=1")
        time.sleep(every)


def main():
    if N_FDS < 1:
        elog("LISTEN_FDS missing: no listening socket at fd 3")
        return 2
    sock = socket.socket(fileno=3)
    # Like most servers sharing a socket (gunicorn, Node), the worker makes the listener
    # non-blocking so a lost accept race never blocks it; the supervisor never does this.
    # The stop signal only sets a flag and wakes select() through the wakeup pipe: raising
    # from the handler could drop a connection accept() had just taken off the queue.
    naive = ENV.get("TW_NAIVE_ACCEPT") == "1"
    sock.setblocking(naive)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    extras = []
    for fd in range(4, 3 + N_FDS):
        try:
            extras.append(socket.socket(fileno=fd))
        except OSError as e:
            elog(f"fd {fd} is not a socket: {e}")

    delay = _int_env("TW_READY_DELAY_MS", 0)
    if delay > 0:
        draining.wait(delay / 1000.0)
    warm_ms = _int_env("TW_WARM_MS", 0)
    if warm_ms > 0:
        def _warmed():
            warm.set()
            if ENV.get("TW_NOTIFY") == "1":
                notify("READY=1")
        threading.Timer(warm_ms / 1000.0, _warmed).start()
    else:
        warm.set()
    gate = ENV.get("TW_READY_GATE")
    while gate and not draining.is_set() and not os.path.exists(f"{gate}{WORKER_ID}"):
        draining.wait(0.02)
    late_crash = ENV.get("TW_LATE_CRASH_FILE")
    if late_crash and os.path.exists(late_crash):
        # Like gunicorn's arbiter when its worker cannot import the app: READY=1 is sent,
        # nothing is ever accepted, and the process exits soon after.
        if ENV.get("TW_NOTIFY") == "1":
            notify("READY=1")
        draining.wait(_int_env("TW_LATE_CRASH_MS", 300) / 1000.0)
        elog("crashing after ready")
        os._exit(4)
    late_hang = ENV.get("TW_LATE_HANG_FILE")
    if late_hang and os.path.exists(late_hang):
        threading.Timer(0.3, hung.set).start()
    crash_file = ENV.get("TW_CRASH_FILE")
    if crash_file:
        def _watch_crash_file():
            while not os.path.exists(f"{crash_file}{WORKER_ID}"):
                time.sleep(0.02)
            elog("crash file found")
            os._exit(4)
        threading.Thread(target=_watch_crash_file, daemon=True).start()
    if not draining.is_set():
        for s in extras:
            threading.Thread(target=extra_listener, args=(s,), daemon=True).start()
        log(f"worker {WORKER_ID} gen {GENERATION} pid {os.getpid()} listening")
        if ENV.get("TW_NOTIFY") == "1":
            if ENV.get("TW_NOTIFY_STATUS"):
                notify("STATUS=" + ENV["TW_NOTIFY_STATUS"])
            if ENV.get("TW_NEVER_READY") != "1" and warm_ms <= 0:
                notify("READY=1")

    if ENV.get("TW_WATCHDOG") == "1":
        threading.Thread(target=watchdog_pinger, daemon=True).start()
    if HANG:
        threading.Timer(_int_env("TW_HANG_AFTER_MS", 500) / 1000.0, hung.set).start()
    while not draining.is_set():
        if hung.is_set():
            elog("hanging now: no more accepts, no more watchdog pings")
            while True:
                time.sleep(3600)
        try:
            r, _, _ = select.select([sock, wake_r], [], [], 0.2)
        except InterruptedError:
            continue
        if wake_r in r:
            try:
                os.read(wake_r, 512)
            except BlockingIOError:
                pass
        if draining.is_set() or sock not in r:
            continue
        try:
            conn, _ = sock.accept()  # with TW_NAIVE_ACCEPT: blocks if another worker won
        except (BlockingIOError, InterruptedError):
            continue
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.ECONNABORTED):
                continue
            raise
        conn.setblocking(True)
        try:
            spawn(conn)
        except Exception as e:
            elog(f"cannot start connection thread: {e!r}")
            conn.close()

    # Drain: close (never shutdown) the shared listeners, finish connections.
    draining.set()
    sock.close()
    for s in extras:
        s.close()
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        with active_lock:
            pending = list(active)
        if not pending:
            break
        pending[0].join(max(0.0, min(0.1, deadline - time.monotonic())))
    log(f"worker {WORKER_ID} drained")
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    event("exit", code=code)
    os._exit(code)  # don't wait for stray daemon threads
