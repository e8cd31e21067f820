"""`dbplane snapshot ...`, `dbplane backup ...` and `dbplane repository ...`: manual
snapshots and the backup catalog, a database's backup settings and WAL archive, and the
repositories backups are stored in, with verbs modelled on `aws rds` (create-db-snapshot,
describe-db-snapshots, delete-db-snapshot, modify-db-instance --backup-retention-period).
Each command is one call to the API (`snapshot create --wait` polls it)."""

from __future__ import annotations

import time
from enum import StrEnum
from urllib.parse import quote

import typer
from rich.markup import escape
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from ..errors import DbplaneError
from . import render
from .common import Output, OutputOpt, client

snapshot_app = typer.Typer(no_args_is_help=True, help="Manual snapshots of databases, and the "
                           "catalog of automated backups.")
backup_app = typer.Typer(no_args_is_help=True, help="Automated backups of a database: retention, "
                         "schedule, encryption key, repository; the WAL archive's state.")
repository_app = typer.Typer(no_args_is_help=True, help="Repositories that hold backups and "
                             "archived WAL: a directory or an S3 bucket.")


class SnapshotType(StrEnum):
    manual = "manual"
    automated = "automated"


class RepositoryKind(StrEnum):
    filesystem = "filesystem"
    s3 = "s3"


def size(n: int) -> str:
    """Human-readable bytes: kB below a megabyte, then MB, GB, TB (powers of 1024)."""
    for unit, scale in (("TB", 2**40), ("GB", 2**30), ("MB", 2**20)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 1024:.0f} kB" if n else "0 B"


def _id(value: str) -> str:
    return quote(value, safe="")


# -- snapshots -----------------------------------------------------------------------------------

SNAPSHOT_COLUMNS = [("id", "ID"), ("database", "DATABASE"), ("type", "TYPE"), ("kind", "KIND"),
                    ("state", "STATE"), ("created", "CREATED"), ("size", "SIZE"), ("stored", "STORED"),
                    ("repository", "REPOSITORY")]


def _snapshot_row(s: dict) -> dict:
    return {**s, "created": render.when(s["started_at"]),
            "size": size(s["size_bytes"]) if s["size_bytes"] else "-",
            "stored": size(s["stored_bytes"]) if s["stored_bytes"] else "-"}


def _show_snapshot(s: dict, output: Output) -> None:
    if output == Output.json:
        render.as_json(s)
        return
    con = render.console
    con.print(f"[bold]{escape(s['id'])}[/bold]  {s['type']} {s['kind']} backup of "
              f"{escape(s['database'])}  {s['state']}", highlight=False)
    lines = [("repository", s["repository"] + (f" (copies in {', '.join(s['copies'])})"
                                               if s["copies"] else "")),
             ("archive", s["archive_id"]),
             ("parent", s["parent"]),
             ("started", render.when(s["started_at"])),
             ("finished", render.when(s["finished_at"])),
             ("consistent", render.when(s["consistent_at"])),
             ("size", s["size_bytes"] and f"{size(s['size_bytes'])} of data, "
                                          f"{size(s['stored_bytes'])} stored"),
             ("taken from", s["source_member"] and f"{s['source_member']} on {s['host']}"),
             ("wal", s["start_lsn"] and f"{s['start_lsn']} to {s['stop_lsn'] or '?'}, "
                                        f"timeline {s['timeline']}"),
             ("kms key", s["kms_key_id"] and f"{s['kms_key_id']} version {s['kms_key_version']}"),
             ("verified", s.get("verified_at") and render.when(s["verified_at"])
              + (f": {s['verify_error']}" if s.get("verify_error") else ": intact")),
             ("error", s["error"])]
    for label, value in lines:
        if value:
            con.print(f"  {label:11}{escape(str(value))}", highlight=False)


def wait_snapshot(snapshot: dict, timeout: float) -> dict:
    """Poll until the snapshot is available (returned) or failed (raised), with a spinner
    on stderr."""
    c = client()
    deadline = time.monotonic() + timeout
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=render.err_console, transient=True) as progress:
        task = progress.add_task(f"snapshot {snapshot['id']}: {snapshot['state']}")
        while snapshot["state"] in ("pending", "running"):
            if time.monotonic() > deadline:
                raise DbplaneError(
                    f"snapshot {snapshot['id']} still {snapshot['state']} after {timeout:.0f}s",
                    f"follow it with 'dbplane snapshot describe {snapshot['id']}'", code="timeout")
            time.sleep(1.0)
            snapshot = c.get(f"/v1/snapshots/{_id(snapshot['id'])}")
            done = f", {size(snapshot['size_bytes'])}" if snapshot["size_bytes"] else ""
            progress.update(task, description=f"snapshot {snapshot['id']}: {snapshot['state']}{done}")
    if snapshot["state"] != "available":
        raise DbplaneError(f"snapshot {snapshot['id']} {snapshot['state']}"
                           + (f": {snapshot['error']}" if snapshot["error"] else ""),
                           f"see 'dbplane events {snapshot['database']}', then delete it with "
                           f"'dbplane snapshot delete {snapshot['id']}'", code="snapshot_failed")
    return snapshot


@snapshot_app.command("create")
def snapshot_create(database: str = typer.Argument(..., metavar="DB"),
                    snapshot_id: str | None = typer.Option(
                        None, "--id", help="1-63 lowercase letters, digits and '-', starting with a "
                                           "letter (default: DB-yyyymmddhhmmss, UTC)"),
                    wait: bool = typer.Option(False, "--wait", help="wait until it is available"),
                    timeout: float = typer.Option(3600.0, "--timeout", help="seconds --wait waits"),
                    output: Output = OutputOpt):
    """Take a manual snapshot: a full backup kept until you delete it."""
    s = client().post(f"/v1/databases/{_id(database)}/snapshots", {"id": snapshot_id})
    if wait:
        s = wait_snapshot(s, timeout)
    if output == Output.json:
        render.as_json(s)
    else:
        render.console.print(f"snapshot {s['id']} of {s['database']}: {s['state']}"
                             + ("" if wait else f" (follow: dbplane snapshot describe {s['id']})"),
                             highlight=False)


@snapshot_app.command("list")
def snapshot_list(database: str | None = typer.Option(None, "--database", "-d"),
                  snapshot_type: SnapshotType | None = typer.Option(None, "--type",
                                                                    help="manual or automated"),
                  output: Output = OutputOpt):
    """List snapshots and automated backups, newest first."""
    rows = client().get("/v1/snapshots", database=database,
                        type=snapshot_type.value if snapshot_type else None)
    if output == Output.json:
        render.as_json(rows)
    else:
        render.table([_snapshot_row(s) for s in rows], SNAPSHOT_COLUMNS)


@snapshot_app.command("describe")
def snapshot_describe(snapshot_id: str = typer.Argument(..., metavar="ID"), output: Output = OutputOpt):
    """Show a snapshot or automated backup: state, sizes, WAL range, key, verification."""
    _show_snapshot(client().get(f"/v1/snapshots/{_id(snapshot_id)}"), output)


@snapshot_app.command("copy")
def snapshot_copy(snapshot_id: str = typer.Argument(..., metavar="ID"),
                  repository: str = typer.Option(..., "--to-repository", help="the repository to copy it to"),
                  wait: bool = typer.Option(False, "--wait", help="wait until the copy is complete"),
                  timeout: float = typer.Option(3600.0, "--timeout", help="seconds --wait waits"),
                  output: Output = OutputOpt):
    """Copy a snapshot or automated backup to another repository (the cross-region copy),
    encrypted again under that repository's KMS key."""
    c = client()
    s = c.post(f"/v1/snapshots/{_id(snapshot_id)}/copy", {"repository": repository})
    deadline = time.monotonic() + timeout
    while wait and repository not in s["copies"]:
        if time.monotonic() > deadline:
            raise DbplaneError(f"the copy of {snapshot_id} to {repository} is not done after {timeout:.0f}s",
                               f"follow it with 'dbplane snapshot describe {snapshot_id}'", code="timeout")
        time.sleep(1.0)
        s = c.get(f"/v1/snapshots/{_id(snapshot_id)}")
    if output == Output.json:
        render.as_json(s)
    else:
        render.console.print(f"{s['id']}: " + (f"copied to {repository}" if repository in s["copies"]
                                                else f"copying to {repository}"), highlight=False)


@snapshot_app.command("delete")
def snapshot_delete(snapshot_id: str = typer.Argument(..., metavar="ID"), output: Output = OutputOpt):
    """Delete a manual snapshot (its files are removed in the background)."""
    s = client().delete(f"/v1/snapshots/{_id(snapshot_id)}")
    if output == Output.json:
        render.as_json(s)
    else:
        render.console.print(f"snapshot {s['id']} of {s['database']}: {s['state']}", highlight=False)


# -- backup settings ---------------------------------------------------------------------------

def _show_backup(d: dict, output: Output) -> None:
    if output == Output.json:
        render.as_json(d)
        return
    con, st = render.console, d["settings"]
    con.print(f"[bold]{escape(d['database'])}[/bold]  automated backups "
              f"{'on' if st['enabled'] else 'off'}", highlight=False)
    a = d["archive"]
    if a:
        con.print(f"  archive     {a['state']}, {size(a['lag_bytes'])} / {a['lag_seconds']:.1f} s behind, "
                  f"archived up to {a['archived_lsn'] or '-'} (timeline {a['timeline']}), "
                  f"last at {render.when(a['last_archived_at']) or '-'}", highlight=False)
        if a["error"]:
            con.print(f"  error       {escape(a['error'])}", highlight=False)
    else:
        con.print("  archive     not started")
    con.print(f"  backups     {d['backups']} available ({d['snapshots']} of them snapshots)",
              highlight=False)
    if d.get("earliest_restorable_time"):
        con.print(f"  restorable  {render.when(d['earliest_restorable_time'])} to "
                  f"{render.when(d['latest_restorable_time'])}", highlight=False)
    drill = d.get("last_drill")
    if drill:
        took = f", restored in {drill['restore_seconds']:.0f} s" if drill["restore_seconds"] else ""
        con.print(f"  last drill  {drill['state']} ({render.when(drill['started_at'])}, backup "
                  f"{drill['backup_id']}{took})" + (f": {drill['error']}" if drill["error"] else ""),
                  highlight=False, markup=False)
    render.table([{"name": k, "value": "-" if v == "" else v} for k, v in st.items()],
                 [("name", "SETTING"), ("value", "VALUE")])


@backup_app.command("drills")
def backup_drills(database: str = typer.Argument(..., metavar="DB"), output: Output = OutputOpt):
    """Restore drills: the newest backup restored to a scratch database and checked."""
    rows = client().get(f"/v1/databases/{_id(database)}/drills")
    for r in rows:
        r["started"] = render.when(r["started_at"])
        r["restore_s"] = f"{r['restore_seconds']:.0f}" if r["restore_seconds"] else "-"
    render.output(rows, output.value, [("id", "DRILL"), ("backup_id", "BACKUP"), ("state", "STATE"),
                                       ("started", "STARTED"), ("restore_s", "RESTORE S"),
                                       ("tables_checked", "TABLES"), ("error", "ERROR")])


@backup_app.command("describe")
def backup_describe(database: str = typer.Argument(..., metavar="DB"), output: Output = OutputOpt):
    """Show a database's backup settings and its WAL archive: state, lag, archived LSN."""
    _show_backup(client().get(f"/v1/databases/{_id(database)}/backup"), output)


@backup_app.command("verify")
def backup_verify(snapshot_id: str = typer.Argument(..., metavar="ID", help="a snapshot or automated backup"),
                  wait: bool = typer.Option(True, "--wait/--no-wait", help="wait for the result"),
                  timeout: float = typer.Option(3600.0, "--timeout", help="seconds --wait waits"),
                  output: Output = OutputOpt):
    """Check a stored backup without restoring it: every file against the SHA-256 in its
    manifest, and the WAL it needs. Exits 1 if it is damaged."""
    c = client()
    s = c.post(f"/v1/snapshots/{_id(snapshot_id)}/verify", {})
    asked = s["verify_requested_at"]
    deadline = time.monotonic() + timeout
    while wait and (s.get("verified_at") or 0) < asked:
        if time.monotonic() > deadline:
            raise DbplaneError(f"verification of {snapshot_id} not done after {timeout:.0f}s",
                               f"follow it with 'dbplane snapshot describe {snapshot_id}'", code="timeout")
        time.sleep(0.5)
        s = c.get(f"/v1/snapshots/{_id(snapshot_id)}")
    if output == Output.json:
        render.as_json(s)
    elif wait:
        render.console.print(f"{s['id']}: " + (f"damaged: {s['verify_error']}" if s["verify_error"]
                                                else "intact (checksums and WAL verified)"),
                             highlight=False, markup=False)
    if wait and s["verify_error"]:
        raise DbplaneError(f"backup {s['id']} is damaged: {s['verify_error']}",
                           "restore from another backup; take a new snapshot", code="backup_corrupt")


@backup_app.command("modify")
def backup_modify(database: str = typer.Argument(..., metavar="DB"),
                  retention_days: int | None = typer.Option(
                      None, "--retention-days", help="keep automated backups this many days (1-35)"),
                  window: str | None = typer.Option(
                      None, "--window", help="HH:MM-HH:MM (UTC) for full backups; \"\" = any time"),
                  full_every_hours: float | None = typer.Option(
                      None, "--full-every-hours", help="hours between full backups"),
                  incremental_every_hours: float | None = typer.Option(
                      None, "--incremental-every-hours", help="0 = full backups only"),
                  kms_key: str | None = typer.Option(None, "--kms-key", help="key id or alias that "
                                                     "encrypts backups and WAL"),
                  repository: str | None = typer.Option(None, "--repository", help="where backups go"),
                  copy_to: str | None = typer.Option(None, "--copy-to", help="a second repository "
                                                     "receiving copies; \"\" = none"),
                  drill_every_hours: float | None = typer.Option(
                      None, "--drill-every-hours", help="restore drills; 0 = off"),
                  archive_timeout: float | None = typer.Option(
                      None, "--archive-timeout", help="seconds between uploads of a partial WAL segment"),
                  enabled: bool | None = typer.Option(None, "--enable/--disable",
                                                      help="turn automated backups on or off"),
                  output: Output = OutputOpt):
    """Change backup settings; they apply at once, without a restart."""
    body = {"retention_days": retention_days, "window": window, "full_every_hours": full_every_hours,
            "incremental_every_hours": incremental_every_hours, "kms_key": kms_key,
            "repository": repository, "copy_to": copy_to, "drill_every_hours": drill_every_hours,
            "archive_timeout": archive_timeout, "enabled": enabled}
    body = {k: v for k, v in body.items() if v is not None}
    if not body:
        raise DbplaneError("nothing to modify", "pass at least one option (see 'dbplane backup modify "
                           "--help')", code="nothing_to_modify")
    _show_backup(client().patch(f"/v1/databases/{_id(database)}/backup", body), output)


# -- repositories ------------------------------------------------------------------------------

REPOSITORY_COLUMNS = [("name", "NAME"), ("kind", "KIND"), ("location", "LOCATION"),
                      ("kms_key", "KMS KEY"), ("created", "CREATED")]


def _location(r: dict) -> str:
    if r["kind"] == "filesystem":
        return r["path"]
    where = f"s3://{r['bucket']}/{r['prefix'].strip('/')}" if r["prefix"].strip("/") else f"s3://{r['bucket']}"
    return f"{where} at {r['endpoint']}"


def _show_repository(r: dict, output: Output) -> None:
    if output == Output.json:
        render.as_json(r)
        return
    con = render.console
    con.print(f"[bold]{escape(r['name'])}[/bold]  {r['kind']}  {escape(_location(r))}", highlight=False)
    if r["kind"] == "s3":
        con.print(f"  region       {r['region']}", highlight=False)
        con.print(f"  credentials  {escape(r['credentials_file'])}", highlight=False)
    con.print(f"  kms key      {escape(r['kms_key'])} (encrypts copies written here)", highlight=False)
    con.print(f"  created      {render.when(r['created_at'])}", highlight=False)
    if "used_by" in r:
        con.print("  used by      " + (escape("; ".join(r["used_by"])) or "nothing"), highlight=False)


@repository_app.command("create")
def repository_create(name: str,
                      kind: RepositoryKind = typer.Option(..., "--kind", help="filesystem or s3"),
                      path: str = typer.Option("", "--path", help="filesystem: an existing absolute "
                                               "directory, owned by the service account"),
                      endpoint: str = typer.Option("", "--endpoint", help="s3: endpoint URL, "
                                                   "e.g. https://s3.eu-west-1.amazonaws.com"),
                      bucket: str = typer.Option("", "--bucket", help="s3: an existing bucket"),
                      prefix: str = typer.Option("", "--prefix", help="s3: key prefix in the bucket"),
                      region: str = typer.Option("us-east-1", "--region", help="s3: region"),
                      credentials_file: str = typer.Option(
                          "", "--credentials-file", help="s3: absolute path of a 0600 file with "
                          "aws_access_key_id and aws_secret_access_key"),
                      kms_key: str = typer.Option("alias/dbplane/backup", "--kms-key",
                                                  help="key id or alias encrypting copies written here"),
                      output: Output = OutputOpt):
    """Add a repository; it is checked first (the directory exists, the bucket is reachable and
    writable)."""
    body = {"name": name, "kind": kind.value, "path": path, "endpoint": endpoint, "bucket": bucket,
            "prefix": prefix, "region": region, "credentials_file": credentials_file, "kms_key": kms_key}
    _show_repository(client().post("/v1/repositories", body), output)


@repository_app.command("list")
def repository_list(output: Output = OutputOpt):
    """List repositories."""
    rows = client().get("/v1/repositories")
    if output == Output.json:
        render.as_json(rows)
    else:
        render.table([{**r, "location": _location(r), "created": render.when(r["created_at"])}
                      for r in rows], REPOSITORY_COLUMNS)


@repository_app.command("describe")
def repository_describe(name: str, output: Output = OutputOpt):
    """Show a repository and what uses it (credentials are never shown, only their file)."""
    _show_repository(client().get(f"/v1/repositories/{_id(name)}"), output)


@repository_app.command("delete")
def repository_delete(name: str, output: Output = OutputOpt):
    """Remove a repository from the catalog: refused while a database or backup uses it. Its
    files are left where they are."""
    r = client().delete(f"/v1/repositories/{_id(name)}")
    if output == Output.json:
        render.as_json(r)
    else:
        render.console.print(f"repository {r['name']} deleted; its files at {_location(r)} are kept",
                             highlight=False, markup=False)
