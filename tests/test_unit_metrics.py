"""The metric catalogue's conventions, the history store (write, query, steps, rollup,
expiry, restart, size bound, full disk, corrupt files), the Prometheus exposition (parsed
back with prometheus_client) and the terminal sparkline."""

from __future__ import annotations

import logging
import math
import re
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dbplane.cli.sparkline import BLOCKS, resample, series_sparkline, sparkline
from dbplane.errors import DbplaneError, InvalidInput
from dbplane.metrics import catalog, exposition, history
from dbplane.metrics.catalog import METRICS, Sample
from dbplane.metrics.history import HistoryBusy, HistoryReader, HistoryWriter, Retention

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
T0 = 1_700_000_000 // 3600 * 3600          # an hour boundary, so rollup buckets line up with the test data
MEMBER_LABELS = {"database": "orders", "member": "orders-1", "role": "primary", "zone": "a"}


# -- the catalogue ------------------------------------------------------------------------------

def test_catalogue_names_follow_prometheus_conventions():
    names = [m.name for m in METRICS]
    assert len(names) == len(set(names)), "duplicate metric names"
    for m in METRICS:
        assert re.fullmatch(r"dbplane_[a-z][a-z0-9_]*[a-z0-9]", m.name), m.name
        assert "__" not in m.name, m.name
        assert m.type in ("gauge", "counter"), m.name
        assert m.name.endswith("_total") == (m.type == "counter"), f"{m.name}: _total exactly on counters"
        # base units only: no milli-, kilo-, percent
        assert not re.search(r"_(milli|micro|kilo|mega|ms|kb|mb|gb|percent|pct)", m.name), m.name
        if m.unit == "ratio":
            assert m.type == "gauge", m.name
        assert m.help and "\n" not in m.help and "|" not in m.help + m.source, m.name
        assert (m.help[0].isupper() or m.help[0].isdigit()) and m.help.endswith("."), m.name
        assert m.labels and len(set(m.labels)) == len(m.labels), m.name
        assert set(m.labels) <= set(catalog.LABELS), f"{m.name}: undeclared label"
        # the location labels every metric of its kind carries
        assert set(m.labels) >= {"database"} or set(m.labels) >= {"host", "zone"}, m.name
        if "member" in m.labels:
            assert set(m.labels) >= set(catalog.MEMBER), m.name
    # a counter's family name (without _total) must not be another metric's name
    assert not {m.name.removesuffix("_total") for m in METRICS if m.type == "counter"} & set(names)
    for label in catalog.LABELS:
        assert re.fullmatch(r"[a-z][a-z0-9_]*", label) and not label.startswith("__")


def test_catalogue_covers_what_the_observability_issue_lists():
    wanted = ["dbplane_pg_xact_commit_total", "dbplane_pg_xact_rollback_total",
              "dbplane_pg_blocks_read_total", "dbplane_pg_blocks_hit_total",
              "dbplane_pg_tuples_returned_total", "dbplane_pg_deadlocks_total",
              "dbplane_pg_temp_bytes_total", "dbplane_pg_conflicts_total", "dbplane_pg_connections",
              "dbplane_pg_max_connections", "dbplane_pg_replication_lag_bytes",
              "dbplane_pg_replication_lag_seconds", "dbplane_pg_wal_bytes_total",
              "dbplane_pg_checkpoints_timed_total", "dbplane_pg_locks_waiting",
              "dbplane_pg_database_size_bytes", "dbplane_pg_statements_calls_total",
              "dbplane_host_cpu_usage_ratio", "dbplane_host_memory_available_bytes",
              "dbplane_host_disk_free_bytes", "dbplane_host_disk_written_bytes_total",
              "dbplane_member_cpu_seconds_total", "dbplane_member_resident_memory_bytes",
              "dbplane_proxy_clients_waiting", "dbplane_proxy_servers_active",
              "dbplane_backup_last_success_age_seconds", "dbplane_archive_lag_bytes",
              "dbplane_archive_lag_seconds", "dbplane_member_up",
              "dbplane_collector_scrape_duration_seconds"]
    assert [n for n in wanted if n not in catalog.BY_NAME] == []
    assert "state" in catalog.get("dbplane_pg_connections").labels


def test_validate_refuses_what_the_catalogue_does_not_declare():
    assert catalog.validate(Sample("dbplane_member_up", MEMBER_LABELS, 1, T0)).type == "gauge"
    with pytest.raises(KeyError, match="unknown metric"):
        catalog.validate(Sample("dbplane_nope", {}, 1, T0))
    with pytest.raises(ValueError, match="no label host"):
        catalog.validate(Sample("dbplane_member_up", {**MEMBER_LABELS, "host": "h"}, 1, T0))
    with pytest.raises(ValueError, match="counter"):
        catalog.validate(Sample("dbplane_pg_deadlocks_total", MEMBER_LABELS, -1, T0))
    with pytest.raises(ValueError, match="not a number"):
        catalog.validate(Sample("dbplane_member_up", MEMBER_LABELS, "1", T0))  # type: ignore[arg-type]


def test_docs_reference_is_the_catalogue():
    doc = (ROOT / "docs" / "observability.md").read_text()
    assert catalog.with_reference(doc) == doc, \
        "docs/observability.md is out of date: run .venv/bin/python -m dbplane.metrics --update-docs " \
        "docs/observability.md"
    for m in METRICS:
        assert f"`{m.name}`" in doc


# -- the history store -----------------------------------------------------------------------

class Clock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


def up(ts: float, value: float = 1.0, **labels: str) -> Sample:
    return Sample("dbplane_member_up", {**MEMBER_LABELS, **labels}, value, ts)


def conns(ts: float, value: float, state: str = "active") -> Sample:
    return Sample("dbplane_pg_connections", {**MEMBER_LABELS, "state": state}, value, ts)


def writer(tmp_path: Path, clock: Clock | None = None, **retention) -> HistoryWriter:
    clock = clock or Clock(T0 + 10 * 86400)
    return HistoryWriter(tmp_path / "history.db", Retention(**retention), clock=clock)


def fill(w: HistoryWriter, start: int, end: int, every: int = 10, value=lambda ts: float(ts % 100)) -> None:
    """One sample per `every` seconds of dbplane_member_up for orders-1, one write each."""
    for ts in range(start, end, every):
        assert w.write([up(ts, value(ts))]) == 1


def test_write_and_query_raw_points(tmp_path):
    with writer(tmp_path) as w:
        assert w.write([conns(T0, 3), conns(T0, 1, "idle"), conns(T0 + 10, 4), conns(T0 + 10, 2, "idle"),
                        up(T0, 1), up(T0, 0, member="orders-2")]) == 6
        got = w.query("dbplane_pg_connections", since=T0, until=T0 + 60)
        assert [(s.labels["state"], s.points) for s in got] == [
            ("active", [(T0, 3.0), (T0 + 10, 4.0)]), ("idle", [(T0, 1.0), (T0 + 10, 2.0)])]
        # label matchers, time bounds, series without points in the range left out
        assert [s.points for s in w.query("dbplane_pg_connections", {"state": "idle"},
                                          since=T0 + 5, until=T0 + 60)] == [[(T0 + 10, 2.0)]]
        assert w.query("dbplane_pg_connections", since=T0 + 20, until=T0 + 60) == []
        assert [s.labels["member"] for s in w.query("dbplane_member_up", since=T0, until=T0)] == \
            ["orders-1", "orders-2"]
        assert w.query("dbplane_member_up", {"member": "orders-9"}, since=T0, until=T0 + 60) == []


def test_query_with_step_averages_and_aggregates(tmp_path):
    with writer(tmp_path) as w:
        w.write([conns(T0 + s, v) for s, v in ((0, 1), (10, 3), (20, 5), (30, 7), (50, 100))])
        [s] = w.query("dbplane_pg_connections", since=T0, until=T0 + 60, step=30)
        assert s.points == [(T0, 3.0), (T0 + 30, 53.5)]
        [s] = w.query("dbplane_pg_connections", since=T0, until=T0 + 60, step=30, agg="max")
        assert s.points == [(T0, 5.0), (T0 + 30, 100.0)]
        [s] = w.query("dbplane_pg_connections", since=T0, until=T0 + 60, step=30, agg="min")
        assert s.points == [(T0, 1.0), (T0 + 30, 7.0)]
        with pytest.raises(ValueError):
            w.query("dbplane_pg_connections", since=T0, until=T0 + 60, step=0)


def test_refused_samples_and_last_value_wins(tmp_path):
    clock = Clock(T0)
    with writer(tmp_path, clock) as w:
        assert w.write([up(T0, math.nan), up(T0, math.inf), up(T0 + 3600)]) == 0   # not finite; far future
        assert w.write([up(T0 + 0.2, 1), up(T0 + 0.9, 0)]) == 2                      # same second: last wins
        assert w.query("dbplane_member_up", since=T0, until=T0)[0].points == [(T0, 0.0)]
        assert w.write([up(T0 - 86400 - 1)]) == 0                   # older than raw retention
        clock.now += 3600
        fill(w, T0 + 10, T0 + 3600)
        assert w.write([up(T0 + 300)]) == 0                         # its bucket is rolled up
        assert w.stats()["refused"] == 5


def test_rollup_then_raw_expiry_keeps_averages(tmp_path):
    clock = Clock(T0 + 3 * 3600)
    with writer(tmp_path, clock, raw_seconds=3600, rollup_seconds=4 * 3600) as w:
        fill(w, T0, T0 + 3 * 3600, value=lambda ts: float((ts - T0) // 10 % 30))   # 0..29 in each 5 minutes
        raw_floor = w._conn.execute("SELECT min(start) FROM chunk").fetchone()[0]
        # ~1 h of raw data, expired in whole buckets
        assert T0 + 2 * 3600 - 300 <= raw_floor <= T0 + 2 * 3600 and raw_floor % 300 == 0
        rollups = w._conn.execute("SELECT ts, avg, min, max, count FROM rollup ORDER BY ts").fetchall()
        assert rollups[0] == (T0, 14.5, 0.0, 29.0, 30)
        assert all(r[1:] == (14.5, 0.0, 29.0, 30) for r in rollups)
        # the last bucket is rolled up once it is ROLLUP_GRACE old; younger points wait in head
        assert rollups[-1][0] == T0 + 3 * 3600 - 600
        assert w._conn.execute("SELECT min(ts), count(*) FROM head").fetchone() == (T0 + 3 * 3600 - 300, 30)
        # one query over every tier: rollups where raw is gone, then chunks, then head
        [s] = w.query("dbplane_member_up", since=T0, until=T0 + 3 * 3600, step=1800)
        assert s.points == [(T0 + i * 1800, 14.5) for i in range(6)]
        [s] = w.query("dbplane_member_up", since=T0, until=T0 + 3 * 3600)
        assert s.points[0] == (T0, 14.5)                        # a rollup point: the bucket's average
        assert s.points[-1] == (T0 + 3 * 3600 - 10, 29.0)       # a raw point
        assert len(s.points) == (raw_floor - T0) // 300 + (T0 + 3 * 3600 - raw_floor) // 10
        assert [ts for ts, _ in s.points] == sorted({ts for ts, _ in s.points})
        # an unbounded range: lookups stay within the data (from the epoch at 5-minute steps
        # would be 5.7 million bucket lookups)
        [s] = w.query("dbplane_member_up", since=0, until=2**40, step=3600)
        assert [ts for ts, _ in s.points] == [T0, T0 + 3600, T0 + 7200]
        # a range inside one chunk
        [s] = w.query("dbplane_member_up", since=T0 + 3 * 3600 - 595, until=T0 + 3 * 3600 - 575)
        assert s.points == [(T0 + 3 * 3600 - 590, 1.0), (T0 + 3 * 3600 - 580, 2.0)]


def test_rollups_expire_and_catching_up_is_incremental(tmp_path):
    clock = Clock(T0 + 5 * 3600)
    with writer(tmp_path, clock, raw_seconds=3600, rollup_seconds=2 * 3600) as w:
        fill(w, T0, T0 + 5 * 3600, every=60)
        oldest_rollup = w._conn.execute("SELECT min(ts) FROM rollup").fetchone()[0]
        assert T0 + 5 * 3600 - 2 * 3600 - 300 <= oldest_rollup
        # two days later: the first write expires at most EXPIRY_SLICE per tier, not everything at once
        clock.now += 2 * 86400
        w.write([up(clock.now)])
        left = w._conn.execute("SELECT count(*) FROM rollup").fetchone()[0]
        assert 0 < left
        for i in range(1, 30):
            w.write([up(clock.now + i * 10)])
        day_ago = clock.now - 86400
        assert w._conn.execute("SELECT count(*) FROM rollup WHERE ts < ?", (day_ago,)).fetchone()[0] == 0
        assert w._conn.execute("SELECT count(*) FROM chunk WHERE start < ?", (day_ago,)).fetchone()[0] == 0


def test_a_gap_in_the_data_stays_a_gap(tmp_path):
    clock = Clock(T0 + 4 * 3600)
    with writer(tmp_path, clock, raw_seconds=3600) as w:
        fill(w, T0, T0 + 3600, value=lambda ts: 1.0)
        fill(w, T0 + 3 * 3600, T0 + 4 * 3600, value=lambda ts: 3.0)     # the collector was stopped for 2 h
        buckets = [r[0] for r in w._conn.execute("SELECT ts FROM rollup ORDER BY ts")]
        assert not [b for b in buckets if T0 + 3600 <= b < T0 + 3 * 3600]
        assert len(buckets) == 12 + 11                                     # the last bucket still in head
        [s] = w.query("dbplane_member_up", since=T0, until=T0 + 4 * 3600, step=1800)
        assert s.points == [(T0, 1.0), (T0 + 1800, 1.0), (T0 + 3 * 3600, 3.0), (T0 + 3 * 3600 + 1800, 3.0)]
        line = series_sparkline(s.points, T0, T0 + 4 * 3600, width=8)
        assert line == "▁▁    ██"


def test_threads_may_share_the_writer(tmp_path):
    with writer(tmp_path) as w:
        def work(member: str) -> None:      # within one bucket: no thread's samples arrive late
            for ts in range(T0, T0 + 300, 10):
                assert w.write([up(ts, 1, member=member)]) == 1
        threads = [threading.Thread(target=work, args=(f"m{i}",)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [len(s.points) for s in w.query("dbplane_member_up", since=T0, until=T0 + 600)] == [30] * 4


def test_history_survives_a_restart(tmp_path):
    clock = Clock(T0 + 2 * 3600)
    with writer(tmp_path, clock, raw_seconds=3600) as w:
        fill(w, T0, T0 + 3600)
        before = w.query("dbplane_member_up", since=T0, until=T0 + 7200)
        rolled = w.stats()["rolled_until"]
    with writer(tmp_path, clock, raw_seconds=3600) as w:
        assert w.query("dbplane_member_up", since=T0, until=T0 + 7200) == before
        assert w.stats()["rolled_until"] == rolled
        fill(w, T0 + 3600, T0 + 7200)
        counts = w._conn.execute("SELECT count(*), count(DISTINCT ts) FROM rollup").fetchone()
        assert counts[0] == counts[1] and counts[0] >= 22


def test_readers_in_other_processes_while_writing(tmp_path):
    with writer(tmp_path) as w:
        w.write([up(T0, 1), up(T0 + 10, 0)])
        with HistoryReader(w.path) as r:
            assert r.names() == ["dbplane_member_up"]
            [s] = r.query("dbplane_member_up", since=T0, until=T0 + 10)
            assert s.points == [(T0, 1.0), (T0 + 10, 0.0)]
        code = ("import sys; from dbplane.metrics.history import HistoryReader; "
                f"r = HistoryReader(sys.argv[1]); print(r.query('dbplane_member_up', since={T0}, "
                f"until={T0 + 10})[0].points)")
        out = subprocess.run([sys.executable, "-c", code, str(w.path)], capture_output=True, text=True,
                             check=True).stdout
        assert out.strip() == f"[({T0}, 1.0), ({T0 + 10}, 0.0)]"
        with pytest.raises(HistoryBusy, match="another process"):
            HistoryWriter(w.path)
    with pytest.raises(DbplaneError, match="no metric history"):
        HistoryReader(tmp_path / "missing.db")


def test_size_bound_drops_the_oldest_data_never_a_write(tmp_path):
    clock = Clock(T0 + 86400)
    bound = 256 * 1024
    with writer(tmp_path, clock, max_bytes=bound) as w:
        for ts in range(T0, T0 + 8 * 3600, 10):
            assert w.write([up(ts, 1, member=f"m{i}") for i in range(20)]) == 20
            assert w.path.stat().st_size + Path(f"{w.path}-wal").stat().st_size <= bound
        stats = w.stats()
        assert stats["dropped"] == 0 and stats["file_bytes"] + stats["wal_bytes"] <= bound
        assert stats["oldest"] > T0 + 3 * 3600                # the oldest hours are gone
        [s] = w.query("dbplane_member_up", {"member": "m7"}, since=T0 + 8 * 3600 - 60, until=T0 + 8 * 3600)
        assert len(s.points) == 6                             # the newest minute is all there


def test_full_disk_drops_oldest_and_retries(tmp_path, caplog):
    clock = Clock(T0 + 86400)
    with writer(tmp_path, clock) as w:
        for ts in range(T0, T0 + 1800, 10):
            w.write([up(ts, 1, member=f"m{i}") for i in range(20)])
        # the disk is full: not one page more (SQLite raises SQLITE_FULL as for ENOSPC)
        pages = w._conn.execute("PRAGMA page_count").fetchone()[0]
        assert w._conn.execute(f"PRAGMA max_page_count = {pages}").fetchone()[0] == pages
        with caplog.at_level(logging.INFO, logger="dbplane.metrics"):
            for ts in range(T0 + 1800, T0 + 3600, 10):
                assert w.write([up(ts, 1, member=f"m{i}") for i in range(20)]) == 20
        assert w._conn.execute("PRAGMA page_count").fetchone()[0] == pages
        assert w.stats()["oldest"] > T0
        assert "at its bound" in caplog.text
        # a batch that cannot fit even in an empty file is dropped and counted, not raised
        w._conn.execute("PRAGMA max_page_count = 1")
        huge = [Sample("dbplane_pg_connections", {**MEMBER_LABELS, "state": f"s{i}" * 50}, 1, T0 + 3600)
                for i in range(2000)]
        assert w.write(huge) == 0
        assert w.stats()["dropped"] == 2000
        w._conn.execute(f"PRAGMA max_page_count = {Retention().max_pages}")
        assert w.write([up(T0 + 3610)]) == 1


def test_corruption_found_while_writing_starts_a_new_file(tmp_path, monkeypatch, caplog):
    with writer(tmp_path) as w:
        w.write([up(T0)])
        real = w._insert

        def malformed(rows):
            monkeypatch.setattr(w, "_insert", real)      # once
            e = sqlite3.DatabaseError("database disk image is malformed")
            e.sqlite_errorcode = sqlite3.SQLITE_CORRUPT
            raise e
        monkeypatch.setattr(w, "_insert", malformed)
        with caplog.at_level(logging.WARNING, logger="dbplane.metrics"):
            assert w.write([up(T0 + 10)]) == 1
        assert "is unusable" in caplog.text
        assert [s.points for s in w.query("dbplane_member_up", since=T0, until=T0 + 10)] == [[(T0 + 10, 1.0)]]
    assert len(list(tmp_path.glob("history.db.corrupt-*"))) == 1


def test_a_lowered_bound_shrinks_the_file_on_open(tmp_path):
    clock = Clock(T0 + 86400)
    with writer(tmp_path, clock) as w:
        for ts in range(T0, T0 + 4 * 3600, 10):
            w.write([up(ts, 1, member=f"m{i}") for i in range(20)])
        big = w.path.stat().st_size
    assert big > 200 * 1024
    with writer(tmp_path, clock, max_bytes=128 * 1024) as w:
        assert w.path.stat().st_size <= 128 * 1024
        assert w.stats()["newest"] == T0 + 4 * 3600 - 10
        assert w.query("dbplane_member_up", since=T0 + 4 * 3600 - 10, until=T0 + 4 * 3600)


def test_a_corrupt_file_is_moved_aside(tmp_path, caplog):
    path = tmp_path / "history.db"
    path.write_bytes(b"this is not a database" * 1000)
    with caplog.at_level(logging.WARNING, logger="dbplane.metrics"):
        with writer(tmp_path) as w:
            assert w.write([up(T0)]) == 1
    [aside] = tmp_path.glob("history.db.corrupt-*")
    assert aside.read_bytes().startswith(b"this is not a database")
    assert "is unusable" in caplog.text and str(aside) in caplog.text

    # damage inside a valid file: the page checks find it
    with writer(tmp_path) as w:
        for ts in range(T0, T0 + 3600, 10):
            w.write([up(ts, 1, member=f"m{i}") for i in range(20)])
    with open(path, "r+b") as f:
        f.seek(8 * 4096)
        f.write(b"\xff" * 4096 * 4)
    with pytest.raises(DbplaneError, match="cannot read"), HistoryReader(path) as r:
        r.query("dbplane_member_up", since=T0, until=T0 + 3600)     # a reader only reports it
    assert not list(tmp_path.glob("history.db.corrupt-*"))[1:]
    with writer(tmp_path) as w:
        assert w.write([up(T0 + 3600)]) == 1
        assert w.stats()["series"] == 1
    assert len(list(tmp_path.glob("history.db.corrupt-*"))) == 2


def test_another_file_is_not_taken_for_history(tmp_path):
    path = tmp_path / "history.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    with writer(tmp_path) as w:
        assert w.write([up(T0)]) == 1
    assert len(list(tmp_path.glob("history.db.corrupt-*"))) == 1


def test_the_file_keeps_its_rollup_step(tmp_path):
    with writer(tmp_path, rollup_step=60) as w:
        assert w.rollup_step == 60
    with writer(tmp_path, rollup_step=300) as w:
        assert w.rollup_step == 60


def test_retention_is_validated():
    with pytest.raises(InvalidInput):
        Retention(rollup_step=120)
    with pytest.raises(InvalidInput):
        Retention(raw_seconds=3 * 86400, rollup_seconds=86400)
    with pytest.raises(InvalidInput):
        Retention(max_bytes=4096)
    assert Retention().max_pages * history.PAGE_SIZE + Retention().wal_bytes <= Retention().max_bytes


# -- the Prometheus exposition ---------------------------------------------------------------------

# a sample line as the 0.0.4 format defines it: name, optional {label="escaped value",...}, value
_PAIR = r'[a-z_][a-z0-9_]*="([^"\\\n]|\\["\\n])*"'
_VALUE = r"(NaN|[+-]Inf|-?[0-9]+(\.[0-9]+)?(e[+-]?[0-9]+)?)"
LINE = re.compile(rf"[a-z_][a-z0-9_]*(\{{{_PAIR}(,{_PAIR})*\}})? {_VALUE}")


def test_exposition_round_trips_through_prometheus_parser():
    tricky = 'a "quoted" \\ back\nslash ü'
    samples = [up(T0, 1), up(T0, 0, member="orders-2", zone="b"),
               conns(T0, 5), conns(T0, 2, "idle"),
               Sample("dbplane_pg_deadlocks_total", {**MEMBER_LABELS, "database": tricky}, 12345678901, T0),
               Sample("dbplane_host_cpu_usage_ratio", {"host": "host-a", "zone": "a"}, 0.125, T0),
               Sample("dbplane_archive_lag_seconds", {"database": "orders"}, math.inf, T0),
               Sample("dbplane_pg_replication_lag_seconds", MEMBER_LABELS, 1.5e-7, T0)]
    text = exposition.render(samples)
    for line in text.splitlines():
        assert line.startswith(("# HELP ", "# TYPE ")) or LINE.fullmatch(line), line
    assert text.endswith("\n") and str(T0) not in text                       # no timestamps
    assert text.count("# TYPE dbplane_member_up gauge") == 1
    assert "# TYPE dbplane_pg_deadlocks_total counter" in text
    assert 'database="a \\"quoted\\" \\\\ back\\nslash ü"' in text
    parsed = {(s.name, tuple(sorted(s.labels.items())), s.value)
              for family in text_string_to_metric_families(text) for s in family.samples}
    assert parsed == {(s.name, tuple(sorted(s.labels.items())), float(s.value)) for s in samples}
    types = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert types["dbplane_pg_deadlocks"] == "counter" and types["dbplane_member_up"] == "gauge"
    helps = {f.name: f.documentation for f in text_string_to_metric_families(text)}
    assert helps["dbplane_member_up"] == catalog.get("dbplane_member_up").help


def test_exposition_details():
    assert exposition.render([]) == ""
    text = exposition.render([up(T0, 1), up(T0 + 10, 0), Sample("dbplane_member_up", {
        **MEMBER_LABELS, "role": ""}, 1, T0)])
    # the same series twice: the last value; an empty label is no label
    assert 'dbplane_member_up{database="orders",member="orders-1",role="primary",zone="a"} 0\n' in text
    assert 'dbplane_member_up{database="orders",member="orders-1",zone="a"} 1\n' in text
    assert [exposition.format_value(v) for v in (math.nan, -math.inf, 3.0, 0.1, 2**60)] == \
        ["NaN", "-Inf", "3", "0.1", "1.152921504606847e+18"]
    assert exposition.escape_help("a\\b\nc") == "a\\\\b\\nc"
    with pytest.raises(KeyError):
        exposition.render([Sample("dbplane_unknown", {}, 1, T0)])


# -- sparklines ------------------------------------------------------------------------------

def test_sparkline_scales_and_shows_gaps():
    assert sparkline([0, 1, 2, 3, 4, 5, 6, 7]) == BLOCKS
    assert sparkline([1, None, 3, math.nan, 2]) == "▁ █ ▅"
    assert sparkline([5, 5, 5]) == "▁▁▁"
    assert sparkline([None, None]) == "  "
    assert sparkline([0, 50, 100, 150], lo=0, hi=100) == "▁▅██"


def test_series_sparkline_lays_time_out_evenly():
    points = [(T0 + t, float(t)) for t in (*range(0, 300, 10), *range(600, 900, 10))]
    cols = resample(points, T0, T0 + 900, 9)
    assert cols[:3] == [45.0, 145.0, 245.0] and cols[3:6] == [None, None, None]
    line = series_sparkline(points, T0, T0 + 900, width=9)
    assert line[3:6] == "   " and line[0] == "▁" and line[-1] == "█"
    with pytest.raises(ValueError):
        resample(points, T0, T0, 10)
