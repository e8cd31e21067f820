"""What makes backups trustworthy, on a real platform: no plaintext of the data in the
repository, damage found by verification (and such a backup refused for restores),
incremental chains restored with pg_combinebackup, key rotation that keeps old backups
restorable and a key that backups need refused for deletion, and retention that expires
old automated backups and the archived WAL only they needed."""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from dbplane.backup import wal
from dbplane.models import BackupRecord, DrillRecord
from dbplane.store import keys
from dbplane.system import SERVICE_ACCOUNT
from platform_helpers import wait_for
from s3_server import s3_server_fixture, write_credentials

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", autouse=True)
def _cleanup(platform):
    yield
    platform.delete_all("ig-")

DB = "ig-src"
MARKER = "plaintext-marker-7d3a91"
DAY = 86400.0


def restore(platform, name: str, *args: str, **kw):
    """`db restore` of a database the test only reads (no archive or backups of its own)."""
    return platform.cli("db", "restore", name, "--no-backups", *args, **kw)


def records(platform, db: str = DB) -> list[BackupRecord]:
    raw = platform.etcd.get_prefix(keys.backups(db)).values()
    return sorted((BackupRecord.model_validate_json(v) for v in raw), key=lambda b: b.started_at)


def put(platform, record: BackupRecord) -> None:
    platform.etcd.put(keys.backup(record.database, record.id), record.model_dump_json())


def backup_dir(platform, record: BackupRecord):
    return platform.root / "backups" / record.archive_id / "backups" / record.id


@pytest.fixture(scope="module")
def source(platform):
    platform.create(DB, "--backups")
    with platform.connect(DB) as c:
        c.execute("create table items (id serial primary key, note text)")
        c.execute("insert into items (note) select %s || g from generate_series(1, 2000) g", (MARKER,))
    wait_for(lambda: any(b.usable for b in records(platform)), 120, "the first automated backup")
    return DB


def test_repository_holds_no_plaintext(platform, source):
    platform.cli("snapshot", "create", source, "--id", "ig-plain", "--wait", timeout=300)
    files = [p for p in (platform.root / "backups").rglob("*") if p.is_file()]
    assert any(p.name == "base.tar" for p in files)
    for path in files:
        assert MARKER.encode() not in path.read_bytes(), path


def test_verification_finds_a_damaged_backup(platform, source):
    platform.cli("snapshot", "create", source, "--id", "ig-damaged", "--wait", timeout=300)
    ok = platform.cli("backup", "verify", "ig-damaged")
    assert "intact" in ok.stdout
    record = next(b for b in records(platform) if b.id == "ig-damaged")
    tar = backup_dir(platform, record) / "base.tar"
    data = bytearray(tar.read_bytes())
    data[len(data) // 2] ^= 0xFF                     # one flipped byte in the middle
    tar.write_bytes(bytes(data))
    r = platform.cli("backup", "verify", "ig-damaged", check=False)
    assert r.returncode == 1 and "(backup_corrupt)" in r.stderr and "failed authentication" in r.stderr
    assert any(e["kind"] == "backup-verify-failed" and "ig-damaged" in e["message"]
               for e in platform.cli_json("events", source))
    r = restore(platform, "ig-from-damaged", "--from-snapshot", "ig-damaged", check=False)
    assert r.returncode == 1 and "(snapshot_damaged)" in r.stderr


def test_incremental_chain_restore(platform, source):
    platform.cli("backup", "modify", source, "--incremental-every-hours", "0.0005")   # ~2 s
    try:
        inc = wait_for(lambda: next((b for b in records(platform) if b.kind == "incremental" and b.usable),
                                    None), 180, "an incremental backup")
    finally:
        platform.cli("backup", "modify", source, "--incremental-every-hours", "1")
    with platform.connect(source) as c:
        expected = c.execute("select count(*) from items").fetchone()[0]
    assert inc.parent and inc.size_bytes < next(b for b in records(platform) if b.id == inc.parent).size_bytes
    restore(platform, "ig-from-inc", "--from-snapshot", inc.id, "--class", "micro", "--wait",
                 timeout=600)
    with platform.connect("ig-from-inc") as c:
        assert c.execute("select count(*) from items").fetchone()[0] == expected
        marked = c.execute("select count(*) from items where note like %s", (MARKER + "%",)).fetchone()
        assert marked[0] == 2000


def test_key_rotation_keeps_old_backups_restorable_and_guards_deletion(platform, source):
    old = next(b for b in records(platform) if b.id == "ig-plain")
    platform.cli("kms", "rotate-key", "alias/dbplane/backup")
    platform.cli("snapshot", "create", source, "--id", "ig-rotated", "--wait", timeout=300)
    new = next(b for b in records(platform) if b.id == "ig-rotated")
    assert new.kms_key_id == old.kms_key_id and new.kms_key_version == old.kms_key_version + 1
    restore(platform, "ig-old-key", "--from-snapshot", "ig-plain", "--class", "micro",
                 "--wait", timeout=600)
    with platform.connect("ig-old-key") as c:
        assert c.execute("select count(*) from items").fetchone()[0] >= 2000
    r = platform.cli("kms", "schedule-key-deletion", old.kms_key_id, "--pending-window-days", "7",
                     check=False)
    assert r.returncode == 1 and "(kms_key_in_use)" in r.stderr


def test_retention_expires_old_backups_and_their_wal(platform, source):
    platform.cli("backup", "modify", source, "--full-every-hours", "0.0005")
    try:
        wait_for(lambda: len([b for b in records(platform) if b.kind == "full" and not b.manual
                              and b.usable]) >= 2, 180, "a second automated full backup")
    finally:
        platform.cli("backup", "modify", source, "--full-every-hours", "24", "--retention-days", "1")
    autos = [b for b in records(platform) if not b.manual and b.usable]
    oldest, anchor = autos[0], [b for b in autos if b.kind == "full"][1]
    # make them look days old: the oldest goes, the newest full one before the period stays
    now = time.time()
    for b, age in ((oldest, 3 * DAY), (anchor, 2 * DAY)):
        put(platform, b.model_copy(update={"started_at": now - age, "finished_at": now - age + 60,
                                           "consistent_at": now - age + 60}))
    old_dir = backup_dir(platform, oldest)
    wait_for(lambda: all(b.id != oldest.id for b in records(platform)) and not old_dir.exists(), 60,
             "the oldest backup to expire")
    assert any(b.id == anchor.id for b in records(platform))
    assert any(b.id == "ig-plain" for b in records(platform))          # snapshots stay
    cutoff = wal.segment_start(wal.parse_lsn(anchor.start_lsn), 16 * 1024 * 1024)

    def old_wal():
        archive = platform.root / "backups" / anchor.archive_id / "wal"
        names = [p.name.removesuffix(".partial") for p in archive.iterdir()]
        return [n for n in names
                if wal.SEGMENT_RE.match(n) and wal.parse_segment_name(n, 16 << 20)[1] < cutoff]
    wait_for(lambda: not old_wal(), 60, "archived WAL before the retained backup to go")
    assert any(e["kind"] == "backup-expired" for e in platform.cli_json("events", source))


def test_restore_drill_restores_checks_and_cleans_up(platform, source):
    """A drill restores the newest backup with a fingerprint to a scratch database, runs
    pg_amcheck and compares row counts, records the restore time, then deletes it."""
    gw = platform.etcd
    platform.cli("backup", "modify", source, "--drill-every-hours", "0.0003")
    try:
        drill = wait_for(lambda: next((DrillRecord.model_validate_json(v)
                                       for v in gw.get_prefix(keys.drills(source)).values()
                                       if DrillRecord.model_validate_json(v).state in ("passed", "failed")),
                                      None), 300, "a restore drill to finish")
    finally:
        platform.cli("backup", "modify", source, "--drill-every-hours", "24")
    assert drill.state == "passed", drill.error
    assert drill.restore_seconds and drill.restore_seconds > 0 and drill.tables_checked >= 1
    backup = next(b for b in records(platform) if b.id == drill.backup_id)
    assert backup.fingerprint.get("postgres.public.items", 0) >= 2000
    events = platform.cli_json("events", source)
    assert any(e["kind"] == "restore-drill-passed" and drill.backup_id in e["message"] for e in events)
    assert drill.id in [d["id"] for d in platform.cli_json("backup", "drills", source)]
    assert "last drill" in platform.cli("backup", "describe", source).stdout
    wait_for(lambda: platform.api.get(f"/v1/databases/{drill.scratch}").status_code == 404, 120,
             "the scratch database to be deleted")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    yield from s3_server_fixture(tmp_path_factory)


@pytest.fixture
def creds():
    """An S3 credentials file the backup workers (the service account) can read."""
    directory = Path(tempfile.mkdtemp(prefix="dbplane-s3-", dir="/var/tmp"))
    path = write_credentials(directory / "credentials")
    if os.geteuid() == 0:
        os.chmod(directory, 0o755)
        account = pwd.getpwnam(SERVICE_ACCOUNT)
        os.chown(path, account.pw_uid, account.pw_gid)
    yield path
    shutil.rmtree(directory, ignore_errors=True)


def test_copy_to_s3_repository_restores_without_the_original(platform, source, s3, creds):
    """The cross-region copy: a snapshot copied to an S3-compatible repository, encrypted
    again there, restores from the copy when the original repository lost it."""
    platform.cli("kms", "create-key", "--alias", "alias/test/far-away")
    platform.cli("repository", "create", "ig-far", "--kind", "s3", "--endpoint", s3.endpoint,
                 "--bucket", s3.bucket, "--prefix", "far", "--credentials-file", str(creds),
                 "--kms-key", "alias/test/far-away")
    copied = platform.cli_json("snapshot", "copy", "ig-plain", "--to-repository", "ig-far", "--wait",
                               timeout=300)
    assert "ig-far" in copied["copies"]
    client = s3.client()
    stored = [o["Key"] for o in client.list_objects_v2(Bucket=s3.bucket, Prefix="far/")["Contents"]]
    assert any(k.endswith("/ig-plain/base.tar") for k in stored)
    assert any(k.endswith("/ig-plain/backup.json") for k in stored)
    for key in stored:
        assert MARKER.encode() not in client.get_object(Bucket=s3.bucket, Key=key)["Body"].read()
    record = next(b for b in records(platform) if b.id == "ig-plain")
    original = backup_dir(platform, record)
    hidden = original.with_name(original.name + ".hidden")
    original.rename(hidden)                  # the original repository lost it
    try:
        r = restore(platform, "ig-from-far", "--from-snapshot", "ig-plain", "--class", "micro",
                         "--repository", "ig-far", "--wait", timeout=600)
        assert r.returncode == 0
        with platform.connect("ig-from-far") as c:
            assert c.execute("select count(*) from items where note like %s",
                             (MARKER + "%",)).fetchone()[0] == 2000
    finally:
        hidden.rename(original)
    uncopied = next(b for b in records(platform) if b.usable and "ig-far" not in b.copies)
    r = restore(platform, "ig-no-copy", "--from-snapshot", uncopied.id, "--repository", "ig-far",
                     check=False)
    assert r.returncode == 1 and "(no_copy)" in r.stderr
    # automatic copies: every backup of the database and its archived WAL follow
    platform.cli("backup", "modify", source, "--copy-to", "ig-far")
    try:
        wait_for(lambda: all("ig-far" in b.copies for b in records(platform) if b.usable), 180,
                 "every backup to be copied")
        wal_prefix = f"far/{record.archive_id}/wal/"
        wait_for(lambda: client.list_objects_v2(Bucket=s3.bucket, Prefix=wal_prefix).get("KeyCount", 0) > 0,
                 120, "archived WAL to be copied")
    finally:
        platform.cli("backup", "modify", source, "--copy-to", "")


def test_restore_with_a_disabled_key_fails_clearly(platform, source):
    """A backup whose key is disabled cannot be restored, and the restore says so."""
    platform.cli("kms", "create-key", "--alias", "alias/test/ig-own")
    platform.cli("backup", "modify", source, "--kms-key", "alias/test/ig-own")
    try:
        platform.cli("snapshot", "create", source, "--id", "ig-own-key", "--wait", timeout=300)
        platform.cli("kms", "disable-key", "alias/test/ig-own")
        r = restore(platform, "ig-key-off", "--from-snapshot", "ig-own-key", "--class", "micro",
                         "--wait", check=False, timeout=600)
        assert r.returncode == 1 and "is disabled" in r.stderr, r.stderr
        wait_for(lambda: platform.api.get("/v1/databases/ig-key-off").status_code == 404, 120,
                 "the failed restore to be rolled back")
    finally:
        platform.cli("kms", "enable-key", "alias/test/ig-own")
        platform.cli("backup", "modify", source, "--kms-key", "alias/dbplane/backup")
