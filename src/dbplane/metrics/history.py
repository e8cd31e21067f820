"""The embedded metric history: a bounded time-series store in one SQLite file.

Layout (every table keyed by time first, so that writing, expiring and dropping touch the
ends of the B-trees, not one page per series: a scrape of 500 series writes a few pages):

- `head`: the newest raw points, one row each, until their rollup bucket is complete;
- `chunk`: raw points of one series and one bucket packed into a blob, kept `raw_seconds`
  (24 h);
- `rollup`: avg, min, max and count per series and bucket (`rollup_step`, 1 or 5 minutes),
  kept `rollup_seconds` (14 days).

Rolling up (head -> chunk + rollup, once a bucket is `ROLLUP_GRACE` old) and expiring run a
little after every write (a time budget, at most `EXPIRY_SLICE` per pass), so catching up
after a long stop never stalls the collector. A sample later than that for its bucket, older
than the raw retention or far ahead of the clock is refused and counted.

The file stays under `max_bytes`: above 90% of it the oldest data (whatever the tier) is
dropped until it is below 80%; a write that still finds it full (SQLITE_FULL, which a full
disk raises too) drops more and retries. A write never raises for a storage problem: what
cannot be stored is counted and logged. A file SQLite calls corrupt, or that is not a
history file of this version, is moved aside (`<name>.corrupt-<time>`, never deleted) and a
new one started, with a log line. "Now" is the newest sample written, so expiry follows the
data, not the wall clock.

Concurrency: one writer process per file (`HistoryWriter` holds an exclusive lock on
`<file>.lock` and refuses a second one); its threads may share it. Any number of other
processes may read at the same time with `HistoryReader` (WAL mode).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

from dbplane.errors import Conflict, DbplaneError, InvalidInput
from dbplane.metrics.catalog import Sample, canonical_labels
from dbplane.metrics.history_read import (
    Aggregate,
    HistoryReader,
    Series,
    error_code,
    is_corrupt,
    pack,
    read_meta,
    read_series,
)

__all__ = ["HistoryBusy", "HistoryReader", "HistoryWriter", "Retention", "Series"]

log = logging.getLogger("dbplane.metrics")

SCHEMA_VERSION = 1
PAGE_SIZE = 4096
CACHE_KIB = 16 * 1024     # the writer's page cache
FUTURE_SLACK = 300        # seconds ahead of the clock a sample may be (clock skew between hosts)
ROLLUP_GRACE = 60         # a bucket is rolled up this long after it ends, so that late scrapes count
EXPIRY_SLICE = 3600       # at most this much data per tier expired per pass
HIGH_WATER, LOW_WATER = 0.90, 0.80
MAINTENANCE_BUDGET = 0.05  # seconds of rollup/expiry work after each write
COMPLAIN_EVERY = 60.0     # seconds between repeated log lines about the same trouble

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE series (id INTEGER PRIMARY KEY, name TEXT NOT NULL, labels TEXT NOT NULL, UNIQUE (name, labels));
CREATE TABLE head (ts INTEGER NOT NULL, series INTEGER NOT NULL, value REAL NOT NULL,
                   PRIMARY KEY (ts, series)) WITHOUT ROWID;
CREATE TABLE chunk (start INTEGER NOT NULL, series INTEGER NOT NULL, points BLOB NOT NULL,
                    PRIMARY KEY (start, series)) WITHOUT ROWID;
CREATE TABLE rollup (ts INTEGER NOT NULL, series INTEGER NOT NULL, avg REAL NOT NULL, min REAL NOT NULL,
                     max REAL NOT NULL, count INTEGER NOT NULL, PRIMARY KEY (ts, series)) WITHOUT ROWID;
"""
TABLES = {"head": "ts", "chunk": "start", "rollup": "ts"}   # table -> its time column


@dataclass(frozen=True)
class Retention:
    raw_seconds: int = 24 * 3600
    rollup_seconds: int = 14 * 24 * 3600
    rollup_step: int = 300
    max_bytes: int = 256 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.rollup_step not in (60, 300):
            raise InvalidInput(f"rollup step {self.rollup_step} s is not supported", "use 60 or 300")
        if self.raw_seconds < self.rollup_step or self.rollup_seconds < self.raw_seconds:
            raise InvalidInput("retention must be rollup_step <= raw_seconds <= rollup_seconds",
                               f"got raw {self.raw_seconds} s, rollups {self.rollup_seconds} s")
        if self.max_bytes < 128 * 1024:
            raise InvalidInput(f"history bound {self.max_bytes} bytes is too small", "use at least 128 KiB")

    @property
    def wal_bytes(self) -> int:
        """The share of the bound left to the write-ahead log beside the file."""
        return min(4 * 1024 * 1024, self.max_bytes // 8)

    @property
    def max_pages(self) -> int:
        return (self.max_bytes - self.wal_bytes) // PAGE_SIZE


class HistoryBusy(Conflict):
    code = "history_busy"


class _Unusable(Exception):
    """The file is not a history file this code can use: quarantine it."""


class HistoryWriter:
    def __init__(self, path: str | Path, retention: Retention | None = None,
                 clock: Callable[[], float] = time.time):
        self.path = Path(path)
        self.retention = retention or Retention()
        self.clock = clock
        self.dropped = 0           # samples that could not be stored
        self.refused = 0           # samples refused: not finite, far future, too old or too late
        self._mutex = threading.RLock()
        self._complained: dict[str, float] = {}
        self._keys: dict[tuple, tuple[str, str]] = {}   # (name, label items) as given -> canonical key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_fd = self._take_lock()
        try:
            self._open()
        except BaseException:
            os.close(self._lock_fd)
            raise

    # -- opening ------------------------------------------------------------------------------

    def _take_lock(self) -> int:
        fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise HistoryBusy(f"another process writes the metric history {self.path}",
                              "one collector per history file: stop the other or use another file") from None
        return fd

    def _open(self) -> None:
        try:
            try:
                self._conn = self._connect()
            except _Unusable as why:
                self._quarantine(str(why))
                self._conn = self._connect()
        except (sqlite3.Error, OSError) as e:
            raise DbplaneError(f"cannot open the metric history {self.path}: {e}",
                               "check that the directory is writable and its file system has free space",
                               code="history_unavailable") from e
        rows = self._conn.execute("SELECT id, name, labels FROM series")
        self._series: dict[tuple[str, str], int] = {(name, labels): sid for sid, name, labels in rows}
        self._now = max((self._edge("max", t) or 0 for t in TABLES), default=0)
        last = self._edge("max", "rollup")
        self._rolled_until = None if last is None else last + self.rollup_step
        self._fit_bound()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA busy_timeout = 5000")
            # only takes effect on a new file: lets a lowered bound shrink the file (_fit_bound)
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
            conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
            conn.execute("PRAGMA journal_mode = WAL")
            # NORMAL in WAL mode: a power loss may lose the last transactions, never the file
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
            conn.execute(f"PRAGMA journal_size_limit = {self.retention.wal_bytes}")
            conn.execute(f"PRAGMA wal_autocheckpoint = {max(self.retention.wal_bytes // PAGE_SIZE, 1)}")
            check = conn.execute("PRAGMA quick_check(1)").fetchone()[0]
            if check != "ok":
                raise _Unusable(f"quick_check: {check}")
            self._ensure_schema(conn)
        except sqlite3.DatabaseError as e:
            conn.close()
            if is_corrupt(e):
                raise _Unusable(str(e)) from e
            raise
        except _Unusable:
            conn.close()
            raise
        return conn

    def _ensure_schema(self, conn: sqlite3.Connection) -> None:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables:
            conn.executescript("BEGIN;" + SCHEMA + "COMMIT;")
            meta = [("version", str(SCHEMA_VERSION)), ("rollup_step", str(self.retention.rollup_step))]
            conn.executemany("INSERT INTO meta VALUES (?, ?)", meta)
        elif "meta" not in tables:
            raise _Unusable("not a dbplane metric history file")
        meta = read_meta(conn)
        if meta.get("version") != str(SCHEMA_VERSION):
            raise _Unusable(f"history format {meta.get('version')}, this dbplane knows {SCHEMA_VERSION}")
        # the file keeps the step it was made with: its chunks and rollups are in that step
        self.rollup_step = int(meta["rollup_step"])
        if self.rollup_step != self.retention.rollup_step:
            log.info("metric history %s keeps its rollup step of %d s (configured: %d s)",
                     self.path, self.rollup_step, self.retention.rollup_step)

    def _quarantine(self, why: str) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 1
        while target.exists():
            n += 1
            target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
        os.replace(self.path, target)
        if Path(f"{self.path}-wal").exists():
            os.replace(f"{self.path}-wal", f"{target}-wal")
        Path(f"{self.path}-shm").unlink(missing_ok=True)   # only an index of the WAL: no data
        log.warning("metric history %s is unusable (%s): moved it to %s and started a new one",
                    self.path, why, target)

    def _fit_bound(self) -> None:
        """Apply the page limit; a file above it (the bound was lowered) first loses its oldest
        data and gives the freed pages back to the file system."""
        max_pages = self.retention.max_pages
        if self._page_count() > max_pages:
            while self._used_pages() > LOW_WATER * max_pages and self._drop_oldest():
                pass
            self._conn.executescript("PRAGMA incremental_vacuum;")   # execute() would free one page only
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")    # the file shrinks as the WAL is copied
        self._conn.execute(f"PRAGMA max_page_count = {max_pages}")

    # -- writing ------------------------------------------------------------------------------

    def write(self, samples: Iterable[Sample]) -> int:
        """Store `samples`; returns how many were stored. Never raises for a storage problem."""
        with self._mutex:
            rows = self._prepare(samples)
            if not rows:
                return 0
            stored = self._insert_making_room(rows)
            if stored:
                self._now = max(self._now, max(r[1] for r in rows))
            self._maintain()
            self._limit_wal()
            return stored

    def _prepare(self, samples: Iterable[Sample]) -> list[tuple[tuple[str, str], int, float]]:
        latest = self.clock() + FUTURE_SLACK
        earliest = max(self._now - self.retention.raw_seconds, self._rolled_until or 0)
        rows = []
        for s in samples:
            # whole seconds: the history serves charts and alarms, not sub-second analysis
            ts = math.floor(s.timestamp)
            if not math.isfinite(s.value) or not earliest <= ts <= latest:
                self.refused += 1
                continue
            rows.append((self._key(s), ts, float(s.value)))
        return rows

    def _key(self, s: Sample) -> tuple[str, str]:
        given = (s.name, tuple(s.labels.items()))
        key = self._keys.get(given)
        if key is None:
            key = self._keys[given] = (s.name, json.dumps(canonical_labels(s.labels), separators=(",", ":")))
        return key

    def _insert_making_room(self, rows: list[tuple[tuple[str, str], int, float]]) -> int:
        for _ in range(10):
            try:
                self._insert(rows)
                return len(rows)
            except sqlite3.Error as e:
                self._rollback()
                if error_code(e) == sqlite3.SQLITE_FULL and self._safely(self._drop_oldest):
                    continue
                if is_corrupt(e) and self._safely(self._restart_corrupt, e):
                    continue
                self._complain("write", "could not write %d samples to the metric history %s: %s",
                               len(rows), self.path, e)
                break
        self.dropped += len(rows)
        return 0

    def _insert(self, rows: list[tuple[tuple[str, str], int, float]]) -> None:
        new: dict[tuple[str, str], int] = {}
        self._conn.execute("BEGIN IMMEDIATE")
        values = []
        for key, ts, value in rows:
            sid = self._series.get(key) or new.get(key)
            if sid is None:
                sid = new[key] = self._conn.execute("INSERT INTO series (name, labels) VALUES (?, ?)",
                                                    key).lastrowid
            values.append((ts, sid, value))
        # the same series and second twice: the last value wins
        self._conn.executemany("INSERT OR REPLACE INTO head (ts, series, value) VALUES (?, ?, ?)", values)
        self._conn.execute("COMMIT")
        self._series.update(new)   # only now: ids from a rolled-back transaction do not exist

    def _rollback(self) -> None:
        with contextlib.suppress(sqlite3.Error):   # SQLite may have rolled back on its own
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")

    def _restart_corrupt(self, e: sqlite3.Error) -> None:
        self._conn.close()
        self._quarantine(str(e))
        self._open()

    # -- rollup, expiry, bound ------------------------------------------------------------------

    def _maintain(self) -> None:
        deadline = time.monotonic() + MAINTENANCE_BUDGET
        # each step on its own: a roll-up that failed for want of room must not stop the drop
        for step in (self._roll_up, self._expire, self._keep_under_bound):
            self._safely(step, deadline)

    def _safely(self, step: Callable, *args) -> bool:
        """Run a housekeeping step: False if it failed (logged, never raised to the writer) or
        had nothing to do (a step that says so returns False)."""
        try:
            return step(*args) is not False
        except (sqlite3.Error, OSError, DbplaneError) as e:
            self._rollback()
            self._complain(step.__name__, "metric history %s: %s failed: %s", self.path, step.__name__, e)
            return False

    def _roll_up(self, deadline: float) -> None:
        """Pack each complete bucket of `head` into chunks and rollups, oldest first."""
        step = self.rollup_step
        while time.monotonic() < deadline:
            first = self._conn.execute("SELECT min(ts) FROM head WHERE ts >= ?",
                                       (self._rolled_until or 0,)).fetchone()[0]
            if first is None:
                return
            start = max(self._rolled_until or 0, first // step * step)   # skips a gap in the data
            if start + step + ROLLUP_GRACE > self._now:
                return
            rows = self._conn.execute("SELECT series, ts, value FROM head WHERE ts >= ? AND ts < ? "
                                      "ORDER BY series, ts", (start, start + step)).fetchall()
            chunks, rollups = [], []
            for sid, points in groupby(rows, key=lambda r: r[0]):
                stamps, values = zip(*((ts - start, v) for _, ts, v in points), strict=True)
                chunks.append((start, sid, pack(stamps, values)))
                rollups.append((start, sid, sum(values) / len(values), min(values), max(values), len(values)))
            with self._transaction():
                self._conn.executemany("INSERT OR REPLACE INTO chunk VALUES (?, ?, ?)", chunks)
                self._conn.executemany("INSERT OR REPLACE INTO rollup VALUES (?, ?, ?, ?, ?, ?)", rollups)
                self._conn.execute("DELETE FROM head WHERE ts < ?", (start + step,))
            self._rolled_until = start + step

    def _expire(self, deadline: float) -> None:
        step = self.rollup_step
        for table, keep in (("chunk", self.retention.raw_seconds), ("rollup", self.retention.rollup_seconds)):
            oldest = self._edge("min", table)
            if oldest is None or time.monotonic() > deadline:
                continue
            # whole buckets, so that no bucket is half raw and half missing
            cut = min(self._now - keep, oldest + EXPIRY_SLICE) // step * step
            if cut > oldest:
                self._delete_before(cut, (table,))

    def _limit_wal(self) -> None:
        """Give the WAL back to the file system once it outgrows its share of the bound: SQLite
        only truncates it on its next reset, after the largest transaction may have grown it."""
        try:
            if Path(f"{self.path}-wal").stat().st_size > self.retention.wal_bytes:
                self._safely(self._conn.execute, "PRAGMA wal_checkpoint(TRUNCATE)")
        except FileNotFoundError:
            pass

    def _keep_under_bound(self, deadline: float) -> None:
        limit = self.retention.max_pages
        if self._used_pages() <= HIGH_WATER * limit:
            return
        while self._drop_oldest() and self._used_pages() > LOW_WATER * limit and time.monotonic() < deadline:
            pass

    def _drop_oldest(self) -> bool:
        """Delete the oldest 5% of the time the file covers (at least 1 s), in every tier;
        whole buckets where the data is rolled up."""
        oldest = self._oldest()
        if oldest is None:
            return False
        cut = oldest + max(1, (self._now - oldest) // 20)
        if self._rolled_until is not None and cut < self._rolled_until:
            cut = min(-(-cut // self.rollup_step) * self.rollup_step, self._rolled_until)
        self._delete_before(cut, tuple(TABLES))
        self._complain("bound", "metric history %s is at its bound of %d MiB: dropped data older than %s",
                       self.path, self.retention.max_bytes // 2**20,
                       time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(cut)), level=logging.INFO)
        return True

    def _delete_before(self, cut: int, tables: tuple[str, ...]) -> None:
        with self._transaction():
            for table in tables:
                self._conn.execute(f"DELETE FROM {table} WHERE {TABLES[table]} < ?", (cut,))

    # -- helpers ----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._rollback()
            raise
        self._conn.execute("COMMIT")

    def _edge(self, agg: str, table: str) -> int | None:
        return self._conn.execute(f"SELECT {agg}({TABLES[table]}) FROM {table}").fetchone()[0]

    def _oldest(self) -> int | None:
        edges = (self._edge("min", table) for table in TABLES)
        return min((t for t in edges if t is not None), default=None)

    def _page_count(self) -> int:
        return self._conn.execute("PRAGMA page_count").fetchone()[0]

    def _used_pages(self) -> int:
        return self._page_count() - self._conn.execute("PRAGMA freelist_count").fetchone()[0]

    def _complain(self, what: str, msg: str, *args, level: int = logging.WARNING) -> None:
        now = time.monotonic()
        if now - self._complained.get(what, -math.inf) >= COMPLAIN_EVERY:
            self._complained[what] = now
            log.log(level, msg, *args)

    # -- reading and the rest ----------------------------------------------------------------------

    def query(self, name: str, match: dict[str, str] | None = None, *, since: float, until: float,
              step: float | None = None, agg: Aggregate = "avg") -> list[Series]:
        with self._mutex:
            return read_series(self._conn, self.rollup_step, name, match or {}, since, until, step, agg)

    def stats(self) -> dict:
        """What the file holds and what it cost, for `dbplane metrics` and the benchmark."""
        with self._mutex:
            wal = Path(f"{self.path}-wal")
            return {"file_bytes": self.path.stat().st_size,
                    "wal_bytes": wal.stat().st_size if wal.exists() else 0,
                    "used_bytes": self._used_pages() * PAGE_SIZE, "max_bytes": self.retention.max_bytes,
                    "series": len(self._series), "oldest": self._oldest(), "newest": self._now or None,
                    "rolled_until": self._rolled_until, "dropped": self.dropped, "refused": self.refused}

    def close(self) -> None:
        with self._mutex:
            self._conn.close()
            os.close(self._lock_fd)

    def __enter__(self) -> HistoryWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
