"""`dbplane doctor security`: what is still misconfigured, with evidence and fix.

Checks: plaintext allowed (require_tls off; nodes without TLS), allowlists open to the
world, listeners on public or wildcard addresses, static passwords and superuser use by
applications (read from each primary), repositories and KMS keys (S3 over plain http,
keys disabled or pending deletion while backups need them), overly broad policies, old
access keys, certificates expired or expiring, the data root's volume encryption,
credentials never rotated and database passwords still in plaintext in etcd. Runs in the
API server, which reads etcd and connects to each primary as the internal superuser (whose
password it unseals with the KMS).
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import ipaddress
import os
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import psutil
import psycopg

from ..controlplane.topology import Snapshot
from ..errors import DbplaneError
from ..models import Host, KmsKey, RepositorySpec
from ..parameters import require_tls
from ..security import ca, db_secrets, iam, kms
from ..security import policy as policies
from ..security.key_policy import open_statements
from ..security.tls import postgres_tls
from ..store import Store, keys
from ..system import postgres_bin_dir
from . import Finding, ok, sort

KEY_MAX_AGE_DAYS = 90
CERT_WARN_DAYS = 30
PASSWORD_MAX_AGE_DAYS = 90
INTERNAL_ROLES = {"postgres", "replicator", "rewinder"}
OUR_PROCESSES = ("dbplane", "patroni", "postgres", "etcd")


async def run(store: Store, data_root: Path | None, database: str | None = None) -> list[Finding]:
    raw: dict[str, bytes] = {}
    for prefix in (keys.databases(), keys.members(""), keys.ROOT + "secrets/", keys.hosts(),
                   keys.PATRONI_NAMESPACE + "/"):
        raw.update(await store.get_prefix(prefix))
    snap = Snapshot(raw)
    specs = [s for s in snap.specs().values() if not s.deleting and database in (None, s.name)]
    findings: list[Finding] = []
    findings += plaintext(specs)
    findings += open_allowlists(specs)
    findings += listeners(snap.hosts())
    findings += rotation(specs, snap)
    findings += secrets_at_rest(specs, snap)
    for spec in specs:
        findings += await database_users(store, spec, snap)
    if database is None:                     # platform-wide checks
        findings += await repositories_and_keys(store)
        findings += await identities(store)
        findings += certificates(data_root)
        findings += await etcd_client_auth(store)
        findings += data_volume(data_root)
    return sort(findings)


# -- databases ---------------------------------------------------------------------------------------

def plaintext(specs) -> list[Finding]:
    out = []
    for s in specs:
        if require_tls(s):
            out.append(ok("plaintext_allowed", f"db/{s.name}", "clients must use TLS", "require_tls=on"))
        else:
            out.append(Finding(check="plaintext_allowed", severity="critical", resource=f"db/{s.name}",
                               summary="the proxy accepts plaintext clients: passwords and data cross "
                                       "the network unencrypted", evidence="require_tls=off",
                               fix=f"dbplane db modify {s.name} --param require_tls=on"))
    nodes, reason = postgres_tls(postgres_bin_dir())
    if specs and not nodes:
        out.append(Finding(check="plaintext_allowed", severity="warning", resource="platform",
                           summary="the proxy's and replication's connections to PostgreSQL nodes are "
                                   "plaintext", evidence=reason,
                           fix="run the platform on a PostgreSQL built with OpenSSL (dbplane up "
                               "--pg-bin-dir DIR), or keep the hosts on a private network"))
    return out


def open_allowlists(specs) -> list[Finding]:
    out = []
    for s in specs:
        world = [r.cidr for r in s.allowlist if ipaddress.ip_network(r.cidr).prefixlen == 0]
        if world:
            out.append(Finding(check="allowlist_open", severity="warning", resource=f"db/{s.name}",
                               summary=f"the endpoints accept clients from anywhere ({', '.join(world)})",
                               evidence=f"allowlist: {', '.join(r.cidr for r in s.allowlist)}",
                               fix=f"dbplane db revoke {s.name} {world[0]}, then allow only the "
                                   f"application networks (dbplane db allow {s.name} CIDR)"))
        else:
            out.append(ok("allowlist_open", f"db/{s.name}", "no rule admits the whole internet",
                          f"{len(s.allowlist)} rules"))
    return out


def rotation(specs, snap: Snapshot) -> list[Finding]:
    out = []
    now = time.time()
    for s in specs:
        raw = snap.raw.get(keys.secrets(s.name))
        if raw is None:
            continue
        since = db_secrets.rotated_at(raw) or s.created_at
        age = (now - since) / 86400
        if s.credential_rotation_days:
            out.append(ok("credential_rotation", f"db/{s.name}",
                          f"passwords rotate every {s.credential_rotation_days} days",
                          f"last {age:.0f} days ago"))
        elif age > PASSWORD_MAX_AGE_DAYS:
            out.append(Finding(check="credential_rotation", severity="warning", resource=f"db/{s.name}",
                               summary=f"internal and admin passwords unchanged for {age:.0f} days",
                               evidence="credential_rotation_days=0",
                               fix=f"dbplane db modify {s.name} --credential-rotation-days 30"))
        else:
            out.append(Finding(check="credential_rotation", severity="info", resource=f"db/{s.name}",
                               summary="passwords are rotated only on request",
                               evidence="credential_rotation_days=0; last rotation or creation "
                                        f"{age:.0f} days ago",
                               fix=f"dbplane db modify {s.name} --credential-rotation-days 30"))
    return out


def secrets_at_rest(specs, snap: Snapshot) -> list[Finding]:
    """Database secrets still in plaintext in etcd (written before they were sealed; the
    controller seals them in its next pass)."""
    out = []
    for s in specs:
        raw = snap.raw.get(keys.secrets(s.name))
        if raw is None:
            continue
        if db_secrets.is_plaintext(raw):
            out.append(Finding(check="secrets_plaintext", severity="warning", resource=f"db/{s.name}",
                               summary="the database's passwords are stored in etcd in plaintext",
                               evidence=f"{keys.secrets(s.name)} is not sealed",
                               fix="start the controller of this version: it seals them under "
                                   "alias/dbplane/secrets in its next pass (see its log)"))
        else:
            out.append(ok("secrets_plaintext", f"db/{s.name}", "the database's passwords are sealed "
                          "under a KMS key in etcd"))
    return out


STATIC_PASSWORDS = """
SELECT a.rolname FROM pg_authid a
WHERE a.rolcanlogin AND a.rolpassword IS NOT NULL AND NOT a.rolsuper
  AND NOT EXISTS (SELECT 1 FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.roleid
                  WHERE m.member = a.oid AND r.rolname = 'dbplane_iam' AND NOT m.admin_option)
ORDER BY 1"""
PRIVILEGED_SESSIONS = """
SELECT usename, coalesce(nullif(application_name, ''), '(none)'), count(*)
FROM pg_stat_activity
WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() AND usename = ANY(%s)
  AND application_name NOT LIKE 'dbplane%%' AND application_name NOT LIKE 'Patroni%%'
  AND application_name NOT IN ('pg_basebackup', 'pg_rewind', 'psql')
GROUP BY 1, 2 ORDER BY 3 DESC"""


async def database_users(store: Store, spec, snap: Snapshot) -> list[Finding]:
    """Static passwords in use and the superuser or admin user used by applications, read
    from the primary."""
    res = f"db/{spec.name}"
    leader = snap.patroni(spec.name).leader
    primary = next((m for m in snap.members(spec.name) if m.name == leader), None)
    raw = snap.raw.get(keys.secrets(spec.name))
    if primary is None or raw is None:
        return [Finding(check="static_passwords", severity="info", resource=res,
                        summary="not checked: the database has no running primary",
                        fix=f"see dbplane db describe {spec.name}")]
    try:
        secrets = await db_secrets.open_raw(store, keys.secrets(spec.name), raw)
    except DbplaneError as e:
        return [Finding(check="static_passwords", severity="info", resource=res,
                        summary=f"not checked: the database's secrets do not open ({e.message})")]
    try:
        async with await psycopg.AsyncConnection.connect(
                host=primary.address, port=primary.pg_port, user="postgres", password=secrets.superuser,
                dbname="postgres", connect_timeout=5, autocommit=True,
                application_name="dbplane-doctor") as conn:
            users = [r for (r,) in await (await conn.execute(STATIC_PASSWORDS)).fetchall()
                     if r not in INTERNAL_ROLES]
            sessions = await (await conn.execute(PRIVILEGED_SESSIONS,
                                                 (["postgres", spec.admin_user],))).fetchall()
    except (psycopg.Error, OSError) as e:
        return [Finding(check="static_passwords", severity="info", resource=res,
                        summary=f"not checked: the primary did not answer ({str(e).splitlines()[0][:120]})")]
    out = []
    if users:
        out.append(Finding(check="static_passwords", severity="warning", resource=res,
                           summary=f"{len(users)} user(s) log in with static passwords",
                           evidence=", ".join(users[:10]) + (" ..." if len(users) > 10 else ""),
                           fix=f"GRANT dbplane_iam TO <user> and connect with 'dbplane db token "
                               f"{spec.name} --user <user>' (IAM tokens, 15 minutes)"))
    else:
        out.append(ok("static_passwords", res, "every login user uses IAM tokens"))
    if sessions:
        detail = "; ".join(f"{u}: {n} session(s) of {app}" for u, app, n in sessions[:5])
        out.append(Finding(check="superuser_by_applications", severity="warning", resource=res,
                           summary="applications use the superuser or the admin user",
                           evidence=detail,
                           fix="create a role with only the privileges the application needs "
                               "(CREATE ROLE app LOGIN; GRANT ...) and give it IAM tokens"))
    else:
        out.append(ok("superuser_by_applications", res, "no application session runs as postgres or "
                      f"{spec.admin_user}"))
    return out


# -- the platform ------------------------------------------------------------------------------------

def _exposed(address: str) -> str:
    """Why an address is exposed beyond this machine and private networks, or ""."""
    try:
        ip = ipaddress.ip_address(address.strip("[]").split("%")[0])
    except ValueError:
        return ""
    if ip.is_unspecified:
        return "every interface (wildcard)"
    if ip.is_global:
        return "a public address"
    return ""


def listeners(hosts: list[Host]) -> list[Finding]:
    out = []
    seen = set()
    for h in hosts:
        why = _exposed(h.address)
        if why:
            seen.add(h.address)
            out.append(Finding(check="public_listener", severity="critical", resource=f"host/{h.name}",
                               summary=f"databases and proxies of {h.name} listen on {why}",
                               evidence=f"agent --address {h.address}",
                               fix="run the agent with --address on a private network address"))
    try:
        conns = psutil.net_connections(kind="inet")
    except (psutil.AccessDenied, OSError):
        conns = []
    for c in conns:
        if c.status != psutil.CONN_LISTEN or not c.pid or not c.laddr:
            continue
        why = _exposed(c.laddr.ip)
        if not why or (c.laddr.ip, c.laddr.port) in seen:
            continue
        try:
            cmd = " ".join(psutil.Process(c.pid).cmdline())
        except psutil.Error:
            continue
        if any(word in cmd for word in OUR_PROCESSES):
            seen.add((c.laddr.ip, c.laddr.port))
            out.append(Finding(check="public_listener", severity="critical",
                               resource=f"listener/{c.laddr.ip}:{c.laddr.port}",
                               summary=f"a platform process listens on {why}",
                               evidence=f"pid {c.pid}: {cmd[:120]}",
                               fix="bind it to 127.0.0.1 or a private address (dbplane api "
                                   "--listen, agent --address, etcd --listen-client-urls)"))
    if not out:
        out.append(ok("public_listener", "platform", "nothing of the platform listens on a public "
                      "or wildcard address", f"{len(hosts)} hosts; listening sockets of this machine"))
    return out


async def repositories_and_keys(store: Store) -> list[Finding]:
    out = []
    keys_ = {k.id: k for k in await store.list(keys.kms_keys(), KmsKey)}
    for r in await store.list(keys.repositories(), RepositorySpec):
        res = f"repository/{r.name}"
        key = kms.find_key(keys_.values(), r.kms_key)
        endpoint = urlsplit(r.endpoint) if r.kind == "s3" else None
        if endpoint and endpoint.scheme == "http" and not _loopback(endpoint.hostname or ""):
            out.append(Finding(check="unencrypted_repository", severity="warning", resource=res,
                               summary="the S3 endpoint is plain http: encrypted objects, but "
                                       "credentials and metadata cross the network in the clear",
                               evidence=f"endpoint {r.endpoint}",
                               fix=f"recreate the repository with an https endpoint (dbplane repository "
                                   f"create {r.name} ...)"))
        elif key is None or key.state != "enabled":
            out.append(Finding(check="unencrypted_repository", severity="critical", resource=res,
                               summary=f"the repository's KMS key {r.kms_key} is "
                                       f"{'missing' if key is None else key.state}: copies cannot be "
                                       "encrypted into it", evidence=f"kms_key {r.kms_key}",
                               fix=f"dbplane kms enable-key {r.kms_key}" if key else
                               "point the repository at an existing key"))
        else:
            out.append(ok("unencrypted_repository", res, f"objects are encrypted with {kms.label(key)}"))
    for key in keys_.values():
        if key.state != "pending_deletion":
            continue
        users = await kms.key_users(store, key)
        if users:
            out.append(Finding(check="key_pending_deletion", severity="critical", resource=f"key/{key.id}",
                               summary=f"KMS key {kms.label(key)} is scheduled for deletion while "
                                       "backups or databases still need it",
                               evidence=kms.describe_users(users),
                               fix=f"dbplane kms cancel-key-deletion {key.id}"))
        else:
            out.append(Finding(check="key_pending_deletion", severity="info", resource=f"key/{key.id}",
                               summary=f"KMS key {kms.label(key)} is scheduled for deletion; nothing "
                                       "needs it",
                               evidence="no backup, archive, database or repository uses it"))
    out += open_key_policies(list(keys_.values()))
    return out


def open_key_policies(keys_: list[KmsKey]) -> list[Finding]:
    """Key policies that let every principal ("*") do everything with the key."""
    out = []
    for key in keys_:
        opened = open_statements(key)
        if opened:
            sids = ", ".join(st.sid or "(no Sid)" for st in opened)
            out.append(Finding(check="open_key_policy", severity="warning", resource=f"key/{key.id}",
                               summary=f"the key policy of KMS key {kms.label(key)} lets every principal "
                                       "use, rotate, delete the key and change its policy",
                               evidence=f'statement {sids}: Effect Allow, Principal "*", Action "kms:*", '
                                        "no Condition",
                               fix=f'name the principals instead of "*": dbplane kms get-key-policy {key.id} '
                                   f"> p.json, edit it, dbplane kms put-key-policy {key.id} --policy file://p.json"))
    if not out:
        out.append(ok("open_key_policy", "kms", 'no key policy allows every principal ("*") kms:*',
                      f"{len(keys_)} keys"))
    return out


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


async def identities(store: Store) -> list[Finding]:
    out = []
    attached: dict[str, list[str]] = {}
    for kind in ("user", "role"):
        for p in await store.list(keys.iam_principals(kind), iam.Principal):
            for name in p.policies:
                attached.setdefault(name, []).append(p.ref)
    for record in await store.list(keys.iam_policies(), iam.ManagedPolicy):
        who = attached.get(record.name, [])
        try:
            broad = policies.is_broad(iam.parsed(record))
        except Exception:
            continue
        if broad and who:
            out.append(Finding(check="broad_policy", severity="warning", resource=f"policy/{record.name}",
                               summary=f"allows every action on every resource, attached to {', '.join(who)}",
                               evidence='Effect Allow, Action "*", Resource "*", no Condition',
                               fix="keep it for break-glass administration; give people and "
                                   "applications least-privilege policies (dbplane iam create-policy)"))
    now = time.time()
    for k in await store.list(keys.iam_access_keys(), iam.AccessKey):
        age = (now - k.created_at) / 86400
        created = datetime.datetime.fromtimestamp(k.created_at, datetime.UTC)
        if k.status == "Active" and age > KEY_MAX_AGE_DAYS:
            out.append(Finding(check="old_access_key", severity="warning", resource=f"access-key/{k.id}",
                               summary=f"access key of {k.principal} is {age:.0f} days old",
                               evidence=f"created {created:%Y-%m-%d}",
                               fix="create a new key, move the clients, then dbplane iam delete-access-key "
                                   f"{k.id}"))
    if not out:
        out.append(ok("broad_policy", "iam", "no broad policy attached; no access key older than "
                      f"{KEY_MAX_AGE_DAYS} days"))
    return out


ETCD_FIX = ("'dbplane down', then 'dbplane up': etcd then serves https and admits only clients with a "
            "certificate from the platform CA; an etcd you run yourself needs --cert-file, --key-file, "
            "--client-cert-auth and --trusted-ca-file (dbplane ca etcd-certs --server-name ADDR)")


async def etcd_client_auth(store: Store) -> list[Finding]:
    """Whether etcd admits a client without a certificate from the platform CA: whoever
    reaches its port would read every secret and write anything, past the API's policies.
    Asked the way an intruder would: a key count over the JSON gateway, no certificate."""
    url = store.url if "://" in store.url else f"http://{store.url}"
    probe = {"key": base64.b64encode(keys.ROOT.encode()).decode(),
             "range_end": base64.b64encode(keys.ROOT[:-1].encode() + b"0").decode(), "count_only": True}
    try:
        async with httpx.AsyncClient(verify=False, timeout=3) as client:   # no certificate at all
            r = await client.post(f"{url.rstrip('/')}/v3/kv/range", json=probe)
    except httpx.HTTPError as e:
        if url.startswith("https://"):
            return [ok("etcd_client_auth", "etcd", "etcd refuses clients without a certificate from "
                       "the platform CA", f"{url}: a request without one failed ({type(e).__name__})")]
        return [Finding(check="etcd_client_auth", severity="info", resource="etcd",
                        summary=f"not checked: etcd did not answer a probe ({type(e).__name__})")]
    if r.status_code != 200:
        return [ok("etcd_client_auth", "etcd", "etcd refuses clients without a certificate",
                   f"{url}: a request without one got HTTP {r.status_code}")]
    how = "plaintext http, no client certificate" if url.startswith("http://") else \
        "https without --client-cert-auth"
    return [Finding(check="etcd_client_auth", severity="critical", resource="etcd",
                    summary="anyone who reaches etcd's client port reads and writes every key "
                            "(database secrets, IAM, audit log), bypassing the API's policies",
                    evidence=f"{url} ({how}): a request without a certificate counted "
                             f"{r.json().get('count', 0)} keys under {keys.ROOT}",
                    fix=ETCD_FIX)]


def certificates(data_root: Path | None) -> list[Finding]:
    if data_root is None or not ca.cert_path(data_root).exists():
        return []
    out = []
    now = datetime.datetime.now(datetime.UTC)
    files = [("platform CA", ca.cert_path(data_root))] + ca.leaf_files(data_root)
    for what, path in files:
        cert = ca.load_cert(path)
        if cert is None:
            continue
        left = (cert.not_valid_after_utc - now).days
        res = f"certificate/{what}"
        if left < 0:
            out.append(Finding(check="certificate_expiry", severity="critical", resource=res,
                               summary=f"expired on {cert.not_valid_after_utc:%Y-%m-%d}", evidence=str(path),
                               fix="restart its component (dbplane up) to re-issue it"))
        elif left < CERT_WARN_DAYS:
            out.append(Finding(check="certificate_expiry", severity="warning", resource=res,
                               summary=f"expires in {left} days ({cert.not_valid_after_utc:%Y-%m-%d})",
                               evidence=str(path), fix="its component re-issues it automatically; "
                               "check that the agent or API runs"))
    if not out:
        out.append(ok("certificate_expiry", "platform", f"{len(files)} certificates valid for "
                      f"more than {CERT_WARN_DAYS} days"))
    return out


def _dm_uuid(path: Path) -> str:
    """The device-mapper UUID of the block device holding path ("CRYPT-..." for dm-crypt)."""
    dev = os.stat(path).st_dev
    sysdir = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    try:
        return (sysdir / "dm" / "uuid").read_text().strip()
    except OSError:
        return ""


def data_volume(data_root: Path | None) -> list[Finding]:
    if data_root is None or not data_root.exists():
        return []
    uuid = _dm_uuid(data_root)
    if uuid.startswith("CRYPT-"):
        return [ok("data_volume_encryption", "platform", "the data root is on an encrypted volume",
                   f"{data_root}: device-mapper {uuid.split('-')[1]}")]
    fs = next((p for p in sorted(psutil.disk_partitions(all=True), key=lambda p: -len(p.mountpoint))
               if str(data_root).startswith(p.mountpoint)), None)
    where = f"{fs.device} ({fs.fstype}) mounted on {fs.mountpoint}" if fs else "unknown device"
    return [Finding(check="data_volume_encryption", severity="warning", resource="platform",
                    summary="PostgreSQL's data files are on a volume without dm-crypt encryption",
                    evidence=f"{data_root}: {where}",
                    fix="put the data root on a LUKS/dm-crypt volume (or an encrypted cloud disk "
                        "and ignore this); backups and WAL are encrypted by dbplane regardless")]


async def run_with_timeout(store: Store, data_root: Path | None, database: str | None,
                           timeout: float = 30.0) -> list[Finding]:
    return await asyncio.wait_for(run(store, data_root, database), timeout)
