"""`dbplane kms ...`: the local KMS's keys, with verbs modelled on `aws kms`. Each is one
call to the API; key material is never shown (the API does not return it)."""

from __future__ import annotations

import json
from urllib.parse import quote

import typer
from rich.markup import escape

from . import render
from .common import Output, OutputOpt, client
from .iam_cmds import _read_document

kms_app = typer.Typer(no_args_is_help=True, help="KMS keys that encrypt backups: create, rotate, "
                      "disable, schedule deletion, key policies.")

RefArg = typer.Argument(..., metavar="KEY", help="key id (key-...) or alias (alias/NAME)")
COLUMNS = [("id", "KEY ID"), ("alias", "ALIAS"), ("state", "STATE"), ("current_version", "VERSION"),
           ("rotation", "ROTATION"), ("deletion", "DELETION DATE"), ("description", "DESCRIPTION")]


def _path(ref: str, action: str = "") -> str:
    return f"/v1/kms/keys/{quote(ref, safe='/')}" + (f"/{action}" if action else "")


def _row(k: dict) -> dict:
    return {**k, "alias": escape(k["alias"]) or "-", "description": escape(k["description"]),
            "rotation": f"every {k['rotation_days']} days" if k["rotation_days"] else "off",
            "deletion": render.when(k["deletion_date"]) or "-"}


def _show(k: dict, output: Output) -> None:
    if output == Output.json:
        render.as_json(k)
        return
    con = render.console
    con.print(f"[bold]{k['id']}[/bold]  {escape(k['alias']) or '(no alias)'}  {k['state']}")
    if k["description"]:
        con.print(f"  description  {escape(k['description'])}")
    con.print(f"  created      {render.when(k['created_at'])}")
    rotation = "off (rotate by hand with 'dbplane kms rotate-key')"
    if k["rotation_days"]:
        rotation = f"every {k['rotation_days']} days, last {render.when(k['rotated_at'])}"
        if k.get("next_rotation_at"):
            rotation += f", next {render.when(k['next_rotation_at'])}"
    con.print(f"  rotation     {rotation}")
    if k["deletion_date"]:
        con.print(f"  deletion     on {render.when(k['deletion_date'])} "
                  f"(cancel: dbplane kms cancel-key-deletion {k['id']})")
    if "used_by" in k:
        con.print("  used by      " + (escape("; ".join(k["used_by"])) or "nothing"))
    render.table([{"version": v["version"], "created": render.when(v["created_at"]),
                   "primary": "yes" if v["version"] == k["current_version"] else ""}
                  for v in k["versions"]],
                 [("version", "VERSION"), ("created", "CREATED"), ("primary", "PRIMARY")])


@kms_app.command("create-key")
def create_key(alias: str = typer.Option("", "--alias", help="alias/NAME, e.g. alias/orders-backup"),
               description: str = typer.Option("", "--description"),
               rotation_days: int = typer.Option(365, "--rotation-days",
                                                 help="automatic rotation period: 90-2560, 0 = off"),
               output: Output = OutputOpt):
    """Create a key (enabled, one version of fresh material)."""
    _show(client().post("/v1/kms/keys", {"alias": alias, "description": description,
                                         "rotation_days": rotation_days}), output)


@kms_app.command("list-keys")
def list_keys(output: Output = OutputOpt):
    """List keys with their state, current version and rotation."""
    rows = client().get("/v1/kms/keys")
    if output == Output.json:
        render.as_json(rows)
    else:
        render.table([_row(k) for k in rows], COLUMNS)


@kms_app.command("describe-key")
def describe_key(ref: str = RefArg, output: Output = OutputOpt):
    """Show a key: state, versions, rotation, deletion date and what uses it."""
    _show(client().get(_path(ref)), output)


@kms_app.command("update-key")
def update_key(ref: str = RefArg,
               description: str | None = typer.Option(None, "--description"),
               rotation_days: int | None = typer.Option(None, "--rotation-days",
                                                        help="90-2560, 0 = automatic rotation off"),
               output: Output = OutputOpt):
    """Change a key's description or automatic rotation period."""
    _show(client().patch(_path(ref), {"description": description, "rotation_days": rotation_days}),
          output)


@kms_app.command("rotate-key")
def rotate_key(ref: str = RefArg, output: Output = OutputOpt):
    """Rotate now: new material becomes primary; older versions still decrypt."""
    _show(client().post(_path(ref, "rotate")), output)


@kms_app.command("disable-key")
def disable_key(ref: str = RefArg, output: Output = OutputOpt):
    """Disable a key: it neither encrypts nor decrypts until enabled again."""
    _show(client().post(_path(ref, "disable")), output)


@kms_app.command("enable-key")
def enable_key(ref: str = RefArg, output: Output = OutputOpt):
    """Enable a disabled key."""
    _show(client().post(_path(ref, "enable")), output)


@kms_app.command("schedule-key-deletion")
def schedule_key_deletion(ref: str = RefArg,
                          pending_window_days: int = typer.Option(
                              30, "--pending-window-days", help="waiting period, 7-30 days"),
                          output: Output = OutputOpt):
    """Delete a key after a waiting period; refused while any backup, WAL archive, database
    or repository still needs it (checked again when the period ends)."""
    k = client().post(_path(ref, "schedule-deletion"), {"pending_days": pending_window_days})
    if output == Output.json:
        render.as_json(k)
    else:
        render.console.print(f"KMS key {k['id']} is pending deletion on {render.when(k['deletion_date'])}; "
                             f"cancel with 'dbplane kms cancel-key-deletion {k['id']}'", highlight=False)


@kms_app.command("cancel-key-deletion")
def cancel_key_deletion(ref: str = RefArg, output: Output = OutputOpt):
    """Cancel a scheduled deletion; the key comes back disabled (enable it to use it)."""
    k = client().post(_path(ref, "cancel-deletion"))
    if output == Output.json:
        render.as_json(k)
    else:
        render.console.print(f"KMS key {k['id']} is no longer pending deletion; it is {k['state']} "
                             f"(enable it with 'dbplane kms enable-key {k['id']}')", highlight=False)


@kms_app.command("get-key-policy")
def get_key_policy(ref: str = RefArg, output: Output = OutputOpt):
    """Print a key's key policy (a JSON document to edit and put back); a key never given
    one has the default, which lets IAM policies decide."""
    p = client().get(_path(ref, "policy"))
    if output == Output.json:
        render.as_json(p)
        return
    try:
        typer.echo(json.dumps(json.loads(p["policy"]), indent=2))
    except ValueError:
        typer.echo(p["policy"])


@kms_app.command("put-key-policy")
def put_key_policy(ref: str = RefArg,
                   policy: str = typer.Option(..., "--policy", help="JSON file (file://p.json) or -"),
                   bypass_lockout_check: bool = typer.Option(
                       False, "--bypass-lockout-check",
                       help="accept a policy under which nobody could change it again"),
                   output: Output = OutputOpt):
    """Replace a key's key policy: who may use, manage and delete the key (Principal "account"
    lets IAM policies decide). Refused if nobody could change it afterwards."""
    p = client().request("PUT", _path(ref, "policy"), json={
        "policy": _read_document(policy), "bypass_lockout_check": bypass_lockout_check})
    render.sentence(p, output, f"replaced the key policy of KMS key {p['key_id']}"
                    + (f" ({escape(p['alias'])})" if p["alias"] else ""))
