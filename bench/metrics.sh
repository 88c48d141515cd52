#!/usr/bin/env bash
# Metrics scrape cost (issue 15): latency of GET /metrics and herdsman's CPU per scrape with
# 8 and 64 workers, each serving ~200 samples on $HERDSMAN_METRICS_SOCKET (the test worker,
# tests/support/worker.py with TW_METRICS=ok TW_METRICS_SAMPLES=188: 200 samples a page).
#
#   bench/metrics.sh [SCRAPES]     (default 100 scrapes per size; prints a markdown table)
#
# Builds herdsman in release mode (into $CARGO_TARGET_DIR if set). Uses 127.0.0.1 and a
# scratch directory only; stops the supervisor it started (by pid) at the end.
#
# Besides the client's latency it reports herdsman's CPU and the workers' (all of
# herdsman's children, user + system) per scrape: on a small machine the 64 Python workers'
# own answers are most of the CPU a scrape takes. "load" is the 1-minute load average just
# before that size's workers start; the run itself raises it (64 workers woken per scrape).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SCRAPES=${1:-100}
cargo build --release --quiet
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/herdsman
TMP=$(mktemp -d "${TMPDIR:-/tmp}/herdsman-bench-metrics.XXXXXX")
PID=
cleanup() { [ -n "$PID" ] && kill -INT "$PID" 2>/dev/null && wait "$PID" 2>/dev/null; rm -rf "$TMP"; }
trap cleanup EXIT

echo "| workers | samples per page | scrapes | median ms | p95 ms | max ms | herdsman CPU ms per scrape | workers' CPU ms per scrape | load |"
echo "|---|---|---|---|---|---|---|---|---|"
for N in 8 64; do
    PORT=$((19500 + N))
    LOAD=$(cut -d' ' -f1 /proc/loadavg)
    "$BIN" run --name "bench-metrics-$N" -w "$N" --ready notify --listen "unix:$TMP/app-$N.sock" \
        --control "$TMP/control-$N.sock" --metrics "127.0.0.1:$PORT" \
        -e TW_NOTIFY=1 -e TW_METRICS=ok -e TW_METRICS_SAMPLES=188 \
        -- python3 "$ROOT/tests/support/worker.py" >/dev/null 2>"$TMP/log-$N" &
    PID=$!
    python3 - "$BIN" "$TMP/control-$N.sock" "$N" "$PORT" "$PID" "$SCRAPES" "$LOAD" <<'PY'
import http.client, json, os, statistics, subprocess, sys, time
bin_, control, n, port, pid, scrapes = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
load = sys.argv[7]
end = time.time() + 120
while time.time() < end:
    r = subprocess.run([bin_, "status", control, "--json"], capture_output=True)
    if r.returncode == 0 and json.loads(r.stdout)["ready"] == n:
        break
    time.sleep(0.2)
else:
    sys.exit("workers not ready")
def scrape():
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("GET", "/metrics")
    body = c.getresponse().read()
    c.close()
    return body
def cpu():
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    # utime + stime of herdsman and its reaped children do not matter: only its own.
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
def workers_cpu():
    total = 0
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            f = open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(f[1]) == pid:
            total += int(f[11]) + int(f[12])
    return total / os.sysconf("SC_CLK_TCK")
for _ in range(5):
    body = scrape()
samples = sum(1 for l in body.decode().splitlines() if l.startswith("tw_"))
assert samples >= n * 190, f"only {samples} worker samples"
lat = []
w0 = workers_cpu()
c0 = cpu()
for _ in range(scrapes):
    t = time.perf_counter()
    scrape()
    lat.append((time.perf_counter() - t) * 1000)
c1 = cpu()
w1 = workers_cpu()
lat.sort()
p95 = lat[int(len(lat) * 0.95) - 1]
print(f"| {n} | {samples // n} | {scrapes} | {statistics.median(lat):.1f} | {p95:.1f} | {lat[-1]:.1f} | {(c1 - c0) * 1000 / scrapes:.2f} | {(w1 - w0) * 1000 / scrapes:.2f} | {load} |")
PY
    kill -INT "$PID"; wait "$PID" 2>/dev/null || true; PID=
done
