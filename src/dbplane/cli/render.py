"""All user output goes through here: tables like the aws CLI's, or JSON."""

from __future__ import annotations

import datetime
import json
import sys
from collections.abc import Iterable

from rich.console import Console
from rich.table import Table

# Not a terminal (pipes, CI): wide enough that tables do not wrap, like the aws CLI.
console = Console(width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)


def as_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def when(ts: float | None) -> str:
    if not ts:
        return ""
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def table(rows: Iterable[dict], columns: list[tuple[str, str]], title: str | None = None) -> None:
    t = Table(title=title, box=None, header_style="bold")
    for _, header in columns:
        t.add_column(header)
    for row in rows:
        t.add_row(*("" if row.get(key) is None else str(row.get(key)) for key, _ in columns))
    console.print(t)


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
    for i, change in enumerate(d.get("pending_changes") or []):
        console.print(f"  {'pending' if i == 0 else '':10} {change}", highlight=False)
    table(d["members"], [("name", "MEMBER"), ("role", "ROLE"), ("zone", "ZONE"), ("host", "HOST"),
                         ("port", "PORT"), ("state", "STATE"), ("lag_bytes", "LAG BYTES"),
                         ("lag_seconds", "LAG S"), ("timeline", "TL"), ("message", "")])
