"""The metric catalogue: every metric dbplane exports, declared once.

Names, types, help and label names here are a public interface (Prometheus scrapes, Grafana
dashboards, alarms and the history store all refer to them), so a rename is a breaking
change. They follow Prometheus' conventions: the `dbplane_` prefix, base units in the name
(`_seconds`, `_bytes`, `_ratio`), `_total` on counters and only on counters. The reference
in docs/observability.md is generated from this module (`python -m dbplane.metrics
--update-docs docs/observability.md`) and a unit test fails when the two drift.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

# Label sets. `database` is the dbplane database (not a PostgreSQL datname); `member` one of
# its PostgreSQL instances; `role` is primary, standby or replica *at the time of the
# sample*, so a failover starts new series (as every Postgres exporter does).
MEMBER = ("database", "member", "role", "zone")
HOST = ("host", "zone")
PROXY = ("database", "host", "zone")
DATABASE = ("database",)

# Every label name a metric may use, with what it means (for the reference).
LABELS = {
    "database": "the dbplane database",
    "member": "the database member (one PostgreSQL instance)",
    "role": "the member's role when sampled: primary, standby or replica",
    "zone": "the availability zone of the member's or host's agent",
    "host": "the agent's host name",
    "state": "client backend state: active, idle, idle_in_transaction, idle_in_transaction_aborted, "
             "fastpath, disabled",
    "device": "block device name as the kernel names it (e.g. vda)",
    "target": "what the collector scraped: a member's name, or host, proxy or backup",
    "wait_event_type": "pg_stat_activity.wait_event_type of active sessions; CPU when not waiting, other for "
                       "the rest beyond the top 8",
    "wait_event": "pg_stat_activity.wait_event (e.g. transactionid, DataFileRead); CPU when not waiting",
    "queryid": "pg_stat_activity.query_id, the pg_stat_statements queryid; other beyond the top 10, "
               "unknown when not computed",
}

UNITS = ("seconds", "bytes", "ratio")

MetricType = Literal["gauge", "counter"]


@dataclass(frozen=True)
class Metric:
    name: str
    type: MetricType
    help: str
    labels: tuple[str, ...]
    source: str          # where the collector reads it: the reference tells users what it means

    @property
    def unit(self) -> str:
        """The base unit the name ends with (before `_total`), or '' for plain counts."""
        stem = self.name.removesuffix("_total")
        return next((u for u in UNITS if stem.endswith("_" + u)), "")


@dataclass(frozen=True)
class Sample:
    """One value of one series at one time (Unix seconds)."""
    name: str
    labels: Mapping[str, str]
    value: float
    timestamp: float


def canonical_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """Labels sorted by name, without empty values: Prometheus treats `l=""` as no label, so
    both spellings must be the same series in the history store and the exposition."""
    return {k: str(v) for k, v in sorted(labels.items()) if v != ""}


def _g(name: str, help: str, labels: tuple[str, ...], source: str) -> Metric:
    return Metric(name, "gauge", help, labels, source)


def _c(name: str, help: str, labels: tuple[str, ...], source: str) -> Metric:
    return Metric(name, "counter", help, labels, source)


_SUMMED = "summed over the member's PostgreSQL databases"
_STATE = (*MEMBER, "state")
_DEVICE = (*HOST, "device")

METRICS: tuple[Metric, ...] = (
    # -- availability and the collector itself
    _g("dbplane_member_up", "1 if the collector reached the member's PostgreSQL in this scrape, else 0.",
       MEMBER, "collector"),
    _g("dbplane_collector_up", "1 if the host's collector answered the platform scrape, else 0.", HOST,
       "the API's GET /metrics"),
    _g("dbplane_collector_scrape_duration_seconds",
       "How long the collector's last scrape of the target took.", (*HOST, "target"), "collector"),
    # -- pg_stat_database
    _c("dbplane_pg_xact_commit_total", "Transactions committed.", MEMBER,
       f"pg_stat_database.xact_commit, {_SUMMED}"),
    _c("dbplane_pg_xact_rollback_total", "Transactions rolled back.", MEMBER,
       f"pg_stat_database.xact_rollback, {_SUMMED}"),
    _c("dbplane_pg_blocks_read_total", "Data blocks read from the file system (not found in shared buffers).",
       MEMBER, f"pg_stat_database.blks_read, {_SUMMED}"),
    _c("dbplane_pg_blocks_hit_total", "Data blocks found in shared buffers.", MEMBER,
       f"pg_stat_database.blks_hit, {_SUMMED}"),
    _c("dbplane_pg_tuples_returned_total", "Rows read by sequential scans and index entries returned.",
       MEMBER, f"pg_stat_database.tup_returned, {_SUMMED}"),
    _c("dbplane_pg_tuples_fetched_total", "Live rows fetched by index scans.", MEMBER,
       f"pg_stat_database.tup_fetched, {_SUMMED}"),
    _c("dbplane_pg_tuples_inserted_total", "Rows inserted.", MEMBER,
       f"pg_stat_database.tup_inserted, {_SUMMED}"),
    _c("dbplane_pg_tuples_updated_total", "Rows updated.", MEMBER,
       f"pg_stat_database.tup_updated, {_SUMMED}"),
    _c("dbplane_pg_tuples_deleted_total", "Rows deleted.", MEMBER,
       f"pg_stat_database.tup_deleted, {_SUMMED}"),
    _c("dbplane_pg_deadlocks_total", "Deadlocks detected (one transaction of each was cancelled).", MEMBER,
       f"pg_stat_database.deadlocks, {_SUMMED}"),
    _c("dbplane_pg_temp_files_total", "Temporary files created by queries (sorts, hashes beyond work_mem).",
       MEMBER, f"pg_stat_database.temp_files, {_SUMMED}"),
    _c("dbplane_pg_temp_bytes_total", "Bytes written to temporary files by queries.", MEMBER,
       f"pg_stat_database.temp_bytes, {_SUMMED}"),
    _c("dbplane_pg_conflicts_total", "Queries cancelled on a standby or replica by conflicts with recovery.",
       MEMBER, f"pg_stat_database.conflicts, {_SUMMED}"),
    # -- connections (pg_stat_activity)
    _g("dbplane_pg_connections", "Client backends by state.", _STATE,
       "pg_stat_activity where backend_type = 'client backend' (not the collector's own), counted by state"),
    _g("dbplane_pg_max_connections", "The max_connections setting.", MEMBER, "pg_settings.max_connections"),
    _g("dbplane_pg_longest_transaction_seconds", "Age of the oldest open transaction (0 when none).", MEMBER,
       "pg_stat_activity: now() - min(xact_start) of client backends"),
    _g("dbplane_pg_locks_waiting", "Lock requests waiting to be granted.", MEMBER,
       "pg_locks where not granted"),
    # -- database load (performance insights): pg_stat_activity sampled every second
    _g("dbplane_pg_load_sessions",
       "Average active sessions per wait event over the last 10 s (the database load).",
       (*MEMBER, "wait_event_type", "wait_event"),
       "pg_stat_activity sampled every second: active client sessions by wait_event_type and wait_event"),
    _g("dbplane_pg_load_by_query_sessions", "Average active sessions per query id over the last 10 s.",
       (*MEMBER, "queryid"), "pg_stat_activity sampled every second: active client sessions by query_id"),
    # -- replication: one series per replica (the member label names the replica)
    _g("dbplane_pg_replication_lag_bytes",
       "WAL the replica has received but not replayed, or not received yet.", MEMBER,
       "pg_stat_replication on the primary: pg_current_wal_lsn() - replay_lsn"),
    _g("dbplane_pg_replication_lag_seconds", "How far the replica's replay is behind the primary in time.",
       MEMBER, "pg_stat_replication.replay_lag on the primary (0 when caught up and idle)"),
    # -- WAL (pg_stat_wal) and checkpoints (pg_stat_checkpointer)
    _c("dbplane_pg_wal_bytes_total", "WAL generated.", MEMBER, "pg_stat_wal.wal_bytes"),
    _c("dbplane_pg_wal_records_total", "WAL records generated.", MEMBER, "pg_stat_wal.wal_records"),
    _c("dbplane_pg_wal_buffers_full_total", "Times WAL was written because the WAL buffers were full.",
       MEMBER, "pg_stat_wal.wal_buffers_full"),
    _c("dbplane_pg_checkpoints_timed_total", "Checkpoints started because checkpoint_timeout passed.", MEMBER,
       "pg_stat_checkpointer.num_timed"),
    _c("dbplane_pg_checkpoints_requested_total",
       "Checkpoints requested (max_wal_size reached, CHECKPOINT, backups).", MEMBER,
       "pg_stat_checkpointer.num_requested"),
    _c("dbplane_pg_checkpoint_write_seconds_total", "Time checkpoints spent writing buffers.", MEMBER,
       "pg_stat_checkpointer.write_time / 1000"),
    _c("dbplane_pg_checkpoint_sync_seconds_total", "Time checkpoints spent syncing files to disk.", MEMBER,
       "pg_stat_checkpointer.sync_time / 1000"),
    _c("dbplane_pg_checkpoint_buffers_written_total", "Buffers written by checkpoints.", MEMBER,
       "pg_stat_checkpointer.buffers_written"),
    # -- size and pg_stat_statements
    _g("dbplane_pg_database_size_bytes", "Size on disk of the member's PostgreSQL databases.", MEMBER,
       "sum of pg_database_size() over the member's databases"),
    _g("dbplane_pg_statements_enabled", "1 if pg_stat_statements is installed and readable, else 0.", MEMBER,
       "pg_extension"),
    _c("dbplane_pg_statements_calls_total", "Statement executions tracked by pg_stat_statements.", MEMBER,
       "sum of pg_stat_statements.calls"),
    _c("dbplane_pg_statements_exec_seconds_total", "Time spent executing statements.", MEMBER,
       "sum of pg_stat_statements.total_exec_time / 1000"),
    _c("dbplane_pg_statements_rows_total", "Rows returned or affected by statements.", MEMBER,
       "sum of pg_stat_statements.rows"),
    # -- the member's processes (psutil)
    _c("dbplane_member_cpu_seconds_total",
       "CPU time (user + system) used by the member's PostgreSQL processes.", MEMBER,
       "psutil: the postmaster's CPU times, its reaped children's and its live children's"),
    _g("dbplane_member_resident_memory_bytes", "Resident memory of the member's PostgreSQL processes.",
       MEMBER, "psutil: sum of RSS over the postmaster and its children "
               "(shared buffers count in each process that touched them)"),
    # -- the host (psutil)
    _g("dbplane_host_cpu_usage_ratio", "Share of the host's CPU time spent busy since the last scrape (0-1).",
       HOST, "psutil.cpu_percent() / 100"),
    _g("dbplane_host_memory_total_bytes", "Physical memory of the host.", HOST,
       "psutil.virtual_memory().total"),
    _g("dbplane_host_memory_available_bytes", "Memory available to new processes without swapping.", HOST,
       "psutil.virtual_memory().available"),
    _g("dbplane_host_disk_total_bytes", "Size of the file system holding the data root.", HOST,
       "psutil.disk_usage(data root).total"),
    _g("dbplane_host_disk_free_bytes", "Free space on the file system holding the data root.", HOST,
       "psutil.disk_usage(data root).free"),
    _c("dbplane_host_disk_read_bytes_total", "Bytes read from the block device.", _DEVICE,
       "psutil.disk_io_counters(perdisk=True).read_bytes"),
    _c("dbplane_host_disk_written_bytes_total", "Bytes written to the block device.", _DEVICE,
       "psutil.disk_io_counters(perdisk=True).write_bytes"),
    _c("dbplane_host_disk_reads_total", "Read requests completed by the block device.", _DEVICE,
       "psutil.disk_io_counters(perdisk=True).read_count"),
    _c("dbplane_host_disk_writes_total", "Write requests completed by the block device.", _DEVICE,
       "psutil.disk_io_counters(perdisk=True).write_count"),
    _c("dbplane_host_disk_io_seconds_total", "Time the block device was busy with I/O.", _DEVICE,
       "psutil.disk_io_counters(perdisk=True).busy_time / 1000"),
    # -- the connection proxy, summed over the database's pools in one proxy
    _g("dbplane_proxy_clients_active", "Clients attached to a server connection.", PROXY, "pool cl_active"),
    _g("dbplane_proxy_clients_waiting", "Clients queued for a server connection.", PROXY, "pool cl_waiting"),
    _g("dbplane_proxy_clients_idle", "Clients connected but not in a transaction.", PROXY, "pool cl_idle"),
    _g("dbplane_proxy_servers_active", "Server connections lent to a client.", PROXY, "pool sv_active"),
    _g("dbplane_proxy_servers_idle", "Server connections open and idle in the pool.", PROXY, "pool sv_idle"),
    _c("dbplane_proxy_transactions_total", "Transactions relayed.", PROXY, "pool xact_total"),
    _c("dbplane_proxy_queries_total", "Queries relayed.", PROXY, "pool query_total"),
    _c("dbplane_proxy_wait_seconds_total", "Time clients spent queued for a server connection.", PROXY,
       "pool wait_total_s"),
    _c("dbplane_proxy_errors_total", "Errors the proxy itself sent to clients (pool exhausted, failover...).",
       PROXY, "pool errors"),
    # -- backups and the WAL archive
    _g("dbplane_backup_last_success_age_seconds",
       "Time since the newest usable base backup finished (complete, not found damaged).", DATABASE,
       "the backup catalog in etcd: the newest usable backup's finished_at, from the primary's host"),
    _g("dbplane_archive_lag_bytes", "WAL written on the primary but not yet in the archive.", DATABASE,
       "ArchiveStatus.lag_bytes in etcd: the archiver's position against the primary's WAL end"),
    _g("dbplane_archive_lag_seconds", "Age of the oldest WAL not yet in the archive (0 when caught up).",
       DATABASE, "ArchiveStatus.lag_seconds in etcd, as the archiver published it"),
)

BY_NAME: dict[str, Metric] = {m.name: m for m in METRICS}


def get(name: str) -> Metric:
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown metric {name!r}: it is not in dbplane.metrics.catalog") from None


def validate(sample: Sample) -> Metric:
    """The sample's metric. KeyError for a name the catalogue lacks; ValueError for a label
    not declared for the metric, a value that is not a number or a negative counter (collector
    bugs, not user errors)."""
    metric = get(sample.name)
    extra = set(sample.labels) - set(metric.labels)
    if extra:
        raise ValueError(f"{sample.name} has no label {', '.join(sorted(extra))}; declared: {metric.labels}")
    if not isinstance(sample.value, int | float) or isinstance(sample.value, bool):
        raise ValueError(f"{sample.name}: value {sample.value!r} is not a number")
    if metric.type == "counter" and sample.value < 0:
        raise ValueError(f"{sample.name} is a counter and cannot be negative ({sample.value})")
    if math.isnan(sample.timestamp):
        raise ValueError(f"{sample.name}: timestamp is NaN")
    return metric


# -- the reference in docs/observability.md ------------------------------------------------

DOC_BEGIN = "<!-- metrics reference: generated by `python -m dbplane.metrics`, do not edit -->"
DOC_END = "<!-- end of metrics reference -->"


def reference_markdown() -> str:
    lines = ["| metric | type | labels | what | source |", "| --- | --- | --- | --- | --- |"]
    for m in METRICS:
        lines.append(f"| `{m.name}` | {m.type} | {', '.join(m.labels)} | {m.help} | {m.source} |")
    lines += ["", "| label | meaning |", "| --- | --- |"]
    lines += [f"| `{name}` | {meaning} |" for name, meaning in LABELS.items()]
    return "\n".join(lines)


def with_reference(doc: str) -> str:
    """`doc` with the text between the reference markers replaced by the current reference."""
    pattern = re.compile(re.escape(DOC_BEGIN) + r".*?" + re.escape(DOC_END), re.S)
    if not pattern.search(doc):
        raise ValueError("the document has no metrics reference markers")
    block = f"{DOC_BEGIN}\n{reference_markdown()}\n{DOC_END}"
    return pattern.sub(lambda _: block, doc)
