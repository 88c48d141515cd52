#!/usr/bin/env python3
"""What a roll-out's watch catches: a reload to a build that exits CRASH_MS after listen().

    python3 bench/canary.py [--bin target/release/herdsman] [-w 4] [CRASH_MS ...] [-- herdsman run flags]

For each CRASH_MS (default 300 1500 2500): `herdsman run -w N` of the seed's app unchanged
(bench/apps/crash-after-listen.js), a reload to the broken build, then one line: the reload's
exit code and wall time, how many new workers started, and the generations serving 3 s later
([1]: caught, rolled back or never moved; [2]: the broken build went through and crash-loops).
Needs node; 127.0.0.1 and a free port; stops what it starts.
"""
import argparse, json, os, re, socket, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ap = argparse.ArgumentParser()
ap.add_argument("--bin", default=os.path.join(ROOT, "target/release/herdsman"))
ap.add_argument("-w", type=int, default=4)
ap.add_argument("crash_ms", nargs="*", default=["300", "1500", "2500"])
argv = sys.argv[1:]
extra = argv[argv.index("--") + 1:] if "--" in argv else []
args = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status(ctl):
    r = subprocess.run([args.bin, "status", "--json", ctl], capture_output=True, text=True)
    return json.loads(r.stdout) if r.returncode == 0 else None


def one(crash_ms):
    d = tempfile.mkdtemp(prefix="herdsman-canary-")
    ctl, broken, port = f"{d}/ctl.sock", f"{d}/BROKEN", free_port()
    env = dict(os.environ, PORT=str(port), CRASH_MS=crash_ms, BROKEN_FILE=broken)
    log = open(f"{d}/log", "w")
    p = subprocess.Popen([args.bin, "run", "--control", ctl, "-n", f"canary{port}", "-w", str(args.w), *extra,
                          "--", "node", os.path.join(ROOT, "bench/apps/crash-after-listen.js")],
                         env=env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while True:
            s = status(ctl)
            if s and sum(1 for w in s["workers"] if w["state"] == "ready") == args.w:
                break
            if time.monotonic() > deadline or p.poll() is not None:
                sys.exit(f"not ready: see {d}/log")
            time.sleep(0.05)
        open(broken, "w").close()
        t0 = time.monotonic()
        r = subprocess.run([args.bin, "reload", ctl], capture_output=True, text=True)
        took = time.monotonic() - t0
        os.remove(broken)
        time.sleep(3)
        s = status(ctl)
        gens = sorted({w["generation"] for w in s["workers"] if w["state"] == "ready"})
    finally:
        p.terminate()
        p.wait()
    started = len(re.findall(r"started \(pid \d+, generation 2\)", open(f"{d}/log").read()))
    print(json.dumps({"workers": args.w, "crash_ms": int(crash_ms), "reload_exit": r.returncode,
                      "reload_s": round(took, 2), "new_workers_started": started, "serving_generations": gens}))


for ms in args.crash_ms:
    one(ms)
