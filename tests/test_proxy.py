"""The connection proxy on a real platform: pooling, pinning, prepared statements across
server connections, the reader endpoint and read-your-writes, limits and the queue
timeout, cancel, bad input, a killed proxy, and failover with a client loop. Real
clients: psycopg (simple and extended protocol), psql and pgbench. Databases here are
named px-*."""

from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
import subprocess
import threading
import time

import psycopg
import pytest

from dbplane import pgwire as wire
from dbplane.security import db_secrets
from dbplane.security.scram import ClientExchange
from dbplane.store import keys
from dbplane.system import postgres_bin_dir
from platform_helpers import wait_for

pytestmark = pytest.mark.integration

DB = "px-main"


@pytest.fixture(scope="module")
def px(platform):
    # the embedded pgbench has no TLS, and RawClient speaks the protocol in the clear:
    # this database allows plaintext (require_tls is tested in test_tls.py)
    platform.create(DB, "--multi-az", "--replicas", "1", "--param", "require_tls=off")
    with platform.connect(DB, autocommit=True) as c:
        c.execute("CREATE TABLE items (id bigint PRIMARY KEY, note text)")
    return platform


def admin_password(platform, db: str) -> str:
    line = platform.layout.pgpass(db).read_text().splitlines()[0]
    return line.rsplit(":", 1)[1]


def proxy_settings(platform, db: str, **changes) -> dict:
    r = platform.api.patch(f"/v1/databases/{db}/proxy", json=changes)
    assert r.status_code == 200, r.text
    settings = r.json()["settings"]
    # every proxy picks the change up from etcd; give the watch a moment by asking them
    wait_for(lambda: all(p["ok"] for p in stats(platform, db)["proxies"]), 10, "proxies to answer")
    return settings


def stats(platform, db: str) -> dict:
    r = platform.api.get(f"/v1/databases/{db}/proxy/stats")
    r.raise_for_status()
    return r.json()


def pool_stats(platform, db: str, user: str = "dbadmin") -> dict:
    return next(p for p in stats(platform, db)["pools"] if p["user"] == user and p["dbname"] == "postgres")


def backend_pid(conn) -> int:
    return conn.execute("SELECT pg_backend_pid()").fetchone()[0]


def proxy_backends(platform, db: str) -> int:
    """Server connections the proxies hold on the primary."""
    with platform.connect_node(db, autocommit=True) as c:
        return c.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'dbplane-proxy'"
                         ).fetchone()[0]


# -- pooling ----------------------------------------------------------------------------------

def test_many_clients_share_few_server_connections(px):
    budget = px.api.get(f"/v1/databases/{DB}/proxy").json()["limits"]
    assert budget["max_connections"] == 50 and budget["proxies"] == 3
    assert budget["per_proxy"] == (50 - 10) // 3

    clients = [px.connect(DB, autocommit=True) for _ in range(120)]   # more than max_connections
    try:
        for i, c in enumerate(clients):
            c.execute("INSERT INTO items VALUES (%s, 'pooled')", (i,))
        pids = {backend_pid(c) for c in clients}
        assert len(pids) <= 3 * budget["per_proxy"]
        assert proxy_backends(px, DB) <= 3 * budget["per_proxy"] < 50
    finally:
        for c in clients:
            c.close()
    with px.connect(DB) as c:
        assert c.execute("SELECT count(*) FROM items WHERE note = 'pooled'").fetchone()[0] == 120


def test_psql_and_pgbench_through_the_proxy(px):
    r = px.cli("db", "connect", DB, input="SELECT 40 + 2 AS answer;\n")
    assert "42" in r.stdout
    d = px.describe(DB)
    host, port = d["endpoints"]["writer"].rsplit(":", 1)
    env = {**os.environ, "PGPASSFILE": str(px.layout.pgpass(DB)), "PGSSLMODE": "disable"}
    pgbench = [f"{postgres_bin_dir()}/pgbench", "-h", host, "-p", port, "-U", "dbadmin"]
    subprocess.run(pgbench + ["-i", "-s", "1", "-q", "postgres"], env=env, check=True,
                   capture_output=True, timeout=120)
    for mode in ("simple", "extended", "prepared"):
        r = subprocess.run(pgbench + ["-n", "-c", "8", "-j", "2", "-t", "200", "-M", mode, "postgres"],
                           env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert "number of transactions actually processed: 1600/1600" in r.stdout, r.stdout
        assert "number of failed transactions: 0" in r.stdout


def test_simple_query_protocol(px):
    # ClientCursor binds parameters client-side and sends one simple Query message, which
    # may hold several statements (the extended protocol refuses that)
    with px.connect(DB, autocommit=True, cursor_factory=psycopg.ClientCursor) as c:
        for i in range(20):
            cur = c.execute("SELECT %s::int; SELECT %s::text", (i, "two"))
            assert cur.fetchone()[0] == i
            assert cur.nextset() and cur.fetchone()[0] == "two"
        with c.transaction():
            c.execute("INSERT INTO items VALUES (%s, %s); UPDATE items SET note = 'simple' WHERE id = %s",
                      (-42, "x", -42))
        assert c.execute("SELECT note FROM items WHERE id = -42").fetchone()[0] == "simple"


def test_prepared_statements_follow_the_client_across_server_connections(px):
    errors, results = [], []

    def work(n: int) -> None:
        try:
            # prepare_threshold=0: psycopg prepares every statement (Parse with a name) once
            # per client connection, then only sends Bind/Execute
            with px.connect(DB, autocommit=True, prepare_threshold=0) as c:
                for i in range(40):
                    with c.transaction():
                        row = c.execute("SELECT %s::int * 2, pg_backend_pid()", (i,)).fetchone()
                        results.append((n, row[0] == i * 2, row[1]))
                    c.execute("SELECT note FROM items WHERE id = %s", (i,)).fetchone()
        except Exception as e:   # collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[:3]
    assert len(results) == 12 * 40 and all(ok for _, ok, _ in results)
    # clients really moved between server connections with their statements
    moved = {n for n in range(12) if len({pid for m, _, pid in results if m == n}) > 1}
    assert moved, "no client ran on more than one server connection"

    # a client that closes its statement and prepares again under the same name
    with px.connect(DB, autocommit=True) as c:
        c.execute("PREPARE sqlprep AS SELECT 1")            # SQL PREPARE pins: see below
    with px.connect(DB, autocommit=True, prepare_threshold=0) as c:
        for _ in range(3):
            assert c.execute("SELECT 7").fetchone()[0] == 7
        c._prepared.clear()        # psycopg's cache: drop it, so it prepares "_pg3_0" again
        assert c.execute("SELECT 8").fetchone()[0] == 8


# -- pinning ----------------------------------------------------------------------------------

PIN_CASES = [
    ("SET", ["SET search_path TO public, pg_catalog"], "SHOW search_path", "public, pg_catalog"),
    ("temporary table", ["CREATE TEMP TABLE scratch (x int)", "INSERT INTO scratch VALUES (5)"],
     "SELECT x FROM scratch", 5),
    ("advisory lock", ["SELECT pg_advisory_lock(4242)"],
     "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()", 1),
    ("PREPARE", ["PREPARE twice(int) AS SELECT $1 * 2"], "EXECUTE twice(21)", 42),
    ("LISTEN", ["LISTEN news"], "SELECT count(*) FROM pg_listening_channels()", 1),
    ("WITH HOLD cursor",
     ["BEGIN", "DECLARE c CURSOR WITH HOLD FOR SELECT 1 FROM generate_series(1, 100)", "COMMIT"],
     "FETCH c", 1),
]


@pytest.mark.parametrize("reason,setup,check,expected", PIN_CASES, ids=[c[0] for c in PIN_CASES])
def test_session_state_pins_the_client(px, reason, setup, check, expected):
    before = pool_stats(px, DB)["pinned_reasons"].get(reason, 0)
    busy = [px.connect(DB, autocommit=True) for _ in range(4)]   # others keep the pool moving
    try:
        with px.connect(DB, autocommit=True) as c:
            for sql in setup:
                c.execute(sql)
            pid = backend_pid(c)
            for other in busy:
                with other.transaction():
                    other.execute("SELECT 1")
            for _ in range(5):                 # later transactions: same backend, state intact
                assert backend_pid(c) == pid
                assert c.execute(check).fetchone()[0] == expected
            pinned = pool_stats(px, DB)
            assert pinned["pinned"] >= 1
        assert pool_stats(px, DB)["pinned_reasons"].get(reason, 0) == before + 1
    finally:
        for other in busy:
            other.close()
    # the pinned server connection was reset (DISCARD ALL) before anyone else got it
    for _ in range(10):
        with px.connect(DB, autocommit=True) as c:
            assert c.execute("SELECT count(*) FROM pg_listening_channels()").fetchone()[0] == 0
            assert c.execute("SELECT count(*) FROM pg_prepared_statements WHERE name = 'twice'"
                             ).fetchone()[0] == 0
            assert c.execute("SHOW search_path").fetchone()[0] == '"$user", public'


def test_set_local_and_plain_queries_do_not_pin(px):
    before = pool_stats(px, DB)["pinned_total"]
    with px.connect(DB) as c:
        c.execute("SET LOCAL statement_timeout = '5s'")
        c.execute("SELECT 1")
        c.commit()
        c.execute("SELECT set_config('application_name', 'x', true)")
        c.commit()
    assert pool_stats(px, DB)["pinned_total"] == before


def test_startup_settings_follow_the_client(px):
    with px.connect(DB, autocommit=True, application_name="billing",
                    options="-c statement_timeout=1234 -c TimeZone=Asia/Tokyo") as c:
        for _ in range(5):
            assert c.execute("SHOW application_name").fetchone()[0] == "billing"
            assert c.execute("SHOW statement_timeout").fetchone()[0] == "1234ms"
            assert c.execute("SHOW TimeZone").fetchone()[0] == "Asia/Tokyo"


# -- reader endpoint ----------------------------------------------------------------------------

def test_reader_endpoint_reads_from_replicas(px):
    with px.connect(DB, "reader", autocommit=True) as c:
        assert c.execute("SELECT pg_is_in_recovery()").fetchone()[0] is True
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            c.execute("INSERT INTO items VALUES (-1, 'no')")


def test_reader_skips_lagging_replicas(px):
    """Replicas whose replay waits behind a conflicting query fall behind; with a lag bound
    of 0 bytes the reader endpoint stops using them and reads from the primary instead.
    (Pausing replay would not do: Patroni resumes a paused replay on PostgreSQL 14+ within
    one of its cycles.) A query on each replica holds a lock on items; the primary's
    ACCESS EXCLUSIVE lock on it then waits in replay (up to max_standby_streaming_delay,
    30 s), and everything after it with it."""
    secrets = db_secrets.load_sync(px.etcd, keys.secrets(DB))
    replicas = [m for m in px.describe(DB)["members"] if m["role"] != "primary"]
    holders = [psycopg.connect(host=m["address"], port=m["port"], user="postgres", dbname="postgres",
                               password=secrets.superuser, connect_timeout=5) for m in replicas]
    proxy_settings(px, DB, reader_max_lag_bytes=0)

    def routing() -> list[dict]:
        return [p["routing"] or {} for p in stats(px, DB)["proxies"] if p["ok"]]
    # every proxy has the new bound (they apply it from etcd's watch)
    wait_for(lambda: all(r.get("reader_max_lag_bytes") == 0 for r in routing()), 30,
             "every proxy to apply reader_max_lag_bytes=0")
    try:
        for c in holders:
            c.execute("SELECT count(*) FROM items")          # a transaction that keeps its lock
        with px.connect(DB, autocommit=True) as w:
            w.execute("BEGIN; LOCK TABLE items IN ACCESS EXCLUSIVE MODE; COMMIT")
            w.execute("INSERT INTO items SELECT g, 'lag' FROM generate_series(-2000, -1001) g")
        with px.connect(DB, "reader", autocommit=True) as r:
            try:
                wait_for(lambda: r.execute("SELECT pg_is_in_recovery()").fetchone()[0] is False, 25,
                         "the reader endpoint to fall back to the primary")
            except AssertionError as e:        # say what the proxies saw
                members = [(m["name"], m["role"]) for m in px.describe(DB)["members"]]
                raise AssertionError(f"{e}; proxies' routing: {routing()}; members: {members}") from None
            assert r.execute("SELECT count(*) FROM items WHERE note = 'lag'").fetchone()[0] == 1000
    finally:
        for c in holders:
            with contextlib.suppress(psycopg.Error):
                c.rollback()
            c.close()
        proxy_settings(px, DB, reader_max_lag_bytes=16 * 1024 * 1024)
    with px.connect(DB, "reader", autocommit=True) as r:
        wait_for(lambda: r.execute("SELECT pg_is_in_recovery()").fetchone()[0] is True, 60,
                 "the reader endpoint to use replicas again")


def test_read_your_writes(px):
    opts = "-c dbplane.read_your_writes=on"
    with px.connect(DB, autocommit=True) as w, px.connect(DB, "reader", autocommit=True, options=opts) as r:
        on_replica = 0
        for i in range(1000, 1100):
            w.execute("INSERT INTO items VALUES (%s, 'ryw')", (i,))
            row = r.execute("SELECT note, pg_is_in_recovery() FROM items WHERE id = %s", (i,)).fetchone()
            assert row is not None and row[0] == "ryw", f"row {i} not visible right after its commit"
            on_replica += row[1]
    assert on_replica > 0, "read-your-writes never used a replica"


# -- limits -----------------------------------------------------------------------------------

def test_queue_timeout_gives_a_clear_error(px):
    proxy_settings(px, DB, pool_size=1, queue_timeout=1.0)
    holders = []
    try:
        errors = []
        # 3 proxies x 1 server connection: a fourth transaction must wait and time out
        for _ in range(4):
            c = px.connect(DB)
            holders.append(c)
            try:
                c.execute("SELECT 1")          # opens a transaction and keeps it
            except psycopg.Error as e:
                errors.append(e)
        assert errors, "no client hit the pool limit"
        e = errors[0]
        assert e.sqlstate == "53300"
        assert "exhausted" in str(e) and "waiting" in str(e)
        assert pool_stats(px, DB)["queue_timeouts"] >= 1
    finally:
        for c in holders:
            c.close()
        proxy_settings(px, DB, pool_size=20, queue_timeout=30.0)


def test_idle_server_connections_are_closed(px):
    with px.connect(DB, autocommit=True) as c:
        c.execute("SELECT 1")
    assert proxy_backends(px, DB) >= 1
    proxy_settings(px, DB, idle_server_timeout=1.0)
    try:
        wait_for(lambda: proxy_backends(px, DB) == 0, 15, "idle server connections to close")
    finally:
        proxy_settings(px, DB, idle_server_timeout=60.0)


def test_session_mode_keeps_one_server_connection(px):
    proxy_settings(px, DB, pool_mode="session")
    try:
        wait_for(lambda: all(p["pool_mode"] == "session" for p in stats(px, DB)["pools"]), 10,
                 "session mode everywhere")
        with px.connect(DB, autocommit=True) as c, px.connect(DB, autocommit=True) as other:
            pid = backend_pid(c)
            for _ in range(5):
                other.execute("SELECT 1")
                assert backend_pid(c) == pid
            assert backend_pid(other) != pid
            c.execute("SET work_mem = '7MB'")          # no pinning needed, nothing counted
            assert c.execute("SHOW work_mem").fetchone()[0] == "7MB"
        with px.connect(DB, autocommit=True) as c:      # reset before reuse (DISCARD ALL)
            assert c.execute("SHOW work_mem").fetchone()[0] != "7MB"
    finally:
        proxy_settings(px, DB, pool_mode="transaction")


def test_client_connection_cap(px):
    proxy_settings(px, DB, max_client_connections=2)
    conns, refused = [], []
    try:
        for _ in range(7):                   # 3 proxies x 2: the seventh is refused
            try:
                conns.append(px.connect(DB, autocommit=True))
            except psycopg.OperationalError as e:
                refused.append(str(e))
        assert refused and "too many client connections" in refused[0]
    finally:
        for c in conns:
            c.close()
        proxy_settings(px, DB, max_client_connections=5000)


def test_idle_client_timeout(px):
    proxy_settings(px, DB, idle_client_timeout=1.0)
    try:
        with px.connect(DB, autocommit=True) as c:
            c.execute("SELECT 1")
            # wait without a query (a query would reset the idle clock): the socket turns
            # readable when the proxy sends its FATAL and closes
            readable, _, _ = select.select([c.pgconn.socket], [], [], 15)
            assert readable, "the proxy did not close the idle client"
            with pytest.raises(psycopg.OperationalError, match="idle-session timeout|closed"):
                c.execute("SELECT 1")
    finally:
        proxy_settings(px, DB, idle_client_timeout=0.0)


# -- faults -----------------------------------------------------------------------------------

def test_client_that_disconnects_mid_transaction_leaves_nothing_behind(px):
    d = px.describe(DB)
    host, port = d["endpoints"]["writer"].rsplit(":", 1)
    raw = RawClient(host, int(port))
    raw.login("dbadmin", "postgres", admin_password(px, DB))
    raw.query("BEGIN; INSERT INTO items VALUES (-500, 'dirty'); SELECT 1")
    raw.sock.close()                 # gone, mid-transaction
    with px.connect_node(DB, autocommit=True) as c:
        dirty = ("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'dbplane-proxy' "
                 "AND state LIKE 'idle in transaction%'")
        wait_for(lambda: c.execute(dirty).fetchone()[0] == 0, 10,
                 "the proxy to roll back the abandoned transaction")
        assert c.execute("SELECT count(*) FROM items WHERE id = -500").fetchone()[0] == 0
    for _ in range(10):
        with px.connect(DB, autocommit=True) as c:
            assert c.execute("SELECT now() = statement_timestamp()").fetchone()[0] is True   # not in a txn


def test_wrong_password_unknown_user_unknown_database(px):
    d = px.describe(DB)
    host, port = d["endpoints"]["writer"].rsplit(":", 1)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(host=host, port=port, user="dbadmin", password="wrong", dbname="postgres",
                        connect_timeout=5)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(host=host, port=port, user="nobody", password="x", dbname="postgres",
                        connect_timeout=5)
    with pytest.raises(psycopg.OperationalError, match='database "nope" does not exist'):
        psycopg.connect(host=host, port=port, user="dbadmin", password=admin_password(px, DB),
                        dbname="nope", connect_timeout=5)


def test_malformed_and_oversized_messages(px):
    d = px.describe(DB)
    host, port = d["endpoints"]["writer"].rsplit(":", 1)
    # a startup packet that claims to be huge
    s = socket.create_connection((host, int(port)), timeout=5)
    s.sendall(struct.pack("!II", 100_000, wire.PROTOCOL_3_0))
    reply = recv_all(s)
    assert b"08P01" in reply and b"invalid startup packet length" in reply
    # an unknown protocol version
    s = socket.create_connection((host, int(port)), timeout=5)
    s.sendall(struct.pack("!II", 8, 2 << 16))
    assert b"unsupported frontend protocol 2.0" in recv_all(s)
    # after login: a message longer than the limit, then garbage
    for payload in (b"Q" + struct.pack("!I", wire.MAX_MESSAGE + 10) + b"x" * 100,
                    b"Q" + struct.pack("!I", 2)):
        raw = RawClient(host, int(port))
        raw.login("dbadmin", "postgres", admin_password(px, DB))
        raw.sock.sendall(payload)
        reply = recv_all(raw.sock)
        assert b"08P01" in reply and b"invalid message" in reply
    # the proxy is fine afterwards
    with px.connect(DB, autocommit=True) as c:
        assert c.execute("SELECT 1").fetchone()[0] == 1


def test_tls_to_the_proxy(px):
    with px.connect(DB, autocommit=True, sslmode="require") as c:
        assert c.pgconn.ssl_in_use
        assert c.execute("SELECT 1").fetchone()[0] == 1


def test_cancel_reaches_the_right_backend(px):
    for _ in range(4):          # cancels land on any of the 3 proxies; each must route them
        with px.connect(DB, autocommit=True) as c:
            timer = threading.Timer(0.5, c.cancel)
            timer.start()
            started = time.monotonic()
            with pytest.raises(psycopg.errors.QueryCanceled):
                c.execute("SELECT pg_sleep(20)")
            assert time.monotonic() - started < 10
            assert c.execute("SELECT 1").fetchone()[0] == 1     # the connection is still good


def test_killed_proxy_is_restarted_and_endpoints_stay(px):
    before = px.describe(DB)["endpoints"]
    victim = px.proxy_processes()[0]
    victim.kill()
    victim.wait(10)
    # the other proxies share the port: clients keep working meanwhile
    for _ in range(20):
        with px.connect(DB, autocommit=True) as c:
            assert c.execute("SELECT 1").fetchone()[0] == 1
    wait_for(lambda: len(px.proxy_processes()) == 3, 30, "the agent to restart the proxy")
    assert px.describe(DB)["endpoints"] == before
    wait_for(lambda: all(p["ok"] for p in stats(px, DB)["proxies"]) and len(stats(px, DB)["proxies"]) == 3,
             30, "three proxies to answer")


def test_failover_costs_idle_clients_a_pause_not_errors(px):
    """A client loop of short transactions through the writer endpoint while the primary's
    node is killed: statements in flight fail, nothing else does, nothing acked is lost."""
    primary = px.member(DB, "primary")
    acked, failures = [], []
    stop = threading.Event()

    def loop():
        with px.connect(DB, autocommit=True) as c:
            i = 10_000
            while not stop.is_set() and i < 200_000:
                try:
                    c.execute("INSERT INTO items VALUES (%s, 'loop')", (i,))
                    acked.append(i)
                except psycopg.Error as e:
                    failures.append((i, e.sqlstate, str(e)))
                i += 1

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        wait_for(lambda: len(acked) >= 200, 60, "200 commits before the kill")
        px.kill_node(primary["zone"])
        new = wait_for(lambda: (p := px.member(DB, "primary"))["name"] != primary["name"] and p, 90,
                       "a new primary")
        at_switch = len(acked)
        wait_for(lambda: len(acked) >= at_switch + 200, 60, "200 commits after the failover")
    finally:
        stop.set()
        t.join(30)
        px.up()                                # the killed node comes back
    assert len(failures) <= 2, f"client-visible errors: {failures[:5]}"
    for _, sqlstate, text in failures:
        assert sqlstate == "08006" and ("failover" in text or "lost" in text)
    with px.connect(DB, autocommit=True) as c:
        present = {r[0] for r in c.execute("SELECT id FROM items WHERE note = 'loop'")}
    assert set(acked) <= present, "an acknowledged commit was lost"
    assert new["name"] != primary["name"]
    wait_for(lambda: px.describe(DB)["status"] == "available" and
             all(m["state"] in ("streaming", "running") for m in px.describe(DB)["members"]),
             180, "the old primary to rejoin")


def test_switchover_is_drained_without_errors(px):
    failures, done = [], []
    stop = threading.Event()

    def loop():
        with px.connect(DB, autocommit=True) as c:
            i = 300_000
            while not stop.is_set() and i < 400_000:
                try:
                    with c.transaction():
                        c.execute("INSERT INTO items VALUES (%s, 'sw')", (i,))
                        c.execute("SELECT pg_sleep(0.02)")
                    done.append(i)
                except psycopg.Error as e:
                    failures.append(str(e))
                i += 1

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    wait_for(lambda: len(done) >= 20, 60, "transactions before the switchover")
    out = px.cli("db", "switchover", DB, "--wait").stdout
    assert "succeeded" in out
    at_switch = len(done)
    wait_for(lambda: len(done) >= at_switch + 20, 60, "transactions after the switchover")
    stop.set()
    t.join(30)
    assert not failures, failures[:3]


# -- a minimal raw client, to send what libpq never would -------------------------------------

def recv_all(sock: socket.socket, timeout: float = 5) -> bytes:
    sock.settimeout(timeout)
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return out


class RawClient:
    def __init__(self, host: str, port: int):
        self.sock = socket.create_connection((host, port), timeout=10)
        self.buf = b""

    def read(self) -> tuple[bytes, bytes]:
        while len(self.buf) < 5 or len(self.buf) < 1 + struct.unpack("!I", self.buf[1:5])[0]:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk
        n = 1 + struct.unpack("!I", self.buf[1:5])[0]
        msg, self.buf = self.buf[:n], self.buf[n:]
        return msg[:1], msg[5:]

    def login(self, user: str, dbname: str, password: str) -> None:
        self.sock.sendall(wire.startup_message({"user": user, "database": dbname}))
        scram = ClientExchange(password=password)
        while True:
            kind, body = self.read()
            if kind == b"R":
                code = struct.unpack("!I", body[:4])[0]
                if code == wire.AUTH_SASL:
                    self.sock.sendall(wire.sasl_initial_response("SCRAM-SHA-256", scram.first()))
                elif code == wire.AUTH_SASL_CONTINUE:
                    self.sock.sendall(wire.sasl_response(scram.final(body[4:])))
                elif code == wire.AUTH_SASL_FINAL:
                    scram.verify(body[4:])
            elif kind == b"E":
                raise AssertionError(body)
            elif kind == b"Z":
                return

    def query(self, sql: str) -> None:
        self.sock.sendall(wire.query(sql))
        while self.read()[0] != b"Z":
            pass
