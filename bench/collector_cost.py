"""Benchmark: what the metrics collectors cost, idle and on a busy database.

    .venv/bin/python bench/collector_cost.py [--duration 60] [--clients 8] [--data-dir ROOT]

Without --data-dir it starts its own platform in a fresh data root under /var/tmp
(`dbplane up`, then `dbplane down` and removal at the end, also on errors). It creates a
Multi-AZ micro database `bench-mc` (no backups), loads `pgbench -i -s 5` into a database
`bench` on the primary's own port, then measures two windows of the same length:

1. idle: nothing runs but the platform;
2. busy: `pgbench -c CLIENTS -j 2 -T DURATION` (tpcb-like) against the primary;
3. busy again after `dbplane db modify bench-mc --metrics-interval 1` (members sampled
   every second; host, proxies and backups still every 10 s).

Per window and host: the collector process's CPU time (user + system) as a share of one
core, its scrapes and SQL statements (from its /healthz, read with the platform's client
certificate), the CPU of the PostgreSQL backends serving the collector's connections
(application_name dbplane-metrics), and the duration of its last member scrape at the end of
the window (dbplane_collector_scrape_duration_seconds). The admin password reaches pgbench only
through PGPASSFILE.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import psycopg
from prometheus_client.parser import text_string_to_metric_families

from dbplane.metrics import remote
from dbplane.models import CollectorInstance
from dbplane.paths import Layout
from dbplane.security import ca
from dbplane.security.tls import client_context, etcd_client_tls
from dbplane.store import keys
from dbplane.store.gateway import Gateway
from dbplane.system import postgres_bin_dir

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from machine import commit, machine  # noqa: E402  (bench/)

from platform_helpers import Platform  # noqa: E402  (drives the CLI and API as the tests do)

DB = "bench-mc"
BENCH_DB = "bench"


def collectors(p: Platform) -> list[CollectorInstance]:
    gw = Gateway(p.info.etcd_url, tls=etcd_client_tls(p.root))
    return sorted((CollectorInstance.model_validate_json(v)
                   for v in gw.get_prefix(keys.metrics_collectors()).values()), key=lambda c: c.host)


def http(p: Platform) -> httpx.Client:
    etcd_tls = etcd_client_tls(p.root)
    ctx = client_context(ca.cert_path(p.root))
    ctx.load_cert_chain(etcd_tls.cert, etcd_tls.key)
    return httpx.Client(verify=ctx, timeout=10)


def collector_backends(p: Platform) -> list[psutil.Process]:
    """The PostgreSQL backends serving the collectors' connections, on every member."""
    out = []
    for m in p.describe(DB)["members"]:
        with psycopg.connect(host=m["address"], port=m["port"], user=p.describe(DB)["admin_user"],
                             dbname="postgres", passfile=str(p.layout.pgpass(DB)), connect_timeout=5) as c:
            pids = [r[0] for r in c.execute("select pid from pg_stat_activity "
                                            "where application_name = 'dbplane-metrics'")]
        out += [psutil.Process(pid) for pid in pids]
    return out


def cpu(procs: list[psutil.Process]) -> float:
    total = 0.0
    for proc in procs:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def snapshot(p: Platform, client: httpx.Client, found: list[CollectorInstance]) -> dict:
    out = {}
    for c in found:
        health = client.get(remote.base_url(c) + "/healthz").json()
        out[c.host] = {"cpu": cpu([psutil.Process(c.pid)]), "scrapes": health["scrapes"],
                       "queries": health["queries"], "series": health["series"]}
    return out


def last_member_scrape(client: httpx.Client, found: list[CollectorInstance]) -> dict[str, float]:
    out = {}
    for c in found:
        text = client.get(remote.base_url(c) + "/metrics").text
        values = [s.value for f in text_string_to_metric_families(text)
                  if f.name == "dbplane_collector_scrape_duration_seconds" for s in f.samples
                  if s.labels["target"] not in ("host", "proxy", "backup")]
        out[c.host] = max(values, default=0.0)
    return out


def pgbench_env(passfile: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    return {**env, "PGPASSFILE": passfile, "PGSSLMODE": "disable", "PGCONNECT_TIMEOUT": "10"}


def prepare(p: Platform) -> tuple[dict, str]:
    p.create(DB, "--multi-az", "--param", "require_tls=off")
    d = p.describe(DB)
    primary = next(m for m in d["members"] if m["role"] == "primary")
    passfile = str(p.layout.pgpass(DB))
    with psycopg.connect(host=primary["address"], port=primary["port"], user=d["admin_user"],
                         dbname="postgres", passfile=passfile, connect_timeout=5, autocommit=True) as c:
        c.execute(f"CREATE DATABASE {BENCH_DB}")
    subprocess.run([f"{postgres_bin_dir()}/pgbench", "-i", "-s", "5", "-q", "-h", primary["address"],
                    "-p", str(primary["port"]), "-U", d["admin_user"], BENCH_DB],
                   check=True, capture_output=True, timeout=600, env=pgbench_env(passfile))
    return primary, d["admin_user"]


def window(p: Platform, seconds: float, load: list[str] | None, passfile: str) -> tuple[dict, float | None]:
    client = http(p)
    found = collectors(p)
    backends = collector_backends(p)
    before, b0, t0 = snapshot(p, client, found), cpu(backends), time.monotonic()
    tps = None
    if load:
        r = subprocess.run(load, capture_output=True, text=True, timeout=seconds + 120,
                           env=pgbench_env(passfile))
        tps = next((float(line.split("=")[1].split()[0]) for line in r.stdout.splitlines()
                    if line.startswith("tps =")), None)
    else:
        time.sleep(seconds)
    after, b1, elapsed = snapshot(p, client, found), cpu(backends), time.monotonic() - t0
    last = last_member_scrape(client, found)
    rows = {}
    for host, a in after.items():
        b = before[host]
        scrapes = max(a["scrapes"] - b["scrapes"], 1)
        rows[host] = {"cpu_share": (a["cpu"] - b["cpu"]) / elapsed, "scrapes": a["scrapes"] - b["scrapes"],
                      "queries_per_scrape": (a["queries"] - b["queries"]) / scrapes,
                      "cpu_ms_per_scrape": (a["cpu"] - b["cpu"]) / scrapes * 1000,
                      "series": a["series"], "last_member_scrape_ms": last[host] * 1000}
    rows["backends"] = {"cpu_share": (b1 - b0) / elapsed}
    return rows, tps


def report(name: str, rows: dict, tps: float | None) -> None:
    print(f"\n{name}" + (f" (pgbench {tps:.0f} tps)" if tps else ""))
    print("| host | collector CPU (share of one core) | CPU per scrape | scrapes | SQL statements per scrape "
          "| exposition lines | last member scrape |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for host, r in rows.items():
        if host == "backends":
            continue
        print(f"| {host} | {r['cpu_share'] * 100:.2f}% | {r['cpu_ms_per_scrape']:.0f} ms | {r['scrapes']} | "
              f"{r['queries_per_scrape']:.1f} | {r['series']} | {r['last_member_scrape_ms']:.0f} ms |")
    print(f"PostgreSQL backends serving the collectors (all members): "
          f"{rows['backends']['cpu_share'] * 100:.2f}% of one core")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=60, help="seconds per window")
    ap.add_argument("--clients", type=int, default=8, help="pgbench clients")
    ap.add_argument("--data-dir", type=Path, help="an existing platform (default: start one)")
    ap.add_argument("--keep", action="store_true", help="keep the data root afterwards")
    args = ap.parse_args()
    own = args.data_dir is None
    root = args.data_dir or Path(tempfile.mkdtemp(prefix="dbplane-bench-", dir="/var/tmp"))
    if own:
        root.chmod(0o755)
    p = Platform(root)
    print(f"data root {root}; {machine({'dbplane_commit': commit()})}", flush=True)
    try:
        if own:
            p.up()
        primary, user = prepare(p)
        passfile = str(Layout(root).pgpass(DB))
        report("idle", *window(p, args.duration, None, passfile))
        load = [f"{postgres_bin_dir()}/pgbench", "-c", str(args.clients), "-j", "2",
                "-T", str(int(args.duration)), "-n", "-h", primary["address"], "-p", str(primary["port"]),
                "-U", user, BENCH_DB]
        report(f"busy: pgbench -c {args.clients} -j 2 on the primary",
               *window(p, args.duration, load, passfile))
        p.cli("db", "modify", DB, "--metrics-interval", "1", "--wait")
        report(f"busy, metrics_interval 1 s: pgbench -c {args.clients} -j 2 on the primary",
               *window(p, args.duration, load, passfile))
    finally:
        if own:
            p.down()
            if not args.keep:
                shutil.rmtree(root, ignore_errors=True)
        else:
            p.cli("db", "delete", DB, check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
