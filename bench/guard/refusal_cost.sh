#!/usr/bin/env bash
# What a refusal costs the server: its CPU per answer for /healthz (the cheapest route)
# and for a 429 `throttled` of a guarded read (a flow rule of 1/s on `get_sale`, no
# hold, so every answer is a refusal decided and written at once), alternating, the
# same load generator (wrk, 1 thread) against one server. CPU from /proc/<pid>/stat.
# It shows what deciding and writing a refusal costs, not what a held 503 to a POST
# costs on thousands of connections (bench/guard/overload.sh).
#
#   cargo build --profile production -p stampede && PROFILE=production bench/guard/refusal_cost.sh
#
# Environment: DURATION (default 8s), CONNECTIONS (default 256), ROUNDS (default 2).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=../lib.sh
source "$here/../lib.sh"
needs_wrk
needs_python3
with_workdir
port=18310
export STAMPEDE_ADMIN_TOKEN=bench-admin-token-0123456789 STAMPEDE_JWT_SECRET=bench-jwt-secret-0123456789abcdef
printf '[guard.system]\nhold_refused = "0s"\n[[guard.flow]]\nresource = "get_sale"\nqps = 1\nburst = 1\n' > "$work/guard.toml"
start_with_sale durable --config "$work/guard.toml"
ticks_per_s=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
for round in $(seq "${ROUNDS:-2}"); do
  for path in /healthz "/v1/flash-sales/$SALE"; do
    before=$(cpu_ticks)
    out=$(wrk -t1 -c"${CONNECTIONS:-256}" -d"${DURATION:-8s}" "http://127.0.0.1:$port$path")
    after=$(cpu_ticks)
    python3 - "$round" "$path" "$((after - before))" "$ticks_per_s" "$out" <<'PY'
import re, sys
round_, path, ticks, hz, out = sys.argv[1:]
n = int(re.search(r"(\d+) requests in", out).group(1))
refused = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
refused = int(refused.group(1)) if refused else 0
name = "healthz" if path == "/healthz" else "429 refusal"
print(f"round {round_} {name:12} {n} answers ({refused} refused): "
      f"{int(ticks) / int(hz) / n * 1e6:.1f} µs of server CPU each")
PY
  done
done
