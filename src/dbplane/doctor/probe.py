"""Reading a PostgreSQL server for the database doctor: settings, sessions, replication,
databases, tables, pg_stat_statements and EXPLAIN plans, into facts.py's values. Every
query is in sql.py; every connection is read-only in effect (catalog reads, EXPLAIN without
ANALYZE in a READ ONLY transaction) and bounded by statement_timeout."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

import psycopg
from psycopg import sql as pgsql

from . import sql
from .explain import seq_scans
from .facts import (
    DatabaseStat,
    NodeFacts,
    ReplayState,
    ScanInfo,
    Session,
    StandbyRow,
    Statement,
    TableStat,
    Workload,
)

APPLICATION = "dbplane-doctor"
CONNECT_OPTIONS = {"connect_timeout": 5, "autocommit": True, "application_name": APPLICATION,
                   "options": "-c statement_timeout=5000 -c lock_timeout=1000"}
MAX_DATABASES = 8                 # databases of one server whose tables are looked at
MAX_STATEMENTS = 10               # slowest statements read from pg_stat_statements
MAX_EXPLAINS = 5                  # of which at most this many are EXPLAINed
MIN_MEAN_MS = 1.0                 # statements faster than this are not candidates
EXPLAINABLE = ("select", "with", "update", "delete", "insert", "merge", "table", "values")

Connect = Callable[[str], Awaitable[psycopg.AsyncConnection]]   # dbname -> a new connection


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


async def _rows(conn: psycopg.AsyncConnection, query, params=None) -> list[tuple]:
    return await (await conn.execute(query, params)).fetchall()


async def node_facts(conn: psycopg.AsyncConnection, name: str, address: str) -> NodeFacts:
    node = NodeFacts(name=name, address=address)
    node.settings = {n: v for n, v, _unit in await _rows(conn, sql.SETTINGS, (sql.SETTING_NAMES,))}
    node.primary = not (await _rows(conn, sql.IN_RECOVERY))[0][0]
    node.sessions = [Session(pid=r[0], user=r[1], datname=r[2], application=r[3], client=r[4], state=r[5],
                             backend_type=r[6], xact_age=r[7], query_age=r[8], state_age=r[9],
                             wait_event_type=r[10], wait_event=r[11], query=r[12],
                             blocked_by=list(r[13] or []))
                     for r in await _rows(conn, sql.ACTIVITY)]
    if node.primary:
        node.current_lsn = (await _rows(conn, sql.CURRENT_LSN))[0][0]
        node.replication = [StandbyRow(*r) for r in await _rows(conn, sql.REPLICATION)]
    else:
        r = (await _rows(conn, sql.STANDBY))[0]
        node.replay = ReplayState(receive_lsn=r[0], replay_lsn=r[1], replay_age=r[2], pause_state=r[3],
                                  receiver_status=r[4] or "", last_msg_age=r[5], sender=r[6] or "")
        await _replay_lock_holders(conn, node)
    node.databases = [DatabaseStat(name=r[0], deadlocks=r[1], backends=r[2], size_bytes=r[3],
                                   connectable=r[4]) for r in await _rows(conn, sql.DATABASES)]
    return node


async def _replay_lock_holders(conn: psycopg.AsyncConnection, node: NodeFacts) -> None:
    """pg_blocking_pids may not name the holders of a lock the startup process waits for
    in recovery; pg_locks does."""
    startup = next((s for s in node.sessions if s.backend_type == "startup"), None)
    if startup is None or startup.blocked_by:
        return
    startup.blocked_by = [pid for (pid,) in await _rows(conn, sql.REPLAY_LOCK_HOLDERS, (startup.pid,))]


async def workload(node: NodeFacts, main: psycopg.AsyncConnection, main_db: str,
                   connect: Connect) -> Workload:
    """Tables of each database (at most MAX_DATABASES) and the slowest statements with the
    sequential scans of their plans."""
    w = Workload(statements_loaded="pg_stat_statements" in node.setting("shared_preload_libraries"))
    names = [d.name for d in node.databases if d.connectable]
    names = ([main_db] if main_db in names else []) + [n for n in names if n != main_db]
    if len(names) > MAX_DATABASES:
        w.notes.append(f"tables of {len(names) - MAX_DATABASES} more databases not looked at")
    conns: dict[str, psycopg.AsyncConnection] = {}
    try:
        ext_db, ext_schema = None, None
        for name in names[:MAX_DATABASES]:
            try:
                conn = main if name == main_db else await connect(name)
            except (psycopg.Error, OSError) as e:
                w.notes.append(f"database {name}: {first_line(e)}")
                continue
            conns[name] = conn
            try:
                w.tables += [TableStat(name, *r) for r in await _rows(conn, sql.TABLES)]
                ext = await _rows(conn, sql.STATEMENTS_EXTENSION)
            except psycopg.Error as e:
                w.notes.append(f"database {name}: {first_line(e)}")
                continue
            if ext and ext_db is None:
                ext_db, ext_schema = name, ext[0][0]
        w.statements_installed = ext_db is not None
        if w.statements_loaded and ext_db is not None:
            await _statements(w, conns, ext_db, ext_schema, node.int_setting("server_version_num"))
    finally:
        for conn in conns.values():
            if conn is not main:
                await conn.close()
    return w


async def _statements(w: Workload, conns: dict[str, psycopg.AsyncConnection], ext_db: str, schema: str,
                      version: int) -> None:
    query = pgsql.SQL(sql.TOP_STATEMENTS.replace("{schema}", "{}")).format(pgsql.Identifier(schema))
    try:
        rows = await _rows(conns[ext_db], query, (MIN_MEAN_MS, MAX_STATEMENTS))
    except psycopg.Error as e:
        w.notes.append(f"pg_stat_statements: {first_line(e)}")
        return
    explained = 0
    for datname, user, calls, mean, total, nrows, text in rows:
        st = Statement(datname=datname, user=user, calls=calls, mean_ms=mean, total_ms=total, rows=nrows,
                       query=text or "")
        w.statements.append(st)
        words = st.query.lstrip("( \n\t").split(None, 1)
        if explained >= MAX_EXPLAINS or not words or words[0].lower() not in EXPLAINABLE:
            continue
        conn = conns.get(datname)
        if conn is None:
            continue
        if not st.user:
            st.explain_error = "its role no longer exists: not planned"
            continue
        if version < 160000 and "$" in st.query:
            st.explain_error = "EXPLAIN (GENERIC_PLAN) needs PostgreSQL 16 or newer"
            continue
        explained += 1
        await _explain(conn, st, version)


async def _explain(conn: psycopg.AsyncConnection, st: Statement, version: int) -> None:
    prefix = sql.EXPLAIN_GENERIC if version >= 160000 else sql.EXPLAIN_PLAIN
    try:
        async with conn.transaction(force_rollback=True):
            for setup in sql.EXPLAIN_SETUP:
                await conn.execute(setup)
            # planning evaluates immutable and stable functions with constant arguments: as
            # the statement's own user, never with the doctor's superuser rights
            await conn.execute(pgsql.SQL("SET LOCAL ROLE {}").format(pgsql.Identifier(st.user)))
            plan = (await _rows(conn, prefix + st.query))[0][0]
            if isinstance(plan, str):
                plan = json.loads(plan)
            for scan in seq_scans(plan[0]["Plan"]):
                rel = await _rows(conn, sql.RELATION, (scan.schema, scan.table))
                if rel:
                    st.scans.append(ScanInfo(scan=scan, reltuples=rel[0][0], columns=list(rel[0][1]),
                                             leading_indexed=list(rel[0][2])))
    except psycopg.Error as e:
        st.explain_error = first_line(e)


async def log_tail(conn: psycopg.AsyncConnection, max_bytes: int) -> tuple[str, str]:
    """The end of the server's own log file through SQL (URL mode): (text, note). Only
    when it writes a log file (logging_collector) and this user may read it."""
    try:
        (path,) = (await _rows(conn, sql.CURRENT_LOGFILE))[0]
        if not path:
            return "", "the server logs to stderr, not to a file the doctor can read over SQL"
        (text,) = (await _rows(conn, sql.READ_LOG_TAIL, (path, path, max_bytes, max_bytes)))[0]
        return text or "", ""
    except psycopg.Error as e:
        return "", f"its log is not readable over SQL ({first_line(e)})"
