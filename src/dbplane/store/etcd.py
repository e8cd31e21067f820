"""A narrow asyncio interface to etcd (aetcd underneath).

Values are JSON documents of pydantic models. etcd client errors are translated into
StoreUnavailable here, so callers above never see gRPC exceptions. An https URL is
reached over TLS with a client certificate (store/tls.py); an http URL in plaintext.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import time
from collections.abc import Sequence
from typing import TypeVar
from urllib.parse import urlsplit

import aetcd
import aetcd.exceptions
import grpc
from aetcd import rpc, watcher
from pydantic import BaseModel

from ..errors import StoreUnavailable
from .tls import EtcdTLS, is_https, unreachable_hint

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)


def _translate(fn):
    @functools.wraps(fn)
    async def wrapper(self: Store, *args, **kwargs):
        try:
            return await fn(self, *args, **kwargs)
        except aetcd.exceptions.ClientError as e:
            why = type(e).__name__
            if isinstance(self._client, _TLSClient) and isinstance(e, aetcd.exceptions.ConnectionFailedError):
                why += f": {str(e)[:200]}"      # a refused certificate says so here
                if self._client.renewed():
                    await self._client.reopen()      # the next call presents the renewed certificate
            raise StoreUnavailable(f"etcd at {self.url} is unreachable ({why})",
                                   unreachable_hint(self.url, self.tls)) from e
    return wrapper


def _end_of_prefix(prefix: bytes) -> bytes:
    return prefix[:-1] + bytes([prefix[-1] + 1])


class _TLSClient(aetcd.Client):
    """aetcd 1.0 opens only plaintext channels: the same client over a TLS channel that
    verifies etcd against `tls.ca` and presents `tls.cert`. The files are read when the
    channel opens; gRPC keeps them for its reconnections, so after a failure with renewed
    files the client moves to a new channel (see Store's error translation)."""

    def __init__(self, tls: EtcdTLS | None, **kwargs):
        super().__init__(**kwargs)
        self._tls = tls
        self._opened_with: tuple = ()
        self._retired: list = []            # (channel, watcher) left by reopen(), closed by close()

    def _stamp(self) -> tuple:
        if self._tls is None:
            return ()
        try:
            return tuple((st.st_mtime_ns, st.st_ino) for st in map(os.stat, (self._tls.cert, self._tls.key)))
        except OSError:
            return ()

    def renewed(self) -> bool:
        """The certificate files changed since the channel was opened."""
        return self._connected.is_set() and self._stamp() != self._opened_with

    async def reopen(self) -> None:
        """Go on over a new channel opened with the files as they are now. Calls still
        running on the old one are not cancelled: it is closed with the client."""
        self._retired.append((self.channel, self._watcher))
        self._connected.clear()
        await self.connect()

    async def close(self) -> None:
        for channel, watches in self._retired:
            with contextlib.suppress(Exception):
                await watches.shutdown()
                await channel.close()
        self._retired.clear()
        await super().close()

    def _credentials(self) -> grpc.ChannelCredentials:
        if self._tls is None:              # https without a client certificate: system CAs
            return grpc.ssl_channel_credentials()
        try:
            with open(self._tls.ca, "rb") as ca, open(self._tls.cert, "rb") as cert, \
                    open(self._tls.key, "rb") as key:
                return grpc.ssl_channel_credentials(root_certificates=ca.read(), private_key=key.read(),
                                                    certificate_chain=cert.read())
        except OSError as e:
            raise StoreUnavailable(f"cannot read the etcd client certificate: {e}",
                                   "run 'dbplane up' on this data root, or copy the client certificate "
                                   "to this host (docs/security-tls.md, 'etcd')") from None

    async def connect(self) -> None:
        # aetcd.Client.connect without authentication, on a secure channel; nothing here
        # awaits, so concurrent callers cannot interleave
        if self._connected.is_set():
            return
        self._opened_with = self._stamp()
        self.channel = grpc.aio.secure_channel(f"{self._host}:{self._port}", self._credentials(),
                                               options=list(self._options.items()))
        self.kvstub = rpc.KVStub(self.channel)
        self.clusterstub = rpc.ClusterStub(self.channel)
        self.leasestub = rpc.LeaseStub(self.channel)
        self.maintenancestub = rpc.MaintenanceStub(self.channel)
        self._watcher = watcher.Watcher(rpc.WatchStub(self.channel), timeout=self._timeout,
                                        metadata=self.metadata)
        self._connected.set()


class Store:
    """One etcd connection. Use as `async with Store(url, tls=...) as store:`.
    tls: the client certificate for an https URL (ignored for http)."""

    def __init__(self, url: str, timeout: float = 5.0, tls: EtcdTLS | None = None):
        self.url = url
        parts = urlsplit(url if "://" in url else f"http://{url}")
        where = {"host": parts.hostname or "127.0.0.1", "port": parts.port or 2379,
                 "timeout": timeout, "connect_wait_timeout": int(timeout)}
        self.tls = tls if is_https(url) else None
        self._client = _TLSClient(self.tls, **where) if is_https(url) else aetcd.Client(**where)

    async def __aenter__(self) -> Store:
        await self.connect()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    @_translate
    async def connect(self) -> None:
        await self._client.connect()
        await self._client.status()      # fail now, not at the first read, if etcd is down

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._client.close()

    # -- reads -----------------------------------------------------------------------

    @_translate
    async def get_raw(self, key: str) -> bytes | None:
        r = await self._client.get(key.encode())
        return r.value if r is not None else None

    async def get(self, key: str, model: type[M]) -> M | None:
        raw = await self.get_raw(key)
        return model.model_validate_json(raw) if raw is not None else None

    @_translate
    async def get_prefix(self, prefix: str) -> dict[str, bytes]:
        """All keys under prefix, in key order."""
        result = await self._client.get_prefix(prefix.encode())
        return {kv.key.decode(): kv.value for kv in result}

    @_translate
    async def get_range(self, start: str, end: str) -> dict[str, bytes]:
        """All keys in [start, end), in key order (a page of a prefix)."""
        result = await self._client.get_range(start.encode(), end.encode())
        return {kv.key.decode(): kv.value for kv in result}

    async def list(self, prefix: str, model: type[M]) -> list[M]:
        return [model.model_validate_json(v) for v in (await self.get_prefix(prefix)).values()]

    # -- writes ----------------------------------------------------------------------

    @staticmethod
    def _encode(value: BaseModel | dict | str) -> bytes:
        if isinstance(value, BaseModel):
            return value.model_dump_json().encode()
        if isinstance(value, str):
            return value.encode()
        return json.dumps(value).encode()

    @_translate
    async def put(self, key: str, value: BaseModel | dict | str, lease=None) -> None:
        await self._client.put(key.encode(), self._encode(value), lease=lease)

    @_translate
    async def create(self, key: str, value: BaseModel | dict | str, lease=None) -> bool:
        """Write key only if it does not exist. Returns False if it already did."""
        k = key.encode()
        t = self._client.transactions
        ok, _ = await self._client.transaction(
            compare=[t.version(k) == 0],
            success=[t.put(k, self._encode(value), lease=lease)], failure=[])
        return ok

    @_translate
    async def create_all(self, items: dict[str, BaseModel | dict | str]) -> bool:
        """Write every key in one transaction, only if none of them exists yet."""
        t = self._client.transactions
        ok, _ = await self._client.transaction(
            compare=[t.version(k.encode()) == 0 for k in items],
            success=[t.put(k.encode(), self._encode(v)) for k, v in items.items()], failure=[])
        return ok

    @_translate
    async def commit_if(self, key: str, expected: bytes | None,
                        items: dict[str, BaseModel | dict | str | bytes],
                        delete_ranges: Sequence[tuple[str, str]] = (),
                        absent: Sequence[str] = ()) -> bool:
        """Compare-and-swap: write items and delete the [start, end) ranges in one
        transaction, only if `key` still holds `expected` (None: it does not exist) and none
        of the `absent` keys exists. False when another writer got there first: re-read and
        retry."""
        k, t = key.encode(), self._client.transactions
        compare = [t.version(k) == 0 if expected is None else t.value(k) == expected]
        compare += [t.version(name.encode()) == 0 for name in absent]
        ops = [t.put(name.encode(), v if isinstance(v, bytes) else self._encode(v))
               for name, v in items.items()]
        ops += [t.delete(start.encode(), range_end=end.encode()) for start, end in delete_ranges]
        ok, _ = await self._client.transaction(compare=compare, success=ops, failure=[])
        return ok

    @_translate
    async def delete(self, key: str) -> bool:
        return bool(await self._client.delete(key.encode()))

    @_translate
    async def delete_prefix(self, prefix: str) -> None:
        await self._client.delete_prefix(prefix.encode())

    # -- leases and watches ------------------------------------------------------------

    @_translate
    async def lease(self, ttl: int):
        return await self._client.lease(ttl)

    @_translate
    async def refresh(self, lease) -> None:
        await lease.refresh()

    async def register(self, key: str, value: BaseModel | dict | str, ttl: int) -> Registration:
        """Put `key` under a lease of `ttl` seconds; keep it with Registration.keep()."""
        return await Registration(self, key, value, ttl).start()

    def changes(self, *prefixes: str) -> ChangeSignal:
        """A signal that fires when anything under the prefixes changes."""
        return ChangeSignal(self, prefixes)

    async def _watch_forever(self, prefix: str, fire) -> None:
        while True:
            try:
                watch = await self._client.watch_prefix(prefix.encode())
                async for _ in watch:
                    fire()
            except asyncio.CancelledError:
                raise
            except Exception as e:   # etcd restarted or the stream broke: re-watch
                log.debug("watch on %s broke (%s); re-watching", prefix, e)
                fire()
                await asyncio.sleep(1.0)


async def serve_until(stopping: asyncio.Event, url: str, tls: EtcdTLS | None, serve,
                      retrying: str = "retrying") -> None:
    """Run `serve(store)` on a connection to etcd until `stopping` is set; when etcd goes
    away, log it and connect again 2 s later (the long-running services' main loop)."""
    while not stopping.is_set():
        try:
            async with Store(url, tls=tls) as store:
                await serve(store)
        except StoreUnavailable as e:
            log.warning("%s; %s", e, retrying)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), 2.0)


class Registration:
    """A key held under a lease while its process lives (a host, a proxy, a collector), so
    that others see it vanish when the process dies. keep() refreshes the lease every ttl/4
    and puts the key again under a new lease if it expired meanwhile (a long pause, an etcd
    restart)."""

    def __init__(self, store: Store, key: str, value: BaseModel | dict | str, ttl: int):
        self.store, self.key, self.value, self.ttl = store, key, value, ttl
        self.lease = None
        self._refreshed = 0.0

    async def start(self) -> Registration:
        self.lease = await self.store.lease(self.ttl)
        await self.store.put(self.key, self.value, lease=self.lease)
        self._refreshed = time.monotonic()
        return self

    async def keep(self, force: bool = False) -> None:
        if not force and time.monotonic() - self._refreshed <= self.ttl / 4:
            return
        await self.store.refresh(self.lease)
        self._refreshed = time.monotonic()
        if await self.store.get_raw(self.key) is None:
            await self.start()


class ChangeSignal:
    """Level-triggered wake-ups: consumers re-read what they need after each wake-up, so
    the watch events themselves carry no payload. A control loop does
    `await signal.wait(timeout)` between passes instead of sleeping."""

    def __init__(self, store: Store, prefixes: tuple[str, ...]):
        self._event = asyncio.Event()
        self._tasks = [asyncio.create_task(store._watch_forever(p, self._event.set))
                       for p in prefixes]

    async def wait(self, timeout: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._event.wait(), timeout)
        self._event.clear()

    def close(self) -> None:
        for t in self._tasks:
            t.cancel()
