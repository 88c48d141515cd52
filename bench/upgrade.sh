#!/usr/bin/env bash
# In-place upgrade cost (issue 14): how long `herdsman upgrade` takes with 8 and 64 workers,
# and whether any request fails while it happens.
#
#   bench/upgrade.sh [UPGRADES]     (default 20 upgrades per size; prints a markdown table)
#
# "take-over" is what the new image reports (`took_ms`): from just before execve to the new
# image serving its control socket again, with every worker re-watched. "client" is the
# whole `herdsman upgrade` command as a user waits for it: the take-over check of the new
# binary (it is run once with the state on stdin), a 50 ms pause that lets the old image's
# tasks write their last answers, and the take-over. Load: 4 new-connection clients on the
# app's unix socket all the time; "failed" counts their failed requests over all upgrades.
#
# Builds herdsman in release mode. Uses a scratch directory only; stops the supervisor it
# started (by pid) at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
UPGRADES=${1:-20}
cargo build --release --quiet
BIN=$ROOT/target/release/herdsman
TMP=$(mktemp -d "${TMPDIR:-/tmp}/herdsman-bench-upgrade.XXXXXX")
PID=
cleanup() { [ -n "$PID" ] && kill -INT "$PID" 2>/dev/null && wait "$PID" 2>/dev/null; rm -rf "$TMP"; }
trap cleanup EXIT
cp "$BIN" "$TMP/herdsman-a"
cp "$BIN" "$TMP/herdsman-b"

echo "| workers | upgrades | take-over median ms | take-over max ms | client median ms | client max ms | failed requests |"
echo "|---|---|---|---|---|---|---|"
for N in 8 64; do
    "$TMP/herdsman-a" run --name "bench-upgrade-$N" -w "$N" --ready notify --listen "unix:$TMP/app-$N.sock" \
        --control "$TMP/control-$N.sock" -e TW_NOTIFY=1 \
        -- python3 "$ROOT/tests/support/worker.py" >/dev/null 2>"$TMP/log-$N" &
    PID=$!
    python3 - "$BIN" "$TMP" "$N" "$UPGRADES" <<'PY'
import json, re, socket, statistics, subprocess, sys, threading, time
bin_, tmp, n, upgrades = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
control, app = f"{tmp}/control-{n}.sock", f"{tmp}/app-{n}.sock"
end = time.time() + 180
while time.time() < end:
    r = subprocess.run([bin_, "status", control, "--json"], capture_output=True)
    if r.returncode == 0 and json.loads(r.stdout)["ready"] == n:
        break
    time.sleep(0.2)
else:
    sys.exit("workers not ready")
stop, failed, ok = False, [0], [0]
def load():
    while not stop:
        try:
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(10)
            s.connect(app)
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
            s.close()
            if b" 200 " in data.split(b"\r\n", 1)[0]:
                ok[0] += 1
            else:
                failed[0] += 1
        except OSError:
            failed[0] += 1
threads = [threading.Thread(target=load) for _ in range(4)]
for t in threads:
    t.start()
before = json.loads(subprocess.run([bin_, "status", control, "--json"], capture_output=True).stdout)
took, wall = [], []
for i in range(upgrades):
    target = f"{tmp}/herdsman-{'b' if i % 2 == 0 else 'a'}"
    t = time.perf_counter()
    r = subprocess.run([bin_, "upgrade", control, "--binary", target], capture_output=True, text=True)
    wall.append((time.perf_counter() - t) * 1000)
    if r.returncode != 0:
        sys.exit(f"upgrade {i} failed: {r.stderr}")
    took.append(float(re.search(r"([0-9.]+) ms", r.stdout).group(1)))
stop = True
for t in threads:
    t.join()
after = json.loads(subprocess.run([bin_, "status", control, "--json"], capture_output=True).stdout)
pids = lambda s: sorted(w["pid"] for w in s["workers"])
assert pids(before) == pids(after), "workers changed"
assert after["upgrades"] == upgrades and after["pid"] == before["pid"]
print(f"| {n} | {upgrades} | {statistics.median(took):.1f} | {max(took):.1f} | {statistics.median(wall):.1f} | {max(wall):.1f} | {failed[0]} of {failed[0] + ok[0]} |")
PY
    kill -INT "$PID"; wait "$PID" 2>/dev/null || true; PID=
done
