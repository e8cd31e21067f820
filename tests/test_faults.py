"""Real faults on a platform of their own: a full disk while creating a database."""

from __future__ import annotations

import os
import subprocess

import pytest

from platform_helpers import Platform, new_data_root

pytestmark = pytest.mark.integration


@pytest.fixture
def small_disk_platform():
    """A platform whose hosts' data lives on a 24 MB filesystem: too small for initdb."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root")
    root = new_data_root("dbplane-full-")
    hosts = root / "hosts"
    hosts.mkdir(mode=0o755)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m,mode=755", "tmpfs", str(hosts)], check=True)
    p = Platform(root)
    try:
        p.up()
        yield p
    finally:
        p.down()
        subprocess.run(["umount", str(hosts)], check=False)
        p.destroy()


def test_disk_full_during_create_rolls_back(small_disk_platform):
    p = small_disk_platform
    r = p.cli("db", "create", "full", "--class", "micro", "--wait", check=False)
    assert r.returncode == 1
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: full-1 on host-")
    assert "No space left on device" in lines[0]
    assert "create the database again" in lines[0]
    # rolled back: no database, no member directories; the failed member's log is kept
    assert p.api.get("/v1/databases/full").status_code == 404
    op = p.cli_json("ops", "list", "--database", "full")[0]
    assert op["state"] == "failed" and op["error"]["code"] == "member_failed"
    for host in ("host-a", "host-b", "host-c"):
        assert not list((p.layout.host_dir(host) / "members").iterdir())
    assert list(p.root.glob("hosts/host-*/removed/full-1-*.log"))
    # the platform itself is unharmed
    assert p.api.get("/healthz").status_code == 200
