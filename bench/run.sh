#!/usr/bin/env bash
# herdsman's benchmark suite: one command.
#
#   bench/run.sh            full run (~20 min): writes docs/benchmarks.md and docs/bench-*.svg
#   bench/run.sh --quick    ~2 min smoke run: writes bench/results/quick/
#   bench/run.sh [--quick] --only throughput,reload,cost,recovery,scaling,balance [--out DIR]
#   bench/run.sh --only balance   section 7 alone (~15 min): replaces that section of docs/benchmarks.md
#   bench/run.sh --only unchanged bind interception on/off, reload failures and wall time beside
#                                 PM2 (issue 23, ~5 min): bench/unchanged.sh, docs/bench-unchanged.md
#
# Installs what it needs: wrk (Debian package), PM2 (npm, into bench/.deps, with a private
# PM2_HOME per run), builds herdsman (release) and the bench crate, then runs
# `herdsman-bench all`. Only 127.0.0.1 is used; every process started is stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PM2_VERSION=${PM2_VERSION:-7.0.4}

say() { printf '[run.sh] %s\n' "$*" >&2; }

if ! command -v wrk >/dev/null; then
    say "installing wrk"
    apt-get update -qq && apt-get install -y -qq wrk >/dev/null
fi
if ! command -v systemd-notify >/dev/null; then
    say "installing systemd (for systemd-notify)"
    apt-get update -qq && apt-get install -y -qq systemd >/dev/null
fi
command -v node >/dev/null || { say "node (20+) is required"; exit 1; }
if [ "$(node -p "try{require('$ROOT/bench/.deps/node_modules/pm2/package.json').version}catch(e){''}")" != "$PM2_VERSION" ]; then
    say "installing pm2@$PM2_VERSION into bench/.deps"
    mkdir -p bench/.deps
    npm install --silent --no-audit --no-fund --prefix bench/.deps "pm2@$PM2_VERSION" >/dev/null
fi
say "building herdsman and the bench (release)"
cargo build --release --quiet
# The unchanged-apps benchmark (issue 23) is a script of its own (~5 min, no load-average wait:
# it records the load it ran under): `--only unchanged` runs just it, prints its tables and
# replaces its section of docs/benchmarks.md (docs/bench-unchanged.md).
if [[ " $* " == *" --only unchanged "* ]]; then
    say "unchanged apps (bench/unchanged.sh)"
    exec bench/unchanged.sh
fi
cargo build --release --quiet --manifest-path bench/Cargo.toml

if [[ " $* " != *" --quick "* ]]; then
    # The full run wants a quiet machine: wait (up to 10 min) for the 1-minute load to drop below 1.0.
    for _ in $(seq 60); do
        load=$(cut -d' ' -f1 /proc/loadavg)
        awk -v l="$load" 'BEGIN { exit !(l < 1.0) }' && break
        say "1-minute load average is $load; waiting for it to drop below 1.0"
        sleep 10
    done
fi
# The metrics scrape benchmark is a script of its own: `--only metrics` runs just it (and
# prints its table; docs/bench-metrics.md keeps the published one, included in
# docs/benchmarks.md).
# The in-place upgrade benchmark is a script of its own too (docs/bench-upgrade.md, included in
# docs/benchmarks.md).
if [[ " $* " == *" --only upgrade "* ]]; then
    say "in-place upgrades (bench/upgrade.sh)"
    exec bench/upgrade.sh
fi
if [[ " $* " == *" --only metrics "* ]]; then
    say "metrics scrapes (bench/metrics.sh)"
    exec bench/metrics.sh
fi
bench/target/release/herdsman-bench all "$@" &
BENCH=$!

# On Ctrl-C / SIGTERM: stop everything the bench started (its process tree and the PM2 daemon
# in its private PM2_HOME), by pid.
descendants() { local c; for c in $(cat /proc/"$1"/task/*/children 2>/dev/null); do echo "$c"; descendants "$c"; done; }
cleanup() {
    trap - INT TERM
    say "interrupted: stopping the benchmark's processes"
    kill -STOP "$BENCH" 2>/dev/null || true
    local pids home
    pids=$(descendants "$BENCH")
    home="${TMPDIR:-/tmp}/herdsman-bench-$BENCH/pm2-home"
    [ -d "$home" ] && PM2_HOME="$home" bench/.deps/node_modules/.bin/pm2 kill >/dev/null 2>&1 || true
    [ -n "$pids" ] && kill -TERM $pids 2>/dev/null || true
    sleep 2
    [ -n "$pids" ] && kill -KILL $pids 2>/dev/null || true
    kill -KILL "$BENCH" 2>/dev/null || true
    rm -rf "${TMPDIR:-/tmp}/herdsman-bench-$BENCH"
    exit 130
}
trap cleanup INT TERM
wait "$BENCH"
