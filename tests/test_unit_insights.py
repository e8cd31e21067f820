"""Performance insights, the pure parts: the load window's averages and cardinality bound
(metrics/load.py), the load summary, statement rows and slow query log (metrics/insights.py),
and `dbplane top`'s frame (cli/top_cmds.py)."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from dbplane.cli import top_cmds
from dbplane.httpapi.auth import ROUTES
from dbplane.metrics import catalog, insights, load
from dbplane.security import policy

pytestmark = pytest.mark.unit

LABELS = {"database": "orders", "member": "orders-1", "role": "primary", "zone": "a"}


def _values(samples, name, key):
    return {tuple(s.labels[k] for k in key): s.value for s in samples if s.name == name}


def test_load_window_averages_per_second_samples():
    w = load.LoadWindow()
    w.add([("Lock", "transactionid", 11, 3), (*load.CPU, 22, 1)])
    w.add([("Lock", "transactionid", 11, 3)])
    w.add([])
    w.add([("IO", "DataFileRead", None, 2)])
    out = w.flush(LABELS, 100.0)
    for s in out:
        catalog.validate(s)
        assert s.timestamp == 100.0
    waits = _values(out, "dbplane_pg_load_sessions", ("wait_event_type", "wait_event"))
    assert waits == {("Lock", "transactionid"): 1.5, ("CPU", "CPU"): 0.25, ("IO", "DataFileRead"): 0.5}
    queries = _values(out, "dbplane_pg_load_by_query_sessions", ("queryid",))
    assert queries == {("11",): 1.5, ("22",): 0.25, ("unknown",): 0.5}


def test_load_window_writes_cpu_always_and_zero_once_for_gone_series():
    w = load.LoadWindow()
    assert w.flush(LABELS, 1.0) == []                       # no sample taken: nothing, not zeros
    w.add([("Lock", "tuple", 5, 2)])
    w.flush(LABELS, 10.0)
    w.add([])
    second = w.flush(LABELS, 20.0)
    assert _values(second, "dbplane_pg_load_sessions", ("wait_event_type", "wait_event")) == {
        ("CPU", "CPU"): 0.0, ("Lock", "tuple"): 0.0}
    assert _values(second, "dbplane_pg_load_by_query_sessions", ("queryid",)) == {("5",): 0.0}
    w.add([])
    third = w.flush(LABELS, 30.0)
    assert [s.labels["wait_event"] for s in third] == ["CPU"]     # the zero was written once


def test_load_window_bounds_label_cardinality():
    w = load.LoadWindow(top_waits=3, top_queries=2)
    w.add([("LWLock", f"event{i}", i, i + 1) for i in range(10)])
    out = w.flush(LABELS, 1.0)
    waits = _values(out, "dbplane_pg_load_sessions", ("wait_event_type", "wait_event"))
    # the 3 heaviest keep their names, the other 7 (1+2+...+7 = 28 sessions) are "other"; CPU always
    assert waits == {("LWLock", "event9"): 10, ("LWLock", "event8"): 9, ("LWLock", "event7"): 8,
                     ("other", "other"): 28, ("CPU", "CPU"): 0}
    queries = _values(out, "dbplane_pg_load_by_query_sessions", ("queryid",))
    assert queries == {("9",): 10, ("8",): 9, ("other",): 36}
    assert sum(waits.values()) == sum(queries.values()) == 55


def test_top_with_other_only_when_there_is_a_rest():
    assert load.top_with_other({"a": 1, "b": 2}, 5, "other") == {"b": 2, "a": 1}
    assert load.top_with_other({"a": 1, "b": 2, "c": 2}, 2, "other") == {"b": 2, "c": 2, "other": 1}


def _series(name, member, points, **labels):
    return {"name": name, "labels": {"database": "orders", "member": member, "role": "primary", **labels},
            "points": points}


def test_load_summary_divides_by_flushes_and_sums_members():
    cpu1 = _series("dbplane_pg_load_sessions", "orders-1", [[10, 1.0], [20, 0.0], [30, 2.0], [40, 1.0]],
                   wait_event_type="CPU", wait_event="CPU")
    lock1 = _series("dbplane_pg_load_sessions", "orders-1", [[20, 3.0], [30, 3.0]],
                    wait_event_type="Lock", wait_event="transactionid")
    cpu2 = _series("dbplane_pg_load_sessions", "orders-2", [[10, 0.5], [20, 0.5]],
                   wait_event_type="CPU", wait_event="CPU")
    by_q = _series("dbplane_pg_load_by_query_sessions", "orders-1", [[20, 3.0], [30, 3.0]], queryid="77")
    s = insights.load_summary([cpu1, lock1, cpu2], [by_q])
    # orders-1: 4 flushes; CPU (1+0+2+1)/4 = 1, Lock 6/4 = 1.5; orders-2: CPU 1/2 = 0.5
    assert s["by_wait"] == [
        {"wait_event_type": "CPU", "wait_event": "CPU", "average_active_sessions": 1.5},
        {"wait_event_type": "Lock", "wait_event": "transactionid", "average_active_sessions": 1.5}]
    assert s["average_active_sessions"] == 3.0
    assert s["by_member"] == {"orders-1": 2.5, "orders-2": 0.5}
    assert s["by_query"] == {"77": 1.5}
    assert s["samples"] == 4
    assert s["timeline"][1] == [20, {"CPU": 0.5, "Lock": 3.0}]
    assert insights.by_wait_type(s["by_wait"]) == {"CPU": 1.5, "Lock": 1.5}
    assert insights.load_summary([])["average_active_sessions"] == 0


def test_statement_rows_and_load_share():
    rows = [(77, "select  pg_sleep(\n 1)", 4, 4000.5, 1000.125, 4, 10, 2, "postgres", "app"),
            (-5, "x" * 500, 1, 1.0, 1.0, 0, 0, 0, "postgres", "app")]
    out = insights.statement_rows(rows, {"77": 1.5}, 3.0)
    assert out[0]["queryid"] == "77" and out[0]["query"] == "select pg_sleep( 1)"
    assert out[0]["load_share"] == 0.5 and out[0]["calls"] == 4 and out[0]["mean_time_ms"] == 1000.125
    assert out[1]["load_share"] is None and len(out[1]["query"]) == insights.QUERY_TEXT


def test_slow_threshold_and_enable_hint():
    assert insights.slow_threshold_ms("-1") == 1000.0
    assert insights.slow_threshold_ms("0") == 1000.0
    assert insights.slow_threshold_ms("250") == 250.0
    assert insights.slow_threshold_ms(None) == 1000.0
    hint = insights.enable_hint("orders", preloaded=False)
    assert "dbplane db modify orders --param shared_preload_libraries=pg_stat_statements --wait" in hint
    assert "CREATE EXTENSION pg_stat_statements" in hint
    assert "CREATE EXTENSION pg_stat_statements" in insights.enable_hint("orders", preloaded=True)


def test_slow_log_reads_duration_lines_newest_first():
    text = ("2026-11-24 10:00:01.000 UTC [100] LOG:  duration: 1500.250 ms  statement: select pg_sleep(1.5)\n"
            "2026-11-24 10:00:02 UTC [101] LOG:  checkpoint starting: time\n"
            "2026-11-24 10:00:03.000 UTC [102] LOG:  duration: 2001.000 ms  execute <unnamed>: select\n"
            "\tcount(*) from t\n"
            "2026-11-24 10:00:04.000 UTC [103] ERROR:  duration: 1 ms  statement: not a log line\n")
    out = insights.slow_log(text, "orders-1")
    assert [(r["pid"], r["duration_ms"]) for r in out] == [(102, 2001.0), (100, 1500.25)]
    assert out[0]["statement"] == "select count(*) from t" and out[0]["member"] == "orders-1"


def test_insights_action_is_routed_and_read_only():
    assert ROUTES[("GET", "/v1/databases/{name}/insights")] == ("db:DescribeInsights", "db/{name}")
    assert "db:DescribeInsights" in policy.ALL_ACTIONS


def _frame_data():
    return {"database": "orders", "primary": "orders-1", "since": 0.0, "until": 300.0,
            "load": {"average_active_sessions": 4.0, "samples": 30, "by_member": {"orders-1": 4.0},
                     "timeline": [], "by_wait": [
                         {"wait_event_type": "Lock", "wait_event": "transactionid",
                          "average_active_sessions": 3.0},
                         {"wait_event_type": "CPU", "wait_event": "CPU", "average_active_sessions": 1.0}]},
            "load_by_type": {"Lock": 3.0, "CPU": 1.0},
            "statements": [{"queryid": "77", "query": "select count(*) from big", "calls": 10,
                            "total_time_ms": 900.0, "mean_time_ms": 90.0, "load_share": 0.25},
                           {"queryid": "78", "query": "update t set v = 1", "calls": 3,
                            "total_time_ms": 100.0, "mean_time_ms": 33.3, "load_share": None}],
            "statements_notice": None, "slow_queries": {}, "unavailable_hosts": [],
            "sessions": [{"pid": 42, "user": "app", "state": "active", "wait_event_type": "Lock",
                          "wait_event": "transactionid", "duration_s": 12.5, "queryid": "78",
                          "query": "update t set v = 1"}]}


def test_top_frame_rates_shares_and_rendering():
    data = _frame_data()
    assert top_cmds.calls_per_second(data["statements"], None, 2.0) == {}
    rates = top_cmds.calls_per_second(data["statements"], {"77": 4, "78": 5}, 2.0)
    assert rates == {"77": 3.0, "78": 0.0}                 # a reset counts as no calls, not negative
    f = top_cmds.summary(data, rates)
    assert [s["time_share"] for s in f["statements"]] == [0.9, 0.1]
    assert f["statements"][0]["calls_per_second"] == 3.0
    buf = io.StringIO()
    Console(file=buf, width=160, color_system=None).print(top_cmds.frame(f))
    text = buf.getvalue()
    for expected in ("load 4.00 average active sessions", "Lock:transactionid", "CPU",
                     "select count(*) from big", "90.0", "sessions now", "12.5"):
        assert expected in text, expected
    lock_line = next(line for line in text.splitlines() if line.startswith("Lock:transactionid"))
    cpu_line = next(line for line in text.splitlines() if line.startswith("CPU "))
    assert lock_line.count("█") == top_cmds.BAR_WIDTH and 0 < cpu_line.count("█") < top_cmds.BAR_WIDTH


def test_top_frame_shows_the_notice_and_an_empty_load():
    data = _frame_data()
    data["load"]["by_wait"] = []
    data["statements"] = []
    data["statements_notice"] = insights.enable_hint("orders", preloaded=True)
    buf = io.StringIO()
    Console(file=buf, width=200, color_system=None).print(top_cmds.frame(top_cmds.summary(data, {})))
    assert "no active sessions sampled yet" in buf.getvalue()
    assert "CREATE EXTENSION pg_stat_statements" in buf.getvalue()


def test_bar_eighths():
    assert top_cmds.bar(0, 1) == "" and top_cmds.bar(1, 0) == ""
    assert top_cmds.bar(1, 1, 4) == "████"
    assert top_cmds.bar(1, 8, 1) == "▏"
    assert top_cmds.bar(5, 1, 4) == "████"


class _Cursor:
    def __init__(self, rows):
        self.rows = rows

    async def fetchall(self):
        return self.rows


class _Conn:
    def __init__(self, rows=None, fail=False):
        self.rows, self.fail, self.closed = rows or [], fail, False

    async def execute(self, sql):
        assert "pg_stat_activity" in sql
        if self.fail:
            raise OSError("connection reset")
        return _Cursor(self.rows)

    async def close(self):
        self.closed = True


def test_collector_samples_every_second_and_flushes_every_ten(tmp_path):
    """Each local member with an open connection is sampled at every call; the averages come
    out once per FLUSH_SECONDS with the member's labels; a member whose sample fails loses its
    connection (the next scrape reconnects) and has no load series."""
    import asyncio

    from dbplane.metrics.collector import Collector, MemberConn
    from dbplane.models import MemberSpec

    def member(n):
        return MemberSpec(name=f"orders-{n}", database="orders", host="host-a", zone="a", address="127.0.0.1",
                          pg_port=1, api_port=2)
    clock = [100.0]
    c = Collector("http://unused", "host-a", "a", "127.0.0.1", tmp_path, clock=lambda: clock[0])
    c.mine = [member(1), member(2)]
    c._primary = {"orders-1": True, "orders-2": False}
    c._conns = {"orders-1": MemberConn(_Conn([("Lock", "transactionid", 7, 2), ("CPU", "CPU", 8, 1)]), ""),
                "orders-2": MemberConn(_Conn(fail=True), "")}
    flushed = []

    async def run():
        for _ in range(11):                       # 100 s .. 110 s: the first flush is due at 110 s
            flushed.append(await c.sample_load(1000.0 + clock[0], clock[0]))
            clock[0] += 1
    asyncio.run(run())
    assert all(f == [] for f in flushed[:-1]) and flushed[-1]
    assert "orders-2" not in c._conns                     # dropped after its failed sample
    waits = {(s.labels["member"], s.labels["role"], s.labels["wait_event"]): s.value
             for s in flushed[-1] if s.name == "dbplane_pg_load_sessions"}
    assert waits == {("orders-1", "primary", "transactionid"): 2.0, ("orders-1", "primary", "CPU"): 1.0}
    assert c._latest["load"] == flushed[-1]
    assert c.queries == 11
