"""`dbplane alarms list|describe|set|delete` (docs/observability.md#alarms)."""

from __future__ import annotations

import typer
from rich.markup import escape

from ..errors import InvalidInput
from . import render
from .common import Output, OutputOpt, client

alarms_app = typer.Typer(no_args_is_help=True, help="Alarms on metrics: states OK, ALARM, INSUFFICIENT_DATA; "
                         "notifications to the events stream and webhooks.")

STYLE = {"ALARM": "bold red", "INSUFFICIENT_DATA": "yellow", "OK": "green"}
COLUMNS = [("name", "NAME"), ("database", "DATABASE"), ("state", "STATE"), ("condition", "CONDITION"),
           ("value", "VALUE"), ("since", "SINCE")]


def condition(a: dict) -> str:
    matchers = ",".join(f"{k}={v}" for k, v in a["labels"].items())
    what = a["metric"] + (f"{{{matchers}}}" if matchers else "")
    if a.get("denominator"):
        what += f" / {a['denominator']}"
    return (f"{a['statistic']}({what}) {a['comparison']} {a['threshold']:g} for "
            f"{a['datapoints_to_alarm']} of {a['evaluation_periods']} x {a['period']} s")


def _value(v) -> str:
    return "" if v is None else f"{v:.4g}"


@alarms_app.command("list")
def list_alarms(database: str | None = typer.Option(None, "--database", "-d", help="one database's alarms"),
                state: str | None = typer.Option(None, "--state", help="OK, ALARM or INSUFFICIENT_DATA"),
                output: Output = OutputOpt):
    """Every alarm with its state and condition."""
    alarms = client().get("/v1/alarms", database=database, state=state.upper() if state else None)
    if output == Output.json:
        render.as_json(alarms)
        return
    rows = [{**a, "database": a["database"] or "(platform)", "condition": condition(a),
             "value": _value(a["value"]), "since": render.when(a["state_since"])} for a in alarms]
    render.table(rows, COLUMNS)


@alarms_app.command("describe")
def describe(name: str, output: Output = OutputOpt):
    """An alarm's definition, state and the reason, and its state history."""
    a = client().get(f"/v1/alarms/{name}")
    if output == Output.json:
        render.as_json(a)
        return
    con = render.console
    style = STYLE[a["state"]]
    con.print(f"[bold]{escape(a['name'])}[/bold]  [{style}]{a['state']}[/{style}] since "
              f"{render.when(a['state_since'])}", highlight=False)
    con.print(f"  reason     {escape(a['reason'])}", highlight=False)
    con.print(f"  database   {a['database'] or '(platform)'}" + ("  (a default)" if a["default"] else ""))
    if a["description"]:
        con.print(f"  about      {escape(a['description'])}", highlight=False)
    con.print(f"  condition  {escape(condition(a))}", highlight=False)
    con.print(f"  missing    {a['treat_missing']}")
    for url in a["webhooks"]:
        con.print(f"  webhook    {escape(url)}", highlight=False)
    if a["history"]:
        con.print("  history (newest first):")
        for h in a["history"]:
            con.print(f"    {render.when(h['time'])}  {h['old']} -> {h['new']}: {escape(h['reason'])}",
                      highlight=False, soft_wrap=True)


def _labels(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidInput(f"cannot read the label matcher {item!r}", "write it as NAME=VALUE, "
                               "e.g. --label role=standby", code="invalid_alarm")
        out[key] = value
    return out


@alarms_app.command("set")
def set_alarm(name: str,
              database: str | None = typer.Option(None, "--database", "-d",
                                                  help="the database (leave out for a host metric)"),
              metric: str = typer.Option(..., "--metric", "-m", help="a metric name (docs/observability.md)"),
              threshold: float = typer.Option(..., "--threshold", help="the value compared"),
              comparison: str = typer.Option(">", "--comparison", help=">, >=, < or <="),
              statistic: str = typer.Option("avg", "--statistic", help="avg, min or max over each period"),
              period: int = typer.Option(60, "--period", help="seconds per datapoint, 10 to 86400"),
              evaluation_periods: int = typer.Option(1, "--evaluation-periods", help="datapoints looked at"),
              datapoints_to_alarm: int | None = typer.Option(None, "--datapoints-to-alarm",
                                                             help="breaching datapoints that fire "
                                                                  "(default: all evaluated)"),
              denominator: str | None = typer.Option(None, "--denominator",
                                                     help="divide by this metric, or storage_quota"),
              label: list[str] = typer.Option([], "--label", help="NAME=VALUE label matcher (repeat)"),
              treat_missing: str = typer.Option("missing", "--treat-missing",
                                                help="missing, breaching, notBreaching or ignore"),
              webhook: list[str] = typer.Option([], "--webhook", help="URL to POST transitions to (repeat)"),
              description: str = typer.Option("", "--description"),
              output: Output = OutputOpt):
    """Create or replace an alarm."""
    body = {"database": database, "metric": metric, "threshold": threshold, "comparison": comparison,
            "statistic": statistic, "period": period, "evaluation_periods": evaluation_periods,
            "datapoints_to_alarm": datapoints_to_alarm, "denominator": denominator, "labels": _labels(label),
            "treat_missing": treat_missing, "webhooks": webhook, "description": description}
    a = client().request("PUT", f"/v1/alarms/{name}", json=body)
    render.sentence(a, output, f"alarm {a['name']} set: {condition(a)} (state {a['state']})")


@alarms_app.command("delete")
def delete(name: str, output: Output = OutputOpt):
    """Delete an alarm (a default alarm is then not made again for its database)."""
    r = client().delete(f"/v1/alarms/{name}")
    render.sentence(r, output, f"alarm {name} deleted")
