"""`dbplane audit ...`: the audit log, like `aws cloudtrail lookup-events` plus a chain
check. Each command is one or a few calls to the API."""

from __future__ import annotations

import re
import sys
import time

import typer
from rich.markup import escape

from ..errors import DbplaneError, InvalidInput
from . import render
from .common import Output, OutputOpt, client

audit_app = typer.Typer(no_args_is_help=True, help="The audit log of API calls and security events: "
                        "list entries, verify the hash chain, retention.")

COLUMNS = [("time", "TIME"), ("principal", "PRINCIPAL"), ("action", "ACTION"),
           ("resource", "RESOURCE"), ("source", "SOURCE"), ("result", "RESULT")]
PAGE = 1000                                       # the API's largest page
AGO = re.compile(r"^(\d+)([smhdw])$")
UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_when(text: str) -> float:
    """`1h`, `30m`, `7d` ago, or an ISO 8601 time (UTC unless it says otherwise)."""
    m = AGO.match(text.strip())
    if m:
        return time.time() - int(m.group(1)) * UNIT[m.group(2)]
    from .main import parse_time  # main imports this module: import it when used
    try:
        return parse_time(text)
    except InvalidInput:
        raise InvalidInput(f"invalid time {text!r}", "write a duration ago such as 30m, 1h or 7d, "
                           "or an ISO 8601 time such as 2026-11-24T03:50:00Z",
                           code="invalid_time") from None


def _row(e: dict) -> dict:
    result = " ".join(str(x) for x in (e.get("result"), e.get("status"), e.get("code")) if x)
    return {"time": render.when(e.get("time")), "principal": escape(e.get("principal") or "-"),
            "action": escape(str(e.get("action", ""))), "resource": escape(str(e.get("resource", ""))),
            "source": escape(str(e.get("source") or "-")), "result": escape(result)}


@audit_app.command("list")
def list_entries(since: str | None = typer.Option(None, "--since", help="e.g. 1h, 30m, 7d or an "
                                                  "ISO 8601 time"),
                 until: str | None = typer.Option(None, "--until", help="same forms as --since"),
                 principal: str | None = typer.Option(None, "--principal", help="e.g. user/admin; "
                                                      "* wildcards"),
                 action: str | None = typer.Option(None, "--action", help="e.g. db:CreateDatabase "
                                                   "or 'GET *'"),
                 resource: str | None = typer.Option(None, "--resource", help="e.g. db/orders*"),
                 result: str | None = typer.Option(None, "--result", help="allowed, denied or error"),
                 limit: int = typer.Option(50, "--limit", min=1, max=100_000,
                                           help="at most this many entries"),
                 output: Output = OutputOpt):
    """Entries newest first: who did what to which resource, from where, and the result."""
    params = {"since": parse_when(since) if since else None,
              "until": parse_when(until) if until else None,
              "principal": principal, "action": action, "resource": resource, "result": result}
    c, entries, token = client(), [], None
    while len(entries) < limit:
        page = c.get("/v1/audit", **params, limit=min(PAGE, limit - len(entries)), next_token=token)
        entries += page["entries"]
        token = page["next_token"]
        if not token:
            break
    if output == Output.json:
        render.as_json(entries)
    elif entries:
        render.table([_row(e) for e in entries], COLUMNS)
    else:
        render.console.print("no audit entries match", highlight=False)


@audit_app.command("verify")
def verify(output: Output = OutputOpt):
    """Prove the chain intact (exit 0), or name the first tampered entry (exit 1)."""
    report = client().get("/v1/audit/verify")
    if output == Output.json:
        render.as_json(report)
        if not report["ok"]:
            sys.exit(1)
        return
    if not report["ok"]:
        raise DbplaneError(f"audit log tampered: {report['message']}",
                           "see docs/security-audit.md#when-verify-fails", code="audit_tampered")
    render.console.print(report["message"], highlight=False)
    if report["entries"]:
        render.console.print(f"head hash {report['head_hash']} (keep it elsewhere to detect a "
                             "later cut-off)", highlight=False)


@audit_app.command("settings")
def settings(retention_days: int | None = typer.Option(None, "--retention-days",
                                                       help="keep entries this many days (1-3650)"),
             max_entries: int | None = typer.Option(None, "--max-entries",
                                                    help="and at most this many (100-1000000)"),
             output: Output = OutputOpt):
    """Show how long the log keeps entries; change it with the options."""
    c = client()
    if retention_days is None and max_entries is None:
        s = c.get("/v1/audit/settings")
    else:
        s = c.patch("/v1/audit/settings", {"retention_days": retention_days,
                                           "max_entries": max_entries})
    if output == Output.json:
        render.as_json(s)
    else:
        render.table([s], [("retention_days", "RETENTION DAYS"), ("max_entries", "MAX ENTRIES")])
