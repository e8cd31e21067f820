"""Logins with IAM database tokens (security/dbtoken.py) at the proxy.

A database user that is a member of the role dbplane_iam logs in with tokens only (as
rds_iam users do on RDS). The proxy checks the token (signature with the access key's
secret, expiry, database, user) and the principal's policies (db:Connect on
dbuser/<db>/<user>), then logs in to the server as that user with a password only
dbplane knows: generated on first use, sealed in etcd under the KMS secrets key, and set
on the primary as a SCRAM verifier (never as text). If someone changes that user's
password in SQL, the next token login sets it back.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from typing import TYPE_CHECKING

from psycopg import sql

from ..security import dbtoken, iam
from ..security.policy import Request as PolicyRequest
from ..security.scram import Verifier, new_password, verifier
from ..security.sealed import SECRETS_KEY_ALIAS, SealedSecret, seal, unseal
from ..store import Store, keys

if TYPE_CHECKING:
    from .cluster import Cluster

log = logging.getLogger("dbplane.proxy")


def _client_key(password: str, v: Verifier) -> bytes | None:
    """The SCRAM ClientKey of `password` under the verifier's salt, or None if the
    verifier is not that password's."""
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), v.salt, v.iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    return client_key if hmac.compare_digest(hashlib.sha256(client_key).digest(), v.stored_key) else None


class IamLogin:
    def __init__(self, store: Store):
        self.store = store
        self.authority = iam.Authority(store)

    async def check(self, token: str, database: str, user: str, source_ip: str, tls: bool) -> str:
        """The principal a token speaks for, or dbtoken.TokenError / iam errors."""
        claims, _, _ = dbtoken.claims(token)
        identity = await self.authority.identity(claims.key_id)
        dbtoken.verify(token, identity.secret, database, user)
        await self.authority.authorize(identity.principal, PolicyRequest(
            action="db:Connect", resource=f"dbuser/{database}/{user}", source_ip=source_ip,
            secure_transport=tls, principal=identity.principal, database_user=user))
        return identity.principal

    async def _password(self, database: str, user: str) -> str:
        key = keys.iam_db_password(database, user)
        context = f"IAM password of {user} in {database}"
        kms = await self.authority.kms()
        record = await self.store.get(key, SealedSecret)
        if record is None:
            await self.store.create(key, seal(kms, SECRETS_KEY_ALIAS, new_password(), context))
            record = await self.store.get(key, SealedSecret)      # ours, or another proxy's
        return unseal(kms, record, context)

    async def server_keys(self, cluster: Cluster, user: str) -> tuple[bytes, bytes]:
        """(ClientKey, ServerKey) for the pool's logins to the server as `user`."""
        password = await self._password(cluster.name, user)
        current = await cluster.auth.verifier(user)
        client_key = _client_key(password, current) if current else None
        if client_key is None:
            conn = await cluster.auth.primary_connection()
            try:
                await conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                    sql.Identifier(user), sql.Literal(verifier(password))))
            finally:
                await conn.close()
            log.info("set the IAM password of %s in %s", user, cluster.name)
            cluster.auth.forget(user)
            current = await cluster.auth.verifier(user)
            client_key = _client_key(password, current) if current else None
            if client_key is None:
                raise ConnectionError(f"the IAM password of {user} did not reach the node that "
                                      "answers verifier lookups yet; retry")
        return client_key, current.server_key
