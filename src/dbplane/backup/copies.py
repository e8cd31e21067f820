"""Copies of backups and archived WAL in a second repository (the cross-region copy):
every object is decrypted and encrypted again under the target repository's KMS key on
the way (one data key per object, as always), at the same key, so the copy restores
exactly like the original. A backup's backup.json is copied last: a copy is complete
once it is there."""

from __future__ import annotations

import logging

from ..security.kms import Kms
from .archiver import wal_prefix
from .basebackup import backup_prefix
from .objects import reencode
from .repository import Repository
from .wal import HISTORY_RE, SEGMENT_RE

log = logging.getLogger("dbplane.backup.copies")


def copy_object(src: Repository, dst: Repository, key: str, kms: Kms, target_key: str) -> int:
    dk = kms.generate_data_key(target_key)
    return dst.put(key, reencode(src.open(key), kms.decrypt_data_key, data_key=dk.plaintext,
                                 wrapped_key=dk.wrapped, key_id=dk.key_id, key_version=dk.key_version))


def copy_backup(src: Repository, dst: Repository, kms: Kms, target_key: str, archive_id: str,
                backup_id: str) -> int:
    prefix = backup_prefix(archive_id, backup_id)
    keys = sorted(o.key for o in src.list(prefix))
    keys.sort(key=lambda k: k.endswith("/backup.json"))       # published last
    return sum(copy_object(src, dst, k, kms, target_key) for k in keys)


def sync_wal(src: Repository, dst: Repository, kms: Kms, target_key: str, archive_id: str) -> int:
    """Copy the complete segments and history files the target lacks (a segment being
    filled is copied once it is complete). Returns how many were copied."""
    prefix = wal_prefix(archive_id)
    have = {o.key for o in dst.list(prefix)}
    copied = 0
    for obj in src.list(prefix):
        name = obj.key.rsplit("/", 1)[1]
        if obj.key not in have and (SEGMENT_RE.match(name) or HISTORY_RE.match(name)):
            copy_object(src, dst, obj.key, kms, target_key)
            copied += 1
    return copied
