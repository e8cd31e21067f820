"""Switchover (planned, no data loss) and failover (forced, for drills) of a database's
primary, through Patroni's REST API.

`choose_target` is pure and shared by the API (to refuse before anything is written) and
the controller (to re-check before acting). `progress` drives one operation: ask the
current leader's Patroni, then succeed when the topology shows the new primary.
"""

from __future__ import annotations

import time

from ..errors import Conflict, DbplaneError, NotFound
from ..models import DatabaseSpec, Operation
from ..store import Store
from . import operations, patroni_rest, proxy
from .actions import Actions
from .topology import MemberView, Snapshot, member_views

MAX_SWITCHOVER_LAG = 16 * 1024 * 1024    # Patroni's maximum_lag_on_failover in patroni.py
TIMEOUT = 180.0


def _names(views: list[MemberView]) -> str:
    return ", ".join(v.name for v in views) or "none"


def choose_target(spec: DatabaseSpec, views: list[MemberView], to: str | None,
                  action: str) -> tuple[MemberView, MemberView]:
    """(current primary, member to promote), or a refusal naming cause and fix."""
    db = spec.name
    primary = next((v for v in views if v.role == "primary"), None)
    if primary is None:
        raise Conflict(f"database {db} has no primary right now",
                       f"wait until it is available ('dbplane db describe {db}')",
                       code="no_primary")
    live = [v for v in views if v.state != "deleting"]
    standbys = [v for v in live if v.kind == "primary_candidate" and v.name != primary.name]
    if to:
        target = next((v for v in live if v.name == to), None)
        if target is None:
            raise NotFound(f"database {db} has no member {to!r} (members: {_names(live)})",
                           f"see 'dbplane db describe {db}'", code="member_not_found")
        if target.kind == "replica":
            pick = f" or pick the standby {standbys[0].name}" if standbys else ""
            raise Conflict(f"{to} is a read replica and cannot become the primary of {db}",
                           f"use 'dbplane replica promote {db} {to}' to make it a standalone "
                           f"database{pick}", code="member_is_read_replica")
        if target.name == primary.name:
            raise Conflict(f"{to} is already the primary of {db}",
                           f"pick the standby{' ' + standbys[0].name if standbys else ''}",
                           code="already_primary")
    else:
        if not standbys:
            raise Conflict(f"database {db} has no standby to {action} to (Single-AZ)",
                           f"add one with 'dbplane db modify {db} --multi-az --wait'",
                           code="no_standby")
        standbys.sort(key=lambda v: (v.role != "sync_standby", v.lag_bytes or 0, v.name))
        target = standbys[0]
    problem = unhealthy(spec, target, action)
    if problem:
        raise Conflict(f"{target.name} cannot take over: {problem}",
                       f"wait until it is streaming ('dbplane db describe {db}') and retry",
                       code="target_unhealthy")
    return primary, target


def unhealthy(spec: DatabaseSpec, target: MemberView, action: str) -> str | None:
    if target.state != "streaming":
        return f"it is {target.state}"
    if action == "switchover" and spec.multi_az and target.role != "sync_standby":
        return "it is not the synchronous standby yet"
    if action == "switchover" and (target.lag_bytes or 0) > MAX_SWITCHOVER_LAG:
        return f"it is {target.lag_bytes // (1024 * 1024)} MB behind"
    return None


async def start(actions: Actions, op: Operation, primary: MemberView, target: MemberView) -> None:
    if op.kind == "switchover":
        url = patroni_rest.api_url(primary.address, primary.api_port)
        call = patroni_rest.switchover(url, primary.name, target.name)
    else:
        url = patroni_rest.api_url(target.address, target.api_port)
        call = patroni_rest.failover(url, target.name)
    actions.start(op.id, f"{op.kind} from {primary.name} to {target.name}", call)


async def progress(store: Store, snap: Snapshot, op: Operation, actions: Actions) -> None:
    spec = snap.specs().get(op.database)
    if spec is None or spec.deleting:
        await operations.update(store, op, state="failed", message="database was deleted")
        return
    views = member_views(snap, op.database)
    primary = next((v for v in views if v.role == "primary"), None)
    src, dst = op.params["from"], op.params["to"]
    outcome = actions.take(op.id)
    if primary is not None and primary.name != src and primary.state == "running":
        how = "" if primary.name == dst else f" (instead of {dst})"
        await operations.update(store, op, state="succeeded", progress=100,
                                message=f"{primary.name} (zone {primary.zone}) is the primary{how}")
        return
    if outcome is not None and not outcome.ok and not snap.patroni(op.database).pending_failover:
        error = outcome.error if isinstance(outcome.error, DbplaneError) else \
            DbplaneError(f"{op.kind} failed: {outcome.error}", code=f"{op.kind}_failed")
        await operations.update(store, op, state="failed", error=error,
                                message=f"{op.kind} failed: {error.message}")
        return
    if time.time() - op.created_at > TIMEOUT:
        await operations.update(store, op, state="failed", message=f"{dst} did not become the "
                                f"primary within {TIMEOUT:.0f}s",
                                error=DbplaneError(f"{op.kind} to {dst} timed out",
                                                   "see 'dbplane events' and retry",
                                                   code="timeout"))
        return
    if actions.busy(op.id) or outcome is not None or actions.started_here(op.id):
        waiting = f"waiting for {dst} to be promoted" if primary is None or primary.name != src \
            else f"asked Patroni to {op.kind} from {src} to {dst}"
        await operations.update(store, op, state="running", progress=60, message=waiting)
        return
    # not started by this controller (new operation, or the controller restarted)
    if primary is None or primary.name != src:
        return                            # a failover is under way; judge on a later pass
    try:
        primary, target = choose_target(spec, views, dst, op.kind)
    except DbplaneError as e:
        await operations.update(store, op, state="failed", error=e, message=e.message)
        return
    if op.kind == "switchover" and not await proxy.drained(store, snap.raw, op.database, op.id, src):
        await operations.update(store, op, state="running", progress=20,
                                message=f"draining: proxies hold new transactions and wait for the "
                                f"running ones on {src} to finish")
        return
    await start(actions, op, primary, target)
    await operations.update(store, op, state="running", progress=30,
                            message=f"asking Patroni to {op.kind} from {primary.name} "
                            f"(zone {primary.zone}) to {target.name} (zone {target.zone})")
