"""The local KMS on a real platform: keys through the CLI and API, material never shown,
the deletion guard, and the controller's rotation and deletion when due."""

from __future__ import annotations

import base64
import json
import os
import stat
import time

import pytest

from dbplane.models import BackupRecord, KmsKey, PlatformConfig
from dbplane.security import kms
from dbplane.store import keys
from dbplane.store.gateway import Gateway
from platform_helpers import one_line_error, wait_for

pytestmark = pytest.mark.integration


def etcd(platform) -> Gateway:
    return platform.etcd


def record(platform, key_id: str) -> KmsKey | None:
    raw = etcd(platform).get(keys.kms_key(key_id))
    return KmsKey.model_validate_json(raw) if raw else None


def create(platform, *args: str) -> dict:
    return platform.cli_json("kms", "create-key", *args)


def kms_events(platform) -> list[dict]:
    return platform.api.get("/v1/events", params={"database": "_kms"}).json()


def backup_naming(platform, key_id: str, db: str) -> str:
    rec = BackupRecord(id=f"bk-{db}", database=db, archive_id=f"{db}-1", repository="local",
                       state="available", kms_key_id=key_id, kms_key_version=1)
    etcd(platform).put(keys.backup(db, rec.id), rec.model_dump_json())
    return keys.backup(db, rec.id)


def test_default_key_and_root_file(platform):
    config = PlatformConfig.model_validate_json(etcd(platform).get(keys.config()))
    root_file = platform.root / "kms" / "root.key"
    assert config.kms_root_file == str(root_file)
    assert stat.S_IMODE(root_file.stat().st_mode) == 0o600
    assert stat.S_IMODE((platform.root / "kms").stat().st_mode) == 0o711
    if os.geteuid() == 0:            # readable by the service account that runs restores
        import pwd
        assert root_file.stat().st_uid == pwd.getpwnam("dbplane").pw_uid
    default = [k for k in platform.cli_json("kms", "list-keys") if k["alias"] == kms.DEFAULT_ALIAS]
    assert len(default) == 1 and default[0]["state"] == "enabled"


def test_key_lifecycle_through_the_cli(platform):
    k = create(platform, "--alias", "alias/test/lifecycle", "--description", "orders backups",
               "--rotation-days", "90")
    assert k["id"].startswith("key-") and k["state"] == "enabled" and k["current_version"] == 1
    assert k["rotation_days"] == 90 and k["next_rotation_at"] > time.time() + 89 * 86400
    by_alias = platform.cli_json("kms", "describe-key", "alias/test/lifecycle")
    assert by_alias["id"] == k["id"] and by_alias["used_by"] == []
    table = platform.cli("kms", "describe-key", k["id"]).stdout
    assert k["id"] in table and "alias/test/lifecycle" in table and "orders backups" in table

    rotated = platform.cli_json("kms", "rotate-key", "alias/test/lifecycle")
    assert rotated["current_version"] == 2 and [v["version"] for v in rotated["versions"]] == [1, 2]
    assert platform.cli_json("kms", "disable-key", k["id"])["state"] == "disabled"
    r = platform.cli("kms", "rotate-key", k["id"], check=False)
    one_line_error(r, "is disabled", "enable-key", "(kms_key_disabled)")
    assert platform.cli_json("kms", "enable-key", "alias/test/lifecycle")["state"] == "enabled"
    updated = platform.cli_json("kms", "update-key", k["id"], "--description", "changed",
                                "--rotation-days", "0")
    assert updated["description"] == "changed" and updated["rotation_days"] == 0
    assert updated["next_rotation_at"] is None
    listing = platform.cli("kms", "list-keys").stdout
    assert k["id"] in listing and "alias/test/lifecycle" in listing
    r = platform.cli("kms", "create-key", "--alias", "alias/test/lifecycle", check=False)
    one_line_error(r, "already names KMS key", k["id"], "(kms_alias_exists)")
    resp = platform.api.post("/v1/kms/keys", json={"alias": "alias/test/lifecycle"})
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "kms_alias_exists"


def forms(secret: bytes) -> list[str]:
    return [secret.hex(), base64.b64encode(secret).decode(), base64.urlsafe_b64encode(secret).decode()]


def test_key_material_is_never_shown(platform):
    k = create(platform, "--alias", "alias/test/secret")
    platform.cli("kms", "rotate-key", k["id"])
    root = kms.load_root_key(platform.root / "kms" / "root.key")
    key = record(platform, k["id"])
    secrets = [root] + [kms._material(root, key, v.version) for v in key.versions]
    wrapped = [v.wrapped_material for v in key.versions]
    api = platform.api
    outputs = [api.get("/v1/kms/keys").text, api.get(f"/v1/kms/keys/{k['id']}").text,
               api.get("/v1/kms/keys/alias/test/secret").text,
               platform.cli("kms", "describe-key", k["id"]).stdout,
               platform.cli("kms", "list-keys", "-o", "json").stdout]
    for text in outputs:
        assert k["id"] in text
        assert "wrapped_material" not in text and not any(w in text for w in wrapped)
        assert not any(f in text for s in secrets for f in forms(s))
    logs = b"".join(p.read_bytes() for p in platform.layout.logs_dir.glob("*.log"))
    assert logs, "no component logs"
    for s in secrets:
        assert s not in logs and not any(f.encode() in logs for f in forms(s))


def test_deletion_guard_refuses_while_a_backup_needs_the_key(platform):
    k = create(platform, "--alias", "alias/test/guard")
    backup_key = backup_naming(platform, k["id"], "kmsguard")
    try:
        r = platform.cli("kms", "schedule-key-deletion", "alias/test/guard", check=False)
        one_line_error(r, "still needed by backup bk-kmsguard of database kmsguard",
                       "(kms_key_in_use)")
        resp = platform.api.post("/v1/kms/keys/alias/test/guard/schedule-deletion",
                                 json={"pending_days": 7})
        assert resp.status_code == 409 and resp.json()["error"]["code"] == "kms_key_in_use"
        described = platform.cli_json("kms", "describe-key", k["id"])
        assert described["state"] == "enabled" and described["used_by"] == [
            "backup bk-kmsguard of database kmsguard (available)"]
    finally:
        etcd(platform).delete(backup_key)

    pending = platform.cli_json("kms", "schedule-key-deletion", k["id"], "--pending-window-days", "7")
    assert pending["state"] == "pending_deletion"
    assert abs(pending["deletion_date"] - (time.time() + 7 * 86400)) < 120
    out = platform.cli("kms", "schedule-key-deletion", "alias/test/guard", check=False)
    one_line_error(out, "pending deletion", "cancel-key-deletion", "(kms_key_pending_deletion)")
    one_line_error(platform.cli("kms", "enable-key", k["id"], check=False), "(kms_key_pending_deletion)")
    back = platform.cli_json("kms", "cancel-key-deletion", "alias/test/guard")
    assert back["state"] == "disabled" and back["deletion_date"] is None
    assert platform.cli_json("kms", "enable-key", k["id"])["state"] == "enabled"


def expire(platform, key_id: str) -> None:
    """Make a key's waiting period end now (as if 7 days had passed)."""
    key = record(platform, key_id).model_copy(update={"state": "pending_deletion",
                                                      "deletion_date": time.time() - 1})
    etcd(platform).put(keys.kms_key(key_id), key.model_dump_json())


def test_the_secrets_key_cannot_be_deleted_while_secrets_are_sealed_under_it(platform):
    # every database password and access key in etcd is sealed under it (security/sealed.py)
    r = platform.cli("kms", "schedule-key-deletion", "alias/dbplane/secrets", check=False)
    one_line_error(r, "secrets sealed in etcd", "(kms_key_in_use)")
    assert platform.cli_json("kms", "describe-key", "alias/dbplane/secrets")["state"] == "enabled"


def test_controller_deletes_an_expired_key_unless_still_needed(platform):
    free = create(platform, "--description", "free")["id"]
    used = create(platform, "--description", "used")["id"]
    backup_key = backup_naming(platform, used, "kmsctl")
    try:
        expire(platform, free)
        expire(platform, used)
        wait_for(lambda: record(platform, free) is None, 20, f"the controller to delete {free}")
        back = wait_for(lambda: (k := record(platform, used)) and k.state == "disabled" and k, 20,
                        f"the controller to refuse deleting {used}")
        assert back.deletion_date is None
        events = wait_for(lambda: (e := kms_events(platform)) and any(used in x["message"] for x in e)
                          and e, 10, "the refusal event")
        refused = [e for e in events if e["kind"] == "key-deletion-refused" and used in e["message"]]
        assert refused and "backup bk-kmsctl of database kmsctl" in refused[0]["message"]
        assert any(e["kind"] == "key-deleted" and free in e["message"] for e in events)
        one_line_error(platform.cli("kms", "describe-key", free, check=False), "(kms_key_not_found)")
        events_table = platform.cli("events", "_kms").stdout
        assert "key-deletion-refused" in events_table
    finally:
        etcd(platform).delete(backup_key)


def test_controller_rotates_when_the_period_has_passed(platform):
    k = create(platform, "--rotation-days", "90")
    key = record(platform, k["id"]).model_copy(update={"rotated_at": time.time() - 91 * 86400})
    etcd(platform).put(keys.kms_key(k["id"]), key.model_dump_json())
    rotated = wait_for(lambda: (r := record(platform, k["id"])) and kms.current_version(r) == 2 and r,
                       20, "automatic rotation")
    assert rotated.rotated_at > time.time() - 60
    assert any(e["kind"] == "key-rotated" and k["id"] in e["message"] for e in kms_events(platform))


@pytest.mark.parametrize("args, fragment, code", [
    (["create-key", "--alias", "orders"], "invalid KMS alias 'orders'", "kms_invalid_alias"),
    (["create-key", "--alias", "alias/aws/x"], "invalid KMS alias", "kms_invalid_alias"),
    (["create-key", "--rotation-days", "10"], "10 days is out of range", "kms_invalid_rotation_days"),
    (["describe-key", "alias/nope"], "KMS key 'alias/nope' not found", "kms_key_not_found"),
    (["rotate-key", "key-0000"], "KMS key 'key-0000' not found", "kms_key_not_found"),
    (["schedule-key-deletion", kms.DEFAULT_ALIAS, "--pending-window-days", "6"],
     "6 days is out of range", "kms_invalid_pending_window"),
    (["schedule-key-deletion", kms.DEFAULT_ALIAS, "--pending-window-days", "31"],
     "31 days is out of range", "kms_invalid_pending_window"),
    (["update-key", kms.DEFAULT_ALIAS], "nothing to update", "nothing_to_modify"),
])
def test_bad_input(platform, args, fragment, code):
    before = len(platform.cli_json("kms", "list-keys"))
    one_line_error(platform.cli("kms", *args, check=False), fragment, f"({code})")
    assert len(platform.cli_json("kms", "list-keys")) == before


def test_api_errors_have_codes(platform):
    api = platform.api
    r = api.get("/v1/kms/keys/alias/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "kms_key_not_found"
    r = api.post("/v1/kms/keys/alias/nope/disable")
    assert r.status_code == 404 and r.json()["error"]["code"] == "kms_key_not_found"
    r = api.post(f"/v1/kms/keys/{kms.DEFAULT_ALIAS}/schedule-deletion", json={"pending_days": 3})
    assert r.status_code == 400 and r.json()["error"]["code"] == "kms_invalid_pending_window"
    r = api.post("/v1/kms/keys", json={"alias": "alias/x", "material": "AAAA"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_input"


def test_up_refuses_to_switch_the_root_to_a_passphrase(platform, tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("secret passphrase")
    r = platform.cli("up", "--kms-passphrase-file", str(pw), check=False)
    one_line_error(r, "is a key file", "start without --kms-passphrase-file", "(kms_not_sealed)")
    assert not (platform.root / "kms" / "root.sealed").exists()
    assert json.loads(platform.api.get("/healthz").text)["status"] == "ok"
