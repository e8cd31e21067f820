"""Continuous WAL archiving on a real platform: segments land in the repository
byte for byte (encrypted: no plaintext there), across a failover without a gap, and
after a repository outage or a killed backup worker the archive resumes without a gap."""

from __future__ import annotations

import os
import signal

import psycopg
import pytest

from dbplane.backup import wal
from dbplane.backup.archiver import wal_prefix
from dbplane.backup.objects import decode
from dbplane.backup.repository import open_repository
from dbplane.models import DatabaseSpec, KmsKey, PlatformConfig, RepositorySpec
from dbplane.process import running_pid
from dbplane.security import db_secrets
from dbplane.security.kms import Kms, load_root_key
from dbplane.store import keys
from platform_helpers import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", autouse=True)
def _cleanup(platform):
    yield
    platform.delete_all("ar-")

SEG = 16 * 1024 * 1024
DB = "ar-main"


class Archive:
    """The test's own view of a database's archive: the repository read directly."""

    def __init__(self, platform, db: str):
        gw = platform.etcd
        self.spec = DatabaseSpec.model_validate_json(gw.get(keys.database_spec(db)))
        config = PlatformConfig.model_validate_json(gw.get(keys.config()))
        self.repo = open_repository(RepositorySpec.model_validate_json(gw.get(keys.repository("local"))))
        self.kms = Kms(load_root_key(config.kms_root_file),
                       [KmsKey.model_validate_json(v) for v in gw.get_prefix(keys.kms_keys()).values()])
        self.prefix = wal_prefix(self.spec.archive_id)

    def names(self) -> set[str]:
        return {o.key.rsplit("/", 1)[1] for o in self.repo.list(self.prefix)}

    def read(self, name: str) -> bytes:
        return b"".join(decode(self.repo.open(self.prefix + name), self.kms.decrypt_data_key))

    def wait_for(self, name: str, timeout: float = 60) -> None:
        wait_for(lambda: name in self.names(), timeout, f"{name} in the archive")

    def assert_no_gap(self, upto_lsn: int, tli: int) -> None:
        """Every segment from the archive's first to `upto_lsn` is there, on the timeline
        recovery reads it from."""
        names = self.names()
        segments = sorted((wal.parse_segment_name(n.removesuffix(".partial"), SEG)[1], n)
                          for n in names if wal.SEGMENT_RE.match(n.removesuffix(".partial")))
        first = segments[0][0]
        history = wal.parse_history(self.read(wal.history_name(tli)).decode()) if tli > 1 else []
        needed = wal.needed_segments(first, upto_lsn, SEG, history, tli)
        assert wal.missing_segments(needed, names) == [], sorted(names)


def superuser(platform, db: str, role: str = "primary") -> psycopg.Connection:
    secrets = db_secrets.load_sync(platform.etcd, keys.secrets(db))
    m = platform.member(db, role)
    return psycopg.connect(host=m["address"], port=m["port"], user="postgres", dbname="postgres",
                           password=secrets.superuser, autocommit=True, connect_timeout=5)


def switch_wal(platform, db: str) -> tuple[str, int, int]:
    """Write a little, close the current segment; its name, its end and the timeline."""
    with superuser(platform, db) as c:
        c.execute("create table if not exists t (id serial primary key, note text)")
        c.execute("insert into t (note) select 'row ' || g from generate_series(1, 100) g")
        name, lsn = c.execute("select pg_walfile_name(pg_current_wal_lsn()), "
                              "pg_current_wal_lsn()::text").fetchone()
        end = wal.parse_lsn(c.execute("select pg_switch_wal()::text").fetchone()[0])
        tli = c.execute("select timeline_id from pg_control_checkpoint()").fetchone()[0]
    return name, max(end, wal.parse_lsn(lsn)), tli


@pytest.fixture(scope="module")
def archived(platform):
    platform.create(DB, "--multi-az", "--backups")
    return Archive(platform, DB)


def test_segments_are_archived_byte_for_byte_and_encrypted(platform, archived):
    marker = "archive-marker-5f1c2e"
    with superuser(platform, DB) as c:
        c.execute("create table secret (v text)")
        c.execute("insert into secret values (%s)", (marker * 10,))
    name, _, _ = switch_wal(platform, DB)
    archived.wait_for(name)
    primary = platform.member(DB, "primary")
    on_disk = (platform.layout.host_dir(primary["host"]) / "members" / primary["name"] / "data"
               / "pg_wal" / name).read_bytes()
    assert archived.read(name) == on_disk
    assert marker.encode() in on_disk
    for path in (platform.root / "backups").rglob("*"):
        if path.is_file():
            assert marker.encode() not in path.read_bytes(), path
    archive = wait_for(lambda: (a := platform.describe(DB)["backup"]["archive"]) and
                       a["state"] == "streaming" and a, 30, "archive status")
    assert archive["repository"] == "local" and archive["worker"].startswith("host-")
    assert archive["lag_bytes"] < 64 * SEG and archive["archived_lsn"]
    described = platform.cli("db", "describe", DB).stdout
    assert "archive    streaming" in described


def test_partial_segment_uploaded_within_archive_timeout(platform, archived):
    with superuser(platform, DB) as c:
        c.execute("insert into t (note) values ('partial')")
        name = c.execute("select pg_walfile_name(pg_current_wal_lsn())").fetchone()[0]
        lsn = wal.parse_lsn(c.execute("select pg_current_wal_lsn()::text").fetchone()[0])
    archived.wait_for(name + ".partial", timeout=30)
    status = wait_for(lambda: (a := platform.describe(DB)["backup"]["archive"]) and
                      wal.parse_lsn(a["archived_lsn"]) >= lsn and a, 30, "archived_lsn to move")
    assert status["lag_seconds"] < 30


def test_archive_continues_across_failover_without_gap(platform, archived):
    _, _, tli_before = switch_wal(platform, DB)
    platform.cli("db", "failover", DB, "--wait")
    platform.wait_available(DB)
    name, end, tli = switch_wal(platform, DB)
    assert tli > tli_before
    archived.wait_for(wal.history_name(tli))
    archived.wait_for(name)
    archived.assert_no_gap(end - 1, tli)


def test_archive_resumes_without_gap_after_repository_outage(platform, archived):
    backups = platform.root / "backups"
    mode = backups.stat().st_mode
    os.chmod(backups, 0o000)                    # the service account can no longer write
    try:
        name, _, _ = switch_wal(platform, DB)
        wait_for(lambda: (a := platform.describe(DB)["backup"]["archive"]) and a["error"], 60,
                 "the archive to report the outage")
        assert name not in archived.names()
    finally:
        os.chmod(backups, mode)
    archived.wait_for(name, timeout=90)
    name, end, tli = switch_wal(platform, DB)
    archived.wait_for(name, timeout=60)
    archived.assert_no_gap(end - 1, tli)
    assert wait_for(lambda: platform.describe(DB)["backup"]["archive"]["error"] == "", 30,
                    "the error to clear")


def test_killed_backup_worker_is_replaced_without_gap(platform, archived):
    holder = platform.etcd.get(keys.archive_lock(DB)).decode()
    pid = running_pid(platform.layout.host_dir(holder) / "backup.pid")
    assert pid, f"no backup worker runs on {holder}"
    os.kill(pid, signal.SIGKILL)
    name, end, tli = switch_wal(platform, DB)
    archived.wait_for(name, timeout=90)
    archived.assert_no_gap(end - 1, tli)


def test_backups_off_at_create_then_on(platform):
    platform.cli("db", "create", "ar-off", "--class", "micro", "--no-backups", "--wait")
    d = platform.describe("ar-off")
    assert d["backup"]["settings"]["enabled"] is False and d["backup"]["archive"] is None
    assert "backups    off" in platform.cli("db", "describe", "ar-off").stdout
    r = platform.cli("snapshot", "create", "ar-off", check=False)
    assert r.returncode == 1 and "(backups_disabled)" in r.stderr
    assert slots(platform, "ar-off") == []          # nothing holds WAL on the primary
    platform.cli("backup", "modify", "ar-off", "--enable")
    wait_for(lambda: (a := platform.describe("ar-off")["backup"]["archive"]) and a["state"] == "streaming",
             60, "the archive to start once backups are on")
    assert slots(platform, "ar-off") == ["dbplane_archive"]
    platform.cli("backup", "modify", "ar-off", "--disable")
    wait_for(lambda: slots(platform, "ar-off") == [], 60, "the archive slot to be dropped")


def slots(platform, db: str) -> list[str]:
    with superuser(platform, db) as c:
        return [r[0] for r in c.execute("select slot_name from pg_replication_slots "
                                        "where slot_type = 'physical' and slot_name like 'dbplane%'")]
