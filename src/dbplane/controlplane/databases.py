"""Reconcile one database: an ordered list of small idempotent steps, each of which either
acts (and lets the next pass see the result) or finds nothing to do."""

from __future__ import annotations

import ipaddress
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DbplaneError, MemberFailed, StoreUnavailable
from ..models import DatabaseSecrets, DatabaseSpec, DatabaseStatus, MemberSpec, PlatformConfig, now
from ..security import db_secrets
from ..security.scram import new_password
from ..security.sealed import SECRETS_KEY_ALIAS
from ..store import Store, keys
from ..system import port_free
from . import backups, changes, credentials, drills, operations, promote, proxy, replicas, resume, storage
from .actions import Actions
from .admin import ensure_admin_user, write_pgpass
from .placement import allocate_ports, choose_host
from .topology import Snapshot, member_views

log = logging.getLogger("dbplane.controller")


@dataclass
class Pass:
    """What one reconcile pass works from: a store and a snapshot read once."""
    store: Store
    snap: Snapshot
    config: PlatformConfig
    data_root: Path
    actions: Actions = field(default_factory=Actions)   # long Patroni calls in the background
    started_at: float = 0.0       # when this controller process started (wall clock)


def _is_local(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def free_ports(p: Pass, address: str, avoid=frozenset()) -> list[int]:
    """Two ports on address that no member or proxy endpoint holds and, on this machine,
    nothing listens on."""
    taken = {int(k.rsplit("/", 1)[1]) for k in p.snap.raw
             if k.startswith(keys.ports(address)) or k.startswith(keys.ports(proxy.PROXY_ADDRESS))}
    local = _is_local(address)
    return allocate_ports(taken | set(avoid), p.config.member_port_start, p.config.member_port_end,
                          2, lambda port: not local or port_free(address, port))


def desired_counts(spec: DatabaseSpec) -> dict[str, int]:
    return {"primary_candidate": 2 if spec.multi_az else 1, "replica": spec.replicas}


async def ensure_database(p: Pass, spec: DatabaseSpec) -> None:
    status = p.snap.status(spec.name) or DatabaseStatus()
    check_creation(p, spec, status)
    await promote.ensure_secrets(p, spec)
    await ensure_secrets(p, spec)
    await proxy.ensure_proxy_ports(p, spec)
    await proxy.ensure_proxy_limits(p, spec)
    await proxy.ensure_drain_cleared(p, spec, p.snap.patroni(spec.name).leader)
    await promote.ensure_handover(p, spec)
    await ensure_placement(p, spec, status)
    await replicas.ensure_scale_down(p, spec, desired_counts(spec))
    await replicas.ensure_removed(p, spec)
    await ensure_ports_usable(p, spec)
    await ensure_admin(p, spec, status)
    await credentials.ensure_rotation(p, spec, status.admin_ready)
    await resume.ensure_resumed(p, spec)
    await storage.ensure_storage_quota(p, spec, status)
    await changes.ensure_changes(p, spec, status)
    await observe(p, spec, status)
    await backups.ensure_backups(p, spec)         # last: nothing of HA waits on backups
    await drills.ensure_drills(p, spec)


CREATE_MAX_RESTARTS = 3


def check_creation(p: Pass, spec: DatabaseSpec, status: DatabaseStatus) -> None:
    """A database that never became available and whose member keeps failing is given up
    (the controller then rolls it back) instead of retrying forever."""
    if status.ever_available:
        return
    failed = p.snap.raw.get(keys.restore_failed(spec.name))
    if failed is not None:
        raise MemberFailed(failed.decode(), "restore from another snapshot or another time; the "
                           "member's patroni.log and prefetch.log say more", code="restore_failed")
    for st in p.snap.member_statuses(spec.name).values():
        if st.reason == "patroni_exited" and st.restarts >= CREATE_MAX_RESTARTS:
            raise MemberFailed(f"{st.name} on {st.host} failed {st.restarts} times: {st.message}",
                               "fix the cause on that host (disk space, permissions; its log is "
                               "kept in the host's removed/ folder) and create the database again")


async def ensure_secrets(p: Pass, spec: DatabaseSpec) -> None:
    """Generate the passwords once, sealed under the KMS secrets key; seal those a platform
    from before sealing stored in plaintext."""
    for key in (keys.secrets(spec.name), keys.secrets_next(spec.name)):
        raw = p.snap.raw.get(key)
        if raw is None or not db_secrets.is_plaintext(raw):
            continue
        try:
            if await db_secrets.reseal(p.store, key, raw):
                log.info("%s: sealed the plaintext secrets at %s under %s", spec.name, key, SECRETS_KEY_ALIAS)
        except StoreUnavailable:
            raise
        except DbplaneError as e:      # readers still accept the plaintext; the next pass retries
            log.warning("%s: cannot seal the plaintext secrets at %s: %s", spec.name, key, e)
    if keys.secrets(spec.name) in p.snap.raw:
        return
    secrets = DatabaseSecrets(superuser=new_password(), replication=new_password(),
                              rewind=new_password(), admin=new_password())
    await db_secrets.create(p.store, keys.secrets(spec.name), secrets)


async def ensure_placement(p: Pass, spec: DatabaseSpec, status: DatabaseStatus) -> None:
    """Add members until each kind has as many as the spec asks for."""
    hosts = p.snap.hosts()
    away = replicas.given_away(p.snap, spec.name)
    db_members = [m for m in p.snap.members(spec.name) if replicas.active(spec, m, away)]
    all_members = p.snap.members()
    if spec.promoted_from is not None and not await ensure_adopting_member(p, spec, status):
        return
    want = desired_counts(spec)
    for kind in ("primary_candidate", "replica"):
        have = sum(1 for m in db_members if m.kind == kind)
        for _ in range(want[kind] - have):
            zone = replicas.wanted_zone(spec, db_members) if kind == "replica" else None
            host = choose_host(hosts, all_members, db_members, kind, zone)
            member = await place_member(p, spec, status, host, kind)
            db_members.append(member)
            all_members.append(member)


async def ensure_adopting_member(p: Pass, spec: DatabaseSpec, status: DatabaseStatus) -> bool:
    """A promoted database starts with one member that takes over the replica's data; the
    others are placed once it leads. True when placement may go on."""
    if p.snap.members(spec.name):
        return p.snap.patroni(spec.name).leader is not None
    found = promote.adoption_host(p, spec)
    if found is not None:
        host, source = found
        await place_member(p, spec, status, host, "primary_candidate", adopt_from=source)
    return False


async def place_member(p: Pass, spec: DatabaseSpec, status: DatabaseStatus, host, kind: str,
                       avoid: set[int] = frozenset(), adopt_from: str = "") -> MemberSpec:
    pg_port, api_port = free_ports(p, host.address, avoid)
    name = f"{spec.name}-{status.next_member_index}"
    status.next_member_index += 1
    member = MemberSpec(name=name, database=spec.name, host=host.name, zone=host.zone,
                        address=host.address, pg_port=pg_port, api_port=api_port, kind=kind,
                        adopt_from=adopt_from)
    # status first: a crash after it wastes a member index, never reuses one
    await p.store.put(keys.database_status(spec.name), status)
    ok = await p.store.create_all({
        keys.port(host.address, pg_port): name, keys.port(host.address, api_port): name,
        keys.member(spec.name, name): member})
    if not ok:
        raise DbplaneError(f"ports {pg_port}/{api_port} were taken concurrently; retrying",
                           code="conflict_retry", status=409)
    for port in (pg_port, api_port):
        p.snap.raw[keys.port(host.address, port)] = name.encode()
    p.snap.raw[keys.member(spec.name, name)] = member.model_dump_json().encode()
    await operations.record_event(p.store, spec.name, "member-placed",
                                  f"{kind.replace('_', ' ')} {name} placed on {host.name} "
                                  f"(zone {host.zone}), port {pg_port}")
    log.info("placed %s on %s (zone %s)", name, host.name, host.zone)
    return member


async def ensure_ports_usable(p: Pass, spec: DatabaseSpec) -> None:
    """A member whose agent found its port taken by a foreign process gets new ports."""
    statuses = p.snap.member_statuses(spec.name)
    for m in p.snap.members(spec.name):
        st = statuses.get(m.name)
        if m.deleting or st is None or st.reason != "port_in_use":
            continue
        pg_port, api_port = free_ports(p, m.address, {m.pg_port, m.api_port})
        old = (m.pg_port, m.api_port)
        moved = m.model_copy(update={"pg_port": pg_port, "api_port": api_port})
        # the status goes before the move: the agent starts the moved member at once and
        # reports it only when its state changes, so a later delete could erase "running"
        # for good (and a paused database would never resume)
        await p.store.delete(keys.member_status(spec.name, m.name))
        await p.store.create_all({keys.port(m.address, pg_port): m.name,
                                  keys.port(m.address, api_port): m.name})
        await p.store.put(keys.member(spec.name, m.name), moved)
        # keep the clashing ports reserved so nobody else is handed them
        await operations.record_event(p.store, spec.name, "port-conflict",
                                      f"{m.name}: port {old[0]} or {old[1]} was in use on "
                                      f"{m.address}; moved to {pg_port}/{api_port}")


async def ensure_admin(p: Pass, spec: DatabaseSpec, status: DatabaseStatus) -> None:
    if status.admin_ready:
        return
    patroni = p.snap.patroni(spec.name)
    primary = next((m for m in p.snap.members(spec.name) if m.name == patroni.leader), None)
    secrets_raw = p.snap.raw.get(keys.secrets(spec.name))
    if primary is None or secrets_raw is None:
        return
    if patroni.members.get(primary.name, {}).get("state") != "running":
        return
    secrets = await db_secrets.open_raw(p.store, keys.secrets(spec.name), secrets_raw)
    try:
        await ensure_admin_user(primary, spec.admin_user, secrets)
    except Exception as e:   # the primary may still be starting; the next pass retries
        log.info("admin user for %s not created yet: %s", spec.name, e)
        return
    write_pgpass(p.data_root / "secrets" / f"{spec.name}.pgpass", spec.admin_user, secrets.admin)
    status.admin_ready = True
    await p.store.put(keys.database_status(spec.name), status)


async def observe(p: Pass, spec: DatabaseSpec, status: DatabaseStatus) -> None:
    """Set phase and sentence from what Patroni and the agents report."""
    views = member_views(p.snap, spec.name)
    primary = next((v for v in views if v.role == "primary"), None)
    hosts = {h.name for h in p.snap.hosts()}
    phase, message = "available", "all members running"
    problems = []
    leaving = {m.name for m in p.snap.members(spec.name) if m.deleting or m.stopped}
    for v in views:
        if v.name in leaving:
            continue
        elif v.host not in hosts:
            problems.append(f"host {v.host} of {v.name} (zone {v.zone}) is down")
        elif v.role == "primary":
            continue
        elif v.state not in ("streaming",):
            detail = f": {v.message}" if v.message else ""
            what = v.role.replace("_", " ") if v.role != "unknown" else (
                "standby" if v.kind == "primary_candidate" else "read replica")
            problems.append(f"{what} {v.name} in zone {v.zone} is {v.state}{detail}")
        elif v.lag_bytes and v.lag_bytes > 16 * 1024 * 1024:
            problems.append(f"{v.name} is {v.lag_bytes // (1024 * 1024)} MB behind")
    if spec.multi_az and primary and not any(v.role == "sync_standby" for v in views):
        problems.append("no synchronous standby yet")
    if primary is None:
        if not status.ever_available:
            phase, message = "creating", "waiting for Patroni to elect a primary"
        elif spec.multi_az:
            phase, message = "failing-over", "waiting for Patroni to elect a primary"
        else:       # nothing can take over: the member restarts when its host returns
            phase, message = "unavailable", "the primary is down; waiting for its host to return"
        if problems:
            message += "; " + problems[0]
    elif not status.admin_ready:
        phase, message = "creating", f"primary {primary.name} is up; creating the admin user"
    elif status.pending_changes and status.ever_available:
        phase, message = "modifying", "; ".join(status.pending_changes)
    elif problems:
        phase = "creating" if not status.ever_available else "degraded"
        message = "; ".join(problems)
    if status.storage_full and primary is not None:
        used = storage.used_bytes(views) or 0
        phase, message = "storage-full", (f"{used // 2**20} MB used of the {spec.storage_gb} GB "
                                          "quota: read-only until the quota is raised")
    if keys.paused_by_down(spec.name) in p.snap.raw:
        phase, message = "starting", "waiting for every member to start after 'dbplane up'"
    if primary is not None and status.primary not in (None, primary.name):
        kind, why = primary_change_cause(p, spec.name, primary.name)
        await operations.record_event(p.store, spec.name, kind,
                                      f"primary changed from {status.primary} to {primary.name} "
                                      f"(zone {primary.zone}){why}")
    first_time = phase == "available" and not status.ever_available
    new = status.model_copy(update={
        "phase": phase, "message": message,
        "primary": primary.name if primary else status.primary,
        "ever_available": status.ever_available or phase == "available",
        # the bootstrap configuration carried the whole spec
        "applied_generation": spec.generation if first_time else status.applied_generation})
    old = p.snap.status(spec.name)
    if old is None or new.model_dump(exclude={"updated_at"}) != old.model_dump(exclude={"updated_at"}):
        new.updated_at = now()
        await p.store.put(keys.database_status(spec.name), new)


def primary_change_cause(p: Pass, db: str, new_primary: str) -> tuple[str, str]:
    """(event kind, explanation) of a primary change: an operation asked for it, or not."""
    for op in p.snap.operations():
        # the operation may already have succeeded in the pass that saw the new primary
        # (it re-reads etcd) before this one records the event
        recent = op.done and now() - op.updated_at < 60
        if op.database != db or (op.done and not recent):
            continue
        if op.kind in ("switchover", "failover") and op.params.get("to") == new_primary:
            return op.kind, f": {op.kind} requested by operation {op.id}"
        if op.kind == "modify" and not op.done:
            return "switchover", f": rolling restart of operation {op.id}"
    return "failover", ""


async def ensure_deleted(p: Pass, spec: DatabaseSpec) -> None:
    """Stop and remove every member, then every key of the database."""
    if not await backups.ensure_final_snapshot(p, spec):
        return
    members = p.snap.members(spec.name)
    statuses = p.snap.member_statuses(spec.name)
    hosts = {h.name for h in p.snap.hosts()}
    pending = []
    for m in members:
        if not m.deleting:
            await p.store.put(keys.member(spec.name, m.name), m.model_copy(update={"deleting": True}))
            pending.append(m.name)
        elif statuses.get(m.name) is None or statuses[m.name].state != "deleted":
            if m.host in hosts:       # a down host keeps its data; its agent stops it on return
                pending.append(m.name)
    status = p.snap.status(spec.name) or DatabaseStatus()
    if pending:
        msg = f"stopping and removing {', '.join(pending)}"
        if (status.phase, status.message) != ("deleting", msg):
            await p.store.put(keys.database_status(spec.name),
                              status.model_copy(update={"phase": "deleting", "message": msg}))
        return
    for m in members:
        await p.store.delete(keys.port(m.address, m.pg_port))
        await p.store.delete(keys.port(m.address, m.api_port))
    await proxy.delete_proxy_keys(p, spec)
    for prefix in (keys.members(spec.name), keys.member_statuses(spec.name),
                   keys.patroni_scope(spec.name), keys.iam_db_passwords(spec.name)):
        await p.store.delete_prefix(prefix)
    for key in (keys.secrets(spec.name), keys.secrets_next(spec.name), keys.database_status(spec.name),
                keys.archive_status(spec.name), keys.restore_failed(spec.name)):
        await p.store.delete(key)
    # its archived WAL goes too (snapshots keep the WAL they need in themselves)
    repositories = [r for r in (spec.backup.repository, spec.backup.copy_to) if r]
    await p.store.put(keys.archive_removal(spec.archive_id), json.dumps(repositories))
    for b in p.snap.backups(spec.name):      # automated backups go with the database (as on RDS)
        if not b.manual and b.state not in ("expired", "deleting"):
            await p.store.put(keys.backup(spec.name, b.id), b.model_copy(update={"state": "expired"}))
    (p.data_root / "secrets" / f"{spec.name}.pgpass").unlink(missing_ok=True)
    await p.store.delete(keys.database_spec(spec.name))
    await operations.record_event(p.store, spec.name, "deleted", f"database {spec.name} deleted")
    log.info("deleted %s", spec.name)
