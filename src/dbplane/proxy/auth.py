"""Where the proxy finds a user's SCRAM verifier: pg_authid on a node of the database
(like PgBouncer's auth_query), read as the superuser and cached briefly. The proxy never
sees a client's password, only its proof; see security/scram.py."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

import psycopg

from ..security.scram import Verifier, parse_verifier
from . import pgconn

if TYPE_CHECKING:
    from .cluster import Cluster

log = logging.getLogger("dbplane.proxy")

CACHE_SECONDS = 30.0        # a changed password reaches the proxy within this
UNKNOWN_SECONDS = 5.0       # unknown users are looked up again after this

# with whether the user is a member of dbplane_iam: it then logs in with tokens only. A
# grant WITH ADMIN OPTION (the admin user's, so that it can grant the role) does not count.
QUERY = ("SELECT a.rolpassword, EXISTS (SELECT 1 FROM pg_auth_members m JOIN pg_roles r "
         "ON r.oid = m.roleid WHERE m.member = a.oid AND r.rolname = 'dbplane_iam' "
         "AND NOT m.admin_option) "
         "FROM pg_authid a WHERE a.rolname = %s AND a.rolcanlogin "
         "AND (a.rolvaliduntil IS NULL OR a.rolvaliduntil > now())")


class Authenticator:
    def __init__(self, cluster: Cluster, password: str):
        self.cluster = cluster
        self.password = password
        self._cache: dict[str, tuple[Verifier | None, float]] = {}
        self._iam: set[str] = set()          # users that log in with IAM tokens only
        self._conn: psycopg.AsyncConnection | None = None
        self._lock = asyncio.Lock()

    async def verifier(self, user: str) -> Verifier | None:
        cached = self._cache.get(user)
        if cached is not None:
            verifier, fetched = cached
            if time.monotonic() - fetched < (CACHE_SECONDS if verifier else UNKNOWN_SECONDS):
                return verifier
        async with self._lock:
            row = await self._query(user)
        verifier = parse_verifier(row[0] if row else None)
        self._cache[user] = (verifier, time.monotonic())
        (self._iam.add if row and row[1] else self._iam.discard)(user)
        return verifier

    def iam_user(self, user: str) -> bool:
        """Whether the user (as of its last verifier lookup) belongs to dbplane_iam."""
        return user in self._iam

    async def primary_connection(self) -> psycopg.AsyncConnection:
        """A fresh superuser session on the primary (to set an IAM user's password)."""
        cluster = self.cluster
        if not cluster.primary or cluster.primary not in cluster.members:
            raise ConnectionError(f"database {cluster.name} has no primary")
        address, port = cluster.members[cluster.primary]
        return await pgconn.connect(address, port, self.password, "iam")

    def forget(self, user: str) -> None:
        self._cache.pop(user, None)

    def forget_all(self) -> None:
        self._cache.clear()

    async def _query(self, user: str):
        """Ask the primary, else any replica (pg_authid is readable on standbys)."""
        last: Exception | None = None
        for _ in range(2):
            if self._conn is None or self._conn.closed:
                self._conn = await self._connect()
            try:
                cur = await self._conn.execute(QUERY, (user,))
                return await cur.fetchone()
            except psycopg.Error as e:
                last = e
                with contextlib.suppress(Exception):
                    await self._conn.close()
                self._conn = None
        raise ConnectionError(f"cannot look up user {user}: {last}")

    async def _connect(self) -> psycopg.AsyncConnection:
        """A node to ask, waiting up to the failover hold for one (a database that was
        just created or promoted, or a failover under way)."""
        cluster = self.cluster
        loop = asyncio.get_running_loop()
        deadline = loop.time() + cluster.settings.failover_hold
        while True:
            order = ([cluster.primary] if cluster.primary else []) + list(cluster.replicas)
            errors = []
            for member in order:
                if member not in cluster.members:
                    continue
                address, port = cluster.members[member]
                try:
                    return await pgconn.connect(address, port, self.password, "auth")
                except psycopg.Error as e:
                    errors.append(f"{member}: {e}")
            if loop.time() >= deadline:
                raise ConnectionError("no node of database " + cluster.name + " answers"
                                      + (": " + "; ".join(errors) if errors else ""))
            await cluster.wait_change(min(0.5, deadline - loop.time()))

    def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            asyncio.ensure_future(conn.close())
