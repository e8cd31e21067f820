"""All user output goes through here: tables like the aws CLI's, or JSON."""

from __future__ import annotations

import datetime
import json
import sys
from collections.abc import Iterable

from rich.console import Console
from rich.markup import escape
from rich.table import Table

# Not a terminal (pipes, CI): wide enough that tables do not wrap, like the aws CLI.
console = Console(width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)


def as_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def when(ts: float | None) -> str:
    """UTC, in the form `db restore --to-time` takes, so a time shown can be pasted back."""
    if not ts:
        return ""
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def table(rows: Iterable[dict], columns: list[tuple[str, str]], title: str | None = None) -> None:
    t = Table(title=title, box=None, header_style="bold")
    for _, header in columns:
        t.add_column(header)
    for row in rows:
        t.add_row(*("" if row.get(key) is None else str(row.get(key)) for key, _ in columns))
    console.print(t)


def sentence(data, output_format: str, text: str) -> None:
    """A command's result: the data as JSON, or one line for people."""
    if output_format == "json":
        as_json(data)
    else:
        console.print(text, highlight=False)


def output(data, output_format: str, columns: list[tuple[str, str]] | None = None,
           title: str | None = None) -> None:
    if output_format == "json":
        as_json(data)
    elif columns is not None:
        table(data if isinstance(data, list) else [data], columns, title)
    else:
        as_json(data)


def describe_database(d: dict) -> None:
    console.print(f"[bold]{d['name']}[/bold]  {d['status']}  ({d['status_message']})")
    console.print(f"  engine     {d['engine']} {d['version']}, class {d['class']}, "
                  f"{'Multi-AZ' if d['multi_az'] else 'Single-AZ'}, {d['replicas']} read replica(s)")
    console.print(f"  writer     {d['endpoints']['writer'] or '-'}")
    console.print(f"  reader     {d['endpoints']['reader'] or '-'}")
    used = d.get("storage_used_bytes")
    console.print(f"  storage    {'?' if used is None else used // 2**20} MB used of "
                  f"{d['storage_gb']} GB")
    if d.get("params"):
        console.print("  params     " + ", ".join(f"{k}={v}" for k, v in d["params"].items()))
    if d.get("promoted_from"):
        console.print(f"  promoted   from read replica {d['promoted_from']['member']} of "
                      f"{d['promoted_from']['database']}")
    archive = (d.get("backup") or {}).get("archive")
    if d.get("backup") and not d["backup"]["settings"]["enabled"]:
        console.print("  backups    off")
    elif archive:
        console.print(f"  archive    {archive['state']}, {archive['lag_bytes'] // 1024} kB / "
                      f"{archive['lag_seconds']:.1f} s behind, archived up to "
                      f"{archive['archived_lsn'] or '-'}"
                      + (f" ({archive['error']})" if archive["error"] else ""), highlight=False)
    backup = d.get("backup") or {}
    if backup.get("earliest_restorable_time"):
        console.print(f"  restorable {when(backup['earliest_restorable_time'])} to "
                      f"{when(backup['latest_restorable_time'])}", highlight=False)
    if d.get("tls"):
        tls = d["tls"]
        console.print(f"  tls        clients: {tls['clients']}; nodes: {tls['nodes']}"
                      + (f" ({tls['nodes_reason']})" if tls["nodes_reason"] else ""), highlight=False)
    if "allowlist" in d:
        console.print("  allowlist  " + (", ".join(r["cidr"] for r in d["allowlist"])
                                         or "empty: every client is refused"), highlight=False)
    for i, change in enumerate(d.get("pending_changes") or []):
        console.print(f"  {'pending' if i == 0 else '':10} {change}", highlight=False)
    table(d["members"], [("name", "MEMBER"), ("role", "ROLE"), ("zone", "ZONE"), ("host", "HOST"),
                         ("port", "PORT"), ("state", "STATE"), ("lag_bytes", "LAG BYTES"),
                         ("lag_seconds", "LAG S"), ("timeline", "TL"), ("message", "")])


# -- connection proxy -----------------------------------------------------------------------

def proxy_settings(settings: dict) -> None:
    rows = [{"name": k, "value": (escape(", ".join(v)) or "-") if isinstance(v, list) else v}
            for k, v in settings.items()]
    table(rows, [("name", "SETTING"), ("value", "VALUE")])


def describe_proxy(d: dict) -> None:
    console.print(f"[bold]{d['database']}[/bold]  proxy")
    console.print(f"  writer     {d['endpoints']['writer'] or '-'}")
    console.print(f"  reader     {d['endpoints']['reader'] or '-'}")
    lim = d.get("limits")
    console.print("  limits     " + (f"{lim['per_proxy']} server connections per node and proxy "
                                     f"({lim['proxies']} proxies, max_connections {lim['max_connections']})"
                                     if lim else "not computed yet"))
    proxy_settings(d["settings"])
    rows = [{**p, "started": when(p["started_at"])} for p in d["proxies"]]
    if rows:
        table(rows, [("id", "PROXY"), ("host", "HOST"), ("address", "ADDRESS"),
                     ("admin_port", "ADMIN PORT"), ("pid", "PID"), ("started", "STARTED")])
    else:
        console.print("  no proxy is running")


def pool_row(p: dict) -> dict:
    return {**p, "max_wait_ms": round((p.get("wait_max_s") or 0) * 1000, 3)}


POOL_COLUMNS = [("dbname", "DATABASE"), ("user", "USER"), ("pool_mode", "MODE"),
                ("cl_active", "CL_ACTIVE"), ("cl_waiting", "CL_WAITING"), ("sv_active", "SV_ACTIVE"),
                ("sv_idle", "SV_IDLE"), ("tps", "TPS"), ("qps", "QPS"), ("avg_wait_ms", "AVG WAIT MS"),
                ("max_wait_ms", "MAX WAIT MS"), ("pinned", "PINNED"), ("errors", "ERRORS"),
                ("queue_timeouts", "QUEUE TIMEOUTS")]


def proxy_stats(d: dict, per_proxy: bool = False) -> None:
    """Like PgBouncer's SHOW POOLS, over every proxy (or one row per proxy and pool)."""
    if per_proxy:
        rows = [{"proxy": p["id"], "host": p["host"], **pool_row(pool)}
                for p in d["proxies"] if p["ok"] for pool in p["pools"]]
        columns = [("proxy", "PROXY"), ("host", "HOST"), *POOL_COLUMNS]
    else:
        rows, columns = [pool_row(p) for p in d["pools"]], POOL_COLUMNS
    if rows:
        table(rows, columns)
    elif not d["proxies"]:
        console.print("no proxy is running")
    else:
        console.print("no pools yet: no client has connected through the proxy")
    for p in d["proxies"]:
        if not p["ok"]:
            console.print(f"proxy {p['id']} on {p['host']} did not answer: {p['error']}",
                          style="yellow", highlight=False, markup=False)
