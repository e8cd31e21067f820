"""How many server connections each proxy may open to one node of a database, so that
all proxies together stay below max_connections minus the reserve. The controller
writes the result for every database (the authority); a proxy that finds none yet
computes the same itself."""

from __future__ import annotations

from ..classes import get_class
from ..models import DatabaseSpec, ProxyLimits


def max_connections(spec: DatabaseSpec) -> int:
    value = spec.params.get("max_connections")
    return int(value) if value and value.isdigit() else get_class(spec.instance_class).max_connections


def proxy_budget(spec: DatabaseSpec, proxies: int) -> ProxyLimits:
    total = max_connections(spec)
    usable = max(1, total - spec.proxy.reserve_connections)
    proxies = max(1, proxies)
    return ProxyLimits(per_proxy=max(1, usable // proxies), proxies=proxies, max_connections=total)
