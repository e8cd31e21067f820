"""Routes of the audit log (like CloudTrail's LookupEvents, plus a chain check): list
entries newest first with filters and paging, verify the chain, read and change the
retention. The log itself is security/audit.py."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel

from ..errors import InvalidInput
from ..security import audit
from ..security.audit_chain import AuditSettings
from ..store import Store, keys

router = APIRouter()


class PatchSettings(BaseModel):
    retention_days: int | None = None
    max_entries: int | None = None

    model_config = {"extra": "forbid"}


def _store(request: Request) -> Store:
    return request.app.state.store


def _token(text: str | None) -> int | None:
    if text is None:
        return None
    if not text.isdigit():
        raise InvalidInput(f"invalid next_token {text!r}",
                           "pass the next_token of the previous page as it was returned",
                           code="invalid_next_token")
    return int(text)


@router.get("/v1/audit")
async def list_audit(request: Request, since: float | None = None, until: float | None = None,
                     principal: str | None = None, action: str | None = None,
                     resource: str | None = None, result: str | None = None,
                     limit: int = Query(50, ge=1, le=1000), next_token: str | None = None):
    """Entries newest first. principal, action and resource take * wildcards ("db:*");
    since and until are Unix times. Pass next_token back for the next page."""
    filters = audit.Filters(since=since, until=until, principal=principal, action=action,
                            resource=resource, result=result)
    entries, more = await audit.list_entries(_store(request), filters, limit, _token(next_token))
    return {"entries": entries, "next_token": str(more) if more else None}


@router.get("/v1/audit/verify")
async def verify_audit(request: Request):
    """Walk the hash chain and check its signatures: ok, or the first tampered entry."""
    return (await audit.verify(_store(request))).model_dump()


@router.get("/v1/audit/settings")
async def get_audit_settings(request: Request):
    return (await audit.get_settings(_store(request))).model_dump()


@router.patch("/v1/audit/settings")
async def update_audit_settings(body: PatchSettings, request: Request):
    s = _store(request)
    current = await audit.get_settings(s)
    changed = AuditSettings(**{**current.model_dump(), **body.model_dump(exclude_none=True)})
    await s.put(keys.audit_settings(), audit.check_settings(changed))
    return changed.model_dump()
