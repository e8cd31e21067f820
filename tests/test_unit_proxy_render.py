"""Proxy API and CLI output without a platform: pool aggregation, the routes over an
in-memory store (proxies answered by a mock transport), and the renderers."""

import asyncio

import httpx
import pytest

from dbplane.cli import render
from dbplane.httpapi import proxy_routes
from dbplane.httpapi.app import create_app
from dbplane.httpapi.auth import authorize
from dbplane.httpapi.proxy_routes import aggregate_pools
from dbplane.models import DatabaseSpec, ProxyInstance, ProxyLimits, ProxyPorts
from dbplane.store import keys

pytestmark = pytest.mark.unit


def pool(user="app", **kw):
    return {"database": "db", "dbname": "postgres", "user": user, "pool_mode": "transaction",
            "cl_active": 1, "cl_waiting": 2, "sv_active": 1, "sv_idle": 3, "tps": 1.5, "qps": 3.0,
            "wait_total_s": 0.5, "wait_max_s": 0.2, "waits": 5, "pinned_total": 1,
            "pinned_reasons": {"prepare": 1}, "sv_by_member": {"db-1": 4}, **kw}


def test_aggregate_sums_counters_and_recomputes_the_average_wait():
    rows = aggregate_pools([
        {"pools": [pool(), pool(user="other", waits=0, wait_total_s=0)]},
        {"pools": [pool(wait_total_s=1.5, wait_max_s=0.9, waits=15,
                        pinned_reasons={"prepare": 2, "listen": 1}, sv_by_member={"db-2": 1})]},
        {"pools": []},
    ])
    assert [(r["dbname"], r["user"]) for r in rows] == [("postgres", "app"), ("postgres", "other")]
    app, other = rows
    assert (app["cl_active"], app["cl_waiting"], app["sv_idle"], app["proxies"]) == (2, 4, 6, 2)
    assert (app["tps"], app["qps"], app["wait_total_s"], app["wait_max_s"]) == (3.0, 6.0, 2.0, 0.9)
    assert app["avg_wait_ms"] == 100.0                        # 2 s over 20 waits
    assert app["pinned_reasons"] == {"prepare": 3, "listen": 1}
    assert app["sv_by_member"] == {"db-1": 4, "db-2": 1}
    assert app["errors"] == 0 and app["pool_mode"] == "transaction"
    assert other["avg_wait_ms"] == 0


def test_aggregate_shows_modes_that_differ_during_a_change():
    rows = aggregate_pools([{"pools": [pool()]}, {"pools": [pool(pool_mode="session")]}])
    assert rows[0]["pool_mode"] == "session/transaction"


class FakeStore:
    def __init__(self, items: dict):
        self.data = {k: v.model_dump_json().encode() for k, v in items.items()}

    async def get_raw(self, key):
        return self.data.get(key)

    async def get(self, key, model):
        raw = self.data.get(key)
        return model.model_validate_json(raw) if raw is not None else None

    async def list(self, prefix, model):
        return [model.model_validate_json(v) for k, v in self.data.items() if k.startswith(prefix)]

    async def put(self, key, value):
        self.data[key] = value.model_dump_json().encode()

    async def commit_if(self, key, expected, items, absent=()):
        if self.data.get(key) != expected or any(k in self.data for k in absent):
            return False
        for k, v in items.items():
            await self.put(k, v)
        return True


class Client:
    """Calls the app in-process (starlette's TestClient warns about its httpx here)."""
    AsyncClient = httpx.AsyncClient      # the real one, even when a test patches httpx's

    def __init__(self, app):
        self.app = app

    def request(self, method, path, **kw) -> httpx.Response:
        async def go():
            async with self.AsyncClient(transport=httpx.ASGITransport(app=self.app),
                                        base_url="http://api") as c:
                return await c.request(method, path, **kw)
        return asyncio.run(go())

    def get(self, path):
        return self.request("GET", path)

    def patch(self, path, json):
        return self.request("PATCH", path, json=json)


PROXIES = [ProxyInstance(id="p1", host="host-a", address="127.0.0.1", admin_port=7001, pid=1),
           ProxyInstance(id="p2", host="host-b", address="127.0.0.1", admin_port=7002, pid=2)]


@pytest.fixture
def api():
    spec = DatabaseSpec(name="db", instance_class="micro", generation=3)
    store = FakeStore({keys.database_spec("db"): spec, keys.proxy_ports("db"): ProxyPorts(writer=5, reader=6),
                       keys.proxy_limits("db"): ProxyLimits(per_proxy=20, proxies=2, max_connections=50),
                       **{keys.proxy_instance(p.id): p for p in PROXIES}})
    app = create_app("http://127.0.0.1:1")       # lifespan not run: no etcd needed
    app.state.store = store
    # authentication has its own tests (test_iam.py); this one is about rendering
    app.dependency_overrides[authorize] = lambda: None
    return Client(app), store


def test_describe(api):
    c, _ = api
    d = c.get("/v1/databases/db/proxy").json()
    assert d["endpoints"] == {"writer": "127.0.0.1:5", "reader": "127.0.0.1:6"}
    assert d["settings"]["pool_mode"] == "transaction" and d["limits"]["per_proxy"] == 20
    assert [p["id"] for p in d["proxies"]] == ["p1", "p2"]
    r = c.get("/v1/databases/nope/proxy")
    assert r.status_code == 404 and r.json()["error"]["code"] == "database_not_found"


def test_modify_merges_and_keeps_the_generation(api):
    c, store = api
    r = c.patch("/v1/databases/db/proxy", json={"pool_mode": "session", "read_your_writes_users": ["a", "a"]})
    assert r.status_code == 200, r.text
    assert r.json()["settings"]["pool_mode"] == "session"
    spec = DatabaseSpec.model_validate_json(store.data[keys.database_spec("db")])
    assert spec.generation == 3 and spec.proxy.read_your_writes_users == ["a"] and spec.proxy.pool_size == 20


@pytest.mark.parametrize("body, code", [
    ({}, "nothing_to_modify"),
    ({"pool_size": 41}, "invalid_pool_size"),                  # micro: 50 - 10 reserved
    ({"reserve_connections": 45}, "invalid_pool_size"),
    ({"pool_size": 0}, "invalid_proxy_settings"),
    ({"pool_mode": "statement"}, "invalid_input"),
    ({"poolsize": 5}, "invalid_input"),
    ({"read_your_writes_users": ["x" * 64]}, "invalid_user"),
])
def test_modify_refuses(api, body, code):
    c, _ = api
    r = c.patch("/v1/databases/db/proxy", json=body)
    assert r.status_code == 400 and r.json()["error"]["code"] == code, r.text
    if code == "invalid_pool_size":
        assert "50" in r.json()["error"]["message"]


def test_modify_refuses_while_deleting(api):
    c, store = api
    store.data[keys.database_spec("db")] = DatabaseSpec(name="db", deleting=True).model_dump_json().encode()
    r = c.patch("/v1/databases/db/proxy", json={"pool_size": 5})
    assert r.status_code == 409 and r.json()["error"]["code"] == "database_deleting"


def test_stats_reports_a_proxy_that_does_not_answer(api, monkeypatch):
    c, _ = api

    def answer(request: httpx.Request):
        if request.url.port == 7002:
            raise httpx.ConnectError("connection refused")
        assert request.url.params["database"] == "db"
        return httpx.Response(200, json={"id": "p1", "host": "host-a", "pid": 1, "clients": 3,
                                         "pools": [pool(), pool(database="other")], "budgets": {"db": 20},
                                         "routing": {"db": {"primary": "db-1"}}})

    real = httpx.AsyncClient
    monkeypatch.setattr(proxy_routes.httpx, "AsyncClient",
                        lambda **kw: real(transport=httpx.MockTransport(answer), **kw))
    d = c.get("/v1/databases/db/proxy/stats").json()
    p1, p2 = d["proxies"]
    assert p1["ok"] and p1["budget"] == 20 and p1["routing"] == {"primary": "db-1"} and len(p1["pools"]) == 1
    assert p1["pools"][0]["avg_wait_ms"] == 100.0
    assert not p2["ok"] and "connection refused" in p2["error"]
    assert len(d["pools"]) == 1 and d["pools"][0]["proxies"] == 1


def test_renderers(capsys):
    stats = {"database": "db", "pools": aggregate_pools([{"pools": [pool()]}]),
             "proxies": [{"id": "p1", "host": "host-a", "ok": True, "error": None, "pools": [pool()]},
                         {"id": "p2", "host": "host-b", "ok": False, "error": "ConnectError: refused"}]}
    render.proxy_stats(stats)
    render.proxy_stats(stats, per_proxy=True)
    render.describe_proxy({"database": "db", "endpoints": {"writer": "h:5", "reader": None}, "limits": None,
                           "settings": {"pool_mode": "session", "read_your_writes_users": ["[bold]x"]},
                           "proxies": []})
    out = capsys.readouterr().out
    assert "CL_WAITING" in out and "AVG WAIT MS" in out and "MAX WAIT MS" in out
    assert "p1" in out and "proxy p2 on host-b did not answer: ConnectError: refused" in out
    assert "[bold]x" in out and "not computed yet" in out and "no proxy is running" in out
