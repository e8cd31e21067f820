"""One base backup, from a catalog record the controller assigned to this host to a
published backup: pg_basebackup into the repository, its manifest, a copy of the WAL it
needs (so it restores on its own), then backup.json, then the catalog says available.
A failure removes what was written and says why in the record."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass

import psycopg

from ..errors import DbplaneError
from ..models import ArchiveStatus, BackupRecord, DatabaseSpec, Event, MemberSpec
from ..security import db_secrets
from ..security.kms import Kms, current_version
from ..store import Store, keys
from . import fingerprint
from .archiver import wal_prefix
from .basebackup import BackupFailed, Source, backup_prefix, run_pg_basebackup
from .fingerprint import connect
from .objects import decode, encode
from .repository import Repository
from .verify import verify
from .wal import format_lsn, history_name, needed_segments, parse_history, parse_lsn

log = logging.getLogger("dbplane.backup.jobs")

ARCHIVE_WAIT = 300.0          # s a backup waits for the archive to hold its last WAL
SEG_SIZE = 16 * 1024 * 1024


@dataclass
class Job:
    store: Store
    record: BackupRecord
    repo: Repository
    kms: Kms
    kms_key: str
    executor: Executor
    bin_dir: str
    host: str

    async def run(self) -> BackupRecord:
        r = self.record
        await self.save(state="running", host=self.host, started_at=time.time(), error="")
        try:
            await self._take()
        except asyncio.CancelledError:
            await self.fail("interrupted: the backup worker stopped")
            raise
        except Exception as e:
            if not isinstance(e, DbplaneError):
                log.exception("backup %s of %s", r.id, r.database)
            await self.fail(str(e) or type(e).__name__)
        return self.record

    async def _io(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def new_data_key(self):
        return self.kms.generate_data_key(self.kms_key)

    async def _take(self) -> None:
        r = self.record
        source = await self.source()
        prefix = backup_prefix(r.archive_id, r.id)
        parent_manifest = None
        if r.kind == "incremental":
            parent_manifest = await self._io(
                self.read, backup_prefix(r.archive_id, r.parent) + "backup_manifest")
        await self.wait_streaming()
        await self.checkpoint_first(source)
        log.info("%s: %s backup %s from %s", r.database, r.kind, r.id, r.source_member)
        result = await self._io(run_pg_basebackup, self.bin_dir, source, self.repo, prefix + "base.tar",
                                self.new_data_key, f"dbplane {r.id}", parent_manifest)
        key = self.kms.resolve(self.kms_key)
        await self.save(timeline=result.timeline, start_lsn=format_lsn(result.start_lsn),
                        stop_lsn=format_lsn(result.stop_lsn), size_bytes=result.size_bytes,
                        kms_key_id=key.id, kms_key_version=current_version(key))
        stored = result.stored_bytes + await self._io(self.write, prefix + "backup_manifest", result.manifest)
        # a restore of this backup logs in with the same passwords, even once the source is gone
        secrets = await db_secrets.load(self.store, keys.secrets(r.database))
        stored += await self._io(self.write, prefix + "secrets.json", secrets.model_dump_json().encode())
        await self.take_fingerprint(source)
        # the backup keeps the WAL it needs, up to its fingerprint and the record after it (a
        # drill stops there, and recovery must see a record past its target): restores of
        # it need nothing from the archive, whose old WAL retention removes
        end = result.stop_lsn                 # WAL up to here (exclusive) is needed
        if self.record.fingerprint_lsn:       # a checkpoint followed it: WAL goes on
            end = max(end, parse_lsn(self.record.fingerprint_lsn) + 1)
        await self.wait_archived(result.timeline, end)
        stored += await self._io(self.copy_wal, result.timeline, result.start_lsn, end - 1)
        finished = time.time()
        checked = await self._io(verify, self.repo, self.kms, self.record)
        if not checked.ok:
            raise BackupFailed(f"verification failed: {'; '.join(checked.problems[:3])}",
                               "the repository may be damaged; see 'dbplane backup describe'")
        done = self.record.model_copy(update={"state": "available", "finished_at": finished,
                                              "consistent_at": finished, "stored_bytes": stored,
                                              "verified_at": time.time()})
        await self._io(self.write, prefix + "backup.json", done.model_dump_json().encode())
        self.record = done
        await self.store.put(keys.backup(r.database, r.id), done)
        log.info("%s: backup %s available (%d MB, %d MB stored)", r.database, r.id,
                 done.size_bytes >> 20, stored >> 20)

    async def take_fingerprint(self, source: Source) -> None:
        """Row counts for restore drills (backup/fingerprint.py); then a checkpoint on the
        primary, so that WAL goes on past the fingerprint's position (a drill's recovery
        must see a record after its target)."""
        r = self.record
        leader, primary, secrets = await self.primary()
        if secrets is None:
            return
        try:
            fp = await fingerprint.take(source.address, source.port, secrets.superuser,
                                        on_standby=leader is not None and leader != r.source_member)
        except psycopg.Error as e:
            log.warning("%s: no fingerprint for backup %s: %s", r.database, r.id, e)
            return
        await self.save(fingerprint=fp.counts, fingerprint_lsn=fp.lsn, fingerprint_exact=fp.exact)
        if primary is not None:
            async with await connect(primary.address, primary.pg_port, secrets.superuser) as conn:
                await conn.execute("CHECKPOINT")

    async def primary(self):
        r = self.record
        leader = await self.store.get_raw(f"{keys.patroni_scope(r.database)}leader")
        name = leader.decode() if leader else None
        member = await self.store.get(keys.member(r.database, name), MemberSpec) if name else None
        secrets = await db_secrets.load(self.store, keys.secrets(r.database))
        return name, member, secrets

    async def checkpoint_first(self, source: Source) -> None:
        """A backup taken from a standby starts at the standby's last restartpoint, which
        can only be at a checkpoint it replayed: on a quiet database that may be older than
        the archive. So checkpoint the primary and let the standby replay it first."""
        r = self.record
        leader, primary, secrets = await self.primary()
        if leader is None or leader == r.source_member or primary is None or secrets is None:
            return
        async with await connect(primary.address, primary.pg_port, secrets.superuser) as conn:
            await conn.execute("CHECKPOINT")
            lsn = (await (await conn.execute("select pg_current_wal_lsn()::text")).fetchone())[0]
        deadline = time.monotonic() + 60
        async with await connect(source.address, source.port, secrets.superuser) as conn:
            while time.monotonic() < deadline:
                row = await (await conn.execute(
                    "select pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,))).fetchone()
                if row[0]:
                    return
                await asyncio.sleep(0.2)
        raise BackupFailed(f"standby {r.source_member} did not replay the primary's checkpoint "
                           f"at {lsn} within 60 s", "check its replication lag in 'dbplane db describe'")

    async def source(self) -> Source:
        r = self.record
        member = await self.store.get(keys.member(r.database, r.source_member), MemberSpec)
        secrets = await db_secrets.load(self.store, keys.secrets(r.database))
        if member is None or secrets is None:
            raise BackupFailed(f"member {r.source_member} of {r.database} is gone",
                               "the controller assigns another source on the next attempt")
        return Source(member.address, member.pg_port, secrets.replication)

    async def check_wanted(self) -> None:
        """A backup of a database that is gone or whose backups were turned off stops at
        once instead of waiting for WAL that will not come."""
        spec = await self.store.get(keys.database_spec(self.record.database), DatabaseSpec)
        if spec is None or not spec.backup.enabled or (spec.deleting and not spec.final_snapshot):
            raise BackupFailed(f"backups of {self.record.database} were turned off or it is being deleted",
                               "turn them on with 'dbplane backup modify DB --enable' and take it again")

    async def wait_streaming(self) -> None:
        """The archive must stream before the backup starts: the backup needs the WAL from
        its start on, and WAL from before the archive began is nowhere (a new database's
        archive starts once Patroni made its slot)."""
        deadline = time.monotonic() + ARCHIVE_WAIT
        status = None
        while time.monotonic() < deadline:
            status = await self.store.get(keys.archive_status(self.record.database), ArchiveStatus)
            if (status and status.archive_id == self.record.archive_id and status.state == "streaming"
                    and status.archived_lsn):
                return
            await self.check_wanted()
            await asyncio.sleep(0.5)
        why = f": {status.error}" if status and status.error else ""
        raise BackupFailed(f"the WAL archive of {self.record.database} is not streaming{why}",
                           f"see 'dbplane backup describe {self.record.database}'")

    async def wait_archived(self, tli: int, stop: int) -> None:
        """The WAL up to the backup's stop point must be in the archive before the backup
        counts: without it the backup cannot be made consistent."""
        deadline = time.monotonic() + ARCHIVE_WAIT
        while time.monotonic() < deadline:
            status = await self.store.get(keys.archive_status(self.record.database), ArchiveStatus)
            if (status and status.archive_id == self.record.archive_id and status.archived_lsn
                    and status.timeline >= tli and parse_lsn(status.archived_lsn) >= stop):
                return
            await self.check_wanted()
            await asyncio.sleep(0.5)
        raise BackupFailed(f"the WAL archive did not reach the backup's stop point {format_lsn(stop)} "
                           f"within {ARCHIVE_WAIT:.0f} s",
                           f"see 'dbplane backup describe {self.record.database}' for the archive's state")

    # -- repository I/O (in the executor) -----------------------------------------------------

    def read(self, key: str) -> bytes:
        return b"".join(decode(self.repo.open(key), self.kms.decrypt_data_key))

    def write(self, key: str, data: bytes) -> int:
        dk = self.new_data_key()
        return self.repo.put(key, encode([data], data_key=dk.plaintext, wrapped_key=dk.wrapped,
                                         key_id=dk.key_id, key_version=dk.key_version))

    def copy_wal(self, tli: int, start: int, stop: int) -> int:
        """Copy the archived segments holding WAL positions start..stop (inclusive; as
        stored: still encrypted) into the backup; the last may be partial."""
        r = self.record
        archive = wal_prefix(r.archive_id)
        history = []
        if tli > 1 and self.repo.exists(archive + history_name(tli)):
            history = parse_history(self.read(archive + history_name(tli)).decode())
            self.repo.put_bytes(backup_prefix(r.archive_id, r.id) + "wal/" + history_name(tli),
                                self.repo.get_bytes(archive + history_name(tli)))
        copied, target = 0, backup_prefix(r.archive_id, r.id) + "wal/"
        for name in needed_segments(start, stop, SEG_SIZE, history, tli):
            for candidate in (name, name + ".partial"):
                if self.repo.exists(archive + candidate):
                    data = self.repo.get_bytes(archive + candidate)
                    copied += self.repo.put_bytes(target + candidate, data)
                    break
            else:
                raise BackupFailed(f"WAL segment {name} that backup {r.id} needs is missing from the archive",
                                   "the archive has a gap; the next backup starts after it")
        return copied

    # -- catalog -------------------------------------------------------------------------------

    async def save(self, **changes) -> None:
        self.record = self.record.model_copy(update=changes)
        await self.store.put(keys.backup(self.record.database, self.record.id), self.record)

    async def fail(self, message: str) -> None:
        r = self.record
        log.warning("%s: backup %s failed: %s", r.database, r.id, message)
        try:
            await self._io(self.repo.delete_prefix, backup_prefix(r.archive_id, r.id))
        except Exception as e:       # the repository may be the problem; housekeeping retries
            log.warning("%s: could not remove the failed backup %s: %s", r.database, r.id, e)
        await self.save(state="failed", error=message, finished_at=time.time())
        event = Event(database=r.database, kind="backup-failed",
                      message=f"{'snapshot' if r.manual else r.kind + ' backup'} {r.id} failed: {message}")
        await self.store.put(keys.event(r.database, event.id), event)

