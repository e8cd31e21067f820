"""Principals (users and roles), managed policies and access keys, as records in etcd.

A user is a person, a role is an application or service; both hold access keys and have
managed policies attached. Secret access keys are sealed under the KMS key
alias/dbplane/secrets (security/sealed.py): etcd never holds one in the clear.

`Authority` is what the API (and later the proxy) asks "who signed this, and may they?":
records are cached for CACHE_SECONDS, so a deleted or deactivated key stops working
within that time.
"""

from __future__ import annotations

import json
import re
import time
from typing import Literal

from pydantic import BaseModel, Field

from ..errors import Conflict, DbplaneError, InvalidInput, NotFound
from ..models import now
from ..store import keys
from . import key_policy
from . import policy as policies
from .kms import Kms, list_keys, load_root_key
from .sealed import SECRETS_KEY_ALIAS, SealedSecret, seal, unseal

Kind = Literal["user", "role"]
NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.@+=,-]{0,63}$")
ADMIN_USER = "admin"
ADMIN_POLICY = "AdministratorAccess"
MAX_KEYS_PER_PRINCIPAL = 2          # like IAM: one in use, one being rotated in
CACHE_SECONDS = 5.0


class Unauthenticated(DbplaneError):
    code = "unauthenticated"
    status = 401


class AccessDenied(DbplaneError):
    code = "access_denied"
    status = 403


class Principal(BaseModel):
    kind: Kind
    name: str
    description: str = ""
    policies: list[str] = Field(default_factory=list)      # attached managed policies
    created_at: float = Field(default_factory=now)

    @property
    def ref(self) -> str:
        return f"{self.kind}/{self.name}"


class ManagedPolicy(BaseModel):
    name: str
    document: str                   # the JSON text as written (validated on create)
    description: str = ""
    builtin: bool = False
    created_at: float = Field(default_factory=now)


class AccessKey(BaseModel):
    id: str
    principal: str                  # "user/alice" or "role/orders-app"
    status: Literal["Active", "Inactive"] = "Active"
    secret: SealedSecret
    created_at: float = Field(default_factory=now)


def check_name(name: str, what: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise InvalidInput(f"invalid {what} name {name!r}",
                           "use 1-64 letters, digits and _.@+=,- starting with a letter",
                           code="invalid_name")
    return name


def split_ref(ref: str) -> tuple[Kind, str]:
    kind, _, name = ref.partition("/")
    if kind not in ("user", "role") or not name:
        raise InvalidInput(f"invalid principal {ref!r}", "write user/NAME or role/NAME", code="invalid_name")
    return kind, name   # type: ignore[return-value]


def secret_context(key_id: str) -> str:
    return f"access key {key_id}"


def parsed(record: ManagedPolicy) -> policies.Policy:
    return policies.parse(record.name, record.document)


# -- etcd ------------------------------------------------------------------------------------------

async def get_principal(store, kind: Kind, name: str) -> Principal:
    p = await store.get(keys.iam_principal(kind, name), Principal)
    if p is None:
        raise NotFound(f"{kind} {name} does not exist", f"list them with 'dbplane iam {kind} list'",
                       code=f"{kind}_not_found")
    return p


async def get_policy(store, name: str) -> ManagedPolicy:
    p = await store.get(keys.iam_policy(name), ManagedPolicy)
    if p is None:
        raise NotFound(f"policy {name} does not exist", "list them with 'dbplane iam policy list'",
                       code="policy_not_found")
    return p


async def access_keys_of(store, ref: str) -> list[AccessKey]:
    return sorted((k for k in await store.list(keys.iam_access_keys(), AccessKey) if k.principal == ref),
                  key=lambda k: k.created_at)


async def load_secrets_kms(store) -> Kms:
    from ..models import PlatformConfig
    config = await store.get(keys.config(), PlatformConfig)
    if config is None or not config.kms_root_file:
        raise DbplaneError("the platform has no KMS root key configured",
                           "run 'dbplane up', which creates it", code="kms_root_missing", status=503)
    return Kms(load_root_key(config.kms_root_file), await list_keys(store))


async def create_access_key(store, principal: Principal) -> tuple[AccessKey, str]:
    """A new active key and its secret (returned once; only its sealed form is stored)."""
    from .signing import new_access_key
    existing = await access_keys_of(store, principal.ref)
    if len(existing) >= MAX_KEYS_PER_PRINCIPAL:
        raise Conflict(f"{principal.ref} already has {len(existing)} access keys (the limit)",
                       f"delete one first: dbplane iam access-key delete {existing[0].id}",
                       code="access_key_limit")
    kms = await load_secrets_kms(store)
    key_id, secret = new_access_key()
    record = AccessKey(id=key_id, principal=principal.ref,
                       secret=seal(kms, SECRETS_KEY_ALIAS, secret, secret_context(key_id)))
    await store.put(keys.iam_access_key(key_id), record)
    return record, secret


async def admins_with_keys(store) -> set[str]:
    """Principals that hold AdministratorAccess and an active key: the lock-out guard
    refuses to leave none."""
    active = {k.principal for k in await store.list(keys.iam_access_keys(), AccessKey)
              if k.status == "Active"}
    out = set()
    for kind in ("user", "role"):
        for p in await store.list(keys.iam_principals(kind), Principal):
            if ADMIN_POLICY in p.policies and p.ref in active:
                out.add(p.ref)
    return out


async def check_not_last_admin(store, ref: str, change: str) -> None:
    admins = await admins_with_keys(store)
    if admins == {ref}:
        raise Conflict(f"{change} would leave no principal with {ADMIN_POLICY} and an active "
                       "access key (nobody could manage the platform)",
                       f"first give another principal {ADMIN_POLICY} and an access key",
                       code="last_admin")


# -- authentication and authorisation ---------------------------------------------------------------

class Identity(BaseModel):
    """A verified caller: its principal and the policies that apply."""
    key_id: str
    principal: str
    secret: str = Field(repr=False)

    model_config = {"arbitrary_types_allowed": True}


class Authority:
    """Resolves access keys to principals and their policies, with a short cache."""

    def __init__(self, store):
        self.store = store
        self._keys: dict[str, tuple[float, AccessKey | None, str]] = {}
        self._policies: dict[str, tuple[float, list[policies.Policy]]] = {}
        self._kms: tuple[float, Kms] | None = None

    async def kms(self) -> Kms:
        if self._kms is None or time.monotonic() - self._kms[0] > CACHE_SECONDS:
            self._kms = (time.monotonic(), await load_secrets_kms(self.store))
        return self._kms[1]

    async def identity(self, key_id: str) -> Identity:
        """The key's principal and plain secret, or Unauthenticated."""
        cached = self._keys.get(key_id)
        if cached is None or time.monotonic() - cached[0] > CACHE_SECONDS:
            record = await self.store.get(keys.iam_access_key(key_id), AccessKey) \
                if re.fullmatch(r"[A-Z0-9]{8,32}", key_id) else None
            secret = unseal(await self.kms(), record.secret, secret_context(key_id)) if record else ""
            cached = (time.monotonic(), record, secret)
            self._keys[key_id] = cached
        _, record, secret = cached
        if record is None:
            raise Unauthenticated(f"access key {key_id[:32]} does not exist",
                                  "check the credentials profile the client uses", code="invalid_access_key")
        if record.status != "Active":
            raise Unauthenticated(f"access key {key_id} is inactive",
                                  f"activate it (dbplane iam access-key update {key_id} --status Active) "
                                  "or use another", code="inactive_access_key")
        return Identity(key_id=key_id, principal=record.principal, secret=secret)

    async def policies_of(self, ref: str) -> list[policies.Policy]:
        cached = self._policies.get(ref)
        if cached is None or time.monotonic() - cached[0] > CACHE_SECONDS:
            kind, name = split_ref(ref)
            principal = await self.store.get(keys.iam_principal(kind, name), Principal)
            found = []
            for policy_name in principal.policies if principal else []:
                record = await self.store.get(keys.iam_policy(policy_name), ManagedPolicy)
                if record is not None:
                    found.append(parsed(record))
            cached = (time.monotonic(), found)
            self._policies[ref] = cached
        return cached[1]

    async def authorize(self, ref: str, request: policies.Request) -> policies.Decision:
        if key_policy.governs(request):        # an action on one KMS key: its key policy has a say
            decided = await key_policy.authorize(self.store, ref, await self.policies_of(ref), request)
            if decided is not None:
                return decided
        decision = policies.evaluate(await self.policies_of(ref), request)
        if not decision.allowed:
            hint = (f"attach a policy that allows it: dbplane iam attach-policy POLICY "
                    f"--{ref.replace('/', ' ', 1)}")
            if decision.reason.startswith("explicitly denied"):
                hint = "an explicit Deny wins over every Allow: narrow or remove that statement"
            raise AccessDenied(f"{ref} is not allowed to {request.action} on {request.resource} "
                               f"({decision.reason})", hint, code="access_denied")
        return decision

    async def may_list(self, ref: str, request: policies.Request) -> bool:
        """For a list call on e.g. db/*: whether some statement could allow the action on
        some resource under that prefix (the list is then filtered item by item)."""
        prefix = request.resource.removesuffix("*")
        for policy in await self.policies_of(ref):
            for st in policy.statements:
                acts = any(policies.action_matches(a, request.action) for a in st.actions)
                under = any(r == "*" or r.startswith(prefix) for r in st.resources)
                if st.effect == "Allow" and acts and under:
                    return True
        return False


# -- `dbplane up` ----------------------------------------------------------------------------------

def bootstrap(gateway, root_file: str, current_key_id: str | None) -> tuple[str, str] | None:
    """Built-in policies and user admin with AdministratorAccess. Unless `current_key_id`
    (the key in the data root's credentials file) is an active key of admin, a new key
    for admin, returned as (key id, secret) for that file; the oldest admin key makes room
    if admin is at the limit. `gateway` is the synchronous store.gateway.Gateway."""
    from .kms import KmsKey
    from .signing import new_access_key
    for name, document in policies.BUILTIN.items():
        if gateway.get(keys.iam_policy(name)) is None:
            gateway.put(keys.iam_policy(name), ManagedPolicy(
                name=name, document=json.dumps(document, indent=2), builtin=True,
                description="built-in").model_dump_json())
    if gateway.get(keys.iam_principal("user", ADMIN_USER)) is None:
        gateway.put(keys.iam_principal("user", ADMIN_USER), Principal(
            kind="user", name=ADMIN_USER, policies=[ADMIN_POLICY],
            description="created by dbplane up").model_dump_json())
    ref = f"user/{ADMIN_USER}"
    mine = sorted((k for k in (AccessKey.model_validate_json(v)
                               for v in gateway.get_prefix(keys.iam_access_keys()).values())
                   if k.principal == ref), key=lambda k: k.created_at)
    if any(k.id == current_key_id and k.status == "Active" for k in mine):
        return None
    for old in mine[:max(0, len(mine) - MAX_KEYS_PER_PRINCIPAL + 1)]:
        gateway.delete(keys.iam_access_key(old.id))
    kms = Kms(load_root_key(root_file),
              [KmsKey.model_validate_json(v) for v in gateway.get_prefix(keys.kms_keys()).values()])
    key_id, secret = new_access_key()
    record = AccessKey(id=key_id, principal=ref,
                       secret=seal(kms, SECRETS_KEY_ALIAS, secret, secret_context(key_id)))
    gateway.put(keys.iam_access_key(key_id), record.model_dump_json())
    return key_id, secret
