"""Server connection pools: one per (database, PostgreSQL database name, user), with
connections to several nodes (the primary, replicas), and a queue of clients waiting
for one.

Limits: a pool opens at most `pool_size` connections to one node, and all pools of a
database together at most the budget the controller gives this proxy per node (so that
every proxy together stays below max_connections minus the reserve). A client that finds
neither an idle connection nor room for a new one waits in the database's queue until
one is released, up to `queue_timeout`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .server import ServerConn, ServerError

if TYPE_CHECKING:
    from .client import ClientConn
    from .cluster import Cluster

log = logging.getLogger("dbplane.proxy")


class PoolExhausted(Exception):
    def __init__(self, waiting: int, limit: int, waited: float):
        super().__init__()
        self.waiting, self.limit, self.waited = waiting, limit, waited


class NoTarget(Exception):
    """No node can serve this role (no primary during a failover, for longer than the hold)."""


@dataclass
class PoolStats:
    xacts: int = 0
    queries: int = 0
    wait_total: float = 0.0      # seconds clients waited for a server connection
    wait_max: float = 0.0
    waits: int = 0
    pinned_total: int = 0
    pinned_reasons: collections.Counter = field(default_factory=collections.Counter)
    errors: int = 0              # errors the proxy sent to clients (exhausted, failover, ...)
    server_errors: int = 0       # ErrorResponses passed on from the server
    queue_timeouts: int = 0
    logins: int = 0
    login_failures: int = 0

    def count_wait(self, waited: float) -> None:
        self.waits += 1
        self.wait_total += waited
        self.wait_max = max(self.wait_max, waited)


class Waiter:
    """A client in the queue. deliver(server) hands it a server connection; deliver(None)
    tells it to look again (room was made, or the topology changed)."""
    __slots__ = ("pool", "members", "deliver", "done", "on_timeout", "since")

    def __init__(self, pool: Pool, members: list[str], deliver, on_timeout=None):
        self.pool, self.members, self.deliver = pool, members, deliver
        self.done = False
        self.on_timeout = on_timeout      # called by the cluster's sweep after queue_timeout
        self.since = time.monotonic()

    def hand(self, server: ServerConn | None) -> None:
        self.done = True
        self.deliver(server)


class Pool:
    def __init__(self, cluster: Cluster, dbname: str, user: str):
        self.cluster = cluster
        self.dbname = dbname
        self.user = user
        self.idle: dict[str, list[ServerConn]] = collections.defaultdict(list)
        self.servers: set[ServerConn] = set()
        self.open_count: collections.Counter = collections.Counter()   # member -> len(servers there)
        self.opening: collections.Counter = collections.Counter()
        self.clients: set[ClientConn] = set()
        self.stats = PoolStats()
        self.client_key: bytes = b""          # from the last client that logged in
        self.server_key: bytes = b""
        self.server_params: dict[str, str] = {}

    # -- counting ----------------------------------------------------------------------

    def count(self, member: str) -> int:
        return self.open_count[member] + self.opening[member]

    def count_ready(self, server: ServerConn) -> None:
        if server.status == b"I":
            self.stats.xacts += 1

    # -- acquiring -----------------------------------------------------------------------

    def take_idle(self, members: list[str]) -> ServerConn | None:
        for member in members:
            stack = self.idle.get(member)
            while stack:
                server = stack.pop()           # most recently used: warm caches, others time out
                if not server.closed:
                    return server
        return None

    def room(self, members: list[str]) -> str | None:
        """A member to which this pool may open one more connection."""
        size = self.cluster.settings.pool_size
        for member in members:
            if self.count(member) < size and self.cluster.member_count(member) < self.cluster.budget:
                return member
        return None

    async def acquire(self, client: ClientConn, role: str, min_lsn: int | None = None) -> ServerConn:
        cluster = self.cluster
        loop = asyncio.get_running_loop()
        started = loop.time()
        queue_deadline = started + cluster.settings.queue_timeout
        hold_deadline = started + cluster.settings.failover_hold
        try:
            while True:
                members = await cluster.targets(role, min_lsn)
                if not members:
                    if loop.time() >= hold_deadline:
                        raise NoTarget()
                    await cluster.wait_change(hold_deadline - loop.time())
                    continue
                server = self.take_idle(members)
                if server is not None:
                    return server
                member = self.room(members)
                if member is not None:
                    try:
                        return await self.open(member)
                    except OSError as e:
                        # the node is down or restarting (a failover): retry within the hold
                        cluster.member_unreachable(member, e)
                        if loop.time() >= hold_deadline:
                            raise NoTarget() from e
                        await cluster.wait_change(min(0.5, hold_deadline - loop.time()))
                        continue
                remaining = queue_deadline - loop.time()
                if remaining <= 0:
                    raise PoolExhausted(self.waiting(), min(cluster.settings.pool_size, cluster.budget),
                                        loop.time() - started)
                future = loop.create_future()
                waiter = Waiter(self, members, lambda s, f=future: f.done() or f.set_result(s))
                cluster.waiters.append(waiter)
                try:
                    server = await asyncio.wait_for(future, remaining)
                except TimeoutError:
                    self.stats.queue_timeouts += 1
                    raise PoolExhausted(self.waiting() + 1,
                                        min(cluster.settings.pool_size, cluster.budget),
                                        loop.time() - started) from None
                finally:
                    self.leave(waiter)
                if server is not None:
                    return server
        finally:
            self.stats.count_wait(loop.time() - started)

    def enqueue(self, members: list[str], deliver, on_timeout) -> Waiter:
        """Wait for a connection without a task or a timer (the common case when the pool
        is full); the cluster's sweep times the wait out."""
        waiter = Waiter(self, members, deliver, on_timeout)
        self.cluster.waiters.append(waiter)
        return waiter

    def timed_out(self, waiter: Waiter) -> None:
        if waiter.done:
            return
        self.leave(waiter)
        waited = time.monotonic() - waiter.since
        self.stats.count_wait(waited)
        self.stats.queue_timeouts += 1
        waiter.on_timeout(PoolExhausted(self.waiting() + 1, min(self.cluster.settings.pool_size,
                                                         self.cluster.budget), waited))

    def leave(self, waiter: Waiter) -> None:
        if not waiter.done:
            waiter.done = True
            if waiter in self.cluster.waiters:
                self.cluster.waiters.remove(waiter)

    def waiting(self) -> int:
        return sum(1 for w in self.cluster.waiters if w.pool is self and not w.done)

    async def open(self, member: str) -> ServerConn:
        address, port = self.cluster.members[member]
        self.opening[member] += 1
        self.cluster.connections[member] += 1
        try:
            loop = asyncio.get_running_loop()
            _, server = await asyncio.wait_for(
                loop.create_connection(lambda: ServerConn(self, member, address, port), address, port),
                timeout=5)
            try:
                await asyncio.wait_for(
                    server.login(self.user, self.dbname, self.client_key, self.server_key,
                                 {"application_name": "dbplane-proxy"}), timeout=10)
            except (ServerError, OSError, TimeoutError):
                server.transport.close()
                raise
            self.servers.add(server)
            self.open_count[member] += 1
            self.cluster.connections[member] += 1
            if not self.server_params:
                self.server_params = dict(server.params)
            return server
        except TimeoutError as e:
            raise ConnectionError(f"{address}:{port} did not answer within the connect timeout") from e
        finally:
            self.opening[member] -= 1
            self.cluster.connections[member] -= 1

    # -- giving back -----------------------------------------------------------------------

    def release(self, server: ServerConn) -> None:
        """A clean, idle server connection comes back from a client."""
        server.client = None
        server.last_used = time.monotonic()
        if server.closed:
            return
        cluster = self.cluster
        if cluster.waiters:
            for waiter in cluster.waiters:
                if waiter.pool is self and not waiter.done and server.member in waiter.members:
                    cluster.waiters.remove(waiter)
                    self.stats.count_wait(time.monotonic() - waiter.since)
                    waiter.hand(server)
                    return
        if (server.member != cluster.primary and server.member not in cluster.usable_members()) \
                or self.over_limit(server.member):
            self.discard(server)       # the old primary after a switchover; a lowered limit
            return
        if any(not w.done for w in cluster.waiters):
            # clients of another pool wait for room under the database's budget
            self.discard(server)
            return
        self.idle[server.member].append(server)

    def _forget(self, server: ServerConn) -> bool:
        if server not in self.servers:
            return False
        self.servers.discard(server)
        self.open_count[server.member] -= 1
        self.cluster.connections[server.member] -= 1
        return True

    def discard(self, server: ServerConn) -> None:
        self._forget(server)
        stack = self.idle.get(server.member)
        if stack and server in stack:
            stack.remove(server)
        server.client = None
        server.close()
        self.cluster.wake_one()

    def server_lost(self, server: ServerConn) -> None:
        if self._forget(server):
            stack = self.idle.get(server.member)
            if stack and server in stack:
                stack.remove(server)
            self.cluster.wake_one()

    def over_limit(self, member: str) -> bool:
        return (self.count(member) > self.cluster.settings.pool_size
                or self.cluster.member_count(member) > self.cluster.budget)

    def trim(self) -> None:
        """Close idle connections above a lowered pool size or budget."""
        for member, stack in list(self.idle.items()):
            while stack and self.over_limit(member):
                self.discard(stack[0])

    def close_idle(self, older_than: float | None = None, members: set[str] | None = None) -> None:
        now = time.monotonic()
        for member, stack in list(self.idle.items()):
            for server in list(stack):
                if (older_than is None or now - server.last_used > older_than) and \
                        (members is None or member in members):
                    self.discard(server)

    # -- stats -------------------------------------------------------------------------------

    def snapshot(self) -> dict:
        active = sum(1 for s in self.servers if s.client is not None)
        idle = sum(len(v) for v in self.idle.values())
        attached = sum(1 for c in self.clients if c.server is not None)
        waiting = self.waiting()
        s = self.stats
        return {
            "database": self.cluster.name, "dbname": self.dbname, "user": self.user,
            "pool_mode": self.cluster.settings.pool_mode,
            "cl_active": attached, "cl_waiting": waiting, "cl_idle": len(self.clients) - attached - waiting,
            "sv_active": active, "sv_idle": idle, "sv_opening": sum(self.opening.values()),
            "sv_by_member": dict(collections.Counter(x.member for x in self.servers)),
            "pinned": sum(1 for c in self.clients if c.pinned), "pinned_total": s.pinned_total,
            "pinned_reasons": dict(s.pinned_reasons),
            "xact_total": s.xacts, "query_total": s.queries,
            "wait_total_s": round(s.wait_total, 6), "wait_max_s": round(s.wait_max, 6), "waits": s.waits,
            "errors": s.errors, "server_errors": s.server_errors, "queue_timeouts": s.queue_timeouts,
            "logins": s.logins, "login_failures": s.login_failures,
        }
