#!/usr/bin/env bash
# Capacity ratio: the most durable purchases per second the server reaches against the
# most /healthz it answers, each found over the same sweep of connection counts with
# the same load generator (wrk, 1 thread), in one run. Group commit needs purchases in
# flight to fill its batches, so a single connection count can understate one side;
# the sweep shows every row and the ratio is of the two maxima.
#
# /healthz is measured twice: a static request (wrk's cheapest path, no Lua) and one
# handed over by the same Lua script that hands over the purchases
# (bench/server/load.lua, TARGET=healthz), so the generator spends the same per request
# on both sides of the second ratio. The script builds its requests before the run, so
# a purchase costs the generator about what a static request does. Both ratios are
# printed, and beside them the purchases answered with `--ack reserved` (a fresh server
# each). Only 2xx answers count: a row with any refusal or socket error stops the run,
# except a refusal of the reserved column, which is counted and shown beside it.
#
#   cargo build --profile production -p stampede && PROFILE=production bench/server/capacity.sh
#
# Then, when RATE_CHECK is not 0, the open model at half the durable maximum:
# `stampede press --rate <half>/s` against a fresh server, latency from each request's
# scheduled send, so a slow answer cannot slow the arrivals down. Beside it, the server's
# own view of the same purchases (bench/server_side.py, from its /metrics before and
# after): the time it took to serve them, their wait for the writer and the commits, so
# a tail made by the generator sharing the machine can be told from one the server made.
#
# PIN=1 runs the server on CPU 0 alone (one request worker) and the generators on CPU 1
# (taskset), standing in for a generator on another machine: neither takes the other's
# CPU in bursts.
#
# Environment: DURATION (default 8s), SWEEP (default "64 256 512 1024"), ROUNDS
# (default 1: the sweep is repeated, alternating healthz and purchases), RATE_CHECK
# (default 1), HALF_RATE (default: half the durable maximum), PIN (default 0),
# STAMPEDE_BIN, SERVE_ARGS.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=../lib.sh
source "$here/../lib.sh"
needs_wrk
needs_python3
duration=${DURATION:-8s}
sweep=${SWEEP:-64 256 512 1024}
rounds=${ROUNDS:-1}
port=${PORT:-18181}
base=http://127.0.0.1:$port
# wrk opens one socket per connection; the server one more each.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
with_workdir
with_shoppers
gen=() press_args=()
if [ "${PIN:-0}" = 1 ]; then
  command -v taskset >/dev/null || { echo "PIN=1 needs taskset (util-linux)" >&2; exit 2; }
  # shellcheck disable=SC2034 # read by start_with_sale in lib.sh
  serve_wrapper=(taskset -c 0)
  gen=(taskset -c 1)
  press_args=(--threads 1)
  SERVE_ARGS="--worker-threads 1 ${SERVE_ARGS:-}"
fi

# wrk_rps CONNECTIONS WRK_ARGS...: one wrk run; its 2xx answers a second. A run with
# any other answer (a 503 `overloaded`, a 429) or a socket error stops the script: a
# refusal is cheaper than a purchase, so counting it would flatter the ratio. The
# load.lua runs also leave their RESULT line (latency percentiles) in $work/line.
# REFUSALS_COUNTED=1 (the `--ack reserved` column) lets a run with refusals go on: its
# 2xx a second still count alone, and the refusals are kept in $work/refused. Answered
# once enqueued, 1,024 clients outrun the writer, and its full queue refusing the rest
# is that mode's limit, not a failure.
wrk_rps() {
  local c=$1; shift
  local out
  out=$(${gen[@]+"${gen[@]}"} wrk -t1 -c"$c" -d"$duration" "$@")
  if grep '^RESULT' <<<"$out" > "$work/line"; then
    sed -E 's/.* non2xx=([0-9]+).*/\1/' "$work/line" > "$work/refused"
    if [ "${REFUSALS_COUNTED:-0}" = 1 ]; then
      grep -q ' errors=0 ' "$work/line" ||
        { echo "socket errors at $c connections: $(cat "$work/line")" >&2; exit 1; }
    else
      grep -q ' non2xx=0 errors=0 ' "$work/line" ||
        { echo "not every answer was a 2xx at $c connections: $(cat "$work/line")" >&2; exit 1; }
    fi
    sed -E 's/.* ok_rps=([0-9]+).*/\1/' "$work/line"
  else # the static request: wrk's own summary
    if grep -qE 'Non-2xx|Socket errors' <<<"$out"; then
      echo "not every answer was a 2xx at $c connections: $out" >&2; exit 1
    fi
    awk '/Requests\/sec/ {printf "%.0f\n", $2}' <<<"$out"
  fi
}

# check_books: the sale's audit is consistent (the sale holds far more than a run buys,
# so no purchase is refused for stock and each 2xx is a unit sold).
check_books() {
  local audit
  audit=$(curl -sf "$base/v1/flash-sales/$SALE/audit" -H "Authorization: Bearer $STAMPEDE_ADMIN_TOKEN")
  grep -q '"consistent":true' <<<"$audit" || { echo "audit not consistent: $audit" >&2; exit 1; }
}

best_static=0 best_lua=0 best_durable=0 best_reserved=0
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a / b}'; }
printf '%-6s %-12s %14s %12s %10s %8s %8s %10s\n' round connections "healthz static" "healthz Lua" durable "÷static" "÷Lua" reserved
for round in $(seq "$rounds"); do
  for c in $sweep; do
    # A fresh server per row: its maps start as empty as they would at 00:00 (/healthz
    # touches none of them).
    # shellcheck disable=SC2086 # SERVE_ARGS is a list of flags
    start_with_sale durable ${SERVE_ARGS:-}
    h=$(wrk_rps "$c" "$base/healthz")
    l=$(TARGET=healthz wrk_rps "$c" -s "$here/load.lua" "$base/healthz")
    d=$(TARGET=purchase wrk_rps "$c" -s "$here/load.lua" "$base/healthz")
    check_books
    durable_line=$(sed -E 's/.*(p50_ms=[^ ]+).*(p99_ms=[^ ]+).*/\1 \2/' "$work/line")
    # The same purchases answered once reserved (no wait for the commit), fresh server.
    # shellcheck disable=SC2086
    start_with_sale reserved ${SERVE_ARGS:-}
    r=$(REFUSALS_COUNTED=1 TARGET=purchase wrk_rps "$c" -s "$here/load.lua" "$base/healthz")
    refused=$(cat "$work/refused")
    check_books
    printf '%-6s %-12s %14s %12s %10s %8s %8s %10s   durable %s%s\n' "$round" "$c" "$h" "$l" "$d" \
      "$(ratio "$d" "$h")" "$(ratio "$d" "$l")" "$r" "$durable_line" \
      "$([ "$refused" = 0 ] || echo "; reserved: $refused refused (its queue full)")"
    [ "$h" -gt "$best_static" ] && best_static=$h
    [ "$l" -gt "$best_lua" ] && best_lua=$l
    [ "$d" -gt "$best_durable" ] && best_durable=$d
    [ "$r" -gt "$best_reserved" ] && best_reserved=$r
  done
done
echo "maximum: healthz $best_static/s static, $best_lua/s Lua-built; durable purchases $best_durable/s, reserved $best_reserved/s"
echo "ratio of maxima: $(ratio "$best_durable" "$best_static") to static healthz, $(ratio "$best_durable" "$best_lua") to Lua-built healthz;" \
  "--ack reserved $(ratio "$best_reserved" "$best_static") and $(ratio "$best_reserved" "$best_lua")"

[ "${RATE_CHECK:-1}" = 0 ] && exit 0
half=${HALF_RATE:-$((best_durable / 2))}
# shellcheck disable=SC2086
start_with_sale durable ${SERVE_ARGS:-}
echo "open model at $half/s (half the durable maximum), durable purchases:"
curl -sf "$base/metrics" > "$work/open.before"
${gen[@]+"${gen[@]}"} "$bin" press --target "$base" --scenario "$here/purchase.toml" --rate "$half/s" \
  --duration "${RATE_DURATION:-10s}" --connections 256 ${press_args[@]+"${press_args[@]}"} 2>&1 |
  grep -E 'req/s|sessions:|latency from scheduled send|books' || true
curl -sf "$base/metrics" > "$work/open.after"
printf '  '
PYTHONDONTWRITEBYTECODE=1 python3 "$here/../server_side.py" "$work/open.before" "$work/open.after"
