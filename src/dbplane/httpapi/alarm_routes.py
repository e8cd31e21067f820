"""Alarms (src/dbplane/alarms/, docs/observability.md#alarms): the API writes definitions,
the controller's evaluator writes states.

  GET    /v1/alarms[?database=&state=]      definitions with their current state
  GET    /v1/alarms/{name}                  one, with its state
  GET    /v1/alarms/{name}/history          its state changes, newest first
  PUT    /v1/alarms/{name}                  create or replace (validated; 400 invalid_alarm)
  DELETE /v1/alarms/{name}                  delete (a default is then not made again)
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request

from ..alarms.model import AlarmSpec, AlarmState, DeletedDefault, redact, validate
from ..errors import InvalidInput, NotFound
from ..models import DatabaseSpec
from ..store import keys
from .auth import visible

router = APIRouter()
STATES = ("OK", "ALARM", "INSUFFICIENT_DATA")


def view(spec: AlarmSpec, state: AlarmState | None, history: bool = False) -> dict:
    out = spec.model_dump()
    out["webhooks"] = [redact(u) for u in spec.webhooks]    # their paths often carry a token
    out["datapoints_to_alarm"] = spec.needed
    s = state or AlarmState(name=spec.name, database=spec.database, since=spec.updated_at)
    out.update(state=s.state, reason=s.reason, state_since=s.since, evaluated_at=s.evaluated_at or None,
               value=s.value)
    if history:
        out["history"] = [h.model_dump() for h in reversed(s.history)]
    return out


async def _get(request: Request, name: str) -> tuple[AlarmSpec, AlarmState | None]:
    store = request.app.state.store
    spec = await store.get(keys.alarm(name), AlarmSpec)
    if spec is None:
        raise NotFound(f"alarm {name!r} does not exist", "list alarms with 'dbplane alarms list'",
                       code="alarm_not_found")
    return spec, await store.get(keys.alarm_state(name), AlarmState)


@router.get("/v1/alarms")
async def list_alarms(request: Request, database: str | None = None, state: str | None = None):
    if state is not None and state not in STATES:
        raise InvalidInput(f"unknown alarm state {state!r}", f"use one of {', '.join(STATES)}",
                           code="invalid_state")
    store = request.app.state.store
    states = {s.name: s for s in await store.list(keys.alarm_states(), AlarmState)}
    out = []
    for spec in sorted(await store.list(keys.alarms(), AlarmSpec), key=lambda a: a.name):
        if database is not None and spec.database != database:
            continue
        if not visible(request, f"alarm/{spec.name}"):
            continue
        item = view(spec, states.get(spec.name))
        if state is None or item["state"] == state:
            out.append(item)
    return out


@router.get("/v1/alarms/{name}")
async def describe_alarm(name: str, request: Request):
    spec, state = await _get(request, name)
    return view(spec, state, history=True)


@router.get("/v1/alarms/{name}/history")
async def alarm_history(name: str, request: Request, limit: int = 50):
    spec, state = await _get(request, name)
    return view(spec, state, history=True)["history"][:max(1, limit)]


@router.put("/v1/alarms/{name}")
async def put_alarm(name: str, request: Request):
    try:
        raw = await request.json()
    except ValueError:
        raise InvalidInput("the body is not JSON", "send the alarm definition as a JSON object",
                           code="invalid_alarm") from None
    store = request.app.state.store
    spec = validate(raw, name, await _databases(store))
    old = await store.get(keys.alarm(name), AlarmSpec)
    deleted = await store.get(keys.alarm_deleted_default(name), DeletedDefault)
    now = time.time()
    # a default stays one when edited, or set again after being deleted (so deleting it again
    # is recorded again)
    default = bool((old and old.default and old.database == spec.database)
                   or (deleted and deleted.database == spec.database))
    spec = spec.model_copy(update={"created_at": old.created_at if old else now, "updated_at": now,
                                   "default": default})
    await store.put(keys.alarm(name), spec)
    await store.delete(keys.alarm_deleted_default(name))
    return view(spec, await store.get(keys.alarm_state(name), AlarmState))


async def _databases(store) -> set[str]:
    raw = await store.get_prefix(keys.databases())
    out = set()
    for k, v in raw.items():
        if k.endswith("/spec"):
            s = DatabaseSpec.model_validate_json(v)
            if not s.deleting:
                out.add(s.name)
    return out


@router.delete("/v1/alarms/{name}")
async def delete_alarm(name: str, request: Request):
    spec, _ = await _get(request, name)
    store = request.app.state.store
    if spec.default and spec.database:
        await store.put(keys.alarm_deleted_default(name), DeletedDefault(name=name, database=spec.database))
    await store.delete(keys.alarm(name))
    await store.delete(keys.alarm_state(name))
    return {"deleted": name}
