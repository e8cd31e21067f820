"""Metrics: the platform's Prometheus scrape and a database's metric history, both read from
the hosts' collectors (src/dbplane/metrics/remote.py), never from etcd.

  GET /metrics                              every collector's latest scrape, merged (Prometheus);
                                            also accepts HTTP Basic auth (httpapi/basic_auth.py)
  GET /v1/databases/{name}/metrics?metric=&since=&until=&step=&member=
                                            the history of the database's series
"""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Query, Request
from fastapi.responses import PlainTextResponse

from ..errors import InvalidInput
from ..metrics import catalog, exposition, remote
from ..metrics.query import KEY_METRICS, default_step, time_range
from .views import get_spec

router = APIRouter()


@router.get("/metrics", response_class=PlainTextResponse)
async def platform_metrics(request: Request):
    text = await remote.scrape(request.app.state.store, request.app.state.data_root)
    return PlainTextResponse(text, media_type=exposition.CONTENT_TYPE)


@router.get("/v1/databases/{name}/metrics")
async def database_metrics(name: str, request: Request, metric: list[str] | None = Query(None),
                           since: str = "1h", until: float | None = None, step: float | None = None,
                           member: str | None = None):
    """Series of the database (by default its key metrics), from the history of every host's
    collector; `member` narrows to one member's series."""
    store = request.app.state.store
    await get_spec(store, name)
    names = metric or list(KEY_METRICS)
    for n in names:
        if n not in catalog.BY_NAME:
            raise InvalidInput(f"unknown metric {n!r}", "see the metric names in docs/observability.md, "
                               "e.g. dbplane_pg_connections", code="unknown_metric")
    start, end = time_range(since, until, time.time())
    if step is not None and not 1 <= step <= 86400:
        raise InvalidInput(f"step {step} is out of range", "use 1 to 86400 seconds", code="invalid_step")
    step = step or default_step(start, end)
    match = {"database": name, **({"member": member} if member else {})}
    answers = await asyncio.gather(*(remote.history(store, request.app.state.data_root, n, match, start, end,
                                                    step) for n in names))
    series = [s for found, _ in answers for s in found]
    failed = {h for _, hosts in answers for h in hosts}
    return {"database": name, "since": start, "until": end, "step": step, "series": series,
            "unavailable_hosts": sorted(failed)}
