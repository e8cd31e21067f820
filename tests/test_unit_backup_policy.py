"""Backup policy (when backups are due, what expires, the restorable window, which chain a
restore uses) and the tar scanner that pulls the manifest out of pg_basebackup's stream."""

from __future__ import annotations

import io
import tarfile
from datetime import UTC, datetime

import pytest

from dbplane.backup.basebackup import TarScanner
from dbplane.controlplane.backups import (
    base_for,
    due_backup,
    expired,
    in_window,
    restorable_window,
    retry_after,
)
from dbplane.controlplane.drills import drill_candidate, drill_chain, scratch_name
from dbplane.models import ArchiveStatus, BackupRecord, BackupSettings, DatabaseSpec

pytestmark = pytest.mark.unit

H = 3600.0
DAY = 24 * H
NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC).timestamp()


def spec(**backup) -> DatabaseSpec:
    return DatabaseSpec(name="db", created_at=1000.0, backup=BackupSettings(**backup))


def rec(id_: str, started: float, kind: str = "full", state: str = "available", parent: str = "",
        manual: bool = False, **kw) -> BackupRecord:
    return BackupRecord(id=id_, database="db", archive_id="db-1000", repository="local", kind=kind,
                        parent=parent, state=state, manual=manual, started_at=started,
                        finished_at=started + 60, consistent_at=started + 60,
                        start_lsn="0/2000000", stop_lsn="0/3000000", **kw)


def test_window_wraps_midnight():
    at = datetime(2026, 11, 24, 23, 30, tzinfo=UTC).timestamp()
    assert in_window("", at)
    assert in_window("23:00-01:00", at) and not in_window("01:00-02:00", at)
    assert in_window("03:00-04:00", datetime(2026, 11, 24, 3, 0, tzinfo=UTC).timestamp())
    assert not in_window("03:00-04:00", datetime(2026, 11, 24, 4, 0, tzinfo=UTC).timestamp())


def test_first_backup_is_full_at_once_then_incremental_then_full_in_window():
    s = spec(full_every_hours=24, incremental_every_hours=1, window="11:00-13:00")
    assert due_backup(s, [], NOW, True) == ("full", "")
    full = rec("f1", NOW - 2 * H)
    assert due_backup(s, [full], NOW, True) == ("incremental", "f1")
    assert due_backup(s, [full], NOW, False) is None          # no WAL summaries: no incrementals
    inc = rec("i1", NOW - 0.5 * H, kind="incremental", parent="f1")
    assert due_backup(s, [full, inc], NOW, True) is None
    old_full = rec("f0", NOW - 25 * H)
    assert due_backup(s, [old_full], NOW, True) == ("full", "")
    assert due_backup(s, [old_full], NOW + 3 * H, True) == ("incremental", "f0")   # outside the window


def test_failures_back_off():
    failed = [rec("a", NOW - 30, state="failed"), rec("b", NOW - 20, state="failed")]
    assert retry_after(failed) == failed[-1].finished_at + 120
    assert due_backup(spec(), failed, NOW, True) is None
    assert retry_after([rec("ok", NOW - 10)]) == 0.0


def test_expiry_keeps_the_full_backup_the_retention_period_starts_from():
    s = spec(retention_days=1)
    f0, i0 = rec("f0", NOW - 3 * DAY), rec("i0", NOW - 2.9 * DAY, kind="incremental", parent="f0")
    f1, f2 = rec("f1", NOW - 2 * DAY), rec("f2", NOW - 0.5 * DAY)
    snap = rec("s0", NOW - 10 * DAY, manual=True)
    assert [b.id for b in expired(s, [f0, i0, f1, f2, snap], NOW)] == ["f0", "i0"]
    assert expired(s, [f2], NOW) == []                        # nothing older than the period
    # an incremental backup built on an expiring one goes with it, whenever it was taken
    late = rec("i9", NOW - 0.1 * DAY, kind="incremental", parent="f0")
    assert "i9" in [b.id for b in expired(s, [f0, i0, f1, f2, late], NOW)]


def test_restorable_window_and_chain():
    s = spec()
    f1 = rec("f1", NOW - 5 * H)
    i1 = rec("i1", NOW - 3 * H, kind="incremental", parent="f1")
    snap = rec("s1", NOW - 9 * H, manual=True)
    archive = ArchiveStatus(database="db", archive_id="db-1000", repository="local", state="streaming",
                            archived_lsn="0/5000000", lag_seconds=2.0, updated_at=NOW)
    assert restorable_window(s, [f1, i1, snap], archive) == (f1.consistent_at, NOW - 2.0)
    assert [b.id for b in base_for([f1, i1, snap], "db-1000", NOW - 1 * H)] == ["f1", "i1"]
    assert [b.id for b in base_for([f1, i1], "db-1000", NOW - 4 * H)] == ["f1"]
    assert base_for([f1], "db-1000", NOW - 6 * H) == []
    damaged = rec("f1", NOW - 5 * H, verify_error="base.tar: frame 3 failed authentication")
    assert restorable_window(s, [damaged], archive) is None


def test_tar_scanner_keeps_only_the_manifest():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in (("base/1/1234", b"x" * 70000), ("backup_manifest", b'{"WAL-Ranges": []}'),
                           ("global/pg_control", b"y" * 8192)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    scanner = TarScanner({"backup_manifest"})
    for i in range(0, len(data), 777):                # chunk edges fall anywhere
        scanner.feed(data[i:i + 777])
    assert scanner.found == {"backup_manifest": b'{"WAL-Ranges": []}'} and scanner.ended


def test_drill_takes_the_newest_fingerprinted_backup_and_its_chain():
    s = spec()
    f1 = rec("f1", NOW - 5 * H, fingerprint_lsn="0/3000100")
    i1 = rec("i1", NOW - 3 * H, kind="incremental", parent="f1", fingerprint_lsn="0/5000100")
    old = rec("f0", NOW - 1 * H)                       # no fingerprint: not drillable
    tip = drill_candidate(s, [f1, i1, old])
    assert tip.id == "i1" and drill_chain([f1, i1, old], tip) == ["f1", "i1"]
    assert drill_chain([i1], i1) is None               # its parent is gone
    assert len(scratch_name("x" * 42)) <= 42 and scratch_name("orders") == "orders-drill"
