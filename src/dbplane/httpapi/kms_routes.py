"""Routes of the local KMS (like AWS KMS's CreateKey, DescribeKey, ListKeys, RotateKeyOnDemand,
DisableKey, EnableKey, ScheduleKeyDeletion, CancelKeyDeletion). A key is named by its id
(`key-...`) or alias (`alias/...`, which holds '/': hence `{ref:path}`). Responses carry
metadata only (security/kms.py KeyView), never key material, wrapped or not.

etcd has no compare-and-swap in our Store: changes are read-modify-write of one record."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel

from ..errors import InvalidInput
from ..models import KmsKey, PlatformConfig
from ..security import kms
from ..store import Store, keys

router = APIRouter()


class CreateKey(BaseModel):
    alias: str = ""
    description: str = ""
    rotation_days: int = 365

    model_config = {"extra": "forbid"}


class PatchKey(BaseModel):
    description: str | None = None
    rotation_days: int | None = None

    model_config = {"extra": "forbid"}


class ScheduleDeletion(BaseModel):
    pending_days: int = 30

    model_config = {"extra": "forbid"}


def _store(request: Request) -> Store:
    return request.app.state.store


async def _root_key(s: Store) -> bytes:
    config = await s.get(keys.config(), PlatformConfig) or PlatformConfig()
    return kms.load_root_key(config.kms_root_file)


def _view(key: KmsKey, **extra) -> dict:
    return {**kms.KeyView.of(key).model_dump(), **extra}


async def _save(s: Store, key: KmsKey) -> dict:
    await s.put(keys.kms_key(key.id), key)
    return _view(key)


@router.get("/v1/kms/keys")
async def list_keys(request: Request):
    return [_view(k) for k in await kms.list_keys(_store(request))]


@router.post("/v1/kms/keys", status_code=201)
async def create_key(body: CreateKey, request: Request):
    s = _store(request)
    kms.check_alias(body.alias)
    kms.check_description(body.description)
    kms.check_rotation_days(body.rotation_days)
    if body.alias and (other := kms.find_key(await kms.list_keys(s), body.alias)) is not None:
        raise kms.KmsConflict(f"alias {body.alias} already names KMS key {other.id}",
                              "choose another alias", code="kms_alias_exists")
    key = kms.new_key(await _root_key(s), alias=body.alias, description=body.description,
                      rotation_days=body.rotation_days)
    await s.create(keys.kms_key(key.id), key)
    return _view(key)


# action routes first: a GET of "alias/x/rotate" is a key named so, a POST is an action


@router.post("/v1/kms/keys/{ref:path}/rotate")
async def rotate_key(ref: str, request: Request):
    s = _store(request)
    key = await kms.get_key(s, ref)
    return await _save(s, kms.rotate(await _root_key(s), key))


@router.post("/v1/kms/keys/{ref:path}/disable")
async def disable_key(ref: str, request: Request):
    s = _store(request)
    return await _save(s, kms.disable(await kms.get_key(s, ref)))


@router.post("/v1/kms/keys/{ref:path}/enable")
async def enable_key(ref: str, request: Request):
    s = _store(request)
    return await _save(s, kms.enable(await kms.get_key(s, ref)))


@router.post("/v1/kms/keys/{ref:path}/schedule-deletion")
async def schedule_key_deletion(ref: str, request: Request, body: ScheduleDeletion | None = None):
    s = _store(request)
    key = await kms.get_key(s, ref)
    scheduled = kms.schedule_deletion(key, (body or ScheduleDeletion()).pending_days)
    await kms.check_unused(s, key)
    return await _save(s, scheduled)


@router.post("/v1/kms/keys/{ref:path}/cancel-deletion")
async def cancel_key_deletion(ref: str, request: Request):
    s = _store(request)
    return await _save(s, kms.cancel_deletion(await kms.get_key(s, ref)))


@router.get("/v1/kms/keys/{ref:path}")
async def describe_key(ref: str, request: Request):
    s = _store(request)
    key = await kms.get_key(s, ref)
    return _view(key, used_by=await kms.key_users(s, key))


@router.patch("/v1/kms/keys/{ref:path}")
async def update_key(ref: str, body: PatchKey, request: Request):
    s = _store(request)
    if body.description is None and body.rotation_days is None:
        raise InvalidInput("nothing to update", "pass a description or rotation_days",
                           code="nothing_to_modify")
    key = await kms.get_key(s, ref)
    return await _save(s, kms.update(key, body.description, body.rotation_days))
