"""The doctor's routes: each check's findings with evidence and fix (src/dbplane/doctor/)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from ..doctor import diagnose, security
from .views import get_spec

router = APIRouter()


@router.get("/v1/doctor/security")
async def doctor_security(request: Request, database: str | None = None):
    store = request.app.state.store
    if database is not None:
        await get_spec(store, database)          # database_not_found for a name that is not there
    findings = await security.run_with_timeout(store, request.app.state.data_root, database)
    return {"findings": [f.model_dump() for f in findings]}


@router.get("/v1/doctor/databases/{name}")
async def doctor_database(name: str, request: Request):
    """Connection exhaustion, replication lag and its cause, deadlocks, missing indexes,
    bloat, long and idle-in-transaction sessions, backups, storage (docs/doctor.md)."""
    store = request.app.state.store
    await get_spec(store, name)
    findings = await diagnose.run_with_timeout(store, name, request.app.state.data_root)
    return {"database": name, "findings": [f.model_dump() for f in findings]}
