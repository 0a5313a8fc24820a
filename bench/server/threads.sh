#!/usr/bin/env bash
# Where a request's CPU goes: per-thread user and system CPU and context switches of the
# server per request (read from /proc/<pid>/task/* around one wrk run), and the writer's
# commits (count, time, orders) from /metrics, for /healthz and for durable purchases
# against the same server.
#
#   cargo build --release -p stampede && bench/server/threads.sh
#
# Environment: DURATION (default 8s), CONNECTIONS (default 64), ACK (default durable),
# TARGETS (default "healthz purchase"), STAMPEDE_BIN. Clock ticks are 10 ms: keep runs
# several seconds long.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=../lib.sh
source "$here/../lib.sh"
needs_wrk
duration=${DURATION:-8s}
connections=${CONNECTIONS:-64}
port=${PORT:-18181}
base=http://127.0.0.1:$port
with_workdir

with_shoppers
# shellcheck disable=SC2086 # SERVE_ARGS is a list of flags
start_with_sale "${ACK:-durable}" ${SERVE_ARGS:-}

# thread name, user ticks, system ticks, context switches, nanoseconds spent runnable but
# waiting for a CPU (schedstat's run delay); summed over threads of a name.
snapshot() {
  for task in /proc/$pid/task/*; do
    local name stat switches waited
    name=$(tr ' ' '_' < "$task/comm")
    read -r -a stat < <(cut -d' ' -f14,15 "$task/stat")
    switches=$(awk '/^(non)?voluntary_ctxt_switches/ {n += $2} END {print n}' "$task/status")
    waited=$(cut -d' ' -f2 "$task/schedstat" 2>/dev/null || echo 0)
    echo "$name ${stat[0]} ${stat[1]} $switches $waited"
  done | awk '{u[$1] += $2; s[$1] += $3; c[$1] += $4; w[$1] += $5}
    END {for (n in u) print n, u[n], s[n], c[n], w[n]}' | sort
}
writer() {
  curl -s $base/metrics | awk '/^stampede_writer_(commit_seconds|batch_ops)_(sum|count)/ {v[$1] = $2}
    END {n = v["stampede_writer_commit_seconds_count"]; if (n > 0) printf "  writer: %d commits, %.2f ms each, %.1f ops each\n",
      n, 1000 * v["stampede_writer_commit_seconds_sum"] / n, v["stampede_writer_batch_ops_sum"] / n}'
}
ticks=$(getconf CLK_TCK)
for target in ${TARGETS:-healthz purchase}; do
  snapshot > "$work/before"
  machine_before=$(machine_cpu)
  out=$(TARGET=$target wrk -t1 -c"$connections" -d"$duration" -s "$here/load.lua" "$base/healthz")
  machine_after=$(machine_cpu)
  snapshot > "$work/after"
  line=$(grep '^RESULT' <<<"$out")
  requests=$(sed -E 's/.*requests=([0-9]+).*/\1/' <<<"$line")
  echo "$target $line"
  # Cumulative since the server started; the product and the sale are two commits.
  [ "$target" = purchase ] && writer
  join "$work/before" "$work/after" | awk -v r="$requests" -v t="$ticks" '
    {u = ($6 - $2) * 1e6 / t / r; s = ($7 - $3) * 1e6 / t / r; c = ($8 - $4) / r; w = ($9 - $5) / 1e3 / r
     if (u + s + c >= 0.05) printf "  %-18s user %6.1f µs  sys %6.1f µs  switches %5.2f  waited for a CPU %6.1f µs per request\n", $1, u, s, c, w
     tu += u; ts += s; tc += c; tw += w}
    END {printf "  %-18s user %6.1f µs  sys %6.1f µs  switches %5.2f  waited for a CPU %6.1f µs per request\n", "all threads", tu, ts, tc, tw}'
  machine_report "$machine_before" "$machine_after"
done
