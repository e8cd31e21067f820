"""Continuous WAL archiving of one database: stream WAL from the primary through a
permanent replication slot, cut it into segments, compress, encrypt and upload them, and
only then tell the primary the WAL is safe (the slot moves on).

Repository layout, under the database's archive id:

  wal/<segment>            a complete 16 MB segment, e.g. 000000010000000000000003
  wal/<segment>.partial    the segment being filled, uploaded every archive_timeout
                           seconds (bounds the RPO); the last segment of an ended
                           timeline stays .partial, as pg_receivewal keeps it
  wal/<TLI>.history        timeline history files

The archive resumes at the start of the first segment that is not complete in the
repository, on its timeline. If the server is on a later timeline it streams our
timeline up to the switch point, then says which timeline follows: no gap across
failovers. The slot is created by Patroni on the primary and kept (advanced) on the
standbys, so a new primary still holds the WAL the archive has not stored.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass

from ..models import ARCHIVE_SLOT, ArchiveStatus
from .objects import encode
from .replication import (
    Keepalive,
    ReplicationConnection,
    ReplicationError,
    StreamEnded,
    TimelineEnd,
    XLogData,
)
from .repository import Repository
from .wal import (
    SEGMENT_RE,
    format_lsn,
    history_name,
    parse_history,
    parse_segment_name,
    segment_name,
    segment_start,
    timeline_of,
)

log = logging.getLogger("dbplane.backup.archiver")

MAX_UPLOADS = 3                       # segments compressed and uploaded at once
FEEDBACK_INTERVAL = 1.0               # s between standby status updates
COMPRESSION_LEVEL = 1                 # WAL: speed first; zstd -1 still shrinks it several times


@dataclass(frozen=True)
class Target:
    """Where the primary runs and how to log in for replication."""
    address: str
    port: int
    password: str


@dataclass(frozen=True)
class ResumePoint:
    tli: int
    lsn: int        # a segment start


def wal_prefix(archive_id: str) -> str:
    return f"{archive_id}/wal/"


def resume_point(repo: Repository, archive_id: str, seg_size: int) -> ResumePoint | None:
    """The first segment the repository does not hold complete, after the newest one it
    does; None for an empty archive."""
    best: tuple[int, int, bool] | None = None       # (segment start, tli, complete)
    for obj in repo.list(wal_prefix(archive_id)):
        name = obj.key.rsplit("/", 1)[1]
        complete = SEGMENT_RE.match(name) is not None
        if not complete and not (name.endswith(".partial") and SEGMENT_RE.match(name[:-8])):
            continue
        tli, start = parse_segment_name(name.removesuffix(".partial"), seg_size)
        candidate = (start, tli, complete)
        if best is None or candidate > best:
            best = candidate
    if best is None:
        return None
    start, tli, complete = best
    return ResumePoint(tli, start + seg_size if complete else start)


class ArchiveGap(ReplicationError):
    """The WAL the archive would resume from is gone from the primary (backups were off,
    or the slot was lost): the archive must start again at the present, leaving a gap."""


class Archiver:
    def __init__(self, database: str, archive_id: str, repo: Repository, new_data_key: Callable,
                 executor: Executor, publish: Callable[[ArchiveStatus], Awaitable[None]],
                 archive_timeout: float, worker: str):
        self.database = database
        self.archive_id = archive_id
        self.start_fresh = False              # at the primary's present position (after a gap)
        self.repo = repo
        self.new_data_key = new_data_key      # () -> security.kms.DataKey
        self.executor = executor
        self.publish = publish
        self.archive_timeout = archive_timeout
        self.status = ArchiveStatus(database=database, archive_id=archive_id,
                                    repository=repo.name, worker=worker)
        self.seg_size = 16 * 1024 * 1024
        # stream state
        self.tli = 0
        self.pos = 0                          # next WAL byte expected
        self.seg_lsn = 0                      # start of the segment in self.buf
        self.buf = bytearray()
        self.archived = 0                     # WAL below this is durable in the repository
        self.server_end = 0
        self.partial_end = 0                  # end of the last partial upload scheduled
        self.partial_at = 0.0
        # uploads in WAL order: (end of the WAL they hold, object name, .partial to remove, task)
        self.inflight: collections.deque[tuple[int, str, str, asyncio.Task]] = collections.deque()
        self.partial_task: asyncio.Task | None = None
        self.slots = asyncio.Semaphore(MAX_UPLOADS)
        self.received: collections.deque[tuple[int, float]] = collections.deque()  # (end, when)
        self.key_ids: set[str] = set()

    # -- the stream -------------------------------------------------------------------------

    async def run(self, target: Target) -> None:
        """Stream until the connection breaks or an upload fails (the caller retries)."""
        conn = await ReplicationConnection.connect(target.address, target.port, "replicator",
                                                   target.password, "dbplane_archiver")
        try:
            self.seg_size = _size(await conn.show("wal_segment_size"))
            system = await conn.identify_system()
            # until the stream catches up, the server is ahead by at least this much: the
            # status must not show "0 behind" (and a restorable time) before anything came
            self.server_end = max(self.server_end, system.xlogpos)
            self.received.append((system.xlogpos, time.time()))
            loop = asyncio.get_running_loop()
            resume = None if self.start_fresh else await loop.run_in_executor(
                self.executor, resume_point, self.repo, self.archive_id, self.seg_size)
            if resume is None:
                resume = ResumePoint(system.timeline, segment_start(system.xlogpos, self.seg_size))
                log.info("%s: archive starts at %s on timeline %d", self.database,
                         format_lsn(resume.lsn), resume.tli)
            tli, lsn = await self._on_server_history(conn, system.timeline, resume)
            await self._upload_history(conn, system.timeline)
            self.archived = max(self.archived, lsn)
            while True:
                await self._stream(conn, tli, lsn)
                end = await self._receive_until_timeline_end(conn)
                if end.next_tli is None:
                    raise StreamEnded("the server ended the timeline without naming the next")
                log.info("%s: timeline %d ended at %s; following timeline %d", self.database,
                         tli, format_lsn(end.next_start or 0), end.next_tli)
                await self._finish_segment(final_partial=True)
                await self._drain_uploads(conn)
                await self._upload_history(conn, end.next_tli)
                tli, lsn = end.next_tli, segment_start(end.next_start or 0, self.seg_size)
        finally:
            for *_, task in self.inflight:
                task.cancel()
            self.inflight.clear()
            conn.close()

    async def _on_server_history(self, conn: ReplicationConnection, server_tli: int,
                                 resume: ResumePoint) -> tuple[int, int]:
        """Where to start: our timeline, unless it ended (in the server's history) before
        the resume point; then the timeline that followed, from the switch's segment."""
        tli, lsn = resume.tli, resume.lsn
        if tli == server_tli:
            return tli, lsn
        _, content = await conn.timeline_history(server_tli)
        history = parse_history(content.decode())
        ends = {s.tli: s.end for s in history}
        while tli != server_tli and tli in ends and lsn >= ends[tli]:
            lsn = min(lsn, segment_start(ends[tli], self.seg_size))
            tli = timeline_of(ends[tli], history, server_tli)
        return tli, lsn

    async def _upload_history(self, conn: ReplicationConnection, tli: int) -> None:
        if tli <= 1:
            return
        key = wal_prefix(self.archive_id) + history_name(tli)
        loop = asyncio.get_running_loop()
        if await loop.run_in_executor(self.executor, self.repo.exists, key):
            return
        _, content = await conn.timeline_history(tli)
        await loop.run_in_executor(self.executor, self._put, key, content)

    async def _stream(self, conn: ReplicationConnection, tli: int, lsn: int) -> None:
        try:
            await conn.start(ARCHIVE_SLOT, lsn, tli)
        except ReplicationError as e:
            if e.sqlstate == "58P01":            # "requested WAL segment ... has already been removed"
                raise ArchiveGap(f"the primary no longer has the WAL from {format_lsn(lsn)} on "
                                 f"(timeline {tli}): {e}") from e
            raise
        self.tli, self.pos, self.seg_lsn = tli, lsn, lsn
        self.buf = bytearray()
        self.partial_end, self.partial_at = lsn, time.monotonic()
        self.status = self.status.model_copy(update={"state": "streaming", "timeline": tli,
                                                     "error": ""})

    async def _receive_until_timeline_end(self, conn: ReplicationConnection) -> TimelineEnd:
        ticker = asyncio.create_task(self._tick(conn))
        # an upload that fails ends the stream at once, even if the server is quiet
        ticker.add_done_callback(lambda t: t.cancelled() or t.exception() is None or conn.abort())
        try:
            while True:
                try:
                    msg = await conn.receive()
                except ReplicationError:
                    if ticker.done() and not ticker.cancelled() and ticker.exception():
                        raise ticker.exception() from None
                    raise
                if isinstance(msg, XLogData):
                    self.server_end = max(self.server_end, msg.server_end)
                    await self._append(msg.start, msg.data)
                elif isinstance(msg, Keepalive):
                    self.server_end = max(self.server_end, msg.server_end)
                    if msg.reply_requested:
                        conn.send_status(self.pos, self.archived)
                elif isinstance(msg, TimelineEnd):
                    return msg
        finally:
            ticker.cancel()

    async def _append(self, start: int, data: bytes) -> None:
        if start != self.pos:
            raise ReplicationError(f"WAL arrived at {format_lsn(start)}, expected {format_lsn(self.pos)}")
        view = memoryview(data)
        while view:
            room = self.seg_size - len(self.buf)
            self.buf += view[:room]
            view = view[room:]
            self.pos = self.seg_lsn + len(self.buf)
            if len(self.buf) == self.seg_size:
                await self._finish_segment(final_partial=False)
        self.received.append((self.pos, time.time()))

    async def _finish_segment(self, final_partial: bool) -> None:
        """Upload the buffered segment: complete, or (at a timeline's end) as .partial."""
        name = segment_name(self.tli, self.seg_lsn, self.seg_size)
        data, end = bytes(self.buf), self.pos
        if final_partial:
            if end > self.seg_lsn:
                await self._schedule(name + ".partial", data, end)
        else:
            await self._schedule(name, data, end, remove=name + ".partial")
            self.seg_lsn = self.pos
            self.buf = bytearray()
        self.partial_end, self.partial_at = self.pos, time.monotonic()

    async def _schedule(self, name: str, data: bytes, end: int, remove: str = "") -> asyncio.Task:
        """Upload in the background, at most MAX_UPLOADS at once: when all slots are busy
        the stream stops being read, and the server waits (TCP backpressure)."""
        await self.slots.acquire()
        key = wal_prefix(self.archive_id) + name
        loop = asyncio.get_running_loop()

        async def upload() -> None:
            try:
                await loop.run_in_executor(self.executor, self._put, key, data)
            finally:
                self.slots.release()
        task = asyncio.create_task(upload())
        self.inflight.append((end, name, remove, task))
        return task

    def _put(self, key: str, data: bytes) -> None:
        dk = self.new_data_key()
        self.key_ids.add(dk.key_id)
        self.repo.put(key, encode([data], data_key=dk.plaintext, wrapped_key=dk.wrapped,
                                  key_id=dk.key_id, key_version=dk.key_version,
                                  level=COMPRESSION_LEVEL))

    async def _collect(self) -> bool:
        """Move `archived` over uploads that finished, in WAL order; True if it moved."""
        moved = False
        while self.inflight and self.inflight[0][3].done():
            end, name, remove, task = self.inflight.popleft()
            task.result()                           # raises the upload's error
            if remove:
                key = wal_prefix(self.archive_id) + remove
                await asyncio.get_running_loop().run_in_executor(self.executor, self.repo.delete, key)
            if end > self.archived:
                self.archived, moved = end, True
                self.status = self.status.model_copy(update={
                    "last_segment": name, "last_archived_at": time.time()})
        while self.received and self.received[0][0] <= self.archived:
            self.received.popleft()
        return moved

    async def _drain_uploads(self, conn: ReplicationConnection) -> None:
        while self.inflight:
            await asyncio.wait([self.inflight[0][3]])
            await self._collect()
        conn.send_status(self.pos, self.archived)
        await conn.drain()

    async def _tick(self, conn: ReplicationConnection) -> None:
        """Feedback to the server, partial uploads (the RPO bound) and status reports."""
        reported = 0.0
        while True:
            await asyncio.sleep(0.2)
            moved = await self._collect()
            now = time.monotonic()
            if (self.pos > self.partial_end and now - self.partial_at >= self.archive_timeout
                    and (self.partial_task is None or self.partial_task.done())):
                # one partial at a time: an older one must never land after a newer one
                self.partial_end, self.partial_at = self.pos, now
                self.partial_task = await self._schedule(
                    segment_name(self.tli, self.seg_lsn, self.seg_size) + ".partial",
                    bytes(self.buf), self.pos)
            if moved or now - reported >= FEEDBACK_INTERVAL:
                conn.send_status(self.pos, self.archived)
                await conn.drain()
            if now - reported >= FEEDBACK_INTERVAL:
                reported = now
                await self.publish(self.snapshot())

    def snapshot(self) -> ArchiveStatus:
        lag_seconds = time.time() - self.received[0][1] if self.received else 0.0
        return self.status.model_copy(update={
            "timeline": self.tli, "archived_lsn": format_lsn(self.archived),
            "server_lsn": format_lsn(max(self.server_end, self.pos)),
            "lag_bytes": max(0, max(self.server_end, self.pos) - self.archived),
            "lag_seconds": round(max(0.0, lag_seconds), 3),
            "kms_key_ids": sorted(set(self.status.kms_key_ids) | self.key_ids),
            "updated_at": time.time()})


def _size(text: str) -> int:
    """'16MB' -> bytes (SHOW output)."""
    units = {"kB": 1024, "MB": 1024 ** 2, "GB": 1024 ** 3}
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(text[:-len(unit)]) * factor
    return int(text)

