"""Backup repositories: where WAL and base backups are stored.

One narrow interface (`Repository`) with two drivers: a local directory (fs_repository) and
an S3-compatible object store (s3_repository). Objects are published atomically: a reader
never sees a partial object under its key, and a failed write leaves nothing visible and no
temporary data behind. Each driver translates its exceptions (OSError, botocore) into the
dbplane errors defined here, with a hint, the cause chained.

The drivers import this module, so open_repository imports the one it needs when called
(that also keeps boto3 out of processes that never use S3).
"""

from __future__ import annotations

import os
import re
import secrets
import socket
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import BinaryIO
from urllib.parse import urlparse

from dbplane.errors import DbplaneError, InvalidInput
from dbplane.models import NAME_RE, RepositorySpec

BUFFER = 1 << 20
TEMP_RE = re.compile(r"^\..+\.tmp-[0-9a-f]{12}$")
CHECK_PREFIX = ".dbplane-check/"


class RepositoryUnavailable(DbplaneError):
    code = "repository_unavailable"
    status = 503


class RepositoryFull(DbplaneError):
    code = "repository_full"
    status = 507


class RepositoryAccessDenied(DbplaneError):
    code = "repository_access_denied"
    status = 403


class ObjectMissing(DbplaneError):
    code = "backup_object_missing"
    status = 404


class CredentialsFileError(InvalidInput):
    """The S3 credentials file is missing, unreadable, malformed or insecure."""
    code = "credentials_file_invalid"


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    mtime: float


def check_key(key: str) -> str:
    """A key is a relative '/'-separated path without '.', '..' or empty parts."""
    if not isinstance(key, str) or not key:
        raise InvalidInput("empty object key")
    parts = key.split("/")
    if key.startswith("/") or "\0" in key or "\\" in key or any(
            p in ("", ".", "..") or TEMP_RE.match(p) for p in parts):
        raise InvalidInput(f"invalid object key {key!r}",
                           "use a relative '/'-separated path without '.', '..' or empty parts")
    return key


def check_prefix(prefix: str) -> str:
    """A prefix is '' (everything) or the start of a key; it may end with '/'."""
    if prefix:
        check_key(prefix[:-1] if prefix.endswith("/") else prefix)
    return prefix


class Repository(ABC):
    """Where backups and archived WAL are stored: a flat namespace of keys."""

    name: str

    @abstractmethod
    def put(self, key: str, chunks: Iterable[bytes]) -> int:
        """Store the chunks under `key` and return the bytes stored. Atomic: the object
        appears complete or not at all; on any error nothing is left under `key`. An
        exception raised by `chunks` itself propagates unchanged."""

    def put_bytes(self, key: str, data: bytes) -> int:
        return self.put(key, [data])

    @abstractmethod
    def open(self, key: str) -> BinaryIO:
        """A readable stream of the object (streamed, not loaded). ObjectMissing if absent."""

    def get_bytes(self, key: str) -> bytes:
        with self.open(key) as f:
            return f.read()

    def exists(self, key: str) -> bool:
        return self.stat(key) is not None

    @abstractmethod
    def stat(self, key: str) -> ObjectInfo | None:
        """Size and modification time, or None when there is no such object."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Every object whose key starts with `prefix` (recursive), sorted by key."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove an object; a missing one is fine."""

    def delete_prefix(self, prefix: str) -> int:
        """Remove every object under a non-empty prefix; returns how many were removed."""
        if not prefix:
            raise InvalidInput("refusing to delete a whole repository with an empty prefix")
        objs = self.list(prefix)
        for o in objs:
            self.delete(o.key)
        return len(objs)

    @abstractmethod
    def check(self) -> None:
        """Reachable and writable: write, read back and delete a probe object."""

    @abstractmethod
    def describe(self) -> str:
        """Where it is, for messages (never credentials)."""

    def _probe(self) -> None:
        key = f"{CHECK_PREFIX}{socket.gethostname() or 'host'}-{secrets.token_hex(6)}"
        data = secrets.token_bytes(64)
        self.put_bytes(key, data)
        try:
            back = self.get_bytes(key)
        finally:
            self.delete(key)
        if back != data:
            raise RepositoryUnavailable(
                f"repository {self.name} ({self.describe()}) returned different data for a probe "
                "object", "check the storage behind the repository")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}: {self.describe()}>"



# ------------------------------------------------------------------------------ specs


BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def validate_spec(spec: RepositorySpec) -> list[str]:
    """Every problem with a repository spec at once, as 'field: problem'."""
    problems: list[str] = []
    if not NAME_RE.fullmatch(spec.name):
        problems.append(f"name: {spec.name!r} is not 2-42 lowercase letters, digits and '-', "
                        "starting with a letter")
    if spec.kind == "filesystem":
        if not spec.path:
            problems.append("path: a filesystem repository needs a directory path")
        elif not os.path.isabs(spec.path):
            problems.append(f"path: {spec.path!r} is not an absolute path")
        return problems
    url = urlparse(spec.endpoint)
    if not spec.endpoint:
        problems.append("endpoint: an s3 repository needs an endpoint URL, e.g. http://127.0.0.1:9000")
    elif url.scheme not in ("http", "https") or not url.hostname:
        problems.append(f"endpoint: {spec.endpoint!r} is not an http(s) URL")
    if not spec.bucket:
        problems.append("bucket: an s3 repository needs a bucket name")
    elif not BUCKET_RE.fullmatch(spec.bucket):
        problems.append(f"bucket: {spec.bucket!r} is not a valid bucket name")
    if spec.prefix.strip("/"):
        try:
            check_key(spec.prefix.strip("/"))
        except InvalidInput:
            problems.append(f"prefix: {spec.prefix!r} has '.', '..' or empty parts")
    if not spec.credentials_file:
        problems.append("credentials_file: an s3 repository needs a credentials file (mode 0600)")
    elif not os.path.isabs(spec.credentials_file):
        problems.append(f"credentials_file: {spec.credentials_file!r} is not an absolute path")
    return problems


def open_repository(spec: RepositorySpec) -> Repository:
    problems = validate_spec(spec)
    if problems:
        raise InvalidInput(f"repository {spec.name}: " + "; ".join(problems),
                           "fix the repository's settings")
    if spec.kind == "filesystem":
        from .fs_repository import FilesystemRepository
        return FilesystemRepository(spec.name, spec.path)
    from .s3_repository import S3Repository
    return S3Repository(spec.name, spec.endpoint, spec.bucket, spec.prefix, spec.region,
                        spec.credentials_file)
