"""`dbplane doctor [NAME] [--url URL]`: run the database checks (database.py) on what
probe.py reads.

A platform database is diagnosed in the API server: it reads the database's keys from etcd
once, connects to every running member as the internal superuser (password unsealed with
the KMS, as the security doctor does), asks every proxy for its pools, and asks each
member's host's metrics collector for the end of the member's log (PostgreSQL writes to
stderr, which each member's patroni.log holds) and its disk space. A URL is diagnosed in the
CLI's own process and gets only what the server itself can tell."""

from __future__ import annotations

import asyncio
from pathlib import Path
from urllib.parse import quote

import httpx
import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from ..controlplane.storage import used_bytes
from ..controlplane.topology import MemberView, Snapshot, member_views
from ..errors import DbplaneError
from ..metrics import remote
from ..models import ProxyInstance, ProxyLimits
from ..security import db_secrets
from ..store import Store, keys
from . import Finding, pglog, platform_checks, probe, sort
from . import database as checks
from .facts import Disk, NodeFacts, PlatformFacts, Workload

NODE_TIMEOUT = 10.0           # s to read one node (connections, statistics)
WORKLOAD_TIMEOUT = 12.0       # s for tables, pg_stat_statements and EXPLAINs of the primary
LOG_TAIL_BYTES = 4 * 2**20    # the end of each member's log that is searched for deadlocks
PROXY_TIMEOUT = 2.0


# -- platform databases ------------------------------------------------------------------------------

async def _snapshot(store: Store, name: str) -> Snapshot:
    raw: dict[str, bytes] = {}
    for prefix in (f"{keys.databases()}{name}/", keys.members(name), keys.member_statuses(name),
                   keys.patroni_scope(name), keys.hosts(), keys.secrets(name), keys.backups(name),
                   keys.archive_status(name), keys.proxy_limits(name), keys.proxy_instances()):
        raw.update(await store.get_prefix(prefix))
    return Snapshot(raw)


async def _read_node(view: MemberView, password: str) -> tuple[NodeFacts, psycopg.AsyncConnection | None]:
    """The node's facts and, for the primary, the open connection (closed by the caller)."""
    address = f"{view.address}:{view.port}"
    try:
        conn = await psycopg.AsyncConnection.connect(host=view.address, port=view.port, user="postgres",
                                                     password=password, dbname="postgres",
                                                     **probe.CONNECT_OPTIONS)
    except (psycopg.Error, OSError) as e:
        return NodeFacts(name=view.name, address=address, error=probe.first_line(e)), None
    try:
        node = await asyncio.wait_for(probe.node_facts(conn, view.name, address), NODE_TIMEOUT)
    except (psycopg.Error, OSError, TimeoutError) as e:
        await conn.close()
        return NodeFacts(name=view.name, address=address, error=probe.first_line(e) or "timed out"), None
    if not node.primary:
        await conn.close()
        return node, None
    return node, conn


async def _proxy_pools(snap: Snapshot, name: str, p: PlatformFacts) -> None:
    proxies = [ProxyInstance.model_validate_json(v) for k, v in snap.raw.items()
               if k.startswith(keys.proxy_instances())]
    p.proxies_running = len(proxies)
    async with httpx.AsyncClient(timeout=PROXY_TIMEOUT) as http:
        async def one(proxy: ProxyInstance) -> None:
            address = f"[{proxy.address}]" if ":" in proxy.address else proxy.address
            try:
                r = await http.get(f"http://{address}:{proxy.admin_port}/stats", params={"database": name})
                r.raise_for_status()
                p.pools += [pool for pool in r.json().get("pools") or [] if pool.get("database") == name]
            except (httpx.HTTPError, ValueError) as e:
                p.proxy_errors.append(f"proxy {proxy.id} on {proxy.host}: {type(e).__name__}")
        await asyncio.gather(*(one(proxy) for proxy in proxies))


async def _logs_and_disks(store: Store, root: Path | None, views: list[MemberView], p: PlatformFacts) -> None:
    """Deadlocks and lock waits from each member's log; free space under its data directory.
    Both come from the member's host's collector (GET /log), every member at once; a member
    whose collector does not answer gets a note instead."""
    logs = await remote.member_logs(store, root, [(v.name, v.host) for v in views], LOG_TAIL_BYTES)
    readable = [got for got in logs if not got.error]
    p.log_notes += [got.note for got in logs if got.error]
    parsed = await asyncio.to_thread(lambda: [(pglog.deadlocks(got.text), pglog.lock_waits(got.text))
                                              for got in readable])
    for got, (deadlocks, waits) in zip(readable, parsed, strict=True):
        p.deadlocks += deadlocks
        p.lock_waits += waits
        if got.disk is not None:
            p.disks.append(Disk(member=got.member, **got.disk))
    p.deadlocks.sort(key=lambda d: d.time or 0)


async def diagnose_database(store: Store, name: str, root: Path | None = None) -> list[Finding]:
    """`root`: the data root whose etcd client certificate reaches the collectors."""
    snap = await _snapshot(store, name)
    spec = snap.specs()[name]
    t = checks.Target(resource=f"db/{name}", database=name)
    views = [v for v in member_views(snap, name) if v.state not in ("deleting", "pending")]
    primary_view = next((v for v in views if v.role == "primary"), None)
    raw = snap.raw.get(keys.secrets(name))
    if primary_view is None or raw is None:
        status = snap.status(name)
        return [Finding(check="node_unreachable", severity="critical", resource=t.resource,
                        summary="not checked: the database has no running primary",
                        evidence=f"status {status.phase}: {status.message}" if status else "no status yet",
                        fix=f"dbplane db describe {name}; dbplane events {name}")]
    try:
        secrets = await db_secrets.open_raw(store, keys.secrets(name), raw)
    except DbplaneError as e:
        return [Finding(check="node_unreachable", severity="info", resource=t.resource,
                        summary=f"not checked: the database's secrets do not open ({e.message})")]
    p = PlatformFacts(spec=spec, members=[v.name for v in views])
    limits_raw = snap.raw.get(keys.proxy_limits(name))
    p.limits = ProxyLimits.model_validate_json(limits_raw) if limits_raw else None
    p.backups, p.archive = snap.backups(name), snap.archive(name)
    p.storage_used = used_bytes(views)
    standby_views = [v for v in views if v.role != "primary" and v.state != "host-down"]
    results = await asyncio.gather(_read_node(primary_view, secrets.superuser),
                                   *(_read_node(v, secrets.superuser) for v in standby_views),
                                   _proxy_pools(snap, name, p), _logs_and_disks(store, root, views, p))
    (primary, conn), standbys = results[0], [node for node, _ in results[1:-2]]
    workload = Workload()
    if conn is not None:
        async def connect(dbname: str) -> psycopg.AsyncConnection:
            return await psycopg.AsyncConnection.connect(
                host=primary_view.address, port=primary_view.port, user="postgres",
                password=secrets.superuser, dbname=dbname, **probe.CONNECT_OPTIONS)
        try:
            workload = await asyncio.wait_for(probe.workload(primary, conn, "postgres", connect),
                                              WORKLOAD_TIMEOUT)
        except (psycopg.Error, OSError, TimeoutError) as e:
            workload.notes.append(f"tables and statements: {probe.first_line(e) or 'timed out'}")
        finally:
            await conn.close()
    findings = checks.replication(t, primary, standbys, [v.name for v in views if v.role != "primary"])
    findings += platform_checks.backups(t, spec, p.backups, p.archive)
    if primary.error:
        findings.append(checks.unreachable(t, primary, "connections, sessions, deadlocks, statements"))
        findings += platform_checks.storage(t, spec, p.storage_used, None, p.disks)
        return sort(findings)
    findings += checks.connections(t, primary)
    findings += platform_checks.proxy_pool(t, primary, p)
    findings += checks.sessions(t, primary)
    for node in standbys:
        if not node.error:
            findings += [f for f in checks.sessions(t, node, node.name) if f.severity != "ok"]
    findings += checks.lock_waits(t, primary, p.lock_waits)
    findings += checks.deadlocks(t, primary, p.deadlocks, p.log_notes)
    findings += checks.statements(t, primary, workload)
    findings += checks.tables(t, workload.tables)
    findings += platform_checks.storage(t, spec, p.storage_used, primary, p.disks)
    return sort(findings)


async def run_with_timeout(store: Store, name: str, root: Path | None = None,
                           timeout: float = 25.0) -> list[Finding]:
    """Within the CLI's 30 s HTTP timeout; a run that takes longer says so as a finding."""
    try:
        return await asyncio.wait_for(diagnose_database(store, name, root), timeout)
    except TimeoutError:
        return [Finding(check="node_unreachable", severity="warning", resource=f"db/{name}",
                        summary=f"the database checks did not finish within {timeout:g} s",
                        evidence="a member, a proxy or etcd answered too slowly",
                        fix=f"dbplane db describe {name}; try again")]


# -- any PostgreSQL by URL -----------------------------------------------------------------------------

def redact(text: str, url: str) -> str:
    """Never echo the URL's password (nor its percent-encoded form)."""
    password = conninfo_to_dict(url).get("password") if url else None
    if password:
        for form in {password, quote(password, safe="")}:
            text = text.replace(form, "***")
    return text


def url_resource(url: str) -> str:
    info = conninfo_to_dict(url)
    host, port, dbname = info.get("host") or "localhost", info.get("port") or "5432", info.get("dbname") or ""
    return f"url/{host}:{port}" + (f"/{dbname}" if dbname else "")


async def diagnose_url(url: str) -> list[Finding]:
    """The checks a server can answer by itself; the password comes from the URL or
    PGPASSWORD (libpq) and never appears in a finding."""
    resource = url_resource(url)
    t = checks.Target(resource=resource)
    info = conninfo_to_dict(url)
    address = f"{info.get('host') or 'localhost'}:{info.get('port') or '5432'}"
    main_db = info.get("dbname") or info.get("user") or "postgres"
    try:
        conn = await psycopg.AsyncConnection.connect(url, **probe.CONNECT_OPTIONS)
    except (psycopg.Error, OSError) as e:
        return [Finding(check="node_unreachable", severity="critical", resource=resource,
                        summary="cannot connect", evidence=redact(probe.first_line(e), url),
                        fix="check the URL, the password (URL or PGPASSWORD) and pg_hba.conf")]
    try:
        node = await asyncio.wait_for(probe.node_facts(conn, address, address), NODE_TIMEOUT)
        workload = Workload()
        log_text, note = "", ""
        if node.primary:
            async def connect(dbname: str) -> psycopg.AsyncConnection:
                return await psycopg.AsyncConnection.connect(make_conninfo(url, dbname=dbname),
                                                             **probe.CONNECT_OPTIONS)
            workload = await asyncio.wait_for(probe.workload(node, conn, main_db, connect), WORKLOAD_TIMEOUT)
        log_text, note = await probe.log_tail(conn, LOG_TAIL_BYTES)
    except (psycopg.Error, OSError, TimeoutError) as e:
        return [Finding(check="node_unreachable", severity="warning", resource=resource,
                        summary="the server did not answer the doctor's queries",
                        evidence=redact(probe.first_line(e) or "timed out", url))]
    finally:
        await conn.close()
    findings = checks.connections(t, node) + checks.sessions(t, node)
    findings += checks.lock_waits(t, node, pglog.lock_waits(log_text))
    if node.primary:
        findings += checks.replication(t, node, [])
        findings += checks.deadlocks(t, node, pglog.deadlocks(log_text), [note] if note else [])
        findings += checks.statements(t, node, workload)
        findings += checks.tables(t, workload.tables)
    else:
        findings += checks.replication(t, None, [node])
    findings.append(Finding(check="platform_only", severity="info", resource=resource,
                            summary="not checked for a URL: proxy pools, backups and the WAL archive, "
                                    "storage quota and disk space (they need a platform database: "
                                    "dbplane doctor NAME)"
                                    + ("" if node.primary else "; on a standby also deadlocks, statements "
                                       "and tables: point --url at the primary")))
    for f in findings:
        f.evidence, f.summary = redact(f.evidence, url), redact(f.summary, url)
    return sort(findings)
