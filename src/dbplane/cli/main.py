"""`dbplane` command line. Every database verb is a call to the REST API; `up`, `down`
and the component runners (`controller`, `api`, `agent`) run processes on this machine."""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import sys
import time
from enum import StrEnum
from pathlib import Path

import typer
from rich.progress import BarColumn, Progress, TextColumn

from ..errors import DbplaneError, InvalidInput
from ..parameters import parse_params
from ..paths import Layout
from ..security import ca, tls
from . import allowlist_cmds, render
from .alarm_cmds import alarms_app
from .audit_cmds import audit_app
from .backup_cmds import backup_app, repository_app, snapshot_app
from .ca_cmds import ca_app
from .client import ApiClient, pgpass_file
from .common import Output, OutputOpt, client, root, state
from .doctor_cmds import doctor_app
from .iam_cmds import iam_app
from .kms_cmds import kms_app
from .metrics_cmds import metrics as metrics_command
from .top_cmds import top as top_command

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
                  help="dbplane: managed PostgreSQL on your own machines.")
db_app = typer.Typer(no_args_is_help=True, help="Create, inspect, change and delete databases.")
ops_app = typer.Typer(no_args_is_help=True, help="Long-running operations.")
replica_app = typer.Typer(no_args_is_help=True, help="Add, remove and promote read replicas.")
proxy_app = typer.Typer(no_args_is_help=True, help="The connection proxy of a database: endpoints, "
                        "pooling settings, statistics.")
app.add_typer(db_app, name="db")
allowlist_cmds.register(db_app)      # db allow | revoke | allowlist
app.add_typer(replica_app, name="replica")
app.add_typer(ops_app, name="ops")
app.add_typer(proxy_app, name="proxy")
app.add_typer(kms_app, name="kms")
app.add_typer(snapshot_app, name="snapshot")
app.add_typer(backup_app, name="backup")
app.add_typer(repository_app, name="repository")
app.add_typer(ca_app, name="ca")
app.add_typer(audit_app, name="audit")
app.add_typer(iam_app, name="iam")
app.add_typer(doctor_app, name="doctor")
app.add_typer(alarms_app, name="alarms")
app.command("metrics")(metrics_command)   # a database's metric history
app.command("top")(top_command)           # performance insights, live


@app.callback()
def _global(data_dir: Path | None = typer.Option(
                None, "--data-dir", envvar="DBPLANE_HOME",
                help="data root of the platform (default /var/lib/dbplane as root)"),
            api: str | None = typer.Option(None, "--api", envvar="DBPLANE_API",
                                              help="API URL (default: from the data root)"),
            profile: str | None = typer.Option(
                None, "--profile", envvar="DBPLANE_PROFILE",
                help="credentials profile (in ~/.dbplane/credentials or <data root>/credentials)")):
    state.data_dir = str(data_dir) if data_dir else None
    state.api = api
    state.profile = profile


# -- platform ---------------------------------------------------------------------------

@app.command()
def up(demo: bool = typer.Option(False, "--demo", help="also create a demo Multi-AZ database"),
       port_base: int | None = typer.Option(None, help="first of the ports to use "
                                               "(etcd, etcd peer, API; members from +10)"),
       pg_bin_dir: str | None = typer.Option(
           None, envvar="DBPLANE_PG_BIN_DIR",
           help="a system PostgreSQL 15+ bin directory instead of the embedded PostgreSQL 18 "
                "(fixed at the first 'up' of a data root)"),
       kms_passphrase_file: Path | None = typer.Option(
           None, "--kms-passphrase-file", envvar="DBPLANE_KMS_PASSPHRASE_FILE",
           help="seal the KMS root key with the passphrase in this file (fixed at the first 'up'; "
                "needed at every 'up' after)"),
       api_tls: bool = typer.Option(True, "--api-tls/--no-api-tls",
                                    help="serve the API over https with a certificate from the "
                                         "platform CA (kept once chosen)")):
    """Start etcd, the controller, the API and three agents (zones a, b, c) on 127.0.0.1."""
    from ..platform import launcher
    info = launcher.up(root(), port_base, pg_bin_dir,
                       say=lambda m: render.err_console.print(f"  {m}"),
                       kms_passphrase_file=kms_passphrase_file, api_tls=api_tls)
    render.console.print(f"dbplane is up: API {info.api_url}, etcd {info.etcd_url}, "
                         f"data in {root()}")
    if demo:
        c = client()
        existing = {d["name"] for d in c.get("/v1/databases")}
        if "demo" not in existing:
            op = c.post("/v1/databases", {"name": "demo", "class": "micro", "multi_az": True,
                                          "replicas": 1})
            wait_operation(c, op)
        d = c.get("/v1/databases/demo")
        render.describe_database(d)
        render.console.print(f"\nconnect:  dbplane db connect demo"
                             f"\n          psql '{libpq_url(d, reader=False)}'")


@app.command()
def bootstrap(etcd: str = typer.Option(..., help="etcd client URL"),
              kms_passphrase_file: Path | None = typer.Option(
                  None, "--kms-passphrase-file", envvar="DBPLANE_KMS_PASSPHRASE_FILE",
                  help="seal the KMS root key with the passphrase in this file")):
    """Prepare a platform whose components you start one by one (what 'up' does itself):
    the KMS root key in the data root, the platform's keys, and user admin with its
    credentials in <data root>/credentials."""
    from ..platform import launcher
    path = launcher.bootstrap(root(), etcd, say=lambda m: render.err_console.print(f"  {m}"),
                              kms_passphrase_file=kms_passphrase_file)
    render.console.print(f"bootstrapped: admin credentials in {path} (profile default)")


@app.command()
def down():
    """Stop every component of the platform; data is kept for the next 'dbplane up'."""
    from ..platform import launcher
    stopped = launcher.down(root(), say=lambda m: render.err_console.print(f"  {m}"))
    render.console.print("dbplane is down" if stopped else "dbplane was not running")


@app.command()
def status(output: Output = OutputOpt):
    """Which components of the platform run on this machine."""
    from ..platform import launcher
    rows = [{"component": c, "pid": pid, "state": "running" if pid else "stopped"}
            for c, pid in launcher.status(root()).items()]
    render.output(rows, output.value, [("component", "COMPONENT"), ("state", "STATE"),
                                       ("pid", "PID")])


@app.command()
def hosts(output: Output = OutputOpt):
    """Agents (hosts) that are alive, with their zones."""
    render.output(client().get("/v1/hosts"), output.value,
                  [("name", "HOST"), ("zone", "ZONE"), ("address", "ADDRESS")])


@app.command()
def classes(output: Output = OutputOpt):
    """Instance classes and the PostgreSQL settings they map to."""
    rows = client().get("/v1/classes")
    for r in rows:
        r["shared_buffers"] = r["settings"]["shared_buffers"]
        r["work_mem"] = r["settings"]["work_mem"]
    render.output(rows, output.value, [("name", "CLASS"), ("memory_mb", "MEMORY MB"),
                                       ("max_connections", "MAX CONN"),
                                       ("shared_buffers", "SHARED BUFFERS"),
                                       ("work_mem", "WORK MEM"), ("description", "")])


# -- databases ----------------------------------------------------------------------------

def wait_operation(c: ApiClient, op: dict, timeout: float = 900.0) -> dict:
    """Poll an operation with a progress bar on stderr; raise if it fails."""
    deadline = time.monotonic() + timeout
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  console=render.err_console, transient=True) as progress:
        task = progress.add_task(f"{op['kind']} {op['database']}", total=100)
        while op["state"] not in ("succeeded", "failed"):
            if time.monotonic() > deadline:
                raise DbplaneError(f"operation {op['id']} still {op['state']} after {timeout:.0f}s",
                                   f"follow it with 'dbplane ops show {op['id']}'", code="timeout")
            time.sleep(0.5)
            op = c.get(f"/v1/operations/{op['id']}")
            progress.update(task, completed=op["progress"],
                            description=f"{op['kind']} {op['database']}: {op['message']}"[:90])
    if op["state"] == "failed":
        err = op.get("error") or {"code": "operation_failed", "message": op["message"], "hint": ""}
        raise DbplaneError(err["message"], err.get("hint", ""), code=err["code"])
    return op


def _started(op: dict, wait: bool, output: Output) -> None:
    if wait:
        op = wait_operation(client(), op)
    if output == Output.json:
        render.as_json(op)
    else:
        render.console.print(f"{op['kind']} {op['database']}: operation {op['id']} {op['state']}"
                             + ("" if wait else f" (follow: dbplane ops show {op['id']})"))


@db_app.command("create")
def db_create(name: str,
              instance_class: str = typer.Option("small", "--class", help="see 'dbplane classes'"),
              multi_az: bool = typer.Option(False, "--multi-az/--no-multi-az",
                                            help="synchronous standby in another zone"),
              replicas: int = typer.Option(0, help="asynchronous read replicas"),
              storage_gb: int = typer.Option(10, help="storage quota in GB"),
              param: list[str] = typer.Option([], "--param", help="PostgreSQL setting k=v"),
              backups: bool = typer.Option(True, "--backups/--no-backups",
                                           help="continuous WAL archive and automated backups"),
              backup_retention_days: int = typer.Option(7, help="days automated backups are kept (1-35)"),
              allow: list[str] = typer.Option([], "--allow", help="CIDR whose clients may connect "
                                              "(repeatable; default: loopback only)"),
              metrics_interval: int = typer.Option(
                  10, "--metrics-interval", help="seconds between metric samples of the members (1-60)"),
              wait: bool = typer.Option(False, "--wait", help="wait until available"),
              output: Output = OutputOpt):
    """Create a database."""
    op = client().post("/v1/databases", {
        "name": name, "class": instance_class, "multi_az": multi_az, "replicas": replicas,
        "storage_gb": storage_gb, "params": parse_params(param), "backups": backups,
        "backup_retention_days": backup_retention_days, "metrics_interval": metrics_interval,
        "allowlist": [{"cidr": c} for c in allow] if allow else None})
    _started(op, wait, output)


@db_app.command("restore")
def db_restore(name: str = typer.Argument(..., help="the new database"),
               from_snapshot: str | None = typer.Option(None, "--from-snapshot", help="a snapshot id"),
               source: str | None = typer.Option(None, "--from", help="restore this database ..."),
               to_time: str | None = typer.Option(
                   None, "--to-time", help="... as it was at this time (ISO 8601, UTC unless "
                                           "an offset is given, e.g. 2026-11-24T03:50:00Z)"),
               latest: bool = typer.Option(False, "--latest", help="... at its latest restorable time"),
               repository: str | None = typer.Option(
                   None, "--repository", help="restore from the copy in this repository "
                                              "(see 'dbplane snapshot copy')"),
               instance_class: str = typer.Option("small", "--class", help="see 'dbplane classes'"),
               multi_az: bool = typer.Option(False, "--multi-az/--no-multi-az"),
               replicas: int = typer.Option(0, help="asynchronous read replicas"),
               storage_gb: int = typer.Option(10, help="storage quota in GB"),
               backups: bool = typer.Option(True, "--backups/--no-backups",
                                            help="continuous WAL archive and automated backups"),
               allow: list[str] = typer.Option([], "--allow", help="CIDR whose clients may connect "
                                               "(repeatable; default: loopback only)"),
               wait: bool = typer.Option(False, "--wait", help="wait until available"),
               output: Output = OutputOpt):
    """Create a database from a snapshot, or from another database's backups at a point in
    time (see 'dbplane db describe' for its restorable window)."""
    op = client().post("/v1/databases/restore", {
        "name": name, "class": instance_class, "multi_az": multi_az, "replicas": replicas,
        "storage_gb": storage_gb, "snapshot": from_snapshot, "source": source, "backups": backups,
        "repository": repository, "allowlist": [{"cidr": c} for c in allow] if allow else None,
        "time": parse_time(to_time) if to_time else None, "latest": latest})
    _started(op, wait, output)


def parse_time(text: str) -> float:
    try:
        t = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidInput(f"invalid time {text!r}", "write it as ISO 8601, e.g. 2026-11-24T03:50:00Z",
                           code="invalid_time") from None
    return (t if t.tzinfo else t.replace(tzinfo=datetime.UTC)).timestamp()


@db_app.command("list")
def db_list(output: Output = OutputOpt):
    """List databases."""
    rows = client().get("/v1/databases")
    for r in rows:
        r["writer"] = r["endpoints"]["writer"]
        r["az"] = "multi" if r["multi_az"] else "single"
    render.output(rows, output.value, [("name", "NAME"), ("status", "STATUS"), ("class", "CLASS"),
                                       ("az", "AZ"), ("members", "MEMBERS"), ("writer", "WRITER")])


@db_app.command("describe")
def db_describe(name: str, output: Output = OutputOpt):
    """Show a database: status, endpoints and members with their roles and lag."""
    d = client().get(f"/v1/databases/{name}")
    if output == Output.json:
        render.as_json(d)
    else:
        render.describe_database(d)


@db_app.command("switchover")
def db_switchover(name: str,
                  to: str | None = typer.Option(None, "--to", help="member to promote "
                                                   "(default: the synchronous standby)"),
                  wait: bool = typer.Option(False, "--wait", help="wait for the new primary"),
                  output: Output = OutputOpt):
    """Planned switchover of the primary to the standby: no committed write is lost."""
    _started(client().post(f"/v1/databases/{name}/switchover", {"to": to}), wait, output)


@db_app.command("failover")
def db_failover(name: str,
                to: str | None = typer.Option(None, "--to", help="member to promote "
                                                 "(default: the synchronous standby)"),
                wait: bool = typer.Option(False, "--wait", help="wait for the new primary"),
                output: Output = OutputOpt):
    """Forced failover to the standby, for drills: the primary is demoted at once."""
    _started(client().post(f"/v1/databases/{name}/failover", {"to": to}), wait, output)


@db_app.command("modify")
def db_modify(name: str,
              instance_class: str | None = typer.Option(None, "--class",
                                                           help="see 'dbplane classes'"),
              param: list[str] = typer.Option([], "--param", help="PostgreSQL setting k=v"),
              multi_az: bool | None = typer.Option(None, "--multi-az/--no-multi-az",
                                                      help="add or remove the standby"),
              storage_gb: int | None = typer.Option(None, help="new storage quota in GB"),
              credential_rotation_days: int | None = typer.Option(
                  None, "--credential-rotation-days", help="rotate the internal and admin passwords "
                  "every N days (0: off)"),
              metrics_interval: int | None = typer.Option(
                  None, "--metrics-interval", help="seconds between metric samples of the members (1-60)"),
              wait: bool = typer.Option(False, "--wait", help="wait until applied"),
              output: Output = OutputOpt):
    """Change class, parameters or Multi-AZ. Settings that need a restart are applied by a
    rolling restart: replicas first, then a switchover to the standby."""
    op = client().patch(f"/v1/databases/{name}", {
        "class": instance_class, "params": parse_params(param), "multi_az": multi_az,
        "storage_gb": storage_gb, "credential_rotation_days": credential_rotation_days,
        "metrics_interval": metrics_interval})
    restart = op["params"].get("restart") or []
    if restart and output == Output.table:
        render.err_console.print(f"{', '.join(restart)} take effect after a restart: rolling "
                                 "restart, replicas first" + ("" if wait else
                                 f"; follow with 'dbplane db describe {name}'"), highlight=False)
    _started(op, wait, output)


@db_app.command("rotate-credentials")
def db_rotate_credentials(name: str, wait: bool = typer.Option(False, "--wait", help="wait until done"),
                          output: Output = OutputOpt):
    """New internal superuser (also the proxy's and backup workers' login), replication,
    rewind and admin passwords, without restarting anything; the admin pgpass file is
    rewritten. Schedule it with 'db modify --credential-rotation-days N'."""
    _started(client().post(f"/v1/databases/{name}/rotate-credentials"), wait, output)


@db_app.command("delete")
def db_delete(name: str,
              final_snapshot: str | None = typer.Option(
                  None, "--final-snapshot", help="take this snapshot first; it is kept until you delete it"),
              wait: bool = typer.Option(False, "--wait"), output: Output = OutputOpt):
    """Delete a database and all its members' data (automated backups go with it;
    snapshots stay)."""
    _started(client().delete(f"/v1/databases/{name}", final_snapshot=final_snapshot), wait, output)


def libpq_url(d: dict, reader: bool, verify_full: bool = True) -> str:
    """verify_full: TLS verified against the platform CA (when this data root has it)."""
    endpoint = d["endpoints"]["reader" if reader else "writer"]
    if not endpoint:
        raise DbplaneError(f"database {d['name']} has no {'reader' if reader else 'writer'} "
                           "endpoint yet", f"its status is {d['status']}: {d['status_message']}",
                           code="no_endpoint")
    url = (f"postgresql://{d['admin_user']}@{endpoint}/postgres"
           f"?passfile={pgpass_file(state.data_dir, d['name'])}")
    if verify_full and ca.cert_path(root()).exists():
        url += f"&sslmode=verify-full&sslrootcert={ca.cert_path(root())}"
    return url


@db_app.command("url")
def db_url(name: str, reader: bool = typer.Option(False, "--reader", help="the reader endpoint")):
    """Print a libpq URL for the database (the password stays in a 0600 passfile)."""
    print(libpq_url(client().get(f"/v1/databases/{name}"), reader))


@db_app.command("token")
def db_token(name: str, user: str = typer.Option(..., "--user", help="the database user (a member "
                                                 "of dbplane_iam)"),
             expires_in: int = typer.Option(900, "--expires-in", min=60, max=900,
                                            help="seconds, at most 900")):
    """Print a 15-minute IAM token to log in to the database as USER through its endpoints
    (use it as the password, over TLS: PGPASSWORD=$(dbplane db token ...)). It is signed
    here with your access key; the proxy checks it and your db:Connect permission."""
    from ..models import NAME_RE
    from ..security import credentials, dbtoken
    if not NAME_RE.fullmatch(name):
        raise InvalidInput(f"invalid database name {name!r}", "see 'dbplane db list'", code="invalid_name")
    creds = credentials.resolve(root(), state.profile)
    if creds is None:
        raise InvalidInput("no credentials to sign the token with", "use --profile, DBPLANE_PROFILE "
                           "or DBPLANE_ACCESS_KEY_ID/DBPLANE_SECRET_ACCESS_KEY", code="no_credentials")
    print(dbtoken.generate(creds.key_id, creds.secret, name, user, lifetime=expires_in))


@db_app.command("connect")
def db_connect(name: str, reader: bool = typer.Option(False, "--reader")):
    """Open psql on the database's writer (or reader) endpoint."""
    from ..system import postgres_bin_dir
    d = client().get(f"/v1/databases/{name}")
    psql = tls.psql_with_tls(postgres_bin_dir())
    if psql is None and d.get("tls", {}).get("require_tls", True):
        raise DbplaneError(f"database {name} requires TLS and the embedded psql cannot do TLS",
                           "install a psql built with OpenSSL (e.g. apt-get install postgresql-client) "
                           f"or use 'dbplane db url {name}' with another client", code="no_tls_client")
    url = libpq_url(d, reader, verify_full=psql is not None)
    psql = psql or os.path.join(postgres_bin_dir(), "psql")
    os.execv(psql, [psql, url])


# -- read replicas -------------------------------------------------------------------------

@replica_app.command("add")
def replica_add(name: str,
                zone: str | None = typer.Option(None, "--zone", help="zone to place it in "
                                                   "(default: the least used)"),
                wait: bool = typer.Option(False, "--wait", help="wait until it streams"),
                output: Output = OutputOpt):
    """Add an asynchronous read replica to a database."""
    _started(client().post(f"/v1/databases/{name}/replicas", {"zone": zone}), wait, output)


@replica_app.command("remove")
def replica_remove(name: str, member: str, wait: bool = typer.Option(False, "--wait"),
                   output: Output = OutputOpt):
    """Stop a read replica and delete its data."""
    _started(client().delete(f"/v1/databases/{name}/replicas/{member}"), wait, output)


@replica_app.command("promote")
def replica_promote(name: str, member: str,
                    new_name: str | None = typer.Option(None, "--new-name",
                                                           help="name of the new database "
                                                           "(default: the member's name)"),
                    wait: bool = typer.Option(False, "--wait", help="wait until available"),
                    output: Output = OutputOpt):
    """Turn a read replica into a standalone database with its data (it leaves NAME)."""
    _started(client().post(f"/v1/databases/{name}/replicas/{member}/promote",
                           {"new_name": new_name}), wait, output)


# -- connection proxy ---------------------------------------------------------------------

class PoolMode(StrEnum):
    transaction = "transaction"
    session = "session"


@proxy_app.command("describe")
def proxy_describe(name: str, output: Output = OutputOpt):
    """Show a database's proxy: endpoints, settings, connection limits and running proxies."""
    d = client().get(f"/v1/databases/{name}/proxy")
    if output == Output.json:
        render.as_json(d)
    else:
        render.describe_proxy(d)


@proxy_app.command("stats")
def proxy_stats(name: str,
                per_proxy: bool = typer.Option(False, "--per-proxy", help="one row per proxy and pool"),
                output: Output = OutputOpt):
    """Pools of a database over every proxy, like PgBouncer's SHOW POOLS (tps/qps: last 10 s)."""
    d = client().get(f"/v1/databases/{name}/proxy/stats")
    if output == Output.json:
        render.as_json(d)
    else:
        render.proxy_stats(d, per_proxy)


@proxy_app.command("modify")
def proxy_modify(name: str,
                 pool_mode: PoolMode | None = typer.Option(None, "--pool-mode",
                                                           help="transaction or session pooling"),
                 pool_size: int | None = typer.Option(None, help="server connections per database, "
                                                      "user and node, per proxy"),
                 reserve_connections: int | None = typer.Option(
                     None, help="connections of max_connections proxies leave free"),
                 max_client_connections: int | None = typer.Option(None, help="clients per proxy"),
                 queue_timeout: float | None = typer.Option(
                     None, help="seconds a client waits for a server connection"),
                 idle_server_timeout: float | None = typer.Option(
                     None, help="seconds before an idle server connection closes"),
                 idle_client_timeout: float | None = typer.Option(
                     None, help="seconds before an idle client is closed (0: never)"),
                 failover_hold: float | None = typer.Option(
                     None, help="seconds new transactions wait for a new primary"),
                 reader_max_lag_mb: int | None = typer.Option(
                     None, min=0, help="replicas lagging more MiB get no reads"),
                 read_your_writes_user: list[str] = typer.Option(
                     [], "--read-your-writes-user",
                     help="user whose reads follow its writes (repeatable; replaces the list)"),
                 no_read_your_writes_users: bool = typer.Option(
                     False, "--no-read-your-writes-users", help="empty the list"),
                 output: Output = OutputOpt):
    """Change proxy settings; every proxy applies them at once, without a restart."""
    if read_your_writes_user and no_read_your_writes_users:
        raise DbplaneError("--read-your-writes-user and --no-read-your-writes-users exclude each other",
                           "pass one of them", code="invalid_input")
    body = {"pool_mode": pool_mode.value if pool_mode else None, "pool_size": pool_size,
            "reserve_connections": reserve_connections,
            "max_client_connections": max_client_connections, "queue_timeout": queue_timeout,
            "idle_server_timeout": idle_server_timeout, "idle_client_timeout": idle_client_timeout,
            "failover_hold": failover_hold,
            "reader_max_lag_bytes": None if reader_max_lag_mb is None else reader_max_lag_mb * 2**20,
            "read_your_writes_users": [] if no_read_your_writes_users else read_your_writes_user or None}
    body = {k: v for k, v in body.items() if v is not None}
    if not body:
        raise DbplaneError("nothing to modify", "pass at least one option (see 'dbplane proxy modify "
                           "--help')", code="nothing_to_modify")
    d = client().patch(f"/v1/databases/{name}/proxy", body)
    if output == Output.json:
        render.as_json(d)
    else:
        render.proxy_settings(d["settings"])


# -- operations and events ----------------------------------------------------------------

@ops_app.command("list")
def ops_list(database: str | None = typer.Option(None, "--database", "-d"),
             output: Output = OutputOpt):
    """List operations, oldest first."""
    rows = client().get("/v1/operations", database=database)
    for r in rows:
        r["created"] = render.when(r["created_at"])
    render.output(rows, output.value, [("id", "ID"), ("kind", "KIND"), ("database", "DATABASE"),
                                       ("state", "STATE"), ("progress", "%"),
                                       ("created", "CREATED"), ("message", "MESSAGE")])


@ops_app.command("show")
def ops_show(op_id: str, output: Output = OutputOpt):
    """Show one operation with its events."""
    op = client().get(f"/v1/operations/{op_id}")
    if output == Output.json:
        render.as_json(op)
        return
    render.console.print(f"{op['id']}  {op['kind']} {op['database']}  {op['state']} "
                         f"{op['progress']}%")
    if op.get("error"):
        render.console.print(f"  error: {op['error']['message']}; {op['error']['hint']}")
    render.table([{"time": render.when(e["time"]), "message": e["message"]} for e in op["events"]],
                 [("time", "TIME"), ("message", "EVENT")])


@app.command()
def events(database: str | None = typer.Argument(None), limit: int = 50,
           output: Output = OutputOpt):
    """Recent events (failovers, placements, deletions), optionally for one database."""
    rows = client().get("/v1/events", database=database, limit=limit)
    for r in rows:
        r["when"] = render.when(r["time"])
    render.output(rows, output.value, [("when", "TIME"), ("database", "DATABASE"),
                                       ("kind", "KIND"), ("message", "MESSAGE")])


# -- component runners ----------------------------------------------------------------------

def _logging(component: str) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format=f"%(asctime)s {component} %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)


@app.command(hidden=False)
def controller(etcd: str = typer.Option(..., help="etcd URL, e.g. https://127.0.0.1:2379")):
    """Run the controller (reconcilers) in the foreground."""
    from ..controlplane.controller import Controller
    _logging("controller")
    asyncio.run(Controller(etcd, root()).run())


@app.command()
def api(etcd: str = typer.Option(..., help="etcd URL"),
        listen: str = typer.Option("127.0.0.1:8432", help="address:port to serve on"),
        tls_cert: Path | None = typer.Option(None, help="serve https with this certificate "
                                             "(from the platform CA; renewed in place)"),
        tls_key: Path | None = typer.Option(None, help="the certificate's private key")):
    """Run the REST API server in the foreground."""
    import uvicorn

    from ..httpapi.app import create_app
    from ..httpapi.https import GRACEFUL_SHUTDOWN_S, serve
    _logging("api")
    host, _, port = listen.rpartition(":")
    if tls_cert and tls_key:
        serve(create_app(etcd, root()), host, int(port), tls_cert, tls_key, root())
        return
    uvicorn.run(create_app(etcd, root()), host=host, port=int(port), log_level="warning",
                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)


@app.command()
def agent(etcd: str = typer.Option(..., help="etcd URL"),
          zone: str = typer.Option(..., help="zone label of this host, e.g. a"),
          name: str | None = typer.Option(None, help="host name (default: host-<zone>)"),
          address: str = typer.Option("127.0.0.1", help="address databases and proxies listen on"),
          proxy_workers: int = typer.Option(1, min=0, max=64,
                                            help="proxy processes on this host (they share the ports)")):
    """Run a host agent in the foreground: it supervises Patroni + PostgreSQL, the
    connection proxy and the backup worker (WAL archive, backups, restore checks) here."""
    from ..agent.agent import Agent
    from ..system import ensure_service_account
    _logging(f"agent-{zone}")
    host = name or f"host-{zone}"
    asyncio.run(Agent(etcd, host, zone, address, Layout(root()).host_dir(host),
                      ensure_service_account(), proxy_workers=proxy_workers).run())


def main() -> None:
    try:
        app()
    except DbplaneError as e:
        render.err_console.print(f"error: {e.message}" + (f"; {e.hint}" if e.hint else "")
                                 + f" ({e.code})", highlight=False, soft_wrap=True, markup=False)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
