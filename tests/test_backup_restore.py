"""Backups and restores as a user runs them: the automated first full backup, a manual
snapshot restored to a new database, point-in-time restore between two batches of
writes (exactly the first batch comes back), and refusals of bad restore requests."""

from __future__ import annotations

import time

import psycopg
import pytest

from dbplane.models import BackupRecord
from dbplane.security import db_secrets
from dbplane.store import keys
from platform_helpers import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", autouse=True)
def _cleanup(platform):
    yield
    platform.delete_all("rs-")

DB = "rs-src"


def restore(platform, name: str, *args: str, **kw):
    """`db restore` of a database the test only reads (no archive or backups of its own)."""
    return platform.cli("db", "restore", name, "--no-backups", *args, **kw)


def archived(platform, db: str, since: float, timeout: float = 60) -> None:
    """Wait until the restorable window reaches past `since`: what a restore --latest gets."""
    wait_for(lambda: (platform.describe(db)["backup"]["latest_restorable_time"] or 0) > since + 0.5,
             timeout, "the archive to hold the newest writes")


def rows(platform, db: str, table: str = "items") -> list[str]:
    with platform.connect(db) as c:
        return [r[0] for r in c.execute(f"select note from {table} order by id").fetchall()]


def insert(platform, db: str, notes: list[str]) -> None:
    with platform.connect(db) as c:
        c.execute("create table if not exists items (id serial primary key, note text)")
        for n in notes:
            c.execute("insert into items (note) values (%s)", (n,))


def backups(platform, db: str, state: str = "available") -> list[BackupRecord]:
    raw = platform.etcd.get_prefix(keys.backups(db)).values()
    return [b for b in (BackupRecord.model_validate_json(v) for v in raw) if b.state == state]


def assert_sealed(platform, db: str, same_as: str) -> None:
    """A restored database's passwords are its source's, sealed for its own key in etcd."""
    gw = platform.etcd
    raw = gw.get(keys.secrets(db))
    assert not db_secrets.is_plaintext(raw)
    assert db_secrets.load_sync(gw, keys.secrets(db)).superuser == \
        db_secrets.load_sync(gw, keys.secrets(same_as)).superuser


@pytest.fixture(scope="module")
def source(platform):
    platform.create(DB, "--multi-az", "--backups")   # backups are taken from the standby
    insert(platform, DB, ["first-1", "first-2"])
    # the first automated backup is taken as soon as the archive streams
    wait_for(lambda: backups(platform, DB), 120, "the first automated backup")
    return DB


def test_describe_shows_restorable_window(platform, source):
    d = wait_for(lambda: (b := platform.describe(source)["backup"]) and b["latest_restorable_time"] and b,
                 30, "a restorable window")
    assert d["earliest_restorable_time"] <= d["latest_restorable_time"] <= time.time() + 1
    assert "restorable" in platform.cli("db", "describe", source).stdout


def test_point_in_time_restore_returns_exactly_the_first_batch(platform, source):
    insert(platform, source, ["batch1-a", "batch1-b"])
    time.sleep(1.0)                      # a target time strictly between the two batches
    target = time.time()
    time.sleep(1.0)
    insert(platform, source, ["batch2-a", "batch2-b"])
    wait_for(lambda: platform.describe(source)["backup"]["latest_restorable_time"] > target + 1,
             60, "the archive to pass the target time")
    iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(target)) + f".{int(target % 1 * 1e6):06d}Z"
    restore(platform, "rs-pitr", "--from", source, "--to-time", iso, "--class", "micro",
                 "--wait", timeout=600)
    assert rows(platform, "rs-pitr") == ["first-1", "first-2", "batch1-a", "batch1-b"]
    with platform.connect("rs-pitr") as c:        # a new database: it takes writes
        c.execute("insert into items (note) values ('after-restore')")
    assert platform.describe("rs-pitr")["status"] == "available"
    # Patroni recovers with hot_standby off; that pending setting must not cost the restored
    # (Single-AZ) primary a restart, an outage, when a reload-only parameter changes later
    started = "select pg_postmaster_start_time()"
    with platform.connect_node("rs-pitr") as c:
        before = c.execute(started).fetchone()[0]
    op = platform.cli_json("db", "modify", "rs-pitr", "--param", "work_mem=8MB", "--wait")
    assert op["state"] == "succeeded" and platform.describe("rs-pitr")["pending_changes"] == []
    with platform.connect_node("rs-pitr") as c:
        assert c.execute("show work_mem").fetchone()[0] == "8MB"
        assert c.execute(started).fetchone()[0] == before


def test_snapshot_restore_to_multi_az(platform, source):
    insert(platform, source, ["before-snapshot"])
    platform.cli("snapshot", "create", source, "--id", "rs-snap-1", "--wait", timeout=300)
    insert(platform, source, ["after-snapshot"])
    platform.cli("db", "restore", "rs-from-snap", "--from-snapshot", "rs-snap-1", "--class", "micro",
                 "--multi-az", "--allow", "127.0.0.1", "--allow", "10.20.0.0/16", "--wait", timeout=600)
    assert [r["cidr"] for r in platform.describe("rs-from-snap")["allowlist"]] == \
        ["127.0.0.1/32", "10.20.0.0/16"]
    restored = rows(platform, "rs-from-snap")
    assert restored[-1] == "before-snapshot" and "after-snapshot" not in restored
    assert_sealed(platform, "rs-from-snap", same_as=source)
    # the standby is cloned from the restored primary and follows it synchronously
    wait_for(lambda: platform.member("rs-from-snap", "sync_standby")["state"] == "streaming", 120,
             "the restored database's synchronous standby")
    r = platform.cli("db", "restore", "rs-from-snap", "--from-snapshot", "rs-snap-1", check=False)
    assert r.returncode == 1 and "(database_exists)" in r.stderr


def test_delete_with_final_snapshot_keeps_a_restorable_snapshot(platform, source):
    platform.cli("db", "delete", "rs-from-snap", "--final-snapshot", "rs-final", "--wait", timeout=300)
    assert platform.api.get("/v1/databases/rs-from-snap").status_code == 404
    final = platform.cli_json("snapshot", "describe", "rs-final")
    assert final["state"] == "available" and final["type"] == "manual" and final["database"] == "rs-from-snap"
    # automated backups go with the database; the snapshot stays
    wait_for(lambda: [s["id"] for s in platform.cli_json("snapshot", "list", "--database", "rs-from-snap")]
             == ["rs-final"], 60, "only the final snapshot to be left")
    restore(platform, "rs-after-delete", "--from-snapshot", "rs-final", "--class", "micro",
                 "--wait", timeout=600)
    assert rows(platform, "rs-after-delete")[-1] == "before-snapshot"
    assert_sealed(platform, "rs-after-delete", same_as=source)     # from the backup's secrets.json


def test_latest_restore_has_everything_archived(platform, source):
    insert(platform, source, ["latest-marker"])
    archived(platform, source, time.time())
    restore(platform, "rs-latest", "--from", source, "--latest", "--class", "micro",
                 "--wait", timeout=600)
    assert "latest-marker" in rows(platform, "rs-latest")


def test_restore_replays_across_a_failover(platform, source):
    """The base backup is on one timeline, the target on the next: recovery follows the
    timeline history in the archive."""
    insert(platform, source, ["before-failover"])
    tli = platform.member(source, "primary")["timeline"]
    platform.cli("db", "failover", source, "--wait")
    platform.wait_available(source)
    insert(platform, source, ["after-failover"])
    archived(platform, source, time.time(), timeout=90)
    assert platform.describe(source)["backup"]["archive"]["timeline"] > tli
    restore(platform, "rs-after-fo", "--from", source, "--latest", "--class", "micro",
                 "--wait", timeout=600)
    restored = rows(platform, "rs-after-fo")
    assert restored[-2:] == ["before-failover", "after-failover"]


def test_restore_refuses_to_skip_a_gap_in_the_archive(platform):
    """A missing segment in the middle of the archive fails the restore, naming the gap,
    instead of ending recovery there as if the WAL ended."""
    platform.create("rs-gap", "--backups")
    insert(platform, "rs-gap", ["base"])
    wait_for(lambda: backups(platform, "rs-gap"), 120, "the first automated backup")
    secrets = db_secrets.load_sync(platform.etcd, keys.secrets("rs-gap"))
    names = []
    with psycopg.connect(host="127.0.0.1", port=platform.member("rs-gap", "primary")["port"], user="postgres",
                         dbname="postgres", password=secrets.superuser, autocommit=True) as c:
        for i in range(3):
            c.execute("insert into items (note) values (%s)", (f"gap-{i}",))
            names.append(c.execute("select pg_walfile_name(pg_current_wal_lsn())").fetchone()[0])
            c.execute("select pg_switch_wal()")
    archive = platform.root / "backups" / backups(platform, "rs-gap")[0].archive_id / "wal"
    wait_for(lambda: (archive / names[-1]).exists(), 60, "the last segment in the archive")
    (archive / names[1]).unlink()
    r = restore(platform, "rs-gap-r", "--from", "rs-gap", "--latest", "--class", "micro",
                     "--wait", check=False, timeout=600)
    assert r.returncode == 1 and f"WAL segment {names[1]} is missing from the archive" in r.stderr, r.stderr
    wait_for(lambda: platform.api.get("/v1/databases/rs-gap-r").status_code == 404, 120,
             "the failed restore to be rolled back")


@pytest.mark.parametrize("args, code", [
    (("--from", DB, "--to-time", "2001-01-01T00:00:00Z"), "restore_time_out_of_window"),
    (("--from-snapshot", "rs-no-such"), "snapshot_not_found"),
    (("--from", "rs-nothere", "--latest"), "database_not_found"),
    ((), "invalid_restore_source"),
    (("--from", DB), "invalid_restore_target"),
    (("--from", DB, "--to-time", "yesterday"), "invalid_time"),
    (("--from", DB, "--latest", "--allow", "10.0.0.300/8"), "invalid_cidr"),
])
def test_bad_restore_requests_are_refused(platform, source, args, code):
    r = restore(platform, "rs-bad", *args, check=False)
    assert r.returncode == 1 and f"({code})" in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1
    assert platform.api.get("/v1/databases/rs-bad").status_code == 404
