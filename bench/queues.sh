#!/usr/bin/env bash
# What per-worker accept queues cost on the data path (issue 12): `--balance steer` against
# the no-supervisor limit with ONE shared queue and against the same limit with a queue PER
# WORKER (N sockets in one SO_REUSEPORT group, no program: the kernel's flow hash picks) —
# the design `steer` needs, without herdsman. `steer` is the default, round robin (eBPF:
# needs root, or CAP_BPF, else it steps down and the table says to what); `steer hash` is
# the same with HERDSMAN_STEER_ROUTING=hash (the classic program). Also
# `--balance shared` and the limit measured again (the noise of one ratio).
#
#   bench/queues.sh [ROUNDS] [N]     (default 12 rounds of 4 s per contender and mode, N=2)
#
# Client: wrk -t1 -c32 from 127.0.0.1, keep-alive and a new connection per request, the
# order of the contenders rotated every round; each ratio is a contender's req/s over the
# limit's in the same round; the table shows the geometric mean of the rounds with its 95 %
# confidence interval. Node app: bench/apps/node-app.js (30-byte answer). Needs wrk, node.
# Builds herdsman and the bench in release mode; stops what it started (by pid) at the end.
ROUNDS=${1:-12}
N=${2:-2}
. "$(dirname "$0")/lib.sh" queues
cargo build --release --quiet --manifest-path bench/Cargo.toml
BENCH=$ROOT/bench/target/release/herdsman-bench

NAMES=(limit "limit again" reuseport shared steer "steer hash")
ADDRS=()
for name in "${NAMES[@]}"; do
    p=$(port)
    a="127.0.0.1:$p"
    case "$name" in
        limit|"limit again") "$BENCH" launch --listen "$a" -w "$N" -- node "$APP" >/dev/null 2>&1 & ;;
        reuseport) "$BENCH" launch --reuseport --listen "$a" -w "$N" -- node "$APP" >/dev/null 2>&1 & ;;
        *) HERDSMAN_STEER_ROUTING=$([ "$name" = "steer hash" ] && echo hash) \
           "$BIN" run --name "q$p" --listen "$a" -w "$N" --balance "${name%% *}" --ready notify --min-ready 0s \
               --control "$TMP/c$p" -- node "$APP" >/dev/null 2>&1 & ;;
    esac
    PIDS+=($!)
    ADDRS+=("$a")
    [ "$name" = steer ] && STEER_CONTROL=$TMP/c$p
done
# Every contender answers before the first slice (and warms its JIT).
for a in "${ADDRS[@]}"; do
    for _ in $(seq 100); do curl -sf "http://$a/" >/dev/null && break; sleep 0.1; done
    wrk -t1 -c32 -d1s "http://$a/" >/dev/null
done
ROUTING=$("$BIN" status "$STEER_CONTROL" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["routing"])')
LOAD=$(cut -d' ' -f1-3 /proc/loadavg)
: > "$TMP/raw"
for r in $(seq "$ROUNDS"); do
    for mode in keep-alive close; do
        hdr=()
        [ "$mode" = close ] && hdr=(-H "Connection: close")
        k=${#NAMES[@]}
        for i in $(seq 0 $((k - 1))); do
            j=$(((i + r) % k))
            rps=$(wrk -t1 -c32 -d4s "${hdr[@]}" "http://${ADDRS[$j]}/" | awk '/Requests\/sec/ {print $2}')
            printf '%s\t%s\t%s\t%s\n' "$r" "$mode" "${NAMES[$j]}" "$rps" >> "$TMP/raw"
        done
    done
done
python3 - "$TMP/raw" "$N" "$ROUNDS" "$LOAD" "$(cut -d' ' -f1-3 /proc/loadavg)" "$ROUTING" <<'PY'
import collections, math, sys
raw, n, rounds, load0, load1, routing = sys.argv[1:]
rps = collections.defaultdict(dict)
for line in open(raw):
    r, mode, name, v = line.rstrip("\n").split("\t")
    rps[(r, mode)][name] = float(v)
names = ["limit again", "reuseport", "shared", "steer", "steer hash"]
print(f"N={n}, {rounds} rounds of 4 s per contender and mode, load average {load0} before, {load1} after; steer routed by {routing}.\n")
print("| mode | limit req/s (median) | " + " | ".join(names) + " | steer ÷ reuseport |")
print("|---|---|" + "---|" * (len(names) + 1))
def gm(pairs):
    logs = [math.log(a / b) for a, b in pairs]
    m = sum(logs) / len(logs)
    sd = (sum((x - m) ** 2 for x in logs) / (len(logs) - 1)) ** 0.5 if len(logs) > 1 else 0
    h = 1.96 * sd / len(logs) ** 0.5
    return f"{math.exp(m):.3f}× ({math.exp(m - h):.3f}–{math.exp(m + h):.3f})"
for mode in ["keep-alive", "close"]:
    cells = [v for (r, m), v in rps.items() if m == mode]
    lim = sorted(c["limit"] for c in cells)[len(cells) // 2]
    row = [gm([(c[name], c["limit"]) for c in cells]) for name in names]
    row.append(gm([(c["steer"], c["reuseport"]) for c in cells]))
    label = "keep-alive" if mode == "keep-alive" else "new conn"
    print(f"| {label} | {lim:.0f} | " + " | ".join(row) + " |")
PY
