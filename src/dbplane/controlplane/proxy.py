"""The proxy's side of a database: its two stable endpoint ports, and the budget of
server connections each proxy may open to one node (max_connections minus the reserve,
shared by every running proxy)."""

from __future__ import annotations

import ipaddress
import logging
import time

from ..errors import DbplaneError
from ..models import DatabaseSpec, ProxyDrain, ProxyInstance, ProxyLimits, ProxyPorts
from ..proxy.limits import proxy_budget
from ..store import keys
from ..system import port_free
from .placement import allocate_ports

log = logging.getLogger("dbplane.controller")

PROXY_ADDRESS = "proxy"     # ports/proxy/<port>: reserved on every host, proxies listen everywhere


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def taken_ports(raw: dict[str, bytes]) -> set[int]:
    return {int(k.rsplit("/", 1)[1]) for k in raw if k.startswith(keys.ports())}


async def ensure_proxy_ports(p, spec: DatabaseSpec) -> None:
    """Give the database its writer and reader ports once; they never change."""
    if keys.proxy_ports(spec.name) in p.snap.raw:
        return
    writer, reader = allocate_ports(taken_ports(p.snap.raw), p.config.member_port_start,
                                    p.config.member_port_end, 2,
                                    lambda port: not _loopback(p.config.proxy_host)
                                    or port_free(p.config.proxy_host, port))
    reserved = {keys.port(PROXY_ADDRESS, port): f"{spec.name}-proxy" for port in (writer, reader)}
    if not await p.store.create_all(reserved):
        raise DbplaneError(f"ports {writer}/{reader} were taken concurrently; retrying", code="conflict")
    ports = ProxyPorts(writer=writer, reader=reader)
    await p.store.put(keys.proxy_ports(spec.name), ports)
    # members placed later in this pass must not be given these ports
    p.snap.raw.update({k: v.encode() for k, v in reserved.items()})
    p.snap.raw[keys.proxy_ports(spec.name)] = ports.model_dump_json().encode()
    log.info("%s: proxy endpoints on ports %d (writer) and %d (reader)", spec.name, writer, reader)


def proxy_instances(raw: dict[str, bytes]) -> list[ProxyInstance]:
    return [ProxyInstance.model_validate_json(v) for k, v in raw.items()
            if k.startswith(keys.proxy_instances())]


async def ensure_proxy_limits(p, spec: DatabaseSpec) -> None:
    """Split max_connections minus the reserve between the proxies that run now."""
    limits = proxy_budget(spec, len(proxy_instances(p.snap.raw)))
    raw = p.snap.raw.get(keys.proxy_limits(spec.name))
    if raw is None or ProxyLimits.model_validate_json(raw) != limits:
        await p.store.put(keys.proxy_limits(spec.name), limits)


async def delete_proxy_keys(p, spec: DatabaseSpec) -> None:
    raw = p.snap.raw.get(keys.proxy_ports(spec.name))
    if raw is not None:
        ports = ProxyPorts.model_validate_json(raw)
        for port in (ports.writer, ports.reader):
            await p.store.delete(keys.port(PROXY_ADDRESS, port))
    for key in (keys.proxy_ports(spec.name), keys.proxy_limits(spec.name), keys.proxy_drain(spec.name)):
        await p.store.delete(key)
    await p.store.delete_prefix(keys.proxy_drained(spec.name))


def endpoints(raw: dict[str, bytes], db: str, proxy_host: str) -> dict[str, str | None]:
    ports_raw = raw.get(keys.proxy_ports(db))
    if ports_raw is None:
        return {"writer": None, "reader": None}
    ports = ProxyPorts.model_validate_json(ports_raw)
    return {"writer": f"{proxy_host}:{ports.writer}", "reader": f"{proxy_host}:{ports.reader}"}


# -- draining writer transactions before a switchover -----------------------------------------

DRAIN_TIMEOUT = 10.0     # seconds a switchover waits for running writer transactions
DRAIN_MAX_AGE = 60.0     # a drain older than this is stale (its switchover ended or failed)


async def drained(store, raw: dict[str, bytes], db: str, operation: str, primary: str) -> bool:
    """Ask every proxy to hold new writer transactions and to report when none runs on
    `primary`. True once all running proxies reported, or after DRAIN_TIMEOUT."""
    current = raw.get(keys.proxy_drain(db))
    drain = ProxyDrain.model_validate_json(current) if current else None
    if drain is None or drain.operation != operation:
        await store.put(keys.proxy_drain(db), ProxyDrain(operation=operation, primary=primary))
        return False
    acked = {k.rsplit("/", 1)[1] for k, v in raw.items()
             if k.startswith(keys.proxy_drained(db)) and v.decode() == operation}
    live = {i.id for i in proxy_instances(raw)}
    return live <= acked or time.time() - drain.since > DRAIN_TIMEOUT


async def ensure_drain_cleared(p, spec: DatabaseSpec, primary: str | None) -> None:
    """Remove a drain whose switchover is over: the primary moved, or it is stale."""
    current = p.snap.raw.get(keys.proxy_drain(spec.name))
    if current is None:
        return
    drain = ProxyDrain.model_validate_json(current)
    if (primary is not None and primary != drain.primary) or time.time() - drain.since > DRAIN_MAX_AGE:
        await p.store.delete(keys.proxy_drain(spec.name))
        await p.store.delete_prefix(keys.proxy_drained(spec.name))
