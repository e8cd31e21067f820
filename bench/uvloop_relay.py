"""The floor of a Python proxy: the least a uvloop process can do per message, relaying
bytes between each client and its own server connection (no parsing, no pooling, no
authentication). bench/proxy_pgbench.py runs it as the `relay` target to show how much
of dbplane's proxy CPU per transaction is Python + uvloop itself.

    .venv/bin/python bench/uvloop_relay.py LISTEN_PORT UPSTREAM_PORT
"""

from __future__ import annotations

import asyncio
import sys

import uvloop

UPSTREAM = ("127.0.0.1", int(sys.argv[2]) if len(sys.argv) > 2 else 5432)


class Upstream(asyncio.Protocol):
    def __init__(self, client: Client):
        self.client = client

    def data_received(self, data: bytes) -> None:
        self.client.transport.write(data)

    def connection_lost(self, exc) -> None:
        self.client.transport.close()


class Client(asyncio.Protocol):
    def connection_made(self, transport) -> None:
        self.transport = transport
        self.upstream: asyncio.Transport | None = None
        self.early: list[bytes] = []
        asyncio.ensure_future(self.connect())

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self.upstream, _ = await loop.create_connection(lambda: Upstream(self), *UPSTREAM)
        except OSError:
            self.transport.close()
            return
        if self.early:
            self.upstream.write(b"".join(self.early))

    def data_received(self, data: bytes) -> None:
        if self.upstream is None:
            self.early.append(data)
        else:
            self.upstream.write(data)

    def connection_lost(self, exc) -> None:
        if self.upstream is not None:
            self.upstream.close()


async def main() -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Client, "127.0.0.1", int(sys.argv[1]), backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main())
