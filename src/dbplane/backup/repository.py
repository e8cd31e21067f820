"""Backup repositories: where WAL and base backups are stored.

One narrow interface (`Repository`) with two drivers: a local directory and an
S3-compatible object store. Objects are published atomically: a reader never sees a
partial object under its key, and a failed write leaves nothing visible and no temporary
data behind. Driver exceptions (OSError, botocore) are translated here into dbplane errors
with a hint, the cause chained.
"""

from __future__ import annotations

import configparser
import errno
import io
import logging
import os
import re
import secrets
import socket
import stat as stat_mod
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlparse

from dbplane.errors import DbplaneError, InvalidInput
from dbplane.models import NAME_RE, RepositorySpec

log = logging.getLogger("dbplane.backup")

DIR_MODE = 0o750
FILE_MODE = 0o640
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


# ------------------------------------------------------------------------------ filesystem


class FilesystemRepository(Repository):
    """A directory (it must exist): objects are files, written to a temporary file in the
    same directory, fsync'd, renamed over the final name, and the directory fsync'd."""

    def __init__(self, name: str, path: str | Path, *, stale_temp_age: float = 3600.0):
        self.name = name
        self.root = Path(path)
        if not self.root.is_absolute():
            raise InvalidInput(f"repository {name}: path {str(path)!r} is not absolute",
                               "give the repository an absolute directory path")
        self.stale_temp_age = stale_temp_age

    def describe(self) -> str:
        return f"{self.root} (filesystem)"

    # -- errors

    def _unavailable(self, what: str, hint: str = "") -> RepositoryUnavailable:
        return RepositoryUnavailable(
            f"repository {self.name}: {what}",
            hint or f"create {self.root} (mode 0750, owned by the service account) or fix the "
            "repository path")

    def _require_root(self) -> None:
        try:
            st = os.stat(self.root)
        except FileNotFoundError:
            raise self._unavailable(f"directory {self.root} does not exist") from None
        except OSError as e:
            raise self._translate(e, f"checking {self.root}") from e
        if not stat_mod.S_ISDIR(st.st_mode):
            raise self._unavailable(f"{self.root} is not a directory")

    def _translate(self, e: OSError, doing: str) -> DbplaneError:
        where = f"repository {self.name} ({self.root}): {doing} failed: {e.strerror or e}"
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return RepositoryFull(where, f"free space under {self.root} or use another repository")
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return RepositoryUnavailable(
                where, f"make {self.root} writable by the service account (and mounted read-write)")
        if e.errno in (errno.ENOENT, errno.ENOTDIR) and not self.root.is_dir():
            return self._unavailable(f"directory {self.root} does not exist")
        return RepositoryUnavailable(where, f"check the filesystem holding {self.root}")

    @contextmanager
    def _io(self, doing: str) -> Iterator[None]:
        try:
            yield
        except OSError as e:
            raise self._translate(e, doing) from e

    # -- paths

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).split("/"))

    def _make_dirs(self, directory: Path) -> None:
        missing = []
        d = directory
        while not d.is_dir():
            if d == self.root:
                raise self._unavailable(f"directory {self.root} does not exist")
            missing.append(d)
            d = d.parent
        for d in reversed(missing):
            try:
                os.mkdir(d, DIR_MODE)
            except FileExistsError:
                continue
            _fsync_dir(d.parent)

    # -- interface

    def put(self, key: str, chunks: Iterable[bytes]) -> int:
        dest = self._path(key)
        self._require_root()
        tmp = dest.with_name(f".{dest.name}.tmp-{secrets.token_hex(6)}")
        fd = self._create(key, tmp)
        f = open(fd, "wb", buffering=BUFFER)
        size = 0
        try:
            for chunk in chunks:                # the source's own errors propagate as they are
                with self._io(f"writing {key}"):
                    f.write(chunk)
                size += len(chunk)
            with self._io(f"writing {key}"):
                f.flush()
                os.fsync(f.fileno())
                f.close()
            with self._io(f"publishing {key}"):
                os.rename(tmp, dest)
                _fsync_dir(dest.parent)
        except BaseException:
            self._discard(f, tmp)
            raise
        return size

    def _create(self, key: str, tmp: Path) -> int:
        """Open a new temporary file, making its directories (again, if a concurrent
        delete_prefix removed them in between)."""
        for attempt in (1, 2):
            with self._io(f"creating the directory for {key}"):
                self._make_dirs(tmp.parent)
            try:
                return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
            except FileNotFoundError as e:
                if attempt == 2:
                    raise self._translate(e, f"creating {key}") from e
            except OSError as e:
                raise self._translate(e, f"creating {key}") from e
        raise AssertionError("unreachable")

    def _discard(self, f: io.BufferedWriter, tmp: Path) -> None:
        try:
            f.close()                           # may fail to flush (e.g. disk full): never mind
        except OSError:
            pass
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("repository %s: could not remove %s: %s", self.name, tmp, e)

    def open(self, key: str) -> BinaryIO:
        path = self._path(key)
        try:
            return open(path, "rb", buffering=BUFFER)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            self._require_root()
            raise self._missing(key) from None
        except OSError as e:
            raise self._translate(e, f"reading {key}") from e

    def _missing(self, key: str) -> ObjectMissing:
        return ObjectMissing(f"{key} is missing from repository {self.name} ({self.root})",
                             "the object was deleted or never written; use another backup")

    def stat(self, key: str) -> ObjectInfo | None:
        path = self._path(key)
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            self._require_root()
            return None
        except OSError as e:
            raise self._translate(e, f"checking {key}") from e
        if not stat_mod.S_ISREG(st.st_mode):
            return None
        return ObjectInfo(key, st.st_size, st.st_mtime)

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        check_prefix(prefix)
        self._require_root()
        base = prefix.rpartition("/")[0]
        out: list[ObjectInfo] = []
        with self._io(f"listing {prefix or '/'}"):
            for key, st in self._walk(self.root.joinpath(*base.split("/")) if base else self.root,
                                      base):
                if key.startswith(prefix) and (prefix.startswith(CHECK_PREFIX)
                                               or not key.startswith(CHECK_PREFIX)):
                    out.append(ObjectInfo(key, st.st_size, st.st_mtime))
        out.sort(key=lambda o: o.key)
        return out

    def _walk(self, directory: Path, rel: str, temps: list[Path] | None = None
              ) -> Iterator[tuple[str, os.stat_result]]:
        try:
            it = os.scandir(directory)
        except (FileNotFoundError, NotADirectoryError):
            return
        with it:
            entries = list(it)
        for e in entries:
            key = f"{rel}/{e.name}" if rel else e.name
            try:
                if e.is_dir(follow_symlinks=False):
                    yield from self._walk(Path(e.path), key, temps)
                elif TEMP_RE.match(e.name):
                    if temps is not None:
                        temps.append(Path(e.path))
                elif e.is_file(follow_symlinks=False):
                    yield key, e.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue                        # removed while we looked

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        except IsADirectoryError:
            return
        except OSError as e:
            raise self._translate(e, f"deleting {key}") from e

    def delete_prefix(self, prefix: str) -> int:
        n = super().delete_prefix(check_prefix(prefix))
        base = prefix.rstrip("/") if prefix.endswith("/") else prefix.rpartition("/")[0]
        if base:
            self._remove_empty_dirs(self.root.joinpath(*base.split("/")))
        return n

    def _remove_empty_dirs(self, directory: Path) -> None:
        if not directory.is_dir():
            return
        for sub in list(directory.iterdir()):
            if sub.is_dir() and not sub.is_symlink():
                self._remove_empty_dirs(sub)
        try:
            directory.rmdir()
        except OSError:
            pass                                # not empty: other objects or a write in progress

    def check(self) -> None:
        self._require_root()
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise self._unavailable(f"{self.root} is not writable",
                                    f"make {self.root} writable by the service account")
        self._clean_stale_temps()
        self._probe()
        try:
            (self.root / CHECK_PREFIX.rstrip("/")).rmdir()
        except OSError:
            pass

    def _clean_stale_temps(self) -> None:
        """Remove temporary files left by a crash (old enough that no write is still going)."""
        temps: list[Path] = []
        with self._io("looking for leftover temporary files"):
            for _ in self._walk(self.root, "", temps):
                pass
        cutoff = time.time() - self.stale_temp_age
        for t in temps:
            try:
                if t.stat().st_mtime < cutoff:
                    t.unlink()
                    log.info("repository %s: removed leftover temporary file %s", self.name, t)
            except FileNotFoundError:
                continue
            except OSError as e:
                raise self._translate(e, f"removing leftover {t}") from e


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------ S3


def read_credentials(path: str | Path) -> tuple[str, str, str | None]:
    """(access key id, secret, session token) from an AWS-credentials-style file of mode 0600.
    The secret never appears in an error message."""
    p = Path(path)
    try:
        st = os.stat(p)
        if stat_mod.S_IMODE(st.st_mode) & 0o077:
            raise CredentialsFileError(
                f"credentials file {p} is readable by group or others "
                f"(mode {stat_mod.S_IMODE(st.st_mode):04o})", f"chmod 600 {p}",
                code="credentials_file_insecure")
        text = p.read_text()
    except FileNotFoundError:
        raise CredentialsFileError(f"credentials file {p} does not exist",
                                   "create it (mode 0600) with aws_access_key_id and "
                                   "aws_secret_access_key", code="credentials_file_missing") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CredentialsFileError(f"cannot read credentials file {p}: {e}",
                                   "make it a readable text file of mode 0600") from e
    parser = configparser.ConfigParser(interpolation=None)
    try:
        if not re.search(r"^\s*\[", text, re.M):
            text = "[default]\n" + text
        parser.read_string(text, source=str(p))
    except configparser.Error:
        raise CredentialsFileError(f"credentials file {p} is not in AWS credentials format",
                                   "write lines 'aws_access_key_id = ...' and "
                                   "'aws_secret_access_key = ...'") from None
    section = parser["default"] if parser.has_section("default") else (
        parser[parser.sections()[0]] if parser.sections() else {})

    def pick(*names: str) -> str | None:
        for n in names:
            if section.get(n):
                return section[n].strip()
        return None

    key_id = pick("aws_access_key_id", "access_key_id")
    secret = pick("aws_secret_access_key", "secret_access_key")
    if not key_id or not secret:
        raise CredentialsFileError(f"credentials file {p} lacks aws_access_key_id or "
                                   "aws_secret_access_key",
                                   "add both keys (in a [default] section or without one)")
    return key_id, secret, pick("aws_session_token", "session_token")


class S3Repository(Repository):
    """A bucket (and key prefix) of an S3-compatible object store. Small objects are one
    PUT; large ones a multipart upload that only appears when completed, aborted on error."""

    def __init__(self, name: str, endpoint: str, bucket: str, prefix: str = "",
                 region: str = "us-east-1", credentials_file: str | Path = "", *,
                 connect_timeout: float = 5.0, read_timeout: float = 60.0, max_attempts: int = 3,
                 part_size: int = 16 << 20, max_concurrency: int = 4,
                 stale_upload_age: float = 86400.0):
        import boto3
        from botocore.config import Config

        self.name = name
        self.endpoint = endpoint.rstrip("/")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        if self.prefix:
            check_key(self.prefix)
        self.region = region
        self.credentials_file = str(credentials_file)
        self.part_size = max(part_size, 5 << 20)
        self.max_concurrency = max(1, max_concurrency)
        self.stale_upload_age = stale_upload_age
        key_id, secret, token = read_credentials(credentials_file)
        config = Config(
            connect_timeout=connect_timeout, read_timeout=read_timeout,
            retries={"max_attempts": max_attempts, "mode": "standard"},
            s3={"addressing_style": "path"}, signature_version="s3v4",
            max_pool_connections=max(10, self.max_concurrency * 2),
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required")
        session = boto3.session.Session(aws_access_key_id=key_id, aws_secret_access_key=secret,
                                        aws_session_token=token, region_name=region)
        self._client = session.client("s3", endpoint_url=self.endpoint, config=config)

    def describe(self) -> str:
        where = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        return f"{where} at {self.endpoint}"

    def _full(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _rel(self, full: str) -> str:
        return full[len(self.prefix) + 1:] if self.prefix else full

    # -- errors

    def _translate(self, e: Exception, doing: str) -> DbplaneError:
        from botocore import exceptions as bx

        where = f"repository {self.name} ({self.describe()}): {doing} failed"
        if isinstance(e, DbplaneError):
            return e
        if isinstance(e, bx.ClientError):
            err = e.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            msg = f"{where}: {code or status} {err.get('Message', '')}".rstrip()
            if code == "NoSuchBucket" or (code in ("404", "NotFound") and doing == "checking the bucket"):
                return RepositoryUnavailable(
                    f"repository {self.name}: bucket {self.bucket} does not exist at {self.endpoint}",
                    f"create bucket {self.bucket} or fix the repository's bucket name")
            if status == 403 or code in ("AccessDenied", "InvalidAccessKeyId",
                                         "SignatureDoesNotMatch", "AllAccessDisabled"):
                return RepositoryAccessDenied(
                    msg, f"check the keys in {self.credentials_file} and the bucket's policy")
            if status == 507 or code in ("QuotaExceeded", "XMinioStorageFull", "EntityTooLarge",
                                         "InsufficientStorage"):
                return RepositoryFull(msg, "free space in the object store, raise its quota or "
                                      "use another repository")
            return RepositoryUnavailable(msg, f"check the object store at {self.endpoint}")
        if isinstance(e, bx.NoCredentialsError | bx.PartialCredentialsError):
            return RepositoryAccessDenied(f"{where}: no credentials",
                                          f"check {self.credentials_file}")
        if isinstance(e, bx.BotoCoreError | OSError):
            return RepositoryUnavailable(
                f"{where}: cannot reach {self.endpoint}: {e}",
                "check that the S3 endpoint is up and reachable from this host, or fix the "
                "repository's endpoint")
        return RepositoryUnavailable(f"{where}: {e}", f"check the object store at {self.endpoint}")

    @contextmanager
    def _io(self, doing: str) -> Iterator[None]:
        from botocore.exceptions import BotoCoreError, ClientError
        try:
            yield
        except (BotoCoreError, ClientError, OSError) as e:
            raise self._translate(e, doing) from e

    def _missing(self, key: str) -> ObjectMissing:
        return ObjectMissing(f"{key} is missing from repository {self.name} ({self.describe()})",
                             "the object was deleted or never written; use another backup")

    @staticmethod
    def _is_missing(e: Exception) -> bool:
        from botocore.exceptions import ClientError
        if not isinstance(e, ClientError):
            return False
        code = str(e.response.get("Error", {}).get("Code", ""))
        return code in ("NoSuchKey", "404", "NotFound")

    # -- writing

    def put(self, key: str, chunks: Iterable[bytes]) -> int:
        full = self._full(key)
        buf = bytearray()
        it = iter(chunks)
        for chunk in it:                        # the source's own errors propagate as they are
            buf += chunk
            if len(buf) >= self.part_size:
                return self._multipart(key, full, buf, it)
        with self._io(f"writing {key}"):
            self._client.put_object(Bucket=self.bucket, Key=full, Body=bytes(buf))
        return len(buf)

    def _multipart(self, key: str, full: str, buf: bytearray, rest: Iterator[bytes]) -> int:
        with self._io(f"starting the upload of {key}"):
            upload_id = self._client.create_multipart_upload(Bucket=self.bucket, Key=full)["UploadId"]
        parts: dict[int, str] = {}
        pending: set[Future] = set()
        size = 0
        pool = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix=f"s3-put-{self.name}")
        try:
            def send(number: int, body: bytes) -> None:
                nonlocal pending
                while len(pending) >= self.max_concurrency:     # bound the memory in flight
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for f in done:
                        f.result()
                pending.add(pool.submit(self._upload_part, key, full, upload_id, number, body, parts))

            number = 1
            for chunk in rest:
                buf += chunk
                if len(buf) >= self._part_size(number):
                    size += len(buf)
                    send(number, bytes(buf))
                    buf = bytearray()
                    number += 1
            if buf or number == 1:
                size += len(buf)
                send(number, bytes(buf))
            for f in pending:
                f.result()
            with self._io(f"completing the upload of {key}"):
                self._client.complete_multipart_upload(
                    Bucket=self.bucket, Key=full, UploadId=upload_id,
                    MultipartUpload={"Parts": [{"PartNumber": n, "ETag": parts[n]}
                                               for n in sorted(parts)]})
        except BaseException:
            for f in pending:
                f.cancel()
            pool.shutdown(wait=True)
            self._abort(full, upload_id)
            raise
        pool.shutdown(wait=True)
        return size

    def _part_size(self, number: int) -> int:
        """Grow parts so that 10,000 of them hold many terabytes."""
        return min(self.part_size << (number // 1000), 1 << 30)

    def _upload_part(self, key: str, full: str, upload_id: str, number: int, body: bytes,
                     parts: dict[int, str]) -> None:
        with self._io(f"writing {key} (part {number})"):
            r = self._client.upload_part(Bucket=self.bucket, Key=full, UploadId=upload_id,
                                         PartNumber=number, Body=body)
        parts[number] = r["ETag"]

    def _abort(self, full: str, upload_id: str) -> None:
        try:
            self._client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id)
        except Exception as e:  # noqa: BLE001 - best effort; the object never became visible
            log.warning("repository %s: could not abort the upload of %s: %s", self.name, full, e)

    # -- reading

    def open(self, key: str) -> BinaryIO:
        full = self._full(key)
        try:
            r = self._client.get_object(Bucket=self.bucket, Key=full)
        except Exception as e:
            if self._is_missing(e):
                raise self._missing(key) from None
            raise self._translate(e, f"reading {key}") from e
        raw = _S3Reader(self, key, full, r)
        return io.BufferedReader(raw, BUFFER)

    def get_bytes(self, key: str) -> bytes:
        with self.open(key) as f:
            return f.read()

    def stat(self, key: str) -> ObjectInfo | None:
        full = self._full(key)
        try:
            r = self._client.head_object(Bucket=self.bucket, Key=full)
        except Exception as e:
            if self._is_missing(e):
                return None
            raise self._translate(e, f"checking {key}") from e
        return ObjectInfo(key, int(r["ContentLength"]), r["LastModified"].timestamp())

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        check_prefix(prefix)
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        out: list[ObjectInfo] = []
        with self._io(f"listing {prefix or '/'}"):
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full)
            for page in pages:
                for o in page.get("Contents", []):
                    key = self._rel(o["Key"])
                    if prefix.startswith(CHECK_PREFIX) or not key.startswith(CHECK_PREFIX):
                        out.append(ObjectInfo(key, int(o["Size"]), o["LastModified"].timestamp()))
        out.sort(key=lambda o: o.key)
        return out

    def delete(self, key: str) -> None:
        full = self._full(key)
        with self._io(f"deleting {key}"):
            self._client.delete_object(Bucket=self.bucket, Key=full)

    def delete_prefix(self, prefix: str) -> int:
        if not prefix:
            raise InvalidInput("refusing to delete a whole repository with an empty prefix")
        objs = self.list(prefix)
        for i in range(0, len(objs), 1000):
            batch = [{"Key": self._full(o.key)} for o in objs[i:i + 1000]]
            with self._io(f"deleting {prefix}"):
                r = self._client.delete_objects(Bucket=self.bucket,
                                                Delete={"Objects": batch, "Quiet": True})
            if r.get("Errors"):
                first = r["Errors"][0]
                raise RepositoryUnavailable(
                    f"repository {self.name} ({self.describe()}): deleting {len(r['Errors'])} "
                    f"objects under {prefix} failed, e.g. {self._rel(first.get('Key', ''))}: "
                    f"{first.get('Code')} {first.get('Message', '')}",
                    f"check the object store at {self.endpoint}")
        return len(objs)

    def check(self) -> None:
        with self._io("checking the bucket"):
            self._client.head_bucket(Bucket=self.bucket)
        self._probe()
        self._abort_stale_uploads()

    def _abort_stale_uploads(self) -> None:
        """Abort multipart uploads a crashed writer left (their parts cost storage)."""
        cutoff = time.time() - self.stale_upload_age
        with self._io("listing unfinished uploads"):
            pages = self._client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=f"{self.prefix}/" if self.prefix else "")
            stale = [(u["Key"], u["UploadId"]) for page in pages for u in page.get("Uploads", [])
                     if u["Initiated"].timestamp() < cutoff]
        for full, upload_id in stale:
            log.info("repository %s: aborting an unfinished upload of %s", self.name, full)
            self._abort(full, upload_id)


class _S3Reader(io.RawIOBase):
    """An object's body as a raw stream; a dropped connection resumes with a ranged GET of
    the same version (ETag), a few times, before giving up."""

    RESUMES = 3

    def __init__(self, repo: S3Repository, key: str, full: str, response: dict):
        self._repo, self._key, self._full = repo, key, full
        self._body = response["Body"]
        self._etag = response.get("ETag", "")
        self._size = int(response.get("ContentLength", -1))
        self._pos = 0
        self._resumes = 0
        self._lock = threading.Lock()

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        from botocore.exceptions import BotoCoreError
        with self._lock:
            while True:
                try:
                    data = self._body.read(len(b))
                except (BotoCoreError, OSError) as e:
                    self._resume(e)
                    continue
                if not data and 0 <= self._size != self._pos:
                    self._resume(EOFError(f"stream ended at {self._pos} of {self._size} bytes"))
                    continue
                n = len(data)
                b[:n] = data
                self._pos += n
                return n

    def _resume(self, e: Exception) -> None:
        self._resumes += 1
        if self._resumes > self.RESUMES:
            raise self._repo._translate(e, f"reading {self._key}") from e
        log.info("repository %s: resuming %s at byte %d after %s", self._repo.name, self._key,
                 self._pos, e)
        self._body.close()
        args = {"Bucket": self._repo.bucket, "Key": self._full, "Range": f"bytes={self._pos}-"}
        if self._etag:
            args["IfMatch"] = self._etag
        with self._repo._io(f"reading {self._key}"):
            self._body = self._repo._client.get_object(**args)["Body"]

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()


# ------------------------------------------------------------------------------ specs


BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def validate_spec(spec: RepositorySpec) -> list[str]:
    """Every problem with a repository spec at once, as 'field: problem'."""
    problems: list[str] = []
    if not NAME_RE.match(spec.name):
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
    elif not BUCKET_RE.match(spec.bucket):
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
        return FilesystemRepository(spec.name, spec.path)
    return S3Repository(spec.name, spec.endpoint, spec.bucket, spec.prefix, spec.region,
                        spec.credentials_file)
