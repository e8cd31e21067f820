"""The local KMS: named keys, envelope encryption of backups, rotation, disable and
scheduled deletion (like AWS KMS). See docs/kms.md.

Three layers of keys:

- the **root key** (32 random bytes): a file `<root>/kms/root.key`, or sealed with a
  passphrase in `<root>/kms/root.sealed` and unsealed by `dbplane up` into a runtime
  file. It wraps the material of every KMS key;
- **KMS keys** (`KmsKey` in etcd, `key-<hex>`, optionally `alias/<name>`): each version
  holds 32 bytes of material, stored only wrapped (AES-256-GCM under the root key, the
  key id and version bound as associated data);
- **data keys**: a fresh 32-byte key per backup, returned in plain text to encrypt with
  and wrapped under the newest version of a KMS key to store beside the ciphertext.

Plain key material never leaves this module except as a `DataKey`'s plaintext; nothing
here logs it, and `repr` of what holds it does not show it.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import json
import os
import re
import struct
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydantic import BaseModel, ValidationError

from ..errors import DbplaneError
from ..models import (
    ArchiveStatus,
    BackupRecord,
    DatabaseSpec,
    KmsKey,
    KmsKeyVersion,
    RepositorySpec,
    now,
)
from ..store import Store
from ..store import keys as store_keys

KEY_SIZE = 32                       # AES-256: root key, key material and data keys
NONCE_SIZE = 12
DEFAULT_ALIAS = "alias/dbplane/backup"
ALIAS_RE = re.compile(r"^alias/[a-zA-Z0-9/_-]+$")
MAX_ALIAS = 256
MAX_DESCRIPTION = 8192
ROTATION_DAYS = (90, 2560)          # AWS KMS's bounds; 0 turns automatic rotation off
PENDING_DAYS = (7, 30)
DAY = 86400.0

# scrypt cost of the sealed root: about 0.1 s and 32 MiB on every `dbplane up`
SCRYPT = {"n": 2**15, "r": 8, "p": 1}
SEALED_FORMAT = "dbplane-kms-root-sealed-v1"

# a wrapped data key: MAGIC, format, id length, key id, key version (the associated data),
# then nonce and ciphertext
BLOB_MAGIC = b"DBPK"
BLOB_FORMAT = 1


# -- errors ---------------------------------------------------------------------------------

class KmsError(DbplaneError):
    code = "kms_error"
    status = 400


class KmsKeyNotFound(KmsError):
    code = "kms_key_not_found"
    status = 404


class KmsConflict(KmsError):
    """The key's state forbids the request (disabled, pending deletion, in use, alias taken)."""
    code = "kms_conflict"
    status = 409


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ts)) if ts else "-"


def label(key: KmsKey) -> str:
    return f"{key.id} ({key.alias})" if key.alias else key.id


# -- the root key ---------------------------------------------------------------------------

def _write_secret(path: Path, data: bytes, owner: tuple[int, int] | None) -> None:
    """Atomically (temp file, fsync, rename), mode 0600 before the first byte lands."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        if owner:
            os.fchown(fd, *owner)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def load_root_key(path: Path | str) -> bytes:
    """The root key's 32 bytes, or an error naming what is wrong with the file."""
    if not str(path):
        raise KmsError("no KMS root key is configured for this platform",
                       "run 'dbplane up', which creates it and records it in the platform config",
                       code="kms_root_missing")
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise KmsError(f"the KMS root key {path} does not exist",
                       "run 'dbplane up' (with --kms-passphrase-file if the root is sealed), or copy "
                       "root.key from the host of the first 'dbplane up' to this path",
                       code="kms_root_missing") from None
    except OSError as e:
        raise KmsError(f"the KMS root key {path} cannot be read ({e.strerror})",
                       "run this as root or as the service account that owns the file",
                       code="kms_root_unreadable") from None
    if len(data) != KEY_SIZE:
        raise KmsError(f"the KMS root key {path} has {len(data)} bytes instead of {KEY_SIZE}",
                       "restore the file from a copy (every host has the same one); a new root "
                       "key cannot unwrap the existing KMS keys", code="kms_root_invalid")
    return data


def _read_passphrase(path: Path) -> bytes:
    try:
        passphrase = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise KmsError(f"the KMS passphrase file {path} cannot be read "
                       f"({getattr(e, 'strerror', None) or type(e).__name__})",
                       "pass a readable text file holding the passphrase with --kms-passphrase-file",
                       code="kms_passphrase_unreadable") from None
    if not passphrase:
        raise KmsError(f"the KMS passphrase file {path} is empty",
                       "write the passphrase into it (one line), mode 0600",
                       code="kms_passphrase_unreadable")
    return passphrase.encode()


def _kek(passphrase: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(passphrase, salt=salt, n=n, r=r, p=p, maxmem=128 * r * n + 2**24,
                          dklen=KEY_SIZE)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def seal_root_key(root_key: bytes, passphrase: bytes) -> bytes:
    """The sealed-root file's content: the root key under scrypt(passphrase, salt)."""
    salt, nonce = os.urandom(16), os.urandom(NONCE_SIZE)
    sealed = AESGCM(_kek(passphrase, salt, **SCRYPT)).encrypt(nonce, root_key, SEALED_FORMAT.encode())
    return json.dumps({"format": SEALED_FORMAT, "kdf": "scrypt", **SCRYPT, "salt": _b64(salt),
                       "nonce": _b64(nonce), "ciphertext": _b64(sealed)}, indent=2).encode()


def unseal_root_key(sealed: bytes, passphrase: bytes, where: str = "the sealed KMS root") -> bytes:
    try:
        doc = json.loads(sealed)
        assert doc["format"] == SEALED_FORMAT and doc["kdf"] == "scrypt"
        kek = _kek(passphrase, base64.b64decode(doc["salt"]), doc["n"], doc["r"], doc["p"])
        nonce, ciphertext = base64.b64decode(doc["nonce"]), base64.b64decode(doc["ciphertext"])
    except (ValueError, KeyError, TypeError, AssertionError):
        raise KmsError(f"{where} is damaged (not a {SEALED_FORMAT} document)",
                       "restore it from a copy of the data root", code="kms_unseal_failed") from None
    try:
        root = AESGCM(kek).decrypt(nonce, ciphertext, SEALED_FORMAT.encode())
    except InvalidTag:
        raise KmsError(f"the passphrase does not unseal {where}",
                       "pass the passphrase of the first 'dbplane up' of this data root with "
                       "--kms-passphrase-file", code="kms_unseal_failed") from None
    if len(root) != KEY_SIZE:
        raise KmsError(f"{where} holds {len(root)} bytes instead of {KEY_SIZE}",
                       "restore it from a copy of the data root", code="kms_unseal_failed")
    return root


def ensure_root_key(kms_dir: Path, runtime_file: Path, owner: tuple[int, int] | None,
                    passphrase_file: Path | None = None) -> Path:
    """Create the root key once and return the file every process reads it from.

    Key-file mode (no passphrase): `kms_dir/root.key`, 0600, owned by `owner` (the service
    account that runs backup workers and restore commands). Passphrase mode:
    `kms_dir/root.sealed` (0600, this user), unsealed on every call into `runtime_file`.
    The mode chosen at the first call sticks: switching is refused, never silent."""
    kms_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(kms_dir, 0o711)             # the service account reaches root.key, lists nothing
    key_file, sealed_file = kms_dir / "root.key", kms_dir / "root.sealed"
    if passphrase_file is None:
        if sealed_file.exists():
            raise KmsError(f"the KMS root key of this data root is sealed with a passphrase "
                           f"({sealed_file})", "pass the passphrase file with 'dbplane up "
                           "--kms-passphrase-file FILE'", code="kms_sealed")
        if not key_file.exists():
            _write_secret(key_file, os.urandom(KEY_SIZE), owner)
        load_root_key(key_file)
        os.chmod(key_file, 0o600)        # also a copy from another host
        if owner:
            os.chown(key_file, *owner)
        return key_file
    if key_file.exists() and not sealed_file.exists():
        raise KmsError(f"the KMS root key of this data root is a key file ({key_file}), not sealed "
                       "with a passphrase", "start without --kms-passphrase-file",
                       code="kms_not_sealed")
    passphrase = _read_passphrase(Path(passphrase_file))
    if not sealed_file.exists():
        _write_secret(sealed_file, seal_root_key(os.urandom(KEY_SIZE), passphrase), None)
    root = unseal_root_key(sealed_file.read_bytes(), passphrase, str(sealed_file))
    _write_secret(runtime_file, root, owner)
    return runtime_file


def remove_runtime_key(runtime_file: Path) -> bool:
    """Remove the unsealed root key (`dbplane down`). True if there was one."""
    try:
        runtime_file.unlink()
        return True
    except FileNotFoundError:
        return False


# -- key records ----------------------------------------------------------------------------

def _material_aad(key_id: str, version: int) -> bytes:
    return f"dbplane-kms/v1/key-material/{key_id}/{version}".encode()


def _wrap_material(root_key: bytes, key_id: str, version: int) -> str:
    nonce = os.urandom(NONCE_SIZE)
    sealed = AESGCM(root_key).encrypt(nonce, os.urandom(KEY_SIZE), _material_aad(key_id, version))
    return _b64(nonce + sealed)


def _material(root_key: bytes, key: KmsKey, version: int) -> bytes:
    """The plain material of one version of a key. Private to this module (and tests)."""
    v = next((v for v in key.versions if v.version == version), None)
    if v is None:
        raise KmsError(f"KMS key {label(key)} has no version {version}",
                       "the data was encrypted by another platform or the key record was "
                       "replaced; restore the key record", code="kms_decrypt_failed")
    try:
        raw = base64.b64decode(v.wrapped_material)
        return AESGCM(root_key).decrypt(raw[:NONCE_SIZE], raw[NONCE_SIZE:],
                                        _material_aad(key.id, version))
    except (InvalidTag, ValueError):
        raise KmsError(f"the material of KMS key {label(key)} version {version} does not unwrap "
                       "under this KMS root key", "use the root key of the first 'dbplane up' "
                       "(copy root.key from that host)", code="kms_decrypt_failed") from None


def check_alias(alias: str) -> str:
    if alias and (not ALIAS_RE.fullmatch(alias) or len(alias) > MAX_ALIAS
                  or alias.startswith("alias/aws/") or alias.endswith(("/", "/policy")) or "//" in alias):
        raise KmsError(f"invalid KMS alias {alias!r}",
                       "write alias/NAME with letters, digits, '/', '_' and '-' (at most "
                       f"{MAX_ALIAS} characters; alias/aws/ and a last part 'policy' are reserved)",
                       code="kms_invalid_alias")
    return alias


def check_rotation_days(days: int) -> int:
    low, high = ROTATION_DAYS
    if days != 0 and not low <= days <= high:
        raise KmsError(f"rotation period of {days} days is out of range",
                       f"use {low}-{high} days, or 0 to turn automatic rotation off",
                       code="kms_invalid_rotation_days")
    return days


def check_description(description: str) -> str:
    if len(description) > MAX_DESCRIPTION:
        raise KmsError(f"description of {len(description)} characters is too long",
                       f"use at most {MAX_DESCRIPTION}", code="kms_invalid_description")
    return description


def new_key(root_key: bytes, alias: str = "", description: str = "",
            rotation_days: int = 365) -> KmsKey:
    """A new enabled key with one version of fresh material."""
    key_id = f"key-{uuid.uuid4().hex}"
    t = now()
    return KmsKey(id=key_id, alias=check_alias(alias), description=check_description(description),
                  rotation_days=check_rotation_days(rotation_days), created_at=t, rotated_at=t,
                  versions=[KmsKeyVersion(version=1, created_at=t,
                                          wrapped_material=_wrap_material(root_key, key_id, 1))])


def current_version(key: KmsKey) -> int:
    return max((v.version for v in key.versions), default=0)


def check_usable(key: KmsKey) -> KmsKey:
    """A disabled or pending-deletion key neither encrypts nor decrypts."""
    if key.state == "disabled":
        raise KmsConflict(f"KMS key {label(key)} is disabled",
                          f"enable it with 'dbplane kms enable-key {key.id}'", code="kms_key_disabled")
    if key.state == "pending_deletion":
        raise KmsConflict(f"KMS key {label(key)} is pending deletion on {_when(key.deletion_date)}",
                          f"cancel it with 'dbplane kms cancel-key-deletion {key.id}', then "
                          f"'dbplane kms enable-key {key.id}'", code="kms_key_pending_deletion")
    return key


def rotate(root_key: bytes, key: KmsKey) -> KmsKey:
    """A new version of material becomes the primary; older versions still decrypt."""
    check_usable(key)
    version, t = current_version(key) + 1, now()
    added = KmsKeyVersion(version=version, created_at=t,
                          wrapped_material=_wrap_material(root_key, key.id, version))
    return key.model_copy(update={"versions": [*key.versions, added], "rotated_at": t})


def update(key: KmsKey, description: str | None = None, rotation_days: int | None = None) -> KmsKey:
    changes: dict = {}
    if description is not None:
        changes["description"] = check_description(description)
    if rotation_days is not None:
        changes["rotation_days"] = check_rotation_days(rotation_days)
        if rotation_days and not key.rotation_days:   # turned on: the period counts from now
            changes["rotated_at"] = now()
    return key.model_copy(update=changes)


def _not_pending(key: KmsKey, action: str) -> None:
    if key.state == "pending_deletion":
        raise KmsConflict(f"KMS key {label(key)} is pending deletion on {_when(key.deletion_date)}; "
                          f"it cannot be {action}", f"cancel the deletion first with 'dbplane kms "
                          f"cancel-key-deletion {key.id}'", code="kms_key_pending_deletion")


def enable(key: KmsKey) -> KmsKey:
    _not_pending(key, "enabled")
    return key.model_copy(update={"state": "enabled"})


def disable(key: KmsKey) -> KmsKey:
    _not_pending(key, "disabled")
    return key.model_copy(update={"state": "disabled"})


def schedule_deletion(key: KmsKey, pending_days: int = 30) -> KmsKey:
    """Pending deletion for 7-30 days. The caller checks `key_users` first."""
    low, high = PENDING_DAYS
    if not low <= pending_days <= high:
        raise KmsError(f"a waiting period of {pending_days} days is out of range",
                       f"use {low}-{high} days", code="kms_invalid_pending_window")
    _not_pending(key, "scheduled for deletion again")
    return key.model_copy(update={"state": "pending_deletion",
                                  "deletion_date": now() + pending_days * DAY})


def cancel_deletion(key: KmsKey) -> KmsKey:
    """Like AWS KMS: the key comes back disabled."""
    if key.state != "pending_deletion":
        raise KmsConflict(f"KMS key {label(key)} is not pending deletion (it is {key.state})",
                          "nothing to cancel", code="kms_key_not_pending_deletion")
    return key.model_copy(update={"state": "disabled", "deletion_date": None})


def find_key(keys: Iterable[KmsKey], ref: str) -> KmsKey | None:
    """A key by id (key-...) or alias (alias/...)."""
    for k in keys:
        if ref and ref in (k.id, k.alias):
            return k
    return None


def not_found(ref: str) -> KmsKeyNotFound:
    return KmsKeyNotFound(f"KMS key {ref!r} not found",
                          "name a key by its id (key-...) or alias (alias/NAME); list them with "
                          "'dbplane kms list-keys'")


# -- views: metadata only ---------------------------------------------------------------------

class VersionView(BaseModel):
    version: int
    created_at: float


class KeyView(BaseModel):
    """What the API and CLI show of a key: never its material, wrapped or not."""
    id: str
    alias: str
    description: str
    state: str
    rotation_days: int
    current_version: int
    versions: list[VersionView]
    created_at: float
    rotated_at: float
    next_rotation_at: float | None
    deletion_date: float | None

    @classmethod
    def of(cls, key: KmsKey) -> KeyView:
        return cls(id=key.id, alias=key.alias, description=key.description, state=key.state,
                   rotation_days=key.rotation_days, current_version=current_version(key),
                   versions=[VersionView(version=v.version, created_at=v.created_at)
                             for v in key.versions],
                   created_at=key.created_at, rotated_at=key.rotated_at,
                   next_rotation_at=key.rotated_at + key.rotation_days * DAY
                   if key.rotation_days and key.state == "enabled" else None,
                   deletion_date=key.deletion_date)


# -- envelope encryption ----------------------------------------------------------------------

class DataKey(NamedTuple):
    """A fresh data key: encrypt with `plaintext`, store `wrapped` beside the ciphertext."""
    plaintext: bytes
    wrapped: bytes
    key_id: str
    key_version: int

    def __repr__(self) -> str:
        return f"DataKey(key_id={self.key_id!r}, key_version={self.key_version}, plaintext=<hidden>)"

    __str__ = __repr__


def _blob_header(key_id: str, version: int) -> bytes:
    raw_id = key_id.encode()
    return BLOB_MAGIC + bytes([BLOB_FORMAT, len(raw_id)]) + raw_id + struct.pack(">I", version)


def parse_wrapped(wrapped: bytes) -> tuple[str, int]:
    """The key id and version a wrapped data key names (no secret needed)."""
    try:
        assert wrapped[:4] == BLOB_MAGIC and wrapped[4] == BLOB_FORMAT
        n = wrapped[5]
        key_id = wrapped[6:6 + n].decode("ascii")
        (version,) = struct.unpack(">I", wrapped[6 + n:10 + n])
        assert len(wrapped) == 10 + n + NONCE_SIZE + KEY_SIZE + 16
        return key_id, version
    except (AssertionError, IndexError, UnicodeDecodeError, struct.error):
        raise KmsError("the wrapped data key is not a dbplane KMS blob (damaged or truncated)",
                       "restore the backup file from a copy (e.g. the second repository)",
                       code="kms_decrypt_failed") from None


# uses of KMS keys in this process, (operation, key id) -> count, until the audit log
# takes them (security/audit.py record_key_use)
KEY_USE: collections.Counter[tuple[str, str]] = collections.Counter()


def drain_key_use() -> dict[tuple[str, str], int]:
    used = dict(KEY_USE)
    KEY_USE.clear()
    return used


class Kms:
    """Encrypts and decrypts data keys with the keys read from etcd. Holds the root key:
    it is never shown by repr."""

    def __init__(self, root_key: bytes, keys: Iterable[KmsKey]):
        if len(root_key) != KEY_SIZE:
            raise KmsError(f"a KMS root key has {KEY_SIZE} bytes, not {len(root_key)}",
                           "load it with load_root_key()", code="kms_root_invalid")
        self.__root = root_key
        self._keys = list(keys)

    def __repr__(self) -> str:
        return f"Kms({len(self._keys)} keys)"

    __str__ = __repr__

    @property
    def keys(self) -> list[KmsKey]:
        return list(self._keys)

    def resolve(self, ref: str) -> KmsKey:
        key = find_key(self._keys, ref)
        if key is None:
            raise not_found(ref)
        return key

    def generate_data_key(self, ref: str) -> DataKey:
        """A fresh random 32-byte key, wrapped under the newest version of the key `ref`."""
        key = check_usable(self.resolve(ref))
        version = current_version(key)
        material = _material(self.__root, key, version)
        plaintext, nonce, header = os.urandom(KEY_SIZE), os.urandom(NONCE_SIZE), _blob_header(key.id, version)
        wrapped = header + nonce + AESGCM(material).encrypt(nonce, plaintext, header)
        KEY_USE["GenerateDataKey", key.id] += 1
        return DataKey(plaintext, wrapped, key.id, version)

    def decrypt_data_key(self, wrapped: bytes) -> bytes:
        """The plain data key of a wrapped one, with whichever version wrapped it."""
        key_id, version = parse_wrapped(wrapped)
        key = find_key(self._keys, key_id)
        if key is None:
            raise KmsError(f"the data key was wrapped by KMS key {key_id}, which does not exist",
                           "it was deleted, or the data comes from another platform: restore the "
                           "key record into etcd", code="kms_decrypt_failed")
        check_usable(key)
        header_len = 10 + len(key_id)
        nonce = wrapped[header_len:header_len + NONCE_SIZE]
        KEY_USE["Decrypt", key.id] += 1
        try:
            return AESGCM(_material(self.__root, key, version)).decrypt(
                nonce, wrapped[header_len + NONCE_SIZE:], wrapped[:header_len])
        except InvalidTag:
            raise KmsError(f"the data key wrapped by KMS key {label(key)} version {version} fails "
                           "authentication (tampered or damaged)", "restore the backup file from "
                           "a copy (e.g. the second repository)", code="kms_decrypt_failed") from None


# -- etcd -----------------------------------------------------------------------------------------

async def list_keys(store: Store) -> list[KmsKey]:
    return sorted(await store.list(store_keys.kms_keys(), KmsKey), key=lambda k: k.created_at)


async def get_key(store: Store, ref: str) -> KmsKey:
    """A key by id or alias from etcd, or kms_key_not_found."""
    if ref.startswith("key-") and "/" not in ref:
        key = await store.get(store_keys.kms_key(ref), KmsKey)
    else:
        key = find_key(await list_keys(store), ref)
    if key is None:
        raise not_found(ref)
    return key


async def load_kms(store: Store, root_file: str) -> Kms:
    return Kms(load_root_key(root_file), await list_keys(store))


def _parsed(raw: dict[str, bytes], model: type[BaseModel], key_id: str, users: list[str]):
    """Records that parse; one that does not but names the key counts as a user (we cannot
    tell, and deleting a key something needs is the failure this guard exists for)."""
    for etcd_key, value in raw.items():
        try:
            yield model.model_validate_json(value)
        except ValidationError:
            if key_id.encode() in value:
                users.append(f"the unreadable record {etcd_key}")


async def key_users(store: Store, key: KmsKey) -> list[str]:
    """What still needs the key, in plain English: backups not expired, WAL archives,
    databases and repositories configured to encrypt with it."""
    users: list[str] = []

    def refers(ref: str) -> bool:
        return bool(ref) and ref in (key.id, key.alias)

    for b in _parsed(await store.get_prefix(store_keys.backups()), BackupRecord, key.id, users):
        if b.kms_key_id == key.id and b.state != "expired":
            users.append(f"{'snapshot' if b.manual else 'backup'} {b.id} of database {b.database} "
                         f"({b.state})")
    archives = await store.get_prefix(store_keys.archive_status().rstrip("/") + "/")
    for a in _parsed(archives, ArchiveStatus, key.id, users):
        if key.id in a.kms_key_ids:
            users.append(f"the WAL archive of database {a.database} ({a.archive_id})")
    specs = {k: v for k, v in (await store.get_prefix(store_keys.databases())).items()
             if k.endswith("/spec")}
    for d in _parsed(specs, DatabaseSpec, key.id, users):
        if refers(d.backup.kms_key):
            users.append(f"database {d.name} (its backups encrypt with {d.backup.kms_key})")
    for r in _parsed(await store.get_prefix(store_keys.repositories()), RepositorySpec, key.id, users):
        if refers(r.kms_key):
            users.append(f"repository {r.name} (its copies encrypt with {r.kms_key})")
    # database passwords, access keys and IAM database passwords sealed in etcd (sealed.py)
    marker = f'"kms_key_id":"{key.id}"'.encode()
    sealed = 0
    for prefix in ("secrets/", "secrets-next/", "iam/access-keys/", "iam/db-passwords/"):
        sealed += sum(marker in raw for raw in (await store.get_prefix(store_keys.ROOT + prefix)).values())
    if sealed:
        users.append(f"{sealed} secrets sealed in etcd (database passwords, access keys)")
    return users


def describe_users(users: list[str], shown: int = 5) -> str:
    more = f" and {len(users) - shown} more" if len(users) > shown else ""
    return "; ".join(users[:shown]) + more


def in_use(key: KmsKey, users: list[str]) -> KmsConflict:
    return KmsConflict(
        f"KMS key {label(key)} is still needed by {describe_users(users)}",
        "first let those backups expire (or delete them) and point those databases and repositories "
        f"at another key; to stop its use at once, disable it ('dbplane kms disable-key {key.id}')",
        code="kms_key_in_use")


async def check_unused(store: Store, key: KmsKey) -> None:
    users = await key_users(store, key)
    if users:
        raise in_use(key, users)


def ensure_default_key(gateway, root_file: Path | str, alias: str = DEFAULT_ALIAS,
                       description: str = "default key of backups and WAL archives") -> KmsKey | None:
    """`dbplane up`: create a platform key (alias/dbplane/backup for backups,
    alias/dbplane/secrets for stored secrets) if no key has that alias. `gateway` is the
    synchronous store.gateway.Gateway. Returns the new key."""
    existing = [KmsKey.model_validate_json(v) for v in gateway.get_prefix(store_keys.kms_keys()).values()]
    if find_key(existing, alias) is not None:
        return None
    key = new_key(load_root_key(root_file), alias=alias, description=f"{description} (created by dbplane up)")
    gateway.put(store_keys.kms_key(key.id), key.model_dump_json())
    return key
