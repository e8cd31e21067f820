"""Network allowlists without a platform: CIDR parsing and its refusals, rule changes,
address matching, the aggregation of refusals for the audit log, the proxy's gate on a
real socket, and pg_hba rendering from the platform's hosts (test_allowlist.py runs the
real thing)."""

from __future__ import annotations

import asyncio
import socket
import types

import pytest
import yaml

from dbplane import pgwire as wire
from dbplane.agent import patroni
from dbplane.errors import Conflict, InvalidInput, NotFound
from dbplane.models import AllowRule, DatabaseSecrets, DatabaseSpec, MemberSpec, default_allowlist
from dbplane.proxy import allowlist
from dbplane.proxy.allowlist import (
    Allowlist,
    Gate,
    Gatekeeper,
    add_rule,
    normalize,
    parse_network,
    remove_rule,
    rules_for_create,
)
from dbplane.proxy.client import ClientConn

pytestmark = pytest.mark.unit


# -- parsing and validation ------------------------------------------------------------------

@pytest.mark.parametrize("text, network", [
    ("10.0.0.0/8", "10.0.0.0/8"), (" 192.168.1.0/24 ", "192.168.1.0/24"), ("10.1.2.3", "10.1.2.3/32"),
    ("0.0.0.0/0", "0.0.0.0/0"), ("2001:DB8::/32", "2001:db8::/32"), ("::1", "::1/128"),
    ("2001:0db8:0000::/48", "2001:db8::/48")])
def test_valid_cidrs_are_normalized(text, network):
    assert str(parse_network(text)) == network


@pytest.mark.parametrize("text, fragment", [
    ("10.0.0.300/8", "300"), ("10.0.0.0/33", "33"), ("", "invalid CIDR"), ("bogus", "bogus"),
    ("2001:db8::/129", "129"), ("10.0.0.0/8; DROP TABLE x", "invalid CIDR"), ("1" * 100, "invalid CIDR")])
def test_invalid_cidrs_are_refused(text, fragment):
    with pytest.raises(InvalidInput) as e:
        parse_network(text)
    assert e.value.code == "invalid_cidr" and fragment in e.value.message
    assert "10.0.0.0/16" in e.value.hint


def test_host_bits_set_names_the_network():
    with pytest.raises(InvalidInput) as e:
        parse_network("10.1.2.3/8")
    assert e.value.code == "cidr_host_bits_set" and e.value.status == 400
    assert "10.0.0.0/8" in e.value.message and "10.0.0.0/8" in e.value.hint
    assert "10.1.2.3/32" in e.value.hint
    with pytest.raises(InvalidInput, match="2001:db8::/32") as e:
        parse_network("2001:db8::1/32")
    assert e.value.code == "cidr_host_bits_set"


def test_rule_changes():
    rules = add_rule([], "orders", "10.0.0.0/8", "app servers")
    assert rules == [AllowRule(cidr="10.0.0.0/8", description="app servers")]
    rules = add_rule(rules, "orders", "10.1.2.3")
    assert [r.cidr for r in rules] == ["10.0.0.0/8", "10.1.2.3/32"]
    with pytest.raises(Conflict) as e:
        add_rule(rules, "orders", "10.1.2.3/32")      # the same network, written differently
    assert e.value.code == "duplicate_rule" and e.value.status == 409
    with pytest.raises(InvalidInput) as e:
        add_rule(rules, "orders", "10.2.0.0/16", "bad\ndescription")
    assert e.value.code == "invalid_description"
    with pytest.raises(InvalidInput) as e:
        add_rule(rules, "orders", "10.2.0.0/16", "x" * 256)
    assert e.value.code == "invalid_description"
    assert remove_rule(rules, "orders", "10.1.2.3") == rules[:1]
    with pytest.raises(NotFound) as e:
        remove_rule(rules, "orders", "192.168.0.0/16")
    assert e.value.code == "rule_not_found" and "dbplane db allowlist orders" in e.value.hint
    with pytest.raises(InvalidInput) as e:
        remove_rule(rules, "orders", "10.0.0.1/8")
    assert e.value.code == "cidr_host_bits_set"


def test_rule_count_is_bounded():
    rules = normalize(AllowRule(cidr=f"10.0.{i}.0/24") for i in range(allowlist.MAX_RULES))
    with pytest.raises(InvalidInput) as e:
        add_rule(rules, "orders", "10.1.0.0/16")
    assert e.value.code == "too_many_rules"
    with pytest.raises(InvalidInput) as e:
        normalize([*rules, AllowRule(cidr="10.1.0.0/16")])
    assert e.value.code == "too_many_rules"


def test_rules_for_a_new_database():
    assert [r.cidr for r in rules_for_create(None)] == ["127.0.0.1/32", "::1/128"]
    assert rules_for_create(None) == default_allowlist() == DatabaseSpec(name="db").allowlist
    assert rules_for_create([]) == []
    assert [r.cidr for r in rules_for_create([AllowRule(cidr="10.1.2.3")])] == ["10.1.2.3/32"]
    with pytest.raises(InvalidInput) as e:
        rules_for_create([AllowRule(cidr="10.0.0.1"), AllowRule(cidr="10.0.0.1/32")])
    assert e.value.code == "duplicate_rule"


# -- matching ------------------------------------------------------------------------------

def test_matching():
    lst = Allowlist(["10.0.0.0/8", "192.168.1.7/32", "2001:db8::/32"])
    assert lst.allows("10.255.0.1") and lst.allows("192.168.1.7")
    assert not lst.allows("11.0.0.1") and not lst.allows("192.168.1.8")
    assert lst.allows("2001:db8::5") and not lst.allows("2001:db9::5")
    assert lst.allows("::ffff:10.1.1.1")           # an IPv4 client of a dual-stack socket
    assert lst.allows("2001:db8::1%eth0")         # a scope id
    assert not lst.allows("") and not lst.allows("not-an-address")
    assert not Allowlist([]).allows("127.0.0.1")
    assert Allowlist(["0.0.0.0/0"]).allows("8.8.8.8") and not Allowlist(["0.0.0.0/0"]).allows("::1")
    loopback = Allowlist(r.cidr for r in default_allowlist())
    assert loopback.allows("127.0.0.1") and loopback.allows("::1") and not loopback.allows("127.0.0.2")


def test_refusal_message_is_one_line_with_the_fix():
    text = allowlist.refusal_message("orders", "127.0.0.2")
    assert "\n" not in text
    assert '"127.0.0.2"' in text and '"orders"' in text and "dbplane db allow orders 127.0.0.2/32" in text
    assert "::1/128" in allowlist.refusal_message("orders", "::1")
    assert "allow orders 10.0.0.1/32" in allowlist.refusal_message("orders", "::ffff:10.0.0.1")


# -- refusals in the audit log -----------------------------------------------------------------

class Recorder:
    def __init__(self):
        self.entries = []

    async def record(self, store, **entry):
        self.entries.append(entry)


def test_refusals_are_aggregated_per_source(monkeypatch):
    recorder = Recorder()
    monkeypatch.setattr(allowlist, "audit", recorder)
    monkeypatch.setattr(allowlist, "AUDIT_WINDOW", 0.2)

    async def scenario():
        keeper = Gatekeeper()
        keeper.store = object()
        for _ in range(100):
            keeper.refused("orders", "10.9.9.9", "writer")
        keeper.refused("orders", "10.8.8.8", "reader")
        await asyncio.sleep(0)
        first = list(recorder.entries)
        await asyncio.sleep(0.3)          # one window: the count of the rest
        second = list(recorder.entries)
        await asyncio.sleep(0.3)          # a quiet window: nothing, the source is forgotten
        third = list(recorder.entries)
        keeper.refused("orders", "10.9.9.9", "writer")
        await asyncio.sleep(0)
        return keeper, first, second, third, list(recorder.entries)

    keeper, first, second, third, last = asyncio.run(scenario())
    assert [(e["source"], e["result"], e["code"]) for e in first] == \
        [("10.9.9.9", "denied", "not_allowlisted"), ("10.8.8.8", "denied", "not_allowlisted")]
    assert all(e["action"] == "db:Connect" and e["resource"] == "db/orders" and e["principal"] is None
               for e in first)
    assert len(second) == 3 and "refused 99 more" in second[2]["detail"]
    assert third == second
    assert len(last) == 4 and last[3]["source"] == "10.9.9.9"
    assert keeper.refused_total == {"orders": 102}


def test_without_a_store_refusals_are_only_counted(monkeypatch):
    recorder = Recorder()
    monkeypatch.setattr(allowlist, "audit", recorder)

    async def scenario():
        keeper = Gatekeeper()
        keeper.refused("orders", "10.9.9.9", "writer")
        await asyncio.sleep(0)
        return keeper

    assert asyncio.run(scenario()).refused_total == {"orders": 1} and recorder.entries == []


class OpenClient:
    """What the gatekeeper uses of an admitted ClientConn: its state and fatal()."""

    def __init__(self):
        self.state, self.closed_with = 2, None

    def fatal(self, sqlstate, text, hint=""):
        self.state, self.closed_with = allowlist.CLOSED, (sqlstate, text)


def test_rule_change_closes_clients_no_longer_allowed(monkeypatch):
    recorder = Recorder()
    monkeypatch.setattr(allowlist, "audit", recorder)

    async def scenario():
        keeper = Gatekeeper()
        keeper.update(object(), {"orders": normalize([AllowRule(cidr="10.0.0.0/8")]), "other": []})
        app = [OpenClient(), OpenClient()]
        admin, elsewhere = OpenClient(), OpenClient()
        for c in app:
            keeper.admitted(c, "orders", "10.1.1.1")
        keeper.admitted(admin, "orders", "10.2.2.2")
        keeper.admitted(elsewhere, "other", "10.1.1.1")
        keeper.update(object(), {"orders": normalize([AllowRule(cidr="10.0.0.0/8")]), "other": []})
        assert all(c.closed_with is None for c in (*app, admin, elsewhere))   # nothing changed
        keeper.update(object(), {"orders": normalize([AllowRule(cidr="10.2.0.0/16")]), "other": []})
        await asyncio.sleep(0)
        return app, admin, elsewhere

    app, admin, elsewhere = asyncio.run(scenario())
    assert all(c.closed_with[0] == "28000" and "no longer allows host" in c.closed_with[1] for c in app)
    assert admin.closed_with is None and elsewhere.closed_with is None
    assert [(e["source"], e["detail"]) for e in recorder.entries] == \
        [("10.1.1.1", "closed 2 open connections: a rule change no longer allows its address")]


# -- the gate on a real socket ----------------------------------------------------------------

class StandInProxy:
    """What a Gate needs of the proxy: the gatekeeper, and a ClientConn's first call."""

    def __init__(self, rules):
        self.gatekeeper = Gatekeeper()
        self.gatekeeper.lists["orders"] = Allowlist(rules)
        self.opened = []
        self.tls = None

    def client_opened(self, client):
        self.opened.append(client)


def exchange(port: int, source: str, first: bytes) -> bytes:
    with socket.socket() as s:
        s.bind((source, 0))
        s.settimeout(5)
        s.connect(("127.0.0.1", port))
        s.sendall(first)
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        return data


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_gate_refuses_before_tls_and_hands_over_the_allowed(loop_kind):
    proxy = StandInProxy(["127.0.0.1/32"])
    listener = types.SimpleNamespace(cluster=types.SimpleNamespace(name="orders"), role="writer")
    ssl_request = wire.INT32.pack(8) + wire.INT32.pack(wire.SSL_REQUEST)
    startup = wire.startup_message({"user": "app", "database": "orders"})
    cancel = wire.cancel_request(1, b"1234")

    async def scenario():
        server = await asyncio.get_running_loop().create_server(
            lambda: Gate(proxy, listener), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        answers = [await asyncio.to_thread(exchange, port, "127.0.0.2", first)
                   for first in (ssl_request, startup, cancel)]
        with socket.create_connection(("127.0.0.1", port)) as allowed:
            allowed.setblocking(False)
            for _ in range(100):
                if proxy.opened:
                    break
                await asyncio.sleep(0.01)
        server.close()
        return answers

    if loop_kind == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        answers = uvloop.run(scenario())
    else:
        answers = asyncio.run(scenario())
    for answer in answers[:2]:
        assert answer[:1] == b"E"                 # no 'S': TLS is never negotiated
        fields = wire.parse_error_fields(answer[5:])
        assert fields["S"] == "FATAL" and fields["C"] == "28000"
        assert '"127.0.0.2"' in fields["M"] and '"orders"' in fields["M"]
    assert answers[2] == b""                      # a cancel request gets no answer
    assert len(proxy.opened) == 1 and isinstance(proxy.opened[0], ClientConn)
    assert proxy.gatekeeper.refused_total == {"orders": 3}
    assert proxy.gatekeeper.clients[proxy.opened[0]] == ("orders", "127.0.0.1")


# -- pg_hba on the nodes ------------------------------------------------------------------------

def test_pg_hba_accepts_only_the_platform_hosts():
    member = MemberSpec(name="db-1", database="db", host="host-a", zone="a", address="10.0.0.5",
                        pg_port=5432, api_port=5433)
    secrets = DatabaseSecrets(superuser="s1", replication="s2", rewind="s3", admin="s4")
    config = yaml.safe_load(patroni.render(member, DatabaseSpec(name="db"), secrets, ["127.0.0.1:2379"],
                                           "/bin", "/m/db-1",
                                           node_addresses=["10.0.0.6", "10.0.0.5", "fd00::7", "db-host-9"]))
    hba = config["postgresql"]["pg_hba"]
    assert hba == [
        "host replication replicator 10.0.0.5/32 scram-sha-256",
        "host replication replicator 10.0.0.6/32 scram-sha-256",
        "host replication replicator db-host-9 scram-sha-256",
        "host replication replicator fd00::7/128 scram-sha-256",
        "host all all 10.0.0.5/32 scram-sha-256",
        "host all all 10.0.0.6/32 scram-sha-256",
        "host all all db-host-9 scram-sha-256",
        "host all all fd00::7/128 scram-sha-256",
    ]
    assert not any("/0" in line for line in hba)
    # the dynamic configuration holds no copy that could go stale
    assert "pg_hba" not in config["bootstrap"]["dcs"]["postgresql"]
    alone = yaml.safe_load(patroni.render(member, DatabaseSpec(name="db"), secrets, ["127.0.0.1:2379"],
                                          "/bin", "/m/db-1"))
    assert alone["postgresql"]["pg_hba"] == ["host replication replicator 10.0.0.5/32 scram-sha-256",
                                             "host all all 10.0.0.5/32 scram-sha-256"]
