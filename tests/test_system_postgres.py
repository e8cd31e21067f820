"""A system PostgreSQL (15 or newer) instead of the embedded 18, chosen at the first `up`."""

from __future__ import annotations

import glob

import pytest

from platform_helpers import Platform, new_data_root

pytestmark = pytest.mark.integration

# scripts/test installs Debian's postgresql-15 when run as root
SYSTEM_BIN_DIRS = sorted(glob.glob("/usr/lib/postgresql/*/bin"))


@pytest.mark.skipif(not SYSTEM_BIN_DIRS, reason="no system PostgreSQL installed")
def test_platform_on_system_postgres():
    bin_dir = SYSTEM_BIN_DIRS[0]
    major = bin_dir.split("/")[-2]
    p = Platform(new_data_root("dbplane-syspg-"))
    try:
        p.up("--pg-bin-dir", bin_dir)
        assert p.info.pg_bin_dir == bin_dir
        d = p.create("legacy", "--multi-az")
        assert d["version"] == major
        assert sorted(m["role"] for m in d["members"]) == ["primary", "sync_standby"]
        with p.connect("legacy", autocommit=True) as conn:
            assert conn.execute("SHOW server_version").fetchone()[0].startswith(major + ".")
            conn.execute("CREATE TABLE t AS SELECT 1 AS x")
        # the engine is part of the platform: another one is refused, nothing changes
        r = p.cli("up", "--pg-bin-dir", "/nonexistent", check=False)
        assert r.returncode == 1 and "no postgres binary in" in r.stderr
        p.down()
        p.up()                      # no option needed later: the recorded engine is used
        p.wait_available("legacy")
        with p.connect("legacy") as conn:
            assert conn.execute("SELECT x FROM t").fetchone()[0] == 1
    finally:
        p.destroy()
