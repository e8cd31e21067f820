"""A database's generated passwords (DatabaseSecrets) in etcd, sealed under the KMS key
alias/dbplane/secrets. The one place that reads and writes `secrets/<db>` and
`secrets-next/<db>`: everything else gets a DatabaseSecrets from here.

A record holds the passwords as one value sealed with security/sealed.py, bound to its
etcd key (the context), so a record copied under another database's key does not open.
`rotated_at` is also kept in the clear (it is not secret), so that describe and the
security doctor show it without the KMS. A record written before secrets were sealed
(plain DatabaseSecrets JSON) is still read; the controller seals it in its next pass
(`reseal`).

Every process that reads secrets (controller, API, agents, proxies, backup workers) asks
through here; each keeps the Kms it built for CACHE_SECONDS and every record it opened
for as long as the record stays the same, so re-reading an unchanged record, which agents
and proxies do every few seconds, costs no KMS work. The functions that take a Gateway
are for the synchronous callers (tests, benchmarks).
"""

from __future__ import annotations

import json
import time

from pydantic import BaseModel, ValidationError

from ..errors import DbplaneError
from ..models import DatabaseSecrets, KmsKey, PlatformConfig
from ..store import keys
from .iam import load_secrets_kms
from .kms import Kms, KmsError, load_root_key
from .sealed import SECRETS_KEY_ALIAS, SealedElsewhere, SealedSecret, seal, unseal

CACHE_SECONDS = 5.0          # as iam.Authority: a disabled key stops sealing within this


class SealedDatabaseSecrets(BaseModel):
    """What etcd holds at secrets/<db> and secrets-next/<db>."""
    rotated_at: float = 0.0          # a copy of the sealed value's, for readers without the KMS
    sealed: SealedSecret             # DatabaseSecrets as JSON, context = the etcd key


def _database(key: str) -> str:
    return key.rsplit("/", 1)[-1]


def _parse(key: str, raw: bytes | str) -> SealedDatabaseSecrets | DatabaseSecrets:
    try:
        doc = json.loads(raw)
        if isinstance(doc, dict) and "sealed" in doc:
            return SealedDatabaseSecrets.model_validate(doc)
        return DatabaseSecrets.model_validate(doc)        # written before secrets were sealed
    except (ValueError, ValidationError):
        raise DbplaneError(f"the secrets record {key} is neither sealed database secrets nor plain "
                           "ones (damaged)", f"put back {_database(key)}'s own record from an etcd "
                           "backup, or restore the database from a snapshot, which brings its "
                           "passwords", code="secrets_unreadable") from None


def is_plaintext(raw: bytes | str) -> bool:
    """A record from before secrets were sealed: the passwords are readable in etcd."""
    try:
        doc = json.loads(raw)
    except ValueError:
        return False
    return isinstance(doc, dict) and "sealed" not in doc


def rotated_at(raw: bytes | str) -> float:
    """When the passwords were last rotated (0: never), without opening the record."""
    try:
        return float(json.loads(raw).get("rotated_at", 0.0))
    except (ValueError, TypeError, AttributeError):
        return 0.0


def seal_secrets(kms: Kms, key: str, secrets: DatabaseSecrets) -> SealedDatabaseSecrets:
    """The record to store at `key` (secrets/<db> or secrets-next/<db>)."""
    return SealedDatabaseSecrets(rotated_at=secrets.rotated_at,
                                 sealed=seal(kms, SECRETS_KEY_ALIAS, secrets.model_dump_json(), key))


def open_secrets(kms: Kms | None, key: str, raw: bytes | str) -> DatabaseSecrets:
    """The passwords of the record read at `key`, sealed or (legacy) plain (kms may then
    be None)."""
    record = _parse(key, raw)
    if isinstance(record, DatabaseSecrets):
        return record
    if kms is None:
        raise KmsError(f"the secrets at {key} are sealed and no KMS was given", "open them with the "
                       "platform's KMS", code="kms_root_missing")
    try:
        return DatabaseSecrets.model_validate_json(unseal(kms, record.sealed, key))
    except SealedElsewhere:
        raise SealedElsewhere(
            f"the secrets at {key} do not open: the record was sealed for another key (copied "
            f"from another database's record) or changed, so they are not {_database(key)}'s",
            f"put back {_database(key)}'s own record (from an etcd backup), or restore the database "
            "from a snapshot, which brings its passwords", code="kms_decrypt_failed") from None


# -- through the aetcd Store, with a cache per process ----------------------------------------------

class _Keyring:
    """One platform's (one etcd URL's) Kms and opened records, in this process."""

    def __init__(self) -> None:
        self.kms: tuple[float, Kms] | None = None
        self.opened: dict[str, tuple[bytes, DatabaseSecrets]] = {}


_keyrings: dict[str, _Keyring] = {}


def _keyring(store) -> _Keyring:
    return _keyrings.setdefault(store.url, _Keyring())


def forget() -> None:
    """Drop every cached Kms and opened record (tests)."""
    _keyrings.clear()


async def _kms(store, fresh: bool = False) -> Kms:
    ring = _keyring(store)
    if fresh or ring.kms is None or time.monotonic() - ring.kms[0] > CACHE_SECONDS:
        ring.kms = (time.monotonic(), await load_secrets_kms(store))
    return ring.kms[1]


async def open_raw(store, key: str, raw: bytes) -> DatabaseSecrets:
    """The passwords of a record already read (a snapshot, a prefix read)."""
    ring = _keyring(store)
    hit = ring.opened.get(key)
    if hit is not None and hit[0] == raw:
        return hit[1]
    if is_plaintext(raw):                    # needs no KMS
        secrets = open_secrets(None, key, raw)
    else:
        try:
            secrets = open_secrets(await _kms(store), key, raw)
        except SealedElsewhere:
            raise
        except KmsError:        # a key rotated or enabled since the Kms was read: read it again
            secrets = open_secrets(await _kms(store, fresh=True), key, raw)
    ring.opened[key] = (raw, secrets)
    return secrets


async def load(store, key: str) -> DatabaseSecrets | None:
    """The passwords at `key` (keys.secrets(db) or keys.secrets_next(db)), None if absent."""
    raw = await store.get_raw(key)
    if raw is None:
        _keyring(store).opened.pop(key, None)
        return None
    return await open_raw(store, key, raw)


async def sealed_json(store, key: str, secrets: DatabaseSecrets) -> str:
    """The record to write at `key`, e.g. in a transaction with other keys."""
    try:
        text = seal_secrets(await _kms(store), key, secrets).model_dump_json()
    except KmsError:        # the secrets key was enabled since the Kms was read
        text = seal_secrets(await _kms(store, fresh=True), key, secrets).model_dump_json()
    _keyring(store).opened[key] = (text.encode(), secrets)
    return text


async def save(store, key: str, secrets: DatabaseSecrets) -> None:
    await store.put(key, await sealed_json(store, key, secrets))


async def create(store, key: str, secrets: DatabaseSecrets) -> bool:
    """Write only if `key` does not exist; False if it did."""
    return await store.create(key, await sealed_json(store, key, secrets))


async def reseal(store, key: str, raw: bytes) -> bool:
    """Seal a plaintext record read as `raw`, unless it changed meanwhile. True if sealed."""
    if not is_plaintext(raw):
        return False
    secrets = _parse(key, raw)
    return await store.commit_if(key, raw, {key: await sealed_json(store, key, secrets)})


# -- through the synchronous Gateway -------------------------------------------------------------

def gateway_kms(gateway) -> Kms:
    """The platform's Kms, read through a store.gateway.Gateway."""
    raw = gateway.get(keys.config())
    config = PlatformConfig.model_validate_json(raw) if raw else PlatformConfig()
    return Kms(load_root_key(config.kms_root_file),
               [KmsKey.model_validate_json(v) for v in gateway.get_prefix(keys.kms_keys()).values()])


def load_sync(gateway, key: str, kms: Kms | None = None) -> DatabaseSecrets | None:
    raw = gateway.get(key)
    return None if raw is None else open_secrets(kms or gateway_kms(gateway), key, raw)


def save_sync(gateway, key: str, secrets: DatabaseSecrets, kms: Kms | None = None) -> None:
    gateway.put(key, seal_secrets(kms or gateway_kms(gateway), key, secrets).model_dump_json())
