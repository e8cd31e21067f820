"""Routes of backups, with the verbs of `aws rds` (create-db-snapshot, describe-db-snapshots,
delete-db-snapshot, modify-db-instance --backup-retention-period ...):

- snapshots: manual backups kept until deleted, listed with the automated ones;
- a database's backup settings and the state of its WAL archive;
- repositories, where backups and archived WAL are stored.

Handlers check and write desired state only: the controller gives a pending snapshot a
host, the backup workers take it, and the housekeeper removes a snapshot being deleted.
A change of backup settings is no operation: the backup workers and the controller read
the spec on every pass, so the database's generation stays as is (see proxy_routes).

etcd has no compare-and-swap in our Store: changes are read-modify-write of one record."""

from __future__ import annotations

import asyncio
import os
import re
import stat
import time
from datetime import UTC, datetime

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from ..backup.repository import RepositoryUnavailable, open_repository, validate_spec
from ..controlplane.backups import restorable_window
from ..errors import Conflict, InvalidInput, NotFound
from ..models import (
    ArchiveStatus,
    BackupRecord,
    BackupSettings,
    DatabaseSpec,
    DatabaseStatus,
    DrillRecord,
    RepositorySpec,
)
from ..security import key_policy, kms
from ..store import Store, keys
from .kms_routes import require_key_use
from .views import get_spec, read_spec, save_spec

router = APIRouter()

SNAPSHOT_ID_RE = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
SNAPSHOT_TYPES = ("manual", "automated")
DEFAULT_REPOSITORY = "local"          # written by `dbplane up`; databases back up there by default
S3_FIELDS = ("endpoint", "bucket", "prefix", "credentials_file")


def _request_model(name: str, model: type[BaseModel], exclude: tuple[str, ...] = (),
                   optional: bool = False) -> type[BaseModel]:
    """A request body with the fields of `model`, declared once there: the same defaults,
    or every field optional (a PATCH; bounds are then checked on the merged settings).
    Unknown fields are refused."""
    fields = {f: ((info.annotation | None, None) if optional else (info.annotation, info))
              for f, info in model.model_fields.items() if f not in exclude}
    return create_model(name, __config__=ConfigDict(extra="forbid"), **fields)


class CreateSnapshot(BaseModel):
    id: str | None = None

    model_config = {"extra": "forbid"}


BackupPatch = _request_model("BackupPatch", BackupSettings, optional=True)
CreateRepository = _request_model("CreateRepository", RepositorySpec, exclude=("created_at",))


def _store(request: Request) -> Store:
    return request.app.state.store


# -- snapshots ------------------------------------------------------------------------------

def snapshot_view(r: BackupRecord) -> dict:
    return {**r.model_dump(), "type": "manual" if r.manual else "automated"}


def _check_snapshot_id(snapshot_id: str) -> str:
    if not SNAPSHOT_ID_RE.fullmatch(snapshot_id):
        raise InvalidInput(f"invalid snapshot id {snapshot_id!r}",
                           "use 1-63 lowercase letters, digits and '-', starting with a letter",
                           code="invalid_snapshot_id")
    return snapshot_id


async def _find_snapshot(s: Store, snapshot_id: str) -> BackupRecord:
    """A snapshot or automated backup by id, whatever its database (ids are unique)."""
    record = next((b for b in await s.list(keys.backups(), BackupRecord) if b.id == snapshot_id), None)
    if record is None:
        raise NotFound(f"snapshot {snapshot_id!r} not found", "list snapshots with 'dbplane snapshot list'",
                       code="snapshot_not_found")
    return record


def _exists(snapshot_id: str) -> Conflict:
    return Conflict(f"snapshot {snapshot_id} already exists",
                    "choose another id, or delete the snapshot with 'dbplane snapshot delete'",
                    code="snapshot_exists")


async def new_snapshot(s: Store, spec: DatabaseSpec, snapshot_id: str) -> BackupRecord:
    """Write a pending manual snapshot of the database (the controller gives it a host)."""
    record = await snapshot_record(s, spec, snapshot_id)
    if not await s.create(keys.backup(spec.name, snapshot_id), record):
        raise _exists(snapshot_id)
    return record


async def snapshot_record(s: Store, spec: DatabaseSpec, snapshot_id: str) -> BackupRecord:
    """A pending manual snapshot of the database, checked but not written yet."""
    _check_snapshot_id(snapshot_id)
    if not spec.backup.enabled:
        raise Conflict(f"backups are off for {spec.name}: a snapshot needs its WAL archive",
                       f"turn them on with 'dbplane backup modify {spec.name} --enable'",
                       code="backups_disabled")
    if any(b.id == snapshot_id for b in await s.list(keys.backups(), BackupRecord)):
        raise _exists(snapshot_id)
    return BackupRecord(id=snapshot_id, database=spec.name, archive_id=spec.archive_id,
                        repository=spec.backup.repository, kind="full", manual=True, state="pending")


@router.post("/v1/databases/{name}/snapshots", status_code=202)
async def create_snapshot(name: str, request: Request, body: CreateSnapshot | None = None):
    """A manual backup of the database: pending until a backup worker takes it."""
    s = _store(request)
    requested = (body or CreateSnapshot()).id
    if requested is not None:
        _check_snapshot_id(requested)
    spec = await get_spec(s, name)
    if spec.deleting:
        raise Conflict(f"database {name} is being deleted", "snapshot another database",
                       code="database_deleting")
    status = await s.get(keys.database_status(name), DatabaseStatus)
    if status is None or not status.ever_available:
        raise Conflict(f"database {name} has not been available yet: there is nothing to snapshot",
                       f"wait until 'dbplane db describe {name}' shows it available",
                       code="database_not_available")
    record = await new_snapshot(s, spec, requested or f"{name}-{datetime.now(UTC):%Y%m%d%H%M%S}")
    return snapshot_view(record)


@router.get("/v1/snapshots")
async def list_snapshots(request: Request, database: str | None = None,
                         kind: str | None = Query(None, alias="type")):
    """Snapshots and automated backups, newest first."""
    if kind is not None and kind not in SNAPSHOT_TYPES:
        raise InvalidInput(f"unknown snapshot type {kind!r}", "use manual or automated",
                           code="invalid_input")
    prefix = keys.backups(database) if database else keys.backups()
    records = await _store(request).list(prefix, BackupRecord)
    views = [snapshot_view(r) for r in sorted(records, key=lambda r: r.started_at, reverse=True)]
    return [v for v in views if kind in (None, v["type"])]


@router.get("/v1/snapshots/{snapshot_id}")
async def describe_snapshot(snapshot_id: str, request: Request):
    return snapshot_view(await _find_snapshot(_store(request), snapshot_id))


@router.delete("/v1/snapshots/{snapshot_id}", status_code=202)
async def delete_snapshot(snapshot_id: str, request: Request):
    """Mark a manual snapshot for deletion; the housekeeper removes its files, then it."""
    s = _store(request)
    record = await _find_snapshot(s, snapshot_id)
    if not record.manual:
        raise Conflict(f"{snapshot_id} is an automated backup of database {record.database}",
                       "automated backups expire after the retention period; change it with "
                       f"'dbplane backup modify {record.database} --retention-days N'",
                       code="automated_backup")
    if record.state in ("pending", "running"):
        raise Conflict(f"snapshot {snapshot_id} is {record.state}",
                       f"wait until it is available or failed ('dbplane snapshot describe {snapshot_id}'), "
                       "then delete it", code="snapshot_busy")
    if record.state != "deleting":
        record = record.model_copy(update={"state": "deleting"})
        await s.put(keys.backup(record.database, record.id), record)
    return snapshot_view(record)


class CopySnapshot(BaseModel):
    repository: str


@router.post("/v1/snapshots/{snapshot_id}/copy", status_code=202)
async def copy_snapshot(snapshot_id: str, body: CopySnapshot, request: Request):
    """Copy a backup to another repository, encrypted again under that repository's key;
    a backup worker does it and lists the repository in the backup's copies."""
    s = _store(request)
    record = await _find_snapshot(s, snapshot_id)
    target = await _get_repository(s, body.repository)
    if record.state != "available":
        raise Conflict(f"{snapshot_id} is {record.state}", "only available backups can be copied",
                       code="snapshot_not_available")
    if body.repository == record.repository:
        raise InvalidInput(f"{snapshot_id} is stored in {body.repository} already",
                           "copy it to another repository", code="same_repository")
    await require_key_use(request, [record.kms_key_id], key_policy.DECRYPT)
    await require_key_use(request, [target.kms_key], key_policy.ENCRYPT)
    if body.repository not in record.copies + record.copy_requested:
        record = record.model_copy(update={"copy_requested": [*record.copy_requested, body.repository]})
        await s.put(keys.backup(record.database, record.id), record)
    return snapshot_view(record)


@router.post("/v1/snapshots/{snapshot_id}/verify", status_code=202)
async def verify_snapshot(snapshot_id: str, request: Request):
    """Ask for a verification of a backup's checksums and WAL; the housekeeping backup
    worker runs it and records verified_at and verify_error."""
    s = _store(request)
    record = await _find_snapshot(s, snapshot_id)
    if record.state != "available":
        raise Conflict(f"{snapshot_id} is {record.state}", "only available backups can be verified",
                       code="snapshot_not_available")
    record = record.model_copy(update={"verify_requested_at": time.time()})
    await s.put(keys.backup(record.database, record.id), record)
    return snapshot_view(record)


# -- backup settings --------------------------------------------------------------------------

async def _backup_view(s: Store, spec: DatabaseSpec) -> dict:
    archive = await s.get(keys.archive_status(spec.name), ArchiveStatus)
    if archive is not None and archive.archive_id != spec.archive_id:
        archive = None                      # left by an earlier database of the same name
    mine = [b for b in await s.list(keys.backups(spec.name), BackupRecord)
            if b.archive_id == spec.archive_id]
    window = restorable_window(spec, mine, archive)
    available = [b for b in mine if b.state == "available"]
    drills = sorted(await s.list(keys.drills(spec.name), DrillRecord), key=lambda d: d.started_at)
    return {
        "database": spec.name,
        "last_drill": drills[-1].model_dump() if drills else None,
        "settings": spec.backup.model_dump(),
        "archive": archive.model_dump() if archive else None,
        "backups": len(available),
        "snapshots": sum(b.manual for b in available),
        "earliest_restorable_time": window[0] if window else None,
        "latest_restorable_time": window[1] if window else None,
    }


@router.get("/v1/databases/{name}/drills")
async def list_drills(name: str, request: Request):
    """Restore drills of the database, newest first."""
    s = _store(request)
    await get_spec(s, name)
    drills = await s.list(keys.drills(name), DrillRecord)
    return [d.model_dump() for d in sorted(drills, key=lambda d: d.started_at, reverse=True)]


@router.get("/v1/databases/{name}/backup")
async def describe_backup(name: str, request: Request):
    s = _store(request)
    return await _backup_view(s, await get_spec(s, name))


def _bounds(field: str) -> str:
    """'retention_days is 1 to 35', from the field's own constraints."""
    low = high = ""
    for m in BackupSettings.model_fields[field].metadata:
        if getattr(m, "ge", None) is not None:
            low = f"{m.ge:g}"
        if getattr(m, "gt", None) is not None:
            low = f"more than {m.gt:g}"
        if getattr(m, "le", None) is not None:
            high = f"{m.le:g}"
    return f"{field} is {low} to {high}" if low and high else ""


def _merged_settings(current: BackupSettings, changes: dict) -> BackupSettings:
    """The settings after the change, checked by BackupSettings' own validators; every
    problem reported at once."""
    problems, hints = [], []
    for field in ("repository", "kms_key"):
        if changes.get(field) == "":
            problems.append(f"invalid {field}: it cannot be empty")
    try:
        settings = BackupSettings.model_validate({**current.model_dump(), **changes})
    except ValidationError as e:
        settings = None
        for err in e.errors():
            field = ".".join(str(x) for x in err["loc"])
            if err["type"] == "value_error":
                problems.append(str(err["ctx"]["error"]))
                continue
            problems.append(f"invalid {field} {err['input']!r}: {err['msg'][0].lower()}{err['msg'][1:]}")
            if field in BackupSettings.model_fields and (b := _bounds(field)):
                hints.append(b)
            if field == "retention_days":
                hints.append("to turn automated backups off, use --disable")
    if settings is not None and settings.copy_to and settings.copy_to == settings.repository:
        problems.append(f"invalid copy_to {settings.copy_to!r}: it is the repository backups are "
                        "written to; copies go to a second repository")
    if problems:
        raise InvalidInput("; ".join(problems), "; ".join(hints) or "see 'dbplane backup modify --help'",
                           code="invalid_input")
    assert settings is not None
    return settings


async def _get_repository(s: Store, name: str) -> RepositorySpec:
    spec = await s.get(keys.repository(name), RepositorySpec)
    if spec is None:
        raise NotFound(f"repository {name!r} not found",
                       "list repositories with 'dbplane repository list', or create one with "
                       "'dbplane repository create'", code="repository_not_found")
    return spec


async def _check_kms_key(request: Request, s: Store, ref: str) -> None:
    """The key exists, the caller may have a resource encrypt with it, and it is usable."""
    key = await kms.get_key(s, ref)
    await require_key_use(request, [ref], key_policy.ENCRYPT)
    kms.check_usable(key)


@router.patch("/v1/databases/{name}/backup")
async def modify_backup(name: str, body: BackupPatch, request: Request):  # type: ignore[valid-type]
    """Applied by the backup workers and the controller on their next pass: no operation,
    no restart, generation unchanged. Only what changes is checked against other records
    (a disabled key does not block changing the window)."""
    s = _store(request)
    changes = body.model_dump(exclude_none=True)
    if not changes:
        raise InvalidInput("nothing to modify", "pass at least one backup setting",
                           code="nothing_to_modify")
    spec, read = await read_spec(s, name)
    if spec.deleting:
        raise Conflict(f"database {name} is being deleted", "create a new database instead",
                       code="database_deleting")
    settings = _merged_settings(spec.backup, changes)
    for field in ("repository", "copy_to"):
        if changes.get(field):
            repository = await _get_repository(s, changes[field])
            if field == "copy_to":          # copies are encrypted again under its key
                await require_key_use(request, [repository.kms_key], key_policy.ENCRYPT)
    if "kms_key" in changes:
        await _check_kms_key(request, s, settings.kms_key)
    spec = spec.model_copy(update={"backup": settings})
    await save_spec(s, name, read, spec)
    return await _backup_view(s, spec)


# -- repositories ---------------------------------------------------------------------------------

def repository_view(spec: RepositorySpec, **extra) -> dict:
    """Settings only: credentials live in the credentials file, whose path is no secret."""
    return {**spec.model_dump(), **extra}


def _spec_problems(spec: RepositorySpec) -> list[str]:
    problems = validate_spec(spec)
    if spec.kind == "filesystem":
        problems += [f"{f}: only s3 repositories have one" for f in S3_FIELDS if getattr(spec, f)]
    elif spec.path:
        problems.append("path: only filesystem repositories have one")
    return problems


def _check_directory(spec: RepositorySpec) -> None:
    """The directory must exist. Nothing is written into it here: the API may run as root,
    and what is inside must belong to the service account that runs the backup workers."""
    hint = (f"create {spec.path} (mode 0750, owned by the service account the backup workers "
            "run as) or fix the path")
    try:
        st = os.stat(spec.path)
    except FileNotFoundError:
        raise RepositoryUnavailable(f"repository {spec.name}: directory {spec.path} does not exist",
                                    hint) from None
    except OSError as e:
        raise RepositoryUnavailable(f"repository {spec.name}: cannot check {spec.path}: "
                                    f"{e.strerror or e}", hint) from e
    if not stat.S_ISDIR(st.st_mode):
        raise RepositoryUnavailable(f"repository {spec.name}: {spec.path} is not a directory", hint)


async def _check_reachable(spec: RepositorySpec) -> None:
    if spec.kind == "filesystem":
        _check_directory(spec)
        return
    # boto3 blocks: reading the credentials file and the probe object run in a thread
    await asyncio.get_running_loop().run_in_executor(None, lambda: open_repository(spec).check())


async def repository_users(s: Store, name: str) -> list[str]:
    """What still needs the repository, in plain English: databases backing up or copying
    into it (or restoring from it), and backups not expired that live in it."""
    users: list[str] = []
    raw = await s.get_prefix(keys.databases())
    for key, value in raw.items():
        if not key.endswith("/spec"):
            continue
        spec = DatabaseSpec.model_validate_json(value)
        if spec.backup.repository == name:
            users.append(f"database {spec.name} (backs up into it)")
        if spec.backup.copy_to == name:
            users.append(f"database {spec.name} (copies its backups into it)")
        status_raw = raw.get(keys.database_status(spec.name))
        restoring = status_raw is None or not DatabaseStatus.model_validate_json(status_raw).ever_available
        if spec.restore is not None and spec.restore.repository == name and restoring:
            users.append(f"database {spec.name} (being restored from it)")
    for b in await s.list(keys.backups(), BackupRecord):
        if b.state != "expired" and (b.repository == name or name in b.copies):
            users.append(f"{'snapshot' if b.manual else 'backup'} {b.id} of database {b.database} "
                         f"({b.state})")
    return users


@router.post("/v1/repositories", status_code=201)
async def create_repository(body: CreateRepository, request: Request):  # type: ignore[valid-type]
    s = _store(request)
    spec = RepositorySpec(**body.model_dump())
    problems = _spec_problems(spec)
    if problems:
        raise InvalidInput(f"invalid repository {spec.name!r}: " + "; ".join(problems),
                           "fix those fields (see 'dbplane repository create --help')", code="invalid_input")
    if await s.get_raw(keys.repository(spec.name)) is not None:
        raise Conflict(f"repository {spec.name} already exists",
                       "choose another name; see it with 'dbplane repository describe "
                       f"{spec.name}'", code="repository_exists")
    await _check_kms_key(request, s, spec.kms_key)
    await _check_reachable(spec)
    if not await s.create(keys.repository(spec.name), spec):
        raise Conflict(f"repository {spec.name} already exists", "choose another name",
                       code="repository_exists")
    return repository_view(spec)


@router.get("/v1/repositories")
async def list_repositories(request: Request):
    specs = await _store(request).list(keys.repositories(), RepositorySpec)
    return [repository_view(r) for r in sorted(specs, key=lambda r: r.name)]


@router.get("/v1/repositories/{name}")
async def describe_repository(name: str, request: Request):
    s = _store(request)
    spec = await _get_repository(s, name)
    return repository_view(spec, used_by=await repository_users(s, name))


@router.delete("/v1/repositories/{name}")
async def delete_repository(name: str, request: Request):
    """Remove the repository from the catalog; its files stay where they are."""
    s = _store(request)
    spec = await _get_repository(s, name)
    if name == DEFAULT_REPOSITORY:
        raise Conflict(f"repository {name} is the platform's default repository and cannot be deleted",
                       "to store backups elsewhere, create another repository and use "
                       "'dbplane backup modify DB --repository NAME'", code="repository_protected")
    users = await repository_users(s, name)
    if users:
        more = f" and {len(users) - 5} more" if len(users) > 5 else ""
        raise Conflict(f"repository {name} is still used by {'; '.join(users[:5])}{more}",
                       "point those databases at another repository ('dbplane backup modify DB "
                       "--repository NAME --copy-to \"\"') and delete or let expire the backups "
                       "stored there", code="repository_in_use")
    await s.delete(keys.repository(name))
    return repository_view(spec)
