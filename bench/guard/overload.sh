#!/usr/bin/env bash
# Overload benchmark: durable purchases at 32× the connections that saturate the server,
# with the guard's static in-flight bound (refused connections held, the default, and not
# held), with its adaptive (Gradient2) limit, and with neither, with clients that retry at
# once and clients that honour Retry-After. One run, same machine, same binary.
#
#   cargo build --profile production -p stampede && PROFILE=production bench/guard/overload.sh
#
# First the capacity: a server with no in-flight bound, fresh for each connection count
# of SWEEP (default "64 256 512"), each count run closed-loop (one request in flight per
# connection). Group commit needs purchases in flight to fill its batches, so 64
# connections understate what the server can do (on this machine 0.7–0.8 of the most).
# The most goodput of any count is the capacity; the fewest connections that reach
# KNEE (default 0.95) of it saturate the server, N: past them more connections add
# queueing, not goodput, and the count with the very most would let a few percent of
# noise between, say, 256 and 512 double the overload. The overload is 32 × N
# connections (OVERLOAD_VUS overrides).
#
# The guarded server's bound defaults to N × 9/8 requests in flight, so that purchases
# (0.9 of the bound by the class shares) may have the N in flight that saturate the
# server. More adds queueing, not throughput: the admitted p99 grows with the bound
# (BENCHMARKS.md, "The bound against the admitted p99"). Each guarded server is run at N
# connections before and after the overload: the mean of those two is its unloaded p99
# (and its own capacity, the mean because a capacity figure from one 8 s run can read
# half or twice another's on a shared 2-core machine). Its summary gives goodput against
# the swept capacity, the target's yardstick, and against its own runs.
#
# Beside the pressure tool's admitted p99, each run gives the server's own p99 of the
# purchases it served (its 2xx latency buckets, interpolated: coarse), and the summary
# its ratio too, so a tail the server never saw (a request waiting to be read, an answer
# waiting to be taken) can be told from one it made.
#
# ROUNDS=k repeats the pair of overloads k times on the same server, each pair followed
# by another run at N: every round is set against the runs just before and after it, and
# the summary adds the median of the rounds and the ratio of all the overloads' 201s to
# all the unloaded runs'. One round's ratio moves with the machine's pace over minutes
# (unloaded runs on one server minutes apart have differed by a fifth or more); runs side
# by side in rounds let that drift move both sides.
#
# Each run also reports the guard's in-flight count at the pressure tool's scrapes of
# /metrics while the schedule ran (median and p10, with the bound): an overload that
# keeps fewer purchases in flight than the unloaded runs beside it leaves the server
# short of work; as many, and the server itself does less with them.
#
# PIN=1 runs the server on CPU 0 alone (one request worker) and the pressure tool on CPU
# 1 (taskset, one thread), standing in for clients on other machines: the overload's
# client work then cannot delay the server's answers, nor the server the client's
# reading of them (what the admitted p99 measures).
#
# Environment: DURATION (default 8s), SWEEP (default "64 256 512"), KNEE (default 0.95),
# SATURATING (skip the sweep: this many connections saturate the server; no swept
# capacity then), OVERLOAD_VUS (default 32 × N), MAX_INFLIGHT (default N × 9/8), ROUNDS
# (default 1), ONLY (a label prefix: run only those servers, e.g. ONLY=guarded), PIN
# (default 0), KEEP (a directory to keep each run's report and /metrics scrapes in),
# STAMPEDE_BIN.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=../lib.sh
source "$here/../lib.sh"
needs_python3
# Connections open at both ends on one machine: the soft limit on open files raised to
# the hard one (1,024 is a common default); checked below against what the overload needs.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
duration=${DURATION:-8s}
scenario=$here/../server/purchase.toml
server_on=() press_on=() press_args=() serve_args=()
if [ "${PIN:-0}" = 1 ]; then
  command -v taskset >/dev/null || { echo "PIN=1 needs taskset (util-linux)" >&2; exit 2; }
  server_on=(taskset -c 0) press_on=(taskset -c 1) press_args=(--threads 1)
  serve_args=(--worker-threads 1)
fi
work=$(mktemp -d)
pid=
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null
  wait 2>/dev/null
  # KEEP: a directory that keeps each run's report and /metrics scrapes.
  if [ -n "${KEEP:-}" ]; then
    mkdir -p "$KEEP" && cp "$work"/*.json "$work"/*.before "$work"/*.after "$work"/capacity "$KEEP"/ 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

start() { # port, extra serve args...
  [ -n "$pid" ] && { kill "$pid"; wait "$pid" 2>/dev/null || true; }
  local port=$1; shift
  rm -rf "$work/data"
  # Room for every connection of the overload (the default bound is 16,384).
  ${server_on[@]+"${server_on[@]}"} "$bin" serve --listen 127.0.0.1:$port --data-dir "$work/data" --log warn \
    --max-connections $((${overload:-16384} + 1024)) ${serve_args[@]+"${serve_args[@]}"} "$@" >/dev/null &
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
  python3 "$here/overload_report.py" run "$work" "$1" "$(curl -sf -o /dev/null -w '%{http_code}' "$base/healthz")" ${bound:+"$bound"}
}

want() { [ -z "${ONLY:-}" ] || [[ $1 == "$ONLY"* ]]; }

# The connections that saturate the server, N, and its capacity: the sweep's best row.
if [ -n "${SATURATING:-}" ]; then
  n=$SATURATING
else
  for c in ${SWEEP:-64 256 512}; do
    start 18200
    run "sweep_${c}" "$c" ignore
  done
  n=$(python3 "$here/overload_report.py" sweep "$work" "${KNEE:-0.95}")
fi
overload=${OVERLOAD_VUS:-$((32 * n))}
max_inflight=${MAX_INFLIGHT:-$(((n * 9 + 7) / 8))}
echo "saturating: $n connections; overload: $overload connections; guarded bound: $max_inflight in flight"
need_files=$((overload + 1000))
[ "$(ulimit -n)" = unlimited ] || [ "$(ulimit -n)" -ge $need_files ] ||
  { echo "needs $need_files open files (ulimit -n); the hard limit is $(ulimit -Hn)" >&2; exit 2; }

rounds=${ROUNDS:-1}
# phases PREFIX: the server just started at N connections, then ROUNDS times the overload
# retrying at once and honouring Retry-After followed by N again, then the summary.
phases() {
  run "$1_unloaded_0" "$n" ignore
  for i in $(seq "$rounds"); do
    run "$1_retry_at_once_$i" "$overload" ignore
    run "$1_honour_retry_after_$i" "$overload" honor
    run "$1_unloaded_$i" "$n" ignore
  done
  python3 "$here/overload_report.py" summary "$work" "$1" "$rounds"
}
if want guarded; then
  printf '[guard.system]\nmax_inflight = %s\n%s' "$max_inflight" "${GUARD_EXTRA:-}" > "$work/guard.toml"
  bound=$max_inflight # the static bound, shown beside the in-flight counts
  start 18201 --config "$work/guard.toml"
  phases guarded
fi
if want not_held; then
  printf '[guard.system]\nmax_inflight = %s\nhold_refused = "0s"\n' "$max_inflight" > "$work/not_held.toml"
  bound=$max_inflight
  start 18204 --config "$work/not_held.toml"
  phases not_held
fi
bound=
if want adaptive; then
  printf '[guard.system.adaptive]\ninitial_limit = %s\n' "$n" > "$work/adaptive.toml"
  start 18203 --config "$work/adaptive.toml"
  phases adaptive
fi
if want unguarded; then
  start 18202
  phases unguarded
fi
