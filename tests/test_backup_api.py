"""Snapshots, backup settings and repositories through the CLI and the API: bad input and
refusals get a one-line error (CLI) or a status with a code (API) and change nothing; a
valid backup settings change shows at once without bumping the database's generation; a
repository is checked before it is recorded and never shows its credentials."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from dbplane.models import BackupRecord, DatabaseSpec
from dbplane.store import keys
from dbplane.store.gateway import Gateway
from platform_helpers import one_line_error
from s3_server import SECRET_KEY, free_port, s3_server_fixture, write_credentials

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", autouse=True)
def _cleanup(platform):
    yield
    platform.delete_all("bk-")

DB = "bk-api"
GHOST = "bk-ghost"           # a database that does not exist: its records are never touched


def api_error(resp, status: int, code: str) -> dict:
    assert resp.status_code == status, (resp.status_code, resp.text)
    err = resp.json()["error"]
    assert err["code"] == code, err
    return err


def etcd(platform) -> Gateway:
    return platform.etcd


def spec_of(platform, name: str) -> DatabaseSpec:
    return DatabaseSpec.model_validate_json(etcd(platform).get(keys.database_spec(name)))


def put_record(platform, **fields) -> BackupRecord:
    fields = {"database": GHOST, "archive_id": f"{GHOST}-1", "repository": "local", **fields}
    record = BackupRecord(**fields)
    etcd(platform).put(keys.backup(record.database, record.id), record.model_dump_json())
    return record


def get_record(platform, record: BackupRecord) -> BackupRecord | None:
    raw = etcd(platform).get(keys.backup(record.database, record.id))
    return BackupRecord.model_validate_json(raw) if raw else None


@pytest.fixture(scope="module")
def db(platform):
    platform.create(DB, "--backups")
    return DB


@pytest.fixture
def records(platform):
    """Catalog records of GHOST written straight into etcd; removed after the test."""
    written: list[BackupRecord] = []

    def put(**fields) -> BackupRecord:
        written.append(put_record(platform, **fields))
        return written[-1]
    yield put
    for r in written:
        etcd(platform).delete(keys.backup(r.database, r.id))


@pytest.fixture
def directory():
    """A directory the service account may enter (mkdtemp makes 0700 ones)."""
    path = Path(tempfile.mkdtemp(prefix="dbplane-repo-", dir="/var/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    yield from s3_server_fixture(tmp_path_factory)


# -- snapshots ---------------------------------------------------------------------------------

def test_snapshot_of_an_unknown_database(platform):
    one_line_error(platform.cli("snapshot", "create", "nosuchdb", check=False),
                   "database 'nosuchdb' not found", "dbplane db list", "(database_not_found)")
    api_error(platform.api.post("/v1/databases/nosuchdb/snapshots", json={}), 404, "database_not_found")


@pytest.mark.parametrize("bad_id", ["Upper", "9starts-with-digit", "under_score", "a" * 64, ""])
def test_bad_snapshot_id(platform, db, bad_id):
    api_error(platform.api.post(f"/v1/databases/{db}/snapshots", json={"id": bad_id}), 400,
              "invalid_snapshot_id")
    if bad_id:
        one_line_error(platform.cli("snapshot", "create", db, "--id", bad_id, check=False),
                       f"invalid snapshot id '{bad_id}'", "starting with a letter", "(invalid_snapshot_id)")
        assert platform.api.get(f"/v1/snapshots/{bad_id}").status_code == 404


def test_snapshot_create_and_duplicates(platform, db, records):
    before = spec_of(platform, db).generation
    s = platform.cli_json("snapshot", "create", db, "--id", "bk-api-snap1")
    assert s["id"] == "bk-api-snap1" and s["database"] == db and s["type"] == "manual"
    assert s["manual"] is True and s["kind"] == "full" and s["state"] == "pending"
    assert s["archive_id"] == spec_of(platform, db).archive_id and s["repository"] == "local"
    assert platform.api.get("/v1/snapshots/bk-api-snap1").json()["database"] == db
    one_line_error(platform.cli("snapshot", "create", db, "--id", "bk-api-snap1", check=False),
                   "snapshot bk-api-snap1 already exists", "(snapshot_exists)")
    # ids are unique across databases, automated backups included
    taken = records(id="bk-ghost-taken", manual=False, state="available")
    api_error(platform.api.post(f"/v1/databases/{db}/snapshots", json={"id": taken.id}), 409,
              "snapshot_exists")
    assert get_record(platform, taken).database == GHOST
    # the default id: the database's name and the UTC time
    d = platform.api.post(f"/v1/databases/{db}/snapshots", json={})
    assert d.status_code == 202, d.text
    assert d.json()["id"].startswith(f"{db}-20") and len(d.json()["id"]) == len(db) + 15
    assert spec_of(platform, db).generation == before


def test_snapshot_of_a_database_never_available(platform):
    r = platform.api.post("/v1/databases", json={"name": "bk-new", "class": "micro"})
    assert r.status_code == 202, r.text
    try:
        err = api_error(platform.api.post("/v1/databases/bk-new/snapshots", json={}), 409,
                        "database_not_available")
        assert "dbplane db describe bk-new" in err["hint"]
    finally:
        platform.api.delete("/v1/databases/bk-new")
    r = platform.api.post("/v1/databases/bk-new/snapshots", json={})   # unless already gone
    assert (r.status_code, r.json()["error"]["code"]) in ((409, "database_deleting"),
                                                         (404, "database_not_found")), r.text


def test_snapshot_not_found(platform):
    one_line_error(platform.cli("snapshot", "describe", "bk-nope", check=False),
                   "snapshot 'bk-nope' not found", "dbplane snapshot list", "(snapshot_not_found)")
    one_line_error(platform.cli("snapshot", "delete", "bk-nope", check=False), "(snapshot_not_found)")
    api_error(platform.api.get("/v1/snapshots/bk-nope"), 404, "snapshot_not_found")
    api_error(platform.api.delete("/v1/snapshots/bk-nope"), 404, "snapshot_not_found")


def test_delete_refusals(platform, records):
    auto = records(id="bk-ghost-auto", manual=False, state="available")
    one_line_error(platform.cli("snapshot", "delete", auto.id, check=False),
                   "is an automated backup", "expire after the retention period",
                   f"dbplane backup modify {GHOST} --retention-days N", "(automated_backup)")
    api_error(platform.api.delete(f"/v1/snapshots/{auto.id}"), 409, "automated_backup")
    for state in ("pending", "running"):
        busy = records(id=f"bk-ghost-{state}", manual=True, state=state)
        one_line_error(platform.cli("snapshot", "delete", busy.id, check=False),
                       f"snapshot {busy.id} is {state}", "(snapshot_busy)")
        api_error(platform.api.delete(f"/v1/snapshots/{busy.id}"), 409, "snapshot_busy")
        assert get_record(platform, busy).state == state
    assert get_record(platform, auto).state == "available"


def test_delete_an_available_snapshot(platform, records):
    by_cli = records(id="bk-ghost-done1", manual=True, state="available")
    by_api = records(id="bk-ghost-done2", manual=True, state="available")
    out = platform.cli_json("snapshot", "delete", by_cli.id)
    assert out["state"] == "deleting" and out["type"] == "manual"
    r = platform.api.delete(f"/v1/snapshots/{by_api.id}")
    assert r.status_code == 202 and r.json()["state"] == "deleting"
    for rec in (by_cli, by_api):       # the housekeeper then removes it (files, then record)
        left = get_record(platform, rec)
        assert left is None or left.state == "deleting"
    assert platform.api.delete(f"/v1/snapshots/{by_api.id}").status_code in (202, 404)   # idempotent


def test_list_filters(platform, records):
    now = time.time()
    records(id="bk-ghost-old", manual=True, state="available", started_at=now - 300)
    records(id="bk-ghost-auto1", manual=False, state="available", started_at=now - 200)
    records(id="bk-ghost-new", manual=True, state="failed", started_at=now - 100, error="disk full")

    def ids(**params) -> list[str]:
        r = platform.api.get("/v1/snapshots", params=params)
        assert r.status_code == 200, r.text
        return [s["id"] for s in r.json()]
    assert ids(database=GHOST) == ["bk-ghost-new", "bk-ghost-auto1", "bk-ghost-old"]
    assert ids(database=GHOST, type="manual") == ["bk-ghost-new", "bk-ghost-old"]
    assert ids(database=GHOST, type="automated") == ["bk-ghost-auto1"]
    assert {"bk-ghost-new", "bk-ghost-auto1"} <= set(ids())
    assert ids(database="bk-none") == []
    api_error(platform.api.get("/v1/snapshots", params={"type": "weekly"}), 400, "invalid_input")

    rows = platform.cli_json("snapshot", "list", "--database", GHOST, "--type", "automated")
    assert [s["id"] for s in rows] == ["bk-ghost-auto1"] and rows[0]["type"] == "automated"
    table = platform.cli("snapshot", "list", "-d", GHOST).stdout
    assert "bk-ghost-old" in table and "bk-ghost-auto1" in table and "automated" in table
    described = platform.cli("snapshot", "describe", "bk-ghost-new").stdout
    assert "failed" in described and "disk full" in described


def test_sizes_are_human_readable(platform, records):
    records(id="bk-ghost-big", manual=True, state="available", size_bytes=3 * 2**30 + 2**29,
            stored_bytes=700 * 2**20)
    table = platform.cli("snapshot", "list", "-d", GHOST).stdout
    assert "3.5 GB" in table and "700.0 MB" in table
    assert "3.5 GB of data, 700.0 MB stored" in platform.cli("snapshot", "describe", "bk-ghost-big").stdout


# -- backup settings ----------------------------------------------------------------------------

@pytest.mark.parametrize("args, body, status, code, fragment", [
    (["--retention-days", "0"], {"retention_days": 0}, 400, "invalid_input", "invalid retention_days 0"),
    (["--retention-days", "36"], {"retention_days": 36}, 400, "invalid_input", "invalid retention_days 36"),
    (["--window", "25:00-26:00"], {"window": "25:00-26:00"}, 400, "invalid_input",
     "invalid backup window '25:00-26:00'"),
    (["--window", "03:00"], {"window": "03:00"}, 400, "invalid_input", "HH:MM-HH:MM"),
    (["--repository", "bk-nowhere"], {"repository": "bk-nowhere"}, 404, "repository_not_found",
     "repository 'bk-nowhere' not found"),
    (["--copy-to", "bk-nowhere"], {"copy_to": "bk-nowhere"}, 404, "repository_not_found",
     "repository 'bk-nowhere' not found"),
    (["--copy-to", "local"], {"copy_to": "local"}, 400, "invalid_input", "invalid copy_to 'local'"),
    (["--kms-key", "alias/bk-nope"], {"kms_key": "alias/bk-nope"}, 404, "kms_key_not_found",
     "KMS key 'alias/bk-nope' not found"),
    ([], {}, 400, "nothing_to_modify", "nothing to modify"),
])
def test_backup_modify_refusals(platform, db, args, body, status, code, fragment):
    before = spec_of(platform, db)
    one_line_error(platform.cli("backup", "modify", db, *args, check=False), fragment, f"({code})")
    err = api_error(platform.api.patch(f"/v1/databases/{db}/backup", json=body), status, code)
    assert fragment in err["message"]
    assert spec_of(platform, db) == before


def test_backup_modify_reports_every_problem(platform, db):
    err = api_error(platform.api.patch(f"/v1/databases/{db}/backup",
                                       json={"retention_days": 99, "window": "x"}), 400, "invalid_input")
    assert "retention_days" in err["message"] and "backup window" in err["message"]
    assert "1 to 35" in err["hint"]
    api_error(platform.api.patch(f"/v1/databases/{db}/backup", json={"retention": 3}), 400,
              "invalid_input")
    api_error(platform.api.patch("/v1/databases/nosuchdb/backup", json={"retention_days": 3}), 404,
              "database_not_found")
    api_error(platform.api.get("/v1/databases/nosuchdb/backup"), 404, "database_not_found")


def test_backup_modify_refuses_a_disabled_key(platform, db):
    key = platform.cli_json("kms", "create-key", "--alias", "alias/test/bk-disabled")
    platform.cli("kms", "disable-key", key["id"])
    one_line_error(platform.cli("backup", "modify", db, "--kms-key", "alias/test/bk-disabled", check=False),
                   "is disabled", "(kms_key_disabled)")
    assert spec_of(platform, db).backup.kms_key == "alias/dbplane/backup"


def test_backup_modify_applies_without_a_new_generation(platform, db):
    before = spec_of(platform, db)
    out = platform.cli_json("backup", "modify", db, "--retention-days", "14", "--window", "03:00-04:00",
                            "--incremental-every-hours", "2", "--archive-timeout", "10")
    settings = out["settings"]
    assert settings["retention_days"] == 14 and settings["window"] == "03:00-04:00"
    assert settings["incremental_every_hours"] == 2 and settings["archive_timeout"] == 10
    assert settings["full_every_hours"] == before.backup.full_every_hours     # untouched
    described = platform.cli_json("backup", "describe", db)
    assert described["settings"] == settings and described["database"] == db
    assert isinstance(described["backups"], int)
    assert described["archive"] is None or described["archive"]["archive_id"] == before.archive_id
    after = spec_of(platform, db)
    assert after.generation == before.generation and after.backup.retention_days == 14
    assert after.model_copy(update={"backup": before.backup}) == before
    assert platform.describe(db)["pending_changes"] == []
    table = platform.cli("backup", "describe", db).stdout
    assert "retention_days" in table and "03:00-04:00" in table and "archive" in table
    # an empty window clears it; the settings are BackupSettings' own after a round trip
    platform.cli("backup", "modify", db, "--window", "", "--retention-days", "7", "-o", "json")
    assert spec_of(platform, db).backup.window == ""
    assert spec_of(platform, db).generation == before.generation


# -- repositories --------------------------------------------------------------------------------

def test_repository_create_refusals(platform, tmp_path):
    (tmp_path / "file").write_text("not a directory")
    cases = [
        (["--kind", "filesystem", "--path", "relative/dir"], "is not an absolute path", "invalid_input"),
        (["--kind", "filesystem"], "needs a directory path", "invalid_input"),
        (["--kind", "filesystem", "--path", "/var/tmp/bk-does-not-exist"],
         "directory /var/tmp/bk-does-not-exist does not exist", "repository_unavailable"),
        (["--kind", "filesystem", "--path", str(tmp_path / "file")], "is not a directory",
         "repository_unavailable"),
        (["--kind", "filesystem", "--path", "/var/tmp", "--bucket", "b"], "only s3 repositories",
         "invalid_input"),
        (["--kind", "s3", "--endpoint", "http://127.0.0.1:9", "--bucket", "bk-bucket",
          "--credentials-file", str(tmp_path / "absent")], "does not exist", "credentials_file_missing"),
        (["--kind", "s3", "--bucket", "Bad_Bucket", "--credentials-file", "creds"],
         "endpoint: an s3 repository needs an endpoint URL", "invalid_input"),
    ]
    for args, fragment, code in cases:
        one_line_error(platform.cli("repository", "create", "bk-bad", *args, check=False), fragment,
                       f"({code})")
    one_line_error(platform.cli("repository", "create", "B", "--kind", "filesystem", "--path", "/var/tmp",
                                check=False), "name: 'B' is not", "(invalid_input)")
    err = api_error(platform.api.post("/v1/repositories", json={
        "name": "bk-bad", "kind": "s3", "bucket": "Bad_Bucket", "credentials_file": "creds"}),
        400, "invalid_input")
    for field in ("endpoint:", "bucket:", "credentials_file:"):      # every problem at once
        assert field in err["message"]
    api_error(platform.api.post("/v1/repositories", json={"name": "bk-bad", "kind": "tape"}), 400,
              "invalid_input")
    api_error(platform.api.post("/v1/repositories", json={"name": "bk-bad", "path": "/var/tmp",
                                                          "secret": "x"}), 400, "invalid_input")
    api_error(platform.api.get("/v1/repositories/bk-bad"), 404, "repository_not_found")
    one_line_error(platform.cli("repository", "describe", "bk-bad", check=False), "(repository_not_found)")


def test_s3_repository_unreachable(platform, tmp_path):
    creds = write_credentials(tmp_path / "creds")
    endpoint = f"http://127.0.0.1:{free_port()}"                 # nothing listens there
    one_line_error(platform.cli("repository", "create", "bk-dead", "--kind", "s3", "--endpoint", endpoint,
                                "--bucket", "bk-bucket", "--credentials-file", str(creds), check=False),
                   f"cannot reach {endpoint}", "(repository_unavailable)")
    api_error(platform.api.post("/v1/repositories", json={
        "name": "bk-dead", "kind": "s3", "endpoint": endpoint, "bucket": "bk-bucket",
        "credentials_file": str(creds)}), 503, "repository_unavailable")
    assert platform.api.get("/v1/repositories/bk-dead").status_code == 404


def test_filesystem_repository_lifecycle(platform, directory):
    r = platform.cli_json("repository", "create", "bk-fs", "--kind", "filesystem", "--path", str(directory))
    assert r["name"] == "bk-fs" and r["kind"] == "filesystem" and r["path"] == str(directory)
    assert list(directory.iterdir()) == []            # nothing written there as root
    one_line_error(platform.cli("repository", "create", "bk-fs", "--kind", "filesystem", "--path",
                                str(directory), check=False), "already exists", "(repository_exists)")
    assert {"local", "bk-fs"} <= {x["name"] for x in platform.cli_json("repository", "list")}
    assert "bk-fs" in platform.cli("repository", "list").stdout
    described = platform.cli_json("repository", "describe", "bk-fs")
    assert described["used_by"] == [] and described["path"] == str(directory)
    deleted = platform.cli("repository", "delete", "bk-fs").stdout
    assert "deleted" in deleted and "kept" in deleted
    assert platform.api.get("/v1/repositories/bk-fs").status_code == 404
    assert directory.is_dir()


def test_local_repository_cannot_be_deleted(platform):
    one_line_error(platform.cli("repository", "delete", "local", check=False),
                   "default repository", "(repository_protected)")
    api_error(platform.api.delete("/v1/repositories/local"), 409, "repository_protected")
    assert platform.api.get("/v1/repositories/local").status_code == 200


def test_a_repository_in_use_cannot_be_deleted(platform, db, directory, records):
    if os.geteuid() == 0:                     # the backup workers would write into it
        import pwd
        account = pwd.getpwnam("dbplane")
        os.chown(directory, account.pw_uid, account.pw_gid)
    platform.cli("repository", "create", "bk-used", "--kind", "filesystem", "--path", str(directory))
    generation = spec_of(platform, db).generation
    # backups off: naming the repository is enough to hold it, without real copies landing there
    platform.cli("backup", "modify", db, "--copy-to", "bk-used", "--disable")
    try:
        one_line_error(platform.cli("repository", "delete", "bk-used", check=False),
                       f"database {db} (copies its backups into it)", "(repository_in_use)")
        api_error(platform.api.delete("/v1/repositories/bk-used"), 409, "repository_in_use")
        assert f"database {db} (copies its backups into it)" in \
            platform.cli_json("repository", "describe", "bk-used")["used_by"]
    finally:
        platform.cli("backup", "modify", db, "--copy-to", "", "--enable")
    assert spec_of(platform, db).backup.copy_to == "" and spec_of(platform, db).generation == generation
    snap = records(id="bk-ghost-in-used", manual=True, state="available", repository="bk-used")
    err = api_error(platform.api.delete("/v1/repositories/bk-used"), 409, "repository_in_use")
    assert f"snapshot {snap.id} of database {GHOST} (available)" in err["message"]
    etcd(platform).put(keys.backup(GHOST, snap.id),
                       snap.model_copy(update={"state": "expired"}).model_dump_json())
    # an expired backup no longer holds it: the repository can go (its files stay)
    assert platform.api.get("/v1/repositories/bk-used").json()["used_by"] == []
    assert platform.api.delete("/v1/repositories/bk-used").status_code == 200
    assert directory.is_dir()


def test_s3_repository_shows_no_secret(platform, s3):
    one_line_error(platform.cli("repository", "create", "bk-s3", "--kind", "s3", "--endpoint", s3.endpoint,
                                "--bucket", "bk-no-such-bucket", "--credentials-file",
                                str(s3.credentials_file), check=False),
                   "bucket bk-no-such-bucket does not exist", "(repository_unavailable)")
    r = platform.cli_json("repository", "create", "bk-s3", "--kind", "s3", "--endpoint", s3.endpoint,
                          "--bucket", s3.bucket, "--prefix", "bk-api", "--credentials-file",
                          str(s3.credentials_file))
    assert r["kind"] == "s3" and r["bucket"] == s3.bucket
    assert r["credentials_file"] == str(s3.credentials_file)
    outputs = [platform.cli("repository", "describe", "bk-s3").stdout,
               platform.cli("repository", "describe", "bk-s3", "-o", "json").stdout,
               platform.cli("repository", "list").stdout,
               platform.api.get("/v1/repositories").text, platform.api.get("/v1/repositories/bk-s3").text]
    for text in outputs:
        assert "bk-s3" in text and SECRET_KEY not in text and "dbplanetestkey" not in text
    assert f"s3://{s3.bucket}/bk-api at {s3.endpoint}" in outputs[0]
    assert str(s3.credentials_file) in outputs[0]
    platform.cli("repository", "delete", "bk-s3")
    assert platform.api.get("/v1/repositories/bk-s3").status_code == 404
