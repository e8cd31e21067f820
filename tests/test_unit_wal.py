"""WAL positions, segment names, timeline histories and which segments a recovery
needs; the archiver's resume point over a real filesystem repository."""

from __future__ import annotations

import pytest

from dbplane.backup import wal
from dbplane.backup.archiver import ResumePoint, resume_point
from dbplane.backup.fs_repository import FilesystemRepository

pytestmark = pytest.mark.unit

SEG = 16 * 1024 * 1024


def test_lsn_round_trip():
    assert wal.parse_lsn("16/B374D848") == 0x16B374D848
    assert wal.format_lsn(0x16B374D848) == "16/B374D848"
    assert wal.format_lsn(0) == "0/0"


def test_segment_names_match_postgres():
    # 0/3000028 on timeline 1 is in 000000010000000000000003; 1/0 starts log 1
    assert wal.segment_name(1, wal.parse_lsn("0/3000028"), SEG) == "000000010000000000000003"
    assert wal.segment_name(2, wal.parse_lsn("1/FF000000"), SEG) == "0000000200000001000000FF"
    assert wal.parse_segment_name("0000000200000001000000FF", SEG) == (2, wal.parse_lsn("1/FF000000"))
    with pytest.raises(ValueError):
        wal.parse_segment_name("00000002.history", SEG)


def test_history_and_timeline_of():
    text = "1\t0/5000098\tno recovery target specified\n\n2\t0/9000000\tno recovery target specified\n"
    history = wal.parse_history(text)
    assert history == [wal.Switch(1, 0x5000098), wal.Switch(2, 0x9000000)]
    assert wal.timeline_of(0x5000097, history, 3) == 1
    assert wal.timeline_of(0x5000098, history, 3) == 2
    assert wal.timeline_of(0x9000000, history, 3) == 3


def test_needed_segments_take_the_new_timeline_for_the_switch_segment():
    history = [wal.Switch(1, 0x5000098)]
    names = wal.needed_segments(0x3000000, 0x6000010, SEG, history, 2)
    assert names == ["000000010000000000000003", "000000010000000000000004",
                     "000000020000000000000005", "000000020000000000000006"]


def test_missing_segments_accepts_only_a_last_partial():
    needed = ["000000010000000000000003", "000000010000000000000004"]
    assert wal.missing_segments(needed, {"000000010000000000000003",
                                         "000000010000000000000004.partial"}) == []
    assert wal.missing_segments(needed, {"000000010000000000000003.partial",
                                         "000000010000000000000004"}) == ["000000010000000000000003"]
    assert wal.missing_segments(needed, set()) == needed


def test_resume_point(tmp_path):
    repo = FilesystemRepository("t", str(tmp_path))
    assert resume_point(repo, "db-1", SEG) is None
    repo.put_bytes("db-1/wal/000000010000000000000003", b"x")
    repo.put_bytes("db-1/wal/000000010000000000000004.partial", b"x")
    # the partial segment is streamed again from its start
    assert resume_point(repo, "db-1", SEG) == ResumePoint(1, 0x4000000)
    # after a failover: timeline 1's last segment stays partial; timeline 2 holds it whole
    repo.put_bytes("db-1/wal/00000002.history", b"x")
    repo.put_bytes("db-1/wal/000000020000000000000004", b"x")
    assert resume_point(repo, "db-1", SEG) == ResumePoint(2, 0x5000000)
    # another database's archive is not looked at
    repo.put_bytes("db-10/wal/000000050000000000000009", b"x")
    assert resume_point(repo, "db-1", SEG) == ResumePoint(2, 0x5000000)
