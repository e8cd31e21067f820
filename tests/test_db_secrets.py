"""Database secrets sealed in etcd, on a real platform: etcd holds none of a database's
passwords in the clear, a sealed record copied under another database's key does not open
(and the agent says so instead of using it), and a plaintext record from before sealing is
sealed once by the controller while the database keeps working."""

from __future__ import annotations

import json

import psycopg
import pytest

from dbplane.models import KmsKey
from dbplane.security import db_secrets
from dbplane.security.kms import find_key
from dbplane.security.sealed import SECRETS_KEY_ALIAS, SealedElsewhere
from dbplane.store import keys
from platform_helpers import wait_for

pytestmark = pytest.mark.integration

A, B = "sealed-a", "sealed-b"


@pytest.fixture(scope="module")
def dbs(platform):
    platform.create(A, "--no-multi-az")
    platform.create(B, "--no-multi-az")
    yield A, B
    platform.delete_all("sealed-")


def passwords(secrets) -> list[str]:
    return [secrets.superuser, secrets.replication, secrets.rewind, secrets.admin]


def test_etcd_holds_no_password_of_a_new_database(platform, dbs):
    gw = platform.etcd
    secrets = db_secrets.load_sync(gw, keys.secrets(A))
    raw = gw.get(keys.secrets(A))
    record = json.loads(raw)
    secrets_key = find_key([KmsKey.model_validate_json(v) for v in gw.get_prefix(keys.kms_keys()).values()],
                           SECRETS_KEY_ALIAS)
    assert record["sealed"]["kms_key_id"] == secrets_key.id
    everything = b"\n".join(gw.get_prefix("/").values())        # every key of dbplane and Patroni
    for password in passwords(secrets):
        assert password.encode() not in raw and password.encode() not in everything
    member = platform.member(A, "primary")                     # the unsealed passwords are the real ones
    with psycopg.connect(host=member["address"], port=member["port"], user="postgres", dbname="postgres",
                         password=secrets.superuser, connect_timeout=5) as c:
        assert c.execute("select 1").fetchone() == (1,)
    r = platform.cli("doctor", "security", "--database", A, "--output", "json", check=False)
    found = [f for f in json.loads(r.stdout) if f["check"] == "secrets_plaintext"]
    assert [f["severity"] for f in found] == ["ok"], found


def test_a_record_copied_under_another_database_does_not_open(platform, dbs):
    gw = platform.etcd
    own, foreign = gw.get(keys.secrets(B)), gw.get(keys.secrets(A))
    gw.put(keys.secrets(B), foreign.decode())
    try:
        with pytest.raises(SealedElsewhere) as e:
            db_secrets.load_sync(gw, keys.secrets(B))
        assert f"the secrets at {keys.secrets(B)} do not open" in e.value.message
        assert "copied from another database's record" in e.value.message
        # the agent refuses it rather than writing A's passwords into B's Patroni config
        wait_for(lambda: "do not open" in platform.member(B, "primary")["message"], 30,
                 "the agent to report that B's secrets do not open")
    finally:
        gw.put(keys.secrets(B), own.decode())
    wait_for(lambda: platform.member(B, "primary")["message"] == "", 30, "the agent to recover")
    platform.wait_available(B, 60)
    with platform.connect(B) as c:
        assert c.execute("select current_user").fetchone() == ("dbadmin",)


def test_a_plaintext_record_is_sealed_by_the_controller(platform, dbs):
    """A platform created before secrets were sealed has plaintext records."""
    gw = platform.etcd
    secrets = db_secrets.load_sync(gw, keys.secrets(B))
    gw.put(keys.secrets(B), secrets.model_dump_json())
    assert db_secrets.load_sync(gw, keys.secrets(B)) == secrets      # readers accept it meanwhile
    wait_for(lambda: not db_secrets.is_plaintext(gw.get(keys.secrets(B))), 30,
             "the controller to seal the plaintext record")
    raw = gw.get(keys.secrets(B))
    assert all(p.encode() not in raw for p in passwords(secrets))
    assert db_secrets.load_sync(gw, keys.secrets(B)) == secrets
    log = platform.layout.logfile("controller").read_text()
    assert log.count(f"{B}: sealed the plaintext secrets at {keys.secrets(B)}") == 1
    with platform.connect(B) as c:                     # through the proxy, with the admin pgpass
        assert c.execute("select 1").fetchone() == (1,)
