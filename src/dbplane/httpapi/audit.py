"""Records every API call in the audit log (security/audit.py), refused ones included.

Who and what come from `request.state`, set by authentication and the routes:
`principal` ("user/admin"; absent when unauthenticated), `action` ("db:CreateDatabase";
absent: "<METHOD> <route template>") and `resource` ("db/orders"; absent: the path).
The result is the HTTP status and, for a refusal, the error code of the JSON body. Request
bodies, query strings and headers are never recorded: they may carry secrets.
"""

from __future__ import annotations

import json
from contextlib import asynccontextmanager

from fastapi import FastAPI

from ..security import audit
from .auth import PUBLIC

MAX_ERROR_BODY = 8192              # an error body longer than this is not parsed for its code
# Successful reads of these are not recorded: the public routes carry no data and name nobody,
# and Prometheus scrapes /metrics every 15 s, which would drown the log (CloudTrail leaves such
# high-volume reads out by default too). Refused or failed calls of them are recorded.
UNRECORDED_READS = PUBLIC | {"/metrics"}


def install(app: FastAPI) -> None:
    """Record every call of `app`, and flush the log before the app's store closes."""
    app.add_middleware(AuditMiddleware, api=app)
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(a):
        async with inner(a) as state:
            try:
                yield state
            finally:
                if getattr(a.state, "store", None) is not None:
                    await audit.flush(a.state.store)

    app.router.lifespan_context = lifespan


def result_of(status: int) -> str:
    if status < 400:
        return "allowed"
    return "denied" if status in (401, 403) else "error"


def error_code(body: bytes) -> str:
    """The `{"error": {"code": ...}}` of an error response, or ""."""
    try:
        code = json.loads(body)["error"]["code"]
        return code if isinstance(code, str) else ""
    except (ValueError, KeyError, TypeError):
        return ""


class AuditMiddleware:
    """Plain ASGI (not BaseHTTPMiddleware): it sees the status and the error body as they
    are sent, without buffering successful responses."""

    def __init__(self, app, api: FastAPI):
        self.app, self.api = app, api

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status, body = 500, bytearray()       # 500 if the app raises before responding

        async def watch(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and status >= 400 \
                    and len(body) <= MAX_ERROR_BODY:
                body.extend(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            await self._record(scope, status, bytes(body))

    async def _record(self, scope, status: int, body: bytes) -> None:
        store = getattr(self.api.state, "store", None)
        if store is None:
            return
        state = scope.get("state") or {}
        route = scope.get("route")
        template = getattr(route, "path", None) or scope["path"]
        if template in UNRECORDED_READS and scope["method"] in ("GET", "HEAD") and status < 400:
            return
        client = scope.get("client")
        await audit.record_call(
            store, principal=state.get("principal"),
            action=state.get("action") or f"{scope['method']} {template}",
            resource=state.get("resource") or scope["path"],
            source=client[0] if client else "", result=result_of(status), status=status,
            code=error_code(body) if status >= 400 else "")
