"""The controller's KMS step, run once per pass: automatic rotation of keys whose period
has passed, and deletion of keys whose waiting period is over, unless something still
needs them (then the key goes back to disabled and an event says why)."""

from __future__ import annotations

import logging

from ..models import KmsKey, now
from ..security import kms
from ..store import Store, keys
from .operations import record_event

log = logging.getLogger("dbplane.controller.kms")

EVENTS = "_kms"            # events about keys are recorded under this pseudo-database


def rotation_due(key: KmsKey, at: float) -> bool:
    return key.state == "enabled" and key.rotation_days > 0 \
        and key.rotated_at + key.rotation_days * kms.DAY <= at


def deletion_due(key: KmsKey, at: float) -> bool:
    return key.state == "pending_deletion" and key.deletion_date is not None \
        and key.deletion_date <= at


async def _unchanged(store: Store, key: KmsKey) -> bool:
    """The record is still what this pass read (the API may have changed it meanwhile).
    etcd has no compare-and-swap in our Store, so re-read just before writing."""
    return await store.get(keys.kms_key(key.id), KmsKey) == key


async def ensure_keys(store: Store, root_file: str, at: float | None = None) -> list[str]:
    """Rotate and delete what is due. Returns one sentence per action taken."""
    at = now() if at is None else at
    done: list[str] = []
    all_keys = await kms.list_keys(store)
    due = [k for k in all_keys if rotation_due(k, at)]
    root = kms.load_root_key(root_file) if due else b""   # only needed to rotate
    for key in due:
        if not await _unchanged(store, key):
            continue                   # the next pass sees the new record
        rotated = kms.rotate(root, key)
        await store.put(keys.kms_key(key.id), rotated)
        done.append(f"rotated KMS key {kms.label(key)} to version {kms.current_version(rotated)} "
                    f"(automatic rotation every {key.rotation_days} days)")
        await record_event(store, EVENTS, "key-rotated", done[-1])
        log.info("%s", done[-1])
    for key in (k for k in all_keys if deletion_due(k, at)):
        done.append(await _delete(store, key))
    return done


async def _delete(store: Store, key: KmsKey) -> str:
    users = await kms.key_users(store, key)
    if not await _unchanged(store, key):
        return f"KMS key {kms.label(key)} changed during the pass; deletion re-checked next pass"
    if users:
        await store.put(keys.kms_key(key.id), kms.cancel_deletion(key))
        sentence = (f"KMS key {kms.label(key)} was not deleted and is disabled now: it is still "
                    f"needed by {kms.describe_users(users)}; {kms.in_use(key, users).hint}")
        await record_event(store, EVENTS, "key-deletion-refused", sentence)
        log.warning("%s", sentence)
        return sentence
    await store.delete(keys.kms_key(key.id))
    sentence = (f"deleted KMS key {kms.label(key)} after its waiting period: data it encrypted "
                "can no longer be decrypted")
    await record_event(store, EVENTS, "key-deleted", sentence)
    log.info("%s", sentence)
    return sentence
