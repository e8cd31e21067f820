"""What the collector reads from one member's PostgreSQL, and how the rows become samples.

`read_member` runs a handful of cheap queries on one connection (the collector keeps one
per member); `member_samples` turns what they returned into `Sample`s and is pure, so the
unit tests feed it rows without a server.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import psycopg

from dbplane.metrics.catalog import Sample

log = logging.getLogger("dbplane.metrics")

# pg_stat_activity.state -> the `state` label (Prometheus label values without spaces)
STATES = {"active": "active", "idle": "idle", "idle in transaction": "idle_in_transaction",
          "idle in transaction (aborted)": "idle_in_transaction_aborted",
          "fastpath function call": "fastpath", "disabled": "disabled"}

# pg_stat_database, summed over the instance's databases (not templates), -> metric
DATABASE_COUNTERS = {
    "xact_commit": "dbplane_pg_xact_commit_total", "xact_rollback": "dbplane_pg_xact_rollback_total",
    "blks_read": "dbplane_pg_blocks_read_total", "blks_hit": "dbplane_pg_blocks_hit_total",
    "tup_returned": "dbplane_pg_tuples_returned_total", "tup_fetched": "dbplane_pg_tuples_fetched_total",
    "tup_inserted": "dbplane_pg_tuples_inserted_total", "tup_updated": "dbplane_pg_tuples_updated_total",
    "tup_deleted": "dbplane_pg_tuples_deleted_total", "deadlocks": "dbplane_pg_deadlocks_total",
    "temp_files": "dbplane_pg_temp_files_total", "temp_bytes": "dbplane_pg_temp_bytes_total",
    "conflicts": "dbplane_pg_conflicts_total",
}

WAL_COUNTERS = {"wal_records": "dbplane_pg_wal_records_total", "wal_bytes": "dbplane_pg_wal_bytes_total",
                "wal_buffers_full": "dbplane_pg_wal_buffers_full_total"}

# (name in the result, metric, divisor): pg_stat_checkpointer's times are milliseconds
CHECKPOINT_COUNTERS = (("num_timed", "dbplane_pg_checkpoints_timed_total", 1),
                       ("num_requested", "dbplane_pg_checkpoints_requested_total", 1),
                       ("write_time", "dbplane_pg_checkpoint_write_seconds_total", 1000),
                       ("sync_time", "dbplane_pg_checkpoint_sync_seconds_total", 1000),
                       ("buffers_written", "dbplane_pg_checkpoint_buffers_written_total", 1))

Q_GENERAL = """
select pg_is_in_recovery() as in_recovery,
       current_setting('max_connections')::int as max_connections,
       current_setting('server_version_num')::int as version_num,
       (select count(*) from pg_locks where not granted) as locks_waiting,
       (select coalesce(extract(epoch from now() - min(xact_start)), 0) from pg_stat_activity
         where backend_type = 'client backend' and xact_start is not null
           and pid <> pg_backend_pid()) as longest_xact,
       (select coalesce(sum(pg_database_size(oid)), 0) from pg_database where not datistemplate) as size,
       (select count(*) from pg_extension where extname = 'pg_stat_statements') as statements
"""

Q_DATABASE = ("select " + ", ".join(f"coalesce(sum(d.{c}), 0) as {c}" for c in DATABASE_COUNTERS)
              + " from pg_stat_database d join pg_database b on b.oid = d.datid where not b.datistemplate")

Q_CONNECTIONS = """
select state, count(*) from pg_stat_activity
 where backend_type = 'client backend' and pid <> pg_backend_pid() and state is not null
 group by state
"""

Q_WAL = "select wal_records, wal_bytes, wal_buffers_full from pg_stat_wal"

Q_CHECKPOINTER = ("select num_timed, num_requested, write_time, sync_time, buffers_written "
                  "from pg_stat_checkpointer")
# before PostgreSQL 17 the same counters are in pg_stat_bgwriter
Q_BGWRITER = ("select checkpoints_timed as num_timed, checkpoints_req as num_requested, "
              "checkpoint_write_time as write_time, checkpoint_sync_time as sync_time, "
              "buffers_checkpoint as buffers_written from pg_stat_bgwriter")

# on a primary: one row per WAL sender; application_name is the Patroni member name
Q_REPLICATION = """
select application_name, (pg_current_wal_lsn() - replay_lsn)::bigint as lag_bytes,
       extract(epoch from replay_lag) as lag_seconds
  from pg_stat_replication where replay_lsn is not null
"""

Q_STATEMENTS = ("select coalesce(sum(calls), 0), coalesce(sum(total_exec_time), 0) / 1000, "
                "coalesce(sum(rows), 0) from pg_stat_statements")

QUERIES_PER_READ = 7     # at most, on a primary with pg_stat_statements (for the benchmark)


@dataclass
class PgReading:
    """What one scrape of a member's PostgreSQL returned."""
    general: dict
    database: dict
    connections: dict[str, int]                 # raw pg_stat_activity state -> backends
    wal: dict = field(default_factory=dict)
    checkpoints: dict = field(default_factory=dict)
    replication: list[tuple[str, int, float | None]] = field(default_factory=list)
    statements: tuple[float, float, float] | None = None
    queries: int = 0


async def _one(conn: psycopg.AsyncConnection, sql: str) -> dict:
    cur = await conn.execute(sql)
    row = await cur.fetchone()
    return dict(zip([d.name for d in cur.description], row, strict=True)) if row else {}


async def read_member(conn: psycopg.AsyncConnection) -> PgReading:
    """Run the queries on an open autocommit connection. psycopg errors propagate: the caller
    counts the member as down and drops the connection."""
    general = await _one(conn, Q_GENERAL)
    database = await _one(conn, Q_DATABASE)
    rows = await (await conn.execute(Q_CONNECTIONS)).fetchall()
    reading = PgReading(general=general, database=database, connections={s: n for s, n in rows}, queries=3)
    reading.wal = await _one(conn, Q_WAL)
    reading.checkpoints = await _one(conn, Q_CHECKPOINTER if general["version_num"] >= 170000 else Q_BGWRITER)
    reading.queries += 2
    if not general["in_recovery"]:
        reading.replication = [tuple(r) for r in await (await conn.execute(Q_REPLICATION)).fetchall()]
        reading.queries += 1
    if general["statements"]:
        try:
            reading.statements = tuple(await (await conn.execute(Q_STATEMENTS)).fetchone())
        except psycopg.errors.ObjectNotInPrerequisiteState:     # not in shared_preload_libraries
            reading.statements = None
        reading.queries += 1
    return reading


def role_of(in_recovery: bool, kind: str) -> str:
    """primary, standby (a failover candidate) or replica (a read replica)."""
    if not in_recovery:
        return "primary"
    return "replica" if kind == "replica" else "standby"


def member_samples(reading: PgReading, labels: Mapping[str, str], now: float,
                   replicas: Mapping[str, Mapping[str, str]]) -> list[Sample]:
    """Samples of one member from what its PostgreSQL returned. `labels`: the member's
    (database, member, role, zone); `replicas`: application_name -> labels of the member it
    names, for the replication lag series a primary reports about its replicas."""
    out: list[Sample] = []

    def add(name: str, value, lab: Mapping[str, str] = labels) -> None:
        if value is not None:
            out.append(Sample(name, dict(lab), float(value), now))

    g = reading.general
    add("dbplane_member_up", 1)
    add("dbplane_pg_max_connections", g["max_connections"])
    add("dbplane_pg_locks_waiting", g["locks_waiting"])
    add("dbplane_pg_longest_transaction_seconds", max(float(g["longest_xact"]), 0.0))
    add("dbplane_pg_database_size_bytes", g["size"])
    for column, metric in DATABASE_COUNTERS.items():
        add(metric, reading.database.get(column))
    by_state = dict.fromkeys(STATES.values(), 0)
    for state, count in reading.connections.items():
        label = STATES.get(state)
        if label:                               # an unknown future state is not counted
            by_state[label] += count
    for state, count in by_state.items():
        add("dbplane_pg_connections", count, {**labels, "state": state})
    for column, metric in WAL_COUNTERS.items():
        add(metric, reading.wal.get(column))
    for column, metric, divisor in CHECKPOINT_COUNTERS:
        value = reading.checkpoints.get(column)
        add(metric, None if value is None else float(value) / divisor)
    add("dbplane_pg_statements_enabled", 1 if reading.statements is not None else 0)
    if reading.statements is not None:
        calls, seconds, rows = reading.statements
        add("dbplane_pg_statements_calls_total", calls)
        add("dbplane_pg_statements_exec_seconds_total", seconds)
        add("dbplane_pg_statements_rows_total", rows)
    for app, lag_bytes, lag_seconds in reading.replication:
        replica = replicas.get(app)
        if replica is None:                     # pg_receivewal, pg_basebackup, ...: not a member
            continue
        add("dbplane_pg_replication_lag_bytes", max(int(lag_bytes), 0), replica)
        # replay_lag is NULL once a caught-up replica has nothing more to replay
        if lag_seconds is None and int(lag_bytes) <= 0:
            lag_seconds = 0.0
        add("dbplane_pg_replication_lag_seconds", lag_seconds, replica)
    return out


def down_samples(labels: Mapping[str, str], now: float) -> list[Sample]:
    """A member the collector could not reach: up 0 and nothing else (no stale values)."""
    return [Sample("dbplane_member_up", dict(labels), 0.0, now)]
