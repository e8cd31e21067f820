"""Pure pieces: SCRAM verifiers, parameter validation, Patroni config, Patroni key parsing."""

import base64
import hashlib
import hmac
import json

import pytest
import yaml

from dbplane.agent import patroni
from dbplane.controlplane.topology import Snapshot, endpoints, member_views
from dbplane.errors import InvalidInput
from dbplane.models import DatabaseSecrets, DatabaseSpec, Host, MemberSpec
from dbplane.parameters import parse_params, validate
from dbplane.security.scram import verifier
from dbplane.store import keys

pytestmark = pytest.mark.unit


def test_scram_verifier_matches_rfc7677_construction():
    salt = b"0123456789abcdef"
    v = verifier("secret", salt=salt, iterations=4096)
    method, rest = v.split("$", 1)
    assert method == "SCRAM-SHA-256"
    iters_salt, keys_part = rest.split("$")
    assert iters_salt == f"4096:{base64.b64encode(salt).decode()}"
    salted = hashlib.pbkdf2_hmac("sha256", b"secret", salt, 4096)
    stored = hashlib.sha256(hmac.new(salted, b"Client Key", hashlib.sha256).digest()).digest()
    assert keys_part.split(":")[0] == base64.b64encode(stored).decode()
    assert "secret" not in v


def test_parse_params():
    assert parse_params(["work_mem=8MB", "log_min_duration_statement = 250"]) == {
        "work_mem": "8MB", "log_min_duration_statement": "250"}
    with pytest.raises(InvalidInput) as e:
        parse_params(["work_mem"])
    assert "name=value" in e.value.hint


def test_validate_accepts_real_settings():
    validate({"work_mem": "8MB", "max_connections": "200", "jit": "off",
              "log_min_duration_statement": "250ms", "random_page_cost": "1.1"})


def test_validate_reports_every_problem_at_once():
    with pytest.raises(InvalidInput) as e:
        validate({"no_such_setting": "1", "max_connections": "0", "jit": "maybe",
                  "port": "5433"})
    msg = e.value.message
    assert "unknown parameter 'no_such_setting'" in msg
    assert "max_connections=0 is out of range 1..262143" in msg
    assert "jit must be on or off" in msg
    assert "port is managed by dbplane" in msg
    assert e.value.code == "invalid_parameter"


def _member(name, kind="primary_candidate", zone="a", port=5432):
    return MemberSpec(name=name, database="db", host=f"host-{zone}", zone=zone,
                      address="127.0.0.1", pg_port=port, api_port=port + 1, kind=kind)


def test_patroni_config_for_multi_az_and_replica():
    spec = DatabaseSpec(name="db", multi_az=True, params={"work_mem": "8MB"},
                        instance_class="micro")
    secrets = DatabaseSecrets(superuser="s1", replication="s2", rewind="s3", admin="s4")
    primary = yaml.safe_load(patroni.render(_member("db-1"), spec, secrets,
                                            ["http://127.0.0.1:2379"], "/bin", "/m/db-1"))
    assert primary["bootstrap"]["dcs"]["synchronous_mode"] is True
    params = primary["bootstrap"]["dcs"]["postgresql"]["parameters"]
    assert params["work_mem"] == "8MB" and params["shared_buffers"] == "32MB"
    assert primary["tags"]["nofailover"] is False
    assert primary["etcd3"]["hosts"] == ["127.0.0.1:2379"]
    replica = yaml.safe_load(patroni.render(_member("db-3", kind="replica"), spec, secrets,
                                            ["127.0.0.1:2379"], "/bin", "/m/db-3"))
    assert replica["tags"]["nofailover"] is True and replica["tags"]["nosync"] is True


def test_topology_roles_lag_and_endpoints():
    raw = {keys.member("db", "db-1"): _member("db-1", port=5000).model_dump_json().encode(),
           keys.member("db", "db-2"): _member("db-2", zone="b", port=5002).model_dump_json().encode(),
           keys.member("db", "db-3"): _member("db-3", kind="replica", zone="c", port=5004)
           .model_dump_json().encode()}
    for z in "abc":
        raw[keys.host(f"host-{z}")] = Host(name=f"host-{z}", zone=z, address="127.0.0.1",
                                           data_dir="/x").model_dump_json().encode()
    scope = keys.patroni_scope("db")
    raw[scope + "leader"] = b"db-2"
    raw[scope + "sync"] = json.dumps({"leader": "db-2", "sync_standby": "db-1"}).encode()
    raw[scope + "members/db-2"] = json.dumps({"state": "running", "role": "primary",
                                              "xlog_location": 1000, "timeline": 2}).encode()
    raw[scope + "members/db-1"] = json.dumps({"state": "running", "role": "replica",
                                              "replication_state": "streaming",
                                              "xlog_location": 990, "replay_lsn": 990}).encode()
    raw[scope + "members/db-3"] = json.dumps({"state": "running", "role": "replica",
                                              "replication_state": "streaming",
                                              "xlog_location": 400, "replay_lsn": 400}).encode()
    views = {v.name: v for v in member_views(Snapshot(raw), "db")}
    assert (views["db-2"].role, views["db-1"].role, views["db-3"].role) == (
        "primary", "sync_standby", "replica")
    assert (views["db-1"].lag_bytes, views["db-3"].lag_bytes) == (10, 600)
    ep = endpoints(list(views.values()))
    assert ep == {"writer": "127.0.0.1:5002", "reader": "127.0.0.1:5004"}


def test_database_name_rules():
    for bad in ["A", "1db", "db_1", "-db", "db-", "x" * 50]:
        with pytest.raises(ValueError):
            DatabaseSpec(name=bad)
    assert DatabaseSpec(name="orders-eu1").name == "orders-eu1"
