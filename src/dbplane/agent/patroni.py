"""Patroni configuration for one member, rendered from the member's placement, the
database spec and its secrets. Pure functions: no I/O here."""

from __future__ import annotations

import ipaddress
import shlex
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

import yaml

from ..backup.restore import recovery_settings
from ..models import ARCHIVE_SLOT, DatabaseSecrets, DatabaseSpec, MemberSpec
from ..parameters import postgres_parameters
from ..store.keys import PATRONI_NAMESPACE
from ..store.tls import EtcdTLS, is_https

# Failure detection: the leader key lives `ttl` seconds; Patroni's minimum is 20 and it
# needs loop_wait + 2 * retry_timeout <= ttl. Patroni's defaults are 30/10/10.
DCS_TIMING = {"ttl": 20, "loop_wait": 2, "retry_timeout": 5}


def etcd_hosts(etcd_urls: list[str]) -> list[str]:
    hosts = []
    for url in etcd_urls:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        hosts.append(f"{parts.hostname}:{parts.port or 2379}")
    return hosts


def etcd_section(etcd_urls: list[str], etcd_tls: EtcdTLS | None) -> dict:
    """Patroni's DCS client: an https etcd verified against the CA, with the platform's
    client certificate (its key readable by the service account Patroni runs as)."""
    section: dict = {"hosts": etcd_hosts(etcd_urls)}
    if is_https(etcd_urls[0]):
        section["protocol"] = "https"
        if etcd_tls is not None:
            section.update({"cacert": etcd_tls.ca, "cert": etcd_tls.cert, "key": etcd_tls.key})
    return section


def host_cidr(address: str) -> str:
    """One host in pg_hba: an IP address as /32 or /128; a host name as it is (PostgreSQL
    then checks it both ways in DNS)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    return f"{ip}/{ip.max_prefixlen}"


def hba_lines(addresses: Iterable[str], ssl_only: bool = False) -> list[str]:
    """PostgreSQL accepts only the platform's hosts: on them run the proxies, the other
    members (replication, pg_rewind), the controller and the backup workers. Clients
    reach a database through the proxy, whose allowlist decides who they may be.
    ssl_only: hostssl lines, so that a node whose build has TLS accepts no plaintext."""
    cidrs = sorted({host_cidr(a) for a in addresses})
    conn = "hostssl" if ssl_only else "host"
    return ([f"{conn} replication replicator {c} scram-sha-256" for c in cidrs]
            + [f"{conn} all all {c} scram-sha-256" for c in cidrs])


@dataclass(frozen=True)
class MemberTls:
    """The member's certificate from the platform CA: Patroni's REST API always serves
    it; PostgreSQL too when its build has TLS (`postgres`), and then only TLS is accepted."""
    cert: str
    key: str
    ca: str
    postgres: bool


def render(member: MemberSpec, spec: DatabaseSpec, secrets: DatabaseSecrets,
           etcd_urls: list[str], bin_dir: str, member_dir: str,
           node_addresses: Iterable[str] = (), tls: MemberTls | None = None,
           etcd_tls: EtcdTLS | None = None) -> str:
    """node_addresses: the platform's hosts (the member's own address is always in);
    tls: the member's certificate (None renders Patroni and PostgreSQL without TLS);
    etcd_tls: the client certificate for an https etcd."""
    listen_pg = f"{member.address}:{member.pg_port}"
    listen_api = f"{member.address}:{member.api_port}"
    is_replica = member.kind == "replica"
    # only in the local configuration, which wins over the dynamic one: it follows the
    # hosts (the agent re-renders it and Patroni rewrites pg_hba.conf on SIGHUP)
    hba = hba_lines([member.address, *node_addresses], ssl_only=tls is not None and tls.postgres)
    config = {
        "scope": spec.name,
        "name": member.name,
        "namespace": PATRONI_NAMESPACE,
        "restapi": {"listen": listen_api, "connect_address": listen_api},
        "etcd3": etcd_section(etcd_urls, etcd_tls),
        "bootstrap": {
            "dcs": {
                **DCS_TIMING,
                "maximum_lag_on_failover": 16 * 1024 * 1024,
                "synchronous_mode": spec.multi_az,
                "synchronous_mode_strict": False,
                "synchronous_node_count": 1,
                # the WAL archiver's slot: Patroni creates it on the primary and keeps a
                # copy advancing on every standby, so a new primary still holds the WAL
                # the archive has not stored yet (backup/archiver.py)
                "slots": {ARCHIVE_SLOT: {"type": "physical"}} if spec.backup.enabled else {},
                "postgresql": {
                    "use_pg_rewind": True,
                    "use_slots": True,
                    "parameters": postgres_parameters(spec),
                },
            },
            "initdb": [{"encoding": "UTF8"}, {"locale": "C"}, "data-checksums"],
        },
        "postgresql": {
            "listen": listen_pg,
            "connect_address": listen_pg,
            "data_dir": f"{member_dir}/data",
            "bin_dir": bin_dir,
            "pgpass": f"{member_dir}/pgpass",
            "authentication": {
                "superuser": {"username": "postgres", "password": secrets.superuser},
                "replication": {"username": "replicator", "password": secrets.replication},
                "rewind": {"username": "rewinder", "password": secrets.rewind},
            },
            "parameters": {"unix_socket_directories": ""},
            "pg_hba": hba,
        },
        "tags": {
            "nofailover": is_replica,
            "nosync": is_replica,
            "zone": member.zone,
            "dbplane_host": member.host,
        },
    }
    if tls is not None:
        add_tls(config, tls)
    if spec.restore is not None:
        config["bootstrap"].update(restore_bootstrap(spec, etcd_urls, bin_dir, member_dir, etcd_tls))
    return yaml.safe_dump(config, sort_keys=False)


def add_tls(config: dict, tls: MemberTls) -> None:
    """Patroni's REST API over https (members verify each other against the CA); with a
    TLS-capable build, PostgreSQL with ssl=on, and Patroni's own connections (replication,
    pg_rewind, its local superuser session) verify-full against the CA."""
    config["restapi"].update({"certfile": tls.cert, "keyfile": tls.key, "cafile": tls.ca})
    if not tls.postgres:
        return
    config["postgresql"]["parameters"].update({
        "ssl": "on", "ssl_cert_file": tls.cert, "ssl_key_file": tls.key,
        "ssl_min_protocol_version": "TLSv1.2"})
    for user in config["postgresql"]["authentication"].values():
        user.update({"sslmode": "verify-full", "sslrootcert": tls.ca})


def restore_bootstrap(spec: DatabaseSpec, etcd_urls: list[str], bin_dir: str, member_dir: str,
                      etcd_tls: EtcdTLS | None = None) -> dict:
    """A restored database's first member fills its data directory from backups
    (backup/restore.py), then PostgreSQL replays WAL to the target and is promoted."""
    command = shlex.join([sys.executable, "-m", "dbplane.backup.restore", "--etcd", etcd_urls[0],
                          *(etcd_tls.argv() if etcd_tls else []),
                          "--database", spec.name, "--member-dir", member_dir, "--bin-dir", bin_dir])
    return {"method": "dbplane_restore",
            "dbplane_restore": {"command": command, "keep_existing_recovery_conf": False,
                                "recovery_conf": recovery_settings(spec.restore, member_dir)}}
