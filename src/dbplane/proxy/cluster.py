"""What one proxy knows about one database: its settings, its nodes, who is primary
(from Patroni's leader key, watched in etcd), which replicas are fresh enough to read
from (from the LSN monitor), and its pools."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import time
from dataclasses import dataclass

from ..models import ProxySettings
from .auth import Authenticator
from .monitor import LsnMonitor
from .pool import Pool

log = logging.getLogger("dbplane.proxy")

SWEEP_INTERVAL = 0.1     # seconds between looks for clients queued longer than queue_timeout


@dataclass(frozen=True)
class Topology:
    """From one etcd read: the nodes and who leads."""
    members: dict[str, tuple[str, int]]   # member -> (address, port)
    primary: str | None                   # Patroni's leader, if it runs as primary
    replicas: tuple[str, ...]             # running replicas and standbys
    draining: str | None                  # primary a switchover is moving away from


class Cluster:
    def __init__(self, name: str, settings: ProxySettings, superuser_password: str):
        self.name = name
        self.settings = settings
        self.budget = 1                    # server connections per node for this proxy
        self.members: dict[str, tuple[str, int]] = {}
        self.primary: str | None = None
        self.replicas: tuple[str, ...] = ()
        self.draining: str | None = None
        self.stopped = False
        self.clients = 0                   # client connections to this proxy, logged in or not
        self.pools: dict[tuple[str, str], Pool] = {}
        self.connections: collections.Counter = collections.Counter()   # member -> open + opening
        self.writer_targets: list[str] = []
        self._applied: tuple | None = None     # the (topology, settings, budget) last applied
        self.waiters: collections.deque = collections.deque()
        self._changed = asyncio.Event()
        self._rotation = itertools.count()
        self.auth = Authenticator(self, superuser_password)
        self.monitor = LsnMonitor(self, superuser_password)
        self.unreachable: dict[str, str] = {}
        self._sweeper = asyncio.ensure_future(self._sweep())

    def set_superuser_password(self, password: str) -> None:
        """After a credential rotation: new lookups log in with the new password (open
        sessions keep working; PostgreSQL checks passwords at login only)."""
        if password != self.auth.password:
            self.auth.password = self.monitor.password = password
            self.auth.forget_all()        # the admin user's password changed with it

    def pool(self, dbname: str, user: str) -> Pool:
        key = (dbname, user)
        pool = self.pools.get(key)
        if pool is None:
            pool = self.pools[key] = Pool(self, dbname, user)
        return pool

    def member_count(self, member: str) -> int:
        return self.connections[member]

    # -- topology ----------------------------------------------------------------------

    def update(self, topology: Topology, settings: ProxySettings, budget: int) -> None:
        """Apply what etcd says now. Called on every change under the watched prefixes
        (Patroni refreshes its keys every loop), so it acts only when something differs:
        waking the queue would cost waiting clients their place."""
        state = (topology, settings, budget)
        if state == self._applied:
            return
        self._applied = state
        old_primary = self.primary
        self.settings = settings
        self.budget = max(1, budget)
        self.members = topology.members
        self.primary = topology.primary
        self.replicas = topology.replicas
        self.draining = topology.draining if topology.draining == topology.primary else None
        self.writer_targets = [self.primary] if self.primary and not self.draining else []
        self.monitor.update()
        gone = set()
        if old_primary and old_primary != self.primary:
            log.info("%s: primary changed from %s to %s", self.name, old_primary, self.primary)
            gone.add(old_primary)           # its connections either died or now lead to a replica
        gone |= {m for p in self.pools.values() for m in p.idle if m not in self.members}
        for pool in self.pools.values():
            pool.close_idle(members=gone)
            pool.trim()
        self.unreachable.clear()
        self.notify()

    def notify(self) -> None:
        """Topology or capacity changed: every waiting client looks again."""
        self._changed.set()
        self._changed = asyncio.Event()
        waiters, self.waiters = self.waiters, collections.deque()
        for waiter in waiters:
            if not waiter.done:
                waiter.hand(None)

    async def wait_change(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), max(0.01, timeout))

    def wake_one(self) -> None:
        """Room for one more server connection: the first waiter tries again."""
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done:
                waiter.hand(None)
                return

    async def _sweep(self) -> None:
        """Time out queued clients (one sweep instead of a timer per waiting client)."""
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            if not self.waiters:
                continue
            limit = time.monotonic() - self.settings.queue_timeout
            for waiter in [w for w in self.waiters if w.on_timeout and not w.done and w.since <= limit]:
                waiter.pool.timed_out(waiter)

    def member_unreachable(self, member: str, error: Exception) -> None:
        if member not in self.unreachable:
            log.info("%s: cannot reach %s: %s", self.name, member, error)
        self.unreachable[member] = str(error)

    # -- routing --------------------------------------------------------------------------

    def usable_members(self) -> set[str]:
        usable = set(self.readable_replicas())
        if self.primary:
            usable.add(self.primary)
        return usable

    def readable_replicas(self, min_lsn: int | None = None) -> list[str]:
        bound = self.settings.reader_max_lag_bytes
        return [m for m in self.replicas
                if m in self.members and self.monitor.fresh(m, bound, min_lsn)]

    def targets_now(self, role: str, min_lsn: int | None = None) -> list[str]:
        """Members that may serve a new transaction of this role, preferred first."""
        if role == "writer":
            return self.writer_targets
        readers = self.readable_replicas(min_lsn)
        if readers:
            start = next(self._rotation) % len(readers)
            return readers[start:] + readers[:start]
        return [self.primary] if self.primary and not self.draining else []

    async def targets(self, role: str, min_lsn: int | None = None) -> list[str]:
        if role == "reader" and min_lsn is not None and not self.readable_replicas(min_lsn):
            await self.monitor.catch_up(min_lsn)   # replicas may be a moment behind: look again
        return self.targets_now(role, min_lsn)

    # -- switchover drain ------------------------------------------------------------------

    def writer_transactions(self) -> int:
        """Server connections to the primary inside a transaction or a query."""
        return sum(1 for p in self.pools.values() for s in p.servers
                   if s.member == self.draining and s.client is not None and s.busy)

    def close(self) -> None:
        self.stopped = True
        self._sweeper.cancel()
        self.monitor.close()
        self.auth.close()
        for pool in self.pools.values():
            for server in list(pool.servers):
                server.close()
        self.notify()

    def snapshot(self) -> list[dict]:
        return [p.snapshot() for p in self.pools.values()]
