#!/usr/bin/env bash
# Instructions the server executes per request (user space: the request workers, the
# SQLite write thread, the background checkpointer), counted by valgrind's callgrind
# around one wrk run. Unlike time on a shared machine, the count holds still from run to
# run (±1–2%, from how commits happen to batch), so two builds can be compared with
# it. Kernel work (sockets, fsync) is not counted: threads.sh measures that side.
#
#   cargo build --release -p stampede && bench/server/instructions.sh
#   STAMPEDE_BIN=path/to/other/stampede bench/server/instructions.sh   # the other build
#
# Under valgrind the server answers a few hundred requests a second, so a run sends far
# fewer requests than there are shopper tokens: every purchase carries a token the server
# has not seen, as in a flash sale where each shopper buys once. valgrind hides the CPU's
# SHA extensions, so token verification counts more here than it costs natively.
#
# Environment: TARGETS (default "healthz purchase"), DURATION (default 10s),
# CONNECTIONS (default 16), STAMPEDE_BIN / PROFILE. Needs valgrind and wrk.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=../lib.sh
source "$here/../lib.sh"
needs_wrk
command -v callgrind_control >/dev/null || { echo "needs valgrind (Debian/Ubuntu: apt-get install valgrind)" >&2; exit 2; }
port=${PORT:-18187}
base=http://127.0.0.1:$port
with_workdir
with_shoppers

for target in ${TARGETS:-healthz purchase}; do
  # shellcheck disable=SC2034 # read by start_with_sale
  serve_wrapper=(valgrind --tool=callgrind --callgrind-out-file="$work/callgrind-$target.out"
    --log-file="$work/valgrind.log")
  start_with_sale durable
  # Warm up (connections, the runtime's threads, the writer's statements), then count.
  TARGET=$target wrk -t1 -c"${CONNECTIONS:-16}" -d4s -s "$here/load.lua" "$base/healthz" >/dev/null
  callgrind_control --zero "$pid" >/dev/null 2>&1
  line=$(TARGET=$target wrk -t1 -c"${CONNECTIONS:-16}" -d"${DURATION:-10s}" -s "$here/load.lua" "$base/healthz" | grep '^RESULT')
  callgrind_control --dump "$pid" >/dev/null 2>&1
  requests=$(sed -E 's/.*requests=([0-9]+).*/\1/' <<<"$line")
  instructions=$(awk '/^(summary|totals):/ {print $2}' "$work/callgrind-$target.out".* | sort -n | tail -1)
  echo "$target: $requests requests, $((instructions / requests)) instructions per request"
done
