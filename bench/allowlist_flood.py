"""Benchmark: a connection flood from a denied address against a database's writer endpoint,
and what it costs an allowed client. Runs against a platform that is up:

    .venv/bin/python bench/allowlist_flood.py --data-dir /var/tmp/<yours>

1. A database (--db, created single-AZ if missing, allowlist 127.0.0.1/32 only).
2. Baseline: one allowed client (psycopg over TLS, one connection) runs `select 1` back to
   back for --seconds; per-query latency recorded.
3. Flood: --flooders processes connect from 127.0.0.2 (a loopback address no rule allows),
   send a StartupMessage or an SSLRequest and read the refusal, as fast as they can, each
   bounded by --seconds and --max-per-flooder connections; the allowed client runs the
   same loop at the same time.
4. Report: refusals per second, every refusal checked to be the allowlist's (SQLSTATE
   28000), the allowed client's median and p99 latency with and without the flood and the
   ratio, the proxies' CPU during the flood, and the audit entries the refusals produced
   (refusals are aggregated per source).
"""

from __future__ import annotations

import argparse
import multiprocessing
import socket
import statistics
import sys
import time
from pathlib import Path

import psutil

from dbplane import pgwire as wire

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from platform_helpers import Platform, wait_for  # noqa: E402  (the tests' platform driver)

SSL_REQUEST = wire.INT32.pack(8) + wire.INT32.pack(wire.SSL_REQUEST)
STARTUP = wire.startup_message({"user": "postgres", "database": "postgres"})


def refused(endpoint: str, first: bytes) -> bool:
    """One connection from 127.0.0.2: whether the proxy refused it with the allowlist's error."""
    host, port = endpoint.rsplit(":", 1)
    with socket.socket() as s:
        s.settimeout(10)
        s.bind(("127.0.0.2", 0))
        s.connect((host, int(port)))
        s.sendall(first)
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    if data[:1] != b"E":
        return False
    fields = wire.parse_error_fields(data[5:1 + int.from_bytes(data[1:5])])
    return fields.get("C") == "28000" and "no allowlist rule" in fields.get("M", "")


def flooder(endpoint: str, seconds: float, limit: int, out) -> None:
    ok = bad = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and ok + bad < limit:
        try:
            if refused(endpoint, STARTUP if (ok + bad) % 2 else SSL_REQUEST):
                ok += 1
            else:
                bad += 1
        except OSError:
            bad += 1
    out.put((ok, ok + bad))


def latencies(platform: Platform, db: str, seconds: float, stop=None) -> list[float]:
    out = []
    with platform.connect(db) as conn:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and len(out) < 1_000_000 and not (stop and stop()):
            t0 = time.perf_counter()
            conn.execute("select 1").fetchone()
            out.append((time.perf_counter() - t0) * 1000)
    return out


def p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


def proxies_cpu(procs: list[psutil.Process]) -> float:
    total = 0.0
    for proc in procs:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", required=True, type=Path)
    ap.add_argument("--db", default="flood-bench")
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--flooders", type=int, default=2)
    ap.add_argument("--max-per-flooder", type=int, default=200_000)
    args = ap.parse_args()

    platform = Platform(args.data_dir)
    if platform.api.get(f"/v1/databases/{args.db}").status_code == 404:
        platform.create(args.db, "--allow", "127.0.0.1/32")
    endpoint = platform.wait_available(args.db)["endpoints"]["writer"]
    print(f"database {args.db}, writer endpoint {endpoint}, {psutil.cpu_count()} CPUs")

    base = latencies(platform, args.db, args.seconds)
    print(f"baseline: {len(base)} queries, median {p(base, 50):.2f} ms, p99 {p(base, 99):.2f} ms")

    audit_since = time.time()
    procs = platform.proxy_processes()
    cpu0 = proxies_cpu(procs)
    results = multiprocessing.Queue()
    workers = [multiprocessing.Process(target=flooder, args=(endpoint, args.seconds, args.max_per_flooder,
                                                              results)) for _ in range(args.flooders)]
    t0 = time.monotonic()
    for w in workers:
        w.start()
    flood = latencies(platform, args.db, args.seconds + 5,
                      stop=lambda: not any(w.is_alive() for w in workers))
    for w in workers:
        w.join(args.seconds + 30)
    elapsed = time.monotonic() - t0
    cpu = proxies_cpu(procs) - cpu0
    counts = [results.get(timeout=5) for _ in workers]
    refusals, attempts = sum(c[0] for c in counts), sum(c[1] for c in counts)
    print(f"flood: {args.flooders} flooders from 127.0.0.2, {attempts} connections in {elapsed:.1f} s, "
          f"{refusals} refused by the allowlist ({refusals / elapsed:,.0f}/s), "
          f"{attempts - refusals} other outcomes")
    print(f"proxies' CPU during the flood: {cpu:.1f} s over {elapsed:.1f} s "
          f"({cpu / max(refusals, 1) * 1e6:.0f} µs per refusal)")
    print(f"allowed client under the flood: {len(flood)} queries, median {p(flood, 50):.2f} ms "
          f"(x{p(flood, 50) / p(base, 50):.2f}), p99 {p(flood, 99):.2f} ms "
          f"(x{p(flood, 99) / p(base, 99):.2f})")

    def audited() -> list[dict]:
        r = platform.api.get("/v1/audit", params={"since": audit_since, "action": "db:Connect",
                                                  "resource": f"db/{args.db}", "limit": 1000})
        return [e for e in r.json()["entries"] if e["source"] == "127.0.0.2"]
    # refusals are aggregated per source address into an entry at most every 10 s per proxy
    entries = wait_for(audited, 30, "the refusals' audit entries")
    print(f"audit: {len(entries)} entries for {refusals} refusals")


if __name__ == "__main__":
    main()
