"""Performance insights for GET /v1/databases/{name}/insights: the load by wait event from
the collectors' history (remote.py), and, read now from the database's primary as the
internal superuser, the top statements (pg_stat_statements), the sessions that are not idle
and the slow threshold; the slow query log lines from the end of each member's log, which its
host's collector reads (remote.member_logs). A primary that does not answer leaves the
statements and sessions empty with a notice, a collector that does not answer a note; nothing
here raises for a member that is down.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import psycopg

from dbplane.controlplane.topology import Snapshot, member_views
from dbplane.doctor import pglog
from dbplane.errors import DbplaneError
from dbplane.metrics import insights, remote
from dbplane.metrics.load import FLUSH_SECONDS
from dbplane.security import db_secrets
from dbplane.store import Store, keys

APPLICATION = "dbplane-insights"
CONNECT = {"connect_timeout": 3, "autocommit": True, "application_name": APPLICATION,
           "options": "-c statement_timeout=3000"}
PRIMARY_TIMEOUT = 6.0
LOG_TAIL_BYTES = 2 * 2**20
MAX_STATEMENTS = 50
MAX_SESSIONS = 50

Q_STATE = """
select (select count(*) from pg_extension where extname = 'pg_stat_statements') as installed,
       'pg_stat_statements' = any(string_to_array(replace(current_setting('shared_preload_libraries'),
                                  ' ', ''), ',')) as preloaded,
       (select setting from pg_settings where name = 'log_min_duration_statement') as log_min_duration
"""

ORDER = {"total": "total_exec_time", "mean": "mean_exec_time", "calls": "calls"}

Q_STATEMENTS = """
select s.queryid, left(s.query, 1000), s.calls, s.total_exec_time, s.mean_exec_time, s.rows,
       s.shared_blks_hit, s.shared_blks_read, d.datname, r.rolname
  from pg_stat_statements s
  left join pg_database d on d.oid = s.dbid
  left join pg_roles r on r.oid = s.userid
 where {where}
 order by {order} desc
 limit %s
"""

Q_SESSIONS = """
select pid, usename, datname, application_name, state, wait_event_type, wait_event,
       extract(epoch from now() - coalesce(query_start, backend_start))::float8, query_id::text,
       left(query, 300)
  from pg_stat_activity
 where backend_type = 'client backend' and pid <> pg_backend_pid() and state is not null and state <> 'idle'
 order by query_start nulls last
 limit %s
"""


async def _snapshot(store: Store, name: str) -> Snapshot:
    raw: dict[str, bytes] = {}
    for prefix in (f"{keys.databases()}{name}/", keys.members(name), keys.member_statuses(name),
                   keys.patroni_scope(name), keys.hosts(), keys.secrets(name)):
        raw.update(await store.get_prefix(prefix))
    return Snapshot(raw)


async def _statements(conn: psycopg.AsyncConnection, order: str, limit: int, slow_ms: float | None) -> list:
    where = "true" if slow_ms is None else "s.mean_exec_time >= %s"
    sql = Q_STATEMENTS.format(where=where, order=ORDER[order])
    params = (limit,) if slow_ms is None else (slow_ms, limit)
    return await (await conn.execute(sql, params)).fetchall()


async def read_primary(address: str, port: int, password: str, name: str, order: str, limit: int) -> dict:
    """Statements (by `order`), the slow ones, sessions and the notice about pg_stat_statements."""
    out: dict = {"statements": [], "slow_statements": [], "sessions": [], "statements_notice": None}
    async with await psycopg.AsyncConnection.connect(host=address, port=port, user="postgres",
                                                     password=password, dbname="postgres", **CONNECT) as conn:
        state = (await (await conn.execute(Q_STATE)).fetchone())
        installed, preloaded, log_min = state
        out["slow_threshold_ms"] = insights.slow_threshold_ms(log_min)
        out["log_min_duration_statement_ms"] = float(log_min) if log_min not in (None, "") else None
        out["sessions"] = [
            {"pid": r[0], "user": r[1], "dbname": r[2], "application": r[3], "state": r[4],
             "wait_event_type": r[5], "wait_event": r[6], "duration_s": round(r[7] or 0.0, 3),
             "queryid": r[8], "query": pglog.short(r[9] or "", 200)}
            for r in await (await conn.execute(Q_SESSIONS, (MAX_SESSIONS,))).fetchall()]
        if not installed or not preloaded:
            out["statements_notice"] = insights.enable_hint(name, bool(preloaded))
            return out
        try:
            out["statements"] = await _statements(conn, order, limit, None)
            out["slow_statements"] = await _statements(conn, "mean", limit, out["slow_threshold_ms"])
        except psycopg.errors.ObjectNotInPrerequisiteState:      # installed but not preloaded
            out["statements_notice"] = insights.enable_hint(name, False)
    return out


async def _slow_logs(store: Store, root: Path | None, views, notes: list[str]) -> list[dict]:
    """The newest `duration:` lines of every member's log, read by its host's collector, every
    member at once; a note for each log that could not be read."""
    logs = await remote.member_logs(store, root, [(v.name, v.host) for v in views], LOG_TAIL_BYTES)
    notes += [got.note for got in logs if got.error]
    found = await asyncio.to_thread(lambda: [line for got in logs if not got.error
                                             for line in insights.slow_log(got.text, got.member)])
    found.sort(key=lambda r: r["time"] or 0, reverse=True)
    return found[:insights.MAX_LOG_LINES]


async def database_insights(store: Store, root: Path | None, name: str, since: float, until: float,
                            order: str = "total", limit: int = 10) -> dict:
    snap = await _snapshot(store, name)
    views = [v for v in member_views(snap, name) if v.state not in ("deleting", "pending")]
    primary = next((v for v in views if v.role == "primary"), None)
    step = None if until - since <= 3600 else max(60.0, round((until - since) / 360 / 60) * 60)
    match = {"database": name}
    notes: list[str] = []
    (waits, failed1), (queries, failed2), slow_log = await asyncio.gather(
        remote.history(store, root, "dbplane_pg_load_sessions", match, since, until, step),
        remote.history(store, root, "dbplane_pg_load_by_query_sessions", match, since, until, step),
        _slow_logs(store, root, views, notes))
    load = insights.load_summary(waits, queries)
    read: dict = {"statements": [], "slow_statements": [], "sessions": [], "statements_notice": None,
                  "slow_threshold_ms": insights.SLOW_DEFAULT_MS, "log_min_duration_statement_ms": None}
    raw = snap.raw.get(keys.secrets(name))
    if primary is None:
        read["statements_notice"] = (f"{name} has no running primary: "
                                     "statements and sessions are not available")
    elif raw is None:
        read["statements_notice"] = f"{name} has no secrets yet: statements and sessions are not available"
    else:
        try:
            secrets = await db_secrets.open_raw(store, keys.secrets(name), raw)
            read.update(await asyncio.wait_for(
                read_primary(primary.address, primary.port, secrets.superuser, name, order, limit),
                PRIMARY_TIMEOUT))
        except (psycopg.Error, OSError, TimeoutError, DbplaneError) as e:
            text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            read["statements_notice"] = (f"the primary {primary.name} did not answer ({text}): "
                                         "statements and sessions are not available")
    total = load["average_active_sessions"]
    statements = insights.statement_rows(read["statements"], load["by_query"], total)
    slow = insights.statement_rows(read["slow_statements"], load["by_query"], total)
    return {"database": name, "since": since, "until": until, "now": time.time(),
            "point_seconds": step or FLUSH_SECONDS,     # what one load timeline point averages
            "primary": primary.name if primary else None, "order": order,
            "load": {k: v for k, v in load.items() if k != "by_query"},
            "load_by_type": insights.by_wait_type(load["by_wait"]),
            "statements": statements, "statements_notice": read["statements_notice"],
            "slow_queries": {"threshold_ms": read["slow_threshold_ms"],
                             "log_min_duration_statement_ms": read["log_min_duration_statement_ms"],
                             "statements": slow, "log": slow_log},
            "sessions": read["sessions"], "notes": notes,
            "unavailable_hosts": sorted(set(failed1) | set(failed2))}
