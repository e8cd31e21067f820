"""The storage quota (--storage-gb): every member holds a full copy of the database, so
the largest data directory counts. Over the quota the database goes read-only, as an RDS
instance does in storage-full; under 95% of it writes are allowed again."""

from __future__ import annotations

import logging

from ..errors import DbplaneError
from ..models import DatabaseSpec, DatabaseStatus
from ..store import keys
from . import operations, patroni_rest
from .topology import member_views

log = logging.getLogger("dbplane.controller")

GIB = 1024**3
RESUME_BELOW = 0.95       # hysteresis: do not flap around the limit


def used_bytes(views) -> int | None:
    sizes = [v.storage_bytes for v in views if v.storage_bytes is not None]
    return max(sizes) if sizes else None


async def ensure_storage_quota(p, spec: DatabaseSpec, status: DatabaseStatus) -> None:
    views = member_views(p.snap, spec.name)
    used = used_bytes(views)
    primary = next((v for v in views if v.role == "primary"), None)
    if used is None or primary is None:
        return
    quota = spec.storage_gb * GIB
    if not status.storage_full and used > quota:
        full, value, kind = True, "on", "storage-full"
        message = (f"{used // 2**20} MB used of the {spec.storage_gb} GB quota: writes are refused "
                   f"until you raise it ('dbplane db modify {spec.name} --storage-gb N') or free space")
    elif status.storage_full and used < quota * RESUME_BELOW:
        full, value, kind = False, None, "storage-ok"
        message = f"{used // 2**20} MB used of the {spec.storage_gb} GB quota: writes allowed again"
    else:
        return
    url = patroni_rest.api_url(primary.address, primary.api_port)
    try:
        # a sighup setting: applied by reload, no restart; null removes it again
        await patroni_rest.patch_config(
            url, {"postgresql": {"parameters": {"default_transaction_read_only": value}}})
    except DbplaneError as e:
        log.warning("%s: cannot switch read-only %s: %s", spec.name, value, e)
        return
    status.storage_full = full
    await p.store.put(keys.database_status(spec.name), status)
    await operations.record_event(p.store, spec.name, kind, message)
