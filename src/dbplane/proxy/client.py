"""One client connection to the proxy.

Life: startup packet (SSLRequest answered first; a plaintext startup refused when the
database has require_tls; CancelRequest handled and closed), SCRAM-SHA-256 login against
the user's verifier, then traffic. In transaction mode a server connection is attached
when the client sends its first message of a transaction and given back when the server
reports idle (ReadyForQuery 'I'); session state (SET, LISTEN, temporary tables, ...) pins
the client to its server connection for good. Named prepared statements are renamed to a
server-side name derived from their text, so any server connection of the pool can run
them: the proxy parses them where missing.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import secrets
import time
from typing import TYPE_CHECKING

from .. import pgwire as wire
from ..errors import DbplaneError
from ..security import audit, dbtoken
from ..security.scram import ScramAuthFailed, ScramError, ServerExchange
from .pinning import pin_reason
from .pool import NoTarget, Pool, PoolExhausted
from .server import ServerConn, ServerError

if TYPE_CHECKING:
    from .proxy import Listener, Proxy

log = logging.getLogger("dbplane.proxy")

# client settings the proxy re-applies (SET) on whichever server connection serves the client
TRACKED = ("client_encoding", "datestyle", "timezone", "intervalstyle", "application_name",
           "standard_conforming_strings", "search_path", "extra_float_digits", "statement_timeout",
           "lock_timeout", "idle_in_transaction_session_timeout", "default_transaction_isolation",
           "default_transaction_read_only")
# how PostgreSQL reports the ParameterStatus names we track (others are not reported)
REPORTED = {"client_encoding": "client_encoding", "datestyle": "DateStyle", "timezone": "TimeZone",
            "intervalstyle": "IntervalStyle", "application_name": "application_name",
            "standard_conforming_strings": "standard_conforming_strings", "search_path": "search_path",
            "default_transaction_read_only": "default_transaction_read_only"}
RYW_OPTION = "dbplane.read_your_writes"
EMPTY_PARSE = wire.message(b"P", b"\0\0\0\0")    # unnamed, empty query: answers ParseComplete
NO_SUCH_STATEMENT = wire.close_statement(b"dbplane_none")   # answers CloseComplete, closes nothing

STARTUP, AUTH, READY, CLOSED = range(4)
TRACE = bool(os.environ.get("DBPLANE_PROXY_TRACE"))



def server_name(parse_tail: bytes) -> bytes:
    """The name a statement gets on server connections: the same text and parameter
    types give the same name, so clients share prepared statements."""
    return b"dbp_" + hashlib.blake2b(parse_tail, digest_size=10).hexdigest().encode()


class ClientConn(asyncio.Protocol):
    def __init__(self, proxy: Proxy, listener: Listener):
        self.proxy = proxy
        self.listener = listener
        self.cluster = listener.cluster
        self.role = listener.role
        self.transport: asyncio.Transport | None = None
        self.state = STARTUP
        self.pool: Pool | None = None
        self.server: ServerConn | None = None
        self.pinned: str | None = None
        self.session = False           # session pooling: keep the server to the end
        self.read_your_writes = False
        self.params: dict[str, str] = {}     # tracked settings asked for at startup
        self.statements: dict[bytes, tuple[bytes, bytes]] = {}   # client name -> (server name, parse tail)
        # messages waiting for a server connection: (bytes, replies asked for, nothing to rename)
        self.pending: list[tuple[bytes, int, bool]] = []
        self.pending_responses = 0
        self.acquiring: asyncio.Task | None = None
        self.waiter = None                  # our place in the pool's queue, if waiting
        self.lost_transaction = False       # our server died mid-transaction: fail until Sync
        self.pid = 0
        self.key = b""
        self.last_active = time.monotonic()
        self.peer = ""
        self._buf = bytearray()
        self._auth_queue: asyncio.Queue | None = None
        self._tls = False

    # -- connection ----------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        self.proxy.client_opened(self)

    def connection_lost(self, exc) -> None:
        self.state = CLOSED
        if self.acquiring is not None:
            self.acquiring.cancel()
        if self.waiter is not None:
            self.pool.leave(self.waiter)
            self.waiter = None
        self._give_back()
        if self.pool is not None:
            self.pool.clients.discard(self)
        self.proxy.client_closed(self)

    def fatal(self, sqlstate: str, text: str, hint: str = "") -> None:
        if self.pool is not None:
            self.pool.stats.errors += 1
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(wire.error(sqlstate, text, "FATAL", hint))
            self.transport.close()
        self.state = CLOSED

    def data_received(self, data: bytes) -> None:
        if self.state == READY:
            self._traffic(data)
        elif self.state == STARTUP:
            self._startup(data)
        elif self.state == AUTH:
            self._buf += data
            try:
                for msg in self._split():
                    self._auth_queue.put_nowait(msg)
            except wire.ProtocolViolation as e:
                self.fatal("08P01", f"invalid message during login: {e}")

    def _split(self) -> list[tuple[int, bytes]]:
        """Complete messages in the buffer as (type, whole message)."""
        buf = self._buf
        out = []
        while len(buf) >= 5:
            kind, length = buf[0], int.from_bytes(buf[1:5])
            if length < 4 or length > wire.MAX_MESSAGE:
                raise wire.ProtocolViolation(
                    f"message of {length} bytes (type {chr(kind)!r}); the limit is {wire.MAX_MESSAGE}")
            if len(buf) < length + 1:
                break
            out.append((kind, bytes(buf[:length + 1])))
            del buf[:length + 1]
        return out

    # -- startup -------------------------------------------------------------------------

    def _startup(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) < 8:
            return
        length = int.from_bytes(self._buf[:4])
        if length < 8 or length > wire.MAX_STARTUP:
            self.fatal("08P01", f"invalid startup packet length {length}")
            return
        if len(self._buf) < length:
            return
        packet = bytes(self._buf[:length])
        del self._buf[:length]
        code = int.from_bytes(packet[4:8])
        if code == wire.SSL_REQUEST:
            if self._tls or self.proxy.tls is None:
                self.transport.write(b"N")
            elif self._buf:
                # bytes sent before our answer would be read as if they came over TLS:
                # a plaintext injection (CVE-2021-23214); PostgreSQL refuses it the same way
                self._audit_refusal("tls_downgrade", "unencrypted data after SSLRequest")
                self.fatal("08P01", "received unencrypted data after SSL request",
                           "a client waits for the server's answer before starting TLS")
            else:
                self.transport.write(b"S")
                self.transport.pause_reading()
                asyncio.ensure_future(self._start_tls())
        elif code == wire.GSSENC_REQUEST:
            self.transport.write(b"N")
        elif code == wire.CANCEL_REQUEST and length == 16:
            pid = int.from_bytes(packet[8:12])
            self.proxy.cancel(pid, packet[12:16])
            self.transport.close()
            self.state = CLOSED
        elif code == wire.PROTOCOL_3_0:
            if not self._tls and self.proxy.require_tls.get(self.cluster.name, True):
                self._refuse_plaintext()
                return
            try:
                params = wire.parse_startup_params(packet[8:])
            except wire.ProtocolViolation as e:
                self.fatal("08P01", f"invalid startup packet: {e}")
                return
            self.state = AUTH
            self._auth_queue = asyncio.Queue()
            asyncio.ensure_future(self._login(params))
        else:
            major, minor = code >> 16, code & 0xFFFF
            self.fatal("0A000", f"unsupported frontend protocol {major}.{minor}: the proxy speaks 3.0")

    def _refuse_plaintext(self) -> None:
        """require_tls (like MySQL's require_secure_transport): no login without TLS, so
        that no password exchange or query ever crosses the network in the clear."""
        name = self.cluster.name
        log.info("refused a plaintext client of %s from %s (require_tls)", name, self.peer)
        self._audit_refusal("tls_required", "plaintext startup refused (require_tls=on)")
        self.fatal("28000", f"database {name} requires TLS (require_tls=on): connection without "
                   "TLS refused",
                   "connect with sslmode=require or sslmode=verify-full (sslrootcert from 'dbplane "
                   f"ca cert'), or allow plaintext: 'dbplane db modify {name} --param require_tls=off'")

    def _audit_refusal(self, code: str, detail: str) -> None:
        if self.proxy.store is not None:
            asyncio.ensure_future(audit.record(
                self.proxy.store, principal=None, action="db:Connect", resource=f"db/{self.cluster.name}",
                source=self.peer.rsplit(":", 1)[0], result="denied", code=code, detail=detail))

    async def _start_tls(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            transport = await loop.start_tls(self.transport, self, self.proxy.tls, server_side=True)
        except (OSError, ConnectionError, asyncio.CancelledError) as e:
            log.info("TLS handshake with %s failed: %s", self.peer, e)
            self._audit_refusal("tls_handshake_failed", str(e)[:200])
            self.transport.close()
            return
        self.transport = transport
        self._tls = True
        rest = bytes(self._buf)
        self._buf.clear()
        if rest:
            self._startup(rest)

    async def _next_auth_message(self) -> tuple[int, bytes]:
        return await asyncio.wait_for(self._auth_queue.get(), timeout=self.proxy.login_timeout)

    async def _login(self, params: dict[str, str]) -> None:
        cluster = self.cluster
        user = params.get("user", "")
        dbname = params.get("database") or user
        try:
            if self.proxy.over_client_limit(self):
                return
            if not user:
                self.fatal("28000", "no PostgreSQL user name specified in startup packet")
                return
            if params.get("replication", "false").lower() not in ("false", "0", "off", "no"):
                self.fatal("0A000", "replication connections are not supported through the proxy",
                           "connect to a member directly for replication")
                return
            self.params = {k.lower(): v for k, v in params.items() if k.lower() in TRACKED}
            try:
                options = wire.parse_options(params.get("options", ""))
            except ValueError as e:
                self.fatal("22023", str(e))
                return
            ryw = options.pop(RYW_OPTION, None)
            self.read_your_writes = self.role == "reader" and (
                (ryw or "").lower() in ("on", "true", "1", "yes") or
                (ryw is None and user in cluster.settings.read_your_writes_users))
            self.params.update(options)
            if cluster.stopped:
                self.fatal("3D000", f"database {cluster.name} is being deleted or stopped")
                return
            self.pool = cluster.pool(dbname, user)
            verifier = await cluster.auth.verifier(user)
            if cluster.auth.iam_user(user):
                if not await self._token_login(user):
                    return
            elif not await self._scram_login(user, verifier):
                return
            self.transport.write(wire.auth_request(wire.AUTH_OK))
            if not self.pool.server_params:
                # learn the server's parameters (version, encoding, ...) from a real login
                server = await self.pool.acquire(self, self.role)
                self.pool.release(server)
            self._welcome()
        except (ScramAuthFailed, ScramError):
            cluster.auth.forget(user)
            if self.pool is not None:
                self.pool.stats.login_failures += 1
            self.fatal("28P01", f'password authentication failed for user "{user}"')
            await audit.record(self.proxy.store, principal=None, action="db:Connect",
                               resource=f"dbuser/{cluster.name}/{user}",
                               source=self.peer.rsplit(":", 1)[0], result="denied",
                               code="password_authentication_failed")
        except ServerError as e:
            self.fatal(e.fields.get("C", "08006"), e.fields.get("M", str(e)))
        except NoTarget:
            self.fatal("08006", f"database {cluster.name} has no {self._node_word()} available",
                       "see 'dbplane db describe " + cluster.name + "'")
        except PoolExhausted as e:
            self._exhausted(e, fatal=True)
        except TimeoutError:
            self.fatal("08006", "login timed out")
        except OSError as e:             # no node answers the verifier lookup
            self.fatal("08006", f"database {cluster.name} is not reachable: {e}",
                       "see 'dbplane db describe " + cluster.name + "'")
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.exception("login of %s", self.peer)
            self.fatal("XX000", f"proxy error during login: {e}")

    async def _scram_login(self, user: str, verifier) -> bool:
        """SCRAM-SHA-256 against the user's verifier; keeps the ClientKey for the pool."""
        exchange = ServerExchange(verifier, user)
        self.transport.write(wire.auth_sasl_mechanisms())
        kind, msg = await self._next_auth_message()
        if kind != ord("p"):
            self.fatal("08P01", "expected SASLInitialResponse")
            return False
        mechanism, first = wire.parse_sasl_initial(msg[5:])
        if mechanism != "SCRAM-SHA-256":
            self.fatal("28000", f"unsupported SASL mechanism {mechanism}: use SCRAM-SHA-256")
            return False
        self.transport.write(wire.auth_request(wire.AUTH_SASL_CONTINUE, exchange.first(first)))
        kind, msg = await self._next_auth_message()
        if kind != ord("p"):
            self.fatal("08P01", "expected SASLResponse")
            return False
        final = exchange.final(msg[5:])
        self.pool.client_key, self.pool.server_key = exchange.client_key, verifier.server_key
        self.transport.write(wire.auth_request(wire.AUTH_SASL_FINAL, final))
        return True

    async def _token_login(self, user: str) -> bool:
        """A member of dbplane_iam: its password must be an IAM token (proxy/iam_login.py),
        and only over TLS, where it cannot be sniffed."""
        name = self.cluster.name
        source = self.peer.rsplit(":", 1)[0]
        if not self._tls:
            self.fatal("28000", f'user "{user}" logs in with IAM tokens, which are accepted over TLS only',
                       "connect with sslmode=require (or verify-full)")
            return False
        self.transport.write(wire.auth_request(wire.AUTH_CLEARTEXT))
        kind, msg = await self._next_auth_message()
        if kind != ord("p"):
            self.fatal("08P01", "expected PasswordMessage")
            return False
        token = msg[5:].split(b"\0", 1)[0].decode(errors="replace")
        iam_login = self.proxy.iam_login
        try:
            if iam_login is None:
                raise dbtoken.TokenError("the proxy is not connected to etcd yet")
            if not dbtoken.looks_like_token(token):
                raise dbtoken.TokenError(f'user "{user}" is a member of dbplane_iam and logs in with '
                                         f"IAM tokens only: dbplane db token {name} --user {user}")
            principal = await iam_login.check(token, name, user, source, tls=True)
        except (dbtoken.TokenError, DbplaneError) as e:
            if self.pool is not None:
                self.pool.stats.login_failures += 1
            await audit.record(self.proxy.store, principal=None, action="db:Connect",
                               resource=f"dbuser/{name}/{user}", source=source, result="denied",
                               code="token_refused", detail=str(e)[:200])
            message = e.message if isinstance(e, DbplaneError) else str(e)
            self.fatal("28P01", f'IAM authentication failed for user "{user}": {message}')
            return False
        self.pool.client_key, self.pool.server_key = await iam_login.server_keys(self.cluster, user)
        await audit.record(self.proxy.store, principal=principal, action="db:Connect",
                           resource=f"dbuser/{name}/{user}", source=source, result="allowed")
        return True

    def _node_word(self) -> str:
        return "primary" if self.role == "writer" else "replica or primary"

    def _welcome(self) -> None:
        pool = self.pool
        self.state = READY
        self.session = self.cluster.settings.pool_mode == "session"
        pool.clients.add(self)
        pool.stats.logins += 1
        self.pid, self.key = self.proxy.register_client(self)
        params = dict(pool.server_params)
        for name, value in self.params.items():
            if name in REPORTED:
                params[REPORTED[name]] = value
        out = [wire.parameter_status(k, v) for k, v in params.items()]
        out.append(wire.backend_key_data(self.pid, self.key))
        out.append(wire.ready_for_query())
        self.transport.write(b"".join(out))
        rest = bytes(self._buf)
        self._buf.clear()
        if rest:
            self._traffic(rest)

    # -- traffic ---------------------------------------------------------------------------

    def _traffic(self, data: bytes) -> None:
        if TRACE:
            log.warning("C%d> %s srv=%s pend=%d wait=%s acq=%s", id(self) % 10000, wire.kinds(data),
                        id(self.server) % 10000 if self.server else None, len(self.pending),
                        self.waiter is not None, self.acquiring is not None)
        self.last_active = time.monotonic()
        if self._buf:
            self._buf += data
            data = bytes(self._buf)
            self._buf.clear()
        n = len(data)
        pos = 0
        simple = True               # nothing to rewrite: the bytes go to the server as they are
        responses = 0
        queries = 0
        while pos + 5 <= n:
            kind = data[pos]
            length = int.from_bytes(data[pos + 1:pos + 5])
            if length < 4 or length > wire.MAX_MESSAGE:
                self.fatal("08P01", f"invalid message: {length} bytes (type {chr(kind)!r}); "
                           f"the limit is {wire.MAX_MESSAGE} bytes")
                return
            end = pos + 1 + length
            if end > n:
                break
            if kind == 81:                                      # 'Q' Query
                responses += 1
                queries += 1
                if not self.pinned and not self.session:
                    reason = pin_reason(data[pos + 5:end])
                    if reason:
                        self._pin(reason)
            elif kind == 83 or kind == 70:                      # 'S' Sync, 'F' FunctionCall
                responses += 1
            elif kind == 69:                                    # 'E' Execute
                queries += 1
            elif kind == 80:                                    # 'P' Parse
                name_end = data.index(b"\0", pos + 5)
                if name_end > pos + 5:
                    simple = False                              # named: rename it
                if not self.pinned and not self.session:
                    reason = pin_reason(data[name_end + 1:data.index(b"\0", name_end + 1)])
                    if reason:
                        self._pin(reason)
            elif kind == 66:                                    # 'B' Bind
                if data[pos + 5] != 0 or data[pos + 6] != 0:    # a named portal or statement
                    simple = False
            elif kind == 68 or kind == 67:                      # Describe, Close
                if data[pos + 5] == 83 and data[pos + 6] != 0:  # of a named statement
                    simple = False
            elif kind == 88:                                    # 'X' Terminate
                self._forward(data[:pos], responses, simple)
                self.transport.close()
                return
            pos = end
        if pos < n:
            if n - pos >= 5 and int.from_bytes(data[pos + 1:pos + 5]) > wire.MAX_MESSAGE:
                self.fatal("08P01", f"invalid message: longer than the limit of {wire.MAX_MESSAGE} bytes")
                return
            self._buf += data[pos:]
            data = data[:pos]
        if not data:
            return
        self.pool.stats.queries += queries
        self._forward(data, responses, simple)

    def _forward(self, data: bytes, responses: int, simple: bool) -> None:
        if not data:
            return
        if self.lost_transaction:
            self._fail_lost(data, responses)
            return
        server = self.server
        if server is not None and not self.pending:
            server.send(data if simple else self._rewrite(data, server), responses)
            return
        self.pending.append((data, responses, simple))            # rewritten on attach
        self.pending_responses += responses
        if self.acquiring is None and self.waiter is None and server is None:
            self._get_server()

    # -- attaching a server connection ------------------------------------------------------

    def _get_server(self) -> None:
        pool = self.pool
        if self.role == "writer" or not self.read_your_writes:
            members = self.cluster.targets_now(self.role)
            if members:
                server = pool.take_idle(members)
                if server is not None:
                    self._attach(server)
                    return
                if pool.room(members) is None:
                    # the pool is full: queue for a connection, no task needed
                    self.waiter = pool.enqueue(members, self._delivered, self._queue_timed_out)
                    return
        # open a connection, wait out a failover, or find a fresh replica
        self.transport.pause_reading()
        self.acquiring = asyncio.ensure_future(self._acquire())

    def _delivered(self, server: ServerConn | None) -> None:
        self.waiter = None
        if self.state == CLOSED:
            if server is not None:
                self.pool.release(server)
        elif server is None:
            self._get_server()                    # room was made or the topology changed
        else:
            self._attach(server)

    def _queue_timed_out(self, e: PoolExhausted) -> None:
        self.waiter = None
        self._exhausted(e)

    async def _acquire(self) -> None:
        try:
            role, min_lsn = self.role, None
            if self.read_your_writes:
                min_lsn = await self.cluster.monitor.primary_lsn()
                if min_lsn is None:
                    role = "writer"        # cannot tell what is fresh enough: read the primary
            server = await self.pool.acquire(self, role, min_lsn)
        except PoolExhausted as e:
            self.acquiring = None
            self._exhausted(e)
            return
        except NoTarget:
            self.acquiring = None
            self._reply_error("08006", f"no {self._node_word()} of database {self.cluster.name} became "
                              f"available within {self.cluster.settings.failover_hold:g} s",
                              "retry; see 'dbplane db describe " + self.cluster.name + "'")
            return
        except ServerError as e:
            self.acquiring = None
            self.fatal(e.fields.get("C", "08006"), e.fields.get("M", str(e)))
            return
        except asyncio.CancelledError:
            return
        except Exception as e:
            log.exception("acquiring a server connection for %s", self.peer)
            self.acquiring = None
            self.fatal("XX000", f"proxy error: {e}")
            return
        self.acquiring = None
        if self.state == CLOSED:
            self.pool.release(server)
            return
        self.transport.resume_reading()
        self._attach(server)

    def _attach(self, server: ServerConn) -> None:
        self.server = server
        server.client = self
        sets = []
        for name, value in self.params.items():
            reported = REPORTED.get(name)
            if reported is None or server.params.get(reported) != value:
                sets.append(f"SET {name} = {wire.quote_literal(value)}")
        if sets:
            server.run_internal(";".join(sets), self._settings_applied)
        pending, self.pending = self.pending, []
        self.pending_responses = 0
        for data, responses, simple in pending:      # in order: batch numbers count on it
            server.send(data if simple else self._rewrite(data, server), responses)

    def _settings_applied(self, ok: bool) -> None:
        if not ok and self.transport is not None:
            self.fatal("22023", "a setting from the startup packet was refused by the server: "
                       + ", ".join(f"{k}={v}" for k, v in self.params.items()))

    def server_idle(self, server: ServerConn) -> None:
        """The server finished a transaction (ReadyForQuery 'I', nothing outstanding)."""
        if self.pinned or self.session or self.pending:
            return
        self.server = None
        self.pool.release(server)

    def _pin(self, reason: str) -> None:
        self.pinned = reason
        self.pool.stats.pinned_total += 1
        self.pool.stats.pinned_reasons[reason] += 1

    # -- prepared statements ----------------------------------------------------------------

    def _rewrite(self, data: bytes, server: ServerConn) -> bytes:
        out: list[bytes] = []
        pos, n = 0, len(data)
        batch = server.sent_batches        # the number of the batch each message belongs to
        while pos < n:
            kind = data[pos]
            end = pos + 1 + int.from_bytes(data[pos + 1:pos + 5])
            body = data[pos + 5:end]
            if kind == 83 or kind == 81 or kind == 70:          # Sync, Query, FunctionCall end one
                out.append(data[pos:end])
                batch += 1
                pos = end
                continue
            if kind == 80 and body[:1] != b"\0":               # Parse of a named statement
                name, p = wire.read_cstr(body, 0)
                tail = body[p:]
                sname = server_name(tail)
                self.statements[name] = (sname, tail)
                if sname in server.prepared:
                    server.prepared.move_to_end(sname)
                    out.append(EMPTY_PARSE)                      # the client still gets ParseComplete
                else:
                    out += server.remember(sname, batch)
                    out.append(wire.message(b"P", sname + b"\0" + tail))
            elif kind == 66:                                    # Bind
                portal, p = wire.read_cstr(body, 0)
                name, p2 = wire.read_cstr(body, p)
                known = self.statements.get(name) if name else None
                if known:
                    out += server.statement(*known, batch)
                    out.append(wire.message(b"B", portal + b"\0" + known[0] + b"\0" + body[p2:]))
                else:
                    out.append(data[pos:end])
            elif (kind == 68 or kind == 67) and body[:1] == b"S" and body[1:2] != b"\0":
                name, _ = wire.read_cstr(body, 1)
                known = self.statements.get(name)
                if kind == 67:                                  # Close: keep it on the server
                    self.statements.pop(name, None)
                    out.append(NO_SUCH_STATEMENT)
                elif known:
                    out += server.statement(*known, batch)
                    out.append(wire.message(b"D", b"S" + known[0] + b"\0"))
                else:
                    out.append(data[pos:end])
            else:
                out.append(data[pos:end])
            pos = end
        return b"".join(out)

    # -- errors and endings ------------------------------------------------------------------

    def _reply_error(self, sqlstate: str, text: str, hint: str = "") -> None:
        """Answer the waiting messages with an error, keeping the client connected."""
        if self.pool is not None:
            self.pool.stats.errors += 1
        self.pending = []
        responses, self.pending_responses = self.pending_responses, 0
        self.transport.write(wire.error(sqlstate, text, hint=hint)
                             + wire.ready_for_query() * max(1, responses))
        self.transport.resume_reading()

    def _exhausted(self, e: PoolExhausted, fatal: bool = False) -> None:
        text = (f"connection pool of database {self.cluster.name} for user {self.pool.user} is exhausted: "
                f"{e.limit} server connections busy, {e.waiting} clients waiting; waited {e.waited:.1f} s")
        hint = ("raise the pool size ('dbplane proxy modify " + self.cluster.name + " --pool-size N'), "
                "shorten transactions, or raise --queue-timeout")
        if fatal:
            self.fatal("53300", text, hint)
        else:
            self._reply_error("53300", text, hint)

    def _fail_lost(self, data: bytes, responses: int) -> None:
        """The client's transaction died with its server: answer until it syncs."""
        self.pool.stats.errors += 1
        if responses:
            self.lost_transaction = False
            self.transport.write(wire.error("08006", "the transaction was lost: the server connection "
                                            "closed during a failover; nothing of it was committed",
                                            hint="start the transaction again")
                                 + wire.ready_for_query() * responses)

    def server_lost(self, server: ServerConn) -> None:
        """The attached server connection closed under us (node died, failover, restart)."""
        if self.server is not server or self.state == CLOSED:
            return
        self.server = None
        if self.pinned or self.session:
            self.fatal("08006", "server connection lost; session state (" + (self.pinned or "session mode")
                       + ") cannot be moved to another server", "reconnect")
            return
        if server.outstanding > 0:
            self.pool.stats.errors += 1
            self.transport.write(wire.error("08006", "server connection lost during a failover; the "
                                            "transaction was rolled back", hint="run it again")
                                 + wire.ready_for_query())
        elif server.status != b"I":
            self.lost_transaction = True          # idle in a transaction: fail its next statement

    def _give_back(self) -> None:
        """The client left: its server connection goes back clean, or is closed."""
        server, self.server = self.server, None
        if server is None or server.closed:
            return
        pool = self.pool
        if server.outstanding > 0 or server.internal:
            pool.discard(server)                   # mid-query: closing is the only clean reset
            return
        reset = []
        if server.status != b"I":
            reset.append("ROLLBACK")
        if self.pinned or self.session:
            reset.append("DISCARD ALL")
            server.forget_statements()
        if not reset:
            pool.release(server)
            return

        todo = reset[1:]

        def done(ok: bool) -> None:
            if not ok:
                pool.discard(server)
            elif todo:
                server.run_internal(todo.pop(0), done)
            elif not server.busy:
                pool.release(server)
            else:
                pool.discard(server)
        server.client = None
        server.run_internal(reset[0], done)

    def pause_writing(self) -> None:      # the client is slow to read: stop reading the server
        if self.server is not None:
            self.server.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.server is not None:
            self.server.transport.resume_reading()

    def cancel(self) -> None:
        """A CancelRequest for this client: cancel the server's query, or the wait."""
        if self.server is not None:
            self.proxy.send_cancel(self.server.address, self.server.port,
                                   self.server.backend_pid, self.server.backend_key)
        elif self.acquiring is not None or self.waiter is not None:
            if self.acquiring is not None:
                self.acquiring.cancel()
                self.acquiring = None
            if self.waiter is not None:
                self.pool.leave(self.waiter)
                self.waiter = None
            self._reply_error("57014", "canceling statement due to user request")


def new_key() -> bytes:
    return secrets.token_bytes(4)


def new_pid() -> int:
    return int.from_bytes(os.urandom(4)) & 0x7FFFFFFF
