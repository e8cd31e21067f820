"""Database load, as RDS Performance Insights counts it: the collector samples each local
member's pg_stat_activity every second (one query over the member's reused connection) and
counts the active sessions by what they wait for and by query id. Every `FLUSH_SECONDS` the
counts become average active sessions per wait event and per query id:

  dbplane_pg_load_sessions{database,member,role,zone,wait_event_type,wait_event}
  dbplane_pg_load_by_query_sessions{database,member,role,zone,queryid}

An active session with no wait event is on the CPU (`CPU`/`CPU`). Label cardinality is bound:
per flush the `TOP_WAITS` wait events and `TOP_QUERIES` query ids with the most load keep
their names, the rest are summed as `other`. A series flushed last time but idle now is
written as 0 once, so gauges fall back to zero instead of going stale at their last value.
The CPU series is written at every flush, even at 0, so readers can count the flushes.

`LoadWindow` is pure (rows in, samples out); the unit tests drive it without a server.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

import psycopg

from dbplane.metrics.catalog import Sample

SAMPLE_SECONDS = 1.0
FLUSH_SECONDS = 10.0
TOP_WAITS = 8
TOP_QUERIES = 10
CPU = ("CPU", "CPU")
OTHER = "other"
NO_QUERY_ID = "unknown"      # utility statements, or compute_query_id off

# One cheap query: active client sessions (and their parallel workers) grouped by wait and
# query id; the collector's own backend and idle sessions are not load.
Q_ACTIVITY = """
select coalesce(wait_event_type, 'CPU'), coalesce(wait_event, 'CPU'), query_id, count(*)
  from pg_stat_activity
 where state = 'active' and pid <> pg_backend_pid()
   and backend_type in ('client backend', 'parallel worker')
 group by 1, 2, 3
"""

Row = tuple[str, str, int | None, int]      # (wait_event_type, wait_event, query_id, sessions)


async def sample(conn: psycopg.AsyncConnection) -> list[Row]:
    return [tuple(r) for r in await (await conn.execute(Q_ACTIVITY)).fetchall()]


def top_with_other(counts: Mapping, n: int, other) -> dict:
    """The n largest entries by value (ties by key, for stable output); the rest summed
    under `other` (only when there is a rest)."""
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0])))
    out = dict(ranked[:n])
    rest = sum(v for _, v in ranked[n:])
    if rest:
        out[other] = out.get(other, 0) + rest
    return out


class LoadWindow:
    """The samples of one member since its last flush."""

    def __init__(self, top_waits: int = TOP_WAITS, top_queries: int = TOP_QUERIES):
        self.top_waits, self.top_queries = top_waits, top_queries
        self.samples = 0
        self.waits: Counter[tuple[str, str]] = Counter()
        self.queries: Counter[str] = Counter()
        self._last_waits: set[tuple[str, str]] = set()
        self._last_queries: set[str] = set()

    def add(self, rows: Iterable[Row]) -> None:
        self.samples += 1
        for wait_type, wait, query_id, sessions in rows:
            self.waits[(wait_type, wait)] += sessions
            self.queries[NO_QUERY_ID if query_id is None else str(query_id)] += sessions

    def flush(self, labels: Mapping[str, str], now: float) -> list[Sample]:
        """Average active sessions per wait event and per query id since the last flush, and
        start a new window. Nothing when no sample was taken (the member did not answer)."""
        if not self.samples:
            return []
        waits = top_with_other({k: v / self.samples for k, v in self.waits.items()}, self.top_waits,
                               (OTHER, OTHER))
        queries = top_with_other({k: v / self.samples for k, v in self.queries.items()}, self.top_queries,
                                 OTHER)
        waits.setdefault(CPU, 0.0)
        for gone in self._last_waits - set(waits):
            waits[gone] = 0.0
        for gone in self._last_queries - set(queries):
            queries[gone] = 0.0
        out = [Sample("dbplane_pg_load_sessions", {**labels, "wait_event_type": t, "wait_event": e}, v, now)
               for (t, e), v in sorted(waits.items())]
        out += [Sample("dbplane_pg_load_by_query_sessions", {**labels, "queryid": q}, v, now)
                for q, v in sorted(queries.items())]
        self._last_waits = {k for k, v in waits.items() if v > 0}
        self._last_queries = {k for k, v in queries.items() if v > 0}
        self.samples = 0
        self.waits.clear()
        self.queries.clear()
        return out
