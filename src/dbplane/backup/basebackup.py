"""Base backups: pg_basebackup writes a tar stream to its stdout, which is compressed,
encrypted and uploaded as it comes: no local copy, no size limit but the repository's.

  backups/<id>/base.tar          the tar stream (pg_basebackup -Ft -D -, one tablespace)
  backups/<id>/backup_manifest   PostgreSQL's manifest: SHA-256 of every file, WAL range;
                                 an incremental backup is taken against its parent's
  backups/<id>/wal/<segment>     the WAL from start to stop: every backup restores alone
  backups/<id>/secrets.json      the database's passwords, which a restore keeps
  backups/<id>/backup.json       the catalog record, written last: the backup is complete

Backups use -X none: the WAL they need comes from the archive, which already streams it.
Incremental backups (PostgreSQL 17+, WAL summaries) are restored with pg_combinebackup.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import DbplaneError
from .objects import encode
from .repository import Repository
from .wal import parse_lsn

READ_SIZE = 1 << 20
COMPRESSION_LEVEL = 1


class BackupFailed(DbplaneError):
    code = "backup_failed"
    status = 500


@dataclass(frozen=True)
class Source:
    """The node to back up, and the replication login."""
    address: str
    port: int
    password: str


@dataclass(frozen=True)
class BaseBackup:
    timeline: int
    start_lsn: int
    stop_lsn: int
    size_bytes: int
    stored_bytes: int
    manifest: bytes


def backup_prefix(archive_id: str, backup_id: str) -> str:
    return f"{archive_id}/backups/{backup_id}/"


class TarScanner:
    """Follows a tar stream's member headers to keep the few small members asked for
    (backup_manifest), skipping everything else without copying it."""

    def __init__(self, wanted: set[str]):
        self.wanted = wanted
        self.found: dict[str, bytes] = {}
        self._header = bytearray()
        self._skip = 0                   # bytes of the current member (and padding) to pass
        self._capture: tuple[str, int, bytearray] | None = None
        self.ended = False

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        while view and not self.ended:
            if self._skip:
                n = min(self._skip, len(view))
                if self._capture is not None:
                    name, size, buf = self._capture
                    buf += view[:max(0, min(n, size - len(buf)))]
                self._skip -= n
                view = view[n:]
                if not self._skip and self._capture is not None:
                    name, size, buf = self._capture
                    self.found[name] = bytes(buf[:size])
                    self._capture = None
                continue
            need = 512 - len(self._header)
            self._header += view[:need]
            view = view[need:]
            if len(self._header) == 512:
                self._start_member(bytes(self._header))
                self._header.clear()

    def _start_member(self, header: bytes) -> None:
        if header == b"\0" * 512:
            self.ended = True
            return
        name = header[:100].split(b"\0", 1)[0].decode(errors="replace")
        prefix = header[345:500].split(b"\0", 1)[0].decode(errors="replace")
        if prefix and header[257:262] == b"ustar":
            name = f"{prefix}/{name}"
        size = _tar_size(header[124:136])
        self._skip = (size + 511) // 512 * 512
        if name in self.wanted:
            self._capture = (name, size, bytearray())


def _tar_size(field: bytes) -> int:
    if field[0] & 0x80:                  # base-256 for members over 8 GB
        return int.from_bytes(field[1:], "big")
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def run_pg_basebackup(bin_dir: str, source: Source, repo: Repository, key: str, new_data_key: Callable,
                      label: str, parent_manifest: bytes | None = None) -> BaseBackup:
    """Take a base backup of `source` straight into `repo` under `key`. Nothing is
    visible under `key` unless pg_basebackup succeeded."""
    with tempfile.TemporaryDirectory(prefix="dbplane-backup-") as tmp:
        work = Path(tmp)
        pgpass = work / "pgpass"
        pgpass.write_text(f"*:*:*:replicator:{_pgpass_escape(source.password)}\n")
        pgpass.chmod(0o600)
        argv = [f"{bin_dir}/pg_basebackup", "-h", source.address, "-p", str(source.port),
                "-U", "replicator", "-w", "-D", "-", "-Ft", "-X", "none", "-c", "fast",
                "--manifest-checksums=SHA256", "--label", label]
        if parent_manifest is not None:
            (work / "parent_manifest").write_bytes(parent_manifest)
            argv.append(f"--incremental={work / 'parent_manifest'}")
        stderr_path = work / "stderr"
        scanner = TarScanner({"backup_manifest"})
        with open(stderr_path, "wb") as stderr:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr,
                                    env={"PATH": "/usr/bin:/bin", "PGPASSFILE": str(pgpass),
                                         "PGCONNECT_TIMEOUT": "10", "LC_ALL": "C"})

            def chunks() -> Iterator[bytes]:
                completed = False
                try:
                    while chunk := proc.stdout.read(READ_SIZE):
                        scanner.feed(chunk)
                        yield chunk
                    completed = True
                finally:
                    if not completed:          # the upload gave up: stop pg_basebackup
                        proc.kill()
                    returncode = proc.wait()
                if returncode != 0:
                    raise BackupFailed(f"pg_basebackup from {source.address}:{source.port} failed: "
                                       f"{_last_error(stderr_path)}",
                                       "see the backup worker's log; the next attempt retries")

            dk = new_data_key()
            encoded = encode(chunks(), data_key=dk.plaintext, wrapped_key=dk.wrapped,
                             key_id=dk.key_id, key_version=dk.key_version, level=COMPRESSION_LEVEL)
            try:
                stored = repo.put(key, encoded)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    manifest = scanner.found.get("backup_manifest")
    if manifest is None:
        repo.delete(key)
        raise BackupFailed("pg_basebackup's output has no backup_manifest",
                           "the source must be PostgreSQL 13 or newer")
    tli, start, stop = wal_range(manifest)
    return BaseBackup(timeline=tli, start_lsn=start, stop_lsn=stop, size_bytes=encoded.plain_bytes,
                      stored_bytes=stored, manifest=manifest)


def wal_range(manifest: bytes) -> tuple[int, int, int]:
    """(timeline at the end, start LSN, stop LSN) of a backup, from its manifest."""
    ranges = json.loads(manifest)["WAL-Ranges"]
    return (int(ranges[-1]["Timeline"]), parse_lsn(ranges[0]["Start-LSN"]),
            parse_lsn(ranges[-1]["End-LSN"]))


def _pgpass_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:")


def _last_error(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines()
                 if ln.strip() and "WAL archiving is not enabled" not in ln
                 and not ln.startswith("NOTICE")]
    except OSError:
        return "no output"
    return lines[-1].strip()[:300] if lines else "no output"

