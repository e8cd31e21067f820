"""`dbplane doctor security` on a real platform: misconfigurations made for real are found
with evidence and fix; a clean database passes; a critical finding exits 1."""

from __future__ import annotations

import datetime
import json
import time

import pytest

from dbplane.doctor import security
from dbplane.models import Host, RepositorySpec
from dbplane.security import ca, iam
from dbplane.store import keys
from platform_helpers import one_line_error

DB = "doc-sec"


def _etcd_put(platform, key: str, value: str) -> None:
    platform.etcd.put(key, value)


def _etcd_delete(platform, key: str) -> None:
    platform.etcd.delete(key)


def _findings(platform, *args: str) -> tuple[int, list[dict]]:
    r = platform.cli("doctor", "security", *args, "--output", "json", check=False)
    return r.returncode, json.loads(r.stdout)


def _one(findings, check, resource) -> dict:
    found = [f for f in findings if f["check"] == check and f["resource"] == resource]
    assert len(found) == 1, (check, resource, findings)
    return found[0]


@pytest.fixture(scope="module")
def db(platform):
    platform.create(DB, "--no-multi-az")
    yield DB
    platform.delete_all(DB)


def test_a_new_database_passes_the_database_checks(platform, db):
    rc, findings = _findings(platform, "--database", db)
    assert _one(findings, "plaintext_allowed", f"db/{db}")["severity"] == "ok"
    assert _one(findings, "allowlist_open", f"db/{db}")["severity"] == "ok"
    assert _one(findings, "superuser_by_applications", f"db/{db}")["severity"] == "ok"
    static = _one(findings, "static_passwords", f"db/{db}")     # the admin user has a password
    assert static["severity"] == "warning" and "dbadmin" in static["evidence"]
    assert rc == 0
    one_line_error(platform.cli("doctor", "security", "--database", "nope", check=False), "nope")


def test_misconfigurations_are_found_with_evidence_and_fix(platform, db):
    platform.cli("db", "modify", db, "--param", "require_tls=off", "--wait")
    platform.cli("db", "allow", db, "0.0.0.0/0")
    with platform.connect_node(db, autocommit=True, application_name="payroll") as c:
        c.execute("CREATE ROLE legacy LOGIN PASSWORD 'legacy-password'")
        rc, findings = _findings(platform, "--database", db)
    assert rc == 1                                       # plaintext allowed is critical
    f = _one(findings, "plaintext_allowed", f"db/{db}")
    assert f["severity"] == "critical" and f["evidence"] == "require_tls=off"
    assert f["fix"] == f"dbplane db modify {db} --param require_tls=on"
    f = _one(findings, "allowlist_open", f"db/{db}")
    assert f["severity"] == "warning" and "0.0.0.0/0" in f["summary"] and "dbplane db revoke" in f["fix"]
    f = _one(findings, "superuser_by_applications", f"db/{db}")
    assert "dbadmin: 1 session(s) of payroll" in f["evidence"]
    assert "legacy" in _one(findings, "static_passwords", f"db/{db}")["evidence"]

    r = platform.cli("doctor", "security", "--database", db, check=False)    # the human view
    assert r.returncode == 1 and "CRITICAL" in r.stdout and "fix:" in r.stdout

    platform.cli("db", "modify", db, "--param", "require_tls=on", "--wait")
    platform.cli("db", "revoke", db, "0.0.0.0/0")
    rc, findings = _findings(platform, "--database", db)
    assert _one(findings, "plaintext_allowed", f"db/{db}")["severity"] == "ok"
    assert _one(findings, "allowlist_open", f"db/{db}")["severity"] == "ok"


def test_platform_checks_keys_policies_and_access_keys(platform):
    # a key scheduled for deletion that a repository (written straight into etcd, as an
    # older platform might have) still names
    key = platform.cli_json("kms", "create-key", "--alias", "alias/doc-doomed")
    platform.cli("kms", "schedule-key-deletion", key["id"], "--pending-window-days", "7")
    repo = RepositorySpec(name="doc-old", path="/var/tmp/nowhere", kms_key="alias/doc-doomed")
    _etcd_put(platform, keys.repository("doc-old"), repo.model_dump_json())
    # an access key created 120 days ago
    admin_keys = platform.api.get("/v1/iam/users/admin/access-keys").json()
    record = iam.AccessKey.model_validate_json(
        platform.etcd.get(keys.iam_access_key(admin_keys[0]["id"])))
    old = record.model_copy(update={"id": "DPAKOLDOLDOLDOLDOLD2", "status": "Active",
                                    "created_at": time.time() - 120 * 86400})
    _etcd_put(platform, keys.iam_access_key(old.id), old.model_dump_json())
    try:
        rc, findings = _findings(platform)
        assert rc == 1
        f = _one(findings, "key_pending_deletion", f"key/{key['id']}")
        assert f["severity"] == "critical" and "repository doc-old" in f["evidence"]
        assert f["fix"] == f"dbplane kms cancel-key-deletion {key['id']}"
        assert _one(findings, "unencrypted_repository", "repository/doc-old")["severity"] == "critical"
        assert _one(findings, "unencrypted_repository", "repository/local")["severity"] == "ok"
        f = _one(findings, "broad_policy", "policy/AdministratorAccess")
        assert "user/admin" in f["summary"]
        f = _one(findings, "old_access_key", f"access-key/{old.id}")
        assert "120 days old" in f["summary"] and "delete-access-key" in f["fix"]
        assert _one(findings, "public_listener", "platform")["severity"] == "ok"
        assert _one(findings, "certificate_expiry", "platform")["severity"] == "ok"
        assert _one(findings, "data_volume_encryption", "platform")["severity"] in ("ok", "warning")
    finally:
        _etcd_delete(platform, keys.iam_access_key(old.id))
        _etcd_delete(platform, keys.repository("doc-old"))
        platform.cli("kms", "cancel-key-deletion", key["id"])


def test_exposed_addresses_and_hosts():
    assert security._exposed("0.0.0.0") and security._exposed("::")
    assert security._exposed("8.8.8.8") == "a public address"
    assert not security._exposed("127.0.0.1") and not security._exposed("10.1.2.3")
    findings = security.listeners([Host(name="h1", zone="a", address="8.8.4.4", data_dir="/x"),
                                   Host(name="h2", zone="b", address="192.168.1.5", data_dir="/x")])
    assert [f.resource for f in findings if f.severity == "critical"][:1] == ["host/h1"]


def test_certificates_expiring_and_expired(tmp_path):
    ca.ensure_ca(tmp_path)
    authority = ca.CertificateAuthority.load(tmp_path)
    (tmp_path / "tls").mkdir()
    now = datetime.datetime.now(datetime.UTC)
    soon = authority.issue(["127.0.0.1"], days=40, now=now - datetime.timedelta(days=30))
    (tmp_path / "tls" / "api.crt").write_text(soon.cert_pem)
    f = [x for x in security.certificates(tmp_path) if x.severity != "ok"]
    assert f and f[0].severity == "warning" and "expires in" in f[0].summary
    gone = authority.issue(["127.0.0.1"], days=10, now=now - datetime.timedelta(days=20))
    (tmp_path / "tls" / "api.crt").write_text(gone.cert_pem)
    f = [x for x in security.certificates(tmp_path) if x.severity != "ok"]
    assert f[0].severity == "critical" and "expired on" in f[0].summary
