"""`dbplane doctor ...`: diagnoses with evidence and a fix for each finding. Exits 1 when
a finding is critical, so a CI job or cron can gate on it."""

from __future__ import annotations

import typer
from rich.markup import escape

from . import render
from .common import Output, OutputOpt, client

doctor_app = typer.Typer(no_args_is_help=True, help="Diagnose the platform and its databases.")

STYLE = {"critical": "bold red", "warning": "yellow", "info": "cyan", "ok": "green"}


@doctor_app.command("security")
def security(database: str | None = typer.Option(None, "--database", help="only this database's checks"),
             all_checks: bool = typer.Option(False, "--all", help="also list the checks that passed"),
             output: Output = OutputOpt):
    """What is still misconfigured: plaintext allowed, public listeners, static passwords,
    superuser used by applications, repositories and keys, broad policies, old access keys,
    certificates, open allowlists, volume encryption, credential rotation."""
    findings = client().get("/v1/doctor/security", database=database)["findings"]
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
