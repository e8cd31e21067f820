"""Restore drills: proof that backups restore. Every `drill_every_hours` the newest backup
with a fingerprint is restored, through the same path as `dbplane db restore`, to a
scratch database `<db>-drill` (single-AZ, micro, no backups of its own) at the
fingerprint's WAL position. A backup worker then checks it (pg_amcheck, row counts against
the fingerprint); the controller records how long the restore took, raises an event if
anything failed, and deletes the scratch database."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ..models import (
    BackupRecord,
    BackupSettings,
    DatabaseSpec,
    DrillRecord,
    Operation,
    RestoreSource,
)
from ..security import db_secrets
from ..store import keys
from .operations import record_event, update_spec

if TYPE_CHECKING:
    from .databases import Pass

RESTORE_TIMEOUT = 3600.0
CHECK_TIMEOUT = 1800.0


def scratch_name(db: str) -> str:
    return f"{db[:35]}-drill"


def drill_chain(backups: list[BackupRecord], tip: BackupRecord) -> list[str] | None:
    by_id = {b.id: b for b in backups if b.usable}
    chain = [tip]
    while chain[0].kind == "incremental":
        parent = by_id.get(chain[0].parent)
        if parent is None:
            return None
        chain.insert(0, parent)
    return [b.id for b in chain]


def drill_candidate(spec: DatabaseSpec, backups: list[BackupRecord]) -> BackupRecord | None:
    usable = [b for b in backups if b.archive_id == spec.archive_id and b.usable and b.fingerprint_lsn]
    return max(usable, key=lambda b: b.consistent_at or 0, default=None)


async def ensure_drills(p: Pass, spec: DatabaseSpec) -> None:
    if spec.drill_of or not spec.backup.enabled or spec.backup.drill_every_hours <= 0:
        return
    status = p.snap.status(spec.name)
    drills = p.snap.drills(spec.name)
    for d in drills:
        if d.state in ("restoring", "checking") or p.snap.specs().get(d.scratch) is not None:
            await follow(p, d)
    if status is None or status.phase != "available" or \
            any(d.state in ("restoring", "checking") for d in drills):
        return
    # the first drill comes one period after the database was created
    last = max([d.started_at for d in drills] + [spec.created_at])
    if time.time() - last < spec.backup.drill_every_hours * 3600:
        return
    backups = p.snap.backups(spec.name)
    tip = drill_candidate(spec, backups)
    chain = drill_chain(backups, tip) if tip else None
    secrets_raw = p.snap.raw.get(keys.secrets(spec.name))
    scratch = scratch_name(spec.name)
    if tip is None or chain is None or secrets_raw is None or scratch in p.snap.specs():
        return
    # the scratch database logs in with the source's passwords, sealed for its own key
    secrets = await db_secrets.open_raw(p.store, keys.secrets(spec.name), secrets_raw)
    scratch_secrets = await db_secrets.sealed_json(p.store, keys.secrets(scratch), secrets)
    drill = DrillRecord(id=f"drill-{int(time.time())}", database=spec.name, backup_id=tip.id,
                        scratch=scratch)
    scratch_spec = DatabaseSpec(
        name=scratch, instance_class="micro", version=spec.version, params=spec.params,
        backup=BackupSettings(enabled=False), drill_of=drill.id,
        restore=RestoreSource(source_database=spec.name, archive_id=tip.archive_id,
                              repository=tip.repository, chain=chain, target="lsn",
                              target_lsn=tip.fingerprint_lsn))
    op = Operation(kind="restore", database=scratch, params={"drill": drill.id})
    await p.store.create_all({keys.drill(spec.name, drill.id): drill,
                              keys.database_spec(scratch): scratch_spec,
                              keys.secrets(scratch): scratch_secrets,
                              keys.operation(op.id): op})


async def follow(p: Pass, d: DrillRecord) -> None:
    """Move a drill on: restored -> checking (the worker checks); checked -> the scratch
    database goes; a failed restore or a check that never comes -> failed."""
    now = time.time()
    scratch = p.snap.specs().get(d.scratch)
    if scratch is not None and scratch.drill_of != d.id:
        scratch = None                      # another drill's scratch database
    status = p.snap.status(d.scratch) if scratch is not None else None
    if d.state == "restoring":
        if scratch is None or scratch.deleting:
            failed = next((o for o in p.snap.operations() if o.database == d.scratch and o.kind == "restore"
                           and o.error is not None), None)
            await finish(p, d, "failed", failed.error.message if failed else "the restore was rolled back")
        elif status is not None and status.phase == "available":
            await save(p, d.model_copy(update={"state": "checking", "restored_at": now,
                                               "restore_seconds": round(now - d.started_at, 1)}))
        elif now - d.started_at > RESTORE_TIMEOUT:
            await finish(p, d, "failed", f"the restore took more than {RESTORE_TIMEOUT:.0f} s")
    elif d.state == "checking" and now - (d.restored_at or now) > CHECK_TIMEOUT:
        await finish(p, d, "failed", "no backup worker checked the restored database")
    if d.state in ("passed", "failed") and scratch is not None and not scratch.deleting:
        await update_spec(p.store, p.snap.raw.get(keys.database_spec(d.scratch)), scratch, deleting=True)


async def finish(p: Pass, d: DrillRecord, state: str, error: str = "") -> None:
    await save(p, d.model_copy(update={"state": state, "error": error, "finished_at": time.time()}))
    await record_event(p.store, d.database, "restore-drill-failed",
                       f"restore drill of backup {d.backup_id} failed: {error}")


async def save(p: Pass, d: DrillRecord) -> None:
    await p.store.put(keys.drill(d.database, d.id), d)
