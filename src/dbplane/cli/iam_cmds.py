"""`dbplane iam ...`: users, roles, managed policies and access keys, with verbs modelled
on `aws iam`. A new secret access key is written into a 0600 credentials profile, never
printed."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.markup import escape

from ..errors import InvalidInput
from ..security import credentials
from . import render
from .common import Output, OutputOpt, client

iam_app = typer.Typer(no_args_is_help=True, help="Users, roles, policies and access keys: who may "
                      "call the API and connect to databases.")

PRINCIPAL_COLUMNS = [("name", "NAME"), ("policies", "POLICIES"), ("keys", "ACCESS KEYS"),
                     ("created", "CREATED"), ("description", "DESCRIPTION")]
KEY_COLUMNS = [("id", "ACCESS KEY ID"), ("principal", "PRINCIPAL"), ("status", "STATUS"),
               ("created", "CREATED")]
POLICY_COLUMNS = [("name", "NAME"), ("kind", "TYPE"), ("attached", "ATTACHED TO"),
                  ("description", "DESCRIPTION")]


def _principal(user: str | None, role: str | None) -> tuple[str, str]:
    if bool(user) == bool(role):
        raise InvalidInput("name exactly one principal", "pass --user NAME or --role NAME",
                           code="invalid_input")
    return ("user", user) if user else ("role", role)   # type: ignore[return-value]


def _principal_rows(items: list[dict]) -> list[dict]:
    return [{**p, "policies": ", ".join(p["policies"]) or "-",
             "keys": ", ".join(f"{k['id']} ({k['status']})" for k in p["access_keys"]) or "-",
             "created": render.when(p["created_at"]), "description": escape(p["description"])}
            for p in items]


def _show_principal(p: dict, output: Output) -> None:
    if output == Output.json:
        render.as_json(p)
        return
    con = render.console
    con.print(f"[bold]{p['principal']}[/bold]  created {render.when(p['created_at'])}")
    if p["description"]:
        con.print(f"  description  {escape(p['description'])}")
    con.print(f"  policies     {', '.join(p['policies']) or 'none (it may do nothing)'}")
    con.print("  access keys  " + (", ".join(f"{k['id']} ({k['status']}, created "
                                             f"{render.when(k['created_at'])})" for k in p["access_keys"])
                                  or "none"))


def _group(kind: str):
    def create(name: str = typer.Argument(...), description: str = typer.Option("", "--description"),
               output: Output = OutputOpt):
        _show_principal(client().post(f"/v1/iam/{kind}s", {"name": name, "description": description}), output)

    def list_(output: Output = OutputOpt):
        render.output(_principal_rows(client().get(f"/v1/iam/{kind}s")) if output == Output.table
                      else client().get(f"/v1/iam/{kind}s"), output, PRINCIPAL_COLUMNS)

    def get(name: str = typer.Argument(...), output: Output = OutputOpt):
        _show_principal(client().get(f"/v1/iam/{kind}s/{name}"), output)

    def delete(name: str = typer.Argument(...)):
        client().delete(f"/v1/iam/{kind}s/{name}")
        render.console.print(f"deleted {kind} {name}")

    what = "a person" if kind == "user" else "an application or service"
    iam_app.command(f"create-{kind}", help=f"Create a {kind} ({what}); it may do nothing until a "
                    "policy is attached.")(create)
    iam_app.command(f"list-{kind}s", help=f"List {kind}s with their policies and access keys.")(list_)
    iam_app.command(f"get-{kind}", help=f"Show one {kind}.")(get)
    iam_app.command(f"delete-{kind}", help=f"Delete a {kind} (delete its access keys first).")(delete)


_group("user")
_group("role")


@iam_app.command("attach-policy")
def attach_policy(policy: str = typer.Argument(..., help="policy name, e.g. ReadOnlyAccess"),
                  user: str | None = typer.Option(None, "--user"),
                  role: str | None = typer.Option(None, "--role"),
                  output: Output = OutputOpt):
    """Attach a managed policy to a user or role."""
    kind, name = _principal(user, role)
    _show_principal(client().post(f"/v1/iam/{kind}s/{name}/policies", {"policy": policy}), output)


@iam_app.command("detach-policy")
def detach_policy(policy: str = typer.Argument(...), user: str | None = typer.Option(None, "--user"),
                  role: str | None = typer.Option(None, "--role"), output: Output = OutputOpt):
    """Detach a managed policy from a user or role."""
    kind, name = _principal(user, role)
    _show_principal(client().delete(f"/v1/iam/{kind}s/{name}/policies/{policy}"), output)


# -- policies ---------------------------------------------------------------------------------------

def _read_document(document: str) -> str:
    if document == "-":
        return sys.stdin.read()
    path = Path(document.removeprefix("file://"))
    try:
        return path.read_text()
    except OSError as e:
        raise InvalidInput(f"cannot read the policy document {path}: {e.strerror}",
                           "pass a JSON file (file://policy.json) or - for standard input",
                           code="invalid_input") from None


@iam_app.command("create-policy")
def create_policy(name: str = typer.Argument(...),
                  document: str = typer.Option(..., "--document", help="JSON file (file://p.json) or -"),
                  description: str = typer.Option("", "--description"), output: Output = OutputOpt):
    """Create a managed policy from a JSON document (IAM grammar: Effect, Action, Resource, Condition)."""
    p = client().post("/v1/iam/policies", {"name": name, "document": _read_document(document),
                                           "description": description})
    render.sentence(p, output, f"created policy {p['name']}")


@iam_app.command("list-policies")
def list_policies(output: Output = OutputOpt):
    """Managed policies, built-in and yours, with what they are attached to."""
    items = client().get("/v1/iam/policies")
    if output == Output.json:
        render.as_json(items)
        return
    render.table([{**p, "kind": "built-in" if p["builtin"] else "custom",
                   "attached": ", ".join(p["attached_to"]) or "-", "description": escape(p["description"])}
                  for p in items], POLICY_COLUMNS)


@iam_app.command("get-policy")
def get_policy(name: str = typer.Argument(...), output: Output = OutputOpt):
    """A policy's document and attachments."""
    p = client().get(f"/v1/iam/policies/{name}")
    if output == Output.json:
        render.as_json(p)
        return
    render.console.print(f"[bold]{p['name']}[/bold]  {'built-in' if p['builtin'] else 'custom'}, "
                         f"attached to {', '.join(p['attached_to']) or 'nothing'}")
    render.console.print(escape(p["document"]), highlight=False)


@iam_app.command("delete-policy")
def delete_policy(name: str = typer.Argument(...)):
    """Delete a custom policy (detach it everywhere first)."""
    client().delete(f"/v1/iam/policies/{name}")
    render.console.print(f"deleted policy {name}")


# -- access keys ------------------------------------------------------------------------------------

@iam_app.command("create-access-key")
def create_access_key(user: str | None = typer.Option(None, "--user"),
                      role: str | None = typer.Option(None, "--role"),
                      profile: str = typer.Option(..., "--profile", help="profile to write the key into"),
                      credentials_file: Path | None = typer.Option(
                          None, "--credentials-file",
                          help="default: DBPLANE_SHARED_CREDENTIALS_FILE or ~/.dbplane/credentials"),
                      output: Output = OutputOpt):
    """Create an access key and write it into a credentials profile (0600). The secret is
    shown nowhere else and cannot be retrieved again."""
    kind, name = _principal(user, role)
    path = credentials_file or credentials.shared_file()
    k = client().post(f"/v1/iam/{kind}s/{name}/access-keys")
    credentials.write_profile(path, profile, k["id"], k.pop("secret_access_key"))
    k["profile"], k["credentials_file"] = profile, str(path)
    render.sentence(k, output, f"created access key {k['id']} for {kind} {name}; its secret is in "
                    f"profile {profile} of {path} (use: dbplane --profile {profile} ...)")


@iam_app.command("list-access-keys")
def list_access_keys(user: str | None = typer.Option(None, "--user"),
                     role: str | None = typer.Option(None, "--role"), output: Output = OutputOpt):
    """A principal's access keys (ids and status; secrets are never shown)."""
    kind, name = _principal(user, role)
    items = client().get(f"/v1/iam/{kind}s/{name}/access-keys")
    render.output([{**k, "created": render.when(k["created_at"])} for k in items]
                  if output == Output.table else items, output, KEY_COLUMNS)


@iam_app.command("update-access-key")
def update_access_key(key_id: str = typer.Argument(...),
                      status: str = typer.Option(..., "--status", help="Active or Inactive")):
    """Deactivate a key (it stops working within seconds) or activate it again."""
    k = client().patch(f"/v1/iam/access-keys/{key_id}", {"status": status})
    render.console.print(f"access key {k['id']} is {k['status']}")


@iam_app.command("delete-access-key")
def delete_access_key(key_id: str = typer.Argument(...)):
    """Delete an access key for good."""
    client().delete(f"/v1/iam/access-keys/{key_id}")
    render.console.print(f"deleted access key {key_id}")


# -- questions --------------------------------------------------------------------------------------

@iam_app.command("simulate")
def simulate(action: str = typer.Option(..., "--action", help="e.g. db:DeleteDatabase"),
             resource: str = typer.Option(..., "--resource", help="e.g. db/orders"),
             user: str | None = typer.Option(None, "--user"), role: str | None = typer.Option(None, "--role"),
             source_ip: str = typer.Option("127.0.0.1", "--source-ip"),
             output: Output = OutputOpt):
    """What a principal's policies decide for one request, and why."""
    kind, name = _principal(user, role)
    d = client().post("/v1/iam/simulate", {"principal": f"{kind}/{name}", "action": action,
                                           "resource": resource, "source_ip": source_ip})
    render.sentence(d, output, f"{d['decision']}: {d['principal']} {d['action']} on {d['resource']} "
                    f"({d['reason']})")


@iam_app.command("whoami")
def whoami(output: Output = OutputOpt):
    """The principal whose access key this CLI signs with."""
    c = client()
    d = c.get("/v1/whoami")
    if c.session_token:
        d["access_key_id"], d["credentials"] = None, "session token (DBPLANE_SESSION_TOKEN)"
        render.sentence(d, output, f"{d['principal']} (session token from DBPLANE_SESSION_TOKEN)")
        return
    d["access_key_id"] = c.credentials.key_id if c.credentials else None
    d["credentials"] = c.credentials.source if c.credentials else None
    render.sentence(d, output, f"{d['principal']} (access key {d['access_key_id']} from {d['credentials']})")


@iam_app.command("get-session-token")
def get_session_token(duration_seconds: int = typer.Option(
        3600, "--duration-seconds", help="900 (15 minutes) to 43200 (12 hours)"),
        output: Output = OutputOpt):
    """A bearer token for the https API with this principal's permissions, for scripts and
    browsers that cannot sign requests. Use it with: export DBPLANE_SESSION_TOKEN=<token>"""
    d = client().post("/v1/session-token", {"duration_seconds": duration_seconds})
    if output == "json":
        render.as_json(d)
        return
    # the token alone on stdout (export DBPLANE_SESSION_TOKEN=$(dbplane iam get-session-token)),
    # unwrapped: a console would fold it at the terminal's width
    print(d["token"])
    print(f"session token for {d['principal']}, expires {render.when(d['expires_at'])}", file=sys.stderr)
