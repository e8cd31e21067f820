"""Backup repositories: one contract, run against a directory and a real S3 server process
(moto, over HTTP), plus the faults: full disk, unreachable endpoint, missing bucket,
insecure credentials, missing or read-only directory."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from dbplane.backup.fs_repository import FilesystemRepository
from dbplane.backup.repository import (
    TEMP_RE,
    ObjectInfo,
    ObjectMissing,
    RepositoryAccessDenied,
    RepositoryFull,
    RepositoryUnavailable,
    open_repository,
    validate_spec,
)
from dbplane.backup.s3_repository import S3Repository
from dbplane.errors import InvalidInput
from dbplane.models import RepositorySpec
from s3_server import SECRET_KEY, S3Server, free_port, s3_server_fixture, write_credentials

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    yield from s3_server_fixture(tmp_path_factory)


def s3_repo(s3: S3Server, prefix: str | None = None, **kw) -> S3Repository:
    kw.setdefault("credentials_file", s3.credentials_file)
    return S3Repository("s3test", s3.endpoint, s3.bucket, prefix or f"t-{uuid.uuid4().hex[:8]}", **kw)


@pytest.fixture(params=["filesystem", "s3"])
def repo(request, tmp_path):
    if request.param == "filesystem":
        root = tmp_path / "repo"
        root.mkdir()
        return FilesystemRepository("fs", root)
    return s3_repo(request.getfixturevalue("s3"))


def fs_leftovers(repo) -> list[str]:
    if not isinstance(repo, FilesystemRepository):
        return []
    return [str(p) for p in repo.root.rglob("*") if TEMP_RE.match(p.name)]


def s3_uploads(repo) -> list:
    if not isinstance(repo, S3Repository):
        return []
    uploads = repo._client.list_multipart_uploads(Bucket=repo.bucket).get("Uploads", [])
    return [u for u in uploads if u["Key"].startswith(f"{repo.prefix}/")]


class Boom(Exception):
    pass


def failing(chunks: list[bytes]):
    yield from chunks
    raise Boom("source failed")


# ------------------------------------------------------------------------ the contract


def test_put_get_stat_exists(repo):
    assert repo.put_bytes("a/b/c.bin", b"hello") == 5
    assert repo.get_bytes("a/b/c.bin") == b"hello"
    assert repo.exists("a/b/c.bin") and not repo.exists("a/b/d.bin")
    info = repo.stat("a/b/c.bin")
    assert info.key == "a/b/c.bin" and info.size == 5 and abs(info.mtime - time.time()) < 120
    assert repo.stat("a/b") is None and repo.stat("missing") is None
    assert repo.put("a/b/c.bin", [b"new ", b"", b"data"]) == 8       # overwrite
    with repo.open("a/b/c.bin") as f:
        assert f.read(3) == b"new" and f.read() == b" data"
    assert repo.put_bytes("empty", b"") == 0 and repo.get_bytes("empty") == b""


def test_missing_object(repo):
    with pytest.raises(ObjectMissing) as e:
        repo.open("wal/0000000100000000000000AB")
    assert e.value.code == "backup_object_missing" and e.value.status == 404
    assert "wal/0000000100000000000000AB" in e.value.message and repo.name in e.value.message
    with pytest.raises(ObjectMissing):
        repo.get_bytes("nope")


def test_list_is_sorted_recursive_and_prefix_filtered(repo):
    for key in ["wal/b", "wal/a", "base/x/2", "base/x/1", "base/y", "walrus"]:
        repo.put_bytes(key, key.encode())
    assert [o.key for o in repo.list()] == ["base/x/1", "base/x/2", "base/y", "wal/a", "wal/b",
                                            "walrus"]
    assert [o.key for o in repo.list("wal/")] == ["wal/a", "wal/b"]
    assert [o.key for o in repo.list("wal")] == ["wal/a", "wal/b", "walrus"]
    assert [o.key for o in repo.list("base/x")] == ["base/x/1", "base/x/2"]
    assert repo.list("nothing/") == []
    assert all(isinstance(o, ObjectInfo) and o.size == len(o.key) for o in repo.list())


def test_delete_and_delete_prefix(repo):
    for key in ["b/1/x", "b/1/y", "b/2/x", "c"]:
        repo.put_bytes(key, b"1")
    repo.delete("c")
    repo.delete("c")                            # missing is fine
    assert not repo.exists("c")
    assert repo.delete_prefix("b/1/") == 2
    assert [o.key for o in repo.list()] == ["b/2/x"]
    with pytest.raises(InvalidInput):
        repo.delete_prefix("")
    if isinstance(repo, FilesystemRepository):
        assert not (repo.root / "b" / "1").exists()     # empty directories go too


def test_bad_keys(repo):
    for key in ["", "/abs", "a/../b", "a//b", "./a", "a/", ".x.tmp-0123456789ab"]:
        with pytest.raises(InvalidInput):
            repo.put_bytes(key, b"x")
    with pytest.raises(InvalidInput):
        repo.list("../")


def test_check(repo):
    repo.check()
    assert repo.list() == []                    # the probe is gone
    assert "s3://" in repo.describe() or "filesystem" in repo.describe()


def test_failed_put_leaves_nothing(repo):
    with pytest.raises(Boom):
        repo.put("x/obj", failing([b"a" * 1000]))
    assert not repo.exists("x/obj") and repo.list() == [] and fs_leftovers(repo) == []


def test_failed_put_keeps_the_previous_version(repo):
    repo.put_bytes("x/obj", b"old")
    with pytest.raises(Boom):
        repo.put("x/obj", failing([b"new" * 1000]))
    assert repo.get_bytes("x/obj") == b"old" and fs_leftovers(repo) == []


def test_failed_large_put_leaves_nothing(repo):
    """Fails after several multipart parts have been uploaded: the upload is aborted."""
    chunk = os.urandom(1 << 20)
    with pytest.raises(Boom):
        repo.put("big", failing([chunk] * 40))
    assert not repo.exists("big") and fs_leftovers(repo) == [] and s3_uploads(repo) == []


def test_large_object_streamed(repo):
    chunk = os.urandom(1 << 20)
    n = 30
    assert repo.put("big/object", (chunk for _ in range(n))) == n << 20
    assert repo.stat("big/object").size == n << 20
    with repo.open("big/object") as f:
        count = 0
        while True:
            block = f.read(1 << 20)
            if not block:
                break
            assert block == chunk
            count += 1
    assert count == n and s3_uploads(repo) == []


# ------------------------------------------------------------------------ filesystem


def test_fs_temp_files_ignored_and_cleaned(tmp_path):
    repo = FilesystemRepository("fs", tmp_path, stale_temp_age=60)
    repo.put_bytes("wal/1", b"1")
    stale = tmp_path / "wal" / ".2.tmp-0123456789ab"
    fresh = tmp_path / "wal" / ".3.tmp-0123456789ab"
    stale.write_bytes(b"half")
    fresh.write_bytes(b"half")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    assert [o.key for o in repo.list()] == ["wal/1"]
    repo.check()
    assert not stale.exists() and fresh.exists()    # a write may still be going on


def test_fs_modes(tmp_path):
    repo = FilesystemRepository("fs", tmp_path)
    repo.put_bytes("d1/d2/f", b"x")
    assert (tmp_path / "d1").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "d1" / "d2").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "d1" / "d2" / "f").stat().st_mode & 0o777 == 0o640


def test_fs_missing_directory(tmp_path):
    repo = FilesystemRepository("fs", tmp_path / "nope")
    for call in (repo.check, lambda: repo.put_bytes("a", b"x"), repo.list,
                 lambda: repo.open("a"), lambda: repo.stat("a")):
        with pytest.raises(RepositoryUnavailable) as e:
            call()
        assert e.value.code == "repository_unavailable" and e.value.status == 503
        assert "does not exist" in e.value.message and str(tmp_path / "nope") in e.value.hint
    assert not (tmp_path / "nope").exists()         # never created by accident


def test_fs_not_a_directory(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(RepositoryUnavailable, match="is not a directory"):
        FilesystemRepository("fs", tmp_path / "file").check()


def test_fs_relative_path_refused():
    with pytest.raises(InvalidInput):
        FilesystemRepository("fs", "relative/dir")


def mount_tmpfs(path: Path, options: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root")
    path.mkdir(exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")


@pytest.fixture
def small_fs(tmp_path):
    mnt = tmp_path / "small"
    mount_tmpfs(mnt, "size=2m,mode=750")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


@pytest.fixture
def readonly_fs(tmp_path):
    mnt = tmp_path / "ro"
    mount_tmpfs(mnt, "size=1m,ro,mode=750")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_fs_full(small_fs):
    repo = FilesystemRepository("small", small_fs)
    repo.put_bytes("keep", b"k" * 1000)
    with pytest.raises(RepositoryFull) as e:
        repo.put("wal/big", (os.urandom(1 << 20) for _ in range(4)))
    assert e.value.code == "repository_full" and e.value.status == 507
    assert "No space left on device" in e.value.message and "free space" in e.value.hint
    assert isinstance(e.value.__cause__, OSError)
    assert not repo.exists("wal/big") and fs_leftovers(repo) == []
    assert [o.key for o in repo.list()] == ["keep"]
    repo.check()                                    # small writes still work


def test_fs_read_only(readonly_fs):
    repo = FilesystemRepository("ro", readonly_fs)
    with pytest.raises(RepositoryUnavailable, match="not writable"):
        repo.check()
    with pytest.raises(RepositoryUnavailable) as e:
        repo.put_bytes("a", b"x")
    assert "Read-only file system" in e.value.message and "writable" in e.value.hint


# ------------------------------------------------------------------------ S3


def test_s3_unreachable_endpoint(s3):
    port = free_port()                              # nothing listens there
    repo = S3Repository("dead", f"http://127.0.0.1:{port}", "b", "", credentials_file=s3.credentials_file,
                        connect_timeout=1, read_timeout=2, max_attempts=1)
    t0 = time.monotonic()
    for call in (repo.check, lambda: repo.put_bytes("a", b"x"), lambda: repo.open("a"),
                 repo.list):
        with pytest.raises(RepositoryUnavailable) as e:
            call()
        assert f"cannot reach http://127.0.0.1:{port}" in e.value.message
        assert "endpoint" in e.value.hint
    assert time.monotonic() - t0 < 10


def test_s3_missing_bucket(s3):
    repo = S3Repository("nob", s3.endpoint, "no-such-bucket", "", credentials_file=s3.credentials_file)
    for call in (repo.check, lambda: repo.put_bytes("a", b"x"), repo.list):
        with pytest.raises(RepositoryUnavailable) as e:
            call()
        assert "bucket no-such-bucket does not exist" in e.value.message
        assert "create bucket no-such-bucket" in e.value.hint


def test_s3_credentials_file_checks(s3, tmp_path):
    loose = write_credentials(tmp_path / "loose", mode=0o644)
    with pytest.raises(InvalidInput) as e:
        S3Repository("x", s3.endpoint, s3.bucket, "", credentials_file=loose)
    assert e.value.code == "credentials_file_insecure" and e.value.hint == f"chmod 600 {loose}"
    with pytest.raises(InvalidInput) as e:
        S3Repository("x", s3.endpoint, s3.bucket, "", credentials_file=tmp_path / "absent")
    assert e.value.code == "credentials_file_missing" and "does not exist" in e.value.message
    bare = tmp_path / "bare"
    bare.write_text(f"access_key_id={'k'}\nsecret_access_key={SECRET_KEY}\n")
    bare.chmod(0o600)
    s3_repo(s3, credentials_file=bare).check()      # no section, short key names
    half = tmp_path / "half"
    half.write_text(f"[default]\naws_secret_access_key = {SECRET_KEY}\n")
    half.chmod(0o600)
    with pytest.raises(InvalidInput) as e:
        S3Repository("x", s3.endpoint, s3.bucket, "", credentials_file=half)
    assert SECRET_KEY not in str(e.value) and "aws_access_key_id" in e.value.message


def test_s3_secret_never_shown(s3):
    repo = s3_repo(s3)
    assert SECRET_KEY not in repo.describe() and SECRET_KEY not in repr(repo)
    assert repo.describe().startswith(f"s3://{s3.bucket}/t-") and s3.endpoint in repo.describe()


def test_s3_access_denied(s3, tmp_path):
    """moto accepts any key unless IAM is enforced, so exercise the translation directly."""
    from botocore.exceptions import ClientError
    repo = s3_repo(s3)
    err = ClientError({"Error": {"Code": "AccessDenied", "Message": "Access Denied"},
                       "ResponseMetadata": {"HTTPStatusCode": 403}}, "PutObject")
    e = repo._translate(err, "writing a")
    assert isinstance(e, RepositoryAccessDenied) and e.code == "repository_access_denied"
    assert str(s3.credentials_file) in e.hint


def test_s3_prefix_isolates(s3):
    a, b = s3_repo(s3, "iso/a"), s3_repo(s3, "iso/ab")
    a.put_bytes("k", b"a")
    b.put_bytes("k", b"b")
    assert [o.key for o in a.list()] == ["k"] and a.get_bytes("k") == b"a"
    assert s3.client().get_object(Bucket=s3.bucket, Key="iso/ab/k")["Body"].read() == b"b"


def test_s3_read_resumes_after_a_dropped_connection(s3):
    from botocore.exceptions import ReadTimeoutError

    class Flaky:
        """Gives 1000 bytes, then the connection drops."""
        def __init__(self, body):
            self.body, self.reads = body, 0

        def read(self, n):
            self.reads += 1
            if self.reads > 1:
                raise ReadTimeoutError(endpoint_url="http://x")
            return self.body.read(min(n, 1000))

        def close(self):
            self.body.close()

    repo = s3_repo(s3)
    data = os.urandom(3 << 20)
    repo.put_bytes("obj", data)
    with repo.open("obj") as f:
        flaky = f.raw._body = Flaky(f.raw._body)
        assert f.read() == data                 # resumed with a ranged GET at byte 1000
        assert flaky.reads == 2 and f.raw._resumes == 1


def test_s3_check_aborts_stale_uploads(s3):
    repo = s3_repo(s3, stale_upload_age=0)
    other = s3.client().create_multipart_upload(Bucket=s3.bucket, Key="elsewhere/x")["UploadId"]
    s3.client().create_multipart_upload(Bucket=s3.bucket, Key=f"{repo.prefix}/crashed")
    time.sleep(1.1)            # S3 records an upload's start in whole seconds: make it older than 0 s
    try:
        repo.check()
        assert s3_uploads(repo) == []
        left = s3.client().list_multipart_uploads(Bucket=s3.bucket).get("Uploads", [])
        assert [u["Key"] for u in left] == ["elsewhere/x"]      # only under its own prefix
    finally:
        s3.client().abort_multipart_upload(Bucket=s3.bucket, Key="elsewhere/x", UploadId=other)


# ------------------------------------------------------------------------ specs


def test_validate_spec():
    assert validate_spec(RepositorySpec(name="local", path="/var/lib/dbplane/repo")) == []
    assert validate_spec(RepositorySpec(name="local", path="rel")) == [
        "path: 'rel' is not an absolute path"]
    problems = validate_spec(RepositorySpec(name="off", kind="s3", endpoint="ftp://x",
                                            bucket="", credentials_file="creds"))
    assert [p.split(":")[0] for p in problems] == ["endpoint", "bucket", "credentials_file"]
    assert validate_spec(RepositorySpec(name="off", kind="s3", endpoint="http://127.0.0.1:9000",
                                        bucket="backups", credentials_file="/etc/c")) == []


def test_open_repository(tmp_path, s3):
    r = open_repository(RepositorySpec(name="local", path=str(tmp_path)))
    assert isinstance(r, FilesystemRepository)
    r = open_repository(RepositorySpec(name="off", kind="s3", endpoint=s3.endpoint, bucket=s3.bucket,
                                       prefix="spec", credentials_file=str(s3.credentials_file)))
    assert isinstance(r, S3Repository) and r.describe() == f"s3://{s3.bucket}/spec at {s3.endpoint}"
    r.check()
    with pytest.raises(InvalidInput, match="endpoint"):
        open_repository(RepositorySpec(name="off", kind="s3", bucket="b", credentials_file="/c"))
