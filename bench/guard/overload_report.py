"""Reads the overload bench's runs for bench/guard/overload.sh.

Each run LABEL leaves in WORK: LABEL.json (the pressure tool's report) and LABEL.before /
LABEL.after (the server's /metrics just before and after it).

    overload_report.py run WORK LABEL HEALTHZ_STATUS [BOUND]
                                                       one line for the run (BOUND: the
                                                       server's static in-flight bound)
    overload_report.py sweep WORK [KNEE]               the capacity sweep: the best row's
                                                       goodput is the capacity; prints the
                                                       fewest connections within KNEE (0.95)
                                                       of it, keeps both in WORK/capacity
    overload_report.py summary WORK PREFIX ROUNDS      the PREFIX server's ratios, round
                                                       by round and over all ROUNDS
"""
import json
import os
import statistics
import sys

# No __pycache__ left in the checkout by a benchmark run.
sys.dont_write_bytecode = True
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from server_side import PURCHASES, quantile, scrape  # noqa: E402


def served_p99(work, label):
    """The server's own p99 (ms) of the purchases it served during the run."""
    before, after = scrape(f"{work}/{label}.before"), scrape(f"{work}/{label}.after")
    return 1000 * quantile(before, after, PURCHASES, 0.99)


def report(work, label):
    r = json.load(open(f"{work}/{label}.json"))
    return r, r["steps"][0]


def schedule_s(r):
    """The seconds the clients sent in (older reports: the whole run)."""
    return r.get("schedule_s") or r["duration_s"]


def goodput_and_p99(work, label):
    """Goodput (201/s) and the client's admitted p99 (ms), from the run's own report.

    Goodput is over the schedule, the seconds the clients sent in: after it the pressure
    tool only waits for the answers still out, which for clients retrying at once are
    refusals held up to their Retry-After (8 s), so its whole duration would count up
    to 8 s of waiting as seconds that served nothing."""
    r, s = report(work, label)
    return (
        s["statuses"].get("201", 0) / schedule_s(r),
        s.get("latency_by_status", {}).get("201", {}).get("p99", 0),
    )


def run(work, label, healthz, bound=None):
    r, s = report(work, label)
    before, after = scrape(f"{work}/{label}.before"), scrape(f"{work}/{label}.after")
    by = s.get("latency_by_status", {})
    goodput, admitted_p99 = goodput_and_p99(work, label)
    rejected = {k: v for k, v in by.items() if k in ("429", "503")}
    client = " ".join(f"{k}: p50 {v['p50']:.2f} p99 {v['p99']:.2f} ms" for k, v in rejected.items()) or "none"
    # The server's own count of refusals, and of those decided within 1 ms of the router's
    # first look (stampede_guard_refusal_seconds).
    def delta(key):
        return after.get(key, 0) - before.get(key, 0)
    refused = delta("stampede_guard_refusal_seconds_count")
    fast = delta('stampede_guard_refusal_seconds_bucket{le="0.001"}')
    server = f"server: {100 * fast / refused:.2f}% of {refused:.0f} within 1 ms" if refused > 0 else "server: none"
    # Refusals second by second: the first second is every connection's first request at once.
    later = [
        x["refused"]["latency_ms"]["p99"]
        for x in r.get("timeline", [])
        if x.get("refused") and x["t"] > 1 and x["refused"]["count"] >= 100
    ]
    if later:
        server += f"; client p99 per second after the first: {min(later):.2f}–{max(later):.2f} ms"
    # The guard's in-flight count at each of the pressure tool's scrapes of /metrics
    # (once a second) while the schedule ran (the samples' `t` is the timeline's clock):
    # an overload that keeps fewer in flight than the unloaded runs beside it leaves the
    # server short of work.
    inflight = sorted(
        x["guard_inflight"]
        for x in r.get("server", [])
        if x.get("guard_inflight") is not None and 0 < x["t"] <= schedule_s(r)
    )
    if inflight:
        server += (
            f"; in flight at {len(inflight)} scrapes: median {statistics.median(inflight):.0f}, "
            f"p10 {inflight[len(inflight) // 10]:.0f}" + (f" of a bound of {bound}" if bound else "")
        )
    mib = lambda m: f"{m.get('process_resident_memory_bytes', 0) / 1048576:.0f}"
    print(
        f"{label:<34} goodput {goodput:>8.0f}/s  admitted p99 {admitted_p99:>7.2f} ms (server ~{served_p99(work, label):.2f})  "
        f"refused {sum(s['statuses'].get(k, 0) for k in ('429', '503')):>7}  (client: {client}; {server})  "
        f"RSS {mib(before)}→{mib(after)} MiB  healthz {healthz}  books {'OK' if r['books']['ok'] else 'FAILED'}"
    )


def sweep(work, knee=0.95):
    """The sweep's runs (labelled sweep_<connections>): the most goodput any row served is
    the capacity, and the fewest connections whose goodput is within `knee` of it
    saturate the server. Past that count, more connections add queueing, not goodput;
    taking the row with the most instead would let a difference of a few percent, inside
    one run's noise, move N (and the overload, 32 × N) by a factor of two. Prints the
    count for the script and keeps both in WORK/capacity for the summaries."""
    rows = sorted(
        (int(name[len("sweep_"):-len(".json")]), goodput_and_p99(work, name[: -len(".json")]))
        for name in os.listdir(work)
        if name.startswith("sweep_") and name.endswith(".json")
    )
    if not rows:
        sys.exit("no sweep runs")
    best_connections, (goodput, _) = max(rows, key=lambda row: row[1][0])
    connections = next(c for c, (g, _) in rows if g >= knee * goodput)
    print(
        "capacity sweep: "
        + ", ".join(f"{c} connections {g:.0f}/s (p99 {p:.2f} ms)" for c, (g, p) in rows)
        + f"; capacity {goodput:.0f}/s (at {best_connections}); saturating {connections}"
        + f" (the fewest within {knee:.0%} of it)",
        file=sys.stderr,
    )
    if goodput <= 0:
        sys.exit("the capacity sweep served nothing")
    if best_connections == rows[-1][0]:
        print(
            "note: the best row is the sweep's last; more connections might do more, so "
            "the capacity is a lower bound (extend SWEEP to see)",
            file=sys.stderr,
        )
    with open(f"{work}/capacity", "w") as f:
        f.write(f"{connections} {goodput}\n")
    print(connections)


def summary(work, prefix, rounds):
    """The overload ratios against the swept capacity (when there was a sweep) and
    against this server's own runs at the saturating count: each round's overloads
    against the mean of the runs just before and just after them (and against the one
    before alone); the admitted p99 against those runs' mean. With more than one round,
    also the median of the rounds' ratios and the ratio of all the overloads' 201s to
    all the unloaded runs': runs side by side on one server, so that a drift of the
    machine over minutes moves both sides of a ratio."""
    label = lambda name: f"{prefix}_{name}"
    swept = None
    if os.path.exists(f"{work}/capacity"):
        swept = float(open(f"{work}/capacity").read().split()[1])
        if swept <= 0:
            sys.exit("the capacity sweep served nothing; no ratios")
    unloaded = [goodput_and_p99(work, label(f"unloaded_{i}")) for i in range(rounds + 1)]
    served = [served_p99(work, label(f"unloaded_{i}")) for i in range(rounds + 1)]
    if any(g <= 0 or p <= 0 for g, p in unloaded):
        sys.exit(f"{prefix}: a run at the saturating count served nothing; no ratios")
    print(
        f"{prefix} summary: " + (f"swept capacity {swept:.0f}/s; " if swept is not None else "")
        + "own runs " + ", ".join(f"{g:.0f}/s" for g, _ in unloaded)
        + " (admitted p99 " + ", ".join(f"{p:.2f}" for _, p in unloaded) + " ms)"
    )
    kinds = (("retry_at_once", "retry at once"), ("honour_retry_after", "honour Retry-After"))
    ratios = {name: [] for name, _ in kinds}
    for i in range(1, rounds + 1):
        (g0, p0), (g1, p1) = unloaded[i - 1], unloaded[i]
        own, p_own = (g0 + g1) / 2, (p0 + p1) / 2
        s_own = (served[i - 1] + served[i]) / 2
        for name, title in kinds:
            g, p = goodput_and_p99(work, label(f"{name}_{i}"))
            ratios[name].append((g / own, p / p_own))
            server = f"; server side {served_p99(work, label(f'{name}_{i}')) / s_own:.2f}" if s_own > 0 else ""
            against_swept = f"goodput ÷ swept capacity {g / swept:.2f}, " if swept is not None else ""
            print(
                f"  round {i} {title:<18} {against_swept}÷ own runs {g / own:.2f} (÷ the one before {g / g0:.2f}), "
                f"admitted p99 ÷ unloaded {p / p_own:.2f} (÷ the one before {p / p0:.2f}{server})"
            )
    if rounds > 1:
        # Pooled: every overload second against every unloaded second of this server.
        def pooled(names):
            n = t = 0.0
            for name in names:
                r, s = report(work, label(name))
                n += s["statuses"].get("201", 0)
                t += schedule_s(r)
            return n / t
        own_all = pooled(f"unloaded_{i}" for i in range(rounds + 1))
        for name, title in kinds:
            goodputs = sorted(g for g, _ in ratios[name])
            p99s = sorted(p for _, p in ratios[name])
            print(
                f"  {rounds} rounds, {title:<18} goodput ÷ own runs: median {statistics.median(goodputs):.2f} "
                f"(range {goodputs[0]:.2f}–{goodputs[-1]:.2f}), pooled "
                f"{pooled(f'{name}_{i}' for i in range(1, rounds + 1)) / own_all:.2f}; "
                f"admitted p99 ÷ unloaded: median {statistics.median(p99s):.2f} (range {p99s[0]:.2f}–{p99s[-1]:.2f})"
            )


if __name__ == "__main__":
    if sys.argv[1] == "run":
        run(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5] if len(sys.argv) > 5 else None)
    elif sys.argv[1] == "sweep":
        sweep(sys.argv[2], float(sys.argv[3]) if len(sys.argv) > 3 else 0.95)
    else:
        summary(sys.argv[2], sys.argv[3], int(sys.argv[4]))
