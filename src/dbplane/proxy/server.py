"""One connection from the proxy to a PostgreSQL node (a "server connection").

It logs in as the client's user with the SCRAM ClientKey recovered from that client's own
login, then carries the traffic of whichever client is attached to it. It watches the
replies just enough to know when the server is idle again (ReadyForQuery), which
parameters it runs with (ParameterStatus), and to hide the replies to messages the proxy
injected itself (a Parse of a prepared statement this connection did not have yet, a
reset or a SET before handing it to another client).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import ssl
import time
from typing import TYPE_CHECKING

from .. import pgwire as wire
from ..security.scram import ClientExchange, ScramAuthFailed, ScramError

if TYPE_CHECKING:
    from .client import ClientConn
    from .pool import Pool

log = logging.getLogger("dbplane.proxy")
TRACE = bool(os.environ.get("DBPLANE_PROXY_TRACE"))
MAX_PREPARED = 1000      # statements kept per server connection; the oldest is closed
# TLS to the nodes, verified against the platform CA (set by the proxy when the nodes' build
# offers TLS); None: the nodes cannot do TLS and the leg to them is plaintext
node_tls: ssl.SSLContext | None = None
SSL_REQUEST = (8).to_bytes(4) + wire.SSL_REQUEST.to_bytes(4)


class ServerError(Exception):
    """The server refused the login: its ErrorResponse, to pass on to the client."""

    def __init__(self, fields: dict[str, str]):
        super().__init__(fields.get("M", "server error"))
        self.fields = fields


class ServerConn(asyncio.Protocol):
    def __init__(self, pool: Pool, member: str, address: str, port: int):
        self.pool = pool
        self.member = member
        self.address = address
        self.port = port
        self.transport: asyncio.Transport | None = None
        self.client: ClientConn | None = None
        self.params: dict[str, str] = {}
        self.backend_pid = 0
        self.backend_key = b""
        self.ready = False
        self.closed = False
        self.outstanding = 0           # ReadyForQuery replies still due (Query, Sync, FunctionCall)
        self.status = b"I"             # transaction status of the last ReadyForQuery
        self.last_used = time.monotonic()
        # statement name on this server -> None, oldest first (shared by all clients)
        self.prepared: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self.batch_prepared: list[bytes] = []   # names sent since the last ReadyForQuery
        self.uncertain: set[bytes] = set()      # may exist after an error: Close before Parse
        # replies to hide, per batch (a batch ends with a Sync or is one Query): entries
        # [batch number, ParseCompletes, CloseCompletes] for the Parse/Close we injected.
        # Numbering batches keeps a pipeline of several Syncs straight, and an error that
        # skips the rest of a batch drops exactly that batch's entries.
        self.swallow: collections.deque[list[int]] = collections.deque()
        self.sent_batches = 0          # client batches sent (Sync, Query, FunctionCall)
        self.done_batches = 0          # client batches answered (ReadyForQuery)
        self.internal: collections.deque = collections.deque()  # callbacks of injected queries
        self._internal_ok = True
        self._buf = bytearray()
        self._handshake: asyncio.Queue | None = asyncio.Queue()
        self._ssl_answer: asyncio.Future | None = None

    # -- connecting --------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport

    async def login(self, user: str, dbname: str, client_key: bytes, server_key: bytes,
                    extra: dict[str, str]) -> None:
        """Startup and SCRAM authentication; raises ServerError or OSError."""
        assert self.transport is not None
        if node_tls is not None:
            await self._start_tls(node_tls)
        self.transport.write(wire.startup_message({"user": user, "database": dbname, **extra}))
        scram: ClientExchange | None = None
        while True:
            kind, body = await self._handshake.get()
            if kind == b"R":
                code = wire.INT32.unpack_from(body)[0]
                if code == wire.AUTH_OK:
                    continue
                if code == wire.AUTH_SASL:
                    scram = ClientExchange(client_key=client_key, server_key=server_key)
                    self.transport.write(wire.sasl_initial_response("SCRAM-SHA-256", scram.first()))
                elif code == wire.AUTH_SASL_CONTINUE and scram is not None:
                    try:
                        self.transport.write(wire.sasl_response(scram.final(body[4:])))
                    except ScramError as e:
                        raise ServerError({"C": "08P01", "M": f"SCRAM exchange with the server: {e}"}
                                          ) from e
                elif code == wire.AUTH_SASL_FINAL and scram is not None:
                    try:
                        scram.verify(body[4:])
                    except (ScramAuthFailed, ScramError) as e:
                        raise ServerError({"C": "28000", "M": "the server's SCRAM signature is "
                                           "wrong: it does not know this user's password"}) from e
                else:
                    raise ServerError({"C": "28000", "M": f"the server asked for an authentication "
                                       f"method the proxy does not use (code {code}); "
                                       "dbplane's pg_hba uses scram-sha-256"})
            elif kind == b"S":
                name, pos = wire.read_cstr(body, 0)
                value, _ = wire.read_cstr(body, pos)
                self.params[name.decode()] = value.decode(errors="replace")
            elif kind == b"K":
                self.backend_pid = wire.INT32.unpack_from(body)[0]
                self.backend_key = bytes(body[4:])
            elif kind == b"E":
                raise ServerError(wire.parse_error_fields(body))
            elif kind == b"Z":
                self.status = body[:1]
                self.ready = True
                self._handshake = None
                return
            elif kind == b"":
                raise ConnectionResetError(f"{self.address}:{self.port} closed the connection")
            # NoticeResponse and anything else during startup: ignore

    async def _start_tls(self, context: ssl.SSLContext) -> None:
        """SSLRequest, then a verify-full handshake: the node's certificate must be issued
        by the platform CA for this address."""
        self._ssl_answer = asyncio.get_running_loop().create_future()
        self.transport.write(SSL_REQUEST)
        answer = await self._ssl_answer
        self._ssl_answer = None
        if answer != b"S":
            raise ServerError({"C": "08006", "M": f"node {self.address}:{self.port} does not offer TLS "
                               "although its PostgreSQL build supports it; see its patroni.log"})
        try:
            self.transport = await asyncio.get_running_loop().start_tls(
                self.transport, self, context, server_hostname=self.address)
        except ssl.SSLError as e:
            raise ServerError({"C": "08006", "M": f"TLS to node {self.address}:{self.port} failed: "
                               f"{e.reason or e}"}) from e

    def _handshake_received(self, data: bytes) -> None:
        self._buf += data
        buf = self._buf
        while len(buf) >= 5:
            kind, length = wire.HEADER.unpack_from(buf)
            if len(buf) < length + 1:
                break
            self._handshake.put_nowait((kind, bytes(buf[5:length + 1])))
            del buf[:length + 1]

    # -- traffic -------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._ssl_answer is not None:
            if not self._ssl_answer.done():
                # anything after the one-byte answer would be plaintext injected before TLS
                self._ssl_answer.set_result(data if len(data) == 1 else b"?")
            return
        if self._handshake is not None:
            self._handshake_received(data)
            return
        if self._buf:
            self._buf += data
            data = bytes(self._buf)
            self._buf.clear()
        if TRACE:
            log.warning("S%d< %s cli=%s out=%d int=%d sw=%s sent=%d done=%d", id(self) % 10000,
                        wire.kinds(data), id(self.client) % 10000 if self.client else None, self.outstanding,
                        len(self.internal), list(self.swallow), self.sent_batches, self.done_batches)
        n = len(data)
        pos = 0
        special = self.internal or self.swallow
        keep: list[bytes] | None = [] if special else None
        start = 0                      # first byte not yet copied to keep
        release = False
        while pos + 5 <= n:
            kind = data[pos]
            length = int.from_bytes(data[pos + 1:pos + 5])
            end = pos + 1 + length
            if end > n:
                break
            if kind == 90:                                       # 'Z' ReadyForQuery
                self.outstanding -= 1
                self.status = data[pos + 5:pos + 6]
                if self.internal:
                    if keep is not None:
                        start = end                              # hide the whole reply
                    done = self.internal.popleft()
                    ok, self._internal_ok = self._internal_ok, True
                    if done is not None:
                        done(ok)
                    pos = end
                    continue
                # a batch is over: replies to its injected messages that an error skipped never come
                self.done_batches += 1
                swallow = self.swallow
                while swallow and swallow[0][0] < self.done_batches:
                    swallow.popleft()
                self.batch_prepared.clear()
                release = self.outstanding <= 0
                self.pool.count_ready(self)
            elif kind == 83:                                     # 'S' ParameterStatus
                name, p = wire.read_cstr(data, pos + 5)
                value, _ = wire.read_cstr(data, p)
                self.params[name.decode()] = value.decode(errors="replace")
            elif kind == 69:                                     # 'E' ErrorResponse
                if data[pos + 5:end].find(b"SFATAL\0") >= 0 or data[pos + 5:end].find(b"SPANIC\0") >= 0:
                    # the server is closing this connection (shutdown, demotion, terminated):
                    # the client keeps its connection and hears about it in server_lost
                    if keep is None:
                        keep = [data[:pos]]
                    else:
                        keep.append(data[start:pos])
                    start = pos = end
                    continue
                self.pool.stats.server_errors += 1
                if self.internal:
                    self._internal_ok = False
                    start = pos = end                            # hidden with its query
                    continue
                # an error skips the rest of an extended batch: statements parsed in it may not exist
                self.uncertain.update(self.batch_prepared)
                for name in self.batch_prepared:
                    self.prepared.pop(name, None)
                self.batch_prepared.clear()
            elif keep is not None and not self.internal:
                head = self.swallow[0] if self.swallow else None
                if head is not None and head[0] == self.done_batches and (
                        (kind == 49 and head[1]) or (kind == 51 and head[2])):
                    head[1 if kind == 49 else 2] -= 1                # a reply to what we injected
                    keep.append(data[start:pos])
                    start = end
            if keep is not None and self.internal and start < end:
                start = end                                      # inside an injected query's reply
            pos = end
        if pos < n:
            self._buf += data[pos:]
        client = self.client
        if client is not None:
            if keep is None:
                out = data if pos == n else data[:pos]
            else:
                keep.append(data[start:pos])
                out = b"".join(keep)
            if out:
                client.transport.write(out)
            if release and self.status == b"I":
                client.server_idle(self)

    def pause_writing(self) -> None:          # the server is slow to read: stop reading the client
        if self.client is not None:
            self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.client is not None:
            self.client.transport.resume_reading()

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self._ssl_answer is not None and not self._ssl_answer.done():
            self._ssl_answer.set_result(b"")
        if self._handshake is not None:
            self._handshake.put_nowait((b"", b""))
        self.pool.server_lost(self)
        if self.client is not None:
            self.client.server_lost(self)

    # -- what the proxy sends itself ---------------------------------------------------

    def send(self, data: bytes, responses: int) -> None:
        """Client traffic: `responses` is how many ReadyForQuery replies it asks for."""
        if TRACE:
            log.warning("S%d> %s cli=%s resp=%d", id(self) % 10000, wire.kinds(data),
                        id(self.client) % 10000 if self.client else None, responses)
        self.outstanding += responses
        self.sent_batches += responses
        self.transport.write(data)

    def run_internal(self, sql: str, done=None) -> None:
        """Run a query whose whole reply is hidden from the client; done(ok) follows."""
        self.internal.append(done)
        self.outstanding += 1
        self.transport.write(wire.query(sql))

    def hide(self, batch: int, parses: int = 0, closes: int = 0) -> None:
        if self.swallow and self.swallow[-1][0] == batch:
            self.swallow[-1][1] += parses
            self.swallow[-1][2] += closes
        else:
            self.swallow.append([batch, parses, closes])

    def statement(self, name: bytes, parse_body_tail: bytes, batch: int) -> list[bytes]:
        """Messages that make sure statement `name` exists here before a Bind/Describe
        of client batch number `batch` uses it; their replies are hidden."""
        if name in self.prepared:
            self.prepared.move_to_end(name)
            return []
        out = []
        if name in self.uncertain:
            self.uncertain.discard(name)
            out.append(wire.close_statement(name))
            self.hide(batch, closes=1)
        out.append(wire.message(b"P", name + b"\0" + parse_body_tail))
        self.hide(batch, parses=1)
        out += self.remember(name, batch)
        return out

    def remember(self, name: bytes, batch: int) -> list[bytes]:
        self.prepared[name] = None
        self.batch_prepared.append(name)
        if len(self.prepared) <= MAX_PREPARED:
            return []
        oldest, _ = self.prepared.popitem(last=False)
        self.hide(batch, closes=1)
        return [wire.close_statement(oldest)]

    def forget_statements(self) -> None:
        self.prepared.clear()
        self.uncertain.clear()

    @property
    def busy(self) -> bool:
        """Inside a transaction or waiting for a reply."""
        return self.outstanding > 0 or self.status != b"I"

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            if self.ready and not self.busy:
                self.transport.write(wire.TERMINATE)
            self.transport.close()
