"""Terminal sparklines (▁▂▃▄▅▆▇█) for metric series, for `dbplane metrics NAME`.

Time is laid out evenly over the width, so a stretch without data shows as blank columns
rather than being squeezed out: a member that was down looks like it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

BLOCKS = "▁▂▃▄▅▆▇█"
GAP = " "

Points = Sequence[tuple[float, float]]   # (Unix seconds, value)


def sparkline(values: Sequence[float | None], lo: float | None = None, hi: float | None = None) -> str:
    """One character per value, scaled between `lo` and `hi` (default: the values' own
    minimum and maximum); None or NaN is a gap. A flat series is drawn at the bottom."""
    present = [v for v in values if v is not None and not math.isnan(v)]
    if not present:
        return GAP * len(values)
    lo = min(present) if lo is None else lo
    hi = max(present) if hi is None else hi
    out = []
    for v in values:
        if v is None or math.isnan(v):
            out.append(GAP)
        elif hi <= lo:
            out.append(BLOCKS[0])
        else:
            level = (min(max(v, lo), hi) - lo) / (hi - lo)
            out.append(BLOCKS[round(level * (len(BLOCKS) - 1))])
    return "".join(out)


def resample(points: Points, since: float, until: float, width: int) -> list[float | None]:
    """`width` columns over [since, until]: the average of the points in each, None where
    there is none."""
    if width <= 0 or until <= since:
        raise ValueError("need a positive width and since < until")
    span = (until - since) / width
    sums = [0.0] * width
    counts = [0] * width
    for ts, value in points:
        if since <= ts <= until and not math.isnan(value):
            col = min(int((ts - since) / span), width - 1)
            sums[col] += value
            counts[col] += 1
    return [s / n if n else None for s, n in zip(sums, counts, strict=True)]


def series_sparkline(points: Points, since: float, until: float, width: int = 60) -> str:
    return sparkline(resample(points, since, until, width))
