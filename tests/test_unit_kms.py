"""The local KMS's pure logic: the root key (file, sealed with a passphrase), wrapping of
key material and data keys, rotation, key states, tampering, and views without material."""

from __future__ import annotations

import base64
import json
import os
import stat

import pytest

from dbplane.models import KmsKey
from dbplane.security import kms
from dbplane.security.kms import DataKey, Kms, KmsError

pytestmark = pytest.mark.unit

ROOT = bytes(range(32))
OWNER = (os.getuid(), os.getgid())


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def forms(secret: bytes) -> list[str]:
    """How a secret could show up in text: hex, base64, latin-1."""
    return [secret.hex(), base64.b64encode(secret).decode(), secret.decode("latin-1")]


# -- root key --------------------------------------------------------------------------------

def test_key_file_is_created_once_private(tmp_path):
    kms_dir, runtime = tmp_path / "kms", tmp_path / "run" / "kms-root.key"
    path = kms.ensure_root_key(kms_dir, runtime, OWNER)
    assert path == kms_dir / "root.key" and not runtime.exists()
    assert mode(path) == 0o600 and mode(kms_dir) == 0o711
    first = kms.load_root_key(path)
    assert len(first) == 32
    assert kms.ensure_root_key(kms_dir, runtime, OWNER) == path
    assert kms.load_root_key(path) == first          # never regenerated


def test_passphrase_seals_and_unseals(tmp_path):
    kms_dir, runtime = tmp_path / "kms", tmp_path / "run" / "kms-root.key"
    pw = tmp_path / "pw"
    pw.write_text("  correct horse battery staple\n")
    path = kms.ensure_root_key(kms_dir, runtime, OWNER, passphrase_file=pw)
    assert path == runtime and mode(runtime) == 0o600
    assert not (kms_dir / "root.key").exists() and mode(kms_dir / "root.sealed") == 0o600
    root = kms.load_root_key(runtime)
    sealed = (kms_dir / "root.sealed").read_text()
    assert "correct horse" not in sealed and not any(f in sealed for f in forms(root))
    json.loads(sealed)                                # self-describing
    assert kms.remove_runtime_key(runtime) and not runtime.exists()
    assert not kms.remove_runtime_key(runtime)
    pw.write_text("correct horse battery staple")      # stripped: the same passphrase
    kms.ensure_root_key(kms_dir, runtime, OWNER, passphrase_file=pw)
    assert kms.load_root_key(runtime) == root


def test_wrong_passphrase_and_mode_switches_refused(tmp_path):
    kms_dir, runtime = tmp_path / "kms", tmp_path / "kms-root.key"
    pw = tmp_path / "pw"
    pw.write_text("one")
    kms.ensure_root_key(kms_dir, runtime, OWNER, passphrase_file=pw)
    runtime.unlink()
    pw.write_text("two")
    with pytest.raises(KmsError) as e:
        kms.ensure_root_key(kms_dir, runtime, OWNER, passphrase_file=pw)
    assert e.value.code == "kms_unseal_failed" and "--kms-passphrase-file" in e.value.hint
    assert not runtime.exists()
    with pytest.raises(KmsError) as e:
        kms.ensure_root_key(kms_dir, runtime, OWNER)
    assert e.value.code == "kms_sealed" and "--kms-passphrase-file" in e.value.hint

    plain = tmp_path / "plain"
    kms.ensure_root_key(plain, runtime, OWNER)
    with pytest.raises(KmsError) as e:
        kms.ensure_root_key(plain, runtime, OWNER, passphrase_file=pw)
    assert e.value.code == "kms_not_sealed"
    pw.write_text("   \n")
    with pytest.raises(KmsError) as e:
        kms.ensure_root_key(tmp_path / "new", runtime, OWNER, passphrase_file=pw)
    assert e.value.code == "kms_passphrase_unreadable"


def test_load_root_key_errors(tmp_path):
    for path, code in [("", "kms_root_missing"), (tmp_path / "nope", "kms_root_missing")]:
        with pytest.raises(KmsError) as e:
            kms.load_root_key(path)
        assert e.value.code == code and e.value.hint
    short = tmp_path / "short"
    short.write_bytes(b"x" * 31)
    with pytest.raises(KmsError) as e:
        kms.load_root_key(short)
    assert e.value.code == "kms_root_invalid" and "31 bytes" in e.value.message


# -- keys and data keys ----------------------------------------------------------------------------

def test_new_key_validates():
    key = kms.new_key(ROOT, alias="alias/orders/backup_1", description="d", rotation_days=90)
    assert key.id.startswith("key-") and key.state == "enabled"
    assert [v.version for v in key.versions] == [1]
    for alias in ("orders", "alias/", "alias/a b", "alias/aws/x", "alias/x/"):
        with pytest.raises(KmsError) as e:
            kms.new_key(ROOT, alias=alias)
        assert e.value.code == "kms_invalid_alias", alias
    for days in (1, 89, 2561, -1):
        with pytest.raises(KmsError) as e:
            kms.new_key(ROOT, rotation_days=days)
        assert e.value.code == "kms_invalid_rotation_days"
    assert kms.new_key(ROOT, rotation_days=0).rotation_days == 0


def test_data_key_round_trip_by_id_and_alias():
    key = kms.new_key(ROOT, alias="alias/a")
    k = Kms(ROOT, [key])
    dk = k.generate_data_key("alias/a")
    assert isinstance(dk, DataKey) and len(dk.plaintext) == 32
    assert (dk.key_id, dk.key_version) == (key.id, 1)
    assert dk.plaintext not in dk.wrapped
    assert k.decrypt_data_key(dk.wrapped) == dk.plaintext
    assert kms.parse_wrapped(dk.wrapped) == (key.id, 1)
    assert k.generate_data_key(key.id).plaintext != dk.plaintext     # fresh per call
    with pytest.raises(KmsError) as e:
        k.generate_data_key("alias/none")
    assert e.value.code == "kms_key_not_found" and e.value.status == 404


def test_rotation_keeps_old_versions_decrypting():
    key = kms.new_key(ROOT)
    old = Kms(ROOT, [key]).generate_data_key(key.id)
    rotated = kms.rotate(ROOT, key)
    assert kms.current_version(rotated) == 2 and rotated.rotated_at >= key.rotated_at
    k = Kms(ROOT, [rotated])
    new = k.generate_data_key(key.id)
    assert new.key_version == 2
    assert k.decrypt_data_key(old.wrapped) == old.plaintext
    assert k.decrypt_data_key(new.wrapped) == new.plaintext
    assert kms._material(ROOT, rotated, 1) == kms._material(ROOT, key, 1)
    assert kms._material(ROOT, rotated, 2) != kms._material(ROOT, rotated, 1)


def test_disabled_and_pending_keys_refuse():
    key = kms.new_key(ROOT)
    dk = Kms(ROOT, [key]).generate_data_key(key.id)
    disabled = kms.disable(key)
    for op in (lambda k: k.generate_data_key(key.id), lambda k: k.decrypt_data_key(dk.wrapped)):
        with pytest.raises(KmsError) as e:
            op(Kms(ROOT, [disabled]))
        assert e.value.code == "kms_key_disabled" and "enable-key" in e.value.hint
    with pytest.raises(KmsError):
        kms.rotate(ROOT, disabled)
    pending = kms.schedule_deletion(disabled, 7)
    assert pending.state == "pending_deletion" and pending.deletion_date > pending.created_at
    with pytest.raises(KmsError) as e:
        Kms(ROOT, [pending]).decrypt_data_key(dk.wrapped)
    assert e.value.code == "kms_key_pending_deletion" and "cancel-key-deletion" in e.value.hint
    for action in (kms.enable, kms.disable, lambda k: kms.schedule_deletion(k, 30)):
        with pytest.raises(KmsError) as e:
            action(pending)
        assert e.value.code == "kms_key_pending_deletion"
    back = kms.cancel_deletion(pending)
    assert back.state == "disabled" and back.deletion_date is None      # like AWS KMS
    with pytest.raises(KmsError) as e:
        kms.cancel_deletion(back)
    assert e.value.code == "kms_key_not_pending_deletion"
    assert Kms(ROOT, [kms.enable(back)]).decrypt_data_key(dk.wrapped) == dk.plaintext


@pytest.mark.parametrize("days", [0, 6, 31, 365])
def test_pending_window_bounds(days):
    with pytest.raises(KmsError) as e:
        kms.schedule_deletion(kms.new_key(ROOT), days)
    assert e.value.code == "kms_invalid_pending_window" and "7-30" in e.value.hint


def test_tampering_and_unknown_keys_detected():
    key = kms.new_key(ROOT)
    k = Kms(ROOT, [key])
    dk = k.generate_data_key(key.id)
    for i in (len(dk.wrapped) - 1, len(dk.wrapped) - 40, len(dk.wrapped) - 60):
        bad = bytearray(dk.wrapped)
        bad[i] ^= 1
        with pytest.raises(KmsError) as e:
            k.decrypt_data_key(bytes(bad))
        assert e.value.code == "kms_decrypt_failed"
    with pytest.raises(KmsError) as e:             # the version is bound too
        k.decrypt_data_key(dk.wrapped.replace(b"\x00\x00\x00\x01", b"\x00\x00\x00\x02", 1))
    assert e.value.code == "kms_decrypt_failed"
    with pytest.raises(KmsError) as e:
        k.decrypt_data_key(dk.wrapped[:-1])
    assert e.value.code == "kms_decrypt_failed"
    with pytest.raises(KmsError) as e:
        Kms(ROOT, []).decrypt_data_key(dk.wrapped)
    assert e.value.code == "kms_decrypt_failed" and key.id in e.value.message
    other = kms.new_key(ROOT)          # material of another key under this key's id
    swapped = key.model_copy(update={"versions": other.versions})
    with pytest.raises(KmsError) as e:
        Kms(ROOT, [swapped]).decrypt_data_key(dk.wrapped)
    assert e.value.code == "kms_decrypt_failed" and key.id in e.value.message
    with pytest.raises(KmsError) as e:             # a root key that did not wrap the material
        Kms(bytes(32), [key]).generate_data_key(key.id)
    assert e.value.code == "kms_decrypt_failed" and "root key" in e.value.message


def test_no_material_in_repr_or_views():
    key = kms.rotate(ROOT, kms.new_key(ROOT, alias="alias/v"))
    k = Kms(ROOT, [key])
    dk = k.generate_data_key(key.id)
    secrets = [ROOT, dk.plaintext, kms._material(ROOT, key, 1), kms._material(ROOT, key, 2)]
    view = kms.KeyView.of(key)
    texts = [repr(k), str(k), repr(dk), str(dk), f"{dk}", view.model_dump_json(), repr(view),
             json.dumps(view.model_dump())]
    for text in texts:
        for s in secrets:
            assert not any(f in text for f in forms(s)), text
        for v in key.versions:
            assert v.wrapped_material not in text
    assert [v.version for v in view.versions] == [1, 2] and view.current_version == 2
    assert "wrapped_material" not in view.model_dump_json()


def test_update_and_find():
    key = kms.new_key(ROOT, alias="alias/u", rotation_days=0)
    on = kms.update(key, rotation_days=90)
    assert on.rotation_days == 90 and on.rotated_at >= key.rotated_at
    assert kms.update(key, description="x").description == "x"
    assert kms.find_key([key], "alias/u") is key and kms.find_key([key], key.id) is key
    assert kms.find_key([key], "") is None and kms.find_key([key], "alias/x") is None
    assert isinstance(KmsKey.model_validate_json(key.model_dump_json()), KmsKey)


# -- the deletion guard and the controller's step, over an in-memory store ---------------------------

class MemoryStore:
    """The few Store calls the KMS uses, over a dict."""

    def __init__(self):
        self.data: dict[str, bytes] = {}

    async def get_prefix(self, prefix):
        return {k: v for k, v in sorted(self.data.items()) if k.startswith(prefix)}

    async def get(self, key, model):
        raw = self.data.get(key)
        return model.model_validate_json(raw) if raw is not None else None

    async def list(self, prefix, model):
        return [model.model_validate_json(v) for v in (await self.get_prefix(prefix)).values()]

    async def put(self, key, value):
        self.data[key] = value.model_dump_json().encode() if hasattr(value, "model_dump_json") \
            else str(value).encode()

    async def delete(self, key):
        return self.data.pop(key, None) is not None


def run(coro):
    import asyncio
    return asyncio.run(coro)


def test_key_users_names_every_kind_of_user():
    from dbplane.models import ArchiveStatus, BackupRecord, DatabaseSpec, RepositorySpec
    from dbplane.store import keys
    s = MemoryStore()
    key = kms.new_key(ROOT, alias="alias/dbplane/backup")
    other = kms.new_key(ROOT, alias="alias/other")
    run(s.put(keys.kms_key(key.id), key))
    assert run(kms.key_users(s, key)) == []
    rec = dict(database="orders", archive_id="orders-1", repository="local", kms_key_id=key.id)
    run(s.put(keys.backup("orders", "b1"), BackupRecord(id="b1", state="available", **rec)))
    run(s.put(keys.backup("orders", "b2"), BackupRecord(id="b2", state="expired", **rec)))
    run(s.put(keys.backup("orders", "b3"), BackupRecord(id="b3", state="available",
                                                        **{**rec, "kms_key_id": other.id})))
    run(s.put(keys.archive_status("orders"), ArchiveStatus(database="orders", archive_id="orders-1",
                                                           repository="local", kms_key_ids=[key.id])))
    run(s.put(keys.archive_lock("orders"), "host-a"))         # not JSON: skipped
    run(s.put(keys.database_spec("orders"), DatabaseSpec(name="orders")))   # default alias
    run(s.put(keys.database_spec("billing"), DatabaseSpec.model_validate(
        {"name": "billing", "backup": {"kms_key": other.id}})))
    run(s.put(keys.repository("local"), RepositorySpec(name="local", kms_key=key.id)))
    s.data[keys.backup("orders", "broken")] = f'{{"kms_key_id": "{key.id}"'.encode()
    users = run(kms.key_users(s, key))
    assert users == ["backup b1 of database orders (available)",
                     f"the unreadable record {keys.backup('orders', 'broken')}",
                     "the WAL archive of database orders (orders-1)",
                     "database orders (its backups encrypt with alias/dbplane/backup)",
                     "repository local (its copies encrypt with " + key.id + ")"]
    with pytest.raises(KmsError) as e:
        run(kms.check_unused(s, key))
    assert e.value.code == "kms_key_in_use" and e.value.status == 409
    assert "backup b1 of database orders" in e.value.message and "disable-key" in e.value.hint
    assert run(kms.key_users(s, other)) == ["backup b3 of database orders (available)",
                                            f"database billing (its backups encrypt with {other.id})"]


def test_controller_rotates_and_deletes_when_due(tmp_path):
    from dbplane.controlplane.kms import ensure_keys
    from dbplane.models import BackupRecord, Event
    from dbplane.store import keys
    root_file = tmp_path / "root.key"
    root_file.write_bytes(ROOT)
    s = MemoryStore()
    due = kms.new_key(ROOT, rotation_days=90).model_copy(update={"rotated_at": 0.0})
    off = kms.new_key(ROOT, rotation_days=0).model_copy(update={"rotated_at": 0.0})
    free = kms.schedule_deletion(kms.new_key(ROOT), 7).model_copy(update={"deletion_date": 1.0})
    used = kms.schedule_deletion(kms.new_key(ROOT), 7).model_copy(update={"deletion_date": 1.0})
    later = kms.schedule_deletion(kms.new_key(ROOT), 7)
    for k in (due, off, free, used, later):
        run(s.put(keys.kms_key(k.id), k))
    run(s.put(keys.backup("db", "b1"), BackupRecord(id="b1", database="db", archive_id="a",
                                                    repository="local", kms_key_id=used.id)))
    done = run(ensure_keys(s, str(root_file)))
    assert len(done) == 3, done
    after = {k.id: k for k in run(s.list(keys.kms_keys(), KmsKey))}
    assert kms.current_version(after[due.id]) == 2 and after[due.id].rotated_at > 0
    assert kms.current_version(after[off.id]) == 1
    assert free.id not in after
    assert after[used.id].state == "disabled" and after[used.id].deletion_date is None
    assert after[later.id].state == "pending_deletion"
    events = {e.kind: e.message for e in run(s.list(keys.events("_kms"), Event))}
    assert set(events) == {"key-rotated", "key-deleted", "key-deletion-refused"}
    assert "backup b1 of database db" in events["key-deletion-refused"]
    assert run(ensure_keys(s, str(root_file))) == []          # idempotent
    assert run(ensure_keys(s, "")) == []                      # nothing due: no root key needed
