#!/usr/bin/env bash
# Overload benchmark: durable purchases at 32× the connections that saturate the
# server (64 → 2048), with the guard's static in-flight bound (refused connections held,
# the default, and not held), with its adaptive (Gradient2) limit, and with neither, with
# clients that retry at once and clients that honour Retry-After. One run, same machine,
# same binary.
#
#   cargo build --release -p stampede && bench/guard/overload.sh
#
# The guarded server's bound defaults to 72 requests in flight, so that purchases (0.9
# of the bound by the class shares) may have the 64 in flight that saturate the server
# and its capacity run is never refused. More adds queueing, not throughput: the
# admitted p99 grows with the bound, and goodput falls below the saturating point
# (BENCHMARKS.md, "The bound against the admitted p99"). A capacity figure from one 8 s
# run can read half or twice another's on a shared 2-core machine, so each server is
# measured at capacity before and after the overload, and its summary line gives each
# ratio against the mean of the two (and against the first alone).
#
# Beside the pressure tool's admitted p99, each run gives the server's own p99 of the
# purchases it served (its 2xx latency buckets, interpolated: coarse), and the summary
# its ratio too, so a tail the server never saw (a request waiting to be read, an answer
# waiting to be taken) can be told from one it made.
#
# PIN=1 runs the server on CPU 0 alone (one request worker) and the pressure tool on CPU
# 1 (taskset, one thread), standing in for clients on other machines: the 2,048
# connections' client work then cannot delay the server's answers, nor the server the
# client's reading of them (what the admitted p99 measures).
#
# Environment: DURATION (default 8s), MAX_INFLIGHT (default 72), ONLY (a label prefix:
# run only those servers, e.g. ONLY=guarded), PIN (default 0), STAMPEDE_BIN.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=../lib.sh
source "$here/../lib.sh"
needs_python3
# 2,048 connections open at both ends on one machine: raise the soft limit on open files
# to the hard one when it is lower than that needs (1,024 is a common default).
need_files=5000
files_ok() { [ "$(ulimit -n)" = unlimited ] || [ "$(ulimit -n)" -ge $need_files ]; }
files_ok || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
files_ok || { echo "needs $need_files open files (ulimit -n); the hard limit is $(ulimit -Hn)" >&2; exit 2; }
duration=${DURATION:-8s}
max_inflight=${MAX_INFLIGHT:-72}
scenario=$here/../server/purchase.toml
server_on=() press_on=() press_args=() serve_args=()
if [ "${PIN:-0}" = 1 ]; then
  command -v taskset >/dev/null || { echo "PIN=1 needs taskset (util-linux)" >&2; exit 2; }
  server_on=(taskset -c 0) press_on=(taskset -c 1) press_args=(--threads 1)
  serve_args=(--worker-threads 1)
fi
work=$(mktemp -d)
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

start() { # port, extra serve args...
  [ -n "$pid" ] && { kill "$pid"; wait "$pid" 2>/dev/null || true; }
  local port=$1; shift
  rm -rf "$work/data"
  ${server_on[@]+"${server_on[@]}"} "$bin" serve --listen 127.0.0.1:$port --data-dir "$work/data" --log warn \
    ${serve_args[@]+"${serve_args[@]}"} "$@" >/dev/null &
  pid=$!
  base=http://127.0.0.1:$port
  for _ in $(seq 100); do curl -sf $base/healthz >/dev/null && break; sleep 0.1; done
}
# run LABEL VUS RETRY_AFTER: one pressure run, with the server's /metrics just before and
# after it; overload_report.py reads all three.
run() {
  curl -sf "$base/metrics" > "$work/$1.before"
  ${press_on[@]+"${press_on[@]}"} "$bin" press --target "$base" --scenario "$scenario" --secrets-from "$work/data" --quiet \
    --duration "$duration" --vus "$2" --connections "$2" --retry-after "$3" --json "$work/$1.json" \
    ${press_args[@]+"${press_args[@]}"} >/dev/null || true
  curl -sf "$base/metrics" > "$work/$1.after"
  python3 "$here/overload_report.py" run "$work" "$1" "$(curl -sf -o /dev/null -w '%{http_code}' "$base/healthz")"
}
# summary PREFIX: the overload ratios of the PREFIX server against the mean of its
# capacity runs before and after the overload (and against the first alone).
summary() { python3 "$here/overload_report.py" summary "$work" "$1"; }

want() { [ -z "${ONLY:-}" ] || [[ $1 == "$ONLY"* ]]; }
if want guarded; then
  printf '[guard.system]\nmax_inflight = %s\n%s' "$max_inflight" "${GUARD_EXTRA:-}" > "$work/guard.toml"
  start 18201 --config "$work/guard.toml"
  run "guarded_64vus_capacity" 64 ignore
  run "guarded_2048vus_retry_at_once" 2048 ignore
  run "guarded_2048vus_honour_retry_after" 2048 honor
  run "guarded_64vus_after_overload" 64 ignore
  summary guarded
fi
if want not_held; then
  printf '[guard.system]\nmax_inflight = %s\nhold_refused = "0s"\n' "$max_inflight" > "$work/not_held.toml"
  start 18204 --config "$work/not_held.toml"
  run "not_held_64vus_capacity" 64 ignore
  run "not_held_2048vus_retry_at_once" 2048 ignore
  run "not_held_2048vus_honour_retry_after" 2048 honor
  run "not_held_64vus_after_overload" 64 ignore
  summary not_held
fi
if want adaptive; then
  printf '[guard.system.adaptive]\ninitial_limit = 64\n' > "$work/adaptive.toml"
  start 18203 --config "$work/adaptive.toml"
  run "adaptive_64vus_capacity" 64 ignore
  run "adaptive_2048vus_retry_at_once" 2048 ignore
  run "adaptive_2048vus_honour_retry_after" 2048 honor
  run "adaptive_64vus_after_overload" 64 ignore
  summary adaptive
fi
if want unguarded; then
  start 18202
  run "unguarded_64vus_capacity" 64 ignore
  run "unguarded_2048vus" 2048 ignore
fi
