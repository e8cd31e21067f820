"""Benchmark: the metric history store (src/dbplane/metrics/history.py) at the size the
collector will give it. No platform needed:

    .venv/bin/python bench/metrics_history.py

1. Every catalogue series of 3 databases x 3 members on 3 hosts (members, hosts with two
   disks, a proxy per host, backups), one sample each per 10 s, written scrape by scrape
   (one write() per scrape, as the collector will) for 24 h of data time: samples/s and the
   latency of one scrape's write, with rollups running as they do in service.
2. One more hour in steady state, where raw expiry runs too.
3. Thirteen more days of 5-minute rollups before the 24 h, inserted directly (what 14 days of
   running leaves, without writing 14 days), then the file size with full retention.
4. Query latency, reopen time (with its page check) and the file size.

With `--max-mib 32` the store is bounded below the data, and 1. and 2. measure writing while
the oldest data is dropped.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from machine import commit, machine  # bench/

from dbplane.metrics import catalog
from dbplane.metrics.catalog import Sample
from dbplane.metrics.history import HistoryWriter, Retention

STATES = ("active", "idle", "idle_in_transaction", "idle_in_transaction_aborted", "fastpath", "disabled")


def series_labels(databases: int, members: int) -> list[tuple[str, str, dict[str, str]]]:
    """(metric, type, labels) of every series the collector would write."""
    hosts = [(f"host-{z}", z) for z in "abc"]
    out = []
    for m in catalog.METRICS:
        if "member" in m.labels:
            for d in range(databases):
                for i in range(members):
                    host, zone = hosts[i % len(hosts)]
                    base = {"database": f"db{d}", "member": f"db{d}-{i}", "zone": zone,
                            "role": "primary" if i == 0 else "standby"}
                    for state in (STATES if "state" in m.labels else (None,)):
                        out.append((m.name, m.type, {**base, **({"state": state} if state else {})}))
        elif "device" in m.labels:
            out += [(m.name, m.type, {"host": h, "zone": z, "device": dev}) for h, z in hosts
                    for dev in ("vda", "vdb")]
        elif "target" in m.labels:
            out += [(m.name, m.type, {"host": h, "zone": z, "target": t}) for h, z in hosts
                    for t in ("host", "proxy", "backup")]
        elif "host" in m.labels and "database" in m.labels:
            out += [(m.name, m.type, {"database": f"db{d}", "host": h, "zone": z}) for h, z in hosts
                    for d in range(databases)]
        elif "host" in m.labels:
            out += [(m.name, m.type, {"host": h, "zone": z}) for h, z in hosts]
        else:
            out += [(m.name, m.type, {"database": f"db{d}"}) for d in range(databases)]
    return out


class Source:
    """Plausible values: counters grow by whole numbers, gauges wander (some whole, some not)."""

    def __init__(self, series: list[tuple[str, str, dict[str, str]]], seed: int = 1):
        self.series = series
        self.rng = random.Random(seed)
        self.values = [0.0] * len(series)

    def scrape(self, ts: float) -> list[Sample]:
        out = []
        for i, (name, kind, labels) in enumerate(self.series):
            if kind == "counter":
                self.values[i] += self.rng.randint(0, 500)
            elif name.endswith(("_seconds", "_ratio")):
                self.values[i] = abs(self.values[i] + self.rng.gauss(0, 0.1))
            else:
                self.values[i] = max(0, self.values[i] + self.rng.randint(-3, 3))
            out.append(Sample(name, labels, self.values[i], ts))
        return out


def write_span(w: HistoryWriter, src: Source, start: int, end: int, every: int
               ) -> tuple[float, int, list[float]]:
    latencies = []
    samples = 0
    t0 = time.perf_counter()
    for ts in range(start, end, every):
        batch = src.scrape(ts)
        t1 = time.perf_counter()
        samples += w.write(batch)
        latencies.append(time.perf_counter() - t1)
    return time.perf_counter() - t0, samples, latencies


def fake_rollups(w: HistoryWriter, before: int, days: int) -> int:
    """`days` of 5-minute rollups ending at `before`, for every series, as rollup would leave them."""
    step = w.rollup_step
    rng = random.Random(2)
    ids = [r[0] for r in w._conn.execute("SELECT id FROM series")]
    rows = 0
    for day in range(days):
        start = before - (day + 1) * 86400
        batch = [(ts, sid, v + rng.random(), v - rng.random(), v + rng.random(), 30)
                 for ts in range(start, start + 86400, step) for sid in ids for v in (rng.randint(0, 10**6),)]
        w._conn.execute("BEGIN")
        w._conn.executemany("INSERT OR REPLACE INTO rollup VALUES (?, ?, ?, ?, ?, ?)", batch)
        w._conn.execute("COMMIT")
        rows += len(batch)
    return rows


def timed(fn, repeat: int = 20) -> float:
    """Median wall time of `fn()` in milliseconds."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--databases", type=int, default=3)
    ap.add_argument("--members", type=int, default=3)
    ap.add_argument("--hours", type=int, default=24)
    ap.add_argument("--interval", type=int, default=10)
    ap.add_argument("--max-mib", type=int, default=256,
                    help="the store's bound; below the data's size this measures writing while dropping")
    ap.add_argument("--dir", help="where to put the file (default: a temporary directory under /var/tmp)")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()

    info = machine({"sqlite": __import__("sqlite3").sqlite_version, "dbplane_commit": commit()})
    print(json.dumps(info))
    root = Path(args.dir or tempfile.mkdtemp(prefix="dbplane-bench-history-", dir="/var/tmp"))
    series = series_labels(args.databases, args.members)
    src = Source(series)
    end = int(time.time()) // 300 * 300
    start = end - args.hours * 3600
    clock = [end]
    results: dict = {"machine": info, "series": len(series), "interval_s": args.interval, "hours": args.hours}
    print(f"{len(series)} series, one sample each per {args.interval} s, {args.hours} h; file in {root}")
    try:
        retention = Retention(max_bytes=args.max_mib * 2**20)
        w = HistoryWriter(root / "history.db", retention, clock=lambda: clock[0])
        elapsed, n, lat = write_span(w, src, start, end, args.interval)
        results["fill"] = {"samples": n, "seconds": round(elapsed, 1), "samples_per_s": round(n / elapsed),
                           "write_ms_p50": round(statistics.median(lat) * 1000, 2),
                           "write_ms_p99": round(sorted(lat)[int(len(lat) * 0.99)] * 1000, 2),
                           "write_ms_max": round(max(lat) * 1000, 1), "file": w.stats()}
        print("fill:", results["fill"])

        clock[0] = end + 3600
        elapsed, n, lat = write_span(w, src, end, end + 3600, args.interval)
        results["steady"] = {"samples_per_s": round(n / elapsed),
                             "write_ms_p50": round(statistics.median(lat) * 1000, 2),
                             "write_ms_p99": round(sorted(lat)[int(len(lat) * 0.99)] * 1000, 2),
                             "write_ms_max": round(max(lat) * 1000, 1)}
        print("steady state (expiry on):", results["steady"], w.stats())
        if args.max_mib < 256:
            w.close()
            return   # bounded below the data: the numbers above are the point; the rest needs room

        now = end + 3600
        rows = fake_rollups(w, start, 13)
        w._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        results["full_retention"] = {"rollup_rows_added": rows, "file": w.stats()}
        print("with 14 days of rollups:", results["full_retention"])

        one = {"database": "db0", "member": "db0-1"}
        q = {
            "1 series, 1 h raw (360 points)": lambda: w.query("dbplane_pg_xact_commit_total", one,
                                                              since=now - 3600, until=now),
            "1 series, 24 h raw (8,640 points)": lambda: w.query("dbplane_pg_xact_commit_total", one,
                                                                 since=now - 86400, until=now),
            "1 series, 24 h, step 5 min (288 points)": lambda: w.query(
                "dbplane_pg_xact_commit_total", one, since=now - 86400, until=now, step=300),
            "1 series, 14 days, step 1 h (336 points)": lambda: w.query(
                "dbplane_pg_xact_commit_total", one, since=now - 14 * 86400, until=now, step=3600),
            "54 series (connections by state), 1 h, step 1 min": lambda: w.query(
                "dbplane_pg_connections", since=now - 3600, until=now, step=60),
        }
        results["queries_ms"] = {label: round(timed(fn), 2) for label, fn in q.items()}
        for label, ms in results["queries_ms"].items():
            print(f"query {label}: {ms} ms")
        w.close()

        t0 = time.perf_counter()
        w = HistoryWriter(root / "history.db", retention, clock=lambda: clock[0])
        results["reopen_s"] = round(time.perf_counter() - t0, 2)
        print(f"reopen (quick_check, series cache): {results['reopen_s']} s")
        w.close()
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.exit(main())
