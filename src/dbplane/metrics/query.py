"""Pure helpers for reading metric history: time ranges as users write them, the step a range
is drawn with, the key metrics of `dbplane metrics NAME`, and counters turned into rates."""

from __future__ import annotations

import re
from collections.abc import Sequence

from dbplane.errors import InvalidInput

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_SPAN = 14 * 86400 + 3600

# what `dbplane metrics NAME` shows per member without --metric, and how
KEY_METRICS = (
    "dbplane_member_up",
    "dbplane_pg_connections",
    "dbplane_pg_max_connections",
    "dbplane_pg_xact_commit_total",
    "dbplane_member_cpu_seconds_total",
    "dbplane_member_resident_memory_bytes",
    "dbplane_pg_database_size_bytes",
    "dbplane_pg_replication_lag_seconds",
)


def parse_duration(text: str) -> float:
    """'90s', '15m', '1h', '2d' (or a plain number of seconds) -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text or "")
    if not m:
        raise InvalidInput(f"cannot read the duration {text!r}", "write it like 90s, 15m, 1h or 2d",
                           code="invalid_duration")
    seconds = float(m.group(1)) * UNITS[m.group(2) or "s"]
    if not 0 < seconds <= MAX_SPAN:
        raise InvalidInput(f"duration {text!r} is out of range", "history goes back 14 days at most",
                           code="invalid_duration")
    return seconds


def time_range(since: str, until: float | None, now: float) -> tuple[float, float]:
    """`since` is a duration back from `until` (default now), or a Unix time."""
    end = now if until is None else until
    try:
        value = float(since)
    except ValueError:
        value = None
    if value is not None and value > 10**9:            # a Unix time, not a number of seconds
        start = value
    else:
        start = end - parse_duration(since)
    if not start < end:
        raise InvalidInput("the time range is empty", "since must be before until", code="invalid_duration")
    return start, end


def default_step(since: float, until: float) -> float | None:
    """Raw points up to an hour (360 at the default interval), else about 360 steps."""
    span = until - since
    return None if span <= 3600 else max(60.0, round(span / 360 / 60) * 60)


def rates(points: Sequence[Sequence[float]]) -> list[tuple[float, float]]:
    """Per-second increase between consecutive points of a counter; a decrease is a reset
    (the source restarted), counted from 0 as Prometheus' rate() does."""
    out = []
    for (t0, v0), (t1, v1) in zip(points, points[1:], strict=False):
        if t1 <= t0:
            continue
        increase = v1 - v0 if v1 >= v0 else v1
        out.append((t1, increase / (t1 - t0)))
    return out
