"""The disk's side of a durable commit, without Stampede: how long an fdatasync of a
WAL-sized write takes on the filesystem that will hold the data directory, alone and
beside a second file flushed in larger pieces every so often, as the embedded store's
checkpointer flushes the database file while commits go on.

    python3 bench/fsync_probe.py [DIR]     (default: the current directory)

Each phase writes, for SECONDS (default 10), pieces of 17 KiB (the four or so pages
and frame headers a commit of ~15 orders writes to the WAL) back to back in place within 32 MiB, each followed by fdatasync,
as a writer with a queue always waiting does, and prints the quantiles of the
fdatasync's time and the share of them over 1 and 5 ms. The second phase runs a thread
that writes 2 MB and fsyncs it every 500 ms meanwhile: about what a checkpoint pass
(every 500 ms) copies into the database file at 18,000 orders a second. Files are removed
afterwards.
"""
import os
import sys
import threading
import time

WRITE = 17 * 1024
SPAN = 32 << 20
FLUSH_BYTES = 2_000_000
FLUSH_EVERY_S = 0.5


def quantiles(samples):
    samples = sorted(samples)

    def at(q):
        return samples[min(len(samples) - 1, int(q * len(samples)))] * 1e3

    def over(ms):
        return 100 * sum(1 for s in samples if s > ms / 1e3) / len(samples)

    return (f"{len(samples)}: p50 {at(0.5):.2f}, p90 {at(0.9):.2f}, p99 {at(0.99):.2f}, "
            f"p99.9 {at(0.999):.2f}, max {samples[-1] * 1e3:.2f} ms; "
            f"{over(1):.2f}% over 1 ms, {over(5):.2f}% over 5 ms")


def commits(path, seconds):
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.pwrite(fd, b"\0" * SPAN, 0)
        os.fsync(fd)
        piece = os.urandom(WRITE)
        taken, i, end = [], 0, time.monotonic() + seconds
        while time.monotonic() < end:
            os.pwrite(fd, piece, (i * WRITE) % (SPAN - WRITE))
            i += 1
            started = time.perf_counter()
            os.fdatasync(fd)
            taken.append(time.perf_counter() - started)
        return taken
    finally:
        os.close(fd)
        os.unlink(path)


def flusher(path, stop, taken):
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        piece, offset = os.urandom(FLUSH_BYTES), 0
        while not stop.is_set():
            os.pwrite(fd, piece, offset)
            offset = (offset + FLUSH_BYTES) % (512 << 20)
            started = time.perf_counter()
            os.fsync(fd)
            taken.append(time.perf_counter() - started)
            stop.wait(FLUSH_EVERY_S)
    finally:
        os.close(fd)
        os.unlink(path)


def main():
    where = sys.argv[1] if len(sys.argv) > 1 else "."
    seconds = float(os.environ.get("SECONDS", "10"))
    wal = os.path.join(where, ".fsync-probe-wal")
    db = os.path.join(where, ".fsync-probe-db")
    print(f"fdatasync of {WRITE} B, alone:            {quantiles(commits(wal, seconds))}")
    stop, flushes = threading.Event(), []
    thread = threading.Thread(target=flusher, args=(db, stop, flushes))
    thread.start()
    try:
        beside = commits(wal, seconds)
    finally:
        stop.set()
        thread.join()
    print(f"fdatasync of {WRITE} B, beside the flushes: {quantiles(beside)}")
    print(f"the flushes ({FLUSH_BYTES} B fsync'd every {FLUSH_EVERY_S * 1e3:.0f} ms): {quantiles(flushes)}")


if __name__ == "__main__":
    main()
