"""Samples from dbplane's own services: the proxy's pool statistics (its admin /stats) and
the backup catalog and archive state (etcd records). Pure functions of what was read."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from dbplane.metrics.catalog import Sample
from dbplane.models import ArchiveStatus, BackupRecord

# pool field in the proxy's /stats -> metric (summed over a database's pools)
POOL_FIELDS = {"cl_active": "dbplane_proxy_clients_active", "cl_waiting": "dbplane_proxy_clients_waiting",
               "cl_idle": "dbplane_proxy_clients_idle", "sv_active": "dbplane_proxy_servers_active",
               "sv_idle": "dbplane_proxy_servers_idle", "xact_total": "dbplane_proxy_transactions_total",
               "query_total": "dbplane_proxy_queries_total",
               "wait_total_s": "dbplane_proxy_wait_seconds_total",
               "errors": "dbplane_proxy_errors_total"}


def proxy_samples(stats: Iterable[Mapping], host: str, zone: str, now: float,
                  databases: Iterable[str] = ()) -> list[Sample]:
    """One series per database and metric: the pools of every local proxy process (one per
    worker) summed. `databases`: those to report even without a pool yet (zeros)."""
    sums: dict[str, dict[str, float]] = {db: dict.fromkeys(POOL_FIELDS, 0.0) for db in databases}
    for proxy in stats:
        for pool in proxy.get("pools") or []:
            db = pool.get("database")
            if not db:
                continue
            acc = sums.setdefault(db, dict.fromkeys(POOL_FIELDS, 0.0))
            for f in POOL_FIELDS:
                acc[f] += float(pool.get(f) or 0)
    return [Sample(metric, {"database": db, "host": host, "zone": zone}, acc[f], now)
            for db, acc in sorted(sums.items()) for f, metric in POOL_FIELDS.items()]


def backup_samples(database: str, backups: Iterable[BackupRecord], archive: ArchiveStatus | None,
                   now: float) -> list[Sample]:
    """Age of the newest usable base backup (none without one), and the archive's lag as its
    archiver last published it (none while backups are off)."""
    labels = {"database": database}
    out = []
    finished = [b.finished_at for b in backups if b.usable and b.finished_at]
    if finished:
        age = max(now - max(finished), 0.0)
        out.append(Sample("dbplane_backup_last_success_age_seconds", labels, age, now))
    if archive is not None:
        out.append(Sample("dbplane_archive_lag_bytes", labels, float(max(archive.lag_bytes, 0)), now))
        out.append(Sample("dbplane_archive_lag_seconds", labels, float(max(archive.lag_seconds, 0.0)), now))
    return out
