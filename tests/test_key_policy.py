"""Key policies on a real platform: a key's own policy decides with IAM who may manage and
use it. A user IAM allows but the key policy denies is refused (rotate, schedule deletion,
a repository or a snapshot copy with the key, a restore); a user the key policy names needs
no IAM permission; the default policy keeps the admin working; bad documents and lock-outs
are refused; the CLI round trip; refusals and changes are in the audit log; the doctor
flags a policy open to everyone."""

from __future__ import annotations

import json

import httpx
import pytest

from dbplane.models import BackupRecord, KmsKey
from dbplane.security import key_policy, kms
from dbplane.store import keys
from platform_helpers import iam_user_client, one_line_error, wait_for

pytestmark = pytest.mark.integration

PREFIX = "kp-"
IAM_ALLOWS_ALL = {"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Action": ["kms:*", "backup:*", "db:*"], "Resource": "*"}]}
NO_KMS = {"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Action": ["backup:CreateRepository", "backup:CopySnapshot"], "Resource": "*"}]}


def document(*statements: dict) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": list(statements)})


def allow(principal, action="kms:*", **extra) -> dict:
    return {"Effect": "Allow", "Principal": principal, "Action": action, "Resource": "*", **extra}


def new_key(platform, alias: str, policy: str | None = None, **put) -> dict:
    k = platform.api.post("/v1/kms/keys", json={"alias": alias}).json()
    if policy is not None:
        r = platform.api.put(f"/v1/kms/keys/{k['id']}/policy", json={"policy": policy, **put})
        assert r.status_code == 200, r.text
    return k


def refused(r: httpx.Response, *fragments: str, status: int = 403, code: str = "access_denied") -> str:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["hint"], err
    for f in fragments:
        assert f in err["message"] + " " + err["hint"], err
    return err["message"]


def fake_snapshot(platform, snapshot_id: str, key_id: str) -> str:
    """An available snapshot in the catalog only (nothing in the repository): enough for the
    API's checks, which refuse before anything reads it."""
    rec = BackupRecord(id=snapshot_id, database=f"{PREFIX}gone", archive_id=f"{PREFIX}gone-1",
                       repository="local", state="available", manual=True, kms_key_id=key_id,
                       kms_key_version=1)
    platform.etcd.put(keys.backup(rec.database, rec.id), rec.model_dump_json())
    return keys.backup(rec.database, rec.id)


@pytest.fixture(scope="module")
def bob(platform):
    """IAM allows bob every kms:, backup: and db: action."""
    return iam_user_client(platform, f"{PREFIX}bob", IAM_ALLOWS_ALL)


@pytest.fixture(scope="module")
def alice(platform):
    """IAM allows alice to create repositories and copy snapshots, nothing on keys."""
    return iam_user_client(platform, f"{PREFIX}alice", NO_KMS)


@pytest.fixture(scope="module")
def repo_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("kp-repo")
    d.chmod(0o755)
    return d


def test_the_default_policy_keeps_iam_in_charge(platform, bob):
    k = new_key(platform, "alias/kp/default")
    p = platform.api.get(f"/v1/kms/keys/{k['id']}/policy").json()
    assert p["default"] is True and json.loads(p["policy"]) == key_policy.DEFAULT
    assert platform.api.post(f"/v1/kms/keys/{k['id']}/rotate").json()["current_version"] == 2
    assert bob.post("/v1/kms/keys/alias/kp/default/rotate").json()["current_version"] == 3
    # keys from before key policies have none: the default
    record = KmsKey.model_validate_json(platform.etcd.get(keys.kms_key(k["id"])))
    assert record.policy == ""


def test_a_user_iam_allows_but_the_key_policy_denies_is_refused(platform, bob, repo_dir):
    admin_only = document(allow("user/admin"))
    k = new_key(platform, "alias/kp/admin-only", admin_only)
    msg = refused(bob.post(f"/v1/kms/keys/{k['id']}/rotate"), "kms:RotateKey", k["id"],
                  "put-key-policy")
    assert msg.startswith(f"user/{PREFIX}bob is not allowed to kms:RotateKey on KMS key {k['id']} "
                          "(alias/kp/admin-only)")
    assert "neither names" in msg
    refused(bob.post("/v1/kms/keys/alias/kp/admin-only/schedule-deletion", json={"pending_days": 7}),
            "kms:ScheduleKeyDeletion")
    refused(bob.put(f"/v1/kms/keys/{k['id']}/policy", json={"policy": key_policy.DEFAULT_DOCUMENT}),
            "kms:PutKeyPolicy")
    r = bob.post("/v1/repositories", json={"name": f"{PREFIX}bobs", "path": str(repo_dir),
                                           "kms_key": "alias/kp/admin-only"})
    refused(r, "kms:GenerateDataKey", k["id"])
    assert platform.api.get(f"/v1/repositories/{PREFIX}bobs").status_code == 404
    # the admin, named in the key policy, may
    assert platform.api.post(f"/v1/kms/keys/{k['id']}/rotate").status_code == 200
    assert platform.cli_json("kms", "describe-key", k["id"])["state"] == "enabled"

    # an explicit Deny in the key policy wins over IAM's Allow, for use too
    denying = document(allow("account"), {"Sid": "NoBob", "Effect": "Deny", "Principal": f"user/{PREFIX}bob",
                                          "Action": ["kms:GenerateDataKey", "kms:Decrypt"], "Resource": "*"})
    d = new_key(platform, "alias/kp/deny-bob", denying)
    assert bob.post(f"/v1/kms/keys/{d['id']}/rotate").status_code == 200      # not denied: allowed
    target = platform.api.post("/v1/repositories", json={"name": f"{PREFIX}target", "path": str(repo_dir),
                                                          "kms_key": d["id"]})
    assert target.status_code == 201, target.text
    default = platform.cli_json("kms", "describe-key", kms.DEFAULT_ALIAS)["id"]
    etcd_key = fake_snapshot(platform, f"{PREFIX}snap", default)
    denied_snap = fake_snapshot(platform, f"{PREFIX}snap-denied", d["id"])
    try:
        msg = refused(bob.post(f"/v1/snapshots/{PREFIX}snap/copy", json={"repository": f"{PREFIX}target"}),
                      "kms:GenerateDataKey", "explicitly denied by the key policy", "statement NoBob")
        assert "alias/kp/deny-bob" in msg
        assert not BackupRecord.model_validate_json(platform.etcd.get(etcd_key)).copy_requested
        # a restore of what the key encrypted needs kms:Decrypt
        r = bob.post("/v1/databases/restore", json={"name": f"{PREFIX}restored", "class": "micro",
                                                    "snapshot": f"{PREFIX}snap-denied"})
        refused(r, "kms:Decrypt", d["id"])
        assert platform.api.get(f"/v1/databases/{PREFIX}restored").status_code == 404
    finally:
        platform.etcd.delete(etcd_key)
        platform.etcd.delete(denied_snap)
        platform.api.delete(f"/v1/repositories/{PREFIX}target")


def test_a_user_named_in_the_key_policy_needs_no_iam_permission(platform, alice, repo_dir):
    named = document(allow("account"), allow(f"user/{PREFIX}alice", ["kms:DescribeKey", "kms:RotateKey",
                                                                     "kms:GenerateDataKey"]))
    k = new_key(platform, "alias/kp/alices", named)
    assert alice.get("/v1/kms/keys/alias/kp/alices").json()["id"] == k["id"]
    assert alice.post(f"/v1/kms/keys/{k['id']}/rotate").json()["current_version"] == 2
    refused(alice.post(f"/v1/kms/keys/{k['id']}/disable"), "kms:DisableKey", "no attached policy allows it")
    refused(alice.get("/v1/kms/keys"), "kms:ListKeys")                       # not about one key: IAM alone
    r = alice.post("/v1/repositories", json={"name": f"{PREFIX}alices", "path": str(repo_dir),
                                             "kms_key": "alias/kp/alices"})
    assert r.status_code == 201, r.text
    platform.api.delete(f"/v1/repositories/{PREFIX}alices").raise_for_status()
    # another key (default policy: IAM decides, and alice's IAM has no kms: action)
    r = alice.post("/v1/repositories", json={"name": f"{PREFIX}alices", "path": str(repo_dir),
                                             "kms_key": kms.DEFAULT_ALIAS})
    refused(r, "kms:GenerateDataKey", "no attached policy allows it", "dbplane iam attach-policy")


@pytest.mark.parametrize("policy, fragment", [
    ("{nope", "is not JSON"),
    (document({"Effect": "Allow", "Action": "kms:*", "Resource": "*"}), "needs a Principal"),
    (document(allow("alice")), "is not user/NAME"),
    (document(allow("*", "db:CreateDatabase")), "is no kms: action"),
    (document(allow("*", Resource="key/x")), 'the Resource of a key policy is "*"'),
])
def test_bad_policies_are_refused_with_the_parse_error(platform, policy, fragment):
    k = platform.api.post("/v1/kms/keys", json={"description": "kp bad policies"}).json()
    r = platform.api.put(f"/v1/kms/keys/{k['id']}/policy", json={"policy": policy})
    refused(r, fragment, status=400, code="malformed_policy")
    assert platform.api.get(f"/v1/kms/keys/{k['id']}/policy").json()["default"] is True


def test_a_policy_that_locks_everybody_out_is_refused(platform):
    k = new_key(platform, "alias/kp/lockout")
    ghost_only = document(allow("user/ghost"))
    r = platform.api.put(f"/v1/kms/keys/{k['id']}/policy", json={"policy": ghost_only})
    refused(r, "would leave nobody able to kms:PutKeyPolicy", "--bypass-lockout-check", status=409,
            code="kms_policy_lockout")
    use_only = document(allow("account", ["kms:Decrypt", "kms:GenerateDataKey", "kms:DescribeKey"]))
    refused(platform.api.put(f"/v1/kms/keys/{k['id']}/policy", json={"policy": use_only}), status=409,
            code="kms_policy_lockout")
    assert platform.api.get(f"/v1/kms/keys/{k['id']}/policy").json()["default"] is True
    # with the bypass it is taken, and then even the admin cannot change it back
    taken = platform.api.put(f"/v1/kms/keys/{k['id']}/policy",
                             json={"policy": ghost_only, "bypass_lockout_check": True})
    try:
        assert taken.status_code == 200 and taken.json()["default"] is False
        refused(platform.api.put(f"/v1/kms/keys/{k['id']}/policy",
                                 json={"policy": key_policy.DEFAULT_DOCUMENT}),
                "user/admin is not allowed to kms:PutKeyPolicy")
        refused(platform.api.post(f"/v1/kms/keys/{k['id']}/rotate"), "kms:RotateKey")
    finally:                          # only etcd can undo it
        record = KmsKey.model_validate_json(platform.etcd.get(keys.kms_key(k["id"])))
        platform.etcd.put(keys.kms_key(k["id"]), record.model_copy(update={"policy": ""}).model_dump_json())


def test_cli_round_trip_and_audit(platform, bob, tmp_path):
    k = platform.cli_json("kms", "create-key", "--alias", "alias/kp/cli")
    shown = platform.cli("kms", "get-key-policy", "alias/kp/cli").stdout
    assert json.loads(shown) == key_policy.DEFAULT
    edited = json.loads(shown)
    edited["Statement"].append({"Sid": "NoRotateForBob", "Effect": "Deny", "Principal": f"user/{PREFIX}bob",
                                "Action": "kms:RotateKey", "Resource": "*"})
    path = tmp_path / "p.json"
    path.write_text(json.dumps(edited, indent=2))
    out = platform.cli("kms", "put-key-policy", "alias/kp/cli", "--policy", f"file://{path}").stdout
    assert out.strip() == f"replaced the key policy of KMS key {k['id']} (alias/kp/cli)"
    assert json.loads(platform.cli("kms", "get-key-policy", k["id"]).stdout) == edited
    view = platform.cli_json("kms", "get-key-policy", k["id"])
    assert view["default"] is False and view["key_id"] == k["id"] and view["alias"] == "alias/kp/cli"

    path.write_text("{nope")
    one_line_error(platform.cli("kms", "put-key-policy", k["id"], "--policy", f"file://{path}", check=False),
                   "is not JSON", "(malformed_policy)")
    refused(bob.post(f"/v1/kms/keys/{k['id']}/rotate"), "statement NoRotateForBob")

    def entries(action: str) -> list[dict]:         # the key as the path named it: id or alias
        return [e for e in platform.cli_json("audit", "list", "--since", "10m", "--action", action)
                if e["resource"] in (f"key/{k['id']}", "key/alias/kp/cli")]
    # both calls' entries: each is written when its API process flushes its batch
    put = wait_for(lambda: len(found := entries("kms:PutKeyPolicy")) >= 2 and found, 15,
                   "the policy change and the refused one in the audit log")
    assert {(e["principal"], e["result"], e["code"]) for e in put} == {
        ("user/admin", "allowed", ""), ("user/admin", "error", "malformed_policy")}
    rotate = wait_for(lambda: [e for e in entries("kms:RotateKey") if e["principal"] == f"user/{PREFIX}bob"],
                      15, "bob's refusal in the audit log")
    assert (rotate[0]["result"], rotate[0]["status"], rotate[0]["code"]) == ("denied", 403, "access_denied")


def test_the_doctor_flags_a_key_policy_open_to_everybody(platform):
    k = new_key(platform, "alias/kp/open", document(allow("*", Sid="Everyone")))
    try:
        r = platform.cli("doctor", "security", "--output", "json", check=False)
        found = [f for f in json.loads(r.stdout) if f["check"] == "open_key_policy"]
        [f] = [f for f in found if f["resource"] == f"key/{k['id']}"]
        assert f["severity"] == "warning" and "alias/kp/open" in f["summary"]
        assert f["evidence"] == ('statement Everyone: Effect Allow, Principal "*", Action "kms:*", '
                                 "no Condition")
        assert f"dbplane kms put-key-policy {k['id']}" in f["fix"]
    finally:
        platform.api.put(f"/v1/kms/keys/{k['id']}/policy", json={"policy": key_policy.DEFAULT_DOCUMENT})
