"""Reading the metric history: series selection, the merge of the tiers, and averaging
into steps. Used by the writer's own queries and by `HistoryReader`, which other processes
(the CLI, the API) open read-only while the collector writes.

Which tier answers: raw points (packed chunks, then the unpacked newest points in `head`)
for as far back as raw data goes in the file; before that, rollup buckets. A rollup bucket
is returned only if it ends at or before the oldest raw point, so no time counts twice.
Every lookup is an index seek by (time, series): a query reads only its own series.
"""

from __future__ import annotations

import json
import math
import sqlite3
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from dbplane.errors import DbplaneError, NotFound

Aggregate = Literal["avg", "min", "max"]

# SQLite's primary result codes (the low byte of the extended code on the exception).
_CORRUPT_CODES = {sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB}


def error_code(e: sqlite3.Error) -> int:
    return (getattr(e, "sqlite_errorcode", 0) or 0) & 0xFF


def is_corrupt(e: sqlite3.Error) -> bool:
    return error_code(e) in _CORRUPT_CODES


@dataclass
class Series:
    name: str
    labels: dict[str, str]
    points: list[tuple[float, float]] = field(default_factory=list)   # (Unix seconds, value), oldest first


@dataclass
class _Acc:
    """What a step bucket has seen: raw points count 1 each, rollups their count."""
    total: float = 0.0
    count: int = 0
    low: float = math.inf
    high: float = -math.inf

    def add(self, avg: float, low: float, high: float, count: int) -> None:
        self.total += avg * count
        self.count += count
        self.low = min(self.low, low)
        self.high = max(self.high, high)

    def value(self, agg: Aggregate) -> float:
        return {"avg": self.total / self.count, "min": self.low, "max": self.high}[agg]


def pack(offsets: Sequence[int], values: Sequence[float]) -> bytes:
    """One series' points in one bucket: seconds from the bucket's start (uint16), then the
    values (float64), little-endian: 10 bytes a point."""
    n = len(offsets)
    return struct.pack(f"<{n}H{n}d", *offsets, *values)


def unpack(start: int, blob: bytes) -> list[tuple[int, float]]:
    n = len(blob) // 10
    fields = struct.unpack(f"<{n}H{n}d", blob)
    return [(start + off, v) for off, v in zip(fields[:n], fields[n:], strict=True)]


# Bucket starts from ? to ? by ?, each looked up by its primary key (time, series).
_BUCKETS = "WITH RECURSIVE b(t) AS (SELECT ? UNION ALL SELECT t + ? FROM b WHERE t + ? <= ?) "


def read_series(conn: sqlite3.Connection, rollup_step: int, name: str, match: dict[str, str],
                since: float, until: float, step: float | None, agg: Aggregate) -> list[Series]:
    """Every series of metric `name` whose labels include `match`, with its points in
    [since, until]; series without points there are left out."""
    if step is not None and step <= 0:
        raise ValueError("step must be positive")
    since, until = math.ceil(since), math.floor(until)
    matched = []
    candidates = conn.execute("SELECT id, labels FROM series WHERE name = ? ORDER BY labels", (name,))
    for sid, labels_json in candidates.fetchall():
        labels = json.loads(labels_json)
        if all(labels.get(k) == v for k, v in match.items()):
            matched.append((sid, labels))
    if not matched:
        return []
    edges = _Edges(*conn.execute(
        "SELECT (SELECT min(ts) FROM rollup), (SELECT max(ts) FROM rollup), (SELECT min(start) FROM chunk), "
        "(SELECT max(start) FROM chunk), (SELECT min(ts) FROM head)").fetchone())
    # head holds the last few minutes of every series, keyed by time: one scan serves them all
    head: dict[int, list[tuple]] = {sid: [] for sid, _ in matched}
    for sid, ts, value in conn.execute(
            "SELECT series, ts, value FROM head WHERE ts >= ? AND ts <= ? "
            "AND series IN (SELECT value FROM json_each(?)) ORDER BY ts",
            (since, until, json.dumps(list(head)))):
        head[sid].append((ts, value, value, value, 1))
    result = []
    for sid, labels in matched:
        rows = _stored_rows(conn, sid, rollup_step, edges, since, until) + head[sid]
        points = _bucketed(rows, step, agg) if step else [(ts, _pick(r, agg)) for ts, *r in rows]
        if points:
            result.append(Series(name, labels, points))
    return result


@dataclass(frozen=True)
class _Edges:
    """Where each tier begins and ends: bucket lookups stay inside them, so that a query from
    the epoch to the far future costs what the data costs."""
    rollup_min: int | None
    rollup_max: int | None
    chunk_min: int | None
    chunk_max: int | None
    head_min: int | None

    @property
    def raw_floor(self) -> int | None:
        """The oldest raw point: rollups answer only before it."""
        return self.chunk_min if self.chunk_min is not None else self.head_min


def _stored_rows(conn: sqlite3.Connection, sid: int, step: int, edges: _Edges, since: int,
                 until: int) -> list[tuple]:
    """(ts, avg, min, max, count) rows of one series from rollups and chunks, oldest first."""
    rows: list[tuple] = []
    if edges.rollup_min is not None:
        first = max(-(-since // step) * step, edges.rollup_min)      # buckets that start in the range
        floor = math.inf if edges.raw_floor is None else edges.raw_floor
        last = min(until, floor - step, edges.rollup_max)
        if first <= last:
            rows += conn.execute(_BUCKETS + "SELECT r.ts, r.avg, r.min, r.max, r.count FROM b "
                                 "JOIN rollup r ON r.ts = b.t AND r.series = ?",
                                 (first, step, step, last, sid)).fetchall()
    if edges.chunk_min is not None:
        first = max(since // step * step, edges.chunk_min)            # chunks that overlap the range
        for start, blob in conn.execute(_BUCKETS + "SELECT c.start, c.points FROM b "
                                        "JOIN chunk c ON c.start = b.t AND c.series = ?",
                                        (first, step, step, min(until, edges.chunk_max), sid)).fetchall():
            rows += [(ts, v, v, v, 1) for ts, v in unpack(start, blob) if since <= ts <= until]
    return rows


def _pick(row: list, agg: Aggregate) -> float:
    avg, low, high, _ = row
    return {"avg": avg, "min": low, "max": high}[agg]


def _bucketed(rows: list[tuple], step: float, agg: Aggregate) -> list[tuple[float, float]]:
    buckets: dict[float, _Acc] = {}
    for ts, avg, low, high, count in rows:
        start = math.floor(ts / step) * step
        buckets.setdefault(start, _Acc()).add(avg, low, high, count)
    return [(start, acc.value(agg)) for start, acc in sorted(buckets.items())]


def read_meta(conn: sqlite3.Connection) -> dict[str, str]:
    return {k: v for k, v in conn.execute("SELECT key, value FROM meta")}


class HistoryReader:
    """A read-only view of a history file, for processes other than its writer. Readers never
    block the writer (WAL mode) and never change the file, not even a corrupt one."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise NotFound(f"no metric history at {self.path}",
                           "the collector creates it on its first scrape: is it running?")
        self._conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, isolation_level=None,
                                     check_same_thread=False)
        self._conn.execute("PRAGMA busy_timeout = 5000")
        try:
            self.rollup_step = int(read_meta(self._conn)["rollup_step"])
        except (sqlite3.DatabaseError, KeyError) as e:
            self._conn.close()
            raise self._unreadable(e) from e

    def query(self, name: str, match: dict[str, str] | None = None, *, since: float, until: float,
              step: float | None = None, agg: Aggregate = "avg") -> list[Series]:
        try:
            return read_series(self._conn, self.rollup_step, name, match or {}, since, until, step, agg)
        except sqlite3.DatabaseError as e:
            raise self._unreadable(e) from e

    def names(self) -> list[str]:
        try:
            return [r[0] for r in self._conn.execute("SELECT DISTINCT name FROM series ORDER BY name")]
        except sqlite3.DatabaseError as e:
            raise self._unreadable(e) from e

    def _unreadable(self, e: Exception) -> DbplaneError:
        return DbplaneError(f"cannot read the metric history at {self.path}: {e}",
                            "the collector moves a corrupt file aside and starts anew when it restarts",
                            code="history_unreadable")

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> HistoryReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
