#!/usr/bin/env bash
# What the order-event stream costs the sale, and whether it keeps up: durable
# purchases per second through `stampede serve` without and with `--nats-url` (the
# transactional outbox plus the relay publishing to JetStream in the same process),
# alternating, same generator (wrk + bench/server/load.lua), one run. With NATS it also
# reads, from /metrics, how many of the sold orders' events were still unpublished when
# the load stopped and how long the relay took to publish the rest.
#
# Then the open model at fixed rates (`stampede press --rate`, default half the best
# rate without events measured above), without and with NATS: whether the stream keeps
# up at a rate the server carries, by the relay's largest lag while the load ran
# (`stampede_relay_lag_seconds`, the age of the oldest event still waiting, sampled
# every 0.5 s) and the events unpublished at the scheduled end of the load.
#
#   cargo build --release -p stampede && bench/server/events.sh
#
# Environment: DURATION (default 10s; seconds, with the s), CONNECTIONS (default "256 1024"), ROUNDS
# (default 2), RATES (default: half the best rate without events), NATS_URL (default nats://127.0.0.1:4222, JetStream on), STAMPEDE_BIN,
# PROFILE.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=../lib.sh
source "$here/../lib.sh"
needs_wrk
needs_python3
duration=${DURATION:-10s}
connections=${CONNECTIONS:-256 1024}
rounds=${ROUNDS:-2}
nats_url=${NATS_URL:-nats://127.0.0.1:4222}
port=${PORT:-18183}
base=http://127.0.0.1:$port
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
with_workdir
with_shoppers

# metric NAME: the value of a counter in /metrics (0 when absent).
metric() {
  curl -sf "$base/metrics" | awk -v name="$1" '$1 == name {print $2; found = 1} END {if (!found) print 0}'
}
# sold: orders placed so far (every purchase is one unit), from the sale's audit.
sold() {
  curl -sf "$base/v1/flash-sales/$SALE/audit" -H "Authorization: Bearer $STAMPEDE_ADMIN_TOKEN" |
    python3 -c 'import json, sys; a = json.load(sys.stdin); assert a["consistent"], a; print(a["pending_payment"] + a["paid"])'
}
# catch_up ORDERS: waits until the relay has published ORDERS events; prints how long.
catch_up() {
  local from
  from=$(date +%s.%N)
  while awk -v o="$1" -v p="$(metric stampede_relay_published_total)" 'BEGIN {exit !(p < o)}'; do
    sleep 0.05
  done
  awk -v s="$from" -v e="$(date +%s.%N)" 'BEGIN {printf "%.2f s", e - s}'
}

# delete_stream NAME: removes a JetStream stream through the NATS protocol itself (the
# JetStream API subject), best effort, so the runs leave nothing in the server.
delete_stream() {
  local hostport=${nats_url#nats://}
  {
    exec 3<>"/dev/tcp/${hostport%:*}/${hostport##*:}" &&
      printf 'CONNECT {"verbose":false}\r\nPUB $JS.API.STREAM.DELETE.%s 0\r\n\r\nPING\r\n' "$1" >&3 &&
      timeout 2 grep -q -m1 PONG <&3
    exec 3>&-
  } 2>/dev/null || true
}

printf '%-6s %-12s %12s %12s %8s %22s %14s\n' round connections "no events/s" "events/s" "÷" "unpublished at stop" "published in"
for round in $(seq "$rounds"); do
  for c in $connections; do
    start_with_sale durable
    plain=$(TARGET=purchase wrk -t1 -c"$c" -d"$duration" -s "$here/load.lua" "$base/healthz" |
      sed -nE 's/^RESULT.* rps=([0-9]+).*/\1/p')
    # A stream of this run's own, removed at the end.
    stream="STAMPEDE_BENCH_$$_${round}_$c"
    start_with_sale durable --nats-url "$nats_url" --nats-stream "$stream" --nats-subject-prefix "bench_$$_${round}_$c.orders"
    events=$(TARGET=purchase wrk -t1 -c"$c" -d"$duration" -s "$here/load.lua" "$base/healthz" |
      sed -nE 's/^RESULT.* rps=([0-9]+).*/\1/p')
    orders=$(sold)
    published=$(metric stampede_relay_published_total)
    waiting=$(awk -v o="$orders" -v p="$published" 'BEGIN {print (o > p ? o - p : 0)}')
    took=$(catch_up "$orders")
    printf '%-6s %-12s %12s %12s %8s %22s %14s\n' "$round" "$c" "$plain" "$events" \
      "$(awk -v a="$events" -v b="$plain" 'BEGIN {printf "%.2f", a / b}')" \
      "$waiting of $orders" "$took"
    delete_stream "$stream"
    [ "$plain" -gt "${best_plain:-0}" ] && best_plain=$plain
  done
done

rates=${RATES:-$((best_plain / 2))}
echo
# press_at RATE: the open model at RATE against the server on $base; sets $achieved
# (requests/s) and $p99 (ms from the scheduled send). While it runs, samples the relay's
# lag every 0.5 s into $max_lag (seconds), and at the scheduled end of the load (press
# may drain longer when the server fell behind) the events not yet published into
# $waiting_at_end ("n of orders").
press_at() {
  local seconds=${duration%s} started press_pid lag orders
  max_lag=0 waiting_at_end=
  started=$(date +%s.%N)
  "$bin" press --target "$base" --scenario "$here/purchase.toml" --rate "$1/s" \
    --duration "$duration" --connections 256 > "$work/press.out" 2>&1 &
  press_pid=$!
  while kill -0 "$press_pid" 2>/dev/null; do
    lag=$(metric stampede_relay_lag_seconds)
    max_lag=$(awk -v a="$max_lag" -v b="$lag" 'BEGIN {print (b > a ? b : a)}')
    if [ -z "$waiting_at_end" ] && awk -v s="$started" -v n="$(date +%s.%N)" -v d="$seconds" 'BEGIN {exit !(n - s >= d)}'; then
      orders=$(metric 'stampede_purchases_total{outcome="placed"}')
      waiting_at_end="$(awk -v o="$orders" -v p="$(metric stampede_relay_published_total)" 'BEGIN {print (o > p ? o - p : 0)}') of $orders"
    fi
    sleep 0.5
  done
  wait "$press_pid" || true
  achieved=$(sed -nE 's/.* ([0-9.]+) req\/s.*/\1/p' "$work/press.out" | head -1)
  p99=$(sed -nE 's/^  latency from scheduled send:.* p99 ([0-9.]+),.*/\1/p' "$work/press.out")
}

printf '%-8s %22s %22s %14s %26s %14s\n' rate/s "no events: /s, p99 ms" "events: /s, p99 ms" "lag, at most" "unpublished at the end" "all published"
for rate in $rates; do
  start_with_sale durable
  press_at "$rate"
  plain="$achieved, ${p99:-?}"
  stream="STAMPEDE_BENCH_$$_rate_$rate"
  start_with_sale durable --nats-url "$nats_url" --nats-stream "$stream" --nats-subject-prefix "bench_$$_rate_$rate.orders"
  press_at "$rate"
  orders=$(metric 'stampede_purchases_total{outcome="placed"}')
  took=$(catch_up "$orders")
  printf '%-8s %22s %22s %14s %26s %14s\n' "$rate" "$plain" "$achieved, ${p99:-?}" "${max_lag} s" "${waiting_at_end:-?}" "$took later"
  delete_stream "$stream"
done
