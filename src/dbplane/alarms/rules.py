"""The pure part of an alarm: from series to datapoints to a state, with the reason.

1. Each series (as the history returns it) becomes points: raw values for a gauge, a rate
   per second for a counter (a decrease is a reset, counted from 0, as Prometheus' rate()).
2. Series of one group (same labels except `state`, `role`, `device`) are summed per time:
   connections by state become a member's connections, and a member keeps its series
   through a failover.
3. With a denominator, each point is divided by the group's denominator value at that time
   (the same group's, or the only one there is), or by a constant (the storage quota).
4. Per period (the last `evaluation_periods` windows of `period` seconds ending now), the
   statistic of each group; the worst group (the highest for > and >=, else the lowest)
   is the datapoint; a period where no group has a point is missing.
5. decide(): ALARM when `datapoints_to_alarm` datapoints breach; missing datapoints count as
   `treat_missing` says; a newest period without data is never a stale OK.
"""

from __future__ import annotations

import bisect
import operator
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from ..metrics.query import rates
from .model import AlarmSpec, State

COMPARE = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}
SUMMED_LABELS = ("state", "role", "device")
MATCH_WINDOW = 60.0            # a denominator value older than this does not divide a point

Points = list[tuple[float, float]]


@dataclass(frozen=True)
class Verdict:
    state: State
    reason: str
    value: float | None          # the newest datapoint (None when missing)


def group_key(labels: dict[str, str]) -> tuple:
    return tuple(sorted((k, v) for k, v in labels.items() if k not in SUMMED_LABELS))


def grouped(series: Sequence[dict], counter: bool) -> dict[tuple, Points]:
    """{group: [(t, value)]}: counters as rates, series of a group summed per timestamp."""
    sums: dict[tuple, dict[float, float]] = defaultdict(lambda: defaultdict(float))
    for s in series:
        points = [(float(t), float(v)) for t, v in s["points"]]
        points.sort()
        if counter:
            points = rates(points)
        into = sums[group_key(s["labels"])]
        for t, v in points:
            into[t] += v
    return {k: sorted(v.items()) for k, v in sums.items()}


def _value_at(points: Points, t: float) -> float | None:
    """The newest value at or before t (within MATCH_WINDOW), else the first just after."""
    times = [p[0] for p in points]
    i = bisect.bisect_right(times, t)
    if i > 0 and t - times[i - 1] <= MATCH_WINDOW:
        return points[i - 1][1]
    if i < len(points) and times[i] - t <= 1.0:
        return points[i][1]
    return None


def divided(num: dict[tuple, Points], den: dict[tuple, Points] | float) -> dict[tuple, Points]:
    """Each group's points divided by its denominator (a zero or missing one drops the point)."""
    out: dict[tuple, Points] = {}
    for key, points in num.items():
        if isinstance(den, int | float):
            source = None
        else:
            source = den.get(key) or (next(iter(den.values())) if len(den) == 1 else None)
            if source is None:
                continue
        ratio = []
        for t, v in points:
            d = float(den) if source is None else _value_at(source, t)
            if d:
                ratio.append((t, v / d))
        out[key] = ratio
    return out


def statistic(values: Sequence[float], stat: str) -> float:
    if stat == "min":
        return min(values)
    if stat == "max":
        return max(values)
    return sum(values) / len(values)


def datapoints(groups: dict[tuple, Points], spec: AlarmSpec, now: float) -> list[float | None]:
    """One value per period, oldest first: windows [end - period, end) back from now. Periods
    that began before the alarm was created are left out, not missing: a new alarm (a
    database's defaults, made as it becomes available) has no history to hold against it."""
    worst = max if spec.comparison in (">", ">=") else min
    out: list[float | None] = []
    for i in range(spec.evaluation_periods, 0, -1):
        end = now - (i - 1) * spec.period
        start = end - spec.period
        if start < spec.created_at:
            continue
        per_group = []
        for points in groups.values():
            inside = [v for t, v in points if start <= t < end]
            if inside:
                per_group.append(statistic(inside, spec.statistic))
        out.append(worst(per_group) if per_group else None)
    return out


def _fmt(v: float | None) -> str:
    if v is None:
        return "missing"
    return f"{v:.4g}"


def decide(values: Sequence[float | None], spec: AlarmSpec, current: State) -> Verdict:
    """The state the datapoints put the alarm in, with the reason (the values that decided)."""
    cmp = COMPARE[spec.comparison]
    newest = values[-1] if values else None
    where = f"{spec.statistic} over {spec.period} s"
    shown = "[" + ", ".join(_fmt(v) for v in values) + "]"
    if not values:
        return Verdict("INSUFFICIENT_DATA", f"no data yet: the alarm is younger than its first period of "
                       f"{spec.period} s", None)
    missing = sum(1 for v in values if v is None)
    if missing == len(values):
        if spec.treat_missing == "missing":
            return Verdict("INSUFFICIENT_DATA", f"no data in the last {len(values)} period(s) of "
                           f"{spec.period} s", None)
        if spec.treat_missing == "ignore":
            return Verdict(current, "no data: state kept (treat_missing ignore)", None)
    breaching = sum(1 for v in values if v is not None and cmp(v, spec.threshold))
    if spec.treat_missing == "breaching":
        breaching += missing
    if breaching >= spec.needed:
        return Verdict("ALARM", f"threshold crossed: {breaching} of {len(values)} datapoints {shown} "
                       f"({where}) {spec.comparison} {spec.threshold:g}", newest)
    if newest is None and spec.treat_missing == "missing":
        return Verdict("INSUFFICIENT_DATA", f"no data in the latest period of {spec.period} s "
                       f"(datapoints {shown})", None)
    return Verdict("OK", f"{breaching} of {len(values)} datapoints {shown} ({where}) {spec.comparison} "
                   f"{spec.threshold:g}, {spec.needed} needed", newest)


def notify_worthy(old: State, new: State) -> bool:
    """Transitions that are sent to the events stream and the webhooks: into or out of ALARM,
    and OK -> INSUFFICIENT_DATA (data stopped). INSUFFICIENT_DATA -> OK (data arrived, all
    well, as after a database is created) is only recorded in the alarm's history."""
    return old != new and (new == "ALARM" or old == "ALARM" or (old, new) == ("OK", "INSUFFICIENT_DATA"))
