"""Performance insights, the pure part: the database load over a period from the load series
the collectors keep (load.py), top SQL rows from pg_stat_statements, and the slow query log
lines PostgreSQL writes (`duration: ... ms  statement: ...`). insights_read.py fetches what
these functions are fed; the unit tests feed them directly.

Average active sessions (AAS) of a member over a period: the sum of its flushed averages
divided by the number of flushes (its CPU series is written at every flush, so its points
count them). The database's load is the sum over its members.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Sequence

from dbplane.doctor import pglog

QUERY_TEXT = 300                 # characters of a statement's text returned
SLOW_DEFAULT_MS = 1000.0         # the slow threshold when log_min_duration_statement is off
MAX_LOG_LINES = 20

DURATION = re.compile(r"^duration: ([\d.]+) ms\s+(?:statement|execute [^:]*|parse [^:]*|bind [^:]*): (.*)$",
                      re.S)


def _flushes(series: Iterable[dict]) -> dict[str, set[float]]:
    """member -> the times of its flushes (the points of its CPU series)."""
    out: dict[str, set[float]] = defaultdict(set)
    for s in series:
        lab = s["labels"]
        if lab.get("wait_event_type") == "CPU" and lab.get("wait_event") == "CPU":
            out[lab.get("member", "")].update(p[0] for p in s["points"])
    return out


def load_summary(wait_series: Sequence[dict], query_series: Sequence[dict] = ()) -> dict:
    """{"average_active_sessions", "by_wait": [{wait_event_type, wait_event, average_active_sessions}],
    "by_member": {member: aas}, "by_query": {queryid: aas}, "timeline": [[t, {wait_event_type: aas}]],
    "samples": flushes} from the history's series of dbplane_pg_load_sessions and
    dbplane_pg_load_by_query_sessions."""
    flushes = _flushes(wait_series)
    by_wait: dict[tuple[str, str], float] = defaultdict(float)
    by_member: dict[str, float] = defaultdict(float)
    timeline: dict[float, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for s in wait_series:
        lab = s["labels"]
        n = len(flushes.get(lab.get("member", ""), ())) or len(s["points"]) or 1
        total = sum(p[1] for p in s["points"])
        key = (lab.get("wait_event_type", ""), lab.get("wait_event", ""))
        by_wait[key] += total / n
        by_member[lab.get("member", "")] += total / n
        for t, v in s["points"]:
            timeline[t][key[0]] += v
    by_query: dict[str, float] = defaultdict(float)
    for s in query_series:
        lab = s["labels"]
        n = len(flushes.get(lab.get("member", ""), ())) or len(s["points"]) or 1
        by_query[lab.get("queryid", "")] += sum(p[1] for p in s["points"]) / n
    waits = [{"wait_event_type": t, "wait_event": e, "average_active_sessions": round(v, 4)}
             for (t, e), v in sorted(by_wait.items(), key=lambda kv: (-kv[1], kv[0])) if v > 0]
    return {"average_active_sessions": round(sum(by_wait.values()), 4), "by_wait": waits,
            "by_member": {m: round(v, 4) for m, v in sorted(by_member.items())},
            "by_query": {q: round(v, 4) for q, v in by_query.items() if v > 0},
            "timeline": [[t, {k: round(v, 4) for k, v in sorted(timeline[t].items())}]
                         for t in sorted(timeline)],
            "samples": max((len(v) for v in flushes.values()), default=0)}


def by_wait_type(by_wait: Iterable[dict]) -> dict[str, float]:
    """AAS per wait_event_type (CPU, Lock, IO, LWLock...), largest first."""
    out: dict[str, float] = defaultdict(float)
    for w in by_wait:
        out[w["wait_event_type"]] += w["average_active_sessions"]
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def statement_rows(rows: Iterable[Sequence], load_by_query: dict[str, float],
                   total_load: float) -> list[dict]:
    """pg_stat_statements rows (Q_STATEMENTS' columns) as dicts, with each statement's share of
    the sampled load where its query id was seen."""
    out = []
    for queryid, query, calls, total_ms, mean_ms, rows_, hit, read, dbname, user in rows:
        aas = load_by_query.get(str(queryid))
        out.append({"queryid": str(queryid), "query": pglog.short(query or "", QUERY_TEXT),
                    "calls": int(calls),
                    "total_time_ms": round(float(total_ms), 3), "mean_time_ms": round(float(mean_ms), 3),
                    "rows": int(rows_), "shared_blks_hit": int(hit), "shared_blks_read": int(read),
                    "database": dbname, "user": user,
                    "load_aas": None if aas is None else round(aas, 4),
                    "load_share": None if aas is None or total_load <= 0 else round(aas / total_load, 4)})
    return out


def slow_threshold_ms(log_min_duration: str | None) -> float:
    """log_min_duration_statement in ms when set (> 0), else SLOW_DEFAULT_MS. 0 (log all) is
    not a useful threshold for 'slow'."""
    try:
        value = float(log_min_duration or -1)
    except ValueError:
        return SLOW_DEFAULT_MS
    return value if value > 0 else SLOW_DEFAULT_MS


def slow_log(text: str, member: str, limit: int = MAX_LOG_LINES) -> list[dict]:
    """The latest `duration:` lines PostgreSQL logged (log_min_duration_statement), newest first."""
    out = []
    for rec in pglog.records(text):
        if rec.level != "LOG":
            continue
        m = DURATION.match(rec.text)
        if m:
            out.append({"time": rec.time, "member": member, "pid": rec.pid, "duration_ms": float(m[1]),
                        "statement": pglog.short(m[2], QUERY_TEXT)})
    return out[-limit:][::-1]


def enable_hint(name: str, preloaded: bool) -> str:
    """How to enable pg_stat_statements, exactly."""
    create = "CREATE EXTENSION pg_stat_statements; in the postgres database as a superuser"
    if preloaded:
        return f"pg_stat_statements is not installed in {name}'s postgres database: run {create}"
    return (f"pg_stat_statements is not loaded on {name}: run `dbplane db modify {name} --param "
            f"shared_preload_libraries=pg_stat_statements --wait`, then {create}")
