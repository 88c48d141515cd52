#!/usr/bin/env python3
"""Load client for herdsman's end-to-end tests (stdlib only).

N threads send HTTP GETs to ADDR continuously until --duration seconds have
passed or --stop-file exists, then a JSON summary is printed on stdout:

  {"mode": ..., "ok": N, "failed": N, "errors": {"ConnectionRefusedError: ...": n},
   "generations": {"1": n, "2": n}, "workers": {"0": n, ...}, "pids": [...],
   "last_generations": [g], "retried_stale": n, "max_latency_ms": x,
   "failures": [{"started": t, "ended": t, "error": ...}], ...}

Times in "failures" and "t0" are absolute CLOCK_MONOTONIC seconds (the same clock as
the host's: containers share it), so a test can relate failures to an event.

Modes:
  new        a new TCP connection for every request (Connection: close)
  keepalive  one persistent HTTP/1.1 connection per thread, reopened when the
             server closes it (Connection: close from a draining worker)

In keepalive mode a request that fails on a *reused* connection before any
byte of the answer arrived is retried once on a fresh connection and counted
in "retried_stale", not in "failed": that is the unavoidable keep-alive close
race every HTTP client handles this way (RFC 9112 9.3.1, idempotent GET). A
failure on a fresh connection, a timeout, or a non-200 answer is a failure.
"""

import argparse
import http.client
import json
import os
import socket
import sys
import threading
import time
from collections import Counter


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.ok = 0
        self.failed = 0
        self.retried_stale = 0
        self.errors = Counter()
        self.generations = Counter()
        self.workers = Counter()
        self.pids = set()
        self.last = []  # (time, generation) of the most recent answers
        self.max_latency = 0.0
        self.first_error_at = None
        self.last_error_at = None
        self.failures = []  # (started, ended, error), absolute CLOCK_MONOTONIC seconds

    def good(self, info, latency, now):
        with self.lock:
            self.ok += 1
            g = info.get("generation")
            self.generations[str(g)] += 1
            self.workers[str(info.get("worker_id"))] += 1
            self.pids.add(info.get("pid"))
            self.last.append((now, g))
            if len(self.last) > 200:
                del self.last[:100]
            self.max_latency = max(self.max_latency, latency)

    def bad(self, err, now, started, ended):
        with self.lock:
            self.failed += 1
            self.errors[err] += 1
            if len(self.failures) < 100:
                self.failures.append({"started": round(started, 4), "ended": round(ended, 4),
                                      "error": err})
            if self.first_error_at is None:
                self.first_error_at = now
            self.last_error_at = now

    def stale(self):
        with self.lock:
            self.retried_stale += 1


def describe(e):
    s = f"{type(e).__name__}: {e}"
    return s[:160]


def one_request(conn, path, keepalive):
    headers = {} if keepalive else {"Connection": "close"}
    conn.request("GET", path, headers=headers)
    resp = conn.getresponse()
    body = resp.read()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}")
    return json.loads(body), resp.will_close


def worker_loop(args, stats, stop, t0):
    host, port = args.addr.rsplit(":", 1)
    port = int(port)
    conn = None
    reused = False
    while not stop.is_set():
        start = time.monotonic()
        if conn is None:
            conn = http.client.HTTPConnection(host, port, timeout=args.timeout)
            reused = False
        try:
            info, will_close = one_request(conn, args.path, args.mode == "keepalive")
        except Exception as e:  # noqa: BLE001 - every failure is counted
            conn.close()
            conn = None
            stale = reused and isinstance(
                e, (http.client.RemoteDisconnected, ConnectionResetError,
                    BrokenPipeError, http.client.BadStatusLine))
            if stale:
                stats.stale()
                continue  # retry once on a fresh connection (reused=False now)
            end = time.monotonic()
            stats.bad(describe(e), round(end - t0, 3), start, end)
            time.sleep(0.05)
            continue
        now = time.monotonic()
        stats.good(info, (now - start) * 1000.0, round(now - t0, 3))
        if args.mode == "new" or will_close:
            conn.close()
            conn = None
        else:
            reused = True
        if args.interval > 0:
            time.sleep(args.interval)
    if conn is not None:
        conn.close()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--addr", default="127.0.0.1:8080")
    p.add_argument("--path", default="/")
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--mode", choices=("new", "keepalive"), default="new")
    p.add_argument("--duration", type=float, default=60.0,
                   help="stop after this many seconds (upper bound with --stop-file)")
    p.add_argument("--stop-file", help="stop as soon as this file exists")
    p.add_argument("--ready-file", help="touched once the first answer arrived")
    p.add_argument("--timeout", type=float, default=20.0, help="per-request timeout (s)")
    p.add_argument("--interval", type=float, default=0.0, help="pause between requests (s)")
    args = p.parse_args()

    stats = Stats()
    stop = threading.Event()
    t0 = time.monotonic()
    threads = [threading.Thread(target=worker_loop, args=(args, stats, stop, t0), daemon=True)
               for _ in range(args.threads)]
    for t in threads:
        t.start()
    ready_done = False
    deadline = t0 + args.duration
    while time.monotonic() < deadline:
        if args.stop_file and os.path.exists(args.stop_file):
            break
        if args.ready_file and not ready_done and stats.ok > 0:
            open(args.ready_file, "w").close()
            ready_done = True
        time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join(args.timeout + 5)
    elapsed = time.monotonic() - t0
    last_gens = sorted({g for _, g in stats.last[-20:]})
    out = {
        "mode": args.mode,
        "threads": args.threads,
        "seconds": round(elapsed, 2),
        "ok": stats.ok,
        "failed": stats.failed,
        "retried_stale": stats.retried_stale,
        "errors": dict(stats.errors),
        "first_error_at": stats.first_error_at,
        "last_error_at": stats.last_error_at,
        "generations": dict(stats.generations),
        "workers": dict(stats.workers),
        "pids": sorted(p for p in stats.pids if p is not None),
        "last_generations": last_gens,
        "max_latency_ms": round(stats.max_latency, 1),
        "hung_threads": sum(t.is_alive() for t in threads),
        "failures": stats.failures,
        "t0": round(t0, 4),
    }
    print(json.dumps(out, sort_keys=True))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
