"""Baseline security: database processes run unprivileged, everything listens on
127.0.0.1, generated passwords live only in 0600 files (never argv, logs or the API)."""

from __future__ import annotations

import json
import os
import stat

import psutil
import pytest

from dbplane.models import DatabaseSecrets
from dbplane.security import db_secrets
from dbplane.store import keys

pytestmark = pytest.mark.integration


def read_secrets(platform, db: str) -> DatabaseSecrets:
    return db_secrets.load_sync(platform.etcd, keys.secrets(db))


def platform_processes(platform):
    root = str(platform.root)
    out = []
    for p in psutil.process_iter(["cmdline", "username", "name"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if root in cmd:
            out.append(p)
            if p.info["name"] == "postgres":
                out += p.children(recursive=True)
    return out


def test_secrets_stay_in_private_files(platform):
    platform.create("sec", "--multi-az")
    secrets = read_secrets(platform, "sec")
    passwords = [secrets.superuser, secrets.replication, secrets.rewind, secrets.admin]

    for p in platform_processes(platform):
        cmd = " ".join(p.cmdline())
        assert not any(pw in cmd for pw in passwords), f"password in argv of {p.pid}"
        env = " ".join(p.environ().values())
        assert not any(pw in env for pw in passwords), f"password in environment of {p.pid}"

    api_output = json.dumps([platform.describe("sec"), platform.api.get("/v1/databases").json(),
                             platform.api.get("/v1/operations").json(),
                             platform.api.get("/v1/events").json()])
    cli_output = platform.cli("db", "describe", "sec").stdout + platform.cli("db", "url", "sec").stdout
    assert not any(pw in api_output + cli_output for pw in passwords)

    logs = list(platform.root.glob("logs/*.log")) + list(platform.root.glob("hosts/*/members/*/patroni.log"))
    assert logs
    for log in logs:
        text = log.read_text(errors="replace")
        assert not any(pw in text for pw in passwords), f"password in {log}"

    private = list(platform.root.glob("hosts/*/members/sec-*/patroni.yml")) + \
        list(platform.root.glob("hosts/*/members/sec-*/pgpass")) + [platform.layout.pgpass("sec")]
    assert len([f for f in private if f.name == "patroni.yml"]) == 2
    for f in private:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f


@pytest.mark.skipif(os.geteuid() != 0, reason="the service account is used only when started as root")
def test_database_processes_run_as_service_account_on_loopback(platform):
    platform.wait_available("sec")
    procs = platform_processes(platform)
    db_procs = [p for p in procs if p.name() == "postgres" or "patroni" in " ".join(p.cmdline())]
    assert db_procs
    assert {p.username() for p in db_procs} == {"dbplane"}
    listening = [c for p in procs for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN]
    assert listening
    assert {c.laddr.ip for c in listening} == {"127.0.0.1"}
    platform.cli("db", "delete", "sec", "--wait")
