"""Read replicas and surplus members: which members count, where a replica goes, removal
of members the spec no longer wants, and the add/remove-replica operations.

A member is removed in two passes, as whole databases are: the controller marks it
deleting, its agent stops it and removes its directory and reports `deleted`, then the
controller drops its keys (placement, status, ports, Patroni's member key).
"""

from __future__ import annotations

import logging
from collections import Counter

from ..models import DatabaseSpec, MemberSpec, Operation
from ..store import Store, keys
from . import operations
from .topology import Snapshot, member_views

log = logging.getLogger("dbplane.controller")


def given_away(snap: Snapshot, db: str) -> dict[str, str]:
    """Members of db being promoted into databases of their own: member -> new database."""
    spec = snap.specs().get(db)
    return dict(spec.promoted_members) if spec is not None else {}


def active(spec: DatabaseSpec, m: MemberSpec, away: dict[str, str]) -> bool:
    """Whether a member counts towards the spec (not leaving, removed or given away)."""
    return not (m.deleting or m.stopped or m.name in spec.removed_members or m.name in away)


def wanted_zone(spec: DatabaseSpec, members: list[MemberSpec]) -> str | None:
    """The zone of the next read replica: a zone asked for and not yet served, else any."""
    have = Counter(m.zone for m in members if m.kind == "replica")
    for zone in spec.replica_zones:
        if have[zone] > 0:
            have[zone] -= 1
        else:
            return zone
    return None


async def ensure_scale_down(p, spec: DatabaseSpec, desired: dict[str, int]) -> None:
    """Mark for removal the members the user removed and any surplus of a kind (the
    standby after --no-multi-az); never the current leader."""
    members = p.snap.members(spec.name)
    away = given_away(p.snap, spec.name)
    leader = p.snap.patroni(spec.name).leader
    doomed = [m for m in members if not m.deleting and m.name in spec.removed_members]
    live = [m for m in members if active(spec, m, away)]
    for kind, want in desired.items():
        spare = sorted((m for m in live if m.kind == kind and m.name != leader),
                       key=lambda m: (m.zone not in spec.replica_zones, m.created_at),
                       reverse=True)
        surplus = sum(1 for m in live if m.kind == kind) - want
        doomed += spare[:max(0, surplus)]
    for m in doomed:
        await mark_deleting(p.store, m, "removing")
        # later steps of this pass see it leaving
        p.snap.raw[keys.member(m.database, m.name)] = \
            m.model_copy(update={"deleting": True}).model_dump_json().encode()


async def mark_deleting(store: Store, m: MemberSpec, why: str) -> None:
    kind = "read replica" if m.kind == "replica" else "standby"
    await store.put(keys.member(m.database, m.name), m.model_copy(update={"deleting": True}))
    await operations.record_event(store, m.database, "member-removing",
                                  f"{why} {kind} {m.name} (zone {m.zone})")
    log.info("%s: %s %s %s", m.database, why, kind, m.name)


async def ensure_removed(p, spec: DatabaseSpec) -> None:
    """Drop the keys of members whose agent has stopped and removed them."""
    statuses = p.snap.member_statuses(spec.name)
    for m in p.snap.members(spec.name):
        st = statuses.get(m.name)
        if not m.deleting or st is None or st.state != "deleted":
            continue
        await p.store.delete(keys.member(spec.name, m.name))
        await p.store.delete(keys.member_status(spec.name, m.name))
        await p.store.delete(keys.patroni_scope(spec.name) + f"members/{m.name}")
        for port in (m.pg_port, m.api_port):
            await p.store.delete(keys.port(m.address, port))
        await operations.record_event(p.store, spec.name, "member-removed",
                                      f"{m.name} (zone {m.zone}) stopped and removed")


# -- operations ------------------------------------------------------------------------------

async def progress_add(store: Store, snap: Snapshot, op: Operation) -> None:
    spec = snap.specs().get(op.database)
    if spec is None or spec.deleting:
        await operations.update(store, op, state="failed", message="database was deleted")
        return
    where = f" in zone {op.params['zone']}" if op.params.get("zone") else ""
    before = set(op.params.get("before", []))
    new = [m for m in snap.members(op.database)
           if m.kind == "replica" and m.name not in before and not m.deleting]
    if not new:
        await operations.update(store, op, state="running", progress=10,
                                message=f"placing a read replica{where}")
        return
    view = next(v for v in member_views(snap, op.database) if v.name == new[0].name)
    if view.state == "streaming":
        await operations.update(store, op, state="succeeded", progress=100,
                                message=f"read replica {view.name} is streaming in zone "
                                f"{view.zone} ({view.address}:{view.port})")
    else:
        await operations.update(store, op, state="running", progress=50,
                                message=f"read replica {view.name} in zone {view.zone} is "
                                f"{view.state}")


async def progress_remove(store: Store, snap: Snapshot, op: Operation) -> None:
    name = op.params["member"]
    member = next((m for m in snap.members(op.database) if m.name == name), None)
    if member is None:
        await operations.update(store, op, state="succeeded", progress=100,
                                message=f"read replica {name} removed")
    elif member.host not in {h.name for h in snap.hosts()}:
        await operations.update(store, op, state="running", progress=50,
                                message=f"waiting for {member.host} to come back to remove {name}")
    else:
        await operations.update(store, op, state="running", progress=50,
                                message=f"stopping {name} and removing its data")
