"""Credential rotation on a real Multi-AZ database: the internal and admin passwords change,
open sessions keep working, replication reconnects with the new password, the proxy
looks users up with the new superuser password, and old passwords stop working."""

from __future__ import annotations

import psycopg
import pytest

from dbplane.controlplane.credentials import due
from dbplane.models import DatabaseSecrets, DatabaseSpec
from dbplane.security import db_secrets
from dbplane.store import keys
from platform_helpers import one_line_error, wait_for

DB = "rot-db"


def _secrets(platform) -> DatabaseSecrets:
    return db_secrets.load_sync(platform.etcd, keys.secrets(DB))


@pytest.fixture(scope="module")
def db(platform):
    platform.create(DB, "--multi-az")
    yield DB
    platform.delete_all(DB)


def test_rotate_credentials_without_downtime(platform, db):
    before = _secrets(platform)
    with platform.connect(db, autocommit=True) as c:
        c.execute("CREATE TABLE t (v int)")
        c.execute("CREATE ROLE late LOGIN PASSWORD 'late-password'")   # not yet known to the proxy
    session = platform.connect(db, autocommit=True)          # open across the rotation
    session.execute("INSERT INTO t VALUES (1)")

    op = platform.cli_json("db", "rotate-credentials", db, "--wait")
    assert op["state"] == "succeeded", op
    after = _secrets(platform)
    for field in ("superuser", "replication", "rewind", "admin"):
        assert getattr(after, field) != getattr(before, field)
    assert after.rotated_at > 0

    session.execute("INSERT INTO t VALUES (2)")             # the open session is not disturbed
    with platform.connect(db) as c:                           # pgpass rewritten: admin logs in
        assert c.execute("SELECT count(*) FROM t").fetchone() == (2,)
    primary = platform.member(db, "primary")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(host=primary["address"], port=primary["port"], user="postgres",
                        password=before.superuser, dbname="postgres", connect_timeout=5).close()
    with psycopg.connect(host=primary["address"], port=primary["port"], user="postgres",
                         password=after.superuser, dbname="postgres", connect_timeout=5,
                         autocommit=True) as su:
        # the standby reconnects with the new replication password once its stream breaks
        su.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_replication")
        # the proxy's own sessions go too: its next lookup must use the new password
        su.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                   "WHERE application_name LIKE 'dbplane-proxy-%'")

        def streaming():
            return su.execute("SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'"
                              ).fetchone()[0] >= 1
        wait_for(streaming, 60, "the standby to stream again with the new replication password")
    host, port = platform.describe(db)["endpoints"]["writer"].rsplit(":", 1)

    def late_login():
        try:
            with psycopg.connect(host=host, port=int(port), user="late", password="late-password",
                                 dbname="postgres", connect_timeout=5) as c:
                return c.execute("SELECT current_user").fetchone() == ("late",)
        except psycopg.OperationalError:
            return False
    wait_for(late_login, 30, "a new user to log in through the proxy")
    session.execute("SELECT 1")
    session.close()
    kinds = [e["kind"] for e in platform.api.get("/v1/events", params={"database": db}).json()]
    assert "credentials-rotated" in kinds
    platform.wait_available(db, 60)       # degraded for a moment: we broke its replication


def test_rotation_schedule(platform, db):
    r = platform.cli("db", "modify", db, "--credential-rotation-days", "400", check=False)
    one_line_error(r, "credential_rotation_days")
    platform.cli("db", "modify", db, "--credential-rotation-days", "30", "--wait")
    shown = platform.describe(db)["credentials"]
    assert shown["rotation_days"] == 30 and shown["rotated_at"]
    assert shown["next_rotation_at"] == pytest.approx(shown["rotated_at"] + 30 * 86400)
    assert "password" not in str(shown)
    r = platform.cli("db", "rotate-credentials", "no-such-db", check=False)
    one_line_error(r, "no-such-db")


def test_due():
    spec = DatabaseSpec(name="db-x", instance_class="micro", created_at=1000.0, credential_rotation_days=30)
    assert not due(spec, 0.0, 1000 + 29 * 86400)           # never rotated: from creation
    assert due(spec, 0.0, 1000 + 30 * 86400)
    assert not due(spec, 1000 + 30 * 86400, 1000 + 31 * 86400)
    assert not due(spec.model_copy(update={"credential_rotation_days": 0}), 0.0, 10 ** 10)
