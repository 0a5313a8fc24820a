#!/usr/bin/env bash
# Pay benchmark: sessions that each buy one unit and pay for it at once (closed model,
# 64 sessions), the payment simulator answering at once, so the pay's own cost on the
# server shows. With A and B set to two builds, runs them alternately ROUNDS times (default
# 2) in one go and prints each run's purchases/s and pays/s and their p50/p99, so two
# builds are compared side by side on the same machine.
#
#   cargo build --release -p stampede && bench/server/pay.sh
#   A=old/stampede B=new/stampede bench/server/pay.sh
#
# Environment: A, B (binaries; default the release build alone), ROUNDS, DURATION
# (default 8s), STAMPEDE_BIN.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=../lib.sh
source "$here/../lib.sh"
needs_python3
duration=${DURATION:-8s}
rounds=${ROUNDS:-2}
builds=("${A:-$bin}")
[ -n "${B:-}" ] && builds+=("$B")
work=$(mktemp -d)
pid= sim=
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null
  [ -n "$sim" ] && kill "$sim" 2>/dev/null
  wait 2>/dev/null; rm -rf "$work"
}
trap cleanup EXIT

"$bin" payment-sim --listen 127.0.0.1:18390 --latency 0ms --failure-rate 0 >/dev/null &
sim=$!
for _ in $(seq 100); do curl -sf http://127.0.0.1:18390/healthz >/dev/null && break; sleep 0.1; done

for round in $(seq "$rounds"); do
  for build in "${builds[@]}"; do
    [ -n "$pid" ] && { kill "$pid"; wait "$pid" 2>/dev/null || true; }
    rm -rf "$work/data"
    "$build" serve --listen 127.0.0.1:18391 --data-dir "$work/data" --log warn \
      --payment-url http://127.0.0.1:18390 >/dev/null 2>>"$work/serve.log" &
    pid=$!
    for _ in $(seq 100); do curl -sf http://127.0.0.1:18391/healthz >/dev/null && break; sleep 0.1; done
    "$build" press --target http://127.0.0.1:18391 --scenario "$here/pay.toml" \
      --secrets-from "$work/data" --quiet --duration "$duration" --json "$work/run.json" >/dev/null || true
    python3 - "$work/run.json" "$round" "$build" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
line = [f"round {sys.argv[2]} {sys.argv[3]}:"]
for s in r["steps"]:
    ok = sum(v for k, v in s["statuses"].items() if k.startswith("2"))
    lat = s.get("latency_by_status", {})
    good = lat.get("201") or lat.get("200") or {}
    line.append(f"{s['name']} {ok / (r.get('schedule_s') or r['duration_s']):.0f}/s (of {sum(s['statuses'].values())}: {s['statuses']}) "
                f"p50 {good.get('p50', 0):.2f} p99 {good.get('p99', 0):.2f} ms")
print("  ".join(line))
PY
  done
done
