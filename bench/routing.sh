#!/usr/bin/env bash
# `--balance steer`'s two routings side by side (HERDSMAN_STEER_ROUTING): round robin (the
# default eBPF program, which takes turns) and the flow hash (the classic program), on a
# CPU-bound endpoint where the split of connections over the workers decides throughput and
# tail latency (issue 12). The shortest queue it also compared until issue 22 was removed
# (docs/bench-queues.md says why, with its figures).
#
#   bench/routing.sh [ROUNDS] [N]    (default 10 rounds, N=2 workers)
#
# Client: wrk -t1 from 127.0.0.1 on /work?ms=2 (2 ms of busy loop per request,
# bench/apps/node-app.js): keep-alive with 2N and 4N connections (each connection stays on the
# worker it was routed to), and a new connection per request with 4N. The contenders take
# turns within each round (the order rotates every round). Per row and routing: the median
# over the rounds of req/s and of wrk's p99 latency, and the median of the rounds' req/s
# ratios to round robin. Needs wrk, node, root (or CAP_BPF). Stops what it
# started.
ROUNDS=${1:-10}
N=${2:-2}
. "$(dirname "$0")/lib.sh" routing

NAMES=(round-robin hash)
ADDRS=()
for name in "${NAMES[@]}"; do
    p=$(port)
    HERDSMAN_STEER_ROUTING=$name "$BIN" run --name "r$p" --listen "127.0.0.1:$p" -w "$N" --balance steer \
        --ready notify --min-ready 0s --control "$TMP/$name" -- node "$APP" >/dev/null 2>&1 &
    PIDS+=($!)
    ADDRS+=("127.0.0.1:$p")
done
K=${#NAMES[@]}
for i in $(seq 0 $((K - 1))); do
    for _ in $(seq 100); do curl -sf "http://${ADDRS[$i]}/" >/dev/null && break; sleep 0.1; done
    got=$("$BIN" status "$TMP/${NAMES[$i]}" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["routing"])')
    [ "$got" = "${NAMES[$i]}" ] || { echo "routing is $got, not ${NAMES[$i]} (no CAP_BPF?)" >&2; exit 1; }
    wrk -t1 -c8 -d1s "http://${ADDRS[$i]}/work?ms=2" >/dev/null
done
LOAD=$(cut -d' ' -f1-3 /proc/loadavg)
: > "$TMP/raw"
for r in $(seq "$ROUNDS"); do
    for load in "keep-alive $((2 * N))" "keep-alive $((4 * N))" "close $((4 * N))"; do
        set -- $load
        hdr=()
        [ "$1" = close ] && hdr=(-H "Connection: close")
        for k in $(seq 0 $((K - 1))); do
            i=$(((k + r) % K))
            out=$(wrk -t1 -c"$2" -d3s --latency "${hdr[@]}" "http://${ADDRS[$i]}/work?ms=2")
            rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
            p99=$(echo "$out" | awk '$1 == "99%" {print $2}')
            printf '%s\t%s %s\t%s\t%s\t%s\n' "$r" "$1" "$2" "${NAMES[$i]}" "$rps" "$p99" >> "$TMP/raw"
        done
    done
done
python3 - "$TMP/raw" "$N" "$ROUNDS" "$LOAD" "$(cut -d' ' -f1-3 /proc/loadavg)" <<'PY'
import collections, statistics, sys
raw, n, rounds, load0, load1 = sys.argv[1:]
def ms(t):
    for unit, f in (("us", 1e-3), ("ms", 1.0), ("s", 1e3)):
        if t.endswith(unit):
            return float(t[: -len(unit)]) * f
    return float(t)
rows = collections.defaultdict(lambda: collections.defaultdict(list))
for line in open(raw):
    r, load, name, rps, p99 = line.rstrip("\n").split("\t")
    rows[load][name].append((float(rps), ms(p99)))
print(f"N={n} workers, {rounds} rounds of 3 s per contender and load, /work?ms=2, load average {load0} before, {load1} after.\n")
names = ["round-robin", "hash"]
print("| load (connections) | " + " | ".join(f"{x} req/s" for x in names) + " | hash ÷ round-robin | "
      + " | ".join(f"{x} p99" for x in names) + " |")
print("|---|" + "---|" * (3 * len(names) - 1))
for load, by in rows.items():
    med = lambda xs, j: statistics.median(x[j] for x in xs)
    ratio = lambda x: statistics.median(b[0] / a[0] for a, b in zip(by["round-robin"], by[x]))
    print(f"| {load} | " + " | ".join(f"{med(by[x], 0):.0f}" for x in names)
          + f" | {ratio('hash'):.3f}× | "
          + " | ".join(f"{med(by[x], 1):.1f} ms" for x in names) + " |")
PY
