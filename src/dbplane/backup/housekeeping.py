"""Repository housekeeping, done by one backup worker of the platform (a lease lock):
remove snapshots being deleted and expired backups (files first, then the catalog
record), verify backups on request, and drop archived WAL that no retained backup needs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Executor

from ..errors import DbplaneError
from ..models import BackupRecord, DatabaseSpec, Event, RepositorySpec
from ..security.kms import Kms
from ..store import Store, keys
from .archiver import wal_prefix
from .basebackup import backup_prefix
from .repository import Repository, open_repository
from .verify import verify
from .wal import SEGMENT_RE, parse_lsn, parse_segment_name, segment_start

log = logging.getLogger("dbplane.backup.housekeeping")

SEG_SIZE = 16 * 1024 * 1024
WAL_EXPIRY_INTERVAL = 600.0      # s between looks at one archive's old WAL


class Housekeeper:
    def __init__(self, executor: Executor):
        self.executor = executor
        self.wal_checked: dict[str, float] = {}     # archive id -> monotonic time

    async def _io(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def repository(self, store: Store, name: str) -> Repository | None:
        spec = await store.get(keys.repository(name), RepositorySpec)
        return open_repository(spec) if spec else None

    async def run(self, store: Store, records: list[BackupRecord], specs: dict[str, DatabaseSpec],
                  kms: Kms) -> None:
        for r in records:
            try:
                if r.state in ("deleting", "expired"):
                    await self.remove(store, r)
                elif r.state == "available" and r.verify_requested_at and \
                        (r.verified_at or 0) < r.verify_requested_at:
                    await self.verify(store, r, kms)
            except DbplaneError as e:
                log.warning("%s: backup %s: %s; retrying", r.database, r.id, e)
        for spec in specs.values():
            if time.monotonic() - self.wal_checked.get(spec.archive_id, -WAL_EXPIRY_INTERVAL) \
                    >= WAL_EXPIRY_INTERVAL:
                self.wal_checked[spec.archive_id] = time.monotonic()
                try:
                    await self.expire_wal(store, spec, records)
                except DbplaneError as e:
                    log.warning("%s: expiring WAL: %s", spec.name, e)

    async def remove(self, store: Store, r: BackupRecord) -> None:
        repo = await self.repository(store, r.repository)
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
        if removed:
            log.info("%s: removed %d archived WAL files no backup needs", spec.name, removed)


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
