"""The database doctor's checks that only a platform database has: the proxies' pools and
budget, backups and the WAL archive, the storage quota and the disks under the members
(pure, like database.py)."""

from __future__ import annotations

import time

from ..models import ArchiveStatus, BackupRecord, DatabaseSpec
from . import Finding, ok
from .database import GIB, Target, human_size
from .facts import NodeFacts, PlatformFacts

STORAGE_WARN, STORAGE_CRIT = 0.85, 0.95
DISK_FREE_WARN, DISK_FREE_CRIT = 0.15, 0.05


def proxy_pool(t: Target, node: NodeFacts, p: PlatformFacts) -> list[Finding]:
    """The proxies' budget per node against what the node admits, and clients queueing."""
    out = []
    maximum = node.int_setting("max_connections", 0)
    admits = maximum - node.int_setting("superuser_reserved_connections", 3) - node.int_setting(
        "reserved_connections")
    settings = p.spec.proxy
    if p.limits is not None and maximum:
        proxies = max(p.limits.proxies, p.proxies_running)
        may_open = p.limits.per_proxy * proxies
        evidence = (f"{proxies} proxies x {p.limits.per_proxy} server connections each (budget for "
                    f"max_connections {p.limits.max_connections}); the node runs max_connections {maximum}, "
                    f"{admits} for non-superusers; pool_size {settings.pool_size}, reserve_connections "
                    f"{settings.reserve_connections}")
        if may_open > admits:
            out.append(Finding(
                check="proxy_pool", severity="critical", resource=t.resource,
                summary=f"the proxies may open {may_open} server connections to a node that admits {admits}",
                evidence=evidence,
                fix=f"dbplane proxy modify {t.database} --reserve-connections "
                    f"{settings.reserve_connections + may_open - admits}, or raise max_connections "
                    f"(dbplane db modify {t.database} --param max_connections={may_open + 10} --wait)"))
    waiting = sum(pool.get("cl_waiting") or 0 for pool in p.pools)
    timeouts = sum(pool.get("queue_timeouts") or 0 for pool in p.pools)
    longest = max((pool.get("wait_max_s") or 0 for pool in p.pools), default=0)
    if waiting or timeouts:
        out.append(Finding(
            check="proxy_pool", severity="warning", resource=t.resource,
            summary="clients wait for a server connection in the proxy's queue",
            evidence=f"{waiting} waiting now, {timeouts} gave up after queue_timeout "
                     f"{settings.queue_timeout:g} s, longest wait {longest:.1f} s; "
                     f"pool_size {settings.pool_size}",
            fix=f"shorten transactions, raise the pool (dbplane proxy modify {t.database} --pool-size N, "
                f"within max_connections {maximum}), or raise max_connections"))
    if p.proxy_errors:
        out.append(Finding(check="proxy_pool", severity="info", resource=t.resource,
                           summary="some proxies did not answer for their pool statistics",
                           evidence="; ".join(p.proxy_errors[:3])))
    if not out:
        # a pool_size above the budget is capped by it (the proxies never open more)
        out.append(ok("proxy_pool", t.resource, "the proxies' pools fit within max_connections and no "
                      "client waits", f"{len(p.pools)} pools; pool_size {settings.pool_size}, capped at "
                      f"{p.limits.per_proxy if p.limits else '?'} per proxy and node"))
    return out


def expected_interval_h(spec: DatabaseSpec) -> float:
    b = spec.backup
    if b.incremental_every_hours > 0:
        return min(b.incremental_every_hours, b.full_every_hours)
    return b.full_every_hours + (24.0 if b.window else 0.0)


def backups(t: Target, spec: DatabaseSpec, records: list[BackupRecord], archive: ArchiveStatus | None,
            now: float | None = None) -> list[Finding]:
    now = now or time.time()
    if not spec.backup.enabled:
        return [Finding(check="backups", severity="info", resource=t.resource,
                        summary="automated backups and the WAL archive are off: no point-in-time restore",
                        evidence="backup.enabled=false", fix=f"dbplane backup modify {spec.name} --enable")]
    out = []
    interval = expected_interval_h(spec)
    mine = [b for b in records if b.archive_id == spec.archive_id]
    good = sorted((b for b in mine if b.usable), key=lambda b: b.finished_at or b.started_at)
    auto = sorted((b for b in mine if not b.manual and b.state in ("available", "failed")),
                  key=lambda b: b.started_at)
    failed_in_row = 0
    for b in reversed(auto):
        if b.state != "failed":
            break
        failed_in_row += 1
    age_h = (now - (good[-1].finished_at or good[-1].started_at)) / 3600 if good else None
    db_age_h = (now - spec.created_at) / 3600
    evidence = (f"last good backup {good[-1].id} {age_h:.1f} h ago" if good else "no usable backup") \
        + f"; one is due every {interval:g} h"
    if failed_in_row:
        last = auto[-1]
        evidence += f"; {failed_in_row} failed in a row, last {last.id}: {last.error or 'no error recorded'}"
    fix = (f"see 'dbplane snapshot list -d {spec.name}' and the backup worker's log; take one now: "
           f"dbplane snapshot create {spec.name} --wait")
    if failed_in_row >= 3 or (age_h is None and db_age_h > interval + 1) or (age_h or 0) > 2 * interval + 1:
        out.append(Finding(check="backups", severity="critical", resource=t.resource,
                           summary="backups are failing or stale: a restore would lose more than "
                                   "the schedule promises", evidence=evidence, fix=fix))
    elif failed_in_row or (age_h or 0) > interval + 1:
        out.append(Finding(check="backups", severity="warning", resource=t.resource,
                           summary="the last automated backup failed" if failed_in_row
                           else "the last good backup is older than the schedule",
                           evidence=evidence, fix=fix))
    elif not good:
        out.append(ok("backups", t.resource, f"no backup yet: the database is {db_age_h:.1f} h old and "
                      "its first full backup is taken once the WAL archive runs", evidence))
    else:
        out.append(ok("backups", t.resource, "backups are on schedule", evidence))
    out.append(_archive(t, spec, archive, now))
    return out


def _archive(t: Target, spec: DatabaseSpec, a: ArchiveStatus | None, now: float) -> Finding:
    if a is None or a.archive_id != spec.archive_id:
        severity = "warning" if now - spec.created_at > 600 else "info"
        return Finding(check="wal_archive", severity=severity, resource=t.resource,
                       summary="the WAL archive does not run: no point-in-time restore after the last backup",
                       evidence=f"no archive status for {spec.archive_id}",
                       fix="check that a backup worker runs (dbplane hosts; <host dir>/backup.log)")
    evidence = (f"state {a.state} on {a.worker or '?'}, archived to {a.archived_lsn or '?'}, "
                f"{human_size(a.lag_bytes)} / {a.lag_seconds:.0f} s behind; "
                f"status {now - a.updated_at:.0f} s old")
    if a.state == "failing" or a.error:
        return Finding(check="wal_archive", severity="critical", resource=t.resource,
                       summary="WAL archiving fails: the primary keeps WAL in its slot until it works again",
                       evidence=f"{evidence}; error: {a.error}",
                       fix="fix the cause in the error (repository reachable and writable, KMS key enabled: "
                           f"dbplane backup describe {spec.name})")
    if a.lag_seconds > 600 or now - a.updated_at > 120:
        return Finding(check="wal_archive", severity="warning", resource=t.resource,
                       summary="the WAL archive falls behind", evidence=evidence,
                       fix="check the backup worker's log and the repository's write speed")
    return ok("wal_archive", t.resource, "WAL archiving keeps up", evidence)


def storage(t: Target, spec: DatabaseSpec, used: int | None, node: NodeFacts | None,
            disks: list) -> list[Finding]:
    out = []
    quota = spec.storage_gb * GIB
    sizes = ({d.name: d.size_bytes for d in node.databases if d.size_bytes and d.connectable}
             if node and not node.error else {})
    biggest = sorted(sizes.items(), key=lambda kv: -kv[1])[:3]
    evidence = (f"{human_size(used)} used of {spec.storage_gb} GB (largest member data directory)"
                + ("; largest databases: " + ", ".join(f"{n} {human_size(s)}" for n, s in biggest)
                   if biggest else ""))
    if used is None:
        out.append(Finding(check="storage", severity="info", resource=t.resource,
                           summary="storage use not measured yet", evidence="no member reported its size"))
    elif used >= quota * STORAGE_CRIT:
        out.append(Finding(check="storage", severity="critical", resource=t.resource,
                           summary=f"storage {used / quota:.0%} of the quota: writes are refused from 100 %",
                           evidence=evidence,
                           fix=f"dbplane db modify {spec.name} --storage-gb {spec.storage_gb * 2}, or "
                               "free space (drop what is not needed; VACUUM FULL bloated tables)"))
    elif used >= quota * STORAGE_WARN:
        out.append(Finding(check="storage", severity="warning", resource=t.resource,
                           summary=f"storage {used / quota:.0%} of the quota", evidence=evidence,
                           fix=f"dbplane db modify {spec.name} --storage-gb {spec.storage_gb * 2}"))
    else:
        out.append(ok("storage", t.resource, f"storage {used / quota:.0%} of the quota", evidence))
    for d in disks:
        share = d.free / d.total if d.total else 1.0
        res = t.on(d.member)
        ev = f"{human_size(d.free)} free of {human_size(d.total)} on the file system of {d.path}"
        if share < DISK_FREE_CRIT or d.free < quota * 0.05:
            severity = "critical" if share < DISK_FREE_CRIT else "warning"
            out.append(Finding(check="disk_space", severity=severity, resource=res,
                               summary=f"the disk under {d.member} is {1 - share:.0%} full: PostgreSQL stops "
                                       "when it cannot write WAL", evidence=ev,
                               fix="free space on that file system or grow it; the quota does not protect "
                                   "against other users of the disk"))
        elif share < DISK_FREE_WARN:
            out.append(Finding(check="disk_space", severity="warning", resource=res,
                               summary=f"the disk under {d.member} is {1 - share:.0%} full", evidence=ev,
                               fix="free space on that file system or grow it"))
        else:
            out.append(ok("disk_space", res, f"{share:.0%} of the disk free", ev))
    return out
