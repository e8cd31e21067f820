"""How far each node of a database has got in the WAL, polled every half second by
every proxy: the primary's flushed LSN and each replica's replayed LSN. The reader
endpoint uses it to skip replicas that lag more than the bound, and read-your-writes to
find a replica that has replayed a given LSN."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

import psycopg

from . import pgconn

if TYPE_CHECKING:
    from .cluster import Cluster

log = logging.getLogger("dbplane.proxy")

POLL = 0.5            # seconds between polls of one node
STALE = 3.0           # a position older than this does not count
CATCH_UP = 0.2        # read-your-writes waits at most this long for a replica to replay

POSITION = ("SELECT pg_is_in_recovery(), (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() "
            "ELSE pg_current_wal_flush_lsn() END - '0/0')::bigint")


class LsnMonitor:
    def __init__(self, cluster: Cluster, password: str):
        self.cluster = cluster
        self.password = password
        self.positions: dict[str, tuple[bool, int, float]] = {}   # member -> (replica?, lsn, when)
        self._tasks: dict[str, asyncio.Task] = {}
        self._polled = asyncio.Event()
        self._wake = asyncio.Event()
        self._primary_lock = asyncio.Lock()
        self._primary_conn: psycopg.AsyncConnection | None = None

    def update(self) -> None:
        """Poll exactly the current members."""
        members = set(self.cluster.members)
        for member in list(self._tasks):
            if member not in members:
                self._tasks.pop(member).cancel()
                self.positions.pop(member, None)
        for member in members - set(self._tasks):
            self._tasks[member] = asyncio.ensure_future(self._poll(member))

    async def _poll(self, member: str) -> None:
        conn = None
        while True:
            try:
                if conn is None or conn.closed:
                    address, port = self.cluster.members[member]
                    conn = await pgconn.connect(address, port, self.password, "monitor")
                cur = await conn.execute(POSITION)
                replica, lsn = await cur.fetchone()
                self.positions[member] = (bool(replica), int(lsn or 0), time.monotonic())
                self._polled.set()
                self._polled = asyncio.Event()
            except asyncio.CancelledError:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close()
                raise
            except (psycopg.Error, OSError, KeyError):
                self.positions.pop(member, None)
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close()
                conn = None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), POLL)

    def _primary_position(self) -> int | None:
        primary = self.cluster.primary
        pos = self.positions.get(primary) if primary else None
        if pos is None or pos[0] or time.monotonic() - pos[2] > STALE:
            return None
        return pos[1]

    def lag(self, member: str) -> int | None:
        pos = self.positions.get(member)
        primary = self._primary_position()
        if pos is None or not pos[0] or primary is None or time.monotonic() - pos[2] > STALE:
            return None
        return max(0, primary - pos[1])

    def fresh(self, member: str, bound: int, min_lsn: int | None) -> bool:
        lag = self.lag(member)
        if lag is None or lag > bound:
            return False
        return min_lsn is None or self.positions[member][1] >= min_lsn

    async def primary_lsn(self) -> int | None:
        """The primary's flushed WAL position, read now: every commit acknowledged before
        this call is at or below it. None if the primary cannot be asked."""
        primary = self.cluster.primary
        if primary is None:
            return None
        async with self._primary_lock:
            try:
                if self._primary_conn is None or self._primary_conn.closed:
                    address, port = self.cluster.members[primary]
                    self._primary_conn = await pgconn.connect(address, port, self.password, "lsn")
                cur = await self._primary_conn.execute(POSITION)
                replica, lsn = await cur.fetchone()
                return None if replica else int(lsn)
            except (psycopg.Error, OSError, KeyError):
                self._primary_conn = None
                return None

    async def catch_up(self, min_lsn: int) -> None:
        """Poll the replicas again at once, for at most CATCH_UP seconds, until one has
        replayed min_lsn."""
        deadline = time.monotonic() + CATCH_UP
        while time.monotonic() < deadline:
            self._wake.set()
            self._wake = asyncio.Event()
            polled = self._polled
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(polled.wait(), max(0.005, deadline - time.monotonic()))
            if self.cluster.readable_replicas(min_lsn):
                return

    def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        self._tasks.clear()
        if self._primary_conn is not None:
            asyncio.ensure_future(self._primary_conn.close())
            self._primary_conn = None
