#!/usr/bin/env bash
# Restart benchmark: how long a server takes from its start to a 200 on /readyz, and its
# resident memory then, over a data directory holding ORDERS orders (default 1,000,000) of
# as many shoppers, all paid, of one sale that ended two days ago (RUNNING=1: of a sale
# still running, whose idempotency answers a restart keeps). The orders are written
# straight into the SQLite file (sqlite3), after a server has made the product and sale.
# With A and B set to two builds, restarts them alternately ROUNDS times (default 3) on
# the same directory, so two builds are compared side by side on the same machine.
#
#   cargo build --release -p stampede && bench/server/restart.sh
#   A=old/stampede B=new/stampede ORDERS=1000000 bench/server/restart.sh
#
# Environment: A, B (binaries; default the release build alone), ROUNDS, ORDERS, RUNNING,
# STAMPEDE_BIN.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=../lib.sh
source "$here/../lib.sh"
command -v sqlite3 >/dev/null || { echo "needs sqlite3 (Debian/Ubuntu: apt-get install sqlite3)" >&2; exit 2; }
orders=${ORDERS:-1000000}
rounds=${ROUNDS:-3}
builds=("${A:-$bin}")
[ -n "${B:-}" ] && builds+=("$B")
export STAMPEDE_ADMIN_TOKEN=${STAMPEDE_ADMIN_TOKEN:-bench-admin-token-0123456789}
export STAMPEDE_JWT_SECRET=${STAMPEDE_JWT_SECRET:-bench-jwt-secret-0123456789abcdef}
port=18392 base=http://127.0.0.1:18392
work=$(mktemp -d)
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

# The product and sale, made by a server; then the orders, written into its file.
"${builds[0]}" serve --listen "127.0.0.1:$port" --data-dir "$work/data" --log warn >/dev/null &
pid=$!
for _ in $(seq 100); do curl -sf "$base/readyz" >/dev/null && break; sleep 0.1; done
auth="Authorization: Bearer $STAMPEDE_ADMIN_TOKEN"
curl -sf -X POST "$base/v1/products" -H "$auth" -H 'Content-Type: application/json' \
  -d "{\"sku\":\"RESTART\",\"name\":\"restart\",\"price_cents\":100,\"stock\":$orders}" >/dev/null
curl -sf -X POST "$base/v1/flash-sales" -H "$auth" -H 'Content-Type: application/json' \
  -d "{\"sku\":\"RESTART\",\"price_cents\":50,\"quantity\":$orders,\"per_user_limit\":1,\"starts_at\":\"$(date -u +%Y-%m-%dT%H:%M:%SZ)\",\"ends_at\":\"$(date -u -d '+2 hours' +%Y-%m-%dT%H:%M:%SZ)\"}" >/dev/null
kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
now_ms=$(($(date +%s) * 1000))
created=$((now_ms - 3 * 86400000))
ends=$([ "${RUNNING:-0}" = 1 ] && echo $((now_ms + 7200000)) || echo $((now_ms - 2 * 86400000)))
sqlite3 "$work/data/stampede.db" <<SQL
UPDATE flash_sales SET starts_at_ms = $created, ends_at_ms = $ends;
WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < $orders - 1)
INSERT INTO orders SELECT printf('ord_0190%08x7000%016x', i, i), 'shopper-' || i,
  (SELECT id FROM flash_sales), 'RESTART', 1, 50, 'paid', 'key-' || i,
  $created + i, $created + 900000 + i, $created + i FROM n;
SQL
echo "$orders paid orders of a sale that $([ "${RUNNING:-0}" = 1 ] && echo "is still running" || echo "ended two days ago")"

for round in $(seq "$rounds"); do
  for build in "${builds[@]}"; do
    started=$(date +%s%N)
    "$build" serve --listen "127.0.0.1:$port" --data-dir "$work/data" --log warn >/dev/null 2>>"$work/serve.log" &
    pid=$!
    until curl -sf "$base/readyz" >/dev/null; do
      kill -0 "$pid" 2>/dev/null || { echo "$build exited before it was ready" >&2; exit 1; }
      sleep 0.02
    done
    ready=$(date +%s%N)
    rss=$(awk '/VmRSS/ {print int($2 / 1024)}' "/proc/$pid/status")
    printf 'round %d  %-60s ready after %6.2f s, RSS %5d MiB\n' "$round" "$build" \
      "$(echo "($ready - $started) / 1000000000" | bc -l)" "$rss"
    kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
  done
done
