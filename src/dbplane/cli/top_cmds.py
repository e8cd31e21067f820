"""`dbplane top NAME [--interval 2] [--since 5m] [--once] [-o json]`: performance insights live
in the terminal, like pg_activity or top. Every interval it reads GET
/v1/databases/{name}/insights and draws the load by wait event as bars (average active
sessions), the top statements (calls per second between two refreshes, mean time, share of
the total time) and the sessions that are not idle. `--once` (and `-o json`) prints one
frame and exits; Ctrl-C exits cleanly."""

from __future__ import annotations

import time

import typer
from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from . import render
from .common import Output, OutputOpt, client

BAR_WIDTH = 40
STATEMENTS = 10
SESSIONS = 15


def calls_per_second(statements: list[dict], previous: dict[str, int] | None,
                     elapsed: float) -> dict[str, float]:
    """queryid -> calls per second since the previous frame (nothing on the first frame)."""
    if not previous or elapsed <= 0:
        return {}
    return {s["queryid"]: max(s["calls"] - previous[s["queryid"]], 0) / elapsed
            for s in statements if s["queryid"] in previous}


def summary(data: dict, rates: dict[str, float]) -> dict:
    """One frame as plain data (also what `-o json` prints)."""
    total_time = sum(s["total_time_ms"] for s in data["statements"]) or 0.0
    statements = [{**s, "calls_per_second": round(rates[s["queryid"]], 3) if s["queryid"] in rates else None,
                   "time_share": round(s["total_time_ms"] / total_time, 4) if total_time else None}
                  for s in data["statements"]]
    return {"database": data["database"], "primary": data.get("primary"), "since": data["since"],
            "until": data["until"], "load": data["load"], "load_by_type": data["load_by_type"],
            "statements": statements, "statements_notice": data.get("statements_notice"),
            "sessions": data["sessions"], "slow_queries": data.get("slow_queries"),
            "unavailable_hosts": data.get("unavailable_hosts", [])}


def bar(value: float, scale: float, width: int = BAR_WIDTH) -> str:
    """A horizontal bar of `value` on a scale where `scale` fills `width` (eighths of a cell)."""
    if scale <= 0 or value <= 0:
        return ""
    eighths = round(min(value / scale, 1.0) * width * 8)
    full, part = divmod(eighths, 8)
    return "█" * full + ("▏▎▍▌▋▊▉"[part - 1] if part else "")


def frame(f: dict) -> Group:
    """The rich renderable of one frame."""
    load = f["load"]
    head = Text(f"{f['database']}  primary {f.get('primary') or '-'}  "
                f"load {load['average_active_sessions']:.2f} average active sessions "
                f"({render.when(f['since'])} to {render.when(f['until'])}, {load['samples']} samples)")
    waits = Table(title="load by wait event", title_justify="left", box=None, pad_edge=False)
    for col, justify in (("WAIT", "left"), ("AAS", "right"), ("", "left")):
        waits.add_column(col, justify=justify)
    scale = max([w["average_active_sessions"] for w in load["by_wait"]] + [1.0])
    for w in load["by_wait"]:
        name = "CPU" if w["wait_event_type"] == "CPU" else f"{w['wait_event_type']}:{w['wait_event']}"
        waits.add_row(name, f"{w['average_active_sessions']:.2f}",
                      Text(bar(w["average_active_sessions"], scale),
                           style="green" if name == "CPU" else "red"))
    if not load["by_wait"]:
        waits.add_row("(no active sessions sampled yet)", "", "")
    sql = Table(title="top statements by total time", title_justify="left", box=None, pad_edge=False)
    for col in ("QUERYID", "CALLS", "CALLS/S", "MEAN MS", "TIME %", "LOAD %", "QUERY"):
        sql.add_column(col, justify="left" if col in ("QUERYID", "QUERY") else "right",
                       overflow="ellipsis", no_wrap=col == "QUERY",
                       min_width=20 if col == "QUERYID" else None)     # a queryid is up to 20 characters
    for s in f["statements"][:STATEMENTS]:
        sql.add_row(s["queryid"], str(s["calls"]),
                    "" if s["calls_per_second"] is None else f"{s['calls_per_second']:.1f}",
                    f"{s['mean_time_ms']:.2f}",
                    "" if s["time_share"] is None else f"{s['time_share'] * 100:.1f}",
                    "" if s["load_share"] is None else f"{s['load_share'] * 100:.0f}", s["query"])
    sessions = Table(title="sessions now", title_justify="left", box=None, pad_edge=False)
    for col in ("PID", "USER", "STATE", "WAIT", "SECONDS", "QUERY"):
        sessions.add_column(col, justify="right" if col in ("PID", "SECONDS") else "left",
                            overflow="ellipsis", no_wrap=col == "QUERY")
    for s in f["sessions"][:SESSIONS]:
        wait = f"{s['wait_event_type']}:{s['wait_event']}" if s["wait_event_type"] else "CPU"
        sessions.add_row(str(s["pid"]), s["user"] or "", s["state"] or "", wait, f"{s['duration_s']:.1f}",
                         s["query"])
    parts: list = [head, waits, sql]
    if f.get("statements_notice"):
        parts.append(Text(f["statements_notice"], style="yellow"))
    parts.append(sessions)
    if f.get("unavailable_hosts"):
        parts.append(Text(f"no load history from {', '.join(f['unavailable_hosts'])}", style="yellow"))
    return Group(*parts)


def top(name: str = typer.Argument(..., help="the database"),
        interval: float = typer.Option(2.0, "--interval", "-n", min=0.5, help="seconds between refreshes"),
        since: str = typer.Option("5m", "--since", help="the period the load is averaged over"),
        by: str = typer.Option("total", "--by", help="order statements by total, mean or calls"),
        once: bool = typer.Option(False, "--once", help="print one frame and exit"),
        output: Output = OutputOpt):
    """Live performance insights: load by wait event, top SQL and the sessions now."""
    api = client()
    previous: dict[str, int] | None = None
    previous_at = 0.0

    def next_frame() -> dict:
        nonlocal previous, previous_at
        data = api.get(f"/v1/databases/{name}/insights", since=since, by=by)
        now = time.monotonic()
        f = summary(data, calls_per_second(data["statements"], previous, now - previous_at))
        previous, previous_at = {s["queryid"]: s["calls"] for s in data["statements"]}, now
        return f

    if once or output == Output.json:          # JSON is one frame: scripts poll it themselves
        f = next_frame()
        if output == Output.json:
            render.as_json(f)
        else:
            render.console.print(frame(f))
        return
    try:
        with Live(frame(next_frame()), console=render.console, auto_refresh=False, screen=False) as live:
            while True:
                time.sleep(interval)
                live.update(frame(next_frame()), refresh=True)
    except KeyboardInterrupt:
        pass
