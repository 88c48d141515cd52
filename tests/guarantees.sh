#!/usr/bin/env bash
# Runs the fault-injection and reload tests RUNS times and prints the table of
# docs/guarantees.md from their GUARANTEE lines (fault, injection, requests sent, failed).
#   tests/guarantees.sh [RUNS]     (default 3)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for _ in $(seq "$runs"); do
  cargo test --quiet --test run --test faults --test rollout --test steer -- --nocapture 2>&1 | grep -o 'GUARANTEE|.*' >>"$log"
done
echo "| fault | how injected | runs | requests sent | requests failed | stale keep-alive retries | outcome |"
echo "|---|---|---|---|---|---|---|"
awk -F'|' '{k=$2; inj[k]=$3; out[k]=$7; n[k]++; sent[k]+=$4; failed[k]+=$5; retried[k]+=$6}
  END {for (k in n) printf "| %s | %s | %d | %d | %d | %d | %s |\n", k, inj[k], n[k], sent[k], failed[k], retried[k], out[k]}' "$log" | sort
