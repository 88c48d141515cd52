#!/usr/bin/env bash
# How long after READY=1 does a typical "ready too early" server die when its app is broken?
# The evidence behind the default `min_ready = "1s"` (docs/guarantees.md).
#
#   bench/late-crash.sh [RUNS]      (needs gunicorn: pip install gunicorn)
#
# gunicorn's arbiter sends READY=1 before its worker imports the app (unless --preload), so a
# deploy whose app raises at import passes a plain readiness gate. This runs gunicorn under
# herdsman with an infinite min_ready, breaks the app, and reloads RUNS times: each failure
# report says how long after READY=1 the new worker exited.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}
command -v gunicorn >/dev/null || { echo "gunicorn not found: pip install gunicorn" >&2; exit 2; }
cargo build --quiet
bin=$PWD/target/debug/herdsman
dir=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$dir"' EXIT
printf 'def app(environ, start_response):\n    start_response("200 OK", [])\n    return [b"ok"]\n' >"$dir/app.py"
"$bin" run -n latecrash --listen 127.0.0.1:0 -w 1 --ready notify --min-ready 1h \
    --control "$dir/c.sock" --cwd "$dir" -- gunicorn -w 1 --no-control-socket app:app >"$dir/log" 2>&1 &
pid=$!
for _ in $(seq 100); do "$bin" status "$dir/c.sock" --json 2>/dev/null | grep -q '"ready": 1' && break; sleep 0.1; done
printf 'raise RuntimeError("broken deploy")\n' >"$dir/app.py"
for _ in $(seq "$runs"); do
    "$bin" reload "$dir/c.sock" 2>&1 | grep -o 'exited with status [0-9]* [0-9.]*m\?s after it was ready' || true
done
