"""Credential rotation: the internal superuser (also the proxy's and backup workers'
login), replication and rewind passwords and the admin user's password, on request
(`dbplane db rotate-credentials`) or every `credential_rotation_days`.

Crash-safe in three steps (both records sealed, security/db_secrets.py): (1) the new
passwords are written to `secrets-next/<db>`; (2) the roles get them on the primary, as
SCRAM verifiers, over a session opened with the old superuser password; (3) they replace
`secrets/<db>` and the next copy is deleted.
Agents then rewrite patroni.yml and reload Patroni (replicas reconnect with the new
replication password), proxies take the new superuser password for their lookups, and
the admin user's pgpass file is rewritten. Sessions already open are not disturbed;
PostgreSQL holds one password per role, so a new login that still uses an old password
in the second between (2) and the reload fails and is retried by Patroni.
A controller that dies between (1) and (3) finishes the rotation in its next pass: it
tries the next superuser password first (step 2 happened) and the old one otherwise.
IAM database users' passwords (proxy/iam_login.py) are regenerated at their next login.
"""

from __future__ import annotations

import logging
import time

import psycopg
from psycopg import sql

from ..models import DatabaseSecrets, DatabaseSpec, MemberSpec, Operation, now
from ..security import db_secrets
from ..security.scram import new_password, verifier
from ..store import keys
from . import operations
from .admin import write_pgpass

log = logging.getLogger("dbplane.controller")
KIND = "rotate-credentials"


def _roles(spec: DatabaseSpec, s: DatabaseSecrets) -> dict[str, str]:
    return {"postgres": s.superuser, "replicator": s.replication, "rewinder": s.rewind,
            spec.admin_user: s.admin}


async def _connect(primary: MemberSpec, password: str) -> psycopg.AsyncConnection:
    return await psycopg.AsyncConnection.connect(
        host=primary.address, port=primary.pg_port, user="postgres", password=password,
        dbname="postgres", connect_timeout=5, autocommit=True, application_name="dbplane-rotation")


def due(spec: DatabaseSpec, rotated_at: float, at: float) -> bool:
    """Whether a scheduled rotation is due, from the secrets' rotated_at (0: never)."""
    if not spec.credential_rotation_days:
        return False
    last = rotated_at or spec.created_at
    return at - last >= spec.credential_rotation_days * 86400


async def _apply(p, spec: DatabaseSpec, primary: MemberSpec, old: DatabaseSecrets,
                 new: DatabaseSecrets, resumed: bool) -> None:
    conn = None
    if resumed:                      # step 2 may have happened before the controller died
        try:
            conn = await _connect(primary, new.superuser)
        except psycopg.OperationalError:
            pass
    conn = conn or await _connect(primary, old.superuser)
    async with conn:
        existing = {r for (r,) in await (await conn.execute("SELECT rolname FROM pg_roles")).fetchall()}
        for role, password in _roles(spec, new).items():
            if role in existing:
                await conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                    sql.Identifier(role), sql.Literal(verifier(password))))
    await db_secrets.save(p.store, keys.secrets(spec.name), new)
    write_pgpass(p.data_root / "secrets" / f"{spec.name}.pgpass", spec.admin_user, new.admin)
    await p.store.delete_prefix(keys.iam_db_passwords(spec.name))
    await p.store.delete(keys.secrets_next(spec.name))


async def ensure_rotation(p, spec: DatabaseSpec, admin_ready: bool) -> None:
    """Finish a started rotation, or start one that is asked for or due."""
    if spec.deleting or not admin_ready:
        return
    raw = p.snap.raw.get(keys.secrets(spec.name))
    if raw is None:
        return
    pending_raw = p.snap.raw.get(keys.secrets_next(spec.name))
    ops = [o for o in p.snap.operations() if o.database == spec.name and o.kind == KIND and not o.done]
    if pending_raw is None and not ops and not due(spec, db_secrets.rotated_at(raw), time.time()):
        return
    patroni = p.snap.patroni(spec.name)
    primary = next((m for m in p.snap.members(spec.name) if m.name == patroni.leader), None)
    if primary is None or patroni.members.get(primary.name, {}).get("state") != "running":
        for op in ops:
            await operations.update(p.store, op, state="running", progress=10,
                                    message="waiting for a running primary")
        return
    old = await db_secrets.open_raw(p.store, keys.secrets(spec.name), raw)
    if pending_raw is not None:
        new = await db_secrets.open_raw(p.store, keys.secrets_next(spec.name), pending_raw)
    else:
        new = DatabaseSecrets(superuser=new_password(), replication=new_password(),
                              rewind=new_password(), admin=new_password(), rotated_at=now())
        await db_secrets.save(p.store, keys.secrets_next(spec.name), new)
    try:
        await _apply(p, spec, primary, old, new, resumed=pending_raw is not None)
    except (psycopg.Error, OSError) as e:
        log.warning("%s: credential rotation not done yet: %s", spec.name, e)
        for op in ops:
            await operations.update(p.store, op, state="running", progress=30,
                                    message=f"retrying: {str(e).splitlines()[0][:200]}")
        return
    why = f"operation {ops[0].id}" if ops else ("resumed" if pending_raw else
                                               f"every {spec.credential_rotation_days} days")
    await operations.record_event(p.store, spec.name, "credentials-rotated",
                                  f"superuser, replication, rewind and admin passwords rotated ({why})")
    log.info("%s: credentials rotated (%s)", spec.name, why)
    for op in ops:
        await operations.update(p.store, op, state="succeeded", progress=100,
                                message="superuser, replication, rewind and admin passwords rotated; "
                                        "the admin pgpass file is rewritten")


def new_operation(name: str) -> Operation:
    return Operation(kind=KIND, database=name, message="rotation requested")
