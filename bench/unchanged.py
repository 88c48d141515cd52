"""Issue 23 benchmarks: unchanged apps (bind interception). Started by bench/unchanged.sh
(which builds herdsman and checks for wrk and PM2); see that script's header.

    python3 bench/unchanged.py BIN PM2 [--no-write]

Prints each section's table as it is measured, then (unless --no-write) writes the whole
section to docs/bench-unchanged.md and replaces it in docs/benchmarks.md. Works in a scratch
directory with a private PM2_HOME; on the way out (normal end, error, Ctrl-C or SIGTERM) stops
every supervisor and wrk it started, by pid, kills its PM2 daemon and removes the directory.
"""

import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

import shutil
import tempfile

BIN, PM2 = sys.argv[1:3]
WRITE = "--no-write" not in sys.argv[3:]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TMP = tempfile.mkdtemp(prefix="herdsman-bench-unchanged.")
ROUNDS = int(os.environ.get("UNCHANGED_ROUNDS", "8"))  # data-path rounds per mode
DP_WORKERS = int(os.environ.get("UNCHANGED_DP_WORKERS", "1"))  # workers per data-path contender
SLICE = int(os.environ.get("UNCHANGED_SLICE", "2"))  # seconds per wrk slice
SPAWNS = int(os.environ.get("UNCHANGED_SPAWNS", "10"))  # start-ups per arm
FAIL_ROUNDS = int(os.environ.get("UNCHANGED_FAIL_ROUNDS", "3"))  # runs of 3 reloads per contender
WALL_RELOADS = int(os.environ.get("UNCHANGED_WALL_RELOADS", "2"))  # reloads per size and contender
PM2_ENV = dict(os.environ, PM2_HOME=os.path.join(TMP, "pm2-home"))

# The seed's app, verbatim but for the port (an environment variable here, 8000 in the issue):
# binds its own port, no SIGTERM handler.
OWN = os.path.join(TMP, "own.js")
# The same server on herdsman's inherited socket (the code change interception saves).
FD3 = os.path.join(TMP, "fd3.js")
# fd 3, and process.send('ready') once listening (herdsman --ready notify over the IPC channel).
FD3_READY = os.path.join(TMP, "fd3-ready.js")
with open(OWN, "w") as f:
    f.write("require('http').createServer((q,s)=>s.end('ok')).listen(+process.env.PORT)\n")
with open(FD3, "w") as f:
    f.write("require('http').createServer((q,s)=>s.end('ok')).listen({fd:3})\n")
with open(FD3_READY, "w") as f:
    f.write("require('http').createServer((q,s)=>s.end('ok')).listen({fd:3},()=>process.send('ready'))\n")

md = []  # the markdown section, built as we go


def out(line=""):
    print(line, flush=True)
    md.append(line)


def log(msg):
    print(f"[unchanged {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def loadavg():
    with open("/proc/loadavg") as f:
        return ", ".join(f.read().split()[:3])


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def med(xs):
    return statistics.median(xs)


def spread(xs, fmt="{:.3f}"):
    """median (min–max)"""
    m = fmt.format(med(xs))
    if len(xs) > 1 and min(xs) != max(xs):
        return f"{m} ({fmt.format(min(xs))}–{fmt.format(max(xs))})"
    return m


def ratio_s(xs):
    """a ratio: median× (min–max)"""
    if len(xs) > 1 and min(xs) != max(xs):
        return f"{med(xs):.3f}× ({min(xs):.3f}–{max(xs):.3f})"
    return f"{med(xs):.3f}×"


def cpu_ns(pids):
    """On-CPU time of these processes' threads so far (schedstat, ns)."""
    total = 0
    for pid in pids:
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                with open(f"/proc/{pid}/task/{t}/schedstat") as f:
                    total += int(f.read().split()[0])
            except OSError:
                pass
    return total


def get_ok(port, timeout=1.0):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def wait(cond, timeout, what, step=0.02):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = cond()
        if v:
            return v
        time.sleep(step)
    raise SystemExit(f"timed out waiting for {what}")


running = []  # Herdsman instances still up
loaders = []  # wrk processes in the background


class Herdsman:
    def __init__(self, name, app, port, n, *opts, listen=True):
        self.name, self.port, self.n = name, port, n
        self.ctl = os.path.join(TMP, f"{name}.ctl")
        self.logf = open(os.path.join(TMP, f"{name}.log"), "ab")
        args = [BIN, "run", "--name", name, "-w", str(n), "--control", self.ctl, "-e", f"PORT={port}"]
        if listen:
            args += ["--listen", f"127.0.0.1:{port}"]
        args += list(opts) + ["--", "node", app]
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=self.logf, stderr=self.logf)
        running.append(self)

    def status(self):
        r = subprocess.run([BIN, "status", self.ctl, "--json"], capture_output=True)
        if r.returncode != 0:
            return None
        return json.loads(r.stdout)

    def all_ready(self):
        if self.proc.poll() is not None:
            with open(os.path.join(TMP, f"{self.name}.log"), errors="replace") as f:
                tail = "".join(f.readlines()[-20:])
            raise SystemExit(f"herdsman {self.name} exited ({self.proc.returncode}); its log ends:\n{tail}")
        s = self.status()
        return s is not None and s["ready"] == self.n and s["status"] != "reloading"

    def wait_ready(self, timeout=60):
        """Seconds from start until status shows every worker ready."""
        wait(self.all_ready, timeout, f"{self.name}'s {self.n} workers", step=0.01)
        took = time.monotonic() - self.t0
        wait(lambda: get_ok(self.port), 10, f"{self.name} to serve")
        return took

    def worker_pids(self):
        return [w["pid"] for w in self.status()["workers"] if w["pid"]]

    def reload(self):
        t = time.monotonic()
        r = subprocess.run([BIN, "reload", self.ctl], capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"herdsman reload {self.name} failed: {r.stdout}{r.stderr}")
        return time.monotonic() - t

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.logf.close()
        if self in running:
            running.remove(self)


def pm2(*args, check=True):
    r = subprocess.run([PM2, *args], env=PM2_ENV, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if check and r.returncode != 0:
        raise SystemExit(f"pm2 {' '.join(args)} failed: {r.stdout}{r.stderr}")
    return r.stdout


class Pm2App:
    """PM2 cluster mode, defaults (no wait_ready: the unchanged app sends nothing)."""

    def __init__(self, name, port, n):
        self.name, self.port, self.n = name, port, n
        eco = os.path.join(TMP, f"{name}.json")
        with open(eco, "w") as f:
            json.dump({"apps": [{
                "name": name, "script": OWN, "exec_mode": "cluster", "instances": n,
                "out_file": "/dev/null", "error_file": os.path.join(TMP, f"{name}.err"),
                "env": {"PORT": str(port)},
            }]}, f)
        pm2("start", eco)

        def online():
            apps = [a for a in json.loads(pm2("jlist")) if a["name"] == name]
            return len(apps) == n and all(a["pm2_env"]["status"] == "online" for a in apps)

        wait(online, 60, f"PM2 {name} online", step=0.2)
        wait(lambda: get_ok(port), 10, f"PM2 {name} to serve")

    def reload(self):
        t = time.monotonic()
        pm2("reload", self.name)
        return time.monotonic() - t

    def stop(self):
        pm2("delete", self.name, check=False)


def wrk(port, secs, close, conns=32):
    cmd = ["wrk", "-t1", f"-c{conns}", f"-d{secs}s"]
    if close:
        cmd += ["-H", "Connection: close"]
    r = subprocess.run(cmd + [f"http://127.0.0.1:{port}/"], capture_output=True, text=True)
    return parse_wrk(r.stdout)


def wrk_pair(port_a, port_b, secs, close):
    """Two wrk runs at the same time, one per port; their results."""
    cmd = ["wrk", "-t1", "-c32", f"-d{secs}s"] + (["-H", "Connection: close"] if close else [])
    ws = [subprocess.Popen(cmd + [f"http://127.0.0.1:{p}/"], stdout=subprocess.PIPE, text=True)
          for p in (port_a, port_b)]
    loaders.extend(ws)
    res = [parse_wrk(w.communicate()[0]) for w in ws]
    for w in ws:
        loaders.remove(w)
    return res


def parse_wrk(text):
    m = re.search(r"(\d+) requests in", text)
    rps = re.search(r"Requests/sec:\s+([0-9.]+)", text)
    errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    e = [int(x) for x in errs.groups()] if errs else [0, 0, 0, 0]
    return {
        "requests": int(m.group(1)) if m else 0,
        "rps": float(rps.group(1)) if rps else 0.0,
        "errors": e,
        "non2xx": int(non2xx.group(1)) if non2xx else 0,
        "raw": text,
    }


def data_path():
    log(f"1. data path: unchanged+on, fd3+off (again), fd3+on, each paired with fd3+off; {DP_WORKERS} worker(s) each")
    arms = [
        ("unchanged, on", OWN, ["--bind-intercept", "on"]),
        ("fd 3, off", FD3, ["--bind-intercept", "off"]),
        ("fd 3, off (again)", FD3, ["--bind-intercept", "off"]),
        ("fd 3, on", FD3, ["--bind-intercept", "on"]),
    ]
    hs = []
    for i, (_, app, opts) in enumerate(arms):
        h = Herdsman(f"dp{i}", app, free_port(), DP_WORKERS, *opts)
        hs.append(h)
    for h in hs:
        h.wait_ready()
    for h in hs:  # warm up (JIT, connection paths)
        wrk(h.port, 1, False)
    pids = [h.worker_pids() for h in hs]
    # rps[close][i]: contender i's slices; ratio[close][i]: its req/s ratio to fd 3, off, per
    # pair; cpu[close][i]: its workers' CPU µs per request, cratio the ratio of those.
    rps = {close: [[] for _ in arms] for close in (False, True)}
    ratio = {close: [[] for _ in arms] for close in (False, True)}
    cpu = {close: [[] for _ in arms] for close in (False, True)}
    cratio = {close: [[] for _ in arms] for close in (False, True)}
    errs = {close: [0 for _ in arms] for close in (False, True)}
    load0 = loadavg()
    for r in range(ROUNDS):
        for close in (False, True):
            for k in range(3):
                i = [0, 2, 3][(k + r) % 3]
                c0 = [cpu_ns(pids[i]), cpu_ns(pids[1])]
                a, b = wrk_pair(hs[i].port, hs[1].port, SLICE, close)
                c1 = [cpu_ns(pids[i]), cpu_ns(pids[1])]
                per = [(c1[j] - c0[j]) / 1000 / max(x["requests"], 1) for j, x in enumerate((a, b))]
                for j, x, us in ((i, a, per[0]), (1, b, per[1])):
                    rps[close][j].append(x["rps"])
                    cpu[close][j].append(us)
                    errs[close][j] += sum(x["errors"]) + x["non2xx"]
                if b["rps"] > 0:
                    ratio[close][i].append(a["rps"] / b["rps"])
                if per[1] > 0:
                    cratio[close][i].append(per[0] / per[1])
    load1 = loadavg()
    for h in hs:
        h.stop()
    out("### Data path: interception on vs off")
    out()
    out(f"Four herdsman instances, {DP_WORKERS} worker{'s' if DP_WORKERS > 1 else ''} each, `--listen 127.0.0.1:PORT`, default "
        f"readiness. Each contender is measured **at the same time as** the fd 3, off one: two "
        f"`wrk -t1 -c32 -d{SLICE}s` started together, one on each (keep-alive, and "
        f"`-H 'Connection: close'` for a new connection per request), so both see the same machine "
        f"at the same moment and the ratio of their req/s compares the cost per request at an "
        f"equal share of the CPU. (Slices taken in turn were useless on this machine: other jobs' load "
        f"changes within seconds, and one trial run's single ratios spread over 0.34–3.5×.) {ROUNDS} rounds per mode, the "
        f"three pairs in turn (order rotated); the ratio is the median (min–max) over the rounds. "
        f"**fd 3, off (again)** is a second identical instance: its ratio is the measurement's own "
        f"noise. Load average (1, 5, 15 min) before: {load0}; after: {load1}.")
    if DP_WORKERS == 1:
        out()
        out("One worker per contender: the filter's cost is per system call of the worker. With 2 "
            "workers on this 2-core machine a keep-alive slice is bimodal (30k or 75k req/s in a "
            "trial run, for the same contender): the shared accept queue hands a slice's 32 "
            "connections to the two workers unevenly, and sometimes one worker gets nearly all of "
            "them. `UNCHANGED_DP_WORKERS=2` measures with 2.")
    out()
    out("*worker CPU per request* = the worker's on-CPU time over the slice (all its threads, "
        "`/proc/PID/task/*/schedstat`) ÷ the requests wrk completed. The filter runs in the worker, "
        "on its system calls, so its cost would show here; and this figure depends far less on "
        "what else the machine runs than req/s does.")
    out()
    out("| mode | contender | app | req/s (while paired) | req/s ratio to fd 3, off | worker CPU per request µs | CPU ratio to fd 3, off | errors |")
    out("|---|---|---|---|---|---|---|---|")
    summary = {}
    for close in (False, True):
        for i, (name, app, _) in enumerate(arms):
            summary[(close, name)] = (ratio[close][i], cratio[close][i])
            out(f"| {'new conn' if close else 'keep-alive'} | {name} | "
                f"{'`listen(PORT)`' if app == OWN else '`listen({fd:3})`'} | {spread(rps[close][i], '{:.0f}')} | "
                f"{'1' if i == 1 else ratio_s(ratio[close][i])} | {spread(cpu[close][i], '{:.1f}')} | "
                f"{'1' if i == 1 else ratio_s(cratio[close][i])} | {errs[close][i]} |")
    out()
    for close in (False, True):
        for what, rs in (("req/s", ratio[close]), ("CPU per request", cratio[close])):
            lo, hi = min(rs[2]), max(rs[2])
            for i in (0, 3):
                m = med(rs[i])
                verdict = ("inside the range of the identical pair" if lo <= m <= hi
                           else f"outside the range of the identical pair ({lo:.3f}–{hi:.3f})")
                out(f"* {'new conn' if close else 'keep-alive'}, {arms[i][0]}, {what}: median {m:.3f}×, {verdict}.")
    out()
    return summary


def spawn_times():
    log(f"2. spawn: herdsman run -w 4 until status shows 4 ready, {SPAWNS} times per arm")
    arms = [
        ("unchanged, on, `--ready auto` (= listen)", OWN, ["--bind-intercept", "on"]),
        ("fd 3 + `process.send('ready')`, off, `--ready notify`", FD3_READY, ["--bind-intercept", "off", "--ready", "notify"]),
        ("fd 3 + `process.send('ready')`, on, `--ready notify`", FD3_READY, ["--bind-intercept", "on", "--ready", "notify"]),
    ]
    times = [[] for _ in arms]
    load0 = loadavg()
    for r in range(SPAWNS):
        for k in range(len(arms)):
            i = (k + r) % len(arms)
            _, app, opts = arms[i]
            h = Herdsman(f"sp{r}-{i}", app, free_port(), 4, *opts)
            times[i].append(h.wait_ready())
            h.stop()
    load1 = loadavg()
    out("### Spawn time: interception on vs off")
    out()
    out(f"`herdsman run -w 4 --listen 127.0.0.1:PORT`, from starting the command until "
        f"`herdsman status --json` (polled every 10 ms) shows 4 ready workers; {SPAWNS} start-ups per "
        f"arm, the arms in turn (order rotated). Both readiness signals come when the server "
        f"listens: the `listen()` call on herdsman's socket (interception's own readiness) and the "
        f"app's `process.send('ready')` from its listen callback (no interception needed). The ratio "
        f"is per round, to the fd 3 + off arm. Load average before: {load0}; after: {load1}.")
    out()
    out("| arm | start → 4 ready (s) | ratio to fd 3, off |")
    out("|---|---|---|")
    base = times[1]
    for i, (name, _, _) in enumerate(arms):
        ratio = [a / b for a, b in zip(times[i], base)]
        out(f"| {name} | {spread(times[i])} | {'1' if i == 1 else ratio_s(ratio)} |")
    out()
    for i in (0, 2):
        rs = [a / b for a, b in zip(times[i], base)]
        inside = min(rs) <= 1 <= max(rs)
        out(f"* {arms[i][0]}: median {med(rs):.3f}×; "
            + ("the range includes 1: no difference beyond the run-to-run noise at this load."
               if inside else f"every round {'slower' if min(rs) > 1 else 'faster'} than fd 3, off."))
    out()
    out("Most of a start-up is Node's own (4 workers starting at once on 2 cores); interception "
        "adds one round trip through herdsman per `bind()` and per `listen()` of a worker.")
    out()
    return [[a / b for a, b in zip(times[i], base)] for i in range(len(arms))]


def load_during(port, action):
    """wrk with a new connection per request (8 connections) around action(); wrk's result."""
    w = subprocess.Popen(["wrk", "-t1", "-c8", "-d600s", "-H", "Connection: close",
                          f"http://127.0.0.1:{port}/"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    loaders.append(w)
    time.sleep(1.0)
    try:
        action()
        time.sleep(1.0)
    finally:
        w.send_signal(signal.SIGINT)  # wrk stops and prints its totals
        text, _ = w.communicate(timeout=30)
        loaders.remove(w)
    return parse_wrk(text)


def reload_failures():
    log(f"3. failed requests per 3 reloads of the handler-less unchanged app: shared, steer, PM2; {FAIL_ROUNDS} runs each")
    names = ["herdsman `--balance shared`", "herdsman `--balance steer`", "PM2 cluster"]
    runs = [[] for _ in names]
    load0 = loadavg()
    for r in range(FAIL_ROUNDS):
        for k in range(len(names)):
            i = (k + r) % len(names)
            port = free_port()
            if i < 2:
                s = Herdsman(f"rf{r}-{i}", OWN, port, 2, "--balance", ["shared", "steer"][i])
                s.wait_ready()
            else:
                s = Pm2App(f"rf{r}", port, 2)
            walls = []
            res = load_during(port, lambda: walls.extend(s.reload() for _ in range(3)))
            s.stop()
            res["walls"] = walls
            runs[i].append(res)
    load1 = loadavg()
    out("### Reload failures of the seed's handler-less app")
    out()
    out("The seed's app unchanged (`listen(PORT)`, no SIGTERM handler), 2 workers: herdsman with "
        "`--listen 127.0.0.1:PORT` and default settings (interception `auto`, readiness `auto`, "
        "`--min-ready 1s`) under `--balance shared` and `--balance steer`; PM2 cluster mode "
        "with its defaults (`pm2 reload`, `kill_timeout` 1.6 s). Load: `wrk -t1 -c8 -H 'Connection: "
        "close'` (a new connection per request) from 1 s before the first reload to 1 s after the "
        f"third; {FAIL_ROUNDS} runs of 3 back-to-back reloads per contender, contenders in turn. "
        "*failed* = wrk's socket errors (connect, read, write, timeout) plus non-2xx answers. "
        f"Load average before: {load0}; after: {load1}.")
    out()
    out("| contender | failed per 3 reloads, each run | requests per run | kinds (connect/read/write/timeout/non-2xx, all runs) | reload wall s |")
    out("|---|---|---|---|---|")
    summary = {}
    for i, name in enumerate(names):
        fails = [sum(x["errors"]) + x["non2xx"] for x in runs[i]]
        kinds = [sum(x["errors"][j] for x in runs[i]) for j in range(4)] + [sum(x["non2xx"] for x in runs[i])]
        walls = [w for x in runs[i] for w in x["walls"]]
        summary[name] = fails
        out(f"| {name} | {', '.join(map(str, fails))} | {spread([x['requests'] for x in runs[i]], '{:.0f}')} | "
            f"{'/'.join(map(str, kinds))} | {spread(walls, '{:.2f}')} |")
    out()
    out("Why they differ (src/steer.rs, docs/servers.md): under `shared` the old worker gets SIGTERM "
        "as soon as its replacement held `min_ready`, and a Node app with no handler exits at once, "
        "dropping the connections it had accepted but not answered (*read* errors: closed without "
        "an answer). Under `steer` the old worker's member socket stops receiving first, and the "
        "worker is signalled only once its own accept queue is empty and a short grace has passed, "
        "so it is idle when it dies. An app with a drain handler loses nothing in either mode "
        "(docs/guarantees.md). PM2 cluster mode's primary accepts every connection and hands it "
        "to a worker over IPC.")
    out()
    return summary


def reload_wall():
    log(f"4. reload wall time, 2/4/8 workers, herdsman vs PM2, {WALL_RELOADS} reloads each")
    rows = []
    load0 = loadavg()
    for n in (2, 4, 8):
        h = Herdsman(f"rw{n}", OWN, free_port(), n)
        h.wait_ready(120)
        p = Pm2App(f"rw{n}", free_port(), n)
        hw, pw = [], []
        for r in range(WALL_RELOADS):
            for k in range(2):
                if (k + r) % 2 == 0:
                    hw.append(h.reload())
                else:
                    pw.append(p.reload())
        h.stop()
        p.stop()
        rows.append((n, hw, pw))
        log(f"  N={n}: herdsman {hw}, PM2 {pw}")
    load1 = loadavg()
    out("### Reload wall time with defaults")
    out()
    out("The seed's app unchanged, no load; herdsman `run -w N --listen 127.0.0.1:PORT` with every "
        "other setting at its default (interception `auto`, readiness `auto`, `--min-ready 1s`, "
        "`--reload-batch 1`), timed as the `herdsman reload` command (it returns when the roll-out "
        "is over); PM2 cluster mode with its defaults, timed as `pm2 reload NAME`. Both run side by "
        f"side, reloads alternating, {WALL_RELOADS} per contender and size. Load average before: "
        f"{load0}; after: {load1}.")
    out()
    out("| workers | herdsman reload s | per slot s | PM2 reload s | herdsman ÷ PM2 |")
    out("|---|---|---|---|---|")
    for n, hw, pw in rows:
        out(f"| {n} | {spread(hw, '{:.2f}')} | {med(hw) / n:.2f} | {spread(pw, '{:.2f}')} | {med(hw) / med(pw):.2f} |")
    out()
    out("herdsman stops an old worker only after its replacement was ready for `min_ready` (1 s). The first slot is a canary whose new worker holds alone; after it the slots overlap (the next slot's new worker starts once the previous one is ready, while it holds), so a reload costs about two `min_ready` plus the new workers' start-up, whatever N. PM2 has no such hold: its reload stops an old worker once the new one is listening, so a build that crashes a second after it listens goes through PM2's reload and is rolled back by herdsman's (docs/guarantees.md, `min_ready`).")
    out()
    return rows


def wrk_version():
    words = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split()
    return words[1] if len(words) > 1 else "?"


def main():
    t0 = time.monotonic()
    version = subprocess.run([BIN, "--version"], capture_output=True, text=True).stdout.strip()
    commit = os.environ.get("UNCHANGED_COMMIT", "?")
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    log(f"{version}, commit {commit}; load average {loadavg()}")
    dp = data_path()
    sp = spawn_times()
    rf = reload_failures()
    rw = reload_wall()
    minutes = (time.monotonic() - t0) / 60
    body = md[:]
    md.clear()
    out("<!-- unchanged:begin (written by bench/unchanged.sh: `bench/run.sh --only unchanged`) -->")
    out("## Unchanged apps: bind interception (issue 23)")
    out()
    out(f"Measured {started} ({minutes:.1f} min) with `bench/run.sh --only unchanged`: {version}, "
        f"commit {commit}, release build; Node {subprocess.run(['node', '--version'], capture_output=True, text=True).stdout.strip()}, "
        f"PM2 {os.environ.get('UNCHANGED_PM2', '?')}, wrk {wrk_version()}. "
        f"Everything on this one 2-core machine over 127.0.0.1, shared with other work while it ran: "
        f"absolute figures move with the load, only ratios measured side by side mean something, "
        f"and the (min–max) spreads are the run-to-run noise.")
    if os.environ.get("UNCHANGED_NOTE"):
        out()
        out(f"**Note:** {os.environ['UNCHANGED_NOTE']}")
    out()
    def both(name, k):
        return f"keep-alive {ratio_s(dp[(False, name)][k])}, new conn {ratio_s(dp[(True, name)][k])}"

    out("| question | result |")
    out("|---|---|")
    out(f"| data path, unchanged app with interception on ÷ fd-3 app with it off: req/s | {both('unchanged, on', 0)} "
        f"(noise, the same fd-3 app twice: {both('fd 3, off (again)', 0)}) |")
    out(f"| … worker CPU per request | {both('unchanged, on', 1)} (noise: {both('fd 3, off (again)', 1)}) |")
    out(f"| … the filter alone (fd-3 app, on ÷ off): req/s; CPU per request | {both('fd 3, on', 0)}; {both('fd 3, on', 1)} |")
    out(f"| spawn of 4 workers, unchanged+on ÷ fd 3+off | {ratio_s(sp[0])} (the filter alone, fd 3 on ÷ off: {ratio_s(sp[2])}) |")
    out("| failed requests per 3 reloads (handler-less app, new connections) | "
        + "; ".join(f"{k}: {', '.join(map(str, v))}" for k, v in rf.items()) + " |")
    out("| reload wall time, herdsman vs PM2 | "
        + "; ".join(f"{n} workers: {med(hw):.1f} s vs {med(pw):.1f} s" for n, hw, pw in rw) + " |")
    out()
    head = md[:]
    md.clear()
    md.extend(head + body)
    md.append("<!-- unchanged:end -->")
    if WRITE:
        write_docs("\n".join(md) + "\n")


def write_docs(section):
    """docs/bench-unchanged.md, and the same text between the markers of docs/benchmarks.md
    (added before its "## Reproduce" the first time)."""
    with open(os.path.join(ROOT, "docs/bench-unchanged.md"), "w") as f:
        f.write(section)
    page_path = os.path.join(ROOT, "docs/benchmarks.md")
    with open(page_path) as f:
        page = f.read()
    begin, end = "<!-- unchanged:begin", "<!-- unchanged:end -->"
    if begin in page:
        a = page.index(begin)
        b = page.index(end, a) + len(end) + 1
        page = page[:a] + section + page[b:]
    elif "\n## Reproduce\n" in page:
        a = page.index("\n## Reproduce\n") + 1
        page = page[:a] + section + "\n" + page[a:]
    else:
        page += "\n" + section
    with open(page_path, "w") as f:
        f.write(page)
    log("wrote docs/bench-unchanged.md and its section of docs/benchmarks.md")


def cleanup():
    for h in list(running):
        h.stop()
    for w in list(loaders):
        if w.poll() is None:
            w.kill()
            w.wait()
    if os.path.isdir(PM2_ENV["PM2_HOME"]):
        pm2("kill", check=False)
    shutil.rmtree(TMP, ignore_errors=True)


if __name__ == "__main__":
    # SIGTERM unwinds like Ctrl-C (KeyboardInterrupt): cleanup() stops everything started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        main()
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        cleanup()
