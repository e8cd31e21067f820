"""`dbplane db allow | revoke | allowlist`: a database's network allowlist, in the manner
of `aws ec2 authorize-security-group-ingress` / `revoke-security-group-ingress` /
`describe-security-groups`. Registered on the `db` group by cli/main.py."""

from __future__ import annotations

import ipaddress

import typer

from . import render
from .common import Output, OutputOpt, client


def opens_to_all(cidr: str) -> bool:
    try:
        return ipaddress.ip_network(cidr.strip(), strict=False).prefixlen == 0
    except ValueError:
        return False      # the API names what is wrong with it


def show(d: dict, output: Output) -> None:
    if output == Output.json:
        render.as_json(d)
    elif d["rules"]:
        render.table(d["rules"], [("cidr", "CIDR"), ("description", "DESCRIPTION")])
    else:
        render.console.print(f"database {d['database']} has no allowlist rule: every client is refused")


def allow(name: str = typer.Argument(..., help="the database"),
          cidr: str = typer.Argument(..., help="IPv4 or IPv6 network, e.g. 10.0.0.0/16; "
                                               "an address alone means that host"),
          description: str = typer.Option("", "--description", help="what the rule is for"),
          output: Output = OutputOpt):
    """Allow clients from CIDR to connect to the database's endpoints (new connections,
    within seconds)."""
    d = client().post(f"/v1/databases/{name}/allowlist", {"cidr": cidr, "description": description})
    if opens_to_all(cidr) and output == Output.table:
        render.err_console.print("warning: the database is now open to every address; prefer the "
                                 "networks your applications run in", style="yellow", highlight=False)
    show(d, output)


def revoke(name: str = typer.Argument(..., help="the database"),
           cidr: str = typer.Argument(..., help="the rule's network, as listed"),
           output: Output = OutputOpt):
    """Revoke a rule: new connections from its network are refused, and open connections
    that no other rule allows are closed."""
    show(client().delete(f"/v1/databases/{name}/allowlist", cidr=cidr), output)


def allowlist(name: str = typer.Argument(..., help="the database"), output: Output = OutputOpt):
    """List the rules of a database's network allowlist."""
    show(client().get(f"/v1/databases/{name}/allowlist"), output)


def register(db_app: typer.Typer) -> None:
    db_app.command("allow")(allow)
    db_app.command("revoke")(revoke)
    db_app.command("allowlist")(allowlist)
