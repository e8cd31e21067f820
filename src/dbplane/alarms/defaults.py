"""The alarms every database gets for the classic failures (docs/observability.md#alarms).

They are ordinary alarms named `<database>-<kind>` with `default: true`: the user may edit
or delete them. The controller makes each one once the database is available and the
default applies (replication alarms need a standby or replicas, backup alarms automated
backups); one the user deleted is recorded under `alarm-deleted/` and not made again.
"""

from __future__ import annotations

from ..models import DatabaseSpec
from .model import STORAGE_QUOTA, AlarmSpec


def _backup_interval_s(spec: DatabaseSpec) -> float:
    b = spec.backup
    hours = b.incremental_every_hours if b.incremental_every_hours > 0 else b.full_every_hours
    return hours * 3600


def defaults_for(spec: DatabaseSpec) -> list[AlarmSpec]:
    """The default alarms that apply to the database as it is now specified."""
    db = spec.name

    def alarm(kind: str, description: str, **fields) -> AlarmSpec:
        return AlarmSpec(name=f"{db}-{kind}", database=db, description=description, default=True, **fields)

    out = [
        alarm("connections", "connections above 80% of max_connections",
              metric="dbplane_pg_connections", denominator="dbplane_pg_max_connections",
              statistic="max", comparison=">", threshold=0.8, period=60, evaluation_periods=1),
        alarm("pool-waiting", "clients waiting for a server connection in the proxy for 1 minute",
              metric="dbplane_proxy_clients_waiting", statistic="min", comparison=">", threshold=0,
              period=60, evaluation_periods=1, treat_missing="notBreaching"),
        alarm("deadlocks", "deadlocks detected",
              metric="dbplane_pg_deadlocks_total", statistic="max", comparison=">", threshold=0,
              period=60, evaluation_periods=1),
        alarm("storage", "storage above 85% of the quota",
              metric="dbplane_pg_database_size_bytes", denominator=STORAGE_QUOTA, statistic="max",
              comparison=">", threshold=0.85, period=300, evaluation_periods=1),
        alarm("cpu", "CPU above 90% of one core for 5 minutes",
              metric="dbplane_member_cpu_seconds_total", statistic="avg", comparison=">", threshold=0.9,
              period=60, evaluation_periods=5),
    ]
    if spec.multi_az or spec.replicas:
        out.append(alarm("replication-lag", "replication lag above 30 s",
                         metric="dbplane_pg_replication_lag_seconds", statistic="avg", comparison=">",
                         threshold=30, period=60, evaluation_periods=1, treat_missing="notBreaching"))
    if spec.multi_az:
        out.append(alarm("replication-broken", "the standby is not streaming (no lag series) or is 5 "
                         "minutes behind", metric="dbplane_pg_replication_lag_seconds",
                         labels={"role": "standby"}, statistic="min", comparison=">", threshold=300,
                         period=60, evaluation_periods=2, treat_missing="breaching"))
    if spec.backup.enabled:
        interval = _backup_interval_s(spec)
        out.append(alarm("backup-age", f"no good backup within 1.5 x the expected interval "
                         f"({interval / 3600:g} h)", metric="dbplane_backup_last_success_age_seconds",
                         statistic="min", comparison=">", threshold=round(interval * 1.5), period=300,
                         evaluation_periods=1))
        out.append(alarm("archive", "WAL archiving failing: the oldest WAL not archived is over 5 minutes "
                         "old", metric="dbplane_archive_lag_seconds", statistic="min", comparison=">",
                         threshold=max(300.0, 10 * spec.backup.archive_timeout), period=60,
                         evaluation_periods=2))
    return out
