"""The server's own view of a run, from its /metrics text scraped just before and just
after it: quantiles of its latency histograms over the run (bucket counts differenced,
interpolated within the bucket, so as coarse as the bucket edges: 1, 2.5, 5, 10, 25 ms).

    server_side.py BEFORE AFTER    one line: the purchases served, their wait for the
                                   writer, its commits and their size

Imported by bench/guard/overload_report.py.
"""
import re
import sys

SERIES = re.compile(r"^([a-z_]+)(\{[^}]*\})? (\S+)$")
PURCHASES = 'stampede_http_request_seconds_bucket{route="purchase",class="2xx",le="'
QUEUE_WAIT = 'stampede_writer_queue_wait_seconds_bucket{le="'
COMMITS = 'stampede_writer_commit_seconds_bucket{le="'


def scrape(path):
    """The series of one /metrics text: {name + labels: value}."""
    values = {}
    for line in open(path):
        m = SERIES.match(line.strip())
        if m:
            values[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return values


def buckets(before, after, prefix):
    """[(upper edge, count during the run)] of one histogram, by edge."""
    return sorted(
        (float(key[len(prefix):-2]), n - before.get(key, 0))
        for key, n in after.items()
        if key.startswith(prefix)
    )


def quantile(before, after, prefix, q):
    """The q-quantile (in the histogram's unit) during the run; 0 when it saw nothing."""
    edges = buckets(before, after, prefix)
    if not edges or edges[-1][1] <= 0:
        return 0.0
    want, low, below = q * edges[-1][1], 0.0, 0
    for le, n in edges:
        if n >= want:
            if le == float("inf"):
                return low
            return low + (le - low) * (want - below) / max(n - below, 1)
        low, below = le, n
    return 0.0


def within(before, after, prefix, edge):
    """The share of the run's observations at or under the bucket edge `edge`."""
    edges = dict(buckets(before, after, prefix))
    total = edges.get(float("inf"), 0)
    return edges.get(edge, 0) / total if total > 0 else 0.0


def delta(before, after, key):
    return after.get(key, 0) - before.get(key, 0)


def line(before, after):
    ms = lambda prefix, q: f"{1000 * quantile(before, after, prefix, q):.2f}"
    commits = delta(before, after, "stampede_writer_commit_seconds_count")
    ops = delta(before, after, "stampede_writer_batch_ops_sum")
    return (
        f"server side: purchases served p50 ~{ms(PURCHASES, 0.5)} p99 ~{ms(PURCHASES, 0.99)} ms, "
        f"{100 * within(before, after, PURCHASES, 0.005):.2f}% within 5 ms; "
        f"wait for the writer p99 ~{ms(QUEUE_WAIT, 0.99)} ms; "
        f"commits p99 ~{ms(COMMITS, 0.99)} ms, {ops / commits if commits else 0:.1f} operations each"
    )


if __name__ == "__main__":
    print(line(scrape(sys.argv[1]), scrape(sys.argv[2])))
