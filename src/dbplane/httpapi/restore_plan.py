"""What a restore request restores: the backup chain, the WAL target and the passwords,
checked before anything is written (the target inside the restorable window, the
snapshot available)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from ..backup.basebackup import backup_prefix
from ..backup.objects import decode
from ..backup.repository import open_repository
from ..controlplane.backups import base_for, restorable_window
from ..errors import Conflict, InvalidInput, NotFound
from ..models import (
    ArchiveStatus,
    BackupRecord,
    DatabaseSecrets,
    DatabaseSpec,
    PlatformConfig,
    RepositorySpec,
    RestoreSource,
)
from ..security import db_secrets
from ..security.kms import load_kms
from ..store import Store, keys


def _utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def plan(s: Store, body, check_keys=None) -> tuple[RestoreSource, DatabaseSecrets]:
    """`check_keys(refs)`: may the caller have what these KMS keys encrypted decrypted (the
    key policies, httpapi/kms_routes.py require_key_use)? Asked before anything is read."""
    if (body.snapshot is None) == (body.source is None):
        raise InvalidInput("name either a snapshot or a source database to restore from",
                           "pass --from-snapshot ID, or --from DB with --to-time or --latest",
                           code="invalid_restore_source")
    backups = await s.list(keys.backups(), BackupRecord)
    if body.snapshot is not None:
        source = from_snapshot(body.snapshot, backups)
    else:
        source = await to_point_in_time(s, body, backups)
    if body.repository and body.repository != source.repository:
        by_id = {b.id: b for b in backups}
        lacking = [b for b in source.chain if body.repository not in by_id[b].copies]
        if lacking:
            raise Conflict(f"repository {body.repository} holds no copy of {lacking[0]}",
                           f"copy it first with 'dbplane snapshot copy {lacking[0]} --to-repository "
                           f"{body.repository}', or restore from {source.repository}", code="no_copy")
        source = source.model_copy(update={"repository": body.repository})
    if check_keys is not None:
        await check_keys(await keys_read(s, source, backups))
    return source, await secrets_of(s, source, backups)


async def keys_read(s: Store, source: RestoreSource, backups: list[BackupRecord]) -> list[str]:
    """The KMS keys the restore decrypts with: the repository's key when it restores from a
    copy (copies are encrypted again under it), else those of the backups in the chain and
    of the source's WAL archive."""
    by_id = {b.id: b for b in backups}
    chain = [by_id[b] for b in source.chain if b in by_id]
    if any(b.repository != source.repository for b in chain):
        repository = await s.get(keys.repository(source.repository), RepositorySpec)
        return [repository.kms_key] if repository else []
    archive = await s.get(keys.archive_status(source.source_database), ArchiveStatus)
    wal = archive.kms_key_ids if archive is not None and archive.archive_id == source.archive_id else []
    return [b.kms_key_id for b in chain] + wal


def from_snapshot(snapshot_id: str, backups: list[BackupRecord]) -> RestoreSource:
    record = next((b for b in backups if b.id == snapshot_id), None)
    if record is None:
        raise NotFound(f"snapshot {snapshot_id!r} not found", "list them with 'dbplane snapshot list'",
                       code="snapshot_not_found")
    if record.state != "available":
        raise Conflict(f"snapshot {snapshot_id} is {record.state}",
                       "restore a snapshot whose state is available", code="snapshot_not_available")
    if record.verify_error:
        raise Conflict(f"snapshot {snapshot_id} failed verification: {record.verify_error}",
                       "restore another snapshot", code="snapshot_damaged")
    chain = _chain_to(record, backups)
    return RestoreSource(source_database=record.database, archive_id=record.archive_id,
                         repository=record.repository, chain=[b.id for b in chain], target="immediate")


def _chain_to(record: BackupRecord, backups: list[BackupRecord]) -> list[BackupRecord]:
    by_id = {b.id: b for b in backups if b.state == "available"}
    chain = [record]
    while chain[0].kind == "incremental":
        parent = by_id.get(chain[0].parent)
        if parent is None:
            raise Conflict(f"backup {chain[0].parent}, which {record.id} builds on, is gone",
                           "restore another snapshot", code="snapshot_not_available")
        chain.insert(0, parent)
    return chain


async def to_point_in_time(s: Store, body, backups: list[BackupRecord]) -> RestoreSource:
    if (body.time is None) == (not body.latest):
        raise InvalidInput("name the time to restore to", "pass --to-time TIMESTAMP or --latest",
                           code="invalid_restore_target")
    spec = await s.get(keys.database_spec(body.source), DatabaseSpec)
    if spec is None:
        raise NotFound(f"database {body.source!r} not found", "restore one of its snapshots with "
                       "--from-snapshot instead ('dbplane snapshot list')", code="database_not_found")
    archive = await s.get(keys.archive_status(spec.name), ArchiveStatus)
    window = restorable_window(spec, backups, archive)
    if window is None:
        raise Conflict(f"database {spec.name} has no backup to restore from yet",
                       f"wait for its first backup ('dbplane snapshot list --database {spec.name}')",
                       code="no_backup")
    earliest, latest = window
    at = latest if body.latest else body.time
    if not earliest <= at <= latest:
        raise InvalidInput(f"{_utc(at)} is outside the restorable window of {spec.name}, "
                           f"{_utc(earliest)} to {_utc(latest)}",
                           "choose a time inside it, or --latest", code="restore_time_out_of_window")
    chain = base_for(backups, spec.archive_id, at)
    if not chain:
        raise Conflict(f"no complete backup chain of {spec.name} is consistent before {_utc(at)}",
                       "choose a later time, or restore a snapshot", code="no_backup")
    return RestoreSource(source_database=spec.name, archive_id=spec.archive_id,
                         repository=chain[-1].repository, chain=[b.id for b in chain],
                         target="latest" if body.latest else "time",
                         target_time=None if body.latest else at)


async def secrets_of(s: Store, source: RestoreSource, backups: list[BackupRecord]) -> DatabaseSecrets:
    """The source's passwords: a restored database keeps them (its roles come from the
    backup). From etcd while the source lives, else from the backup itself, where they are
    encrypted with the backup's data key like every object of it."""
    spec = await s.get(keys.database_spec(source.source_database), DatabaseSpec)
    if spec is not None and spec.archive_id == source.archive_id:
        secrets = await db_secrets.load(s, keys.secrets(spec.name))
        if secrets is not None:
            return secrets
    config = await s.get(keys.config(), PlatformConfig) or PlatformConfig()
    repo_spec = await s.get(keys.repository(source.repository), RepositorySpec)
    if repo_spec is None:
        raise NotFound(f"repository {source.repository} does not exist", "", code="repository_not_found")
    kms = await load_kms(s, config.kms_root_file)
    repo = open_repository(repo_spec)
    key = backup_prefix(source.archive_id, source.chain[-1]) + "secrets.json"

    def read() -> bytes:
        return b"".join(decode(repo.open(key), kms.decrypt_data_key))
    return DatabaseSecrets.model_validate_json(await asyncio.get_running_loop().run_in_executor(None, read))
