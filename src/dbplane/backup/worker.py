"""The backup worker: one process per host, started by the agent as the service account.
It archives the WAL of every database with backups enabled; for each database the
workers of all hosts compete for `archive-lock/<db>` (under a lease), so exactly one
streams and another takes over within the lease's TTL when its host dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from concurrent.futures import ThreadPoolExecutor

from ..errors import DbplaneError
from ..models import (
    ArchiveStatus,
    BackupRecord,
    DatabaseSpec,
    DrillRecord,
    Event,
    MemberSpec,
    PlatformConfig,
    RepositorySpec,
)
from ..security import audit, db_secrets
from ..security.kms import Kms, load_kms
from ..store import Store, keys
from ..store.etcd import serve_until
from ..store.tls import EtcdTLS
from .archiver import ArchiveGap, Archiver, Target
from .housekeeping import Housekeeper
from .jobs import Job
from .replication import ReplicationError, StreamEnded
from .repository import open_repository

log = logging.getLogger("dbplane.backup")

LOCK_TTL = 10                 # s: another worker takes a database's archive over after this
PASS_INTERVAL = 2.0
KEY_USE_INTERVAL = 60.0       # s: KMS key use goes to the audit log in counts per period
PUBLISH_INTERVAL = 5.0        # s between archive status writes when nothing else changed
RELEASE_AFTER_FAILURES = 3    # let another host's worker try after this many failures in a row
MAX_JOBS = 3                  # base backups taken at once on one host


class BackupWorker:
    def __init__(self, etcd_url: str, host: str, bin_dir: str, etcd_tls: EtcdTLS | None = None):
        self.etcd_url = etcd_url
        self.etcd_tls = etcd_tls                    # the client certificate for an https etcd
        self.host = host
        self.bin_dir = bin_dir
        self.jobs: dict[str, asyncio.Task] = {}     # backup id -> the job taking it here
        self.executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="backup-io")
        self.housekeeper = Housekeeper(self.executor, bin_dir)
        self.tasks: dict[str, asyncio.Task] = {}
        self.fresh: set[str] = set()            # databases whose archive starts again (a gap)
        self.task_settings: dict[str, tuple] = {}
        self.kms: Kms | None = None
        self._key_use_reported = time.monotonic()
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        await serve_until(self._stopping, self.etcd_url, self.etcd_tls, self._serve)
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def _serve(self, store: Store) -> None:
        lease = await store.lease(LOCK_TTL)
        changes = store.changes(keys.databases(), keys.repositories(), keys.kms_keys())
        keepalive = asyncio.create_task(self._keep_alive(store, lease))
        try:
            while not self._stopping.is_set():
                if keepalive.done():
                    keepalive.result()
                await self.reconcile(store, lease)
                await changes.wait(PASS_INTERVAL)
        finally:
            keepalive.cancel()
            changes.close()
            with contextlib.suppress(Exception):
                await audit.record_key_use(store, f"service/backup-worker@{self.host}", self.host)
                await audit.flush(store)
            for db, task in self.tasks.items():
                task.cancel()
                if await self._holds(store, db):
                    await store.delete(keys.archive_lock(db))     # hand over at once
            self.tasks.clear()

    async def _keep_alive(self, store: Store, lease) -> None:
        while True:
            await asyncio.sleep(LOCK_TTL / 4)
            await store.refresh(lease)

    async def _holds(self, store: Store, db: str) -> bool:
        raw = await store.get_raw(keys.archive_lock(db))
        return raw is not None and raw.decode() == self.host

    async def reconcile(self, store: Store, lease) -> None:
        config = await store.get(keys.config(), PlatformConfig) or PlatformConfig()
        if config.kms_root_file:
            self.kms = await load_kms(store, config.kms_root_file)
        raw = await store.get_prefix(keys.databases())
        specs = {}
        for key, value in raw.items():
            if key.endswith("/spec"):
                spec = DatabaseSpec.model_validate_json(value)
                # a database being deleted keeps its archive until its final snapshot is done
                if spec.backup.enabled and (not spec.deleting or spec.final_snapshot):
                    specs[spec.name] = spec
        for db, task in list(self.tasks.items()):
            # a changed repository, key or timeout applies at once: the stream starts again
            if db not in specs or task.done() or self.task_settings.get(db) != archive_settings(specs[db]):
                task.cancel()
                del self.tasks[db]
        for db, spec in specs.items():
            if db not in self.tasks:
                self.task_settings[db] = archive_settings(spec)
                self.tasks[db] = asyncio.create_task(self.archive(store, lease, db), name=f"archive-{db}")
        if time.monotonic() - self._key_use_reported > KEY_USE_INTERVAL:
            self._key_use_reported = time.monotonic()
            await audit.record_key_use(store, f"service/backup-worker@{self.host}", self.host)
        records = await store.list(keys.backups(), BackupRecord)
        await self.run_backups(store, records)
        if self.kms is not None and (
                await store.create(keys.backup_housekeeper(), self.host, lease=lease)
                or await store.get_raw(keys.backup_housekeeper()) == self.host.encode()):
            await self.housekeeper.run(store, records, specs, self.kms,
                                       await store.list(keys.drills(), DrillRecord))

    # -- base backups -------------------------------------------------------------------------

    async def run_backups(self, store: Store, records: list[BackupRecord]) -> None:
        """Take the backups assigned to this host, a few at once: one waiting for its WAL
        must not hold up the others."""
        self.jobs = {i: t for i, t in self.jobs.items() if not t.done()}
        for r in records:
            if r.host == self.host and r.state == "running" and r.id not in self.jobs:
                r = await store.get(keys.backup(r.database, r.id), BackupRecord)
                if r is None or r.state != "running":
                    continue                        # it just finished
                # ours, but nothing here runs it: this worker restarted in the middle
                event = Event(database=r.database, kind="backup-failed",
                              message=f"backup {r.id} was interrupted: the backup worker on "
                                      f"{self.host} restarted")
                await store.put(keys.event(r.database, event.id), event)
                await store.put(keys.backup(r.database, r.id), r.model_copy(update={
                    "state": "failed", "error": "interrupted: the backup worker restarted",
                    "finished_at": time.time()}))
        pending = sorted((r for r in records if r.host == self.host and r.state == "pending"
                          and r.id not in self.jobs), key=lambda r: r.started_at)
        if self.kms is None:
            return
        for record in pending[:max(0, MAX_JOBS - len(self.jobs))]:
            spec = await store.get(keys.database_spec(record.database), DatabaseSpec)
            repo_spec = await store.get(keys.repository(record.repository), RepositorySpec)
            if spec is None or repo_spec is None:
                await store.put(keys.backup(record.database, record.id), record.model_copy(update={
                    "state": "failed", "finished_at": time.time(),
                    "error": f"database {record.database} or repository {record.repository} is gone"}))
                continue
            job = Job(store, record, open_repository(repo_spec), self.kms, spec.backup.kms_key,
                      self.executor, self.bin_dir, self.host)
            self.jobs[record.id] = asyncio.create_task(job.run(), name=f"backup-{record.id}")

    # -- one database's archive ------------------------------------------------------------

    async def archive(self, store: Store, lease, db: str) -> None:
        failures = 0
        while True:
            if not await store.create(keys.archive_lock(db), self.host, lease=lease) \
                    and not await self._holds(store, db):
                await asyncio.sleep(PASS_INTERVAL)          # another host's worker archives it
                continue
            spec = await store.get(keys.database_spec(db), DatabaseSpec)
            target = await self.target(store, db)
            if spec is None or target is None or self.kms is None:
                await asyncio.sleep(PASS_INTERVAL)          # not created yet, or no leader now
                continue
            try:
                archiver = await self.new_archiver(store, spec)
                archiver.start_fresh = db in self.fresh
                self.fresh.discard(db)
                await archiver.run(target)
            except asyncio.CancelledError:
                raise
            except StreamEnded as e:
                log.info("%s: %s; reconnecting", db, e)    # a switchover or shutdown
                await asyncio.sleep(0.5)
            except ArchiveGap as e:
                log.warning("%s: %s; the archive starts again now", db, e)
                event = Event(database=db, kind="archive-gap",
                              message=f"{e}; archiving starts again at the present: restores cannot "
                                      "cross the gap, backups taken from now on restore")
                await store.put(keys.event(db, event.id), event)
                self.fresh.add(db)
            except Exception as e:
                if not isinstance(e, (ReplicationError, DbplaneError, OSError)):
                    log.exception("%s: archiver failed", db)      # a bug: keep the traceback
                failures += 1
                await self.report_failure(store, spec, e, failures)
                if failures >= RELEASE_AFTER_FAILURES and await self._holds(store, db):
                    await store.delete(keys.archive_lock(db))   # maybe another host does better
                    failures = 0
                await asyncio.sleep(min(30, 2 ** failures))
            else:
                failures = 0

    async def new_archiver(self, store: Store, spec: DatabaseSpec) -> Archiver:
        repo_spec = await store.get(keys.repository(spec.backup.repository), RepositorySpec)
        if repo_spec is None:
            raise DbplaneError(f"repository {spec.backup.repository!r} does not exist",
                               "create it or choose another with 'dbplane backup modify DB --repository R'",
                               code="repository_not_found")
        repo = open_repository(repo_spec)
        last = {"at": 0.0, "state": ""}

        async def publish(status: ArchiveStatus) -> None:
            if status.state != last["state"] or time.monotonic() - last["at"] >= PUBLISH_INTERVAL:
                last.update(at=time.monotonic(), state=status.state)
                await store.put(keys.archive_status(spec.name), status)

        kms_key = spec.backup.kms_key
        archiver = Archiver(spec.name, spec.archive_id, repo,
                            lambda: self.kms.generate_data_key(kms_key), self.executor, publish,
                            spec.backup.archive_timeout, self.host)
        previous = await store.get(keys.archive_status(spec.name), ArchiveStatus)
        if previous is not None and previous.archive_id == spec.archive_id:
            archiver.status = archiver.status.model_copy(update={
                "kms_key_ids": previous.kms_key_ids, "last_segment": previous.last_segment,
                "last_archived_at": previous.last_archived_at})
        return archiver

    async def target(self, store: Store, db: str) -> Target | None:
        leader = await store.get_raw(f"{keys.patroni_scope(db)}leader")
        secrets = await db_secrets.load(store, keys.secrets(db))
        if leader is None or secrets is None:
            return None
        member = await store.get(keys.member(db, leader.decode()), MemberSpec)
        if member is None:
            return None
        return Target(member.address, member.pg_port, secrets.replication)

    async def report_failure(self, store: Store, spec: DatabaseSpec, error: Exception,
                             failures: int) -> None:
        message = str(error) or type(error).__name__
        log.warning("%s: archiving stopped: %s", spec.name, message)
        status = await store.get(keys.archive_status(spec.name), ArchiveStatus) or ArchiveStatus(
            database=spec.name, archive_id=spec.archive_id, repository=spec.backup.repository)
        # a primary that is restarting (dbplane up, a switchover) refuses or drops the stream
        # for a few seconds: that is reconnecting, and failing only if it lasts
        transient = isinstance(error, (ReplicationError, ConnectionError))
        state = "reconnecting" if transient and failures < RELEASE_AFTER_FAILURES else "failing"
        if status.error != message and state == "failing":
            event = Event(database=spec.name, kind="archive-failing",
                          message=f"WAL archiving to {spec.backup.repository} fails: {message}")
            await store.put(keys.event(spec.name, event.id), event)
        # nothing is stored while failing: the lag grows by the time since the last report
        now = time.time()
        await store.put(keys.archive_status(spec.name), status.model_copy(update={
            "state": state, "error": message, "worker": self.host, "updated_at": now,
            "lag_seconds": round(status.lag_seconds + max(0.0, now - status.updated_at), 1)}))


def archive_settings(spec: DatabaseSpec) -> tuple:
    """What an archive stream was started with; a change restarts it."""
    return (spec.archive_id, spec.backup.repository, spec.backup.kms_key, spec.backup.archive_timeout)
