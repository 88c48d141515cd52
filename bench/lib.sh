# Shared set-up of the bench scripts that run their own contenders (queues.sh, routing.sh):
# builds herdsman (release), sets ROOT, BIN, APP, a scratch TMP and PIDS (every process
# started, stopped with SIGINT at exit), and `port` (a free 127.0.0.1 port). Sourced with the
# scratch directory's name: `. bench/lib.sh NAME`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
cargo build --release --quiet
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/herdsman
APP=$ROOT/bench/apps/node-app.js
TMP=$(mktemp -d "${TMPDIR:-/tmp}/herdsman-bench-$1.XXXXXX")
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill -INT "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$TMP"
}
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
