"""Performance insights on a real platform: three sessions blocked on a row lock and a
CPU-heavy query show up as Lock/transactionid and CPU load in GET
/v1/databases/{name}/insights and `dbplane top NAME --once -o json`; the heavy statement
leads top SQL with its calls; a slow statement and a `duration:` log line show in the slow
query log; without pg_stat_statements the route says how to enable it; a primary that does
not answer leaves the route answering with a notice. One micro database, named pin-*."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import psutil
import psycopg
import pytest

from dbplane.security import db_secrets
from dbplane.store import keys
from platform_helpers import wait_for

pytestmark = pytest.mark.integration

PREFIX = "pin-"
HEAVY = "select count(*) from generate_series(1, 3000000) g where g % 7 = 3"


@pytest.fixture(scope="module")
def db(platform):
    name = PREFIX + uuid.uuid4().hex[:6]
    platform.create(name)
    with platform.connect_node(name, autocommit=True) as c:
        c.execute("CREATE TABLE accounts (id int PRIMARY KEY, balance int NOT NULL)")
        c.execute("INSERT INTO accounts VALUES (1, 0)")
    yield name
    platform.delete_all(PREFIX)


def superuser(platform, db: str, **kw) -> psycopg.Connection:
    secrets = db_secrets.load_sync(platform.etcd, keys.secrets(db))
    m = platform.member(db, "primary")
    return psycopg.connect(host=m["address"], port=m["port"], user="postgres", dbname="postgres",
                           password=secrets.superuser, connect_timeout=5, autocommit=True, **kw)


def insights(platform, db: str, **params) -> dict:
    r = platform.api.get(f"/v1/databases/{db}/insights", params={"since": "1m", **params})
    assert r.status_code == 200, r.text
    return r.json()


def load_of(data: dict, wait_type: str, wait: str | None = None) -> float:
    return sum(w["average_active_sessions"] for w in data["load"]["by_wait"]
               if w["wait_event_type"] == wait_type and (wait is None or w["wait_event"] == wait))


def test_lock_waits_and_cpu_load_and_top_sql(platform, db):
    holder = platform.connect_node(db)
    holder.execute("UPDATE accounts SET balance = balance + 1 WHERE id = 1")      # holds the row lock
    stop = threading.Event()
    waiters = [platform.connect_node(db, autocommit=True) for _ in range(3)]
    pids = [w.info.backend_pid for w in waiters]
    heavy_calls = [0]

    def blocked(conn):
        try:
            conn.execute("UPDATE accounts SET balance = balance + 2 WHERE id = 1")
        except psycopg.Error:
            pass                                  # cancelled below: never counted by pg_stat_statements

    def burn():
        with platform.connect_node(db, autocommit=True) as c:
            while not stop.is_set():
                c.execute(HEAVY)
                heavy_calls[0] += 1

    threads = [threading.Thread(target=blocked, args=(w,)) for w in waiters] + [threading.Thread(target=burn)]
    for t in threads:
        t.start()
    try:
        def loaded():
            d = insights(platform, db)
            return (load_of(d, "Lock") >= 0.5 and load_of(d, "Lock", "transactionid") > 0
                    and load_of(d, "CPU") > 0 and d)
        data = wait_for(loaded, 45, "Lock/transactionid and CPU load in the insights", interval=2)
        assert data["load"]["samples"] >= 1 and data["primary"]
        assert data["point_seconds"] == 10           # raw 10 s averages within an hour
        assert data["load_by_type"]["Lock"] >= 0.5
        # one waits for the holder's transaction, the others queue for the row (tuple)
        waiting = [s for s in data["sessions"] if s["wait_event_type"] == "Lock"]
        assert {s["pid"] for s in waiting} == set(pids)
        assert any(s["state"] == "idle in transaction" for s in data["sessions"])   # the holder
        r = platform.cli("top", db, "--once", "--since", "1m", "-o", "json")
        assert "Traceback" not in r.stderr
        frame = json.loads(r.stdout)
        assert frame["load_by_type"].get("Lock", 0) >= 0.5 and frame["load_by_type"].get("CPU", 0) > 0
        assert len([s for s in frame["sessions"] if s["wait_event_type"] == "Lock"]) == 3
        table = platform.cli("top", db, "--once", "--since", "1m")
        assert "Lock:transactionid" in table.stdout and "sessions now" in table.stdout
    finally:
        stop.set()
        with superuser(platform, db) as su:
            for pid in pids:
                su.execute("SELECT pg_cancel_backend(%s)", (pid,))
        holder.rollback()
        for t in threads:
            t.join(30)
        for c in [holder, *waiters]:
            c.close()
    calls = heavy_calls[0]
    assert calls >= 2
    data = insights(platform, db)
    top = data["statements"][0]
    assert "generate_series" in top["query"] and top["calls"] >= calls, data["statements"][:3]
    assert top["total_time_ms"] >= max(s["total_time_ms"] for s in data["statements"])
    assert top["load_share"] and top["load_share"] > 0           # its query id was sampled on the CPU
    by_mean = insights(platform, db, by="mean")["statements"]
    assert [s["mean_time_ms"] for s in by_mean] == sorted((s["mean_time_ms"] for s in by_mean), reverse=True)


def test_slow_query_log(platform, db):
    with superuser(platform, db) as su:
        su.execute("SELECT pg_sleep(1.05)")                       # mean above the default 1 s threshold
        su.execute("SET log_min_duration_statement = 100")
        su.execute("SELECT 1, pg_sleep(0.25)")    # logged as "duration: ... ms"; another queryid
    slow = insights(platform, db)["slow_queries"]
    assert slow["threshold_ms"] == 1000.0
    assert any("pg_sleep" in s["query"] and s["mean_time_ms"] >= 1000 for s in slow["statements"]), slow
    assert any("pg_sleep(0.25)" in line["statement"] and line["duration_ms"] >= 250
               for line in slow["log"]), slow


def test_without_pg_stat_statements_the_route_says_how_to_enable_it(platform, db):
    with superuser(platform, db) as su:
        su.execute("DROP EXTENSION pg_stat_statements")
    try:
        data = insights(platform, db)
        assert data["statements"] == []
        assert "CREATE EXTENSION pg_stat_statements" in data["statements_notice"]
        r = platform.cli("top", db, "--once")
        assert "CREATE EXTENSION pg_stat_statements" in " ".join(r.stdout.split())
    finally:
        with superuser(platform, db) as su:
            su.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")


def test_a_primary_that_does_not_answer_leaves_the_route_answering(platform, db):
    m = platform.member(db, "primary")
    data_dir = platform.layout.host_dir(m["host"]) / "members" / m["name"] / "data"
    pm = psutil.Process(int((data_dir / "postmaster.pid").read_text().split()[0]))
    os.kill(pm.pid, signal.SIGSTOP)                 # new connections hang; Patroni keeps its own
    try:
        t0 = time.monotonic()
        data = insights(platform, db)
        assert time.monotonic() - t0 < 15
        assert "did not answer" in data["statements_notice"] and data["statements"] == []
        assert "load" in data
    finally:
        os.kill(pm.pid, signal.SIGCONT)


def test_top_refreshes_until_ctrl_c(platform, db):
    started = time.time()
    p = subprocess.Popen([sys.executable, "-m", "dbplane", "--data-dir", str(platform.root), "top", db,
                          "--interval", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "DBPLANE_API": ""})

    def frames_fetched() -> int:              # each frame is one audited insights call
        r = platform.api.get("/v1/audit", params={"since": started, "action": "db:DescribeInsights",
                                                  "resource": f"db/{db}"})
        return len(r.json()["entries"])
    wait_for(lambda: frames_fetched() >= 3, 30, "top to fetch its first frames")
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0 and "Traceback" not in err, err
    assert "load by wait event" in out and "sessions now" in out
