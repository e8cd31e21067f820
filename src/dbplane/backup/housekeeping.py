"""Repository housekeeping, done by one backup worker of the platform (a lease lock):
remove snapshots being deleted and expired backups (files first, then the catalog
record), verify backups on request, and drop archived WAL that no retained backup needs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import tempfile
import time
from concurrent.futures import Executor

import psycopg

from ..errors import DbplaneError
from ..models import (
    BackupRecord,
    DatabaseSpec,
    DrillRecord,
    Event,
    MemberSpec,
    RepositorySpec,
)
from ..security import db_secrets
from ..security.kms import Kms
from ..store import Store, keys
from . import copies, fingerprint
from .archiver import wal_prefix
from .basebackup import backup_prefix
from .repository import Repository, open_repository
from .verify import verify
from .wal import SEGMENT_RE, parse_lsn, parse_segment_name, segment_start

log = logging.getLogger("dbplane.backup.housekeeping")

SEG_SIZE = 16 * 1024 * 1024
WAL_EXPIRY_INTERVAL = 600.0      # s between looks at one archive's old WAL
WAL_SYNC_INTERVAL = 30.0         # s between copies of new archived WAL to a second repository
COPY_RETRY = 60.0                # s before a backup copy that failed is tried again


class Housekeeper:
    def __init__(self, executor: Executor, bin_dir: str):
        self.executor = executor
        self.bin_dir = bin_dir
        self.wal_checked: dict[str, float] = {}     # archive id -> monotonic time
        self.wal_synced: dict[str, float] = {}      # archive id -> monotonic time of the last copy
        self.copy_tried: dict[str, float] = {}      # backup id -> monotonic time of the last copy try

    async def _io(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def repository(self, store: Store, name: str) -> Repository | None:
        spec = await store.get(keys.repository(name), RepositorySpec)
        return open_repository(spec) if spec else None

    async def run(self, store: Store, records: list[BackupRecord], specs: dict[str, DatabaseSpec],
                  kms: Kms, drills: list[DrillRecord]) -> None:
        for key, value in (await store.get_prefix(keys.archive_removals())).items():
            try:
                await self.remove_archive(store, key.rsplit("/", 1)[1], json.loads(value))
                await store.delete(key)
            except DbplaneError as e:
                log.warning("removing the archive %s: %s; retrying", key, e)
        for d in drills:
            if d.state == "checking":
                try:
                    await self.check_drill(store, d)
                except (DbplaneError, psycopg.Error, OSError) as e:
                    log.warning("%s: checking restore drill %s: %s; retrying", d.database, d.id, e)
        for r in records:
            try:
                if r.state in ("deleting", "expired"):
                    await self.remove(store, r)
                elif r.state == "available" and r.verify_requested_at and \
                        (r.verified_at or 0) < r.verify_requested_at:
                    await self.verify(store, r, kms)
                elif r.state == "available" and set(r.copy_requested) - set(r.copies) \
                        and due(self.copy_tried, r.id, COPY_RETRY):
                    await self.copy(store, r, kms)
            except DbplaneError as e:
                log.warning("%s: backup %s: %s; retrying", r.database, r.id, e)
        for spec in specs.values():
            if spec.backup.copy_to and due(self.wal_synced, spec.archive_id, WAL_SYNC_INTERVAL):
                try:
                    await self.sync_wal(store, spec, kms)
                except DbplaneError as e:
                    log.warning("%s: copying WAL to %s: %s", spec.name, spec.backup.copy_to, e)
        for spec in specs.values():
            if due(self.wal_checked, spec.archive_id, WAL_EXPIRY_INTERVAL):
                try:
                    await self.expire_wal(store, spec, records)
                except DbplaneError as e:
                    log.warning("%s: expiring WAL: %s", spec.name, e)

    async def copy(self, store: Store, r: BackupRecord, kms: Kms) -> None:
        src = await self.repository(store, r.repository)
        for name in [n for n in r.copy_requested if n not in r.copies]:
            target = await store.get(keys.repository(name), RepositorySpec)
            if src is None or target is None:
                continue
            stored = await self._io(copies.copy_backup, src, open_repository(target), kms, target.kms_key,
                                    r.archive_id, r.id)
            current = await store.get(keys.backup(r.database, r.id), BackupRecord)
            if current is None:
                return
            r = current.model_copy(update={"copies": sorted(set(current.copies) | {name})})
            await store.put(keys.backup(r.database, r.id), r)
            await event(store, r.database, "backup-copied",
                        f"{'snapshot' if r.manual else 'backup'} {r.id} copied to repository {name} "
                        f"({stored >> 20} MB, encrypted under {target.kms_key})")

    async def sync_wal(self, store: Store, spec: DatabaseSpec, kms: Kms) -> None:
        src = await self.repository(store, spec.backup.repository)
        target = await store.get(keys.repository(spec.backup.copy_to), RepositorySpec)
        if src is None or target is None:
            return
        copied = await self._io(copies.sync_wal, src, open_repository(target), kms, target.kms_key,
                                spec.archive_id)
        if copied:
            log.info("%s: copied %d WAL files to %s", spec.name, copied, target.name)

    async def remove_archive(self, store: Store, archive_id: str, repositories: list[str]) -> None:
        """The archived WAL of a deleted database."""
        for name in repositories:
            repo = await self.repository(store, name)
            if repo is not None:
                removed = await self._io(repo.delete_prefix, wal_prefix(archive_id))
                log.info("removed the archive of %s from %s (%d files)", archive_id, name, removed)

    async def remove(self, store: Store, r: BackupRecord) -> None:
        for name in [r.repository, *r.copies]:
            repo = await self.repository(store, name)
            if repo is not None:
                await self._io(repo.delete_prefix, backup_prefix(r.archive_id, r.id))
        await store.delete(keys.backup(r.database, r.id))
        self.wal_checked.pop(r.archive_id, None)       # the WAL it needed may go now too
        kind = "snapshot-deleted" if r.state == "deleting" else "backup-expired"
        await event(store, r.database, kind,
                    f"{'snapshot' if r.manual else 'backup'} {r.id} removed from repository {r.repository}")

    async def verify(self, store: Store, r: BackupRecord, kms: Kms) -> None:
        repo = await self.repository(store, r.repository)
        if repo is None:
            return
        checked = await self._io(verify, repo, kms, r)
        problem = "; ".join(checked.problems[:3])
        await store.put(keys.backup(r.database, r.id), r.model_copy(update={
            "verified_at": time.time(), "verify_error": problem}))
        if problem:
            await event(store, r.database, "backup-verify-failed", f"backup {r.id} is damaged: {problem}")
        log.info("%s: verified backup %s: %s", r.database, r.id, problem or
                 f"{checked.files} files, {checked.bytes >> 20} MB intact")

    async def check_drill(self, store: Store, d: DrillRecord) -> None:
        """The restored scratch database: pg_amcheck of every database in it, and the row
        count of every table of the backup's fingerprint."""
        record = await store.get(keys.backup(d.database, d.backup_id), BackupRecord)
        leader = await store.get_raw(f"{keys.patroni_scope(d.scratch)}leader")
        secrets = await db_secrets.load(store, keys.secrets(d.scratch))
        member = await store.get(keys.member(d.scratch, leader.decode()), MemberSpec) if leader else None
        if record is None or member is None or secrets is None:
            return
        problems = []
        amcheck = await self._io(run_amcheck, self.bin_dir, member.address, member.pg_port, secrets.superuser)
        if amcheck:
            problems.append(f"pg_amcheck: {amcheck}")
        counts = await fingerprint.count_all(member.address, member.pg_port, secrets.superuser,
                                             list(record.fingerprint))
        differ = [f"{t} has {counts.get(t)} rows, {n} at backup time"
                  for t, n in sorted(record.fingerprint.items()) if counts.get(t) != n]
        if differ and record.fingerprint_exact:
            problems += differ[:5]
        state = "failed" if problems else "passed"
        await store.put(keys.drill(d.database, d.id), d.model_copy(update={
            "state": state, "tables_checked": len(counts), "error": "; ".join(problems)[:1000],
            "finished_at": time.time()}))
        if problems:
            await event(store, d.database, "restore-drill-failed",
                        f"restore drill of backup {d.backup_id} failed: {'; '.join(problems)[:500]}")
        else:
            note = "" if record.fingerprint_exact else \
                f" (fingerprint taken on a primary that kept writing: {len(differ)} tables differ)"
            await event(store, d.database, "restore-drill-passed",
                        f"backup {d.backup_id} restored in {d.restore_seconds:.0f} s; pg_amcheck passed; "
                        f"{len(counts)} tables counted{note}")
        log.info("%s: restore drill %s %s", d.database, d.id, state)

    async def expire_wal(self, store: Store, spec: DatabaseSpec, records: list[BackupRecord]) -> None:
        """Archived WAL older than the oldest retained automated backup's start serves no
        restore any more (snapshots keep their own copy of the WAL they need)."""
        kept = [b for b in records if b.archive_id == spec.archive_id and not b.manual and b.usable]
        if not kept:
            return
        cutoff = segment_start(min(parse_lsn(b.start_lsn) for b in kept), SEG_SIZE)
        repo = await self.repository(store, spec.backup.repository)
        if repo is None:
            return
        removed = await self._io(remove_wal_before, repo, spec.archive_id, cutoff)
        copy = await self.repository(store, spec.backup.copy_to) if spec.backup.copy_to else None
        if copy is not None:
            removed += await self._io(remove_wal_before, copy, spec.archive_id, cutoff)
        if removed:
            log.info("%s: removed %d archived WAL files no backup needs", spec.name, removed)


def due(last: dict[str, float], key: str, interval: float) -> bool:
    """At most once per interval for each key (it notes the time when it says yes)."""
    if time.monotonic() - last.get(key, -interval) < interval:
        return False
    last[key] = time.monotonic()
    return True


def remove_wal_before(repo: Repository, archive_id: str, cutoff: int) -> int:
    removed = 0
    for obj in repo.list(wal_prefix(archive_id)):
        name = obj.key.rsplit("/", 1)[1].removesuffix(".partial")
        if SEGMENT_RE.match(name) and parse_segment_name(name, SEG_SIZE)[1] < cutoff:
            repo.delete(obj.key)
            removed += 1
    return removed


async def event(store: Store, database: str, kind: str, message: str) -> None:
    e = Event(database=database, kind=kind, message=message)
    await store.put(keys.event(database, e.id), e)


def run_amcheck(bin_dir: str, address: str, port: int, password: str) -> str:
    """pg_amcheck of every database (installing amcheck where missing); "" when clean."""
    with tempfile.TemporaryDirectory(prefix="dbplane-drill-") as tmp:
        pgpass = os.path.join(tmp, "pgpass")
        with open(pgpass, "w") as f:
            f.write(f"*:*:*:postgres:{password}\n")
        os.chmod(pgpass, 0o600)
        r = subprocess.run([f"{bin_dir}/pg_amcheck", "-h", address, "-p", str(port), "-U", "postgres",
                            "-w", "--all", "--install-missing"], capture_output=True, text=True,
                           timeout=1800, env={"PATH": "/usr/bin:/bin", "PGPASSFILE": pgpass})
    if r.returncode == 0:
        return ""
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    return " / ".join(lines[-3:])[:500] or f"exit code {r.returncode}"
