#!/usr/bin/env bash
# What the open model costs each side: the CPU per durable purchase of the server and of
# the pressure tool, per thread (user and system time, voluntary and involuntary context
# switches), while `stampede press --rate RATE/s` holds a fixed arrival rate against a
# fresh server. At a rate below the maximum each request arrives alone: it pays its own
# wake-ups on both sides instead of sharing them with a crowd, so the cost per request
# is not the closed loop's (bench/server/threads.sh) and the two processes share the
# machine's cores in that proportion.
#
#   cargo build --profile production -p stampede && PROFILE=production bench/server/open_cost.sh
#
# Read over the middle 6 s of a 12 s run (after the connections are open, before the
# drain and the books check). Clock ticks are 10 ms: the per-request figures are good to
# a microsecond or two at these rates.
#
# Environment: RATE (default 15000), SERVE_ARGS, PRESS_ARGS (e.g. "--threads 1"),
# STAMPEDE_BIN.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=../lib.sh
source "$here/../lib.sh"
rate=${RATE:-15000}
port=${PORT:-18181}
base=http://127.0.0.1:$port
with_workdir
with_shoppers
# shellcheck disable=SC2086 # SERVE_ARGS is a list of flags
start_with_sale durable ${SERVE_ARGS:-}

# shellcheck disable=SC2086 # PRESS_ARGS is a list of flags
"$bin" press --target "$base" --scenario "$here/purchase.toml" --rate "$rate/s" --quiet \
  --duration 12s --connections 256 ${PRESS_ARGS:-} > "$work/press.out" 2>&1 &
press=$!

# One line per thread name of process $1: user ticks, system ticks, voluntary and
# involuntary context switches, summed over the threads of that name.
snapshot() {
  for task in /proc/"$1"/task/*; do
    printf '%s %s %s\n' "$(tr ' ' '_' < "$task/comm")" "$(cut -d' ' -f14,15 "$task/stat")" \
      "$(awk '/^voluntary_ctxt/ {v = $2} /^nonvoluntary_ctxt/ {n = $2} END {print v, n}' "$task/status")"
  done | awk '{u[$1] += $2; s[$1] += $3; v[$1] += $4; n[$1] += $5}
    END {for (k in u) print k, u[k], s[k], v[k], n[k]}' | sort
}
sleep 4
snapshot "$pid" > "$work/server.before"; snapshot "$press" > "$work/press.before"
started=$(date +%s.%N)
sleep 6
snapshot "$pid" > "$work/server.after"; snapshot "$press" > "$work/press.after"
ended=$(date +%s.%N)
wait "$press" || true
grep -E 'latency from scheduled send|books' "$work/press.out" || true

seconds=$(awk -v a="$started" -v b="$ended" 'BEGIN {print b - a}')
echo "per purchase at $rate/s (ticks of 10 ms over ${seconds}s), by thread:"
for side in server press; do
  join "$work/$side.before" "$work/$side.after" | awk -v side="$side" -v r="$rate" -v t="$seconds" '
    { n = r * t; u = ($6 - $2) * 1e4 / n; s = ($7 - $3) * 1e4 / n
      cu += u; cs += s
      if (u + s > 0.05) printf "  %-6s %-18s user %5.1f µs  system %5.1f µs  switches %.3f voluntary, %.3f involuntary\n", side, $1, u, s, ($8 - $4) / n, ($9 - $5) / n }
    END { printf "  %-6s %-18s user %5.1f µs  system %5.1f µs  (%.2f cores)\n", side, "all", cu, cs, (cu + cs) * r / 1e6 }'
done
