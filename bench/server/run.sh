#!/usr/bin/env bash
# Server benchmark: durable purchases per second as a ratio to the same server's
# /healthz, under the same load generator (wrk, 1 thread), in one run.
#
#   cargo build --release -p stampede && bench/server/run.sh
#
# Environment: DURATION (default 10s), CONNECTIONS (default 64), STAMPEDE_BIN.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=../lib.sh
source "$here/../lib.sh"
needs_wrk
duration=${DURATION:-10s}
connections=${CONNECTIONS:-64}
port=${PORT:-18181}
base=http://127.0.0.1:$port
with_workdir

with_shoppers

start() { # ack mode
  # shellcheck disable=SC2086 # SERVE_ARGS is a list of flags
  start_with_sale "$1" ${SERVE_ARGS:-}
}

run() { # label, wrk args...
  local label=$1; shift
  local out before
  before=$(machine_cpu)
  out=$(wrk -t1 -c"$connections" -d"$duration" "$@")
  local line
  line=$(grep '^RESULT' <<<"$out" || true)
  if [ -z "$line" ]; then
    line="RESULT rps=$(awk '/Requests\/sec/ {printf "%.0f", $2}' <<<"$out")"
  fi
  echo "$label $line"
  machine_report "$before" "$(machine_cpu)" >&2
}

start durable
run healthz_static "$base/healthz" | tee "$work/healthz"
TARGET=healthz run healthz_lua -s "$here/load.lua" "$base/healthz" | tee -a "$work/healthz"
run purchase_durable -s "$here/load.lua" "$base/healthz" | tee "$work/durable"
curl -sf "$base/v1/flash-sales/$SALE/audit" -H "Authorization: Bearer $STAMPEDE_ADMIN_TOKEN"; echo

# Latency at half the maximum rate: pace each connection so the offered load is about
# half of what purchase_durable reached.
max=$(sed -E 's/.* rps=([0-9]+).*/\1/' "$work/durable")
half=$((max / 2))
paced_connections=$((connections / 2))
# Each connection sends one request, waits DELAY_MS, and so on: rate ≈ conns×1000/delay.
delay=$(( (paced_connections * 1000 + half / 2) / (half > 0 ? half : 1) ))
[ "$delay" -lt 1 ] && delay=1
start durable
DELAY_MS=$delay run "purchase_durable_half_rate(target=${half}/s,delay=${delay}ms,conns=${paced_connections})" \
  -c"$paced_connections" -s "$here/load.lua" "$base/healthz"
curl -sf "$base/v1/flash-sales/$SALE/audit" -H "Authorization: Bearer $STAMPEDE_ADMIN_TOKEN"; echo

start reserved
run purchase_reserved -s "$here/load.lua" "$base/healthz"
