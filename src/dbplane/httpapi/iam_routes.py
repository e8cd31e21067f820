"""Identity and access routes: users, roles, managed policies, access keys, a policy
simulator, whoami and session tokens. Responses never carry a secret, except the one answer
to "create an access key", which is the only time its secret exists outside etcd's sealed
copy (the CLI writes it into a 0600 profile file and does not print it), and the session
token its caller asked for."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from ..errors import Conflict, InvalidInput, NotFound
from ..security import iam, session_token
from ..security import policy as policies
from ..store import Store, keys

router = APIRouter()
KindPath = Literal["user", "role"]


class NewPrincipal(BaseModel):
    name: str
    description: str = Field("", max_length=1000)
    model_config = {"extra": "forbid"}


class NewPolicy(BaseModel):
    name: str
    document: str
    description: str = Field("", max_length=1000)
    model_config = {"extra": "forbid"}


class Attach(BaseModel):
    policy: str
    model_config = {"extra": "forbid"}


class KeyStatus(BaseModel):
    status: Literal["Active", "Inactive"]
    model_config = {"extra": "forbid"}


class SessionTokenRequest(BaseModel):
    duration_seconds: int = Field(session_token.DEFAULT_SECONDS, ge=session_token.MIN_SECONDS,
                                  le=session_token.MAX_SECONDS)


class Simulate(BaseModel):
    principal: str                          # user/NAME or role/NAME
    action: str
    resource: str
    source_ip: str = "127.0.0.1"
    database_user: str = ""
    model_config = {"extra": "forbid"}


def _store(request: Request) -> Store:
    return request.app.state.store


def _principal_view(p: iam.Principal, access_keys: list[iam.AccessKey]) -> dict:
    return {"kind": p.kind, "name": p.name, "principal": p.ref, "description": p.description,
            "policies": p.policies, "created_at": p.created_at,
            "access_keys": [_key_view(k) for k in access_keys]}


def _key_view(k: iam.AccessKey) -> dict:
    return {"id": k.id, "principal": k.principal, "status": k.status, "created_at": k.created_at}


def _policy_view(p: iam.ManagedPolicy, attached_to: list[str] | None = None) -> dict:
    out = {"name": p.name, "description": p.description, "builtin": p.builtin,
           "created_at": p.created_at, "document": p.document}
    if attached_to is not None:
        out["attached_to"] = attached_to
    return out


async def _attachments(s: Store, policy_name: str) -> list[str]:
    refs = []
    for kind in ("user", "role"):
        refs += [p.ref for p in await s.list(keys.iam_principals(kind), iam.Principal)
                 if policy_name in p.policies]
    return refs


@router.get("/v1/whoami")
async def whoami(request: Request):
    return {"principal": request.state.principal}


@router.post("/v1/session-token", status_code=201)
async def get_session_token(request: Request, body: SessionTokenRequest | None = None):
    identity: iam.Identity = request.state.identity
    duration = (body or SessionTokenRequest()).duration_seconds
    token, expires = session_token.issue(identity.key_id, identity.principal, identity.secret, duration)
    return {"token": token, "principal": identity.principal, "access_key_id": identity.key_id,
            "expires_at": expires}


# /v1/iam/policies before /v1/iam/{kind}s, which would match it too (kind="policie")
# -- policies ---------------------------------------------------------------------------------------

@router.get("/v1/iam/policies")
async def list_policies(request: Request):
    s = _store(request)
    return [_policy_view(p, await _attachments(s, p.name))
            for p in sorted(await s.list(keys.iam_policies(), iam.ManagedPolicy), key=lambda p: p.name)]


@router.post("/v1/iam/policies", status_code=201)
async def create_policy(body: NewPolicy, request: Request):
    s = _store(request)
    iam.check_name(body.name, "policy")
    policies.parse(body.name, body.document)
    record = iam.ManagedPolicy(name=body.name, document=body.document, description=body.description)
    if not await s.create(keys.iam_policy(body.name), record):
        raise Conflict(f"policy {body.name} already exists",
                       "choose another name, or delete it first", code="policy_exists")
    return _policy_view(record, [])


@router.get("/v1/iam/policies/{name}")
async def get_policy(name: str, request: Request):
    s = _store(request)
    return _policy_view(await iam.get_policy(s, name), await _attachments(s, name))


@router.delete("/v1/iam/policies/{name}")
async def delete_policy(name: str, request: Request):
    s = _store(request)
    record = await iam.get_policy(s, name)
    if record.builtin:
        raise Conflict(f"policy {name} is built in", "it cannot be deleted; detach it instead",
                       code="builtin_policy")
    attached = await _attachments(s, name)
    if attached:
        raise Conflict(f"policy {name} is attached to {', '.join(attached)}",
                       f"detach it first: dbplane iam detach-policy {name} "
                       f"--{attached[0].replace('/', ' ', 1)}", code="delete_conflict")
    await s.delete(keys.iam_policy(name))
    return {"deleted": name}


# /v1/iam/access-keys/... before /v1/iam/{kind}s/{name} too
async def _access_key(s: Store, key_id: str) -> iam.AccessKey:
    k = await s.get(keys.iam_access_key(key_id), iam.AccessKey) if key_id.isalnum() else None
    if k is None:
        raise NotFound(f"access key {key_id} does not exist",
                       "list keys with 'dbplane iam access-key list --user NAME'",
                       code="access_key_not_found")
    return k


@router.patch("/v1/iam/access-keys/{key_id}")
async def update_access_key(key_id: str, body: KeyStatus, request: Request):
    s = _store(request)
    k = await _access_key(s, key_id)
    if body.status == "Inactive" and k.status == "Active":
        await iam.check_not_last_admin(s, k.principal, f"deactivating access key {key_id}")
    k = k.model_copy(update={"status": body.status})
    await s.put(keys.iam_access_key(key_id), k)
    return _key_view(k)


@router.delete("/v1/iam/access-keys/{key_id}")
async def delete_access_key(key_id: str, request: Request):
    s = _store(request)
    k = await _access_key(s, key_id)
    if k.status == "Active":
        active = [x for x in await iam.access_keys_of(s, k.principal) if x.status == "Active"]
        if len(active) == 1:
            await iam.check_not_last_admin(s, k.principal, f"deleting access key {key_id}")
    await s.delete(keys.iam_access_key(key_id))
    return {"deleted": key_id}


# -- principals -------------------------------------------------------------------------------------

@router.get("/v1/iam/{kind}s")
async def list_principals(kind: KindPath, request: Request):
    s = _store(request)
    out = []
    for p in sorted(await s.list(keys.iam_principals(kind), iam.Principal), key=lambda p: p.name):
        out.append(_principal_view(p, await iam.access_keys_of(s, p.ref)))
    return out


@router.post("/v1/iam/{kind}s", status_code=201)
async def create_principal(kind: KindPath, body: NewPrincipal, request: Request):
    s = _store(request)
    iam.check_name(body.name, kind)
    p = iam.Principal(kind=kind, name=body.name, description=body.description)
    if not await s.create(keys.iam_principal(kind, body.name), p):
        raise Conflict(f"{kind} {body.name} already exists", f"choose another name, or "
                       f"'dbplane iam {kind} describe {body.name}'", code=f"{kind}_exists")
    return _principal_view(p, [])


@router.get("/v1/iam/{kind}s/{name}")
async def get_principal(kind: KindPath, name: str, request: Request):
    s = _store(request)
    p = await iam.get_principal(s, kind, name)
    return _principal_view(p, await iam.access_keys_of(s, p.ref))


@router.delete("/v1/iam/{kind}s/{name}")
async def delete_principal(kind: KindPath, name: str, request: Request):
    s = _store(request)
    p = await iam.get_principal(s, kind, name)
    access_keys = await iam.access_keys_of(s, p.ref)
    if access_keys:
        raise Conflict(f"{p.ref} still has access keys ({', '.join(k.id for k in access_keys)})",
                       f"delete them first: dbplane iam access-key delete {access_keys[0].id}",
                       code="delete_conflict")
    await s.delete(keys.iam_principal(kind, name))
    return {"deleted": p.ref}


@router.post("/v1/iam/{kind}s/{name}/policies")
async def attach_policy(kind: KindPath, name: str, body: Attach, request: Request):
    s = _store(request)
    p = await iam.get_principal(s, kind, name)
    await iam.get_policy(s, body.policy)
    if body.policy not in p.policies:
        p = p.model_copy(update={"policies": [*p.policies, body.policy]})
        await s.put(keys.iam_principal(kind, name), p)
    return _principal_view(p, await iam.access_keys_of(s, p.ref))


@router.delete("/v1/iam/{kind}s/{name}/policies/{policy}")
async def detach_policy(kind: KindPath, name: str, policy: str, request: Request):
    s = _store(request)
    p = await iam.get_principal(s, kind, name)
    if policy not in p.policies:
        raise NotFound(f"policy {policy} is not attached to {p.ref}",
                       f"attached: {', '.join(p.policies) or 'none'}", code="policy_not_attached")
    if policy == iam.ADMIN_POLICY:
        await iam.check_not_last_admin(s, p.ref, f"detaching {policy} from {p.ref}")
    p = p.model_copy(update={"policies": [x for x in p.policies if x != policy]})
    await s.put(keys.iam_principal(kind, name), p)
    return _principal_view(p, await iam.access_keys_of(s, p.ref))


# -- access keys ------------------------------------------------------------------------------------

@router.get("/v1/iam/{kind}s/{name}/access-keys")
async def list_access_keys(kind: KindPath, name: str, request: Request):
    s = _store(request)
    p = await iam.get_principal(s, kind, name)
    return [_key_view(k) for k in await iam.access_keys_of(s, p.ref)]


@router.post("/v1/iam/{kind}s/{name}/access-keys", status_code=201)
async def create_access_key(kind: KindPath, name: str, request: Request):
    s = _store(request)
    p = await iam.get_principal(s, kind, name)
    record, secret = await iam.create_access_key(s, p)
    return {**_key_view(record), "secret_access_key": secret}


@router.post("/v1/iam/simulate")
async def simulate(body: Simulate, request: Request):
    """What the policies of a principal decide for one request (like IAM's policy simulator)."""
    s = _store(request)
    kind, name = iam.split_ref(body.principal)
    p = await iam.get_principal(s, kind, name)
    if not any(policies.action_matches(body.action, a) for a in policies.ALL_ACTIONS):
        raise InvalidInput(f"unknown action {body.action!r}", "see docs/security.md for the actions",
                           code="invalid_action")
    attached = [iam.parsed(await iam.get_policy(s, n)) for n in p.policies]
    try:
        decision = policies.evaluate(attached, policies.Request(
            action=body.action, resource=body.resource, source_ip=body.source_ip,
            principal=p.ref, database_user=body.database_user))
    except ValueError as e:
        raise InvalidInput(f"cannot simulate: {e}", "check source_ip", code="invalid_input") from None
    return {"principal": p.ref, "action": body.action, "resource": body.resource,
            "decision": "allowed" if decision.allowed else "denied", "reason": decision.reason}
