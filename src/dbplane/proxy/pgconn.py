"""The proxy's own PostgreSQL sessions (looking up verifiers, watching LSNs): psycopg,
as the database's superuser, whose password comes from etcd and never leaves memory.
Over TLS verified against the platform CA (verify-full) when the nodes offer it."""

from __future__ import annotations

import psycopg

from ..security.tls import node_libpq_options


async def connect(address: str, port: int, password: str, purpose: str) -> psycopg.AsyncConnection:
    return await psycopg.AsyncConnection.connect(
        host=address, port=port, user="postgres", password=password, dbname="postgres",
        autocommit=True, connect_timeout=2, application_name=f"dbplane-proxy-{purpose}",
        **node_libpq_options())
