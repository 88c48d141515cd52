#!/usr/bin/env bash
# Unchanged apps (issue 23): what bind interception costs and what it buys, in one run (~5 min).
#
#   bench/run.sh --only unchanged     (installs wrk and PM2 first, then runs this)
#   bench/unchanged.sh [--no-write]   (needs wrk, node and bench/.deps/node_modules/.bin/pm2)
#
# 1. Data path: the seed's app unchanged (`listen(PORT)`) under `--bind-intercept on` against the
#    same server on fd 3 (`listen({fd:3})`) under `off`, a second identical fd-3 instance (the
#    noise), and the fd-3 app under `on` (the filter alone); wrk, alternating slices, ratios.
# 2. Spawn time, `herdsman run -w 4` until `status --json` shows 4 ready: interception on vs off.
# 3. Failed requests per 3 reloads of the seed's handler-less app under new-connection load:
#    `--balance shared`, `--balance steer`, PM2 cluster mode (`pm2 reload`).
# 4. Reload wall time with defaults, 2, 4 and 8 workers: `herdsman reload` beside `pm2 reload`.
#
# Prints each table as it is measured, then writes docs/bench-unchanged.md and replaces that
# section of docs/benchmarks.md (between its `unchanged:begin`/`unchanged:end` markers; added
# before "## Reproduce" the first time). --no-write only prints. Environment knobs (defaults in
# bench/unchanged.py): UNCHANGED_ROUNDS, UNCHANGED_SLICE, UNCHANGED_SPAWNS,
# UNCHANGED_FAIL_ROUNDS, UNCHANGED_WALL_RELOADS.
#
# Uses 127.0.0.1 and free ports only, a scratch directory and a private PM2_HOME; at exit
# (also on Ctrl-C) stops every supervisor it started, by pid, and kills its PM2 daemon.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WRITE=1
[ "${1:-}" = "--no-write" ] && WRITE=0
cargo build --release --locked --quiet
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/herdsman
PM2=$ROOT/bench/.deps/node_modules/.bin/pm2
for need in wrk node "$PM2"; do
    command -v "$need" >/dev/null || { echo "bench/unchanged.sh: $need is missing; run bench/run.sh --only unchanged (it installs wrk and PM2)" >&2; exit 1; }
done
TMP=$(mktemp -d "${TMPDIR:-/tmp}/herdsman-bench-unchanged.XXXXXX")
PY=
cleanup() {
    trap - EXIT INT TERM
    [ -n "$PY" ] && kill -TERM "$PY" 2>/dev/null && wait "$PY" 2>/dev/null
    if [ -f "$TMP/pids" ]; then
        while read -r p; do kill -INT "$p" 2>/dev/null || true; done < "$TMP/pids"
        sleep 1
        while read -r p; do kill -KILL "$p" 2>/dev/null || true; done < "$TMP/pids"
    fi
    [ -d "$TMP/pm2-home" ] && PM2_HOME="$TMP/pm2-home" "$PM2" kill >/dev/null 2>&1 || true
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

COMMIT=$(git rev-parse --short HEAD)
git diff --quiet HEAD -- src Cargo.toml Cargo.lock || COMMIT="$COMMIT (+ local changes)"
export UNCHANGED_COMMIT=$COMMIT
export UNCHANGED_PM2=$(node -p "require('$ROOT/bench/.deps/node_modules/pm2/package.json').version")
python3 bench/unchanged.py "$BIN" "$PM2" "$TMP" "$TMP/section.md" &
PY=$!
wait "$PY"
PY=
[ "$WRITE" = 1 ] || exit 0
cp "$TMP/section.md" docs/bench-unchanged.md
python3 - docs/benchmarks.md docs/bench-unchanged.md <<'PY'
import sys
page_path, section_path = sys.argv[1:]
page, section = open(page_path).read(), open(section_path).read()
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
open(page_path, "w").write(page)
PY
echo "[unchanged] wrote docs/bench-unchanged.md and its section of docs/benchmarks.md" >&2
