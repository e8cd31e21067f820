"""Network allowlists on a real platform: the proxy refuses clients whose address no
rule allows before TLS or login, rule changes reach the proxies within seconds, a flood
from a denied address leaves allowed clients unharmed, and PostgreSQL nodes accept only
the platform's hosts (pg_hba), following hosts that join and leave.

Loopback addresses other than 127.0.0.1 stand in for foreign machines: a raw socket bound
to 127.0.0.2 speaks the first packet of the protocol (libpq cannot choose its source
address)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import psycopg
import pytest

from dbplane import pgwire as wire
from platform_helpers import one_line_error, wait_for

pytestmark = pytest.mark.integration

DB = "al"
SSL_REQUEST = wire.INT32.pack(8) + wire.INT32.pack(wire.SSL_REQUEST)


def first_reply(endpoint: str, source: str, first: bytes = SSL_REQUEST) -> tuple[bytes, dict]:
    """Connect from `source`, send one packet, read the first answer: (b'S' or b'N', {})
    for an SSLRequest that got to TLS negotiation, (b'R', {}) for an authentication
    request, (b'E', fields) for an ErrorResponse, (b'', {}) if closed without a word."""
    host, port = endpoint.rsplit(":", 1)
    with socket.socket() as s:
        s.settimeout(10)
        s.bind((source, 0))
        s.connect((host, int(port)))
        s.sendall(first)
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
            if data[:1] in (b"S", b"N") and first == SSL_REQUEST:
                return data[:1], {}
            if len(data) >= 5 and len(data) >= 1 + int.from_bytes(data[1:5]):
                break
    if data[:1] == b"E":
        return b"E", wire.parse_error_fields(data[5:1 + int.from_bytes(data[1:5])])
    return data[:1], {}


def startup(user: str = "postgres") -> bytes:
    return wire.startup_message({"user": user, "database": "postgres"})


def refused_by_allowlist(endpoint: str, source: str) -> bool:
    kind, fields = first_reply(endpoint, source)
    if kind != b"E":
        return False
    assert fields["S"] == "FATAL" and fields["C"] == "28000", fields
    assert f'no allowlist rule for host "{source}" on database "{DB}"' in fields["M"], fields
    assert f"dbplane db allow {DB} {source}/32" in fields["M"]
    return True


def admitted(endpoint: str, source: str) -> bool:
    return first_reply(endpoint, source)[0] in (b"S", b"N")


@pytest.fixture(scope="module")
def db(platform):
    platform.create(DB, "--multi-az")
    yield platform.describe(DB)
    platform.delete_all(DB)


def test_new_database_allows_loopback_only(platform, db):
    assert [r["cidr"] for r in db["allowlist"]] == ["127.0.0.1/32", "::1/128"]
    assert "allowlist  127.0.0.1/32, ::1/128" in platform.cli("db", "describe", DB).stdout
    listed = platform.cli_json("db", "allowlist", DB)
    assert [r["cidr"] for r in listed["rules"]] == ["127.0.0.1/32", "::1/128"]
    for endpoint in db["endpoints"].values():
        assert refused_by_allowlist(endpoint, "127.0.0.2")
        assert admitted(endpoint, "127.0.0.1")
    # a denied client is refused before login too, whatever its first packet
    kind, fields = first_reply(db["endpoints"]["writer"], "127.0.0.2", startup("dbadmin"))
    assert kind == b"E" and fields["C"] == "28000" and "no allowlist rule" in fields["M"]
    with platform.connect(DB) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


def test_rules_apply_to_new_connections_within_seconds(platform, db):
    writer = db["endpoints"]["writer"]
    out = platform.cli("db", "allow", DB, "127.0.0.2", "--description", "app server").stdout
    assert "127.0.0.2/32" in out and "app server" in out
    wait_for(lambda: admitted(writer, "127.0.0.2"), 10, "the proxy to admit 127.0.0.2")
    assert refused_by_allowlist(writer, "127.0.0.3")
    assert {"cidr": "127.0.0.2/32", "description": "app server"} in platform.describe(DB)["allowlist"]

    platform.cli("db", "revoke", DB, "127.0.0.2/32")
    wait_for(lambda: refused_by_allowlist(writer, "127.0.0.2"), 10, "the proxy to refuse 127.0.0.2 again")
    assert [r["cidr"] for r in platform.cli_json("db", "allowlist", DB)["rules"]] == \
        ["127.0.0.1/32", "::1/128"]


def test_bad_rules_are_refused(platform, db):
    r = platform.cli("db", "allow", DB, "10.0.0.300/8", check=False)
    one_line_error(r, "10.0.0.300/8", "invalid_cidr")
    r = platform.cli("db", "allow", DB, "10.1.2.3/8", check=False)
    one_line_error(r, "host bits set", "10.0.0.0/8", "cidr_host_bits_set")
    r = platform.cli("db", "allow", DB, "127.0.0.1", check=False)
    one_line_error(r, "already allows 127.0.0.1/32", "duplicate_rule")
    r = platform.cli("db", "revoke", DB, "10.9.0.0/16", check=False)
    one_line_error(r, "no allowlist rule for 10.9.0.0/16", "rule_not_found")
    r = platform.cli("db", "allow", "al-missing", "10.0.0.0/8", check=False)
    one_line_error(r, "database_not_found")

    api = platform.api
    too_many = {"rules": [{"cidr": f"10.0.{i}.0/24"} for i in range(51)]}
    resp = api.put(f"/v1/databases/{DB}/allowlist", json=too_many)
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "too_many_rules"
    resp = api.post(f"/v1/databases/{DB}/allowlist", json={"cidr": "10.0.0.0/8", "description": "x\ny"})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_description"
    resp = api.post("/v1/databases", json={"name": "al-bad", "class": "micro", "backups": False,
                                           "allowlist": [{"cidr": "192.168.0.1/16"}]})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "cidr_host_bits_set"
    assert "192.168.0.0/16" in resp.json()["error"]["message"]
    assert api.get("/v1/databases/al-bad").status_code == 404
    # nothing changed
    assert [r["cidr"] for r in platform.describe(DB)["allowlist"]] == ["127.0.0.1/32", "::1/128"]


def test_create_with_allow(platform):
    platform.cli("db", "create", "al-nets", "--class", "micro", "--no-backups",
                 "--allow", "10.20.0.0/16", "--allow", "2001:DB8::/32", "--allow", "127.0.0.1")
    try:
        rules = platform.describe("al-nets")["allowlist"]
        assert [r["cidr"] for r in rules] == ["10.20.0.0/16", "2001:db8::/32", "127.0.0.1/32"]
    finally:
        platform.api.delete("/v1/databases/al-nets")


def test_revoking_closes_open_connections(platform, db):
    writer = db["endpoints"]["writer"]
    conn = platform.connect(DB)
    assert conn.execute("select 1").fetchone() == (1,)
    rules = platform.api.get(f"/v1/databases/{DB}/allowlist").json()["rules"]
    r = platform.api.put(f"/v1/databases/{DB}/allowlist", json={"rules": [{"cidr": "::1/128"}]})
    assert r.status_code == 200, r.text
    try:
        wait_for(lambda: refused_by_allowlist_any(writer), 10, "the proxy to refuse 127.0.0.1")
        with pytest.raises(psycopg.OperationalError, match="no longer allows host"):
            conn.execute("select 1")
    finally:
        conn.close()
        assert platform.api.put(f"/v1/databases/{DB}/allowlist", json={"rules": rules}).status_code == 200
    wait_for(lambda: admitted(writer, "127.0.0.1"), 10, "the proxy to admit 127.0.0.1 again")
    with platform.connect(DB) as again:
        assert again.execute("select 1").fetchone() == (1,)


def refused_by_allowlist_any(endpoint: str) -> bool:
    kind, fields = first_reply(endpoint, "127.0.0.1")
    return kind == b"E" and fields["C"] == "28000" and "no allowlist rule" in fields["M"]


def test_flood_from_denied_address_does_not_hurt_allowed_clients(platform, db):
    writer = db["endpoints"]["writer"]
    proxies = {p.pid for p in platform.proxy_processes()}
    refusals, failures = [], []

    def flood():
        for i in range(500):
            try:
                first = SSL_REQUEST if i % 2 else startup("dbadmin")
                kind, fields = first_reply(writer, "127.0.0.2", first)
                refusals.append(kind == b"E" and fields.get("C") == "28000")
            except OSError as e:
                failures.append(e)

    logs = list(platform.root.glob("hosts/*/proxy-*.log"))

    def logged_refusals() -> int:
        return sum(log.read_text(errors="replace").count("from 127.0.0.2") for log in logs)

    before = logged_refusals()
    queries = 0
    flooder = threading.Thread(target=flood)
    started = time.monotonic()
    with platform.connect(DB) as conn:
        conn.execute("create table if not exists flood_probe (n int)")
        flooder.start()
        while flooder.is_alive():
            conn.execute("insert into flood_probe values (%s)", (queries,))
            assert conn.execute("select count(*) from flood_probe").fetchone()[0] == queries + 1
            queries += 1
        flooder.join()
    elapsed = time.monotonic() - started
    assert not failures, failures[:3]
    assert len(refusals) == 500 and all(refusals)
    assert queries > 0
    # a new allowed client still gets in, and the proxies survived
    with platform.connect(DB) as conn:
        assert conn.execute("select count(*) from flood_probe").fetchone()[0] == queries
    assert {p.pid for p in platform.proxy_processes()} == proxies
    # the refusals were aggregated: a few log lines per proxy, not 500
    # (the first refusal may fall in a window an earlier test opened: then the count line
    # comes when that window closes, up to 10 s later)
    wait_for(lambda: logged_refusals() > before, 15, "the aggregated refusal in the proxy log")
    elapsed = time.monotonic() - started
    bound = len(proxies) * (2 + elapsed / 10)
    lines = logged_refusals() - before
    assert 1 <= lines <= bound, lines

    def audited() -> list[dict]:
        r = platform.api.get("/v1/audit", params={"since": started, "action": "db:Connect",
                                                  "resource": f"db/{DB}", "limit": 1000})
        r.raise_for_status()
        # (other codes from 127.0.0.2 may be late events of earlier tests, e.g. a TLS
        # handshake that an earlier raw client never finished, timing out now)
        return [e for e in r.json()["entries"] if e["source"] == "127.0.0.2"
                and e["code"] == "not_allowlisted"]

    entries = wait_for(audited, 20, "the refusals in the audit log")
    assert all(e["result"] == "denied" for e in entries), entries
    assert len(entries) <= bound, entries


def test_nodes_accept_only_platform_hosts(platform, db):
    primary = platform.member(DB, "primary")
    node = f"{primary['address']}:{primary['port']}"
    kind, fields = first_reply(node, "127.0.0.2", startup())
    assert kind == b"E" and fields["C"] == "28000", fields
    assert 'no pg_hba.conf entry for host "127.0.0.2"' in fields["M"]
    assert first_reply(node, "127.0.0.1", startup())[0] == b"R"     # asked for a password
    for hba in platform.root.glob(f"hosts/*/members/{DB}-*/data/pg_hba.conf"):
        rules = [ln for ln in hba.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
        assert "host all all 127.0.0.1/32 scram-sha-256" in rules
        assert not any("0.0.0.0/0" in ln or "::/0" in ln for ln in rules), rules
    # the platform keeps working: writes through the proxy reach the synchronous standby
    with platform.connect(DB) as conn:
        conn.execute("create table if not exists hba_probe (n int)")
        conn.execute("insert into hba_probe values (42)")
    with platform.connect_node(DB, "sync_standby") as standby:
        wait_for(lambda: standby.execute("select count(*) from hba_probe where n = 42").fetchone()[0],
                 10, "the write to reach the standby")


def test_pg_hba_follows_hosts_joining_and_leaving(platform, db):
    primary = platform.member(DB, "primary")
    node = f"{primary['address']}:{primary['port']}"
    assert first_reply(node, "127.0.0.3", startup())[0] == b"E"
    log = open(platform.root / "logs" / "agent-al.log", "w")
    agent = subprocess.Popen(
        [sys.executable, "-m", "dbplane", "--data-dir", str(platform.root), "agent",
         "--etcd", platform.info.etcd_url, "--zone", "al", "--name", "host-al",
         "--address", "127.0.0.3", "--proxy-workers", "0"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "DBPLANE_API": ""})
    try:
        wait_for(lambda: any(h["name"] == "host-al" for h in platform.api.get("/v1/hosts").json()),
                 30, "the new host to register")
        wait_for(lambda: first_reply(node, "127.0.0.3", startup())[0] == b"R", 15,
                 "the primary to accept the new host")
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(60)
        log.close()
    wait_for(lambda: first_reply(node, "127.0.0.3", startup())[0] == b"E", 15,
             "the primary to refuse the host that left")
    kind, fields = first_reply(node, "127.0.0.3", startup())
    assert fields["C"] == "28000" and 'no pg_hba.conf entry for host "127.0.0.3"' in fields["M"]
