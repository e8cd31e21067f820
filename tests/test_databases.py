"""Databases end to end on a real platform: create, fail over on node death, rejoin,
crash recovery of the control plane, down/up keeping data."""

from __future__ import annotations

import signal
import socket
import threading

import psutil
import psycopg
import pytest

from platform_helpers import wait_for

pytestmark = pytest.mark.integration


class Writer(threading.Thread):
    """Inserts one row per transaction through the writer endpoint and remembers every
    id whose COMMIT was acknowledged, until told to stop or the connection dies."""

    def __init__(self, platform, db: str):
        super().__init__(daemon=True)
        self.platform, self.db = platform, db
        self.acked: list[int] = []
        self.stop = threading.Event()

    def run(self):
        try:
            # straight to the primary node: this is about the node dying (the proxy's own
            # failover behaviour is tested in test_proxy.py)
            with self.platform.connect_node(self.db, autocommit=True) as conn:
                for i in range(1_000_000):
                    if self.stop.is_set():
                        return
                    conn.execute("INSERT INTO acked (id) VALUES (%s)", (i,))
                    self.acked.append(i)
        except psycopg.Error:
            return      # the primary died under us: what was acknowledged is in self.acked


def test_multi_az_database_survives_node_death(platform):
    d = platform.create("orders", "--multi-az", "--replicas", "1")

    assert d["status"] == "available"
    assert {"name", "status", "engine", "version", "class", "multi_az", "endpoints", "members"} <= d.keys()
    assert (d["engine"], d["version"], d["class"], d["multi_az"]) == ("postgres", "18", "micro", True)
    roles = {m["role"]: m for m in d["members"]}
    assert set(roles) == {"primary", "sync_standby", "replica"}
    for m in d["members"]:
        assert {"name", "role", "zone", "host", "port", "state", "lag_bytes"} <= m.keys()
    primary, standby = roles["primary"], roles["sync_standby"]
    assert primary["zone"] != standby["zone"]
    assert d["node_endpoints"]["writer"] == f"127.0.0.1:{primary['port']}"
    assert d["node_endpoints"]["reader"] == f"127.0.0.1:{roles['replica']['port']}"
    endpoints = d["endpoints"]           # the proxy's: they never change
    assert endpoints["writer"].startswith("127.0.0.1:") and endpoints["writer"] != endpoints["reader"]
    listed = {x["name"]: x for x in platform.cli_json("db", "list")}
    assert listed["orders"]["status"] == "available" and listed["orders"]["members"] == 3
    assert "orders" in platform.cli("db", "list").stdout

    url = platform.cli("db", "url", "orders").stdout.strip()
    assert url == (f"postgresql://dbadmin@{endpoints['writer']}/postgres"
                   f"?passfile={platform.layout.pgpass('orders')}"
                   f"&sslmode=verify-full&sslrootcert={platform.root}/ca/ca.crt")
    assert f"@{endpoints['reader']}/" in platform.cli("db", "url", "orders", "--reader").stdout
    r = platform.cli("db", "connect", "orders", input="SELECT 40 + 2 AS answer;\n")
    assert "42" in r.stdout
    r = platform.cli("db", "connect", "orders", "--reader", input="SELECT pg_is_in_recovery();\n")
    assert " t\n" in r.stdout

    with platform.connect("orders", autocommit=True) as conn:
        conn.execute("CREATE TABLE acked (id int PRIMARY KEY)")
        assert conn.execute("SHOW synchronous_standby_names").fetchone()[0] != ""
    writer = Writer(platform, "orders")
    writer.start()
    wait_for(lambda: len(writer.acked) >= 200, 60, "200 acknowledged commits")

    platform.kill_node(primary["zone"])
    writer.join(30)
    assert not writer.is_alive(), "the writer should have lost its primary"
    assert len(writer.acked) >= 200

    new = wait_for(lambda: (p := platform.member("orders", "primary"))["name"] != primary["name"]
                   and p, 90, "a new primary")
    assert new["name"] == standby["name"], "the synchronous standby must be promoted"
    d = platform.describe("orders")
    assert d["node_endpoints"]["writer"] == f"127.0.0.1:{new['port']}"
    assert d["endpoints"] == endpoints
    with platform.connect("orders") as conn:
        ids = {r[0] for r in conn.execute("SELECT id FROM acked")}
    missing = set(writer.acked) - ids
    assert not missing, f"{len(missing)} acknowledged commits lost, e.g. {sorted(missing)[:5]}"

    events = platform.cli_json("events", "orders")
    assert any(e["kind"] == "failover" and new["name"] in e["message"] for e in events)

    platform.up()      # the dead node's agent comes back; its old primary rejoins
    back = wait_for(lambda: next(m for m in platform.describe("orders")["members"]
                                 if m["name"] == primary["name"] and m["state"] == "streaming"
                                 and m["role"] in ("replica", "sync_standby")),
                    120, "the old primary to rejoin as a replica")
    with psycopg.connect(host="127.0.0.1", port=back["port"], user="dbadmin", dbname="postgres",
                         passfile=str(platform.layout.pgpass("orders"))) as conn:
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone()[0] is True
        wait_for(lambda: conn.execute("SELECT count(*) FROM acked").fetchone()[0] >= len(writer.acked),
                 30, "the rejoined member to replay every row")
    platform.wait_available("orders")


def test_agent_crash_leaves_databases_running(platform):
    """kill -9 of an agent alone: Patroni and PostgreSQL keep serving; the restarted agent
    adopts the running Patroni instead of starting a second one."""
    d = platform.create("ledger")
    member = d["members"][0]
    pidfile = platform.layout.host_dir(member["host"]) / "members" / member["name"] / "patroni.pid"
    from dbplane.process import running_pid
    patroni_pid = running_pid(pidfile)
    zone = member["zone"]
    psutil.Process(platform.agent_pid(zone)).send_signal(signal.SIGKILL)
    wait_for(lambda: platform.agent_pid(zone) is None, 10, "the agent to die")
    with platform.connect("ledger", autocommit=True) as conn:
        conn.execute("CREATE TABLE t AS SELECT 1 AS x")
    platform.up()
    wait_for(lambda: platform.agent_pid(zone), 10, "the agent to restart")
    wait_for(lambda: platform.cli_json("hosts") and
             any(h["zone"] == zone for h in platform.cli_json("hosts")), 30, "the host to re-register")
    assert running_pid(pidfile) == patroni_pid
    platform.wait_available("ledger")
    platform.cli("db", "delete", "ledger", "--wait")


def test_controller_crash_during_create_converges(platform):
    platform.cli("db", "create", "crashy", "--class", "micro", "--multi-az")
    from dbplane.process import running_pid
    controller = running_pid(platform.layout.pidfile("controller"))
    psutil.Process(controller).send_signal(signal.SIGKILL)
    wait_for(lambda: running_pid(platform.layout.pidfile("controller")) is None, 10, "controller death")
    platform.up()
    ops = platform.cli_json("ops", "list", "--database", "crashy")
    wait_for(lambda: platform.api.get(f"/v1/operations/{ops[-1]['id']}").json()["state"] == "succeeded",
             120, "the create operation to finish after the controller restart")
    d = platform.describe("crashy")
    assert sorted(m["role"] for m in d["members"]) == ["primary", "sync_standby"]
    platform.cli("db", "delete", "crashy", "--wait")
    assert platform.api.get("/v1/databases/crashy").status_code == 404
    for host in ("host-a", "host-b", "host-c"):
        assert not any(p.name.startswith("crashy-")
                       for p in (platform.layout.host_dir(host) / "members").iterdir())


def test_down_and_up_keep_data(platform):
    platform.create("keep", "--multi-az")
    primary = platform.member("keep", "primary")
    with platform.connect("keep", autocommit=True) as conn:
        conn.execute("CREATE TABLE kept AS SELECT g AS id FROM generate_series(1, 1000) g")
    standby = platform.member("keep", "sync_standby")
    r = platform.cli("down")
    assert "paused failover for" in r.stderr and "keep" in r.stderr
    assert not any(platform.cli_json("status")[i]["pid"] for i in range(6))
    assert not any("patroni" in " ".join(p.info["cmdline"] or []) and str(platform.root) in
                   " ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"]))
    # while it is down, another program takes the standby's port
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", standby["port"]))
        squatter.listen()
        platform.up()
        platform.wait_available("keep", timeout=120)
    # Patroni starts it paused with PostgreSQL stopped; it streams once the pause ends
    def moved_and_streaming():
        d = platform.describe("keep")
        m = next(m for m in d["members"] if m["name"] == standby["name"])
        if m["state"] != "streaming":    # on timeout, wait_for shows the last of these
            raise AssertionError(f"{m['name']} is {m['state']} on port {m['port']}; "
                                 f"database {d['status']}: {d.get('status_message')}")
        return m
    moved = wait_for(moved_and_streaming, 120, "the moved standby to stream")   # config, restart, catch-up
    assert moved["port"] != standby["port"]

    def kept_rows():
        with platform.connect("keep") as conn:
            return conn.execute("SELECT count(*) FROM kept").fetchone()[0]
    # the proxies route to the primary once its Patroni reports it running again
    assert wait_for(kept_rows, 60, "the writer endpoint to answer after the restart") == 1000
    # Patroni was paused for the stop and the old primary leads again: no failover
    assert platform.member("keep", "primary")["name"] == primary["name"]
    events = platform.cli_json("events", "keep")
    assert any(e["kind"] == "resumed" for e in events)
    assert any(e["kind"] == "port-conflict" and standby["name"] in e["message"] for e in events)
    assert not any(e["kind"] == "failover" for e in events)
    platform.cli("db", "delete", "keep", "--wait")


def test_storage_quota_makes_database_read_only(platform):
    """Over its --storage-gb quota a database refuses writes (RDS storage-full); raising
    the quota with modify lets writes in again."""
    platform.create("quota", "--storage-gb", "1")
    with platform.connect("quota", autocommit=True) as conn:
        conn.execute("CREATE TABLE filler AS SELECT repeat('x', 2000) AS pad "
                     "FROM generate_series(1, 400000)")          # ~850 MB of table + its WAL
    d = wait_for(lambda: (d := platform.describe("quota"))["status"] == "storage-full" and d,
                 120, "the quota to be detected")
    assert d["storage_used_bytes"] > 1024**3
    assert "quota" in d["status_message"]
    events = platform.cli_json("events", "quota")
    assert any(e["kind"] == "storage-full" and "--storage-gb" in e["message"] for e in events)

    def write_refused():
        with platform.connect("quota", autocommit=True) as conn:
            try:
                conn.execute("INSERT INTO filler VALUES ('y')")
                return False
            except psycopg.errors.ReadOnlySqlTransaction:
                return True
    wait_for(write_refused, 30, "writes to be refused")

    platform.cli("db", "modify", "quota", "--storage-gb", "4", "--wait")
    platform.wait_available("quota")
    with platform.connect("quota", autocommit=True) as conn:
        wait_for(lambda: conn.execute("SHOW default_transaction_read_only").fetchone()[0] == "off",
                 30, "read-only to be lifted")
    with platform.connect("quota", autocommit=True) as conn:
        conn.execute("INSERT INTO filler VALUES ('y')")
    assert any(e["kind"] == "storage-ok" for e in platform.cli_json("events", "quota"))
    platform.cli("db", "delete", "quota", "--wait")
