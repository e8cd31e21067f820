"""Routes of a database's network allowlist (like a security group's inbound rules):
list, allow a CIDR, revoke one, replace them all. No operation: the proxies watch the
spec and apply the rules to new connections at once (and close connections the new
rules no longer allow); the generation stays as is, so the controller sees nothing to
roll out. Rule checks are in proxy/allowlist.py."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, Request
from pydantic import BaseModel

from ..errors import Conflict
from ..models import AllowRule, DatabaseSpec
from ..proxy.allowlist import MAX_RULES, add_rule, normalize, remove_rule
from ..store import Store, keys
from .views import get_spec

router = APIRouter()
ATTEMPTS = 10      # compare-and-swap retries against concurrent writers of the spec


class NewRule(BaseModel):
    cidr: str
    description: str = ""

    model_config = {"extra": "forbid"}


class AllRules(BaseModel):
    rules: list[AllowRule]

    model_config = {"extra": "forbid"}


def view(spec: DatabaseSpec) -> dict:
    return {"database": spec.name, "rules": [r.model_dump() for r in spec.allowlist],
            "max_rules": MAX_RULES}


async def _change(s: Store, name: str, change: Callable[[list[AllowRule]], list[AllowRule]]) -> dict:
    """Apply change to the rules as stored, without losing a concurrent write."""
    key = keys.database_spec(name)
    for _ in range(ATTEMPTS):
        raw = await s.get_raw(key)
        if raw is None:
            await get_spec(s, name)             # raises the API's database_not_found
            continue                            # created meanwhile: read it again
        spec = DatabaseSpec.model_validate_json(raw)
        if spec.deleting:
            raise Conflict(f"database {name} is being deleted", "create a new database instead",
                           code="database_deleting")
        spec = spec.model_copy(update={"allowlist": change(spec.allowlist)})
        if await s.commit_if(key, raw, {key: spec}):
            return view(spec)
    raise Conflict(f"database {name} kept changing while its allowlist was written",
                   "try again", code="concurrent_change")


@router.get("/v1/databases/{name}/allowlist")
async def list_rules(name: str, request: Request):
    return view(await get_spec(request.app.state.store, name))


@router.post("/v1/databases/{name}/allowlist", status_code=201)
async def allow(name: str, body: NewRule, request: Request):
    """Allow clients from body.cidr (like authorize-security-group-ingress)."""
    return await _change(request.app.state.store, name,
                         lambda rules: add_rule(rules, name, body.cidr, body.description))


@router.delete("/v1/databases/{name}/allowlist")
async def revoke(name: str, cidr: str, request: Request):
    """Revoke the rule for cidr (like revoke-security-group-ingress)."""
    return await _change(request.app.state.store, name, lambda rules: remove_rule(rules, name, cidr))


@router.put("/v1/databases/{name}/allowlist")
async def replace(name: str, body: AllRules, request: Request):
    """Replace every rule (an empty list refuses every client)."""
    rules = normalize(body.rules)
    return await _change(request.app.state.store, name, lambda _: rules)
