"""Routes that change a running database: switchover, failover, read replicas (add,
remove, promote) and modify. Each validates against one snapshot, refuses with a code and
a hint before writing anything, then writes the new spec and an Operation (202)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from .. import parameters
from ..classes import get_class
from ..controlplane import credentials
from ..controlplane.changes import restart_needed
from ..controlplane.switchover import choose_target
from ..controlplane.topology import Snapshot, member_views
from ..errors import CapacityError, Conflict, InvalidInput, NotFound
from ..models import NAME_RE, DatabaseSpec, Host, MemberSpec, Operation, PromotedFrom
from ..store import Store, keys
from .views import database_snapshot, read_spec, save_spec

router = APIRouter()
MAX_REPLICAS = 5


class SwitchoverRequest(BaseModel):
    to: str | None = None


class AddReplicaRequest(BaseModel):
    zone: str | None = None


class PromoteRequest(BaseModel):
    new_name: str | None = None


class ModifyRequest(BaseModel):
    instance_class: str | None = Field(None, alias="class")
    params: dict[str, str] = Field(default_factory=dict)
    multi_az: bool | None = None
    storage_gb: int | None = Field(None, ge=1, le=65536)
    credential_rotation_days: int | None = Field(None, ge=0, le=365)
    metrics_interval: int | None = Field(None, ge=1, le=60)

    model_config = {"populate_by_name": True}


# -- checks shared by the routes ---------------------------------------------------------------

def _store(request: Request) -> Store:
    return request.app.state.store


async def _ready(s: Store, name: str) -> tuple[DatabaseSpec, bytes, Snapshot]:
    """The spec, the bytes it was read from (for save_spec) and a snapshot of a database
    that exists, runs and is not busy."""
    spec, raw = await read_spec(s, name)
    if spec.deleting:
        raise Conflict(f"database {name} is being deleted", "create a new database instead",
                       code="database_deleting")
    if await s.get_raw(keys.paused_by_down(name)) is not None:
        raise Conflict(f"database {name} is still starting after 'dbplane up'",
                       f"wait until it is available ('dbplane db describe {name}')",
                       code="database_starting")
    snap = await database_snapshot(s, name)
    status = snap.status(name)
    if status is None or not status.ever_available:
        raise Conflict(f"database {name} is still being created",
                       f"wait for it: 'dbplane db describe {name}'", code="database_not_ready")
    for op in await s.list(keys.operations(), Operation):
        if not op.done and name in (op.database, op.params.get("source")):
            raise Conflict(f"database {name} has a {op.kind} operation in progress ({op.id})",
                           f"wait for it ('dbplane ops show {op.id}') and retry",
                           code="operation_in_progress")
    return spec, raw, snap


def _member(spec: DatabaseSpec, snap: Snapshot, name: str) -> MemberSpec:
    members = [m for m in snap.members(spec.name) if not m.deleting]
    m = next((m for m in members if m.name == name), None)
    if m is None:
        listed = ", ".join(m.name for m in members) or "none"
        raise NotFound(f"database {spec.name} has no member {name!r} (members: {listed})",
                       f"see 'dbplane db describe {spec.name}'", code="member_not_found")
    return m


def _read_replica(spec: DatabaseSpec, snap: Snapshot, name: str, fix: str) -> MemberSpec:
    m = _member(spec, snap, name)
    if m.kind != "replica" or m.name in spec.removed_members:
        role = next((v.role for v in member_views(snap, spec.name) if v.name == name), "standby")
        raise Conflict(f"{name} is the {role.replace('_', ' ')} of {spec.name}, not a read replica",
                       fix, code="not_a_read_replica")
    if m.name in spec.promoted_members:
        new_db = spec.promoted_members[m.name]
        raise Conflict(f"{m.name} is being promoted to database {new_db}",
                       f"follow it with 'dbplane db describe {new_db}'", code="already_promoting")
    return m


def _without_zone(zones: list[str], zone: str) -> list[str]:
    out = list(zones)
    if zone in out:
        out.remove(zone)
    return out


async def _start(s: Store, op: Operation, read: bytes | None = None,
                 new: DatabaseSpec | None = None) -> dict:
    """Record the operation, with the changed spec (read from `read`) in the same transaction."""
    if new is None:
        await s.put(keys.operation(op.id), op)
    else:
        await save_spec(s, new.name, read, new, also={keys.operation(op.id): op})
    return op.model_dump()


# -- switchover and failover --------------------------------------------------------------------

async def _switch(request: Request, name: str, to: str | None, action: str) -> dict:
    s = _store(request)
    spec, _, snap = await _ready(s, name)
    primary, target = choose_target(spec, member_views(snap, name), to, action)
    op = Operation(kind=action, database=name, params={"from": primary.name, "to": target.name})
    return await _start(s, op)


@router.post("/v1/databases/{name}/switchover", status_code=202)
async def switchover(name: str, body: SwitchoverRequest, request: Request):
    """Planned switchover to the standby (or --to a member): no committed write is lost."""
    return await _switch(request, name, body.to, "switchover")


@router.post("/v1/databases/{name}/failover", status_code=202)
async def failover(name: str, body: SwitchoverRequest, request: Request):
    """Forced failover, for drills: Patroni promotes the target whatever the primary does."""
    return await _switch(request, name, body.to, "failover")


# -- read replicas ------------------------------------------------------------------------------

@router.post("/v1/databases/{name}/replicas", status_code=202)
async def add_replica(name: str, body: AddReplicaRequest, request: Request):
    s = _store(request)
    spec, read, snap = await _ready(s, name)
    if spec.replicas >= MAX_REPLICAS:
        raise Conflict(f"database {name} already has {spec.replicas} read replicas (the limit)",
                       "remove one with 'dbplane replica remove' first", code="too_many_replicas")
    zones = sorted({h.zone for h in await s.list(keys.hosts(), Host)})
    if body.zone is not None and body.zone not in zones:
        raise CapacityError(f"no agent is running in zone {body.zone!r} (zones with agents: "
                            f"{', '.join(zones) or 'none'})",
                            f"choose one of {', '.join(zones)}, or start an agent with "
                            f"--zone {body.zone}", code="zone_unavailable")
    new = spec.model_copy(update={
        "replicas": spec.replicas + 1, "generation": spec.generation + 1,
        "replica_zones": spec.replica_zones + ([body.zone] if body.zone else [])})
    op = Operation(kind="add-replica", database=name,
                   params={"zone": body.zone, "before": [m.name for m in snap.members(name)]})
    return await _start(s, op, read, new)


@router.delete("/v1/databases/{name}/replicas/{member}", status_code=202)
async def remove_replica(name: str, member: str, request: Request):
    s = _store(request)
    spec, read, snap = await _ready(s, name)
    m = _read_replica(spec, snap, member, f"only read replicas can be removed; to drop the "
                      f"standby use 'dbplane db modify {name} --no-multi-az'")
    new = spec.model_copy(update={
        "replicas": max(0, spec.replicas - 1), "generation": spec.generation + 1,
        "removed_members": spec.removed_members + [m.name],
        "replica_zones": _without_zone(spec.replica_zones, m.zone)})
    op = Operation(kind="remove-replica", database=name, params={"member": m.name})
    return await _start(s, op, read, new)


@router.post("/v1/databases/{name}/replicas/{member}/promote", status_code=202)
async def promote_replica(name: str, member: str, body: PromoteRequest, request: Request):
    """The read replica leaves the database and becomes a standalone one (RDS semantics)."""
    s = _store(request)
    spec, read, snap = await _ready(s, name)
    m = _read_replica(spec, snap, member, f"only read replicas can be promoted; to move the "
                      f"primary use 'dbplane db switchover {name}'")
    view = next(v for v in member_views(snap, name) if v.name == m.name)
    if view.state not in ("streaming", "running"):
        raise Conflict(f"{m.name} cannot be promoted: it is {view.state}",
                       f"wait until it is streaming ('dbplane db describe {name}')",
                       code="target_unhealthy")
    new_name = body.new_name or m.name
    if not NAME_RE.fullmatch(new_name):
        raise InvalidInput(f"invalid database name {new_name!r}",
                           "use 2-42 lowercase letters, digits and '-', starting with a letter",
                           code="invalid_name")
    promoted = DatabaseSpec(name=new_name, instance_class=spec.instance_class,
                            storage_gb=spec.storage_gb, params=spec.params, engine=spec.engine,
                            version=spec.version, admin_user=spec.admin_user,
                            allowlist=spec.allowlist,     # the same clients keep connecting
                            promoted_from=PromotedFrom(database=name, member=m.name))
    op = Operation(kind="promote-replica", database=new_name,
                   params={"source": name, "member": m.name})
    exists = Conflict(f"database {new_name!r} already exists",
                      "choose another name with --new-name", code="database_exists")
    if await s.get_raw(keys.database_spec(new_name)) is not None:
        raise exists
    # source first, in one write: the member stops counting as one of its replicas; the
    # controller stops it only once the new database's spec exists
    await save_spec(s, name, read, spec.model_copy(update={
        "replicas": max(0, spec.replicas - 1), "generation": spec.generation + 1,
        "replica_zones": _without_zone(spec.replica_zones, m.zone),
        "promoted_members": {**spec.promoted_members, m.name: new_name}}))
    if not await s.create_all({keys.database_spec(new_name): promoted, keys.operation(op.id): op}):
        await s.put(keys.database_spec(name), spec)      # lost a race for the name: undo
        raise exists
    return op.model_dump()


# -- modify -------------------------------------------------------------------------------------

@router.patch("/v1/databases/{name}", status_code=202)
async def modify_database(name: str, body: ModifyRequest, request: Request):
    s = _store(request)
    if body.instance_class is None and not body.params and body.multi_az is None \
            and body.storage_gb is None and body.credential_rotation_days is None \
            and body.metrics_interval is None:
        raise InvalidInput("nothing to modify", "pass --class, --param k=v, --storage-gb N, "
                           "--multi-az/--no-multi-az, --credential-rotation-days N or --metrics-interval S",
                           code="nothing_to_modify")
    if body.instance_class is not None:
        get_class(body.instance_class)
    parameters.validate(body.params)
    spec, read, _ = await _ready(s, name)
    if body.multi_az and not spec.multi_az:
        zones = {h.zone for h in await s.list(keys.hosts(), Host)}
        if len(zones) < 2:
            raise CapacityError(
                f"Multi-AZ needs agents in two zones; only zone {', '.join(sorted(zones))} has one",
                "start an agent in another zone ('dbplane agent --zone b ...')",
                code="not_enough_zones")
    new = spec.model_copy(update={
        "instance_class": body.instance_class or spec.instance_class,
        "params": {**spec.params, **body.params},
        "multi_az": spec.multi_az if body.multi_az is None else body.multi_az,
        "storage_gb": body.storage_gb or spec.storage_gb,
        "credential_rotation_days": spec.credential_rotation_days if body.credential_rotation_days is None
        else body.credential_rotation_days,
        "metrics_interval": body.metrics_interval or spec.metrics_interval,
        "generation": spec.generation + 1})
    op = Operation(kind="modify", database=name, params={
        **body.model_dump(by_alias=True), "generation": new.generation,
        "restart": restart_needed(spec, new)})
    return await _start(s, op, read, new)


# -- credentials --------------------------------------------------------------------------------

@router.post("/v1/databases/{name}/rotate-credentials", status_code=202)
async def rotate_credentials(name: str, request: Request):
    """New superuser, replication, rewind and admin passwords (controlplane/credentials.py)."""
    s = _store(request)
    _, _, snap = await _ready(s, name)
    running = [o for o in snap.operations() if o.database == name and o.kind == credentials.KIND
               and not o.done]
    if running:
        raise Conflict(f"a credential rotation of {name} is already running ({running[0].id})",
                       f"wait for it: dbplane ops wait {running[0].id}", code="operation_in_progress")
    op = credentials.new_operation(name)
    await s.put(keys.operation(op.id), op)
    return op.model_dump()
