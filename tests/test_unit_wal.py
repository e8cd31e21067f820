"""WAL positions, segment names, timeline histories and which segments a recovery
needs; the archiver's resume point and the restore prefetcher over a real filesystem
repository."""

from __future__ import annotations

import os

import pytest

from dbplane.backup import wal
from dbplane.backup.archiver import ResumePoint, resume_point
from dbplane.backup.fs_repository import FilesystemRepository
from dbplane.backup.objects import encode
from dbplane.backup.prefetch import Plan, Prefetcher
from dbplane.models import RepositorySpec
from dbplane.security.kms import Kms, new_key

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


def test_prefetcher_follows_a_partial_segment_completed_after_its_listing(tmp_path):
    """The archive replaces a .partial by the whole segment while a restore runs: the
    prefetcher's listing is stale, and it must fetch the whole segment, not fail."""
    root = os.urandom(32)
    key = new_key(root, alias="alias/test")
    kms = Kms(root, [key])
    (tmp_path / "repo").mkdir()
    repo = FilesystemRepository("t", str(tmp_path / "repo"))

    def put(name: str, data: bytes) -> None:
        dk = kms.generate_data_key("alias/test")
        repo.put(f"db-1/wal/{name}", encode([data], data_key=dk.plaintext, wrapped_key=dk.wrapped,
                                            key_id=dk.key_id, key_version=dk.key_version))
    seg = "000000010000000000000003"
    put(seg + ".partial", b"a" * 100)
    spool = tmp_path / "spool"
    spool.mkdir()
    plan = Plan(etcd="http://127.0.0.1:1", database="db", kms_root_file="",
                repository=RepositorySpec(name="t", path=str(tmp_path / "repo")),
                sources=["db-1/wal/"], spool=str(spool))
    prefetcher = Prefetcher(plan, repo, kms)
    prefetcher.refresh()
    put(seg, b"b" * SEG)                               # the segment is complete now ...
    repo.delete(f"db-1/wal/{seg}.partial")             # ... and its .partial is gone
    prefetcher.fetch(seg, prefetcher.index[seg + ".partial"])
    assert (spool / seg).read_bytes() == b"b" * SEG
