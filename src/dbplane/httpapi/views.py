"""Read models served by the API, built from one etcd snapshot per request."""

from __future__ import annotations

from ..classes import get_class
from ..controlplane.backups import restorable_window
from ..controlplane.proxy import endpoints as proxy_endpoints
from ..controlplane.storage import used_bytes
from ..controlplane.topology import Snapshot, endpoints, member_views
from ..errors import Conflict, NotFound
from ..models import ArchiveStatus, DatabaseSpec, PlatformConfig
from ..parameters import require_tls
from ..security import db_secrets
from ..security.tls import database_tls
from ..store import Store, keys
from ..system import postgres_bin_dir


async def get_spec(store: Store, name: str) -> DatabaseSpec:
    """The database's spec, or the API's 404 naming how to list databases."""
    return (await read_spec(store, name))[0]


async def read_spec(store: Store, name: str) -> tuple[DatabaseSpec, bytes]:
    """The spec and the bytes it was read from, which save_spec compares."""
    raw = await store.get_raw(keys.database_spec(name))
    if raw is None:
        raise NotFound(f"database {name!r} not found", "list databases with 'dbplane db list'",
                       code="database_not_found")
    return DatabaseSpec.model_validate_json(raw), raw


async def save_spec(store: Store, name: str, read: bytes, new: DatabaseSpec,
                    also: dict | None = None, new_keys: tuple[str, ...] = ()) -> None:
    """Write the changed spec, and `also` (its operation), in one transaction, only if nobody
    changed the spec since it was `read` (and none of `new_keys` exists yet): two concurrent
    modifies must not silently undo one another. The loser gets a 409 and runs again."""
    key = keys.database_spec(name)
    if not await store.commit_if(key, read, {key: new, **(also or {})}, absent=new_keys):
        raise Conflict(f"database {name} was changed by another request while this one was being applied",
                       "run the command again: it will apply to the database as it is now",
                       code="concurrent_change")


async def database_snapshot(store: Store, name: str) -> Snapshot:
    raw: dict[str, bytes] = {}
    for prefix in (f"{keys.databases()}{name}/", keys.members(name), keys.member_statuses(name),
                   keys.patroni_scope(name), keys.hosts(), keys.proxy_ports(name), keys.config(),
                   keys.archive_status(name), keys.backups(name), keys.secrets(name)):
        raw.update(await store.get_prefix(prefix))
    return Snapshot(raw)


def proxy_host(snap: Snapshot) -> str:
    raw = snap.raw.get(keys.config())
    return (PlatformConfig.model_validate_json(raw) if raw else PlatformConfig()).proxy_host


def describe(spec: DatabaseSpec, snap: Snapshot) -> dict:
    status = snap.status(spec.name)
    views = member_views(snap, spec.name)
    phase = "deleting" if spec.deleting else (status.phase if status else "creating")
    return {
        "name": spec.name,
        "status": phase,
        "status_message": status.message if status else "waiting for the controller",
        "engine": spec.engine,
        "version": spec.version,
        "class": spec.instance_class,
        "memory_mb": get_class(spec.instance_class).memory_mb,
        "multi_az": spec.multi_az,
        "replicas": spec.replicas,
        "storage_gb": spec.storage_gb,
        "storage_used_bytes": used_bytes(views),
        "params": spec.params,
        "admin_user": spec.admin_user,
        # what applications use: the proxy's ports, which never change
        "endpoints": proxy_endpoints(snap.raw, spec.name, proxy_host(snap)),
        # the nodes themselves, for troubleshooting (they move with every failover)
        "node_endpoints": endpoints(views),
        "members": [v.to_dict() for v in views],
        "pending_changes": pending_changes(spec, status),
        "promoted_from": spec.promoted_from.model_dump() if spec.promoted_from else None,
        "backup": backup_view(spec, snap),
        "tls": database_tls(require_tls(spec), postgres_bin_dir()),
        "allowlist": [r.model_dump() for r in spec.allowlist],
        "credentials": credentials_view(spec, snap),
        "metrics_interval": spec.metrics_interval,
        "created_at": spec.created_at,
    }


def credentials_view(spec: DatabaseSpec, snap: Snapshot) -> dict:
    """When the passwords were last rotated and when they will be next (never the passwords)."""
    raw = snap.raw.get(keys.secrets(spec.name))
    rotated = db_secrets.rotated_at(raw) if raw else 0.0      # kept in the clear: no KMS needed
    days = spec.credential_rotation_days
    return {"rotation_days": days, "rotated_at": rotated or None,
            "next_rotation_at": (rotated or spec.created_at) + days * 86400 if days else None}


def backup_view(spec: DatabaseSpec, snap: Snapshot) -> dict:
    """Backup settings and the WAL archive's state (lag behind the primary)."""
    raw = snap.raw.get(keys.archive_status(spec.name))
    archive = ArchiveStatus.model_validate_json(raw) if raw else None
    if archive is not None and archive.archive_id != spec.archive_id:
        archive = None                      # left by an earlier database of the same name
    window = restorable_window(spec, snap.backups(spec.name), archive)
    return {
        "settings": spec.backup.model_dump(),
        "archive": archive.model_dump(exclude={"kms_key_ids", "database"}) if archive else None,
        "earliest_restorable_time": window[0] if window else None,
        "latest_restorable_time": window[1] if window else None,
    }


def pending_changes(spec: DatabaseSpec, status) -> list[str]:
    """What a modification still waits for, in plain sentences (empty when applied)."""
    if status is None or not status.ever_available or spec.deleting:
        return []
    if status.pending_changes:
        return status.pending_changes
    if status.applied_generation < spec.generation:
        return ["waiting for the controller to pick up the change"]
    return []


def summary(spec: DatabaseSpec, snap: Snapshot) -> dict:
    d = describe(spec, snap)
    return {k: d[k] for k in ("name", "status", "engine", "version", "class", "multi_az",
                              "replicas", "endpoints")} | {"members": len(d["members"])}
