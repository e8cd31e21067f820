"""A physical replication client (the streaming replication protocol), enough to archive
WAL: IDENTIFY_SYSTEM, TIMELINE_HISTORY, START_REPLICATION SLOT ... PHYSICAL and standby
status updates. pg_receivewal does the same but reports WAL as flushed once it is on
local disk; the archiver reports it only once it is durable in the repository, so the
replication slot never lets the primary drop WAL that is not archived.
https://www.postgresql.org/docs/current/protocol-replication.html
"""

from __future__ import annotations

import asyncio
import ssl
import struct
import time
from dataclasses import dataclass

from .. import pgwire as wire
from ..security.scram import ClientExchange, ScramAuthFailed, ScramError
from ..security.tls import node_context
from .wal import format_lsn, parse_lsn

# microseconds between the Unix epoch and PostgreSQL's (2000-01-01)
PG_EPOCH_OFFSET_US = 946_684_800 * 1_000_000
XLOG_DATA = struct.Struct("!QQQ")          # 'w': start, end of WAL on the server, send time
KEEPALIVE = struct.Struct("!QQB")          # 'k': end of WAL, send time, reply requested
STATUS = struct.Struct("!cQQQQB")          # 'r': written, flushed, applied, clock, reply


class ReplicationError(Exception):
    """The server refused or broke the replication connection."""

    def __init__(self, message: str, sqlstate: str = ""):
        super().__init__(message)
        self.sqlstate = sqlstate


class StreamEnded(ReplicationError):
    """The server stopped streaming on purpose (shutdown, switchover): reconnect."""


@dataclass(frozen=True)
class SystemInfo:
    system_id: str
    timeline: int
    xlogpos: int


@dataclass(frozen=True)
class XLogData:
    start: int
    data: bytes
    server_end: int
    sent_at: float


@dataclass(frozen=True)
class Keepalive:
    server_end: int
    reply_requested: bool


@dataclass(frozen=True)
class TimelineEnd:
    """The streamed timeline ended; `next_tli` starts at `next_start`."""
    next_tli: int | None
    next_start: int | None


def pg_now() -> int:
    return int(time.time() * 1_000_000) - PG_EPOCH_OFFSET_US


class ReplicationConnection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._reader, self._writer = reader, writer
        self.streaming = False

    @classmethod
    async def connect(cls, host: str, port: int, user: str, password: str,
                      application_name: str, timeout: float = 5.0) -> ReplicationConnection:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        conn = cls(reader, writer)
        try:
            await asyncio.wait_for(conn._start_tls(host), timeout)
            await asyncio.wait_for(conn._startup(user, password, application_name), timeout)
        except BaseException:
            conn.close()
            raise
        return conn

    async def _start_tls(self, host: str) -> None:
        """Where the nodes offer TLS (they then accept nothing else): SSLRequest, then a
        handshake verified against the platform CA (security/tls.py)."""
        context = node_context()
        if context is None:
            return
        self._writer.write(wire.INT32.pack(8) + wire.INT32.pack(wire.SSL_REQUEST))
        try:
            if await self._reader.readexactly(1) != b"S":
                raise ReplicationError(f"node {host} does not offer TLS although its build has it")
            await self._writer.start_tls(context, server_hostname=host)
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError) as e:
            raise ReplicationError(f"TLS to node {host} failed: {e}") from e

    async def _startup(self, user: str, password: str, application_name: str) -> None:
        self._writer.write(wire.startup_message({"user": user, "replication": "true",
                                                 "application_name": application_name}))
        scram: ClientExchange | None = None
        while True:
            kind, body = await self._read()
            if kind == b"R":
                code = wire.INT32.unpack_from(body)[0]
                if code == wire.AUTH_SASL:
                    scram = ClientExchange(password=password)
                    self._writer.write(wire.sasl_initial_response("SCRAM-SHA-256", scram.first()))
                elif code == wire.AUTH_SASL_CONTINUE and scram:
                    try:
                        self._writer.write(wire.sasl_response(scram.final(body[4:])))
                    except ScramError as e:
                        raise ReplicationError(str(e)) from e
                elif code == wire.AUTH_SASL_FINAL and scram:
                    try:
                        scram.verify(body[4:])
                    except (ScramError, ScramAuthFailed) as e:
                        raise ReplicationError(str(e)) from e
                elif code != wire.AUTH_OK:
                    raise ReplicationError(f"unsupported authentication method {code} "
                                           "(dbplane uses scram-sha-256)")
            elif kind == b"Z":
                return

    def close(self) -> None:
        try:
            self._writer.write(wire.TERMINATE)
        except Exception:
            pass
        self._writer.close()

    def abort(self) -> None:
        """Break the connection now (a reader waiting on it gets ReplicationError)."""
        self._writer.transport.abort()

    # -- messages -------------------------------------------------------------------------

    async def _read(self) -> tuple[bytes, bytes]:
        """The next message that is not a notice or a parameter status; an ErrorResponse
        becomes ReplicationError."""
        while True:
            try:
                header = await self._reader.readexactly(5)
                kind, length = wire.HEADER.unpack(header)
                body = await self._reader.readexactly(length - 4)
            except (asyncio.IncompleteReadError, ConnectionError) as e:
                raise ReplicationError("the server closed the replication connection") from e
            if kind == b"E":
                fields = wire.parse_error_fields(body)
                raise ReplicationError(fields.get("M", "unknown error"), fields.get("C", ""))
            if kind in (b"N", b"S", b"K"):
                continue
            return kind, body

    async def simple_query(self, sql: str) -> list[list[str | None]]:
        """Run a replication command; its rows as text."""
        self._writer.write(wire.query(sql))
        rows: list[list[str | None]] = []
        error: ReplicationError | None = None
        while True:
            try:
                kind, body = await self._read()
            except ReplicationError as e:
                if e.sqlstate == "":
                    raise
                error = e                       # the server still sends ReadyForQuery
                continue
            if kind == b"D":
                rows.append(_data_row(body))
            elif kind == b"Z":
                if error:
                    raise error
                return rows

    async def identify_system(self) -> SystemInfo:
        row = (await self.simple_query("IDENTIFY_SYSTEM"))[0]
        return SystemInfo(system_id=row[0] or "", timeline=int(row[1] or 0),
                          xlogpos=parse_lsn(row[2] or "0/0"))

    async def show(self, setting: str) -> str:
        return (await self.simple_query(f"SHOW {setting}"))[0][0] or ""

    async def timeline_history(self, tli: int) -> tuple[str, bytes]:
        row = (await self.simple_query(f"TIMELINE_HISTORY {tli}"))[0]
        return row[0] or "", (row[1] or "").encode()

    async def start(self, slot: str, lsn: int, tli: int) -> None:
        self._writer.write(wire.query(
            f"START_REPLICATION SLOT {slot} PHYSICAL {format_lsn(lsn)} TIMELINE {tli}"))
        kind, body = await self._read()
        if kind != b"W":
            raise ReplicationError(f"unexpected reply {kind!r} to START_REPLICATION")
        self.streaming = True

    async def receive(self) -> XLogData | Keepalive | TimelineEnd:
        kind, body = await self._read()
        if kind == b"d":
            sub = body[:1]
            if sub == b"w":
                start, end, sent = XLOG_DATA.unpack_from(body, 1)
                return XLogData(start=start, data=body[25:], server_end=end,
                                sent_at=(sent + PG_EPOCH_OFFSET_US) / 1e6)
            if sub == b"k":
                end, _sent, reply = KEEPALIVE.unpack_from(body, 1)
                return Keepalive(server_end=end, reply_requested=bool(reply))
            raise ReplicationError(f"unexpected copy message {sub!r}")
        if kind == b"c":                      # CopyDone: the timeline ended
            return await self._end_of_timeline()
        if kind == b"C":                      # the walsender is done: the server shuts down
            self.streaming = False
            raise StreamEnded("the server ended the stream: it is shutting down")
        raise ReplicationError(f"unexpected message {kind!r} while streaming")

    async def _end_of_timeline(self) -> TimelineEnd:
        self._writer.write(wire.message(b"c"))
        self.streaming = False
        next_tli = next_start = None
        while True:
            kind, body = await self._read()
            if kind == b"D":
                row = _data_row(body)
                if row and row[0] is not None:
                                next_tli, next_start = int(row[0]), parse_lsn(row[1] or "0/0")
            elif kind == b"Z":
                return TimelineEnd(next_tli, next_start)

    def send_status(self, written: int, flushed: int, reply: bool = False) -> None:
        """Standby status update: `flushed` moves the replication slot forward."""
        self._writer.write(wire.message(b"d", STATUS.pack(b"r", written, flushed, flushed,
                                                          pg_now(), int(reply))))

    async def drain(self) -> None:
        await self._writer.drain()


def _data_row(body: bytes) -> list[str | None]:
    (n,) = wire.INT16.unpack_from(body)
    pos, out = 2, []
    for _ in range(n):
        (length,) = struct.unpack_from("!i", body, pos)
        pos += 4
        if length < 0:
            out.append(None)
        else:
            out.append(body[pos:pos + length].decode(errors="replace"))
            pos += length
    return out
