"""`dbplane doctor ...`: diagnoses with evidence and a fix for each finding. Exits 1 when
a finding is critical, so a CI job or cron can gate on it.

    dbplane doctor                  every database's checks and the security checks
    dbplane doctor NAME             one database's checks and its security checks
    dbplane doctor --url URL        the database checks against any PostgreSQL
    dbplane doctor security         the security checks (docs/security.md#doctor)
"""

from __future__ import annotations

import asyncio

import typer
from rich.markup import escape
from typer.core import TyperGroup

from ..errors import DbplaneError, InvalidInput
from . import render
from .common import Output, OutputOpt, client

STYLE = {"critical": "bold red", "warning": "yellow", "info": "cyan", "ok": "green"}


class _DefaultToDatabase(TyperGroup):
    """`doctor`, `doctor NAME` and `doctor --url ...` run the `database` command; the
    other sub-commands keep their names (a database named like one: `doctor database NAME`)."""

    def parse_args(self, ctx, args):
        if not args or (args[0] not in self.commands and args[0] not in ("--help", "-h")):
            args = ["database", *args]
        return super().parse_args(ctx, args)


doctor_app = typer.Typer(cls=_DefaultToDatabase, help="Diagnose the platform and its databases: "
                         "'dbplane doctor [NAME] [--url URL]', 'dbplane doctor security'.")


def show(findings: list[dict], all_checks: bool, output: Output) -> None:
    if output == Output.json:
        render.as_json(findings)
    else:
        shown = [f for f in findings if all_checks or f["severity"] != "ok"]
        con = render.console
        for f in shown:
            style = STYLE[f["severity"]]
            con.print(f"[{style}]{f['severity'].upper():8}[/{style}] {escape(f['resource'])}: "
                      f"{escape(f['summary'])} [dim]({f['check']})[/dim]")
            if f["evidence"]:
                con.print(f"         evidence: {escape(f['evidence'])}", highlight=False)
            if f["fix"]:
                con.print(f"         fix:      {escape(f['fix'])}", highlight=False)
        counts = {s: sum(1 for f in findings if f["severity"] == s) for s in STYLE}
        con.print(", ".join(f"{n} {s}" for s, n in counts.items()) + f" ({len(findings)} checks)")
    if any(f["severity"] == "critical" for f in findings):
        raise typer.Exit(1)


ORDER = {"critical": 0, "warning": 1, "info": 2, "ok": 3}


def _sorted(findings: list[dict]) -> list[dict]:
    return sorted(findings, key=lambda f: (ORDER[f["severity"]], f["check"], f["resource"]))


@doctor_app.command("database")
def database(name: str | None = typer.Argument(None, help="a database (default: every database)"),
             url: str | None = typer.Option(None, "--url", help="any PostgreSQL: postgresql://user@host"
                                            ":port/db (password in the URL or PGPASSWORD; never shown)"),
             all_checks: bool = typer.Option(False, "--all", help="also list the checks that passed"),
             output: Output = OutputOpt):
    """Connection exhaustion and pools, replication lag and its cause, deadlocks, slow
    queries from missing indexes, bloat, long and idle-in-transaction sessions, backups and
    the WAL archive, storage; with the security checks (docs/doctor.md)."""
    if url:
        if name:
            raise InvalidInput("give a database NAME or --url, not both",
                               "dbplane doctor NAME for a platform database, dbplane doctor --url URL "
                               "for any other PostgreSQL", code="invalid_input")
        from ..doctor.diagnose import diagnose_url
        findings = [f.model_dump() for f in asyncio.run(diagnose_url(url))]
        show(findings, all_checks, output)
        return
    c = client()
    names = [name] if name else [d["name"] for d in c.get("/v1/databases") if d.get("status") != "deleting"]
    findings: list[dict] = []
    for n in names:
        try:
            findings += c.get(f"/v1/doctor/databases/{n}")["findings"]
        except DbplaneError as e:
            if name or e.code != "database_not_found":
                raise
            # deleted since it was listed: nothing to diagnose
    findings += c.get("/v1/doctor/security", database=name)["findings"]
    show(_sorted(findings), all_checks, output)


@doctor_app.command("security")
def security(database: str | None = typer.Option(None, "--database", help="only this database's checks"),
             all_checks: bool = typer.Option(False, "--all", help="also list the checks that passed"),
             output: Output = OutputOpt):
    """What is still misconfigured: plaintext allowed, public listeners, static passwords,
    superuser used by applications, repositories and keys, broad policies, old access keys,
    certificates, open allowlists, volume encryption, credential rotation."""
    show(client().get("/v1/doctor/security", database=database)["findings"], all_checks, output)
