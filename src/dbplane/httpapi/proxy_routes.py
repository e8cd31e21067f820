"""Routes of a database's connection proxy: endpoints and settings, live changes of the
settings, and pool statistics gathered from every running proxy. A settings change is no
operation: proxies watch the spec and apply it at once, so the generation stays as is
(the controller must not see a change to roll out)."""

from __future__ import annotations

import asyncio

import httpx
from fastapi import APIRouter, Request
from pydantic import BaseModel, ValidationError

from ..controlplane.proxy import endpoints as proxy_endpoints
from ..errors import Conflict, InvalidInput
from ..models import DatabaseSpec, PlatformConfig, PoolMode, ProxyInstance, ProxyLimits, ProxySettings
from ..proxy.limits import max_connections
from ..store import Store, keys
from .views import get_spec, read_spec, save_spec

router = APIRouter()
STATS_TIMEOUT = 2.0      # s per proxy: a hung proxy must not hold the whole answer
SUMMED = ("cl_active", "cl_waiting", "cl_idle", "sv_active", "sv_idle", "sv_opening", "pinned",
          "pinned_total", "xact_total", "query_total", "waits", "errors", "server_errors",
          "queue_timeouts", "logins", "login_failures")


class ProxyPatch(BaseModel):
    """Any subset of ProxySettings; bounds are checked on the merged settings."""
    pool_mode: PoolMode | None = None
    pool_size: int | None = None
    reserve_connections: int | None = None
    max_client_connections: int | None = None
    queue_timeout: float | None = None
    idle_server_timeout: float | None = None
    idle_client_timeout: float | None = None
    failover_hold: float | None = None
    reader_max_lag_bytes: int | None = None
    read_your_writes_users: list[str] | None = None

    model_config = {"extra": "forbid"}


async def _describe(s: Store, spec: DatabaseSpec) -> dict:
    ports = await s.get_raw(keys.proxy_ports(spec.name))
    config = await s.get(keys.config(), PlatformConfig) or PlatformConfig()
    limits = await s.get(keys.proxy_limits(spec.name), ProxyLimits)
    proxies = sorted(await s.list(keys.proxy_instances(), ProxyInstance), key=lambda p: (p.host, p.id))
    return {
        "database": spec.name,
        "endpoints": proxy_endpoints({keys.proxy_ports(spec.name): ports} if ports else {}, spec.name,
                                     config.proxy_host),
        "settings": spec.proxy.model_dump(),
        "limits": limits.model_dump() if limits else None,
        "proxies": [p.model_dump() for p in proxies],
    }


@router.get("/v1/databases/{name}/proxy")
async def describe_proxy(name: str, request: Request):
    s: Store = request.app.state.store
    return await _describe(s, await get_spec(s, name))


def _check_users(users: list[str]) -> list[str]:
    for u in users:
        if not 1 <= len(u.encode()) <= 63 or "\0" in u:
            raise InvalidInput(f"invalid user name {u!r}", "PostgreSQL role names have 1-63 bytes",
                               code="invalid_user")
    return list(dict.fromkeys(users))


@router.patch("/v1/databases/{name}/proxy")
async def modify_proxy(name: str, body: ProxyPatch, request: Request):
    """Applied live by every proxy: no operation, no restart, generation unchanged."""
    s: Store = request.app.state.store
    changes = body.model_dump(exclude_none=True)
    if not changes:
        raise InvalidInput("nothing to modify", "pass at least one proxy setting",
                           code="nothing_to_modify")
    if "read_your_writes_users" in changes:
        changes["read_your_writes_users"] = _check_users(changes["read_your_writes_users"])
    spec, read = await read_spec(s, name)
    if spec.deleting:
        raise Conflict(f"database {name} is being deleted", "create a new database instead",
                       code="database_deleting")
    try:
        settings = ProxySettings.model_validate({**spec.proxy.model_dump(), **changes})
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", []))
        raise InvalidInput(f"invalid {where}: {first.get('msg')}", "see the API schema at /docs",
                           code="invalid_proxy_settings") from None
    # checked only when asked to change, so that an unrelated setting stays changeable
    # after max_connections was lowered (the per-proxy budget caps pools anyway)
    usable = max_connections(spec) - settings.reserve_connections
    if {"pool_size", "reserve_connections"} & changes.keys() and settings.pool_size > usable:
        raise InvalidInput(
            f"pool_size {settings.pool_size} is more than max_connections {max_connections(spec)} "
            f"minus reserve_connections {settings.reserve_connections} ({usable})",
            f"use a pool_size of at most {usable}, or raise max_connections "
            f"('dbplane db modify {name} --param max_connections=N' or a larger --class)",
            code="invalid_pool_size")
    spec = spec.model_copy(update={"proxy": settings})
    await save_spec(s, name, read, spec)
    return await _describe(s, spec)


# -- statistics ---------------------------------------------------------------------------------

def with_avg_wait(pool: dict) -> dict:
    waits = pool.get("waits") or 0
    return {**pool, "avg_wait_ms": round(pool.get("wait_total_s", 0) / waits * 1000, 3) if waits else 0}


def aggregate_pools(proxies: list[dict]) -> list[dict]:
    """One row per (dbname, user) over every proxy's pools: counters summed, the longest
    wait kept, the average wait recomputed from the sums (not averaged averages)."""
    out: dict[tuple[str, str], dict] = {}
    for proxy in proxies:
        for p in proxy.get("pools") or []:
            key = (p.get("dbname", ""), p.get("user", ""))
            a = out.setdefault(key, {
                "database": p.get("database"), "dbname": key[0], "user": key[1], "modes": set(),
                "proxies": 0, **dict.fromkeys(SUMMED, 0), "tps": 0.0, "qps": 0.0,
                "wait_total_s": 0.0, "wait_max_s": 0.0, "pinned_reasons": {}, "sv_by_member": {}})
            a["proxies"] += 1
            a["modes"].add(p.get("pool_mode"))
            for k in (*SUMMED, "tps", "qps", "wait_total_s"):
                a[k] += p.get(k) or 0
            a["wait_max_s"] = max(a["wait_max_s"], p.get("wait_max_s") or 0)
            for field in ("pinned_reasons", "sv_by_member"):
                for k, n in (p.get(field) or {}).items():
                    a[field][k] = a[field].get(k, 0) + n
    rows = []
    for key in sorted(out):
        a = out[key]
        # different modes only while a change reaches the proxies
        a["pool_mode"] = "/".join(sorted(m for m in a.pop("modes") if m))
        a["tps"], a["qps"], a["wait_total_s"] = round(a["tps"], 1), round(a["qps"], 1), round(
            a["wait_total_s"], 6)
        rows.append(with_avg_wait(a))
    return rows


async def _proxy_stats(http: httpx.AsyncClient, proxy: ProxyInstance, name: str) -> dict:
    out = {"id": proxy.id, "host": proxy.host, "ok": False, "error": None}
    address = f"[{proxy.address}]" if ":" in proxy.address else proxy.address
    try:
        r = await http.get(f"http://{address}:{proxy.admin_port}/stats", params={"database": name})
        r.raise_for_status()
        data = r.json()
        out.update(pid=data.get("pid"), clients=data.get("clients"),
                   budget=(data.get("budgets") or {}).get(name),
                   routing=(data.get("routing") or {}).get(name),
                   pools=[with_avg_wait(p) for p in data.get("pools") or [] if p.get("database") == name],
                   ok=True)
    except Exception as e:     # any failure of one proxy is reported, never a 500
        out["error"] = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    return out


@router.get("/v1/databases/{name}/proxy/stats")
async def proxy_stats(name: str, request: Request):
    s: Store = request.app.state.store
    await get_spec(s, name)
    proxies = sorted(await s.list(keys.proxy_instances(), ProxyInstance), key=lambda p: (p.host, p.id))
    async with httpx.AsyncClient(timeout=STATS_TIMEOUT) as http:
        results = await asyncio.gather(*(_proxy_stats(http, p, name) for p in proxies))
    return {"database": name, "proxies": results,
            "pools": aggregate_pools([r for r in results if r["ok"]])}
