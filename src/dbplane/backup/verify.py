"""Verification of a stored backup without restoring it: every object decrypts and
authenticates, every file in the tar stream has the size and SHA-256 PostgreSQL's
manifest recorded when the backup was taken, nothing is missing, and the WAL the backup
needs to become consistent is there."""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..models import BackupRecord
from ..security.kms import Kms
from .basebackup import backup_prefix
from .objects import decode
from .repository import Repository
from .wal import history_name, missing_segments, needed_segments, parse_history, parse_lsn

SEG_SIZE = 16 * 1024 * 1024


@dataclass
class Verification:
    files: int = 0
    bytes: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


class _Stream:
    """A file-like view of an iterator of byte chunks (for tarfile's stream mode)."""

    def __init__(self, chunks: Iterator[bytes]):
        self._chunks, self._chunk, self._pos = chunks, b"", 0

    def read(self, n: int = -1) -> bytes:
        parts = []
        while n != 0:
            if self._pos == len(self._chunk):
                self._chunk, self._pos = next(self._chunks, b""), 0
                if not self._chunk:
                    break
            take = len(self._chunk) - self._pos if n < 0 else min(n, len(self._chunk) - self._pos)
            parts.append(self._chunk[self._pos:self._pos + take])
            self._pos += take
            n = n - take if n > 0 else n
        return b"".join(parts)


def verify(repo: Repository, kms: Kms, record: BackupRecord) -> Verification:
    result = Verification()
    prefix = backup_prefix(record.archive_id, record.id)

    def read(key: str) -> bytes:
        return b"".join(decode(repo.open(key), kms.decrypt_data_key))
    try:
        manifest = json.loads(read(prefix + "backup_manifest"))
    except Exception as e:
        result.problems.append(f"backup_manifest: {e}")
        return result
    expected = {f["Path"]: f for f in manifest["Files"]}
    seen: set[str] = set()
    try:
        with tarfile.open(fileobj=_Stream(decode(repo.open(prefix + "base.tar"), kms.decrypt_data_key)),
                          mode="r|") as tar:
            for member in tar:
                if not member.isfile() or member.name == "backup_manifest":
                    continue
                seen.add(member.name)
                want = expected.get(member.name)
                if want is None:
                    result.problems.append(f"{member.name}: not in the manifest")
                    continue
                digest, size = hashlib.sha256(), 0
                f = tar.extractfile(member)
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
                    size += len(chunk)
                result.files += 1
                result.bytes += size
                if size != want["Size"]:
                    result.problems.append(f"{member.name}: {size} bytes, the manifest says {want['Size']}")
                elif want.get("Checksum-Algorithm") == "SHA256" and digest.hexdigest() != want["Checksum"]:
                    result.problems.append(f"{member.name}: SHA-256 differs from the manifest")
    except Exception as e:
        result.problems.append(f"base.tar: {e}")
        return result
    for path in sorted(set(expected) - seen):
        result.problems.append(f"{path}: missing from base.tar")
    result.problems += wal_problems(repo, kms, record, prefix + "wal/")
    return result


def wal_problems(repo: Repository, kms: Kms, record: BackupRecord, wal_dir: str) -> list[str]:
    """The WAL from the backup's start to its stop is in the backup and decrypts."""
    names = {o.key.rsplit("/", 1)[1] for o in repo.list(wal_dir)}
    history = []
    if record.timeline > 1 and history_name(record.timeline) in names:
        history = parse_history(b"".join(decode(repo.open(wal_dir + history_name(record.timeline)),
                                                kms.decrypt_data_key)).decode())
    # stop_lsn is the end of the backup's last record: WAL up to the byte before it
    needed = needed_segments(parse_lsn(record.start_lsn), parse_lsn(record.stop_lsn) - 1, SEG_SIZE,
                             history, record.timeline)
    problems = [f"WAL segment {n} is missing" for n in missing_segments(needed, names)]
    for name in sorted(names):
        try:
            for _ in decode(repo.open(wal_dir + name), kms.decrypt_data_key):
                pass
        except Exception as e:
            problems.append(f"WAL {name}: {e}")
    return problems
