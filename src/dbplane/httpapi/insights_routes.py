"""Performance insights (src/dbplane/metrics/insights_read.py):

  GET /v1/databases/{name}/insights?since=1h&by=total|mean|calls&limit=10
      the load by wait event over the period (from the collectors' history), the top
      statements from pg_stat_statements on the primary with their share of the load, the
      slow statements and slow query log lines, and the sessions that are not idle now.
"""

from __future__ import annotations

import time
from typing import Literal

from fastapi import APIRouter, Request

from ..errors import InvalidInput
from ..metrics.insights_read import MAX_STATEMENTS, database_insights
from ..metrics.query import time_range
from .views import get_spec

router = APIRouter()


@router.get("/v1/databases/{name}/insights")
async def database_insights_route(name: str, request: Request, since: str = "1h", until: float | None = None,
                                  by: Literal["total", "mean", "calls"] = "total", limit: int = 10):
    store = request.app.state.store
    await get_spec(store, name)
    if not 1 <= limit <= MAX_STATEMENTS:
        raise InvalidInput(f"limit {limit} is out of range", f"use 1 to {MAX_STATEMENTS}",
                           code="invalid_limit")
    start, end = time_range(since, until, time.time())
    return await database_insights(store, request.app.state.data_root, name, start, end, by, limit)
