"""Benchmark: how long `dbplane db create` of a Multi-AZ database takes, and the failover
RTO when the primary's whole node is killed with SIGKILL, with dbplane's Patroni timing
and, interleaved in the same run, with Patroni's default timing.

    .venv/bin/python bench/create_failover.py --runs 5

Each run, for each timing profile (order alternates between runs):

  1. create   `dbplane db create NAME --class micro --multi-az --wait` (2 members, no
              replicas), timed until the create operation succeeds (status available).
              The `patroni-defaults` profile then PATCHes Patroni's /config with
              ttl 30, loop_wait 10, retry_timeout 10 and waits until the leader's etcd
              lease carries the new ttl.
  2. write    a writer thread INSERTs one row per autocommit transaction in a loop; a
              row counts as acknowledged when its COMMIT returned without error. It
              writes for 3 s plus a random 0-10 s, so that the kill lands at a random
              point of Patroni's loop.
  3. kill     kill -9 the primary's node: its agent, its Patroni and its postmaster with
              all children.
  4. RTO      from the kill to the first successful INSERT+COMMIT on another member. The
              writer probes every member's port directly (bounded in count and time).
  5. check    every acknowledged row is on the new primary.
  6. rejoin   `dbplane up` restarts the killed agent; wait until the database is
              available again (the old primary rejoined as standby).
  7. delete   `dbplane db delete NAME --wait`.

The platform runs from a fresh data root under /var/tmp and is stopped (`dbplane down`)
and removed at the end, also on errors (--keep keeps the data root for inspection).
Only one benchmark database exists at a time, so killing a node disturbs nothing else.
"""

from __future__ import annotations

import argparse
import base64
import importlib.metadata
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import psutil
import psycopg

from dbplane.paths import Layout
from dbplane.process import running_pid
from dbplane.security import ca
from dbplane.security.tls import client_context, etcd_client_tls
from dbplane.system import etcd_binary, postgres_bin_dir

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from machine import commit, first_line, machine  # noqa: E402  (bench/)

from platform_helpers import signed_client, wait_for  # noqa: E402  (the tests' helpers)

PROFILES = {
    # dbplane's own timing (src/dbplane/agent/patroni.py DCS_TIMING): no PATCH needed
    "dbplane": None,
    # Patroni's documented defaults
    "patroni-defaults": {"ttl": 30, "loop_wait": 10, "retry_timeout": 10},
}
PRE_KILL_WRITES_S = 3.0       # the writer runs at least this long before the node is killed,
KILL_JITTER_S = 10.0          # plus a random 0..10 s, so the kill lands at a random point of
                              # Patroni's loop (loop_wait is 2 s or 10 s); without it the kill
                              # always hit the same phase of the leader lease refresh
PROBE_TIMEOUT_S = 180.0       # give up on a failover after this long ...
PROBE_MAX_ATTEMPTS = 20000    # ... or after this many connection attempts
REJOIN_TIMEOUT_S = 300.0
CREATE_TIMEOUT_S = 600.0


# -- platform ------------------------------------------------------------------------------

class Bench:
    def __init__(self, root: Path):
        self.root = root
        self.layout = Layout(root)
        self.env = {**os.environ, "DBPLANE_API": "", "DBPLANE_HOME": str(root)}

    def cli(self, *args: str, timeout: float = CREATE_TIMEOUT_S) -> subprocess.CompletedProcess:
        r = subprocess.run([sys.executable, "-m", "dbplane", "--data-dir", str(self.root), *args],
                           capture_output=True, text=True, timeout=timeout, env=self.env)
        if r.returncode != 0:
            raise RuntimeError(f"dbplane {' '.join(args)} exited {r.returncode}: "
                               f"{(r.stderr or r.stdout).strip()[-500:]}")
        return r

    @property
    def info(self):
        return self.layout.read_platform()

    def api(self, path: str) -> dict:
        r = signed_client(self.info.api_url, self.layout.root).get(path, timeout=10)
        r.raise_for_status()
        return r.json()

    @property
    def etcd_verify(self):
        """etcd admits only clients with the data root's certificate (https)."""
        etcd_tls = etcd_client_tls(self.layout.root)
        return etcd_tls.ssl_context() if etcd_tls and self.info.etcd_url.startswith("https") else True

    def etcd_get(self, key: str) -> dict | None:
        b64 = base64.b64encode(key.encode()).decode()
        r = httpx.post(f"{self.info.etcd_url}/v3/kv/range", json={"key": b64}, timeout=5,
                       verify=self.etcd_verify)
        r.raise_for_status()
        kvs = r.json().get("kvs") or []
        return kvs[0] if kvs else None

    def leader_lease_ttl(self, db: str) -> int | None:
        """The granted ttl of the lease behind Patroni's leader key of db."""
        kv = self.etcd_get(f"/dbplane-patroni/{db}/leader")
        if not kv or "lease" not in kv:
            return None
        r = httpx.post(f"{self.info.etcd_url}/v3/lease/timetolive",
                       json={"ID": int(kv["lease"])}, timeout=5, verify=self.etcd_verify)
        r.raise_for_status()
        return int(r.json().get("grantedTTL", 0)) or None

    def patroni_api_url(self, db: str, member: str) -> str:
        kv = self.etcd_get(f"/dbplane/v1/members/{db}/{member}")
        if kv is None:
            raise RuntimeError(f"no placement for {member} in etcd")
        m = json.loads(base64.b64decode(kv["value"]))
        return f"https://{m['address']}:{m['api_port']}"       # Patroni's REST API is https

    # -- faults ------------------------------------------------------------------------

    def kill_node(self, zone: str) -> list[int]:
        """kill -9 the node of `zone`: agent, every Patroni and postmaster (+ children)."""
        victims: list[psutil.Process] = []

        def add(pid: int | None) -> None:
            if pid:
                try:
                    victims.append(psutil.Process(pid))
                except psutil.Error:
                    pass

        add(running_pid(self.layout.pidfile(f"agent-{zone}")))
        members = self.layout.host_dir(f"host-{zone}") / "members"
        for mdir in sorted(members.iterdir()) if members.exists() else []:
            add(running_pid(mdir / "patroni.pid"))
            try:
                pm = psutil.Process(int((mdir / "data" / "postmaster.pid").read_text().split()[0]))
                victims += [pm, *pm.children(recursive=True)]
            except (OSError, ValueError, IndexError, psutil.Error):
                pass
        for proc in psutil.process_iter(["cmdline"]):   # e.g. a pg_rewind in flight
            if str(members) in " ".join(proc.info["cmdline"] or []) and proc not in victims:
                victims.append(proc)
        for p in victims:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass
        psutil.wait_procs(victims, timeout=10)
        return [p.pid for p in victims]


# -- the writer --------------------------------------------------------------------------

@dataclass
class WriterResult:
    acked: list[int] = field(default_factory=list)
    in_doubt: list[int] = field(default_factory=list)      # COMMIT raised: may or may not be in
    first_commit_after_kill: float | None = None
    new_primary_port: int | None = None
    attempts_after_kill: int = 0
    gave_up: str = ""


class Writer(threading.Thread):
    """INSERT one row per transaction; after a failure probe every member's port until a
    COMMIT succeeds again. Bounded by PROBE_TIMEOUT_S and PROBE_MAX_ATTEMPTS."""

    def __init__(self, endpoints: list[tuple[str, int]], user: str, passfile: str):
        super().__init__(daemon=True)
        self.endpoints = endpoints
        self.user = user
        self.passfile = passfile
        self.result = WriterResult()
        self.kill_time: float | None = None
        self.killed = threading.Event()
        self.next_id = 1
        self.notices: list[str] = []

    def connect(self, host: str, port: int) -> psycopg.Connection:
        conn = psycopg.connect(host=host, port=port, user=self.user, dbname="bench",
                               passfile=self.passfile, connect_timeout=2, autocommit=True,
                               options="-c statement_timeout=10000")
        conn.add_notice_handler(lambda d: self.notices.append(d.message_primary or ""))
        return conn

    def insert(self, conn: psycopg.Connection) -> bool:
        """One INSERT+COMMIT (autocommit). True if acknowledged. A row whose COMMIT was
        cut off (connection lost) or whose wait for the standby was cancelled is in doubt;
        a row the server refused (e.g. read-only standby) is simply not written."""
        row = self.next_id
        self.next_id += 1
        self.notices.clear()
        try:
            conn.execute("INSERT INTO t (id) VALUES (%s)", (row,))
        except psycopg.Error as e:
            if e.sqlstate is None or e.sqlstate.startswith(("08", "57")):
                self.result.in_doubt.append(row)
            raise
        if any("synchronous replication" in m for m in self.notices):
            self.result.in_doubt.append(row)   # committed locally, not confirmed by the standby
            return False
        self.result.acked.append(row)
        return True

    def run(self) -> None:
        conn = None
        host, port = self.endpoints[0]
        try:
            conn = self.connect(host, port)
            while self.kill_time is None or self.result.first_commit_after_kill is None:
                self.insert(conn)
        except psycopg.Error:
            pass
        finally:
            if conn is not None:
                try:
                    conn.close()
                except psycopg.Error:
                    pass
        self.probe()

    def probe(self) -> None:
        # the writer failed before the kill: wait for it (bounded like everything here)
        if not self.killed.wait(PROBE_TIMEOUT_S) or self.kill_time is None:
            self.result.gave_up = "the node was never killed"
            return
        deadline = self.kill_time + PROBE_TIMEOUT_S
        while time.time() < deadline and self.result.attempts_after_kill < PROBE_MAX_ATTEMPTS:
            for host, port in self.endpoints:
                self.result.attempts_after_kill += 1
                try:
                    with self.connect(host, port) as conn:
                        if self.insert(conn):
                            self.result.first_commit_after_kill = time.time()
                            self.result.new_primary_port = port
                            for _ in range(100):        # a few more rows on the new primary
                                self.insert(conn)
                            return
                except psycopg.Error:
                    pass
            time.sleep(0.05)
        self.result.gave_up = (f"no commit within {PROBE_TIMEOUT_S:.0f}s / "
                               f"{self.result.attempts_after_kill} attempts")


# -- one run -----------------------------------------------------------------------------

@dataclass
class RunResult:
    run: int
    profile: str
    database: str
    create_s: float
    leader_ttl: int | None
    old_primary: str
    new_primary: str
    rto_s: float | None
    acked_rows: int
    missing_rows: int
    in_doubt_rows: int
    rejoin_s: float | None
    kill_after_s: float = 0.0
    error: str = ""


def apply_profile(b: Bench, db: str, primary: str, timing: dict | None) -> int | None:
    """Switch the database's Patroni timing (PATCH /config) and wait until the leader's
    lease carries the new ttl. Returns the leader lease's granted ttl."""
    if timing is not None:
        r = httpx.patch(f"{b.patroni_api_url(db, primary)}/config", json=timing, timeout=10,
                        verify=client_context(ca.cert_path(b.layout.root)))
        r.raise_for_status()
        want = timing["ttl"]
        return wait_for(lambda: b.leader_lease_ttl(db) == want and want, 60,
                        f"the leader lease of {db} to have ttl {want}")
    return wait_for(lambda: b.leader_lease_ttl(db), 30, f"the leader lease of {db}")


def prepare_schema(host: str, port: int, user: str, passfile: str) -> None:
    """The benchmark's table lives in its own database, created by the admin user (as an
    application would), so nothing depends on the grants in `postgres`."""
    with psycopg.connect(host=host, port=port, user=user, dbname="postgres", passfile=passfile,
                         connect_timeout=5, autocommit=True) as conn:
        conn.execute("CREATE DATABASE bench")
    with psycopg.connect(host=host, port=port, user=user, dbname="bench", passfile=passfile,
                         connect_timeout=5, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id bigint PRIMARY KEY, at timestamptz DEFAULT now())")


def one_run(b: Bench, run: int, profile: str, rng: random.Random) -> RunResult:
    """Create, measure, and whatever happened leave no database and no dead agent behind:
    the next run kills a node again and must not hit a leftover database."""
    db = f"bench{run}-{'d' if profile == 'dbplane' else 'p'}"
    try:
        return measure(b, run, profile, rng, db)
    finally:
        for args in (("up",), ("db", "delete", db, "--wait")):   # `up`: restart a dead agent
            try:
                b.cli(*args, timeout=300)
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                if "not found" not in str(e):
                    print(f"cleanup after {db}: {e}", file=sys.stderr, flush=True)


def measure(b: Bench, run: int, profile: str, rng: random.Random, db: str) -> RunResult:
    t0 = time.monotonic()
    b.cli("db", "create", db, "--class", "micro", "--multi-az", "--replicas", "0", "--wait")
    create_s = time.monotonic() - t0
    d = b.api(f"/v1/databases/{db}")
    if d["status"] != "available":
        raise RuntimeError(f"{db} is {d['status']} after its create operation succeeded")
    primary = next(m for m in d["members"] if m["role"] == "primary")
    ttl = apply_profile(b, db, primary["name"], PROFILES[profile])
    # the standby must be synchronous before the fault, or the guarantee does not apply
    d = wait_for(lambda: (x := b.api(f"/v1/databases/{db}"))["status"] == "available"
                 and any(m["role"] == "sync_standby" and m["state"] == "streaming"
                         for m in x["members"]) and x, 60, f"{db} to have a sync standby")

    passfile = str(b.layout.pgpass(db))
    prepare_schema(primary["address"], primary["port"], d["admin_user"], passfile)
    endpoints = [(primary["address"], primary["port"])] + [
        (m["address"], m["port"]) for m in d["members"] if m["name"] != primary["name"]]
    writer = Writer(endpoints, d["admin_user"], passfile)
    writer.start()
    kill_after = PRE_KILL_WRITES_S + rng.uniform(0, KILL_JITTER_S)
    time.sleep(kill_after)

    kill_time = time.time()
    writer.kill_time = kill_time
    writer.killed.set()
    b.kill_node(primary["zone"])
    writer.join(PROBE_TIMEOUT_S + 30)
    res = writer.result
    rto = res.first_commit_after_kill - kill_time if res.first_commit_after_kill else None

    missing = len(res.acked)
    new_primary = "?"
    if res.new_primary_port is not None:
        new = next(m for m in d["members"] if m["port"] == res.new_primary_port)
        new_primary = new["name"]
        with psycopg.connect(host=new["address"], port=new["port"], user=d["admin_user"],
                             dbname="bench", passfile=passfile, connect_timeout=5) as conn:
            present = {r[0] for r in conn.execute("SELECT id FROM t")}
        missing = len(set(res.acked) - present)

    t1 = time.monotonic()
    b.cli("up", timeout=120)              # restarts the killed agent; it restarts Patroni
    wait_for(lambda: (x := b.api(f"/v1/databases/{db}"))["status"] == "available"
             and all(m["state"] in ("running", "streaming") for m in x["members"]),
             REJOIN_TIMEOUT_S, f"{db} to be available again after the node returned", 1.0)
    rejoin = time.monotonic() - t1
    return RunResult(run=run, profile=profile, database=db, create_s=create_s, leader_ttl=ttl,
                     old_primary=primary["name"], new_primary=new_primary, rto_s=rto,
                     acked_rows=len(res.acked), missing_rows=missing,
                     in_doubt_rows=len(res.in_doubt), rejoin_s=rejoin,
                     kill_after_s=kill_after, error=res.gave_up)


# -- reporting ----------------------------------------------------------------------------

def machine_info() -> dict:
    return machine({
        "postgres": first_line([f"{postgres_bin_dir()}/postgres", "--version"]),
        "patroni": importlib.metadata.version("patroni"),
        "etcd": first_line([etcd_binary(), "--version"]),
        "dbplane_commit": commit(),
    })


def stats(values: list[float]) -> str:
    if not values:
        return "n/a"
    return (f"median {statistics.median(values):6.2f} s   min {min(values):6.2f} s   "
            f"max {max(values):6.2f} s   (n={len(values)})")


def report(results: list[RunResult], info: dict) -> None:
    print("\n## machine")
    for k, v in info.items():
        print(f"  {k:15} {v}")
    print("\n## runs")
    cols = ["run", "profile", "database", "create_s", "leader_ttl", "old_primary",
            "new_primary", "kill_after_s", "rto_s", "acked_rows", "missing_rows",
            "in_doubt_rows", "rejoin_s"]
    print("| " + " | ".join(cols) + " | error |")
    print("|" + "---|" * (len(cols) + 1))
    for r in results:
        row = asdict(r)
        cells = [f"{row[c]:.2f}" if isinstance(row[c], float) else str(row[c]) for c in cols]
        print("| " + " | ".join(cells) + f" | {r.error} |")
    print("\n## summary")
    medians = {}
    for profile in PROFILES:
        rs = [r for r in results if r.profile == profile]
        if not rs:
            continue
        rtos = [r.rto_s for r in rs if r.rto_s is not None]
        print(f"{profile}:")
        print(f"  create  {stats([r.create_s for r in rs])}")
        print(f"  RTO     {stats(rtos)}")
        print(f"  rejoin  {stats([r.rejoin_s for r in rs if r.rejoin_s is not None])}")
        print(f"  acknowledged rows lost: {sum(r.missing_rows for r in rs)} "
              f"of {sum(r.acked_rows for r in rs)}")
        if rtos:
            medians[profile] = statistics.median(rtos)
    if len(medians) == 2:
        print(f"\nmedian RTO ratio patroni-defaults / dbplane: "
              f"{medians['patroni-defaults'] / medians['dbplane']:.2f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5, help="runs per timing profile")
    ap.add_argument("--profiles", default=",".join(PROFILES),
                    help=f"comma-separated subset of {', '.join(PROFILES)}")
    ap.add_argument("--keep", action="store_true", help="keep the data root afterwards")
    ap.add_argument("--json", help="also write the raw results to this file")
    ap.add_argument("--seed", type=int, default=None, help="seed of the random kill delay")
    args = ap.parse_args()
    profiles = [p for p in args.profiles.split(",") if p]
    unknown = set(profiles) - set(PROFILES)
    if unknown:
        ap.error(f"unknown profile(s) {', '.join(sorted(unknown))}")

    root = Path(tempfile.mkdtemp(prefix="dbplane-bench-", dir="/var/tmp"))
    root.chmod(0o755)
    b = Bench(root)
    rng = random.Random(args.seed)
    info = machine_info()
    results: list[RunResult] = []
    print(f"data root {root}", flush=True)
    try:
        b.cli("up", timeout=180)
        for run in range(1, args.runs + 1):
            order = profiles if run % 2 else list(reversed(profiles))   # interleave fairly
            for profile in order:
                try:
                    r = one_run(b, run, profile, rng)
                except Exception as e:   # record it and go on: one failure is data too
                    r = RunResult(run, profile, "?", 0.0, None, "?", "?", None, 0, 0, 0, None,
                                  error=f"{type(e).__name__}: {e}"[:300])
                results.append(r)
                print(f"run {run} {profile:17} create {r.create_s:6.2f} s  "
                      f"RTO {r.rto_s if r.rto_s is None else round(r.rto_s, 2)} s  "
                      f"rejoin {r.rejoin_s if r.rejoin_s is None else round(r.rejoin_s, 2)} s  "
                      f"rows acked {r.acked_rows} missing {r.missing_rows}  {r.error}",
                      flush=True)
    finally:
        try:
            b.cli("down", timeout=300)
        except Exception as e:
            print(f"dbplane down failed: {e}", file=sys.stderr)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    info["loadavg_at_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    report(results, info)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info,
                                               "runs": [asdict(r) for r in results]}, indent=2))
    failed = [r for r in results if r.error or r.missing_rows]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
