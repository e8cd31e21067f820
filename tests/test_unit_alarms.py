"""Alarms without a platform: validation of definitions, the series arithmetic (rates of
counters, sums over states, ratios), statistics per period, the state machine with missing
data, the defaults, and webhook delivery with retries against a real local HTTP server."""

from __future__ import annotations

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from dbplane.alarms import notify, rules
from dbplane.alarms.defaults import defaults_for
from dbplane.alarms.model import AlarmSpec, redact, validate, webhook_problem
from dbplane.errors import InvalidInput
from dbplane.metrics import catalog
from dbplane.models import DatabaseSpec

NOW = 1_800_000_000.0


def spec(**kw) -> AlarmSpec:
    base = {"name": "a", "database": "db", "metric": "dbplane_pg_connections", "threshold": 10, "period": 10,
            "evaluation_periods": 1, "created_at": 0.0}
    return AlarmSpec(**{**base, **kw})


# -- validation -------------------------------------------------------------------------------

def test_a_valid_definition_passes():
    s = validate({"database": "db", "metric": "dbplane_pg_connections", "threshold": 5, "comparison": ">=",
                  "period": 60, "evaluation_periods": 3, "datapoints_to_alarm": 2,
                  "webhooks": ["https://hooks.example.net/T0/secret?token=x"]}, "conn", {"db"})
    assert s.name == "conn" and s.needed == 2


@pytest.mark.parametrize("raw, fragment", [
    ({"metric": "dbplane_nope"}, "unknown metric 'dbplane_nope'"),
    ({"comparison": "=>"}, "comparison"),
    ({"period": 5}, "period 5 is out of range"),
    ({"period": 100000}, "period 100000 is out of range"),
    ({"evaluation_periods": 3, "datapoints_to_alarm": 4}, "datapoints_to_alarm 4"),
    ({"webhooks": ["ftp://x.example/"]}, "must be an http:// or https:// URL"),
    ({"webhooks": ["https://exa mple/"]}, "without spaces"),
    ({"database": "ghost"}, "database 'ghost' does not exist"),
    ({"statistic": "p99"}, "statistic"),
    ({"treat_missing": "zero"}, "treat_missing"),
    ({"labels": {"colour": "red"}}, "has no label colour"),
    ({"denominator": "dbplane_nope"}, "unknown denominator"),
    ({"period": 3600, "evaluation_periods": 48}, "at most 86400"),
    ({"bogus": 1}, "unknown field 'bogus'"),
])
def test_invalid_definitions_are_refused_with_one_line(raw, fragment):
    body = {"database": "db", "metric": "dbplane_pg_connections", "threshold": 1, **raw}
    with pytest.raises(InvalidInput) as e:
        validate(body, "a", {"db"})
    assert e.value.code == "invalid_alarm"
    assert fragment in e.value.message and "\n" not in e.value.message


def test_every_problem_is_reported_at_once():
    with pytest.raises(InvalidInput) as e:
        validate({"database": "ghost", "metric": "dbplane_nope", "threshold": 1, "period": 1,
                  "comparison": "=>"}, "bad name!", set())
    msg = e.value.message
    for fragment in ("name 'bad name!'", "unknown metric", "database 'ghost'", "period 1", "comparison"):
        assert fragment in msg


def test_database_and_host_metrics_need_the_right_scope():
    with pytest.raises(InvalidInput, match="give the database"):
        validate({"metric": "dbplane_pg_connections", "threshold": 1}, "a", set())
    with pytest.raises(InvalidInput, match="leave the database out"):
        validate({"database": "db", "metric": "dbplane_host_cpu_usage_ratio", "threshold": 1}, "a", {"db"})
    assert validate({"metric": "dbplane_host_cpu_usage_ratio", "threshold": 0.9}, "h", set()).database is None


def test_webhook_urls_are_redacted_and_checked():
    assert redact("https://user:pw@hooks.example.net:8443/services/T0/SECRET?token=abc") == \
        "https://hooks.example.net:8443/..."
    assert redact("http://127.0.0.1:9000") == "http://127.0.0.1:9000"
    assert webhook_problem("http://127.0.0.1:9000/hook") is None
    assert webhook_problem("http://h:99999/") is not None
    assert webhook_problem("javascript:alert(1)") is not None


# -- series arithmetic ---------------------------------------------------------------------------

def test_series_of_one_member_are_summed_over_state_and_role():
    series = [{"labels": {"database": "db", "member": "m1", "state": "idle", "role": "primary"},
               "points": [[100, 3], [110, 4]]},
              {"labels": {"database": "db", "member": "m1", "state": "active", "role": "primary"},
               "points": [[100, 1], [110, 2]]},
              {"labels": {"database": "db", "member": "m2", "state": "idle", "role": "standby"},
               "points": [[100, 7]]}]
    groups = rules.grouped(series, counter=False)
    assert sorted(groups.values()) == [[(100.0, 4.0), (110.0, 6.0)], [(100.0, 7.0)]]


def test_counters_become_rates_and_a_reset_counts_from_zero():
    series = [{"labels": {"member": "m1"}, "points": [[0, 100], [10, 150], [20, 5], [30, 25]]}]
    expected = [(10.0, 5.0), (20.0, 0.5), (30.0, 2.0)]
    assert rules.grouped(series, counter=True) == {(("member", "m1"),): expected}


def test_ratio_divides_by_the_same_groups_value_at_that_time():
    num = {("m1",): [(100.0, 40.0), (110.0, 45.0)], ("m2",): [(100.0, 5.0)]}
    den = {("m1",): [(99.0, 50.0)], ("m2",): [(100.0, 0.0)]}
    assert rules.divided(num, den) == {("m1",): [(100.0, 0.8), (110.0, 0.9)], ("m2",): []}
    assert rules.divided(num, 10.0)[("m2",)] == [(100.0, 0.5)]


# -- statistics and periods ------------------------------------------------------------------------

def test_datapoints_take_the_statistic_per_period_and_the_worst_group():
    groups = {("m1",): [(NOW - 25, 1.0), (NOW - 15, 2.0), (NOW - 12, 4.0), (NOW - 5, 9.0)],
              ("m2",): [(NOW - 14, 10.0)]}
    s = spec(period=10, evaluation_periods=3, statistic="avg")
    assert rules.datapoints(groups, s, NOW) == [1.0, 10.0, 9.0]
    assert rules.datapoints(groups, spec(period=10, evaluation_periods=2, statistic="min", comparison="<"),
                            NOW) == [2.0, 9.0]
    s_max = spec(period=10, evaluation_periods=2, statistic="max")
    assert rules.datapoints(groups, s_max, NOW) == [10.0, 9.0]
    assert rules.datapoints({}, s, NOW) == [None, None, None]


# -- the state machine --------------------------------------------------------------------------------

@pytest.mark.parametrize("values, kw, current, expected", [
    ([12.0], {}, "OK", "ALARM"),
    ([8.0], {}, "ALARM", "OK"),
    ([10.0], {}, "OK", "OK"),                                     # > is strict
    ([10.0], {"comparison": ">="}, "OK", "ALARM"),
    ([5.0], {"comparison": "<"}, "OK", "ALARM"),
    ([None], {}, "OK", "INSUFFICIENT_DATA"),                       # no stale OK
    ([None], {}, "ALARM", "INSUFFICIENT_DATA"),
    ([None], {"treat_missing": "breaching"}, "OK", "ALARM"),
    ([None], {"treat_missing": "notBreaching"}, "ALARM", "OK"),
    ([None], {"treat_missing": "ignore"}, "ALARM", "ALARM"),
    ([11.0, 12.0, 9.0], {"evaluation_periods": 3}, "OK", "OK"),    # 2 of 3, 3 needed
    ([11.0, 12.0, 9.0], {"evaluation_periods": 3, "datapoints_to_alarm": 2}, "OK", "ALARM"),
    ([11.0, 12.0, None], {"evaluation_periods": 3, "datapoints_to_alarm": 2}, "OK", "ALARM"),
    ([1.0, 2.0, None], {"evaluation_periods": 3}, "OK", "INSUFFICIENT_DATA"),   # newest period missing
    ([None, 2.0, 3.0], {"evaluation_periods": 3}, "INSUFFICIENT_DATA", "OK"),
    ([None, 11.0, 12.0], {"evaluation_periods": 3, "treat_missing": "breaching"}, "OK", "ALARM"),
])
def test_decide(values, kw, current, expected):
    assert rules.decide(values, spec(**kw), current).state == expected


def test_the_reason_names_the_values_and_the_threshold():
    v = rules.decide([41.0, 45.5], spec(threshold=40, evaluation_periods=2), "OK")
    assert v.state == "ALARM" and v.value == 45.5
    assert "2 of 2 datapoints [41, 45.5]" in v.reason and "> 40" in v.reason


def test_which_transitions_notify():
    assert rules.notify_worthy("OK", "ALARM") and rules.notify_worthy("ALARM", "OK")
    assert rules.notify_worthy("ALARM", "INSUFFICIENT_DATA")
    assert rules.notify_worthy("OK", "INSUFFICIENT_DATA")
    assert not rules.notify_worthy("INSUFFICIENT_DATA", "OK") and not rules.notify_worthy("OK", "OK")


# -- defaults -------------------------------------------------------------------------------------------

def test_defaults_use_real_metric_names_and_pass_validation():
    db = DatabaseSpec(name="orders", multi_az=True)
    found = defaults_for(db)
    names = {a.name for a in found}
    kinds = ("connections", "pool-waiting", "deadlocks", "storage", "cpu", "replication-lag",
             "replication-broken", "backup-age", "archive")
    assert names == {f"orders-{k}" for k in kinds}
    for a in found:
        assert a.metric in catalog.BY_NAME and a.default
        raw = a.model_dump(exclude={"name", "default", "created_at", "updated_at"})
        validate(raw, a.name, {"orders"})
    single = {a.name for a in defaults_for(DatabaseSpec(name="solo"))}
    assert "solo-replication-broken" not in single and "solo-replication-lag" not in single


# -- webhooks ------------------------------------------------------------------------------------------

class _Hook(BaseHTTPRequestHandler):
    answers: list[int] = []
    bodies: list[dict] = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        code = self.answers.pop(0) if self.answers else 200
        type(self).bodies.append(body)
        self.send_response(code)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def hook():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    _Hook.answers, _Hook.bodies = [], []
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook/SECRET"
    server.shutdown()
    server.server_close()


def test_webhook_retries_a_server_error_then_delivers(hook):
    _Hook.answers = [500, 503]
    ok = asyncio.run(notify.post(hook, {"alarm": "a"}, backoff=(0.01, 0.01)))
    assert ok and len(_Hook.bodies) == 3 and _Hook.bodies[-1] == {"alarm": "a"}


def test_webhook_attempts_are_bounded_and_a_refusal_is_not_retried(hook, caplog):
    _Hook.answers = [500, 500, 500, 500]
    assert not asyncio.run(notify.post(hook, {"alarm": "a"}, backoff=(0.01,)))
    assert len(_Hook.bodies) == 3
    _Hook.answers, _Hook.bodies = [404], []
    assert not asyncio.run(notify.post(hook, {"alarm": "a"}, backoff=(0.01,)))
    assert len(_Hook.bodies) == 1
    assert "SECRET" not in caplog.text and "/hook" not in caplog.text


def test_an_unreachable_webhook_gives_up_quickly():
    ok = asyncio.run(notify.post("http://127.0.0.1:9/x", {"alarm": "a"}, timeout=0.5, backoff=(0.01,)))
    assert not ok


# -- the evaluator's pass, over an in-memory store and canned history -------------------------------------

class MemoryStore:
    def __init__(self):
        self.data: dict[str, bytes] = {}

    @staticmethod
    def _encode(value) -> bytes:
        return value.model_dump_json().encode() if hasattr(value, "model_dump_json") else str(value).encode()

    async def get(self, key, model):
        raw = self.data.get(key)
        return model.model_validate_json(raw) if raw is not None else None

    async def get_prefix(self, prefix):
        return {k: v for k, v in sorted(self.data.items()) if k.startswith(prefix)}

    async def list(self, prefix, model):
        return [model.model_validate_json(v) for v in (await self.get_prefix(prefix)).values()]

    async def put(self, key, value, lease=None):
        self.data[key] = self._encode(value)

    async def create(self, key, value, lease=None):
        if key in self.data:
            return False
        await self.put(key, value)
        return True

    async def delete(self, key):
        return self.data.pop(key, None) is not None


@pytest.fixture
def world(monkeypatch):
    from dbplane.alarms import evaluator
    from dbplane.models import DatabaseStatus
    from dbplane.store import keys

    store = MemoryStore()
    store.data[keys.database_spec("orders")] = DatabaseSpec(name="orders").model_dump_json().encode()
    store.data[keys.database_status("orders")] = DatabaseStatus(phase="available",
                                                                ever_available=True).model_dump_json().encode()
    connections = {"value": 10.0}

    async def history(_store, _root, name, match, since, until, step):
        t0 = int(since)
        if name == "dbplane_pg_connections":
            pts = [[t, connections["value"]] for t in range(t0, int(until))]
            return [{"name": name, "labels": {"database": "orders", "member": "orders-1", "state": "idle"},
                     "points": pts}], []
        if name == "dbplane_pg_max_connections":
            return [{"name": name, "labels": {"database": "orders", "member": "orders-1"},
                     "points": [[t, 50.0] for t in range(t0, int(until))]}], []
        return [], []
    monkeypatch.setattr(evaluator.remote, "history", history)
    sent: list[tuple] = []
    ev = evaluator.AlarmEvaluator(None)
    monkeypatch.setattr(ev.notifier, "send", lambda urls, body: sent.append((urls, body)))
    return store, ev, connections, sent, keys


def test_a_pass_makes_the_defaults_once_and_follows_the_connections(world):
    from dbplane.alarms.model import AlarmState, DeletedDefault
    from dbplane.models import Event
    store, ev, connections, sent, keys = world
    asyncio.run(ev.tick(store, NOW))
    assert keys.alarm("orders-connections") in store.data
    state = asyncio.run(store.get(keys.alarm_state("orders-connections"), AlarmState))
    assert state.state == "OK" and state.history[-1].old == "INSUFFICIENT_DATA"
    assert asyncio.run(store.get(keys.alarm_state("orders-cpu"), AlarmState)).state == "INSUFFICIENT_DATA"
    assert not asyncio.run(store.list(keys.events(), Event))          # INSUFFICIENT_DATA -> OK is quiet

    raw = json.loads(store.data[keys.alarm("orders-connections")])
    store.data[keys.alarm("orders-connections")] = json.dumps({**raw, "webhooks": ["http://h.example/x"]}).encode()
    connections["value"] = 45.0
    asyncio.run(ev.tick(store, NOW + 60))
    state = asyncio.run(store.get(keys.alarm_state("orders-connections"), AlarmState))
    assert state.state == "ALARM" and "> 0.8" in state.reason and state.value == pytest.approx(0.9)
    events = asyncio.run(store.list(keys.events(), Event))
    assert [e.kind for e in events] == ["alarm"] and "OK -> ALARM" in events[0].message
    assert sent and sent[0][1]["new_state"] == "ALARM" and sent[0][1]["old_state"] == "OK"

    # a deleted default is not made again; the alarms of a deleted database go with it
    asyncio.run(store.put(keys.alarm_deleted_default("orders-cpu"), DeletedDefault(name="orders-cpu",
                                                                                   database="orders")))
    del store.data[keys.alarm("orders-cpu")]
    asyncio.run(ev.tick(store, NOW + 70))
    assert keys.alarm("orders-cpu") not in store.data and keys.alarm_state("orders-cpu") not in store.data
    del store.data[keys.database_spec("orders")]
    asyncio.run(ev.tick(store, NOW + 80))
    assert not [k for k in store.data if "/alarm" in k]


# -- the routes, over the in-memory store --------------------------------------------------------------------

def test_routes_put_list_describe_delete():
    asyncio.run(_routes())


async def _routes():
    import httpx
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    from dbplane.errors import DbplaneError
    from dbplane.httpapi.alarm_routes import router
    from dbplane.store import keys

    app = FastAPI()
    app.include_router(router)
    app.state.store = store = MemoryStore()
    store.data[keys.database_spec("orders")] = DatabaseSpec(name="orders").model_dump_json().encode()

    @app.exception_handler(DbplaneError)
    async def _err(request, e: DbplaneError):
        return JSONResponse({"error": {"code": e.code, "message": e.message, "hint": e.hint}},
                            status_code=e.status)

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
        body = {"database": "orders", "metric": "dbplane_pg_connections", "threshold": 30, "period": 60}
        r = await http.put("/v1/alarms/conn", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["state"] == "INSUFFICIENT_DATA" and r.json()["datapoints_to_alarm"] == 1
        r = await http.put("/v1/alarms/bad", json={**body, "metric": "dbplane_nope", "period": 1})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_alarm"
        assert "unknown metric" in r.json()["error"]["message"] and "period 1" in r.json()["error"]["message"]
        assert keys.alarm("bad") not in store.data
        listed = (await http.get("/v1/alarms", params={"database": "orders"})).json()
        assert [a["name"] for a in listed] == ["conn"]
        assert (await http.get("/v1/alarms", params={"state": "ALARM"})).json() == []
        assert (await http.get("/v1/alarms", params={"state": "SAD"})).status_code == 400
        assert (await http.get("/v1/alarms/conn/history")).json() == []
        # deleting a default records it; setting it again lifts the record
        raw = json.loads(store.data[keys.alarm("conn")])
        store.data[keys.alarm("conn")] = json.dumps({**raw, "default": True}).encode()
        assert (await http.delete("/v1/alarms/conn")).status_code == 200
        assert keys.alarm_deleted_default("conn") in store.data
        assert (await http.get("/v1/alarms/conn")).status_code == 404
        r = await http.put("/v1/alarms/conn", json=body)
        assert r.status_code == 200 and r.json()["default"]
        assert keys.alarm_deleted_default("conn") not in store.data


def test_periods_before_the_alarm_existed_are_left_out_not_missing():
    """A new Multi-AZ database's replication-broken alarm (missing data breaches) must not fire
    on the minutes before it existed; it decides once its periods have passed."""
    s = spec(metric="dbplane_pg_replication_lag_seconds", comparison=">", threshold=300, period=60,
             evaluation_periods=2, treat_missing="breaching", created_at=NOW - 30)
    assert rules.datapoints({}, s, NOW) == []
    v = rules.decide(rules.datapoints({}, s, NOW), s, "INSUFFICIENT_DATA")
    assert v.state == "INSUFFICIENT_DATA" and "no data yet" in v.reason
    young = s.model_copy(update={"created_at": NOW - 90})           # one period has passed
    assert rules.datapoints({}, young, NOW) == [None]
    assert rules.decide([None], young, "INSUFFICIENT_DATA").state == "OK"   # 1 breaching of 2 needed
    old = s.model_copy(update={"created_at": NOW - 600})
    assert rules.decide(rules.datapoints({}, old, NOW), old, "OK").state == "ALARM"
