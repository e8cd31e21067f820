"""Promote a read replica into a standalone database (RDS semantics).

The API first records the handover in the source spec (`promoted_members`, one replica
fewer), then writes the new DatabaseSpec with `promoted_from`. Then, one step per pass:

1. source database: the member is marked `stopped`; its agent stops Patroni and
   PostgreSQL and keeps the data directory;
2. new database: its secrets are copied from the source (the data directory holds the
   source's roles and passwords), and its first member is placed on the same host with
   `adopt_from`; the agent moves the data directory under the new member and starts
   Patroni in the new scope. With no `initialize` key in that scope and a non-empty data
   directory, Patroni registers the data directory's system id, starts PostgreSQL, wins
   the leader race and promotes it (a new timeline);
3. source database: once the new member leads its own scope, the old member is removed.
"""

from __future__ import annotations

from ..errors import DbplaneError
from ..models import DatabaseSpec, Host, Operation
from ..security import db_secrets
from ..store import Store, keys
from . import operations
from .replicas import given_away, mark_deleting
from .topology import Snapshot


def adopted(snap: Snapshot, new_db: str, member: str) -> bool:
    """Whether the new database's member that took over `member`'s data now leads."""
    leader = snap.patroni(new_db).leader
    return any(m.adopt_from == member and m.name == leader for m in snap.members(new_db))


async def ensure_handover(p, spec: DatabaseSpec) -> None:
    """Source side: stop members being promoted, remove them once adopted (or once their
    new database is gone: the promotion was rolled back or deleted)."""
    away = given_away(p.snap, spec.name)
    specs = p.snap.specs()
    for m in p.snap.members(spec.name):
        new_db = away.get(m.name)
        if m.deleting or new_db is None:
            continue
        target = specs.get(new_db)
        ours = target is not None and target.promoted_from is not None and \
            (target.promoted_from.database, target.promoted_from.member) == (spec.name, m.name)
        if ours and not target.deleting and not m.stopped:
            stopped = m.model_copy(update={"stopped": True})
            await p.store.put(keys.member(spec.name, m.name), stopped)
            await operations.record_event(p.store, spec.name, "promoting", f"read replica "
                                          f"{m.name} stops to become database {new_db}")
        elif ours and m.stopped and adopted(p.snap, new_db, m.name):
            await mark_deleting(p.store, m, f"handed its data to database {new_db}; removing")
        elif not ours and m.stopped:
            await mark_deleting(p.store, m, f"promotion to {new_db} abandoned; removing")


async def ensure_secrets(p, spec: DatabaseSpec) -> None:
    """New side: the promoted data directory has the source's roles, so share its secrets."""
    if spec.promoted_from is None or keys.secrets(spec.name) in p.snap.raw:
        return
    raw = p.snap.raw.get(keys.secrets(spec.promoted_from.database))
    if raw is None:
        raise DbplaneError(f"secrets of {spec.promoted_from.database} are gone; cannot promote",
                           f"delete {spec.name} and create it afresh", code="promote_source_gone")
    # sealed again: a record opens only under the key it was sealed for
    secrets = await db_secrets.open_raw(p.store, keys.secrets(spec.promoted_from.database), raw)
    text = await db_secrets.sealed_json(p.store, keys.secrets(spec.name), secrets)
    await p.store.create(keys.secrets(spec.name), text)
    p.snap.raw[keys.secrets(spec.name)] = text.encode()


def adoption_host(p, spec: DatabaseSpec) -> tuple[Host, str] | None:
    """New side, before any member exists: (host, member to adopt) once the source member
    has stopped on a live host; None while waiting."""
    src = spec.promoted_from
    m = next((m for m in p.snap.members(src.database) if m.name == src.member), None)
    if m is None or m.deleting:
        return None
    st = p.snap.member_statuses(src.database).get(m.name)
    if not (m.stopped and st is not None and st.state == "stopped"):
        return None
    host = next((h for h in p.snap.hosts() if h.name == m.host), None)
    return (host, m.name) if host is not None else None


async def progress(store: Store, snap: Snapshot, op: Operation) -> None:
    spec = snap.specs().get(op.database)
    if spec is None or spec.deleting:
        await operations.update(store, op, state="failed", message="database was deleted")
        return
    src = spec.promoted_from
    status = snap.status(op.database)
    if status is not None and status.phase == "available":
        await operations.update(store, op, state="succeeded", progress=100,
                                message=f"database {op.database} is available (promoted from "
                                f"read replica {src.member} of {src.database})")
        return
    if snap.members(op.database):
        await operations.update(store, op, state="running", progress=60,
                                message=status.message if status else "starting Patroni")
        return
    source = next((m for m in snap.members(src.database) if m.name == src.member), None)
    if source is None or source.deleting:
        error = DbplaneError(f"read replica {src.member} of {src.database} went away before "
                             "it could be promoted", "promote another read replica",
                             code="promote_source_gone")
        await operations.update(store, op, state="failed", error=error, message=error.message)
        await operations.update_spec(store, snap.raw.get(keys.database_spec(spec.name)), spec, deleting=True)
        return
    await operations.update(store, op, state="running", progress=20,
                            message=f"stopping read replica {src.member} of {src.database}")
