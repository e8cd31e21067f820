"""The database doctor's pure logic: log parsing, plan reading, index suggestions and every
check's judgement, fed with facts written by hand (src/dbplane/doctor/)."""

from __future__ import annotations

import json
import socket
import time

import pytest
from typer.testing import CliRunner

from dbplane.cli.main import app
from dbplane.doctor import database as checks
from dbplane.doctor import diagnose, explain, pglog, platform_checks
from dbplane.doctor.facts import (
    DatabaseStat,
    Disk,
    NodeFacts,
    PlatformFacts,
    ReplayState,
    ScanInfo,
    Session,
    StandbyRow,
    Statement,
    TableStat,
    Workload,
)
from dbplane.models import ArchiveStatus, BackupRecord, BackupSettings, DatabaseSpec, ProxyLimits

pytestmark = pytest.mark.unit

T = checks.Target("db/orders", "orders")
URL_T = checks.Target("url/db.example:5432/app")

LOG = """\
2026-11-24 10:24:52,653 INFO: no action. I am (orders-1), the leader with the lock
2026-11-24 10:24:51.100 UTC [27003] LOG:  process 27003 still waiting for ShareLock on transaction 760 after 1000.123 ms
2026-11-24 10:24:51.100 UTC [27003] DETAIL:  Process holding the lock: 27004. Wait queue: 27003.
2026-11-24 10:24:51.100 UTC [27003] STATEMENT:  UPDATE accounts SET balance = 0 WHERE id = 7
2026-11-24 10:24:52.909 UTC [27001] ERROR:  deadlock detected
2026-11-24 10:24:52.909 UTC [27001] DETAIL:  Process 27001 waits for ShareLock on transaction 759; blocked by process 27002.
\tProcess 27002 waits for ShareLock on transaction 758; blocked by process 27001.
\tProcess 27001: UPDATE accounts SET balance = balance + 1 WHERE id = 2
\tProcess 27002: UPDATE accounts SET balance = balance + 1 WHERE id = 1
2026-11-24 10:24:52.909 UTC [27001] HINT:  See server log for query details.
2026-11-24 10:24:52.909 UTC [27001] CONTEXT:  while updating tuple (0,2) in relation "accounts"
2026-11-24 10:24:52.909 UTC [27001] STATEMENT:  UPDATE accounts SET balance = balance + 1 WHERE id = 2
2026-11-24 10:24:53,001 INFO: no action. I am (orders-1), the leader with the lock
"""  # noqa: E501


def node(**kw) -> NodeFacts:
    base = dict(name="orders-1", address="127.0.0.1:24010", primary=True,
                settings={"max_connections": "50", "superuser_reserved_connections": "3",
                          "reserved_connections": "0", "shared_preload_libraries": "pg_stat_statements",
                          "log_lock_waits": "on", "idle_in_transaction_session_timeout": "0",
                          "max_standby_streaming_delay": "30000"})
    base.update(kw)
    return NodeFacts(**base)


def session(pid: int, state: str = "idle", **kw) -> Session:
    base = dict(pid=pid, user="app", datname="postgres", application="shop", client="127.0.0.1", state=state,
                backend_type="client backend", xact_age=None, query_age=1.0, state_age=1.0, query="SELECT 1")
    base.update(kw)
    return Session(**base)


def one(findings, check):
    found = [f for f in findings if f.check == check]
    assert len(found) == 1, (check, findings)
    return found[0]


# -- the log ------------------------------------------------------------------------------------------

def test_deadlock_from_the_log_names_statements_in_order():
    (d,) = pglog.deadlocks(LOG)
    assert d.victim == 27001 and [w.pid for w in d.waits] == [27001, 27002]
    assert d.statements[27002] == "UPDATE accounts SET balance = balance + 1 WHERE id = 1"
    assert d.context == 'while updating tuple (0,2) in relation "accounts"'
    cycle = d.cycle()
    assert cycle.index("WHERE id = 2") < cycle.index("WHERE id = 1")
    assert "held by pid 27002" in cycle and d.time is not None


def test_lock_waits_from_the_log():
    (w,) = pglog.lock_waits(LOG)
    assert (w.pid, w.holders, w.waited_ms) == (27003, [27004], 1000.123)
    assert w.statement.startswith("UPDATE accounts SET balance = 0")


def test_deadlock_check_reports_the_cycle_and_the_fix():
    n = node(databases=[DatabaseStat("postgres", 1, 3, 10**7, True)])
    d = pglog.deadlocks(LOG)
    f = one(checks.deadlocks(T, n, d, [], now=d[0].time + 60), "deadlocks")
    assert f.severity == "warning" and "WHERE id = 1" in f.evidence and "40P01" in f.fix
    old = one(checks.deadlocks(T, n, d, [], now=d[0].time + 3 * 86400), "deadlocks")
    assert old.severity == "info" and "'postgres': 1" in old.evidence
    quiet = checks.deadlocks(T, node(settings={"log_lock_waits": "off"}), [], [])
    assert one(quiet, "deadlocks").severity == "ok"
    assert one(quiet, "log_settings").fix == "dbplane db modify orders --param log_lock_waits=on --wait"


# -- plans and indexes --------------------------------------------------------------------------------

PLAN = {"Node Type": "Gather", "Workers Planned": 2, "Plans": [
    {"Node Type": "Parallel Seq Scan", "Parallel Aware": True, "Schema": "public", "Relation Name": "orders",
     "Alias": "o", "Plan Rows": 40, "Filter": "((o.customer_id = $1) AND ((o.status)::text = 'new'::text))"},
    {"Node Type": "Seq Scan", "Schema": "public", "Relation Name": "small", "Alias": "small",
     "Plan Rows": 1}]}


def test_plan_walk_finds_filtered_sequential_scans():
    (scan,) = explain.seq_scans(PLAN)
    assert (scan.schema, scan.table, scan.alias, scan.rows) == ("public", "orders", "o", 120)
    cols = explain.filter_columns(scan.filter, scan.alias, ["id", "customer_id", "status", "note"])
    assert cols == ["customer_id", "status"]
    assert explain.filter_columns("(created_at > $1)", "", ["created_at"]) == ["created_at"]
    assert explain.filter_columns("(x.a = $1)", "y", ["a"]) == []        # another table's column
    assert explain.filter_columns("(lower(email) = $1)", "", ["email"]) == []


def test_create_index_quotes_what_needs_quoting():
    assert explain.create_index("public", "orders", ["customer_id"]) == \
        "CREATE INDEX CONCURRENTLY orders_customer_id_idx ON public.orders (customer_id);"
    assert explain.create_index("Sales", "user", ["Order Id"]) == \
        'CREATE INDEX CONCURRENTLY "user_Order Id_idx" ON "Sales"."user" ("Order Id");'


def _slow(scan_rows: float, reltuples: float, indexed=()) -> Workload:
    scan = explain.Scan("public", "orders", "orders", "(orders.customer_id = $1)", scan_rows)
    st = Statement("postgres", "app", 12, 230.0, 2760.0, 1200, "SELECT * FROM orders WHERE customer_id = $1",
                   scans=[ScanInfo(scan, reltuples, ["id", "customer_id"], list(indexed))])
    return Workload(statements_loaded=True, statements_installed=True, statements=[st])


def test_missing_index_is_suggested_for_a_selective_seq_scan():
    f = one(checks.statements(T, node(), _slow(100, 200_000)), "missing_index")
    assert f.severity == "warning" and "customer_id" in f.summary
    assert f.fix == "CREATE INDEX CONCURRENTLY orders_customer_id_idx ON public.orders (customer_id);"
    assert "mean 230.0 ms over 12 calls" in f.evidence
    # not selective, too small, or indexed already: nothing to suggest
    for w in (_slow(50_000, 200_000), _slow(10, 5000), _slow(100, 200_000, ["customer_id"])):
        assert one(checks.statements(T, node(), w), "missing_index").severity == "ok"
    w = _slow(50_000, 200_000)
    w.statements[0].explain_error = "permission denied for table orders"
    notes = [f for f in checks.statements(T, node(), w) if f.severity == "info"]
    assert len(notes) == 1 and "permission denied for table orders" in notes[0].evidence


def test_pg_stat_statements_missing_says_how_to_enable_it():
    n = node(settings={"shared_preload_libraries": "auto_explain"})
    f = one(checks.statements(T, n, Workload()), "pg_stat_statements")
    assert f.severity == "warning"
    assert f.fix.startswith("dbplane db modify orders --param "
                            "shared_preload_libraries=auto_explain,pg_stat_statements --wait")
    assert "CREATE EXTENSION pg_stat_statements" in f.fix
    f = one(checks.statements(URL_T, n, Workload()), "pg_stat_statements")
    assert f.fix.startswith("ALTER SYSTEM SET shared_preload_libraries = 'auto_explain,pg_stat_statements'")
    f = one(checks.statements(T, node(), Workload(statements_loaded=True)), "pg_stat_statements")
    assert "not created" in f.summary and f.fix.endswith("-c \"CREATE EXTENSION pg_stat_statements\"")


def test_bloat_and_sequential_scan_heavy_tables():
    stats = [TableStat("postgres", "public", "events", 20_000, 20_000, 3, 60_000, 0, None, None, 1),
             TableStat("shop", "public", "orders", 500_000, 0, 100, 50_000_000, 2, 60.0, 60.0, 1)]
    out = checks.tables(T, stats)
    bloat = one(out, "bloat")
    assert bloat.severity == "warning" and "50% dead" in bloat.summary and "never vacuumed" in bloat.evidence
    assert "VACUUM (ANALYZE) public.events" in bloat.fix
    assert "database shop" in one(out, "seq_scans").summary


# -- connections and pools ----------------------------------------------------------------------------

def test_connections_near_and_at_exhaustion():
    many = [session(i) for i in range(40)] + [session(100 + i, "idle in transaction") for i in range(3)]
    f = one(checks.connections(T, node(sessions=many)), "connections")
    assert f.severity == "warning" and "44 of 47" in f.summary
    assert "40 idle" in f.evidence and "3 idle in transaction" in f.evidence
    assert "--param max_connections=100" in f.fix and "dbplane db url orders" in f.fix
    full = one(checks.connections(T, node(sessions=[session(i) for i in range(46)])), "connections")
    assert full.severity == "critical" and "exhausted" in full.summary
    assert one(checks.connections(T, node(sessions=many[:5])), "connections").severity == "ok"


def test_proxy_budget_above_what_the_node_admits():
    spec = DatabaseSpec(name="orders", instance_class="micro")
    p = PlatformFacts(spec=spec, limits=ProxyLimits(per_proxy=40, proxies=3, max_connections=200),
                      proxies_running=3)
    f = one(platform_checks.proxy_pool(T, node(), p), "proxy_pool")
    assert f.severity == "critical" and "120 server connections" in f.summary and "admits 47" in f.summary
    assert f.fix.startswith("dbplane proxy modify orders --reserve-connections 83")
    p = PlatformFacts(spec=spec, limits=ProxyLimits(per_proxy=13, proxies=3, max_connections=50),
                      pools=[{"cl_waiting": 4, "queue_timeouts": 2, "wait_max_s": 3.5}])
    out = platform_checks.proxy_pool(T, node(), p)
    f = one(out, "proxy_pool")
    assert f.severity == "warning" and "4 waiting now, 2 gave up" in f.evidence
    p.pools = []
    f = one(platform_checks.proxy_pool(T, node(), p), "proxy_pool")      # pool_size 20, capped at 13: fine
    assert f.severity == "ok" and "capped at 13" in f.evidence


# -- replication ------------------------------------------------------------------------------------

def _standby(**replay) -> NodeFacts:
    state = dict(receive_lsn=5e6, replay_lsn=1e6, replay_age=95.0, pause_state="not paused",
                 receiver_status="streaming", last_msg_age=0.5)
    state.update(replay)
    return node(name="orders-2", address="127.0.0.1:24012", primary=False, replay=ReplayState(**state))


def _primary() -> NodeFacts:
    return node(current_lsn=5e6, replication=[StandbyRow("orders-2", "127.0.0.1", "streaming", "sync",
                                                         0.0, 0.0, 4e6, 0.001, 0.001, 0.5)])


def test_replay_blocked_by_a_standby_query():
    sb = _standby()
    sb.sessions = [session(1, backend_type="startup", state="", blocked_by=[77]),
                   session(77, "idle in transaction", xact_age=120.0, query="SELECT count(*) FROM items")]
    f = one(checks.replication(T, _primary(), [sb], ["orders-2"]), "replication_lag")
    assert f.severity == "warning" and f.resource == "db/orders/orders-2"
    assert "conflicting query" in f.summary and "95 s" in f.summary
    assert "pid 77" in f.evidence and "SELECT count(*) FROM items" in f.evidence
    assert "SELECT pg_terminate_backend(77)" in f.fix and "127.0.0.1:24012" in f.fix
    assert "max_standby_streaming_delay=30s" in f.fix


def _lag(standby: NodeFacts):
    return one(checks.replication(T, _primary(), [standby], ["orders-2"]), "replication_lag")


def test_replay_paused_receiver_down_and_healthy():
    f = _lag(_standby(pause_state="paused"))
    assert "paused" in f.summary and "pg_wal_replay_resume()" in f.fix
    f = _lag(_standby(receiver_status=""))
    assert f.severity == "critical" and "receives no WAL" in f.summary
    healthy = _primary()
    healthy.replication[0].replay_behind = 0.0
    f = one(checks.replication(T, healthy, [_standby(receive_lsn=5e6, replay_lsn=5e6)], ["orders-2"]),
            "replication_lag")
    assert f.severity == "ok"
    slow_apply = one(checks.replication(T, _primary(), [_standby()], ["orders-2"]), "replication_lag")
    assert "applies it slowly" in slow_apply.summary
    gone = NodeFacts(name="orders-2", address="x", error="connection refused")
    assert one(checks.replication(T, node(), [gone], ["orders-2"]), "replication_lag").severity == "critical"


# -- sessions ---------------------------------------------------------------------------------------

def test_idle_in_transaction_and_long_queries():
    n = node(sessions=[session(41, "idle in transaction", state_age=95.0, xact_age=100.0,
                               query="UPDATE stock SET n = n - 1"),
                       session(42, "active", query_age=300.0, query="SELECT * FROM big"),
                       session(43, "active", wait_event_type="Lock", blocked_by=[41], state_age=20.0),
                       session(44, "idle in transaction", application="dbplane-doctor", state_age=999.0)])
    out = checks.sessions(T, n)
    idle = one(out, "idle_in_transaction")
    assert idle.severity == "critical"            # it blocks pid 43
    assert "pid 41" in idle.evidence and "blocks others" in idle.evidence and "pid 44" not in idle.evidence
    assert "SELECT pg_terminate_backend(41)" in idle.fix
    assert "idle_in_transaction_session_timeout=5min" in idle.fix
    long = one(out, "long_running")
    assert long.severity == "warning" and "pg_cancel_backend(42)" in long.fix
    waits = one(checks.lock_waits(T, n, []), "lock_waits")
    assert "pid 41 blocks 1" in waits.summary and "UPDATE stock" in waits.evidence


# -- backups and storage ----------------------------------------------------------------------------

def _spec(**kw) -> DatabaseSpec:
    return DatabaseSpec(name="orders", created_at=time.time() - 30 * 86400, **kw)


def _backup(spec: DatabaseSpec, hours_ago: float, state: str = "available", error: str = "") -> BackupRecord:
    at = time.time() - hours_ago * 3600
    return BackupRecord(id=f"b{hours_ago}", database="orders", archive_id=spec.archive_id, repository="local",
                        state=state, started_at=at, finished_at=at + 60, consistent_at=at + 60, error=error)


def test_backups_stale_failing_and_off():
    spec = _spec()
    archive = ArchiveStatus(database="orders", archive_id=spec.archive_id, repository="local",
                            state="streaming", updated_at=time.time())
    out = platform_checks.backups(T, spec, [_backup(spec, 0.5)], archive)
    assert one(out, "backups").severity == "ok" and one(out, "wal_archive").severity == "ok"
    stale = one(platform_checks.backups(T, spec, [_backup(spec, 5)], archive), "backups")
    assert stale.severity == "critical" and "5.0 h ago" in stale.evidence and "snapshot create" in stale.fix
    failing = [_backup(spec, 0.9)] + [_backup(spec, h, "failed", "repository full") for h in (0.6, 0.4, 0.2)]
    f = one(platform_checks.backups(T, spec, failing, archive), "backups")
    assert f.severity == "critical" and "3 failed in a row" in f.evidence and "repository full" in f.evidence
    broken = archive.model_copy(update={"state": "failing", "error": "permission denied"})
    f = one(platform_checks.backups(T, spec, [_backup(spec, 0.5)], broken), "wal_archive")
    assert f.severity == "critical" and "permission denied" in f.evidence
    young = one(platform_checks.backups(T, DatabaseSpec(name="orders"), [], archive), "backups")
    assert young.severity == "ok" and "no backup yet" in young.summary
    off = one(platform_checks.backups(T, _spec(backup=BackupSettings(enabled=False)), [], None), "backups")
    assert off.severity == "info" and off.fix == "dbplane backup modify orders --enable"


def test_storage_quota_and_disk():
    spec = _spec(storage_gb=1)
    n = node(databases=[DatabaseStat("postgres", 0, 1, 900 * 2**20, True)])
    disks = [Disk("orders-1", "/d", 100 * 2**30, 2 * 2**30)]
    out = platform_checks.storage(T, spec, int(0.97 * 2**30), n, disks)
    f = one(out, "storage")
    assert f.severity == "critical" and "--storage-gb 2" in f.fix and "postgres 900.0 MiB" in f.evidence
    disk = one(out, "disk_space")
    assert disk.severity == "critical" and disk.resource == "db/orders/orders-1"
    assert one(platform_checks.storage(T, spec, 2**20, n, []), "storage").severity == "ok"


# -- URL mode ---------------------------------------------------------------------------------------

def test_url_password_is_never_shown():
    url = "postgresql://app:s3cr%2Ft@127.0.0.1:5999/shop"
    assert diagnose.url_resource(url) == "url/127.0.0.1:5999/shop"
    assert diagnose.redact("failed for s3cr/t and s3cr%2Ft", url) == "failed for *** and ***"


def test_doctor_url_unreachable_exits_1_without_the_password():
    with socket.socket() as s:          # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = CliRunner().invoke(app, ["doctor", "--url", f"postgresql://app:hunter2@127.0.0.1:{port}/shop",
                                 "-o", "json"])
    assert r.exit_code == 1, r.output
    (f,) = json.loads(r.output)
    assert f["check"] == "node_unreachable" and f["resource"] == f"url/127.0.0.1:{port}/shop"
    assert "hunter2" not in r.output
    r = CliRunner().invoke(app, ["doctor", "orders", "--url", "postgresql://x@127.0.0.1/x"])
    assert r.exit_code != 0


def test_doctor_routes_names_to_the_database_checks():
    runner = CliRunner()
    assert "--database" in runner.invoke(app, ["doctor", "security", "--help"]).output
    assert "--url" in runner.invoke(app, ["doctor", "orders", "--help"]).output
    assert "--url" in runner.invoke(app, ["doctor", "--all", "--help"]).output
    group = runner.invoke(app, ["doctor", "--help"]).output
    assert "security" in group and "database" in group
