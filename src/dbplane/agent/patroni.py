"""Patroni configuration for one member, rendered from the member's placement, the
database spec and its secrets. Pure functions: no I/O here."""

from __future__ import annotations

import shlex
import sys
from urllib.parse import urlsplit

import yaml

from ..backup.restore import recovery_settings
from ..models import ARCHIVE_SLOT, DatabaseSecrets, DatabaseSpec, MemberSpec
from ..parameters import postgres_parameters
from ..store.keys import PATRONI_NAMESPACE

# Failure detection: the leader key lives `ttl` seconds; Patroni's minimum is 20 and it
# needs loop_wait + 2 * retry_timeout <= ttl. Patroni's defaults are 30/10/10.
DCS_TIMING = {"ttl": 20, "loop_wait": 2, "retry_timeout": 5}


def etcd_hosts(etcd_urls: list[str]) -> list[str]:
    hosts = []
    for url in etcd_urls:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        hosts.append(f"{parts.hostname}:{parts.port or 2379}")
    return hosts


def render(member: MemberSpec, spec: DatabaseSpec, secrets: DatabaseSecrets,
           etcd_urls: list[str], bin_dir: str, member_dir: str) -> str:
    listen_pg = f"{member.address}:{member.pg_port}"
    listen_api = f"{member.address}:{member.api_port}"
    is_replica = member.kind == "replica"
    hba = [
        "host replication replicator 0.0.0.0/0 scram-sha-256",
        "host replication replicator ::/0 scram-sha-256",
        "host all all 0.0.0.0/0 scram-sha-256",
        "host all all ::/0 scram-sha-256",
    ]
    config = {
        "scope": spec.name,
        "name": member.name,
        "namespace": PATRONI_NAMESPACE,
        "restapi": {"listen": listen_api, "connect_address": listen_api},
        "etcd3": {"hosts": etcd_hosts(etcd_urls)},
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
                    "pg_hba": hba,
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
    if spec.restore is not None:
        config["bootstrap"].update(restore_bootstrap(spec, etcd_urls, bin_dir, member_dir))
    return yaml.safe_dump(config, sort_keys=False)


def restore_bootstrap(spec: DatabaseSpec, etcd_urls: list[str], bin_dir: str, member_dir: str) -> dict:
    """A restored database's first member fills its data directory from backups
    (backup/restore.py), then PostgreSQL replays WAL to the target and is promoted."""
    command = shlex.join([sys.executable, "-m", "dbplane.backup.restore", "--etcd", etcd_urls[0],
                          "--database", spec.name, "--member-dir", member_dir, "--bin-dir", bin_dir])
    return {"method": "dbplane_restore",
            "dbplane_restore": {"command": command, "keep_existing_recovery_conf": False,
                                "recovery_conf": recovery_settings(spec.restore, member_dir)}}
