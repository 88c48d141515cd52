#!/usr/bin/env bash
# Unchanged apps (issue 23): what bind interception costs and what it buys, in one run (~5 min).
#
#   bench/run.sh --only unchanged     (installs wrk and PM2 first, then runs this)
#   bench/unchanged.sh [--no-write]   (needs wrk, node and bench/.deps/node_modules/.bin/pm2;
#                                      the work is bench/unchanged.py's)
#
# 1. Data path: the seed's app unchanged (`listen(PORT)`) under `--bind-intercept on` against the
#    same server on fd 3 (`listen({fd:3})`) under `off`, a second identical fd-3 instance (the
#    noise), and the fd-3 app under `on` (the filter alone); each measured at the same time as
#    the fd-3 `off` one (two wrk at once), ratios of req/s.
# 2. Spawn time, `herdsman run -w 4` until `status --json` shows 4 ready: interception on vs off.
# 3. Failed requests per 3 reloads of the seed's handler-less app under new-connection load:
#    `--balance shared`, `--balance steer`, PM2 cluster mode (`pm2 reload`).
# 4. Reload wall time with defaults, 2, 4 and 8 workers: `herdsman reload` beside `pm2 reload`.
#
# Prints each table as it is measured, then writes docs/bench-unchanged.md and replaces that
# section of docs/benchmarks.md (between its `unchanged:begin`/`unchanged:end` markers; added
# before "## Reproduce" the first time). --no-write only prints. Environment knobs (defaults in
# bench/unchanged.py): UNCHANGED_ROUNDS, UNCHANGED_SLICE, UNCHANGED_DP_WORKERS, UNCHANGED_SPAWNS,
# UNCHANGED_FAIL_ROUNDS, UNCHANGED_WALL_RELOADS; UNCHANGED_NOTE adds a note under the heading.
#
# Uses 127.0.0.1 and free ports only, a scratch directory and a private PM2_HOME; at exit
# (also on an error, Ctrl-C or SIGTERM) bench/unchanged.py stops every supervisor and wrk it
# started, by pid, and kills its PM2 daemon.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
cargo build --release --locked --quiet
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/herdsman
PM2=$ROOT/bench/.deps/node_modules/.bin/pm2
for need in wrk node "$PM2"; do
    command -v "$need" >/dev/null || { echo "bench/unchanged.sh: $need is missing; run bench/run.sh --only unchanged (it installs wrk and PM2)" >&2; exit 1; }
done
COMMIT=$(git rev-parse --short HEAD)
git diff --quiet HEAD -- src Cargo.toml Cargo.lock || COMMIT="$COMMIT (+ local changes)"
export UNCHANGED_COMMIT=$COMMIT
UNCHANGED_PM2=$(node -p "require('$ROOT/bench/.deps/node_modules/pm2/package.json').version")
export UNCHANGED_PM2
exec python3 bench/unchanged.py "$BIN" "$PM2" "$@"
