"""`dbplane metrics NAME [--metric M] [--since 1h] [--member X] [-o json]`: a database's metric
history from the hosts' collectors, as a table of key metrics per member with a sparkline of
its load, or one metric's series with sparkline and min/avg/max."""

from __future__ import annotations

import typer
from rich.markup import escape

from ..metrics import catalog
from ..metrics.query import rates
from . import render
from .common import Output, OutputOpt, client
from .sparkline import series_sparkline

WIDTH = 40
STALE_AFTER = 120       # seconds: a member whose newest sample is older shows up "stale"


def human_bytes(n: float | None) -> str:
    if n is None:
        return ""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def human(value: float | None, unit: str) -> str:
    if value is None:
        return ""
    if unit == "bytes":
        return human_bytes(value)
    if unit == "seconds":
        return f"{value:.3g} s"
    if unit == "ratio":
        return f"{value * 100:.1f}%"
    return f"{value:.4g}"


def _last(points: list) -> float | None:
    return points[-1][1] if points else None


def _members(series: list[dict]) -> dict[str, dict[str, list[dict]]]:
    """member -> metric name -> its series (several for pg_connections: one per state)."""
    out: dict[str, dict[str, list[dict]]] = {}
    for s in series:
        member = s["labels"].get("member")
        if member:
            out.setdefault(member, {}).setdefault(s["name"], []).append(s)
    return out


def _summed(series: list[dict]) -> list[tuple[float, float]]:
    """Points of several series added up per timestamp (connections over every state)."""
    acc: dict[float, float] = {}
    for s in series:
        for t, v in s["points"]:
            acc[t] = acc.get(t, 0.0) + v
    return sorted(acc.items())


def _newest_role(series: list[dict]) -> tuple[str, str]:
    """The role and zone of the series with the newest point (roles change on failover)."""
    best = max(series, key=lambda s: s["points"][-1][0] if s["points"] else 0)
    return best["labels"].get("role", ""), best["labels"].get("zone", "")


def member_rows(data: dict) -> list[dict]:
    since, until = data["since"], data["until"]
    rows = []
    for member, by_name in sorted(_members(data["series"]).items()):
        every = [s for group in by_name.values() for s in group]
        role, zone = _newest_role(every)

        def latest(name: str, by_name=by_name) -> float | None:
            group = by_name.get(name) or []
            newest = [(s["points"][-1]) for s in group if s["points"]]
            return max(newest)[1] if newest else None

        def rate(name: str, by_name=by_name) -> list[tuple[float, float]]:
            points = sorted(p for s in by_name.get(name) or [] for p in s["points"])
            return rates(points)

        def fresh(name: str, by_name=by_name) -> bool:
            """A point in the last STALE_AFTER seconds of the range (else the collector stopped)."""
            newest = max((s["points"][-1][0] for s in by_name.get(name) or [] if s["points"]), default=0)
            return until - newest < STALE_AFTER

        up = latest("dbplane_member_up")
        conns = _summed([s for s in by_name.get("dbplane_pg_connections") or []])
        tps = rate("dbplane_pg_xact_commit_total")
        cpu = rate("dbplane_member_cpu_seconds_total")
        max_conn = latest("dbplane_pg_max_connections")
        rows.append({
            "member": member, "role": role, "zone": zone,
            "up": "" if up is None else "NO" if not up else "yes" if fresh("dbplane_member_up") else "stale",
            "connections": "" if not conns else f"{conns[-1][1]:.0f}"
                           + (f"/{max_conn:.0f}" if max_conn else ""),
            "tps": f"{tps[-1][1]:.1f}" if tps else "",
            "cpu": f"{cpu[-1][1] * 100:.0f}%" if cpu else "",
            "memory": human_bytes(latest("dbplane_member_resident_memory_bytes")),
            "size": human_bytes(latest("dbplane_pg_database_size_bytes")),
            "lag": human(latest("dbplane_pg_replication_lag_seconds"), "seconds"),
            "tps_history": series_sparkline(tps, since, until, WIDTH) if tps else "",
        })
    return rows


def series_rows(data: dict) -> list[dict]:
    rows = []
    for s in data["series"]:
        metric = catalog.BY_NAME.get(s["name"])
        points = [tuple(p) for p in s["points"]]
        shown = rates(points) if metric and metric.type == "counter" else points
        unit = metric.unit if metric else ""
        values = [v for _, v in shown]
        labels = ",".join(f"{k}={v}" for k, v in s["labels"].items() if k != "database")
        rows.append({"series": labels, "last": human(values[-1] if values else None, unit),
                     "min": human(min(values) if values else None, unit),
                     "avg": human(sum(values) / len(values) if values else None, unit),
                     "max": human(max(values) if values else None, unit),
                     "history": series_sparkline(shown, data["since"], data["until"], WIDTH)
                     if shown else ""})
    return rows


def metrics(name: str = typer.Argument(..., help="the database"),
            metric: str | None = typer.Option(None, "--metric", "-m", help="one metric's series, e.g. "
                                              "dbplane_pg_connections (names: docs/observability.md)"),
            since: str = typer.Option("1h", "--since", help="how far back: 90s, 15m, 1h, 2d (up to 14d)"),
            member: str | None = typer.Option(None, "--member", help="only this member's series"),
            step: float | None = typer.Option(None, "--step", help="seconds per point (default: raw "
                                              "points up to an hour, else about 360 points)"),
            output: Output = OutputOpt):
    """A database's metrics from the history the collectors keep (24 h raw, 14 days of
    rollups): without --metric, key metrics per member and a sparkline of its transactions
    per second; with --metric, each series with a sparkline and min/avg/max (counters as a
    rate per second)."""
    params = {"since": since, "member": member, "step": step}
    if metric:
        params["metric"] = metric
    data = client().get(f"/v1/databases/{name}/metrics", **params)
    if output == Output.json:
        render.as_json(data)
        return
    if data.get("unavailable_hosts"):
        render.err_console.print(f"warning: no history from {', '.join(data['unavailable_hosts'])} "
                                 "(its collector did not answer)", highlight=False)
    window = f"{render.when(data['since'])} to {render.when(data['until'])}"
    if not metric:
        rows = member_rows(data)
        if not rows:
            render.console.print(f"no metrics of {escape(name)} yet: the collectors write every 10 s",
                                 highlight=False)
            return
        render.table(rows, [("member", "MEMBER"), ("role", "ROLE"), ("zone", "ZONE"), ("up", "UP"),
                            ("connections", "CONNECTIONS"), ("tps", "TPS"), ("cpu", "CPU"),
                            ("memory", "MEMORY"), ("size", "SIZE"), ("lag", "LAG"),
                            ("tps_history", "TPS " + window)])
        return
    rows = series_rows(data)
    if not rows:
        render.console.print(f"no points of {escape(metric)} for {escape(name)} in {window}", highlight=False)
        return
    kind = catalog.BY_NAME[metric].type
    render.table(rows, [("series", "SERIES"), ("last", "LAST"), ("min", "MIN"), ("avg", "AVG"),
                        ("max", "MAX"), ("history", window)],
                 title=metric + (" (per second)" if kind == "counter" else ""))
