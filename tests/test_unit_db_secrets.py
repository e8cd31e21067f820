"""Database secrets sealed in etcd (security/db_secrets.py): nothing readable in the record,
bound to its key, legacy plaintext records read and sealed once, and the per-process cache
(the Kms read again only when a record needs a key version it does not know)."""

from __future__ import annotations

import asyncio
import json

import pytest

from dbplane.errors import DbplaneError
from dbplane.models import DatabaseSecrets, KmsKey, PlatformConfig
from dbplane.security import db_secrets, kms
from dbplane.security.kms import Kms, KmsError
from dbplane.security.sealed import SECRETS_KEY_ALIAS, SealedElsewhere
from dbplane.store import keys

pytestmark = pytest.mark.unit

ROOT = bytes(range(32))
SECRETS = DatabaseSecrets(superuser="su-Pa55word-1", replication="repl-Pa55word-2",
                          rewind="rew-Pa55word-3", admin="adm-Pa55word-4", rotated_at=1234.5)
PASSWORDS = ("su-Pa55word-1", "repl-Pa55word-2", "rew-Pa55word-3", "adm-Pa55word-4")


class MemoryStore:
    """The Store calls db_secrets and the KMS loader make, over a dict; counts KMS key reads."""

    def __init__(self, url: str = "mem://1"):
        self.url = url
        self.data: dict[str, bytes] = {}
        self.kms_reads = 0

    @staticmethod
    def _encode(value) -> bytes:
        return value.model_dump_json().encode() if hasattr(value, "model_dump_json") else str(value).encode()

    async def get_raw(self, key):
        return self.data.get(key)

    async def get(self, key, model):
        raw = self.data.get(key)
        return model.model_validate_json(raw) if raw is not None else None

    async def get_prefix(self, prefix):
        if prefix == keys.kms_keys():
            self.kms_reads += 1
        return {k: v for k, v in sorted(self.data.items()) if k.startswith(prefix)}

    async def list(self, prefix, model):
        return [model.model_validate_json(v) for v in (await self.get_prefix(prefix)).values()]

    async def put(self, key, value):
        self.data[key] = self._encode(value)

    async def create(self, key, value):
        if key in self.data:
            return False
        self.data[key] = self._encode(value)
        return True

    async def commit_if(self, key, expected, items):
        if self.data.get(key) != expected:
            return False
        for k, v in items.items():
            self.data[k] = self._encode(v)
        return True


class MemoryGateway:
    def __init__(self, store: MemoryStore):
        self.store = store

    def get(self, key):
        return self.store.data.get(key)

    def get_prefix(self, prefix):
        return {k: v for k, v in self.store.data.items() if k.startswith(prefix)}

    def put(self, key, value):
        self.store.data[key] = value.encode()


def run(coro):
    return asyncio.run(coro)


@pytest.fixture
def secrets_key() -> KmsKey:
    return kms.new_key(ROOT, alias=SECRETS_KEY_ALIAS)


@pytest.fixture
def store(tmp_path, secrets_key) -> MemoryStore:
    db_secrets.forget()
    root_file = tmp_path / "root.key"
    root_file.write_bytes(ROOT)
    s = MemoryStore()
    run(s.put(keys.config(), PlatformConfig(kms_root_file=str(root_file))))
    run(s.put(keys.kms_key(secrets_key.id), secrets_key))
    yield s
    db_secrets.forget()


# -- the record ------------------------------------------------------------------------------------

def test_a_sealed_record_holds_no_password_and_opens_under_its_key(secrets_key):
    key = keys.secrets("orders")
    record = db_secrets.seal_secrets(Kms(ROOT, [secrets_key]), key, SECRETS).model_dump_json()
    for password in PASSWORDS:
        assert password not in record
    doc = json.loads(record)
    assert doc["rotated_at"] == 1234.5 and doc["sealed"]["kms_key_id"] == secrets_key.id
    assert not db_secrets.is_plaintext(record) and db_secrets.rotated_at(record) == 1234.5
    assert db_secrets.open_secrets(Kms(ROOT, [secrets_key]), key, record) == SECRETS


def test_a_record_copied_under_another_key_does_not_open(secrets_key):
    k = Kms(ROOT, [secrets_key])
    record = db_secrets.seal_secrets(k, keys.secrets("orders"), SECRETS).model_dump_json()
    for elsewhere in (keys.secrets("billing"), keys.secrets_next("orders")):
        with pytest.raises(SealedElsewhere) as e:
            db_secrets.open_secrets(k, elsewhere, record)
        assert e.value.code == "kms_decrypt_failed"
        assert elsewhere in e.value.message and "copied from another database's record" in e.value.message
        assert "restore the database from a snapshot" in e.value.hint


def test_a_plaintext_record_from_before_sealing_is_still_read(secrets_key):
    legacy = SECRETS.model_dump_json()
    assert db_secrets.is_plaintext(legacy) and db_secrets.rotated_at(legacy) == 1234.5
    assert db_secrets.open_secrets(Kms(ROOT, [secrets_key]), keys.secrets("orders"), legacy) == SECRETS


def test_a_damaged_record_is_named():
    for raw in (b"not json", b'{"superuser": 1}', b"[]"):
        with pytest.raises(DbplaneError) as e:
            db_secrets.open_secrets(Kms(ROOT, []), keys.secrets("orders"), raw)
        assert e.value.code == "secrets_unreadable" and keys.secrets("orders") in e.value.message
    assert db_secrets.rotated_at(b"not json") == 0.0


def test_a_disabled_secrets_key_neither_seals_nor_opens(secrets_key):
    record = db_secrets.seal_secrets(Kms(ROOT, [secrets_key]), keys.secrets("orders"), SECRETS)
    off = Kms(ROOT, [kms.disable(secrets_key)])
    with pytest.raises(KmsError, match="disabled"):
        db_secrets.seal_secrets(off, keys.secrets("orders"), SECRETS)
    with pytest.raises(KmsError, match="disabled"):
        db_secrets.open_secrets(off, keys.secrets("orders"), record.model_dump_json())


# -- through a store, with the cache ----------------------------------------------------------------

def test_save_load_and_the_cache(store):
    key = keys.secrets("orders")
    run(db_secrets.save(store, key, SECRETS))
    assert all(p.encode() not in store.data[key] for p in PASSWORDS)
    assert store.kms_reads == 1
    db_secrets.forget()                                   # another process
    assert run(db_secrets.load(store, key)) == SECRETS
    assert run(db_secrets.load(store, key)) == SECRETS    # unchanged: no KMS work at all
    assert store.kms_reads == 2
    assert run(db_secrets.load(store, keys.secrets("nope"))) is None
    assert not run(db_secrets.create(store, key, SECRETS))         # exists
    assert run(db_secrets.create(store, keys.secrets("new"), SECRETS))


def test_a_record_sealed_with_a_newer_key_version_reads_the_keys_again(store, secrets_key):
    key = keys.secrets("orders")
    run(db_secrets.save(store, key, SECRETS))
    assert run(db_secrets.load(store, key)) == SECRETS
    rotated = kms.rotate(ROOT, secrets_key)               # another process rotated the key...
    run(store.put(keys.kms_key(rotated.id), rotated))
    newer = SECRETS.model_copy(update={"superuser": "su-new"})
    store.data[key] = db_secrets.seal_secrets(Kms(ROOT, [rotated]), key, newer).model_dump_json().encode()
    reads = store.kms_reads                               # ...and sealed with version 2
    assert run(db_secrets.load(store, key)) == newer
    assert store.kms_reads == reads + 1


def test_a_plaintext_record_is_sealed_once(store):
    key = keys.secrets("orders")
    legacy = SECRETS.model_dump_json().encode()
    store.data[key] = legacy
    assert run(db_secrets.load(store, key)) == SECRETS              # read as it is
    assert run(db_secrets.reseal(store, key, legacy))
    assert not db_secrets.is_plaintext(store.data[key])
    assert all(p.encode() not in store.data[key] for p in PASSWORDS)
    db_secrets.forget()
    assert run(db_secrets.load(store, key)) == SECRETS
    assert not run(db_secrets.reseal(store, key, store.data[key]))  # sealed already
    store.data[keys.secrets("b")] = b'{"superuser": "x", "replication": "y", "rewind": "z", "admin": "w"}'
    assert not run(db_secrets.reseal(store, keys.secrets("b"), legacy))   # changed since it was read


def test_gateway_variants(store):
    gw = MemoryGateway(store)
    key = keys.secrets_next("orders")
    db_secrets.save_sync(gw, key, SECRETS)
    assert all(p.encode() not in store.data[key] for p in PASSWORDS)
    assert db_secrets.load_sync(gw, key) == SECRETS
    assert run(db_secrets.load(store, key)) == SECRETS
    assert db_secrets.load_sync(gw, keys.secrets("nope")) is None


def test_the_doctor_warns_of_a_plaintext_record(secrets_key):
    from dbplane.controlplane.topology import Snapshot
    from dbplane.doctor.security import secrets_at_rest
    from dbplane.models import DatabaseSpec
    specs = [DatabaseSpec(name=n, instance_class="micro") for n in ("old", "new")]
    sealed = db_secrets.seal_secrets(Kms(ROOT, [secrets_key]), keys.secrets("new"), SECRETS)
    snap = Snapshot({keys.secrets("old"): SECRETS.model_dump_json().encode(),
                     keys.secrets("new"): sealed.model_dump_json().encode()})
    found = {f.resource: f for f in secrets_at_rest(specs, snap)}
    assert found["db/old"].severity == "warning" and keys.secrets("old") in found["db/old"].evidence
    assert found["db/new"].severity == "ok"


def test_a_plaintext_record_opens_without_the_kms(secrets_key):
    db_secrets.forget()
    bare = MemoryStore("mem://no-kms")                    # no platform config, no root key
    bare.data[keys.secrets("old")] = SECRETS.model_dump_json().encode()
    bare.data[keys.secrets("new")] = db_secrets.seal_secrets(
        Kms(ROOT, [secrets_key]), keys.secrets("new"), SECRETS).model_dump_json().encode()
    assert run(db_secrets.load(bare, keys.secrets("old"))) == SECRETS
    with pytest.raises(DbplaneError) as e:
        run(db_secrets.load(bare, keys.secrets("new")))
    assert e.value.code == "kms_root_missing"
    db_secrets.forget()
