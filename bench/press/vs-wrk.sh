#!/usr/bin/env bash
# Generator benchmark: the request rate `stampede press --scenario healthz` sustains
# with 64 connections, as a ratio to wrk (1 thread, 64 connections) against the same
# server's /healthz, alternating in one run so both see the same machine.
#
#   cargo build --release -p stampede && bench/press/vs-wrk.sh
#
# Environment: DURATION (default 10s), ROUNDS (default 3), CONNECTIONS (default 64),
# STAMPEDE_BIN.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=../lib.sh
source "$here/../lib.sh"
needs_wrk
duration=${DURATION:-10s}
rounds=${ROUNDS:-3}
connections=${CONNECTIONS:-64}
port=${PORT:-18182}
base=http://127.0.0.1:$port
with_workdir

"$bin" serve --listen 127.0.0.1:$port --data-dir "$work/data" --log warn >/dev/null &
pid=$!
for _ in $(seq 100); do curl -sf $base/healthz >/dev/null && break; sleep 0.1; done

wrk_rps() { wrk -t1 -c"$connections" -d"$duration" "$base/healthz" | awk '/Requests\/sec/ {printf "%.0f", $2}'; }
press_rps() { # threads
  "$bin" press --target "$base" --scenario healthz --vus "$connections" --connections "$connections" \
    --duration "$duration" --threads "$1" --quiet --scrape-every 0s --json "$work/press.json" >/dev/null
  sed -nE 's/^  "achieved_rps": ([0-9.]+),?$/\1/p' "$work/press.json" | head -1 | awk '{printf "%.0f", $1}'
}

printf "%-6s %10s %14s %14s %8s %8s\n" round wrk press_1thread press_2threads ratio_1 ratio_2
for r in $(seq "$rounds"); do
  w=$(wrk_rps); p1=$(press_rps 1); p2=$(press_rps 2)
  printf "%-6s %10s %14s %14s %8.2f %8.2f\n" "$r" "$w" "$p1" "$p2" \
    "$(echo "$p1 / $w" | bc -l)" "$(echo "$p2 / $w" | bc -l)"
done
