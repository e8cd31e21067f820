"""Benchmark: the connection layer. pgbench throughput, latency and the pooler's CPU per
transaction against the primary directly, through dbplane's pooling proxy and through
PgBouncer, interleaved in the same run on the same database.

    .venv/bin/python bench/proxy_pgbench.py --reps 3

Setup (once):

  1. platform  `dbplane up` in a fresh data root under /var/tmp, one database created with
               `dbplane db create pgb --class medium --wait` (max_connections 200; single
               member, `--multi-az` for a synchronous standby), a database `bench` owned by
               the admin user and `pgbench -i -s 10` into it on the primary's own port.
  2. pgbouncer Debian's pgbouncer (installed with apt-get if /usr/sbin/pgbouncer is missing;
               a service the package started is stopped), run as its own detached child as
               the service account `dbplane` (PgBouncer refuses root) from an ini in a temp
               dir: 127.0.0.1 on a free port, pool_mode transaction, max_client_conn 500,
               default_pool_size --pool-size (20, the server pool of dbplane's proxy),
               auth_type scram-sha-256 with the admin user's password in a 0600 auth_file.

Targets (--targets, default direct,dbplane,pgbouncer):

  direct     the primary member's PostgreSQL port (from GET /v1/databases/pgb, members).
  dbplane    the database's writer endpoint (endpoints.writer): dbplane's pooling proxy, one
             process per agent (three) sharing the port; its pool_size is set to
             --pool-size divided by the number of proxies (rounded up), so that both
             poolers hold about the same number of server connections.
  pgbouncer  the PgBouncer above.
  relay      (only when asked for) bench/uvloop_relay.py: a minimal uvloop process that
             relays bytes between each client and a server connection of its own (no
             parsing, no pooling): the floor of CPU per transaction for a Python proxy.

Each repetition (--reps), for each workload and protocol (-M simple, extended, prepared),
every target runs once for --duration seconds (15), in an order that rotates between
repetitions:

  select-only  `pgbench -S -c 50 -j 2`
  tpcb-like    `pgbench -c 20 -j 2` (the default script)

  (-M prepared runs with one thread per client, -j 50 / -j 20, for every target: pgbench
  prepares with a blocking PQprepare, which deadlocks a thread of several clients behind
  a transaction pooler smaller than its clients until the queue timeout)

Before each run pgbench_branches/tellers are vacuumed and pgbench_history is truncated on
the primary (so pgbench runs with -n and nothing but the workload goes through the pooler).
Per run: TPS from pgbench's "tps = ... (without initial connection time)", average and p99
latency computed from the per-transaction log (--log, column 3 is the latency in µs),
failed transactions (pgbench's count plus aborted clients), and the pooler's CPU (user +
system, psutil) over the run divided by the transactions: PgBouncer's process, or every
process whose command line contains "dbplane.proxy" (re-scanned at the start of each run;
those of this data root if any name it or listen on the writer port). Direct has no pooler.

PgBouncer 1.18 does not support protocol-level prepared statements in transaction mode:
`-M prepared` through it is run briefly anyway and recorded as "unsupported" (with the
error, if it failed).

The table reports medians over the repetitions and paired ratios: per repetition the ratio
of TPS to the direct run of the same workload and protocol (and dbplane to pgbouncer), then
the median of those ratios. The platform is stopped (`dbplane down`) and its data root
removed at the end, also on errors (--keep keeps it); PgBouncer is always stopped.
The admin password reaches pgbench only through PGPASSFILE, never through argv.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import psycopg

from dbplane.system import ensure_service_account, postgres_bin_dir

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from machine import commit, first_line, machine  # noqa: E402  (bench/)

from platform_helpers import Platform, new_data_root, wait_for  # noqa: E402

DB = "pgb"
BENCH_DB = "bench"
SCALE = 10
PGBOUNCER = "/usr/sbin/pgbouncer"
TARGETS = ("direct", "dbplane", "pgbouncer", "relay")
DEFAULT_TARGETS = ("direct", "dbplane", "pgbouncer")
PROTOCOLS = ("simple", "extended", "prepared")
WORKLOADS = {   # name: (extra pgbench args, clients)
    "select-only": (["-S"], 50),
    "tpcb-like": ([], 20),
}
UNSUPPORTED = {("pgbouncer", "prepared")}   # PgBouncer 1.18, transaction pooling
UNSUPPORTED_RUN_S = 3                       # how long an unsupported combination still runs
PGBENCH_GRACE_S = 120                       # pgbench timeout beyond --duration
CREATE_TIMEOUT_S = 600


# -- pgbench ------------------------------------------------------------------------------

@dataclass
class RunResult:
    rep: int
    workload: str
    protocol: str
    target: str
    endpoint: str
    duration_s: int
    tps: float | None = None
    transactions: int = 0
    avg_ms: float | None = None
    p99_ms: float | None = None
    failed: int = 0
    aborted_clients: int = 0
    pooler_cpu_s: float | None = None
    pooler_pids: list[int] = field(default_factory=list)
    cpu_us_per_tx: float | None = None
    status: str = "ok"              # ok, failed, unsupported
    error: str = ""


def pgbench_env(passfile: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    return {**env, "PGPASSFILE": passfile, "PGSSLMODE": "disable", "PGCONNECT_TIMEOUT": "10",
            "PGAPPNAME": "proxy_pgbench"}


def pgbench_init(host: str, port: int, user: str, passfile: str) -> None:
    with psycopg.connect(host=host, port=port, user=user, dbname="postgres", passfile=passfile,
                         connect_timeout=5, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {BENCH_DB}")
    r = subprocess.run([f"{postgres_bin_dir()}/pgbench", "-i", "-s", str(SCALE), "-q",
                        "-h", host, "-p", str(port), "-U", user, BENCH_DB],
                       capture_output=True, text=True, timeout=600, env=pgbench_env(passfile))
    if r.returncode != 0:
        raise RuntimeError(f"pgbench -i exited {r.returncode}: {r.stderr.strip()[-500:]}")


def reset_tables(host: str, port: int, user: str, passfile: str) -> None:
    """What pgbench does before a run unless -n, done here on the primary directly."""
    with psycopg.connect(host=host, port=port, user=user, dbname=BENCH_DB, passfile=passfile,
                         connect_timeout=5, autocommit=True) as conn:
        conn.execute("VACUUM pgbench_branches")
        conn.execute("VACUUM pgbench_tellers")
        conn.execute("TRUNCATE pgbench_history")


def latencies_us(log_prefix: Path) -> tuple[list[int], int]:
    """Per-transaction latencies (column 3, µs) from every log file of a run, and the
    number of failed transactions logged (latency 'failed'/'serialization'/'deadlock')."""
    lat: list[int] = []
    failed = 0
    for f in log_prefix.parent.glob(log_prefix.name + ".*"):
        with f.open() as fh:
            for line in fh:
                cols = line.split()
                if len(cols) < 3:
                    continue
                if cols[2].isdigit():
                    lat.append(int(cols[2]))
                elif cols[2] in ("failed", "serialization", "deadlock"):
                    failed += 1
    return lat, failed


def percentile(sorted_values: list[int], q: float) -> float:
    """Nearest-rank percentile."""
    k = max(0, min(len(sorted_values) - 1, int(-(-q * len(sorted_values) // 100)) - 1))
    return float(sorted_values[k])


class PoolerCpu:
    """user+system CPU seconds of a set of processes between start() and stop()."""

    def __init__(self, find):
        self.find = find            # () -> list[psutil.Process]
        self.before: dict[int, float] = {}
        self.procs: dict[int, psutil.Process] = {}

    @staticmethod
    def cpu(p: psutil.Process) -> float | None:
        try:
            t = p.cpu_times()
            return t.user + t.system
        except psutil.Error:
            return None

    def start(self) -> None:
        for p in self.find():
            c = self.cpu(p)
            if c is not None:
                self.procs[p.pid], self.before[p.pid] = p, c

    def stop(self) -> tuple[float | None, list[int]]:
        for p in self.find():                       # started during the run: from zero
            if p.pid not in self.procs:
                self.procs[p.pid], self.before[p.pid] = p, 0.0
        total, pids = 0.0, []
        for pid, p in self.procs.items():
            c = self.cpu(p)
            if c is not None:
                total += c - self.before[pid]
                pids.append(pid)
        return (total if pids else None), sorted(pids)


def run_pgbench(rep: int, workload: str, protocol: str, target: str, host: str, port: int,
                user: str, passfile: str, duration: int, logdir: Path, cpu: PoolerCpu | None
                ) -> RunResult:
    args, clients = WORKLOADS[workload]
    unsupported = (target, protocol) in UNSUPPORTED
    if unsupported:
        duration = min(duration, UNSUPPORTED_RUN_S)
    res = RunResult(rep, workload, protocol, target, f"{host}:{port}", duration)
    prefix = logdir / f"r{rep}-{workload}-{protocol}-{target}"
    # -M prepared: one pgbench thread per client. pgbench prepares a statement with a
    # blocking PQprepare at its first use; a thread blocked there while its other clients
    # hold every pooled server connection inside a transaction deadlocks until the
    # pooler's queue timeout (any transaction pooler with fewer connections than clients)
    threads = clients if protocol == "prepared" else 2
    argv = [f"{postgres_bin_dir()}/pgbench", *args, "-n", "-c", str(clients), "-j", str(threads),
            "-T", str(duration), "-M", protocol, "--log", f"--log-prefix={prefix}",
            "-h", host, "-p", str(port), "-U", user, BENCH_DB]
    if cpu is not None:
        cpu.start()
    try:
        r = subprocess.run(argv, capture_output=True, text=True, env=pgbench_env(passfile),
                           timeout=duration + PGBENCH_GRACE_S)
        out, err, rc = r.stdout, r.stderr, r.returncode
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err, rc = f"timed out after {duration + PGBENCH_GRACE_S}s", -1
    if cpu is not None:
        res.pooler_cpu_s, res.pooler_pids = cpu.stop()

    m = re.search(r"tps = ([\d.]+) \(without initial connection time\)", out)
    res.tps = float(m.group(1)) if m else None
    m = re.search(r"number of transactions actually processed: (\d+)", out)
    res.transactions = int(m.group(1)) if m else 0
    m = re.search(r"number of failed transactions: (\d+)", out)
    failed_reported = int(m.group(1)) if m else 0
    res.aborted_clients = len(re.findall(r"client \d+ (?:script \d+ )?aborted", err))
    lat, failed_logged = latencies_us(prefix)
    for f in logdir.glob(prefix.name + ".*"):
        f.unlink()
    res.failed = max(failed_reported, failed_logged)
    if lat:
        lat.sort()
        res.avg_ms = statistics.fmean(lat) / 1000
        res.p99_ms = percentile(lat, 99) / 1000
    if res.pooler_cpu_s is not None and res.transactions:
        res.cpu_us_per_tx = res.pooler_cpu_s * 1e6 / res.transactions
    errors = [ln for ln in err.splitlines() if "aborted" in ln or "error" in ln.lower()
              or "timed out" in ln or "FATAL" in ln]
    if rc != 0 or res.aborted_clients or res.tps is None:
        res.status = "failed"
        res.error = (errors[0] if errors else err.strip()[-300:] or f"exit {rc}")[:300]
    if unsupported:
        res.status = "unsupported"
    return res


# -- pgbouncer ----------------------------------------------------------------------------

def free_port_is(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_pgbouncer() -> None:
    if not Path(PGBOUNCER).exists():
        print("installing pgbouncer with apt-get", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True,
                       timeout=300, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "pgbouncer"], check=True,
                       capture_output=True, timeout=600, env=env)
    # the package's own service (Debian: /etc/pgbouncer, pidfile /run/postgresql): stop it
    pidfile = Path("/run/postgresql/pgbouncer.pid")
    try:
        proc = psutil.Process(int(pidfile.read_text().split()[0]))
    except (OSError, ValueError, IndexError, psutil.Error):
        return
    if "pgbouncer" in " ".join(proc.cmdline()) and "/etc/pgbouncer" in " ".join(proc.cmdline()):
        print(f"stopping the pgbouncer service (pid {proc.pid})", flush=True)
        r = subprocess.run(["service", "pgbouncer", "stop"], capture_output=True, timeout=30)
        if r.returncode != 0 and proc.is_running():
            proc.terminate()
            psutil.wait_procs([proc], timeout=10)


def read_password(passfile: Path, user: str) -> str:
    """The password of user from a libpq passfile (host:port:db:user:password)."""
    for line in passfile.read_text().splitlines():
        parts = re.split(r"(?<!\\):", line, maxsplit=4)
        if len(parts) == 5 and parts[3] in (user, "*"):
            return parts[4].replace("\\:", ":").replace("\\\\", "\\")
    raise RuntimeError(f"no password for {user} in {passfile}")


class PgBouncer:
    def __init__(self, host: str, port: int, user: str, password: str, pool_size: int):
        self.dir = Path(tempfile.mkdtemp(prefix="proxy-pgbench-pgbouncer-", dir="/var/tmp"))
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        run_as = ensure_service_account()
        self.ids = {"user": run_as.uid, "group": run_as.gid, "extra_groups": []} if run_as else {}
        q = password.replace('"', '""')
        (self.dir / "userlist.txt").write_text(f'"{user}" "{q}"\n')
        (self.dir / "userlist.txt").chmod(0o600)
        (self.dir / "pgbouncer.ini").write_text(f"""\
[databases]
{BENCH_DB} = host={host} port={port} dbname={BENCH_DB}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir = {self.dir}
auth_type = scram-sha-256
auth_file = {self.dir}/userlist.txt
pool_mode = transaction
max_client_conn = 500
default_pool_size = {pool_size}
min_pool_size = 0
reserve_pool_size = 0
ignore_startup_parameters = extra_float_digits,options
server_tls_sslmode = disable
client_tls_sslmode = disable
logfile = {self.dir}/pgbouncer.log
log_connections = 0
log_disconnections = 0
""")
        if run_as:
            for f in [self.dir, *self.dir.iterdir()]:
                os.chown(f, run_as.uid, run_as.gid)

    def start(self) -> None:
        with open(self.dir / "stderr.log", "wb") as err:
            self.proc = subprocess.Popen([PGBOUNCER, str(self.dir / "pgbouncer.ini")],
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=err, cwd=self.dir, start_new_session=True,
                                         **self.ids)

        def listening() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pgbouncer exited {self.proc.returncode}: {self.log_tail()}")
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        try:
            wait_for(listening, 15, f"pgbouncer to listen on {self.port}", 0.1)
        except AssertionError as e:
            raise RuntimeError(f"{e}: {self.log_tail()}") from None

    def log_tail(self) -> str:
        text = ""
        for name in ("stderr.log", "pgbouncer.log"):
            try:
                text += (self.dir / name).read_text()[-400:]
            except OSError:
                pass
        return text.strip()

    def process(self) -> list[psutil.Process]:
        try:
            return [psutil.Process(self.proc.pid)] if self.proc and self.proc.poll() is None else []
        except psutil.Error:
            return []

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)     # SIGINT: immediate shutdown
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


# -- dbplane's proxy ----------------------------------------------------------------------

def dbplane_proxy_finder(root: Path, writer_port: int):
    """Every process whose command line contains "dbplane.proxy"; if some belong to this
    data root (name it, or listen on the writer port, or are parent/child of one that
    does), only those (other engineers may run their own platforms here)."""
    def find() -> list[psutil.Process]:
        procs = []
        for p in psutil.process_iter(["cmdline"]):
            if "dbplane.proxy" in " ".join(p.info["cmdline"] or []):
                procs.append(p)
        own = set()
        for p in procs:
            try:
                if str(root) in " ".join(p.info["cmdline"] or []) or any(
                        c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == writer_port
                        for c in p.net_connections("tcp")):
                    own.add(p.pid)
            except psutil.Error:
                pass
        if own:
            related = set(own)
            for p in procs:
                try:
                    if p.ppid() in own or any(c.pid in own for c in p.children()):
                        related.add(p.pid)
                except psutil.Error:
                    pass
            procs = [p for p in procs if p.pid in related]
        return procs
    return find


# -- reporting ----------------------------------------------------------------------------

def machine_info() -> dict:
    return machine({
        "postgres": first_line([f"{postgres_bin_dir()}/postgres", "--version"]),
        "pgbench": first_line([f"{postgres_bin_dir()}/pgbench", "--version"]),
        "pgbouncer": first_line([PGBOUNCER, "-V"]),
        "dbplane": f"{importlib.metadata.version('dbplane')} ({commit()})",
        "command": shlex.join([sys.executable, *sys.argv]),
    })


def median(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def fmt(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def paired_ratio(results: list[RunResult], wl: str, proto: str, num: str, den: str
                 ) -> float | None:
    """Median over repetitions of tps(num) / tps(den), both ok, same workload and protocol."""
    by = {(r.rep, r.target): r for r in results if r.workload == wl and r.protocol == proto}
    ratios = []
    for (rep, target), r in by.items():
        d = by.get((rep, den))
        if target == num and d and r.status == d.status == "ok" and r.tps and d.tps:
            ratios.append(r.tps / d.tps)
    return median(ratios)


def summarize(results: list[RunResult], targets: list[str]) -> list[dict]:
    rows = []
    for wl in WORKLOADS:
        for proto in PROTOCOLS:
            for t in targets:
                rs = [r for r in results if (r.workload, r.protocol, r.target) == (wl, proto, t)]
                if not rs:
                    continue
                ok = [r for r in rs if r.status == "ok"]
                status = ("unsupported" if any(r.status == "unsupported" for r in rs)
                          else "ok" if len(ok) == len(rs) else f"{len(rs) - len(ok)} failed")
                errors = sorted({r.error for r in rs if r.error})
                rows.append({
                    "workload": wl, "protocol": proto, "target": t, "runs": len(rs),
                    "ok_runs": len(ok), "status": status,
                    "tps": median([r.tps for r in ok]),
                    "avg_ms": median([r.avg_ms for r in ok]),
                    "p99_ms": median([r.p99_ms for r in ok]),
                    "cpu_us_per_tx": median([r.cpu_us_per_tx for r in ok]),
                    "failed_tx": sum(r.failed for r in rs),
                    "aborted_clients": sum(r.aborted_clients for r in rs),
                    "tps_vs_direct": (paired_ratio(results, wl, proto, t, "direct")
                                      if t != "direct" else None),
                    "tps_dbplane_vs_pgbouncer": (paired_ratio(results, wl, proto, t, "pgbouncer")
                                                 if t == "dbplane" else None),
                    "error": errors[0] if errors else "",
                })
    return rows


def report(rows: list[dict], info: dict, setup: dict) -> None:
    print("\n## machine")
    for k, v in info.items():
        print(f"  {k:17} {v}")
    print("\n## setup")
    for k, v in setup.items():
        print(f"  {k:17} {v}")
    print("\n## results (medians over repetitions; ratios: median of per-repetition TPS ratios)\n")
    cols = ["workload", "protocol", "target", "TPS", "avg ms", "p99 ms", "pooler CPU µs/tx",
            "TPS vs direct", "TPS dbplane/pgbouncer", "failed tx", "status"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        cpu = "-" if r["target"] == "direct" or r["cpu_us_per_tx"] is None \
            else fmt(r["cpu_us_per_tx"], 1)
        status = r["status"] + (f": {r['error'][:80]}" if r["error"] else "")
        cells = [r["workload"], f"-M {r['protocol']}", r["target"], fmt(r["tps"], 0),
                 fmt(r["avg_ms"], 3), fmt(r["p99_ms"], 3), cpu, fmt(r["tps_vs_direct"]),
                 fmt(r["tps_dbplane_vs_pgbouncer"]),
                 f"{r['failed_tx']}" + (f" ({r['aborted_clients']} clients aborted)"
                                        if r["aborted_clients"] else ""), status]
        print("| " + " | ".join(cells) + " |")


# -- main ---------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3, help="repetitions of every combination")
    ap.add_argument("--duration", type=int, default=15, help="seconds per pgbench run")
    ap.add_argument("--targets", default=",".join(DEFAULT_TARGETS),
                    help=f"comma-separated subset of {', '.join(TARGETS)}")
    ap.add_argument("--workloads", default=",".join(WORKLOADS),
                    help=f"comma-separated subset of {', '.join(WORKLOADS)}")
    ap.add_argument("--protocols", default=",".join(PROTOCOLS),
                    help=f"comma-separated subset of {', '.join(PROTOCOLS)}")
    ap.add_argument("--pool-size", type=int, default=20,
                    help="server connections per pool (PgBouncer's default_pool_size; the "
                         "dbplane proxy is configured by the platform)")
    ap.add_argument("--multi-az", action="store_true", help="create the database Multi-AZ")
    ap.add_argument("--keep", action="store_true", help="keep the data root afterwards")
    ap.add_argument("--json", help="also write the raw results to this file")
    args = ap.parse_args()
    targets = [t for t in args.targets.split(",") if t]
    workloads = [w for w in args.workloads.split(",") if w]
    protocols = [p for p in args.protocols.split(",") if p]
    for kind, chosen, known in (("target", targets, TARGETS), ("workload", workloads, WORKLOADS),
                                ("protocol", protocols, PROTOCOLS)):
        unknown = set(chosen) - set(known)
        if unknown or not chosen:
            ap.error(f"unknown or no {kind}(s): {', '.join(sorted(unknown))}")
    if args.reps < 1 or args.duration < 1 or args.pool_size < 1:
        ap.error("--reps, --duration and --pool-size must be positive")

    if "pgbouncer" in targets:
        ensure_pgbouncer()
    info = machine_info()
    root = new_data_root("dbplane-bench-")
    p = Platform(root)
    logdir = Path(tempfile.mkdtemp(prefix="proxy-pgbench-logs-", dir="/var/tmp"))
    bouncer: PgBouncer | None = None
    relay: subprocess.Popen | None = None
    results: list[RunResult] = []
    setup: dict = {}
    print(f"data root {root}", flush=True)
    try:
        p.up()
        # require_tls=off: the embedded pgbench (and PgBouncer's leg here) have no TLS
        p.cli("db", "create", DB, "--class", "medium", "--wait", "--param", "require_tls=off",
              "--multi-az" if args.multi_az else "--no-multi-az", timeout=CREATE_TIMEOUT_S)
        d = p.wait_available(DB)
        primary = next(m for m in d["members"] if m["role"] == "primary")
        phost, pport = primary.get("address") or primary["host"], int(primary["port"])
        user = d["admin_user"]
        passfile = p.layout.pgpass(DB)
        pgbench_init(phost, pport, user, str(passfile))

        endpoints: dict[str, tuple[str, int]] = {"direct": (phost, pport)}
        cpus: dict[str, PoolerCpu | None] = {"direct": None}
        if "dbplane" in targets:
            # the same server connections in total as PgBouncer's pool: split between proxies
            proxies = len(p.api.get(f"/v1/databases/{DB}/proxy").json()["proxies"])
            per_proxy = -(-args.pool_size // max(1, proxies))
            p.api.patch(f"/v1/databases/{DB}/proxy", json={"pool_size": per_proxy}).raise_for_status()
            setup_proxy = f"{proxies} proxy processes x pool_size {per_proxy}"
            whost, wport = d["endpoints"]["writer"].rsplit(":", 1)
            endpoints["dbplane"] = (whost, int(wport))
            cpus["dbplane"] = PoolerCpu(dbplane_proxy_finder(root, int(wport)))
        if "pgbouncer" in targets:
            bouncer = PgBouncer(phost, pport, user, read_password(passfile, user), args.pool_size)
            bouncer.start()
            endpoints["pgbouncer"] = ("127.0.0.1", bouncer.port)
            cpus["pgbouncer"] = PoolerCpu(bouncer.process)
        if "relay" in targets:
            rport = free_port()
            relay = subprocess.Popen([sys.executable, str(Path(__file__).with_name("uvloop_relay.py")),
                                      str(rport), str(pport)])
            wait_for(lambda: not free_port_is(rport), 10, "the relay to listen")
            endpoints["relay"] = ("127.0.0.1", rport)
            relay_proc = psutil.Process(relay.pid)
            cpus["relay"] = PoolerCpu(lambda: [relay_proc])
        setup = {"database": f"{DB} (class medium, multi_az {args.multi_az}), "
                             f"pgbench -i -s {SCALE} into {BENCH_DB}",
                 "primary": f"{phost}:{pport}",
                 **{f"target {t}": f"{h}:{port}" for t, (h, port) in endpoints.items()
                    if t in targets},
                 "pool_size": args.pool_size,
                 **({"dbplane proxy": setup_proxy} if "dbplane" in targets else {}),
                 "duration_s": args.duration, "reps": args.reps}
        if endpoints.get("dbplane") == (phost, pport):
            setup["note"] = "the writer endpoint is the primary itself (no dbplane proxy yet)"
        for k, v in setup.items():
            print(f"  {k:17} {v}", flush=True)

        for rep in range(1, args.reps + 1):
            for wl in workloads:
                for proto in protocols:
                    k = (rep - 1) % len(targets)
                    for t in targets[k:] + targets[:k]:       # rotate the order per rep
                        host, port = endpoints[t]
                        try:
                            reset_tables(phost, pport, user, str(passfile))
                            r = run_pgbench(rep, wl, proto, t, host, port, user, str(passfile),
                                            args.duration, logdir, cpus[t])
                        except Exception as e:   # record it and go on: a failure is data too
                            r = RunResult(rep, wl, proto, t, f"{host}:{port}", args.duration,
                                          status="failed", error=f"{type(e).__name__}: {e}"[:300])
                        results.append(r)
                        print(f"rep {rep} {wl:11} -M {proto:8} {t:9} tps {fmt(r.tps, 0):>7}  "
                              f"avg {fmt(r.avg_ms, 3)} ms  p99 {fmt(r.p99_ms, 3)} ms  "
                              f"cpu/tx {fmt(r.cpu_us_per_tx, 1)} µs  failed {r.failed}  "
                              f"{r.status} {r.error[:120]}", flush=True)
    finally:
        if bouncer is not None:
            bouncer.stop()
        if relay is not None:
            relay.kill()
            relay.wait(10)
        try:
            p.cli("down", check=False, timeout=300)
        except Exception as e:
            print(f"dbplane down failed: {e}", file=sys.stderr)
        shutil.rmtree(logdir, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    info["loadavg_at_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    rows = summarize(results, targets)
    report(rows, info, setup)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "setup": setup, "summary": rows,
                                               "runs": [asdict(r) for r in results]}, indent=2))
    failed = [r for r in results if r.status == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
