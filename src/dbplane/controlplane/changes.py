"""Apply a changed spec (`db modify`) to a running database, one small step per pass.

1. Parameters and synchronous mode go into Patroni's dynamic configuration (PATCH /config
   on the primary's REST API); every Patroni then reloads its PostgreSQL.
2. Each running member is asked, through pg_settings, whether it runs the wanted values
   or holds them pending a restart (postmaster-context settings).
3. Members pending a restart are restarted one at a time, replicas and standby first;
   then a Multi-AZ primary is switched over to its standby and restarted as a replica
   (a Single-AZ primary restarts in place: a short outage).
4. When nothing is left, the generation counts as applied; until then the status carries
   `pending_changes`, plain sentences that `db describe` shows.
"""

from __future__ import annotations

import json
import logging

import psycopg

from ..models import DatabaseSecrets, DatabaseSpec, DatabaseStatus
from ..parameters import REPLICA_AT_LEAST, at_least, catalog, postgres_parameters, same_value
from ..security import db_secrets
from ..store import keys
from . import operations, patroni_rest, proxy
from .topology import MemberView, member_views

log = logging.getLogger("dbplane.controller")

# Settings that act only while a server is in recovery. A primary holding one pending is not
# restarted for it: a restored primary runs with hot_standby off (Patroni turns it off for a
# recovery that promotes at its target), and it takes effect at the next start anyway, which
# a demotion always is.
RECOVERY_ONLY = frozenset({"hot_standby"})


def restarts_for(name: str, v: MemberView) -> bool:
    """Whether a pending `name` is worth restarting member v for."""
    return not (name in RECOVERY_ONLY and v.role == "primary")


def action_key(db: str) -> str:
    return f"{db}:changes"


def wanted_config(spec: DatabaseSpec) -> dict:
    return {"synchronous_mode": spec.multi_az,
            "postgresql": {"parameters": postgres_parameters(spec)}}


def config_patch(spec: DatabaseSpec, current: dict) -> dict:
    """What to PATCH into Patroni's /config so that it holds the spec (empty: nothing)."""
    patch: dict = {}
    want = wanted_config(spec)
    if str(current.get("synchronous_mode")).lower() not in (
            ("true", "on", "quorum") if want["synchronous_mode"] else ("false", "off")):
        patch["synchronous_mode"] = want["synchronous_mode"]
    have = (current.get("postgresql") or {}).get("parameters") or {}
    wanted = want["postgresql"]["parameters"]
    params = {k: v for k, v in wanted.items() if str(have.get(k)) != v}
    params.update({k: None for k in have if k not in wanted})
    if params:
        patch["postgresql"] = {"parameters": params}
    return patch


async def member_settings(v: MemberView, secrets: DatabaseSecrets, names: list[str]) -> dict:
    """name -> (setting, unit, vartype, pending_restart) as this member's server reports."""
    async with await psycopg.AsyncConnection.connect(
            host=v.address, port=v.port, user="postgres", password=secrets.superuser,
            dbname="postgres", connect_timeout=3, autocommit=True) as conn:
        rows = await (await conn.execute(
            "SELECT name, setting, unit, vartype, pending_restart FROM pg_settings "
            "WHERE name = ANY(%s)", (names,))).fetchall()
    return {r[0]: r[1:] for r in rows}


def compare(v: MemberView, wanted: dict[str, str], settings: dict) -> tuple[list[str], list[str]]:
    """(names not loaded yet, names loaded but waiting for a restart) on one member."""
    stale, restart = [], []
    for name, value in wanted.items():
        if name not in settings or not restarts_for(name, v):
            continue
        setting, unit, vartype, pending = settings[name]
        if pending:
            restart.append(name)
        elif same_value(value, setting, unit, vartype):
            continue
        elif v.role != "primary" and name in REPLICA_AT_LEAST and at_least(value, setting, unit):
            continue
        else:
            stale.append(name)
    return stale, restart


async def ensure_changes(p, spec: DatabaseSpec, status: DatabaseStatus) -> None:
    if not status.ever_available or status.applied_generation >= spec.generation:
        status.pending_changes = []
        return
    if keys.paused_by_down(spec.name) in p.snap.raw:
        status.pending_changes = ["waiting for every member to start after 'dbplane up'"]
        return
    pending = await _pending(p, spec, status)
    status.pending_changes = pending
    if not pending:
        log.info("%s: generation %d applied", spec.name, spec.generation)
        first = status.applied_generation == 0     # a database from before generations
        status.applied_generation = spec.generation
        status.restarted = []
        if not first:
            await operations.record_event(p.store, spec.name, "modified",
                                          f"changes applied (generation {spec.generation})")


async def _pending(p, spec: DatabaseSpec, status: DatabaseStatus) -> list[str]:
    leaving = {m.name for m in p.snap.members(spec.name) if m.deleting or m.stopped}
    views = [v for v in member_views(p.snap, spec.name) if v.name not in leaving]
    primary = next((v for v in views if v.role == "primary"), None)
    key = action_key(spec.name)
    busy = p.actions.busy(key)
    if busy:
        return [busy]
    outcome = p.actions.take(key)
    if outcome is not None and not outcome.ok:
        await operations.record_event(p.store, spec.name, "change-step-failed",
                                      f"{outcome.what} failed: {outcome.error}")
    if primary is None or primary.state != "running":
        return ["waiting for a primary to apply the changes to"]
    raw = p.snap.raw.get(keys.patroni_scope(spec.name) + "config")
    patch = config_patch(spec, json.loads(raw) if raw else {})
    if patch:
        url = patroni_rest.api_url(primary.address, primary.api_port)
        try:
            await patroni_rest.patch_config(url, patch)
        except patroni_rest.PatroniError as e:
            return [f"retrying the configuration change: {e.message}"]
        names = sorted((patch.get("postgresql") or {}).get("parameters", {}))
        names += ["synchronous_mode"] if "synchronous_mode" in patch else []
        return [f"applying {', '.join(names)} through Patroni's dynamic configuration"]
    # restart nothing while a member is still joining or catching up after its restart
    return placement_pending(p, spec, views) or await restart_pending(p, spec, status, views)


def placement_pending(p, spec: DatabaseSpec, views: list[MemberView]) -> list[str]:
    out = []
    for m in p.snap.members(spec.name):
        if m.deleting:
            kind = "read replica" if m.kind == "replica" else "standby"
            out.append(f"removing {kind} {m.name} (zone {m.zone})")
    for v in views:
        if v.role != "primary" and v.state != "streaming" and v.state != "host-down":
            kind = "read replica" if v.kind == "replica" else "standby"
            out.append(f"waiting for {kind} {v.name} (zone {v.zone}) to stream: {v.state}")
    if spec.multi_az and not any(v.role == "sync_standby" for v in views) and not out:
        out.append("waiting for a synchronous standby in another zone")
    return out


async def restart_pending(p, spec: DatabaseSpec, status: DatabaseStatus,
                          views: list[MemberView]) -> list[str]:
    secrets_raw = p.snap.raw.get(keys.secrets(spec.name))
    if secrets_raw is None:
        return []
    secrets = await db_secrets.open_raw(p.store, keys.secrets(spec.name), secrets_raw)
    wanted = postgres_parameters(spec)
    running = [v for v in views if v.state in ("running", "streaming")]
    stale, restart = [], []
    for v in running:
        try:
            not_loaded, needs = compare(v, wanted, await member_settings(v, secrets, list(wanted)))
        except psycopg.Error as e:
            stale.append(f"waiting to reach {v.name} to check its settings ({type(e).__name__})")
            continue
        if not_loaded:
            stale.append(f"waiting for {v.name} to load {', '.join(not_loaded)}")
        patroni_flag = patroni_pending(p.snap.patroni(spec.name).members.get(v.name, {}), v)
        tag = f"{v.name}@{spec.generation}"
        if (needs or patroni_flag) and tag not in status.restarted:
            restart.append((v, needs))
    if stale:
        return stale
    if not restart:
        return []
    replicas = [(v, n) for v, n in restart if v.role != "primary"]
    if replicas:
        replicas.sort(key=lambda x: (x[0].kind != "replica", x[0].name))
        return [await _restart(p, spec, status, *replicas[0])]
    v, needs = restart[0]
    return [await _restart_primary(p, spec, status, v, needs, views)]


def patroni_pending(member: dict, v: MemberView) -> bool:
    """Patroni's own pending-restart flag (it also covers settings dbplane does not set, and
    values pg_controldata raised), less the recovery-only ones on a primary."""
    reasons = member.get("pending_restart_reason") or {}
    if reasons and v.role == "primary":
        return any(restarts_for(name, v) for name in reasons)
    return bool(member.get("pending_restart"))


async def _restart(p, spec, status, v: MemberView, needs: list[str]) -> str:
    what = f"restarting {'read replica' if v.kind == 'replica' else v.role.replace('_', ' ')} " \
           f"{v.name} to apply {', '.join(needs) or 'pending settings'}"
    url = patroni_rest.api_url(v.address, v.api_port)
    p.actions.start(action_key(spec.name), what, patroni_rest.restart(url, v.name))
    status.restarted.append(f"{v.name}@{spec.generation}")
    await operations.record_event(p.store, spec.name, "restart", what)
    return what


async def _restart_primary(p, spec, status, v: MemberView, needs: list[str],
                           views: list[MemberView]) -> str:
    standby = next((s for s in views if s.role == "sync_standby" and s.state == "streaming"
                    and s.kind == "primary_candidate"), None)
    tag = f"switchover@{spec.generation}"
    if standby is not None and tag not in status.restarted:
        if not await proxy.drained(p.store, p.snap.raw, spec.name, tag, v.name):
            return f"draining proxies before switching over from {v.name} to {standby.name}"
        what = f"switching over from {v.name} to {standby.name} so that {v.name} can restart " \
               f"as a standby to apply {', '.join(needs) or 'pending settings'}"
        url = patroni_rest.api_url(v.address, v.api_port)
        p.actions.start(action_key(spec.name), what,
                        patroni_rest.switchover(url, v.name, standby.name))
        status.restarted.append(tag)
        await operations.record_event(p.store, spec.name, "restart", what)
        return what
    return await _restart(p, spec, status, v, needs)


async def progress(store, snap, op) -> None:
    """The `modify` operation: done when the status says its generation is applied."""
    spec = snap.specs().get(op.database)
    status = snap.status(op.database)
    if spec is None or spec.deleting:
        await operations.update(store, op, state="failed", message="database was deleted")
        return
    if status is not None and status.applied_generation >= op.params["generation"]:
        await operations.update(store, op, state="succeeded", progress=100,
                                message=f"database {op.database} is modified")
        return
    pending = status.pending_changes if status else []
    await operations.update(store, op, state="running", progress=50 if pending else 10,
                            message="; ".join(pending) or "waiting for the controller")


def restart_needed(old: DatabaseSpec, new: DatabaseSpec) -> list[str]:
    """Settings that change from old to new and take effect only after a restart."""
    before, after = postgres_parameters(old), postgres_parameters(new)
    cat = catalog()
    return sorted(k for k, v in after.items()
                  if before.get(k) != v and k in cat and cat[k].needs_restart)
