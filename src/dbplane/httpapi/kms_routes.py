"""Routes of the local KMS (like AWS KMS's CreateKey, DescribeKey, ListKeys, RotateKeyOnDemand,
DisableKey, EnableKey, ScheduleKeyDeletion, CancelKeyDeletion, GetKeyPolicy, PutKeyPolicy). A
key is named by its id (`key-...`) or alias (`alias/...`, which holds '/': hence `{ref:path}`).
Responses carry metadata only (security/kms.py KeyView), never key material, wrapped or not.

Key policies (security/key_policy.py) decide with IAM who may act on a key: the app-wide
authorisation asks them for the routes on one key; `require_key_use` is what other routes
call when the caller makes a resource use a key.

etcd has no compare-and-swap in our Store: changes are read-modify-write of one record."""

from __future__ import annotations

from collections.abc import Iterable

from fastapi import APIRouter, Request
from pydantic import BaseModel

from ..errors import Conflict, InvalidInput
from ..models import KmsKey, PlatformConfig
from ..security import iam, key_policy, kms
from ..security.policy import Policy
from ..security.policy import Request as PolicyRequest
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


class PutKeyPolicy(BaseModel):
    policy: str                            # the JSON document, stored as written
    bypass_lockout_check: bool = False     # like AWS's BypassPolicyLockoutSafetyCheck

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


def _context(request: Request, action: str, resource: str) -> PolicyRequest:
    """What the caller asks, with the context conditions test (as httpapi/auth.py builds it)."""
    return PolicyRequest(action=action, resource=resource, principal=request.state.principal,
                         source_ip=request.client.host if request.client else "",
                         secure_transport=request.url.scheme == "https")


async def require_key_use(request: Request, refs: Iterable[str], action: str) -> None:
    """The caller makes a resource use these keys: `action` is key_policy.ENCRYPT (it will
    encrypt with them) or key_policy.DECRYPT (it reads what they encrypted). Refused with
    access_denied unless the key policy and IAM allow it. Keys that do not exist are left
    to the route (kms_key_not_found, or a restore that cannot decrypt)."""
    s, authority = _store(request), request.app.state.authority
    for ref in dict.fromkeys(r for r in refs if r):
        try:
            await kms.get_key(s, ref)
        except kms.KmsKeyNotFound:
            continue
        await authority.authorize(request.state.principal, _context(request, action, f"key/{ref}"))


async def _check_lockout(request: Request, key: KmsKey, policy: Policy) -> None:
    """Refuse a key policy under which no principal with an active access key could
    kms:PutKeyPolicy on the key any more (each evaluated as if asking like this caller)."""
    s, authority = _store(request), request.app.state.authority
    holders = sorted({k.principal for k in await s.list(keys.iam_access_keys(), iam.AccessKey)
                      if k.status == "Active"})
    candidates = {who: await authority.policies_of(who) for who in holders}
    if not key_policy.managers(key, policy, candidates, _context(request, key_policy.PUT_POLICY, "")):
        raise Conflict(f"this key policy would leave nobody able to {key_policy.PUT_POLICY} on KMS key "
                       f"{kms.label(key)}: no principal with an active access key would be allowed to",
                       f'keep a statement that lets IAM policies decide (Principal "{key_policy.ACCOUNT}") '
                       f"or allows {key_policy.PUT_POLICY} to a principal with an access key; or pass "
                       "--bypass-lockout-check if you mean it", code="kms_policy_lockout")


def _policy_view(key: KmsKey) -> dict:
    return {"key_id": key.id, "alias": key.alias, "policy": key_policy.document_of(key),
            "default": not key.policy}


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


# action routes first: a GET of "alias/x/rotate" is a key named so, a POST is an action; a
# GET of ".../policy" is the key policy (no alias ends in /policy: kms.check_alias)


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


@router.get("/v1/kms/keys/{ref:path}/policy")
async def get_key_policy(ref: str, request: Request):
    """The key policy as written, or the default one (IAM policies decide)."""
    return _policy_view(await kms.get_key(_store(request), ref))


@router.put("/v1/kms/keys/{ref:path}/policy")
async def put_key_policy(ref: str, body: PutKeyPolicy, request: Request):
    s = _store(request)
    key = await kms.get_key(s, ref)
    parsed = key_policy.parse(key, body.policy)             # 400 malformed_policy, naming what is wrong
    if not body.bypass_lockout_check:
        await _check_lockout(request, key, parsed)
    key = key.model_copy(update={"policy": body.policy})
    await s.put(keys.kms_key(key.id), key)
    return _policy_view(key)


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
