# Shared by the benchmark scripts: `source "$(dirname "$0")/../lib.sh"`.
# Sets $bin to the `stampede` binary of the cargo profile $PROFILE (default release;
# `production` is the deploy build, see Cargo.toml) wherever cargo builds it
# (CARGO_TARGET_DIR is honoured) or to $STAMPEDE_BIN, and stops with a hint when it is
# missing.
bench_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
target_dir=$(cd "$bench_root" && cargo metadata --format-version 1 --no-deps | sed -E 's/.*"target_directory":"([^"]+)".*/\1/')
bin=${STAMPEDE_BIN:-$target_dir/${PROFILE:-release}/stampede}
[ -x "$bin" ] || { echo "build it first: cargo build --profile ${PROFILE:-release} -p stampede (looked for $bin)" >&2; exit 2; }

# needs_wrk: stops with an install hint when wrk is missing.
needs_wrk() { command -v wrk >/dev/null || { echo "needs wrk (Debian/Ubuntu: apt-get install wrk)" >&2; exit 2; }; }

# needs_python3: stops with an install hint when python3 (which reads the runs' reports
# and /metrics) is missing, before a run that would need it at its end.
needs_python3() { command -v python3 >/dev/null || { echo "needs python3 (Debian/Ubuntu: apt-get install python3)" >&2; exit 2; }; }

# start_with_sale ACK [serve args...]: (re)starts `stampede serve` on 127.0.0.1:$port with a
# fresh data directory under $work, waits for /healthz, then creates a product and a sale
# of 10^9 units (at most 1,000 per shopper) running for two hours. Sets $pid and exports
# $SALE. Needs $work, $port, STAMPEDE_ADMIN_TOKEN and STAMPEDE_JWT_SECRET. A caller that
# sets the array serve_wrapper (e.g. to valgrind and its flags) has the server run under
# it; the wait for /healthz lasts while the process lives, up to a minute.
start_with_sale() {
  local ack=$1; shift
  local base=http://127.0.0.1:$port now ends
  if [ -n "${pid:-}" ]; then kill "$pid"; wait "$pid" 2>/dev/null || true; fi
  rm -rf "$work/data"
  ${serve_wrapper[@]+"${serve_wrapper[@]}"} \
    "$bin" serve --listen "127.0.0.1:$port" --data-dir "$work/data" --ack "$ack" --log warn "$@" >/dev/null &
  pid=$!
  for _ in $(seq 600); do
    curl -sf "$base/healthz" >/dev/null && break
    kill -0 "$pid" 2>/dev/null || { echo "stampede serve exited before it answered" >&2; return 1; }
    sleep 0.1
  done
  now=$(date -u +%Y-%m-%dT%H:%M:%SZ); ends=$(date -u -d '+2 hours' +%Y-%m-%dT%H:%M:%SZ)
  curl -sf -X POST "$base/v1/products" -H "Authorization: Bearer $STAMPEDE_ADMIN_TOKEN" \
    -H 'Content-Type: application/json' \
    -d '{"sku":"BENCH","name":"bench","price_cents":100,"stock":1000000000}' >/dev/null
  SALE=$(curl -sf -X POST "$base/v1/flash-sales" -H "Authorization: Bearer $STAMPEDE_ADMIN_TOKEN" \
    -H 'Content-Type: application/json' \
    -d "{\"sku\":\"BENCH\",\"price_cents\":50,\"quantity\":1000000000,\"per_user_limit\":1000,\"starts_at\":\"$now\",\"ends_at\":\"$ends\"}" \
    | sed -E 's/.*"id":"([^"]+)".*/\1/')
  export SALE
}

# with_workdir: a scratch directory in $work, removed at exit with the server in $pid.
with_workdir() {
  work=$(mktemp -d)
  pid=
  trap 'if [ -n "$pid" ]; then kill "$pid" 2>/dev/null; fi; wait 2>/dev/null; rm -rf "$work"' EXIT
}

# with_shoppers: the bench secrets in the environment and $SHOPPERS (default 20,000)
# shopper tokens in the file $TOKENS (what bench/server/load.lua reads). wrk cycles
# through them, so a run longer than $SHOPPERS requests reuses tokens, which the server
# has verified and cached; a flash sale of shoppers who each buy once verifies every one.
with_shoppers() {
  export STAMPEDE_ADMIN_TOKEN=bench-admin-token-0123456789 STAMPEDE_JWT_SECRET=bench-jwt-secret-0123456789abcdef
  "$bin" token --sub shopper --count "${SHOPPERS:-20000}" --data-dir "$work/tokens-dir" > "$work/tokens"
  export TOKENS=$work/tokens
}

# machine_cpu: the machine's CPU counters (the "cpu" line of /proc/stat). Two readings
# around a run go to machine_report.
machine_cpu() { awk '/^cpu / {print $2 + $3, $4 + $7 + $8, $5, $6, $9}' /proc/stat; }

# machine_report BEFORE AFTER: the share of the machine's CPU time during the run that
# was user, system, idle, I/O wait and steal (time the hypervisor gave these vCPUs to
# something else). Steal and a busy machine are what make latency tails noisy here.
machine_report() {
  awk -v a="$1" -v b="$2" 'BEGIN {
    split(a, x, " "); split(b, y, " "); t = 0
    for (i = 1; i <= 5; i++) { d[i] = y[i] - x[i]; t += d[i] }
    if (t > 0) printf "  machine: user %.0f%%  system %.0f%%  idle %.0f%%  iowait %.0f%%  steal %.0f%%\n",
      100 * d[1] / t, 100 * d[2] / t, 100 * d[3] / t, 100 * d[4] / t, 100 * d[5] / t }'
}
