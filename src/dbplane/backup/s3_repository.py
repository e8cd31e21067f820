"""The S3 backup repository: a bucket (and key prefix) of an S3-compatible object store,
and its credentials file (see `repository` for the interface). boto3 is imported on use.
"""

from __future__ import annotations

import configparser
import io
import logging
import os
import re
import stat as stat_mod
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from dbplane.errors import DbplaneError, InvalidInput

from .repository import (
    BUFFER,
    CHECK_PREFIX,
    CredentialsFileError,
    ObjectInfo,
    ObjectMissing,
    Repository,
    RepositoryAccessDenied,
    RepositoryFull,
    RepositoryUnavailable,
    check_key,
    check_prefix,
)

log = logging.getLogger("dbplane.backup")


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
