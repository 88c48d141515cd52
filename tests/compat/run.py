#!/usr/bin/env python3
"""herdsman against real servers: the recipes of docs/servers.md, exercised.

For each server: start it under herdsman with 3 workers on a loopback TCP port (port 0,
read back from `status --json`), check its recipe's readiness mode (every worker herdsman
calls ready has loaded the app), roll it 3 times under new-connection load (tests/e2e/load.py)
with 0 failed requests, then stop it with SIGTERM: exit 0, no worker SIGKILLed or cut off by
its stop signal, no process left in herdsman's session. One result line per server, then
`N passed, N failed, N skipped`.

The `-bind` servers are the same apps binding their own port, unchanged (bind interception):
herdsman gets `--listen 127.0.0.1:PORT` with a free port the app is also told (or no `--listen`
at all: `node-bind-learned`), and each of the 3 worker slots must answer before the load.
The seed's handler-less Node app loses the requests in flight when a worker dies of SIGTERM:
its failed count is reported, not failed on.

    tests/compat/run.py [--herdsman target/debug/herdsman] [--jobs 2] [--require-all] [NAME...]

Builds (npm install, go build, cargo build of the axum app) are cached under target/compat/.
A server whose runtime is missing is a SKIP with the reason; --require-all (CI) makes it a
failure, so a missing install step cannot pass silently.
"""

import argparse
import concurrent.futures
import ctypes
import http.client
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SERVERS_DIR = os.path.join(REPO, "tests", "compat", "servers")
CACHE = os.path.join(REPO, "target", "compat")
LOAD = os.path.join(REPO, "tests", "e2e", "load.py")
LAUNCHER = os.path.join(REPO, "examples", "uvicorn_fd3.py")
EXPRESS = "express@5.1.0"
WORKERS = 3
RELOADS = 3


class Skip(Exception):
    pass


class Fail(Exception):
    pass


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def need_python(*modules):
    r = run([sys.executable, "-c", "import " + ", ".join(modules)])
    if r.returncode != 0:
        raise Skip(f"python modules {', '.join(modules)} missing (pip install {' '.join(modules)})")


def need_program(name, hint):
    if shutil.which(name) is None:
        raise Skip(f"{name} not found ({hint})")


# --- preparing (cached builds) ---------------------------------------------------------------

def prepare_express():
    need_program("node", "apt install nodejs")
    need_program("npm", "apt install npm")
    prefix = os.path.join(CACHE, "node")
    if not os.path.exists(os.path.join(prefix, "node_modules", "express", "package.json")):
        r = run(["npm", "install", "--prefix", prefix, "--no-audit", "--no-fund", "--loglevel=error",
                 "--cache", os.path.join(CACHE, "npm-cache"), EXPRESS])
        if r.returncode != 0:
            raise Skip(f"npm install {EXPRESS} failed: {r.stderr.strip()[-300:]}")
    return {"NODE_PATH": os.path.join(prefix, "node_modules")}


def prepare_go():
    need_program("go", "apt install golang-go")
    out = os.path.join(CACHE, "bin", "go-http")
    env = dict(os.environ, GOCACHE=os.path.join(CACHE, "go-cache"), GOPATH=os.path.join(CACHE, "gopath"),
               GOTOOLCHAIN="local", GOFLAGS="")
    r = run(["go", "build", "-o", out, "main.go"], cwd=os.path.join(SERVERS_DIR, "go"), env=env)
    if r.returncode != 0:
        raise Fail(f"go build failed: {r.stderr.strip()[-500:]}")
    return {"_cmd": [out]}


def prepare_go_bind():
    """The bind-it-yourself Go app, statically linked (CGO_ENABLED=0): no LD_PRELOAD reaches it."""
    need_program("go", "apt install golang-go")
    out = os.path.join(CACHE, "bin", "go-bind")
    env = dict(os.environ, GOCACHE=os.path.join(CACHE, "go-cache"), GOPATH=os.path.join(CACHE, "gopath"),
               GOTOOLCHAIN="local", GOFLAGS="", CGO_ENABLED="0")
    r = run(["go", "build", "-o", out, "main.go"], cwd=os.path.join(SERVERS_DIR, "go-bind"), env=env)
    if r.returncode != 0:
        raise Fail(f"go build failed: {r.stderr.strip()[-500:]}")
    return {"_cmd": [out, "{port}"]}


def prepare_axum():
    need_program("cargo", "rustup")
    target = os.path.join(CACHE, "rust")
    r = run(["cargo", "build", "--locked", "-q", "--manifest-path",
             os.path.join(SERVERS_DIR, "rust-axum", "Cargo.toml")],
            env=dict(os.environ, CARGO_TARGET_DIR=target))
    if r.returncode != 0:
        raise Fail(f"cargo build of the axum app failed: {r.stderr.strip()[-500:]}")
    return {"_cmd": [os.path.join(target, "debug", "compat-axum")]}


def prepare_node():
    need_program("node", "apt install nodejs")
    return {}


def prepare_puma():
    need_program("puma", "apt install puma ruby-sd-notify")
    if run(["ruby", "-e", "require 'sd_notify'"]).returncode != 0:
        raise Skip("ruby gem sd_notify missing (apt install ruby-sd-notify)")
    return {}


SERVERS = [
    # name, prepare, command (run in tests/compat/servers), readiness, stop signal, extra check
    dict(name="gunicorn", prepare=lambda: need_python("gunicorn", "flask") or {},
         cmd=[sys.executable, "-m", "gunicorn", "--no-control-socket", "--preload", "--workers", "2",
              "--graceful-timeout", "20", "flask_app:app"],
         ready="notify", stop="SIGTERM"),
    dict(name="uvicorn", prepare=lambda: need_python("uvicorn") or {},
         cmd=[sys.executable, LAUNCHER, "asgi_app:app"], ready="notify", stop="SIGTERM", nodelay=True),
    dict(name="fastapi", prepare=lambda: need_python("uvicorn", "fastapi") or {},
         cmd=[sys.executable, LAUNCHER, "fastapi_app:app"], ready="notify", stop="SIGTERM", nodelay=True),
    dict(name="node-http", prepare=prepare_node, cmd=["node", "node_http.js"], ready="notify", stop="SIGTERM"),
    dict(name="express", prepare=prepare_express, cmd=["node", "express_app.js"], ready="notify", stop="SIGTERM"),
    dict(name="go", prepare=prepare_go, cmd=None, ready="notify", stop="SIGTERM"),
    dict(name="puma", prepare=prepare_puma,
         cmd=["puma", "-C", "puma/puma.rb", "puma/config.ru"], ready="notify", stop="SIGTERM"),
    dict(name="axum", prepare=prepare_axum, cmd=None, ready="notify", stop="SIGTERM", nodelay=True),
    # Bind-it-yourself variants (docs/servers.md, "Apps that bind their own port"): the app binds
    # a concrete port itself ({port}, also in $PORT); herdsman listens on the same address and
    # its seccomp filter hands every worker herdsman's socket in place of its own (--bind-intercept
    # auto, the default). `learned`: no --listen at all, herdsman learns the address from the
    # first worker's bind. `handlerless`: the app has no stop-signal handler (the seed's app as
    # written): in-flight requests die with the worker on each reload, so its failed requests are
    # reported as a known limit, not failed on. `unset`: environment variables removed before the
    # server starts (`env -u`), so that gunicorn and Puma bind the -b address themselves instead
    # of adopting fd 3 from LISTEN_FDS. Readiness `listen`, not the default `auto`: `auto` calls a
    # worker that has not bound within 1 s ready by the clock (`alive:1s`), so a slow start on a
    # loaded machine (gunicorn --preload importing Flask) is called ready before the app loaded
    # (measured: the check_loaded failure); `listen` waits for the bind whatever the load.
    dict(name="node-bind", prepare=prepare_node, cmd=["node", "node_bind.js"], ready="listen", stop="SIGTERM",
         bind=True, handlerless=True),
    dict(name="node-bind-learned", prepare=prepare_node, cmd=["node", "node_bind.js"], ready="listen",
         stop="SIGTERM", bind=True, learned=True, handlerless=True),
    dict(name="express-bind", prepare=prepare_express, cmd=["node", "express_bind.js"], ready="notify",
         stop="message", bind=True),
    dict(name="python-bind", prepare=lambda: {}, cmd=[sys.executable, "python_bind.py", "{port}"],
         ready="listen", stop="SIGTERM", bind=True),
    dict(name="go-bind", prepare=prepare_go_bind, cmd=None, ready="listen", stop="SIGTERM", bind=True),
    dict(name="gunicorn-bind", prepare=lambda: need_python("gunicorn", "flask") or {},
         cmd=[sys.executable, "-m", "gunicorn", "--no-control-socket", "--preload", "--workers", "2",
              "--graceful-timeout", "20", "-b", "127.0.0.1:{port}", "flask_app:app"],
         ready="listen", stop="SIGTERM", bind=True, unset=["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"]),
    dict(name="puma-bind", prepare=prepare_puma,
         cmd=["puma", "-C", "puma/puma_bind.rb", "-b", "tcp://127.0.0.1:{port}", "puma/config.ru"],
         ready="listen", stop="SIGTERM", bind=True, unset=["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"]),
]


# --- one server --------------------------------------------------------------------------------

def wait_for(timeout, what, cond, proc=None, log=None):
    end = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if proc is not None and proc.poll() is not None:
            raise Fail(f"herdsman exited ({proc.returncode}) while waiting for {what}{tail(log)}")
        if time.monotonic() > end:
            raise Fail(f"timed out after {timeout}s waiting for {what}{tail(log)}")
        time.sleep(0.05)


def tail(log, n=6):
    if not log:
        return ""
    try:
        with open(log, errors="replace") as f:
            lines = f.read().splitlines()[-n:]
    except OSError:
        return ""
    return "\n    | " + "\n    | ".join(lines)


def pgid(pid):
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def session_processes(sid):
    """Live (non-zombie) processes of session `sid`: herdsman, its workers and their children."""
    out = []
    for e in os.listdir("/proc"):
        if not e.isdigit():
            continue
        try:
            with open(f"/proc/{e}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if rest[0] != "Z" and int(rest[3]) == sid:
            out.append(int(e))
    return out


class Run:
    def __init__(self, herdsman, spec, env, work):
        self.herdsman, self.spec, self.work = herdsman, spec, work
        self.control = os.path.join(work, "control.sock")
        self.marks = os.path.join(work, "marks")
        self.log = os.path.join(work, "herdsman.log")
        os.makedirs(self.marks)
        cmd = env.pop("_cmd", None) or spec["cmd"]
        listen = ["--listen", "127.0.0.1:0"]
        if spec.get("bind"):
            # The app binds a concrete port itself: herdsman must serve that same address.
            self.port = free_port()
            cmd = [a.replace("{port}", str(self.port)) for a in cmd]
            env["PORT"] = str(self.port)
            listen = [] if spec.get("learned") else ["--listen", f"127.0.0.1:{self.port}"]
            if spec.get("unset"):
                cmd = ["env"] + [f"-u{k}" for k in spec["unset"]] + cmd
        args = [herdsman, "run", "-n", spec["name"], "-w", str(WORKERS), *listen,
                "--control", self.control, "--ready", spec["ready"], "--ready-timeout", "60s",
                "--stop-signal", spec["stop"], "--stop-timeout", "30s", "--cwd", SERVERS_DIR,
                "-e", f"COMPAT_MARK_DIR={self.marks}"]
        for k, v in env.items():
            args += ["-e", f"{k}={v}"]
        self.args = args + ["--"] + cmd
        self.proc = None

    def status(self):
        r = run([self.herdsman, "status", self.control, "--json"])
        return json.loads(r.stdout) if r.returncode == 0 else None

    def all_ready(self, generation):
        s = self.status()
        workers = (s or {}).get("workers", [])
        ok = (s and s["ready"] == WORKERS and len(workers) == WORKERS
              and all(w["state"] == "ready" and w["generation"] == generation for w in workers))
        return s if ok else None

    def check_loaded(self, status):
        """Every worker herdsman calls ready had loaded the app first (readiness is truthful)."""
        missing = [w["id"] for w in status["workers"]
                   if not os.path.exists(os.path.join(self.marks, f"loaded-{w['generation']}-{w['id']}"))]
        if missing:
            raise Fail(f"workers {missing} were ready before the app was loaded ({self.spec['ready']})")

    def check_every_worker_answers(self, addr):
        """N workers serve: each worker slot answers (distinct pids) within a deadline, on new
        connections to the one shared address."""
        host, port = addr.rsplit(":", 1)
        seen = {}
        end = time.monotonic() + 30
        while len(seen) < WORKERS:
            if time.monotonic() > end:
                raise Fail(f"only workers {sorted(seen)} answered on {addr} within 30 s, not all {WORKERS}")
            conn = http.client.HTTPConnection(host, int(port), timeout=10)
            try:
                conn.request("GET", "/", headers={"Connection": "close"})
                info = json.loads(conn.getresponse().read())
            finally:
                conn.close()
            seen.setdefault(info["worker_id"], set()).add(info["pid"])
        pids = set().union(*seen.values())
        if len(pids) < WORKERS:
            raise Fail(f"{WORKERS} worker slots answered from only {len(pids)} pids: {seen}")
        if sorted(seen) != list(range(WORKERS)):
            raise Fail(f"answers named worker ids {sorted(seen)}, not 0..{WORKERS - 1}")

    def __call__(self):
        env_log = open(self.log, "w")
        self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=env_log, stderr=env_log,
                                     start_new_session=True, env=clean_env())
        sid = self.proc.pid
        load = None
        try:
            started = time.monotonic()
            st = wait_for(60, "3 ready workers", lambda: self.all_ready(1), self.proc, self.log)
            ready_s = time.monotonic() - started
            self.check_loaded(st)
            if self.spec.get("learned"):
                learned = st.get("learned_sockets") or []
                if len(learned) != 1 or learned != st["sockets"]:
                    raise Fail(f"learned_sockets {learned} is not the one address the workers bind "
                               f"(sockets {st['sockets']})")
            port = int(st["sockets"][0].rsplit(":", 1)[1])
            if self.spec.get("bind") and port != self.port:
                raise Fail(f"herdsman serves port {port}, the app binds {self.port}")
            addr = f"127.0.0.1:{port}"
            if self.spec.get("bind"):
                self.check_every_worker_answers(addr)

            stop_file = os.path.join(self.work, "load-stop")
            first = os.path.join(self.work, "load-first")
            load = subprocess.Popen([sys.executable, LOAD, "--addr", addr, "--mode", "new", "--threads", "2",
                                     "--duration", "180", "--timeout", "20", "--stop-file", stop_file,
                                     "--ready-file", first], stdout=subprocess.PIPE, text=True)
            # Keep-alive clients too, for the record: a request that fails on a reused connection
            # the server closed while draining is retried once by load.py and counted in
            # retried_stale: what a client that does not retry would have seen fail.
            ka = subprocess.Popen([sys.executable, LOAD, "--addr", addr, "--mode", "keepalive", "--threads", "2",
                                   "--duration", "180", "--timeout", "20", "--stop-file", stop_file],
                                  stdout=subprocess.PIPE, text=True)
            self.ka = ka
            wait_for(30, "the first answer to the load", lambda: os.path.exists(first), self.proc, self.log)
            reload_s = []
            for g in range(2, RELOADS + 2):
                t = time.monotonic()
                r = run([self.herdsman, "reload", self.control])
                reload_s.append(time.monotonic() - t)
                if r.returncode != 0:
                    raise Fail(f"reload to generation {g} failed: {(r.stdout + r.stderr).strip()}{tail(self.log)}")
                st = wait_for(30, f"generation {g} ready", lambda g=g: self.all_ready(g), self.proc, self.log)
                self.check_loaded(st)
            open(stop_file, "w").close()
            out, _ = load.communicate(timeout=60)
            rep = json.loads(out)
            load = None
            ka_rep = json.loads(ka.communicate(timeout=60)[0])
            total = rep["ok"] + rep["failed"]
            handlerless = self.spec.get("handlerless")
            if (rep["failed"] and not handlerless) or rep["hung_threads"] or rep["ok"] == 0:
                raise Fail(f"{rep['failed']}/{total} requests failed across {RELOADS} reloads: {rep['errors']}")
            served = sorted(int(g) for g in rep["generations"])
            if served != list(range(1, RELOADS + 2)):
                raise Fail(f"answers came from generations {served}, not 1..{RELOADS + 1}")

            # Every process of every worker's group may hold the connection (pre-fork servers).
            # Retried: the connection can be closed, or its worker replaced, between the request
            # and the /proc scan (a keep-alive close while a drained worker exits).
            nodelay = None
            for _ in range(20):
                groups = {w["pid"] for w in st["workers"]}
                nodelay = server_nodelay(addr, [p for p in session_processes(sid) if pgid(p) in groups])
                if nodelay is not None:
                    break
                st = self.status() or st
                time.sleep(0.1)
            if self.spec.get("nodelay") and nodelay is not True:
                raise Fail(f"TCP_NODELAY is {nodelay} on the server's end of a connection: keep-alive "
                           "responses wait for the client's delayed ACK")
            extra = f", TCP_NODELAY {'?' if nodelay is None else 'on' if nodelay else 'off'}"

            t = time.monotonic()
            self.proc.send_signal(signal.SIGTERM)
            try:
                rc = self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                raise Fail("herdsman did not stop within 60 s of SIGTERM")
            stop_s = time.monotonic() - t
            if rc != 0:
                raise Fail(f"herdsman exited {rc} after SIGTERM{tail(self.log)}")
            try:
                wait_for(10, "no process left in herdsman's session", lambda: not session_processes(sid))
            except Fail:
                raise Fail(f"processes left after the stop: {session_processes(sid)}")
            with open(self.log, errors="replace") as f:
                text = f.read()
            for bad, why in (("did not stop within", "a worker had to be SIGKILLed"),
                             ("the stop signal it was sent", "a worker was killed by its stop signal")):
                if bad in text and not (handlerless and bad == "the stop signal it was sent"):
                    raise Fail(f"{why}: " + next(line for line in text.splitlines() if bad in line))
            ka_total = ka_rep["ok"] + ka_rep["failed"]
            if handlerless:
                extra += (f"; no stop-signal handler (known limit): {rep['failed']} failed "
                          f"{dict(rep['errors'])}")
            return (f"failed {rep['failed']}/{total} requests across {RELOADS} reloads "
                    f"(reloads {' '.join(f'{s:.1f}s' for s in reload_s)}), ready {ready_s:.1f}s, "
                    f"stop {stop_s:.2f}s{extra}; keep-alive: {ka_rep['retried_stale']} stale-connection "
                    f"retries, {ka_rep['failed']}/{ka_total} failed")
        finally:
            for p in (load, getattr(self, "ka", None)):
                if p is not None and p.poll() is None:
                    p.kill()
                    p.wait()
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            for pid in session_processes(sid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            env_log.close()


def server_nodelay(addr, pids):
    """Whether the server's end of a connection to `addr` has TCP_NODELAY, read from the worker
    holding it: its fd is found through /proc/net/tcp and /proc/PID/fd and duplicated with
    pidfd_getfd (root, or ptrace access). None when that is not possible here."""
    host, port = addr.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", "/")  # keep-alive: the connection stays open (unless the server closes it)
        local = conn.sock.getsockname()[1]
        resp = conn.getresponse()
        resp.read()

        def hexaddr(p):
            return "%08X:%04X" % (struct.unpack("<I", socket.inet_aton(host))[0], p)

        inode = None
        with open("/proc/net/tcp") as f:
            for line in f.readlines()[1:]:
                fld = line.split()
                if fld[1] == hexaddr(int(port)) and fld[2] == hexaddr(local):
                    inode = fld[9]
        if inode is None:
            return None
        libc = ctypes.CDLL(None, use_errno=True)
        for pid in pids:
            try:
                fds = os.listdir(f"/proc/{pid}/fd")
            except OSError:
                continue
            for fd in fds:
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}") != f"socket:[{inode}]":
                        continue
                except OSError:
                    continue
                pidfd = os.pidfd_open(pid)
                try:
                    dup = libc.syscall(438, pidfd, int(fd), 0)  # SYS_pidfd_getfd
                finally:
                    os.close(pidfd)
                if dup < 0:
                    return None
                # Our duplicate only: closing it leaves the server's connection alone.
                with socket.socket(fileno=dup) as sk:
                    return bool(sk.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        return None
    finally:
        conn.close()


def free_port():
    """A loopback TCP port free at this moment (bound to port 0, read back, closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env():
    env = dict(os.environ)
    for k in ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "WATCHDOG_USEC", "WATCHDOG_PID"):
        env.pop(k, None)
    return env


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--herdsman", default=os.path.join(REPO, "target", "debug", "herdsman"))
    p.add_argument("--jobs", type=int, default=2, help="servers tested at the same time")
    p.add_argument("--require-all", action="store_true", help="a skipped server fails the suite (CI)")
    p.add_argument("names", nargs="*", help="only these servers")
    args = p.parse_args()
    herdsman = os.path.abspath(args.herdsman)
    if not os.access(herdsman, os.X_OK):
        sys.exit(f"error: {herdsman} is not an executable: run `cargo build` first or pass --herdsman")
    specs = [s for s in SERVERS if not args.names or s["name"] in args.names]
    unknown = set(args.names) - {s["name"] for s in SERVERS}
    if unknown:
        sys.exit(f"error: unknown server(s) {sorted(unknown)}; known: {[s['name'] for s in SERVERS]}")
    os.makedirs(CACHE, exist_ok=True)
    t0 = time.monotonic()
    lock = threading.Lock()
    results = {}

    # Builds start all at once (they mostly wait on the network or on one compiler each); each
    # server's test waits for its own.
    builds = concurrent.futures.ThreadPoolExecutor(len(specs))
    prepared = {s["name"]: builds.submit(s["prepare"]) for s in specs}

    def one(spec):
        name = spec["name"]
        t = time.monotonic()
        try:
            env = dict(prepared[name].result() or {})
            with tempfile.TemporaryDirectory(prefix=f"herdsman-compat-{name}-") as work:
                line = Run(herdsman, spec, env, work)()
            verdict = "PASS"
        except Skip as e:
            verdict, line = ("FAIL" if args.require_all else "SKIP"), str(e)
        except Fail as e:
            verdict, line = "FAIL", str(e)
        except Exception as e:  # noqa: BLE001 - a broken harness is a failure, not a crash
            verdict, line = "FAIL", f"{type(e).__name__}: {e}"
        with lock:
            results[name] = verdict
            print(f"{verdict} {name:<10} ready={spec['ready']} stop={spec['stop']}: {line} "
                  f"[{time.monotonic() - t:.0f}s]", flush=True)

    with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
        list(pool.map(one, specs))
    builds.shutdown()
    n = {v: list(results.values()).count(v) for v in ("PASS", "FAIL", "SKIP")}
    print(f"compat suite: {time.monotonic() - t0:.0f}s wall")
    print(f"{n['PASS']} passed, {n['FAIL']} failed, {n['SKIP']} skipped")
    return 1 if n["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
