"""The controller process: one active instance (elected through an etcd lease) runs
reconcile passes whenever anything under dbplane's or Patroni's keys changes."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from pathlib import Path

from ..alarms.evaluator import AlarmEvaluator
from ..errors import CapacityError, DbplaneError, MemberFailed, StoreUnavailable
from ..models import DatabaseSpec, Operation, PlatformConfig
from ..security import ca
from ..security.tls import etcd_client_tls
from ..store import Store, keys
from . import kms, operations, patroni_rest, promote, replicas, switchover
from .actions import Actions
from .changes import progress as progress_modify
from .databases import Pass, ensure_database, ensure_deleted
from .topology import Snapshot, member_views

log = logging.getLogger("dbplane.controller")

LEADER_TTL = 10
PASS_INTERVAL = 2.0


class Controller:
    def __init__(self, etcd_url: str, data_root: Path):
        self.etcd_url = etcd_url
        self.data_root = data_root
        patroni_rest.trust(ca.cert_path(data_root))      # Patroni's REST API is https
        self.identity = f"{socket.gethostname()}:{id(self)}"
        self._stopping = asyncio.Event()
        self.started_at = time.time()
        self.actions = Actions()          # long Patroni calls, shared by all passes
        self.alarms = AlarmEvaluator(data_root)   # evaluates every alarm every 10 s while leading

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        while not self._stopping.is_set():
            try:
                async with Store(self.etcd_url, tls=etcd_client_tls(self.data_root)) as store:
                    await self._lead(store)
            except StoreUnavailable as e:
                log.warning("%s; retrying", e)
                await self._sleep(2.0)

    async def _sleep(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), timeout)
        except TimeoutError:
            pass

    async def _lead(self, store: Store) -> None:
        lease = await store.lease(LEADER_TTL)
        while not await store.create(keys.controller_leader(), self.identity, lease=lease):
            if self._stopping.is_set():
                return
            await store.refresh(lease)
            await self._sleep(PASS_INTERVAL)       # another controller leads; stand by
        log.info("controller %s is leading", self.identity)
        changes = store.changes(keys.ROOT, keys.PATRONI_NAMESPACE + "/")
        alarms = asyncio.create_task(self.alarms.run(store, self._stopping))
        try:
            while not self._stopping.is_set():
                await store.refresh(lease)
                await self.reconcile(store)
                await changes.wait(PASS_INTERVAL)
            await store.delete(keys.controller_leader())
        finally:
            alarms.cancel()
            await asyncio.gather(alarms, return_exceptions=True)
            changes.close()

    async def snapshot(self, store: Store) -> Snapshot:
        raw = await store.get_prefix(keys.ROOT)
        raw.update(await store.get_prefix(keys.PATRONI_NAMESPACE + "/"))
        return Snapshot(raw)

    async def reconcile(self, store: Store) -> None:
        snap = await self.snapshot(store)
        config = await store.get(keys.config(), PlatformConfig) or PlatformConfig()
        p = Pass(store=store, snap=snap, config=config, data_root=self.data_root,
                 actions=self.actions, started_at=self.started_at)
        for spec in snap.specs().values():
            try:
                if spec.deleting:
                    await ensure_deleted(p, spec)
                else:
                    await ensure_database(p, spec)
            except StoreUnavailable:
                raise
            except (CapacityError, MemberFailed) as e:
                await self.fail_creation(p, spec, e)
            except DbplaneError as e:
                log.warning("%s: %s", spec.name, e)
            except Exception:
                log.exception("reconciling %s", spec.name)
        try:                                  # KMS keys: rotation, deletion when due
            await kms.ensure_keys(store, config.kms_root_file)
        except StoreUnavailable:
            raise
        except DbplaneError as e:
            log.warning("KMS keys: %s", e)
        except Exception:
            log.exception("KMS keys")
        snap = await self.snapshot(store)     # operations judge what this pass achieved
        for op in snap.operations():
            if not op.done:
                await self.progress(store, snap, op)

    async def fail_creation(self, p: Pass, spec: DatabaseSpec, error: DbplaneError) -> None:
        """A database that cannot be placed is rolled back; its create operation fails."""
        status = p.snap.status(spec.name)
        if status is not None and status.ever_available:
            log.warning("%s: %s", spec.name, error)   # an existing database keeps running
            await operations.record_event(p.store, spec.name, "placement-failed", str(error))
            return
        for op in p.snap.operations():
            if op.database == spec.name and op.kind in ("create", "restore") and not op.done:
                await operations.update(p.store, op, state="failed", error=error,
                                        message=f"rolled back: {error.message}")
        await operations.update_spec(p.store, p.snap.raw.get(keys.database_spec(spec.name)), spec,
                                     deleting=True)

    async def progress(self, store: Store, snap: Snapshot, op: Operation) -> None:
        if op.kind in ("switchover", "failover"):
            await switchover.progress(store, snap, op, self.actions)
            return
        drivers = {"add-replica": replicas.progress_add, "remove-replica": replicas.progress_remove,
                   "promote-replica": promote.progress, "modify": progress_modify}
        if op.kind in drivers:
            await drivers[op.kind](store, snap, op)
            return
        spec = snap.specs().get(op.database)
        status = snap.status(op.database)
        if op.kind in ("create", "restore"):
            if spec is None or spec.deleting:
                if op.state != "failed":
                    await operations.update(store, op, state="failed", message="database was deleted")
                return
            if status is not None and status.phase == "available":
                await operations.update(store, op, state="succeeded", progress=100,
                                        message=f"database {op.database} is available")
                return
            views = member_views(snap, op.database)
            running = sum(1 for v in views if v.role == "primary" or v.state == "streaming")
            total = max(1, len(views))
            pct = 10 + int(80 * running / total) + (5 if status and status.admin_ready else 0)
            await operations.update(store, op, state="running", progress=min(pct, 99),
                                    message=status.message if status else "placing members")
        elif op.kind == "delete":
            if spec is None:
                await operations.update(store, op, state="succeeded", progress=100,
                                        message=f"database {op.database} deleted")
            else:
                await operations.update(store, op, state="running", progress=50,
                                        message=status.message if status else "deleting")
