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
mem() { curl -sf $base/metrics | awk '/^process_resident_memory_bytes/ {printf "%.0f", $2/1048576}'; }
# refusals: the server's own count of refusals and of those answered within 1 ms of the
# router's first look (stampede_guard_refusal_seconds).
refusals() {
  curl -sf $base/metrics | awk '/^stampede_guard_refusal_seconds_bucket\{le="0.001"\}/ {fast = $2}
    /^stampede_guard_refusal_seconds_count/ {all = $2} END {printf "%d %d", all, fast}'
}
# served: the server's own latency buckets of the purchases it answered with a 2xx
# (stampede_http_request_seconds{route="purchase",class="2xx"}), one "le count" a line.
served() {
  curl -sf "$base/metrics" | sed -nE 's/^stampede_http_request_seconds_bucket\{route="purchase",class="2xx",le="([^"]+)"\} ([0-9]+).*/\1 \2/p'
}
run() { # label, vus, retry-after
  local json=$work/$1.json before after refused_before refused_after
  before=$(mem)
  refused_before=$(refusals)
  served > "$work/$1.served_before"
  ${press_on[@]+"${press_on[@]}"} "$bin" press --target "$base" --scenario "$scenario" --secrets-from "$work/data" --quiet \
    --duration "$duration" --vus "$2" --connections "$2" --retry-after "$3" --json "$json" \
    ${press_args[@]+"${press_args[@]}"} >/dev/null || true
  after=$(mem)
  refused_after=$(refusals)
  served > "$work/$1.served_after"
  python3 - "$json" "$1" "$before" "$after" "$(curl -sf -o /dev/null -w '%{http_code}' $base/healthz)" \
    "$refused_before" "$refused_after" "$work/$1" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); s = r["steps"][0]; by = s.get("latency_by_status", {})
# The server's own p99 of the purchases it served in this run: the difference of its
# bucket counts, interpolated within the bucket (coarse: 1, 2.5, 5, 10, 25 ms edges).
def buckets(path):
    return {float(le): int(n) for le, n in (line.split() for line in open(path))}
b0, b1 = buckets(sys.argv[8] + ".served_before"), buckets(sys.argv[8] + ".served_after")
edges = sorted((le, b1[le] - b0.get(le, 0)) for le in b1)
served_p99 = 0.0
if edges and edges[-1][1] > 0:
    want, lo, below = 0.99 * edges[-1][1], 0.0, 0
    for le, n in edges:
        if n >= want:
            served_p99 = 1000 * (lo + (le - lo) * (want - below) / max(n - below, 1)) if le != float("inf") else 1000 * lo
            break
        lo, below = le, n
open(sys.argv[8] + ".served_p99", "w").write(f"{served_p99}")
ok = s["statuses"].get("201", 0); d = r["duration_s"]
rej = {k: v for k, v in by.items() if k in ("429", "503")}
rej_p = " ".join(f"{k}: p50 {v['p50']:.2f} p99 {v['p99']:.2f} ms" for k, v in rej.items()) or "none"
(all0, fast0), (all1, fast1) = (map(int, a.split()) for a in sys.argv[6:8])
server = f"server: {100 * (fast1 - fast0) / (all1 - all0):.2f}% of {all1 - all0} within 1 ms" if all1 > all0 else "server: none"
# Refusals second by second: the first second is every connection's first request at once.
secs = [(x["t"], x["refused"]) for x in r.get("timeline", []) if x.get("refused")]
later = [x["latency_ms"]["p99"] for t, x in secs if t > 1 and x["count"] >= 100]
if later:
    server += f"; client p99 per second after the first: {min(later):.2f}–{max(later):.2f} ms"
print(f"{sys.argv[2]:<34} goodput {ok/d:>8.0f}/s  admitted p99 {by.get('201', {}).get('p99', 0):>7.2f} ms (server ~{served_p99:.2f})  "
      f"refused {sum(s['statuses'].get(k, 0) for k in ('429', '503')):>7}  (client: {rej_p}; {server})  "
      f"RSS {sys.argv[3]}→{sys.argv[4]} MiB  healthz {sys.argv[5]}  books {'OK' if r['books']['ok'] else 'FAILED'}")
PY
}

# summary PREFIX: the overload ratios of the PREFIX server against the mean of its
# capacity runs before and after the overload (and against the first alone).
summary() {
  python3 - "$work" "$1" <<'PY'
import json, sys
def read(label):  # goodput (201/s) and admitted p99 (ms) from the run's own report
    r = json.load(open(f"{sys.argv[1]}/{sys.argv[2]}_{label}.json")); s = r["steps"][0]
    return s["statuses"].get("201", 0) / r["duration_s"], s.get("latency_by_status", {}).get("201", {}).get("p99", 0)
def served(label):  # the server's own p99 of the purchases served (see run)
    return float(open(f"{sys.argv[1]}/{sys.argv[2]}_{label}.served_p99").read())
(g0, p0), (g1, p1) = read("64vus_capacity"), read("64vus_after_overload")
cap, unloaded = (g0 + g1) / 2, (p0 + p1) / 2
served_unloaded = (served("64vus_capacity") + served("64vus_after_overload")) / 2
print(f"{sys.argv[2]} summary: capacity {cap:.0f}/s, admitted p99 {unloaded:.2f} ms (mean of the runs before and after)")
for label, name in (("2048vus_retry_at_once", "retry at once"), ("2048vus_honour_retry_after", "honour Retry-After")):
    g, p = read(label)
    server = f"; server side {served(label) / served_unloaded:.2f}" if served_unloaded > 0 else ""
    print(f"  {name:<18} goodput ÷ capacity {g / cap:.2f} (÷ first run {g / g0:.2f}), "
          f"admitted p99 ÷ unloaded {p / unloaded:.2f} (÷ first run {p / p0:.2f}{server})")
PY
}

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
