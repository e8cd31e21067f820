"""`dbplane doctor NAME` and `dbplane doctor --url` on a real platform: the classic failures
are caused for real (connections exhausted, a deadlock, a slow query on an unindexed table,
bloat, an idle-in-transaction session, replay on the standby held by a conflicting query,
pg_stat_statements not loaded, WAL archiving stopped by an unwritable repository) and the
diagnosis, evidence and fix are checked, with the metric and the alarm transition for the
slow query, the deadlock, the lag and the archive (the connections alarm is in test_alarms.py). Databases
here are named docdb-*."""

from __future__ import annotations

import contextlib
import json
import os
import threading

import psycopg
import pytest

from dbplane.security import db_secrets
from dbplane.store import keys
from platform_helpers import wait_for

pytestmark = pytest.mark.integration

DB = "docdb-main"              # Multi-AZ: the standby is where replay gets held
BARE = "docdb-nostat"          # without pg_stat_statements, with backups; filled up with connections


def set_alarm(platform, name: str, db: str, metric: str, threshold: float, *extra: str) -> None:
    """A 10 s period, one datapoint, against the module's 1 s samples: transitions within seconds."""
    platform.cli("alarms", "set", name, "--database", db, "--metric", metric, "--threshold", str(threshold),
                 "--statistic", "max", "--period", "10", "--evaluation-periods", "1", *extra)


def alarm_state(platform, name: str, state: str, timeout: float) -> dict:
    def reached():
        r = platform.api.get(f"/v1/alarms/{name}")
        r.raise_for_status()
        return (a := r.json())["state"] == state and a
    return wait_for(reached, timeout, f"alarm {name} to be {state}")


def newest_value(platform, db: str, metric: str, **labels: str) -> float:
    r = platform.api.get(f"/v1/databases/{db}/metrics", params={"metric": metric, "since": "2m"})
    r.raise_for_status()
    points = [p for s in r.json()["series"] if labels.items() <= s["labels"].items() for p in s["points"]]
    return max(points)[1] if points else float("nan")


def doctor(platform, *args: str, env: dict | None = None) -> tuple[int, list[dict], str]:
    r = platform.cli("doctor", *args, "--output", "json", check=False, timeout=120) if env is None else \
        _cli_env(platform, env, "doctor", *args, "--output", "json")
    assert "Traceback" not in r.stderr, r.stderr
    return r.returncode, json.loads(r.stdout), r.stdout + r.stderr


def _cli_env(platform, env: dict, *args: str):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "dbplane", "--data-dir", str(platform.root), *args],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "DBPLANE_API": "", **env})


def find(findings: list[dict], check: str, resource: str | None = None, severity: str | None = None) -> list:
    return [f for f in findings if f["check"] == check and (resource is None or f["resource"] == resource)
            and (severity is None or f["severity"] == severity)]


def superuser(platform, db: str, role: str = "primary", **kw) -> psycopg.Connection:
    secrets = db_secrets.load_sync(platform.etcd, keys.secrets(db))
    m = platform.member(db, role)
    return psycopg.connect(host=m["address"], port=m["port"], user="postgres", dbname="postgres",
                           password=secrets.superuser, connect_timeout=5, **kw)


@pytest.fixture(scope="module")
def dbs(platform):
    # both at once: the platform places and starts them in parallel
    # metrics every second: the alarms below see a failure within seconds
    platform.cli("db", "create", DB, "--class", "micro", "--multi-az", "--no-backups",
                 "--metrics-interval", "1", "--param", "max_standby_streaming_delay=120s")
    platform.cli("db", "create", BARE, "--class", "micro", "--backups", "--metrics-interval", "1",
                 "--param", "shared_preload_libraries=")
    try:
        platform.wait_available(DB, timeout=240)
        platform.wait_available(BARE, timeout=240)
        with platform.connect_node(DB, autocommit=True) as c:
            c.execute("CREATE TABLE accounts (id int PRIMARY KEY, balance int NOT NULL)")
            c.execute("INSERT INTO accounts VALUES (1, 0), (2, 0), (3, 0)")
            c.execute("CREATE TABLE ledger (id int)")                # replay is held on it
            c.execute("CREATE TABLE orders (id bigint PRIMARY KEY, customer_id int, note text)")
            c.execute("INSERT INTO orders SELECT g, g % 2000, 'order ' || g "
                      "FROM generate_series(1, 200000) g")
            c.execute("CREATE TABLE events (id int, seen bool) WITH (autovacuum_enabled = off)")
            c.execute("INSERT INTO events SELECT g, false FROM generate_series(1, 20000) g")
            c.execute("UPDATE events SET seen = true")           # 20000 dead rows, no autovacuum
            c.execute("ANALYZE orders")
        # an application that began a transaction and went to lunch
        idle = platform.connect_node(DB, application_name="payroll-batch")
        idle.execute("UPDATE accounts SET balance = balance WHERE id = 3")
        yield {"idle": idle}
        with contextlib.suppress(psycopg.Error):
            idle.close()
    finally:
        platform.delete_all("docdb-")


def test_pg_stat_statements_missing_is_told_how_to_enable(platform, dbs):
    rc, findings, _ = doctor(platform, BARE)
    (f,) = find(findings, "pg_stat_statements", f"db/{BARE}")
    assert f["severity"] == "warning" and "not loaded" in f["summary"]
    assert f["fix"].startswith(f"dbplane db modify {BARE} --param "
                               "shared_preload_libraries=pg_stat_statements --wait")
    # the library is loaded on the other database, but nobody created the extension yet
    rc, findings, _ = doctor(platform, DB)
    for f in find(findings, "pg_stat_statements", f"db/{DB}"):
        assert "not created" in f["summary"] and "CREATE EXTENSION pg_stat_statements" in f["fix"]
    assert find(findings, "plaintext_allowed", f"db/{DB}")          # the security checks come along
    with superuser(platform, DB, autocommit=True) as c:
        c.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")


def test_slow_query_on_an_unindexed_table_gets_its_index(platform, dbs):
    # every lookup reads all 200,000 orders: the rows scanned per second give it away
    scans = f"{DB}-rows-scanned"
    set_alarm(platform, scans, DB, "dbplane_pg_tuples_returned_total", 100_000)
    alarm_state(platform, scans, "OK", 60)
    with platform.connect_node(DB, autocommit=True) as c:
        def looked_up() -> dict | bool:
            for customer in range(5):
                c.execute("SELECT * FROM orders WHERE customer_id = %s", (customer,))
            return (a := platform.api.get(f"/v1/alarms/{scans}").json())["state"] == "ALARM" and a
        fired = wait_for(looked_up, 60, f"alarm {scans} to be ALARM")     # bounded: 5 lookups a round
    assert fired["history"][0]["old"] == "OK" and fired["history"][0]["value"] > 100_000
    assert newest_value(platform, DB, "dbplane_pg_tuples_returned_total") >= 200_000
    platform.cli("alarms", "delete", scans)
    rc, findings, _ = doctor(platform, DB)
    (f,) = find(findings, "missing_index", f"db/{DB}", "warning")
    assert f["fix"] == "CREATE INDEX CONCURRENTLY orders_customer_id_idx ON public.orders (customer_id);"
    assert "customer_id = $1" in f["evidence"] and "Seq Scan on public.orders" in f["evidence"]
    assert find(findings, "pg_stat_statements") == []
    # the dead rows of events show as bloat once the statistics are flushed
    bloat = wait_for(lambda: find(doctor(platform, DB)[1], "bloat", f"db/{DB}", "warning"), 30, "bloat")
    assert "public.events is 50% dead rows" in bloat[0]["summary"] and "VACUUM" in bloat[0]["fix"]
    # following the fix: the statement is now planned as an index scan
    with platform.connect_node(DB, autocommit=True) as c:
        c.execute(f["fix"])
    rc, findings, _ = doctor(platform, DB)
    assert find(findings, "missing_index", f"db/{DB}", "warning") == []


def _deadlock(platform) -> None:
    """Two transactions update the same two rows in opposite orders."""
    a, b = (platform.connect_node(DB, application_name=n) for n in ("transfer-a", "transfer-b"))
    errors: list[Exception] = []
    first_locked = threading.Barrier(2, timeout=10)

    def run(conn, mine: int, theirs: int) -> None:
        try:
            # literal ids (ints): the log shows the statements as sent
            conn.execute(f"UPDATE accounts SET balance = balance + 1 WHERE id = {mine}")
            first_locked.wait()
            conn.execute(f"UPDATE accounts SET balance = balance - 1 WHERE id = {theirs}")
            conn.commit()
        except psycopg.errors.DeadlockDetected as e:
            errors.append(e)
            conn.rollback()
    threads = [threading.Thread(target=run, args=(a, 1, 2)), threading.Thread(target=run, args=(b, 2, 1))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    finally:
        a.close()
        b.close()
    assert len(errors) == 1, errors


def test_a_deadlock_is_explained_from_the_log(platform, dbs):
    name = f"{DB}-deadlocks"                     # the default alarm, on a 10 s period
    set_alarm(platform, name, DB, "dbplane_pg_deadlocks_total", 0)
    alarm_state(platform, name, "OK", 60)
    _deadlock(platform)
    fired = alarm_state(platform, name, "ALARM", 60)
    assert fired["history"][0]["old"] == "OK" and fired["history"][0]["value"] > 0, fired["history"][0]
    assert newest_value(platform, DB, "dbplane_pg_deadlocks_total", role="primary") >= 1
    found = wait_for(lambda: find(doctor(platform, DB)[1], "deadlocks", f"db/{DB}", "warning"), 30,
                     "the deadlock in the doctor's findings")
    f = found[0]
    assert "UPDATE accounts SET balance = balance - 1 WHERE id = 2" in f["evidence"]
    assert "UPDATE accounts SET balance = balance - 1 WHERE id = 1" in f["evidence"]
    assert "PostgreSQL cancelled pid" in f["evidence"] and "40P01" in f["fix"]


def test_replication_lag_held_by_a_conflicting_standby_query(platform, dbs):
    standby = platform.member(DB, "sync_standby")
    lag_alarm = f"{DB}-replication-lag"          # the default (30 s over a minute), made quicker
    set_alarm(platform, lag_alarm, DB, "dbplane_pg_replication_lag_seconds", 2,
              "--treat-missing", "notBreaching")
    alarm_state(platform, lag_alarm, "OK", 60)
    holder = superuser(platform, DB, "sync_standby", application_name="report")
    try:
        holder.execute("SELECT count(*) FROM ledger")         # keeps its lock on the standby
        holder_pid = holder.info.backend_pid
        with platform.connect_node(DB, autocommit=True) as w:
            w.execute("BEGIN; LOCK TABLE ledger IN ACCESS EXCLUSIVE MODE; COMMIT")
            w.execute("INSERT INTO orders SELECT g, 1, 'lag' FROM generate_series(300001, 301000) g")
        resource = f"db/{DB}/{standby['name']}"
        found = wait_for(lambda: [f for f in find(doctor(platform, DB)[1], "replication_lag", resource)
                                  if "conflicting query" in f["summary"]], 60, "replay held on the standby")
        fired = alarm_state(platform, lag_alarm, "ALARM", 60)
        assert fired["history"][0]["value"] > 2 and "> 2" in fired["history"][0]["reason"]
        assert newest_value(platform, DB, "dbplane_pg_replication_lag_bytes", member=standby["name"]) > 0
        f = found[0]
        assert f["severity"] in ("warning", "critical")
        assert f"pid {holder_pid} " in f["evidence"] and "SELECT count(*) FROM ledger" in f["evidence"]
        assert f"SELECT pg_terminate_backend({holder_pid})" in f["fix"]
        assert f"{standby['address']}:{standby['port']}" in f["fix"]
        assert "max_standby_streaming_delay" in f["fix"]
    finally:
        holder.close()
    wait_for(lambda: find(doctor(platform, DB)[1], "replication_lag", resource, "ok"), 60,
             "the standby to catch up")
    alarm_state(platform, lag_alarm, "OK", 60)


def test_connections_exhausted(platform, dbs):
    m = platform.member(BARE, "primary")
    held: list[psycopg.Connection] = []
    try:
        with platform.connect_node(BARE, autocommit=True) as c:
            usable = 50 - 3                                   # micro: max_connections 50, 3 reserved
            in_use = c.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
                               ).fetchone()[0]
        for _ in range(max(0, usable - in_use - 1)):          # bounded; leave our own one free
            try:
                held.append(platform.connect(BARE, f"{m['address']}:{m['port']}",
                                             application_name="leaky-app"))
            except psycopg.OperationalError:
                break                                          # full already (something else connected)
        rc, findings, out = doctor(platform, BARE)
        (f,) = find(findings, "connections", f"db/{BARE}")
        assert f["severity"] == "critical" and rc == 1, f
        assert "dbadmin (leaky-app)" in f["evidence"]
        assert f"dbplane db modify {BARE} --param max_connections=100 --wait" in f["fix"]
    finally:
        for c in held:
            c.close()
    wait_for(lambda: find(doctor(platform, BARE)[1], "connections", f"db/{BARE}", "ok"), 30,
             "the connections to be released")


def test_idle_in_transaction_session(platform, dbs):
    pid = dbs["idle"].info.backend_pid
    found = wait_for(lambda: [f for f in find(doctor(platform, DB)[1], "idle_in_transaction", f"db/{DB}")
                              if f"pid {pid} " in f["evidence"]], 60, "the idle-in-transaction session")
    f = found[0]
    assert "payroll-batch" in f["evidence"] and "UPDATE accounts" in f["evidence"]
    assert f"SELECT pg_terminate_backend({pid})" in f["fix"]
    assert f"dbplane db modify {DB} --param idle_in_transaction_session_timeout=5min --wait" in f["fix"]


def test_url_mode_against_a_member(platform, dbs):
    m = platform.member(DB, "primary")
    secrets = db_secrets.load_sync(platform.etcd, keys.secrets(DB))
    url = f"postgresql://postgres@{m['address']}:{m['port']}/postgres"
    rc, findings, out = doctor(platform, "--url", url, env={"PGPASSWORD": secrets.superuser})
    resource = f"url/{m['address']}:{m['port']}/postgres"
    assert {f["resource"] for f in findings} == {resource}
    assert find(findings, "platform_only")[0]["severity"] == "info"
    assert find(findings, "connections")[0]["severity"] == "ok"
    (idle,) = find(findings, "idle_in_transaction")
    assert idle["fix"].startswith(f"SELECT pg_terminate_backend({dbs['idle'].info.backend_pid})")
    assert "ALTER SYSTEM SET idle_in_transaction_session_timeout" in idle["fix"]
    # the password in the URL itself is never echoed, not even in an error
    url = f"postgresql://postgres:{secrets.superuser}@{m['address']}:{m['port']}/postgres"
    rc, findings, out = doctor(platform, "--url", url)
    assert find(findings, "connections") and secrets.superuser not in out
    rc, findings, out = doctor(platform, "--url", url.replace("/postgres", "/nosuchdb"))
    assert rc == 1 and findings[0]["check"] == "node_unreachable" and secrets.superuser not in out


def test_archive_outage(platform, dbs):
    """The repository stops accepting writes (as in test_backup_archive.py): archiving fails."""
    wait_for(lambda: (platform.describe(BARE)["backup"]["archive"] or {}).get("state") == "streaming", 90,
             "the WAL archive to stream")
    rc, findings, _ = doctor(platform, BARE)
    assert find(findings, "wal_archive", f"db/{BARE}")[0]["severity"] == "ok"
    name = f"{BARE}-archive"                     # the default (5 minutes behind), made quicker
    set_alarm(platform, name, BARE, "dbplane_archive_lag_seconds", 5)
    alarm_state(platform, name, "OK", 60)
    backups = platform.root / "backups"
    mode = backups.stat().st_mode
    os.chmod(backups, 0o000)                    # the service account can no longer write
    try:
        with superuser(platform, BARE, autocommit=True) as c:
            c.execute("CREATE TABLE IF NOT EXISTS t AS SELECT g FROM generate_series(1, 1000) g")
            c.execute("SELECT pg_switch_wal()")
        found = wait_for(lambda: find(doctor(platform, BARE)[1], "wal_archive", f"db/{BARE}", "critical"), 60,
                         "the doctor to see archiving fail")
        assert found[0]["evidence"].split("; error: ", 1)[1]          # the archiver's own words
        assert "WAL archiving fails" in found[0]["summary"]
        assert f"dbplane backup describe {BARE}" in found[0]["fix"]
        assert doctor(platform, BARE)[0] == 1
        fired = alarm_state(platform, name, "ALARM", 60)
        assert fired["history"][0]["value"] > 5
        assert newest_value(platform, BARE, "dbplane_archive_lag_seconds") > 5
    finally:
        os.chmod(backups, mode)
    alarm_state(platform, name, "OK", 90)        # the archiver retries and catches up
