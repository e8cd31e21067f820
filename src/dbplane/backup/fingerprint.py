"""A backup's fingerprint: the row count of every user table, taken right after the
backup at a WAL position a restore drill can stop at, so that the drill can check it got
exactly the same rows back.

On a standby the count is exact: WAL replay is paused, the counts see exactly what was
replayed up to the position recorded, then replay resumes (the primary does not wait: a
synchronous standby still receives and flushes WAL while replay is paused). Patroni
resumes a paused replay within one of its cycles (2 s), so a count that outlasts that is
marked inexact (replay moved past the recorded position). On a primary
(no standby) writes go on while counting, so the fingerprint is marked inexact and a
drill only reports differences."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import psycopg

from ..security.tls import node_libpq_options

log = logging.getLogger("dbplane.backup.fingerprint")

MAX_DATABASES = 20
MAX_TABLES = 200
COUNT_TIMEOUT_MS = 10_000        # a table that takes longer to count is left out


@dataclass
class Fingerprint:
    counts: dict[str, int] = field(default_factory=dict)    # "db.schema.table" -> rows
    lsn: str = ""
    exact: bool = False


TABLES = """select quote_ident(n.nspname) || '.' || quote_ident(c.relname)
            from pg_class c join pg_namespace n on n.oid = c.relnamespace
            where c.relkind in ('r', 'p') and not c.relispartition
              and n.nspname not in ('pg_catalog', 'information_schema')
              and n.nspname not like 'pg_toast%%' and n.nspname not like 'pg_temp%%'
            order by 1 limit %s"""


async def connect(address: str, port: int, password: str,
                  dbname: str = "postgres") -> psycopg.AsyncConnection:
    """The database's superuser (its password comes from etcd and stays in memory)."""
    return await psycopg.AsyncConnection.connect(
        host=address, port=port, user="postgres", password=password, dbname=dbname,
        autocommit=True, connect_timeout=5, application_name="dbplane-backup", **node_libpq_options())


async def take(address: str, port: int, password: str, on_standby: bool) -> Fingerprint:
    fp = Fingerprint(exact=on_standby)
    async with await connect(address, port, password) as conn:
        if on_standby:
            await conn.execute("select pg_wal_replay_pause()")
        try:
            if on_standby:
                for _ in range(100):
                    state = await (await conn.execute("select pg_get_wal_replay_pause_state()")).fetchone()
                    if state[0] == "paused":
                        break
                    await asyncio.sleep(0.05)
                else:
                    fp.exact = False
                row = await (await conn.execute("select pg_last_wal_replay_lsn()::text")).fetchone()
            else:
                row = await (await conn.execute("select pg_current_wal_lsn()::text")).fetchone()
            fp.lsn = row[0]
            dbs = await (await conn.execute(
                "select datname from pg_database where datallowconn and not datistemplate "
                "order by 1 limit %s", (MAX_DATABASES,))).fetchall()
            for (db,) in dbs:
                await count_database(address, port, password, db, fp)
            if on_standby and fp.exact:
                # Patroni resumes a paused replay on PostgreSQL 14+ within one of its cycles:
                # the counts are exact only if replay did not move while they ran
                now = (await (await conn.execute("select pg_last_wal_replay_lsn()::text")).fetchone())[0]
                if now != fp.lsn:
                    log.info("replay moved from %s to %s while counting (resumed by Patroni): "
                             "the fingerprint is inexact", fp.lsn, now)
                    fp.exact = False
        finally:
            if on_standby:
                await conn.execute("select pg_wal_replay_resume()")
    return fp


async def count_database(address: str, port: int, password: str, db: str, fp: Fingerprint) -> None:
    async with await connect(address, port, password, db) as conn:
        await conn.execute(f"set statement_timeout = {COUNT_TIMEOUT_MS}")
        tables = await (await conn.execute(TABLES, (MAX_TABLES,))).fetchall()
        for (table,) in tables:
            try:
                n = (await (await conn.execute(f"select count(*) from {table}")).fetchone())[0]
            except psycopg.errors.QueryCanceled:
                log.info("counting %s.%s took too long: left out of the fingerprint", db, table)
                continue
            fp.counts[f"{db}.{table}"] = n


async def count_all(address: str, port: int, password: str, names: list[str]) -> dict[str, int]:
    """Row counts of the tables a fingerprint names, on a restored database."""
    out: dict[str, int] = {}
    by_db: dict[str, list[str]] = {}
    for name in names:
        db, _, table = name.partition(".")
        by_db.setdefault(db, []).append(table)
    for db, tables in by_db.items():
        async with await connect(address, port, password, db) as conn:
            for table in tables:
                try:
                    out[f"{db}.{table}"] = (await (await conn.execute(
                        f"select count(*) from {table}")).fetchone())[0]
                except psycopg.Error as e:
                    log.info("counting %s.%s on the restored database: %s", db, table, e)
    return out
