"""Backup policy, decided from the snapshot like everything else the controller does:
when automated backups are due (full and incremental, within the backup window), which
node and host take a backup (a standby when there is one, so the primary is not loaded),
what to do with backups whose host died, and which automated backups expire.

The backup workers do the I/O: they take the backups assigned to their host and remove
expired ones (backup/worker.py)."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from ..errors import DbplaneError
from ..models import ARCHIVE_SLOT, ArchiveStatus, BackupRecord, DatabaseSpec
from ..parameters import engine_parameters
from ..store import keys
from .operations import record_event, update_spec
from .operations import update as update_operation
from .topology import member_views

if TYPE_CHECKING:
    from .databases import Pass

DAY = 86400.0
KEEP_FAILED = 5               # failed automated backups kept in the catalog, to show why


def in_window(window: str, at: float) -> bool:
    """Is `at` inside "HH:MM-HH:MM" (UTC; may wrap midnight)? An empty window is always."""
    if not window:
        return True
    start, end = ([int(x) for x in part.split(":")] for part in window.split("-"))
    t = datetime.fromtimestamp(at, UTC)
    minute, lo, hi = t.hour * 60 + t.minute, start[0] * 60 + start[1], end[0] * 60 + end[1]
    return lo <= minute < hi if lo <= hi else minute >= lo or minute < hi


def automated_id(db: str, at: float) -> str:
    return f"{db}-auto-{datetime.fromtimestamp(at, UTC):%Y%m%d%H%M%S}"


def retry_after(backups: list[BackupRecord]) -> float:
    """When automated backups may be tried again after failures in a row: 1 min, doubling
    up to an hour."""
    auto = sorted((b for b in backups if not b.manual), key=lambda b: b.started_at)
    failures = 0
    for b in reversed(auto):
        if b.state != "failed":
            break
        failures += 1
    if not failures:
        return 0.0
    return (auto[-1].finished_at or auto[-1].started_at) + min(3600.0, 60.0 * 2 ** (failures - 1))


def due_backup(spec: DatabaseSpec, backups: list[BackupRecord], at: float,
               incremental_ok: bool) -> tuple[str, str] | None:
    """(kind, parent) of the automated backup due now, or None."""
    settings = spec.backup
    if at < retry_after(backups):
        return None
    # a chain lives in one repository: after a change of repository, a full backup first
    auto = sorted((b for b in backups if not b.manual and b.archive_id == spec.archive_id
                   and b.state == "available" and b.repository == settings.repository),
                  key=lambda b: b.started_at)
    fulls = [b for b in auto if b.kind == "full"]
    if not fulls:
        return ("full", "")                  # the first one does not wait for the window
    if at - fulls[-1].started_at >= settings.full_every_hours * 3600 and in_window(settings.window, at):
        return ("full", "")
    if (incremental_ok and settings.incremental_every_hours > 0
            and at - auto[-1].started_at >= settings.incremental_every_hours * 3600):
        return ("incremental", auto[-1].id)
    return None


def expired(spec: DatabaseSpec, backups: list[BackupRecord], at: float) -> list[BackupRecord]:
    """Automated backups older than the retention period that no restore inside the
    period needs: everything before the newest full backup finished before the period
    began (that one stays: restores to the start of the period replay from it), and every
    incremental backup built on one of those."""
    start = at - spec.backup.retention_days * DAY
    auto = sorted((b for b in backups if not b.manual and b.state == "available"),
                  key=lambda b: b.started_at)
    anchors = [b for b in auto if b.kind == "full" and (b.finished_at or at) <= start]
    if not anchors:
        return []
    gone = {b.id for b in auto if b.started_at < anchors[-1].started_at}
    grew = True
    while grew:
        more = {b.id for b in auto if b.kind == "incremental" and b.parent in gone} - gone
        gone |= more
        grew = bool(more)
    return [b for b in auto if b.id in gone]


def choose_source(p: Pass, spec: DatabaseSpec) -> tuple[str, str] | None:
    """(member, host) to back up: a streaming standby or replica if one runs, else the
    primary."""
    live = {h.name for h in p.snap.hosts()}
    views = [v for v in member_views(p.snap, spec.name)
             if v.host in live and v.state in ("running", "streaming")]
    for role in ("sync_standby", "replica", "primary"):
        for v in views:
            if v.role == role:
                return v.name, v.host
    return None


async def ensure_backups(p: Pass, spec: DatabaseSpec) -> None:
    status = p.snap.status(spec.name)
    if status is None or not status.ever_available:
        return
    await ensure_assigned(p, spec)
    await ensure_archive_slot(p, spec)
    now = time.time()
    backups = p.snap.backups(spec.name)
    if not spec.backup.enabled:
        return
    archive = p.snap.archive(spec.name)
    archiving = archive is not None and archive.archive_id == spec.archive_id and archive.archived_lsn
    busy = any(b.state in ("pending", "running") and not b.manual for b in backups)
    if archiving and not busy and status.phase == "available":
        due = due_backup(spec, backups, now, "summarize_wal" in engine_parameters())
        if due is not None:
            kind, parent = due
            record = BackupRecord(id=automated_id(spec.name, now), database=spec.name,
                                  archive_id=spec.archive_id, repository=spec.backup.repository,
                                  kind=kind, parent=parent, state="pending")
            await p.store.create(keys.backup(spec.name, record.id), record)
    if spec.backup.copy_to:            # the cross-region copy of every new backup
        for b in backups:
            if b.usable and b.archive_id == spec.archive_id \
                    and spec.backup.copy_to not in b.copies + b.copy_requested:
                await p.store.put(keys.backup(spec.name, b.id), b.model_copy(
                    update={"copy_requested": [*b.copy_requested, spec.backup.copy_to]}))
    for b in expired(spec, backups, now):
        await p.store.put(keys.backup(spec.name, b.id), b.model_copy(update={"state": "expired"}))
    failed = sorted((b for b in backups if b.state == "failed" and not b.manual),
                    key=lambda b: b.started_at)
    for b in failed[:-KEEP_FAILED]:
        await p.store.delete(keys.backup(spec.name, b.id))   # its files were removed on failure


async def ensure_archive_slot(p: Pass, spec: DatabaseSpec) -> None:
    """The archiver's permanent slot exists only while backups are on: with nobody reading
    it, it would hold WAL on the primary until the disk fills. Patroni creates and drops
    permanent slots as its dynamic configuration (in etcd) lists them."""
    config_key = keys.patroni_scope(spec.name) + "config"
    raw = p.snap.raw.get(config_key)
    if raw is None or spec.backup.enabled == (ARCHIVE_SLOT in (json.loads(raw).get("slots") or {})):
        return
    # read it again: an earlier step of this pass may have changed it (resume removes pause)
    raw = await p.store.get_raw(config_key)
    if raw is None:
        return
    config = json.loads(raw)
    slots = dict(config.get("slots") or {})
    if spec.backup.enabled:
        slots[ARCHIVE_SLOT] = {"type": "physical"}
    else:
        slots.pop(ARCHIVE_SLOT)
    await p.store.put(config_key, {**config, "slots": slots})


async def ensure_assigned(p: Pass, spec: DatabaseSpec) -> None:
    live = {h.name for h in p.snap.hosts()}
    for b in p.snap.backups(spec.name):
        await _watch_assignment(p, spec, b, live, time.time())


async def ensure_final_snapshot(p: Pass, spec: DatabaseSpec) -> bool:
    """Before a database with a final snapshot is deleted, the snapshot must be available.
    True when the delete may go on. If it fails, the delete is called off (the database
    stays, as asked for, with its data)."""
    if not spec.final_snapshot:
        return True
    record = next((b for b in p.snap.backups(spec.name) if b.id == spec.final_snapshot), None)
    if record is not None and record.state == "available":
        return True
    if record is not None and record.state in ("pending", "running"):
        await ensure_assigned(p, spec)
        status = p.snap.status(spec.name)
        msg = f"taking the final snapshot {spec.final_snapshot} before deleting"
        if status is not None and status.message != msg:
            await p.store.put(keys.database_status(spec.name), status.model_copy(update={"message": msg}))
        return False
    why = record.error if record is not None else "its record is gone"
    for op in p.snap.operations():
        if op.database == spec.name and op.kind == "delete" and not op.done:
            await update_operation(p.store, op, state="failed", error=DbplaneError(
                f"final snapshot {spec.final_snapshot} failed: {why}; the database was not deleted",
                "fix the cause, then delete again (or without --final-snapshot)",
                code="final_snapshot_failed"), message="the final snapshot failed")
    await record_event(p.store, spec.name, "delete-called-off",
                       f"final snapshot {spec.final_snapshot} failed ({why}): the database was not deleted")
    await update_spec(p.store, p.snap.raw.get(keys.database_spec(spec.name)), spec,
                      deleting=False, final_snapshot="", generation=spec.generation + 1)
    return False


async def _watch_assignment(p: Pass, spec: DatabaseSpec, b: BackupRecord, live: set[str],
                            now: float) -> None:
    """Give pending backups a source and host; fail the ones whose host died."""
    if b.state == "pending" and (not b.host or b.host not in live):
        source = choose_source(p, spec)
        if source is not None:
            await p.store.put(keys.backup(spec.name, b.id), b.model_copy(
                update={"source_member": source[0], "host": source[1]}))
    elif b.state == "running" and b.host not in live and now - b.started_at > 30:
        await p.store.put(keys.backup(spec.name, b.id), b.model_copy(update={
            "state": "failed", "finished_at": now,
            "error": f"host {b.host} went away while taking the backup"}))
        await record_event(p.store, spec.name, "backup-failed",
                           f"backup {b.id} failed: host {b.host} went away while taking it")


def restorable_window(spec: DatabaseSpec, backups: list[BackupRecord],
                      archive: ArchiveStatus | None) -> tuple[float, float] | None:
    """(earliest, latest) time a point-in-time restore of the database can target: from
    the first automated backup's consistent point to the last WAL the archive holds
    (archived WAL is kept for automated backups; snapshots restore to their own point)."""
    mine = [b for b in backups if b.archive_id == spec.archive_id and b.usable and not b.manual]
    if not mine:
        return None
    earliest = min(b.consistent_at for b in mine)
    latest = max(b.consistent_at for b in mine)
    if archive is not None and archive.archive_id == spec.archive_id and archive.archived_lsn:
        if archive.state == "streaming":
            latest = max(latest, archive.updated_at - archive.lag_seconds)
        elif archive.last_archived_at:
            latest = max(latest, archive.last_archived_at)
    return earliest, latest


def base_for(backups: list[BackupRecord], archive_id: str, at: float | None) -> list[BackupRecord]:
    """The chain (full first) of the newest automated backup consistent at or before `at`
    (None: the newest of all)."""
    candidates = sorted((b for b in backups if b.archive_id == archive_id and b.usable and not b.manual
                         and (at is None or b.consistent_at <= at)), key=lambda b: b.consistent_at)
    if not candidates:
        return []
    by_id = {b.id: b for b in backups if b.usable}
    chain = [candidates[-1]]
    while chain[0].kind == "incremental":
        parent = by_id.get(chain[0].parent)
        if parent is None:
            return []
        chain.insert(0, parent)
    return chain
