"""Pure pieces of the proxy: startup options, routing from Patroni's keys, connection
budgets, statement names, and how a server connection hides the replies to what the
proxy injected (the integration tests in test_proxy.py run the real thing)."""

from __future__ import annotations

import json
import types

import pytest

from dbplane import pgwire as wire
from dbplane.models import DatabaseSpec, MemberSpec, ProxyDrain, ProxySettings
from dbplane.proxy.client import server_name
from dbplane.proxy.limits import proxy_budget
from dbplane.proxy.pool import PoolStats
from dbplane.proxy.proxy import topology
from dbplane.proxy.server import ServerConn

pytestmark = pytest.mark.unit


def test_startup_options():
    assert wire.parse_options("-c search_path=app -c statement_timeout=5s") == \
        {"search_path": "app", "statement_timeout": "5s"}
    assert wire.parse_options("-cTimeZone=UTC --lock-timeout=1s") == {"timezone": "UTC", "lock_timeout": "1s"}
    assert wire.parse_options(r"-c application_name=my\ app") == {"application_name": "my app"}
    assert wire.parse_options("") == {}
    with pytest.raises(ValueError, match="only -c name=value"):
        wire.parse_options("-B 100")
    with pytest.raises(ValueError, match="no value"):
        wire.parse_options("-c search_path")


def test_startup_packet_round_trip():
    packet = wire.startup_message({"user": "app", "database": "orders"})
    assert int.from_bytes(packet[:4]) == len(packet)
    assert int.from_bytes(packet[4:8]) == wire.PROTOCOL_3_0
    assert wire.parse_startup_params(packet[8:]) == {"user": "app", "database": "orders"}


def member(name: str, port: int) -> MemberSpec:
    return MemberSpec(name=name, database="db", host="h", zone="a", address="127.0.0.1", pg_port=port,
                      api_port=port + 1)


def patroni(leader: str | None, states: dict[str, tuple[str, str]]) -> dict[str, bytes]:
    raw = {f"/dbplane-patroni/db/members/{n}": json.dumps({"role": r, "state": s}).encode()
           for n, (r, s) in states.items()}
    if leader:
        raw["/dbplane-patroni/db/leader"] = leader.encode()
    return raw


def test_topology_from_patroni_keys():
    members = [member("db-1", 100), member("db-2", 102), member("db-3", 104)]
    t = topology("db", members, patroni("db-1", {"db-1": ("primary", "running"),
                                                 "db-2": ("replica", "streaming"),
                                                 "db-3": ("replica", "starting")}), None)
    assert t.primary == "db-1" and t.replicas == ("db-2",)
    assert t.members["db-2"] == ("127.0.0.1", 102)
    # a leader key whose member does not run as primary yet: no writer target
    t = topology("db", members, patroni("db-2", {"db-1": ("replica", "streaming"),
                                                 "db-2": ("replica", "running")}), None)
    assert t.primary is None and t.replicas == ("db-1",)
    # a member being deleted is no target; a drain names the primary it drains
    gone = members[1].model_copy(update={"deleting": True})
    t = topology("db", [members[0], gone], patroni("db-1", {"db-1": ("primary", "running"),
                                                           "db-2": ("replica", "streaming")}),
                 ProxyDrain(operation="op-1", primary="db-1"))
    assert t.replicas == () and t.draining == "db-1"


def test_budget_splits_max_connections_minus_reserve():
    spec = DatabaseSpec(name="db", instance_class="micro")
    assert proxy_budget(spec, 3).per_proxy == (50 - 10) // 3
    assert proxy_budget(spec, 0).per_proxy == 40
    spec = spec.model_copy(update={"params": {"max_connections": "200"},
                                   "proxy": ProxySettings(reserve_connections=20)})
    limits = proxy_budget(spec, 4)
    assert (limits.per_proxy, limits.max_connections) == (45, 200)
    assert proxy_budget(spec.model_copy(update={"proxy": ProxySettings(reserve_connections=500)}),
                       2).per_proxy == 1


def test_statement_names_depend_on_text_and_types():
    a = server_name(b"SELECT $1\0\0\x01\0\0\0\x17")
    assert a == server_name(b"SELECT $1\0\0\x01\0\0\0\x17") and a.startswith(b"dbp_")
    assert a != server_name(b"SELECT $1\0\0\x01\0\0\0\x19")


# -- a server connection's reply filter ------------------------------------------------------

class Sink:
    def __init__(self):
        self.data = b""
        self.idle = 0

    def write(self, data: bytes) -> None:
        self.data += data


def server() -> tuple[ServerConn, Sink]:
    pool = types.SimpleNamespace(stats=PoolStats(), count_ready=lambda s: None)
    conn = ServerConn(pool, "db-1", "127.0.0.1", 5432)
    conn._handshake = None
    sink = Sink()
    conn.client = types.SimpleNamespace(transport=sink, server_idle=lambda s: setattr(sink, "idle",
                                                                                      sink.idle + 1))
    conn.transport = types.SimpleNamespace(write=lambda data: None)
    return conn, sink


Z = wire.ready_for_query()
ROW = wire.message(b"D", b"\0\1\0\0\0\1" + b"1")
DONE = wire.message(b"C", b"SELECT 1\0")


def test_replies_pass_through_and_idle_is_reported():
    conn, sink = server()
    conn.send(wire.query("SELECT 1"), 1)
    reply = ROW + DONE + Z
    conn.data_received(reply[:7])            # split anywhere: reassembled
    conn.data_received(reply[7:])
    assert sink.data == reply and sink.idle == 1 and not conn.busy


def test_injected_query_reply_is_hidden():
    conn, sink = server()
    done = []
    conn.run_internal("SET application_name = 'x'", done.append)
    conn.send(wire.query("SELECT 1"), 1)
    status = wire.parameter_status("application_name", "x")
    conn.data_received(wire.message(b"C", b"SET\0") + status + Z + ROW + DONE + Z)
    assert done == [True]
    assert sink.data == ROW + DONE + Z
    assert conn.params["application_name"] == "x"


def test_injected_parse_and_close_replies_are_hidden():
    conn, sink = server()
    extra = conn.statement(b"dbp_1", b"SELECT 1\0\0\0", 0)   # not prepared here: Parse injected
    assert len(extra) == 1 and list(conn.swallow) == [[0, 1, 0]]
    assert conn.statement(b"dbp_1", b"SELECT 1\0\0\0", 0) == []   # now it is
    conn.send(b"".join(extra), 1)
    reply = wire.PARSE_COMPLETE + wire.message(b"2") + ROW + DONE + Z
    conn.data_received(reply)
    assert sink.data == wire.message(b"2") + ROW + DONE + Z
    assert not conn.swallow


def test_injections_in_a_pipeline_of_several_syncs():
    """The client's own ParseComplete of batch 0 must pass; batch 1's injected one not."""
    conn, sink = server()
    conn.hide(1, parses=1)                   # injected before a Bind of the second batch
    conn.send(b"x", 2)
    first = wire.PARSE_COMPLETE + wire.message(b"2") + DONE + Z
    second = wire.PARSE_COMPLETE + wire.message(b"2") + DONE + Z
    conn.data_received(first + second)
    assert sink.data == first + wire.message(b"2") + DONE + Z


def test_error_makes_statements_of_the_batch_uncertain():
    conn, sink = server()
    conn.send(b"".join(conn.statement(b"dbp_2", b"SELEC 1\0\0\0", 0)), 1)
    conn.data_received(wire.error("42601", "syntax error") + Z)
    assert b"dbp_2" not in conn.prepared and b"dbp_2" in conn.uncertain
    assert not conn.swallow                  # the skipped ParseComplete is not waited for
    # the next attempt closes the name first, in case the server has it after all
    again = conn.statement(b"dbp_2", b"SELECT 1\0\0\0", 1)
    assert again[0] == wire.close_statement(b"dbp_2") and list(conn.swallow) == [[1, 1, 1]]


def test_fatal_from_the_server_is_not_passed_on():
    conn, sink = server()
    conn.send(wire.query("SELECT pg_sleep(10)"), 1)
    conn.data_received(wire.error("57P01", "terminating connection due to administrator command", "FATAL"))
    assert sink.data == b""
